"""Local embeddings with face_recognition (dlib ResNet) on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.pipeline import recognize as R

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
LFW = DATA / "lfw" / "images"
pytestmark = pytest.mark.skipif(not LFW.is_dir(), reason=f"face data absent at {DATA}")


def _img(name, i):
    return LFW / name / f"{name}_{i:04d}.jpg"


def test_same_person_close_different_far():
    # pairsDevTrain.txt: "Aaron_Peirsol 1 2" (same), "Aaron_Sorkin 2 Frank_Solich 5" (different)
    a1 = R.primary_face_embedding(_img("Aaron_Peirsol", 1))
    a2 = R.primary_face_embedding(_img("Aaron_Peirsol", 2))
    b = R.primary_face_embedding(_img("Aaron_Sorkin", 2))
    c = R.primary_face_embedding(_img("Frank_Solich", 5))
    for e in (a1, a2, b, c):
        assert e.shape == (128,) and np.all(np.isfinite(e))
        assert 1.0 < np.linalg.norm(e) < 2.0
    assert np.linalg.norm(a1 - a2) < 0.6
    assert np.linalg.norm(b - c) > 0.6
    assert np.linalg.norm(a1 - b) > 0.6


def test_face_embeddings_with_boxes_and_group_photo():
    path = DATA / "photos" / "group_face_recognition_examples" / "obama_and_biden.jpg"
    if not path.is_file():
        pytest.skip(f"{path} absent")
    rgb = R.load_rgb(path)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    boxes = R.detect_faces(rgb)
    assert len(boxes) >= 2
    emb = R.face_embeddings(rgb, boxes)
    assert emb.shape == (len(boxes), 128)
    assert R.face_embeddings(rgb, []).shape == (0, 128)
    with pytest.raises(R.MultipleFacesError):
        R.single_face_embedding(path)


def test_no_face_raises():
    dogs = DATA / "photos" / "dlib_examples_group" / "dogs.jpg"
    if not dogs.is_file():
        pytest.skip(f"{dogs} absent")
    assert R.face_embeddings(R.load_rgb(dogs)).shape == (0, 128)
    with pytest.raises(R.NoFaceError):
        R.single_face_embedding(dogs)


def test_bad_inputs():
    with pytest.raises(ValueError):
        R.load_rgb(DATA / "does-not-exist.jpg")
    with pytest.raises(ValueError):
        R.face_embeddings(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError):
        R.face_embeddings(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        R.face_embeddings(np.zeros((50, 50, 3), dtype=np.uint8), [(40, 10, 10, 40)])
