"""The kernel's conntrack table through ctnetlink: dump, events, batched changes.

Plain ``AF_NETLINK``/``NETLINK_NETFILTER`` sockets and the hand-packed codec of
:mod:`carpool.pfsync.ctnetlink` (see there for why not pyroute2).

* :func:`dump_table` reads every entry (blocking; run it in a thread).
* :class:`EventSocket` is subscribed to NEW, UPDATE and DESTROY.  Its receive
  buffer is forced large (``SO_RCVBUFFORCE``, root) because the kernel drops
  events it cannot queue; when it did (``ENOBUFS``), :meth:`EventSocket.read`
  reports an overrun and the caller must re-read the whole table.
* :class:`TableWriter` applies creates, updates and deletes in batches of
  netlink messages, one ``send`` per batch, and accounts for every message the
  kernel refused (by errno), counting a full table (ENOMEM/ENOSPC) apart.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum

from carpool.errors import CarpoolError
from carpool.pfsync import ctnetlink
from carpool.pfsync.ctnetlink import (
    ConntrackEntry,
    ConntrackMessage,
    CtnetlinkError,
    NetlinkAck,
    NetlinkDone,
)

__all__ = [
    "ApplyReport",
    "ChangeKind",
    "EventBatch",
    "EventSocket",
    "KernelChange",
    "TableWriter",
    "dump_table",
]

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
SO_ATTACH_FILTER = 26
_BPF = struct.Struct("=HBBI")
SOL_NETLINK = 270
NETLINK_EXT_ACK = 11
EVENT_BUFFER = 32 << 20
WRITER_BUFFER = 8 << 20
RECEIVE_SIZE = 1 << 20
#: messages per send(): well under the socket's send limit for any entry size
BATCH = 256
TABLE_FULL_ERRNOS = frozenset({errno.ENOMEM, errno.ENOSPC})


def _open(groups: int = 0, receive_buffer: int = WRITER_BUFFER) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    except OSError as error:
        raise CarpoolError(f"cannot open a conntrack netlink socket: {error.strerror}") from None
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind((0, groups))
    except OSError as error:
        sock.close()
        raise CarpoolError(
            f"cannot bind a conntrack netlink socket: {error.strerror} "
            "(pfsyncd needs root and the nf_conntrack_netlink module)"
        ) from None
    return sock


def dump_table(family: int = socket.AF_UNSPEC) -> list[ConntrackEntry]:
    """Every entry of the table (of both families by default)."""
    sock = _open()
    try:
        sock.settimeout(30.0)
        sock.send(ctnetlink.build_dump_request(1, family))
        entries: list[ConntrackEntry] = []
        while True:
            try:
                data = sock.recv(RECEIVE_SIZE)
            except OSError as error:
                if error.errno == errno.EINTR:
                    continue
                raise CarpoolError(f"conntrack dump failed: {error.strerror or error}") from None
            try:
                for message in ctnetlink.decode_messages(data):
                    if isinstance(message, NetlinkDone):
                        return entries
                    if isinstance(message, NetlinkAck):
                        if message.error:
                            raise CarpoolError(
                                f"conntrack dump refused: {errno.errorcode.get(message.error)}"
                            )
                        continue
                    entries.append(message.entry)
            except CtnetlinkError:
                continue  # one entry of a shape we do not sync (other family): skip the buffer
    finally:
        sock.close()


@dataclass(frozen=True, slots=True)
class EventBatch:
    messages: tuple[ConntrackMessage, ...]
    #: the kernel dropped events (ENOBUFS): the table must be re-read
    overrun: bool
    malformed: int = 0


class EventSocket:
    """NEW/UPDATE/DESTROY events; non-blocking, read it when its fd is readable."""

    def __init__(self, receive_buffer: int = EVENT_BUFFER) -> None:
        self.sock = _open(ctnetlink.EVENT_GROUPS, receive_buffer)
        self.sock.setblocking(False)
        self._filter: ctypes.Array[ctypes.c_char] | None = None

    def ignore_origin(self, portid: int) -> bool:
        """Have the kernel drop events caused by the netlink socket ``portid``.

        A classic BPF filter on the socket compares each event's ``nlmsg_pid``
        (the port id of the socket whose request caused it) with ``portid``:
        a daemon that writes what its peer sent never reads those events back,
        which would cost as much as the write itself.  False if the kernel
        refused the filter (the caller must then skip them itself).
        """
        # BPF_LD|BPF_W|BPF_ABS loads in network order; nlmsg_pid is in host order.
        wanted = int.from_bytes(struct.pack("=I", portid), "big")
        program = b"".join(
            (
                _BPF.pack(0x20, 0, 0, 12),  # A = nlmsg_pid
                _BPF.pack(0x15, 0, 1, wanted),  # if A == portid: next, else skip one
                _BPF.pack(0x06, 0, 0, 0),  # drop
                _BPF.pack(0x06, 0, 0, 0xFFFFFFFF),  # keep the whole message
            )
        )
        self._filter = ctypes.create_string_buffer(program, len(program))
        fprog = struct.pack("@HP", len(program) // _BPF.size, ctypes.addressof(self._filter))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        except OSError:
            return False
        return True

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def read(self, limit: int = 256) -> EventBatch:
        """Drain up to ``limit`` datagrams of events queued now."""
        messages: list[ConntrackMessage] = []
        overrun = False
        malformed = 0
        for _ in range(limit):
            try:
                data = self.sock.recv(RECEIVE_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as error:
                if error.errno == errno.ENOBUFS:
                    overrun = True
                    continue
                raise
            try:
                for message in ctnetlink.decode_messages(data):
                    if isinstance(message, ConntrackMessage):
                        messages.append(message)
            except CtnetlinkError:
                malformed += 1
        return EventBatch(tuple(messages), overrun, malformed)


class ChangeKind(Enum):
    #: create, or update if the entry exists
    UPSERT = "upsert"
    #: update, or create if the entry is missing (an entry the peer says we have)
    UPDATE_OR_CREATE = "update_or_create"
    DELETE = "delete"
    #: mark an existing local TCP entry BE_LIBERAL (it may be gone: not an error)
    MAKE_LIBERAL = "make_liberal"


@dataclass(frozen=True, slots=True)
class KernelChange:
    kind: ChangeKind
    entry: ConntrackEntry


@dataclass
class ApplyReport:
    created: int = 0
    updated: int = 0
    deleted: int = 0
    #: deletes (and BE_LIBERAL marks) of entries that were already gone
    already_gone: int = 0
    #: local entries marked BE_LIBERAL
    made_liberal: int = 0
    #: refused because the table is full (ENOMEM/ENOSPC)
    table_full: int = 0
    #: every other refusal, by errno name
    errors: Counter[str] = field(default_factory=Counter)
    #: the first few refused changes, for the log: (errno name, operation, entry)
    refused: list[tuple[str, str, ConntrackEntry]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return self.table_full + sum(self.errors.values())


class TableWriter:
    """Applies changes to the table; events they cause carry :attr:`portid` as origin."""

    def __init__(self, *, default_timeout: int = 600) -> None:
        self.sock = _open()
        # The kernel handles a send() synchronously, so the answers are queued when it
        # returns; the timeout only bounds a kernel that never answers.
        self.sock.settimeout(5.0)
        self.portid = int(self.sock.getsockname()[0])
        self.default_timeout = default_timeout
        self._sequence = 0

    def close(self) -> None:
        self.sock.close()

    def apply(self, changes: Sequence[KernelChange]) -> ApplyReport:
        report = ApplyReport()
        first: list[tuple[str, ConntrackEntry]] = []
        for change in changes:
            if change.kind is ChangeKind.DELETE:
                first.append(("delete", change.entry))
            elif change.kind is ChangeKind.UPSERT:
                first.append(("create", change.entry))
            elif change.kind is ChangeKind.MAKE_LIBERAL:
                first.append(("liberal", change.entry))
            else:
                first.append(("update", change.entry))
        retry: list[tuple[str, ConntrackEntry]] = []
        for operation, entry, error in self._run(first):
            self._account(operation, entry, error, report, retry)
        for operation, entry, error in self._run(retry):
            self._account(operation, entry, error, report, None)
        return report

    def _account(
        self,
        operation: str,
        entry: ConntrackEntry,
        error: int,
        report: ApplyReport,
        retry: list[tuple[str, ConntrackEntry]] | None,
    ) -> None:
        if error == 0:
            if operation == "create":
                report.created += 1
            elif operation == "liberal":
                report.made_liberal += 1
            elif operation == "update":
                report.updated += 1
            else:
                report.deleted += 1
            return
        if operation in ("delete", "liberal") and error == errno.ENOENT:
            report.already_gone += 1
        elif retry is not None and operation == "create" and error == errno.EEXIST:
            retry.append(("update", entry))
        elif retry is not None and operation == "update" and error == errno.ENOENT:
            retry.append(("create", entry))
        elif error in TABLE_FULL_ERRNOS:
            report.table_full += 1
        else:
            name = errno.errorcode.get(error, str(error))
            report.errors[name] += 1
            if len(report.refused) < 5:
                report.refused.append((name, operation, entry))

    def _run(
        self, operations: list[tuple[str, ConntrackEntry]]
    ) -> list[tuple[str, ConntrackEntry, int]]:
        """Send every operation; the result of each (0 or an errno), in order."""
        results: list[tuple[str, ConntrackEntry, int]] = []
        for start in range(0, len(operations), BATCH):
            chunk = operations[start : start + BATCH]
            base = self._sequence + 1
            self._sequence += len(chunk)
            messages = []
            for index, (operation, entry) in enumerate(chunk):
                sequence = base + index
                ack = index == len(chunk) - 1  # the last one tells us the batch is through
                if operation == "create":
                    messages.append(
                        ctnetlink.build_create(
                            entry, sequence, ack=ack, default_timeout=self.default_timeout
                        )
                    )
                elif operation == "update":
                    messages.append(
                        ctnetlink.build_update(
                            entry, sequence, ack=ack, default_timeout=self.default_timeout
                        )
                    )
                elif operation == "liberal":
                    messages.append(ctnetlink.build_set_liberal(entry, sequence, ack=ack))
                else:
                    messages.append(ctnetlink.build_delete(entry, sequence, ack=ack))
            errors = self._send_batch(b"".join(messages), base, base + len(chunk) - 1)
            for index, (operation, entry) in enumerate(chunk):
                results.append((operation, entry, errors.get(base + index, 0)))
        return results

    def _send_batch(self, data: bytes, first: int, last: int) -> dict[int, int]:
        """Errors by sequence number, read until the last message's acknowledgement."""
        errors: dict[int, int] = {}
        try:
            self.sock.send(data)
        except OSError as error:
            code = error.errno or errno.EIO
            return {sequence: code for sequence in range(first, last + 1)}
        while True:
            try:
                reply = self.sock.recv(RECEIVE_SIZE)
            except TimeoutError:
                return errors
            except OSError as error:
                if error.errno == errno.ENOBUFS:  # answers were lost: cannot say which failed
                    return errors
                raise
            try:
                for message in ctnetlink.decode_messages(reply):
                    if isinstance(message, NetlinkAck) and first <= message.sequence <= last:
                        if message.error:
                            errors[message.sequence] = message.error
                        if message.sequence == last:
                            return errors
            except CtnetlinkError:
                continue
