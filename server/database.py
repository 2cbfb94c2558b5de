"""The metadata database under the store: SQLite (embedded default) or PostgreSQL.

:class:`server.storage.Store` writes its SQL once, with ``?`` placeholders and the subset
both engines share; a :class:`Database` gives it connections and write transactions:

- ``read()``: a connection in autocommit mode for single statements and scans;
- ``snapshot()``: several reads that see one consistent state (a read transaction);
- ``transaction(lock)``: a write transaction in which every other writer holding the same
  ``lock`` (a family id, or "detector:<id>") waits, so read-check-write sequences (quotas,
  compare-and-set, gallery positions) stay exact across threads, processes and replicas.
  SQLite's ``BEGIN IMMEDIATE`` serialises all writers; PostgreSQL takes a transaction-scoped
  advisory lock on ``lock``.

Migrations (server.migrations) are numbered and recorded in ``schema_version``.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)


class Cursor(Protocol):
    """What both drivers' cursors offer."""

    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...
    def fetchmany(self, size: int) -> list[Any]: ...
    def __iter__(self) -> Iterator[Any]: ...


class Connection(Protocol):
    """A connection running the store's portable SQL (``?`` placeholders)."""

    def execute(self, sql: str, params: Any = (), /) -> Cursor: ...
    def executemany(self, sql: str, rows: Any, /) -> Any: ...


class Database(Protocol):
    """Connections and transactions of one metadata database."""

    dialect: str  # "sqlite" or "postgresql"
    url: str  # without credentials, for logs

    def read(self) -> AbstractContextManager[Connection]: ...
    def snapshot(self) -> AbstractContextManager[Connection]: ...
    def transaction(self, lock: str | None = None) -> AbstractContextManager[Connection]: ...
    def ping(self) -> None: ...
    def after_delete(self) -> None: ...
    def close(self) -> None: ...


class SqliteDatabase:
    """One SQLite file in WAL mode with synchronous=FULL; a connection per thread."""

    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.url = f"sqlite:{self.path}"
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten with zeros
            self._local.db = db
        return db

    @contextmanager
    def read(self) -> Iterator[Connection]:
        yield self._connection()

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        db = self._connection()
        db.execute("BEGIN")  # deferred: the first read fixes the snapshot, no write lock
        try:
            yield db
        finally:
            db.execute("COMMIT")

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[Connection]:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")  # the write lock at once: no upgrade deadlocks
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def ping(self) -> None:
        self._connection().execute("SELECT 1").fetchone()

    def after_delete(self) -> None:
        """Copies of deleted pages still in the write-ahead log go too (best effort: a
        concurrent reader can delay the truncation to a later checkpoint)."""
        self._connection().execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None


def open_database(url: str, default_path: Path) -> Database:
    """The database a ``--store`` setting names: "" (SQLite at ``default_path``),
    "sqlite:PATH" or "postgresql://USER@HOST:PORT/DB" (libpq URL; a password is better
    given in PGPASSWORD or ~/.pgpass than in the URL, which shows in `ps`)."""
    if not url:
        return SqliteDatabase(default_path)
    if url.startswith("sqlite:"):
        return SqliteDatabase(Path(url[len("sqlite:"):]).expanduser())
    if url.startswith(("postgresql://", "postgres://")):
        from server.database_pg import PostgresDatabase  # psycopg only when it is used
        return PostgresDatabase(url)
    raise ValueError(f"unknown store {url!r}: use sqlite:PATH or postgresql://HOST/DB")
