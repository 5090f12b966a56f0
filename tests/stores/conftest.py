"""One ``store`` fixture over every store, so a new store is one fixture away from proven."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from authsessions.stores import MemoryStore, SQLiteStore, Store

STORE_FIXTURES = ["memory_store", "sqlite_store"]


@pytest.fixture
async def memory_store() -> AsyncIterator[Store]:
    async with MemoryStore() as store:
        yield store


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[Store]:
    async with SQLiteStore(tmp_path / "sessions.db") as store:
        yield store


@pytest.fixture(params=STORE_FIXTURES)
def store(request: pytest.FixtureRequest) -> Store:
    """Each store in turn, open and empty."""
    store: Store = request.getfixturevalue(request.param)
    return store
