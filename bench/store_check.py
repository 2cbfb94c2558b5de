"""Consistency of a privface server's data directory, checked from outside the server.

Shared by the fuzz tests (tests/server/test_fuzz.py), the crash test (bench/crash_test.py
and tests/server/test_crash.py) and their benchmark runs. It reads the SQLite database and
the blob folder the way an operator would after an incident and reports, without changing
anything:

* ``PRAGMA integrity_check`` and ``PRAGMA foreign_key_check``;
* photo rows whose blob file is missing, or present with another size or SHA-256 than the
  row records (a row must never name a missing or partial file);
* files under ``blobs/`` that no row names (orphans: a crash mid-upload leaves them, the
  server's start-up sweep must remove them; a quiet server must have none);
* families whose public-context file or detectors whose matrix file is missing;
* gallery positions that point at a block with no stored ciphertexts.

Call it only while no upload or delete is in flight (a running upload has a temp file).
"""

from __future__ import annotations

import hashlib
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

DB_NAME = "privface.sqlite3"
NOT_BLOBS = frozenset({"vendor.token"})


@dataclass(frozen=True)
class StoreReport:
    """What :func:`check_store` found; ``ok`` when nothing is wrong."""

    integrity: str
    foreign_key_violations: int
    photo_rows: int
    blob_files: int
    rows_without_blob: list[str] = field(default_factory=list)
    blobs_mismatched: list[str] = field(default_factory=list)
    unnamed_files: list[str] = field(default_factory=list)
    contexts_missing: list[str] = field(default_factory=list)
    detectors_missing: list[str] = field(default_factory=list)
    positions_without_block: int = 0

    @property
    def ok(self) -> bool:
        """True when the store is consistent."""
        return not self.problems()

    def problems(self) -> list[str]:
        """One line per kind of inconsistency found (empty when consistent)."""
        out = []
        if self.integrity != "ok":
            out.append(f"PRAGMA integrity_check: {self.integrity}")
        if self.foreign_key_violations:
            out.append(f"{self.foreign_key_violations} foreign key violations")
        for what, items in (("photo rows without their blob file", self.rows_without_blob),
                            ("blob files that differ from their row", self.blobs_mismatched),
                            ("files no row names", self.unnamed_files),
                            ("public context files missing", self.contexts_missing),
                            ("detector matrix files missing", self.detectors_missing)):
            if items:
                out.append(f"{len(items)} {what}: {', '.join(items[:5])}"
                           + (" ..." if len(items) > 5 else ""))
        if self.positions_without_block:
            out.append(f"{self.positions_without_block} gallery positions without a block")
        return out

    def summary(self) -> dict[str, object]:
        """The figures as plain JSON values."""
        return {"integrity_check": self.integrity,
                "foreign_key_violations": self.foreign_key_violations,
                "photo_rows": self.photo_rows, "blob_files": self.blob_files,
                "rows_without_blob": len(self.rows_without_blob),
                "blobs_mismatched": len(self.blobs_mismatched),
                "unnamed_files": len(self.unnamed_files),
                "contexts_missing": len(self.contexts_missing),
                "detectors_missing": len(self.detectors_missing),
                "positions_without_block": self.positions_without_block, "ok": self.ok}


def _sha256(path: Path) -> bytes:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.digest()


def check_store(data_dir: Path, hash_blobs: bool = True) -> StoreReport:
    """Checks the store under ``data_dir`` (the server's --data-dir); see the module doc.

    ``hash_blobs``: compare every blob's SHA-256 with its row (else only sizes)."""
    data_dir = Path(data_dir)
    blob_root = data_dir / "blobs"
    db = sqlite3.connect(data_dir / DB_NAME, timeout=30.0)
    try:
        integrity = "; ".join(r[0] for r in db.execute("PRAGMA integrity_check"))
        fk_violations = len(db.execute("PRAGMA foreign_key_check").fetchall())
        photos = db.execute("SELECT family_id, photo_id, blob_file, blob_size, blob_sha256 "
                            "FROM photos").fetchall()
        contexts = db.execute("SELECT family_id, context_file FROM families "
                              "WHERE context_file IS NOT NULL").fetchall()
        detectors = db.execute("SELECT detector_id, key_version, matrix_file "
                               "FROM detectors").fetchall()
        orphan_positions = db.execute(
            "SELECT COUNT(*) FROM gallery_positions p WHERE NOT EXISTS (SELECT 1 FROM "
            "gallery_blocks b WHERE b.family_id = p.family_id AND b.block = p.block)"
        ).fetchone()[0]
    finally:
        db.close()

    named: set[Path] = set()
    missing, mismatched = [], []
    for family_id, photo_id, blob_file, size, sha in photos:
        path = blob_root / family_id / blob_file
        named.add(path)
        if not path.is_file():
            missing.append(f"{family_id}/{photo_id}")
        elif path.stat().st_size != size or (
                hash_blobs and len(sha) == 32 and _sha256(path) != bytes(sha)):
            mismatched.append(f"{family_id}/{photo_id}")
    contexts_missing = []
    for family_id, context_file in contexts:
        path = blob_root / family_id / context_file
        named.add(path)
        if not path.is_file():
            contexts_missing.append(family_id)
    detectors_missing = []
    for detector_id, version, matrix_file in detectors:
        path = blob_root / "_detectors" / matrix_file
        named.add(path)
        if not path.is_file():
            detectors_missing.append(f"{detector_id} v{version}")
    files = [p for p in blob_root.rglob("*") if p.is_file() and p.name not in NOT_BLOBS] \
        if blob_root.is_dir() else []
    unnamed = sorted(str(p.relative_to(blob_root)) for p in files if p not in named)
    return StoreReport(integrity=integrity, foreign_key_violations=fk_violations,
                       photo_rows=len(photos), blob_files=len(files),
                       rows_without_blob=missing, blobs_mismatched=mismatched,
                       unnamed_files=unnamed, contexts_missing=contexts_missing,
                       detectors_missing=detectors_missing,
                       positions_without_block=int(orphan_positions))
