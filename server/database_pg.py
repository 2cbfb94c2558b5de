"""PostgreSQL as the metadata database (psycopg 3 with a connection pool).

The store's portable SQL uses ``?`` placeholders: they become ``%s`` here. Write
transactions run at READ COMMITTED behind a transaction-scoped advisory lock on the
family (or detector) they change, so every statement after the lock sees every write the
previous holder committed, on any replica.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from common.errors import StorageUnavailableError
from server.database import Connection, Cursor

log = logging.getLogger(__name__)

POOL_MIN = 2
POOL_MAX = 16
CONNECT_TIMEOUT_S = 5
POOL_WAIT_S = 10.0
PING_WAIT_S = 2.0


def redact(url: str) -> str:
    """The URL without its password (for logs and errors)."""
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)


def _portable(sql: str) -> str:
    return sql.replace("%", "%%").replace("?", "%s")


class _PgConnection:
    """A pooled connection that speaks the store's ``?`` SQL."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, params: Any = (), /) -> Cursor:
        return self._conn.execute(_portable(sql), params)

    def executemany(self, sql: str, rows: Any, /) -> None:
        with self._conn.cursor() as cur:
            cur.executemany(_portable(sql), rows)


class PostgresDatabase:
    """A connection pool to one PostgreSQL database."""

    dialect = "postgresql"

    def __init__(self, url: str, min_size: int = POOL_MIN, max_size: int = POOL_MAX) -> None:
        self.url = redact(url)
        self._pool = ConnectionPool(
            url, min_size=min_size, max_size=max_size, open=False, timeout=POOL_WAIT_S,
            kwargs={"connect_timeout": CONNECT_TIMEOUT_S, "autocommit": True},
            check=ConnectionPool.check_connection,  # a dead connection is replaced, not used
            name="privface")
        self._pool.open(wait=False)

    @contextmanager
    def _connection(self, wait: float = POOL_WAIT_S) -> Iterator[psycopg.Connection[Any]]:
        try:
            with self._pool.connection(timeout=wait) as conn:
                yield conn
        except (PoolTimeout, psycopg.OperationalError) as exc:
            raise StorageUnavailableError(
                f"the database {self.url} is unreachable ({type(exc).__name__}): retry "
                "shortly") from exc

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self._connection() as conn:
            yield _PgConnection(conn)

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        with self._connection() as conn, conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield _PgConnection(conn)

    @contextmanager
    def transaction(self, lock: str | None = None) -> Iterator[Connection]:
        with self._connection() as conn, conn.transaction():
            if lock is not None:
                conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (lock,))
            yield _PgConnection(conn)

    def ping(self) -> None:
        with self._connection(wait=PING_WAIT_S) as conn:  # a health check must answer fast
            conn.execute("SELECT 1").fetchone()

    def after_delete(self) -> None:
        """Nothing to do: PostgreSQL reclaims deleted rows with (auto)vacuum."""

    def close(self) -> None:
        self._pool.close()
