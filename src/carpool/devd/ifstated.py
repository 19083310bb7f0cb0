"""ifstated: OpenBSD's interface-state daemon, on netlink links and carpd's CARP states.

The machine (``carpool.devd.ifstated_machine``) decides; this shell feeds it link
changes from netlink, CARP changes from carpd's event stream, and the results of
``"command" every N`` tests, and runs what it returns: ``run`` commands one at a
time through ``/bin/sh`` with a timeout, and external tests on their schedules.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from carpool.control import ControlError, async_request, default_run_dir, socket_path
from carpool.devd.actions import DEFAULT_TIMEOUT, ActionResult, ActionRunner
from carpool.devd.ifstated_machine import (
    CancelExternal,
    IfstatedMachine,
    LoopDetected,
    MachineAction,
    RunCommand,
    ScheduleExternal,
    StateEntered,
)
from carpool.devd.ifstatedconf import IfstatedConfig, load_ifstated_config
from carpool.devd.sources import follow_daemon, follow_links
from carpool.events import Event, EventBus, setup_logging
from carpool.net.netlink import Netlink
from carpool.service import DaemonShell, run_command

log = logging.getLogger("carpool.ifstated")
DAEMON = "ifstated"
DEFAULT_CONFIG = "/etc/ifstated.conf"


class IfstatedDaemon:
    def __init__(self, config: IfstatedConfig, run_dir: Path, metrics: str | None, timeout: float):
        self.config = config
        self.run_dir = run_dir
        self.metrics_address = metrics
        self.machine = IfstatedMachine(config)
        self.registry = CollectorRegistry()
        self.bus = EventBus(registry=self.registry)
        self.runner = ActionRunner(timeout=timeout, on_result=self.command_done)
        self.timeout = timeout
        self.externals: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._state = Gauge(
            "carpool_ifstated_state", "1 for the current state", ["state"], registry=self.registry
        )

    def perform(self, actions: list[MachineAction]) -> None:
        for action in actions:
            if isinstance(action, RunCommand):
                self.runner.submit(action.cmd, f"state {self.machine.current}")
            elif isinstance(action, StateEntered):
                log.info("changing state to %s", action.name)
                for name in self.config.states:
                    self._state.labels(name).set(1 if name == action.name else 0)
                self.bus.publish(Event.now(DAEMON, "STATE", state=action.name))
            elif isinstance(action, ScheduleExternal):
                key = (action.command, action.every_seconds)
                if key not in self.externals:
                    self.externals[key] = asyncio.ensure_future(self.external(*key))
            elif isinstance(action, CancelExternal):
                task = self.externals.pop((action.command, action.every_seconds), None)
                if task is not None:
                    task.cancel()
            elif isinstance(action, LoopDetected):
                log.error("%s", action.message)
                self.bus.publish(
                    Event.now(
                        DAEMON, "LOOP", states=" ".join(action.states), message=action.message
                    )
                )

    def command_done(self, result: ActionResult) -> None:
        outcome = "ok" if result.ok else ("timeout" if result.returncode is None else "failed")
        self.bus.publish(Event.now(DAEMON, f"run_{outcome}", command=result.command))

    async def external(self, command: str, every: int) -> None:
        """Run an external test now and every ``every`` seconds; its exit status is the value."""
        while True:
            try:
                process = await asyncio.create_subprocess_exec(
                    "/bin/sh", "-c", command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.DEVNULL,
                    start_new_session=True,
                )  # fmt: skip
                try:
                    ok = await asyncio.wait_for(process.wait(), max(1.0, every)) == 0
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await process.wait()
                    ok = False
            except OSError as error:
                log.warning("external test %r could not run: %s", command, error)
                ok = False
            self.perform(self.machine.external_result(command, ok))
            await asyncio.sleep(every)

    async def follow_links(self) -> None:
        async for ifname, up in follow_links():
            self.perform(self.machine.link_changed(ifname, "up" if up else "down"))

    async def follow_carp(self) -> None:
        async for event in follow_daemon(self.run_dir, "carpd"):
            attributes = event.attributes
            if attributes.get("system") == "CARP" and "vhid" in attributes:
                state = str(attributes.get("type", event.name))
                self.perform(
                    self.machine.carp_changed(
                        str(attributes["ifname"]), int(attributes["vhid"]), state
                    )
                )

    async def initial_states(self) -> None:
        """What the links and carpd say now, before any change is reported."""
        netlink = Netlink()
        try:
            for link in await netlink.links():
                self.perform(self.machine.link_changed(link.ifname, "up" if link.up else "down"))
        finally:
            await netlink.close()
        with contextlib.suppress(ControlError):
            status = await async_request(socket_path(self.run_dir, "carpd"), "status")
            for ifname, interface in status["interfaces"].items():
                for vhid in interface["vhids"]:
                    self.perform(self.machine.carp_changed(ifname, vhid["vhid"], vhid["state"]))

    def status(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "state": self.machine.current,
            "externals": sorted(f"{c} every {n}" for c, n in self.externals),
            "commands_ok": self.runner.completed,
            "commands_failed": self.runner.failed,
            "commands_timed_out": self.runner.timed_out,
        }

    async def run(self) -> None:
        async with DaemonShell(
            DAEMON, self.run_dir, {"status": self.status}, self.bus, self.registry,
            self.metrics_address,
        ) as shell:  # fmt: skip
            tasks = [asyncio.ensure_future(self.runner.run_forever())]
            tasks.append(asyncio.ensure_future(self.follow_links()))
            self.perform(self.machine.start())
            await self.initial_states()
            tasks.append(asyncio.ensure_future(self.follow_carp()))
            log.info("ifstated started in state %s", self.machine.current)
            try:
                await shell.stopping.wait()
            finally:
                for task in [*tasks, *self.externals.values()]:
                    task.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="ifstated", description="Run ifstated.conf state machines on link and CARP states."
    )
    parser.add_argument("-f", dest="file", default=DEFAULT_CONFIG)
    parser.add_argument("-n", dest="check", action="store_true", help="check the file and exit")
    parser.add_argument("-d", dest="debug", action="store_true", help="log debugging details")
    parser.add_argument("-v", dest="verbose", action="store_true", help="log more")
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())
    parser.add_argument("--metrics", metavar="ADDR")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per command (s)")
    arguments = parser.parse_args(argv)
    setup_logging(logging.DEBUG if arguments.debug else logging.INFO)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)

    def body() -> int:
        config = load_ifstated_config(arguments.file)
        if arguments.check:
            print(f"{arguments.file}: configuration OK ({len(config.states)} states)")
            return 0
        daemon = IfstatedDaemon(config, arguments.run_dir, arguments.metrics, arguments.timeout)
        asyncio.run(daemon.run())
        return 0

    return run_command("ifstated", body)


if __name__ == "__main__":
    sys.exit(main())
