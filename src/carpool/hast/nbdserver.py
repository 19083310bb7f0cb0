"""The NBD export of a HAST resource: an asyncio server around ``hast.nbd``'s machine.

Each client connection feeds an :class:`~carpool.hast.nbd.NbdServerConnection`;
every request it yields is carried out by a :class:`BlockBackend` (the primary's
replicating data path, or :class:`FileBackend` for the local provider alone), many
at a time, and answered as soon as it completes. Replies go out in completion
order, as NBD allows. A broken client costs its connection, never the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Protocol

from carpool.errors import CarpoolError
from carpool.hast.nbd import (
    Disconnect,
    Export,
    NbdCommand,
    NbdError,
    NbdServerConnection,
    Request,
    RequestRejected,
)

log = logging.getLogger("carpool.hastd")

READ_CHUNK = 256 * 1024
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class BackendError(CarpoolError):
    """A request the backend could not carry out; ``nbd_error`` is what the client gets."""

    def __init__(self, message: str, nbd_error: NbdError = NbdError.EIO) -> None:
        super().__init__(message)
        self.nbd_error = nbd_error


class BlockBackend(Protocol):
    """What an export's requests are carried out by."""

    size: int

    async def read(self, offset: int, length: int) -> bytes: ...
    async def write(self, offset: int, data: memoryview, fua: bool) -> None: ...
    async def flush(self) -> None: ...
    async def trim(self, offset: int, length: int, fua: bool) -> None: ...
    async def write_zeroes(self, offset: int, length: int, fua: bool, no_hole: bool) -> None: ...


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    function = libc.fallocate
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    function.restype = ctypes.c_int
    return function


class FileBackend:
    """A local file or block device: reads and writes on the event loop (page cache), and
    durability (fsync, FUA) on one dedicated thread, so the loop never waits for a disk.
    """

    def __init__(self, path: str | os.PathLike[str], offset: int = 0, size: int | None = None):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise CarpoolError(f"cannot open {self.path}: {error.strerror}") from None
        info = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(info.st_mode)
        total = os.lseek(self.fd, 0, os.SEEK_END)
        self.offset = offset
        self.size = size if size is not None else total - offset
        if offset < 0 or self.size < 0 or offset + self.size > total:
            os.close(self.fd)
            raise CarpoolError(f"{self.path} is {total} bytes: too small for the resource")
        self._sync_thread = ThreadPoolExecutor(1, thread_name_prefix="hast-fsync")
        self._fallocate = None if self.is_block_device else _libc_fallocate()

    def close(self) -> None:
        self._sync_thread.shutdown(wait=True)
        os.close(self.fd)

    def _io_error(self, what: str, error: OSError) -> BackendError:
        code = NbdError.ENOSPC if error.errno == errno.ENOSPC else NbdError.EIO
        return BackendError(f"{what} on {self.path} failed: {error.strerror}", code)

    async def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, self.offset + offset)
        except OSError as error:
            raise self._io_error("read", error) from None
        if len(data) != length:
            raise BackendError(f"short read on {self.path} at {offset}")
        return data

    async def write(self, offset: int, data: memoryview, fua: bool) -> None:
        try:
            written = os.pwrite(self.fd, data, self.offset + offset)
        except OSError as error:
            raise self._io_error("write", error) from None
        if written != len(data):
            raise BackendError(f"short write on {self.path} at {offset}")
        if fua:
            await self._sync(os.fdatasync)

    async def flush(self) -> None:
        await self._sync(os.fsync)

    async def _sync(self, function: Callable[[int], None]) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._sync_thread, function, self.fd)
        except OSError as error:
            raise self._io_error("fsync", error) from None

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        # TRIM is advisory: punch a hole in a file, leave a device's blocks alone.
        self._punch(offset, length)
        if fua:
            await self._sync(os.fdatasync)

    async def write_zeroes(self, offset: int, length: int, fua: bool, no_hole: bool) -> None:
        if no_hole or not self._punch(offset, length):
            zeroes = bytes(min(length, 1 << 20))
            position = offset
            while position < offset + length:
                piece = min(len(zeroes), offset + length - position)
                await self.write(position, memoryview(zeroes)[:piece], fua=False)
                position += piece
        if fua:
            await self._sync(os.fdatasync)

    def _punch(self, offset: int, length: int) -> bool:
        if self._fallocate is None:
            return False
        mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
        return self._fallocate(self.fd, mode, self.offset + offset, length) == 0


