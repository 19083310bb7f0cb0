"""pfsyncd: the asyncio shell around ``pfsync.machine``.

It owns the UDP socket on the sync interface, the conntrack event socket and
table writer, the timers, the control socket, events and metrics, and talks to
carpd for the demotion.  Every protocol decision is the machine's.

    pfsyncd -f /etc/carpool/rc.conf --run-dir DIR --metrics ADDR -d

CARP demotion goes through carpd's control channel (``demote`` with a delta,
what ``carpctl -g carp carpdemote N`` sends).  What pfsyncd added is written to
``<run-dir>/pfsyncd.demotion`` with carpd's pid, so that a restarted pfsyncd
neither demotes twice nor forgets to lift its demotion, and a restarted carpd
(which starts undemoted) is demoted again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import os
import queue
import secrets
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from carpool.control import ControlError, async_request, default_run_dir, socket_path
from carpool.errors import CarpoolError
from carpool.events import Event, EventBus, setup_logging
from carpool.pfsync import conntrack, wire
from carpool.pfsync.config import PfsyncConfig, load_config
from carpool.pfsync.conntrack import (
    ApplyReport,
    ChangeKind,
    EventSocket,
    TableWriter,
    WriteBatch,
)
from carpool.pfsync.machine import (
    Apply,
    Emit,
    MachineAction,
    ReadPurpose,
    ReadTable,
    Send,
    SetDemotion,
    SyncFilter,
    SyncMachine,
    SyncSettings,
)
from carpool.service import DaemonShell, run_command

log = logging.getLogger("carpool.pfsyncd")

DAEMON = "pfsyncd"
DEFAULT_CONFIG = "/etc/carpool/rc.conf"
SYNC_TTL = 255
IP_RECVTTL = 12
IP_TTL = 2
UDP_BUFFER = 8 << 20
DEMOTE_RETRY = 0.1

#: the counters of ``netstat -s -p pfsync`` (struct pfsyncstats) that apply here
PACKET_STATS = (
    "ipackets", "badif", "badttl", "hdrops", "badver", "badlen", "badauth", "badval",
    "badsrc", "badstate", "stale", "opackets", "onomem", "oerrors",
)  # fmt: skip


class PfsyncDaemon:
    def __init__(self, config_path: str, run_dir: Path, metrics_address: str | None) -> None:
        self.config_path = config_path
        self.run_dir = run_dir
        self.metrics_address = metrics_address
        self.config: PfsyncConfig = load_config(config_path)
        if not self.config.enabled:
            raise CarpoolError(
                f'{config_path}: pfsync_enable is not "YES": set pfsync_enable="YES" to run pfsyncd'
            )
        self.registry = CollectorRegistry()
        self.bus = EventBus(registry=self.registry)
        self.stats: Counter[str] = Counter()
        self.started = time.time()
        self.machine: SyncMachine | None = None
        self.sock: socket.socket | None = None
        self.events: EventSocket | None = None
        self.writer: TableWriter | None = None
        self.worker: WriteWorker | None = None
        self.timer: asyncio.TimerHandle | None = None
        #: changes gathered while a batch of datagrams is read (None: apply at once)
        self.deferred: list[tuple[ChangeKind, bytes]] | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.reads: asyncio.Queue[ReadTable] = asyncio.Queue()
        self.own_addresses: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
        self.demotion_wanted = 0
        self.demotion_changed = asyncio.Event()
        self.sources: dict[str, ipaddress.IPv4Address | ipaddress.IPv6Address] = {}
        self.registry.register(_StatusCollector(self))

    # -- machine plumbing ----------------------------------------------------------------

    @property
    def sync(self) -> SyncMachine:
        assert self.machine is not None
        return self.machine

    def feed(self, actions: Iterable[MachineAction]) -> None:
        for action in actions:
            try:
                self.perform(action)
            except CarpoolError as error:
                log.error("pfsync: %s", error)
            except Exception:
                log.exception("pfsync: action %r failed", type(action).__name__)
        self.arm_timer()

    def arm_timer(self) -> None:
        deadline = self.sync.next_deadline()
        timer = self.timer
        if timer is not None:
            # time.monotonic() is the loop's clock: a timer due no later is kept (it
            # wakes us early at worst, and on_timer arms the next one)
            if timer.when() <= deadline:
                return
            timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_at(max(deadline, loop.time()), self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        self.feed(self.sync.advance(time.monotonic()))

    def perform(self, action: MachineAction) -> None:
        if isinstance(action, Send):
            self.send(action.message)
        elif isinstance(action, Apply):
            if self.deferred is not None:
                self.deferred.extend(action.changes)
            else:
                self.apply(action.changes)
        elif isinstance(action, ReadTable):
            self.reads.put_nowait(action)
        elif isinstance(action, SetDemotion):
            # lifted only once what we were told is written: states before VIPs
            self.after_writes(lambda: self.set_demotion(action.amount, action.reason))
        elif isinstance(action, Emit):
            self.bus.publish(Event.now(DAEMON, action.name, **dict(action.attributes)))

    def set_demotion(self, amount: int, reason: str) -> None:
        log.info("pfsync: carp demotion wanted %d (%s)", amount, reason)
        self.demotion_wanted = amount
        self.demotion_changed.set()

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- the sync link ---------------------------------------------------------------------

    def open_socket(self, ifindex: int) -> socket.socket:
        config = self.config
        destination = config.destination
        family = socket.AF_INET if destination.version == 4 else socket.AF_INET6
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, config.syncdev.encode())
            for option in (conntrack.SO_RCVBUFFORCE, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, option, UDP_BUFFER)
                    break
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UDP_BUFFER)
            if family == socket.AF_INET:
                sock.setsockopt(socket.IPPROTO_IP, IP_TTL, SYNC_TTL)
                sock.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
                if destination.is_multicast:
                    request = struct.pack("=4s4si", destination.packed, bytes(4), ifindex)
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, request)
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, request)
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, SYNC_TTL)
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
                sock.bind(("0.0.0.0", config.port))
            else:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, SYNC_TTL)
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
                if destination.is_multicast:
                    request = struct.pack("=16sI", destination.packed, ifindex)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, request)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, ifindex)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, SYNC_TTL)
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
                sock.bind(("::", config.port))
        except OSError as error:
            sock.close()
            raise CarpoolError(
                f"cannot open the sync socket on {config.syncdev} port {config.port}: "
                f"{error.strerror or error}"
            ) from None
        sock.setblocking(False)
        return sock

    def send(self, message: wire.Message) -> None:
        assert self.sock is not None
        datagram = wire.encode(message, self.config.key)
        try:
            self.sock.sendto(datagram, (str(self.config.destination), self.config.port))
            self.stats["opackets"] += 1
        except BlockingIOError:
            self.stats["onomem"] += 1
        except OSError as error:
            self.stats["oerrors"] += 1
            log.debug("pfsync: send failed: %s", error)

    def on_datagram(self) -> None:
        """Read what is queued (bounded, so a flood cannot starve the timers) and
        write the changes of all of it to the kernel together."""
        assert self.sock is not None
        recvmsg = self.sock.recvmsg
        self.deferred = []
        try:
            for _ in range(256):
                try:
                    data, ancillary, _, source = recvmsg(65535, 64)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as error:
                    log.warning("pfsync: receive failed: %s", error)
                    break
                self.handle_datagram(data, ancillary, source)
        finally:
            changes, self.deferred = self.deferred, None
            if changes:
                try:
                    self.apply(changes)
                except CarpoolError as error:
                    log.error("pfsync: %s", error)

    def handle_datagram(self, data: bytes, ancillary: list[Any], source: Any) -> None:
        self.stats["ipackets"] += 1
        address = self.source_address(source[0])
        if address in self.own_addresses:
            return
        if self.config.syncpeer is not None and address != self.config.syncpeer:
            self.count_drop("badsrc", f"datagram from {address}, not from pfsync_syncpeer")
            return
        ttl = _received_ttl(ancillary)
        if ttl is not None and ttl != SYNC_TTL:
            self.count_drop("badttl", f"datagram from {address} with ttl {ttl}")
            return
        try:
            message = wire.decode(data, self.config.key)
        except wire.WireError as error:
            self.count_drop(error.stat, f"datagram from {address}: {error}")
            return
        if isinstance(message, wire.BulkRequest):
            # The bulk update is answered from what the machine knows: let it learn
            # first every kernel event already queued, so the answer is the table now.
            self.drain_events()
        self.feed(self.sync.received(message, time.monotonic()))

    def source_address(self, text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
        found = self.sources.get(text)
        if found is None:
            if len(self.sources) > 64:
                self.sources.clear()
            found = self.sources[text] = ipaddress.ip_address(text.split("%")[0])
        return found

    def count_drop(self, stat: str, why: str) -> None:
        self.stats[stat] += 1
        log.debug("pfsync: dropped %s", why)

    # -- the kernel table ------------------------------------------------------------------

    def apply(self, changes: Sequence[tuple[ChangeKind, bytes]]) -> None:
        if self.worker is not None:
            assert self.writer is not None
            self.worker.submit(self.writer.prepare(changes))
            return
        assert self.writer is not None
        self.account(self.writer.apply(changes))

    def after_writes(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the changes handed over so far are in the kernel."""
        if self.worker is not None:
            self.worker.submit(callback)
        else:
            callback()

    def account(self, report: ApplyReport) -> None:
        self.stats["kernel_created"] += report.created
        self.stats["kernel_updated"] += report.updated
        self.stats["kernel_deleted"] += report.deleted
        self.stats["kernel_liberal"] += report.made_liberal
        if report.table_full:
            self.stats["table_full"] += report.table_full
            log.warning("pfsync: conntrack table full: %d states not inserted", report.table_full)
        for name, count in report.errors.items():
            self.stats["kernel_errors"] += count
            log.info("pfsync: kernel refused %d changes: %s", count, name)
        for name, operation, entry in report.refused:
            original = entry.original
            log.info(
                "pfsync: refused %s (%s): proto %d %s:%d -> %s:%d zone %d",
                operation, name, original.proto, original.src, original.src_port,
                original.dst, original.dst_port, entry.zone,
            )  # fmt: skip

    def drain_events(self) -> None:
        assert self.events is not None
        for _ in range(4096):  # bounded: a table changing faster than we read must not hang us
            if not self.on_events():
                return

    def on_events(self) -> int:
        """Read a batch of kernel events; how many messages it held."""
        assert self.events is not None and self.writer is not None
        # events of our own writes (learned from the peer) are not sent back
        batch = self.events.read_states(skip_origin=self.writer.portid)
        if batch.malformed:
            self.stats["netlink_malformed"] += batch.malformed
        changes = batch.changes
        self.stats["kernel_events"] += len(changes)
        if changes:
            self.feed(self.sync.local_changes(changes, time.monotonic()))
        if batch.overrun:
            self.stats["netlink_overruns"] += 1
            log.warning("pfsync: conntrack events were lost (ENOBUFS): re-reading the table")
            self.reads.put_nowait(ReadTable(ReadPurpose.RECONCILE))
        return batch.messages

    async def read_tables(self) -> None:
        while True:
            request = await self.reads.get()
            started = time.monotonic()
            try:
                entries = await asyncio.to_thread(conntrack.dump_states)
            except CarpoolError as error:
                log.error("pfsync: %s", error)
                self.sync.read_failed(request.purpose)
                continue
            self.stats["dumps"] += 1
            self.feed(
                self.sync.table_read(
                    request.purpose, entries, started, time.monotonic(), request.bulk_id
                )
            )

    # -- CARP demotion ---------------------------------------------------------------------

    @property
    def demotion_file(self) -> Path:
        return self.run_dir / f"{DAEMON}.demotion"

    def applied_demotion(self, carpd_pid: int) -> int:
        """What we added to carpd's demotion earlier (0 if carpd restarted since)."""
        try:
            record = json.loads(self.demotion_file.read_text())
            if int(record["carpd_pid"]) == carpd_pid:
                return int(record["amount"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return 0

    def record_demotion(self, amount: int, carpd_pid: int) -> None:
        if amount == 0:
            with contextlib.suppress(FileNotFoundError):
                self.demotion_file.unlink()
            return
        tmp = self.demotion_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"amount": amount, "carpd_pid": carpd_pid}))
        os.replace(tmp, self.demotion_file)

    async def keep_demotion(self) -> None:
        """Make carpd's demotion carry what the machine wants; retry while carpd is away."""
        carpd = socket_path(self.run_dir, "carpd")
        warned = False
        failures = 0
        while True:
            try:
                self.demotion_changed.clear()
                status = await async_request(carpd, "status")
                pid = int(status["pid"])
                applied = self.applied_demotion(pid)
                wanted = self.demotion_wanted
                if wanted != applied:
                    result = await async_request(carpd, "demote", delta=wanted - applied)
                    self.record_demotion(wanted, pid)
                    log.info(
                        "pfsync: carp demoted by %d (carp demotion now %s)",
                        wanted - applied,
                        result.get("demotion"),
                    )
                warned = False
                failures = 0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        await self.demotion_changed.wait()
            except (ControlError, KeyError, TypeError, ValueError) as error:
                if not warned:
                    log.info("pfsync: carpd not reachable for the demotion (%s); retrying", error)
                    warned = True
                failures += 1
                # Quickly at first (a carpd starting beside us must be demoted before it
                # can preempt), then once a second (there may be no carpd at all).
                await asyncio.sleep(DEMOTE_RETRY if failures < 100 else 1.0)

    # -- control ---------------------------------------------------------------------------

    def handlers(self) -> dict[str, Any]:
        return {"status": self.cmd_status}

    def cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    def status(self) -> dict[str, Any]:
        machine = self.sync
        counters = Counter(machine.stats)
        counters.update(self.stats)
        return {
            **machine.status(),
            "syncdev": self.config.syncdev,
            "syncpeer": str(self.config.syncpeer) if self.config.syncpeer else None,
            "destination": str(self.config.destination),
            "port": self.config.port,
            "running_seconds": round(time.time() - self.started, 1),
            "counters": {name: int(value) for name, value in sorted(counters.items())},
            "pid": os.getpid(),
        }

    # -- lifecycle -------------------------------------------------------------------------

    async def prepare(self) -> int:
        ifindex, interfaces = interface_addresses(self.config.syncdev)
        self.own_addresses = {a.ip for a in interfaces}
        ignored = [
            ipaddress.ip_network("127.0.0.0/8"),
            ipaddress.ip_network("::1/128"),
            *(a.network for a in interfaces if not a.ip.is_link_local),
            *self.config.ignore,
        ]
        settings = SyncSettings(
            filter=SyncFilter(tuple(ignored)),
            demotion_factor=self.config.demotion_factor,
            refresh_interval=self.config.refresh_interval,
        )
        self.machine = SyncMachine(settings, secrets.randbits(64), time.monotonic())
        return ifindex

    async def run(self) -> None:
        ifindex = await self.prepare()
        async with DaemonShell(
            DAEMON,
            self.run_dir,
            self.handlers(),
            self.bus,
            self.registry,
            self.metrics_address,
            on_hup=self.on_hup,
        ) as shell:
            loop = asyncio.get_running_loop()
            self.writer = TableWriter()
            self.worker = WriteWorker(self.writer, loop, self.account)
            self.events = EventSocket()
            if not self.events.ignore_origin(self.writer.portid):
                log.warning("pfsync: no BPF filter for our own events; skipping them by hand")
            self.sock = self.open_socket(ifindex)
            try:
                loop.add_reader(self.sock.fileno(), self.on_datagram)
                loop.add_reader(self.events.fileno(), self.on_events)
                self.spawn(self.read_tables())
                self.spawn(self.keep_demotion())
                log.info(
                    "pfsyncd started: syncdev %s, sending to %s port %d",
                    self.config.syncdev,
                    self.config.destination,
                    self.config.port,
                )
                self.feed(self.sync.start(time.monotonic()))
                await shell.stopping.wait()
                log.info("pfsyncd stopping")
                await self.lift_demotion()
            finally:
                if self.timer is not None:
                    self.timer.cancel()
                for task in list(self.tasks):
                    task.cancel()
                with contextlib.suppress(Exception):
                    loop.remove_reader(self.sock.fileno())
                    loop.remove_reader(self.events.fileno())
                self.sock.close()
                self.events.close()
                self.worker.stop()
                self.writer.close()

    def on_hup(self) -> None:
        log.warning(
            "pfsync: SIGHUP ignored: pfsyncd does not reload %s; restart it to apply changes",
            self.config_path,
        )

    async def lift_demotion(self) -> None:
        """On a clean stop, take back what we added to carpd's demotion."""
        self.demotion_wanted = 0
        self.demotion_changed.set()
        carpd = socket_path(self.run_dir, "carpd")
        with contextlib.suppress(ControlError, KeyError, TypeError, ValueError):
            status = await async_request(carpd, "status")
            applied = self.applied_demotion(int(status["pid"]))
            if applied:
                await async_request(carpd, "demote", delta=-applied)
                self.record_demotion(0, int(status["pid"]))


