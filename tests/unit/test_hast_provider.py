"""The local provider on a real (sparse) file: hastctl create, reopen, crash-safe updates."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from carpool.errors import CarpoolError
from carpool.hast.activemap import decode_bitmap, encode_bitmap
from carpool.hast.common import Role
from carpool.hast.metadata import SLOT_SIZE, MetadataError
from carpool.hast.provider import ActivemapStore, LocalProvider, create_provider

MIB = 1024 * 1024


def provider_file(tmp_path: Path, size: int = 64 * MIB) -> str:
    path = tmp_path / "hast0.img"
    with open(path, "wb") as handle:
        handle.truncate(size)
    return str(path)


def test_create_then_open_gives_the_layout_and_empty_map(tmp_path: Path) -> None:
    path = provider_file(tmp_path)
    created = create_provider(path, "shared_storage")
    assert created.extentsize == 2 * MIB and created.keepdirty == 64
    provider = LocalProvider.open(path, "shared_storage")
    try:
        assert provider.metadata.datasize == created.datasize
        assert provider.metadata.localoff == created.localoff
        assert provider.data.size == created.datasize
        assert provider.dirty_extents_on_disk() == []
        assert provider.metadata.prevrole is Role.INIT
    finally:
        provider.close()


def test_create_options_and_refusals(tmp_path: Path) -> None:
    path = provider_file(tmp_path)
    metadata = create_provider(path, "r", extentsize=MIB, keepdirty=8, mediasize=32 * MIB)
    assert (metadata.extentsize, metadata.keepdirty) == (MIB, 8)
    assert metadata.localoff + metadata.datasize == 32 * MIB
    with pytest.raises(CarpoolError, match="larger than"):
        create_provider(path, "r", mediasize=128 * MIB)
    with pytest.raises(CarpoolError, match="cannot open"):
        create_provider(str(tmp_path / "missing"), "r")


def test_wrong_resource_and_foreign_data_are_refused(tmp_path: Path) -> None:
    path = provider_file(tmp_path)
    with pytest.raises(MetadataError):
        LocalProvider.open(path, "shared_storage")  # never created
    create_provider(path, "pgdata")
    with pytest.raises(MetadataError, match=r"pgdata|shared_storage"):
        LocalProvider.open(path, "shared_storage")


def test_metadata_updates_survive_a_torn_write(tmp_path: Path) -> None:
    path = provider_file(tmp_path)
    create_provider(path, "r")
    provider = LocalProvider.open(path, "r")
    first = provider.store_metadata(provider.metadata.replace(localcnt=1, resuid=42))
    provider.close()
    # The next update goes to the other slot; tear it (half written, then crash).
    other = ((first.generation + 1) % 2) * SLOT_SIZE
    with open(path, "r+b") as handle:
        handle.seek(other + 100)
        handle.write(os.urandom(200))
    reopened = LocalProvider.open(path, "r")
    try:
        assert (reopened.metadata.localcnt, reopened.metadata.resuid) == (1, 42)
    finally:
        reopened.close()


def test_activemap_persists_and_data_never_touches_metadata(tmp_path: Path) -> None:
    path = provider_file(tmp_path)
    create_provider(path, "r")
    provider = LocalProvider.open(path, "r")
    try:
        provider.mark_all_dirty()
        assert provider.dirty_extents_on_disk() == list(range(provider.metadata.nextents))

        async def write_everywhere() -> None:
            data = provider.data
            await data.write(0, memoryview(b"\xff" * 4096), fua=True)
            await data.write(data.size - 4096, memoryview(b"\xee" * 4096), fua=False)
            await data.flush()
            assert await data.read(0, 4096) == b"\xff" * 4096

        asyncio.run(write_everywhere())
    finally:
        provider.close()
    again = LocalProvider.open(path, "r")  # metadata intact after data writes at both ends
    try:
        assert again.dirty_extents_on_disk() == list(range(again.metadata.nextents))
        with open(path, "rb") as handle:
            handle.seek(again.metadata.localoff)
            assert handle.read(4096) == b"\xff" * 4096
    finally:
        again.close()


@settings(max_examples=60, deadline=None)
@given(steps=st.lists(st.one_of(st.just(None), st.sets(st.integers(0, 39), max_size=8)),
                      max_size=40))
def test_the_on_disk_activemap_never_forgets_an_extent_before_a_flush(
    steps: list[set[int] | None], tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.mktemp("am") / "disk.img"
    with open(path, "wb") as handle:
        handle.truncate(40 * 64 * 1024 + 1024 * 1024)
    create_provider(str(path), "r", extentsize=64 * 1024)
    provider = LocalProvider.open(str(path), "r")
    try:
        nextents = provider.metadata.nextents
        store = ActivemapStore(provider, provider.read_activemap())
        needed: set[int] = set()  # every extent stored since the last flush
        for step in steps:
            if step is None:
                snapshot = store.snapshot()
                store.flushed(snapshot)
                needed = set(decode_bitmap(snapshot.to_bytes(provider.mapsize, "little"),
                                           nextents))  # fmt: skip
            else:
                store.store(encode_bitmap(step, nextents, provider.mapsize))
                needed |= step
            on_disk = set(provider.dirty_extents_on_disk())
            assert needed <= on_disk
    finally:
        provider.close()


def test_a_sequential_writer_costs_one_activemap_write_per_several_extents(
    tmp_path: Path,
) -> None:
    path = tmp_path / "disk.img"
    with open(path, "wb") as handle:
        handle.truncate(64 * 64 * 1024 + 1024 * 1024)
    create_provider(str(path), "r", extentsize=64 * 1024)
    provider = LocalProvider.open(str(path), "r")
    writes = 0
    original = provider.write_activemap_range

    def counting(bitmap: bytes) -> None:
        nonlocal writes
        writes += 1
        original(bitmap)

    provider.write_activemap_range = counting  # type: ignore[method-assign]
    try:
        store = ActivemapStore(provider, provider.read_activemap())
        dirty: set[int] = set()
        for extent in range(32):
            dirty.add(extent)
            store.store(encode_bitmap(dirty, provider.metadata.nextents, provider.mapsize))
        assert writes <= 32 // ActivemapStore.SEQUENTIAL_AHEAD + 2
        assert set(range(32)) <= set(provider.dirty_extents_on_disk())
    finally:
        provider.close()
