"""Which faces each secure detection mode finds, by face size, and what it costs.

Phones take big photos; secure detection scans a 640-px working copy, so what decides
whether a face is found is its size relative to the photo's long side. Photos: the dlib
group photos that have hand-drawn labels (9 of the 11; 43 faces of 7.4-22% of the long
side). Each is turned into a phone-sized photo of the same scene seen from further away:
padded around
by reflection to ``k`` times its size (faces then 7.4/k % and up of the long side), then
scaled up 4x (about 2000 px). ``as is``: the original ~500-px photos, not enlarged.

Per mode (``default``, ``small-faces``) and scene distance: labelled faces found by
``detectMultiScale`` at the mode's parameters on the mode's working image, which equals
secure detection's boxes (tests/client/test_secure_detection.py; checked again here on
the real server for every photo at k = 1). The mirrored copies the padding makes are real
faces that no label names, so only recall is counted, never false detections. Cost:
scan positions, and bytes and seconds measured end to end through a real server in this
process (TLS), k = 1.

Usage::

    python bench/face_size_bench.py --json bench/results/face_size.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import functools
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import detect_bench  # noqa: E402
from bench.common import print_table, start_local_server, write_json  # noqa: E402
from bench.detect_bench import DATA, load_labels, log, recall  # noqa: E402
from client import vendor  # noqa: E402
from client.pipeline.detect import (  # noqa: E402
    DEFAULT,
    SMALL_FACES,
    DetectionMode,
    SecureDetector,
    working_image,
)
from client.pipeline.family import create_family  # noqa: E402
from client.pipeline.windows import pyramid_levels  # noqa: E402
from client.rpc import PrivfaceClient  # noqa: E402
from common import secure_cascade as sc  # noqa: E402
from common.cascade import Cascade, default_cascade_path, load_cascade  # noqa: E402

MODES = (DEFAULT, SMALL_FACES)
DISTANCES = (1.0, 1.5, 2.0, 2.5)  # padding factor k: the scene seen k times further away
UPSCALE = 4


def phone_photo(gray: np.ndarray, k: float) -> tuple[np.ndarray, float, float]:
    """The scene padded to k times its size and scaled up; (photo, x offset, y offset) of
    the original inside it, in original pixels."""
    h, w = gray.shape
    ph, pw = round(h * k), round(w * k)
    top, left = (ph - h) // 2, (pw - w) // 2
    padded = cv2.copyMakeBorder(gray, top, ph - h - top, left, pw - w - left,
                                cv2.BORDER_REFLECT)
    return (cv2.resize(padded, None, fx=UPSCALE, fy=UPSCALE, interpolation=cv2.INTER_CUBIC),
            left, top)


def read_gray(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise SystemExit(f"cannot read {path}")
    return image


def opencv_boxes(classifier: cv2.CascadeClassifier, gray: np.ndarray, mode: DetectionMode
                 ) -> list[tuple[int, ...]]:
    """detectMultiScale at the mode's parameters on its working image, in photo pixels (as
    SecureDetector maps its boxes back)."""
    work, scale = working_image(gray, mode.working_long_side)
    return sorted(tuple(round(v / scale) for v in b)
                  for b in detect_bench.opencv_boxes(classifier, work, mode))


@functools.cache
def _cascade() -> Cascade:
    return load_cascade()


def positions(gray: np.ndarray, mode: DetectionMode) -> int:
    work, _ = working_image(gray, mode.working_long_side)
    return sum(level.n_positions for level in
               pyramid_levels((work.shape[1], work.shape[0]), _cascade(), mode.params))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--no-secure", action="store_true",
                    help="skip the end-to-end runs through the server (recall only)")
    args = ap.parse_args(argv)
    folder = DATA / "photos" / "dlib_examples_group"
    labels = {n: b for n, b in load_labels().items() if (folder / n).exists()}
    if not labels:
        log(f"the labelled dlib photos are absent ({folder}): real photos are needed")
        return 2
    cv2.setNumThreads(1)
    classifier = cv2.CascadeClassifier(default_cascade_path())
    photos = {n: read_gray(folder / n) for n in sorted(labels)}
    total = sum(len(b) for b in labels.values())
    sizes = [w / max(photos[n].shape) for n, boxes in labels.items() for _, _, w, _ in boxes]

    figures: dict[str, Any] = {"photos": len(photos), "labelled_faces": total,
                               "face_share_of_long_side_min": min(sizes),
                               "face_share_of_long_side_median": statistics.median(sizes),
                               "upscale": UPSCALE, "recall": {}, "positions": {}}
    scenes: list[tuple[str, float | None]] = [("as is", None)] + [
        (f"k={k:g}: faces {100 * min(sizes) / k:.1f}%+", k) for k in DISTANCES]
    for mode in MODES:
        for title, k in scenes:
            found, pos = 0, []
            for name, image in photos.items():
                if k is None:
                    photo, left, top, scale = image, 0.0, 0.0, 1.0
                else:
                    photo, left, top = phone_photo(image, k)
                    scale = UPSCALE
                boxes = [(x / scale - left, y / scale - top, w / scale, h / scale)
                         for x, y, w, h in opencv_boxes(classifier, photo, mode)]
                found += recall(boxes, labels[name])[0]
                pos.append(positions(photo, mode))
            figures["recall"][f"{mode.name}|{title}"] = found / total
            figures["positions"][f"{mode.name}|{title}"] = statistics.median(pos)
            log(f"{mode.name:12s} {title:22s} {found}/{total} faces, "
                f"{statistics.median(pos):,.0f} positions")

    if not args.no_secure:
        figures["secure"] = secure_runs(photos, classifier)
    print_tables(figures, scenes)
    write_json(args.json, figures)
    return 0


def secure_runs(photos: dict[str, np.ndarray], classifier: cv2.CascadeClassifier
                ) -> dict[str, Any]:
    """Each mode end to end on every photo at k = 1: bytes, seconds, boxes vs OpenCV."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="face_size_bench_") as tmp:
        local = start_local_server(Path(tmp) / "server")
        try:
            with PrivfaceClient(local.address, config=local.client_config) as client:
                key = sc.generate_product_key("frontalface_alt", _cascade())
                vendor.publish(client, _cascade(), key, local.vendor_token)
                create_family(client)
                for mode in MODES:
                    detector = SecureDetector(client, key, mode)
                    rows = []
                    for name, image in photos.items():
                        photo, _, _ = phone_photo(image, 1.0)
                        report = detector.detect(photo)
                        rows.append({"bytes": report.bytes_uploaded,
                                     "seconds": report.total_ms / 1000,
                                     "windows": report.windows_sent,
                                     "equal": report.boxes == opencv_boxes(classifier, photo,
                                                                           mode)})
                        log(f"[secure {mode.name}] {name}: {report.bytes_uploaded / 1e6:.0f} MB "
                            f"{report.total_ms / 1000:.1f} s")
                    out[mode.name] = {
                        "bytes_median": statistics.median(r["bytes"] for r in rows),
                        "seconds_median": statistics.median(r["seconds"] for r in rows),
                        "windows_median": statistics.median(r["windows"] for r in rows),
                        "boxes_equal_opencv": sum(r["equal"] for r in rows),
                        "photos": len(rows)}
        finally:
            local.stop()
    return out


