"""HAST's on-disk metadata, provider layout and resync decision (pure but :func:`write_at`).

Layout of a local provider (FreeBSD's, from ``hastctl create``)::

    0                      4096                   4096 + mapsize
    | metadata (4096 B)    | activemap (mapsize)  | data (datasize) ...

``nextents = ceil((mediasize - 4096) / extentsize)``, ``mapsize`` =
``ceil(nextents / 8)`` rounded up to the sector size, ``localoff = 4096 +
mapsize``, ``datasize = mediasize - localoff`` (:meth:`MetadataLayout.compute`).

The metadata block is carpool's own byte layout, not FreeBSD's nv list: two
2048-byte slots, each a complete copy (big-endian)::

    8s magic "CPHASTMD" | u32 version | u32 generation | u64 datasize
    | u32 extentsize | u32 keepdirty | u64 localoff | u64 resuid | u64 localcnt
    | u64 remotecnt | u8 prevrole | u16 namelen | name | zero padding | u32 crc32

An update writes the slot ``generation % 2`` only (:func:`update_block`), so a
write torn by a crash leaves the other slot — the previous state — intact;
:func:`decode` takes the valid slot with the highest generation.  The write
itself goes through :func:`write_at` (pwrite at a fixed offset, then fsync),
the only function here that touches a file descriptor.

Resync (FreeBSD's ``secondary.c init_remote``, evaluated by the secondary):
:func:`decide_sync` maps both nodes' (resuid, localcnt, remotecnt) to a
:class:`SyncDirection`; :func:`bump_localcnt` is the primary's first write
without its peer, :func:`after_sync` the counters once a sync completed.

Errors are :class:`MetadataError` subclasses whose messages say what to do.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import struct
import zlib
from dataclasses import dataclass

from carpool.errors import CarpoolError
from carpool.hast.common import DEFAULT_EXTENTSIZE, DEFAULT_KEEPDIRTY, Role

__all__ = [
    "MAGIC",
    "METADATA_SIZE",
    "SLOT_SIZE",
    "VERSION",
    "CorruptMetadata",
    "LayoutError",
    "Metadata",
    "MetadataError",
    "MetadataLayout",
    "NodeCounters",
    "NotHastMetadata",
    "SyncDecision",
    "SyncDirection",
    "WrongResource",
    "after_sync",
    "bump_localcnt",
    "decide_sync",
    "decode",
    "encode",
    "update_block",
    "write_at",
]

MAGIC = b"CPHASTMD"
VERSION = 1
METADATA_SIZE = 4096
SLOT_SIZE = 2048
MAX_NAME = 1024
_FIXED = struct.Struct(">8sIIQIIQQQQBH")
_CRC = struct.Struct(">I")
_ROLE_CODE = {Role.INIT: 0, Role.PRIMARY: 1, Role.SECONDARY: 2}
_ROLE_BY_CODE = {v: k for k, v in _ROLE_CODE.items()}


class MetadataError(CarpoolError):
    """Metadata that cannot be used."""


class NotHastMetadata(MetadataError):
    """No carpool HAST metadata on the provider."""


class CorruptMetadata(MetadataError):
    """Both metadata copies fail their checksum or do not parse."""


class WrongResource(MetadataError):
    """The provider belongs to another resource."""


class LayoutError(MetadataError):
    """Sizes that cannot make a provider (``hastctl create`` arguments)."""


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True, slots=True)
class MetadataLayout:
    """Where metadata, activemap and data live on a provider of ``mediasize`` bytes."""

    mediasize: int
    sectorsize: int
    extentsize: int
    keepdirty: int
    nextents: int
    mapsize: int
    metadata_offset: int
    metadata_size: int
    activemap_offset: int
    data_offset: int  #: FreeBSD's ``localoff``
    datasize: int

    @classmethod
    def compute(
        cls,
        mediasize: int,
        extentsize: int = DEFAULT_EXTENTSIZE,
        keepdirty: int = DEFAULT_KEEPDIRTY,
        sectorsize: int = 512,
    ) -> MetadataLayout:
        """The layout ``hastctl create`` gives; LayoutError on impossible sizes."""
        if sectorsize <= 0 or sectorsize & (sectorsize - 1):
            raise LayoutError(f"sector size {sectorsize} is not a power of 2")
        if extentsize < sectorsize or extentsize % sectorsize:
            raise LayoutError(
                f"extent size {extentsize} must be a multiple of the sector size {sectorsize}"
                " (hastctl create -e)"
            )
        if extentsize >= 2**32:
            raise LayoutError(f"extent size {extentsize} is too large (below 4 GiB please)")
        if not 0 < keepdirty < 2**32:
            raise LayoutError(f"keepdirty {keepdirty} must be a positive number (-k)")
        if mediasize <= METADATA_SIZE:
            raise LayoutError(
                f"the provider has {mediasize} bytes, not enough for HAST metadata"
                " (use a larger file or device, or -m)"
            )
        nextents = -(-(mediasize - METADATA_SIZE) // extentsize)
        mapbytes = (nextents + 7) // 8
        mapsize = (mapbytes + sectorsize - 1) // sectorsize * sectorsize
        localoff = METADATA_SIZE + mapsize
        datasize = mediasize - localoff
        if datasize <= 0:
            raise LayoutError(
                f"the provider has {mediasize} bytes: nothing left for data after metadata"
                f" and a {mapsize}-byte activemap"
            )
        return cls(
            mediasize=mediasize,
            sectorsize=sectorsize,
            extentsize=extentsize,
            keepdirty=keepdirty,
            nextents=nextents,
            mapsize=mapsize,
            metadata_offset=0,
            metadata_size=METADATA_SIZE,
            activemap_offset=METADATA_SIZE,
            data_offset=localoff,
            datasize=datasize,
        )


# --------------------------------------------------------------------------- metadata


@dataclass(frozen=True, slots=True)
class Metadata:
    """What ``hastctl dump`` prints, plus the slot ``generation``."""

    resource: str
    datasize: int
    extentsize: int = DEFAULT_EXTENTSIZE
    keepdirty: int = DEFAULT_KEEPDIRTY
    localoff: int = 0
    resuid: int = 0
    localcnt: int = 0
    remotecnt: int = 0
    prevrole: Role = Role.INIT
    generation: int = 0

    @classmethod
    def create(cls, resource: str, layout: MetadataLayout) -> Metadata:
        """Fresh metadata as ``hastctl create`` writes it (resuid 0, counters 0, init)."""
        return cls(
            resource=resource,
            datasize=layout.datasize,
            extentsize=layout.extentsize,
            keepdirty=layout.keepdirty,
            localoff=layout.data_offset,
        )

    @property
    def nextents(self) -> int:
        return -(-self.datasize // self.extentsize)

    def replace(self, **changes: object) -> Metadata:
        """A copy with ``changes`` (dataclasses.replace)."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


