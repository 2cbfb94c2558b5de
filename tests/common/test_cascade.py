"""Cascade parsing and the linear-functional form of the weak classifiers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.cascade import (
    Cascade,
    CascadeError,
    evaluate_windows,
    load_cascade,
    opencv_weak_decisions,
    rejection_stages,
    stage_scores,
    weak_decisions,
)


@pytest.fixture(scope="module")
def cascade() -> Cascade:
    return load_cascade()


def test_frontalface_alt_counts(cascade: Cascade) -> None:
    assert cascade.name == "haarcascade_frontalface_alt"
    assert cascade.window_size == (20, 20)
    assert cascade.n_stages == 22
    assert cascade.n_weak == 2135
    assert cascade.weights.shape == (2135, 400)
    assert cascade.stage_ends[-1] == 2135
    sizes = np.diff(np.concatenate(([0], cascade.stage_ends)))
    assert sizes[0] == 3 and sizes.max() == 213
    for arr in (cascade.thresholds, cascade.left_values, cascade.right_values):
        assert arr.shape == (2135,)
    assert cascade.stage_thresholds.shape == (22,)
    assert cascade.weights_f32 is not None  # integer weights: float32 products are exact


def test_first_feature_weights(cascade: Cascade) -> None:
    # Feature 0 of frontalface_alt: rects (3,7,14,4) weight -1 and (3,9,14,2) weight 2.
    w = cascade.weights[0].reshape(20, 20)
    expected = np.zeros((20, 20))
    expected[7:11, 3:17] -= 1
    expected[9:11, 3:17] += 2
    np.testing.assert_array_equal(w, expected)
    assert cascade.raw_thresholds[0] == float(np.float32(4.0141958743333817e-03))
    assert cascade.left_values[0] == float(np.float32(3.3794190734624863e-02))
    assert cascade.stage_thresholds[0] == float(
        np.float32(np.float32(8.2268941402435303e-01) - np.float32(1e-5))
    )


def test_arrays_are_read_only(cascade: Cascade) -> None:
    with pytest.raises(ValueError):
        cascade.weights[0, 0] = 1.0


def test_threshold_boundary_reproduces_float32_rounding(cascade: Cascade) -> None:
    """float32(z) < t  <=>  z < theta for float64 z right around every threshold."""
    rng = np.random.default_rng(1)
    t32 = cascade.raw_thresholds.astype(np.float32)
    theta = cascade.thresholds
    for k in (-3, -2, -1, 0, 1, 2, 3):
        # Points near the midpoint between t and its float32 predecessor.
        p = np.nextafter(t32, np.float32(-np.inf))
        mid = (p.astype(np.float64) + t32.astype(np.float64)) / 2
        z = mid + k * np.spacing(mid)
        assert np.array_equal(z.astype(np.float32) < t32, z < theta)
    z = t32.astype(np.float64) * (1 + rng.normal(0, 1e-7, size=(50, t32.size)))
    assert np.array_equal(z.astype(np.float32) < t32, z < theta)


def _window_images(n: int, seed: int) -> np.ndarray:
    """Random windows with face-like structure: smooth gradients, blobs and noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:20, 0:20]
    out = np.empty((n, 400), dtype=np.uint8)
    for i in range(n):
        gy, gx = rng.uniform(-4, 4, size=2)
        base = rng.uniform(40, 200) + gy * (yy - 10) + gx * (xx - 10)
        for _ in range(3):  # dark blobs (eyes, mouth)
            cy, cx, r = rng.uniform(3, 17), rng.uniform(3, 17), rng.uniform(1, 4)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            base = base - rng.uniform(0, 90) * blob
        img = base + rng.normal(0, rng.uniform(1, 25), size=(20, 20))
        out[i] = np.clip(np.rint(img), 0, 255).astype(np.uint8).ravel()
    return out


