"""The family's CKKS-encrypted face gallery on the server: add, remove, match.

The server holds the family's public context (relinearisation + 4 rotation keys, no
secret key) and the packed gallery blocks. Deserialised blocks are cached in memory per
family. Every change goes to the store only, under the family's lock there, and bumps the
family's gallery version; a cache older than the version its caller read reloads just the
blocks written since (all of them after a new public context or a re-pack), so servers
sharing one store never match against a stale gallery.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from common import ckks, labels
from common.errors import (
    LimitExceededError,
    MalformedInputError,
    NotFoundError,
    PreconditionError,
)
from server.storage import Family, Store

MAX_FACES_PER_QUERY = 64
INT32_MAX = 2**31 - 1  # responses carry position slots as int32 (-1 = dead)


def slot_limit(family: Family) -> int:
    """Slots are 0..slot_limit - 1: fewer than the family's capacity can be, given its label
    ciphertext dimension (2 x (capacity + 1 + 2 x noise dims), see common/labels.py)."""
    return min(labels.MAX_CAPACITY, max(family.label_dim // 2 - 1, 0))


def check_slots(family: Family, slots: list[int]) -> None:
    """INVALID_ARGUMENT for a slot the family cannot have (it would be stored, then break
    every gallery response of the family)."""
    limit = slot_limit(family)
    bad = next((s for s in slots if not 0 <= s < limit), None)
    if bad is not None:
        raise MalformedInputError(f"slot {bad} is outside this family's slots 0..{limit - 1}")


def _visible(slots: list[int]) -> list[int]:
    """Position slots as responses carry them: a slot stored by an older server outside
    int32 shows as dead (-1) instead of failing every response."""
    return [s if -1 <= s <= INT32_MAX else -1 for s in slots]


def pack_ciphertexts(items: list[bytes]) -> bytes:
    """Length-prefixed concatenation (how a block is kept in one SQLite row)."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def unpack_ciphertexts(data: bytes) -> list[bytes]:
    """Inverse of pack_ciphertexts."""
    items, off = [], 0
    while off < len(data):
        (n,) = struct.unpack_from("<I", data, off)
        items.append(data[off + 4:off + 4 + n])
        off += 4 + n
    return items


@dataclass(frozen=True)
class BlockResult:
    """Encrypted squared distances of one query face to one block."""

    face: int
    block: int
    distances: bytes
    position_slots: list[int]


class _FamilyGallery:
    def __init__(self, public: ckks.PublicContext, blocks: list[list[bytes]], version: int,
                 context_file: str) -> None:
        self.public = public
        self.prepared = ckks.PreparedGallery(public, blocks)
        self.lock = threading.Lock()
        self.version = version  # the family's gallery version the cache reflects
        self.context_file = context_file


def _invalid(exc: ValueError) -> MalformedInputError:
    return MalformedInputError(f"{exc}")


