"""Running the host's tools (ip, nft, losetup) for the lab, with errors that name the command."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Sequence

from carpool.errors import CarpoolError


class LabError(CarpoolError):
    """A lab operation that failed; the message names the command and its error."""


def run(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, input: str | None = None
) -> str:
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False
    )
    if check and result.returncode != 0:
        raise LabError(f"{shlex.join(argv)} failed: {result.stderr.strip() or result.returncode}")
    return result.stdout
