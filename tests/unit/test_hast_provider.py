"""The local provider on a real (sparse) file: hastctl create, reopen, crash-safe updates."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from carpool.errors import CarpoolError
from carpool.hast.common import Role
from carpool.hast.metadata import SLOT_SIZE, MetadataError
from carpool.hast.provider import LocalProvider, create_provider

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
