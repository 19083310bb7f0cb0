"""The event record every carpool daemon emits, the bus that spreads it, and logging.

An :class:`Event` is one state change an operator or an automation may care
about (CARP ``MASTER``/``BACKUP``, HAST ``connect``/``syncdone``, relayd
``host_down``...).  A daemon publishes it on its :class:`EventBus`, which

* logs it as one ``key=value`` line on the logger ``carpool.<source>``,
* counts it in ``carpool_events_total{source,event}`` when given a registry,
* hands it to every subscriber (the control channel's ``subscribe`` streams),
* remembers the last ones for ``status`` commands.

:func:`setup_logging` installs the one-line ``key=value`` log format that
every daemon uses.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sys
import time
from collections import deque
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TextIO

from prometheus_client import CollectorRegistry, Counter

__all__ = [
    "AttributeValue",
    "Attributes",
    "Event",
    "EventBus",
    "KeyValueFormatter",
    "Subscription",
    "format_kv",
    "quote_value",
    "setup_logging",
]

AttributeValue = str | int | float | bool
"""The types an event attribute may hold (all of them map to JSON scalars)."""

_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*\Z")
_BARE_RE = re.compile(r"[^\s\"'\\=\x00-\x1f\x7f]+\Z")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


# --------------------------------------------------------------------------- key=value


def quote_value(value: object) -> str:
    """Render *value* for a ``key=value`` line.

    Booleans become ``true``/``false``, numbers their shortest form, and a string
    stays bare unless it is empty or holds spaces, quotes, backslashes, ``=`` or
    control characters; then it is double-quoted with C-style escapes.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if _BARE_RE.match(text):
        return text
    out = []
    for ch in text:
        esc = _ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def format_kv(pairs: Iterable[tuple[str, object]]) -> str:
    """Join ``(key, value)`` pairs into one ``key=value key2="v 2"`` line."""
    return " ".join(f"{key}={quote_value(value)}" for key, value in pairs)


# --------------------------------------------------------------------------- Event


def _check_attribute(key: object, value: object) -> AttributeValue:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(
            f"event attribute name {key!r} is not valid: use letters, digits, '_', '.', '-',"
            " starting with a letter or '_'"
        )
    # Subclasses (IntEnum, StrEnum...) are normalised to the plain type so that
    # JSON and key=value lines show the value, not the enum's repr.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"event attribute {key!r} is {value!r}: floats must be finite")
        return float(value)
    raise ValueError(
        f"event attribute {key!r} has type {type(value).__name__}:"
        " only str, int, float and bool are allowed"
    )


class Attributes(Mapping[str, AttributeValue]):
    """An immutable, hashable, insertion-ordered mapping of event attributes."""

    __slots__ = ("_dict", "_hash")

    def __init__(self, items: Mapping[str, object] | None = None) -> None:
        checked: dict[str, AttributeValue] = {}
        for key, value in (items or {}).items():
            checked[key] = _check_attribute(key, value)
        self._dict = checked
        self._hash: int | None = None

    def __getitem__(self, key: str) -> AttributeValue:
        return self._dict[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._dict)

    def __len__(self) -> int:
        return len(self._dict)

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self._dict.items()))
        return self._hash

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Attributes):
            return self._dict == other._dict
        if isinstance(other, Mapping):
            return self._dict == dict(other.items())
        return NotImplemented

    def __repr__(self) -> str:
        return f"Attributes({self._dict!r})"

    def to_dict(self) -> dict[str, AttributeValue]:
        """A plain (mutable, JSON-ready) copy."""
        return dict(self._dict)


def _check_name(what: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"event {what} must be a non-empty string, not {value!r}")
    return value


