"""relayd: tables with health checks, relays (TCP, HTTP, TLS) and nftables redirects.

The daemon builds, for every table use (``forward to <table> port P check ...``),
a health state (``relayd.health``) and a balancer (``relayd.balance``); checks
run on each table's interval and their verdicts move hosts in and out of the
balancers and the redirect rules, with a ``host_up``/``host_down`` event and
relayd's log line.  Relays (``relayd.relay``, ``relayd.http_relay``) pick from
the balancers; redirects are DNAT rules in relayd's own nftables table
(``relayd.redirect``), rewritten in one transaction whenever the set of usable
hosts changes and removed on exit.  relayctl talks to it over the control
socket; ``--metrics`` serves the same state to Prometheus.

``prefork N`` runs N relay worker processes that each listen with SO_REUSEPORT
(the kernel spreads connections over them); the parent runs the health checks,
the redirects and the control socket, and tells the workers which hosts are
usable over a pipe.  Workers report their counters back once a second.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import hashlib
import json
import logging
import os
import secrets
import signal
import ssl
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from carpool.control import default_run_dir
from carpool.errors import CarpoolError, CommandError, ConfigError
from carpool.events import Event, EventBus, setup_logging
from carpool.relayd.balance import Balancer, table_key
from carpool.relayd.checks import run_check
from carpool.relayd.config import load_relayd_config
from carpool.relayd.health import HostDown, HostEvent, HostSpec, TableHealth
from carpool.relayd.http_relay import HttpPolicy, http_session_factory
from carpool.relayd.model import (
    ForwardTarget,
    Mode,
    ProtocolType,
    Redirect,
    RelaydConfig,
    TableRef,
)
from carpool.relayd.model import Relay as RelayConfig
from carpool.relayd.redirect import (
    DEFAULT_NFT_TABLE,
    NftTable,
    RedirectListener,
    RedirectRules,
    conntrack_counts,
    redirect_counters,
)
from carpool.relayd.relay import Backend, Relay, RelayCounters
from carpool.relayd.relayctl_format import (
    HostStatus,
    RedirectStatus,
    RelaydStatus,
    RelayStatus,
    SessionStats,
    SessionStatus,
    TableStatus,
)
from carpool.relayd.tls import client_context, server_context
from carpool.service import DaemonShell, run_command

log = logging.getLogger("carpool.relayd")
DAEMON = "relayd"
DEFAULT_CONFIG = "/etc/relayd.conf"
LEAST_STATES_PERIOD = 1.0
WORKER_REPORT_PERIOD = 1.0


@dataclasses.dataclass
class TableUse:
    """One ``forward to <table> port P`` of a relay or redirect: its health and balancer."""

    id: int
    ref: TableRef
    health: TableHealth
    backend: Backend

    @property
    def display_name(self) -> str:
        return f"{self.ref.table}:{self.ref.port}"

    def usable_addresses(self) -> tuple[str, ...]:
        return tuple(self.backend.addresses[h] for h in self.health.usable_hosts())

    def status(self) -> TableStatus:
        return TableStatus(
            id=self.id, name=self.display_name, disabled=self.health.disabled,
            hosts=tuple(
                HostStatus(
                    id=h.id, name=h.name, state=str(h.state), disabled=h.disabled,
                    parent=h.parent, check_cnt=h.check_cnt, up_cnt=h.up_cnt,
                    retry_cnt=h.retry_cnt, error=str(h.error),
                )
                for h in self.health.hosts.values()
            ),
        )  # fmt: skip


@dataclasses.dataclass
class SessionHistory:
    """Sessions per minute for relayctl's ``last:`` and ``average:`` lines."""

    minutes: list[int] = dataclasses.field(default_factory=list)
    last_total: int = 0

    def tick(self, total: int) -> None:
        self.minutes.append(total - self.last_total)
        self.last_total = total
        del self.minutes[:-1440]

    def stats(self, total: int) -> SessionStats:
        m = self.minutes
        if not m:
            return SessionStats(cnt=total)
        avg = sum(m) // len(m)
        return SessionStats(
            cnt=total, interval=60, last=m[-1], last_hour=sum(m[-60:]), last_day=sum(m),
            avg=avg, avg_hour=avg * 60, avg_day=avg * 1440,
        )  # fmt: skip


