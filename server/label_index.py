"""In-memory matrix of a family's encrypted label vectors, for the MAT step.

Loaded from the store on a family's first search, then brought up to date incrementally
whenever the family's label version (bumped by every upload and delete, on any server
sharing the store) is newer than the index: only photos added since its last row and
deletions since its version are read. Rows stay in upload order (deletes leave tombstones,
compacted once they pile up), so "newest first" needs no sort. One search is one
matrix-vector product.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from common import labels
from common.errors import KeyMismatchError, MalformedInputError
from server.storage import Family, Store

MAX_TOP_N = 10_000


@dataclass(frozen=True)
class SearchResult:
    """Matching photo ids (best or newest first) and the time the match took."""

    photo_ids: list[str]
    server_ms: float


class FamilyLabelIndex:
    """The encrypted label matrix of one family."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.version = -1  # the family's label version this index reflects (-1: not loaded)
        self.max_seq = 0  # the newest photo row read
        self._matrix = np.empty((1024, dim))
        self._alive = np.zeros(1024, dtype=bool)
        self._ids: list[str] = []
        self._row_of: dict[str, int] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._row_of)

    def add_many(self, rows: list[tuple[str, bytes]]) -> None:
        """Appends (photo_id, encrypted labels) rows; an id already present is ignored."""
        with self._lock:
            fresh = [(pid, blob) for pid, blob in rows if pid not in self._row_of]
            if not fresh:
                return
            if any(len(blob) != 8 * self.dim for _, blob in fresh):
                raise MalformedInputError(
                    f"encrypted label vectors must have {self.dim} float64 values")
            block = np.frombuffer(b"".join(blob for _, blob in fresh), dtype="<f8")
            n, need = len(self._ids), len(self._ids) + len(fresh)
            if need > len(self._alive):
                cap = max(need, 2 * len(self._alive))
                matrix = np.empty((cap, self.dim))
                matrix[:n] = self._matrix[:n]
                alive = np.zeros(cap, dtype=bool)
                alive[:n] = self._alive[:n]
                self._matrix, self._alive = matrix, alive
            self._matrix[n:need] = block.reshape(len(fresh), self.dim)
            self._alive[n:need] = True
            for i, (pid, _) in enumerate(fresh):
                self._ids.append(pid)
                self._row_of[pid] = n + i

    def remove(self, photo_id: str) -> None:
        """Drops a photo (tombstone; compacts when half the rows are dead)."""
        with self._lock:
            row = self._row_of.pop(photo_id, None)
            if row is None:
                return
            self._alive[row] = False
            if len(self._ids) > 1024 and len(self._row_of) < len(self._ids) // 2:
                self._compact()

    def _compact(self) -> None:
        n = len(self._ids)
        keep = np.flatnonzero(self._alive[:n])
        self._matrix = self._matrix[keep].copy()
        self._alive = np.ones(len(keep), dtype=bool)
        self._ids = [self._ids[i] for i in keep]
        self._row_of = {pid: i for i, pid in enumerate(self._ids)}

    def search(self, query: np.ndarray, mode: labels.MatchMode, top_n: int) -> SearchResult:
        """MAT: one inner product per stored vector; keeps positive scores."""
        if query.shape != (self.dim,):
            raise MalformedInputError(
                f"encrypted query has {query.size} values, this family uses {self.dim}")
        with self._lock:
            start = time.perf_counter()
            n = len(self._ids)
            scores = self._matrix[:n] @ query
            hits = np.flatnonzero((scores > 0) & self._alive[:n])
            if mode is labels.MatchMode.RANKED:
                order = hits[np.argsort(-scores[hits], kind="stable")][:top_n]
            else:
                order = hits[::-1]
            ids = [self._ids[i] for i in order]
            elapsed = (time.perf_counter() - start) * 1000
        return SearchResult(ids, elapsed)


class LabelSearch:
    """The label indexes of all families, loaded lazily from the store.

    Each family has its own lock, so loading one large family's index (seconds at 1M
    photos) holds up only that family's searches and uploads.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        self._indexes: dict[str, FamilyLabelIndex] = {}
        self._family_locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def _family_lock(self, family_id: str) -> threading.Lock:
        with self._lock:
            return self._family_locks.setdefault(family_id, threading.Lock())

    def index(self, family_id: str, dim: int, version: int) -> FamilyLabelIndex:
        """The family's index as of at least ``version`` (the label version its caller
        read): loaded on first use, then only what changed since is read."""
        with self._family_lock(family_id):
            idx = self._indexes.get(family_id)
            if idx is None or idx.dim != dim:
                idx = FamilyLabelIndex(dim)
            if idx.version < version or idx.version < 0:
                changes = self._store.label_changes(family_id, max(idx.version, 0),
                                                    idx.max_seq)
                for photo_id in changes.deleted:  # before additions: an id can come back
                    idx.remove(photo_id)
                idx.add_many([(pid, blob) for _, pid, blob in changes.added])
                if changes.added:
                    idx.max_seq = changes.added[-1][0]
                idx.version = changes.version
                self._indexes[family_id] = idx
            return idx

    def forget(self, family_id: str) -> None:
        """Drops a family's index from memory (the family was deleted)."""
        with self._family_lock(family_id):
            self._indexes.pop(family_id, None)
        with self._lock:
            self._family_locks.pop(family_id, None)

    def search(self, family: Family, key_fp: bytes, encrypted_query: bytes,
               mode: labels.MatchMode, top_n: int) -> SearchResult:
        """Validates the query's key and shape, then runs MAT over the family's photos."""
        dim = family.label_dim
        if key_fp != family.label_key_fp:
            raise KeyMismatchError("the query was encrypted with another label key than the "
                                   "family's: use the family bundle this family was created with")
        if mode is labels.MatchMode.RANKED and not 1 <= top_n <= MAX_TOP_N:
            raise MalformedInputError(f"top_n must be within 1..{MAX_TOP_N} for ranked search")
        if len(encrypted_query) != dim * 8:
            raise MalformedInputError(
                f"encrypted query has {len(encrypted_query)} bytes, expected {dim * 8} "
                f"({dim} float64 values)")
        query = np.frombuffer(encrypted_query, dtype="<f8")
        if not np.all(np.isfinite(query)):
            raise MalformedInputError("encrypted query contains NaN or infinity")
        index = self.index(family.family_id, dim, family.label_version)
        return index.search(query, mode, top_n)
