"""Health-check state machine of relayd's hce process, per table.  Pure: callers pass ``now``.

This module owns host states.  The daemon asks a :class:`TableHealth` which hosts
to check (:meth:`TableHealth.start_round`, when :attr:`TableHealth.next_check` is
due), runs the checks, and feeds each :class:`CheckResult` back with
:meth:`TableHealth.record`, which returns :class:`HostUp`/:class:`HostDown`
events for the state changes.  Semantics follow hce.c ``hce_notify_done``:

* States are ``unknown`` (not yet known), ``up`` and ``down``; a host starts unknown.
* A failed check with retries left keeps the previous state and uses up one
  retry; ``retry N`` so tolerates N consecutive failures, the N+1st marks the
  host down.  Any successful check resets the counter to N.
* ``check_cnt``/``up_cnt`` only count checks whose outcome state is known, and
  relayctl's availability is ``up_cnt / check_cnt``.
* A host with ``parent ID`` is not checked; it takes the parent's every result.
* A table with no check has every host up and never checks.
* A check still running when the next round starts fails with
  ``interval timeout``.  ``interval`` is per table (a multiple of the global
  interval; relayd implements it as a skip count, which comes to the same).

It also holds the pure evaluators of check replies (check_tcp.c):
:func:`evaluate_http` (``code N`` / ``digest``), :func:`evaluate_send_expect`
(fnmatch glob, or hex bytes compared with memcmp for ``binary``), and
:func:`http_check_request`, the exact request relayd sends.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from carpool.relayd.glob import glob_match
from carpool.relayd.model import Check, CheckType

__all__ = [
    "CheckResult",
    "HostDown",
    "HostError",
    "HostEvent",
    "HostHealth",
    "HostSpec",
    "HostState",
    "HostUp",
    "TableHealth",
    "body_hasher",
    "evaluate_http",
    "evaluate_send_expect",
    "http_check_request",
]


class HostState(StrEnum):
    UNKNOWN = "unknown"
    UP = "up"
    DOWN = "down"


class HostError(StrEnum):
    """relayd's check outcomes, with util.c ``host_error`` strings as values."""

    NONE = "none"
    ABORT = "aborted"
    INTERVAL_TIMEOUT = "interval timeout"
    ICMP_OK = "icmp ok"
    ICMP_READ_TIMEOUT = "icmp read timeout"
    ICMP_WRITE_TIMEOUT = "icmp write timeout"
    TCP_SOCKET_ERROR = "tcp socket error"
    TCP_SOCKET_LIMIT = "tcp socket limit"
    TCP_SOCKET_OPTION = "tcp socket option"
    TCP_CONNECT_FAIL = "tcp connect failed"
    TCP_CONNECT_TIMEOUT = "tcp connect timeout"
    TCP_CONNECT_OK = "tcp connect ok"
    TCP_WRITE_TIMEOUT = "tcp write timeout"
    TCP_WRITE_FAIL = "tcp write failed"
    TCP_READ_TIMEOUT = "tcp read timeout"
    TCP_READ_FAIL = "tcp read failed"
    SCRIPT_OK = "script ok"
    SCRIPT_FAIL = "script failed"
    TLS_CONNECT_OK = "tls connect ok"
    TLS_CONNECT_FAIL = "tls connect failed"
    TLS_CONNECT_TIMEOUT = "tls connect timeout"
    TLS_CONNECT_ERROR = "tls connect error"
    TLS_READ_TIMEOUT = "tls read timeout"
    TLS_WRITE_TIMEOUT = "tls write timeout"
    TLS_READ_ERROR = "tls read error"
    TLS_WRITE_ERROR = "tls write error"
    SEND_EXPECT_FAIL = "send/expect failed"
    SEND_EXPECT_OK = "send/expect ok"
    HTTP_CODE_ERROR = "http code malformed"
    HTTP_CODE_FAIL = "http code mismatch"
    HTTP_CODE_OK = "http code ok"
    HTTP_DIGEST_ERROR = "http digest malformed"
    HTTP_DIGEST_FAIL = "http digest mismatch"
    HTTP_DIGEST_OK = "http digest ok"


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One finished check: ``ok``, relayd's reason, and how long it took."""

    ok: bool
    error: HostError = HostError.NONE
    latency_ms: float = 0.0

    @classmethod
    def success(cls, error: HostError = HostError.NONE, latency_ms: float = 0.0) -> CheckResult:
        return cls(True, error, latency_ms)

    @classmethod
    def failure(cls, error: HostError, latency_ms: float = 0.0) -> CheckResult:
        return cls(False, error, latency_ms)


