from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import select
import shutil
import socket
import stat
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carpool.control import (
    MAX_REQUEST,
    ControlClient,
    ControlError,
    ControlServer,
    Handler,
    RemoteError,
    async_request,
    async_subscribe,
    default_run_dir,
    pidfile_path,
    read_pidfile,
    remove_pidfile,
    socket_path,
    write_pidfile,
)
from carpool.errors import CarpoolError, CommandError
from carpool.events import Event, EventBus

T = TypeVar("T")


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes: keep them short.
    path = Path(tempfile.mkdtemp(prefix="cp-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Mode(enum.Enum):
    ACTIVE = "active"


@dataclass(frozen=True)
class Resource:
    name: str
    mode: Mode
    path: Path


def _handlers() -> dict[str, Handler]:
    async def slow_echo(args: dict[str, Any]) -> Any:
        await asyncio.sleep(float(args.get("delay", 0.05)))
        return args

    async def async_refuse(args: dict[str, Any]) -> Any:
        await asyncio.sleep(0)
        raise CommandError(f"no such vhid {args.get('vhid')}")

    def refuse(args: dict[str, Any]) -> Any:
        raise CommandError("vhid 7 is not configured: add it to rc.conf")

    def carpool_error(args: dict[str, Any]) -> Any:
        raise CarpoolError("disk busy\nretry later")

    def crash(args: dict[str, Any]) -> Any:
        raise ValueError("kaput")

    def unserialisable(args: dict[str, Any]) -> Any:
        return object()

    def rich(args: dict[str, Any]) -> Any:
        return {
            "resource": Resource("r0", Mode.ACTIVE, Path("/dev/sda")),
            "tags": {"b", "a"},
            "event": Event("carpd", "MASTER", {"vhid": 1}, 1.0, 2.0),
        }

    return {
        "echo": lambda args: args,
        "slow_echo": slow_echo,
        "refuse": refuse,
        "async_refuse": async_refuse,
        "carpool_error": carpool_error,
        "crash": crash,
        "unserialisable": unserialisable,
        "rich": rich,
    }


@contextlib.asynccontextmanager
async def serving(
    path: Path, bus: EventBus | None = None, **kwargs: Any
) -> AsyncIterator[ControlServer]:
    server = ControlServer(path, _handlers(), bus, "testd", **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro_fn(), 30)

    return asyncio.run(main())


class Conn:
    """A raw async connection to a control socket."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, path: Path) -> Conn:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 24)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self) -> Any:
        line = await asyncio.wait_for(self.reader.readline(), 5)
        assert line.endswith(b"\n"), f"connection closed: {line!r}"
        return json.loads(line)

    async def ask(self, request: object) -> Any:
        await self.send(json.dumps(request).encode() + b"\n")
        return await self.recv()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


class ThreadedServer:
    """A ControlServer on its own loop in a thread, for blocking clients and fuzzing."""

    def __init__(self, path: Path, bus: EventBus | None = None, **kwargs: Any) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(path, _handlers(), bus, "testd", **kwargs)
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.start())
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def _raw_exchange(sock: socket.socket, data: bytes) -> bytes:
    sock.sendall(data)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = sock.recv(65536)
        assert chunk, "server closed the connection"
        buf += chunk
    return buf


# --------------------------------------------------------------------------- paths and pidfiles


def test_paths() -> None:
    assert default_run_dir() == Path("/run/carpool")
    assert socket_path(Path("/run/carpool"), "carpd") == Path("/run/carpool/carpd.sock")
    assert socket_path("/tmp/x", "hastd") == Path("/tmp/x/hastd.sock")
    assert pidfile_path("/tmp/x", "hastd") == Path("/tmp/x/hastd.pid")


def test_pidfile_round_trip(tmp_path: Path) -> None:
    pidfile = tmp_path / "run" / "carpd.pid"
    assert read_pidfile(pidfile) is None
    write_pidfile(pidfile)
    assert read_pidfile(pidfile) == os.getpid()
    assert pidfile.read_text() == f"{os.getpid()}\n"
    write_pidfile(pidfile, 12345)
    assert read_pidfile(pidfile) == 12345
    assert [p.name for p in pidfile.parent.iterdir()] == ["carpd.pid"]  # no temp left behind
    remove_pidfile(pidfile)  # holds another pid: left alone
    assert pidfile.exists()
    remove_pidfile(pidfile, 12345)
    assert not pidfile.exists()
    remove_pidfile(pidfile)  # missing: fine


def test_read_pidfile_garbage(tmp_path: Path) -> None:
    pidfile = tmp_path / "x.pid"
    pidfile.write_text("hello\n")
    with pytest.raises(CarpoolError, match="does not hold a pid"):
        read_pidfile(pidfile)


# --------------------------------------------------------------------------- request / response


def test_ping_and_handlers_over_async_request(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        async with serving(path):
            assert await async_request(path, "ping") == {"pid": os.getpid(), "daemon": "testd"}
            assert await async_request(path, "echo", a=1, path="x") == {"a": 1, "path": "x"}
            assert await async_request(path, "slow_echo", delay=0.01) == {"delay": 0.01}
            with pytest.raises(RemoteError, match="vhid 7 is not configured"):
                await async_request(path, "refuse")

    run(main)


def test_socket_and_directory_modes(sockdir: Path) -> None:
    path = sockdir / "new" / "sub" / "testd.sock"

    async def main() -> None:
        async with serving(path):
            assert stat.S_ISSOCK(os.stat(path).st_mode)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o755
        assert not path.exists()  # close() removes the socket

    run(main)


def test_many_pipelined_requests_on_one_connection_are_answered_in_order(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        async with serving(path):
            conn = await Conn.open(path)
            requests = [
                {"command": "slow_echo", "args": {"delay": 0.05, "n": 0}},
                {"command": "echo", "args": {"n": 1}},
                {"command": "slow_echo", "args": {"delay": 0.01, "n": 2}},
                {"command": "ping"},
            ]
            await conn.send(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
            answers = [await conn.recv() for _ in requests]
            assert [a["result"].get("n") for a in answers[:3]] == [0, 1, 2]
            assert answers[3]["result"]["daemon"] == "testd"
            for i in range(50):
                assert await conn.ask({"command": "echo", "args": {"i": i}}) == {
                    "ok": True,
                    "result": {"i": i},
                }
            await conn.close()

    run(main)


MALFORMED = [
    (b"\xff\xfe\n", "not valid UTF-8"),
    (b"\n", "empty request"),
    (b"   \r\n", "empty request"),
    (b"not json\n", "malformed JSON request"),
    (b'{"command": "ping"\n', "malformed JSON request"),
    (b"NaN\n", "malformed JSON request"),
    (b"[" * 100_000 + b"\n", "malformed JSON request"),
    (b"[1, 2]\n", "must be a JSON object"),
    (b'"ping"\n', "must be a JSON object"),
    (b"null\n", "must be a JSON object"),
    (b'{"args": {}}\n', 'request has no "command"'),
    (b'{"command": 5}\n', '"command" must be a string, not a number'),
    (b'{"command": ["ping"]}\n', '"command" must be a string, not an array'),
    (b'{"command": "echo", "args": [1]}\n', '"args" must be a JSON object, not an array'),
    (b'{"command": "echo", "args": "x"}\n', '"args" must be a JSON object, not a string'),
    (b'{"command": "nope"}\n', "unknown command 'nope'; known commands: async_refuse, "),
    (b'{"command": "subscribe", "args": {"events": "MASTER"}}\n', '"events" must be a list'),
]


@pytest.mark.parametrize(("line", "message"), MALFORMED)
def test_malformed_requests_get_an_error_and_the_connection_goes_on(
    sockdir: Path, line: bytes, message: str
) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        async with serving(path, EventBus()):
            conn = await Conn.open(path)
            await conn.send(line)
            answer = await conn.recv()
            assert answer["ok"] is False
            assert message in answer["error"]
            assert "\n" not in answer["error"]
            pong = await conn.ask({"command": "ping"})
            assert pong == {"ok": True, "result": {"pid": os.getpid(), "daemon": "testd"}}
            await conn.close()

    run(main)


def test_unknown_command_lists_known_ones(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        async with serving(path):
            with pytest.raises(RemoteError) as info:
                await async_request(path, "frobnicate")
        assert str(info.value) == (
            "unknown command 'frobnicate'; known commands: async_refuse, carpool_error, crash,"
            " echo, ping, refuse, rich, slow_echo, subscribe, unserialisable"
        )

    run(main)


def test_oversized_request_gets_an_error_then_the_connection_closes(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        async with serving(path, max_request=1000):
            conn = await Conn.open(path)
            await conn.send(b'{"command": "echo", "args": {"x": "' + b"a" * 5000 + b'"}}\n')
            answer = await conn.recv()
            assert answer == {
                "ok": False,
                "error": "request too large: the limit is 1000 bytes per line",
            }
            assert await asyncio.wait_for(conn.reader.read(), 5) == b""
            await conn.close()
            # A request just under the limit is fine, and the daemon still serves.
            blob = "b" * 900
            assert await async_request(path, "echo", x=blob) == {"x": blob}

    run(main)


def test_default_request_limit_through_the_blocking_client(sockdir: Path) -> None:
    path = sockdir / "testd.sock"
    with ThreadedServer(path), ControlClient(path) as client:
        blob = "z" * (MAX_REQUEST // 2)
        assert client.request("echo", blob=blob) == {"blob": blob}
        with pytest.raises(RemoteError, match=f"request too large: the limit is {MAX_REQUEST}"):
            client.request("echo", blob="z" * (MAX_REQUEST + 10))
        assert client.request("ping")["daemon"] == "testd"  # reconnects


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("refuse", "vhid 7 is not configured: add it to rc.conf"),
        ("async_refuse", "no such vhid None"),
        ("carpool_error", "disk busy retry later"),
        ("crash", "internal error in crash: ValueError: kaput"),
        ("unserialisable", "internal error in unserialisable: result is not JSON-serialisable"),
    ],
)
def test_handler_errors_are_answered_and_the_daemon_goes_on(
    sockdir: Path, command: str, message: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        async with serving(path):
            conn = await Conn.open(path)
            answer = await conn.ask({"command": command})
            assert answer["ok"] is False
            assert answer["error"].startswith(message)
            assert (await conn.ask({"command": "ping"}))["ok"] is True
            await conn.close()

    run(main)
    if command == "crash":
        crash_records = [r for r in caplog.records if "internal error in control" in r.getMessage()]
        assert crash_records and crash_records[0].exc_info is not None


def test_common_result_types_are_serialised(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        async with serving(path):
            result = await async_request(path, "rich")
        assert result == {
            "resource": {"name": "r0", "mode": "active", "path": "/dev/sda"},
            "tags": ["a", "b"],
            "event": {
                "source": "carpd",
                "name": "MASTER",
                "attributes": {"vhid": 1},
                "monotonic": 1.0,
                "wall": 2.0,
            },
        }

    run(main)


def test_daemon_name_defaults_to_the_socket_name(sockdir: Path) -> None:
    path = sockdir / "carpd.sock"

    async def main() -> None:
        async with ControlServer(path, {}, None):
            assert (await async_request(path, "ping"))["daemon"] == "carpd"

    run(main)


def test_reserved_commands_cannot_be_registered(sockdir: Path) -> None:
    for name in ("ping", "subscribe", ""):
        with pytest.raises(ValueError):
            ControlServer(sockdir / "x.sock", {name: lambda a: a}, None, "x")


# --------------------------------------------------------------------------- blocking client


def test_blocking_client_reuses_its_connection(sockdir: Path) -> None:
    path = sockdir / "testd.sock"
    with ThreadedServer(path) as ts, ControlClient(path) as client:
        for i in range(20):
            assert client.request("echo", i=i) == {"i": i}
        assert len(ts.server._connections) == 1
        with pytest.raises(RemoteError, match="no such vhid 3"):
            client.request("async_refuse", vhid=3)
        assert client.request("ping") == {"pid": os.getpid(), "daemon": "testd"}


def test_blocking_client_timeout(sockdir: Path) -> None:
    path = sockdir / "testd.sock"
    with ThreadedServer(path), ControlClient(path, timeout=0.2) as client:
        with pytest.raises(ControlError, match=r"testd did not answer on .* within 0.2s"):
            client.request("slow_echo", delay=2)
        assert client.request("ping")["daemon"] == "testd"


def test_no_daemon_messages(sockdir: Path) -> None:
    path = sockdir / "carpd.sock"
    expected = f"no daemon is listening on {path}: is carpd running? (start it, or pass --run-dir)"
    with pytest.raises(ControlError) as info:
        ControlClient(path).request("status")
    assert str(info.value) == expected
    with pytest.raises(ControlError) as info:
        list(ControlClient(path).events())
    assert str(info.value) == expected

    async def main() -> None:
        with pytest.raises(ControlError) as ainfo:
            await async_request(path, "status")
        assert str(ainfo.value) == expected
        with pytest.raises(ControlError) as ainfo:
            async for _ in async_subscribe(path):
                pass
        assert str(ainfo.value) == expected

    run(main)

    # A socket file nobody listens on any more (the daemon was SIGKILLed).
    _stale_socket(path)
    with pytest.raises(
        ControlError, match=r"no daemon is listening on .*carpd.sock \(stale socket\)"
    ):
        ControlClient(path).request("status")


def test_permission_denied_message(sockdir: Path) -> None:
    path = sockdir / "testd.sock"
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")
    os.chmod(sockdir, 0o755)
    with ThreadedServer(path):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                os.close(read_fd)
                os.setgid(65534)
                os.setuid(65534)
                try:
                    ControlClient(path).request("ping")
                    message = "no error"
                except ControlError as exc:
                    message = str(exc)
                os.write(write_fd, message.encode())
            finally:
                os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            message = pipe.read().decode()
        os.waitpid(pid, 0)
    assert message == (
        f"permission denied on {path}: the control socket is root-only; run this as root"
    )


# --------------------------------------------------------------------------- start-up


def _stale_socket(path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # the file stays, nobody listens


def test_stale_socket_is_taken_over(sockdir: Path) -> None:
    path = sockdir / "testd.sock"
    _stale_socket(path)

    async def main() -> None:
        async with serving(path):
            assert (await async_request(path, "ping"))["daemon"] == "testd"

    run(main)


def test_live_daemon_is_not_displaced(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        async with serving(path):
            second = ControlServer(path, {}, None, "other")
            with pytest.raises(CarpoolError) as info:
                await second.start()
            assert str(info.value) == f"another daemon is already listening on {path}"
            await second.close()  # harmless, and must not remove the first one's socket
            assert (await async_request(path, "ping"))["daemon"] == "testd"

    run(main)


def test_non_socket_file_is_left_alone(sockdir: Path) -> None:
    path = sockdir / "testd.sock"
    path.write_text("precious")

    async def main() -> None:
        with pytest.raises(CarpoolError, match="exists and is not a socket"):
            await ControlServer(path, {}, None, "x").start()

    run(main)
    assert path.read_text() == "precious"


def test_close_leaves_a_successors_socket(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        first = ControlServer(path, {}, None, "first")
        await first.start()
        path.unlink()  # e.g. an operator removed it and a new daemon started
        async with serving(path):
            await first.close()
            assert path.exists()
            assert (await async_request(path, "ping"))["daemon"] == "testd"

    run(main)


def test_close_drops_open_connections(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        server = ControlServer(path, _handlers(), None, "testd")
        await server.start()
        conn = await Conn.open(path)
        assert (await conn.ask({"command": "ping"}))["ok"] is True
        await server.close()
        assert await asyncio.wait_for(conn.reader.read(), 5) == b""
        await conn.close()

    run(main)


# --------------------------------------------------------------------------- subscriptions


async def _wait_for_subscribers(bus: EventBus, n: int) -> None:
    for _ in range(500):
        if bus.subscriber_count == n:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"expected {n} subscribers, have {bus.subscriber_count}")


def test_subscribe_streams_events_published_after_it(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        bus = EventBus()
        async with serving(path, bus):
            bus.publish(Event.now("carpd", "BEFORE"))
            conn = await Conn.open(path)
            assert await conn.ask({"command": "subscribe"}) == {"ok": True, "result": "subscribed"}
            await _wait_for_subscribers(bus, 1)
            sent = [
                Event.now("carpd", "MASTER", ifname="em0", vhid=1),
                Event.now("carpd", "BACKUP", reason="more frequent advertisement"),
            ]
            for ev in sent:
                bus.publish(ev)
            got = [Event.from_dict((await conn.recv())["event"]) for _ in sent]
            assert got == sent
            await conn.close()
            await _wait_for_subscribers(bus, 0)  # a disconnect unsubscribes

    run(main)


def test_async_subscribe_with_a_name_filter(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        bus = EventBus()
        async with serving(path, bus):
            received: list[Event] = []

            async def follow() -> None:
                async with contextlib.aclosing(async_subscribe(path, ["MASTER"])) as stream:
                    async for ev in stream:
                        received.append(ev)
                        if len(received) == 2:
                            return

            task = asyncio.create_task(follow())
            await _wait_for_subscribers(bus, 1)
            for name in ("MASTER", "BACKUP", "INIT", "MASTER"):
                bus.publish(Event.now("carpd", name))
            await asyncio.wait_for(task, 5)
            assert [ev.name for ev in received] == ["MASTER", "MASTER"]
            await _wait_for_subscribers(bus, 0)

    run(main)


def test_async_subscribe_ends_when_the_daemon_stops(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        bus = EventBus()
        server = ControlServer(path, {}, bus, "testd")
        await server.start()
        names: list[str] = []

        async def follow() -> None:
            async for ev in async_subscribe(path):
                names.append(ev.name)

        task = asyncio.create_task(follow())
        await _wait_for_subscribers(bus, 1)
        bus.publish(Event.now("hastd", "connect"))
        await asyncio.sleep(0.05)
        await server.close()
        await asyncio.wait_for(task, 5)
        assert names == ["connect"]

    run(main)


def test_a_subscriber_that_falls_behind_is_dropped_with_an_error(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        bus = EventBus()
        async with serving(path, bus):
            got = 0

            async def follow() -> None:
                nonlocal got
                async for _ in async_subscribe(path):
                    got += 1

            task = asyncio.create_task(follow())
            await _wait_for_subscribers(bus, 1)
            for i in range(1500):  # in one go: the stream cannot keep up
                bus.publish(Event.now("pfsyncd", "state", n=i))
            with pytest.raises(RemoteError, match="event stream dropped"):
                await asyncio.wait_for(task, 5)
            assert got == 0
            assert bus.subscriber_count == 0
            assert (await async_request(path, "ping"))["daemon"] == "testd"

    run(main)


def test_subscribe_without_a_bus(sockdir: Path) -> None:
    path = sockdir / "testd.sock"

    async def main() -> None:
        async with serving(path):
            with pytest.raises(RemoteError, match="testd publishes no events"):
                async for _ in async_subscribe(path):
                    pass

    run(main)


def test_blocking_events_iterator(sockdir: Path) -> None:
    path = sockdir / "testd.sock"
    bus = EventBus()
    with ThreadedServer(path, bus) as ts:
        stream = ControlClient(path).events(["syncdone"])
        received: list[Event] = []

        def consume() -> None:
            for ev in stream:
                received.append(ev)
                if len(received) == 2:
                    break
            stream.close()

        consumer = threading.Thread(target=consume)
        consumer.start()
        asyncio.run_coroutine_threadsafe(_wait_for_subscribers(bus, 1), ts.loop).result(10)
        sent = [Event.now("hastd", n, resource="r0") for n in ("syncstart", "syncdone", "syncdone")]
        for ev in sent:
            ts.loop.call_soon_threadsafe(bus.publish, ev)
        consumer.join(10)
        assert received == [sent[1], sent[2]]
        asyncio.run_coroutine_threadsafe(_wait_for_subscribers(bus, 0), ts.loop).result(10)


# --------------------------------------------------------------------------- fuzzing


def test_fuzzed_lines_never_kill_the_server(sockdir: Path) -> None:
    path = sockdir / "testd.sock"
    pong = {"ok": True, "result": {"pid": os.getpid(), "daemon": "testd"}}
    ping = b'{"command": "ping"}\n'

    with ThreadedServer(path, EventBus()):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(path))

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(st.binary(max_size=300).filter(lambda b: b"\n" not in b))
        def fuzz_bytes(line: bytes) -> None:
            answer = json.loads(_raw_exchange(sock, line + b"\n"))
            assert isinstance(answer["ok"], bool)
            assert json.loads(_raw_exchange(sock, ping)) == pong

        json_values = st.recursive(
            st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
            lambda children: st.lists(children) | st.dictionaries(st.text(), children),
            max_leaves=20,
        )
        requests = st.one_of(
            json_values,
            st.fixed_dictionaries(
                {"command": st.sampled_from(["echo", "ping", "crash", "nope", ""]) | json_values},
                optional={"args": json_values, "extra": json_values},
            ),
        )

        @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
        @given(requests)
        def fuzz_json(request: object) -> None:
            line = json.dumps(request).encode() + b"\n"
            answer = json.loads(_raw_exchange(sock, line))
            assert isinstance(answer["ok"], bool)
            assert json.loads(_raw_exchange(sock, ping)) == pong

        fuzz_bytes()
        fuzz_json()
        sock.close()
        with ControlClient(path) as client:
            assert client.request("ping") == pong["result"]


# --------------------------------------------------------------------------- hang-ups


class FakeDaemon:
    """A scripted daemon on a raw socket: each connection runs the next script."""

    def __init__(self, path: Path, scripts: list[Callable[[socket.socket], None]]) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen()
        self.listener.settimeout(10)
        self.requests: list[bytes] = []
        self._scripts = scripts
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        for script in self._scripts:
            conn, _ = self.listener.accept()
            conn.settimeout(10)
            with conn:
                script(conn)

    def read_request(self, conn: socket.socket) -> bytes:
        buf = b""
        while not buf.endswith(b"\n"):
            buf += conn.recv(65536)
        self.requests.append(buf)
        return buf

    def __enter__(self) -> FakeDaemon:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(10)
        self.listener.close()


def _answer(conn: socket.socket, result: object) -> None:
    conn.sendall(json.dumps({"ok": True, "result": result}).encode() + b"\n")


def test_client_resends_a_request_the_daemon_hung_up_on_unread(sockdir: Path) -> None:
    path = sockdir / "fake.sock"

    def first(conn: socket.socket) -> None:
        fake.read_request(conn)
        _answer(conn, 1)
        select_readable(conn)  # the second request has arrived: close without reading it

    def second(conn: socket.socket) -> None:
        fake.read_request(conn)
        _answer(conn, 2)

    with FakeDaemon(path, [first, second]) as fake, ControlClient(path) as client:
        assert client.request("status") == 1
        assert client.request("status") == 2
    assert len(fake.requests) == 2  # each request was read (and so run) once


def test_client_does_not_resend_a_request_the_daemon_read(sockdir: Path) -> None:
    path = sockdir / "fake.sock"

    def read_then_hang_up(conn: socket.socket) -> None:
        fake.read_request(conn)

    message = r"fake closed the connection on .* before answering"
    with (
        FakeDaemon(path, [read_then_hang_up]) as fake,
        ControlClient(path) as client,
        pytest.raises(ControlError, match=message),
    ):
        client.request("stop")
    assert len(fake.requests) == 1


def test_client_rejects_a_malformed_answer(sockdir: Path) -> None:
    path = sockdir / "fake.sock"

    def babble(conn: socket.socket) -> None:
        fake.read_request(conn)
        conn.sendall(b"hello\n")

    def wrong_shape(conn: socket.socket) -> None:
        fake.read_request(conn)
        conn.sendall(b'{"result": 1}\n')

    with FakeDaemon(path, [babble, wrong_shape]) as fake, ControlClient(path) as client:
        with pytest.raises(ControlError, match="fake sent a malformed answer"):
            client.request("status")
        with pytest.raises(ControlError, match="fake sent a malformed answer"):
            client.request("status")  # on a new connection


def select_readable(conn: socket.socket) -> None:
    readable, _, _ = select.select([conn], [], [], 10)
    assert readable


def test_subscribe_since_replays_remembered_events_newer_than_it(sockdir: Path) -> None:
    path = sockdir / "testd.sock"
    bus = EventBus()

    async def main() -> None:
        async with serving(path, bus):
            bus.publish(Event.now("testd", "OLD"))
            since = bus.recent()[-1].monotonic
            bus.publish(Event.now("testd", "MISSED", n=1))
            bus.publish(Event.now("testd", "MISSED", n=2))
            names = []
            async with contextlib.aclosing(async_subscribe(path, since=since)) as stream:
                async for event in stream:
                    names.append((event.name, dict(event.attributes)))
                    if len(names) == 2:
                        bus.publish(Event.now("testd", "LIVE"))
                    if event.name == "LIVE":
                        break
            assert names == [("MISSED", {"n": 1}), ("MISSED", {"n": 2}), ("LIVE", {})]
            with pytest.raises(RemoteError, match="since"):
                async with contextlib.aclosing(async_subscribe(path, since="x")) as bad:  # type: ignore[arg-type]
                    async for _ in bad:
                        break

    run(main)
