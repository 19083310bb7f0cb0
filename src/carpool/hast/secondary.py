"""HAST's secondary: one resource in role secondary, a pure state machine (``secondary.c``).

This module owns the secondary's protocol state; the daemon is only its caller.
:class:`SecondaryMachine` serves one connection from the primary at a time
(``peer_connected`` starts a new one) and returns :mod:`carpool.hast.actions`.

* **Handshake.** The first message must be the primary's HELLO.  Resource,
  datasize and extentsize must match (else a wire :class:`~carpool.hast.wire.Error`
  with ``REFUSE_RESOURCE``/``REFUSE_GEOMETRY``).  With a pre-shared key both
  sides must have one (``REFUSE_AUTH``).  The secondary decides with
  :func:`~carpool.hast.metadata.decide_sync` (HAST: "only the secondary
  decides"): split-brain → ``REFUSE_SPLIT_BRAIN`` + the ``split-brain`` event;
  resuid mismatch → ``REFUSE_RESUID``.  Otherwise it answers with its own
  HELLO (flag REPLY) carrying its counters **as they were before this
  handshake** (so the primary can recompute the same decision) and its
  on-disk activemap; with a key, its AUTH follows and the primary's AUTH must
  come back before any request.  A fresh secondary (resuid 0) then adopts the
  primary's resuid (a metadata write); ``connect`` is emitted.
* **Requests before a completed handshake are refused** (Error ``REFUSE_PROTOCOL``,
  then the connection is closed) and never reach the disk.
* **Writes** (WRITE, SYNC_DATA, TRIM, WRITE_ZEROES) are validated (non-empty,
  inside the data, at most ``max_data`` bytes) — a bad one gets a WRITE_ACK with
  EINVAL.  A WRITE flagged MEMSYNC is acknowledged RECEIVED at once; every
  write is acknowledged WRITTEN after the local write (EIO if it failed).
  WRITE's FUA flag is passed to the local write; TRIM and WRITE_ZEROES are always
  issued with FUA (the wire carries no flag for them).  As in HAST the first
  request zeroes the on-disk activemap (the map of when this node was primary
  was handed over in the HELLO reply).
* **Ordering.** Overlapping writes reach the disk in arrival order (a write
  waits for earlier overlapping ones); a FLUSH waits for every earlier write,
  so it covers what the primary already saw acknowledged; a READ or VERIFY waits
  for earlier overlapping writes.
* **KEEPALIVE** is echoed (carpool's choice), so the primary's ``timeout`` also
  detects a dead link while idle.
* **VERIFY** (carpool's online verify): the range is read and its digest
  returned in a VERIFY reply.
* Counters: a secondary keeps ``localcnt``/``remotecnt`` as they are (HAST never
  rewrites them while secondary); only the resuid is adopted.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from carpool.hast import wire
from carpool.hast.actions import (
    REFUSE_AUTH,
    REFUSE_GEOMETRY,
    REFUSE_PROTOCOL,
    REFUSE_RESOURCE,
    REFUSE_RESUID,
    REFUSE_SPLIT_BRAIN,
    Action,
    Buf,
    ClosePeer,
    Event,
    LocalFlush,
    LocalRead,
    LocalTrim,
    LocalWrite,
    LocalWriteZeroes,
    SendToPeer,
    WriteActivemap,
    WriteMetadata,
)
from carpool.hast.common import DEFAULT_TIMEOUT, Checksum, ranges_overlap
from carpool.hast.metadata import Metadata, NodeCounters, SyncDirection, decide_sync, update_block

__all__ = ["SecondaryMachine", "SecondaryState"]

EIO = 5
EINVAL = 22


def _ack(seq: int, ok: bool) -> wire.WriteAck:
    return wire.WriteAck(seq, wire.AckFlag.WRITTEN) if ok else wire.WriteAck(seq, 0, EIO)


class SecondaryState(enum.Enum):
    IDLE = "idle"  #: no primary connected
    HELLO = "hello"  #: waiting for the primary's HELLO
    AUTH = "auth"  #: waiting for the primary's AUTH
    UP = "up"


@dataclass(slots=True, eq=False)
class _SOp:
    id: int
    kind: str  # write, trim, zeroes, flush, read, verify
    seq: int
    offset: int = 0
    length: int = 0
    data: Buf | None = None
    fua: bool = False
    algorithm: Checksum = Checksum.NONE
    issued: bool = False

    @property
    def modifying(self) -> bool:
        return self.kind in ("write", "trim", "zeroes")

    def overlaps(self, other: _SOp) -> bool:
        return ranges_overlap(self.offset, self.length, other.offset, other.length)


class SecondaryMachine:
    """The secondary side of one HAST resource."""

    def __init__(
        self,
        resource: str,
        metadata: Metadata,
        bitmap: bytes | None = None,
        *,
        now: float,
        key: bytes | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_data: int = wire.MAX_DATA,
    ) -> None:
        self.resource = resource
        self._md = metadata
        self.key = key
        self.timeout = timeout
        self.max_data = max_data
        self._bitmap = bytes(bitmap or b"")
        self._map_clear = not any(self._bitmap)
        self.state = SecondaryState.IDLE
        self._nonce = b""
        self._peer_hello: wire.Hello | None = None
        self._adopt = False
        self._last_rx = now
        self._ops: dict[int, _SOp] = {}
        self._queue: list[_SOp] = []  # unfinished ops, arrival order
        self._next_id = 1
        self._next_token = 1
        self.decision: SyncDirection | None = None
        self.stats: dict[str, int] = {
            "reads": 0, "writes": 0, "deletes": 0, "flushes": 0, "verifies": 0,
            "local_errors": 0, "refused": 0,
        }  # fmt: skip

    @property
    def metadata(self) -> Metadata:
        return self._md

    @property
    def in_flight(self) -> int:
        return len(self._ops)

    # ------------------------------------------------------------------ link

    def peer_connected(self, now: float, nonce: bytes) -> list[Action]:
        """A primary connected (``nonce``: 16 random bytes for this connection)."""
        self.state = SecondaryState.HELLO
        self._nonce = nonce
        self._last_rx = now
        self._peer_hello = None
        return []

    def peer_disconnected(self, now: float, reason: str = "connection lost") -> list[Action]:
        out: list[Action] = []
        if self.state is SecondaryState.UP:
            out.append(Event("disconnect", {"reason": reason}))
        self.state = SecondaryState.IDLE
        return out

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        if self.state is not SecondaryState.IDLE and now - self._last_rx > self.timeout:
            self._close(out, f"no message from the primary for {self.timeout:g} s")
        return out

    def _close(self, out: list[Action], reason: str) -> None:
        out.append(ClosePeer(reason))
        out += self.peer_disconnected(0.0, reason)

    def _refuse(self, out: list[Action], code: int, reason: str, seq: int = 0) -> None:
        self.stats["refused"] += 1
        out.append(SendToPeer(wire.Error(code, reason, seq)))
        self._close(out, reason)

    # ------------------------------------------------------------------ messages

    def peer_message(self, now: float, msg: wire.Message) -> list[Action]:
        out: list[Action] = []
        if self.state is SecondaryState.IDLE:
            return out
        self._last_rx = now
        if self.state is SecondaryState.HELLO:
            if isinstance(msg, wire.Hello) and not msg.flags & wire.HelloFlag.REPLY:
                self._hello(msg, out)
            else:
                self._refuse(out, REFUSE_PROTOCOL, "the primary must start with HELLO")
            return out
        if self.state is SecondaryState.AUTH:
            if not isinstance(msg, wire.Auth):
                self._refuse(out, REFUSE_PROTOCOL, "requests before authentication")
                return out
            assert self.key is not None and self._peer_hello is not None
            if not wire.verify_auth(self.key, self.resource, self._nonce,
                                    self._peer_hello.nonce, msg):  # fmt: skip
                self._refuse(out, REFUSE_AUTH, "authentication failed: wrong pre-shared key")
                return out
            self._accept(out)
            return out
        self._request(msg, out)
        return out

    def _hello(self, h: wire.Hello, out: list[Action]) -> None:
        md = self._md
        if h.resource != self.resource:
            self._refuse(out, REFUSE_RESOURCE, f"no resource {h.resource!r} in role secondary here")
            return
        if h.datasize != md.datasize or h.extentsize != md.extentsize:
            self._refuse(
                out, REFUSE_GEOMETRY,
                f"provider mismatch: primary datasize {h.datasize} extentsize {h.extentsize},"
                f" secondary {md.datasize} {md.extentsize}",
            )  # fmt: skip
            return
        if bool(self.key) != bool(h.flags & wire.HelloFlag.AUTH):
            self._refuse(out, REFUSE_AUTH, "the nodes disagree on the pre-shared key")
            return
        mine = NodeCounters(md.resuid, md.localcnt, md.remotecnt)
        decision = decide_sync(
            mine,
            NodeCounters(h.resuid, h.localcnt, h.remotecnt),
            primary_virgin=bool(h.flags & wire.HelloFlag.VIRGIN),
        )
        if decision.direction is SyncDirection.SPLIT_BRAIN:
            out.append(Event("split-brain", {"message": decision.reason}))
            self._refuse(out, REFUSE_SPLIT_BRAIN, decision.reason)
            return
        if decision.direction is SyncDirection.RESUID_MISMATCH:
            self._refuse(out, REFUSE_RESUID, decision.reason)
            return
        self.decision = decision.direction
        self._adopt = decision.adopt_resuid
        self._peer_hello = h
        flags = wire.HelloFlag.REPLY | (wire.HelloFlag.AUTH if self.key else 0)
        out.append(
            SendToPeer(
                wire.Hello(self.resource, md.resuid, md.localcnt, md.remotecnt, md.datasize,
                           md.extentsize, self._nonce, int(flags), self._bitmap)
            )
        )  # fmt: skip
        if self.key:
            mac = wire.auth_mac(self.key, self.resource, self._nonce, h.nonce)
            out.append(SendToPeer(wire.Auth(mac)))
            self.state = SecondaryState.AUTH
        else:
            self._accept(out)

    def _accept(self, out: list[Action]) -> None:
        h = self._peer_hello
        assert h is not None
        self.state = SecondaryState.UP
        if self._adopt:
            offset, written, data = update_block(self._md.replace(resuid=h.resuid))
            self._md = written
            out.append(WriteMetadata(self._token(), offset, data, written))
        out.append(Event("connect"))

    def _token(self) -> int:
        t = self._next_token
        self._next_token += 1
        return t

    def _valid_range(self, offset: int, length: int, *, limit: bool = True) -> bool:
        return (
            length > 0
            and offset >= 0
            and offset + length <= self._md.datasize
            and (not limit or length <= self.max_data)
        )

    def _request(self, msg: wire.Message, out: list[Action]) -> None:
        op: _SOp | None = None
        if isinstance(msg, wire.Write | wire.SyncData):
            data = msg.data
            if not self._valid_range(msg.offset, len(data)):
                out.append(SendToPeer(wire.WriteAck(msg.seq, 0, EINVAL)))
                return
            fua = isinstance(msg, wire.Write) and bool(msg.flags & wire.WriteFlag.FUA)
            if isinstance(msg, wire.Write) and msg.flags & wire.WriteFlag.MEMSYNC:
                out.append(SendToPeer(wire.WriteAck(msg.seq, wire.AckFlag.RECEIVED)))
            self.stats["writes"] += 1
            op = _SOp(self._new_id(), "write", msg.seq, msg.offset, len(data), data, fua)
        elif isinstance(msg, wire.Trim | wire.WriteZeroes):
            if not self._valid_range(msg.offset, msg.length, limit=False):
                out.append(SendToPeer(wire.WriteAck(msg.seq, 0, EINVAL)))
                return
            kind = "trim" if isinstance(msg, wire.Trim) else "zeroes"
            self.stats["deletes" if kind == "trim" else "writes"] += 1
            op = _SOp(self._new_id(), kind, msg.seq, msg.offset, msg.length, fua=True)
        elif isinstance(msg, wire.Flush):
            self.stats["flushes"] += 1
            op = _SOp(self._new_id(), "flush", msg.seq)
        elif isinstance(msg, wire.Read):
            if not self._valid_range(msg.offset, msg.length):
                out.append(SendToPeer(wire.ReadReply(msg.seq, msg.offset, b"", EINVAL)))
                return
            self.stats["reads"] += 1
            op = _SOp(self._new_id(), "read", msg.seq, msg.offset, msg.length)
        elif isinstance(msg, wire.Verify) and not msg.reply:
            if not self._valid_range(msg.offset, msg.length) or msg.algorithm is Checksum.NONE:
                out.append(SendToPeer(wire.Error(EINVAL, "bad VERIFY range or algorithm",
                                                 msg.seq)))  # fmt: skip
                return
            self.stats["verifies"] += 1
            op = _SOp(self._new_id(), "verify", msg.seq, msg.offset, msg.length,
                      algorithm=msg.algorithm)  # fmt: skip
        elif isinstance(msg, wire.Keepalive):
            out.append(SendToPeer(wire.Keepalive()))  # lets the primary time the link out
            return
        else:
            self._refuse(out, REFUSE_PROTOCOL, f"unexpected {type(msg).__name__} from the primary")
            return
        if not self._map_clear:
            # HAST: the first request zeroes the map this node kept as primary.
            self._map_clear = True
            self._bitmap = bytes(len(self._bitmap))
            out.append(WriteActivemap(self._token(), self._bitmap))
        self._ops[op.id] = op
        self._queue.append(op)
        self._pump(out)

    def _new_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    # ------------------------------------------------------------------ issuing

    def _blocked(self, op: _SOp, earlier: list[_SOp]) -> bool:
        if op.kind == "flush":
            return any(e.modifying for e in earlier)
        return any(e.modifying and op.overlaps(e) for e in earlier)

    def _pump(self, out: list[Action]) -> None:
        earlier: list[_SOp] = []
        for op in self._queue:
            if not op.issued and not self._blocked(op, earlier):
                op.issued = True
                if op.kind == "write":
                    assert op.data is not None
                    out.append(LocalWrite(op.id, op.offset, op.data, op.fua))
                elif op.kind == "trim":
                    out.append(LocalTrim(op.id, op.offset, op.length, op.fua))
                elif op.kind == "zeroes":
                    out.append(LocalWriteZeroes(op.id, op.offset, op.length, op.fua))
                elif op.kind == "flush":
                    out.append(LocalFlush(op.id))
                else:
                    out.append(LocalRead(op.id, op.offset, op.length))
            earlier.append(op)

    def _finish(self, id: int, kinds: tuple[str, ...]) -> _SOp | None:
        op = self._ops.get(id)
        if op is None or not op.issued or op.kind not in kinds:
            return None
        del self._ops[id]
        self._queue.remove(op)
        return op

    def local_write_done(self, id: int, ok: bool, now: float = 0.0) -> list[Action]:
        out: list[Action] = []
        op = self._finish(id, ("write", "trim", "zeroes"))
        if op is None:
            return out
        if not ok:
            self.stats["local_errors"] += 1
        if self.state is SecondaryState.UP:
            out.append(SendToPeer(_ack(op.seq, ok)))
        self._pump(out)
        return out

    def local_flush_done(self, id: int, ok: bool, now: float = 0.0) -> list[Action]:
        out: list[Action] = []
        op = self._finish(id, ("flush",))
        if op is None:
            return out
        if not ok:
            self.stats["local_errors"] += 1
        if self.state is SecondaryState.UP:
            out.append(SendToPeer(_ack(op.seq, ok)))
        self._pump(out)
        return out

    def local_read_done(self, id: int, data: Buf | None, now: float = 0.0) -> list[Action]:
        out: list[Action] = []
        op = self._finish(id, ("read", "verify"))
        if op is None:
            return out
        ok = data is not None and len(data) == op.length
        if not ok:
            self.stats["local_errors"] += 1
        if self.state is SecondaryState.UP:
            if op.kind == "read":
                reply: wire.Message = (
                    wire.ReadReply(op.seq, op.offset, data) if ok and data is not None
                    else wire.ReadReply(op.seq, op.offset, b"", EIO)
                )  # fmt: skip
            elif ok and data is not None:
                reply = wire.Verify(op.seq, op.offset, op.length, op.algorithm,
                                    wire.digest(op.algorithm, data), reply=True)  # fmt: skip
            else:
                reply = wire.Error(EIO, "local read error during VERIFY", op.seq)
            out.append(SendToPeer(reply))
        self._pump(out)
        return out

    def metadata_written(self, token: int, ok: bool = True, now: float = 0.0) -> list[Action]:
        """A WriteMetadata/WriteActivemap is done; a failure closes the link."""
        out: list[Action] = []
        if not ok and self.state is not SecondaryState.IDLE:
            out.append(Event("metadata-error", {"token": token}))
            self._close(out, "cannot write metadata")
        return out