@dataclass(frozen=True, slots=True)
class HostEvent:
    table: str
    host_id: int
    host: str
    previous: HostState
    error: HostError
    latency_ms: float
    availability: float | None
    time: float

    @property
    def state(self) -> HostState:
        raise NotImplementedError

    @property
    def name(self) -> str:
        return "host_up" if self.state is HostState.UP else "host_down"

    def log_line(self, check: str = "") -> str:
        """relayd's ``log state changes`` line."""
        avail = "" if self.availability is None else f"{self.availability:.2f}%"
        return (
            f"host {self.host}, check {check} ({int(self.latency_ms)}ms,{self.error.value}), "
            f"state {self.previous.value} -> {self.state.value}, availability {avail}"
        )


@dataclass(frozen=True, slots=True)
class HostUp(HostEvent):
    @property
    def state(self) -> HostState:
        return HostState.UP


@dataclass(frozen=True, slots=True)
class HostDown(HostEvent):
    @property
    def state(self) -> HostState:
        return HostState.DOWN


@dataclass(frozen=True, slots=True)
class HostSpec:
    """A host of a table use: runtime id, name, ``retry`` and ``parent`` (a host id here)."""

    id: int
    name: str
    retry: int = 0
    parent: int | None = None


@dataclass(slots=True)
class HostHealth:
    """A host's runtime state: what relayctl shows."""

    id: int
    name: str
    retry: int = 0
    parent: int | None = None
    state: HostState = HostState.UNKNOWN
    disabled: bool = False
    check_cnt: int = 0
    up_cnt: int = 0
    retry_cnt: int = 0
    error: HostError = HostError.NONE
    latency_ms: float = 0.0
    pending: bool = False

    @property
    def availability(self) -> float | None:
        """Percent of counted checks that found the host up; None before the first."""
        if self.check_cnt == 0:
            return None
        return self.up_cnt / self.check_cnt * 100.0

    @property
    def usable(self) -> bool:
        return self.state is HostState.UP and not self.disabled