_IFADDRMSG = struct.Struct("=BBBBI")
_NLMSG = struct.Struct("=IHHII")
_RTA = struct.Struct("=HH")
RTM_NEWADDR = 20
RTM_GETADDR = 22
IFA_ADDRESS = 1


def interface_addresses(
    ifname: str,
) -> tuple[int, list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
    """The index and addresses of ``ifname``, with one rtnetlink dump.

    Not through carpool.net.netlink: pyroute2 costs pfsyncd a tenth of a second
    of imports at start, while a restarted node waits for its bulk update.
    """
    try:
        index = socket.if_nametoindex(ifname)
    except OSError:
        raise CarpoolError(f"no interface named {ifname}: check the configuration") from None
    found: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE) as sock:
        sock.settimeout(5.0)
        request = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
        sock.send(_NLMSG.pack(16 + len(request), RTM_GETADDR, 0x1 | 0x300, 1, 0) + request)
        while True:
            data = sock.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, kind, _, _, _ = _NLMSG.unpack_from(data, offset)
                if length < 16 or offset + length > len(data):
                    raise CarpoolError(f"cannot read the addresses of {ifname}")
                if kind == 3:  # NLMSG_DONE
                    return index, found
                if kind == 2:  # NLMSG_ERROR
                    raise CarpoolError(f"cannot read the addresses of {ifname}")
                if kind == RTM_NEWADDR:
                    family, prefixlen, _, _, at = _IFADDRMSG.unpack_from(data, offset + 16)
                    attribute = offset + 16 + _IFADDRMSG.size
                    while at == index and attribute + 4 <= offset + length:
                        size, rta = _RTA.unpack_from(data, attribute)
                        if size < 4:
                            break
                        if rta == IFA_ADDRESS and family in (socket.AF_INET, socket.AF_INET6):
                            raw = data[attribute + 4 : attribute + size]
                            address = ipaddress.ip_address(raw)
                            found.append(ipaddress.ip_interface(f"{address}/{prefixlen}"))
                            break
                        attribute += (size + 3) & ~3
                offset += (length + 3) & ~3


