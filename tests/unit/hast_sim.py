"""A simulated HAST pair: primary and secondary machines over an in-memory network and disks.

Every action is carried out after a random delay drawn from the run's seed;
each direction of the link is FIFO (as TCP is) and messages go through the
real wire codec.  A "drop" breaks the connection (TCP loses no single
message); a partition refuses new connections until healed.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from carpool.hast import actions as A
from carpool.hast import nbd, wire
from carpool.hast.common import Replication, Role
from carpool.hast.metadata import Metadata
from carpool.hast.primary import PrimaryMachine
from carpool.hast.secondary import SecondaryMachine

RES = "shared"


@dataclass
class Node:
    name: str
    disk: bytearray
    md: Metadata
    bitmap: bytes
    machine: PrimaryMachine | SecondaryMachine | None = None
    events: list[str] = field(default_factory=list)
    status: list[str] = field(default_factory=list)
    read_fail: bool = False
    write_fail: bool = False


class Sim:
    def __init__(
        self,
        seed: int,
        *,
        mode: Replication = Replication.FULLSYNC,
        datasize: int = 64 * 4096,
        extentsize: int = 16 * 1024,
        keepdirty: int = 4,
        key: bytes | None = None,
        sync_chunk: int = 4096,
        sync_rate: int | None = None,
        max_delay: float = 0.01,
    ) -> None:
        self.rng = random.Random(seed)
        self.mode = mode
        self.key = key
        self.sync_chunk = sync_chunk
        self.sync_rate = sync_rate
        self.max_delay = max_delay
        self.now = 0.0
        self._next_tick = 0.25
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        md = Metadata(RES, datasize, extentsize, keepdirty, localoff=8192)
        nbytes = (-(-datasize // extentsize) + 7) // 8
        self.a = Node("a", bytearray(datasize), md.replace(resuid=0x1234), bytes(nbytes))
        self.b = Node("b", bytearray(datasize), md, bytes(nbytes))
        self.conn = 0  # current connection id (0: none)
        self._conn_counter = 0
        self.partitioned = False
        self._fifo: dict[tuple[str, int], float] = {}
        self._decoders: dict[tuple[str, int], wire.WireDecoder] = {}
        self.replies: dict[int, tuple[int, bytes | None]] = {}
        self.received_by: dict[str, list[tuple[int, bytes]]] = {"a": [], "b": []}
        self.violations: list[str] = []
        self._cookie = 0
        self._pending_checks: dict[int, tuple[int, int, bytes, int]] = {}
        self.verified: dict[int, A.VerifyDone] = {}

    # ------------------------------------------------------------------ setup

    def make_primary(self, node: Node, *, virgin: bool = False) -> PrimaryMachine:
        m = PrimaryMachine(
            RES, node.md, node.bitmap, now=self.now, replication=self.mode, virgin=virgin,
            key=self.key, sync_chunk=self.sync_chunk, sync_rate=self.sync_rate, timeout=5.0,
            keepalive=1.0,
        )  # fmt: skip
        node.machine = m
        self.run_actions(node, m.start(self.now))
        return m

    def make_secondary(self, node: Node) -> SecondaryMachine:
        m = SecondaryMachine(RES, node.md, node.bitmap, now=self.now, key=self.key, timeout=5.0)
        node.machine = m
        return m

    def other(self, node: Node) -> Node:
        return self.b if node is self.a else self.a

    # ------------------------------------------------------------------ scheduling

    def at(self, when: float, fn: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (when, self._seq, fn))

    def delay(self) -> float:
        return self.rng.uniform(0.0, self.max_delay)

    def run_until(self, t: float) -> None:
        while True:
            next_ev = self._heap[0][0] if self._heap else None
            next_tick = self._next_tick
            if next_ev is not None and next_ev <= next_tick and next_ev <= t:
                when, _, fn = heapq.heappop(self._heap)
                self.now = max(self.now, when)
                fn()
            elif next_tick <= t:
                self._next_tick += 0.25
                self.now = max(self.now, next_tick)
                for node in (self.a, self.b):
                    if node.machine is not None:
                        self.run_actions(node, node.machine.tick(self.now))
            else:
                self.now = t
                return

    def settle(self, limit: float = 60.0) -> None:
        """Run until nothing is in flight (or ``limit`` seconds passed)."""
        end = self.now + limit
        while self.now < end:
            self.run_until(self.now + 0.5)
            if self.quiet():
                return

    def quiet(self) -> bool:
        p = self.primary_machine()
        busy = p is not None and (p.in_flight or p.resync is not None)
        return not busy and not self._pending_checks

    def primary_machine(self) -> PrimaryMachine | None:
        for node in (self.a, self.b):
            if isinstance(node.machine, PrimaryMachine):
                return node.machine
        return None

    # ------------------------------------------------------------------ client

    def submit(self, node: Node, command: nbd.NbdCommand, offset: int = 0, length: int = 0,
               data: bytes | None = None, fua: bool = False) -> int:  # fmt: skip
        self._cookie += 1
        cookie = self._cookie
        req = nbd.Request(cookie, command, int(nbd.CommandFlag.FUA) if fua else 0, offset,
                          length, memoryview(data) if data is not None else None)  # fmt: skip
        if command == nbd.NbdCommand.WRITE and data is not None:
            self._pending_checks[cookie] = (offset, length, data, self.conn if self.up else -1)
        m = node.machine
        assert isinstance(m, PrimaryMachine)
        self.run_actions(node, m.request(self.now, req))
        return cookie

    def verify(self, offset: int, length: int) -> int:
        """Ask the primary to compare a range of both disks; the answer lands in ``verified``."""
        machine = self.a.machine
        assert isinstance(machine, PrimaryMachine)
        id, acts = machine.verify(self.now, offset, length)
        self.run_actions(self.a, acts)
        return id

    def write(self, node: Node, offset: int, data: bytes, fua: bool = False) -> int:
        return self.submit(node, nbd.NbdCommand.WRITE, offset, len(data), data, fua)

    @property
    def up(self) -> bool:
        p = self.primary_machine()
        return self.conn != 0 and p is not None and p.connected

    # ------------------------------------------------------------------ network

    def cut(self) -> None:
        """Break the connection now (both sides notice)."""
        if self.conn == 0:
            return
        self.conn = 0
        for node in (self.a, self.b):
            if node.machine is not None:
                self.run_actions(node, node.machine.peer_disconnected(self.now, "cut"))

    def _connect(self, node: Node) -> None:
        peer = self.other(node)
        if self.partitioned or not isinstance(peer.machine, SecondaryMachine):
            self.at(self.now + self.delay(), lambda: self._refused(node))
            return
        self._conn_counter += 1
        self.conn = conn = self._conn_counter

        def opened() -> None:
            if self.conn != conn or node.machine is None or peer.machine is None:
                return
            self.run_actions(peer, peer.machine.peer_connected(self.now, self.rng.randbytes(16)))
            assert isinstance(node.machine, PrimaryMachine)
            self.run_actions(node, node.machine.peer_connected(self.now, self.rng.randbytes(16)))

        self.at(self.now + self.delay(), opened)

    def _refused(self, node: Node) -> None:
        if node.machine is not None:
            self.run_actions(node, node.machine.peer_disconnected(self.now, "refused"))

    def _send(self, node: Node, msg: wire.Message) -> None:
        conn = self.conn
        if conn == 0:
            return
        peer = self.other(node)
        raw = wire.encode_bytes(msg)
        key = (node.name, conn)
        when = max(self.now + self.delay(), self._fifo.get(key, 0.0))
        self._fifo[key] = when

        def deliver() -> None:
            if self.conn != conn or peer.machine is None:
                return
            dec = self._decoders.setdefault(key, wire.WireDecoder())
            for m in dec.feed(raw):
                if isinstance(m, wire.Write):
                    self.received_by[peer.name].append((m.offset, bytes(m.data)))
                self.run_actions(peer, peer.machine.peer_message(self.now, m))

        self.at(when, deliver)

    # ------------------------------------------------------------------ actions

    def run_actions(self, node: Node, acts: list[A.Action]) -> None:
        for act in acts:
            self._one(node, act)

    def _one(self, node: Node, act: A.Action) -> None:
        m = node.machine
        assert m is not None
        d = self.delay()
        if isinstance(act, A.LocalWrite | A.LocalTrim | A.LocalWriteZeroes):

            def wdone(act: A.Action = act, m: object = m) -> None:
                if node.machine is not m:
                    return
                assert isinstance(act, A.LocalWrite | A.LocalTrim | A.LocalWriteZeroes)
                if not node.write_fail:
                    if isinstance(act, A.LocalWrite):
                        node.disk[act.offset : act.offset + len(act.data)] = act.data
                    else:
                        node.disk[act.offset : act.offset + act.length] = bytes(act.length)
                assert node.machine is not None
                self.run_actions(
                    node, node.machine.local_write_done(act.id, not node.write_fail, self.now)
                )

            self.at(self.now + d, wdone)
        elif isinstance(act, A.LocalRead):

            def rdone(act: A.LocalRead = act, m: object = m) -> None:
                if node.machine is not m or node.machine is None:
                    return
                data = None if node.read_fail else bytes(
                    node.disk[act.offset : act.offset + act.length])  # fmt: skip
                self.run_actions(node, node.machine.local_read_done(act.id, data, self.now))

            self.at(self.now + d, rdone)
        elif isinstance(act, A.LocalFlush):

            def fdone(act: A.LocalFlush = act, m: object = m) -> None:
                if node.machine is m and node.machine is not None:
                    self.run_actions(node, node.machine.local_flush_done(act.id, True, self.now))

            self.at(self.now + d, fdone)
        elif isinstance(act, A.WriteMetadata | A.WriteActivemap):
            if isinstance(act, A.WriteMetadata):
                node.md = act.metadata
            else:
                node.bitmap = act.bitmap

            def mdone(act: A.WriteMetadata | A.WriteActivemap = act, m: object = m) -> None:
                if node.machine is m and node.machine is not None:
                    self.run_actions(node, node.machine.metadata_written(act.token, True, self.now))

            self.at(self.now + d, mdone)
        elif isinstance(act, A.SendToPeer):
            self._send(node, act.message)
        elif isinstance(act, A.ClosePeer):
            conn = self.conn
            if conn:
                # TCP delivers what was sent before the FIN
                when = max(self.now, self._fifo.get((node.name, conn), 0.0)) + 1e-6
                peer = self.other(node)

                def close(act: A.ClosePeer = act) -> None:
                    if self.conn == conn:
                        self.conn = 0
                        if peer.machine is not None:
                            self.run_actions(
                                peer, peer.machine.peer_disconnected(self.now, act.reason)
                            )

                self.at(when, close)
        elif isinstance(act, A.ConnectPeer):
            self._connect(node)
        elif isinstance(act, A.ReplyToClient):
            data = bytes(act.data) if act.data is not None else None
            self.replies[act.cookie] = (act.error, data)
            self._check_ack(node, act)
        elif isinstance(act, A.Event):
            node.events.append(act.name)
        elif isinstance(act, A.StatusChanged):
            node.status.append(act.status)
        elif isinstance(act, A.VerifyDone):
            self.verified[act.id] = act

    def _check_ack(self, node: Node, act: A.ReplyToClient) -> None:
        entry = self._pending_checks.pop(act.cookie, None)
        if entry is None or act.error:
            return
        offset, length, data, conn = entry
        if bytes(node.disk[offset : offset + length]) != data:
            self.violations.append(f"write {act.cookie} acked but not on the local disk")
        if conn <= 0 or conn != self.conn:
            return  # the link changed while it was in flight: degraded rules
        peer = self.other(node)
        if self.mode is Replication.FULLSYNC:
            if bytes(peer.disk[offset : offset + length]) != data:
                self.violations.append(f"fullsync write {act.cookie} acked but not on the peer")
        elif self.mode is Replication.MEMSYNC and (offset, data) not in self.received_by[peer.name]:
            self.violations.append(f"memsync write {act.cookie} acked but not received")


def connected_pair(seed: int, **kw: object) -> Sim:
    """a primary (virgin, resuid set), b a fresh secondary, connected and idle."""
    sim = Sim(seed, **kw)  # type: ignore[arg-type]
    sim.make_secondary(sim.b)
    sim.make_primary(sim.a, virgin=True)
    sim.run_until(2.0)
    assert sim.up, (sim.a.events, sim.b.events)
    return sim


__all__ = ["RES", "Node", "Role", "Sim", "connected_pair"]
