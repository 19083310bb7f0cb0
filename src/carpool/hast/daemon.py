"""hastd: the asyncio shell around ``hast.primary`` and ``hast.secondary``.

Every resource of hast.conf starts in role init. ``hastctl role primary RES``
opens the local provider, starts a :class:`~carpool.hast.primary.PrimaryMachine`
and exports the resource over NBD on ``<run-dir>/hast/RES.sock`` (the
``/dev/hast/RES`` of FreeBSD); ``role secondary`` starts a
:class:`~carpool.hast.secondary.SecondaryMachine` that serves the primary
connecting to this node's ``listen`` address. The machines decide everything;
this module performs their actions (disk I/O, the link, NBD replies, hooks) and
feeds the completions back.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from carpool.control import default_run_dir
from carpool.errors import CarpoolError, CommandError
from carpool.events import Event as BusEvent
from carpool.events import EventBus, setup_logging
from carpool.hast import actions as act
from carpool.hast.common import Checksum, Role
from carpool.hast.config import HastConfig, ResourceConfig, default_config_path, load_config
from carpool.hast.device import AttachedDevice, DeviceError, attach, detach
from carpool.hast.link import LinkError, PeerLink, dial, listen
from carpool.hast.metadata import MetadataError, write_at
from carpool.hast.nbd import Request
from carpool.hast.nbdserver import NbdServer, Respond
from carpool.hast.primary import PrimaryMachine
from carpool.hast.provider import ActivemapStore, LocalProvider
from carpool.hast.roles import change_role
from carpool.hast.secondary import SecondaryMachine
from carpool.hast.wire import NONCE_SIZE, Hello, Message
from carpool.metrics import parse_listen_address
from carpool.service import DaemonShell, run_command

log = logging.getLogger("carpool.hastd")
DAEMON = "hastd"
TICK = 0.1
#: Seconds a shrinking activemap may wait for a client's flush before hastd flushes.
CLEAR_INTERVAL = 5.0

Machine = PrimaryMachine | SecondaryMachine


class Worker:
    """One resource in role primary or secondary: its provider, machine and link."""

    def __init__(self, daemon: HastDaemon, config: ResourceConfig, provider: LocalProvider):
        self.daemon = daemon
        self.config = config
        self.provider = provider
        self.machine: Machine | None = None
        self.link: PeerLink | None = None
        self.status = "degraded"
        self.nbd: NbdServer | None = None
        self.pending: dict[int, Respond] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.queue: collections.deque[act.Action] = collections.deque()
        self.completions: collections.deque[Callable[[], list[act.Action]]] = collections.deque()
        self.performing = False
        self.draining = False
        self.activemap = ActivemapStore(provider, provider.read_activemap())
        self.last_flush = time.monotonic()
        self.next_cookie = 1
        self.verifying: dict[int, asyncio.Future[act.VerifyDone]] = {}

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- performing the machine's actions ---------------------------------------------------
    #
    # Disk I/O is carried out inline, on the loop (page-cache writes and reads, and
    # the fsyncs that durability needs); its completion is fed back to the machine
    # after the actions already queued, exactly as if it had completed later. One
    # queue, no task per request.

    def perform(self, actions: list[act.Action]) -> None:
        self.queue.extend(actions)
        if self.performing:
            return
        self.performing = True
        try:
            while self.machine is not None:
                if self.queue:
                    self._perform_one(self.queue.popleft())
                elif self.completions:
                    self.queue.extend(self.completions.popleft()())
                else:
                    break
        finally:
            self.performing = False
            if self.machine is None:
                self.queue.clear()
                self.completions.clear()

    def _perform_one(self, action: act.Action) -> None:
        # The most frequent actions are tested first: a write, the reply, a send.
        machine = self.machine
        assert machine is not None
        disk = self.provider.data
        if isinstance(action, act.LocalWrite | act.LocalTrim | act.LocalWriteZeroes):
            ok = True
            try:
                if isinstance(action, act.LocalWrite):
                    disk.write_now(action.offset, action.data, action.fua)
                elif isinstance(action, act.LocalTrim):
                    disk.trim_now(action.offset, action.length, action.fua)
                else:
                    disk.write_zeroes_now(action.offset, action.length, action.fua, False)
            except CarpoolError as error:
                log.error("%s: local write failed: %s", self.config.name, error)
                ok = False
            id = action.id
            self.completions.append(lambda: machine.local_write_done(id, ok, time.monotonic()))
        elif isinstance(action, act.ReplyToClient):
            respond = self.pending.pop(action.cookie, None)
            if respond is not None:
                respond(action.error, action.data if action.data is None else
                        memoryview(action.data))  # fmt: skip
        elif isinstance(action, act.SendToPeer):
            link = self.link
            if link is not None:
                link.send(action.message)
                if link.needs_drain and not self.draining:
                    # The peer falls behind: take no new client requests until it catches up.
                    self.draining = True
                    if self.nbd is not None:
                        self.nbd.pause_reading()
                    self.spawn(self._drain(link))
        elif isinstance(action, act.LocalRead):
            try:
                data: bytes | None = disk.read_now(action.offset, action.length)
            except CarpoolError as error:
                log.error("%s: local read failed: %s", self.config.name, error)
                data = None
            id = action.id
            self.completions.append(lambda: machine.local_read_done(id, data, time.monotonic()))
        elif isinstance(action, act.LocalFlush):
            ok = True
            snapshot = self.activemap.snapshot()
            try:
                disk.flush_now()
                self.activemap.flushed(snapshot)
            except (CarpoolError, OSError) as error:
                log.error("%s: local flush failed: %s", self.config.name, error)
                ok = False
            self.last_flush = time.monotonic()
            id = action.id
            self.completions.append(lambda: machine.local_flush_done(id, ok, time.monotonic()))
        elif isinstance(action, act.WriteMetadata | act.WriteActivemap):
            ok = True
            try:
                if isinstance(action, act.WriteMetadata):
                    # Rare (counter changes): a full fsync, the data before it included.
                    write_at(self.provider.fd, action.offset, action.data)
                    self.provider.metadata = action.metadata
                else:
                    self.activemap.store(action.bitmap)
            except (OSError, CarpoolError) as error:
                log.error("%s: metadata write failed: %s", self.config.name, error)
                ok = False
            token = action.token
            self.completions.append(lambda: machine.metadata_written(token, ok, time.monotonic()))
        elif isinstance(action, act.ClosePeer):
            self._close_link(action.reason)
        elif isinstance(action, act.ConnectPeer):
            self.spawn(self._connect())
        elif isinstance(action, act.Event):
            self.daemon.hook(self.config, action.name, dict(action.attrs))
        elif isinstance(action, act.VerifyDone):
            waiter = self.verifying.pop(action.id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(action)
        elif isinstance(action, act.StatusChanged):
            self.status = action.status
            self.daemon.status_gauge.labels(self.config.name).set(
                1 if action.status == "complete" else 0
            )

    def flush_if_clears_wait(self, now: float) -> None:
        """Without client flushes, still let the on-disk activemap shrink now and then."""
        if self.activemap.clears_pending and now - self.last_flush >= CLEAR_INTERVAL:
            snapshot = self.activemap.snapshot()
            try:
                self.provider.data.flush_now()
                self.activemap.flushed(snapshot)
            except (CarpoolError, OSError) as error:
                log.error("%s: flush failed: %s", self.config.name, error)
            self.last_flush = now

    async def _drain(self, link: PeerLink) -> None:
        try:
            with contextlib.suppress(LinkError):
                await link.drain()
        finally:
            self.draining = False
            if self.nbd is not None:
                self.nbd.resume_reading()

    # -- the link -------------------------------------------------------------------------

    async def _connect(self) -> None:
        remote = self.config.remote
        if remote is None or not remote.host or self.link is not None:
            return
        source = self.config.source.host if self.config.source and self.config.source.host else None
        try:
            link = await dial(
                remote.host, remote.port or 8457, timeout=float(self.config.timeout),
                checksum=self.config.checksum, compression=self.config.compression,
                source=source,
            )  # fmt: skip
        except LinkError as error:
            log.debug("%s: %s", self.config.name, error)
            return
        if self.machine is None or self.link is not None:
            await link.close()
            return
        self.attach(link)
        self.perform(self.machine.peer_connected(time.monotonic(), os.urandom(NONCE_SIZE)))

    def attach(self, link: PeerLink) -> None:
        """From now on the link's messages go to the machine, as they arrive."""
        self.link = link

        def on_message(message: Message) -> None:
            if self.link is link and self.machine is not None:
                self.perform(self.machine.peer_message(time.monotonic(), message))

        def on_error(error: LinkError) -> None:
            if self.link is link and self.machine is not None:
                self.link = None
                self.spawn(link.close())
                self.perform(self.machine.peer_disconnected(time.monotonic(), str(error)))

        link.deliver_to(on_message, on_error)

    def _close_link(self, reason: str) -> None:
        link, self.link = self.link, None
        if link is not None:
            log.info("%s: closing the link: %s", self.config.name, reason)
            self.spawn(link.close())

    # -- NBD ------------------------------------------------------------------------------

    def submit(self, request: Request, respond: Respond) -> None:
        machine = self.machine
        if not isinstance(machine, PrimaryMachine):
            respond(5, None)  # EIO: no longer primary
            return
        cookie = self.next_cookie
        self.next_cookie += 1
        self.pending[cookie] = respond
        unique = Request(cookie, request.command, request.flags, request.offset,
                         request.length, request.data)  # fmt: skip
        self.perform(machine.request(time.monotonic(), unique))

    async def verify(self, window: int = 4) -> dict[str, Any]:
        """Compare both disks extent by extent while the resource stays in use."""
        machine = self.machine
        if not isinstance(machine, PrimaryMachine):
            raise CommandError(f"{self.config.name}: verify runs on the primary")
        if not machine.connected:
            raise CommandError(
                f"{self.config.name}: the secondary is not connected (status degraded); "
                "verify needs both nodes"
            )
        size, extent = machine.metadata.datasize, machine.metadata.extentsize
        ranges = [(offset, min(extent, size - offset)) for offset in range(0, size, extent)]
        differing: list[dict[str, int]] = []
        errors: list[str] = []
        checked = 0
        semaphore = asyncio.Semaphore(window)
        algorithm = self.config.checksum if self.config.checksum is not Checksum.NONE else (
            Checksum.SHA256)  # fmt: skip

        async def one(offset: int, length: int) -> None:
            nonlocal checked
            async with semaphore:
                if self.machine is not machine:
                    errors.append("the role changed during verify")
                    return
                waiter: asyncio.Future[act.VerifyDone] = asyncio.get_running_loop().create_future()
                id, actions = machine.verify(time.monotonic(), offset, length, algorithm)
                self.verifying[id] = waiter
                self.perform(actions)
                done = await waiter
                if done.same is None:
                    errors.append(f"{offset}+{length}: {done.error}")
                else:
                    checked += length
                    if not done.same:
                        differing.append({"offset": offset, "length": length})

        await asyncio.gather(*(one(offset, length) for offset, length in ranges))
        differing.sort(key=lambda entry: entry["offset"])
        self.daemon.bus.publish(BusEvent.now(
            DAEMON, "verify", system="HAST", subsystem=self.config.name,
            resource=self.config.name, differing=len(differing), errors=len(errors),
        ))  # fmt: skip
        return {"name": self.config.name, "algorithm": algorithm.value, "size": size,
                "checked": checked, "differing": differing, "errors": errors[:20]}  # fmt: skip

    async def ticker(self) -> None:
        while self.machine is not None:
            now = time.monotonic()
            self.perform(self.machine.tick(now))
            self.flush_if_clears_wait(now)
            await asyncio.sleep(TICK)

    async def stop(self) -> None:
        self._close_link("role change")
        if self.nbd is not None:
            await self.nbd.close()
        self.machine = None
        for task in list(self.tasks):
            task.cancel()
        for respond in self.pending.values():
            respond(5, None)
        self.pending.clear()
        for id, waiter in list(self.verifying.items()):
            if not waiter.done():
                waiter.set_result(act.VerifyDone(id, 0, 0, None, "the role changed"))
        self.verifying.clear()
        self.provider.close()