Respond = Callable[[int, bytes | memoryview | None], None]
Submit = Callable[[Request, Respond], None]


class NbdServer:
    """Serves one export over a unix socket (and optionally TCP) until closed.

    Requests go to ``backend`` (each carried out in its own task), or, when
    ``submit`` is given, to it with a ``respond(error, data)`` callback: that is
    how the HAST primary machine, which answers in its own time, is plugged in.
    """

    def __init__(
        self,
        export_name: str,
        backend: BlockBackend | None = None,
        *,
        size: int | None = None,
        submit: Submit | None = None,
        read_only: bool = False,
    ):
        if (backend is None) == (submit is None):
            raise ValueError("give a backend or a submit function")
        export_size = backend.size if backend is not None else size
        if export_size is None:
            raise ValueError("a submit function needs the export size")
        self.export = Export(name=export_name, size=export_size, read_only=read_only)
        self.backend = backend
        self.submit = submit
        self.servers: list[asyncio.AbstractServer] = []
        self.connections: set[asyncio.Task[None]] = set()
        self.requests = 0
        self.errors = 0

    async def listen_unix(self, path: str | os.PathLike[str]) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        server = await asyncio.start_unix_server(self._accept, path=str(path))
        os.chmod(path, 0o600)
        self.servers.append(server)

    async def listen_tcp(self, host: str, port: int) -> None:
        self.servers.append(await asyncio.start_server(self._accept, host, port))

    async def close(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.connections):
            task.cancel()
        for server in self.servers:
            await server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.connections.add(task)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        machine = NbdServerConnection([self.export], default_export=self.export.name)
        in_flight: set[asyncio.Task[None]] = set()
        writer.write(machine.data_to_send())
        closing = False
        while not closing:
            data = await reader.read(READ_CHUNK)
            for event in machine.receive_data(data):
                if isinstance(event, Request):
                    if event.command == NbdCommand.DISC:
                        continue
                    self.requests += 1
                    if self.submit is not None:
                        self.submit(event, self._responder(machine, event, writer))
                        continue
                    request_task = asyncio.ensure_future(self._carry_out(machine, event, writer))
                    in_flight.add(request_task)
                    request_task.add_done_callback(in_flight.discard)
                elif isinstance(event, RequestRejected):
                    self.errors += 1
                    log.debug("refused %s: %s", event.command, event.reason)
                elif isinstance(event, Disconnect):
                    closing = True
                    if not event.clean:
                        log.info("NBD client gone: %s", event.reason)
            pending = machine.data_to_send()
            if pending:
                writer.write(pending)
            await writer.drain()
        if in_flight:
            await asyncio.wait(in_flight)  # answer what was asked before the disconnect
        with contextlib.suppress(ConnectionError):
            await writer.drain()

    def _responder(
        self, machine: NbdServerConnection, request: Request, writer: asyncio.StreamWriter
    ) -> Respond:
        def respond(error: int, data: bytes | memoryview | None) -> None:
            if error:
                self.errors += 1
            if not writer.is_closing():
                writer.writelines(machine.reply(request, error, data if error == 0 else None))

        return respond

    async def _carry_out(
        self, machine: NbdServerConnection, request: Request, writer: asyncio.StreamWriter
    ) -> None:
        backend = self.backend
        assert backend is not None
        data: bytes | None = None
        error = 0
        try:
            if request.command == NbdCommand.READ:
                data = await backend.read(request.offset, request.length)
            elif request.command == NbdCommand.WRITE:
                assert request.data is not None
                await backend.write(request.offset, request.data, request.fua)
            elif request.command == NbdCommand.FLUSH:
                await backend.flush()
            elif request.command == NbdCommand.TRIM:
                await backend.trim(request.offset, request.length, request.fua)
            elif request.command == NbdCommand.WRITE_ZEROES:
                await backend.write_zeroes(
                    request.offset, request.length, request.fua, request.no_hole
                )
            else:
                error = NbdError.EINVAL
        except BackendError as failure:
            self.errors += 1
            error = failure.nbd_error
            log.warning("%s at %d+%d: %s", request.command.name, request.offset, request.length,
                        failure)  # fmt: skip
        if writer.is_closing():
            return
        writer.writelines(machine.reply(request, error, data if error == 0 else None))
