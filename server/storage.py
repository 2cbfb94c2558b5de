"""The store: family metadata in a database (SQLite by default, or PostgreSQL) and blobs
in a blob store (a directory by default, or S3).

Blobs are written completely and durably *before* the row that names them commits, so a
row never names a missing or partial blob; a crash can at worst leave an orphan blob, which
:meth:`Store.sweep_orphans` removes. Every query is scoped by family id: no method returns
another family's rows. The SQL is written once for both databases (server.database).
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
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
from server import migrations
from server.blobs import BlobStore, FileBlobs, open_blobs
from server.database import Connection, Database, SqliteDatabase, open_database
from server.limits import PhotoQuota

log = logging.getLogger(__name__)

PHOTO_ID_RE = re.compile(r"[0-9a-f]{32}")  # use with fullmatch: `$` would allow a "\n"
FAMILY_ID_RE = re.compile(r"fam_[0-9a-f]{24}")  # use with fullmatch
# Every table with a family_id column, children before families (foreign keys).
FAMILY_TABLES = ("photos", "photo_tombstones", "gallery_positions", "gallery_blocks",
                 "sealed_items", "invites", "devices", "families")
DETECTORS = "_detectors"  # the blob folder of detector matrices
NOT_BLOBS = ("vendor.token",)  # files an older server kept beside the blobs

DEFAULT_INVITE_TTL = 24 * 3600.0
MAX_INVITE_TTL = 7 * 24 * 3600.0
MAX_LIVE_INVITES = 64  # per family: an invitation is cheap to make, rows are not free
LAST_SEEN_EVERY = 60.0  # seconds between last_seen writes of one device (not every call)

WRONG_CREDENTIALS = "unknown family or wrong access token: check the family bundle"
REVOKED = ("this device was revoked by the family: ask a family member for a new invitation "
           "(privface family export) and join again")
BAD_INVITE = ("the invitation is unknown, used or expired: export a new one on a phone of "
              "the family")


@dataclass(frozen=True)
class Family:
    """A family's public record."""

    family_id: str
    label_key_fp: bytes
    label_dim: int
    context_file: str | None
    device_id: str = ""  # the authenticated device
    ckks_key_id: bytes | None = None  # key id of the stored public context, if known
    # Bumped by every change of the family's photos / gallery or context, on any server:
    # a cache older than these reloads what changed (server.label_index, server.gallery).
    label_version: int = 0
    gallery_version: int = 0


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
    """A stored photo's metadata (the blob stays in the blob store)."""

    photo_id: str
    seq: int
    blob_key: str
    blob_size: int
    blob_sha256: bytes
    labels: bytes
    thumbnail: bytes | None


@dataclass(frozen=True)
class LabelChanges:
    """What changed in a family's photos since a cache's version (Store.label_changes)."""

    version: int
    deleted: list[str] = field(default_factory=list)  # photo ids, oldest deletion first
    added: list[tuple[int, str, bytes]] = field(default_factory=list)  # (seq, id, labels)


def hash_token(token: str, kind: str = "token") -> bytes:
    """Only token hashes are stored: a leaked database grants no access.

    ``kind`` separates domains, so an invitation's hash never equals an access token's."""
    return hashlib.sha256(f"privface/{kind}/v1".encode() + token.encode()).digest()


def legacy_device_id(family_id: str) -> str:
    """The id given to the one device of a family created before devices existed."""
    return hashlib.sha256(b"privface/legacy-device/v1" + family_id.encode()).hexdigest()[:32]