class HastDaemon:
    def __init__(
        self,
        config: HastConfig,
        config_path: str,
        run_dir: Path,
        metrics: str | None,
        nbd_tcp: dict[str, tuple[str, int]] | None = None,
        dev_dir: Path | None = None,
    ):
        self.nbd_tcp = nbd_tcp or {}
        self.dev_dir = dev_dir
        self.devices: dict[str, AttachedDevice] = {}
        self.config = config
        self.config_path = config_path
        self.run_dir = run_dir
        self.metrics_address = metrics
        self.registry = CollectorRegistry()
        self.bus = EventBus(registry=self.registry)
        self.roles: dict[str, Role] = {r.name: Role.INIT for r in config.resources}
        self.workers: dict[str, Worker] = {}
        self.listeners: list[asyncio.AbstractServer] = []
        self.refused_connections = 0
        self.admitting: set[asyncio.Task[None]] = set()
        self.hooks: set[asyncio.Task[None]] = set()
        self.status_gauge = Gauge(
            "carpool_hast_complete", "1 while the resource is replicated (complete)",
            ["resource"], registry=self.registry,
        )  # fmt: skip
        self.registry.register(HastCollector(self))

    @property
    def device_dir(self) -> Path:
        return self.run_dir / "hast"

    def hook(
        self,
        config: ResourceConfig,
        name: str,
        attributes: dict[str, Any],
        arguments: tuple[str, ...] = (),
    ) -> None:
        """An event: published on the control channel, and ``exec EVENT RESOURCE [ARGS]`` run
        as hastd runs it (``role`` gets the old and the new role)."""
        extra = {k: v for k, v in attributes.items() if isinstance(v, str | int)}
        event = BusEvent.now(
            DAEMON, name, system="HAST", subsystem=config.name, type=name,
            resource=config.name, **extra,
        )  # fmt: skip
        self.bus.publish(event)
        if config.exec:
            task = asyncio.ensure_future(self._run_hook(config.exec, name, config.name, *arguments))
            self.hooks.add(task)
            task.add_done_callback(self.hooks.discard)

    async def _run_hook(self, program: str, event: str, resource: str, *extra: str) -> None:
        try:
            process = await asyncio.create_subprocess_exec(program, event, resource, *extra)
            await asyncio.wait_for(process.wait(), 60)
        except (OSError, TimeoutError) as error:
            log.warning("hook %s %s %s failed: %s", program, event, resource, error)

    # -- roles ------------------------------------------------------------------------------

    async def set_role(self, name: str, role: str) -> dict[str, Any]:
        config = self.config.resource(name)
        current = self.roles[name]
        try:
            provider = LocalProvider.open(config.local, name)
        except (MetadataError, CarpoolError) as error:
            if role != "init":
                raise CommandError(str(error)) from None
            provider = None
        metadata = provider.metadata if provider is not None else None
        change = change_role(name, current, role, metadata, new_resuid=lambda: secrets.randbits(64))
        if provider is not None and not change.changed:
            provider.close()
            return self.describe(name)
        device = self.devices.get(name)
        if device is not None:
            if device.in_use():
                if provider is not None:
                    provider.close()
                raise CommandError(
                    f"{name}: {device.link} is in use (mounted?); unmount it before "
                    f"`hastctl role {role} {name}`"
                )
            del self.devices[name]
            await detach(device)
        worker = self.workers.pop(name, None)
        if worker is not None:
            await worker.stop()
        if change.metadata is not None and provider is not None:
            provider.store_metadata(change.metadata)
        self.roles[name] = change.new
        if change.new is Role.INIT:
            if provider is not None:
                provider.close()
        else:
            assert provider is not None
            await self._start_worker(config, provider, change.new, change.virgin)
            if change.new is Role.PRIMARY and self.dev_dir is not None:
                try:
                    self.devices[name] = await attach(
                        config.provname, self.device_dir / f"{config.provname}.sock",
                        self.dev_dir, self.device_dir / f"{config.provname}.fuse",
                    )  # fmt: skip
                except DeviceError as error:
                    log.error("%s: no %s/%s: %s", name, self.dev_dir, config.provname, error)
        self.hook(
            config, "role", {"old": change.old.value, "new": change.new.value},
            (change.old.value, change.new.value),
        )  # fmt: skip
        return self.describe(name)

    async def _start_worker(
        self, config: ResourceConfig, provider: LocalProvider, role: Role, virgin: bool
    ) -> None:
        worker = Worker(self, config, provider)
        now = time.monotonic()
        bitmap = provider.read_activemap()
        if role is Role.PRIMARY:
            machine: Machine = PrimaryMachine(
                config.name, provider.metadata, bitmap, now=now,
                replication=config.replication, timeout=float(config.timeout),
                virgin=virgin, key=config.key, mapsize=provider.mapsize,
            )  # fmt: skip
        else:
            machine = SecondaryMachine(config.name, provider.metadata, bitmap, now=now,
                                       key=config.key, timeout=float(config.timeout))  # fmt: skip
        worker.machine = machine
        self.workers[config.name] = worker
        worker.spawn(worker.ticker())
        if isinstance(machine, PrimaryMachine):
            self.device_dir.mkdir(parents=True, exist_ok=True)
            worker.nbd = NbdServer(config.provname, size=provider.metadata.datasize,
                                   submit=worker.submit)  # fmt: skip
            await worker.nbd.listen_unix(self.device_dir / f"{config.provname}.sock")
            if config.name in self.nbd_tcp:
                host, port = self.nbd_tcp[config.name]
                try:
                    await worker.nbd.listen_tcp(host, port)
                except OSError as error:
                    log.warning("%s: no NBD export on %s:%d: %s", config.name, host, port,
                                error.strerror)  # fmt: skip
            worker.perform(machine.start(now))

    def accept(self, link: PeerLink) -> None:
        task = asyncio.ensure_future(self.admit(link))
        self.admitting.add(task)
        task.add_done_callback(self.admitting.discard)

    async def admit(self, link: PeerLink) -> None:
        """A primary connects: its HELLO says which resource it wants."""
        try:
            first = await asyncio.wait_for(link.next_message(), 20)
        except (LinkError, TimeoutError) as error:
            log.info("refused a connection from %s: %s", link.peer, error)
            self.refused_connections += 1
            await link.close()
            return
        worker = self.workers.get(first.resource) if isinstance(first, Hello) else None
        if worker is None or not isinstance(worker.machine, SecondaryMachine):
            log.info("refused a connection from %s: not secondary for it", link.peer)
            self.refused_connections += 1
            await link.close()
            return
        if not await self.is_remote(worker.config, link.peer):
            log.warning("%s: refused a connection from %s: not the remote of hast.conf (%s)",
                        worker.config.name, link.peer, worker.config.remote_host)  # fmt: skip
            self.refused_connections += 1
            await link.close()
            return
        machine = worker.machine
        link.checksum, link.compression = worker.config.checksum, worker.config.compression
        worker._close_link("a new connection from the primary")
        worker.link = link
        worker.perform(machine.peer_connected(time.monotonic(), os.urandom(NONCE_SIZE)))
        worker.perform(machine.peer_message(time.monotonic(), first))
        if worker.link is link:
            worker.attach(link)

    @staticmethod
    async def is_remote(config: ResourceConfig, peer: Any) -> bool:
        """Whether a connection comes from the resource's ``remote`` (as hastd checks)."""
        remote = config.remote_host
        if not remote:
            return True  # remote none: the primary is not known yet
        address = peer[0] if isinstance(peer, tuple) and peer else None
        if not isinstance(address, str):
            return False
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(remote, None)
        except OSError:
            return False
        known = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
        peer_address = ipaddress.ip_address(address.split("%")[0])
        if isinstance(peer_address, ipaddress.IPv6Address) and peer_address.ipv4_mapped:
            peer_address = peer_address.ipv4_mapped
        return peer_address in known

    # -- control ----------------------------------------------------------------------------

    def describe(self, name: str) -> dict[str, Any]:
        config = self.config.resource(name)
        worker = self.workers.get(name)
        machine = worker.machine if worker else None
        entry: dict[str, Any] = {
            "name": name,
            "role": self.roles[name].value,
            "provname": config.provname,
            "localpath": config.local,
            "remoteaddr": config.remote.text if config.remote else "none",
            "replication": config.replication.value,
            "status": "-",
            "dirty": 0,
        }
        if worker is not None and machine is not None:
            entry["status"] = worker.status if isinstance(machine, PrimaryMachine) else (
                "complete" if worker.link is not None else "degraded")  # fmt: skip
            if name in self.devices:
                entry["dev"] = str(self.devices[name].link)
            if isinstance(machine, PrimaryMachine):
                entry["dirty"] = machine.dirty_bytes
                entry["sync_bytes_sent"] = machine.sync_bytes_sent
                entry["resyncing"] = machine.resync is not None
                entry["device"] = str(self.device_dir / f"{config.provname}.sock")
                if config.name in self.nbd_tcp:
                    host, port = self.nbd_tcp[config.name]
                    entry["nbd_tcp"] = f"{host}:{port}"
            entry["statistics"] = dict(machine.stats)
            entry["in_flight"] = machine.in_flight
            md = machine.metadata
            entry.update(resuid=md.resuid, localcnt=md.localcnt, remotecnt=md.remotecnt,
                         datasize=md.datasize, extentsize=md.extentsize,
                         keepdirty=md.keepdirty)  # fmt: skip
        return entry

    def cmd_status(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        names = args.get("resources") or list(self.roles)
        entries = [self.describe(str(name)) for name in names]
        for entry in entries:
            entry["refused_connections"] = self.refused_connections
        return entries

    async def cmd_verify(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        names = args.get("resources") or []
        if names == ["all"]:
            names = [name for name, role in self.roles.items() if role is Role.PRIMARY]
        results = []
        for name in names:
            self.config.resource(str(name))
            worker = self.workers.get(str(name))
            if worker is None:
                raise CommandError(f"{name}: verify runs on the primary (role is "
                                   f"{self.roles[str(name)].value})")  # fmt: skip
            results.append(await worker.verify())
        return results

    async def cmd_role(self, args: dict[str, Any]) -> list[dict[str, Any]]:
        role = str(args.get("role", ""))
        names = args.get("resources") or []
        if names == ["all"]:
            names = list(self.roles)
        return [await self.set_role(str(name), role) for name in names]

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "status": self.cmd_status,
            "role": self.cmd_role,
            "verify": self.cmd_verify,
        }
        async with DaemonShell(
            DAEMON, self.run_dir, handlers, self.bus, self.registry, self.metrics_address
        ) as shell:
            for address in self.config.listen:
                if not address.host:
                    continue
                try:
                    server = await listen(address.host, address.port, self.accept)
                except OSError as error:
                    log.warning("cannot listen on %s: %s", address.text, error.strerror)
                    continue
                self.listeners.append(server)
            if not self.listeners:
                raise CarpoolError("hastd could listen on none of its listen addresses")
            log.info("hastd started: resources %s", ", ".join(self.roles))
            try:
                await shell.stopping.wait()
            finally:
                for server in self.listeners:
                    server.close()
                for device in list(self.devices.values()):
                    await detach(device)
                self.devices.clear()
                for worker in list(self.workers.values()):
                    await worker.stop()


class HastCollector(Collector):
    """Per-resource figures read at scrape time from the running machines."""

    STATISTICS = ("reads", "writes", "deletes", "flushes", "activemap_updates",
                  "local_read_errors", "local_write_errors", "local_flush_errors",
                  "remote_errors", "bad_peer_messages")  # fmt: skip

    def __init__(self, daemon: HastDaemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        role = GaugeMetricFamily("carpool_hast_role", "1 for the resource's current role",
                                 labels=["resource", "role"])  # fmt: skip
        dirty = GaugeMetricFamily("carpool_hast_dirty_bytes",
                                  "bytes of extents not known to be on both disks",
                                  labels=["resource"])  # fmt: skip
        in_flight = GaugeMetricFamily("carpool_hast_requests_in_flight",
                                      "requests being carried out",
                                      labels=["resource"])  # fmt: skip
        synced = CounterMetricFamily("carpool_hast_resync_bytes",
                                     "bytes copied by resyncs since the role began",
                                     labels=["resource"])  # fmt: skip
        operations = CounterMetricFamily("carpool_hast_operations",
                                         "requests and errors since the role began",
                                         labels=["resource", "kind"])  # fmt: skip
        for name, current in self.daemon.roles.items():
            for value in Role:
                role.add_metric([name, value.value], 1 if value is current else 0)
            worker = self.daemon.workers.get(name)
            machine = worker.machine if worker is not None else None
            if machine is None:
                continue
            in_flight.add_metric([name], machine.in_flight)
            for kind, count in machine.stats.items():
                operations.add_metric([name, kind], count)
            if isinstance(machine, PrimaryMachine):
                dirty.add_metric([name], machine.dirty_bytes)
                synced.add_metric([name], machine.sync_bytes_sent)
        yield from (role, dirty, in_flight, synced, operations)


def parse_nbd_tcp(words: list[str], config: HastConfig) -> dict[str, tuple[str, int]]:
    """``RES=HOST:PORT`` (or ``RES=:PORT`` for every address) for each --nbd-tcp."""
    exports: dict[str, tuple[str, int]] = {}
    for word in words:
        name, sep, address = word.partition("=")
        if not sep:
            raise CarpoolError(f"--nbd-tcp {word!r}: write RES=HOST:PORT, e.g. "
                               "shared_storage=127.0.0.1:10809")  # fmt: skip
        config.resource(name)
        host, port = parse_listen_address(address, source="--nbd-tcp")
        exports[name] = (host, port)
    return exports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hastd", description="HAST: replicated block devices.")
    parser.add_argument("-c", dest="config", default=default_config_path())
    parser.add_argument("-d", dest="debug", action="store_true")
    parser.add_argument("-F", dest="foreground", action="store_true", help="(always foreground)")
    parser.add_argument("-P", dest="pidfile", help="(the pidfile is in --run-dir)")
    parser.add_argument("--node", help="this node's name in hast.conf (default: the hostname)")
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())
    parser.add_argument("--metrics", metavar="ADDR")
    parser.add_argument(
        "--dev-dir", type=Path, metavar="DIR",
        help="while a resource is primary, attach it as a block device and link DIR/<name> "
             "to it, as FreeBSD's /dev/hast/<name> (needs nbdfuse)",
    )  # fmt: skip
    parser.add_argument(
        "--nbd-tcp", action="append", default=[], metavar="RES=HOST:PORT",
        help="also export resource RES over NBD on TCP while it is primary (repeatable)",
    )  # fmt: skip
    arguments = parser.parse_args(argv)
    setup_logging(logging.DEBUG if arguments.debug else logging.INFO)
    node = arguments.node or os.environ.get("CARPOOL_NODE")

    def body() -> int:
        config = load_config(arguments.config, node=node)
        nbd_tcp = parse_nbd_tcp(arguments.nbd_tcp, config)
        daemon = HastDaemon(config, arguments.config, arguments.run_dir, arguments.metrics,
                            nbd_tcp, arguments.dev_dir)  # fmt: skip
        # uvloop: hastd needs no netlink, and its data path gains from the faster loop.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(daemon.run())
        return 0

    return run_command("hastd", body)


if __name__ == "__main__":
    sys.exit(main())
