"""pfsyncd's state machine: what to send, apply and announce. Sans-I/O.

This module owns every protocol decision of pfsyncd; it never reads the clock,
touches a socket or the kernel.  Entries are states, the flat byte strings of
:mod:`carpool.pfsync.state`, keyed by their first bytes (zone and original
tuple).  The daemon feeds it inputs with the current time and performs the
actions it returns::

    machine = SyncMachine(settings, session=random, now=t)
    actions = machine.start(now)                        # demote, HELLO, bulk request
    actions = machine.local_changes(events, now)        # kernel NEW/UPDATE/DESTROY
    actions = machine.table_read(purpose, entries, started_at, now)   # a dump it asked for
    actions = machine.received(message, now)            # an authenticated datagram
    actions = machine.advance(now)                      # at machine.next_deadline()

Actions: :class:`Send` a message, :class:`Apply` changes to the kernel table,
:class:`ReadTable` (dump it and call :meth:`SyncMachine.table_read`),
:class:`SetDemotion` (the CARP demotion pfsyncd wants in place), :class:`Emit`
an event.

The rules:

* **Mirror.**  The machine keeps the entries it knows (from kernel events,
  dumps and the peer), keyed by zone and original tuple.  Local changes are
  queued per entry, so an entry queued twice is sent once with its latest
  state (pfsync's coalescing).  DATA messages are filled up to one datagram.
* **Reliability (FTFW-like).**  Each DATA message has a sequence number and
  stays in the resend queue until acknowledged.  The receiver acknowledges
  cumulatively and lists the missing numbers it knows of (NACK); a message
  asked for is sent again under the same number with the *latest* state of its
  entries (entries re-sent later under a newer number are left out).  Every
  non-DATA message carries the sender's last data number, so a lost tail is
  seen too.  An unacknowledged message older than ``ack_timeout`` makes the
  sender send ALIVE, which the receiver always answers with an ACK.  At most
  ``max_unacked`` messages are in flight; beyond that changes wait, coalesced.
* **Peer.**  The peer is lost after ``peer_timeout`` without an authenticated
  message (ALIVE is sent whenever nothing was sent for ``alive_interval``).
  While lost, nothing is queued for sending beyond the per-entry queue.  A peer
  that comes back with the same session gets every entry again (a partition
  healed); a new session (the peer restarted) resets the sequence tracking.
* **Bulk update (pfsync).**  At start the machine demotes CARP by
  ``demotion_factor`` and asks the peer for a bulk update, retrying every
  ``bulk_timeout`` seconds up to ``bulk_tries`` times; the demotion is lifted
  when BULK_END arrived and every data message up to it was received — or,
  like pfsync, after the last try ("pretend the transfer was ok").  A peer's
  bulk request is answered from the mirror (a dump if the kernel table has not
  been read yet): BULK_START, every entry as UPD (but those this incarnation of
  the peer sent us itself), BULK_END; the DATA messages go out ``BULK_CHUNK`` at
  a time, one chunk per call, with :meth:`SyncMachine.next_deadline` "now"
  until BULK_END is sent, so the peer starts writing at once.
* **Refresh.**  The kernel sends no event when a packet extends an entry's
  timeout, so every ``refresh_interval`` the table is dumped: entries the
  peer's copy of which expires within two intervals while ours lives longer
  are sent again, changed entries are sent, unknown ones inserted and vanished
  ones deleted.
* **Filters.**  Entries whose original or reply source is in an ignored
  network (the sync link, loopback, configured addresses) are never sent nor
  applied.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from carpool.pfsync import state as states
from carpool.pfsync import wire
from carpool.pfsync.conntrack import ChangeKind
from carpool.pfsync.ctnetlink import EventKind
from carpool.pfsync.state import AddressFilter, content, is_liberal, key_of, merge, timeout_of
from carpool.pfsync.wire import Action as RecordAction

__all__ = [
    "Apply",
    "Emit",
    "ReadPurpose",
    "ReadTable",
    "Send",
    "SetDemotion",
    "SyncFilter",
    "SyncMachine",
    "SyncSettings",
]

#: family, protocol, zone and original tuple: the first bytes of a state
Key = bytes
#: an entry in the flat layout of :mod:`carpool.pfsync.state`
State = bytes
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_MASK = 0xFFFFFFFF
_RX_WINDOW = 1 << 20
_MAX_TOMBSTONES = 65536
_ACTIONS = tuple(RecordAction)
#: DATA messages of a bulk answer per call
BULK_CHUNK = 32
_OUT_STAT = {action: f"{action.name.lower()}_out" for action in RecordAction}
_IN_STAT = {action: f"{action.name.lower()}_in" for action in RecordAction}


def unwrap(value: int, reference: int) -> int:
    """The unbounded sequence number nearest ``reference`` whose low 32 bits are ``value``."""
    difference = (value - reference) & _MASK
    if difference >= 1 << 31:
        difference -= 1 << 32
    return reference + difference


@dataclass(frozen=True, slots=True)
class SyncFilter:
    """Entries never synchronised: original or reply source in an ignored network."""

    ignored: tuple[Network, ...] = ()
    matcher: AddressFilter = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "matcher", AddressFilter(self.ignored))

    def ignores(self, state: State) -> bool:
        return self.matcher.ignores(state)


@dataclass(frozen=True, slots=True)
class SyncSettings:
    filter: SyncFilter = field(default_factory=SyncFilter)
    demotion_factor: int = 240
    bulk_timeout: float = 5.0
    bulk_tries: int = 12
    alive_interval: float = 1.0
    peer_timeout: float = 4.0
    ack_window: int = 32
    ack_delay: float = 0.05
    ack_timeout: float = 0.3
    resend_interval: float = 0.1
    max_unacked: int = 4096
    refresh_interval: float = 30.0
    datagram_size: int = wire.MAX_DATAGRAM


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class Send:
    message: wire.Message


@dataclass(frozen=True, slots=True)
class Apply:
    #: (what to do, state) pairs; :class:`~carpool.pfsync.conntrack.KernelChange` is one
    changes: Sequence[tuple[ChangeKind, State]]


class ReadPurpose(enum.Enum):
    #: learn the table (start, missed events): reconcile only
    RECONCILE = "reconcile"
    #: periodic: reconcile and re-send what the peer would lose
    REFRESH = "refresh"
    #: answer a bulk request
    BULK = "bulk"
    #: send every entry (the peer came back after a partition)
    PUSH = "push"


@dataclass(frozen=True, slots=True)
class ReadTable:
    purpose: ReadPurpose
    bulk_id: int = 0


@dataclass(frozen=True, slots=True)
class SetDemotion:
    """The CARP demotion pfsyncd wants in place now (0: none)."""

    amount: int
    reason: str


@dataclass(frozen=True, slots=True)
class Emit:
    name: str
    attributes: tuple[tuple[str, Any], ...] = ()


MachineAction = Send | Apply | ReadTable | SetDemotion | Emit


class BulkState(enum.Enum):
    WAITING = "waiting"
    DONE = "done"
    FAILED = "failed"


class _Tracked:
    """What the machine knows of one entry."""

    __slots__ = ("peer_expires", "peer_sequence", "state", "updated_at")

    def __init__(self, state: State, peer_expires: float, updated_at: float) -> None:
        self.state = state
        #: when the peer's copy runs out, as far as we know (0: it may not have one)
        self.peer_expires = peer_expires
        self.updated_at = updated_at
        #: the peer's data message this entry was last applied from (-1: none)
        self.peer_sequence = -1


class _Sent:
    """A DATA message in the resend queue."""

    __slots__ = ("last_sent", "records")

    def __init__(self, records: list[tuple[Key, RecordAction, State]], now: float):
        self.records = records
        self.last_sent = now


class SyncMachine:
    def __init__(self, settings: SyncSettings, session: int, now: float, first_sequence: int = 1):
        self.settings = settings
        self.session = session & 0xFFFFFFFFFFFFFFFF
        self.stats: Counter[str] = Counter()
        self.table: dict[Key, _Tracked] = {}
        # sending
        self.pending: OrderedDict[Key, tuple[RecordAction, State]] = OrderedDict()
        self.tx_next = first_sequence
        self.unacked: OrderedDict[int, _Sent] = OrderedDict()
        self.owner: dict[Key, int] = {}
        self.last_sent = now
        self.last_probe = now
        # receiving
        self.peer_session: int | None = None
        self.rx_next: int | None = None
        self.rx_above: set[int] = set()
        self.rx_peer_last: int | None = None
        self.rx_unacked = 0
        #: entries the peer deleted, with the message that did it (bounded)
        self.deleted: OrderedDict[Key, int] = OrderedDict()
        self.ack_due: float | None = None
        self.last_heard: float | None = None
        self.peer_alive = False
        # bulk update we asked for
        self.bulk_state = BulkState.WAITING
        self.bulk_id = 0
        self.bulk_tries = 0
        self.bulk_deadline: float | None = None
        self.bulk_end_sequence: int | None = None
        self.bulk_started_at = now
        self.syncok = False
        self.demotion = 0
        # refresh
        self.next_refresh = now + settings.refresh_interval
        self.reading: set[ReadPurpose] = set()
        #: a bulk answer being sent: its id and how many queued records precede BULK_END
        self.bulk_out: tuple[int, int] | None = None
        #: the kernel table was read once: the mirror can answer a bulk request
        self.table_known = False

    # ----------------------------------------------------------------- inputs

    def start(self, now: float) -> list[MachineAction]:
        """Demote, greet the peer, ask for a bulk update and read the local table."""
        actions: list[MachineAction] = []
        if self.settings.demotion_factor:
            self.demotion = self.settings.demotion_factor
            actions.append(SetDemotion(self.demotion, "pfsync bulk update start"))
        actions.append(self._send(wire.Hello(self.session, self._last_data(), True), now))
        actions += self._request_bulk(now)
        read = self._read(ReadPurpose.RECONCILE)
        if read is not None:
            actions.append(read)
        return actions

    def local_changes(
        self, changes: Iterable[tuple[EventKind, State]], now: float
    ) -> list[MachineAction]:
        """Kernel events as states (our own writes filtered out by the caller)."""
        liberal: list[tuple[ChangeKind, State]] = []
        ignores = self.settings.filter.matcher.ignores
        table = self.table
        pending = self.pending
        queue = self._queue
        filtered = inserts = removals = incomplete = 0
        destroy, insert = EventKind.DESTROY, RecordAction.INS
        for kind, state in changes:
            if ignores(state):
                filtered += 1
                continue
            key = state[:20] if state[0] == 4 else state[:44]
            if kind is destroy:
                old = table.pop(key, None)
                removals += 1
                queue(key, RecordAction.DEL, old.state if old else state)
                continue
            old = table.get(key)
            if old is None:
                inserts += 1
                table[key] = _Tracked(state, 0.0, now)
                if state[1] == 6 and not state[-20] & 1:
                    incomplete += 1  # a dump will bring the tcp state
                else:
                    pending[key] = (insert, state)
            else:
                state = merge(state, old.state)
                old.state = state
                old.updated_at = now
                old.peer_sequence = -1  # changed here: ours as much as the peer's
                queue(key, RecordAction.INS if kind is EventKind.NEW else RecordAction.UPD, state)
            if state[1] == 6 and state[-20] & 1 and not state[-16] & state[-15] & 8:
                liberal.append((ChangeKind.MAKE_LIBERAL, state))
        stats = self.stats
        if incomplete:
            stats["incomplete"] += incomplete
        if filtered:
            stats["filtered"] += filtered
        if inserts:
            stats["inserts"] += inserts
        if removals:
            stats["removals"] += removals
        return self._make_liberal(liberal) + self._flush(now)

    def _make_liberal(self, changes: list[tuple[ChangeKind, State]]) -> list[MachineAction]:
        """Our own TCP entries stop checking sequence windows, as injected ones do.

        When the peer takes over and later hands back (or during the moment both
        hold a VIP), packets this node never saw move the windows on; a strict
        entry would then call the next packet INVALID and the stack answer it
        with a RST.  pfsync avoids it by syncing the windows, which ctnetlink
        cannot export.
        """
        if not changes:
            return []
        self.stats["made_liberal"] += len(changes)
        return [Apply(changes)]

    def table_read(
        self,
        purpose: ReadPurpose,
        entries: Sequence[State],
        started_at: float,
        now: float,
        bulk_id: int = 0,
    ) -> list[MachineAction]:
        """The dump asked for by :class:`ReadTable`, begun at ``started_at``."""
        self.reading.discard(purpose)
        interval = self.settings.refresh_interval
        seen: set[Key] = set()
        everything: list[tuple[Key, State]] = []
        liberal: list[tuple[ChangeKind, State]] = []
        ignores = self.settings.filter.ignores
        for entry in entries:
            if ignores(entry):
                continue
            if not is_liberal(entry):
                liberal.append((ChangeKind.MAKE_LIBERAL, entry))
            key = key_of(entry)
            seen.add(key)
            everything.append((key, entry))
            old = self.table.get(key)
            if old is None:
                self.stats["inserts"] += 1
                self.table[key] = _Tracked(entry, 0.0, now)
                self._queue(key, RecordAction.INS, entry)
                continue
            changed = content(old.state) != content(entry)
            expires_here = now + timeout_of(entry)
            stale = (
                old.peer_expires < now + 2 * interval
                and expires_here > old.peer_expires + interval / 2
            )
            old.state = entry
            old.updated_at = now
            if changed or (purpose is ReadPurpose.REFRESH and stale):
                self._queue(key, RecordAction.UPD, entry)
        for key in [
            k for k, t in self.table.items() if k not in seen and t.updated_at < started_at
        ]:
            tracked = self.table.pop(key)
            self.stats["removals"] += 1
            self._queue(key, RecordAction.DEL, tracked.state)
        actions: list[MachineAction] = self._make_liberal(liberal)
        if purpose is ReadPurpose.REFRESH:
            self.stats["refreshes"] += 1
        if purpose is ReadPurpose.PUSH:
            for key, entry in everything:
                self._queue(key, RecordAction.UPD, entry)
        self.table_known = True
        if purpose is ReadPurpose.BULK:
            return actions + self._send_bulk(bulk_id, now) + self._flush(now)
        return actions + self._flush(now)

    def _send_bulk(self, bulk_id: int, now: float) -> list[MachineAction]:
        """BULK_START, every entry we know as UPD, BULK_END (pfsync's bulk update).

        Entries this incarnation of the peer sent us, unchanged here since, are
        left out: the peer has them (had it lost them, it would have a new session).
        """
        self.stats["bulk_sent"] += 1
        pending = self.pending
        upd = RecordAction.UPD
        for key, tracked in self.table.items():
            state = tracked.state
            if tracked.peer_sequence >= 0 or (state[1] == 6 and not states.has_tcp(state)):
                continue
            previous = pending.get(key)
            if previous is None or previous[0] is not RecordAction.INS:
                pending[key] = (upd, state)
        # Everything queued now goes out before BULK_END, a chunk per turn of the
        # caller's loop (next_deadline() is "now" meanwhile), so the peer starts
        # writing while the rest is still being framed and ACKs are read in between.
        self.bulk_out = (bulk_id, len(pending))
        return [self._send(wire.BulkStart(self.session, self._last_data(), bulk_id), now)]

    def received(self, message: wire.Message, now: float) -> list[MachineAction]:
        """An authenticated message from the peer."""
        actions: list[MachineAction] = []
        self.stats["ipackets"] += 1
        self.last_heard = now
        restarted = False
        if message.session != self.peer_session:
            restarted = self.peer_session is not None
            actions += self._peer_session(message.session, now)
        if not self.peer_alive:
            actions += self._peer_back(now, push=not restarted)
        if isinstance(message, wire.Data):
            actions += self._receive_data(message, now)
        elif isinstance(message, wire.Ack):
            actions += self._receive_ack(message, now)
        elif isinstance(message, wire.Hello):
            actions += self._receive_hello(message, now)
        else:
            self._learn_peer_last(message.sequence)
            if isinstance(message, wire.Alive):
                self.stats["alive_in"] += 1
                actions.append(self._send(self._ack_message(), now))
            elif isinstance(message, wire.BulkRequest):
                self.stats["bulk_requests_in"] += 1
                if self.table_known:
                    actions += self._send_bulk(message.bulk_id, now)
                else:  # our first read of the kernel table is still running
                    actions.append(ReadTable(ReadPurpose.BULK, message.bulk_id))
            elif isinstance(message, wire.BulkStart) and self._answers_our_bulk(message):
                self.bulk_deadline = now + self.settings.bulk_timeout
            elif isinstance(message, wire.BulkEnd) and self._answers_our_bulk(message):
                self.bulk_end_sequence = self._rx_unwrap(message.sequence)
                actions += self._check_bulk(now)
                if self.bulk_state is BulkState.WAITING:
                    actions.append(self._send(self._ack_message(), now))
        return actions + self._flush(now)

    def advance(self, now: float) -> list[MachineAction]:
        """Timers: ACKs, ALIVE, peer loss, bulk retries, refresh."""
        actions: list[MachineAction] = []
        settings = self.settings
        if self.ack_due is not None and now >= self.ack_due:
            actions.append(self._send(self._ack_message(), now))
        if (
            self.peer_alive
            and self.last_heard is not None
            and now - self.last_heard >= settings.peer_timeout
        ):
            actions += self._peer_lost(now)
        if self.unacked and self.peer_alive and now >= self._probe_deadline():
            self.last_probe = now
            actions.append(self._send(wire.Alive(self.session, self._last_data()), now))
        if now - self.last_sent >= settings.alive_interval:
            actions.append(self._send(wire.Alive(self.session, self._last_data()), now))
        if (
            self.bulk_state is BulkState.WAITING
            and self.bulk_deadline is not None
            and now >= self.bulk_deadline
        ):
            if self.bulk_tries < settings.bulk_tries:
                actions += self._request_bulk(now)
            else:
                actions += self._bulk_finished(now, BulkState.FAILED)
        if now >= self.next_refresh:
            self.next_refresh = now + settings.refresh_interval
            action = self._read(ReadPurpose.REFRESH)
            if action is not None:
                actions.append(action)
        return actions + self._flush(now)

    def next_deadline(self) -> float:
        settings = self.settings
        deadlines = [self.last_sent + settings.alive_interval, self.next_refresh]
        if self.ack_due is not None:
            deadlines.append(self.ack_due)
        if self.peer_alive and self.last_heard is not None:
            deadlines.append(self.last_heard + settings.peer_timeout)
        if self.unacked and self.peer_alive:
            deadlines.append(self._probe_deadline())
        if self.bulk_state is BulkState.WAITING and self.bulk_deadline is not None:
            deadlines.append(self.bulk_deadline)
        if self.bulk_out is not None:
            deadlines.append(self.last_sent)  # the rest of a bulk answer: at once
        return min(deadlines)

    def _answers_our_bulk(self, message: wire.Message) -> bool:
        return (
            isinstance(message, wire.BulkStart | wire.BulkEnd)
            and self.bulk_state is BulkState.WAITING
            and message.bulk_id == self.bulk_id
        )

    def _probe_deadline(self) -> float:
        """When to send ALIVE because the oldest message is still unacknowledged."""
        oldest = next(iter(self.unacked.values())).last_sent
        return max(oldest, self.last_probe) + self.settings.ack_timeout

    def read_failed(self, purpose: ReadPurpose) -> None:
        """The daemon could not read the table; a later timer asks again."""
        self.reading.discard(purpose)

    # ----------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        return {
            "states": len(self.table),
            "syncok": self.syncok,
            "bulk": self.bulk_state.value,
            "bulk_tries": self.bulk_tries,
            "demotion": self.demotion,
            "peer": "up" if self.peer_alive else "down",
            "peer_session": f"{self.peer_session:016x}" if self.peer_session is not None else None,
            "session": f"{self.session:016x}",
            "pending": len(self.pending),
            "unacked": len(self.unacked),
        }

    # ----------------------------------------------------------------- sending

    def _last_data(self) -> int:
        return (self.tx_next - 1) & _MASK

    def _send(self, message: wire.Message, now: float) -> Send:
        self.last_sent = now
        self.stats["opackets"] += 1
        if isinstance(message, wire.Ack):
            self.ack_due = None
            self.rx_unacked = 0
            self.stats["acks_out"] += 1
            if message.missing:
                self.stats["nacks_out"] += 1
        return Send(message)

    def _read(self, purpose: ReadPurpose) -> ReadTable | None:
        if purpose in self.reading and purpose is not ReadPurpose.BULK:
            return None
        self.reading.add(purpose)
        return ReadTable(purpose)

    def _queue(self, key: Key, action: RecordAction, entry: State) -> None:
        if action is not RecordAction.DEL and entry[1] == 6 and not states.has_tcp(entry):
            self.stats["incomplete"] += 1  # a dump will bring the tcp state
            return
        previous = self.pending.get(key)
        if previous is not None and previous[0] is RecordAction.INS and action is RecordAction.UPD:
            action = RecordAction.INS
        self.pending[key] = (action, entry)

    def _flush(self, now: float) -> list[MachineAction]:
        bulk = self.bulk_out
        if bulk is None and (not self.pending or not self.peer_alive):
            return []
        actions: list[MachineAction] = []
        room = self.settings.datagram_size - wire.HEADER.size - wire.MAC_SIZE
        pending = self.pending
        chunk = BULK_CHUNK
        limit = self.settings.max_unacked
        while pending and (chunk > 0 if bulk is not None else len(self.unacked) < limit):
            records: list[tuple[Key, RecordAction, State]] = []
            used = 0
            while pending:
                key, (action, entry) = pending.popitem(last=False)
                size = 1 + len(entry)
                if records and used + size > room:
                    pending[key] = (action, entry)
                    pending.move_to_end(key, last=False)
                    break
                records.append((key, action, entry))
                used += size
            actions.append(self._send_data(records, now))
            if bulk is not None:
                chunk -= 1
                bulk = (bulk[0], bulk[1] - len(records))
                if bulk[1] <= 0:
                    break
        if bulk is not None:
            if bulk[1] <= 0 or not pending:
                self.bulk_out = None
                end = wire.BulkEnd(self.session, self._last_data(), bulk[0])
                actions.append(self._send(end, now))
            else:
                self.bulk_out = bulk
        return actions

    def _send_data(self, records: list[tuple[Key, RecordAction, State]], now: float) -> Send:
        sequence = self.tx_next
        self.tx_next += 1
        self.unacked[sequence] = _Sent(records, now)
        owner = self.owner
        table = self.table
        counts = [0, 0, 0, 0]
        delete = RecordAction.DEL
        for key, action, entry in records:
            owner[key] = sequence
            counts[action] += 1
            if action is not delete:
                tracked = table.get(key)
                if tracked is not None:
                    tracked.peer_expires = now + timeout_of(entry)
        for action in _ACTIONS:
            if counts[action]:
                self.stats[_OUT_STAT[action]] += counts[action]
        self.stats["data_out"] += 1
        return self._send(self._data_message(sequence, records), now)

    def _data_message(
        self, sequence: int, records: list[tuple[Key, RecordAction, State]]
    ) -> wire.Data:
        return wire.Data(
            self.session, sequence & _MASK, tuple([(action, entry) for _, action, entry in records])
        )

    def _resend(self, sequence: int, now: float) -> Send | None:
        sent = self.unacked.get(sequence)
        if sent is None or now - sent.last_sent < self.settings.resend_interval:
            return None
        fresh: list[tuple[Key, RecordAction, State]] = []
        for key, action, entry in sent.records:
            if self.owner.get(key) != sequence:
                continue  # sent again later, with a newer state
            if action is not RecordAction.DEL:
                tracked = self.table.get(key)
                if tracked is not None:
                    entry = tracked.state
            fresh.append((key, action, entry))
        sent.records = fresh
        sent.last_sent = now
        self.stats["resent"] += 1
        return self._send(self._data_message(sequence, fresh), now)

    def _reset_stream(self, now: float) -> list[MachineAction]:
        """The peer waits for messages we no longer have: restart numbering and push all."""
        for sent in self.unacked.values():
            for key, action, entry in sent.records:
                if self.owner.get(key) is not None:
                    self.pending.setdefault(key, (action, entry))
        self.unacked.clear()
        self.owner.clear()
        self.stats["stream_resets"] += 1
        actions: list[MachineAction] = [
            self._send(wire.Hello(self.session, self._last_data(), False), now)
        ]
        read = self._read(ReadPurpose.PUSH)
        if read is not None:
            actions.append(read)
        return actions

    # ----------------------------------------------------------------- receiving

    def _rx_unwrap(self, value: int) -> int:
        if self.rx_next is None:
            return value
        return unwrap(value, self.rx_next)

    def _learn_peer_last(self, value: int) -> None:
        if self.rx_next is None:
            self.rx_next = value + 1
            self.rx_peer_last = value
            return
        last = self._rx_unwrap(value)
        if self.rx_peer_last is None or last > self.rx_peer_last:
            self.rx_peer_last = last

    def _missing(self) -> list[tuple[int, int]]:
        if self.rx_next is None or self.rx_peer_last is None:
            return []
        ranges: list[tuple[int, int]] = []
        start = self.rx_next
        for received in sorted(self.rx_above):
            if received > start:
                ranges.append((start, received - 1))
            start = received + 1
            if len(ranges) >= wire.MAX_NACK_RANGES:
                return ranges
        if start <= self.rx_peer_last and len(ranges) < wire.MAX_NACK_RANGES:
            ranges.append((start, self.rx_peer_last))
        return ranges

    def _ack_message(self) -> wire.Ack:
        cumulative = (self.rx_next - 1) if self.rx_next is not None else 0
        missing = tuple((a & _MASK, b & _MASK) for a, b in self._missing())
        return wire.Ack(self.session, self._last_data(), cumulative & _MASK, missing)

    def _receive_data(self, message: wire.Data, now: float) -> list[MachineAction]:
        self.stats["data_in"] += 1
        if self.rx_next is None:
            self.rx_next = message.sequence
        sequence = self._rx_unwrap(message.sequence)
        if sequence < self.rx_next or sequence in self.rx_above:
            self.stats["duplicates"] += 1
            self.ack_due = now
            return []
        if sequence - self.rx_next > _RX_WINDOW:
            self.stats["sequence_jumps"] += 1
            self.rx_next = sequence
            self.rx_above.clear()
        if self.rx_peer_last is None or sequence > self.rx_peer_last:
            self.rx_peer_last = sequence
        if sequence == self.rx_next:
            self.rx_next += 1
            while self.rx_next in self.rx_above:
                self.rx_above.remove(self.rx_next)
                self.rx_next += 1
        else:
            self.rx_above.add(sequence)
            self.ack_due = now  # a gap: ask for it at once
        self.rx_unacked += 1
        if self.rx_unacked >= self.settings.ack_window:
            self.ack_due = now
        elif self.ack_due is None:
            self.ack_due = now + self.settings.ack_delay
        if self.bulk_state is BulkState.WAITING and self.bulk_deadline is not None:
            self.bulk_deadline = max(self.bulk_deadline, now + self.settings.bulk_timeout)
        changes: list[tuple[ChangeKind, State]] = []
        ignores = self.settings.filter.matcher.ignores
        table = self.table
        deleted = self.deleted
        pending = self.pending
        counts = [0, 0, 0, 0]
        filtered = stale = badstate = 0
        delete, insert = RecordAction.DEL, RecordAction.INS
        upsert, update, remove = ChangeKind.UPSERT, ChangeKind.UPDATE_OR_CREATE, ChangeKind.DELETE
        for action, entry in message.records:
            if ignores(entry):
                filtered += 1
                continue
            counts[action] += 1
            key = entry[:20] if entry[0] == 4 else entry[:44]
            tracked = table.get(key)
            if tracked is not None:
                newest = tracked.peer_sequence
            elif deleted:
                newest = deleted.get(key, -1)
            else:
                newest = -1
            if newest > sequence:
                stale += 1  # a late message: a newer one already set this entry
                continue
            if action is delete:
                table.pop(key, None)
                pending.pop(key, None)
                deleted[key] = sequence
                deleted.move_to_end(key)
                if len(deleted) > _MAX_TOMBSTONES:
                    deleted.popitem(last=False)
                changes.append((remove, entry))
                continue
            if entry[1] == 6 and not entry[-20] & 1:
                badstate += 1
                continue
            if deleted:
                deleted.pop(key, None)
            expires = now + int.from_bytes(entry[-4:], "big")
            # An entry we do not know is most likely missing from the kernel too: try
            # the create first (one netlink message instead of a failed update and a create).
            kind = upsert
            if tracked is None:
                tracked = table[key] = _Tracked(entry, expires, now)
            else:
                tracked.state = entry
                tracked.peer_expires = expires
                tracked.updated_at = now
                if action is not insert:
                    kind = update
            tracked.peer_sequence = sequence
            changes.append((kind, entry))
        stats = self.stats
        for action in _ACTIONS:
            if counts[action]:
                stats[_IN_STAT[action]] += counts[action]
        if filtered:
            stats["filtered"] += filtered
        if stale:
            stats["stale"] += stale
        if badstate:
            stats["badstate"] += badstate
        actions: list[MachineAction] = []
        if changes:
            actions.append(Apply(changes))
        actions += self._check_bulk(now)
        if self.ack_due is not None and self.ack_due <= now:
            actions.append(self._send(self._ack_message(), now))
        return actions

    def _receive_ack(self, message: wire.Ack, now: float) -> list[MachineAction]:
        self.stats["acks_in"] += 1
        self._learn_peer_last(message.sequence)
        cumulative = unwrap(message.cumulative, self.tx_next - 1)
        while self.unacked:
            sequence = next(iter(self.unacked))
            if sequence > cumulative:
                break
            sent = self.unacked.pop(sequence)
            for key, _, _ in sent.records:
                if self.owner.get(key) == sequence:
                    del self.owner[key]
        actions: list[MachineAction] = []
        oldest = next(iter(self.unacked)) if self.unacked else self.tx_next
        for first, last in message.missing:
            low = unwrap(first, self.tx_next - 1)
            high = unwrap(last, self.tx_next - 1)
            if high < low or high >= self.tx_next:
                self.stats["badval"] += 1
                continue
            self.stats["nacks_in"] += 1
            if low < oldest:
                # messages we no longer hold (acknowledged, or from before a reset)
                return actions + self._reset_stream(now)
            for sequence in range(low, high + 1):
                resent = self._resend(sequence, now)
                if resent is not None:
                    actions.append(resent)
        return actions

    def _receive_hello(self, message: wire.Hello, now: float) -> list[MachineAction]:
        self.stats["hello_in"] += 1
        self.rx_next = message.sequence + 1
        self.rx_above.clear()
        self.rx_peer_last = message.sequence
        self.rx_unacked = 0
        self.ack_due = None
        actions: list[MachineAction] = []
        if message.answer_wanted:
            actions.append(self._send(wire.Hello(self.session, self._last_data(), False), now))
        return actions

    def _peer_session(self, session: int, now: float) -> list[MachineAction]:
        restarted = self.peer_session is not None
        self.peer_session = session
        for tracked in self.table.values():  # the new incarnation numbers from scratch
            tracked.peer_sequence = -1
        self.deleted.clear()
        self.rx_next = None
        self.rx_above.clear()
        self.rx_peer_last = None
        self.ack_due = None
        self.rx_unacked = 0
        # A new incarnation asks for a bulk update, which carries every entry we have:
        # of what is queued or in flight only the deletions still matter.
        for sent in self.unacked.values():
            for key, action, entry in sent.records:
                if self.owner.get(key) is not None and action is RecordAction.DEL:
                    self.pending.setdefault(key, (action, entry))
        for key in [k for k, (action, _) in self.pending.items() if action is not RecordAction.DEL]:
            del self.pending[key]
        self.unacked.clear()
        self.owner.clear()
        if restarted:
            self.stats["peer_restarts"] += 1
            return [Emit("PEER_RESTARTED", (("session", f"{session:016x}"),))]
        return []

    def _peer_back(self, now: float, *, push: bool) -> list[MachineAction]:
        self.peer_alive = True
        session = f"{self.peer_session or 0:016x}"
        actions: list[MachineAction] = [Emit("PEER_BACK", (("session", session),))]
        if push and self.stats["peer_lost"]:
            action = self._read(ReadPurpose.PUSH)
            if action is not None:
                actions.append(action)
        return actions

    def _peer_lost(self, now: float) -> list[MachineAction]:
        self.peer_alive = False
        self.stats["peer_lost"] += 1
        for sent in self.unacked.values():
            for key, action, entry in sent.records:
                if self.owner.get(key) is not None:
                    self.pending.setdefault(key, (action, entry))
        self.unacked.clear()
        self.owner.clear()
        return [Emit("PEER_LOST", (("silent_for", round(now - (self.last_heard or now), 3)),))]

    # ----------------------------------------------------------------- bulk

    def _request_bulk(self, now: float) -> list[MachineAction]:
        self.bulk_tries += 1
        self.bulk_id = (self.bulk_id + 1) & _MASK or 1
        self.bulk_deadline = now + self.settings.bulk_timeout
        self.bulk_end_sequence = None
        self.stats["bulk_requests_out"] += 1
        actions: list[MachineAction] = []
        if self.bulk_tries == 1:
            self.bulk_started_at = now
            actions.append(Emit("BULK_START", (("try", self.bulk_tries),)))
        actions.append(
            self._send(wire.BulkRequest(self.session, self._last_data(), self.bulk_id), now)
        )
        return actions

    def _check_bulk(self, now: float) -> list[MachineAction]:
        if (
            self.bulk_state is BulkState.WAITING
            and self.bulk_end_sequence is not None
            and self.rx_next is not None
            and self.rx_next > self.bulk_end_sequence
        ):
            return self._bulk_finished(now, BulkState.DONE)
        return []

    def _bulk_finished(self, now: float, state: BulkState) -> list[MachineAction]:
        self.bulk_state = state
        self.bulk_deadline = None
        self.syncok = True  # also after the last try, as pfsync "pretends the transfer was ok"
        actions: list[MachineAction] = []
        elapsed = round(now - self.bulk_started_at, 3)
        if state is BulkState.DONE:
            self.stats["bulk_done"] += 1
            actions.append(Emit("BULK_DONE", (("seconds", elapsed), ("states", len(self.table)))))
        else:
            self.stats["bulk_failed"] += 1
            actions.append(Emit("BULK_FAILED", (("tries", self.bulk_tries), ("seconds", elapsed))))
        if self.demotion:
            self.demotion = 0
            reason = "pfsync bulk done" if state is BulkState.DONE else "pfsync bulk failed"
            actions.append(SetDemotion(0, reason))
        return actions
