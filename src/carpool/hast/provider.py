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

    def dirty_extents_on_disk(self) -> list[int]:
        return decode_bitmap(self.read_activemap(), self.metadata.nextents)

    def mark_all_dirty(self) -> None:
        """After a crash of unknown extent, or a full resync: every extent dirty."""
        nextents = self.metadata.nextents
        self.store_activemap(encode_bitmap(range(nextents), nextents, self.mapsize))

    def close(self) -> None:
        self.data.close()
        os.close(self.fd)
