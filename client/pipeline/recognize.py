"""Local face finding and embeddings on the phone (dlib ResNet via face_recognition, 128-d).

Boxes use face_recognition's convention: (top, right, bottom, left) in pixels of the
RGB image. Embeddings never leave the phone in the clear: they are CKKS-encrypted by
common.ckks before matching.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import cv2
import cv2.data
import numpy as np

from common.errors import MalformedInputError, NotFoundError

EMBEDDING_DIM = 128
DETECT_LONG_SIDE = 1280  # photos are scanned at most this large: phone photos are huge
CNN_LONG_SIDE = 640  # dlib's CNN detector is slow on the CPU: a smaller copy
MAX_IMAGE_PIXELS = 100_000_000  # refuse decompression bombs

Box = tuple[int, int, int, int]


class NoFaceError(MalformedInputError):
    """No face found where one was required."""


class MultipleFacesError(MalformedInputError):
    """Several faces found where exactly one was required."""


@dataclass(frozen=True)
class EnrollmentFace:
    """The face an enrollment photo contributes, and how it was chosen."""

    embedding: np.ndarray
    box: Box
    faces_found: int
    method: str  # which detector found it: "hog", "hog-upsampled", "cnn" or "haar"

    @property
    def note(self) -> str:
        """A short human explanation (empty when the photo held one face found at once)."""
        parts = []
        if self.faces_found > 1:
            parts.append(f"{self.faces_found} faces: used the largest")
        if self.method != "hog":
            parts.append(f"found by the {self.method} detector")
        return "; ".join(parts)


def _fr() -> ModuleType:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # face_recognition_models imports pkg_resources
        import face_recognition
    module: ModuleType = face_recognition  # untyped third-party package
    return module


def load_rgb(path: str | Path) -> np.ndarray:
    """Reads an image file as H x W x 3 uint8 RGB, turned upright by its EXIF orientation
    (phones store portraits sideways). NotFoundError / MalformedInputError otherwise."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"no such photo: {p}")
    from PIL import Image, ImageOps

    try:
        with Image.open(p) as im:
            if im.width * im.height > MAX_IMAGE_PIXELS:
                raise MalformedInputError(f"{p} is too large ({im.width}x{im.height} pixels)")
            upright = ImageOps.exif_transpose(im)
            return np.ascontiguousarray(np.asarray(upright.convert("RGB"), dtype=np.uint8))
    except MalformedInputError:
        raise
    except Exception as exc:  # PIL raises many types for broken files
        raise MalformedInputError(f"cannot read {p} as an image ({exc})") from exc


def _check_image(rgb: Any) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise MalformedInputError(f"expected an H x W x 3 RGB image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise MalformedInputError(f"expected uint8 pixels, got {arr.dtype}")
    return np.ascontiguousarray(arr)


def _check_boxes(boxes: Sequence[Box], shape: tuple[int, ...]) -> list[Box]:
    h, w = shape[:2]
    out = []
    for b in boxes:
        if len(b) != 4:
            raise MalformedInputError(f"box must be (top, right, bottom, left), got {b}")
        top, right, bottom, left = (int(v) for v in b)
        top, left = max(0, top), max(0, left)
        bottom, right = min(h, bottom), min(w, right)
        if bottom <= top or right <= left:
            raise MalformedInputError(f"empty or out-of-image box {tuple(b)} for image {w}x{h}")
        out.append((top, right, bottom, left))
    return out


def _shrunk(rgb: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    h, w = rgb.shape[:2]
    if max(h, w) <= long_side:
        return rgb, 1.0
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA), scale


def _scaled(boxes: Sequence[Box], scale: float, shape: tuple[int, ...]) -> list[Box]:
    def back(v: int) -> int:
        return round(v / scale)

    return _check_boxes([(back(t), back(r), back(b), back(lf)) for t, r, b, lf in boxes], shape)


def detect_faces(rgb: np.ndarray, upsample: int = 1) -> list[Box]:
    """dlib HOG detector boxes (used when no boxes come from the secure detector); large
    photos are scanned at DETECT_LONG_SIDE and the boxes mapped back."""
    img = _check_image(rgb)
    small, scale = _shrunk(img, DETECT_LONG_SIDE)
    boxes = _fr().face_locations(small, number_of_times_to_upsample=upsample)
    return _scaled(boxes, scale, img.shape)


def _haar_faces(rgb: np.ndarray) -> list[Box]:
    small, scale = _shrunk(rgb, DETECT_LONG_SIDE)
    gray = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_RGB2GRAY))
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_alt2.xml")
    found = cascade.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=4, minSize=(24, 24))
    return _scaled([(y, x + w, y + h, x) for x, y, w, h in found], scale, rgb.shape)