class TableHealth:
    """The check state of one table use (``forward to <t> port P check ...``)."""

    def __init__(
        self,
        name: str,
        hosts: Sequence[HostSpec],
        check: Check,
        *,
        interval: float,
        table_id: int = 0,
        start: float = 0.0,
    ) -> None:
        self.id = table_id
        self.name = name
        self.check = check
        self.interval = float(interval)
        self.disabled = False
        self.next_check = start
        self.hosts: dict[int, HostHealth] = {}
        self._children: dict[int, list[int]] = {}
        for s in hosts:
            if s.id in self.hosts:
                raise ValueError(f"duplicate host id {s.id}")
            self.hosts[s.id] = HostHealth(s.id, s.name, s.retry, s.parent, retry_cnt=s.retry)
        for s in hosts:
            if s.parent is not None:
                if s.parent not in self.hosts:
                    raise ValueError(f"host {s.name}: parent {s.parent} is not in table {name}")
                self._children.setdefault(s.parent, []).append(s.id)
        if check.type is CheckType.NONE:
            for h in self.hosts.values():
                h.state = HostState.UP

    # -- counters relayctl shows -------------------------------------------------

    @property
    def up(self) -> int:
        """Hosts up and enabled (``active (N hosts)``)."""
        return sum(1 for h in self.hosts.values() if h.usable)

    def usable_hosts(self) -> list[int]:
        return [h.id for h in self.hosts.values() if h.usable]

    # -- scheduling -----------------------------------------------------------------

    def due(self, now: float) -> bool:
        if self.disabled or self.check.type is CheckType.NONE:
            return False
        return now >= self.next_check

    def start_round(self, now: float) -> tuple[list[int], list[HostEvent]]:
        """Begin a check round: the host ids to check now, and the events from
        checks of the last round that never finished (``interval timeout``)."""
        events: list[HostEvent] = []
        if not self.due(now):
            return [], events
        self.next_check = max(self.next_check + self.interval, now)
        if self.next_check <= now:
            self.next_check = now + self.interval
        to_check: list[int] = []
        for h in list(self.hosts.values()):
            if h.disabled or h.parent is not None:
                continue
            if h.pending:
                events += self.record(h.id, CheckResult.failure(HostError.INTERVAL_TIMEOUT), now)
            h.pending = True
            to_check.append(h.id)
        return to_check, events

    def poll(self, now: float) -> None:
        """``relayctl poll``: check at once."""
        self.next_check = now

    # -- results ---------------------------------------------------------------------

    def record(self, host_id: int, result: CheckResult, now: float) -> list[HostEvent]:
        """Feed one check result; returns the host up/down events (children included)."""
        h = self.hosts[host_id]
        h.pending = False
        if h.disabled:
            return []
        new = HostState.UP if result.ok else HostState.DOWN
        return self._notify(h, new, result, now)

    def _notify(
        self, h: HostHealth, new: HostState, result: CheckResult, now: float
    ) -> list[HostEvent]:
        last = h.state
        if new is HostState.DOWN and h.retry_cnt > 0:
            new = last
            h.retry_cnt -= 1
        else:
            h.retry_cnt = h.retry
        if new is not HostState.UNKNOWN:
            h.check_cnt += 1
            if new is HostState.UP:
                h.up_cnt += 1
        h.state = new
        h.error = result.error
        h.latency_ms = result.latency_ms
        events: list[HostEvent] = []
        if new is not last and new is not HostState.UNKNOWN:
            cls = HostUp if new is HostState.UP else HostDown
            events.append(
                cls(self.name, h.id, h.name, last, result.error, result.latency_ms,
                    h.availability, now)
            )
        for child_id in self._children.get(h.id, ()):
            child = self.hosts[child_id]
            if not child.disabled:
                events += self._notify(child, h.state, result, now)
        return events

    # -- relayctl host|table enable|disable -------------------------------------------

    def disable_host(self, host_id: int) -> bool:
        h = self.hosts.get(host_id)
        if h is None or h.disabled:
            return False
        h.disabled = True
        h.pending = False
        return True

    def enable_host(self, host_id: int) -> bool:
        """Re-enable: relayd forgets the state (unknown) and the counters."""
        h = self.hosts.get(host_id)
        if h is None or not h.disabled:
            return False
        h.disabled = False
        h.state = HostState.UP if self.check.type is CheckType.NONE else HostState.UNKNOWN
        h.check_cnt = h.up_cnt = 0
        h.retry_cnt = h.retry
        h.error = HostError.NONE
        return True

    def set_disabled(self, disabled: bool) -> bool:
        if self.disabled == disabled:
            return False
        self.disabled = disabled
        if not disabled:
            for h in self.hosts.values():
                if not h.disabled and self.check.type is not CheckType.NONE:
                    h.state = HostState.UNKNOWN
                    h.retry_cnt = h.retry
        return True

    def find_host(self, name_or_id: str) -> HostHealth | None:
        """A host by id (numeric) or name, as relayctl's argument."""
        if name_or_id.isdigit():
            return self.hosts.get(int(name_or_id))
        for h in self.hosts.values():
            if h.name == name_or_id:
                return h
        return None