def _encode_slot(md: Metadata) -> bytes:
    name = md.resource.encode("utf-8")
    if not name or len(name) > MAX_NAME:
        raise MetadataError(f"resource name must be 1 to {MAX_NAME} bytes, got {len(name)}")
    try:
        fixed = _FIXED.pack(
            MAGIC, VERSION, md.generation % 2**32, md.datasize, md.extentsize, md.keepdirty,
            md.localoff, md.resuid, md.localcnt, md.remotecnt, _ROLE_CODE[md.prevrole], len(name),
        )  # fmt: skip
    except struct.error as exc:
        raise MetadataError(f"metadata field out of range: {exc}") from None
    body = fixed + name
    body += bytes(SLOT_SIZE - _CRC.size - len(body))
    return body + _CRC.pack(zlib.crc32(body))


def encode(md: Metadata) -> bytes:
    """The whole 4096-byte block, both slots holding ``md`` (for ``hastctl create``)."""
    slot = _encode_slot(md)
    return slot + slot


def update_block(md: Metadata) -> tuple[int, Metadata, bytes]:
    """Plan an update: (offset, the metadata as written, slot bytes) for :func:`write_at`.

    The generation is bumped, and the slot it selects — never the one holding the
    current state — is the one rewritten.
    """
    nxt = md.replace(generation=(md.generation + 1) % 2**32)
    return (nxt.generation % 2) * SLOT_SIZE, nxt, _encode_slot(nxt)


