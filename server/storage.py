"""Embedded default storage: SQLite (WAL, synchronous=FULL) plus blob files.

Blob files are written atomically (temp file, fsync, rename, fsync dir) *before* the row
that names them commits, so a row never points at a missing or partial file; a crash can
at worst leave an orphan file, which :meth:`Store.sweep_orphans` removes at start-up.
Every query is scoped by family id: no method returns another family's rows.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from common.errors import AlreadyExistsError, AuthenticationError, NotFoundError

log = logging.getLogger(__name__)

PHOTO_ID_RE = re.compile(r"^[0-9a-f]{32}$")

SCHEMA = """
CREATE TABLE IF NOT EXISTS families (
    family_id TEXT PRIMARY KEY,
    token_hash BLOB NOT NULL,
    label_key_fp BLOB NOT NULL,
    label_dim INTEGER NOT NULL,
    context_file TEXT,
    context_size INTEGER,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS photos (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    family_id TEXT NOT NULL REFERENCES families(family_id),
    photo_id TEXT NOT NULL,
    blob_file TEXT NOT NULL,
    blob_size INTEGER NOT NULL,
    blob_sha256 BLOB NOT NULL,
    labels BLOB NOT NULL,
    thumbnail BLOB,
    created REAL NOT NULL,
    UNIQUE (family_id, photo_id)
);
CREATE TABLE IF NOT EXISTS gallery_blocks (
    family_id TEXT NOT NULL REFERENCES families(family_id),
    block INTEGER NOT NULL,
    ciphertexts BLOB NOT NULL,
    PRIMARY KEY (family_id, block)
);
CREATE TABLE IF NOT EXISTS gallery_positions (
    family_id TEXT NOT NULL,
    block INTEGER NOT NULL,
    position INTEGER NOT NULL,
    slot INTEGER NOT NULL,
    alive INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (family_id, block, position)
);
CREATE TABLE IF NOT EXISTS detectors (
    detector_id TEXT NOT NULL,
    key_version INTEGER NOT NULL,
    key_fp BLOB NOT NULL,
    header BLOB NOT NULL,
    matrix_file TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (detector_id, key_version)
);
"""


@dataclass(frozen=True)
class Family:
    """A family's public record."""

    family_id: str
    label_key_fp: bytes
    label_dim: int
    context_file: str | None


@dataclass(frozen=True)
class PhotoRecord:
    """A stored photo's metadata (the blob stays on disk)."""

    photo_id: str
    seq: int
    blob_path: Path
    blob_size: int
    blob_sha256: bytes
    labels: bytes
    thumbnail: bytes | None


def hash_token(token: str) -> bytes:
    """Only token hashes are stored: a leaked database grants no access."""
    return hashlib.sha256(b"privface/token/v1" + token.encode()).digest()


def write_file_atomically(path: Path, chunks: Iterator[bytes] | bytes) -> int:
    """Writes ``path`` durably: temp file, fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in ([chunks] if isinstance(chunks, bytes) else chunks):
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return size


class Store:
    """SQLite metadata + blob files under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blob_root = self.root / "blobs"
        self.blob_root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "privface.sqlite3"
        self._local = threading.local()
        self._db().executescript(SCHEMA)

    # -- connections ---------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- families ------------------------------------------------------------------------

    def create_family(self, label_key_fp: bytes, label_dim: int) -> tuple[str, str]:
        """Creates a family; returns (family_id, access_token). Only the token hash is kept."""
        family_id = "fam_" + secrets.token_hex(12)
        token = secrets.token_urlsafe(32)
        with self._tx() as db:
            db.execute("INSERT INTO families (family_id, token_hash, label_key_fp, label_dim, "
                       "created) VALUES (?, ?, ?, ?, ?)",
                       (family_id, hash_token(token), label_key_fp, label_dim, time.time()))
        return family_id, token

    def authenticate(self, family_id: str, token: str) -> Family:
        """The family whose id and token these are; AuthenticationError otherwise."""
        row = self._db().execute(
            "SELECT token_hash, label_key_fp, label_dim, context_file "
            "FROM families WHERE family_id = ?", (family_id,)).fetchone()
        if row is None or not secrets.compare_digest(row[0], hash_token(token)):
            raise AuthenticationError(
                "unknown family or wrong access token: check the family bundle")
        return Family(family_id, row[1], row[2], row[3])

    def family_counts(self, family_id: str) -> tuple[int, int]:
        """(photo count, live gallery entry count)."""
        db = self._db()
        photos = db.execute("SELECT COUNT(*) FROM photos WHERE family_id = ?",
                            (family_id,)).fetchone()[0]
        entries = db.execute("SELECT COUNT(*) FROM gallery_positions WHERE family_id = ? "
                             "AND alive = 1", (family_id,)).fetchone()[0]
        return photos, entries

    def store_public_context(self, family_id: str, chunks: Iterator[bytes]) -> int:
        """Stores (or replaces) the family's public CKKS context file."""
        name = f"context-{secrets.token_hex(8)}.bin"
        path = self.blob_root / family_id / name
        size = write_file_atomically(path, chunks)
        with self._tx() as db:
            old = db.execute("SELECT context_file FROM families WHERE family_id = ?",
                             (family_id,)).fetchone()
            db.execute("UPDATE families SET context_file = ?, context_size = ? "
                       "WHERE family_id = ?", (name, size, family_id))
        if old and old[0]:
            (self.blob_root / family_id / old[0]).unlink(missing_ok=True)
        return size

    def public_context_path(self, family: Family) -> Path | None:
        """Path of the family's public context file, if uploaded."""
        row = self._db().execute("SELECT context_file FROM families WHERE family_id = ?",
                                 (family.family_id,)).fetchone()
        return self.blob_root / family.family_id / row[0] if row and row[0] else None

    # -- photos --------------------------------------------------------------------------

    def get_photo(self, family_id: str, photo_id: str) -> PhotoRecord:
        """A photo of this family; NotFoundError otherwise (same error for other families)."""
        row = self._db().execute(
            "SELECT seq, blob_file, blob_size, blob_sha256, labels, thumbnail FROM photos "
            "WHERE family_id = ? AND photo_id = ?", (family_id, photo_id)).fetchone()
        if row is None:
            raise NotFoundError(f"no photo {photo_id} in this family")
        return PhotoRecord(photo_id, row[0], self.blob_root / family_id / row[1], row[2],
                           row[3], row[4], row[5])

    def put_photo(self, family_id: str, photo_id: str, blob_file: Path, blob_size: int,
                  blob_sha256: bytes, labels: bytes, thumbnail: bytes | None) -> tuple[int, bool]:
        """Commits a photo row for an already durable blob file.

        Returns (seq, created). A repeat of the same id with the same blob is a no-op
        (created False, the new file is removed); a different blob raises AlreadyExistsError.
        """
        try:
            with self._tx() as db:
                existing = db.execute(
                    "SELECT seq, blob_sha256 FROM photos WHERE family_id = ? AND photo_id = ?",
                    (family_id, photo_id)).fetchone()
                if existing is None:
                    cur = db.execute(
                        "INSERT INTO photos (family_id, photo_id, blob_file, blob_size, "
                        "blob_sha256, labels, thumbnail, created) VALUES (?,?,?,?,?,?,?,?)",
                        (family_id, photo_id, blob_file.name, blob_size, blob_sha256, labels,
                         thumbnail, time.time()))
                    return int(cur.lastrowid), True
        except BaseException:
            blob_file.unlink(missing_ok=True)
            raise
        blob_file.unlink(missing_ok=True)
        if existing[1] != blob_sha256:
            raise AlreadyExistsError(
                f"photo id {photo_id} is already used by a different photo: choose a new id")
        return int(existing[0]), False

    def new_blob_path(self, family_id: str, photo_id: str) -> Path:
        """A fresh file name for an incoming blob (unique, so racing uploads never clash)."""
        return self.blob_root / family_id / f"{photo_id}.{secrets.token_hex(6)}.blob"

    def delete_photo(self, family_id: str, photo_id: str) -> int:
        """Deletes row then file (a crash in between leaves only an orphan file). Returns seq."""
        record = self.get_photo(family_id, photo_id)
        with self._tx() as db:
            db.execute("DELETE FROM photos WHERE family_id = ? AND photo_id = ?",
                       (family_id, photo_id))
        record.blob_path.unlink(missing_ok=True)
        return record.seq

    def iter_labels(self, family_id: str, batch: int = 50_000
                    ) -> Iterator[list[tuple[int, str, bytes]]]:
        """All (seq, photo_id, encrypted labels) of a family in upload order, in batches."""
        cur = self._db().execute("SELECT seq, photo_id, labels FROM photos "
                                 "WHERE family_id = ? ORDER BY seq", (family_id,))
        while rows := cur.fetchmany(batch):
            yield rows

    def list_photo_ids(self, family_id: str) -> list[str]:
        """Photo ids, newest first."""
        return [r[0] for r in self._db().execute(
            "SELECT photo_id FROM photos WHERE family_id = ? ORDER BY seq DESC", (family_id,))]

    def bulk_insert_labels(self, family_id: str, rows: list[tuple[str, bytes]]) -> None:
        """Benchmark helper: label rows whose blobs are empty placeholder files."""
        placeholder = self.blob_root / family_id / "bench-placeholder.blob"
        write_file_atomically(placeholder, b"")
        now = time.time()
        with self._tx() as db:
            db.executemany(
                "INSERT INTO photos (family_id, photo_id, blob_file, blob_size, blob_sha256, "
                "labels, created) VALUES (?,?,?,0,?,?,?)",
                ((family_id, pid, placeholder.name, b"", labels, now) for pid, labels in rows))

    # -- gallery -------------------------------------------------------------------------

    def gallery_layout(self, family_id: str) -> dict[int, list[int]]:
        """block -> slot per position (-1 for dead positions)."""
        layout: dict[int, list[int]] = {}
        for block, position, slot, alive in self._db().execute(
                "SELECT block, position, slot, alive FROM gallery_positions "
                "WHERE family_id = ? ORDER BY block, position", (family_id,)):
            layout.setdefault(block, []).append(slot if alive else -1)
        return layout

    def gallery_block(self, family_id: str, block: int) -> bytes | None:
        """The packed ciphertexts of one block."""
        row = self._db().execute("SELECT ciphertexts FROM gallery_blocks WHERE family_id = ? "
                                 "AND block = ?", (family_id, block)).fetchone()
        return row[0] if row else None

    def put_gallery_block(self, family_id: str, block: int, ciphertexts: bytes,
                          first_position: int, slots: list[int]) -> None:
        """Replaces one block's ciphertexts and records the positions it gained."""
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO gallery_blocks (family_id, block, ciphertexts) "
                       "VALUES (?, ?, ?)", (family_id, block, ciphertexts))
            db.executemany("INSERT INTO gallery_positions (family_id, block, position, slot) "
                           "VALUES (?, ?, ?, ?)",
                           [(family_id, block, first_position + i, s)
                            for i, s in enumerate(slots)])

    def replace_gallery(self, family_id: str, expected_positions: int,
                        blocks: list[tuple[bytes, list[int]]]) -> bool:
        """Swaps the whole gallery in one transaction; False (nothing changed) if the
        gallery no longer has ``expected_positions`` positions (someone enrolled meanwhile)."""
        with self._tx() as db:
            now = db.execute("SELECT COUNT(*) FROM gallery_positions WHERE family_id = ?",
                             (family_id,)).fetchone()[0]
            if now != expected_positions:
                return False
            db.execute("DELETE FROM gallery_blocks WHERE family_id = ?", (family_id,))
            db.execute("DELETE FROM gallery_positions WHERE family_id = ?", (family_id,))
            for block, (ciphertexts, slots) in enumerate(blocks):
                db.execute("INSERT INTO gallery_blocks (family_id, block, ciphertexts) "
                           "VALUES (?, ?, ?)", (family_id, block, ciphertexts))
                db.executemany("INSERT INTO gallery_positions (family_id, block, position, "
                               "slot) VALUES (?, ?, ?, ?)",
                               [(family_id, block, i, s) for i, s in enumerate(slots)])
        return True

    def kill_gallery_slot(self, family_id: str, slot: int) -> int:
        """Marks every entry of one slot dead; returns how many."""
        with self._tx() as db:
            cur = db.execute("UPDATE gallery_positions SET alive = 0 WHERE family_id = ? "
                             "AND slot = ? AND alive = 1", (family_id, slot))
            return cur.rowcount

    # -- detectors -----------------------------------------------------------------------

    def put_detector(self, detector_id: str, key_version: int, key_fp: bytes, header: bytes,
                     matrix_chunks: Iterator[bytes], verify=None) -> int:
        """Stores a detector's encrypted matrix file and header (replacing the same version).

        ``verify()`` runs once the file is durable and before the row commits; if it raises,
        the file is removed and nothing changes.
        """
        name = f"{secrets.token_hex(8)}.v{key_version}.detector"
        path = self.blob_root / "_detectors" / name
        try:
            size = write_file_atomically(path, matrix_chunks)
            if verify is not None:
                verify()
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        with self._tx() as db:
            old = db.execute("SELECT matrix_file FROM detectors WHERE detector_id = ? AND "
                             "key_version = ?", (detector_id, key_version)).fetchone()
            db.execute("INSERT OR REPLACE INTO detectors (detector_id, key_version, key_fp, "
                       "header, matrix_file, created) VALUES (?,?,?,?,?,?)",
                       (detector_id, key_version, key_fp, header, name, time.time()))
        if old:
            (self.blob_root / "_detectors" / old[0]).unlink(missing_ok=True)
        return size

    def list_detectors(self) -> list[tuple[str, int, bytes, bytes]]:
        """(detector_id, key_version, key_fp, header) for every published detector."""
        return list(self._db().execute(
            "SELECT detector_id, key_version, key_fp, header FROM detectors "
            "ORDER BY detector_id, key_version DESC"))

    def detector_versions(self, detector_id: str) -> dict[int, bytes]:
        """key_version -> key fingerprint of every published version of one detector."""
        return dict(self._db().execute("SELECT key_version, key_fp FROM detectors "
                                       "WHERE detector_id = ?", (detector_id,)))

    def get_detector(self, detector_id: str, key_version: int) -> tuple[bytes, bytes, Path]:
        """(key_fp, header, matrix path) of one detector version."""
        row = self._db().execute("SELECT key_fp, header, matrix_file FROM detectors WHERE "
                                 "detector_id = ? AND key_version = ?",
                                 (detector_id, key_version)).fetchone()
        if row is None:
            raise NotFoundError(f"no detector {detector_id!r} with key version {key_version}: "
                                "ask the vendor to publish it (privface-vendor publish)")
        return row[0], row[1], self.blob_root / "_detectors" / row[2]

    # -- maintenance ---------------------------------------------------------------------

    def sweep_orphans(self) -> int:
        """Removes blob and temp files no row names (left by a crash mid-upload)."""
        db = self._db()
        named = {r[0] for r in db.execute("SELECT blob_file FROM photos")}
        named |= {r[0] for r in db.execute("SELECT context_file FROM families "
                                           "WHERE context_file IS NOT NULL")}
        named |= {r[0] for r in db.execute("SELECT matrix_file FROM detectors")}
        removed = 0
        for path in self.blob_root.rglob("*"):
            if path.is_file() and path.name not in named and path.name != "vendor.token":
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d orphan files", removed)
        return removed