def print_tables(figures: dict[str, Any], scenes: list[tuple[str, float | None]]) -> None:
    total = figures["labelled_faces"]
    print(f"\nLabelled faces found ({total} faces in {figures['photos']} dlib group photos; "
          f"phone photos {UPSCALE}x, the scene k times further away)")
    print_table(["scene", *[m.name for m in MODES]],
                [[title, *[f"{round(figures['recall'][f'{m.name}|{title}'] * total)}/{total}"
                           for m in MODES]] for title, _ in scenes])
    print("\nScan positions per photo (median)")
    print_table(["scene", *[m.name for m in MODES]],
                [[title, *[int(figures["positions"][f"{m.name}|{title}"]) for m in MODES]]
                 for title, _ in scenes])
    if "secure" in figures:
        s = figures["secure"]
        print("\nEnd to end through the server, phone photos at k = 1 (medians)")
        print_table(["mode", "MB uploaded", "seconds", "windows sent", "boxes = OpenCV"],
                    [[m.name, s[m.name]["bytes_median"] / 1e6, s[m.name]["seconds_median"],
                      int(s[m.name]["windows_median"]),
                      f"{s[m.name]['boxes_equal_opencv']}/{s[m.name]['photos']}"]
                     for m in MODES])


if __name__ == "__main__":
    raise SystemExit(main())
