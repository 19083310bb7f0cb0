"""Names HAST's layers share: replication modes, checksums, compressions, roles, defaults.

These enums are the vocabulary of hast.conf (:mod:`carpool.hast.config`), of the
replication wire (:mod:`carpool.hast.wire`) and of the metadata block
(:mod:`carpool.hast.metadata`), so that one module never has to import another
only for a constant.  Each ``value`` is the word hast.conf and ``hastctl`` use.
"""

from __future__ import annotations

import enum

__all__ = [
    "DEFAULT_EXTENTSIZE",
    "DEFAULT_KEEPDIRTY",
    "DEFAULT_PORT",
    "DEFAULT_TIMEOUT",
    "Checksum",
    "Compression",
    "Replication",
    "Role",
]

#: TCP port of the replication link (FreeBSD's PROTO_TCP_DEFAULT_PORT).
DEFAULT_PORT = 8457
#: Seconds without traffic before the link is declared dead (HAST_TIMEOUT).
DEFAULT_TIMEOUT = 20
#: Bytes covered by one activemap bit (HAST_EXTENTSIZE, 2 MiB).
DEFAULT_EXTENTSIZE = 2 * 1024 * 1024
#: Extents kept dirty after their writes finished (HAST_KEEPDIRTY).
DEFAULT_KEEPDIRTY = 64


class Replication(enum.Enum):
    """When a WRITE is acknowledged to the application."""

    FULLSYNC = "fullsync"  #: after both disks wrote it
    MEMSYNC = "memsync"  #: after the local write and the peer's receipt (default)
    ASYNC = "async"  #: after the local write


class Checksum(enum.Enum):
    """Integrity check of replicated data on the wire."""

    NONE = "none"
    CRC32 = "crc32"
    SHA256 = "sha256"


class Compression(enum.Enum):
    """Compression of replicated data on the wire.

    ``FAST`` stands in for FreeBSD's ``lzf``: hast.conf's ``compression lzf``
    selects it.  Like lzf it first tries ``hole`` (an all-zero block travels as
    a flag) and compresses the rest with a fast general-purpose compressor.
    """

    NONE = "none"
    HOLE = "hole"
    FAST = "fast"


class Role(enum.Enum):
    """A resource's role, as ``hastctl role`` sets it and the metadata remembers it."""

    INIT = "init"
    PRIMARY = "primary"
    SECONDARY = "secondary"


def ranges_overlap(offset: int, length: int, other_offset: int, other_length: int) -> bool:
    """Whether [offset, offset+length) and [other_offset, other_offset+other_length) meet."""
    return offset < other_offset + other_length and other_offset < offset + length
