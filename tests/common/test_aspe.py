"""ASPE: exact signs and zeros for random vectors, garbage under a wrong key, key I/O."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common import aspe
from common.errors import KeyMismatchError, MalformedInputError

KEYS = {d: aspe.generate_key(d, rng=np.random.default_rng(d)) for d in (1, 2, 5, 9, 17, 64, 401)}


@settings(max_examples=60, deadline=None)
@given(dim=st.sampled_from(sorted(KEYS)), seed=st.integers(0, 2**32 - 1))
def test_server_value_has_the_sign_of_the_plaintext_product(dim: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    key = KEYS[dim]
    stored = rng.integers(-5, 6, size=(20, dim)).astype(float)
    queries = rng.integers(-5, 6, size=(7, dim)).astype(float)
    truth = queries @ stored.T
    got = aspe.evaluate(aspe.encrypt_stored(key, stored, rng),
                        aspe.encrypt_query(key, queries, rng))
    assert np.array_equal(np.sign(np.round(got, 6)), np.sign(truth))
    # Integer products are recovered up to the query's positive scale, zeros stay zeros.
    assert np.all(np.abs(got[truth == 0]) < 1e-8)


def test_products_equal_plaintext_times_a_positive_scale_per_query() -> None:
    rng = np.random.default_rng(1)
    key = KEYS[64]
    stored = rng.standard_normal((50, 64))
    query = rng.standard_normal((1, 64))
    got = aspe.evaluate(aspe.encrypt_stored(key, stored), aspe.encrypt_query(key, query))[0]
    ratio = got / (query @ stored.T)[0]
    assert np.all(ratio > 0)
    assert np.allclose(ratio, ratio[0], rtol=1e-9)
    assert 1.0 <= ratio[0] <= 16.0


def test_encryption_is_randomised() -> None:
    key = KEYS[17]
    vec = np.ones(17)
    a, b = aspe.encrypt_stored(key, vec), aspe.encrypt_stored(key, vec)
    assert not np.allclose(a, b)
    q1, q2 = aspe.encrypt_query(key, vec), aspe.encrypt_query(key, vec)
    assert not np.allclose(q1, q2)


def test_wrong_key_gives_garbage_not_a_plausible_answer() -> None:
    rng = np.random.default_rng(7)
    right, wrong = KEYS[17], aspe.generate_key(17, rng=np.random.default_rng(99))
    stored = rng.integers(0, 2, size=(2000, 17)).astype(float)
    query = rng.integers(0, 2, size=(1, 17)).astype(float) - 0.5
    stored[:, -1], query[0, -1] = 1.0, 0.25  # odd offset: no product is exactly zero
    truth = np.sign(query @ stored.T)[0]
    good = aspe.evaluate(aspe.encrypt_stored(right, stored), aspe.encrypt_query(right, query))[0]
    bad = aspe.evaluate(aspe.encrypt_stored(right, stored), aspe.encrypt_query(wrong, query))[0]
    assert np.mean(np.sign(good) == truth) == 1.0
    agreement = np.mean(np.sign(bad) == truth)
    assert 0.35 < agreement < 0.65, agreement  # a coin toss, not a near-miss


def test_condition_number_is_bounded_and_measured() -> None:
    key = aspe.generate_key(400, max_condition=50.0, rng=np.random.default_rng(3))
    c1, c2 = key.condition_numbers()
    assert c1 <= 50.0 * (1 + 1e-9) and c2 <= 50.0 * (1 + 1e-9)
    assert c1 > 10  # random, not an orthogonal matrix (which would leak Gram matrices)


def test_key_round_trips_and_fingerprint_identifies_it() -> None:
    key = KEYS[9]
    again = aspe.AspeKey.from_bytes(key.to_bytes())
    assert again.fingerprint() == key.fingerprint()
    assert np.array_equal(again.m1, key.m1) and np.array_equal(again.split, key.split)
    assert KEYS[17].fingerprint() != key.fingerprint()


def test_corrupted_key_bytes_are_refused_or_change_the_key() -> None:
    data = bytearray(KEYS[9].to_bytes())
    with pytest.raises(MalformedInputError):
        aspe.AspeKey.from_bytes(bytes(data[:-3]))
    bad_magic = b"XXXXXXXX" + bytes(data[8:])
    with pytest.raises(MalformedInputError):
        aspe.AspeKey.from_bytes(bad_magic)
    data[200] ^= 0x10
    assert aspe.AspeKey.from_bytes(bytes(data)).fingerprint() != KEYS[9].fingerprint()


def test_rejects_wrong_dimensions_and_non_finite_values() -> None:
    key = KEYS[9]
    with pytest.raises(MalformedInputError):
        aspe.encrypt_stored(key, np.ones(8))
    with pytest.raises(MalformedInputError):
        aspe.encrypt_query(key, np.full(9, np.nan))
    with pytest.raises(KeyMismatchError):
        aspe.evaluate(aspe.encrypt_stored(key, np.ones(9)),
                      aspe.encrypt_query(KEYS[17], np.ones(17)))


# Keys the tests below make are generated inside each test, not at import: the functions
# that make them are under test too.


def _stored_plaintext(key: aspe.AspeKey, cipher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Opens stored-side ciphertexts with the key: the extended vectors and the random
    shares r (0.5 y - r, 0.5 y + r) at the positions split on the stored side."""
    e = key.extended_dim
    first, second = cipher[:, :e] @ key.m1_inv, cipher[:, e:] @ key.m2_inv
    mask = ~key.split
    ext = np.where(mask, first + second, first)
    return ext, (0.5 * ext - first)[:, mask]