class WriteWorker:
    """Applies changes to the kernel table in a thread of its own, in order.

    Most of a write is the kernel creating the entries inside ``send()``, which
    runs without the GIL: in a thread it overlaps with the loop decoding the
    next datagrams (measured on the 50k-state bulk: the receiver spent a fifth
    of its time in that call).  The loop frames the messages
    (:meth:`TableWriter.prepare`), so this thread holds the GIL only briefly and
    the loop seldom waits for it.  Reports and callbacks go back to the loop.
    """

    def __init__(
        self,
        writer: TableWriter,
        loop: asyncio.AbstractEventLoop,
        account: Callable[[ApplyReport], None],
    ) -> None:
        self.writer = writer
        self.loop = loop
        self.account = account
        self.queue: queue.SimpleQueue[WorkItem] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name="pfsyncd-writer", daemon=True)
        self.thread.start()

    def submit(self, item: Sequence[WriteBatch] | Callable[[], None]) -> None:
        self.queue.put(item)

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(5.0)

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if callable(item):
                self._back(item)
                continue
            try:
                report = self.writer.execute(item)
            except Exception:
                log.exception("pfsync: writing to the conntrack table failed")
                continue
            self._back(functools.partial(self.account, report))

    def _back(self, callback: Callable[[], None]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
            self.loop.call_soon_threadsafe(callback)


WorkItem = Sequence[WriteBatch] | Callable[[], None] | None


def _received_ttl(ancillary: list[Any]) -> int | None:
    for level, kind, data in ancillary:
        if (level, kind) in (
            (socket.IPPROTO_IP, IP_TTL),
            (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT),
        ):
            if len(data) >= 4:
                return int(struct.unpack("=i", data[:4])[0])
            if len(data) == 1:
                return int(data[0])
    return None


class _StatusCollector(Collector):
    """Prometheus view of the status, read at scrape time."""

    def __init__(self, daemon: PfsyncDaemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[Metric]:
        if self.daemon.machine is None:
            return
        try:
            status = self.daemon.status()
        except RuntimeError:  # the loop changed a table while this thread read it
            return
        states = GaugeMetricFamily("carpool_pfsync_states", "conntrack entries pfsyncd tracks")
        states.add_metric([], status["states"])
        yield states
        syncok = GaugeMetricFamily("carpool_pfsync_syncok", "1 once the bulk update is done")
        syncok.add_metric([], 1 if status["syncok"] else 0)
        yield syncok
        peer = GaugeMetricFamily("carpool_pfsync_peer_up", "1 while the peer is heard")
        peer.add_metric([], 1 if status["peer"] == "up" else 0)
        yield peer
        demotion = GaugeMetricFamily("carpool_pfsync_demotion", "CARP demotion pfsyncd wants")
        demotion.add_metric([], status["demotion"])
        yield demotion
        counters = CounterMetricFamily(
            "carpool_pfsync", "pfsyncd counters (netstat -s -p pfsync words)", labels=["counter"]
        )
        for name, value in status["counters"].items():
            counters.add_metric([name], value)
        yield counters


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pfsyncd", description="pfsync: conntrack state synchronisation between routers."
    )
    parser.add_argument("-f", "--config", default=DEFAULT_CONFIG, help="rc.conf-style file")
    parser.add_argument("-n", dest="check", action="store_true", help="check the file and exit")
    parser.add_argument("-d", dest="debug", action="store_true", help="log debugging details")
    parser.add_argument("--run-dir", type=Path, default=default_run_dir())
    parser.add_argument("--metrics", metavar="ADDR", help="serve Prometheus metrics on ADDR")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    setup_logging(logging.DEBUG if arguments.debug else logging.INFO)
    logging.getLogger("pyroute2").setLevel(logging.WARNING)

    def body() -> int:
        if arguments.check:
            config = load_config(arguments.config)
            state = "enabled" if config.enabled else "not enabled"
            print(
                f"{arguments.config}: configuration OK (pfsync {state}, syncdev "
                f"{config.syncdev}, to {config.destination} port {config.port})"
            )
            return 0
        daemon = PfsyncDaemon(arguments.config, arguments.run_dir, arguments.metrics)
        # The stdlib loop, not uvloop: pyroute2's netlink endpoints do not work on uvloop.
        asyncio.run(daemon.run())
        return 0

    return run_command("pfsyncd", body)


if __name__ == "__main__":
    sys.exit(main())
