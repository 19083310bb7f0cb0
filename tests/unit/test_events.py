from __future__ import annotations

import asyncio
import dataclasses
import enum
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from carpool.events import (
    Attributes,
    Event,
    EventBus,
    KeyValueFormatter,
    format_kv,
    quote_value,
    setup_logging,
)

# --------------------------------------------------------------------------- helpers

_KV_TOKEN = re.compile(r'([A-Za-z_][A-Za-z0-9_.\-]*)=("(?:[^"\\]|\\.)*"|[^\s"]+)(?: |\Z)')
_UNESCAPE = {'"': '"', "\\": "\\", "n": "\n", "r": "\r", "t": "\t"}


def parse_kv(line: str) -> list[tuple[str, str]]:
    """A strict reader of the key=value lines, to check that quoting round-trips."""
    pairs = []
    pos = 0
    while pos < len(line):
        m = _KV_TOKEN.match(line, pos)
        assert m, f"cannot parse {line[pos:]!r}"
        key, raw = m.group(1), m.group(2)
        if raw.startswith('"'):
            out, i, body = [], 0, raw[1:-1]
            while i < len(body):
                if body[i] == "\\":
                    code = body[i + 1]
                    if code == "x":
                        out.append(chr(int(body[i + 2 : i + 4], 16)))
                        i += 4
                        continue
                    out.append(_UNESCAPE[code])
                    i += 2
                else:
                    out.append(body[i])
                    i += 1
            raw = "".join(out)
        pairs.append((key, raw))
        pos = m.end()
    return pairs


attr_keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True)
attr_values = st.one_of(
    st.text(max_size=30),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
)
names = st.text(min_size=1, max_size=20)
events = st.builds(
    Event,
    source=names,
    name=names,
    attributes=st.dictionaries(attr_keys, attr_values, max_size=6),
    monotonic=st.floats(min_value=0, max_value=1e9),
    wall=st.floats(min_value=0, max_value=4e9),
)


# --------------------------------------------------------------------------- Event


def test_now_stamps_both_clocks_and_keeps_attribute_order() -> None:
    ev = Event.now("carpd", "MASTER", ifname="em0", vhid=1, name="not the event name")
    assert ev.source == "carpd"
    assert ev.name == "MASTER"
    assert list(ev.attributes) == ["ifname", "vhid", "name"]
    assert ev.attributes["vhid"] == 1
    assert ev.monotonic > 0
    assert ev.wall > 1_600_000_000


def test_event_is_frozen_hashable_and_its_attributes_immutable() -> None:
    a = Event("carpd", "MASTER", {"vhid": 1, "ifname": "em0"}, 1.0, 2.0)
    b = Event("carpd", "MASTER", {"ifname": "em0", "vhid": 1}, 1.0, 2.0)
    assert a == b
    assert hash(a) == hash(b)
    assert len({a, b}) == 1
    assert isinstance(a.attributes, Attributes)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.name = "BACKUP"  # type: ignore[misc]
    with pytest.raises(TypeError):
        a.attributes["vhid"] = 2  # type: ignore[index]


def test_attribute_enums_are_stored_as_plain_values() -> None:
    class State(enum.StrEnum):
        MASTER = "MASTER"

    class Vhid(enum.IntEnum):
        ONE = 1

    ev = Event.now("carpd", "state", state=State.MASTER, vhid=Vhid.ONE)
    assert type(ev.attributes["state"]) is str
    assert type(ev.attributes["vhid"]) is int
    assert ev.format_line() == "source=carpd event=state state=MASTER vhid=1"


@given(events)
def test_dict_and_json_round_trip(ev: Event) -> None:
    data = ev.to_dict()
    assert Event.from_dict(data) == ev
    back = Event.from_dict(json.loads(json.dumps(data)))
    assert back == ev
    assert list(back.attributes.items()) == list(ev.attributes.items())
    for key, value in ev.attributes.items():
        assert type(back.attributes[key]) is type(value)


