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
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from common.errors import (
    AlreadyExistsError,
    AuthenticationError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    VersionConflictError,
)
from server.limits import PhotoQuota

log = logging.getLogger(__name__)

PHOTO_ID_RE = re.compile(r"[0-9a-f]{32}")  # use with fullmatch: `$` would allow a "\n"
FAMILY_ID_RE = re.compile(r"fam_[0-9a-f]{24}")  # use with fullmatch
# Every table with a family_id column, children before families (foreign keys).
FAMILY_TABLES = ("photos", "gallery_positions", "gallery_blocks", "sealed_items", "invites",
                 "devices", "families")

DEFAULT_INVITE_TTL = 24 * 3600.0
MAX_INVITE_TTL = 7 * 24 * 3600.0
MAX_LIVE_INVITES = 64  # per family: an invitation is cheap to make, rows are not free
LAST_SEEN_EVERY = 60.0  # seconds between last_seen writes of one device (not every call)

WRONG_CREDENTIALS = "unknown family or wrong access token: check the family bundle"
REVOKED = ("this device was revoked by the family: ask a family member for a new invitation "
           "(privface family export) and join again")
BAD_INVITE = ("the invitation is unknown, used or expired: export a new one on a phone of "
              "the family")

SCHEMA = """
CREATE TABLE IF NOT EXISTS families (
    family_id TEXT PRIMARY KEY,
    token_hash BLOB NOT NULL,
    label_key_fp BLOB NOT NULL,
    label_dim INTEGER NOT NULL,
    context_file TEXT,
    context_size INTEGER,
    created REAL NOT NULL,
    ckks_key_id BLOB
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
CREATE TABLE IF NOT EXISTS devices (
    family_id TEXT NOT NULL REFERENCES families(family_id),
    device_id TEXT NOT NULL,
    token_hash BLOB NOT NULL,
    sealed_name BLOB NOT NULL,
    created REAL NOT NULL,
    last_seen REAL NOT NULL DEFAULT 0,
    revoked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (family_id, device_id)
);
CREATE UNIQUE INDEX IF NOT EXISTS devices_by_token ON devices (token_hash);
CREATE TABLE IF NOT EXISTS invites (
    token_hash BLOB PRIMARY KEY,
    family_id TEXT NOT NULL REFERENCES families(family_id),
    created_by TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS invites_by_family ON invites (family_id, created_by);
CREATE TABLE IF NOT EXISTS sealed_items (
    family_id TEXT NOT NULL REFERENCES families(family_id),
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (family_id, name)
);
"""


@dataclass(frozen=True)
class Family:
    """A family's public record."""

    family_id: str
    label_key_fp: bytes
    label_dim: int
    context_file: str | None
    device_id: str = ""  # the authenticated device
    ckks_key_id: bytes | None = None  # key id of the stored public context, if known


@dataclass(frozen=True)
class Device:
    """One phone of a family (its name sealed by the phones, opaque here)."""

    device_id: str
    sealed_name: bytes
    created: float
    last_seen: float
    revoked: bool


@dataclass(frozen=True)
class FamilyDeletion:
    """What deleting a family removed."""

    photos: int
    gallery_entries: int
    devices: int
    sealed_items: int
    files: int


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


def hash_token(token: str, kind: str = "token") -> bytes:
    """Only token hashes are stored: a leaked database grants no access.

    ``kind`` separates domains, so an invitation's hash never equals an access token's."""
    return hashlib.sha256(f"privface/{kind}/v1".encode() + token.encode()).digest()


def legacy_device_id(family_id: str) -> str:
    """The id given to the one device of a family created before devices existed."""
    return hashlib.sha256(b"privface/legacy-device/v1" + family_id.encode()).hexdigest()[:32]


