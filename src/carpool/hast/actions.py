"""What HAST's pure machines ask their daemon to do (the sans-I/O "actions").

:class:`~carpool.hast.primary.PrimaryMachine` and
:class:`~carpool.hast.secondary.SecondaryMachine` never touch a disk, a socket
or the clock.  Every input method returns a list of the frozen dataclasses
below; the daemon performs them **in list order** and feeds each completion
back by the ``id``/``token`` it carries:

* :class:`LocalWrite`, :class:`LocalTrim`, :class:`LocalWriteZeroes` →
  ``local_write_done(id, ok)``; :class:`LocalRead` → ``local_read_done(id, data
  or None)``; :class:`LocalFlush` → ``local_flush_done(id, ok)``.  Offsets are
  relative to the data area (add the provider's ``localoff``).
* :class:`WriteMetadata` (a :func:`~carpool.hast.metadata.update_block` slot)
  and :class:`WriteActivemap` (the whole bitmap, at the activemap offset, then
  a flush if ``metaflush``) → ``metadata_written(token, ok)``.  Requests that
  depend on them are held back by the machine until that call: the daemon may
  run them concurrently with everything else.
* :class:`SendToPeer` (encode with :func:`carpool.hast.wire.encode`),
  :class:`ClosePeer` (then call ``peer_disconnected``), :class:`ConnectPeer`
  (then ``peer_connected`` or, on failure, nothing: the machine retries).
* :class:`ReplyToClient` (an NBD simple reply), :class:`Event` (a hook event:
  run ``exec <name> <resource>`` and publish it), :class:`StatusChanged`,
  :class:`VerifyDone` (the result of an online comparison of both disks).

``REFUSE_*`` are the codes of the wire :class:`~carpool.hast.wire.Error` a
secondary sends when it refuses a primary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from carpool.hast import wire
from carpool.hast.metadata import Metadata

__all__ = [
    "REFUSE_AUTH",
    "REFUSE_GEOMETRY",
    "REFUSE_PROTOCOL",
    "REFUSE_RESOURCE",
    "REFUSE_RESUID",
    "REFUSE_SPLIT_BRAIN",
    "Action",
    "ClosePeer",
    "ConnectPeer",
    "Event",
    "LocalFlush",
    "LocalRead",
    "LocalTrim",
    "LocalWrite",
    "LocalWriteZeroes",
    "ReplyToClient",
    "SendToPeer",
    "StatusChanged",
    "VerifyDone",
    "WriteActivemap",
    "WriteMetadata",
]

REFUSE_SPLIT_BRAIN = 1
REFUSE_RESUID = 2
REFUSE_AUTH = 3
REFUSE_PROTOCOL = 4
REFUSE_GEOMETRY = 5
REFUSE_RESOURCE = 6

Buf = bytes | bytearray | memoryview


@dataclass(frozen=True, slots=True)
class LocalWrite:
    id: int
    offset: int
    data: Buf
    fua: bool = False


@dataclass(frozen=True, slots=True)
class LocalTrim:
    """Discard a range (punch a hole); the daemon may treat it as advisory."""

    id: int
    offset: int
    length: int
    fua: bool = False


@dataclass(frozen=True, slots=True)
class LocalWriteZeroes:
    id: int
    offset: int
    length: int
    fua: bool = False


@dataclass(frozen=True, slots=True)
class LocalRead:
    id: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class LocalFlush:
    id: int


@dataclass(frozen=True, slots=True)
class WriteMetadata:
    """Write ``data`` at ``offset`` of the metadata block and fsync; ``metadata`` is the result."""

    token: int
    offset: int
    data: bytes
    metadata: Metadata


@dataclass(frozen=True, slots=True)
class WriteActivemap:
    """Write the whole on-disk activemap (then flush if metaflush)."""

    token: int
    bitmap: bytes


@dataclass(frozen=True, slots=True)
class SendToPeer:
    message: wire.Message


@dataclass(frozen=True, slots=True)
class ClosePeer:
    reason: str


@dataclass(frozen=True, slots=True)
class ConnectPeer:
    """Open the replication link (the primary's side)."""


@dataclass(frozen=True, slots=True)
class ReplyToClient:
    cookie: int
    error: int = 0
    data: Buf | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """A hook event (``connect``, ``disconnect``, ``syncstart``, ``syncdone``,
    ``syncintr``, ``split-brain``) or an informational one (``read-error``...)."""

    name: str
    attrs: Mapping[str, str | int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StatusChanged:
    """``complete`` (the peer is connected) or ``degraded``."""

    status: str


@dataclass(frozen=True, slots=True)
class VerifyDone:
    """The answer to ``PrimaryMachine.verify``: do both disks hold the same bytes there?

    ``same`` is None when the comparison could not be made (``error`` says why).
    """

    id: int
    offset: int
    length: int
    same: bool | None
    error: str = ""


Action = (
    LocalWrite | LocalTrim | LocalWriteZeroes | LocalRead | LocalFlush | WriteMetadata
    | WriteActivemap | SendToPeer | ClosePeer | ConnectPeer | ReplyToClient | Event
    | StatusChanged | VerifyDone
)  # fmt: skip
