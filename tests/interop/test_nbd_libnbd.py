"""hastd's NBD export against libnbd's own tools (nbdinfo, nbdsh, nbdcopy): the real client."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from carpool.hast.nbdserver import FileBackend, NbdServer
from tests.conftest import requires_tool

SIZE = 64 * 1024 * 1024


class ServerThread:
    """An NbdServer on its own event loop in a thread, for the duration of a test."""

    def __init__(self, backing: Path, socket: Path) -> None:
        self.backend = FileBackend(backing)
        self.server = NbdServer("shared_storage", self.backend)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.listen_unix(socket), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.backend.close()


@pytest.fixture
def export() -> Iterator[tuple[Path, str, ServerThread]]:
    directory = Path(tempfile.mkdtemp(prefix="cpnbd", dir="/tmp"))
    backing = directory / "disk.img"
    with open(backing, "wb") as handle:
        handle.truncate(SIZE)
    socket = directory / "nbd.sock"
    server = ServerThread(backing, socket)
    try:
        yield backing, f"nbd+unix:///shared_storage?socket={socket}", server
    finally:
        server.stop()
        for path in directory.iterdir():
            path.unlink()
        directory.rmdir()


@requires_tool("nbdinfo")
def test_nbdinfo_sees_the_export_and_its_capabilities(
    export: tuple[Path, str, ServerThread],
) -> None:
    _, uri, _ = export
    info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True, text=True,
                                     check=True).stdout)  # fmt: skip
    (entry,) = info["exports"]
    assert entry["export-name"] == "shared_storage"
    assert entry["export-size"] == SIZE
    for capability in ("can_flush", "can_fua", "can_trim", "can_zero"):
        assert entry[capability] is True, capability
    assert entry["is_read_only"] is False
    assert entry["can_multi_conn"] is False


NBDSH = """
h.pwrite(b"A" * 4096, 0)
h.pwrite(b"B" * 65536, 1048576, nbd.CMD_FLAG_FUA)
h.flush()
assert h.pread(4096, 0) == b"A" * 4096
h.zero(4096, 1048576 + 4096)
assert h.pread(4096, 1048576 + 4096) == bytes(4096)
h.trim(1048576, 2097152)
h.set_strict_mode(0)  # let the request reach the server instead of libnbd's own check
try:
    h.pread(4096, SIZE - 2048)
except nbd.Error as e:
    print("EINVAL" if e.errnum == errno.EINVAL else e)
"""


@requires_tool("nbdsh")
def test_nbdsh_writes_reads_flushes_zeroes_and_is_refused_out_of_range(
    export: tuple[Path, str, ServerThread],
) -> None:
    backing, uri, server = export
    script = f"import errno\nSIZE = {SIZE}\n{NBDSH}"
    # nbdsh is Debian's python3-libnbd: run it with Debian's Python, whatever is first in PATH.
    nbdsh = ["/usr/bin/python3", "-m", "nbd", "-u", uri, "-c", script]
    result = subprocess.run(nbdsh, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "EINVAL"
    data = backing.read_bytes()
    assert data[:4096] == b"A" * 4096
    assert data[1048576 : 1048576 + 4096] == b"B" * 4096
    assert data[1048576 + 4096 : 1048576 + 8192] == bytes(4096)
    assert server.server.requests >= 6


@requires_tool("nbdcopy")
def test_nbdcopy_with_many_requests_in_flight_lands_byte_for_byte(
    export: tuple[Path, str, ServerThread],
) -> None:
    backing, uri, _ = export
    source = backing.with_name("source.img")
    source.write_bytes(os.urandom(SIZE))
    try:
        subprocess.run(["nbdcopy", "--requests=32", str(source), uri], check=True, timeout=120)
        assert (
            hashlib.sha256(backing.read_bytes()).digest()
            == hashlib.sha256(source.read_bytes()).digest()
        )
        copied_back = backing.with_name("back.img")
        subprocess.run(["nbdcopy", uri, str(copied_back)], check=True, timeout=120)
        assert copied_back.read_bytes() == source.read_bytes()
        copied_back.unlink()
    finally:
        source.unlink()


@requires_tool("qemu-io", "qemu-img")
def test_qemu_reads_writes_and_sizes_the_export(export: tuple[Path, str, ServerThread]) -> None:
    backing, uri, _ = export
    shown = subprocess.run(["qemu-img", "info", "--output=json", uri], check=True,
                           capture_output=True, text=True)  # fmt: skip
    info = json.loads(shown.stdout)
    assert info["virtual-size"] == SIZE
    script = ["-c", "write -P 0x5a 1M 192k", "-c", "flush", "-c", "read -P 0x5a 1M 192k",
              "-c", "write -z 4M 64k", "-c", "read -P 0 4M 64k"]  # fmt: skip
    result = subprocess.run(["qemu-io", "-f", "raw", *script, uri], capture_output=True,
                            text=True, check=True)  # fmt: skip
    assert "Pattern verification failed" not in result.stdout + result.stderr
    with open(backing, "rb") as disk:
        disk.seek(1 << 20)
        assert disk.read(192 * 1024) == b"\x5a" * (192 * 1024)
