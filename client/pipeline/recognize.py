"""Local face embeddings on the phone (dlib ResNet via face_recognition, 128-d).

Boxes use face_recognition's convention: (top, right, bottom, left) in pixels of the
RGB image. Embeddings never leave the phone in the clear: they are CKKS-encrypted by
common.ckks before matching.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from common.errors import MalformedInputError

EMBEDDING_DIM = 128

Box = tuple[int, int, int, int]


class NoFaceError(MalformedInputError):
    """No face found where exactly one was required."""


class MultipleFacesError(MalformedInputError):
    """Several faces found where exactly one was required."""


def _fr():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # face_recognition_models imports pkg_resources
        import face_recognition
    return face_recognition


def load_rgb(path) -> np.ndarray:
    """Read an image file as an H x W x 3 uint8 RGB array (ValueError if unreadable)."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"no such image file: {p}")
    try:
        from PIL import Image

        with Image.open(p) as im:
            return np.ascontiguousarray(np.asarray(im.convert("RGB"), dtype=np.uint8))
    except Exception as exc:  # PIL raises many types for broken files
        raise ValueError(f"cannot read image {p}: {exc}") from exc


def _check_image(rgb) -> np.ndarray:
    arr = np.asarray(rgb)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {arr.dtype}")
    return np.ascontiguousarray(arr)


def _check_boxes(boxes: Sequence[Box], shape) -> list[Box]:
    h, w = shape[:2]
    out = []
    for b in boxes:
        if len(b) != 4:
            raise ValueError(f"box must be (top, right, bottom, left), got {b}")
        top, right, bottom, left = (int(v) for v in b)
        top, left = max(0, top), max(0, left)
        bottom, right = min(h, bottom), min(w, right)
        if bottom <= top or right <= left:
            raise ValueError(f"empty or out-of-image box {tuple(b)} for image {w}x{h}")
        out.append((top, right, bottom, left))
    return out


def detect_faces(rgb: np.ndarray, upsample: int = 1) -> list[Box]:
    """dlib HOG detector boxes (used when no boxes come from the secure detector)."""
    return list(_fr().face_locations(_check_image(rgb), number_of_times_to_upsample=upsample))


def face_embeddings(
    rgb_image: np.ndarray, boxes: Optional[Sequence[Box]] = None, num_jitters: int = 1
) -> np.ndarray:
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
        raise ValueError(f"got {out.shape[0]} embeddings for {len(boxes)} boxes")
    return out


def single_face_embedding(path) -> np.ndarray:
    """The embedding of the one face in an image file (e.g. an enrolment photo).

    Raises NoFaceError / MultipleFacesError (both ValueError) otherwise.
    """
    img = load_rgb(path)
    boxes = detect_faces(img)
    if not boxes:
        # small or tight crops: retry with more upsampling before giving up
        boxes = detect_faces(img, upsample=2)
    if not boxes:
        raise NoFaceError(f"no face found in {path}")
    if len(boxes) > 1:
        raise MultipleFacesError(f"{len(boxes)} faces found in {path}; exactly one is required")
    return face_embeddings(img, boxes)[0]


def primary_face_embedding(path_or_rgb) -> np.ndarray:
    """The embedding of the largest face (ties: nearest the centre); NoFaceError if none.

    For portrait-style photos with bystanders in the background (e.g. LFW).
    """
    img = load_rgb(path_or_rgb) if not isinstance(path_or_rgb, np.ndarray) else _check_image(
        path_or_rgb
    )
    boxes = detect_faces(img) or detect_faces(img, upsample=2)
    if not boxes:
        raise NoFaceError("no face found")
    h, w = img.shape[:2]

    def key(b):
        top, right, bottom, left = b
        cy, cx = (top + bottom) / 2 - h / 2, (left + right) / 2 - w / 2
        return (-(bottom - top) * (right - left), cy * cy + cx * cx)

    return face_embeddings(img, [min(boxes, key=key)])[0]
