"""The phone-side scan reproduces OpenCV's detectMultiScale exactly (boxes and candidates)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from client.pipeline.windows import (
    ScanParams,
    apply_skip_rule,
    detect_plain,
    group_boxes,
    positions_to_skip,
    pyramid_levels,
    scan_plain,
    scan_windows,
)
from common.cascade import (
    Cascade,
    default_cascade_path,
    load_cascade,
    opencv_weak_decisions,
    rejection_stages,
    weak_decisions,
)

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
MAX_WIDTH = 480  # keeps the parity test fast; both sides see the same image


def _data_dir() -> Path:
    if not (DATA / "photos").is_dir():
        pytest.skip(f"../shared/data is absent: {DATA} not found, real photos are needed")
    return DATA


def _parity_photos() -> list[Path]:
    data = _data_dir()
    photos = data / "photos"
    files = sorted((photos / "dlib_examples_group").glob("*.jpg"))
    files += sorted(photos.glob("group_*/*.jpg"))
    for person in sorted(p for p in (photos / "people").iterdir() if p.is_dir()):
        files += sorted(person.glob("*.jp*g"))[:1]  # one photo per person
    for name in ("George_W_Bush", "Serena_Williams", "Colin_Powell", "Laura_Bush",
                 "Hugo_Chavez", "Junichiro_Koizumi", "Vladimir_Putin", "Tony_Blair"):
        files += sorted((data / "lfw" / "images" / name).glob("*.jpg"))[:1]
    return files


def _gray(path: Path, max_width: int = MAX_WIDTH) -> np.ndarray:
    img = cv2.imread(str(path))
    assert img is not None, path
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if gray.shape[1] > max_width:
        h = round(gray.shape[0] * max_width / gray.shape[1])
        gray = cv2.resize(gray, (max_width, h), interpolation=cv2.INTER_AREA)
    return gray


def _as_set(rects) -> set[tuple[int, int, int, int]]:
    return {(int(x), int(y), int(w), int(h)) for x, y, w, h in np.asarray(rects).reshape(-1, 4)}


@pytest.fixture(scope="module")
def cascade() -> Cascade:
    return load_cascade()


@pytest.fixture(scope="module")
def opencv() -> cv2.CascadeClassifier:
    cc = cv2.CascadeClassifier(default_cascade_path())
    assert not cc.empty()
    return cc


# ----------------------------------------------------------------------------- unit level


def test_skip_rule() -> None:
    rej = np.array([[True, True, True, False, True, False],
                    [False, False, True, True, False, True]])
    visited = apply_skip_rule(rej)
    # Row 0: 0 visited+rejected -> 1 skipped; 2 visited+rejected -> 3 skipped; 4 visited
    # and rejected -> 5 skipped. Row 1: 2 rejected -> 3 skipped; 4 not rejected -> 5 visited.
    assert visited.tolist() == [[True, False, True, False, True, False],
                                [True, True, True, False, True, True]]
    assert np.array_equal(positions_to_skip(rej), ~visited)


def test_pyramid_levels_follow_opencv_rules(cascade: Cascade) -> None:
    levels = pyramid_levels((500, 375), cascade, ScanParams())
    assert levels[0].scale == np.float32(1.0) and levels[0].size == (500, 375)
    assert levels[0].step == 2 and levels[0].xs[-1] <= 500 - 20
    assert all(lv.window[0] <= 375 for lv in levels)
    first_step1 = next(lv for lv in levels if lv.step == 1)
    assert first_step1.scale >= 2 and all(lv.scale < 2 for lv in levels if lv.step == 2)
    # minSize drops the small scales, maxSize stops the loop.
    sized = pyramid_levels((500, 375), cascade, ScanParams(min_size=(40, 40), max_size=(100, 100)))
    assert sized[0].window[0] >= 40 and sized[-1].window[0] <= 100


def test_batches_are_bounded_whole_rows(cascade: Cascade) -> None:
    gray = np.random.default_rng(0).integers(0, 256, size=(300, 400), dtype=np.uint8)
    total = 0
    for b in scan_windows(gray, cascade, ScanParams(), batch_windows=2000):
        assert b.n == b.n_rows * b.n_cols
        assert b.n <= max(2000, b.n_cols)
        assert b.pixels.dtype == np.uint8 and b.pixels.shape == (b.n, 400)
        assert np.all(b.norm_factors > 0)
        total += b.n
    assert total == sum(lv.n_positions for lv in pyramid_levels((400, 300), cascade, ScanParams()))


def test_flat_image_is_all_low_contrast(cascade: Cascade) -> None:
    gray = np.full((60, 80), 128, dtype=np.uint8)
    outcome = scan_plain(gray, cascade, ScanParams(min_neighbors=0))
    assert outcome.low_contrast == outcome.positions > 0
    assert outcome.skipped == 0 and len(outcome.candidates) == 0


def test_group_boxes_clips_to_image() -> None:
    rects = np.array([[90, 10, 20, 20], [200, 200, 10, 10]])
    assert group_boxes(rects, 0, (100, 100)).tolist() == [[90, 10, 10, 20]]


# ------------------------------------------------------------------- parity with OpenCV


def test_real_windows_linear_form_matches_float32(cascade: Cascade) -> None:
    """Face-like windows of a real photo: all 2135 decisions equal OpenCV's float32."""
    gray = _gray(_data_dir() / "photos" / "dlib_examples_group" / "2008_002470.jpg")
    checked = 0
    for b in scan_windows(gray, cascade, ScanParams(scale_factor=1.25)):
        ok = np.flatnonzero(~b.low_contrast)
        deep = ok[rejection_stages(cascade, b.pixels[ok], b.norm_factors[ok], 0, 3) >= 3][:300]
        if deep.size == 0:
            continue
        px, nf, v = b.pixels[deep], b.norm_factors[deep], b.inv_norm_factors[deep]
        ours = weak_decisions(cascade, px, nf, slice(None))
        ref = opencv_weak_decisions(cascade, px, v, slice(None))
        assert np.array_equal(ours, ref)
        checked += deep.size
        if checked >= 1500:
            break
    assert checked > 100


