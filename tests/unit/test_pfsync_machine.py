"""pfsyncd's machine over a simulated lossy link: convergence, bulk, demotion, peers."""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from carpool.pfsync import state, wire
from carpool.pfsync.conntrack import ChangeKind
from carpool.pfsync.ctnetlink import (
    ConntrackEntry,
    ConntrackTuple,
    EventKind,
    TcpInfo,
    TcpState,
)
from carpool.pfsync.machine import (
    Apply,
    Emit,
    ReadTable,
    Send,
    SetDemotion,
    SyncFilter,
    SyncMachine,
    SyncSettings,
    unwrap,
)

KEY = b"k" * 32
Key = tuple[int, ConntrackTuple]


def entry(
    index: int, state: TcpState = TcpState.ESTABLISHED, timeout: int = 432000
) -> ConntrackEntry:
    original = ConntrackTuple(
        ipaddress.IPv4Address(f"10.1.{index // 250}.{index % 250 + 1}"),
        ipaddress.IPv4Address("10.2.0.2"),
        6,
        1024 + index,
        7000,
    )
    return ConntrackEntry(
        original=original,
        reply=original.inverted(),
        status=14,
        timeout=timeout,
        mark=0,
        tcp=TcpInfo(state, 7, 7, 3, 3),
    )


@dataclass
class Node:
    name: str
    machine: SyncMachine
    kernel: dict[Key, ConntrackEntry] = field(default_factory=dict)
    events: list[tuple[str, dict[str, object]]] = field(default_factory=list)
    demotion: int = 0
    demotions: list[int] = field(default_factory=list)
    alive: bool = True
    liberal: set[Key] = field(default_factory=set)


class Simulation:
    """Two nodes, a link that drops (and delays by one tick) datagrams, a clock."""

    def __init__(self, loss: float = 0.0, seed: int = 0, start_b: bool = True, **overrides: float):
        self.random = random.Random(seed)
        self.loss = loss
        self.now = 1000.0
        self.settings = SyncSettings(**overrides)  # type: ignore[arg-type]
        self.in_flight: list[tuple[float, str, bytes]] = []
        self.nodes: dict[str, Node] = {}
        self.sent = 0
        self.add("a", first_sequence=0xFFFFFFF0)  # wraps the 32-bit sequence soon
        if start_b:
            self.add("b")

    def add(self, name: str, first_sequence: int = 1) -> Node:
        machine = SyncMachine(self.settings, self.random.getrandbits(64), self.now, first_sequence)
        node = Node(name, machine)
        old = self.nodes.get(name)
        if old is not None:
            node.kernel = old.kernel
        self.nodes[name] = node
        self.perform(node, machine.start(self.now))
        return node

    def other(self, node: Node) -> str:
        return "b" if node.name == "a" else "a"

    def perform(self, node: Node, actions: Sequence[object]) -> None:
        queue = list(actions)
        while queue:
            action = queue.pop(0)
            if isinstance(action, Send):
                datagram = wire.encode(action.message, KEY)
                self.sent += 1
                if self.random.random() >= self.loss:
                    delay = self.random.choice((0.001, 0.001, 0.002, 0.01))
                    self.in_flight.append((self.now + delay, self.other(node), datagram))
            elif isinstance(action, Apply):
                for kind, packed in action.changes:
                    item = state.unpack(packed)
                    if kind is ChangeKind.MAKE_LIBERAL:
                        node.liberal.add(item.key)
                    elif kind is ChangeKind.DELETE:
                        node.kernel.pop(item.key, None)
                    else:
                        node.kernel[item.key] = item
            elif isinstance(action, ReadTable):
                entries = [state.pack(e) for e in node.kernel.values()]
                queue.extend(
                    node.machine.table_read(
                        action.purpose, entries, self.now, self.now, action.bulk_id
                    )
                )
            elif isinstance(action, SetDemotion):
                node.demotion = action.amount
                node.demotions.append(action.amount)
            elif isinstance(action, Emit):
                node.events.append((action.name, dict(action.attributes)))

    def local(self, name: str, kind: EventKind, item: ConntrackEntry) -> None:
        node = self.nodes[name]
        if kind is EventKind.DESTROY:
            node.kernel.pop(item.key, None)
        else:
            node.kernel[item.key] = item
        self.perform(node, node.machine.local_changes([(kind, state.pack(item))], self.now))

    def run(self, seconds: float, step: float = 0.005) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            due = [f for f in self.in_flight if f[0] <= self.now]
            self.in_flight = [f for f in self.in_flight if f[0] > self.now]
            for _, target, datagram in due:
                node = self.nodes.get(target)
                if node is None or not node.alive:
                    continue
                message = wire.decode(datagram, KEY)
                self.perform(node, node.machine.received(message, self.now))
            for node in self.nodes.values():
                if node.alive and node.machine.next_deadline() <= self.now:
                    self.perform(node, node.machine.advance(self.now))

    def events(self, name: str) -> list[str]:
        return [event for event, _ in self.nodes[name].events]


