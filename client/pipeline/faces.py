"""Family faces on the phone: CKKS keys, enrollment, and encrypted identification (step 4).

Embeddings are computed locally and leave the phone only CKKS-encrypted; the server
returns encrypted squared distances, decrypted here. Decrypted values never go back.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from client.keystore import FamilyBundle
from client.rpc import PrivfaceClient
from common import ckks, sealed
from common.errors import PreconditionError, VersionConflictError

CKKS_ITEM = "ckks-secret"

log = logging.getLogger(__name__)


MATCH_TOLERANCE = 0.525
"""Largest distance at which the nearest enrolled face names a face. Stricter than
face_recognition's 0.6 (ckks.TOLERANCE): at 0.6 strangers fell within reach of a member
(one-member search precision 0.91-0.96 on the generated families); 0.525 was chosen on
validation families only by bench/identify_rules.py (README, "Retrieval quality"):
+0.023 one-member F1 on 10/10 validation seeds for 0.005 recall."""


def decide(distances: np.ndarray, entry_slots: Sequence[int | None],
           tolerance: float = MATCH_TOLERANCE) -> tuple[int | None, float]:
    """The decision on one face's decrypted distances: (the nearest live entry's member
    slot if within ``tolerance`` else None, that distance). The plaintext reference
    (bench/family_bench.py) calls this same function."""
    slot, dist = ckks.nearest(distances, entry_slots)
    return (slot if slot is not None and dist <= tolerance else None), dist


@dataclass(frozen=True)
class FaceMatch:
    """One face's answer: the member name (None = unknown) and the nearest distance."""

    name: str | None
    slot: int | None
    distance: float


def secret_context(bundle: FamilyBundle) -> ckks.SecretContext:
    """The family's CKKS secret context (PreconditionError if never created)."""
    if bundle.ckks_secret is None:
        raise PreconditionError("the family has no face gallery yet: enroll a member first "
                                "(privface enroll NAME PHOTO...)")
    return ckks.load_secret_context(bundle.ckks_secret)


def ensure_ckks_keys(client: PrivfaceClient, bundle: FamilyBundle) -> str | None:
    """Makes sure this phone holds the family's one CKKS key and the server its public part.

    The first phone to need it creates the key and shares the secret as a sealed item
    (compare-and-set decides between racing phones); every other phone adopts that one, so
    no phone ever replaces the family's keys under a live gallery. Returns "created" or
    "adopted" when the bundle changed (save it), None when all was in place."""
    summary = client.get_family()
    local_id = ckks.context_key_id(bundle.ckks_secret) if bundle.ckks_secret else b""
    if local_id and summary.has_public_context and local_id == summary.ckks_key_id:
        share_ckks_secret(client, bundle)  # families whose gallery predates sealed items
        return None
    for _ in range(3):
        version, blob = client.get_sealed_item(CKKS_ITEM)
        if version:  # the family's key exists: use it
            bundle.ckks_secret = sealed.unseal(bundle.master_key, bundle.family_id, CKKS_ITEM,
                                               version, blob)
            if ckks.context_key_id(bundle.ckks_secret) != summary.ckks_key_id:
                _upload_public(client, bundle.ckks_secret)  # its first phone stopped midway
            return "adopted" if ckks.context_key_id(bundle.ckks_secret) != local_id else None
        if summary.has_public_context and summary.gallery_entry_count:
            raise PreconditionError(
                "the family's face keys are on another phone that has not shared them yet: "
                "run `privface people` there once (privface 0.2 or later), then retry")
        if bundle.ckks_secret is None or summary.has_public_context:
            bundle.ckks_secret = ckks.secret_context_bytes(ckks.create_secret_context())
        try:
            client.put_sealed_item(CKKS_ITEM, 0, sealed.seal(
                bundle.master_key, bundle.family_id, CKKS_ITEM, 1, bundle.ckks_secret))
        except VersionConflictError:
            continue  # another phone shared its key first: adopt that one
        _upload_public(client, bundle.ckks_secret)
        return "created"
    raise VersionConflictError("could not agree on the family's CKKS key: try again")


def _upload_public(client: PrivfaceClient, secret_bytes: bytes) -> None:
    public = ckks.public_context_bytes(ckks.load_secret_context(secret_bytes))
    size, galois = client.upload_public_context(public)
    log.info("uploaded the public CKKS context: %d bytes, %d rotation keys", size, galois)