def test_raw_candidates_match_opencv(cascade: Cascade, opencv: cv2.CascadeClassifier) -> None:
    """minNeighbors=0: every candidate window (pyramid, skip rule, rounding) is identical."""
    photos = _data_dir() / "photos"
    for path in [photos / "dlib_examples_group" / "2008_007676.jpg",
                 photos / "people" / "clapton" / "clapton-2.jpg",
                 photos / "group_face_recognition_examples" / "obama_and_biden.jpg"]:
        gray = _gray(path)
        outcome = scan_plain(gray, cascade, ScanParams(min_neighbors=0))
        ours = _as_set(group_boxes(outcome.candidates, 0, (gray.shape[1], gray.shape[0])))
        ref = _as_set(opencv.detectMultiScale(gray, 1.1, 0))
        assert ours == ref, path.name
        assert len(ref) > 0


@pytest.mark.parametrize(
    "params",
    [ScanParams(scale_factor=1.2, min_neighbors=2, min_size=(30, 30)),
     ScanParams(scale_factor=1.05, min_neighbors=4, min_size=(24, 24), max_size=(120, 120)),
     ScanParams(scale_factor=2.5, min_neighbors=1)],
)
def test_parameters_match_opencv(
    cascade: Cascade, opencv: cv2.CascadeClassifier, params: ScanParams
) -> None:
    gray = _gray(_data_dir() / "photos" / "dlib_examples_group" / "2008_004176.jpg", 320)
    ref = opencv.detectMultiScale(gray, params.scale_factor, params.min_neighbors,
                                  minSize=params.min_size, maxSize=params.max_size or (0, 0))
    assert set(detect_plain(gray, cascade, params)) == _as_set(ref)


def test_detect_plain_matches_detect_multiscale(
    cascade: Cascade, opencv: cv2.CascadeClassifier
) -> None:
    """The acceptance test: same boxes as detectMultiScale on 30+ real photos."""
    files = _parity_photos()
    assert len(files) >= 30, f"only {len(files)} photos found under {DATA}"
    mismatches = []
    n_boxes = 0
    for path in files:
        gray = _gray(path)
        ref = _as_set(opencv.detectMultiScale(gray, 1.1, 3))
        ours = detect_plain(gray, cascade, ScanParams(scale_factor=1.1, min_neighbors=3))
        assert ours == sorted(ours)
        n_boxes += len(ref)
        if set(ours) != ref:
            mismatches.append((path.name, sorted(ref), ours))
    assert not mismatches, mismatches
    assert n_boxes >= 30  # the photos do contain faces