def test_unwrap_handles_the_32_bit_wrap() -> None:
    assert unwrap(5, 0xFFFFFFFE) == 0x100000005
    assert unwrap(0xFFFFFFFE, 0x100000005) == 0xFFFFFFFE
    assert unwrap(7, 7) == 7


def test_start_demotes_and_bulk_done_lifts_it() -> None:
    sim = Simulation()
    assert sim.nodes["a"].demotions[:1] == [240]
    sim.run(2.0)
    for name in ("a", "b"):
        node = sim.nodes[name]
        assert node.demotion == 0
        assert node.machine.syncok
        assert "BULK_START" in sim.events(name) and "BULK_DONE" in sim.events(name)
        assert "PEER_BACK" in sim.events(name)


def test_new_states_reach_the_peer_kernel_and_deletes_follow() -> None:
    sim = Simulation()
    sim.run(1.0)
    for index in range(100):
        sim.local("a", EventKind.NEW, entry(index))
    sim.run(1.0)
    assert sim.nodes["b"].kernel == sim.nodes["a"].kernel
    for index in range(50):
        sim.local("a", EventKind.DESTROY, entry(index))
    sim.local("a", EventKind.UPDATE, entry(60, TcpState.TIME_WAIT, 120))
    sim.run(1.0)
    assert sim.nodes["b"].kernel == sim.nodes["a"].kernel
    assert sim.nodes["b"].kernel[entry(60).key].tcp == TcpInfo(TcpState.TIME_WAIT, 7, 7, 3, 3)


def test_restarted_node_gets_a_bulk_update_and_stays_demoted_until_then() -> None:
    sim = Simulation()
    sim.run(1.0)
    for index in range(300):
        sim.local("a", EventKind.NEW, entry(index))
    sim.run(1.0)
    sim.nodes["b"].alive = False
    sim.nodes["b"].kernel.clear()  # a reboot empties the table
    sim.run(6.0)
    assert "PEER_LOST" in sim.events("a")
    for index in range(300, 320):  # changes while the peer is away
        sim.local("a", EventKind.NEW, entry(index))
    restarted = sim.add("b")
    assert restarted.demotion == 240
    sim.run(2.0)
    assert restarted.demotion == 0
    assert "BULK_DONE" in sim.events("b")
    assert restarted.kernel == sim.nodes["a"].kernel
    assert len(restarted.kernel) == 320


def test_without_a_peer_the_bulk_is_retried_then_given_up_and_demotion_lifted() -> None:
    sim = Simulation(start_b=False)
    node = sim.nodes["a"]
    sim.run(30.0, step=0.05)
    assert node.demotion == 240
    assert node.machine.bulk_tries == 6
    sim.run(40.0, step=0.05)
    assert node.demotion == 0
    assert node.machine.bulk_tries == 12
    assert "BULK_FAILED" in sim.events("a")
    assert node.machine.syncok  # pfsync pretends the transfer was ok


def test_filtered_entries_are_neither_sent_nor_applied() -> None:
    sync_link = ipaddress.IPv4Network("10.1.0.0/24")
    sim = Simulation(filter=SyncFilter((sync_link,)))  # type: ignore[arg-type]
    sim.run(1.0)
    sim.local("a", EventKind.NEW, entry(1))  # 10.1.0.2: ignored
    sim.local("a", EventKind.NEW, entry(300))  # 10.1.1.51: synced
    sim.run(1.0)
    assert list(sim.nodes["b"].kernel) == [entry(300).key]
    assert sim.nodes["a"].machine.stats["filtered"] == 1


