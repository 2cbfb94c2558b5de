"""Family faces on the phone: CKKS keys, enrollment, and encrypted identification (step 4).

Embeddings are computed locally and leave the phone only CKKS-encrypted; the server
returns encrypted squared distances, decrypted here. Decrypted values never go back.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from client.keystore import FamilyBundle
from client.rpc import PrivfaceClient
from common import ckks
from common.errors import MalformedInputError, PreconditionError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaceMatch:
    """One face's answer: the member name (None = unknown) and the nearest distance."""

    name: str | None
    slot: int | None
    distance: float


def secret_context(bundle: FamilyBundle) -> ckks.SecretContext:
    """The family's CKKS secret context (PreconditionError-like if never created)."""
    if bundle.ckks_secret is None:
        raise MalformedInputError("the family has no CKKS key yet: enroll a member first")
    return ckks.load_secret_context(bundle.ckks_secret)


def ensure_ckks_keys(client: PrivfaceClient, bundle: FamilyBundle) -> bool:
    """Creates the CKKS key and uploads its public part once. True if it did (save bundle)."""
    if bundle.ckks_secret is not None and client.get_family().has_public_context:
        return False
    if bundle.ckks_secret is None:
        bundle.ckks_secret = ckks.secret_context_bytes(ckks.create_secret_context())
    public = ckks.public_context_bytes(ckks.load_secret_context(bundle.ckks_secret))
    reply = client.upload_public_context(public)
    log.info("uploaded the public CKKS context: %d bytes, %d rotation keys", reply.size,
             reply.galois_key_count)
    return True


def enroll(client: PrivfaceClient, bundle: FamilyBundle, name: str,
           embeddings: np.ndarray) -> int:
    """Adds a member's face embeddings to the encrypted gallery; returns the gallery size.

    The member gets an opaque slot in the roster (the caller saves the bundle).
    """
    embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
    if not 1 <= len(embeddings) <= 20:
        raise MalformedInputError("enroll a member with 1 to 20 face photos")
    slot = bundle.add_member(name)
    secret = secret_context(bundle)
    lay = secret.layout
    layout = client.gallery_layout()
    blocks = sorted(layout.blocks, key=lambda b: b.block)
    if blocks and len(blocks[-1].position_slots) < lay.entries_per_block:
        block, used = blocks[-1].block, len(blocks[-1].position_slots)
    else:
        block, used = len(blocks), 0
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
             tolerance: float = ckks.TOLERANCE) -> list[FaceMatch]:
    """Encrypted matching of each face against the gallery; nearest member within tolerance."""
    embeddings = np.atleast_2d(np.asarray(embeddings, dtype=np.float64))
    if len(embeddings) == 0:
        return []
    secret = secret_context(bundle)
    queries = [ckks.encrypt_query(secret, e) for e in embeddings]
    per_face: list[dict[int, tuple[np.ndarray, Sequence[int]]]] = [{} for _ in embeddings]
    for reply in client.match_faces(queries):
        slots = list(reply.position_slots)
        dist = ckks.decrypt_distances(secret, reply.distances, len(slots))
        per_face[reply.face][reply.block] = (dist, slots)
    matches = []
    for blocks in per_face:
        distances = np.concatenate([blocks[b][0] for b in sorted(blocks)]) if blocks else \
            np.zeros(0)
        entry_slots = [s if s >= 0 else None for b in sorted(blocks) for s in blocks[b][1]]
        slot, dist = ckks.nearest(distances, entry_slots)
        if slot is None or dist > tolerance:
            matches.append(FaceMatch(None, None, dist))
        else:
            matches.append(FaceMatch(bundle.name_of(slot), slot, dist))
    return matches


def gallery_counts(client: PrivfaceClient) -> dict[int, int]:
    """Live gallery entries per slot (empty if the family has no gallery yet)."""
    counts: dict[int, int] = {}
    try:
        layout = client.gallery_layout()
    except PreconditionError:  # no public context uploaded yet: nothing enrolled
        return counts
    for block in layout.blocks:
        for slot in block.position_slots:
            if slot >= 0:
                counts[slot] = counts.get(slot, 0) + 1
    return counts


def compact(client: PrivfaceClient, bundle: FamilyBundle) -> tuple[int, int]:
    """Re-packs the gallery without its dead entries, so a removed member's encrypted faces
    are really deleted from the server. Blocks are downloaded, decrypted and re-encrypted
    here; the server only swaps ciphertexts. Returns (positions before, entries after)."""
    secret = secret_context(bundle)
    layout = client.gallery_layout()
    positions = sum(len(b.position_slots) for b in layout.blocks)
    live, slots = [], []
    for block in sorted(layout.blocks, key=lambda b: b.block):
        if all(s < 0 for s in block.position_slots):
            continue  # nothing alive: no need to download it
        reply = client.gallery_block(block.block)
        entries = ckks.decrypt_entries(secret, list(reply.ciphertexts.items))
        for pos, slot in enumerate(reply.position_slots):
            if slot >= 0:
                live.append(entries[pos])
                slots.append(slot)
    per_block = secret.layout.entries_per_block
    blocks = []
    if live:
        for b, cts in enumerate(ckks.encrypt_gallery(secret, np.array(live))):
            blocks.append((cts, slots[b * per_block:(b + 1) * per_block]))
    return positions, client.replace_gallery(positions, blocks)
