from __future__ import annotations

import pytest

from tests.conftest import IS_ROOT


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath) or "tests/interop" in str(item.fspath):
            if not IS_ROOT:
                item.add_marker(
                    pytest.mark.skip(reason="needs root: network namespaces on the real kernel")
                )