class Store:
    """Family metadata in a :class:`Database`, blobs in a :class:`BlobStore`.

    Default: SQLite at <root>/privface.sqlite3 and blob files under <root>/blobs. Several
    servers may share one store: every write runs under its family's database lock, usage
    counters live in the family's row, and version numbers in that row tell each server's
    caches what changed (see server.label_index and server.gallery).
    """

    def __init__(self, root: Path | None = None, clock: Callable[[], float] = time.time,
                 database: Database | None = None, blobs: BlobStore | None = None,
                 migrate: bool = True) -> None:
        if root is None and (database is None or blobs is None):
            raise ValueError("a store needs a root directory, or a database and blobs")
        self.root = Path(root) if root is not None else None
        self.db = database or SqliteDatabase(Path(root or ".") / "privface.sqlite3")
        self.blobs = blobs or FileBlobs(Path(root or ".") / "blobs")
        self.clock = clock  # tests move time (invitation expiry) without sleeping
        if migrate:
            migrations.migrate(self.db)
        else:
            migrations.require_latest(self.db)

    def describe(self) -> str:
        """Where the data is, for logs (no credentials)."""
        return f"{self.db.url} + {self.blobs.url}"

    def close(self) -> None:
        """Closes the database connections."""
        self.db.close()

    # -- families ------------------------------------------------------------------------

    def create_family(self, label_key_fp: bytes, label_dim: int, device_id: str = "",
                      sealed_device_name: bytes = b"") -> tuple[str, str]:
        """Creates a family and its first device; returns (family_id, access_token).

        ``device_id`` empty: the server picks one. Only the token hash is kept."""
        family_id = "fam_" + secrets.token_hex(12)
        device_id = device_id or secrets.token_hex(16)
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self.db.transaction(family_id) as db:
            # families.token_hash mirrors the first device's so an older server still works
            # (it is blanked when that device is revoked).
            db.execute("INSERT INTO families (family_id, token_hash, label_key_fp, label_dim, "
                       "created) VALUES (?, ?, ?, ?, ?)",
                       (family_id, hash_token(token), label_key_fp, label_dim, now))
            self._insert_device(db, family_id, device_id, token, sealed_device_name, now)
        return family_id, token

    @staticmethod
    def _insert_device(db: Connection, family_id: str, device_id: str, token: str,
                       sealed_name: bytes, now: float) -> None:
        db.execute("INSERT INTO devices (family_id, device_id, token_hash, sealed_name, "
                   "created) VALUES (?, ?, ?, ?, ?)",
                   (family_id, device_id, hash_token(token), sealed_name, now))

    def authenticate(self, family_id: str, token: str) -> Family:
        """The family (and device) these credentials belong to, with its cache versions.

        AuthenticationError for an unknown family or token; PermissionDeniedError for a
        revoked device's token."""
        with self.db.read() as db:
            # Looked up by hash: the hash of a secret token leaks nothing through timing.
            row = db.execute(
                "SELECT f.label_key_fp, f.label_dim, f.context_file, f.ckks_key_id, "
                "d.device_id, d.revoked, d.last_seen, f.label_version, f.gallery_version "
                "FROM devices d JOIN families f ON f.family_id = d.family_id "
                "WHERE d.family_id = ? AND d.token_hash = ?",
                (family_id, hash_token(token))).fetchone()
            if row is None:
                raise AuthenticationError(WRONG_CREDENTIALS)
            fp, dim, context_file, key_id, device_id, revoked, last_seen, lv, gv = row
            if revoked:
                raise PermissionDeniedError(REVOKED)
            now = self.clock()
            if now - last_seen >= LAST_SEEN_EVERY:  # a write per call would serialise readers
                db.execute("UPDATE devices SET last_seen = ? WHERE family_id = ? AND "
                           "device_id = ? AND last_seen < ?", (now, family_id, device_id, now))
        return Family(family_id, bytes(fp), int(dim), context_file, device_id,
                      bytes(key_id) if key_id is not None else None, int(lv), int(gv))

    # -- devices and invitations ---------------------------------------------------------

    def create_invite(self, family_id: str, ttl_seconds: float = DEFAULT_INVITE_TTL,
                      created_by: str = "") -> tuple[str, float]:
        """A one-time invitation; returns (token, expires_at). ttl <= 0: the default;
        capped at MAX_INVITE_TTL."""
        ttl = DEFAULT_INVITE_TTL if ttl_seconds <= 0 else min(ttl_seconds, MAX_INVITE_TTL)
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self.db.transaction(family_id) as db:
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
        with self.db.transaction(family_id) as db:
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
        with self.db.read() as db:
            return [Device(r[0], bytes(r[1]), r[2], r[3], bool(r[4])) for r in db.execute(
                "SELECT device_id, sealed_name, created, last_seen, revoked FROM devices "
                "WHERE family_id = ? ORDER BY created, device_id", (family_id,))]

    def revoke_device(self, family_id: str, device_id: str, caller_device_id: str) -> bool:
        """Revokes a device and the invitations it made; False if it already was revoked.

        NotFoundError for an unknown id; PreconditionError for the caller itself or the
        family's last active device."""
        with self.db.transaction(family_id) as db:
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
            db.execute("UPDATE families SET token_hash = ? WHERE family_id = ? AND "
                       "token_hash = ?", (b"", family_id, row[1]))
        return True

    # -- sealed items --------------------------------------------------------------------

    def get_sealed(self, family_id: str, name: str) -> tuple[int, bytes]:
        """(version, sealed bytes) of one item; (0, b"") if it was never written."""
        with self.db.read() as db:
            row = db.execute("SELECT version, data FROM sealed_items WHERE family_id = ? "
                             "AND name = ?", (family_id, name)).fetchone()
        return (int(row[0]), bytes(row[1])) if row else (0, b"")

    def put_sealed(self, family_id: str, name: str, expected_version: int,
                   data: bytes) -> int:
        """Compare-and-set write; returns the new version.

        VersionConflictError if the stored version is not ``expected_version``."""
        with self.db.transaction(family_id) as db:
            row = db.execute("SELECT version FROM sealed_items WHERE family_id = ? AND "
                             "name = ?", (family_id, name)).fetchone()
            current = int(row[0]) if row else 0
            if current != expected_version:
                raise VersionConflictError(
                    f"item {name} changed on another phone (version {current}, not "
                    f"{expected_version}): re-read and retry")
            db.execute("INSERT INTO sealed_items (family_id, name, version, data) "
                       "VALUES (?, ?, ?, ?) ON CONFLICT (family_id, name) DO UPDATE SET "
                       "version = excluded.version, data = excluded.data",
                       (family_id, name, current + 1, data))
        return current + 1

    # -- public context ------------------------------------------------------------------

    def family_counts(self, family_id: str) -> tuple[int, int]:
        """(photo count, live gallery entry count)."""
        with self.db.read() as db:
            row = db.execute("SELECT photo_count FROM families WHERE family_id = ?",
                             (family_id,)).fetchone()
            entries = db.execute("SELECT COUNT(*) FROM gallery_positions WHERE family_id = ? "
                                 "AND alive = 1", (family_id,)).fetchone()[0]
        return (int(row[0]) if row else 0), int(entries)

    def store_public_context(self, family_id: str, chunks: Iterable[bytes] | bytes,
                             key_id: bytes) -> int:
        """Stores (or replaces) the family's public CKKS context; returns its size.

        PreconditionError if the family has gallery positions (live or dead) and the stored
        context has another key id: they were encrypted under the family's keys, and a
        context under other keys would make every match garbage. The same key id again is
        an idempotent re-upload."""
        name = f"context-{secrets.token_hex(8)}.bin"
        key = f"{family_id}/{name}"
        size = self.blobs.put(key, chunks)
        try:
            with self.db.transaction(family_id) as db:
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
                           "ckks_key_id = ?, gallery_version = gallery_version + 1 "
                           "WHERE family_id = ?", (name, size, key_id, family_id))
        except BaseException:
            self.blobs.delete(key)
            raise
        if old_file:
            self.blobs.delete(f"{family_id}/{old_file}")
        return size

    def set_ckks_key_id(self, family_id: str, key_id: bytes) -> None:
        """Records the key id of a context stored before key ids were kept (migration)."""
        with self.db.transaction(family_id) as db:
            db.execute("UPDATE families SET ckks_key_id = ? WHERE family_id = ? AND "
                       "ckks_key_id IS NULL", (key_id, family_id))

    def public_context(self, family_id: str) -> bytes | None:
        """The family's public context, if uploaded."""
        with self.db.read() as db:
            row = db.execute("SELECT context_file FROM families WHERE family_id = ?",
                             (family_id,)).fetchone()
        return self.context_bytes(family_id, row[0]) if row and row[0] else None

    def context_bytes(self, family_id: str, context_file: str) -> bytes:
        """One stored public context by name (names are never reused)."""
        return self.blobs.read(f"{family_id}/{context_file}")

    # -- photos --------------------------------------------------------------------------

    def get_photo(self, family_id: str, photo_id: str) -> PhotoRecord:
        """A photo of this family; NotFoundError otherwise (same error for other families)."""
        with self.db.read() as db:
            row = db.execute(
                "SELECT seq, blob_file, blob_size, blob_sha256, labels, thumbnail FROM photos "
                "WHERE family_id = ? AND photo_id = ?", (family_id, photo_id)).fetchone()
        if row is None:
            raise NotFoundError(f"no photo {photo_id} in this family")
        return PhotoRecord(photo_id, int(row[0]), f"{family_id}/{row[1]}", int(row[2]),
                           bytes(row[3]), bytes(row[4]),
                           bytes(row[5]) if row[5] is not None else None)

    def photo_usage(self, family_id: str) -> tuple[int, int]:
        """(photos, stored bytes of blobs and thumbnails) of a family."""
        with self.db.read() as db:
            row = db.execute("SELECT photo_count, stored_bytes FROM families WHERE "
                             "family_id = ?", (family_id,)).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def has_photo(self, family_id: str, photo_id: str) -> bool:
        """Whether the family stores a photo with this id."""
        with self.db.read() as db:
            return db.execute("SELECT 1 FROM photos WHERE family_id = ? AND photo_id = ?",
                              (family_id, photo_id)).fetchone() is not None

    def new_photo_key(self, family_id: str, photo_id: str) -> str:
        """A fresh blob key for an incoming photo (unique: racing uploads never clash)."""
        return f"{family_id}/{photo_id}.{secrets.token_hex(6)}.blob"

    def put_photo(self, family_id: str, photo_id: str, blob_key: str, blob_size: int,
                  blob_sha256: bytes, labels: bytes, thumbnail: bytes | None,
                  quota: PhotoQuota | None = None) -> tuple[int, bool]:
        """Commits a photo row for an already durable blob (from :meth:`new_photo_key`).

        Returns (seq, created). A repeat of the same id with the same blob is a no-op
        (created False, the new blob is removed); a different blob raises AlreadyExistsError;
        a new photo over the family's ``quota`` raises LimitExceededError (checked under the
        family's lock, so racing uploads on any server cannot overshoot it).
        """
        size = blob_size + len(thumbnail or b"")
        if not blob_key.startswith(f"{family_id}/"):
            raise ValueError("the blob key is not this family's")
        try:
            with self.db.transaction(family_id) as db:
                existing = db.execute(
                    "SELECT seq, blob_sha256 FROM photos WHERE family_id = ? AND photo_id = ?",
                    (family_id, photo_id)).fetchone()
                if existing is None:
                    photos, stored = db.execute(
                        "SELECT photo_count, stored_bytes FROM families WHERE family_id = ?",
                        (family_id,)).fetchone()
                    if quota is not None:
                        quota.check(int(photos), int(stored), size)
                    seq = db.execute(
                        "INSERT INTO photos (family_id, photo_id, blob_file, blob_size, "
                        "blob_sha256, labels, thumbnail, created) VALUES (?,?,?,?,?,?,?,?) "
                        "RETURNING seq",
                        (family_id, photo_id, blob_key.split("/", 1)[1], blob_size,
                         blob_sha256, labels, thumbnail, time.time())).fetchone()[0]
                    db.execute("UPDATE families SET photo_count = photo_count + 1, "
                               "stored_bytes = stored_bytes + ?, label_version = "
                               "label_version + 1 WHERE family_id = ?", (size, family_id))
                    return int(seq), True
        except BaseException:
            self.blobs.delete(blob_key)
            raise
        self.blobs.delete(blob_key)
        if bytes(existing[1]) != blob_sha256:
            raise AlreadyExistsError(
                f"photo id {photo_id} is already used by a different photo: choose a new id")
        return int(existing[0]), False

    def delete_photo(self, family_id: str, photo_id: str) -> int:
        """Deletes row then blob (a crash in between leaves only an orphan blob), leaving a
        tombstone for other servers' caches. Returns seq; NotFoundError if there is none."""
        with self.db.transaction(family_id) as db:
            row = db.execute(
                "SELECT seq, blob_file, blob_size, thumbnail FROM photos WHERE family_id = ? "
                "AND photo_id = ?", (family_id, photo_id)).fetchone()
            if row is None:
                raise NotFoundError(f"no photo {photo_id} in this family")
            seq, blob_file, blob_size, thumbnail = row
            db.execute("DELETE FROM photos WHERE family_id = ? AND photo_id = ?",
                       (family_id, photo_id))
            version = db.execute(
                "UPDATE families SET photo_count = photo_count - 1, stored_bytes = "
                "stored_bytes - ?, label_version = label_version + 1 WHERE family_id = ? "
                "RETURNING label_version",
                (int(blob_size) + len(thumbnail or b""), family_id)).fetchone()[0]
            db.execute("INSERT INTO photo_tombstones (family_id, label_version, photo_id) "
                       "VALUES (?, ?, ?)", (family_id, version, photo_id))
        self.blobs.delete(f"{family_id}/{blob_file}")
        return int(seq)

    def label_changes(self, family_id: str, since_version: int, after_seq: int,
                      batch: int = 50_000) -> LabelChanges:
        """What changed in a family's photos since a cache loaded them, read in one
        snapshot: the current label version, photos deleted after ``since_version`` and
        photos with seq above ``after_seq`` (in upload order). (0, 0): everything."""
        with self.db.snapshot() as db:
            row = db.execute("SELECT label_version FROM families WHERE family_id = ?",
                             (family_id,)).fetchone()
            version = int(row[0]) if row else 0
            deleted = [r[0] for r in db.execute(
                "SELECT photo_id FROM photo_tombstones WHERE family_id = ? AND "
                "label_version > ? ORDER BY label_version", (family_id, since_version))] \
                if since_version else []
            added: list[tuple[int, str, bytes]] = []
            cur = db.execute("SELECT seq, photo_id, labels FROM photos WHERE family_id = ? "
                             "AND seq > ? ORDER BY seq", (family_id, after_seq))
            while rows := cur.fetchmany(batch):
                added.extend((int(s), p, bytes(b)) for s, p, b in rows)
        return LabelChanges(version, deleted, added)

    def list_photo_ids(self, family_id: str) -> list[str]:
        """Photo ids, newest first."""
        with self.db.read() as db:
            return [r[0] for r in db.execute(
                "SELECT photo_id FROM photos WHERE family_id = ? ORDER BY seq DESC",
                (family_id,))]

    def bulk_insert_labels(self, family_id: str, rows: list[tuple[str, bytes]]) -> None:
        """Benchmark helper: label rows whose blobs are one empty placeholder."""
        placeholder = "bench-placeholder.blob"
        self.blobs.put(f"{family_id}/{placeholder}", b"")
        now = time.time()
        with self.db.transaction(family_id) as db:
            db.executemany(
                "INSERT INTO photos (family_id, photo_id, blob_file, blob_size, blob_sha256, "
                "labels, created) VALUES (?,?,?,0,?,?,?)",
                [(family_id, pid, placeholder, b"", labels, now) for pid, labels in rows])
            db.execute("UPDATE families SET photo_count = photo_count + ?, label_version = "
                       "label_version + 1 WHERE family_id = ?", (len(rows), family_id))

    # -- gallery -------------------------------------------------------------------------

    def gallery_layout(self, family_id: str) -> dict[int, list[int]]:
        """block -> slot per position (-1 for dead positions)."""
        layout: dict[int, list[int]] = {}
        with self.db.read() as db:
            for block, _position, slot, alive in db.execute(
                    "SELECT block, position, slot, alive FROM gallery_positions "
                    "WHERE family_id = ? ORDER BY block, position", (family_id,)):
                layout.setdefault(int(block), []).append(int(slot) if alive else -1)
        return layout

    def gallery_block(self, family_id: str, block: int) -> bytes | None:
        """The packed ciphertexts of one block."""
        with self.db.read() as db:
            row = db.execute("SELECT ciphertexts FROM gallery_blocks WHERE family_id = ? "
                             "AND block = ?", (family_id, block)).fetchone()
        return bytes(row[0]) if row else None

    def gallery_changes(self, family_id: str, since_version: int
                        ) -> tuple[int, str | None, dict[int, bytes], int]:
        """(gallery version, context file, blocks written after ``since_version``, block
        count), read in one snapshot, for a server's cache of prepared blocks."""
        with self.db.snapshot() as db:
            row = db.execute("SELECT gallery_version, context_file FROM families WHERE "
                             "family_id = ?", (family_id,)).fetchone()
            if row is None:
                return 0, None, {}, 0
            changed = {int(b): bytes(c) for b, c in db.execute(
                "SELECT block, ciphertexts FROM gallery_blocks WHERE family_id = ? AND "
                "version > ?", (family_id, since_version))}
            count = db.execute("SELECT COUNT(*) FROM gallery_blocks WHERE family_id = ?",
                               (family_id,)).fetchone()[0]
        return int(row[0]), row[1], changed, int(count)

    def put_gallery_block(self, family_id: str, block: int, ciphertexts: bytes,
                          first_position: int, slots: list[int]) -> None:
        """Replaces one block's ciphertexts and records the positions it gained.

        PreconditionError if the block's next free position is no longer
        ``first_position`` (a phone enrolled through another server meanwhile)."""
        with self.db.transaction(family_id) as db:
            used = db.execute("SELECT COUNT(*) FROM gallery_positions WHERE family_id = ? "
                              "AND block = ?", (family_id, block)).fetchone()[0]
            if used != first_position:
                raise PreconditionError(
                    f"block {block} has its next free position at {used}, not "
                    f"{first_position}: another phone enrolled meanwhile, fetch the layout "
                    "and retry")
            version = self._bump_gallery(db, family_id)
            db.execute("INSERT INTO gallery_blocks (family_id, block, ciphertexts, version) "
                       "VALUES (?, ?, ?, ?) ON CONFLICT (family_id, block) DO UPDATE SET "
                       "ciphertexts = excluded.ciphertexts, version = excluded.version",
                       (family_id, block, ciphertexts, version))
            db.executemany("INSERT INTO gallery_positions (family_id, block, position, slot) "
                           "VALUES (?, ?, ?, ?)",
                           [(family_id, block, first_position + i, s)
                            for i, s in enumerate(slots)])

    @staticmethod
    def _bump_gallery(db: Connection, family_id: str) -> int:
        return int(db.execute("UPDATE families SET gallery_version = gallery_version + 1 "
                              "WHERE family_id = ? RETURNING gallery_version",
                              (family_id,)).fetchone()[0])

    def replace_gallery(self, family_id: str, expected_positions: int,
                        blocks: list[tuple[bytes, list[int]]]) -> bool:
        """Swaps the whole gallery in one transaction; False (nothing changed) if the
        gallery no longer has ``expected_positions`` positions (someone enrolled meanwhile)."""
        with self.db.transaction(family_id) as db:
            now = db.execute("SELECT COUNT(*) FROM gallery_positions WHERE family_id = ?",
                             (family_id,)).fetchone()[0]
            if now != expected_positions:
                return False
            version = self._bump_gallery(db, family_id)
            db.execute("DELETE FROM gallery_blocks WHERE family_id = ?", (family_id,))
            db.execute("DELETE FROM gallery_positions WHERE family_id = ?", (family_id,))
            for block, (ciphertexts, slots) in enumerate(blocks):
                db.execute("INSERT INTO gallery_blocks (family_id, block, ciphertexts, "
                           "version) VALUES (?, ?, ?, ?)",
                           (family_id, block, ciphertexts, version))
                db.executemany("INSERT INTO gallery_positions (family_id, block, position, "
                               "slot) VALUES (?, ?, ?, ?)",
                               [(family_id, block, i, s) for i, s in enumerate(slots)])
        return True

    def kill_gallery_slot(self, family_id: str, slot: int) -> int:
        """Marks every entry of one slot dead; returns how many."""
        with self.db.transaction(family_id) as db:
            cur = db.execute("UPDATE gallery_positions SET alive = 0 WHERE family_id = ? "
                             "AND slot = ? AND alive = 1", (family_id, slot))
            return int(cur.rowcount)

    # -- detectors -----------------------------------------------------------------------

    def put_detector(self, detector_id: str, key_version: int, key_fp: bytes, header: bytes,
                     matrix_chunks: Iterable[bytes],
                     verify: Callable[[], None] | None = None) -> int:
        """Stores a detector's encrypted matrix and header (replacing the same version).

        ``verify()`` runs once the blob is durable and before the row commits; if it raises,
        the blob is removed and nothing changes.
        """
        name = f"{secrets.token_hex(8)}.v{key_version}.detector"
        key = f"{DETECTORS}/{name}"
        try:
            size = self.blobs.put(key, matrix_chunks)
            if verify is not None:
                verify()
            with self.db.transaction(f"detector:{detector_id}") as db:
                old = db.execute("SELECT matrix_file FROM detectors WHERE detector_id = ? AND "
                                 "key_version = ?", (detector_id, key_version)).fetchone()
                db.execute("INSERT INTO detectors (detector_id, key_version, key_fp, header, "
                           "matrix_file, created) VALUES (?,?,?,?,?,?) ON CONFLICT "
                           "(detector_id, key_version) DO UPDATE SET key_fp = excluded.key_fp, "
                           "header = excluded.header, matrix_file = excluded.matrix_file, "
                           "created = excluded.created",
                           (detector_id, key_version, key_fp, header, name, time.time()))
        except BaseException:
            self.blobs.delete(key)
            raise
        if old:
            self.blobs.delete(f"{DETECTORS}/{old[0]}")
        return size

    def list_detectors(self) -> list[tuple[str, int, bytes, bytes]]:
        """(detector_id, key_version, key_fp, header) for every published detector."""
        with self.db.read() as db:
            return [(r[0], int(r[1]), bytes(r[2]), bytes(r[3])) for r in db.execute(
                "SELECT detector_id, key_version, key_fp, header FROM detectors "
                "ORDER BY detector_id, key_version DESC")]

    def detector_versions(self, detector_id: str) -> dict[int, bytes]:
        """key_version -> key fingerprint of every published version of one detector."""
        with self.db.read() as db:
            return {int(v): bytes(fp) for v, fp in db.execute(
                "SELECT key_version, key_fp FROM detectors WHERE detector_id = ?",
                (detector_id,))}

    def detector_record(self, detector_id: str, key_version: int) -> tuple[bytes, bytes, str]:
        """(key_fp, header, matrix blob key) of one detector version."""
        with self.db.read() as db:
            row = db.execute("SELECT key_fp, header, matrix_file FROM detectors WHERE "
                             "detector_id = ? AND key_version = ?",
                             (detector_id, key_version)).fetchone()
        if row is None:
            raise NotFoundError(f"no detector {detector_id!r} with key version {key_version}: "
                                "ask the vendor to publish it (privface-vendor publish)")
        return bytes(row[0]), bytes(row[1]), f"{DETECTORS}/{row[2]}"

    # -- deleting a family ---------------------------------------------------------------

    def delete_family(self, family_id: str) -> FamilyDeletion:
        """Deletes every row of a family in one transaction, then its blobs.

        Idempotent: an unknown family deletes nothing. A crash after the commit leaves only
        blobs no row names, which :meth:`sweep_orphans` removes."""
        if not FAMILY_ID_RE.fullmatch(family_id):  # it also names a blob folder
            raise NotFoundError("no such family")
        with self.db.transaction(family_id) as db:
            def count(table: str) -> int:
                return int(db.execute(f"SELECT COUNT(*) FROM {table} WHERE family_id = ?",
                                      (family_id,)).fetchone()[0])
            deletion = FamilyDeletion(
                photos=count("photos"), gallery_entries=count("gallery_positions"),
                devices=count("devices"), sealed_items=count("sealed_items"), files=0)
            for table in FAMILY_TABLES:
                db.execute(f"DELETE FROM {table} WHERE family_id = ?", (family_id,))
        files = 0
        for blob in list(self.blobs.list(f"{family_id}/")):
            self.blobs.delete(blob.key)
            files += 1
        self.db.after_delete()
        return replace(deletion, files=files)

    # -- maintenance ---------------------------------------------------------------------

    def sweep_orphans(self, min_age_seconds: float = 0.0) -> int:
        """Removes blobs no row names (left by a crash mid-upload or between a family's
        deletion and the removal of its blobs) that are at least ``min_age_seconds`` old.

        With several servers on one store, a blob another server has just written may not
        have its row yet: they sweep with an age well above the longest upload."""
        # Listed before the rows are read: a blob written later is not considered, and a
        # row committed before the read protects its blob.
        cutoff = time.time() - min_age_seconds
        candidates = [b for b in self.blobs.list() if b.modified <= cutoff
                      and not b.key.endswith(NOT_BLOBS)]
        with self.db.read() as db:
            named = {f"{f}/{b}" for f, b in db.execute("SELECT family_id, blob_file FROM photos")}
            named |= {f"{f}/{c}" for f, c in db.execute(
                "SELECT family_id, context_file FROM families WHERE context_file IS NOT NULL")}
            named |= {f"{DETECTORS}/{m}" for (m,) in db.execute(
                "SELECT matrix_file FROM detectors")}
        removed = 0
        for blob in candidates:
            if blob.key not in named:
                self.blobs.delete(blob.key)
                removed += 1
        if isinstance(self.blobs, FileBlobs):
            removed += self.blobs.sweep_temp_files(cutoff)
        if removed:
            log.info("removed %d orphan blobs", removed)
        return removed


def open_store(store_url: str, blobs_url: str, data_dir: Path,
               migrate: bool | None = None) -> Store:
    """The store ``--store`` and ``--blobs`` name ("": SQLite and files under
    ``data_dir``). ``migrate`` None: the embedded SQLite default upgrades its schema
    itself; a shared PostgreSQL must already be at the latest schema (privface-server
    migrate), so replicas never race to change it."""
    database = open_database(store_url, Path(data_dir) / "privface.sqlite3")
    try:
        blobs = open_blobs(blobs_url, Path(data_dir) / "blobs")
        return Store(database=database, blobs=blobs,
                     migrate=database.dialect == "sqlite" if migrate is None else migrate)
    except BaseException:
        database.close()
        raise
