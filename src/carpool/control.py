"""The one control channel: every daemon serves it, every ``*ctl`` command uses it.

Transport: a unix stream socket (``/run/carpool/<daemon>.sock`` by default, mode
0600 like FreeBSD's hastd control socket) carrying newline-delimited JSON.

Requests and responses, many per connection, answered in order::

    -> {"command": "status", "args": {"vhid": 1}}
    <- {"ok": true, "result": {...}}
    <- {"ok": false, "error": "one-line message"}

Every request line gets exactly one response line.  A bad line (not UTF-8, not
JSON, not an object, no string ``command``, ``args`` not an object, an unknown
command) gets an error response and the connection carries on; a line longer
than the request limit (1 MiB) gets an error response and the connection is
closed.  A handler raising :class:`~carpool.errors.CarpoolError` (e.g.
``CommandError``) answers its message; any other exception is logged with its
traceback and answers ``internal error in <command>: ...``; the daemon goes on.

Built-in commands: ``ping`` answers ``{"pid": ..., "daemon": NAME}``, and
``subscribe`` (``{"command": "subscribe", "args": {"events": ["MASTER"]}}``,
``events`` optional) answers ``"subscribed"`` and then turns the connection into
a stream of ``{"event": {...Event.to_dict()...}}`` lines until the client
disconnects.  A subscriber too slow to keep up gets a final
``{"ok": false, "error": ...}`` line and is disconnected.

Clients: :class:`ControlClient` (blocking, for the ctl commands) and
:func:`async_request` / :func:`async_subscribe` (for daemons such as devd and
ifstated that follow other daemons).  Both raise :class:`ControlError` with a
message that tells the user what to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import inspect
import ipaddress
import json
import logging
import os
import socket
import stat
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Generator, Mapping
from pathlib import Path, PurePath
from typing import Any

from carpool.errors import CarpoolError
from carpool.events import Event, EventBus, Subscription

__all__ = [
    "BUILTIN_COMMANDS",
    "DEFAULT_TIMEOUT",
    "MAX_REQUEST",
    "ControlClient",
    "ControlError",
    "ControlServer",
    "Handler",
    "RemoteError",
    "async_request",
    "async_subscribe",
    "default_run_dir",
    "pidfile_path",
    "read_pidfile",
    "remove_pidfile",
    "socket_path",
    "write_pidfile",
]

Handler = Callable[[dict[str, Any]], Any | Awaitable[Any]]
"""A command handler: takes the request's ``args`` object, returns a JSON-able result."""

MAX_REQUEST = 1 << 20
"""Longest request line the server accepts, in bytes (without the newline)."""

DEFAULT_TIMEOUT = 10.0
"""Seconds a client waits for a daemon's answer."""

BUILTIN_COMMANDS = ("ping", "subscribe")

_MAX_RESPONSE = 64 << 20
_STREAM_WRITE_TIMEOUT = 30.0
_PROBE_TIMEOUT = 2.0
_SKIP_TIMEOUT = 5.0

log = logging.getLogger("carpool.control")


class ControlError(CarpoolError):
    """Talking to a daemon failed; the message says what to do about it."""


class RemoteError(ControlError):
    """The daemon answered ``{"ok": false}``; the message is its error text."""


# --------------------------------------------------------------------------- paths


def default_run_dir() -> Path:
    """Where daemons put their control sockets and pidfiles unless told otherwise:
    ``$CARPOOL_RUN_DIR``, else ``/run/carpool``."""
    return Path(os.environ.get("CARPOOL_RUN_DIR") or "/run/carpool")


def socket_path(run_dir: str | os.PathLike[str], daemon_name: str) -> Path:
    """``run_dir/<daemon_name>.sock``."""
    return Path(run_dir) / f"{daemon_name}.sock"


def pidfile_path(run_dir: str | os.PathLike[str], daemon_name: str) -> Path:
    """``run_dir/<daemon_name>.pid``."""
    return Path(run_dir) / f"{daemon_name}.pid"


def write_pidfile(path: str | os.PathLike[str], pid: int | None = None) -> None:
    """Write *pid* (ours by default) to *path*: temp file, fsync, rename, fsync the directory."""
    target = Path(path)
    number = os.getpid() if pid is None else pid
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{number}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise CarpoolError(f"cannot write pidfile {target}: {exc.strerror or exc}") from exc