class GalleryService:
    """Gallery operations for authenticated families."""

    def __init__(self, store: Store, max_entries: int = 100_000) -> None:
        self.store = store
        self.max_entries = max_entries  # positions per family, removed ones included
        self._galleries: dict[str, _FamilyGallery] = {}
        self._lock = threading.Lock()

    def forget(self, family_id: str) -> None:
        """Drops the cache (after a new public context upload or the family's deletion)."""
        with self._lock:
            self._galleries.pop(family_id, None)

    def _gallery(self, family: Family) -> _FamilyGallery:
        """The family's prepared gallery, as of at least the version ``family`` carries."""
        with self._lock:
            gallery = self._galleries.get(family.family_id)
            if gallery is not None and gallery.version >= family.gallery_version:
                return gallery
            if gallery is not None and self._refresh(family.family_id, gallery):
                return gallery
            gallery = self._galleries[family.family_id] = self._load(family.family_id)
            return gallery

    def _refresh(self, family_id: str, gallery: _FamilyGallery) -> bool:
        """Re-reads the blocks written since the cache's version; False when only a full
        load will do (a new context, a re-pack that dropped blocks)."""
        version, context_file, changed, count = self.store.gallery_changes(
            family_id, gallery.version)
        if context_file != gallery.context_file or count < len(gallery.prepared):
            return False
        try:
            for block in sorted(changed):
                gallery.prepared.set_block(block, unpack_ciphertexts(changed[block]))
        except ValueError:
            return False  # a gap or an unusable block: the full load says what is wrong
        gallery.version = version
        return True

    def _load(self, family_id: str) -> _FamilyGallery:
        version, context_file, changed, _ = self.store.gallery_changes(family_id, -1)
        if context_file is None:
            raise PreconditionError(
                "this family has no public CKKS context yet: the phone uploads it "
                "once (privface enroll does so automatically)")
        try:
            public = ckks.load_public_context(self.store.context_bytes(family_id, context_file))
        except ValueError as exc:
            raise PreconditionError(f"stored public context is unusable: {exc}") from exc
        blocks = [unpack_ciphertexts(changed[b]) for b in sorted(changed)]
        try:
            return _FamilyGallery(public, blocks, version, context_file)
        except ValueError as exc:  # stored by a server without check_context
            raise PreconditionError(
                f"the family's encrypted gallery does not load under its stored public "
                f"CKKS context ({exc}): upload the family's own public context again"
            ) from exc

    def check_context(self, family_id: str, public: ckks.PublicContext) -> None:
        """PreconditionError unless the family's stored gallery loads under ``public``.

        A context with the family's key id but another layout, scale or parameters (its
        header is the phone's word) would otherwise be stored, and every later gallery call
        of the family would fail. The first and the last block are checked: every block
        was stored under the same context."""
        blocks = sorted(self.store.gallery_layout(family_id))
        for block in sorted({blocks[0], blocks[-1]}) if blocks else []:
            try:
                ckks.prepare_block(public, unpack_ciphertexts(
                    self.store.gallery_block(family_id, block) or b""))
            except ValueError as exc:
                raise PreconditionError(
                    f"this public CKKS context does not fit the family's encrypted gallery "
                    f"(block {block}: {exc}): upload the context of the family's own CKKS key"
                ) from exc

    def layout(self, family: Family) -> tuple[ckks.GalleryLayout, dict[int, list[int]]]:
        """The packing layout and each block's position slots (-1 = dead)."""
        gallery = self._gallery(family)
        return gallery.public.layout, self._layout(family.family_id)

    def _layout(self, family_id: str) -> dict[int, list[int]]:
        return {b: _visible(slots) for b, slots in self.store.gallery_layout(family_id).items()}

    def add_entries(self, family: Family, slot: int, block: int, first_position: int,
                    count: int, ciphertexts: list[bytes]) -> int:
        """Adds ``count`` encrypted entries at the next free positions of ``block``."""
        check_slots(family, [slot])
        gallery = self._gallery(family)
        lay = gallery.public.layout
        with gallery.lock:
            layout = self.store.gallery_layout(family.family_id)
            n_blocks = len(layout)
            if not 1 <= count <= lay.entries_per_block:
                raise MalformedInputError(f"count must be within 1..{lay.entries_per_block}")
            if block == n_blocks:
                stored, used = None, 0
            elif block == n_blocks - 1:
                stored = unpack_ciphertexts(
                    self.store.gallery_block(family.family_id, block) or b"")
                used = len(layout[block])
            else:
                raise PreconditionError(
                    f"entries may only go into the last block ({n_blocks - 1}) or a new one "
                    f"({n_blocks}): fetch the gallery layout and retry")
            if first_position != used:
                raise PreconditionError(
                    f"block {block} has its next free position at {used}, not "
                    f"{first_position}: another phone enrolled meanwhile, fetch the layout "
                    "and retry")
            if used + count > lay.entries_per_block:
                raise MalformedInputError(
                    f"{count} entries from position {used} overflow block {block} "
                    f"({lay.entries_per_block} entries per block)")
            self._check_quota(sum(len(slots) for slots in layout.values()), count)
            try:
                merged = ckks.add_into_block(gallery.public, stored, ciphertexts)
            except ValueError as exc:
                raise _invalid(exc) from exc
            # The store checks the position again under the family's lock (another server
            # may have enrolled); the next call's cache refresh picks up the new block.
            self.store.put_gallery_block(family.family_id, block, pack_ciphertexts(merged),
                                         used, [slot] * count)
        return self.store.family_counts(family.family_id)[1]

    def block(self, family: Family, block: int) -> tuple[list[bytes], list[int]]:
        """One stored block (ciphertexts, position slots), for the phone to re-pack."""
        data = self.store.gallery_block(family.family_id, block)
        if data is None:
            raise NotFoundError(f"the gallery has no block {block}")
        return unpack_ciphertexts(data), self._layout(family.family_id)[block]

    def replace(self, family: Family, expected_positions: int,
                blocks: list[tuple[list[bytes], list[int]]]) -> int:
        """Replaces the gallery with phone-re-packed blocks; returns the live entry count."""
        gallery = self._gallery(family)
        per_block = gallery.public.layout.entries_per_block
        prepared = []
        self._check_quota(0, sum(len(slots) for _, slots in blocks))
        for i, (cts, slots) in enumerate(blocks):
            if not 1 <= len(slots) <= per_block:
                raise MalformedInputError(f"block {i} must hold 1..{per_block} entries")
            check_slots(family, slots)
            try:
                prepared.append(ckks.prepare_block(gallery.public, cts))
            except ValueError as exc:
                raise _invalid(exc) from exc
        with gallery.lock:
            if not self.store.replace_gallery(
                    family.family_id, expected_positions,
                    [(pack_ciphertexts(cts), slots) for cts, slots in blocks]):
                raise PreconditionError("the gallery changed while it was being re-packed "
                                        "(another phone enrolled): fetch it again and retry")
        self.forget(family.family_id)
        return self.store.family_counts(family.family_id)[1]

    def max_blocks(self, family: Family) -> int:
        """The most blocks a gallery within the quota can have."""
        per_block = self._gallery(family).public.layout.entries_per_block
        return -(-self.max_entries // per_block)

    def _check_quota(self, stored: int, adding: int) -> None:
        if stored + adding > self.max_entries:
            raise LimitExceededError(
                f"gallery quota reached: the family gallery holds {stored:,} encrypted faces "
                f"(removed ones included until it is re-packed) and {adding:,} more would "
                f"exceed the limit of {self.max_entries:,}; remove members' faces (privface "
                "people remove) or ask the server operator to raise --max-gallery-entries")

    def _stored_block(self, family: Family, public: ckks.PublicContext,
                      block: int) -> list[ckks.SealObject]:
        try:
            return ckks.prepare_block(public, unpack_ciphertexts(
                self.store.gallery_block(family.family_id, block) or b""))
        except ValueError as exc:
            raise PreconditionError(f"gallery block {block} changed during the match: "
                                    "retry") from exc

    def remove_slot(self, family: Family, slot: int) -> int:
        """Marks a member's entries dead (their ciphertexts stay until the block is rebuilt)."""
        return self.store.kill_gallery_slot(family.family_id, slot)

    def match(self, family: Family, faces: list[list[bytes]],
              active: Callable[[], bool] = lambda: True) -> Iterator[BlockResult]:
        """Encrypted squared distances of each face to each block, block by block; stops
        (with nothing more evaluated) as soon as ``active()`` turns false."""
        if not 1 <= len(faces) <= MAX_FACES_PER_QUERY:
            raise MalformedInputError(f"send 1..{MAX_FACES_PER_QUERY} faces per call")
        gallery = self._gallery(family)
        layout = self._layout(family.family_id)
        if not layout:
            raise PreconditionError("the family gallery is empty: enroll members first")
        try:
            queries = [ckks.prepare_query(gallery.public, face) for face in faces]
        except ValueError as exc:
            raise _invalid(exc) from exc
        for block in sorted(layout):
            with gallery.lock:
                cached = block < len(gallery.prepared)
                prepared_block = gallery.prepared.block(block) if cached else None
            if prepared_block is None:  # stored after this call read the cache (a re-pack)
                prepared_block = self._stored_block(family, gallery.public, block)
            for i, query in enumerate(queries):
                if not active():  # the phone gave up or its deadline passed
                    return
                try:
                    result = ckks.match_prepared(gallery.public, prepared_block, query)
                except ValueError as exc:
                    raise _invalid(exc) from exc
                yield BlockResult(i, block, result, layout[block])