def test_from_dict_accepts_int_times_and_ignores_unknown_keys() -> None:
    ev = Event.from_dict(
        {"source": "hastd", "name": "connect", "monotonic": 5, "wall": 7, "future": 1}
    )
    assert ev.monotonic == 5.0 and isinstance(ev.monotonic, float)
    assert dict(ev.attributes) == {}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "must be a JSON object"),
        ({"name": "x", "monotonic": 1, "wall": 1}, "missing source"),
        ({"source": "a", "name": "b"}, "missing monotonic, wall"),
        ({"source": "", "name": "b", "monotonic": 1, "wall": 1}, "source must be a non-empty"),
        ({"source": "a", "name": 3, "monotonic": 1, "wall": 1}, "name must be a non-empty"),
        ({"source": "a", "name": "b", "monotonic": "1", "wall": 1}, "monotonic must be a number"),
        ({"source": "a", "name": "b", "monotonic": True, "wall": 1}, "monotonic must be a number"),
        ({"source": "a", "name": "b", "monotonic": 1, "wall": float("inf")}, "must be finite"),
        (
            {"source": "a", "name": "b", "monotonic": 1, "wall": 1, "attributes": []},
            "attributes must be a JSON object",
        ),
        (
            {"source": "a", "name": "b", "monotonic": 1, "wall": 1, "attributes": {"x": [1]}},
            "only str, int, float and bool",
        ),
        (
            {"source": "a", "name": "b", "monotonic": 1, "wall": 1, "attributes": {"x": None}},
            "only str, int, float and bool",
        ),
        (
            {"source": "a", "name": "b", "monotonic": 1, "wall": 1, "attributes": {"a b": 1}},
            "attribute name 'a b' is not valid",
        ),
        (
            {
                "source": "a",
                "name": "b",
                "monotonic": 1,
                "wall": 1,
                "attributes": {"x": float("nan")},
            },
            "floats must be finite",
        ),
    ],
)
def test_from_dict_rejects_what_is_not_an_event(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Event.from_dict(data)


def test_format_line_example() -> None:
    ev = Event.now("carpd", "MASTER", ifname="em0", vhid=1, reason="master timed out")
    assert (
        ev.format_line() == 'source=carpd event=MASTER ifname=em0 vhid=1 reason="master timed out"'
    )


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("em0", "em0"),
        ("", '""'),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("back\\slash", '"back\\\\slash"'),
        ("a=b", '"a=b"'),
        ("line\nbreak", '"line\\nbreak"'),
        ("bell\x07", '"bell\\x07"'),
        ("it's", '"it\'s"'),
        ("10.0.0.1/24", "10.0.0.1/24"),
        (True, "true"),
        (False, "false"),
        (42, "42"),
        (1.5, "1.5"),
    ],
)
def test_quote_value(value: object, rendered: str) -> None:
    assert quote_value(value) == rendered


@given(events)
def test_format_line_is_one_parseable_line(ev: Event) -> None:
    line = ev.format_line()
    assert "\n" not in line and "\r" not in line
    pairs = parse_kv(line)
    expected = [("source", ev.source), ("event", ev.name)]
    expected += [
        (k, quote_value(v) if not isinstance(v, str) else v) for k, v in ev.attributes.items()
    ]
    assert pairs == expected


def test_format_kv() -> None:
    assert format_kv([("a", 1), ("b", "x y")]) == 'a=1 b="x y"'


# --------------------------------------------------------------------------- EventBus


async def _collect(sub: object, n: int) -> list[Event]:
    out = []
    async for ev in sub:  # type: ignore[attr-defined]
        out.append(ev)
        if len(out) == n:
            break
    return out


def test_bus_fans_out_to_every_subscriber_and_filters_by_name() -> None:
    async def main() -> None:
        bus = EventBus()
        all1 = bus.subscribe()
        all2 = bus.subscribe()
        masters = bus.subscribe(names=["MASTER"])
        t1 = asyncio.create_task(_collect(all1, 3))
        t2 = asyncio.create_task(_collect(all2, 3))
        t3 = asyncio.create_task(_collect(masters, 2))
        await asyncio.sleep(0)
        sent = [
            Event.now("carpd", "MASTER", vhid=1),
            Event.now("carpd", "BACKUP", vhid=1),
            Event.now("carpd", "MASTER", vhid=2),
        ]
        for ev in sent:
            bus.publish(ev)
        assert await t1 == sent
        assert await t2 == sent
        assert await t3 == [sent[0], sent[2]]
        assert bus.subscriber_count == 3
        for sub in (all1, all2, masters):
            sub.close()
        assert bus.subscriber_count == 0

    asyncio.run(main())