def share_ckks_secret(client: PrivfaceClient, bundle: FamilyBundle) -> None:
    """Shares this phone's CKKS secret as the family's if none is shared yet (families
    whose gallery predates sealed items)."""
    if bundle.ckks_secret is None or client.get_sealed_item(CKKS_ITEM)[0]:
        return
    with contextlib.suppress(VersionConflictError):  # shared meanwhile by another phone
        client.put_sealed_item(CKKS_ITEM, 0, sealed.seal(
            bundle.master_key, bundle.family_id, CKKS_ITEM, 1, bundle.ckks_secret))


def add_faces(client: PrivfaceClient, bundle: FamilyBundle, slot: int,
              embeddings: np.ndarray) -> int:
    """Adds face embeddings of the member in ``slot`` to the encrypted gallery; returns the
    gallery's size."""
    embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
    secret = secret_context(bundle)
    lay = secret.layout
    layout = client.gallery_layout()
    last = max(layout) if layout else -1
    if layout and len(layout[last]) < lay.entries_per_block:
        block, used = last, len(layout[last])
    else:
        block, used = last + 1, 0
    total = 0
    remaining = embeddings
    while len(remaining):
        take = min(len(remaining), lay.entries_per_block - used)
        first = block * lay.entries_per_block + used
        cts = ckks.encrypt_entries(secret, remaining[:take], first)
        total = client.add_gallery_entries(slot, block, used, take, cts)
        remaining = remaining[take:]
        block, used = block + 1, 0
    return total


def identify(client: PrivfaceClient, bundle: FamilyBundle, embeddings: np.ndarray,
             tolerance: float = MATCH_TOLERANCE) -> list[FaceMatch]:
    """Encrypted matching of each face against the gallery; nearest member within tolerance
    (``decide``)."""
    embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
    if len(embeddings) == 0:
        return []
    secret = secret_context(bundle)
    queries = [ckks.encrypt_query(secret, e) for e in embeddings]
    per_face: list[dict[int, tuple[np.ndarray, Sequence[int]]]] = [{} for _ in embeddings]
    for reply in client.match_faces(queries):
        slots = reply.position_slots
        block_distances = ckks.decrypt_distances(secret, reply.ciphertext, len(slots))
        per_face[reply.face][reply.block] = (block_distances, slots)
    matches = []
    for blocks in per_face:
        distances = np.concatenate([blocks[b][0] for b in sorted(blocks)]) if blocks else \
            np.zeros(0)
        entry_slots = [s if s >= 0 else None for b in sorted(blocks) for s in blocks[b][1]]
        slot, dist = decide(distances, entry_slots, tolerance)
        matches.append(FaceMatch(None if slot is None else bundle.name_of(slot), slot, dist))
    return matches


def gallery_counts(client: PrivfaceClient) -> dict[int, int]:
    """Live gallery entries per slot (empty if the family has no gallery yet)."""
    counts: dict[int, int] = {}
    try:
        layout = client.gallery_layout()
    except PreconditionError:  # no public context uploaded yet: nothing enrolled
        return counts
    for slots in layout.values():
        for slot in slots:
            if slot >= 0:
                counts[slot] = counts.get(slot, 0) + 1
    return counts


def compact(client: PrivfaceClient, bundle: FamilyBundle) -> tuple[int, int]:
    """Re-packs the gallery without its dead entries, so a removed member's encrypted faces
    are really deleted from the server. Blocks are downloaded, decrypted and re-encrypted
    here; the server only swaps ciphertexts. Returns (positions before, entries after)."""
    secret = secret_context(bundle)
    layout = client.gallery_layout()
    positions = sum(len(s) for s in layout.values())
    live, slots = [], []
    for block in sorted(layout):
        if all(s < 0 for s in layout[block]):
            continue  # nothing alive: no need to download it
        ciphertexts, position_slots = client.gallery_block(block)
        entries = ckks.decrypt_entries(secret, ciphertexts)
        for pos, slot in enumerate(position_slots):
            if slot >= 0:
                live.append(entries[pos])
                slots.append(slot)
    per_block = secret.layout.entries_per_block
    blocks = []
    if live:
        for b, cts in enumerate(ckks.encrypt_gallery(secret, np.array(live))):
            blocks.append((cts, slots[b * per_block:(b + 1) * per_block]))
    return positions, client.replace_gallery(positions, blocks)