def _check_time(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"event {what} must be a number, not {value!r}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"event {what} must be finite, not {value!r}")
    return result


@dataclass(frozen=True)
class Event:
    """One state change: who (``source``), what (``name``), details, and when.

    ``monotonic`` orders events within one host; ``wall`` (seconds since the
    epoch) is for humans and for correlating hosts.  ``attributes`` is always an
    immutable :class:`Attributes`, whatever mapping is passed in.
    """

    source: str
    name: str
    attributes: Mapping[str, AttributeValue] = field(default_factory=Attributes)
    monotonic: float = 0.0
    wall: float = 0.0

    def __post_init__(self) -> None:
        _check_name("source", self.source)
        _check_name("name", self.name)
        if not isinstance(self.attributes, Mapping):
            raise ValueError(
                f"event attributes must be a mapping, not {type(self.attributes).__name__}"
            )
        if not isinstance(self.attributes, Attributes):
            object.__setattr__(self, "attributes", Attributes(self.attributes))
        object.__setattr__(self, "monotonic", _check_time("monotonic", self.monotonic))
        object.__setattr__(self, "wall", _check_time("wall", self.wall))

    @classmethod
    def now(cls, source: str, name: str, /, **attributes: AttributeValue) -> Event:
        """An event stamped with the current monotonic and wall-clock times."""
        return cls(source, name, Attributes(attributes), time.monotonic(), time.time())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` reverses it."""
        return {
            "source": self.source,
            "name": self.name,
            "attributes": dict(self.attributes.items()),
            "monotonic": self.monotonic,
            "wall": self.wall,
        }

    @classmethod
    def from_dict(cls, data: object) -> Event:
        """Rebuild an event from :meth:`to_dict` output; raise ``ValueError`` if it is not one.

        Unknown keys are ignored so that newer daemons may add fields.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"an event must be a JSON object, not {type(data).__name__}")
        missing = [k for k in ("source", "name", "monotonic", "wall") if k not in data]
        if missing:
            raise ValueError(f"event is missing {', '.join(missing)}")
        attributes = data.get("attributes", {})
        if attributes is None:
            attributes = {}
        if not isinstance(attributes, Mapping):
            raise ValueError(
                f"event attributes must be a JSON object, not {type(attributes).__name__}"
            )
        return cls(
            source=data["source"],
            name=data["name"],
            attributes=Attributes(attributes),
            monotonic=data["monotonic"],
            wall=data["wall"],
        )

    def format_line(self) -> str:
        """``source=carpd event=MASTER ifname=em0 vhid=1 reason="master timed out"``."""
        pairs: list[tuple[str, object]] = [("source", self.source), ("event", self.name)]
        pairs.extend(self.attributes.items())
        return format_kv(pairs)


# --------------------------------------------------------------------------- bus


class Subscription:
    """A subscriber's queue of events; iterate it with ``async for``.

    The iteration ends when :meth:`close` is called or when the bus drops the
    subscriber for being too slow (then :attr:`dropped` is true).  Events still
    queued when that happens are discarded.
    """

    def __init__(self, bus: EventBus, maxsize: int, names: Collection[str] | None = None) -> None:
        if maxsize < 1:
            raise ValueError(f"subscription maxsize must be at least 1, not {maxsize}")
        self._bus = bus
        self.maxsize = maxsize
        self.names: frozenset[str] | None = None if names is None else frozenset(names)
        self._items: deque[Event] = deque()
        self._wakeup = asyncio.Event()
        self.closed = False
        self.dropped = False

    def wants(self, event: Event) -> bool:
        return self.names is None or event.name in self.names

    def _offer(self, event: Event) -> bool:
        """Queue *event*; False when the queue is full (the bus then drops us)."""
        if self.closed or not self.wants(event):
            return True
        if len(self._items) >= self.maxsize:
            return False
        self._items.append(event)
        self._wakeup.set()
        return True

    def _end(self) -> None:
        self.closed = True
        self._items.clear()
        self._wakeup.set()

    def close(self) -> None:
        """Stop receiving events; a pending ``async for`` ends."""
        if not self.closed:
            self._bus._remove(self)
            self._end()

    def qsize(self) -> int:
        return len(self._items)

    def get_nowait(self) -> Event | None:
        """The next queued event, or ``None`` when there is none right now."""
        return self._items.popleft() if self._items else None

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Event:
        while True:
            if self.closed:
                raise StopAsyncIteration
            if self._items:
                return self._items.popleft()
            self._wakeup.clear()
            await self._wakeup.wait()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventBus:
    """Fans events out to the log, the metrics, the subscribers and a short history.

    ``publish`` never blocks: a subscriber whose queue is full is dropped (its
    iterator ends) and that is logged.  It must be called from the thread that
    runs the asyncio loop the subscribers iterate on (or with no loop at all).
    Given a *registry*, the bus registers ``carpool_events_total`` in it, so
    use one bus per registry.
    """

    HISTORY = 100

    def __init__(self, registry: CollectorRegistry | None = None, *, history: int = HISTORY):
        self._subscribers: list[Subscription] = []
        self._recent: deque[Event] = deque(maxlen=history)
        self._log = logging.getLogger("carpool.events")
        self._counter: Counter | None = None
        if registry is not None:
            self._counter = Counter(
                "carpool_events",
                "Events published, by daemon and event name.",
                ["source", "event"],
                registry=registry,
            )

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    def publish(self, event: Event) -> None:
        """Log, count, remember and fan out *event*."""
        line = event.format_line()
        logging.getLogger(f"carpool.{event.source}").info(line, extra={"kv_line": line})
        if self._counter is not None:
            self._counter.labels(source=event.source, event=event.name).inc()
        self._recent.append(event)
        for sub in list(self._subscribers):
            if not sub._offer(event):
                self._remove(sub)
                sub.dropped = True
                sub._end()
                self._log.warning(
                    "dropped a slow event subscriber: %d events queued when %s/%s arrived",
                    sub.maxsize,
                    event.source,
                    event.name,
                )

    def subscribe(self, maxsize: int = 1000, names: Collection[str] | None = None) -> Subscription:
        """A new subscription receiving every later event (or only those named in *names*)."""
        sub = Subscription(self, maxsize, names)
        self._subscribers.append(sub)
        return sub

    def recent(self, n: int | None = None) -> list[Event]:
        """The last *n* events (all remembered ones by default), oldest first."""
        events = list(self._recent)
        if n is None:
            return events
        if n <= 0:
            return []
        return events[-n:]

    def _remove(self, sub: Subscription) -> None:
        if sub in self._subscribers:
            self._subscribers.remove(sub)


# --------------------------------------------------------------------------- logging


class KeyValueFormatter(logging.Formatter):
    """``2026-11-26T07:00:00.123Z level=info logger=carpool.carpd msg="..."``.

    A record carrying ``extra={"kv_line": line}`` (as published events do) has
    *line* appended as-is instead of a quoted ``msg``.  Tracebacks are folded
    into an escaped ``exc="..."`` field so each record stays on one line.
    """

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        head = f"{stamp}.{int(record.msecs):03d}Z level={record.levelname.lower()}"
        head += f" logger={quote_value(record.name)}"
        kv_line = getattr(record, "kv_line", None)
        if isinstance(kv_line, str):
            line = f"{head} {kv_line}"
        else:
            line = f"{head} msg={quote_value(record.getMessage())}"
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += f" exc={quote_value(record.exc_text)}"
        if record.stack_info:
            line += f" stack={quote_value(record.stack_info)}"
        return line


_HANDLER_MARK = "_carpool_handler"


def setup_logging(level: int = logging.INFO, *, stream: TextIO | None = None) -> logging.Handler:
    """Send every log record, one ``key=value`` line each, to *stream* (stderr by default).

    Configures the root logger, so third-party libraries' records get the same
    format.  Calling it again replaces the handler it installed before.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            root.removeHandler(old)
            old.close()
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    setattr(handler, _HANDLER_MARK, True)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