def test_bus_publish_logs_and_counts() -> None:
    registry = CollectorRegistry()
    bus = EventBus(registry)
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("carpool.carpd")
    handler = Keep(logging.INFO)
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    try:
        bus.publish(Event.now("carpd", "MASTER", vhid=1))
        bus.publish(Event.now("carpd", "MASTER", vhid=2))
        bus.publish(Event.now("carpd", "BACKUP", vhid=1))
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    assert [r.getMessage() for r in records] == [
        "source=carpd event=MASTER vhid=1",
        "source=carpd event=MASTER vhid=2",
        "source=carpd event=BACKUP vhid=1",
    ]
    assert all(r.levelno == logging.INFO and r.name == "carpool.carpd" for r in records)
    labels = {"source": "carpd", "event": "MASTER"}
    assert registry.get_sample_value("carpool_events_total", labels) == 2.0
    labels = {"source": "carpd", "event": "BACKUP"}
    assert registry.get_sample_value("carpool_events_total", labels) == 1.0


def test_recent_keeps_the_last_hundred() -> None:
    bus = EventBus()
    sent = [Event.now("relayd", "host_down", n=i) for i in range(150)]
    for ev in sent:
        bus.publish(ev)
    assert bus.recent() == sent[-100:]
    assert bus.recent(3) == sent[-3:]
    assert bus.recent(0) == []


def test_slow_subscriber_is_dropped_without_blocking(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        bus = EventBus()
        slow = bus.subscribe(maxsize=2)
        fast = bus.subscribe()
        fast_task = asyncio.create_task(_collect(fast, 5))
        await asyncio.sleep(0)
        with caplog.at_level(logging.WARNING, logger="carpool.events"):
            for i in range(5):
                bus.publish(Event.now("pfsyncd", "tick", n=i))
        assert slow.dropped and slow.closed
        assert bus.subscriber_count == 1
        # The slow subscriber's iteration ends (queued events are discarded).
        assert [ev async for ev in slow] == []
        assert len(await fast_task) == 5
        assert any("dropped a slow event subscriber" in r.getMessage() for r in caplog.records)

    asyncio.run(main())


def test_close_ends_a_waiting_iteration() -> None:
    async def main() -> None:
        bus = EventBus()
        with bus.subscribe() as sub:
            task = asyncio.create_task(_collect(sub, 10))
            await asyncio.sleep(0.01)
            bus.publish(Event.now("devd", "x"))
            await asyncio.sleep(0.01)
        assert [ev.name for ev in await asyncio.wait_for(task, 1)] == ["x"]
        assert bus.subscriber_count == 0

    asyncio.run(main())


def test_subscription_rejects_silly_size() -> None:
    with pytest.raises(ValueError):
        EventBus().subscribe(maxsize=0)


# --------------------------------------------------------------------------- logging


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (root.level, list(root.handlers))
    stream = io.StringIO()
    yield stream
    for h in list(root.handlers):
        if h not in saved[1]:
            root.removeHandler(h)
    root.setLevel(saved[0])


_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=(\w+) logger=(\S+) (.*)\Z")


def test_setup_logging_writes_one_key_value_line_per_record(log_stream: io.StringIO) -> None:
    setup_logging(logging.DEBUG, stream=log_stream)
    setup_logging(logging.DEBUG, stream=log_stream)  # idempotent: still one handler
    logging.getLogger("carpool.hastd").warning('disk "a" gone\nreally')
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("carpool.hastd").exception("failed")
    EventBus().publish(Event.now("carpd", "MASTER", ifname="em0", vhid=1))
    lines = log_stream.getvalue().splitlines()
    assert len(lines) == 3
    m = _LINE.match(lines[0])
    assert m and m.groups() == ("warning", "carpool.hastd", 'msg="disk \\"a\\" gone\\nreally"')
    m = _LINE.match(lines[1])
    assert m and m.group(1) == "error"
    assert m.group(3).startswith('msg=failed exc="Traceback')
    assert "RuntimeError: boom" in m.group(3)
    m = _LINE.match(lines[2])
    assert m and m.groups() == (
        "info",
        "carpool.carpd",
        "source=carpd event=MASTER ifname=em0 vhid=1",
    )


def test_setup_logging_level(log_stream: io.StringIO) -> None:
    setup_logging(logging.WARNING, stream=log_stream)
    logging.getLogger("carpool.x").info("hidden")
    logging.getLogger("carpool.x").error("shown")
    assert "hidden" not in log_stream.getvalue()
    assert "msg=shown" in log_stream.getvalue()


def test_formatter_timestamp_is_utc() -> None:
    record = logging.LogRecord("carpool.t", logging.INFO, __file__, 1, "hi", None, None)
    record.created = 1795676400.123
    record.msecs = 123.0
    line = KeyValueFormatter().format(record)
    assert line == "2026-11-26T07:00:00.123Z level=info logger=carpool.t msg=hi"
