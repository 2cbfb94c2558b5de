"""Schema migrations: `privface-server migrate` on PostgreSQL (once, then nothing to do),
servers refusing an old schema with the command to run, and an SQLite database written
before schema versions upgrading itself with its usage counted from its rows."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from common.errors import PreconditionError
from server import migrations
from server.database_pg import PostgresDatabase
from server.storage import Store, hash_token, open_store

ROOT = Path(__file__).resolve().parents[2]


def _migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server", "migrate", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)


def test_migrate_command_on_postgresql(fresh_postgres_url: str, tmp_path: Path) -> None:
    with pytest.raises(PreconditionError, match="privface-server migrate"):
        open_store(fresh_postgres_url, f"file:{tmp_path}", tmp_path)  # a server refuses
    first = _migrate("--store", fresh_postgres_url)
    assert first.returncode == 0, first.stderr
    assert f"schema version 0 -> {migrations.LATEST}" in first.stdout
    assert "postgres@" in first.stdout and "password" not in first.stdout
    again = _migrate("--store", fresh_postgres_url)
    assert again.returncode == 0 and "(0 migration(s) applied)" in again.stdout
    store = open_store(fresh_postgres_url, f"file:{tmp_path}", tmp_path)  # now it starts
    try:
        family_id, token = store.create_family(b"fp", 3)
        assert store.authenticate(family_id, token).label_version == 0
    finally:
        store.close()


def test_migrate_command_explains_a_bad_store(tmp_path: Path) -> None:
    bad = _migrate("--store", "mysql://nowhere/db")
    assert bad.returncode == 2 and "unknown store" in bad.stderr
    assert "Traceback" not in bad.stderr
    down = _migrate("--store", "postgresql://postgres@127.0.0.1:1/none")
    assert down.returncode == 1 and "unreachable" in down.stderr
    assert "Traceback" not in down.stderr


def test_a_newer_schema_is_refused(fresh_postgres_url: str) -> None:
    db = PostgresDatabase(fresh_postgres_url, min_size=0, max_size=1)
    try:
        migrations.migrate(db)
        with db.transaction() as conn:
            conn.execute("INSERT INTO schema_version (version, applied, description) "
                         "VALUES (?, 0, 'from the future')", (migrations.LATEST + 1,))
        with pytest.raises(PreconditionError, match="upgrade the server"):
            migrations.require_latest(db)
    finally:
        db.close()


def test_sqlite_written_before_schema_versions_upgrades_itself(tmp_path: Path) -> None:
    """The first schema, as servers before migrations left it (no ckks_key_id column, no
    schema_version table), with one family and two photos."""
    root = tmp_path / "old"
    root.mkdir()
    with sqlite3.connect(root / "privface.sqlite3") as db:
        for statement in migrations.MIGRATIONS[0].statements:
            db.execute(statement.replace("    ckks_key_id BLOB\n", "    extra BLOB\n"))
        db.execute("INSERT INTO families (family_id, token_hash, label_key_fp, label_dim, "
                   "created) VALUES ('fam_1', ?, x'00', 3, 1.0)", (hash_token("old"),))
        for i, size in enumerate((100, 50)):
            db.execute("INSERT INTO photos (family_id, photo_id, blob_file, blob_size, "
                       "blob_sha256, labels, thumbnail, created) VALUES "
                       "('fam_1', ?, 'f', ?, x'00', x'00', ?, 1.0)",
                       (f"p{i}", size, b"t" * 10 if i == 0 else None))
    db.close()
    store = Store(root)
    try:
        assert migrations.current_version(store.db) == migrations.LATEST
        assert store.photo_usage("fam_1") == (2, 160)  # counted from the rows
        family = store.authenticate("fam_1", "old")  # the legacy token became a device
        assert family.ckks_key_id is None and family.label_version == 0
    finally:
        store.close()
    assert migrations.migrate(Store(root).db) == []  # nothing left to do
