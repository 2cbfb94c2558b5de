"""Known-plaintext limits of ASPE, shown rather than hidden (docs/crypto.md discusses them).

The server holds the stored ciphertexts (classifiers) and, for each window it evaluates,
can compute every score. If it also knows some windows in the clear (say, a public photo
it saw uploaded), it can attack the classifiers.
"""

from __future__ import annotations

import numpy as np

from common import aspe

D = 16  # a small window keeps the linear algebra fast; the attack scales with D


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(abs(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _plain_aspe_scores(rng, y, windows):
    """The paper's ASPE: no per-window scale, no noise dims: the server sees y . w."""
    key = aspe.generate_key(D, noise_dim=0, rng=rng)
    stored = aspe.encrypt_stored(key, y, rng)
    queries = aspe.encrypt_query(key, windows, rng, scale_range=(1.0, 1.0))
    return aspe.evaluate(stored, queries)  # (windows, classifiers)


def test_plain_aspe_leaks_a_classifier_from_d_known_windows() -> None:
    rng = np.random.default_rng(1)
    y = rng.standard_normal((3, D))
    windows = rng.standard_normal((D + 1, D))
    scores = _plain_aspe_scores(rng, y, windows)
    recovered, *_ = np.linalg.lstsq(windows, scores[:, 0], rcond=None)
    assert np.allclose(recovered, y[0], atol=1e-8)  # exact recovery: the documented limit


def test_per_window_scale_defeats_the_single_classifier_attack() -> None:
    rng = np.random.default_rng(2)
    key = aspe.generate_key(D, rng=rng)
    y = rng.standard_normal((3, D))
    windows = rng.standard_normal((D + 1, D))
    scores = aspe.evaluate(aspe.encrypt_stored(key, y, rng), aspe.encrypt_query(key, windows, rng))
    recovered, *_ = np.linalg.lstsq(windows, scores[:, 0], rcond=None)
    # Each equation carries its own unknown c_j > 0: least squares finds no classifier.
    assert _cosine(recovered, y[0]) < 0.9
    # Signs still leak: a sign-weighted mean of the windows points towards y.
    many = rng.standard_normal((4000, D))
    signs = np.sign(aspe.evaluate(aspe.encrypt_stored(key, y, rng),
                                  aspe.encrypt_query(key, many, rng))[:, 0])
    assert _cosine(signs @ many, y[0]) > 0.9  # with thousands of known windows


def test_ratios_across_classifiers_cancel_the_scale_and_leak_them_up_to_one_factor() -> None:
    """The per-window scale c_j is the same for every classifier evaluated on window j, so
    s_ij / s_kj = (y_i . w_j) / (y_k . w_j): with 2D known windows the server recovers the
    pair (y_i, y_k) up to a single common factor. Hardening does not stop this; score
    noise (MRSE-style, opt-in) would, at a cost in exactness."""
    rng = np.random.default_rng(3)
    key = aspe.generate_key(D, rng=rng)
    y = rng.standard_normal((2, D))
    windows = rng.standard_normal((2 * D, D))
    s = aspe.evaluate(aspe.encrypt_stored(key, y, rng), aspe.encrypt_query(key, windows, rng))
    # s_1j (y_0 . w_j) - s_0j (y_1 . w_j) = 0 for all j: a homogeneous system in (y_0, y_1).
    system = np.hstack([s[:, 1:2] * windows, -s[:, 0:1] * windows])
    _, _, vt = np.linalg.svd(system)
    z = vt[-1]
    assert _cosine(np.concatenate(y), z) > 0.999999