@dataclasses.dataclass
class RelayRuntime:
    id: int
    config: RelayConfig
    server: Relay
    uses: list[TableUse]
    tls: list[ssl.SSLContext | None]
    history: SessionHistory = dataclasses.field(default_factory=SessionHistory)
    worker_counters: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    worker_sessions: dict[int, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)

    def counters(self) -> RelayCounters:
        """This process's counters plus the last report of every worker."""
        total = dataclasses.replace(self.server.counters,
                                    per_host=dict(self.server.counters.per_host))
        for report in list(self.worker_counters.values()):
            for name, value in report.items():
                if name == "per_host":
                    for key, count in value.items():
                        total.per_host[key] = total.per_host.get(key, 0) + count
                elif isinstance(value, int):
                    setattr(total, name, getattr(total, name) + value)
        return total


@dataclasses.dataclass
class RedirectRuntime:
    id: int
    config: Redirect
    main: TableUse
    backup: TableUse | None
    seed: int
    disabled: bool = False
    least: tuple[str, ...] | None = None  #: least-states: hosts with the fewest states
    sessions: int = 0  #: connections redirected (nftables counters, kept across rewrites)
    counted: int = 0  #: what the current rules' counters said last time
    history: SessionHistory = dataclasses.field(default_factory=SessionHistory)

    def rules(self) -> RedirectRules | None:
        if self.disabled:
            return None
        use = self.main
        hosts = () if use.health.disabled else use.usable_addresses()
        if not hosts and self.backup is not None and not self.backup.health.disabled:
            use = self.backup
            hosts = use.usable_addresses()
        if self.config.table.mode is Mode.LEAST_STATES and self.least is not None:
            narrowed = tuple(h for h in hosts if h in self.least)
            hosts = narrowed or hosts
        listeners = tuple(
            RedirectListener(lst.address, lst.port, lst.port_end, lst.ip_proto, lst.interface)
            for lst in self.config.listen
        )
        return RedirectRules(
            name=self.config.name, listeners=listeners, hosts=hosts, port=use.ref.port,
            mode=self.config.table.mode, sticky=self.config.sticky_address, seed=self.seed,
            tag=self.config.tag, match_tag=self.config.match_tag,
            log=any(lst.pflog for lst in self.config.listen),
        )  # fmt: skip

    def status(self) -> RedirectStatus:
        return RedirectStatus(
            id=self.id, name=self.config.name, table=self.main.status(),
            backup=self.backup.status() if self.backup is not None else None,
            disabled=self.disabled, stats=self.history.stats(self.sessions),
        )  # fmt: skip


def unsupported(config: RelaydConfig) -> str | None:
    """What the configuration asks for that this relayd cannot serve, if anything."""
    for relay in config.relays:
        if relay.transparent:
            return f'relay "{relay.name}": transparent forwarding is not supported on Linux yet'
        for forward in relay.forwards:
            if forward.target in (ForwardTarget.DESTINATION, ForwardTarget.NAT_LOOKUP):
                return (f'relay "{relay.name}": forward to {forward.target.value} is not '
                        "supported; forward to a table or an address")  # fmt: skip
        if config.protocol(relay.protocol).type is ProtocolType.DNS:
            return f'relay "{relay.name}": dns protocols are not supported; use a tcp protocol'
    for redirect in config.redirects:
        if redirect.route_to:
            return f'redirect "{redirect.name}": route to is not supported; use forward to'
    return None


def _in_file_order(config: RelaydConfig) -> list[RelayConfig | Redirect]:
    items: list[RelayConfig | Redirect] = [*config.relays, *config.redirects]
    return sorted(items, key=lambda item: item.line)


