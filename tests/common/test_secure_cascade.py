"""Secure cascade evaluation: exact against the plaintext reference, loud under a wrong key."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from client.pipeline.windows import ScanParams, scan_windows
from common import secure_cascade as sc
from common.cascade import load_cascade, rejection_stages
from common.errors import KeyMismatchError, MalformedInputError
from tests.conftest import require_data

CASCADE = load_cascade()


@pytest.fixture(scope="module")
def key() -> sc.ProductKey:
    return sc.generate_product_key("frontalface_alt", CASCADE, rng=np.random.default_rng(7))


@pytest.fixture(scope="module")
def encrypted(key) -> sc.EncryptedCascade:
    return sc.encrypt_cascade(CASCADE, key, np.random.default_rng(8))


@pytest.fixture(scope="module")
def windows() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluable windows of a real photo with their plaintext rejection stages."""
    path = require_data("photos", "dlib_examples_group", "2008_002506.jpg")
    gray = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (240, 180))
    pixels, nfs = [], []
    for batch in scan_windows(gray, CASCADE, ScanParams()):
        ok = ~batch.low_contrast
        pixels.append(batch.pixels[ok])
        nfs.append(batch.norm_factors[ok])
    px, nf = np.concatenate(pixels), np.concatenate(nfs)
    return px, nf, rejection_stages(CASCADE, px, nf)


def _expected(stages: np.ndarray, n_stages: int) -> np.ndarray:
    return np.where(stages == 0, sc.Outcome.REJECTED_STAGE0,
                    np.where(stages >= n_stages, sc.Outcome.PASSED, sc.Outcome.REJECTED))


def test_float64_outcomes_equal_the_plaintext_cascade(key, encrypted, windows) -> None:
    px, nf, stages = windows
    data = sc.encrypt_windows(key, px, nf, sc.Encoding.FLOAT64)
    out = sc.evaluate(encrypted, sc.decode_windows(data, len(px), encrypted.cipher_dim, 1), 1)
    assert np.array_equal(out, _expected(stages, CASCADE.n_stages))
    assert (stages == CASCADE.n_stages).sum() > 0  # the photo has faces: a real check


@pytest.mark.parametrize("encoding", [sc.Encoding.FLOAT32, sc.Encoding.FLOAT16])
def test_compact_encodings_are_certified_or_uncertain_never_wrong(key, encrypted, windows,
                                                                   encoding) -> None:
    px, nf, stages = windows
    data = sc.encrypt_windows(key, px, nf, encoding)
    out = sc.evaluate(encrypted, sc.decode_windows(data, len(px), encrypted.cipher_dim,
                                                   encoding), encoding)
    sure = out != sc.Outcome.UNCERTAIN
    assert np.array_equal(out[sure], _expected(stages, CASCADE.n_stages)[sure])
    if encoding is sc.Encoding.FLOAT32:
        assert sure.mean() > 0.98  # only a few windows need a float64 re-send


def test_prefix_round_matches_the_first_stages(key, encrypted, windows) -> None:
    px, nf, stages = windows
    data = sc.encrypt_windows(key, px, nf, sc.Encoding.FLOAT32, prefix=True)
    out = sc.evaluate(encrypted, sc.decode_windows(data, len(px), encrypted.prefix_cipher_dim, 2),
                      2, prefix=True)
    sure = out != sc.Outcome.UNCERTAIN
    expect = _expected(np.minimum(stages, key.prefix_stages), key.prefix_stages)
    assert np.array_equal(out[sure], expect[sure])
    assert encrypted.prefix_cipher_dim < encrypted.cipher_dim / 5


def test_wrong_product_key_gives_garbage_and_product_keys_round_trip(encrypted, windows) -> None:
    px, nf, stages = windows
    other = sc.generate_product_key("frontalface_alt", CASCADE, rng=np.random.default_rng(9))
    data = sc.encrypt_windows(other, px, nf, sc.Encoding.FLOAT64)
    out = sc.evaluate(encrypted, sc.decode_windows(data, len(px), encrypted.cipher_dim, 1), 1)
    assert np.mean(out == _expected(stages, CASCADE.n_stages)) < 0.9
    again = sc.ProductKey.from_bytes(other.to_bytes())
    assert again.fingerprint() == other.fingerprint() and again.prefix_stages == 3
    assert np.array_equal(again.prefix_basis, other.prefix_basis)
    with pytest.raises(MalformedInputError):
        sc.ProductKey.from_bytes(other.to_bytes()[:-5])


def test_rejects_malformed_windows(key, encrypted) -> None:
    with pytest.raises(MalformedInputError):
        sc.decode_windows(b"\0" * 10, 1, encrypted.cipher_dim, 1)
    with pytest.raises(MalformedInputError):
        sc.decode_windows(b"", 0, encrypted.cipher_dim, 9)
    nan = np.full(encrypted.cipher_dim, np.nan).tobytes()
    with pytest.raises(MalformedInputError):
        sc.decode_windows(nan, 1, encrypted.cipher_dim, 1)
    with pytest.raises(MalformedInputError):
        sc.encrypt_windows(key, np.zeros((2, 399)), np.ones(2))
    small = sc.generate_product_key("x", CASCADE, prefix_stages=0)
    with pytest.raises(MalformedInputError):
        sc.encrypt_windows(small, np.zeros((1, 400)), np.ones(1), prefix=True)
    wrong_window = sc.ProductKey("x", (24, 24), small.key, 0, np.zeros((0, 576)), None)
    with pytest.raises(KeyMismatchError):
        sc.encrypt_cascade(CASCADE, wrong_window)
