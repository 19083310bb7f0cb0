"""Running devd's and ifstated's actions: one at a time, through /bin/sh, with a timeout.

FreeBSD's devd runs an action to its end before the next one, so a promote and a
demote for the same resource never overlap; carpool keeps that order with one
queue, and adds a timeout: an action that hangs is killed (its whole process
group) and logged, and the queue moves on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("carpool.devd")

DEFAULT_TIMEOUT = 120.0
OUTPUT_LIMIT = 64 * 1024


@dataclass(frozen=True)
class ActionResult:
    command: str
    origin: str  # what asked for it: "rule at file:line", "state demoted", ...
    returncode: int | None  # None: killed at the timeout
    output: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0


class ActionRunner:
    """A FIFO of shell commands, run strictly one after another."""

    def __init__(
        self,
        timeout: float = DEFAULT_TIMEOUT,
        on_result: Callable[[ActionResult], None] | None = None,
        environment: dict[str, str] | None = None,
    ) -> None:
        self.timeout = timeout
        self.on_result = on_result
        self.environment = environment
        self.queue: asyncio.Queue[tuple[str, str, dict[str, str]]] = asyncio.Queue()
        self.completed = 0
        self.failed = 0
        self.timed_out = 0
        self.running: str | None = None

    def submit(self, command: str, origin: str, variables: dict[str, str] | None = None) -> None:
        self.queue.put_nowait((command, origin, variables or {}))

    async def run_forever(self) -> None:
        while True:
            command, origin, variables = await self.queue.get()
            self.running = command
            try:
                result = await self.run_one(command, origin, variables)
            finally:
                self.running = None
                self.queue.task_done()
            if self.on_result is not None:
                self.on_result(result)

    async def run_one(self, command: str, origin: str, variables: dict[str, str]) -> ActionResult:
        environment = dict(os.environ if self.environment is None else self.environment)
        environment.update(
            {f"DEVD_{k.upper()}": v for k, v in variables.items() if k.isidentifier()}
        )
        started = time.monotonic()
        log.info("action (%s): %s", origin, command)
        process = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )  # fmt: skip
        assert process.stdout is not None
        try:
            output = await asyncio.wait_for(_read_capped(process.stdout), self.timeout)
            returncode: int | None = await asyncio.wait_for(process.wait(), self.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            output, returncode = b"", None
        seconds = time.monotonic() - started
        text = output.decode(errors="replace").rstrip()
        if returncode is None:
            self.timed_out += 1
            log.error("action (%s) killed after %.0f s timeout: %s", origin, self.timeout, command)
        elif returncode != 0:
            self.failed += 1
            log.warning("action (%s) exited %d: %s", origin, returncode, command)
        else:
            self.completed += 1
        for line in text.splitlines():
            log.info("action output: %s", line)
        return ActionResult(command, origin, returncode, text, seconds)


async def _read_capped(stream: asyncio.StreamReader) -> bytes:
    """Everything the action prints until it closes its output; only the start is kept."""
    kept = b""
    while chunk := await stream.read(65536):
        if len(kept) < OUTPUT_LIMIT:
            kept += chunk[: OUTPUT_LIMIT - len(kept)]
    return kept
