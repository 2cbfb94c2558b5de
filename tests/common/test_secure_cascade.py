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
    photo = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert photo is not None
    gray = cv2.resize(photo, (240, 180))
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


def test_known_windows_against_the_real_encrypted_cascade(key, encrypted, windows) -> None:
    """The documented limit on the real detector (d = 402 plaintext dims): a server that
    knows some windows in the clear and computes their scores on two stage-0 classifiers.
    With d + 1 known windows it cannot solve for a classifier (the per-window scale hides
    each score's size); with 2d known windows the ratio attack recovers the pair up to one
    factor (docs/crypto.md)."""
    px, nf, _ = windows
    d = key.key.data_dim
    rng = np.random.default_rng(11)
    pick = rng.choice(len(px), 2 * d, replace=False)
    plain = np.hstack([px[pick] - px[pick].mean(1, keepdims=True),
                       px[pick].mean(1, keepdims=True),
                       nf[pick, None] / sc.nf_scale(CASCADE.window_size)])
    scores = sc.decode_windows(sc.encrypt_windows(key, px[pick], nf[pick]), 2 * d,
                               encrypted.cipher_dim, 2) @ encrypted.classifiers[:2].T
    truth = np.hstack([CASCADE.weights[:2], CASCADE.weights[:2].sum(1, keepdims=True),
                       -sc.nf_scale(CASCADE.window_size) * CASCADE.thresholds[:2, None]])

    def cosine(a, b):
        return abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))

    # Centred pixels sum to zero, so every window is orthogonal to u = [1, ..., 1, 0, 0]:
    # the scores cannot tell y from y + a*u. Work in the complement of u (the attacker can).
    u = np.r_[np.ones(CASCADE.n_pixels), 0.0, 0.0] / np.sqrt(CASCADE.n_pixels)
    basis = np.linalg.svd(np.eye(d) - np.outer(u, u))[0][:, :d - 1]
    reduced = plain @ basis
    identifiable = np.concatenate([basis @ (basis.T @ t) for t in truth])
    few = slice(0, d + 1)
    guess, *_ = np.linalg.lstsq(reduced[few], scores[few, 0], rcond=None)
    assert cosine(basis @ guess, identifiable[:d]) < 0.9
    system = np.hstack([scores[:, 1:2] * reduced, -scores[:, 0:1] * reduced])
    z = np.linalg.svd(system / np.linalg.norm(system, axis=1, keepdims=True))[2][-1]
    pair = np.concatenate([basis @ z[:d - 1], basis @ z[d - 1:]])
    assert cosine(pair, identifiable) > 0.999
