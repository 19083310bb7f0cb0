"""The resync planner: which bytes go where after a reconnect, in what order, how fast (pure).

This module owns the resync walk; :class:`~carpool.hast.primary.PrimaryMachine`
is its only caller and does the I/O.  From the activemap's sync queue (set by
:meth:`~carpool.hast.activemap.ActiveMap.merge`, ``sync_all`` or ``need_sync``)
a :class:`Resync` hands out :class:`Chunk` s in offset order, extent by extent,
``chunk_size`` bytes at most (128 KiB, FreeBSD 10's MAXPHYS, by default) and
never crossing an extent boundary:

* :meth:`Resync.next_chunk` returns the next chunk to copy, or None when the
  window of chunks in flight is full, the rate limit has no tokens yet (see
  :meth:`Resync.wake_at`) or nothing is left to start.
* :meth:`Resync.chunk_done` counts the bytes; after the last chunk of an extent
  the extent is marked synced in the activemap (the returned bitmap is to be
  written), so an interrupted resync resumes, on the next connect, with only
  the extents left — an extent cut in the middle is copied again in full.
* :meth:`Resync.interrupt` forgets the chunks in flight (a disconnect).

Byte accounting is exact: ``total_bytes`` is the size of the extents queued at
the start (the last extent may be short), ``done_bytes`` the bytes of chunks
completed, and an uninterrupted resync completes exactly ``total_bytes``.
Extents queued while the resync runs (a peer write error) are picked up when the
walk wraps around, and added to ``total_bytes``.

The direction comes from :func:`carpool.hast.metadata.decide_sync`; the
counters once it is done from :func:`carpool.hast.metadata.after_sync`
(:meth:`Resync.final_metadata`).

Rate limit: a token bucket of ``rate`` bytes per second holding at most
``max(rate, chunk_size)`` bytes; a chunk starts when the bucket holds its size.
"""

from __future__ import annotations

from dataclasses import dataclass

from carpool.hast.activemap import ActiveMap
from carpool.hast.metadata import Metadata, NodeCounters, SyncDirection, after_sync

__all__ = ["DEFAULT_CHUNK", "DEFAULT_WINDOW", "Chunk", "Resync"]

#: Bytes per resync request (FreeBSD 10's MAXPHYS).
DEFAULT_CHUNK = 128 * 1024
#: Resync chunks in flight at once (HAST does one; pipelining is carpool's).
DEFAULT_WINDOW = 4


@dataclass(frozen=True, slots=True)
class Chunk:
    """``length`` bytes at ``offset`` of extent ``ext``; ``last`` ends the extent."""

    ext: int
    offset: int
    length: int
    last: bool


class Resync:
    """One resync run over an activemap's sync queue."""

    def __init__(
        self,
        activemap: ActiveMap,
        direction: SyncDirection,
        *,
        chunk_size: int = DEFAULT_CHUNK,
        window: int = DEFAULT_WINDOW,
        rate: int | None = None,
        now: float = 0.0,
    ) -> None:
        if direction.refused:
            raise ValueError(f"cannot resync: {direction.value}")
        if chunk_size <= 0 or window <= 0:
            raise ValueError("chunk_size and window must be positive")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (or None for no limit)")
        self.activemap = activemap
        self.direction = direction
        self.chunk_size = chunk_size
        self.window = window
        self.rate = rate
        self._capacity = float(max(rate or 0, chunk_size))
        self._tokens = self._capacity
        self._last = now
        self.total_bytes = activemap.sync_bytes
        self.done_bytes = 0
        self.started_bytes = 0
        self._ext: int | None = None  # extent being handed out
        self._next_off = 0  # next offset to hand out within it
        self._cursor = 0  # where to look for the next extent
        self._pending: dict[int, int] = {}  # extent -> chunks not yet done
        self._fully_issued: set[int] = set()  # extents whose last chunk was handed out
        self._in_flight = 0
        self.interrupted = False

    # -- queries

    @property
    def from_secondary(self) -> bool:
        return self.direction.from_secondary

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def finished(self) -> bool:
        """Nothing left to sync and nothing in flight."""
        return (
            not self.interrupted
            and self._in_flight == 0
            and self._ext is None
            and self.activemap.nsync == 0
        )

    @property
    def progress(self) -> float:
        """Fraction done, 0.0 to 1.0."""
        return 1.0 if self.total_bytes == 0 else min(1.0, self.done_bytes / self.total_bytes)

    def wake_at(self) -> float | None:
        """When the rate limit lets the next chunk start (None: no limit or not waiting)."""
        if self.rate is None:
            return None
        need = min(float(self.chunk_size), self._capacity)
        if self._tokens >= need:
            return None
        return self._last + (need - self._tokens) / self.rate

    # -- the walk

    def _refill(self, now: float) -> None:
        if self.rate is not None and now > self._last:
            self._tokens = min(self._capacity, self._tokens + (now - self._last) * self.rate)
        self._last = max(self._last, now)

    def _pick_extent(self) -> int | None:
        am = self.activemap
        for start in (self._cursor, 0):
            ext = am.next_sync(start)
            while ext is not None and ext in self._pending:
                ext = am.next_sync(ext + 1)
            if ext is not None:
                if start == 0 and self._cursor != 0:
                    # wrapped around: extents queued behind the walk
                    self.total_bytes += am.sync_range(ext)[1]
                return ext
        return None

    def next_chunk(self, now: float) -> Chunk | None:
        """The next chunk to copy now, or None (window full, no tokens, or nothing to start)."""
        if self.interrupted or self._in_flight >= self.window:
            return None
        self._refill(now)
        if self._ext is None:
            ext = self._pick_extent()
            if ext is None:
                return None
            self._ext = ext
            self._next_off = self.activemap.sync_range(ext)[0]
            self._pending[ext] = 0
        ext = self._ext
        start, length = self.activemap.sync_range(ext)
        end = start + length
        size = min(self.chunk_size, end - self._next_off)
        if self.rate is not None:
            need = min(float(size), self._capacity)
            if self._tokens < need:
                return None
            self._tokens -= need
        chunk = Chunk(ext, self._next_off, size, self._next_off + size == end)
        self._next_off += size
        self._pending[ext] += 1
        self._in_flight += 1
        self.started_bytes += size
        if chunk.last:
            self._fully_issued.add(ext)
            self._ext = None
            self._cursor = ext + 1
        return chunk

    def chunk_done(self, chunk: Chunk) -> bytes | None:
        """``chunk`` is on the sync target; the bitmap to write if its extent is now clean."""
        if self.interrupted or chunk.ext not in self._pending:
            return None
        self._in_flight -= 1
        self.done_bytes += chunk.length
        self._pending[chunk.ext] -= 1
        if self._pending[chunk.ext] == 0 and chunk.ext in self._fully_issued:
            del self._pending[chunk.ext]
            self._fully_issued.discard(chunk.ext)
            return self.activemap.extent_synced(chunk.ext)
        return None

    def interrupt(self) -> None:
        """Stop: chunks in flight are forgotten, their extents stay queued in the activemap."""
        self.interrupted = True
        self._in_flight = 0
        self._pending.clear()
        self._fully_issued.clear()
        self._ext = None

    def final_metadata(self, primary: Metadata, secondary: NodeCounters) -> Metadata:
        """The primary's metadata once this resync finished (HAST: counters from the peer)."""
        if not self.finished:
            raise ValueError("the resync has not finished")
        return after_sync(primary, secondary)