# -- check requests and replies (check_tcp.c) -----------------------------------------


def http_check_request(check: Check) -> bytes:
    """What relayd sends for ``check http|https``: HEAD (GET for ``digest``), HTTP/1.0,
    or HTTP/1.1 with Host and ``Connection: close`` when ``host`` is given."""
    method = "GET" if check.digest is not None else "HEAD"
    path = check.path or "/"
    if check.host:
        return (
            f"{method} {path} HTTP/1.1\r\nHost: {check.host}\r\nConnection: close\r\n\r\n"
        ).encode()
    return f"{method} {path} HTTP/1.0\r\n\r\n".encode()


def body_hasher(check: Check) -> hashlib._Hash:
    """An incremental hash for ``digest`` checks (SHA1 for 40 hex digits, else MD5)."""
    if check.digest_type == "sha1":
        return hashlib.sha1(usedforsecurity=False)
    return hashlib.md5(usedforsecurity=False)


def evaluate_http(head: bytes, body_digest: str | None, check: Check, latency_ms: float = 0.0
                  ) -> CheckResult:
    """Judge an HTTP check reply.

    ``head``: the reply from its first byte (status line, at least; for ``digest``
    checks the whole head up to and including the blank line).  ``body_digest``:
    hex digest of the body (see :func:`body_hasher`), for ``digest`` checks.
    ``code`` checks take the three digits after ``HTTP/1.x `` as relayd does.
    """
    if check.digest is not None:
        if body_digest is None or b"\r\n\r\n" not in head:
            return CheckResult.failure(HostError.HTTP_DIGEST_ERROR, latency_ms)
        if body_digest.lower() != check.digest.lower():
            return CheckResult.failure(HostError.HTTP_DIGEST_FAIL, latency_ms)
        return CheckResult.success(HostError.HTTP_DIGEST_OK, latency_ms)
    if not (head.startswith(b"HTTP/1.1 ") or head.startswith(b"HTTP/1.0 ")):
        return CheckResult.failure(HostError.HTTP_CODE_ERROR, latency_ms)
    rest = head[9:]
    if len(rest) < 5:  # three digits and CRLF
        return CheckResult.failure(HostError.HTTP_CODE_ERROR, latency_ms)
    digits = rest[:3]
    if not digits.isdigit() or not 100 <= int(digits) <= 999:
        return CheckResult.failure(HostError.HTTP_CODE_ERROR, latency_ms)
    if check.code is not None and int(digits) != check.code:
        return CheckResult.failure(HostError.HTTP_CODE_FAIL, latency_ms)
    return CheckResult.success(HostError.HTTP_CODE_OK, latency_ms)


def evaluate_send_expect(
    received: bytes, expect: str, *, binary: bool = False, latency_ms: float = 0.0
) -> CheckResult:
    """Judge what a ``send ... expect`` check has read so far.

    Text: the reply, up to a NUL as relayd reads it as a C string, must match the
    fnmatch glob ``expect`` (flags 0).  ``binary``: ``expect`` is hex and the first
    bytes must equal it.  A failure here means "not yet": the daemon may read on
    until the timeout.
    """
    if binary:
        try:
            want = bytes.fromhex(expect)
        except ValueError:
            return CheckResult.failure(HostError.SEND_EXPECT_FAIL, latency_ms)
        if len(received) >= len(want) and received[: len(want)] == want:
            return CheckResult.success(HostError.SEND_EXPECT_OK, latency_ms)
        return CheckResult.failure(HostError.SEND_EXPECT_FAIL, latency_ms)
    text = received.split(b"\0", 1)[0].decode("latin-1")
    if glob_match(expect, text):
        return CheckResult.success(HostError.SEND_EXPECT_OK, latency_ms)
    return CheckResult.failure(HostError.SEND_EXPECT_FAIL, latency_ms)