def write_file_atomically(path: Path, chunks: Iterable[bytes] | bytes) -> int:
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
    _fsync_dir(path.parent)
    return size


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Store:
    """SQLite metadata + blob files under one root directory."""

    def __init__(self, root: Path, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self.blob_root = self.root / "blobs"
        self.blob_root.mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "privface.sqlite3"
        self.clock = clock  # tests move time (invitation expiry) without sleeping
        self._local = threading.local()
        # family -> [photos, stored bytes]: filled by writers inside their transaction, so
        # the quota check in put_photo is exact within this process.
        self._usage: dict[str, list[int]] = {}
        self._usage_lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        """Creates missing tables and upgrades databases written before devices existed."""
        db = self._db()
        # CREATE ... IF NOT EXISTS leaves an old families table as it is: the ALTER below
        # adds the column it lacks.
        db.executescript(SCHEMA)
        with self._tx() as db:  # one process at a time: racing servers must not both ALTER
            columns = {r[1] for r in db.execute("PRAGMA table_info(families)")}
            if "ckks_key_id" not in columns:
                db.execute("ALTER TABLE families ADD COLUMN ckks_key_id BLOB")
            legacy = db.execute(
                "SELECT family_id, token_hash, created FROM families f WHERE "
                "length(token_hash) > 0 AND NOT EXISTS "
                "(SELECT 1 FROM devices d WHERE d.family_id = f.family_id)").fetchall()
            # families.token_hash stays as it was, so an older server can still open this
            # database; only the devices table is read from now on.
            db.executemany(
                "INSERT INTO devices (family_id, device_id, token_hash, sealed_name, created) "
                "VALUES (?, ?, ?, x'', ?)",
                [(fid, legacy_device_id(fid), th, created) for fid, th, created in legacy])
        if legacy:
            log.info("gave %d families created before devices existed their first device",
                     len(legacy))

    # -- connections ---------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten with zeros
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

    def create_family(self, label_key_fp: bytes, label_dim: int, device_id: str = "",
                      sealed_device_name: bytes = b"") -> tuple[str, str]:
        """Creates a family and its first device; returns (family_id, access_token).

        ``device_id`` empty: the server picks one. Only the token hash is kept."""
        family_id = "fam_" + secrets.token_hex(12)
        device_id = device_id or secrets.token_hex(16)
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self._tx() as db:
            # families.token_hash mirrors the first device's so an older server still works
            # (it is blanked when that device is revoked).
            db.execute("INSERT INTO families (family_id, token_hash, label_key_fp, label_dim, "
                       "created) VALUES (?, ?, ?, ?, ?)",
                       (family_id, hash_token(token), label_key_fp, label_dim, now))
            self._insert_device(db, family_id, device_id, token, sealed_device_name, now)
        return family_id, token

    @staticmethod
    def _insert_device(db: sqlite3.Connection, family_id: str, device_id: str, token: str,
                       sealed_name: bytes, now: float) -> None:
        db.execute("INSERT INTO devices (family_id, device_id, token_hash, sealed_name, "
                   "created) VALUES (?, ?, ?, ?, ?)",
                   (family_id, device_id, hash_token(token), sealed_name, now))

    def authenticate(self, family_id: str, token: str) -> Family:
        """The family (and device) these credentials belong to.

        AuthenticationError for an unknown family or token; PermissionDeniedError for a
        revoked device's token."""
        db = self._db()
        # Looked up by hash: the hash of a secret token leaks nothing through timing.
        row = db.execute(
            "SELECT f.label_key_fp, f.label_dim, f.context_file, f.ckks_key_id, d.device_id, "
            "d.revoked, d.last_seen FROM devices d JOIN families f USING (family_id) "
            "WHERE d.family_id = ? AND d.token_hash = ?",
            (family_id, hash_token(token))).fetchone()
        if row is None:
            raise AuthenticationError(WRONG_CREDENTIALS)
        fp, dim, context_file, key_id, device_id, revoked, last_seen = row
        if revoked:
            raise PermissionDeniedError(REVOKED)
        now = self.clock()
        if now - last_seen >= LAST_SEEN_EVERY:  # a write per call would serialise readers
            db.execute("UPDATE devices SET last_seen = ? WHERE family_id = ? AND "
                       "device_id = ? AND last_seen < ?", (now, family_id, device_id, now))
        return Family(family_id, fp, dim, context_file, device_id, key_id)

    # -- devices and invitations ---------------------------------------------------------

    def create_invite(self, family_id: str, ttl_seconds: float = DEFAULT_INVITE_TTL,
                      created_by: str = "") -> tuple[str, float]:
        """A one-time invitation; returns (token, expires_at). ttl <= 0: the default;
        capped at MAX_INVITE_TTL."""
        ttl = DEFAULT_INVITE_TTL if ttl_seconds <= 0 else min(ttl_seconds, MAX_INVITE_TTL)
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self._tx() as db:
            db.execute("DELETE FROM invites WHERE family_id = ? AND expires <= ?",
                       (family_id, now))
            live = db.execute("SELECT COUNT(*) FROM invites WHERE family_id = ?",
                              (family_id,)).fetchone()[0]
            if live >= MAX_LIVE_INVITES:
                raise LimitExceededError(
                    f"the family already has {live} unused invitations: use or let them "
                    "expire before making more")
            db.execute("INSERT INTO invites (token_hash, family_id, created_by, created, "
                       "expires) VALUES (?, ?, ?, ?, ?)",
                       (hash_token(token, "invite"), family_id, created_by, now, now + ttl))
        return token, now + ttl

    def join_family(self, family_id: str, invite_token: str, device_id: str,
                    sealed_name: bytes) -> str:
        """Registers a device with a one-time invitation; returns the device's access token.

        AuthenticationError for an unknown family or an unknown, used or expired
        invitation (one message for all); AlreadyExistsError for a device id in use."""
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self._tx() as db:
            invite = hash_token(invite_token, "invite")
            found = db.execute("SELECT 1 FROM invites WHERE token_hash = ? AND family_id = ? "
                               "AND expires > ?", (invite, family_id, now)).fetchone()
            if found is None:
                raise AuthenticationError(BAD_INVITE)
            if db.execute("SELECT 1 FROM devices WHERE family_id = ? AND device_id = ?",
                          (family_id, device_id)).fetchone():
                raise AlreadyExistsError(
                    f"device id {device_id} is already registered in this family: pick a "
                    "new random id")
            # Consumed in the transaction that creates the device: used exactly once.
            db.execute("DELETE FROM invites WHERE token_hash = ?", (invite,))
            self._insert_device(db, family_id, device_id, token, sealed_name, now)
        return token

    def list_devices(self, family_id: str) -> list[Device]:
        """Every device of the family, revoked ones included, oldest first."""
        return [Device(r[0], r[1], r[2], r[3], bool(r[4])) for r in self._db().execute(
            "SELECT device_id, sealed_name, created, last_seen, revoked FROM devices "
            "WHERE family_id = ? ORDER BY created, rowid", (family_id,))]

    def revoke_device(self, family_id: str, device_id: str, caller_device_id: str) -> bool:
        """Revokes a device and the invitations it made; False if it already was revoked.

        NotFoundError for an unknown id; PreconditionError for the caller itself or the
        family's last active device."""
        with self._tx() as db:
            row = db.execute("SELECT revoked, token_hash FROM devices WHERE family_id = ? "
                             "AND device_id = ?", (family_id, device_id)).fetchone()
            if row is None:
                raise NotFoundError(f"no device {device_id} in this family: list the "
                                    "family's devices for their ids")
            if device_id == caller_device_id:
                raise PreconditionError("a phone cannot revoke itself: revoke it from "
                                        "another phone of the family")
            if row[0]:
                return False
            active = db.execute("SELECT COUNT(*) FROM devices WHERE family_id = ? AND "
                                "revoked = 0", (family_id,)).fetchone()[0]
            if active <= 1:
                raise PreconditionError("this is the family's last active device: "
                                        "revoking it would lock the family out")
            db.execute("UPDATE devices SET revoked = 1 WHERE family_id = ? AND device_id = ?",
                       (family_id, device_id))
            # An invitation made before the revocation would let the device back in.
            db.execute("DELETE FROM invites WHERE family_id = ? AND created_by = ?",
                       (family_id, device_id))
            # The legacy column must not keep a revoked token usable by an older server.
            db.execute("UPDATE families SET token_hash = x'' WHERE family_id = ? AND "
                       "token_hash = ?", (family_id, row[1]))
        return True

    # -- sealed items --------------------------------------------------------------------

    def get_sealed(self, family_id: str, name: str) -> tuple[int, bytes]:
        """(version, sealed bytes) of one item; (0, b"") if it was never written."""
        row = self._db().execute("SELECT version, data FROM sealed_items WHERE family_id = ? "
                                 "AND name = ?", (family_id, name)).fetchone()
        return (int(row[0]), bytes(row[1])) if row else (0, b"")

    def put_sealed(self, family_id: str, name: str, expected_version: int,
                   data: bytes) -> int:
        """Compare-and-set write; returns the new version.

        VersionConflictError if the stored version is not ``expected_version``."""
        with self._tx() as db:
            row = db.execute("SELECT version FROM sealed_items WHERE family_id = ? AND "
                             "name = ?", (family_id, name)).fetchone()
            current = int(row[0]) if row else 0
            if current != expected_version:
                raise VersionConflictError(
                    f"item {name} changed on another phone (version {current}, not "
                    f"{expected_version}): re-read and retry")
            db.execute("INSERT OR REPLACE INTO sealed_items (family_id, name, version, data) "
                       "VALUES (?, ?, ?, ?)", (family_id, name, current + 1, data))
        return current + 1

    # -- public context ------------------------------------------------------------------

    def family_counts(self, family_id: str) -> tuple[int, int]:
        """(photo count, live gallery entry count)."""
        db = self._db()
        photos = db.execute("SELECT COUNT(*) FROM photos WHERE family_id = ?",
                            (family_id,)).fetchone()[0]
        entries = db.execute("SELECT COUNT(*) FROM gallery_positions WHERE family_id = ? "
                             "AND alive = 1", (family_id,)).fetchone()[0]
        return photos, entries

    def store_public_context(self, family_id: str, chunks: Iterable[bytes] | bytes,
                             key_id: bytes) -> int:
        """Stores (or replaces) the family's public CKKS context file; returns its size.

        PreconditionError if the family has gallery positions (live or dead) and the stored
        context has another key id: they were encrypted under the family's keys, and a
        context under other keys would make every match garbage. The same key id again is
        an idempotent re-upload."""
        name = f"context-{secrets.token_hex(8)}.bin"
        path = self.blob_root / family_id / name
        size = write_file_atomically(path, chunks)
        try:
            with self._tx() as db:
                old_file, old_key = db.execute(
                    "SELECT context_file, ckks_key_id FROM families WHERE family_id = ?",
                    (family_id,)).fetchone()
                gallery = db.execute("SELECT COUNT(*) FROM gallery_positions WHERE "
                                     "family_id = ?", (family_id,)).fetchone()[0]
                if old_file and gallery and old_key != key_id:
                    raise PreconditionError(
                        "the family already has CKKS keys and an encrypted gallery made with "
                        "them; a phone must use the family's keys (privface fetches them "
                        "from the family's sealed copy)")
                db.execute("UPDATE families SET context_file = ?, context_size = ?, "
                           "ckks_key_id = ? WHERE family_id = ?",
                           (name, size, key_id, family_id))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        if old_file:
            (self.blob_root / family_id / old_file).unlink(missing_ok=True)
        return size

    def set_ckks_key_id(self, family_id: str, key_id: bytes) -> None:
        """Records the key id of a context stored before key ids were kept (migration)."""
        with self._tx() as db:
            db.execute("UPDATE families SET ckks_key_id = ? WHERE family_id = ? AND "
                       "ckks_key_id IS NULL", (key_id, family_id))

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

    _USAGE_SQL = ("SELECT COUNT(*), COALESCE(SUM(blob_size + COALESCE(length(thumbnail), 0)), "
                  "0) FROM photos WHERE family_id = ?")

    def photo_usage(self, family_id: str) -> tuple[int, int]:
        """(photos, stored bytes of blobs and thumbnails) of a family."""
        with self._usage_lock:
            usage = self._usage.get(family_id)
            if usage is not None:
                return usage[0], usage[1]
        count, size = self._db().execute(self._USAGE_SQL, (family_id,)).fetchone()
        return int(count), int(size)

    def _change_usage(self, db: sqlite3.Connection, family_id: str, photos: int,
                      size: int) -> tuple[int, int]:
        """Inside a write transaction: the usage before the change, then applies it."""
        with self._usage_lock:
            usage = self._usage.get(family_id)
            if usage is None:
                count, stored = db.execute(self._USAGE_SQL, (family_id,)).fetchone()
                usage = self._usage[family_id] = [int(count), int(stored)]
            before = usage[0], usage[1]
            usage[0] += photos
            usage[1] += size
            return before

    def _forget_usage(self, family_id: str) -> None:
        with self._usage_lock:
            self._usage.pop(family_id, None)

    def has_photo(self, family_id: str, photo_id: str) -> bool:
        """Whether the family stores a photo with this id."""
        return self._db().execute("SELECT 1 FROM photos WHERE family_id = ? AND photo_id = ?",
                                  (family_id, photo_id)).fetchone() is not None

    def put_photo(self, family_id: str, photo_id: str, blob_file: Path, blob_size: int,
                  blob_sha256: bytes, labels: bytes, thumbnail: bytes | None,
                  quota: PhotoQuota | None = None) -> tuple[int, bool]:
        """Commits a photo row for an already durable blob file.

        Returns (seq, created). A repeat of the same id with the same blob is a no-op
        (created False, the new file is removed); a different blob raises AlreadyExistsError;
        a new photo over the family's ``quota`` raises LimitExceededError (checked in the
        transaction, so racing uploads cannot overshoot it).
        """
        size = blob_size + len(thumbnail or b"")
        try:
            with self._tx() as db:
                existing = db.execute(
                    "SELECT seq, blob_sha256 FROM photos WHERE family_id = ? AND photo_id = ?",
                    (family_id, photo_id)).fetchone()
                if existing is None:
                    photos, stored = self._change_usage(db, family_id, 0, 0)
                    if quota is not None:
                        quota.check(photos, stored, size)
                    self._change_usage(db, family_id, 1, size)
                    cur = db.execute(
                        "INSERT INTO photos (family_id, photo_id, blob_file, blob_size, "
                        "blob_sha256, labels, thumbnail, created) VALUES (?,?,?,?,?,?,?,?)",
                        (family_id, photo_id, blob_file.name, blob_size, blob_sha256, labels,
                         thumbnail, time.time()))
                    assert cur.lastrowid is not None  # set by a successful INSERT
                    return cur.lastrowid, True
        except BaseException:
            self._forget_usage(family_id)  # recounted on next use
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
        try:
            with self._tx() as db:
                # Counted (if not cached yet) before the row goes, or it would go twice.
                self._change_usage(db, family_id, 0, 0)
                if db.execute("DELETE FROM photos WHERE family_id = ? AND photo_id = ?",
                              (family_id, photo_id)).rowcount:
                    self._change_usage(db, family_id, -1,
                                       -(record.blob_size + len(record.thumbnail or b"")))
        except BaseException:
            self._forget_usage(family_id)
            raise
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
        self._forget_usage(family_id)

    # -- gallery -------------------------------------------------------------------------

    def gallery_layout(self, family_id: str) -> dict[int, list[int]]:
        """block -> slot per position (-1 for dead positions)."""
        layout: dict[int, list[int]] = {}
        for block, _position, slot, alive in self._db().execute(
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
                     matrix_chunks: Iterable[bytes],
                     verify: Callable[[], None] | None = None) -> int:
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

    # -- deleting a family ---------------------------------------------------------------

    def delete_family(self, family_id: str) -> FamilyDeletion:
        """Deletes every row of a family in one transaction, then its blob files.

        Idempotent: an unknown family deletes nothing. A crash after the commit leaves only
        files no row names, which :meth:`sweep_orphans` removes at the next start."""
        if not FAMILY_ID_RE.fullmatch(family_id):  # it also names a directory below
            raise NotFoundError("no such family")
        with self._tx() as db:
            def count(table: str) -> int:
                return int(db.execute(f"SELECT COUNT(*) FROM {table} WHERE family_id = ?",
                                      (family_id,)).fetchone()[0])
            deletion = FamilyDeletion(
                photos=count("photos"), gallery_entries=count("gallery_positions"),
                devices=count("devices"), sealed_items=count("sealed_items"), files=0)
            for table in FAMILY_TABLES:
                db.execute(f"DELETE FROM {table} WHERE family_id = ?", (family_id,))
        self._forget_usage(family_id)
        files = self._remove_family_files(family_id)
        # Copies of the deleted pages still in the write-ahead log go too (best effort: a
        # concurrent reader can delay the truncation to a later checkpoint).
        self._db().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return replace(deletion, files=files)

    def _remove_family_files(self, family_id: str) -> int:
        folder = self.blob_root / family_id
        removed = 0
        if folder.is_dir():
            for path in folder.iterdir():
                path.unlink(missing_ok=True)
                removed += 1
            folder.rmdir()
            _fsync_dir(self.blob_root)
        return removed

    # -- maintenance ---------------------------------------------------------------------

    def sweep_orphans(self) -> int:
        """Removes blob and temp files no row names (left by a crash mid-upload or between a
        family's deletion and the removal of its files), and empty folders of families
        that no longer exist."""
        db = self._db()
        named = {r[0] for r in db.execute("SELECT blob_file FROM photos")}
        named |= {r[0] for r in db.execute("SELECT context_file FROM families "
                                           "WHERE context_file IS NOT NULL")}
        named |= {r[0] for r in db.execute("SELECT matrix_file FROM detectors")}
        families = {r[0] for r in db.execute("SELECT family_id FROM families")}
        removed = 0
        for path in self.blob_root.rglob("*"):
            if path.is_file() and path.name not in named and path.name != "vendor.token":
                path.unlink(missing_ok=True)
                removed += 1
        for folder in self.blob_root.iterdir():
            if folder.is_dir() and FAMILY_ID_RE.fullmatch(folder.name) \
                    and folder.name not in families and not any(folder.iterdir()):
                folder.rmdir()
        if removed:
            log.info("removed %d orphan files", removed)
        return removed
