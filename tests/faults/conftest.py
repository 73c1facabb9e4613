"""The fault suite: everything under tests/faults/ carries the ``fault`` marker, which the quick suite deselects
(``addopts`` in pyproject.toml). Run it with ``scripts/test faults`` (CI runs it after the quick suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.fault)
