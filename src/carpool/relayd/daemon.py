"""relayd: tables with health checks, and layer-4 relays forwarding to their up hosts.

The daemon builds, for every table use (``forward to <table> port P check ...``),
a health state (``relayd.health``) and a balancer (``relayd.balance``); checks run
on each table's interval and their verdicts move hosts in and out of the
balancer, with a ``host_up``/``host_down`` event and relayd's log line. Relays
(``relayd.relay``) pick from the balancers. relayctl talks to it over the control
socket.

Not yet served: TLS listeners, HTTP protocol filtering and redirects (nftables);
a configuration that needs them is refused with a message saying so.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from carpool.control import default_run_dir
from carpool.errors import CarpoolError, CommandError, ConfigError
from carpool.events import Event, EventBus, setup_logging
from carpool.relayd.balance import Balancer, table_key
from carpool.relayd.checks import run_check
from carpool.relayd.config import load_relayd_config
from carpool.relayd.health import HostDown, HostEvent, HostSpec, HostState, TableHealth
from carpool.relayd.model import ProtocolType, RelaydConfig, TableRef
from carpool.relayd.relay import Backend, TcpRelay
from carpool.relayd.relayctl_format import (
    HostStatus,
    RelaydStatus,
    RelayStatus,
    SessionStats,
    TableStatus,
)
from carpool.service import DaemonShell, run_command

log = logging.getLogger("carpool.relayd")
DAEMON = "relayd"
DEFAULT_CONFIG = "/etc/relayd.conf"


@dataclasses.dataclass
class TableUse:
    """One ``forward to <table> port P`` of one relay: its health and its balancer."""

    id: int
    ref: TableRef
    health: TableHealth
    backend: Backend

    @property
    def display_name(self) -> str:
        return f"{self.ref.table}:{self.ref.port}"


def unsupported(config: RelaydConfig) -> str | None:
    """What the configuration asks for that this relayd cannot serve yet, if anything."""
    if config.redirects:
        return f'redirect "{config.redirects[0].name}": redirects are not served yet'
    for relay in config.relays:
        if any(listen.tls for listen in relay.listen) or relay.forward_tls:
            return f'relay "{relay.name}": TLS is not served yet'
        protocol = config.protocol(relay.protocol)
        if protocol is not None and protocol.type is not ProtocolType.TCP:
            return f'relay "{relay.name}": {protocol.type} protocols are not served yet'
        if any(forward.table is None for forward in relay.forwards):
            return f'relay "{relay.name}": forwarding to an address is not served yet'
    return None


class RelaydDaemon:
    def __init__(self, config: RelaydConfig, run_dir: Path, metrics: str | None) -> None:
        self.config = config
        self.run_dir = run_dir
        self.metrics_address = metrics
        self.registry = CollectorRegistry()
        self.bus = EventBus(registry=self.registry)
        self.relays: dict[str, TcpRelay] = {}
        self.uses: dict[str, list[TableUse]] = {}
        self.checks: set[asyncio.Task[None]] = set()
        self._host_up = Gauge(
            "carpool_relayd_host_up", "1 if the host is up", ["table", "host"],
            registry=self.registry,
        )  # fmt: skip
        self._build()

    def _build(self) -> None:
        next_id = 1
        now = time.monotonic()
        for relay in self.config.relays:
            uses = []
            for ref in relay.tables:
                table = self.config.table(ref.table)
                assert table is not None
                hosts = [HostSpec(h.id, h.name, h.retry, h.parent) for h in table.hosts]
                health = TableHealth(
                    ref.table, hosts, ref.check, interval=ref.interval, table_id=next_id,
                    start=now,
                )  # fmt: skip
                balancer = Balancer(
                    [h.id for h in table.hosts], ref.mode, key=table_key(ref.mode_key),
                    up=health.usable_hosts(),
                )  # fmt: skip
                addresses = {h.id: h.name for h in table.hosts}
                uses.append(
                    TableUse(
                        next_id, ref, health, Backend(ref.table, ref.port, balancer, addresses)
                    )
                )
                next_id += 1
            self.uses[relay.name] = uses
            self.relays[relay.name] = TcpRelay(
                relay.name, [use.backend for use in uses], session_timeout=relay.session_timeout
            )

    # -- health checks ---------------------------------------------------------------------

    async def check_loop(self) -> None:
        while True:
            now = time.monotonic()
            for uses in self.uses.values():
                for use in uses:
                    hosts, events = use.health.start_round(now)
                    self.apply(use, events)
                    for host in hosts:
                        task = asyncio.ensure_future(self.check_host(use, host))
                        self.checks.add(task)
                        task.add_done_callback(self.checks.discard)
            await asyncio.sleep(0.2)

    async def check_host(self, use: TableUse, host_id: int) -> None:
        host = use.health.hosts[host_id]
        result = await run_check(host.name, use.ref.port, use.ref.check, use.ref.timeout / 1000)
        self.apply(use, use.health.record(host_id, result, time.monotonic()))

    def apply(self, use: TableUse, events: list[HostEvent]) -> None:
        for event in events:
            up = event.state is HostState.UP
            use.backend.balancer.set_up(event.host_id, up)
            self._host_up.labels(use.display_name, event.host).set(1 if up else 0)
            log.info("%s", event.log_line(str(use.ref.check.type)))
            self.bus.publish(
                Event.now(
                    DAEMON,
                    "host_down" if isinstance(event, HostDown) else "host_up",
                    system="RELAYD",
                    subsystem=use.display_name,
                    type="HOST_DOWN" if isinstance(event, HostDown) else "HOST_UP",
                    table=use.display_name,
                    host=event.host,
                    error=str(event.error),
                )
            )

    # -- control ---------------------------------------------------------------------------

    def status(self) -> RelaydStatus:
        relays = []
        for number, (name, relay) in enumerate(self.relays.items(), start=1):
            tables = tuple(
                TableStatus(
                    id=use.id,
                    name=use.display_name,
                    disabled=use.health.disabled,
                    hosts=tuple(
                        HostStatus(
                            id=h.id,
                            name=h.name,
                            state=str(h.state),
                            disabled=h.disabled,
                            parent=h.parent,
                            check_cnt=h.check_cnt,
                            up_cnt=h.up_cnt,
                            retry_cnt=h.retry_cnt,
                            error=str(h.error),
                        )
                        for h in use.health.hosts.values()
                    ),
                )
                for use in self.uses[name]
            )
            stats = SessionStats(cnt=relay.counters.sessions_total)
            relays.append(RelayStatus(id=number, name=name, tables=tables, stats=stats))
        return RelaydStatus(relays=tuple(relays))

    def cmd_show(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return dataclasses.asdict(self.status())

    def _find_host(self, args: Mapping[str, Any]) -> list[tuple[TableUse, int]]:
        wanted = args.get("host")
        found = []
        for uses in self.uses.values():
            for use in uses:
                for host in use.health.hosts.values():
                    if str(host.id) == str(wanted) or host.name == wanted:
                        found.append((use, host.id))
        if not found:
            raise CommandError(f"no such host: {wanted}")
        return found

    def cmd_host(self, args: Mapping[str, Any]) -> dict[str, Any]:
        enable = bool(args.get("enable"))
        for use, host in self._find_host(args):
            changed = use.health.enable_host(host) if enable else use.health.disable_host(host)
            if changed:
                up = enable and use.health.hosts[host].state is HostState.UP
                use.backend.balancer.set_up(host, up)
        return self.cmd_show({})

    def cmd_table(self, args: Mapping[str, Any]) -> dict[str, Any]:
        wanted, enable = args.get("table"), bool(args.get("enable"))
        matched = False
        for uses in self.uses.values():
            for use in uses:
                if str(use.id) == str(wanted) or wanted in (use.ref.table, use.display_name):
                    matched = True
                    use.health.set_disabled(not enable)
                    for host in use.health.hosts.values():
                        use.backend.balancer.set_up(host.id, enable and host.usable)
        if not matched:
            raise CommandError(f"no such table: {wanted}")
        return self.cmd_show({})

    def cmd_poll(self, args: Mapping[str, Any]) -> dict[str, Any]:
        for uses in self.uses.values():
            for use in uses:
                use.health.poll(time.monotonic())
        return {"ok": True}

    def cmd_counters(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {name: dataclasses.asdict(r.counters) for name, r in self.relays.items()}

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        handlers = {
            "show": self.cmd_show,
            "host": self.cmd_host,
            "table": self.cmd_table,
            "poll": self.cmd_poll,
            "counters": self.cmd_counters,
        }
        async with DaemonShell(
            DAEMON, self.run_dir, handlers, self.bus, self.registry, self.metrics_address
        ) as shell:
            for relay in self.config.relays:
                for listen in relay.listen:
                    try:
                        await self.relays[relay.name].listen(listen.address, listen.port)
                    except OSError as error:
                        raise CarpoolError(
                            f'relay "{relay.name}": cannot listen on {listen.address}:'
                            f"{listen.port}: {error.strerror}"
                        ) from None
            checker = asyncio.ensure_future(self.check_loop())
            log.info("relayd started: %d relays", len(self.relays))
            try:
                await shell.stopping.wait()
            finally:
                checker.cancel()
                for task in list(self.checks):
                    task.cancel()
                for relay_server in self.relays.values():
                    await relay_server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="relayd", description="Relays and health checks.")
    parser.add_argument("-f", dest="file", default=DEFAULT_CONFIG)
    parser.add_argument("-n", dest="check", action="store_true", help="check the file and exit")
    parser.add_argument("-d", dest="debug", action="store_true", help="log debugging details")
    parser.add_argument("-v", dest="verbose", action="store_true", help="log more")
    parser.add_argument("-D", dest="macros", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())
    parser.add_argument("--metrics", metavar="ADDR")
    arguments = parser.parse_args(argv)
    setup_logging(logging.DEBUG if arguments.debug else logging.INFO)

    def body() -> int:
        macros = {}
        for item in arguments.macros:
            name, separator, value = item.partition("=")
            if not separator:
                raise ConfigError(f"-D {item}: use -D name=value")
            macros[name] = value
        config = load_relayd_config(arguments.file, macros)
        if arguments.check:
            print("configuration OK")
            return 0
        missing = unsupported(config)
        if missing is not None:
            raise CarpoolError(f"{arguments.file}: {missing}")
        asyncio.run(RelaydDaemon(config, arguments.run_dir, arguments.metrics).run())
        return 0

    return run_command("relayd", body)


if __name__ == "__main__":
    sys.exit(main())
