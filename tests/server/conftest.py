"""Storage fixtures: the store tests run on both back ends, SQLite (the embedded default)
and PostgreSQL (a fresh database per test, from tests/backends.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from server import migrations
from server.blobs import FileBlobs
from server.storage import Store

StoreFactory = Callable[..., Store]


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreFactory]:
    """Opens the test's store; a second call opens the same data again (a restart)."""
    opened: list[Store] = []
    if request.param == "sqlite":
        def open_store(clock: Callable[[], float] = time.time) -> Store:
            return Store(tmp_path / "store", clock=clock)
    else:
        from server.database_pg import PostgresDatabase

        url = request.getfixturevalue("fresh_postgres_url")
        schema = PostgresDatabase(url, min_size=0, max_size=1)
        migrations.migrate(schema)
        schema.close()

        def open_store(clock: Callable[[], float] = time.time) -> Store:
            return Store(database=PostgresDatabase(url, min_size=0, max_size=4),
                         blobs=FileBlobs(tmp_path / "blobs"), clock=clock, migrate=False)

    def factory(clock: Callable[[], float] = time.time) -> Store:
        store = open_store(clock)
        opened.append(store)
        return store

    yield factory
    for store in opened:
        store.close()