def read_pidfile(path: str | os.PathLike[str]) -> int | None:
    """The pid stored in *path*, or ``None`` if there is no such file."""
    target = Path(path)
    try:
        text = target.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CarpoolError(f"cannot read pidfile {target}: {exc.strerror or exc}") from exc
    text = text.strip()
    if not text.isdigit() or int(text) <= 0:
        raise CarpoolError(f"pidfile {target} does not hold a pid ({text[:20]!r}): remove it")
    return int(text)


def remove_pidfile(path: str | os.PathLike[str], pid: int | None = None) -> None:
    """Remove *path* if it still holds *pid* (ours by default); leave another daemon's alone."""
    try:
        current = read_pidfile(path)
    except CarpoolError:
        return
    if current is not None and current == (os.getpid() if pid is None else pid):
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()


# --------------------------------------------------------------------------- wire


def _json_default(obj: object) -> Any:
    """Make common result types JSON-able: events, dataclasses, enums, paths, sets."""
    if isinstance(obj, Event):
        return obj.to_dict()
    if isinstance(obj, Mapping):
        return dict(obj.items())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, PurePath | ipaddress.IPv4Address | ipaddress.IPv6Address):
        return str(obj)
    if isinstance(obj, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(obj)
    if isinstance(obj, ipaddress.IPv4Interface | ipaddress.IPv6Interface):
        return str(obj)
    if isinstance(obj, set | frozenset):
        try:
            return sorted(obj)
        except TypeError:
            return list(obj)
    if isinstance(obj, tuple | list):
        return list(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def _encode(obj: object) -> bytes:
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_json_default)
    return text.encode("ascii") + b"\n"


def _error(message: str) -> bytes:
    return _encode({"ok": False, "error": _one_line(message)})


def _one_line(message: str) -> str:
    return " ".join(message.split()) or "error"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return type(value).__name__


# --------------------------------------------------------------------------- server


class ControlServer:
    """Serves a daemon's control socket with the given command handlers.

    ``handlers`` maps command names to callables taking the request's ``args``
    dict and returning (or awaiting to) a JSON-able result.  ``bus`` feeds the
    ``subscribe`` command; ``name`` is what ``ping`` reports (by default the
    socket's name: ``carpd`` for ``carpd.sock``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        handlers: Mapping[str, Handler],
        bus: EventBus | None = None,
        name: str | None = None,
        *,
        max_request: int = MAX_REQUEST,
    ) -> None:
        self.path = Path(path)
        self.name = name if name is not None else _daemon_name(self.path)
        self.bus = bus
        self.max_request = max_request
        self._handlers: dict[str, Handler] = {}
        for command, handler in handlers.items():
            self.register(command, handler)
        self._server: asyncio.AbstractServer | None = None
        self._identity: tuple[int, int] | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    def register(self, command: str, handler: Handler) -> None:
        """Add (or replace) the handler of *command*."""
        if not isinstance(command, str) or not command:
            raise ValueError(f"a command name must be a non-empty string, not {command!r}")
        if command in BUILTIN_COMMANDS:
            raise ValueError(f"{command!r} is a built-in control command")
        self._handlers[command] = handler

    @property
    def commands(self) -> list[str]:
        """Every command this server answers, sorted."""
        return sorted({*BUILTIN_COMMANDS, *self._handlers})

    @property
    def serving(self) -> bool:
        return self._server is not None

    async def __aenter__(self) -> ControlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Listen on :attr:`path`; take over a stale socket, refuse a live daemon's."""
        if self._server is not None:
            raise RuntimeError(f"control server on {self.path} is already started")
        await self._prepare_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound = False
        try:
            sock.bind(str(self.path))
            bound = True
            # Nobody can connect before listen(), so there is no window in which
            # the socket is reachable with the umask's mode.
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
            sock.setblocking(False)
            self._server = await asyncio.start_unix_server(
                self._on_connection, sock=sock, limit=self.max_request
            )
        except OSError as exc:
            sock.close()
            if bound:
                with contextlib.suppress(OSError):
                    self.path.unlink()
            raise CarpoolError(f"cannot listen on {self.path}: {exc.strerror or exc}") from exc
        log.debug("control socket listening on %s", self.path)

    async def _prepare_path(self) -> None:
        parent = self.path.parent
        if not parent.is_dir():
            try:
                parent.mkdir(parents=True, exist_ok=True)
                os.chmod(parent, 0o755)
            except OSError as exc:
                raise CarpoolError(
                    f"cannot create the run directory {parent}: {exc.strerror or exc}"
                ) from exc
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise CarpoolError(
                f"{self.path} exists and is not a socket: remove it or choose another --run-dir"
            )
        if await _socket_answers(self.path):
            raise CarpoolError(f"another daemon is already listening on {self.path}")
        log.info("removing stale control socket %s", self.path)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    async def close(self) -> None:
        """Stop listening, drop every connection and remove the socket file."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        tasks = list(self._connections)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if server is not None:
            await server.wait_closed()
        if self._identity is not None:
            try:
                st = os.stat(self.path)
                if (st.st_dev, st.st_ino) == self._identity:
                    self.path.unlink()
            except FileNotFoundError:
                pass
            self._identity = None

    # ----------------------------------------------------------------- connections

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            # close() cancels connections on purpose; ending normally keeps
            # asyncio (3.11.7+) from reporting the cancelled callback task.
            pass
        except ConnectionError:
            pass
        except Exception:
            log.exception("control connection on %s failed", self.path)
        finally:
            if task is not None:
                self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line = await reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:
                line = exc.partial  # the client's last line had no newline
            except asyncio.LimitOverrunError:
                writer.write(
                    _error(f"request too large: the limit is {self.max_request} bytes per line")
                )
                await writer.drain()
                # Closing with unread data would reset the connection and could
                # destroy the answer before the client reads it: skip the rest
                # of the line first.
                await _skip_line(reader)
                return
            if not line:
                return
            response, sub = await self._handle_line(line)
            writer.write(response)
            await writer.drain()
            if sub is not None:
                await self._stream(sub, reader, writer)
                return

    async def _handle_line(self, line: bytes) -> tuple[bytes, Subscription | None]:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            return _error("request is not valid UTF-8"), None
        if not text.strip():
            return _error(
                'empty request: send one JSON object per line, like {"command": "ping"}'
            ), None
        try:
            request = json.loads(text, parse_constant=_reject_constant)
        except RecursionError:
            return _error("malformed JSON request: nested too deeply"), None
        except ValueError as exc:
            return _error(f"malformed JSON request: {exc}"), None
        if not isinstance(request, dict):
            return _error(
                'a request must be a JSON object like {"command": "ping", "args": {}},'
                f" not {_json_type(request)}"
            ), None
        command = request.get("command")
        if command is None:
            return _error('request has no "command"'), None
        if not isinstance(command, str):
            return _error(f'"command" must be a string, not {_json_type(command)}'), None
        args = request.get("args")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return _error(f'"args" must be a JSON object, not {_json_type(args)}'), None

        if command == "subscribe":
            return self._subscribe(args)
        if command == "ping":
            return _encode({"ok": True, "result": {"pid": os.getpid(), "daemon": self.name}}), None
        handler = self._handlers.get(command)
        if handler is None:
            return _error(
                f"unknown command {command!r}; known commands: {', '.join(self.commands)}"
            ), None
        return await self._call(command, handler, args), None

    async def _call(self, command: str, handler: Handler, args: dict[str, Any]) -> bytes:
        try:
            result = handler(args)
            if inspect.isawaitable(result):
                result = await result
        except CarpoolError as exc:
            return _error(str(exc) or type(exc).__name__)
        except Exception as exc:
            log.exception("internal error in control command %s", command)
            return _error(f"internal error in {command}: {type(exc).__name__}: {exc}")
        try:
            return _encode({"ok": True, "result": result})
        except (TypeError, ValueError) as exc:
            log.error("control command %s returned an unserialisable result: %s", command, exc)
            return _error(f"internal error in {command}: result is not JSON-serialisable: {exc}")

    def _subscribe(self, args: dict[str, Any]) -> tuple[bytes, Subscription | None]:
        if self.bus is None:
            return _error(f"{self.name} publishes no events"), None
        names = args.get("events")
        if names is not None and (
            not isinstance(names, list) or not all(isinstance(n, str) for n in names)
        ):
            return _error('"events" must be a list of event names'), None
        since = args.get("since")
        if since is not None and (isinstance(since, bool) or not isinstance(since, int | float)):
            return _error('"since" must be a monotonic time in seconds'), None
        sub = self.bus.subscribe(names=names)
        if since is not None:
            # Remembered events newer than `since` first, so that a follower that
            # (re)connects late misses nothing that happened since it last looked.
            for event in self.bus.recent():
                if event.monotonic > since:
                    sub._offer(event)
        return _encode({"ok": True, "result": "subscribed"}), sub

    async def _stream(
        self, sub: Subscription, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Send *sub*'s events until the client goes away or falls too far behind."""

        async def until_eof() -> None:
            with contextlib.suppress(ConnectionError, ValueError, asyncio.LimitOverrunError):
                while await reader.read(65536):
                    pass

        eof = asyncio.create_task(until_eof())
        eof.add_done_callback(lambda _: sub.close())
        try:
            async for event in sub:
                writer.write(_encode({"event": event.to_dict()}))
                try:
                    await asyncio.wait_for(writer.drain(), _STREAM_WRITE_TIMEOUT)
                except TimeoutError:
                    log.warning("event subscriber on %s stopped reading; dropping it", self.path)
                    writer.transport.abort()
                    return
            if sub.dropped:
                writer.write(
                    _error(
                        f"event stream dropped: the subscriber fell more than {sub.maxsize}"
                        " events behind; reconnect"
                    )
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(writer.drain(), 1.0)
        finally:
            sub.close()
            eof.cancel()
            await asyncio.wait([eof])


async def _skip_line(reader: asyncio.StreamReader) -> None:
    """Read and drop input up to the next newline (bounded in time and volume)."""
    budget = 64 * MAX_REQUEST
    with contextlib.suppress(TimeoutError, ConnectionError):
        async with asyncio.timeout(_SKIP_TIMEOUT):
            while budget > 0:
                chunk = await reader.read(65536)
                if not chunk or b"\n" in chunk:
                    return
                budget -= len(chunk)


async def _socket_answers(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket *path*."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), _PROBE_TIMEOUT)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except TimeoutError:
        return True  # listening, but its backlog is full: alive all the same
    except PermissionError as exc:
        raise CarpoolError(
            f"cannot tell whether a daemon listens on {path}: permission denied (run as root)"
        ) from exc
    except OSError as exc:
        raise CarpoolError(
            f"cannot tell whether a daemon listens on {path}: {exc.strerror or exc}"
        ) from exc
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()
    return True


# --------------------------------------------------------------------------- clients


def _daemon_name(path: Path) -> str:
    return path.stem if path.suffix == ".sock" else path.name


def _connect_error(path: Path, exc: OSError, timeout: float) -> ControlError:
    daemon = _daemon_name(path)
    hint = f"is {daemon} running? (start it, or pass --run-dir)"
    if isinstance(exc, FileNotFoundError):
        return ControlError(f"no daemon is listening on {path}: {hint}")
    if isinstance(exc, ConnectionRefusedError):
        return ControlError(f"no daemon is listening on {path} (stale socket): {hint}")
    if isinstance(exc, PermissionError):
        return ControlError(
            f"permission denied on {path}: the control socket is root-only; run this as root"
        )
    if isinstance(exc, TimeoutError):
        return ControlError(
            f"{daemon} did not accept a connection on {path} within {timeout:g}s:"
            " it may be hung; check its log"
        )
    return ControlError(f"cannot connect to {daemon} on {path}: {exc.strerror or exc}")


def _timeout_error(path: Path, timeout: float) -> ControlError:
    daemon = _daemon_name(path)
    return ControlError(
        f"{daemon} did not answer on {path} within {timeout:g}s: it may be busy or hung;"
        " check its log"
    )


def _lost_error(path: Path, exc: OSError | None = None) -> ControlError:
    daemon = _daemon_name(path)
    why = f" ({exc.strerror or exc})" if exc is not None else ""
    return ControlError(
        f"{daemon} closed the connection on {path} before answering{why}: check its log"
    )


def _parse_response(line: bytes, path: Path) -> Any:
    daemon = _daemon_name(path)
    try:
        response = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ControlError(f"{daemon} sent a malformed answer on {path}: {exc}") from None
    if not isinstance(response, dict) or not isinstance(response.get("ok"), bool):
        raise ControlError(f"{daemon} sent a malformed answer on {path}: {line[:200]!r}")
    if response["ok"]:
        return response.get("result")
    raise RemoteError(str(response.get("error") or f"{daemon} reported an unspecified error"))


def _parse_stream_line(line: bytes, path: Path) -> Event:
    daemon = _daemon_name(path)
    try:
        message = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ControlError(f"{daemon} sent a malformed event on {path}: {exc}") from None
    if isinstance(message, dict) and "event" in message:
        try:
            return Event.from_dict(message["event"])
        except ValueError as exc:
            raise ControlError(f"{daemon} sent a malformed event on {path}: {exc}") from None
    _parse_response(line, path)  # raises RemoteError for {"ok": false}
    raise ControlError(f"{daemon} sent an unexpected line on {path}: {line[:200]!r}")


def _request_line(command: str, args: Mapping[str, Any]) -> bytes:
    return _encode({"command": command, "args": dict(args)})


def _subscribe_line(names: Collection[str] | None, since: float | None = None) -> bytes:
    args: dict[str, Any] = {}
    if names is not None:
        args["events"] = list(names)
    if since is not None:
        args["since"] = since
    return _request_line("subscribe", args)


class _Unread(Exception):
    """The daemon closed the connection before reading the request."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


class _LineSocket:
    """A blocking unix socket read line by line."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = bytearray()

    def readline(self) -> bytes | None:
        """The next line without its newline, or ``None`` at end of stream."""
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[: end + 1]
                return line
            if len(self._buf) > _MAX_RESPONSE:  # pragma: no cover - defensive
                raise ValueError(f"answer longer than {_MAX_RESPONSE} bytes")
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self._buf += chunk

    @property
    def pending(self) -> bool:
        """Whether part of an answer has been received but not returned."""
        return bool(self._buf)

    def peer_closed(self) -> bool:
        """Whether the daemon has hung up on this (idle) connection."""
        if self._buf:
            return False
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            return self.sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True
        finally:
            self.sock.settimeout(timeout)


class ControlClient:
    """A blocking client for one daemon's control socket (used by the ``*ctl`` commands).

    The connection is opened on the first request and reused; :meth:`close`
    (or leaving a ``with`` block) closes it.
    """

    def __init__(self, path: str | os.PathLike[str], timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self._conn: _LineSocket | None = None

    @property
    def daemon(self) -> str:
        return _daemon_name(self.path)

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.sock.close()
            self._conn = None

    def _connect(self) -> _LineSocket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise _connect_error(self.path, exc, self.timeout) from None
        return _LineSocket(sock)

    def request(self, command: str, /, **args: Any) -> Any:
        """Run *command* with *args* and return its result; raise :class:`ControlError`."""
        data = _request_line(command, args)
        if self._conn is not None and self._conn.peer_closed():
            self.close()
        if self._conn is not None:
            try:
                return self._exchange(self._conn, data)
            except _Unread:
                # The daemon hung up on the reused connection without reading
                # the request (e.g. after refusing an oversized one), so it did
                # not run it: sending it again on a new connection is safe.
                self.close()
        self._conn = self._connect()
        try:
            return self._exchange(self._conn, data)
        except _Unread as exc:
            self.close()
            raise _lost_error(self.path, exc.error) from None

    def _exchange(self, conn: _LineSocket, data: bytes) -> Any:
        send_error: OSError | None = None
        try:
            try:
                conn.sock.sendall(data)
            except (BrokenPipeError, ConnectionResetError) as exc:
                # The daemon may have refused the request (too large) and hung
                # up: its answer can still be waiting to be read.
                send_error = exc
            line = conn.readline()
        except TimeoutError:
            self.close()
            raise _timeout_error(self.path, self.timeout) from None
        except ConnectionResetError as exc:
            # Reset: the daemon closed with our request still unread.
            if not conn.pending:
                raise _Unread(exc) from None
            self.close()
            raise _lost_error(self.path, exc) from None
        except (OSError, ValueError) as exc:
            self.close()
            lost = send_error or (exc if isinstance(exc, OSError) else None)
            raise _lost_error(self.path, lost) from None
        if line is None:
            if send_error is not None and not conn.pending:
                raise _Unread(send_error)
            self.close()
            raise _lost_error(self.path, send_error)
        if send_error is not None:
            self.close()
        try:
            return _parse_response(line, self.path)
        except RemoteError:
            raise
        except ControlError:
            self.close()  # out of step with the daemon: start afresh next time
            raise

    def events(self, names: Collection[str] | None = None) -> Generator[Event, None, None]:
        """Subscribe (on a connection of its own) and yield events as they come.

        Ends when the daemon closes the stream; raises :class:`RemoteError` if the
        daemon drops this subscriber.  Close the generator to unsubscribe.
        """
        conn = self._connect()
        try:
            try:
                conn.sock.sendall(_subscribe_line(names))
                line = conn.readline()
            except TimeoutError:
                raise _timeout_error(self.path, self.timeout) from None
            except OSError as exc:
                raise _lost_error(self.path, exc) from None
            if line is None:
                raise _lost_error(self.path)
            _parse_response(line, self.path)
            conn.sock.settimeout(None)
            while True:
                try:
                    line = conn.readline()
                except OSError:
                    return
                if line is None:
                    return
                yield _parse_stream_line(line, self.path)
        finally:
            conn.sock.close()


async def _open(path: Path, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.wait_for(
            asyncio.open_unix_connection(str(path), limit=_MAX_RESPONSE), timeout
        )
    except OSError as exc:  # includes TimeoutError
        raise _connect_error(path, exc, timeout) from None


async def _read_answer(reader: asyncio.StreamReader, path: Path) -> bytes:
    try:
        line = await reader.readline()
    except (ValueError, asyncio.LimitOverrunError):
        daemon = _daemon_name(path)
        raise ControlError(f"{daemon} sent an answer that is too long on {path}") from None
    except OSError as exc:
        raise _lost_error(path, exc) from None
    if not line.endswith(b"\n"):
        raise _lost_error(path)
    return line


async def _close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(Exception):
        await writer.wait_closed()


async def async_request(path: str | os.PathLike[str], command: str, /, **args: Any) -> Any:
    """Run one *command* on the daemon at *path* and return its result.

    Raises :class:`ControlError` (:class:`RemoteError` for an error answer); gives
    up after :data:`DEFAULT_TIMEOUT` seconds.
    """
    where = Path(path)
    reader, writer = await _open(where, DEFAULT_TIMEOUT)
    try:
        try:
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                writer.write(_request_line(command, args))
                await writer.drain()
                line = await _read_answer(reader, where)
        except TimeoutError:
            raise _timeout_error(where, DEFAULT_TIMEOUT) from None
        except OSError as exc:
            raise _lost_error(where, exc) from None
    finally:
        await _close_writer(writer)
    return _parse_response(line, where)


async def async_subscribe(
    path: str | os.PathLike[str],
    names: Collection[str] | None = None,
    since: float | None = None,
) -> AsyncGenerator[Event, None]:
    """Yield the events of the daemon at *path* (only those named in *names*, if given).

    With *since* (a ``time.monotonic()`` value: the clock is shared by every process
    and namespace of the machine), the daemon first replays the events it still
    remembers that are newer, so a follower that connects late misses none.

    Ends when the daemon closes the stream (it stopped or restarted: reconnect);
    raises :class:`ControlError` if it cannot subscribe or the daemon drops us.
    Wrap it in :func:`contextlib.aclosing` to unsubscribe promptly on ``break``.
    """
    where = Path(path)
    reader, writer = await _open(where, DEFAULT_TIMEOUT)
    try:
        try:
            async with asyncio.timeout(DEFAULT_TIMEOUT):
                writer.write(_subscribe_line(names, since))
                await writer.drain()
                line = await _read_answer(reader, where)
        except TimeoutError:
            raise _timeout_error(where, DEFAULT_TIMEOUT) from None
        except OSError as exc:
            raise _lost_error(where, exc) from None
        _parse_response(line, where)
        while True:
            try:
                line = await reader.readline()
            except OSError:
                return
            except (ValueError, asyncio.LimitOverrunError):
                raise ControlError(
                    f"{_daemon_name(where)} sent an event that is too long on {where}"
                ) from None
            if not line.endswith(b"\n"):
                return
            yield _parse_stream_line(line, where)
    finally:
        await _close_writer(writer)