def _decode_slot(slot: bytes) -> Metadata | None:
    """A slot's metadata, None if it is not a valid slot (bad magic or checksum)."""
    if len(slot) < SLOT_SIZE or slot[:8] != MAGIC:
        return None
    (crc,) = _CRC.unpack_from(slot, SLOT_SIZE - _CRC.size)
    if zlib.crc32(slot[: SLOT_SIZE - _CRC.size]) != crc:
        return None
    (_m, version, gen, datasize, extentsize, keepdirty, localoff, resuid, localcnt, remotecnt,
     role, nlen) = _FIXED.unpack_from(slot)  # fmt: skip
    if version != VERSION:
        raise MetadataError(
            f"metadata version {version} is not supported (this carpool reads {VERSION})"
        )
    end = _FIXED.size + nlen
    if role not in _ROLE_BY_CODE or not 0 < nlen <= MAX_NAME or extentsize == 0:
        return None
    try:
        name = slot[_FIXED.size : end].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return Metadata(name, datasize, extentsize, keepdirty, localoff, resuid, localcnt,
                    remotecnt, _ROLE_BY_CODE[role], gen)  # fmt: skip


def decode(block: bytes | bytearray | memoryview, *, resource: str | None = None) -> Metadata:
    """The current metadata in a 4096-byte block (the newer valid slot).

    NotHastMetadata when neither slot carries the magic, CorruptMetadata when
    none is valid, WrongResource when ``resource`` is given and differs.
    """
    raw = bytes(block)
    if len(raw) < METADATA_SIZE:
        raise CorruptMetadata(
            f"metadata block of {len(raw)} bytes, {METADATA_SIZE} expected: the provider is"
            " truncated"
        )
    slots = [raw[:SLOT_SIZE], raw[SLOT_SIZE:METADATA_SIZE]]
    if not any(s[:8] == MAGIC for s in slots):
        raise NotHastMetadata(
            "no HAST metadata on the provider: initialise it with 'hastctl create <resource>'"
        )
    valid = [md for md in (_decode_slot(s) for s in slots) if md is not None]
    if not valid:
        raise CorruptMetadata(
            "both copies of the HAST metadata are damaged: recreate the provider with"
            " 'hastctl create' (a full resync from the peer follows)"
        )
    if len(valid) == 2:
        a, b = valid
        # generations are consecutive; modulo 2**32 the newer one is a+1 (or b+1)
        md = b if (b.generation - a.generation) % 2**32 == 1 else a
    else:
        md = valid[0]
    if resource is not None and md.resource != resource:
        raise WrongResource(
            f"the provider belongs to resource {md.resource!r}, not {resource!r}: check 'local'"
            " in hast.conf"
        )
    return md


def write_at(fd: int, offset: int, data: bytes | bytearray | memoryview, *,
             sync: bool = True) -> None:  # fmt: skip
    """Write all of ``data`` at ``offset`` of ``fd``, then fsync it (the only I/O here)."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        if written <= 0:  # pragma: no cover - pwrite raises on errors
            raise OSError("pwrite wrote nothing")
        view = view[written:]
        offset += written
    if sync:
        os.fsync(fd)


# --------------------------------------------------------------------------- resync decision


@dataclass(frozen=True, slots=True)
class NodeCounters:
    """One node's identity and generation counters, as exchanged at handshake."""

    resuid: int
    localcnt: int
    remotecnt: int