class Runtime:
    """Everything a configuration turns into: table uses, relays, redirects, with relayd's ids."""

    def __init__(self, config: RelaydConfig, *, hash_seed: bytes | None = None) -> None:
        self.config = config
        self.hash_seed = hash_seed if hash_seed is not None else secrets.token_bytes(16)
        self.relays: list[RelayRuntime] = []
        self.redirects: list[RedirectRuntime] = []
        self.uses: list[TableUse] = []
        self._next_host = 1
        now = time.monotonic()
        for item in _in_file_order(config):
            if isinstance(item, Redirect):
                main = self._use(item.table, now)
                backup = self._use(item.backup, now) if item.backup is not None else None
                self.redirects.append(RedirectRuntime(
                    len(self.redirects) + 1, item, main, backup,
                    seed=int.from_bytes(self._key(f"redirect {item.name}")[:4], "big"),
                    disabled=item.disabled,
                ))  # fmt: skip
            else:
                self.relays.append(self._relay(item, now))

    def _key(self, what: str) -> bytes:
        """A 128-bit key for ``what``, the same in every relay process of this run."""
        return hashlib.blake2b(what.encode(), key=self.hash_seed, digest_size=16).digest()

    def _use(self, ref: TableRef, now: float) -> TableUse:
        table = self.config.table(ref.table)
        ids = {}
        for host in table.hosts:
            ids[host.id] = self._next_host
            self._next_host += 1
        specs = [
            HostSpec(ids[h.id], h.name, h.retry, ids.get(h.parent) if h.parent else None)
            for h in table.hosts
        ]
        health = TableHealth(ref.table, specs, ref.check, interval=ref.interval,
                             table_id=len(self.uses) + 1, start=now)  # fmt: skip
        health.disabled = table.disabled
        key = (table_key(ref.mode_key) if ref.mode_key is not None
               else self._key(f"table {len(self.uses) + 1}"))  # fmt: skip
        balancer = Balancer([ids[h.id] for h in table.hosts], ref.mode, key=key,
                            up=health.usable_hosts())  # fmt: skip
        backend = Backend(ref.table, ref.port, balancer, {ids[h.id]: h.name for h in table.hosts},
                          {ids[h.id]: h.retry for h in table.hosts})  # fmt: skip
        use = TableUse(len(self.uses) + 1, ref, health, backend)
        self.uses.append(use)
        return use

    def _relay(self, relay: RelayConfig, now: float) -> RelayRuntime:
        protocol = self.config.protocol(relay.protocol)
        uses = [self._use(ref, now) for ref in relay.tables]
        backends = [use.backend for use in uses]
        for forward in relay.forwards:
            if forward.target is ForwardTarget.ADDRESS and forward.address is not None:
                port = forward.port if forward.port is not None else relay.listen[0].port
                backends.append(Backend(f"{forward.address}:{port}", port,
                                        Balancer([0], up=[0]), {0: forward.address},
                                        {0: forward.retry}))  # fmt: skip
        factory = None
        if protocol.type is ProtocolType.HTTP:
            factory = http_session_factory(HttpPolicy.from_protocol(protocol))
        backend_tls = client_context(protocol.tls, relay.name) if relay.forward_tls else None
        server = Relay(
            relay.name, backends, session_timeout=relay.session_timeout,
            session_factory=factory,
            backend_tls=backend_tls, backlog=max(protocol.tcp.backlog, 128),
            proxy_protocol=relay.proxy_protocol, log_connections=self.config.log.connection,
        )  # fmt: skip
        server.disabled = relay.disabled
        tls = [server_context(lst, protocol.tls, relay.name) if lst.tls else None
               for lst in relay.listen]  # fmt: skip
        return RelayRuntime(len(self.relays) + 1, relay, server, uses, tls)

    def status(self) -> RelaydStatus:
        return RelaydStatus(
            redirects=tuple(r.status() for r in self.redirects),
            relays=tuple(
                RelayStatus(
                    id=r.id, name=r.config.name, tables=tuple(u.status() for u in r.uses),
                    disabled=r.server.disabled,
                    stats=r.history.stats(r.counters().sessions_total),
                )
                for r in self.relays
            ),
        )

    def find_uses(self, wanted: str) -> list[TableUse]:
        return [u for u in self.uses
                if str(u.id) == wanted or wanted in (u.ref.table, u.display_name)]  # fmt: skip

    def find_hosts(self, wanted: str) -> list[tuple[TableUse, int]]:
        return [(u, h.id) for u in self.uses for h in u.health.hosts.values()
                if str(h.id) == wanted or h.name == wanted]  # fmt: skip

    def sync_balancer(self, use: TableUse) -> None:
        usable = set(use.health.usable_hosts()) if not use.health.disabled else set()
        for host in use.health.hosts:
            use.backend.balancer.set_up(host, host in usable)


