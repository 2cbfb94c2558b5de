"""ASPE: exact signs and zeros for random vectors, garbage under a wrong key, key I/O."""

from __future__ import annotations

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
