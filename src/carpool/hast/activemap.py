"""HAST's activemap: the per-extent dirty bitmap of the primary (FreeBSD ``activemap.c``), pure.

Each extent (``extentsize`` bytes of data, 2 MiB by default) has one bit on
disk.  A set bit means "may differ from the peer": after a crash, a
reconnect or a split, exactly these extents are resynced.  The on-disk map is
always ``in flight | keepdirty LRU | to be synced``:

* :meth:`ActiveMap.write_start` (before a WRITE/TRIM/WRITE_ZEROES is issued to
  either side) counts one more request on each extent it touches and moves the
  extents to the head of the keepdirty LRU (at most ``keepdirty`` extents, the
  oldest leave).  If that sets a bit that is not on disk yet it returns the
  new bitmap: **write it at the activemap offset (and flush if metaflush)
  before issuing the request**.  Otherwise it returns None.
* :meth:`ActiveMap.write_complete` (once *both* sides have the write, or the
  remote leg was marked with :meth:`need_sync`) counts the request off; an
  extent with no request left and outside the LRU is clean.  It returns the
  bitmap when bits were cleared (writing it is optional: a stale set bit only
  costs resync work).
* :meth:`ActiveMap.need_sync` marks extents the peer did not get; they stay
  dirty until resynced.  :meth:`merge` ORs in the peer's map at connect,
  :meth:`sync_all` asks for a full sync, :meth:`next_sync` /
  :meth:`sync_range` / :meth:`extent_synced` walk the sync queue in offset order.

Every mutating method returns ``bytes`` (the serialized on-disk map to write)
or None; :meth:`bitmap` gives the map at any time.  Serialization is FreeBSD's
``bitstring(3)``: extent *n* is bit ``n % 8`` (LSB first) of byte ``n // 8``,
zero-padded to ``mapsize`` (:func:`encode_bitmap`, :func:`decode_bitmap`).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterable, Iterator

from carpool.hast.common import DEFAULT_EXTENTSIZE, DEFAULT_KEEPDIRTY

__all__ = ["ActiveMap", "decode_bitmap", "encode_bitmap"]

_NONZERO = re.compile(rb"[^\x00]")


def encode_bitmap(extents: Iterable[int], nextents: int, mapsize: int | None = None) -> bytes:
    """The on-disk bytes for the set ``extents`` (padded to ``mapsize`` bytes)."""
    size = (nextents + 7) // 8
    out = bytearray(max(size, mapsize or 0))
    for ext in extents:
        if not 0 <= ext < nextents:
            raise ValueError(f"extent {ext} outside 0..{nextents - 1}")
        out[ext >> 3] |= 1 << (ext & 7)
    return bytes(out)


def decode_bitmap(data: bytes | bytearray | memoryview, nextents: int) -> list[int]:
    """The set extents of an on-disk map, in order; bits past ``nextents`` are ignored."""
    raw = bytes(data)
    need = (nextents + 7) // 8
    if len(raw) < need:
        raise ValueError(f"activemap of {len(raw)} bytes, {need} needed for {nextents} extents")
    out: list[int] = []
    for index in range(need):
        byte = raw[index]
        if byte:
            base = index << 3
            for bit in range(8):
                if byte >> bit & 1 and base + bit < nextents:
                    out.append(base + bit)
    return out


class ActiveMap:
    """The primary's view of which extents may differ from the peer."""

    def __init__(
        self,
        datasize: int,
        extentsize: int = DEFAULT_EXTENTSIZE,
        keepdirty: int = DEFAULT_KEEPDIRTY,
        mapsize: int | None = None,
    ) -> None:
        if datasize <= 0 or extentsize <= 0 or keepdirty < 0:
            raise ValueError("datasize and extentsize must be positive, keepdirty not negative")
        self.datasize = datasize
        self.extentsize = extentsize
        self.keepdirty = keepdirty
        self.nextents = -(-datasize // extentsize)
        self.mapsize = max((self.nextents + 7) // 8, mapsize or 0)
        self._memtab = [0] * self.nextents  # requests in flight per extent
        self._lru: OrderedDict[int, None] = OrderedDict()  # most recent last
        self._syncmap = bytearray(self.mapsize)  # extents to resync
        self._nsync = 0
        self._dirty = bytearray(self.mapsize)  # memmap | lru | sync, as it should be on disk
        self._disk = bytearray(self.mapsize)  # as last handed out for writing
        self._ndirty = 0

    # -- queries

    def extents(self, offset: int, length: int) -> range:
        """The extents a request touches (ValueError if outside the data)."""
        if offset < 0 or length < 0 or offset + length > self.datasize:
            raise ValueError(f"range {offset}+{length} outside the {self.datasize}-byte data")
        if length == 0:
            return range(0)
        return range(offset // self.extentsize, (offset + length - 1) // self.extentsize + 1)

    def is_dirty(self, ext: int) -> bool:
        """Whether ``ext`` is in the map as it should be on disk."""
        return bool(self._dirty[ext >> 3] >> (ext & 7) & 1)

    def on_disk(self, ext: int) -> bool:
        """Whether ``ext`` was set in the last bitmap handed out."""
        return bool(self._disk[ext >> 3] >> (ext & 7) & 1)

    def in_flight(self, ext: int) -> int:
        return self._memtab[ext]

    @property
    def ndirty(self) -> int:
        """Dirty extents (``hastctl list``'s ``dirty`` is this times extentsize)."""
        return self._ndirty

    @property
    def dirty_bytes(self) -> int:
        return self._ndirty * self.extentsize

    @property
    def nsync(self) -> int:
        """Extents still to resync."""
        return self._nsync

    @property
    def sync_bytes(self) -> int:
        """Bytes still to resync."""
        return sum(self.sync_range(ext)[1] for ext in self.sync_queue())

    def needs_sync(self, ext: int) -> bool:
        return bool(self._syncmap[ext >> 3] >> (ext & 7) & 1)

    def _sync_add(self, ext: int) -> None:
        index, bit = ext >> 3, 1 << (ext & 7)
        if not self._syncmap[index] & bit:
            self._syncmap[index] |= bit
            self._nsync += 1

    def keepdirty_extents(self) -> list[int]:
        """The keepdirty LRU, most recent first."""
        return list(reversed(self._lru))

    def bitmap(self) -> bytes:
        """The on-disk map now (and remember it as written)."""
        self._disk[:] = self._dirty
        return bytes(self._dirty)

    # -- internals

    def _update(self, ext: int) -> None:
        wanted = self._memtab[ext] > 0 or ext in self._lru or self.needs_sync(ext)
        index, bit = ext >> 3, 1 << (ext & 7)
        was = bool(self._dirty[index] & bit)
        if wanted and not was:
            self._dirty[index] |= bit
            self._ndirty += 1
        elif was and not wanted:
            self._dirty[index] &= ~bit & 0xFF
            self._ndirty -= 1

    def _newly_dirty(self, exts: Iterable[int]) -> bool:
        return any(
            self._dirty[e >> 3] & (1 << (e & 7)) and not self._disk[e >> 3] & (1 << (e & 7))
            for e in exts
        )

    def _cleared(self) -> bool:
        return self._dirty != self._disk

    # -- the write path

    def write_start(self, offset: int, length: int) -> bytes | None:
        """Account for a request about to be issued; the bitmap to write first, or None."""
        exts = self.extents(offset, length)
        lru = self._lru
        if len(exts) == 1 and exts[0] in lru:
            # The common case: an extent in the keepdirty set is dirty already (nothing
            # to evict, nothing to update); a bitmap only if it is not on disk yet.
            ext = exts[0]
            self._memtab[ext] += 1
            lru.move_to_end(ext)
            return None if self._disk[ext >> 3] & (1 << (ext & 7)) else self.bitmap()
        evicted: list[int] = []
        for ext in exts:
            self._memtab[ext] += 1
            if self.keepdirty:
                if ext in lru:
                    lru.move_to_end(ext)
                else:
                    lru[ext] = None
                    if len(lru) > self.keepdirty:
                        old, _ = lru.popitem(last=False)
                        evicted.append(old)
            self._update(ext)
        for old in evicted:
            self._update(old)
        if self._newly_dirty(exts):
            return self.bitmap()
        return None

    def write_complete(self, offset: int, length: int) -> bytes | None:
        """Account for a request both sides finished; the bitmap if bits cleared, or None."""
        changed = False
        for ext in self.extents(offset, length):
            if self._memtab[ext] <= 0:
                raise ValueError(f"write_complete on extent {ext} without a write_start")
            self._memtab[ext] -= 1
            if self._memtab[ext] == 0:
                self._update(ext)
                changed = True
        # Also catches extents evicted from the LRU earlier without a flush.
        if changed and self._cleared():
            return self.bitmap()
        return None

    def need_sync(self, offset: int, length: int) -> bytes | None:
        """The peer missed this range: keep it dirty until resynced; bitmap if newly dirty."""
        exts = self.extents(offset, length)
        if len(exts) == 1:
            ext = exts[0]
            index, bit = ext >> 3, 1 << (ext & 7)
            if self._syncmap[index] & bit and self._disk[index] & bit:
                return None  # already to resync, dirty, and on disk: nothing changes
        for ext in exts:
            self._sync_add(ext)
            self._update(ext)
        return self.bitmap() if self._newly_dirty(exts) else None

    # -- start-up, connect and sync

    def copyin(self, data: bytes | bytearray | memoryview) -> None:
        """Load the on-disk map at start: every set extent must be resynced."""
        for ext in decode_bitmap(data, self.nextents):
            self._sync_add(ext)
            self._update(ext)
        self._disk[:] = self._dirty

    def merge(self, data: bytes | bytearray | memoryview) -> bytes | None:
        """OR in the peer's map (at connect); the bitmap if that dirtied new extents."""
        exts = decode_bitmap(data, self.nextents)
        for ext in exts:
            self._sync_add(ext)
            self._update(ext)
        return self.bitmap() if self._newly_dirty(exts) else None

    def sync_all(self) -> bytes | None:
        """Full synchronization: every extent goes to the sync queue."""
        return self.need_sync(0, self.datasize)

    def next_sync(self, start: int = 0) -> int | None:
        """The first extent ≥ ``start`` still to sync (offset order), or None."""
        if start < 0:
            start = 0
        index = start >> 3
        first = self._syncmap[index] >> (start & 7) if index < len(self._syncmap) else 0
        if first:
            return start + ((first & -first).bit_length() - 1)
        m = _NONZERO.search(self._syncmap, index + 1)
        if m is None:
            return None
        byte = self._syncmap[m.start()]
        ext = (m.start() << 3) + ((byte & -byte).bit_length() - 1)
        return ext if ext < self.nextents else None

    def sync_queue(self) -> Iterator[int]:
        """Extents to sync in offset order (a snapshot)."""
        return iter(decode_bitmap(self._syncmap, self.nextents))

    def sync_range(self, ext: int) -> tuple[int, int]:
        """(offset, length) of extent ``ext`` in the data (the last one may be short)."""
        offset = ext * self.extentsize
        return offset, min(self.extentsize, self.datasize - offset)

    def extent_synced(self, ext: int) -> bytes | None:
        """``ext`` is now identical on both sides; the bitmap if it left the map."""
        if not self.needs_sync(ext):
            return None
        self._syncmap[ext >> 3] &= ~(1 << (ext & 7)) & 0xFF
        self._nsync -= 1
        self._update(ext)
        if not self.is_dirty(ext) and self.on_disk(ext):
            return self.bitmap()
        return None

    def clear(self) -> bytes:
        """Forget everything dirty (after ``hastctl create`` or a completed full sync)."""
        if any(self._memtab):
            raise ValueError("cannot clear the activemap with requests in flight")
        self._lru.clear()
        self._syncmap[:] = bytes(self.mapsize)
        self._nsync = 0
        self._dirty[:] = bytes(self.mapsize)
        self._ndirty = 0
        return self.bitmap()
