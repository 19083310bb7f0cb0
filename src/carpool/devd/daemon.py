"""devd: FreeBSD's device-state daemon, fed by carpool's events and netlink link changes.

Every event (from carpd, hastd, pfsyncd, relayd, zfs-replicate, and the kernel's
link state) is turned into devd variables (``carpool.devd.sources``), matched
against the rules of devd.conf, and the actions of the matching rules run through
``/bin/sh``, one at a time (``carpool.devd.actions``).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter

from carpool.control import default_run_dir
from carpool.devd.actions import DEFAULT_TIMEOUT, ActionResult, ActionRunner
from carpool.devd.devdconf import DevdConfig, expand_action, load_devd_config
from carpool.devd.sources import (
    DAEMON_SYSTEMS,
    event_variables,
    follow_daemon,
    follow_links,
    link_variables,
)
from carpool.errors import CarpoolError
from carpool.events import Event, EventBus, setup_logging
from carpool.service import DaemonShell, run_command

log = logging.getLogger("carpool.devd")
DAEMON = "devd"
DEFAULT_PATHS = ("/etc/devd.conf", "/etc/devd")


class DevdDaemon:
    def __init__(
        self, paths: list[str], run_dir: Path, metrics: str | None, timeout: float
    ) -> None:
        self.paths = paths
        self.run_dir = run_dir
        self.metrics_address = metrics
        self.config: DevdConfig = load_devd_config(paths)
        self.registry = CollectorRegistry()
        self.bus = EventBus(registry=self.registry)
        self.runner = ActionRunner(timeout=timeout, on_result=self.action_done)
        self.events_seen = 0
        self.rules_matched = 0
        self._actions = PromCounter(
            "carpool_devd_actions", "devd actions by outcome", ["outcome"], registry=self.registry
        )

    def handle(self, variables_list: list[dict[str, str]]) -> None:
        """Run the actions of every rule that matches one of the event's forms."""
        self.events_seen += 1
        for variables in variables_list:
            log.debug("event %s", " ".join(f"{k}={v}" for k, v in variables.items()))
            for rule in self.config.matching_rules(variables):
                self.rules_matched += 1
                origin = f"{rule.kind} {rule.priority} at {rule.path}:{rule.line}"
                for action in rule.actions:
                    command = expand_action(action, {**self.config.variables, **variables})
                    self.runner.submit(command, origin, variables)

    def action_done(self, result: ActionResult) -> None:
        outcome = "ok" if result.ok else ("timeout" if result.returncode is None else "failed")
        self._actions.labels(outcome).inc()
        self.bus.publish(
            Event.now(
                DAEMON,
                f"action_{outcome}",
                command=result.command,
                origin=result.origin,
                returncode=-1 if result.returncode is None else result.returncode,
                seconds=round(result.seconds, 3),
            )
        )

    async def follow(self, daemon: str) -> None:
        async for event in follow_daemon(self.run_dir, daemon):
            self.handle(event_variables(event))

    async def follow_kernel_links(self) -> None:
        async for ifname, up in follow_links():
            self.handle([link_variables(ifname, up)])

    def status(self, args: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "rules": len(self.config.rules),
            "events": self.events_seen,
            "matched": self.rules_matched,
            "actions_ok": self.runner.completed,
            "actions_failed": self.runner.failed,
            "actions_timed_out": self.runner.timed_out,
            "running": self.runner.running,
            "queued": self.runner.queue.qsize(),
        }

    def reload(self, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        self.config = load_devd_config(self.paths)
        log.info("reloaded %d rules", len(self.config.rules))
        return {"rules": len(self.config.rules)}

    async def run(self) -> None:
        handlers = {"status": self.status, "reload": self.reload}
        async with DaemonShell(
            DAEMON, self.run_dir, handlers, self.bus, self.registry, self.metrics_address,
            on_hup=self._reload_quietly,
        ) as shell:  # fmt: skip
            tasks = [asyncio.ensure_future(self.runner.run_forever())]
            tasks += [asyncio.ensure_future(self.follow(name)) for name in DAEMON_SYSTEMS]
            tasks.append(asyncio.ensure_future(self.follow_kernel_links()))
            log.info(
                "devd started: %d rules from %s", len(self.config.rules), ", ".join(self.paths)
            )
            try:
                await shell.stopping.wait()
            finally:
                for task in tasks:
                    task.cancel()

    def _reload_quietly(self) -> None:
        try:
            self.reload()
        except CarpoolError as error:
            log.error("reload refused, keeping the running rules: %s", error)


def default_paths() -> list[str]:
    return [path for path in DEFAULT_PATHS if os.path.exists(path)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="devd", description="Run devd.conf actions on carpool's events and link changes."
    )
    parser.add_argument("-f", dest="files", action="append", help="a file or directory of rules")
    parser.add_argument("-d", dest="debug", action="store_true", help="log every event")
    parser.add_argument("-n", dest="check", action="store_true", help="check the rules and exit")
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())
    parser.add_argument("--metrics", metavar="ADDR")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="per action (s)")
    arguments = parser.parse_args(argv)
    setup_logging(logging.DEBUG if arguments.debug else logging.INFO)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)
    paths = arguments.files or default_paths()

    def body() -> int:
        if not paths:
            raise CarpoolError("no rules: give -f FILE (devd.conf) or create /etc/devd/*.conf")
        if arguments.check:
            config = load_devd_config(paths)
            print(f"{', '.join(paths)}: {len(config.rules)} rules OK")
            return 0
        daemon = DevdDaemon(paths, arguments.run_dir, arguments.metrics, arguments.timeout)
        asyncio.run(daemon.run())
        return 0

    return run_command("devd", body)


if __name__ == "__main__":
    sys.exit(main())
