"""The ``zfs-replicate daemon``: every job on its schedule, status and metrics.

Each job runs in a loop of its own: wait for the next cron time (or, in
``continuous`` mode, ``interval`` after the last cycle ended), then run one
cycle in a worker thread (the job's lock keeps a concurrent ``run`` out).
The control socket ``<run-dir>/zfs-replicate.sock`` answers ``status`` and
``run`` (start a job's cycle now); every cycle publishes
``replication_done`` or ``replication_failed`` and updates the Prometheus
metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from carpool.errors import CarpoolError
from carpool.events import Event, EventBus
from carpool.replicate.cli import PROGRAM, status_record
from carpool.replicate.config import Job, ReplicateConfig
from carpool.replicate.job import JobRunner
from carpool.replicate.state import StateStore
from carpool.service import DaemonShell

__all__ = ["EVENT_SOURCE", "ReplicateDaemon"]

EVENT_SOURCE = "replicate"
log = logging.getLogger("carpool.replicate")


class ReplicateDaemon:
    """Runs every job on its schedule; serves ``status`` and ``run`` on the control socket."""

    def __init__(
        self,
        config: ReplicateConfig,
        store: StateStore,
        make_runner: Callable[[Job], JobRunner],
        run_dir: Path,
        metrics_address: str | None,
    ) -> None:
        self.store = store
        self.make_runner = make_runner
        self.config = config
        self.run_dir = run_dir
        self.metrics_address = metrics_address
        self.registry = CollectorRegistry()
        self.bus = EventBus(registry=self.registry)
        self.triggers: dict[str, asyncio.Event] = {}
        self.running: set[str] = set()
        labels = ["job"]
        self.last_success = Gauge(
            "carpool_replicate_last_success_timestamp_seconds",
            "When the job last replicated successfully (seconds since the epoch).",
            labels,
            registry=self.registry,
        )
        self.lag = Gauge(
            "carpool_replicate_lag_seconds",
            "Age of the newest snapshot on the replica.",
            labels,
            registry=self.registry,
        )
        self.bytes_sent = Counter(
            "carpool_replicate_sent_bytes", "Stream bytes sent.", labels, registry=self.registry
        )
        self.cycles = Counter(
            "carpool_replicate_cycles",
            "Replication cycles by outcome.",
            ["job", "outcome"],
            registry=self.registry,
        )
        self.cycle_seconds = Gauge(
            "carpool_replicate_cycle_seconds",
            "Duration of the job's last cycle.",
            labels,
            registry=self.registry,
        )
        for job in config.jobs:
            self._watch_lag(job.name)

    def _watch_lag(self, name: str) -> None:
        store = self.store

        def current() -> float:
            lag = store.load(name).lag(time.time())
            return float("nan") if lag is None else lag

        self.lag.labels(name).set_function(current)
        state = store.load(name)
        if state.last_success is not None:
            self.last_success.labels(name).set(state.last_success)

    def status(self, args: Mapping[str, Any]) -> dict[str, Any]:
        now = time.time()
        return {
            "jobs": [
                {
                    **status_record(self.store.load(job.name), now),
                    "running": job.name in self.running,
                    "schedule": "continuous"
                    if job.schedule.continuous
                    else (job.schedule.cron.expression if job.schedule.cron else ""),
                }
                for job in self.config.jobs
            ]
        }

    def trigger(self, args: Mapping[str, Any]) -> dict[str, Any]:
        name = args.get("job")
        names = [j.name for j in self.config.jobs] if name is None else [str(name)]
        for job_name in names:
            if job_name not in self.triggers:
                raise CarpoolError(f"no job named {job_name!r}")
            self.triggers[job_name].set()
        return {"triggered": names}

    async def cycle(self, job: Job) -> None:
        runner = self.make_runner(job)
        self.running.add(job.name)
        try:
            result = await asyncio.to_thread(runner.run)
        except Exception as error:  # the daemon outlives any one cycle
            if not isinstance(error, CarpoolError):
                log.exception("job %s: unexpected error in a cycle", job.name)
            self.cycles.labels(job.name, "failed").inc()
            self.bus.publish(
                Event.now(EVENT_SOURCE, "replication_failed", job=job.name, error=str(error))
            )
            return
        finally:
            self.running.discard(job.name)
        self.cycles.labels(job.name, "ok").inc()
        self.bytes_sent.labels(job.name).inc(result.bytes_sent)
        self.cycle_seconds.labels(job.name).set(result.seconds)
        self.last_success.labels(job.name).set(time.time())
        self.bus.publish(
            Event.now(
                EVENT_SOURCE,
                "replication_done",
                job=job.name,
                action=result.action,
                snapshot=result.snapshot or "",
                bytes=result.bytes_sent,
                seconds=round(result.seconds, 3),
            )
        )

    async def job_loop(self, job: Job, stopping: asyncio.Event) -> None:
        trigger = self.triggers[job.name]
        after = datetime.now().astimezone()
        if job.schedule.continuous:
            after = after - (job.schedule.interval or after - after)
        while not stopping.is_set():
            due = job.schedule.next_fire(after)
            delay = (due - datetime.now().astimezone()).total_seconds()
            if delay > 0:
                waiter = asyncio.ensure_future(trigger.wait())
                stopper = asyncio.ensure_future(stopping.wait())
                await asyncio.wait(
                    {waiter, stopper}, timeout=delay, return_when=asyncio.FIRST_COMPLETED
                )
                waiter.cancel()
                stopper.cancel()
                if stopping.is_set():
                    return
            early = trigger.is_set() and datetime.now().astimezone() < due
            trigger.clear()
            await self.cycle(job)
            if job.schedule.continuous:
                after = datetime.now().astimezone()
            elif not early:
                after = due  # a run asked for early keeps the scheduled one

    async def run(self) -> None:
        handlers = {"status": self.status, "run": self.trigger}
        self.triggers = {job.name: asyncio.Event() for job in self.config.jobs}
        async with DaemonShell(
            PROGRAM, self.run_dir, handlers, self.bus, self.registry, self.metrics_address
        ) as shell:
            tasks = [
                asyncio.ensure_future(self.job_loop(job, shell.stopping))
                for job in self.config.jobs
            ]
            log.info("zfs-replicate daemon started: %d job(s)", len(tasks))
            try:
                await shell.stopping.wait()
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                while self.running:
                    await asyncio.sleep(0.1)