def find_faces_thoroughly(rgb: np.ndarray) -> tuple[list[Box], str]:
    """Boxes for a photo that should show a face, trying harder before giving up: HOG,
    HOG on an upsampled copy (small faces), dlib's CNN (turned or partly hidden faces),
    then OpenCV's Haar cascade. Returns the boxes and which detector found them."""
    img = _check_image(rgb)
    if boxes := detect_faces(img, upsample=1):
        return boxes, "hog"
    if boxes := detect_faces(img, upsample=2):
        return boxes, "hog-upsampled"
    small, scale = _shrunk(img, CNN_LONG_SIDE)
    cnn = _fr().face_locations(small, number_of_times_to_upsample=1, model="cnn")
    if cnn:
        return _scaled(cnn, scale, img.shape), "cnn"
    return _haar_faces(img), "haar"


def _area(box: Box) -> int:
    top, right, bottom, left = box
    return (bottom - top) * (right - left)


def largest(boxes: Sequence[Box]) -> Box:
    """The biggest box (the subject of a portrait; bystanders are smaller)."""
    return max(boxes, key=_area)


def face_embeddings(rgb_image: np.ndarray, boxes: Sequence[Box] | None = None,
                    num_jitters: int = 1) -> np.ndarray:
    """128-d embeddings, one row per face box (n x 128, float64).

    ``boxes`` None runs dlib's HOG detector first. An empty box list gives a (0, 128) array.
    """
    img = _check_image(rgb_image)
    boxes = detect_faces(img) if boxes is None else _check_boxes(boxes, img.shape)
    if not boxes:
        return np.zeros((0, EMBEDDING_DIM))
    enc = _fr().face_encodings(img, known_face_locations=list(boxes), num_jitters=num_jitters)
    out = np.asarray(enc, dtype=np.float64).reshape(len(enc), EMBEDDING_DIM)
    if out.shape[0] != len(boxes):
        raise MalformedInputError(f"got {out.shape[0]} embeddings for {len(boxes)} boxes")
    return out


def enrollment_face(rgb: np.ndarray) -> EnrollmentFace:
    """The face an enrollment photo shows: the largest one found, trying several detectors
    before giving up (NoFaceError)."""
    img = _check_image(rgb)
    boxes, method = find_faces_thoroughly(img)
    if not boxes:
        raise NoFaceError("no face found (tried HOG, upsampled HOG, CNN and Haar detectors)")
    box = largest(boxes)
    return EnrollmentFace(face_embeddings(img, [box])[0], box, len(boxes), method)


def single_face_embedding(path: str | Path) -> np.ndarray:
    """The embedding of the one face in an image file.

    Raises NoFaceError / MultipleFacesError (both ValueError) otherwise.
    """
    img = load_rgb(path)
    boxes = detect_faces(img) or detect_faces(img, upsample=2)
    if not boxes:
        raise NoFaceError(f"no face found in {path}")
    if len(boxes) > 1:
        raise MultipleFacesError(f"{len(boxes)} faces found in {path}; exactly one is required")
    embedding: np.ndarray = face_embeddings(img, boxes)[0]
    return embedding


def primary_face_embedding(path_or_rgb: str | Path | np.ndarray) -> np.ndarray:
    """The embedding of the largest face (ties: nearest the centre); NoFaceError if none.

    For portrait-style photos with bystanders in the background (e.g. LFW).
    """
    img = _check_image(path_or_rgb) if isinstance(path_or_rgb, np.ndarray) else \
        load_rgb(path_or_rgb)
    boxes = detect_faces(img) or detect_faces(img, upsample=2)
    if not boxes:
        raise NoFaceError("no face found")
    h, w = img.shape[:2]

    def key(b: Box) -> tuple[int, float]:
        top, right, bottom, left = b
        cy, cx = (top + bottom) / 2 - h / 2, (left + right) / 2 - w / 2
        return (-_area(b), cy * cy + cx * cx)

    embedding: np.ndarray = face_embeddings(img, [min(boxes, key=key)])[0]
    return embedding