class SyncDirection(enum.Enum):
    NONE = "none"  #: nothing to sync (a fresh secondary meets a primary that never wrote)
    PRIMARY_TO_SECONDARY_DIRTY = "primary-dirty"  #: resync the merged dirty extents
    PRIMARY_TO_SECONDARY_FULL = "primary-full"  #: resync everything from the primary
    SECONDARY_TO_PRIMARY_DIRTY = "secondary-dirty"  #: the primary is out of date
    SECONDARY_TO_PRIMARY_FULL = "secondary-full"
    SPLIT_BRAIN = "split-brain"  #: both wrote without the other: refuse
    RESUID_MISMATCH = "resuid-mismatch"  #: not the same resource: refuse

    @property
    def refused(self) -> bool:
        return self in (SyncDirection.SPLIT_BRAIN, SyncDirection.RESUID_MISMATCH)

    @property
    def full(self) -> bool:
        return self in (
            SyncDirection.PRIMARY_TO_SECONDARY_FULL,
            SyncDirection.SECONDARY_TO_PRIMARY_FULL,
        )

    @property
    def from_secondary(self) -> bool:
        return self in (
            SyncDirection.SECONDARY_TO_PRIMARY_DIRTY,
            SyncDirection.SECONDARY_TO_PRIMARY_FULL,
        )


@dataclass(frozen=True, slots=True)
class SyncDecision:
    direction: SyncDirection
    adopt_resuid: bool  #: the secondary takes the primary's resuid (it had none)
    reason: str


def decide_sync(
    secondary: NodeCounters, primary: NodeCounters, *, primary_virgin: bool = False
) -> SyncDecision:
    """What the secondary decides when the primary connects (HAST's rules).

    ``primary_virgin``: the primary has never written (HAST's ``virgin``).
    """
    if primary.resuid == 0:
        raise ValueError("the primary must have a resuid before it connects")
    if secondary.resuid == 0:
        if primary_virgin:
            return SyncDecision(SyncDirection.NONE, True, "fresh secondary, primary never wrote")
        return SyncDecision(
            SyncDirection.PRIMARY_TO_SECONDARY_FULL, True, "fresh secondary: full synchronization"
        )
    if secondary.resuid != primary.resuid:
        return SyncDecision(
            SyncDirection.RESUID_MISMATCH,
            False,
            "Resource unique ID mismatch: the peer holds another resource's data"
            " (on the node to overwrite: hastctl role init; hastctl create; hastctl role"
            " secondary)",
        )
    s_ahead = secondary.localcnt > primary.remotecnt
    s_known = secondary.localcnt == primary.remotecnt
    p_ahead = primary.localcnt > secondary.remotecnt
    p_known = primary.localcnt == secondary.remotecnt
    if s_ahead and p_known:
        return SyncDecision(SyncDirection.SECONDARY_TO_PRIMARY_DIRTY, False, "primary out of date")
    if s_known and (p_known or p_ahead):
        return SyncDecision(
            SyncDirection.PRIMARY_TO_SECONDARY_DIRTY,
            False,
            "in sync except dirty extents" if p_known else "secondary out of date",
        )
    if s_ahead and p_ahead:
        return SyncDecision(
            SyncDirection.SPLIT_BRAIN,
            False,
            "Split-brain condition! Both nodes wrote while disconnected; on the node whose"
            " data is to be discarded: hastctl role init; hastctl create; hastctl role secondary",
        )
    if s_ahead:
        return SyncDecision(
            SyncDirection.SECONDARY_TO_PRIMARY_FULL, False, "counters disagree: full sync"
        )
    return SyncDecision(
        SyncDirection.PRIMARY_TO_SECONDARY_FULL, False, "counters disagree: full sync"
    )


def bump_localcnt(md: Metadata, peer_remotecnt: int) -> Metadata | None:
    """The primary's first write without its peer: new metadata, or None if unchanged.

    HAST bumps ``localcnt`` only when it still equals the peer's ``remotecnt``
    (once per generation of writes made alone).
    """
    if md.localcnt == peer_remotecnt:
        return md.replace(localcnt=md.localcnt + 1, prevrole=Role.PRIMARY)
    return None


def after_sync(primary: Metadata, secondary: NodeCounters) -> Metadata:
    """The primary's metadata once a sync completed: counters taken from the secondary."""
    return primary.replace(localcnt=secondary.remotecnt, remotecnt=secondary.localcnt)