def test_refresh_resends_states_the_peer_would_time_out() -> None:
    sim = Simulation(refresh_interval=5.0)
    sim.run(1.0)
    sim.local("a", EventKind.NEW, entry(1, timeout=8))
    sim.run(0.5)
    sent_before = sim.nodes["a"].machine.stats["upd_out"]
    # traffic keeps the entry alive on a: the kernel extends its timeout without an event
    for _ in range(6):
        sim.nodes["a"].kernel[entry(1).key] = entry(1, timeout=8)
        sim.run(2.0)
    assert sim.nodes["a"].machine.stats["upd_out"] > sent_before
    assert entry(1).key in sim.nodes["b"].kernel


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32),
    loss=st.sampled_from([0.0, 0.05, 0.2, 0.4]),
    operations=st.lists(
        st.tuples(st.sampled_from(["new", "update", "destroy"]), st.integers(0, 60)),
        min_size=1,
        max_size=150,
    ),
)
def test_all_states_converge_over_a_lossy_link(
    seed: int, loss: float, operations: list[tuple[str, int]]
) -> None:
    sim = Simulation(loss=loss, seed=seed, peer_timeout=30.0)
    sim.run(0.5)
    states = list(TcpState)[1:]
    for number, (operation, index) in enumerate(operations):
        if operation == "destroy":
            if entry(index).key in sim.nodes["a"].kernel:
                sim.local("a", EventKind.DESTROY, entry(index))
        else:
            state = states[(index + number) % len(states)]
            kind = (
                EventKind.NEW if entry(index).key not in sim.nodes["a"].kernel else EventKind.UPDATE
            )
            sim.local("a", kind, entry(index, state))
        if number % 10 == 0:
            sim.run(0.02)
    sim.run(15.0, step=0.01)
    assert sim.nodes["b"].kernel == sim.nodes["a"].kernel
    sim.run(60.0, step=0.05)  # a bulk whose end was lost is asked for again 5 s later
    assert sim.nodes["b"].demotion == 0 and sim.nodes["a"].demotion == 0
    assert sim.nodes["b"].kernel == sim.nodes["a"].kernel


def test_own_tcp_entries_are_made_liberal_without_touching_their_state() -> None:
    sim = Simulation()
    sim.run(1.0)
    sim.local("a", EventKind.NEW, entry(1, TcpState.SYN_SENT))
    assert sim.nodes["a"].liberal == {entry(1).key}
    liberal = ConntrackEntry(
        entry(1).original,
        entry(1).reply,
        14,
        100,
        0,
        0,
        TcpInfo(TcpState.ESTABLISHED, 7, 7, 11, 11),
    )
    node = sim.nodes["a"]
    actions = node.machine.local_changes([(EventKind.UPDATE, state.pack(liberal))], sim.now)
    assert not [a for a in actions if isinstance(a, Apply)]


def test_a_large_bulk_answer_goes_out_in_chunks_and_ends_after_its_data() -> None:
    sim = Simulation(loss=0.05, seed=3, peer_timeout=30.0)
    sim.run(1.0)
    for index in range(3000):  # about 130 DATA messages: several chunks
        sim.local("a", EventKind.NEW, entry(index))
    sim.run(2.0)
    b = sim.nodes["b"]
    b.alive = False
    b.kernel.clear()
    restarted = sim.add("b")
    actions = sim.nodes["a"].machine.received(
        wire.BulkRequest(restarted.machine.session, 0, 99), sim.now
    )
    sends = [a.message for a in actions if isinstance(a, Send)]
    data = [m for m in sends if isinstance(m, wire.Data)]
    assert isinstance(sends[0], wire.BulkStart)
    assert 0 < len(data) <= 32 and not any(isinstance(m, wire.BulkEnd) for m in sends)
    assert sim.nodes["a"].machine.next_deadline() <= sim.now  # the rest at once
    sim.perform(sim.nodes["a"], actions)
    sim.run(10.0, step=0.01)
    assert restarted.demotion == 0 and "BULK_DONE" in sim.events("b")
    assert restarted.kernel == sim.nodes["a"].kernel and len(restarted.kernel) == 3000
