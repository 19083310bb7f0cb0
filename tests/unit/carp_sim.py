"""A discrete-event simulation of CARP hosts on shared segments, for tests.

Each node runs one :class:`~carpool.carp.machine.CarpHost`.  Every interface
name is one segment (all nodes' ``em0`` share a LAN, all ``em1`` another).  An
advert sent by a MASTER reaches every other live node whose link on that
segment is up, after ``delay + U(0, jitter)`` seconds unless it is lost
(probability ``loss``); like Ethernet, a segment never reorders the frames of
one sender to one receiver.  The clock is simulated; nothing sleeps.

The simulation plays the daemon's part: it performs the actions a host
returns (sending adverts, holding addresses) and records every state change.
Node ``i`` sends from 10.0.0.(i+1) and tells its host so
(:attr:`ReceivedAdvert.local`) unless ``tie_break`` is off, which leaves
FreeBSD's tie rule (both masters back off) alone.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from carpool.carp.config import CarpConfig, VhidConfig, parse_config
from carpool.carp.machine import (
    Action,
    CarpHost,
    CarpState,
    ReceivedAdvert,
    ReleaseAddresses,
    SendAdvert,
    StateChanged,
    TakeAddresses,
)


@dataclass
class Transition:
    time: float
    node: int
    change: StateChanged


@dataclass
class SimNode:
    index: int
    config: CarpConfig
    host: CarpHost
    alive: bool = True
    links: dict[str, bool] = field(default_factory=dict)
    holding: set[tuple[str, int]] = field(default_factory=set)
    sent: list[tuple[float, SendAdvert]] = field(default_factory=list)
    send_fails: bool = False

    @property
    def address(self) -> IPv4Address:
        return IPv4Address(f"10.0.0.{self.index + 1}")


class Simulation:
    """N CARP hosts, a simulated clock and lossy segments."""

    def __init__(
        self,
        configs: Sequence[CarpConfig],
        *,
        seed: int = 0,
        delay: float = 0.0005,
        jitter: float = 0.0,
        loss: float = 0.0,
        start_times: Sequence[float] | None = None,
        tie_break: bool = True,
    ) -> None:
        self.random = random.Random(seed)
        self.tie_break = tie_break
        self.delay = delay
        self.jitter = jitter
        self.loss = loss
        self.now = 0.0
        self.transitions: list[Transition] = []
        self._last_arrival: dict[tuple[int, int], float] = {}
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self.nodes: list[SimNode] = []
        starts = list(start_times) if start_times is not None else [0.0] * len(configs)
        for index, config in enumerate(configs):
            node = SimNode(index=index, config=config, host=CarpHost(config, 0.0))
            self.nodes.append(node)
            for ifname in config.ifnames:
                self.at(starts[index], self._link_action(index, ifname, True))

    # -- scheduling ------------------------------------------------------------

    def at(self, time: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._queue, (time, next(self._sequence), action))

    def _link_action(self, index: int, ifname: str, up: bool) -> Callable[[], None]:
        return lambda: self.set_link(index, ifname, up)

    #: a runaway machine (adverts answered by adverts) fails fast instead of spinning
    max_events = 500_000

    def run_until(self, end: float) -> None:
        events = 0
        while True:
            events += 1
            if events > self.max_events:
                raise RuntimeError(f"more than {self.max_events} events before t={end}")
            next_event = self._queue[0][0] if self._queue else None
            host_deadline: float | None = None
            host_node: SimNode | None = None
            for node in self.nodes:
                if not node.alive:
                    continue
                deadline = node.host.next_deadline()
                if deadline is not None and (host_deadline is None or deadline < host_deadline):
                    host_deadline, host_node = deadline, node
            candidates = [t for t in (next_event, host_deadline) if t is not None]
            if not candidates or min(candidates) > end:
                break
            if (
                host_deadline is not None
                and host_node is not None
                and (next_event is None or host_deadline <= next_event)
            ):
                self.now = max(self.now, host_deadline)
                self.perform(host_node, host_node.host.advance(self.now))
            else:
                time, _, action = heapq.heappop(self._queue)
                self.now = max(self.now, time)
                action()
        self.now = max(self.now, end)

    def run_for(self, duration: float) -> None:
        self.run_until(self.now + duration)

    # -- the daemon's part -----------------------------------------------------

    def perform(self, node: SimNode, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, StateChanged):
                self.transitions.append(Transition(self.now, node.index, action))
            elif isinstance(action, TakeAddresses):
                node.holding.add((action.ifname, action.vhid))
            elif isinstance(action, ReleaseAddresses):
                node.holding.discard((action.ifname, action.vhid))
            elif isinstance(action, SendAdvert):
                self.send(node, action)

    def send(self, node: SimNode, advert: SendAdvert) -> None:
        node.sent.append((self.now, advert))
        if node.send_fails or not node.links.get(advert.ifname, False):
            follow_up = node.host.send_failed(advert.ifname, advert.vhid, self.now)
        else:
            follow_up = node.host.send_succeeded(advert.ifname, advert.vhid, self.now)
            for peer in self.nodes:
                if peer is node or self.random.random() < self.loss:
                    continue
                latency = self.delay + self.random.uniform(0.0, self.jitter)
                # a segment does not reorder one sender's frames to one receiver
                arrival = max(
                    self.now + latency, self._last_arrival.get((node.index, peer.index), 0.0)
                )
                self._last_arrival[(node.index, peer.index)] = arrival
                received = ReceivedAdvert(
                    ifname=advert.ifname,
                    vhid=advert.vhid,
                    advbase=advert.advbase,
                    advskew=advert.advskew,
                    demote=advert.demote,
                    source=node.address,
                    local=peer.address if self.tie_break else None,
                )
                self.at(arrival, self._delivery(peer, received))
        self.perform(node, follow_up)

    def _delivery(self, peer: SimNode, advert: ReceivedAdvert) -> Callable[[], None]:
        def deliver() -> None:
            if peer.alive and peer.links.get(advert.ifname, False):
                self.perform(peer, peer.host.advert_received(advert, self.now))

        return deliver

    # -- faults and commands ------------------------------------------------------

    def set_link(self, index: int, ifname: str, up: bool) -> None:
        node = self.nodes[index]
        if not node.alive:
            return
        node.links[ifname] = up
        self.perform(node, node.host.link_changed(ifname, up, self.now))

    def crash(self, index: int) -> None:
        """The host dies: no more adverts, links gone, its addresses vanish."""
        node = self.nodes[index]
        node.alive = False
        node.links = {}
        node.holding.clear()

    def stop(self, index: int) -> None:
        """A clean stop: the host bows out, then is gone."""
        node = self.nodes[index]
        self.perform(node, node.host.shutdown(self.now))
        node.alive = False
        node.links = {}

    def restart(self, index: int, config: CarpConfig | None = None) -> None:
        """A fresh daemon on the node, links reported up at once."""
        node = self.nodes[index]
        node.config = config or node.config
        node.host = CarpHost(node.config, self.now)
        node.alive = True
        node.holding.clear()
        for ifname in node.config.ifnames:
            self.set_link(index, ifname, True)

    def command(self, index: int, call: Callable[[CarpHost, float], list[Action]]) -> None:
        node = self.nodes[index]
        if node.alive:
            self.perform(node, call(node.host, self.now))

    # -- observations ------------------------------------------------------------

    def masters(self, ifname: str, vhid: int) -> list[int]:
        return [
            n.index
            for n in self.nodes
            if n.alive and n.host.state(ifname, vhid) is CarpState.MASTER
        ]

    def holders(self, ifname: str, vhid: int) -> list[int]:
        return [n.index for n in self.nodes if n.alive and (ifname, vhid) in n.holding]

    def transitions_since(self, time: float) -> list[Transition]:
        return [t for t in self.transitions if t.time >= time]

    def became_master(self, node: int, since: float = 0.0) -> list[Transition]:
        return [
            t
            for t in self.transitions_since(since)
            if t.node == node and t.change.new is CarpState.MASTER
        ]


def node_config(
    vhids: Sequence[VhidConfig] = (),
    *,
    preempt: bool = True,
    demotion: int = 0,
    text: str | None = None,
) -> CarpConfig:
    """A CarpConfig built directly, or parsed from rc.conf ``text``."""
    if text is not None:
        return parse_config(text)
    return CarpConfig(vhids=tuple(vhids), preempt=preempt, demotion=demotion)
