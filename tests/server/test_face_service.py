"""Enrollment and encrypted matching through the real server (FaceService)."""

from __future__ import annotations

import numpy as np
import pytest

from client.pipeline import faces
from client.pipeline.recognize import primary_face_embedding
from common import ckks
from common.errors import MalformedInputError, PreconditionError
from tests.conftest import enroll_embeddings, require_data

PEOPLE = ["George_W_Bush", "Colin_Powell", "Tony_Blair", "Serena_Williams"]


@pytest.fixture(scope="module")
def lfw_embeddings() -> dict[str, np.ndarray]:
    """Embeddings of the first 3 LFW images of a few people (computed once per module)."""
    root = require_data("lfw", "images")
    out = {}
    for person in PEOPLE:
        paths = sorted((root / person).glob("*.jpg"))[:3]
        out[person] = np.array([primary_face_embedding(p) for p in paths])
    return out


def test_enroll_identify_remove(family, lfw_embeddings) -> None:
    client, bundle = family
    assert faces.ensure_ckks_keys(client, bundle)
    assert not faces.ensure_ckks_keys(client, bundle)  # uploaded once, kept by the server
    for person in PEOPLE[:3]:
        enroll_embeddings(client, bundle, person, lfw_embeddings[person][:2])
    assert faces.gallery_counts(client) == {bundle.slot_of(p): 2 for p in PEOPLE[:3]}
    probes = np.array([lfw_embeddings[p][2] for p in PEOPLE])
    matches = faces.identify(client, bundle, probes)
    assert [m.name for m in matches] == [*PEOPLE[:3], None]
    # Encrypted distances agree with plaintext ones.
    gallery = np.concatenate([lfw_embeddings[p][:2] for p in PEOPLE[:3]])
    plain = np.linalg.norm(gallery[None, :, :] - probes[:, None, :], axis=2).min(axis=1)
    assert np.allclose([m.distance for m in matches], plain, atol=1e-4)
    # Removing a member: their faces stop matching, the others still do.
    client.remove_gallery_slot(bundle.remove_member(PEOPLE[0]))
    after = faces.identify(client, bundle, probes[:2])
    assert after[0].name is None and after[1].name == PEOPLE[1]
    # Re-enrolling brings them back (their old entries stay dead).
    enroll_embeddings(client, bundle, PEOPLE[0], lfw_embeddings[PEOPLE[0]][:1])
    again = faces.identify(client, bundle, probes[:1])
    assert again[0].name == PEOPLE[0]
    assert faces.gallery_counts(client)[bundle.slot_of(PEOPLE[0])] == 1


def test_gallery_spans_several_blocks(family) -> None:
    client, bundle = family
    faces.ensure_ckks_keys(client, bundle)
    per_block = faces.secret_context(bundle).layout.entries_per_block
    rng = np.random.default_rng(0)
    members = []
    for i in range(8):  # 8 x 20 = 160 entries > one block of 128
        emb = rng.standard_normal((20, 128))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        enroll_embeddings(client, bundle, f"m{i}", emb)
        members.append(emb)
    layout = client.gallery_layout()
    assert [len(slots) for _, slots in sorted(layout.items())] == [per_block, 160 - per_block]
    probe = members[7][5] + 0.01
    probe /= np.linalg.norm(probe)
    (match,) = faces.identify(client, bundle, probe[None, :])
    expected = np.linalg.norm(np.concatenate(members) - probe, axis=1).min()
    assert match.name == "m7" and abs(match.distance - expected) < 1e-4


def test_precise_errors(family) -> None:
    client, bundle = family
    with pytest.raises(PreconditionError, match="no public CKKS context"):
        client.gallery_layout()
    secret = ckks.create_secret_context()
    with pytest.raises(MalformedInputError, match="secret key"):
        client.upload_public_context(ckks.secret_context_bytes(secret))
    with pytest.raises(MalformedInputError):
        client.upload_public_context(b"not a context at all")
    faces.ensure_ckks_keys(client, bundle)
    own = faces.secret_context(bundle)
    emb = np.full((1, 128), 0.05)
    with pytest.raises(PreconditionError, match="gallery is empty"):
        client.match_faces([ckks.encrypt_query(own, emb[0])])
    with pytest.raises(PreconditionError, match="next free position"):
        client.add_gallery_entries(0, 0, 5, 1, ckks.encrypt_entries(own, emb, 5))
    with pytest.raises(MalformedInputError):  # a ciphertext under another family's key
        client.add_gallery_entries(0, 0, 0, 1, ckks.encrypt_entries(secret, emb, 0))
    client.add_gallery_entries(0, 0, 0, 1, ckks.encrypt_entries(own, emb, 0))
    query = ckks.encrypt_query(own, emb[0])
    with pytest.raises(MalformedInputError):  # wrong number of ciphertexts
        client.match_faces([query[:3]])
    tampered = list(query)
    tampered[0] = tampered[0][:-50] + bytes(50)
    with pytest.raises(MalformedInputError):
        client.match_faces([tampered])
    with pytest.raises(MalformedInputError):
        client.match_faces([])


def test_compact_deletes_removed_members_ciphertexts(family) -> None:
    client, bundle = family
    faces.ensure_ckks_keys(client, bundle)
    rng = np.random.default_rng(5)
    members = {}
    for i in range(3):  # 3 x 50 = 150 entries: two blocks
        emb = rng.standard_normal((50, 128))
        members[f"m{i}"] = emb / np.linalg.norm(emb, axis=1, keepdims=True)
        for chunk in (members[f"m{i}"][:20], members[f"m{i}"][20:40], members[f"m{i}"][40:]):
            enroll_embeddings(client, bundle, f"m{i}", chunk)
    client.remove_gallery_slot(bundle.remove_member("m1"))
    before, after = faces.compact(client, bundle)
    assert (before, after) == (150, 100)
    layout = client.gallery_layout()
    assert [len(slots) for _, slots in sorted(layout.items())] == [100]
    assert all(s >= 0 for slots in layout.values() for s in slots)
    # What the server now stores decrypts to m0 and m2 only: m1's faces are gone.
    secret = faces.secret_context(bundle)
    stored = ckks.decrypt_entries(secret, client.gallery_block(0)[0])[:100]
    assert np.allclose(stored, np.vstack([members["m0"], members["m2"]]), atol=1e-4)
    matches = faces.identify(client, bundle, np.vstack([members["m0"][:1], members["m1"][:1],
                                                        members["m2"][:1]]))
    assert [m.name for m in matches] == ["m0", None, "m2"]
    # A replacement based on a stale view of the gallery is refused, nothing changes.
    with pytest.raises(PreconditionError, match="changed"):
        client.replace_gallery(150, [])
    assert faces.gallery_counts(client) == {bundle.slot_of("m0"): 50, bundle.slot_of("m2"): 50}
