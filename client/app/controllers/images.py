"""Pictures the screens show, made without Kivy: a face crop with its box drawn."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from client.pipeline import recognize
from common.errors import MalformedInputError

PREVIEW_SIDE = 200  # pixels of a face preview's longer side
MARGIN = 0.4  # context kept around a face box, as a fraction of its size


def face_preview(rgb: np.ndarray, box: recognize.Box, side: int = PREVIEW_SIDE) -> bytes:
    """A JPEG of the face at ``box`` (top, right, bottom, left) with some context and the
    box drawn in green, scaled to ``side`` pixels."""
    top, right, bottom, left = box
    h, w = rgb.shape[:2]
    mx, my = int((right - left) * MARGIN), int((bottom - top) * MARGIN)
    y0, y1 = max(0, top - my), min(h, bottom + my)
    x0, x1 = max(0, left - mx), min(w, right + mx)
    crop = cv2.cvtColor(rgb[y0:y1, x0:x1], cv2.COLOR_RGB2BGR)
    scale = side / max(crop.shape[:2])
    crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)),
                             max(1, round(crop.shape[0] * scale))),
                      interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    cv2.rectangle(crop, (round((left - x0) * scale), round((top - y0) * scale)),
                  (round((right - x0) * scale), round((bottom - y0) * scale)),
                  (60, 200, 60), max(2, side // 100))
    ok, jpeg = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 85])
    if not ok:
        raise MalformedInputError("could not encode a face preview")
    return jpeg.tobytes()


def photo_preview(path: str | Path, side: int = PREVIEW_SIDE) -> bytes:
    """A JPEG preview of a photo file, upright (EXIF), ``side`` pixels on its longer side."""
    rgb = recognize.load_rgb(path)
    scale = min(1.0, side / max(rgb.shape[:2]))
    small = cv2.resize(rgb, (max(1, round(rgb.shape[1] * scale)),
                             max(1, round(rgb.shape[0] * scale))), interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    if not ok:
        raise MalformedInputError(f"could not encode a preview of {path}")
    return jpeg.tobytes()
