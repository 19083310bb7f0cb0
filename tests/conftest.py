"""Shared test setup: root detection, and lab leftovers cleaned before and after the run."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

IS_ROOT = os.geteuid() == 0

requires_root = pytest.mark.skipif(
    not IS_ROOT, reason="needs root: runs daemons in network namespaces on the real kernel"
)


def requires_tool(*names: str) -> pytest.MarkDecorator:
    missing = [name for name in names if shutil.which(name) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"needs {', '.join(missing)} (run `make setup` to install it)"
    )


@pytest.fixture(scope="session", autouse=True)
def _clean_stale_labs() -> Iterator[None]:
    """Remove labs left by runs that died; never touches a lab whose owner still runs."""
    if IS_ROOT:
        from carpool.lab.registry import clean

        clean()
    yield
    if IS_ROOT:
        from carpool.lab.registry import clean

        clean()


ROOT_ONLY_DIRECTORIES = ("integration", "interop", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that build namespaces skip, with the reason, when not run as root."""
    if IS_ROOT:
        return
    skip = pytest.mark.skip(reason="needs root: network namespaces on the real kernel")
    for item in items:
        if any(f"/tests/{part}/" in str(item.path) for part in ROOT_ONLY_DIRECTORIES):
            item.add_marker(skip)
