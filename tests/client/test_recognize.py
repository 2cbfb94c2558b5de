"""Local embeddings with face_recognition (dlib ResNet) on real photos."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.pipeline import recognize as R
from common.errors import NotFoundError

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
    with pytest.raises(NotFoundError, match="no such photo"):
        R.load_rgb(DATA / "does-not-exist.jpg")
    with pytest.raises(ValueError):
        R.face_embeddings(np.zeros((10, 10), dtype=np.uint8))
    with pytest.raises(ValueError):
        R.face_embeddings(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        R.face_embeddings(np.zeros((50, 50, 3), dtype=np.uint8), [(40, 10, 10, 40)])


def test_load_rgb_turns_photos_upright_by_exif(tmp_path: Path):
    from PIL import Image
    upright = DATA / "photos" / "people" / "obama" / "obama.jpg"
    if not upright.is_file():
        pytest.skip(f"{upright} absent")
    with Image.open(upright) as im:
        sideways = im.convert("RGB").rotate(90, expand=True)  # as a phone stores a portrait
        exif = Image.Exif()
        exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to view
        sideways.save(tmp_path / "sideways.jpg", exif=exif.tobytes(), quality=95)
        width, height = im.size
    rgb = R.load_rgb(tmp_path / "sideways.jpg")
    assert rgb.shape[:2] == (height, width)
    assert len(R.detect_faces(rgb)) == 1


def test_enrollment_face_uses_the_largest_and_says_so():
    group = DATA / "photos" / "group_face_recognition_examples" / "obama_and_biden.jpg"
    if not group.is_file():
        pytest.skip(f"{group} absent")
    rgb = R.load_rgb(group)
    face = R.enrollment_face(rgb)
    boxes = R.detect_faces(rgb)
    assert face.faces_found == len(boxes) >= 2
    assert face.box == max(boxes, key=lambda b: (b[2] - b[0]) * (b[1] - b[3]))
    assert "used the largest" in face.note and face.embedding.shape == (128,)
    with pytest.raises(R.NoFaceError):
        R.enrollment_face(np.full((120, 160, 3), 128, np.uint8))