def _query_plaintext(key: aspe.AspeKey, cipher: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e = key.extended_dim
    first, second = cipher[:, :e] @ key.m1.T, cipher[:, e:] @ key.m2.T
    ext = np.where(key.split, first + second, first)
    return ext, (0.5 * ext - first)[:, key.split]


def _rms(a: np.ndarray) -> np.ndarray:
    return np.asarray(np.sqrt(np.mean(a * a, axis=1)))


def test_shares_and_noise_are_fresh_per_element_and_scaled_to_each_vector() -> None:
    """The random shares and noise dims hide each vector at its own magnitude: neither
    negligible next to a large vector nor overwhelming a small one in the same batch."""
    rng = np.random.default_rng(5)
    key = aspe.generate_key(30, noise_dim=8, rng=rng)
    base = rng.standard_normal(30)
    rows = np.stack([base * 1e-3, base * 1e3])
    d, nd = key.data_dim, key.noise_dim
    ext, shares = _stored_plaintext(key, aspe.encrypt_stored(key, rows, rng))
    assert np.allclose(ext[:, :d], rows, rtol=1e-6, atol=1e-9)
    assert np.allclose(ext[:, d + nd:], 0, atol=1e-6)
    for part in (ext[:, d:d + nd], shares):
        ratio = _rms(part) / _rms(rows)
        assert np.all((ratio > 0.1) & (ratio < 10)), ratio
    assert np.all(np.ptp(shares, axis=1) > 0)  # a fresh value per element, not one per vector

    qext, qshares = _query_plaintext(key, aspe.encrypt_query(key, rows, rng))
    scaled = qext[:, :d]
    assert np.allclose(scaled / rows, (scaled / rows)[:, :1], rtol=1e-6)  # one c per vector
    assert np.allclose(qext[:, d:d + nd], 0, atol=1e-6)
    for part in (qext[:, d + nd:], qshares):
        ratio = _rms(part) / _rms(scaled)
        assert np.all((ratio > 0.1) & (ratio < 10)), ratio


def test_a_zero_vector_still_encrypts_to_random_values() -> None:
    key = aspe.generate_key(6, rng=np.random.default_rng(2))
    zero = np.zeros((1, 6))
    for encrypt in (aspe.encrypt_stored, aspe.encrypt_query):
        a, b = encrypt(key, zero), encrypt(key, zero)
        assert np.linalg.norm(a) > 0.1
        assert not np.allclose(a, b)


def test_scale_range_must_be_positive_and_ordered() -> None:
    key = aspe.generate_key(3, rng=np.random.default_rng(4))
    for bad in ((0.0, 1.0), (-1.0, 2.0), (2.0, 1.0)):
        with pytest.raises(ValueError, match="scale_range"):
            aspe.encrypt_query(key, np.ones(3), scale_range=bad)
    fixed = aspe.encrypt_query(key, np.ones(3), scale_range=(3.0, 3.0))
    stored = aspe.encrypt_stored(key, np.ones(3))
    assert aspe.evaluate(stored, fixed)[0, 0] == pytest.approx(9.0)


def test_single_vectors_evaluate_like_one_row_batches() -> None:
    key = aspe.generate_key(4, rng=np.random.default_rng(6))
    stored = aspe.encrypt_stored(key, np.array([1.0, 2.0, 0.0, -1.0]))[0]
    query = aspe.encrypt_query(key, np.array([1.0, 1.0, 1.0, 1.0]), scale_range=(1.0, 1.0))[0]
    assert stored.ndim == 1 and query.ndim == 1
    assert aspe.evaluate(stored, query) == pytest.approx(np.array([[2.0]]))
    with pytest.raises(KeyMismatchError):
        aspe.evaluate(stored[:-1], query)
    with pytest.raises(KeyMismatchError):
        aspe.evaluate(stored, query[:-1])


def test_key_generation_arguments() -> None:
    for data_dim, noise_dim, max_condition in ((1, 4, 100.0), (3, 0, 1.0)):
        key = aspe.generate_key(data_dim, noise_dim=noise_dim, max_condition=max_condition)
        assert (key.version, key.data_dim, key.noise_dim) == (1, data_dim, noise_dim)
        assert key.max_condition == max_condition
    for kwargs in ({"data_dim": 0}, {"data_dim": 2, "noise_dim": -1},
                   {"data_dim": 2, "max_condition": 0.99}):
        with pytest.raises(ValueError):
            aspe.generate_key(**kwargs)
    seeded = [aspe.generate_key(5, rng=np.random.default_rng(7)) for _ in range(2)]
    assert seeded[0].fingerprint() == seeded[1].fingerprint()


@pytest.mark.parametrize("n", [2, 3, 40])
def test_condition_number_reaches_the_bound_exactly(n: int) -> None:
    key = aspe.generate_key(n, noise_dim=0, max_condition=50.0, rng=np.random.default_rng(n))
    assert key.condition_numbers() == pytest.approx((50.0, 50.0), rel=1e-6)


def test_singular_values_spread_over_the_whole_range_and_split_is_balanced() -> None:
    """Singular values log-uniform over [1/sqrt(k), sqrt(k)] (not bunched at one end, which
    would make M nearly a scaled orthogonal matrix); about half the dims split."""
    key = aspe.generate_key(400, noise_dim=0, max_condition=100.0, rng=np.random.default_rng(8))
    half = 0.5 * np.log(100.0)
    for m in (key.m1, key.m2):
        logs = np.log(np.linalg.svd(m, compute_uv=False))
        q1, median, q3 = np.quantile(logs, [0.25, 0.5, 0.75])
        assert abs(median) < 0.15 * half
        assert q1 == pytest.approx(-half / 2, abs=0.15 * half)
        assert q3 == pytest.approx(half / 2, abs=0.15 * half)
    assert key.split.shape == (400,) and key.split.dtype == bool
    assert 0.4 < key.split.mean() < 0.6


@pytest.mark.parametrize("data_dim", range(1, 10))
def test_key_bytes_round_trip_for_every_padding_of_the_split(data_dim: int) -> None:
    key = aspe.generate_key(data_dim, noise_dim=data_dim % 5, version=3, max_condition=50.0)
    data = key.to_bytes()
    again = aspe.AspeKey.from_bytes(data)
    assert (again.version, again.data_dim, again.noise_dim, again.max_condition) == (
        3, data_dim, data_dim % 5, 50.0)
    assert np.array_equal(again.m1, key.m1) and np.array_equal(again.m2, key.m2)
    assert np.array_equal(again.split, key.split)
    assert again.to_bytes() == data
    for bad in (data[:-1], data + b"\0"):
        with pytest.raises(MalformedInputError, match="expected"):
            aspe.AspeKey.from_bytes(bad)


# A key written by hand in the documented layout: "PFASPE1\0", version, data_dim, noise_dim
# (u32 LE), max_condition (f64 LE), M1 and M2 (f64 LE, row-major), the split bits packed.
HAND_KEY = (struct.pack("<8sIIId", b"PFASPE1\0", 7, 2, 0, 4.0)
            + np.array([[2.0, 0.0], [0.0, 1.0]], "<f8").tobytes()
            + np.array([[1.0, 1.0], [0.0, 1.0]], "<f8").tobytes()
            + bytes([0b10000000]))


def test_key_layout_and_fingerprint_are_stable() -> None:
    """Fingerprints are kept by the server (the family's label key) and keys by the
    bundles: both must read the same in every later version."""
    key = aspe.AspeKey.from_bytes(HAND_KEY)
    assert (key.version, key.data_dim, key.noise_dim, key.max_condition) == (7, 2, 0, 4.0)
    assert np.array_equal(key.m1, [[2.0, 0.0], [0.0, 1.0]])
    assert np.array_equal(key.m2, [[1.0, 1.0], [0.0, 1.0]])
    assert key.split.tolist() == [True, False]
    assert key.to_bytes() == HAND_KEY
    assert key.fingerprint().hex() == "2157a9da62fd3ec69d686c4a2880578c"
