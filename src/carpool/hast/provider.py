"""The local provider of a HAST resource: a file or block device holding metadata,
activemap and data (layout in ``hast.metadata``).

``create_provider`` is ``hastctl create``: it writes fresh metadata and an empty
activemap and syncs them. ``LocalProvider.open`` reads them back for hastd; its
``data`` is a :class:`~carpool.hast.nbdserver.FileBackend` over the data area only,
so no request can ever reach the metadata. Metadata updates go to the slot that
does not hold the current state, then fsync (crash-safe); activemap writes go to
their fixed offset, then fsync.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from carpool.errors import CarpoolError
from carpool.hast.activemap import decode_bitmap, encode_bitmap
from carpool.hast.metadata import (
    METADATA_SIZE,
    Metadata,
    MetadataLayout,
    decode,
    encode,
    update_block,
    write_at,
)
from carpool.hast.nbdserver import FileBackend


def provider_size(path: str) -> int:
    """Bytes of a file or block device (a block device's size is where it ends)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        raise CarpoolError(f"cannot open the local provider {path}: {error.strerror}") from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def create_provider(
    path: str,
    resource: str,
    *,
    extentsize: int | None = None,
    keepdirty: int | None = None,
    mediasize: int | None = None,
) -> Metadata:
    """``hastctl create [-e extentsize] [-k keepdirty] [-m mediasize] resource``."""
    size = provider_size(path)
    if mediasize is not None and mediasize > size:
        raise CarpoolError(f"-m {mediasize} is larger than {path} ({size} bytes)")
    arguments = {}
    if extentsize is not None:
        arguments["extentsize"] = extentsize
    if keepdirty is not None:
        arguments["keepdirty"] = keepdirty
    layout = MetadataLayout.compute(mediasize or size, **arguments)
    metadata = Metadata.create(resource, layout)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        write_at(fd, layout.activemap_offset, bytes(layout.mapsize), sync=False)
        write_at(fd, 0, encode(metadata))
    finally:
        os.close(fd)
    return metadata


@dataclass
class LocalProvider:
    path: str
    fd: int
    metadata: Metadata
    mapsize: int
    data: FileBackend

    @classmethod
    def open(cls, path: str, resource: str) -> LocalProvider:
        """Open the provider of ``resource``; errors say to run ``hastctl create`` if needed."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as error:
            raise CarpoolError(f"cannot open the local provider {path}: {error.strerror}") from None
        try:
            block = os.pread(fd, METADATA_SIZE, 0)
            metadata = decode(block, resource=resource)
            mapsize = metadata.localoff - METADATA_SIZE
            end = metadata.localoff + metadata.datasize
            if mapsize <= 0 or end > os.lseek(fd, 0, os.SEEK_END):
                raise CarpoolError(
                    f"{path}: metadata describes {end} bytes but the provider is smaller;"
                    f" run `hastctl create {resource}` again"
                )
            data = FileBackend(path, offset=metadata.localoff, size=metadata.datasize)
        except BaseException:
            os.close(fd)
            raise
        return cls(path=path, fd=fd, metadata=metadata, mapsize=mapsize, data=data)

    @property
    def is_block_device(self) -> bool:
        return stat.S_ISBLK(os.fstat(self.fd).st_mode)

    def store_metadata(self, metadata: Metadata) -> Metadata:
        """Write ``metadata`` crash-safely; returns it as written (generation bumped)."""
        offset, written, slot = update_block(metadata)
        write_at(self.fd, offset, slot)
        self.metadata = written
        return written

    def read_activemap(self) -> bytes:
        return os.pread(self.fd, self.mapsize, METADATA_SIZE)

    def store_activemap(self, bitmap: bytes) -> None:
        """Write the on-disk activemap (before the writes it covers are issued)."""
        if len(bitmap) > self.mapsize:
            raise CarpoolError(f"activemap of {len(bitmap)} bytes exceeds {self.mapsize}")
        write_at(self.fd, METADATA_SIZE, bitmap)

    def write_activemap_range(self, bitmap: bytes) -> None:
        """Write the activemap and make that range alone durable (``RWF_DSYNC``)."""
        if len(bitmap) > self.mapsize:
            raise CarpoolError(f"activemap of {len(bitmap)} bytes exceeds {self.mapsize}")
        view = memoryview(bitmap)
        offset = METADATA_SIZE
        while view:
            written = os.pwritev(self.fd, [view], offset, os.RWF_DSYNC)
            view = view[written:]
            offset += written

    def dirty_extents_on_disk(self) -> list[int]:
        return decode_bitmap(self.read_activemap(), self.metadata.nextents)

    def mark_all_dirty(self) -> None:
        """After a crash of unknown extent, or a full resync: every extent dirty."""
        nextents = self.metadata.nextents
        self.store_activemap(encode_bitmap(range(nextents), nextents, self.mapsize))

    def close(self) -> None:
        self.data.close()
        os.close(self.fd)


class ActivemapStore:
    """The on-disk activemap kept a superset of the machine's, at the cost of one
    small synchronous write per update instead of an fsync of the whole provider.

    A bit may be *set* on disk at any time: that write alone is made durable.
    A bit may be *cleared* on disk only once the writes to its extent are durable,
    which the page cache does not promise until the data is flushed. So between
    two data flushes the on-disk map only grows (``stored | on_disk``); after a
    flush, the bits that were already clear in the machine's map when the flush
    began are cleared too. (HAST gets the same guarantee from the BIO_FLUSH it
    sends with each activemap write, which flushes the disk's whole cache.)

    When a newly dirty extent follows a dirty one (a sequential writer), the next
    :data:`SEQUENTIAL_AHEAD` extents are marked with it: one synchronous write
    instead of several, for at most that many extra extents to resync after a crash.
    """

    SEQUENTIAL_AHEAD = 8

    def __init__(self, provider: LocalProvider, on_disk: bytes) -> None:
        self.provider = provider
        self.size = len(on_disk)
        self.mask = (1 << provider.metadata.nextents) - 1
        self.on_disk = int.from_bytes(on_disk, "little")
        self.latest = self.on_disk

    @property
    def clears_pending(self) -> bool:
        return self.on_disk != self.latest

    def _write(self, target: int) -> None:
        if target != self.on_disk:
            self.provider.write_activemap_range(target.to_bytes(self.size, "little"))
            self.on_disk = target

    def store(self, bitmap: bytes) -> None:
        """The machine's new map: on disk before the writes it covers are issued."""
        self.latest = int.from_bytes(bitmap, "little")
        newly = self.latest & ~self.on_disk
        if not newly:
            return
        sequential = newly & ((self.latest | self.on_disk) << 1)
        ahead = 0
        for step in range(1, self.SEQUENTIAL_AHEAD + 1):
            ahead |= sequential << step
        self._write(self.on_disk | self.latest | (ahead & self.mask))

    def snapshot(self) -> int:
        """The machine's map as a data flush begins (pass it to :meth:`flushed`)."""
        return self.latest

    def flushed(self, snapshot: int) -> None:
        """Every write completed before ``snapshot`` was taken is durable now."""
        self._write(self.latest | (self.on_disk & snapshot))