class RelaydMetrics(Collector):
    """Prometheus view of the runtime, read at scrape time."""

    def __init__(self, daemon: RelaydDaemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        runtime = self.daemon.runtime
        host_up = GaugeMetricFamily("carpool_relayd_host_up", "1 if the host is up and enabled",
                                    labels=["table", "host"])  # fmt: skip
        checks = CounterMetricFamily("carpool_relayd_host_checks", "Checks with a known outcome",
                                     labels=["table", "host"])  # fmt: skip
        checks_up = CounterMetricFamily("carpool_relayd_host_checks_up",
                                        "Checks that found the host up",
                                        labels=["table", "host"])  # fmt: skip
        table_up = GaugeMetricFamily("carpool_relayd_table_hosts_up", "Usable hosts of the table",
                                     labels=["table", "id"])  # fmt: skip
        for use in list(runtime.uses):
            name = use.display_name
            for h in list(use.health.hosts.values()):
                host_up.add_metric([name, h.name], 1 if h.usable else 0)
                checks.add_metric([name, h.name], h.check_cnt)
                checks_up.add_metric([name, h.name], h.up_cnt)
            table_up.add_metric([name, str(use.id)], 0 if use.health.disabled else use.health.up)
        yield from (host_up, checks, checks_up, table_up)
        families = {
            "sessions_total": CounterMetricFamily("carpool_relayd_relay_sessions",
                                                  "Sessions accepted", labels=["relay"]),
            "sessions_failed": CounterMetricFamily("carpool_relayd_relay_sessions_failed",
                                                   "Sessions without a backend", labels=["relay"]),
            "requests_total": CounterMetricFamily("carpool_relayd_relay_requests",
                                                  "HTTP requests", labels=["relay"]),
            "http_errors": CounterMetricFamily("carpool_relayd_relay_http_errors",
                                               "HTTP requests refused as malformed",
                                               labels=["relay"]),
            "blocked": CounterMetricFamily("carpool_relayd_relay_blocked",
                                           "Messages blocked by rules", labels=["relay"]),
            "bytes_in": CounterMetricFamily("carpool_relayd_relay_bytes_in",
                                            "Bytes from clients", labels=["relay"]),
            "bytes_out": CounterMetricFamily("carpool_relayd_relay_bytes_out",
                                             "Bytes from backends", labels=["relay"]),
        }  # fmt: skip
        active = GaugeMetricFamily("carpool_relayd_relay_sessions_active", "Live sessions",
                                   labels=["relay"])  # fmt: skip
        per_host = CounterMetricFamily("carpool_relayd_relay_host_sessions",
                                       "Backend connections per host",
                                       labels=["relay", "table", "host"])  # fmt: skip
        for relay in list(runtime.relays):
            counters = relay.counters()
            for attr, family in families.items():
                family.add_metric([relay.config.name], getattr(counters, attr))
            active.add_metric([relay.config.name], counters.sessions_active)
            for key, count in counters.per_host.items():
                table, _, host = key.partition("/")
                per_host.add_metric([relay.config.name, table, host], count)
        yield from families.values()
        yield from (active, per_host)
        redirect_active = GaugeMetricFamily("carpool_relayd_redirect_hosts",
                                            "Hosts the redirect's rule spreads over",
                                            labels=["redirect"])  # fmt: skip
        for rdr in list(runtime.redirects):
            rules = rdr.rules()
            redirect_active.add_metric([rdr.config.name], 0 if rules is None else len(rules.hosts))
        yield redirect_active


class RelaydDaemon:
    def __init__(
        self,
        config: RelaydConfig,
        run_dir: Path,
        metrics: str | None,
        *,
        reload_config: Callable[[], RelaydConfig] | None = None,
        nft_table: str = DEFAULT_NFT_TABLE,
        prefork: int | None = None,
        worker_argv: list[str] | None = None,
    ) -> None:
        self.worker_argv = worker_argv
        self.run_dir = run_dir
        self.metrics_address = metrics
        self.reload_config = reload_config
        self.registry = CollectorRegistry()
        self.bus = EventBus(registry=self.registry)
        self.runtime = Runtime(config)
        self.nft = NftTable(nft_table)
        self.prefork = max(1, prefork if prefork is not None else 1)
        self.checks: set[asyncio.Task[None]] = set()
        self.tasks: list[asyncio.Task[None]] = []
        self.workers: dict[int, WorkerHandle] = {}
        self._redirects_dirty = asyncio.Event()
        self.registry.register(RelaydMetrics(self))

    # -- health checks ---------------------------------------------------------------------

    async def check_loop(self) -> None:
        while True:
            now = time.monotonic()
            for use in list(self.runtime.uses):
                hosts, events = use.health.start_round(now)
                self.apply(use, events)
                for host in hosts:
                    task = asyncio.ensure_future(self.check_host(use, host))
                    self.checks.add(task)
                    task.add_done_callback(self.checks.discard)
            await asyncio.sleep(0.2)

    async def check_host(self, use: TableUse, host_id: int) -> None:
        host = use.health.hosts[host_id]
        try:
            result = await run_check(host.name, use.ref.port, use.ref.check,
                                     use.ref.timeout / 1000)  # fmt: skip
        except Exception:
            log.exception("check of %s failed unexpectedly", host.name)
            return
        if use in self.runtime.uses:
            self.apply(use, use.health.record(host_id, result, time.monotonic()))

    def apply(self, use: TableUse, events: list[HostEvent]) -> None:
        if not events:
            return
        self.runtime.sync_balancer(use)
        self.tell_workers()
        self._redirects_dirty.set()
        for event in events:
            down = isinstance(event, HostDown)
            log.info("%s", event.log_line(str(use.ref.check.type)))
            self.bus.publish(
                Event.now(
                    DAEMON, "host_down" if down else "host_up",
                    system="RELAYD", subsystem=use.display_name,
                    type="HOST_DOWN" if down else "HOST_UP", table=use.display_name,
                    host=event.host, id=event.host_id, state=str(event.state),
                    error=str(event.error),
                )
            )  # fmt: skip

    # -- redirects -------------------------------------------------------------------------

    def redirect_rules(self) -> list[RedirectRules]:
        return [r for r in (rdr.rules() for rdr in self.runtime.redirects) if r is not None]

    async def redirect_loop(self) -> None:
        while True:
            await self._redirects_dirty.wait()
            self._redirects_dirty.clear()
            try:
                await self.count_redirects()
                if await self.nft.apply(self.redirect_rules()):
                    for rdr in self.runtime.redirects:
                        rdr.counted = 0
                    for rules in self.redirect_rules():
                        log.info("redirect %s: spreading over %s", rules.name,
                                 ", ".join(rules.hosts) or "no host")  # fmt: skip
            except CarpoolError as error:
                log.error("%s", error)
                await asyncio.sleep(1.0)
                self._redirects_dirty.set()

    async def least_states_loop(self) -> None:
        while True:
            await asyncio.sleep(LEAST_STATES_PERIOD)
            for rdr in self.runtime.redirects:
                if rdr.config.table.mode is not Mode.LEAST_STATES:
                    continue
                hosts = rdr.main.usable_addresses()
                counts = await conntrack_counts(hosts, rdr.main.ref.port)
                if counts:
                    fewest = min(counts.values())
                    least = tuple(h for h, c in counts.items() if c == fewest)
                    if least != rdr.least:
                        rdr.least = least
                        self._redirects_dirty.set()

    # -- workers (prefork) -----------------------------------------------------------------

    def host_states(self) -> dict[str, list[int]]:
        return {str(u.id): list(u.backend.balancer.up_hosts) for u in self.runtime.uses}

    def tell_workers(self) -> None:
        if not self.workers:
            return
        line = (json.dumps({"up": self.host_states()}) + "\n").encode()
        for worker in list(self.workers.values()):
            worker.send(line)

    # -- control ---------------------------------------------------------------------------

    def event(self, event_name: str, **attributes: str | int) -> None:
        self.bus.publish(Event.now(DAEMON, event_name, **attributes))

    async def cmd_show(self, args: Mapping[str, Any]) -> dict[str, Any]:
        await self.count_redirects()
        return dataclasses.asdict(self.runtime.status())

    def cmd_sessions(self, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        out = []
        for relay in self.runtime.relays:
            for info in relay.server.session_infos():
                out.append(dataclasses.asdict(SessionStatus(
                    proc=0, id=info.id, client_addr=info.client_addr,
                    client_port=info.client_port, backend_addr=info.backend_addr,
                    backend_port=info.backend_port, age=info.age, idle=info.idle,
                    relay=relay.id, pid=os.getpid(),
                )))  # fmt: skip
            for proc, sessions in relay.worker_sessions.items():
                for s in sessions:
                    out.append({**s, "proc": proc, "relay": relay.id})
        return out

    def cmd_host(self, args: Mapping[str, Any]) -> dict[str, Any]:
        enable = bool(args.get("enable"))
        found = self.runtime.find_hosts(str(args.get("host")))
        if not found:
            raise CommandError(f"no such host: {args.get('host')}")
        for use, host in found:
            changed = use.health.enable_host(host) if enable else use.health.disable_host(host)
            if changed:
                self.runtime.sync_balancer(use)
                self.event("ctl_host_enable" if enable else "ctl_host_disable", id=host,
                           name=use.health.hosts[host].name)  # fmt: skip
        self.tell_workers()
        self._redirects_dirty.set()
        return {"ok": True}

    def cmd_table(self, args: Mapping[str, Any]) -> dict[str, Any]:
        enable = bool(args.get("enable"))
        found = self.runtime.find_uses(str(args.get("table")))
        if not found:
            raise CommandError(f"no such table: {args.get('table')}")
        for use in found:
            if use.health.set_disabled(not enable):
                self.runtime.sync_balancer(use)
                self.event("ctl_table_enable" if enable else "ctl_table_disable", id=use.id,
                           name=use.display_name)  # fmt: skip
        self.tell_workers()
        self._redirects_dirty.set()
        return {"ok": True}

    def cmd_redirect(self, args: Mapping[str, Any]) -> dict[str, Any]:
        enable = bool(args.get("enable"))
        wanted = str(args.get("redirect"))
        found = [r for r in self.runtime.redirects
                 if str(r.id) == wanted or r.config.name == wanted]  # fmt: skip
        if not found:
            raise CommandError(f"no such redirect: {wanted}")
        for rdr in found:
            if rdr.disabled == enable:
                rdr.disabled = not enable
                self.event("ctl_rdr_enable" if enable else "ctl_rdr_disable", id=rdr.id,
                           name=rdr.config.name)  # fmt: skip
        self._redirects_dirty.set()
        return {"ok": True}

    def cmd_poll(self, args: Mapping[str, Any]) -> dict[str, Any]:
        for use in self.runtime.uses:
            use.health.poll(time.monotonic())
        return {"ok": True}

    def cmd_log(self, args: Mapping[str, Any]) -> dict[str, Any]:
        verbose = bool(args.get("verbose"))
        logging.getLogger("carpool").setLevel(logging.DEBUG if verbose else logging.INFO)
        return {"verbose": verbose}

    def cmd_reload(self, args: Mapping[str, Any]) -> dict[str, Any]:
        task = asyncio.ensure_future(self.reload())
        self.tasks.append(task)
        return {"reloading": True}

    def cmd_counters(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {r.config.name: dataclasses.asdict(r.counters()) for r in self.runtime.relays}

    # -- lifecycle -------------------------------------------------------------------------

    async def start_relays(self, runtime: Runtime) -> None:
        reuse = self.prefork > 1
        for relay in runtime.relays:
            for listen, tls in zip(relay.config.listen, relay.tls, strict=True):
                try:
                    await relay.server.listen(listen.address, listen.port, tls, reuse_port=reuse)
                except OSError as error:
                    raise CarpoolError(
                        f'relay "{relay.config.name}": cannot listen on {listen.address}:'
                        f"{listen.port}: {error.strerror}; check that the address is "
                        "configured and the port free"
                    ) from None

    async def reload(self) -> None:
        """Read the file again; established sessions finish on the old relays."""
        if self.reload_config is None:
            return
        try:
            config = self.reload_config()
            missing = unsupported(config)
            if missing is not None:
                raise ConfigError(missing)
            runtime = Runtime(config)
        except CarpoolError as error:
            log.error("reload refused, keeping the running configuration: %s", error)
            return
        old = self.runtime
        for relay in old.relays:
            relay.server.stop_listening()
        self.runtime = runtime
        try:
            await self.start_relays(runtime)
        except CarpoolError as error:
            log.error("reload: %s", error)
        for relay in old.relays:
            task = asyncio.ensure_future(self._drain(relay.server))
            self.tasks.append(task)
        await self.restart_workers()
        self._redirects_dirty.set()
        log.info("configuration reloaded: %d relays, %d redirects", len(runtime.relays),
                 len(runtime.redirects))  # fmt: skip

    async def _drain(self, server: Relay) -> None:
        while server.sessions:
            await asyncio.sleep(1.0)
        await server.close()

    async def count_redirects(self) -> None:
        """Fold the rules' counters into each redirect's session total."""
        if not self.runtime.redirects or self.nft.applied is None:
            return
        counters = await redirect_counters(self.nft.name)
        for rdr in self.runtime.redirects:
            now = counters.get(rdr.config.name, 0)
            rdr.sessions += now - rdr.counted if now >= rdr.counted else now
            rdr.counted = now

    async def history_loop(self) -> None:
        while True:
            await asyncio.sleep(60)
            await self.count_redirects()
            for relay in self.runtime.relays:
                relay.history.tick(relay.counters().sessions_total)
            for rdr in self.runtime.redirects:
                rdr.history.tick(rdr.sessions)

    async def restart_workers(self) -> None:
        for worker in list(self.workers.values()):
            await worker.stop()
        self.workers.clear()
        if self.worker_argv is None:
            return
        for number in range(1, self.prefork):
            self.workers[number] = await WorkerHandle.start(self, number)

    def worker_report(self, number: int, report: Mapping[str, Any]) -> None:
        for relay in self.runtime.relays:
            entry = report.get(relay.config.name)
            if entry is not None:
                relay.worker_counters[number] = entry["counters"]
                relay.worker_sessions[number] = entry["sessions"]

    async def run(self) -> None:
        handlers = {
            "show": self.cmd_show,
            "status": self.cmd_show,
            "sessions": self.cmd_sessions,
            "host": self.cmd_host,
            "table": self.cmd_table,
            "redirect": self.cmd_redirect,
            "poll": self.cmd_poll,
            "log": self.cmd_log,
            "reload": self.cmd_reload,
            "counters": self.cmd_counters,
        }
        async with DaemonShell(
            DAEMON, self.run_dir, handlers, self.bus, self.registry, self.metrics_address,
            on_hup=lambda: self.tasks.append(asyncio.ensure_future(self.reload())),
        ) as shell:  # fmt: skip
            await self.start_relays(self.runtime)
            if self.runtime.redirects and Path("/proc/sys/net/ipv4/ip_forward").read_text() \
                    .strip() == "0":
                log.warning("net.ipv4.ip_forward is 0: redirected packets will not be "
                            "forwarded; set it with sysctl -w net.ipv4.ip_forward=1")
            await self.restart_workers()
            loops = [self.check_loop(), self.redirect_loop(), self.least_states_loop(),
                     self.history_loop()]  # fmt: skip
            self.tasks += [asyncio.ensure_future(loop) for loop in loops]
            self._redirects_dirty.set()
            log.info("relayd started: %d relays, %d redirects, %d relay processes",
                     len(self.runtime.relays), len(self.runtime.redirects), self.prefork)
            try:
                await shell.stopping.wait()
            finally:
                for task in self.tasks:
                    task.cancel()
                for task in list(self.checks):
                    task.cancel()
                for worker in self.workers.values():
                    await worker.stop()
                for relay in self.runtime.relays:
                    await relay.server.close()
                if self.runtime.redirects or self.nft.applied is not None:
                    try:
                        await self.nft.remove()
                    except CarpoolError as error:
                        log.error("removing relayd's nftables table: %s", error)


# -- prefork workers -------------------------------------------------------------------------


class WorkerHandle:
    """A relay worker process as the parent sees it: its stdin takes host states,
    its stdout gives counter reports, one JSON object a line."""

    def __init__(self, daemon: RelaydDaemon, number: int,
                 process: asyncio.subprocess.Process) -> None:
        self.daemon = daemon
        self.number = number
        self.process = process
        self.reader = asyncio.ensure_future(self._read())

    @classmethod
    async def start(cls, daemon: RelaydDaemon, number: int) -> WorkerHandle:
        assert daemon.worker_argv is not None
        env = dict(os.environ, CARPOOL_RELAYD_HASH_SEED=daemon.runtime.hash_seed.hex())
        process = await asyncio.create_subprocess_exec(
            *daemon.worker_argv, "--worker", str(number), stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE, env=env,
        )  # fmt: skip
        handle = cls(daemon, number, process)
        handle.send((json.dumps({"up": daemon.host_states()}) + "\n").encode())
        return handle

    def send(self, line: bytes) -> None:
        stdin = self.process.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(line)

    async def _read(self) -> None:
        stdout = self.process.stdout
        assert stdout is not None
        while True:
            try:
                line = await stdout.readline()
            except (OSError, ValueError):
                return
            if not line:
                return
            try:
                self.daemon.worker_report(self.number, json.loads(line))
            except (ValueError, KeyError, TypeError):
                log.warning("relay worker %d sent an unreadable report", self.number)

    async def stop(self) -> None:
        self.reader.cancel()
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 5.0)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def run_worker(config: RelaydConfig, number: int, reports: int) -> None:
    """A relay worker: serve the relays with SO_REUSEPORT, follow the parent's host states
    from stdin, report counters on ``reports`` (the parent's pipe); end when stdin closes."""
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: None)
    loop.add_signal_handler(signal.SIGINT, lambda: None)
    seed = bytes.fromhex(os.environ.get("CARPOOL_RELAYD_HASH_SEED", ""))
    runtime = Runtime(config, hash_seed=seed or None)
    for relay in runtime.relays:
        for listen, tls in zip(relay.config.listen, relay.tls, strict=True):
            await relay.server.listen(listen.address, listen.port, tls, reuse_port=True)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = os.fdopen(reports, "wb", buffering=0)

    async def report() -> None:
        while True:
            await asyncio.sleep(WORKER_REPORT_PERIOD)
            data = {
                r.config.name: {
                    "counters": dataclasses.asdict(r.server.counters),
                    "sessions": [
                        dataclasses.asdict(SessionStatus(
                            proc=number, id=i.id, client_addr=i.client_addr,
                            client_port=i.client_port, backend_addr=i.backend_addr,
                            backend_port=i.backend_port, age=i.age, idle=i.idle,
                            relay=r.id, pid=os.getpid()))
                        for i in r.server.session_infos()[:1000]
                    ],
                }
                for r in runtime.relays
            }  # fmt: skip
            try:
                out.write((json.dumps(data) + "\n").encode())
            except OSError:
                return

    reporter = asyncio.ensure_future(report())
    try:
        while line := await reader.readline():
            states = json.loads(line).get("up", {})
            for use in runtime.uses:
                up = set(states.get(str(use.id), ()))
                for host in use.backend.balancer.hosts:
                    use.backend.balancer.set_up(host, host in up)
    finally:
        reporter.cancel()
        for relay in runtime.relays:
            await relay.server.close()


_USE_UVLOOP = [True]


def daemon_uses_uvloop() -> bool:
    return _USE_UVLOOP[0]


def new_event_loop(use_uvloop: bool) -> Callable[[Callable[[], Any]], None]:
    """A runner for a coroutine function on uvloop (default) or the plain asyncio loop."""

    def run(main: Callable[[], Any]) -> None:
        factory: Callable[[], asyncio.AbstractEventLoop] | None = None
        if use_uvloop:
            try:
                import uvloop

                factory = uvloop.new_event_loop
            except ImportError:
                log.warning("uvloop is not installed; running on the plain asyncio loop")
        # Sessions allocate many short-lived objects and few cycles: collect less often,
        # and leave what was loaded at start out of the collections.
        gc.collect()
        gc.freeze()
        gc.set_threshold(100_000, 50, 100)
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(main())

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relayd", description="Relays and health checks.")
    parser.add_argument("-f", dest="file", default=DEFAULT_CONFIG)
    parser.add_argument("-n", dest="check", action="store_true", help="check the file and exit")
    parser.add_argument("-d", dest="debug", action="store_true", help="log debugging details")
    parser.add_argument("-v", dest="verbose", action="store_true", help="log more")
    parser.add_argument("-D", dest="macros", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())
    parser.add_argument("--metrics", metavar="ADDR")
    parser.add_argument("--ssl-dir", default=None,
                        help="where keypairs are looked up (default /etc/ssl)")
    parser.add_argument("--nft-table", default=DEFAULT_NFT_TABLE,
                        help="name of relayd's nftables table (default relayd)")
    parser.add_argument("--prefork", type=int, default=None,
                        help="relay processes (default: the file's prefork, else 1)")
    parser.add_argument("--no-uvloop", action="store_true",
                        help="run on the plain asyncio event loop instead of uvloop")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    arguments = parser.parse_args(argv)
    setup_logging(logging.DEBUG if arguments.debug else logging.INFO)

    def body() -> int:
        macros = {}
        for item in arguments.macros:
            name, separator, value = item.partition("=")
            if not separator:
                raise ConfigError(f"-D {item}: use -D name=value")
            macros[name] = value

        def load() -> RelaydConfig:
            return load_relayd_config(arguments.file, macros, arguments.ssl_dir)

        config = load()
        if arguments.verbose:
            for warning in config.warnings:
                print(f"relayd: {warning}", file=sys.stderr)
        missing = unsupported(config)
        if missing is not None:
            raise ConfigError(f"{arguments.file}: {missing}")
        if arguments.check:
            Runtime(config)  # loads certificates and keys too
            print("configuration OK")
            return 0
        _USE_UVLOOP[0] = not arguments.no_uvloop
        if arguments.worker is not None:
            number = arguments.worker
            # stdout carries the reports to the parent: logging goes to stderr instead
            reports = os.dup(sys.stdout.fileno())
            os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
            new_event_loop(_USE_UVLOOP[0])(lambda: run_worker(config, number, reports))
            return 0
        prefork = arguments.prefork if arguments.prefork is not None else (
            config.prefork if _prefork_written(arguments.file) else 1)

        worker_argv = [sys.executable, "-m", "carpool.relayd.daemon", "-f", arguments.file,
                       *(f"-D{m}" for m in arguments.macros),
                       *(["--ssl-dir", arguments.ssl_dir] if arguments.ssl_dir else []),
                       *(["--no-uvloop"] if arguments.no_uvloop else [])]

        async def serve() -> None:
            daemon = RelaydDaemon(config, arguments.run_dir, arguments.metrics,
                                  reload_config=load, nft_table=arguments.nft_table,
                                  prefork=prefork, worker_argv=worker_argv)  # fmt: skip
            await daemon.run()

        new_event_loop(_USE_UVLOOP[0])(serve)
        return 0

    return run_command("relayd", body)


def _prefork_written(path: str) -> bool:
    """Whether the file sets ``prefork`` itself (relayd's default 3 is not forced on 2 cores)."""
    try:
        text = Path(path).read_text()
    except OSError:
        return False
    return any(line.split("#", 1)[0].split()[:1] == ["prefork"] for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
