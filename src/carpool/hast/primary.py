"""HAST's primary: one resource in role primary, as a pure state machine (FreeBSD ``primary.c``).

This module owns the primary's protocol state; the daemon is only its caller.
:class:`PrimaryMachine` never reads the clock or touches a disk or a socket:
each input method takes ``now`` where time matters and returns a list of
:mod:`carpool.hast.actions` for the daemon to perform in order.

Inputs: :meth:`~PrimaryMachine.request` (an NBD :class:`~carpool.hast.nbd.Request`),
local completions (``local_write_done``, ``local_read_done``, ``local_flush_done``,
``metadata_written``), the link (``peer_connected``, ``peer_message``,
``peer_disconnected``) and :meth:`~PrimaryMachine.tick`.

Rules (HAST's, with carpool's choices marked *):

* **Write path.** WRITE, TRIM and WRITE_ZEROES call
  :meth:`~carpool.hast.activemap.ActiveMap.write_start`; when it returns a bitmap
  a :class:`WriteActivemap` is emitted and the request is held back until
  ``metadata_written`` says it is on disk.  Then the local write and the send to
  the peer are issued together.  The client is answered when the local write
  is done **and**: fullsync — the peer's WRITTEN; memsync — the peer's RECEIVED
  (or WRITTEN); async — nothing more.  FUA writes and FLUSH wait for the peer's
  WRITTEN in every mode* (the peer made them durable too).  A request retires
  (``write_complete``) once both legs ended; a failed or lost peer leg marks
  the range for resync (``need_sync``).
* **Ordering.** A modifying request overlapping an earlier unfinished one (or a
  resync chunk) waits until that one retired, so overlapping writes reach
  both disks, and complete, in submission order.  A request submitted while an
  activemap/metadata write is outstanding waits for it too*.
* **Degraded.** Without the peer, writes go to the local disk only, their
  extents stay dirty, and the first one bumps ``localcnt``
  (:func:`~carpool.hast.metadata.bump_localcnt`) with a metadata write that must
  complete before the data write.  Writes whose peer leg was lost by a
  disconnect bump it too (without holding their replies).
* **Errors.** A failed local read is retried from the peer when connected
  (``read-error`` event), else EIO; a failed local write or flush answers EIO and
  emits ``write-error``/``flush-error``*.  Out-of-range or unknown requests
  (which :mod:`carpool.hast.nbd` already refuses) answer EINVAL.
* **Link.** ``ConnectPeer`` with backoff (1 s doubling to 10 s, HAST retries
  every 10 s); HELLO (+ AUTH with a pre-shared key*); the secondary's counters
  come back in its HELLO reply and the primary recomputes
  :func:`~carpool.hast.metadata.decide_sync` on them (the secondary decided the
  same; it refuses with a wire Error on split-brain).  KEEPALIVE after
  ``keepalive`` idle seconds, disconnect after ``timeout`` silent seconds.
* **Resync** (:mod:`carpool.hast.resync`): from the primary, chunks are read
  locally and sent as SYNC_DATA; from the secondary, READ from the peer then
  written locally — and while that lasts every client READ goes to the peer.
  Resync chunks take the same range lock as client writes.  When it is done,
  :func:`~carpool.hast.metadata.after_sync` sets the counters.
* **Verify*** (:meth:`~PrimaryMachine.verify`): a range is read locally and its
  digest compared with the one the secondary computes of the same range.  The
  comparison takes the range lock like a write, so the two digests describe
  the same moment on both disks; the answer is a :class:`VerifyDone`.
* **Events.** ``connect``, ``disconnect``, ``syncstart``, ``syncdone`` (only if
  bytes were copied), ``syncintr``, ``split-brain``; :class:`StatusChanged`
  ``complete`` while the peer is connected, else ``degraded``.

If the machine emits :class:`ClosePeer` it has already treated the link as
lost: the daemon closes the socket and need not call ``peer_disconnected``.
Activemap and metadata writes must be performed in the order emitted (one
after the other).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from carpool.hast import nbd, wire
from carpool.hast.actions import (
    REFUSE_SPLIT_BRAIN,
    Action,
    Buf,
    ClosePeer,
    ConnectPeer,
    Event,
    LocalFlush,
    LocalRead,
    LocalTrim,
    LocalWrite,
    LocalWriteZeroes,
    ReplyToClient,
    SendToPeer,
    StatusChanged,
    VerifyDone,
    WriteActivemap,
    WriteMetadata,
)
from carpool.hast.activemap import ActiveMap
from carpool.hast.common import DEFAULT_TIMEOUT, Checksum, Replication, ranges_overlap
from carpool.hast.metadata import (
    Metadata,
    NodeCounters,
    SyncDecision,
    SyncDirection,
    after_sync,
    bump_localcnt,
    decide_sync,
    update_block,
)
from carpool.hast.resync import DEFAULT_CHUNK, DEFAULT_WINDOW, Chunk, Resync

__all__ = ["KEEPALIVE_INTERVAL", "Link", "PrimaryMachine"]

#: Seconds of an idle link before a KEEPALIVE (HAST_KEEPALIVE).
KEEPALIVE_INTERVAL = 10.0
RECONNECT_MIN = 1.0
RECONNECT_MAX = 10.0

EIO = int(nbd.NbdError.EIO)
EINVAL = int(nbd.NbdError.EINVAL)

_MODIFYING = {
    nbd.NbdCommand.WRITE: "write",
    nbd.NbdCommand.TRIM: "trim",
    nbd.NbdCommand.WRITE_ZEROES: "zeroes",
}


class Link(enum.Enum):
    DOWN = "down"
    CONNECTING = "connecting"
    HELLO = "hello"  #: our HELLO sent, waiting for the secondary's
    AUTH = "auth"  #: waiting for the secondary's AUTH
    UP = "up"


class _Peer(enum.Enum):
    NONE = "none"  #: no peer leg (reads, or not issued yet)
    SKIPPED = "skipped"  #: issued while the peer was away
    SENT = "sent"
    RECEIVED = "received"
    WRITTEN = "written"
    FAILED = "failed"


_PEER_ENDED = (_Peer.SKIPPED, _Peer.WRITTEN, _Peer.FAILED)


@dataclass(slots=True, eq=False)
class _Op:
    id: int
    kind: str  # read, write, trim, zeroes, flush, sync
    offset: int
    length: int
    cookie: int = 0
    data: Buf | None = None
    fua: bool = False
    token: int = 0  # barrier to wait for (0: none)
    issued: bool = False
    local_busy: bool = False  # a local I/O is in progress
    local_done: bool = False
    local_ok: bool = True
    peer: _Peer = _Peer.NONE
    replied: bool = False
    from_peer: bool = False  # a READ served by the peer
    chunk: Chunk | None = None
    orphan: bool = False  # a sync chunk whose resync was interrupted
    algorithm: Checksum = Checksum.SHA256  # verify: the digest compared
    local_digest: bytes | None = None  # verify: ours, once read
    peer_digest: bytes | None = None  # verify: the secondary's, once answered

    @property
    def modifying(self) -> bool:
        return self.kind in ("write", "trim", "zeroes")

    @property
    def locks(self) -> bool:
        return self.kind in ("write", "trim", "zeroes", "sync", "verify")

    def overlaps(self, other: _Op) -> bool:
        return ranges_overlap(self.offset, self.length, other.offset, other.length)


class PrimaryMachine:
    """The primary side of one HAST resource."""

    def __init__(
        self,
        resource: str,
        metadata: Metadata,
        bitmap: bytes | None = None,
        *,
        now: float,
        replication: Replication = Replication.MEMSYNC,
        timeout: float = DEFAULT_TIMEOUT,
        keepalive: float = KEEPALIVE_INTERVAL,
        virgin: bool = False,
        key: bytes | None = None,
        sync_chunk: int = DEFAULT_CHUNK,
        sync_window: int = DEFAULT_WINDOW,
        sync_rate: int | None = None,
        mapsize: int | None = None,
    ) -> None:
        self.resource = resource
        self.replication = replication
        self.timeout = timeout
        self.keepalive = keepalive
        self.key = key
        self.sync_chunk = sync_chunk
        self.sync_window = sync_window
        self.sync_rate = sync_rate
        self.virgin = virgin
        self._md = metadata
        self.activemap = ActiveMap(
            metadata.datasize, metadata.extentsize, metadata.keepdirty, mapsize
        )
        if bitmap:
            self.activemap.copyin(bitmap)
        #: What we know of the peer's counters (HAST's hr_secondary_*).
        self.peer_counters = NodeCounters(metadata.resuid, metadata.remotecnt, metadata.localcnt)
        self.link = Link.DOWN
        self._next_connect = now
        self._backoff = RECONNECT_MIN
        self._last_rx = now
        self._last_tx = now
        self._nonce = b""
        self._peer_hello: wire.Hello | None = None
        self._sent_counters = NodeCounters(0, 0, 0)
        self._sent_virgin = False
        self._decision: SyncDecision | None = None
        self.resync: Resync | None = None
        self._ops: dict[int, _Op] = {}
        self._mods: list[_Op] = []  # unretired range-locking ops, submission order
        self._next_id = 1
        self._next_token = 1
        self._barriers: set[int] = set()
        #: Statistics for ``hastctl list`` and metrics.
        self.sync_bytes_sent = 0
        self.stats: dict[str, int] = {
            "reads": 0, "writes": 0, "deletes": 0, "flushes": 0, "activemap_updates": 0,
            "local_read_errors": 0, "local_write_errors": 0, "local_flush_errors": 0,
            "remote_errors": 0, "bad_peer_messages": 0,
        }  # fmt: skip

    # ------------------------------------------------------------------ queries

    @property
    def metadata(self) -> Metadata:
        """The metadata as last planned (written or being written)."""
        return self._md

    @property
    def status(self) -> str:
        return "complete" if self.link is Link.UP else "degraded"

    @property
    def connected(self) -> bool:
        return self.link is Link.UP

    @property
    def in_flight(self) -> int:
        return len(self._ops)

    @property
    def dirty_bytes(self) -> int:
        return self.activemap.dirty_bytes

    # ------------------------------------------------------------------ helpers

    def _new_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def _token(self) -> int:
        t = self._next_token
        self._next_token += 1
        return t

    def _write_map(self, out: list[Action], bitmap: bytes, *, barrier: bool) -> int:
        token = self._token()
        self.stats["activemap_updates"] += 1
        out.append(WriteActivemap(token, bitmap))
        if barrier:
            self._barriers.add(token)
        return token

    def _write_md(self, out: list[Action], md: Metadata, *, barrier: bool) -> int:
        offset, written, data = update_block(md)
        self._md = written
        token = self._token()
        out.append(WriteMetadata(token, offset, data, written))
        if barrier:
            self._barriers.add(token)
        return token

    def _ready(self, op: _Op) -> bool:
        return not op.token or not any(t <= op.token for t in self._barriers)

    def _send(self, out: list[Action], msg: wire.Message, now: float | None = None) -> None:
        out.append(SendToPeer(msg))
        if now is not None:
            self._last_tx = now

    # ------------------------------------------------------------------ start / tick

    def start(self, now: float) -> list[Action]:
        """The first actions: the status, and a first connection attempt."""
        out: list[Action] = [StatusChanged("degraded")]
        out += self.tick(now)
        return out

    def tick(self, now: float) -> list[Action]:
        """Timers: reconnect, keepalive, link timeout, rate-limited resync."""
        out: list[Action] = []
        if self.link is Link.DOWN:
            if now >= self._next_connect:
                self.link = Link.CONNECTING
                self._last_rx = now
                out.append(ConnectPeer())
        elif now - self._last_rx > self.timeout:
            self._close(now, out, f"no message from the peer for {self.timeout:g} s")
        elif self.link is Link.UP and now - self._last_tx >= self.keepalive:
            self._send(out, wire.Keepalive(), now)
        self._pump_sync(now, out)
        return out

    def wake_at(self) -> float | None:
        """The next time :meth:`tick` has something to do (a hint for the daemon's timer)."""
        times: list[float] = []
        if self.link is Link.DOWN:
            times.append(self._next_connect)
        else:
            times.append(self._last_rx + self.timeout)
            if self.link is Link.UP:
                times.append(self._last_tx + self.keepalive)
        if self.resync is not None:
            w = self.resync.wake_at()
            if w is not None:
                times.append(w)
        return min(times) if times else None

    # ------------------------------------------------------------------ client requests

    def request(self, now: float, req: nbd.Request) -> list[Action]:
        """An NBD request from the client."""
        out: list[Action] = []
        cmd = req.command
        datasize = self._md.datasize
        if cmd == nbd.NbdCommand.FLUSH:
            self.stats["flushes"] += 1
            op = _Op(self._new_id(), "flush", 0, 0, cookie=req.cookie)
            self._ops[op.id] = op
            op.issued = op.local_busy = True
            out.append(LocalFlush(op.id))
            if self.link is Link.UP:
                op.peer = _Peer.SENT
                self._send(out, wire.Flush(op.id), now)
            else:
                op.peer = _Peer.SKIPPED
            return out
        if (
            cmd not in (nbd.NbdCommand.READ, *_MODIFYING)
            or req.length <= 0
            or req.offset < 0
            or req.offset + req.length > datasize
            or (cmd == nbd.NbdCommand.WRITE and (req.data is None or len(req.data) != req.length))
        ):
            return [ReplyToClient(req.cookie, EINVAL)]
        if cmd == nbd.NbdCommand.READ:
            self.stats["reads"] += 1
            op = _Op(self._new_id(), "read", req.offset, req.length, cookie=req.cookie)
            self._ops[op.id] = op
            op.issued = True
            if self.link is Link.UP and self.resync is not None and self.resync.from_secondary:
                op.from_peer = True
                self._send(out, wire.Read(op.id, op.offset, op.length), now)
            else:
                op.local_busy = True
                out.append(LocalRead(op.id, op.offset, op.length))
            return out
        kind = _MODIFYING[cmd]
        self.stats["deletes" if kind == "trim" else "writes"] += 1
        op = _Op(
            self._new_id(), kind, req.offset, req.length, cookie=req.cookie,
            data=req.data if kind == "write" else None, fua=req.fua,
        )  # fmt: skip
        bitmap = self.activemap.write_start(op.offset, op.length)
        if bitmap is not None:
            self._write_map(out, bitmap, barrier=True)
        if self._barriers:
            op.token = max(self._barriers)
        self._ops[op.id] = op
        self._mods.append(op)
        self._pump(now, out)
        return out

    def verify(
        self, now: float, offset: int, length: int, algorithm: Checksum = Checksum.SHA256
    ) -> tuple[int, list[Action]]:
        """Compare ``length`` bytes at ``offset`` on both disks; answered by a VerifyDone."""
        out: list[Action] = []
        id = self._new_id()
        if self.link is not Link.UP:
            out.append(VerifyDone(id, offset, length, None, "the secondary is not connected"))
            return id, out
        if length <= 0 or offset < 0 or offset + length > self._md.datasize:
            out.append(VerifyDone(id, offset, length, None, "the range is outside the resource"))
            return id, out
        if algorithm is Checksum.NONE:
            algorithm = Checksum.SHA256
        op = _Op(id, "verify", offset, length, algorithm=algorithm)
        if self._barriers:
            op.token = max(self._barriers)
        self._ops[op.id] = op
        self._mods.append(op)
        self._pump(now, out)
        return id, out

    def _verify_check(self, op: _Op, out: list[Action], error: str = "") -> None:
        if error:
            self._retire(op, out)
            out.append(VerifyDone(op.id, op.offset, op.length, None, error))
        elif op.local_done and op.peer_digest is not None:
            self._retire(op, out)
            out.append(VerifyDone(op.id, op.offset, op.length, op.local_digest == op.peer_digest))

    # ------------------------------------------------------------------ issuing

    def _pump(self, now: float, out: list[Action]) -> None:
        """Issue every queued range-locking op that is ready and not behind an overlap."""
        earlier: list[_Op] = []
        for op in self._mods:
            if not op.issued and self._ready(op) and not any(op.overlaps(e) for e in earlier):
                self._issue(now, op, out)
            earlier.append(op)

    def _issue(self, now: float, op: _Op, out: list[Action]) -> None:
        if op.kind == "sync":
            self._issue_sync(now, op, out)
            return
        if op.kind == "verify":
            op.issued = True
            if self.link is not Link.UP:
                self._verify_check(op, out, "the secondary went away")
                return
            op.local_busy = True
            op.peer = _Peer.SENT
            out.append(LocalRead(op.id, op.offset, op.length))
            self._send(out, wire.Verify(op.id, op.offset, op.length, op.algorithm), now)
            return
        if self.link is not Link.UP:
            new_md = bump_localcnt(self._md, self.peer_counters.remotecnt)
            bitmap = self.activemap.need_sync(op.offset, op.length)
            if new_md is not None or bitmap is not None:
                if bitmap is not None:
                    op.token = self._write_map(out, bitmap, barrier=True)
                if new_md is not None:
                    op.token = self._write_md(out, new_md, barrier=True)
                return  # issued once the barrier is written
            op.peer = _Peer.SKIPPED
        self.virgin = False
        op.issued = op.local_busy = True
        if op.kind == "write":
            assert op.data is not None
            out.append(LocalWrite(op.id, op.offset, op.data, op.fua))
        elif op.kind == "trim":
            out.append(LocalTrim(op.id, op.offset, op.length, op.fua))
        else:
            out.append(LocalWriteZeroes(op.id, op.offset, op.length, op.fua))
        if self.link is Link.UP:
            op.peer = _Peer.SENT
            msg: wire.Message
            if op.kind == "write":
                assert op.data is not None
                flags = 0
                if self.replication is Replication.MEMSYNC:
                    flags |= wire.WriteFlag.MEMSYNC
                if op.fua:
                    flags |= wire.WriteFlag.FUA
                msg = wire.Write(op.id, op.offset, op.data, flags)
            elif op.kind == "trim":
                msg = wire.Trim(op.id, op.offset, op.length)
            else:
                msg = wire.WriteZeroes(op.id, op.offset, op.length)
            self._send(out, msg, now)

    def _issue_sync(self, now: float, op: _Op, out: list[Action]) -> None:
        op.issued = True
        if self.resync is None or self.resync.interrupted or self.link is not Link.UP:
            self._retire(op, out)
            return
        if self.resync.from_secondary:
            op.peer = _Peer.SENT
            self._send(out, wire.Read(op.id, op.offset, op.length), now)
        else:
            op.local_busy = True
            out.append(LocalRead(op.id, op.offset, op.length))

    # ------------------------------------------------------------------ completion

    def _needs_peer(self, op: _Op) -> bool:
        """Whether the client reply still waits for the peer."""
        if op.peer in _PEER_ENDED or op.peer is _Peer.NONE:
            return False
        if op.kind == "flush" or op.fua or self.replication is Replication.FULLSYNC:
            return op.peer is not _Peer.WRITTEN
        if self.replication is Replication.MEMSYNC:
            return op.peer is _Peer.SENT
        return False

    def _check(self, op: _Op, out: list[Action]) -> None:
        """Reply and retire ``op`` when its rules are met."""
        if op.kind in ("read", "sync"):
            return
        if not op.replied and op.local_done:
            if not op.local_ok:
                op.replied = True
                out.append(ReplyToClient(op.cookie, EIO))
            elif not self._needs_peer(op):
                op.replied = True
                out.append(ReplyToClient(op.cookie, 0))
        if op.local_done and op.peer in (*_PEER_ENDED, _Peer.NONE) and op.issued:
            self._retire(op, out)

    def _retire(self, op: _Op, out: list[Action]) -> None:
        if self._ops.pop(op.id, None) is None:
            return
        if op.locks:
            self._mods.remove(op)
        if op.modifying:
            bitmap = self.activemap.write_complete(op.offset, op.length)
            if bitmap is not None:
                self._write_map(out, bitmap, barrier=False)

    def _peer_failed(self, op: _Op, out: list[Action]) -> None:
        op.peer = _Peer.FAILED
        if op.modifying:
            bitmap = self.activemap.need_sync(op.offset, op.length)
            if bitmap is not None:
                self._write_map(out, bitmap, barrier=False)

    def local_write_done(self, id: int, ok: bool, now: float = 0.0) -> list[Action]:
        """A LocalWrite/LocalTrim/LocalWriteZeroes finished."""
        out: list[Action] = []
        op = self._ops.get(id)
        if op is None or not op.local_busy:
            return out
        op.local_busy = False
        if op.kind == "sync":
            self._sync_stage_done(now, op, ok, out)
        else:
            op.local_done, op.local_ok = True, ok
            if not ok:
                self.stats["local_write_errors"] += 1
                out.append(Event("write-error", {"offset": op.offset, "length": op.length}))
            self._check(op, out)
        self._pump(now, out)
        self._pump_sync(now, out)
        return out

    def local_flush_done(self, id: int, ok: bool, now: float = 0.0) -> list[Action]:
        out: list[Action] = []
        op = self._ops.get(id)
        if op is None or op.kind != "flush" or not op.local_busy:
            return out
        op.local_busy = False
        op.local_done, op.local_ok = True, ok
        if not ok:
            self.stats["local_flush_errors"] += 1
            out.append(Event("flush-error"))
        self._check(op, out)
        return out

    def local_read_done(self, id: int, data: Buf | None, now: float = 0.0) -> list[Action]:
        """A LocalRead finished: ``data`` or None on an error (or a short read)."""
        out: list[Action] = []
        op = self._ops.get(id)
        if op is None or not op.local_busy:
            return out
        op.local_busy = False
        ok = data is not None and len(data) == op.length
        if op.kind == "sync":
            if ok:
                assert data is not None
                op.data = data
            self._sync_stage_done(now, op, ok, out)
            self._pump(now, out)
            self._pump_sync(now, out)
            return out
        if op.kind == "verify":
            op.local_done = True
            if ok:
                assert data is not None
                op.local_digest = wire.digest(op.algorithm, data)
                self._verify_check(op, out)
            else:
                self.stats["local_read_errors"] += 1
                self._verify_check(op, out, "a local read error")
            self._pump(now, out)
            self._pump_sync(now, out)
            return out
        if ok:
            self._ops.pop(op.id)
            out.append(ReplyToClient(op.cookie, 0, data))
            return out
        self.stats["local_read_errors"] += 1
        out.append(Event("read-error", {"offset": op.offset, "length": op.length}))
        if self.link is Link.UP:
            op.from_peer = True
            self._send(out, wire.Read(op.id, op.offset, op.length), now)
        else:
            self._ops.pop(op.id)
            out.append(ReplyToClient(op.cookie, EIO))
        return out

    def metadata_written(self, token: int, ok: bool = True, now: float = 0.0) -> list[Action]:
        """A WriteActivemap/WriteMetadata is on disk (``ok`` False: it failed)."""
        out: list[Action] = []
        if token not in self._barriers:
            return out
        self._barriers.discard(token)
        if not ok:
            out.append(Event("metadata-error", {"token": token}))
            for op in [o for o in self._mods if not o.issued and o.token and o.token <= token]:
                if op.kind == "sync":
                    continue
                op.issued = op.local_done = True
                op.local_ok = False
                op.peer = _Peer.FAILED
                self._check(op, out)
        self._pump(now, out)
        self._pump_sync(now, out)
        return out

    # ------------------------------------------------------------------ the link

    def peer_connected(self, now: float, nonce: bytes) -> list[Action]:
        """The replication connection is open: send our HELLO (``nonce``: 16 random bytes)."""
        out: list[Action] = []
        if self.link is Link.UP:
            return out
        self.link = Link.HELLO
        self._nonce = nonce
        self._last_rx = now
        md = self._md
        self._sent_counters = NodeCounters(md.resuid, md.localcnt, md.remotecnt)
        self._sent_virgin = self.virgin
        flags = (wire.HelloFlag.VIRGIN if self.virgin else 0) | (
            wire.HelloFlag.AUTH if self.key else 0
        )
        hello = wire.Hello(
            self.resource, md.resuid, md.localcnt, md.remotecnt, md.datasize, md.extentsize,
            nonce, flags,
        )  # fmt: skip
        self._send(out, hello, now)
        return out

    def peer_disconnected(self, now: float, reason: str = "connection lost") -> list[Action]:
        """The link failed (or a connection attempt did)."""
        out: list[Action] = []
        if self.link is not Link.DOWN:
            self._lost(now, reason, out)
        return out

    def _close(self, now: float, out: list[Action], reason: str) -> None:
        out.append(ClosePeer(reason))
        self._lost(now, reason, out)

    def _lost(self, now: float, reason: str, out: list[Action]) -> None:
        was_up = self.link is Link.UP
        self.link = Link.DOWN
        self._next_connect = now + self._backoff
        self._backoff = min(self._backoff * 2, RECONNECT_MAX)
        if was_up:
            out.append(StatusChanged("degraded"))
            out.append(Event("disconnect", {"reason": reason}))
        if self.resync is not None:
            if not self.resync.finished:
                out.append(
                    Event("syncintr", {"done": self.resync.done_bytes,
                                       "left": self.activemap.sync_bytes})
                )  # fmt: skip
            self.resync.interrupt()
            self.resync = None
        lost_write = False
        for op in list(self._ops.values()):
            if op.kind == "sync":
                if op.local_busy:
                    op.orphan = True
                else:
                    self._retire(op, out)
                continue
            if op.kind == "read":
                if op.from_peer:
                    self._ops.pop(op.id)
                    out.append(ReplyToClient(op.cookie, EIO))
                continue
            if op.kind == "verify":
                if op.issued:
                    self._verify_check(op, out, f"the secondary went away ({reason})")
                continue
            if op.peer in (_Peer.SENT, _Peer.RECEIVED):
                self._peer_failed(op, out)
                lost_write = lost_write or op.modifying
            self._check(op, out)
        if lost_write:
            new_md = bump_localcnt(self._md, self.peer_counters.remotecnt)
            if new_md is not None:
                self._write_md(out, new_md, barrier=False)
        self._pump(now, out)

    def peer_message(self, now: float, msg: wire.Message) -> list[Action]:
        """A message decoded from the secondary."""
        out: list[Action] = []
        if self.link in (Link.DOWN, Link.CONNECTING):
            return out
        self._last_rx = now
        verifying = self._ops.get(msg.seq) if isinstance(msg, wire.Error | wire.Verify) else None
        if verifying is not None and verifying.kind == "verify" and self.link is Link.UP:
            self._verify_reply(now, verifying, msg, out)
        elif isinstance(msg, wire.Error):
            if msg.code == REFUSE_SPLIT_BRAIN:
                out.append(Event("split-brain", {"message": msg.message}))
            self._close(now, out, f"the peer refused: {msg.message}")
        elif self.link is Link.HELLO:
            if isinstance(msg, wire.Hello) and msg.flags & wire.HelloFlag.REPLY:
                self._hello_reply(now, msg, out)
            else:
                self._violation(now, out, "expected the secondary's HELLO")
        elif self.link is Link.AUTH:
            if isinstance(msg, wire.Auth):
                assert self.key is not None and self._peer_hello is not None
                if not wire.verify_auth(
                    self.key, self.resource, self._nonce, self._peer_hello.nonce, msg
                ):
                    self._close(now, out, "the peer failed authentication (wrong key?)")
                    return out
                mac = wire.auth_mac(self.key, self.resource, self._nonce, self._peer_hello.nonce)
                self._send(out, wire.Auth(mac), now)
                self._established(now, out)
            else:
                self._violation(now, out, "expected the secondary's AUTH")
        elif isinstance(msg, wire.WriteAck):
            self._write_ack(now, msg, out)
        elif isinstance(msg, wire.ReadReply):
            self._read_reply(now, msg, out)
        elif isinstance(msg, wire.Keepalive):
            pass
        else:
            self._violation(now, out, f"unexpected {type(msg).__name__} from the secondary")
        return out

    def _verify_reply(self, now: float, op: _Op, msg: wire.Message, out: list[Action]) -> None:
        if isinstance(msg, wire.Error):
            self._verify_check(op, out, f"the secondary could not read it: {msg.message}")
        elif (
            not isinstance(msg, wire.Verify) or not msg.reply or op.peer_digest is not None
            or (msg.offset, msg.length, msg.algorithm) != (op.offset, op.length, op.algorithm)
        ):  # fmt: skip
            self._violation(now, out, "a VERIFY reply that matches no request")
            return
        else:
            op.peer_digest = msg.digest
            self._verify_check(op, out)
        self._pump(now, out)
        self._pump_sync(now, out)

    def _violation(self, now: float, out: list[Action], reason: str) -> None:
        self.stats["bad_peer_messages"] += 1
        self._close(now, out, reason)

    def _hello_reply(self, now: float, h: wire.Hello, out: list[Action]) -> None:
        md = self._md
        if h.resource != self.resource:
            self._violation(now, out, f"the peer serves resource {h.resource!r}")
            return
        if h.datasize != md.datasize or h.extentsize != md.extentsize:
            self._close(
                now, out,
                f"the peer's provider differs (datasize {h.datasize}, extentsize"
                f" {h.extentsize}; ours {md.datasize}, {md.extentsize})",
            )  # fmt: skip
            return
        decision = decide_sync(
            NodeCounters(h.resuid, h.localcnt, h.remotecnt),
            self._sent_counters,
            primary_virgin=self._sent_virgin,
        )
        if decision.direction.refused:
            if decision.direction is SyncDirection.SPLIT_BRAIN:
                out.append(Event("split-brain", {"message": decision.reason}))
            self._close(now, out, decision.reason)
            return
        if bool(self.key) != bool(h.flags & wire.HelloFlag.AUTH):
            self._close(now, out, "the nodes disagree on the pre-shared key (set it on both)")
            return
        self._peer_hello = h
        self._decision = decision
        if self.key:
            self.link = Link.AUTH
        else:
            self._established(now, out)

    def _established(self, now: float, out: list[Action]) -> None:
        h, decision = self._peer_hello, self._decision
        assert h is not None and decision is not None
        self.link = Link.UP
        self._backoff = RECONNECT_MIN
        self.peer_counters = NodeCounters(self._md.resuid, h.localcnt, h.remotecnt)
        out.append(StatusChanged("complete"))
        out.append(Event("connect"))
        am = self.activemap
        direction = decision.direction
        bitmap: bytes | None = None
        try:
            if direction.full:
                bitmap = am.sync_all()
            elif direction is not SyncDirection.NONE and h.bitmap:
                bitmap = am.merge(h.bitmap)
        except ValueError as exc:
            self._violation(now, out, f"bad bitmap from the peer: {exc}")
            return
        if bitmap is not None:
            self._write_map(out, bitmap, barrier=True)
        if direction is SyncDirection.NONE:
            direction = SyncDirection.PRIMARY_TO_SECONDARY_DIRTY
        self.resync = Resync(
            am, direction, chunk_size=self.sync_chunk, window=self.sync_window,
            rate=self.sync_rate, now=now,
        )  # fmt: skip
        if self.resync.total_bytes:
            out.append(
                Event("syncstart", {"bytes": self.resync.total_bytes,
                                    "source": "secondary" if direction.from_secondary
                                    else "primary"})
            )  # fmt: skip
        self._pump_sync(now, out)

    def _write_ack(self, now: float, ack: wire.WriteAck, out: list[Action]) -> None:
        op = self._ops.get(ack.seq)
        if op is None or op.peer not in (_Peer.SENT, _Peer.RECEIVED):
            self.stats["bad_peer_messages"] += 1
            return
        if op.kind == "sync":
            if self.resync is None or self.resync.from_secondary:
                self.stats["bad_peer_messages"] += 1
                return
            if ack.error or not ack.flags & wire.AckFlag.WRITTEN:
                if ack.error:
                    self._sync_failed(now, op, out, f"the peer failed a resync write ({ack.error})")
                return
            op.peer = _Peer.WRITTEN
            self._chunk_done(now, op, out)
            return
        if ack.error:
            self.stats["remote_errors"] += 1
            self._peer_failed(op, out)
        elif ack.flags & wire.AckFlag.WRITTEN:
            op.peer = _Peer.WRITTEN
        elif ack.flags & wire.AckFlag.RECEIVED:
            op.peer = _Peer.RECEIVED
        self._check(op, out)
        self._pump(now, out)
        self._pump_sync(now, out)

    def _read_reply(self, now: float, rep: wire.ReadReply, out: list[Action]) -> None:
        op = self._ops.get(rep.seq)
        if op is None or (op.peer is not _Peer.SENT and not op.from_peer):
            self.stats["bad_peer_messages"] += 1
            return
        ok = not rep.error and len(rep.data) == op.length
        if op.kind == "sync":
            if self.resync is None or not self.resync.from_secondary:
                self.stats["bad_peer_messages"] += 1
                return
            if not ok:
                self._sync_failed(now, op, out, "the peer failed a resync read")
                return
            op.peer = _Peer.WRITTEN
            op.local_busy = True
            out.append(LocalWrite(op.id, op.offset, rep.data))
            return
        if op.kind != "read":
            self.stats["bad_peer_messages"] += 1
            return
        self._ops.pop(op.id)
        out.append(ReplyToClient(op.cookie, 0, rep.data) if ok else ReplyToClient(op.cookie, EIO))

    # ------------------------------------------------------------------ resync

    def _pump_sync(self, now: float, out: list[Action]) -> None:
        rs = self.resync
        if rs is None or self.link is not Link.UP:
            return
        while True:
            chunk = rs.next_chunk(now)
            if chunk is None:
                break
            op = _Op(self._new_id(), "sync", chunk.offset, chunk.length, chunk=chunk)
            if self._barriers:
                op.token = max(self._barriers)
            self._ops[op.id] = op
            self._mods.append(op)
            self._pump(now, out)
        if rs.finished:
            self._sync_finished(out)

    def _sync_stage_done(self, now: float, op: _Op, ok: bool, out: list[Action]) -> None:
        if op.orphan or self.resync is None:
            self._retire(op, out)
            return
        if not ok:
            self._sync_failed(now, op, out, "a local I/O error stopped the resync")
            return
        if self.resync.from_secondary:  # the fetched chunk is written locally
            self._chunk_done(now, op, out)
            return
        assert op.data is not None
        op.peer = _Peer.SENT
        self.sync_bytes_sent += op.length
        self._send(out, wire.SyncData(op.id, op.offset, op.data), now)

    def _chunk_done(self, now: float, op: _Op, out: list[Action]) -> None:
        rs = self.resync
        self._retire(op, out)
        if rs is None or op.chunk is None:
            return
        if rs.from_secondary:
            self.sync_bytes_sent += op.length
        bitmap = rs.chunk_done(op.chunk)
        if bitmap is not None:
            self._write_map(out, bitmap, barrier=False)
        self._pump(now, out)
        self._pump_sync(now, out)

    def _sync_failed(self, now: float, op: _Op, out: list[Action], reason: str) -> None:
        self._retire(op, out)
        if self.resync is not None:
            out.append(Event("syncintr", {"reason": reason, "done": self.resync.done_bytes}))
            self.resync.interrupt()
            self.resync = None
            for other in list(self._ops.values()):
                if other.kind == "sync":
                    if other.local_busy:
                        other.orphan = True
                    else:
                        self._retire(other, out)
        self._pump(now, out)

    def _sync_finished(self, out: list[Action]) -> None:
        rs, h = self.resync, self._peer_hello
        assert rs is not None and h is not None
        self.resync = None
        if rs.done_bytes:
            out.append(Event("syncdone", {"bytes": rs.done_bytes}))
        new_md = after_sync(self._md, NodeCounters(self._md.resuid, h.localcnt, h.remotecnt))
        if (new_md.localcnt, new_md.remotecnt) != (self._md.localcnt, self._md.remotecnt):
            self._write_md(out, new_md, barrier=False)