def _opencv_like_norm(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """v = float32(1/nf) over the inner 18x18 rect, and nf = 1/v (as windows.py)."""
    inner = pixels.reshape(-1, 20, 20)[:, 1:19, 1:19].astype(np.int64)
    s = inner.sum(axis=(1, 2)).astype(np.float64)
    sq = (inner * inner).sum(axis=(1, 2)).astype(np.float64)
    nf = 324.0 * sq - s * s
    v = np.where(nf > 0, (1.0 / np.sqrt(np.maximum(nf, 1.0))).astype(np.float32), np.float32(1))
    return 1.0 / v.astype(np.float64), v.astype(np.float32)


def _direct_decisions(cascade: Cascade, pixels: np.ndarray, v: np.ndarray) -> np.ndarray:
    """OpenCV's HaarEvaluator, re-derived from rect sums of an integral image."""
    n = pixels.shape[0]
    imgs = pixels.reshape(n, 20, 20).astype(np.int64)
    ii = np.zeros((n, 21, 21), dtype=np.int64)
    ii[:, 1:, 1:] = imgs.cumsum(1).cumsum(2)
    out = np.empty((n, cascade.n_weak), dtype=bool)
    for i, rects in enumerate(cascade.feature_rects):
        val = np.zeros(n, dtype=np.float32)
        for x, y, w, h, wt in rects:
            rs = ii[:, y + h, x + w] - ii[:, y, x + w] - ii[:, y + h, x] + ii[:, y, x]
            val = val + np.float32(wt) * rs.astype(np.float32)
        value = val * v  # float32 product, as HaarEvaluator::operator()
        out[:, i] = value < np.float32(cascade.raw_thresholds[i])
    return out


def test_weak_decisions_match_direct_rect_sums(cascade: Cascade) -> None:
    pixels = _window_images(300, seed=7)
    nf, v = _opencv_like_norm(pixels)
    direct = _direct_decisions(cascade, pixels, v)
    linear = weak_decisions(cascade, pixels, nf, slice(None))
    assert np.array_equal(linear, direct)
    assert np.array_equal(opencv_weak_decisions(cascade, pixels, v, slice(None)), direct)
    # Float input takes the float64 path and must agree with the float32 one.
    assert np.array_equal(
        weak_decisions(cascade, pixels.astype(np.float64), nf, slice(None)), direct
    )


def test_stage_outcomes_match_sequential_reference(cascade: Cascade) -> None:
    pixels = _window_images(300, seed=11)
    nf, v = _opencv_like_norm(pixels)
    direct = _direct_decisions(cascade, pixels, v)
    leaves = np.where(direct, cascade.left_values, cascade.right_values)
    expected = np.full(len(pixels), cascade.n_stages)
    for k in range(len(pixels)):
        for s in range(cascade.n_stages):
            total = 0.0
            for j in range(*cascade.stage_slice(s).indices(cascade.n_weak)):
                total += leaves[k, j]  # double accumulation in classifier order
            if total < cascade.stage_thresholds[s]:
                expected[k] = s
                break
    got = rejection_stages(cascade, pixels, nf)
    assert np.array_equal(got, expected)
    assert np.array_equal(evaluate_windows(cascade, pixels, nf), expected == cascade.n_stages)
    # stage_scores on every window, not only the alive ones, is consistent too.
    s1 = stage_scores(cascade, 1, pixels, nf)
    ref1 = np.array([sum(leaves[k, j] for j in range(3, 19)) for k in range(len(pixels))])
    np.testing.assert_array_equal(s1, ref1)


# ------------------------------------------------------------------ refusal of bad cascades

_HEADER = '<?xml version="1.0"?>\n<opencv_storage>\n'


def _cascade_xml(
    *,
    feature_type: str = "HAAR",
    internal_nodes: str = "0 -1 0 1.0e-03",
    leaf_values: str = "1.0e-01 9.0e-01",
    tilted: int = 0,
    max_cat: int = 0,
) -> str:
    return (
        _HEADER
        + '<cascade type_id="opencv-cascade-classifier"><stageType>BOOST</stageType>\n'
        f"<featureType>{feature_type}</featureType><height>20</height><width>20</width>\n"
        "<stageParams><maxWeakCount>1</maxWeakCount></stageParams>\n"
        f"<featureParams><maxCatCount>{max_cat}</maxCatCount></featureParams>\n"
        "<stageNum>1</stageNum><stages><_><maxWeakCount>1</maxWeakCount>\n"
        "<stageThreshold>5.0e-01</stageThreshold><weakClassifiers><_>\n"
        f"<internalNodes>{internal_nodes}</internalNodes>\n"
        f"<leafValues>{leaf_values}</leafValues></_></weakClassifiers></_></stages>\n"
        "<features><_><rects><_>3 7 14 4 -1.</_><_>3 9 14 2 2.</_></rects>"
        f"<tilted>{tilted}</tilted></_></features></cascade>\n</opencv_storage>\n"
    )


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.xml"
    path.write_text(text)
    return path


def test_minimal_cascade_loads(tmp_path: Path) -> None:
    c = load_cascade(_write(tmp_path, _cascade_xml()))
    assert (c.n_stages, c.n_weak, c.window_size) == (1, 1, (20, 20))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(tilted=1), "tilted"),
        (dict(internal_nodes="1 2 0 1.0e-03 0 -1 0 2.0e-03 0 -2 0 3.0e-03",
              leaf_values="0.1 0.2 0.3 0.4"), "stump"),
        (dict(feature_type="LBP"), "LBP"),
        (dict(feature_type="HOG"), "HOG"),
        (dict(max_cat=256), "categorical"),
    ],
)
def test_unsupported_cascades_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(CascadeError, match=message):
        load_cascade(_write(tmp_path, _cascade_xml(**kwargs)))


def test_old_format_and_garbage_are_refused(tmp_path: Path) -> None:
    old = _HEADER + '<haarcascade_x type_id="opencv-haar-classifier"><size>20 20</size>' \
        "</haarcascade_x></opencv_storage>\n"
    with pytest.raises(CascadeError, match="new cascade format"):
        load_cascade(_write(tmp_path, old))
    with pytest.raises(CascadeError, match="cannot read"):
        load_cascade(_write(tmp_path, "not xml at all <"))
    with pytest.raises(CascadeError, match="cannot read"):
        load_cascade(tmp_path / "missing.xml")
    assert issubclass(CascadeError, ValueError)
