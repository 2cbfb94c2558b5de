"""CKKS packed matcher: parameters, key handling, accuracy, packing, tamper/wrong key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common import ckks

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LFW = DATA / "lfw"
N_LFW_PAIRS = 40  # 20 same-person + 20 different-person pairs, fixed


@pytest.fixture(scope="module")
def secret():
    return ckks.create_secret_context()


@pytest.fixture(scope="module")
def public_bytes(secret):
    return ckks.public_context_bytes(secret)


@pytest.fixture(scope="module")
def public(public_bytes):
    return ckks.load_public_context(public_bytes)


def _unit_ish(rng, n, norm=1.4):
    x = rng.normal(size=(n, ckks.DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True) * norm


def _encrypt_gallery(secret, public, emb):
    """Blocks as the server stores them (add_into_block of a fresh block is the identity)."""
    return [ckks.add_into_block(public, None, cts) for cts in ckks.encrypt_gallery(secret, emb)]


def _distances(secret, results, n):
    return np.concatenate([ckks.decrypt_distances(secret, r) for r in results])[:n]


# --------------------------------------------------------------------------- parameters


def test_security_bound_accepts_default_and_rejects_oversize():
    assert ckks.SECURITY_BOUNDS_128[4096] >= ckks.DEFAULT_TOTAL_BITS
    assert ckks.check_security(8192, [60, 40, 60]) == 160
    assert ckks.check_security(4096, [60, 49]) == 109
    with pytest.raises(ValueError, match="128-bit"):
        ckks.check_security(4096, [60, 50])
    with pytest.raises(ValueError, match="128-bit"):
        ckks.check_security(8192, [60, 40, 40, 40, 40])
    with pytest.raises(ValueError):
        ckks.check_security(16384, [60] * 8)
    with pytest.raises(ValueError):
        ckks.CKKSParams(4096, (60, 50), 27)
    with pytest.raises(ValueError, match="headroom"):
        ckks.CKKSParams(4096, (60, 49), 30)


def test_layout_validation():
    lay = ckks.GalleryLayout(16, 2048)
    assert (lay.entries_per_block, lay.cts_per_block, lay.rotation_steps) == (128, 8, [1, 2, 4, 8])
    assert lay.block_of(300) == 2 and lay.entry_of(300) == 44
    for bad in (0, 3, 12, 256):
        with pytest.raises(ValueError):
            ckks.GalleryLayout(bad, 2048)


# --------------------------------------------------------------------------- contexts


def test_public_context_has_no_secret_and_is_small(secret, public, public_bytes):
    assert public.is_public() and not public.context.has_secret_key()
    assert len(public_bytes) <= 10 * 1024 * 1024
    assert len(public_bytes) <= 1024 * 1024  # measured ~0.3 MB: 1 relin + 4 rotation keys
    # only the rotation keys the matcher needs
    n = public.poly_modulus_degree
    for step in (1, 2, 4, 8):
        assert public.galois_keys.has_key(ckks._galois_elt(step, n))
    for step in (16, 3, 32):
        assert not public.galois_keys.has_key(ckks._galois_elt(step, n))


def test_secret_bytes_refused_as_public_and_roundtrip(secret):
    sb = ckks.secret_context_bytes(secret)
    with pytest.raises(ValueError, match="secret key"):
        ckks.load_public_context(sb)
    with pytest.raises(ValueError):
        ckks.load_public_context(b"garbage")
    with pytest.raises(ValueError):
        ckks.load_secret_context(sb[:-10])
    again = ckks.load_secret_context(sb)
    assert again.key_id == secret.key_id and again.layout == secret.layout
    q = ckks.encrypt_query(again, _unit_ish(np.random.default_rng(1), 1)[0])
    assert len(q) == secret.layout.cts_per_block


def test_public_context_cannot_encrypt(public):
    with pytest.raises(ValueError):
        ckks.encrypt_query(public, np.zeros(128))


# --------------------------------------------------------------------------- accuracy


def test_distances_match_numpy_multi_block_and_increment(secret, public):
    rng = np.random.default_rng(7)
    lay = secret.layout
    E = lay.entries_per_block
    emb = _unit_ish(rng, E + 40)  # two blocks, the second partly filled
    blocks = _encrypt_gallery(secret, public, emb[: E + 10])
    # later: 30 more entries appended into the free positions of block 1
    inc = ckks.encrypt_entries(secret, emb[E + 10 :], E + 10)
    blocks[1] = ckks.add_into_block(public, blocks[1], inc)
    gallery = ckks.PreparedGallery(public, blocks)
    queries = [emb[3] + 0.02 * rng.normal(size=128), emb[E + 35], _unit_ish(rng, 1)[0]]
    results = gallery.match_many([ckks.encrypt_query(secret, q) for q in queries])
    for q, res in zip(queries, results, strict=True):
        assert len(res) == 2
        got = _distances(secret, res, len(emb))
        want = np.linalg.norm(emb - q, axis=1)
        assert np.abs(got - want).max() < 1e-4
    # free positions hold ||q||^2 (must be ignored by the phone)
    free = ckks.decrypt_squared_distances(secret, results[2][1])[40:]
    assert np.allclose(free, np.sum(queries[2] ** 2), atol=1e-3)
    # match_block on raw bytes gives the same as the prepared path
    one = ckks.match_block(public, blocks[0], ckks.encrypt_query(secret, queries[0]))
    want = np.linalg.norm(emb[:E] - queries[0], axis=1)
    assert np.abs(ckks.decrypt_distances(secret, one) - want).max() < 1e-4


def test_assign_nearest_and_dead_positions():
    d = np.array([0.7, 0.3, 0.5, 0.1])
    assert ckks.assign(d, [0, 1, 2, None]) == 1  # position 3 is dead
    assert ckks.assign(d, [0, None, None, None]) is None  # 0.7 > 0.6
    assert ckks.nearest(d, [None] * 4) == (None, float("inf"))
    with pytest.raises(ValueError):
        ckks.assign(d, [0] * 5)


def test_input_validation(secret, public):
    lay = secret.layout
    with pytest.raises(ValueError, match="shape"):
        ckks.encrypt_query(secret, np.zeros(127))
    with pytest.raises(ValueError, match="one embedding"):
        ckks.encrypt_query(secret, np.zeros((2, 128)))
    with pytest.raises(ValueError, match="NaN"):
        ckks.encrypt_query(secret, np.full(128, np.nan))
    with pytest.raises(ValueError, match="norm"):
        ckks.encrypt_query(secret, np.ones(128))
    with pytest.raises(ValueError, match="block boundary"):
        ckks.encrypt_entries(secret, np.zeros((3, 128)), lay.entries_per_block - 2)
    good = ckks.encrypt_entries(secret, np.zeros((1, 128)), 0)
    q = ckks.encrypt_query(secret, np.zeros(128))
    with pytest.raises(ValueError, match="ciphertexts"):
        ckks.match_block(public, good[:-1], q)
    with pytest.raises(ValueError, match="expected a gallery"):
        ckks.match_block(public, q, q)
    with pytest.raises(ValueError, match="index"):
        ckks.match_block(public, good[::-1], q)
    with pytest.raises(ValueError, match="n_entries"):
        ckks.decrypt_distances(secret, ckks.match_block(public, good, q), lay.entries_per_block + 1)


# --------------------------------------------------------------------------- wrong key / tamper


def test_other_family_key_is_rejected_or_gives_garbage(secret, public):
    rng = np.random.default_rng(3)
    emb = _unit_ish(rng, 20)
    q = emb[4]
    res = ckks.match_block(
        public, ckks.encrypt_entries(secret, emb, 0), ckks.encrypt_query(secret, q)
    )
    truth = np.linalg.norm(emb - q, axis=1)
    other = ckks.create_secret_context()
    # 1) loud: the key id in the header does not match
    with pytest.raises(ValueError, match="different CKKS key"):
        ckks.decrypt_distances(other, res, 20)
    with pytest.raises(ValueError, match="different CKKS key"):
        ckks.match_block(public, ckks.encrypt_entries(other, emb, 0), ckks.encrypt_query(secret, q))
    # 2) with the key id forged, decryption under the wrong secret key is garbage
    other.key_id = secret.key_id
    wrong = ckks.decrypt_squared_distances(other, res, 20)
    assert np.median(np.abs(wrong - truth**2)) > 10  # true squared distances are < 5


def test_tampered_ciphertext_raises_or_garbage(secret, public):
    rng = np.random.default_rng(4)
    emb = _unit_ish(rng, 10)
    block = ckks.encrypt_entries(secret, emb, 0)
    query = ckks.encrypt_query(secret, emb[0])
    res = ckks.match_block(public, block, query)
    for blob, use in ((block[2], "block"), (query[1], "query"), (res, "result")):
        for pos in (ckks._HEADER.size + 20, len(blob) // 2, len(blob) - 1):
            bad = bytearray(blob)
            bad[pos] ^= 0x01
            bad = bytes(bad)
            # documented behaviour: the checksum makes every flipped payload byte raise
            with pytest.raises(ValueError, match="corrupted"):
                if use == "block":
                    ckks.match_block(public, [*block[:2], bad, *block[3:]], query)
                elif use == "query":
                    ckks.match_block(public, block, [*query[:1], bad, *query[2:]])
                else:
                    ckks.decrypt_distances(secret, bad, 10)
    # header tampering (kind/index/key id) is rejected too
    bad = bytearray(res)
    bad[5] = ckks.KIND_QUERY
    with pytest.raises(ValueError):
        ckks.decrypt_distances(secret, bytes(bad), 10)


def test_tampered_payload_with_fixed_checksum_still_fails_or_is_garbage(secret, public):
    """Without the checksum (an attacker recomputes it), SEAL either rejects the bytes or
    the result is far off: documents what the server could do by tampering."""
    import hashlib

    rng = np.random.default_rng(5)
    emb = _unit_ish(rng, 10)
    res = ckks.match_block(
        public, ckks.encrypt_entries(secret, emb, 0), ckks.encrypt_query(secret, emb[0])
    )
    truth = np.sum((emb - emb[0]) ** 2, axis=1)
    body = bytearray(res[ckks._HEADER.size :])
    body[len(body) // 2] ^= 0x40
    digest = hashlib.blake2b(bytes(body), digest_size=16).digest()
    forged = res[: ckks._HEADER.size - 16] + digest + bytes(body)
    try:
        got = ckks.decrypt_squared_distances(secret, forged, 10)
    except ValueError:
        return
    assert np.abs(got - truth).max() > 1e-2


# --------------------------------------------------------------------------- real faces


def _lfw_pairs(n_each):
    lines = (LFW / "pairsDevTrain.txt").read_text().split("\n")
    n = int(lines[0])
    same = [line.split("\t") for line in lines[1 : 1 + n]]
    diff = [line.split("\t") for line in lines[1 + n : 1 + 2 * n]]

    def img(name, i):
        return LFW / "images" / name / f"{name}_{int(i):04d}.jpg"

    out = []
    step_s, step_d = max(1, len(same) // n_each), max(1, len(diff) // n_each)
    for p in same[::step_s][:n_each]:
        out.append((img(p[0], p[1]), img(p[0], p[2]), True))
    for p in diff[::step_d][:n_each]:
        out.append((img(p[0], p[1]), img(p[2], p[3]), False))
    return out


@pytest.mark.skipif(not (LFW / "pairsDevTrain.txt").is_file(), reason=f"LFW data absent at {LFW}")
def test_lfw_decision_parity(secret, public):
    from client.pipeline.recognize import NoFaceError, primary_face_embedding

    pairs = _lfw_pairs(N_LFW_PAIRS // 2)
    cache = {}

    def emb(path):
        if path not in cache:
            try:
                cache[path] = primary_face_embedding(path)
            except NoFaceError:
                cache[path] = None
        return cache[path]

    usable = [(emb(a), emb(b), same) for a, b, same in pairs]
    usable = [(a, b, s) for a, b, s in usable if a is not None and b is not None]
    assert len(usable) >= 0.8 * len(pairs)
    # gallery: the first image of every pair; queries: the second images
    gallery = np.array([a for a, _, _ in usable])
    blocks = _encrypt_gallery(secret, public, gallery)
    prepared = ckks.PreparedGallery(public, blocks)
    agree = 0
    for i, (_, b, same) in enumerate(usable):
        got = _distances(secret, prepared.match(ckks.encrypt_query(secret, b)), len(gallery))
        plain = np.linalg.norm(gallery - b, axis=1)
        assert np.abs(got**2 - plain**2).max() < 1e-4  # squared: sqrt amplifies noise at 0
        assert np.array_equal(got <= ckks.TOLERANCE, plain <= ckks.TOLERANCE)
        agree += (plain[i] <= ckks.TOLERANCE) == same
    assert agree >= 0.85 * len(usable)  # face_recognition itself is ~99% on LFW
