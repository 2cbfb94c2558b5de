"""Secure face detection cost and parity: FAITHFUL vs DEFAULT vs plaintext OpenCV.

A real privface server on port 0 (in this process, temp data dir), the vendor's encrypted
``haarcascade_frontalface_alt`` published with the vendor token, one family. Photos: the
11 dlib group photos, the ``group_*`` photos and the ``people`` photos of
../shared/data, each resized (cv2.INTER_AREA) to 640x480 and to 1280x960 (960x1280 /
480x640 for portrait photos, so faces keep their shape).

Per photo size, one run of:

1. FAITHFUL (the seed paper at OpenCV's defaults: every position, float64, one round):
   end to end on the first ``--faithful-runs`` photos at 640x480 (``--faithful-runs-1280``
   at 1280x960); for every photo its upload is computed exactly from its pyramid (every
   position x ciphertext_dim x 8 bytes + the protobuf framing of each message, scan
   batches split as SecureDetector splits them), the formula checked against the
   measured runs.
2. DEFAULT (640-px working image, scale 1.25, faces >= 40 px, prefix round, float32).
3. Plaintext OpenCV ``detectMultiScale`` (one thread), at default parameters on the
   resized photo and at DEFAULT's parameters on DEFAULT's working image: time only, its
   boxes are the reference.

Parity: DEFAULT's boxes vs detectMultiScale at DEFAULT's parameters on the same working
image, every photo (matched / total / extra / missing; a difference is diagnosed by
comparing raw candidates, ``minNeighbors=0``). Recall of DEFAULT and FAITHFUL against the
hand-labelled boxes of the dlib photos (photos/dlib_examples_labels/{training,testing}.xml):
a detection matches a label when its centre lies in the label box and its width is
0.6..2.2x the label's. FAITHFUL's boxes are detectMultiScale's at default parameters (the
measured runs check they are identical).

The server runs in this process (its own threads): phone and server share the 2 cores.

Usage::

    python bench/detect_bench.py --json bench/results/detect.json [--limit N]
        [--faithful-runs 1] [--faithful-runs-1280 0]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import statistics
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import client.pipeline.detect as detect_mod  # noqa: E402
from bench.common import median_ms, print_table, start_local_server, write_json  # noqa: E402
from client import rpc as rpc_mod  # noqa: E402
from client import vendor  # noqa: E402
from client.pipeline.detect import DEFAULT, FAITHFUL, DetectionMode, SecureDetector, working_image  # noqa: E402
from client.pipeline.family import create_family  # noqa: E402
from client.pipeline.windows import (  # noqa: E402
    Detector,
    ScanParams,
    WindowBatch,
    pyramid_levels,
    scan_windows,
)
from client.rpc import PrivfaceClient  # noqa: E402
from common import secure_cascade as sc  # noqa: E402
from common.cascade import default_cascade_path, load_cascade  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
SIZES = {640: (640, 480), 1280: (1280, 960)}
DEFAULT_SCAN_BATCH = 16384  # scan_windows' default batch_windows, as SecureDetector uses it
SCAN_PARAMS = ScanParams()  # scan_windows' default


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- photos and labels -----------------------------------------------------------------


def photo_list() -> list[Path]:
    photos = DATA / "photos"
    group = sorted(p for p in (photos / "dlib_examples_group").glob("*.jpg")
                   if p.name != "dogs.jpg")
    pairs = sorted(photos.glob("group_*/*"))
    people = sorted(photos.glob("people/*/*"))
    return [p for p in group + pairs + people
            if p.suffix.lower() in (".jpg", ".jpeg", ".png")]


def load_labels() -> dict[str, list[tuple[float, float, float, float]]]:
    """dlib's hand-drawn boxes (x, y, w, h) in original photo pixels, by file name."""
    labels: dict[str, list] = {}
    for name in ("training.xml", "testing.xml"):
        path = DATA / "photos" / "dlib_examples_labels" / name
        if not path.exists():
            continue
        for image in ET.parse(path).getroot().iter("image"):
            labels[image.attrib["file"]] = [
                (float(b.attrib["left"]), float(b.attrib["top"]), float(b.attrib["width"]),
                 float(b.attrib["height"])) for b in image.iter("box")]
    return labels


def resized(image: np.ndarray, size: int) -> np.ndarray:
    w, h = SIZES[size]
    if image.shape[0] > image.shape[1]:
        w, h = h, w
    return cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)


def recall(boxes: list, labels: list) -> tuple[int, int]:
    """(labels matched, detections matching no label); each label and box used once."""
    used = set()
    matched = 0
    for lx, ly, lw, lh in labels:
        for i, (x, y, w, h) in enumerate(boxes):
            if i in used:
                continue
            cx, cy = x + w / 2, y + h / 2
            if lx <= cx <= lx + lw and ly <= cy <= ly + lh and 0.6 * lw <= w <= 2.2 * lw:
                used.add(i)
                matched += 1
                break
    return matched, len(boxes) - len(used)


# -- instrumentation -------------------------------------------------------------------


class Meter:
    """Times and counts what SecureDetector does, by wrapping the functions it calls."""

    def __init__(self) -> None:
        self.reset()
        real_encrypt = sc.encrypt_windows
        real_run = rpc_mod.DetectionStream.run

        def encrypt(key, pixels, nf, encoding=sc.Encoding.FLOAT32, prefix=False, rng=None):
            start = time.perf_counter()
            out = real_encrypt(key, pixels, nf, encoding, prefix=prefix, rng=rng)
            self.encrypt_ms += (time.perf_counter() - start) * 1000
            n = int(np.shape(pixels)[0])
            if prefix:
                self.prefix_windows += n
            elif encoding is sc.Encoding.FLOAT64 and self.mode_encoding is not sc.Encoding.FLOAT64:
                self.float64_windows += n
            else:
                self.full_windows += n
            return out

        def run(stream, *args):
            answer = real_run(stream, *args)
            self.max_message = max(self.max_message, answer.request_bytes)
            return answer

        def scan(gray: np.ndarray, cascade: Detector, params: ScanParams = SCAN_PARAMS,
                 batch_windows: int = DEFAULT_SCAN_BATCH) -> Iterator[WindowBatch]:
            it = scan_windows(gray, cascade, params, batch_windows)
            while True:
                start = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                finally:
                    self.scan_ms += (time.perf_counter() - start) * 1000
                yield batch

        # Patched in place, for this process only (a benchmark's instrumentation).
        sc.encrypt_windows = encrypt  # the server never calls it
        rpc_mod.DetectionStream.run = run  # type: ignore[method-assign]
        detect_mod.scan_windows = scan  # type: ignore[attr-defined]

    def reset(self, mode: DetectionMode | None = None) -> None:
        self.encrypt_ms = self.scan_ms = 0.0
        self.prefix_windows = self.full_windows = self.float64_windows = 0
        self.max_message = 0
        self.mode_encoding = mode.encoding if mode else None


# -- faithful upload formula -----------------------------------------------------------


def _varint_size(v: int) -> int:
    return max(1, (v.bit_length() + 6) // 7)


def faithful_upload(image_size: tuple[int, int], key: sc.ProductKey, cipher_dim: int
                    ) -> tuple[int, int, int]:
    """(positions, messages, bytes) FAITHFUL uploads for a photo: every position in float64;
    scan batches of whole rows (scan_windows' default size), each split into messages of
    at most MAX_BATCH_WINDOWS windows and MAX_BATCH_BYTES as SecureDetector._send does;
    the exact size of every DetectFacesRequest."""
    per_message = min(detect_mod.MAX_BATCH_WINDOWS,
                      max(1, detect_mod.MAX_BATCH_BYTES // (cipher_dim * 8)))
    positions = batches = total = 0
    sizes = []
    for level in pyramid_levels(image_size, key, FAITHFUL.params):
        if level.n_positions == 0:
            continue
        n_cols = level.xs.size
        rows = max(1, DEFAULT_SCAN_BATCH // n_cols)
        for r0 in range(0, level.ys.size, rows):
            n_scan = min(rows, level.ys.size - r0) * n_cols
            sizes += [per_message] * (n_scan // per_message)
            if n_scan % per_message:
                sizes.append(n_scan % per_message)
    for n in sizes:
        data = n * cipher_dim * 8
        inner = (1 + _varint_size(n)) + (1 + _varint_size(data) + data) + 2 + 2  # enc, kind
        if batches:  # batch_id 0 is not serialised
            inner += 1 + _varint_size(batches)
        total += 1 + _varint_size(inner) + inner
        positions += n
        batches += 1
    return positions, batches, total


# -- one photo -------------------------------------------------------------------------


def opencv_boxes(classifier: cv2.CascadeClassifier, gray: np.ndarray, mode: DetectionMode,
                 min_neighbors: int | None = None) -> list[tuple[int, int, int, int]]:
    p = mode.params
    boxes = classifier.detectMultiScale(
        gray, scaleFactor=p.scale_factor,
        minNeighbors=p.min_neighbors if min_neighbors is None else min_neighbors,
        minSize=p.min_size, maxSize=p.max_size or (0, 0))
    return sorted((int(x), int(y), int(w), int(h)) for x, y, w, h in np.reshape(boxes, (-1, 4)))


def compare(found: list, expected: list) -> dict[str, int]:
    f, e = set(found), set(expected)
    return {"matched": len(f & e), "total": len(e), "extra": len(f - e), "missing": len(e - f)}


def secure_run(detector: SecureDetector, meter: Meter, image: np.ndarray) -> dict[str, Any]:
    meter.reset(detector.mode)
    r = detector.detect(image)
    return {
        "boxes": r.boxes, "candidates": r.candidates, "positions": r.positions,
        "windows_sent": r.windows_sent, "prefix_windows": meter.prefix_windows,
        "full_windows": meter.full_windows, "float64_resent": r.resent_float64,
        "bytes": r.bytes_uploaded, "batches": r.batches, "max_message_bytes": meter.max_message,
        "scan_ms": meter.scan_ms, "encrypt_ms": meter.encrypt_ms, "server_ms": r.server_ms,
        "phone_ms": r.phone_ms, "total_ms": r.total_ms, "scale": r.scale,
    }


def read_photo(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    if image is None:
        raise FileNotFoundError(f"cannot read {path}")
    return image


def run_photo(path: Path, size: int, ctx: dict[str, Any], run_faithful: bool) -> dict[str, Any]:
    image = resized(read_photo(path), size)
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    classifier = ctx["classifier"]
    default_det: SecureDetector = ctx["default"]
    work, scale = working_image(gray, default_det.mode.working_long_side)
    row: dict[str, Any] = {"photo": f"{path.parent.name}/{path.name}", "size": size,
                           "width": image.shape[1], "height": image.shape[0]}

    # (3) plaintext OpenCV: reference boxes and times.
    ref_faithful = opencv_boxes(classifier, gray, FAITHFUL)
    ref_work = opencv_boxes(classifier, work, DEFAULT)
    ref_default = sorted(tuple(round(v / scale) for v in b) for b in ref_work)
    row["opencv_faithful_ms"] = median_ms(lambda: opencv_boxes(classifier, gray, FAITHFUL), 3)
    row["opencv_default_ms"] = median_ms(lambda: opencv_boxes(classifier, work, DEFAULT), 3)
    row["opencv_faithful_boxes"] = ref_faithful
    row["opencv_default_boxes"] = ref_default

    # (2) DEFAULT.
    d = secure_run(default_det, ctx["meter"], image)
    row["default"] = d
    row["parity"] = compare(d["boxes"], ref_default)
    if d["boxes"] != ref_default:
        raw_cv = opencv_boxes(classifier, work, DEFAULT, min_neighbors=0)
        raw_ours = sorted(d["candidates"])
        row["parity_diagnosis"] = (
            f"raw candidates {'equal' if raw_cv == raw_ours else 'differ'} "
            f"(secure {len(raw_ours)}, opencv {len(raw_cv)}; "
            f"only secure {sorted(set(raw_ours) - set(raw_cv))[:5]}, "
            f"only opencv {sorted(set(raw_cv) - set(raw_ours))[:5]})")

    # (1) FAITHFUL: computed for every photo, run end to end on some.
    positions, batches, nbytes = faithful_upload((gray.shape[1], gray.shape[0]), ctx["key"],
                                                 ctx["cipher_dim"])
    row["faithful_computed"] = {"positions": positions, "batches": batches, "bytes": nbytes}
    if run_faithful:
        f = secure_run(ctx["faithful"], ctx["meter"], image)
        f["parity"] = compare(f["boxes"], ref_faithful)
        f.pop("candidates")
        row["faithful"] = f
    d.pop("candidates")
    return row


# -- summaries -------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def summarise(rows: list[dict], size: int, labels: dict, cipher_dim: int) -> dict[str, Any]:
    rs = [r for r in rows if r["size"] == size]
    ds = [r["default"] for r in rs]
    fr = [r["faithful"] for r in rs if "faithful" in r]
    fc = [r["faithful_computed"] for r in rs]
    par = {k: sum(r["parity"][k] for r in rs) for k in ("matched", "total", "extra", "missing")}
    s: dict[str, Any] = {
        f"photos_{size}": len(rs),
        f"positions_{size}_default": med([d["positions"] for d in ds]),
        f"windows_sent_{size}_default": med([d["windows_sent"] for d in ds]),
        f"prefix_windows_{size}_default": med([d["prefix_windows"] for d in ds]),
        f"full_windows_{size}_default": med([d["full_windows"] for d in ds]),
        f"resent_float64_{size}_default": med([d["float64_resent"] for d in ds]),
        f"resent_float64_{size}_default_total": sum(d["float64_resent"] for d in ds),
        f"bytes_per_photo_{size}_default": med([d["bytes"] for d in ds]),
        f"max_message_bytes_{size}_default": max(d["max_message_bytes"] for d in ds),
        f"scan_ms_{size}_default": med([d["scan_ms"] for d in ds]),
        f"encrypt_ms_{size}_default": med([d["encrypt_ms"] for d in ds]),
        f"phone_ms_{size}_default": med([d["phone_ms"] for d in ds]),
        f"server_ms_{size}_default": med([d["server_ms"] for d in ds]),
        f"total_ms_{size}_default": med([d["total_ms"] for d in ds]),
        f"positions_{size}_faithful": med([c["positions"] for c in fc]),
        f"bytes_per_photo_{size}_faithful": med([c["bytes"] for c in fc]),
        f"faithful_runs_{size}": len(fr),
        f"opencv_ms_{size}_faithful_params": med([r["opencv_faithful_ms"] for r in rs]),
        f"opencv_ms_{size}_default_params": med([r["opencv_default_ms"] for r in rs]),
        f"parity_boxes_matched_{size}": par["matched"],
        f"parity_boxes_total_{size}": par["total"],
        f"parity_extra_boxes_{size}": par["extra"],
        f"parity_missing_boxes_{size}": par["missing"],
        f"parity_photos_equal_{size}": sum(r["default"]["boxes"] == r["opencv_default_boxes"]
                                           for r in rs),
    }
    s[f"bytes_reduction_{size}"] = (s[f"bytes_per_photo_{size}_faithful"]
                                    / s[f"bytes_per_photo_{size}_default"])
    if fr:
        s.update({
            f"measured_bytes_{size}_faithful": med([f["bytes"] for f in fr]),
            f"server_ms_{size}_faithful": med([f["server_ms"] for f in fr]),
            f"encrypt_ms_{size}_faithful": med([f["encrypt_ms"] for f in fr]),
            f"scan_ms_{size}_faithful": med([f["scan_ms"] for f in fr]),
            f"phone_ms_{size}_faithful": med([f["phone_ms"] for f in fr]),
            f"total_ms_{size}_faithful": med([f["total_ms"] for f in fr]),
            f"faithful_parity_{size}": {k: sum(f["parity"][k] for f in fr)
                                        for k in ("matched", "total", "extra", "missing")},
            f"faithful_formula_exact_{size}": all(
                r["faithful"]["bytes"] == r["faithful_computed"]["bytes"]
                and r["faithful"]["positions"] == r["faithful_computed"]["positions"]
                for r in rs if "faithful" in r),
        })
    # Recall against dlib's labels.
    lab_total = lab_photos = def_hit = fai_hit = def_fp = fai_fp = 0
    for r in rs:
        name = r["photo"].split("/")[-1]
        if not r["photo"].startswith("dlib_examples_group/") or name not in labels:
            continue
        sx, sy = r["width"] / r["orig_width"], r["height"] / r["orig_height"]
        lab = [(x * sx, y * sy, w * sx, h * sy) for x, y, w, h in labels[name]]
        lab_total += len(lab)
        lab_photos += 1
        m, fp = recall(r["default"]["boxes"], lab)
        def_hit, def_fp = def_hit + m, def_fp + fp
        faithful_boxes = r["faithful"]["boxes"] if "faithful" in r else r["opencv_faithful_boxes"]
        m, fp = recall(faithful_boxes, lab)
        fai_hit, fai_fp = fai_hit + m, fai_fp + fp
    s.update({f"labels_{size}": lab_total, f"labelled_photos_{size}": lab_photos,
              f"recall_{size}_default": def_hit / lab_total if lab_total else float("nan"),
              f"recall_{size}_faithful": fai_hit / lab_total if lab_total else float("nan"),
              f"labelled_faces_found_{size}_default": def_hit,
              f"labelled_faces_found_{size}_faithful": fai_hit,
              f"unmatched_detections_{size}_default": def_fp,
              f"unmatched_detections_{size}_faithful": fai_fp})
    return s


def print_size(s: dict, size: int) -> None:
    n = s[f"photos_{size}"]
    mb = 1e6
    dash = "-"
    print(f"\n== photos resized to {SIZES[size][0]}x{SIZES[size][1]} ({n} photos; medians "
          "per photo) ==")
    rows = []
    if s.get(f"faithful_runs_{size}"):
        fp = s[f"faithful_parity_{size}"]
        rows.append([f"FAITHFUL (run on {s[f'faithful_runs_{size}']})",
                     int(s[f"positions_{size}_faithful"]), int(s[f"positions_{size}_faithful"]),
                     s[f"measured_bytes_{size}_faithful"] / mb, s[f"scan_ms_{size}_faithful"],
                     s[f"encrypt_ms_{size}_faithful"], s[f"server_ms_{size}_faithful"],
                     s[f"total_ms_{size}_faithful"], f"{fp['matched']}/{fp['total']}"])
    rows.append(["FAITHFUL (computed, all)", int(s[f"positions_{size}_faithful"]),
                 int(s[f"positions_{size}_faithful"]), s[f"bytes_per_photo_{size}_faithful"] / mb,
                 dash, dash, dash, dash, dash])
    rows.append(["DEFAULT", int(s[f"positions_{size}_default"]),
                 int(s[f"windows_sent_{size}_default"]), s[f"bytes_per_photo_{size}_default"] / mb,
                 s[f"scan_ms_{size}_default"], s[f"encrypt_ms_{size}_default"],
                 s[f"server_ms_{size}_default"], s[f"total_ms_{size}_default"],
                 f"{s[f'parity_boxes_matched_{size}']}/{s[f'parity_boxes_total_{size}']}"])
    rows.append(["OpenCV plaintext, default params", dash, dash, 0.0, dash, dash, dash,
                 s[f"opencv_ms_{size}_faithful_params"], "reference"])
    rows.append(["OpenCV plaintext, DEFAULT params", dash, dash, 0.0, dash, dash, dash,
                 s[f"opencv_ms_{size}_default_params"], "reference"])
    print_table(["mode", "positions", "windows sent", "MB up", "scan ms", "encrypt ms",
                 "server ms", "end-to-end ms", "boxes = OpenCV"], rows)
    print("DEFAULT windows sent per photo (median): prefix "
          f"{s[f'prefix_windows_{size}_default']:,.0f}, full float32 "
          f"{s[f'full_windows_{size}_default']:,.0f}, re-sent float64 "
          f"{s[f'resent_float64_{size}_default']:,.0f} (total over photos "
          f"{s[f'resent_float64_{size}_default_total']:,}); largest message "
          f"{s[f'max_message_bytes_{size}_default'] / mb:.1f} MB; upload reduction "
          f"x{s[f'bytes_reduction_{size}']:.0f}")
    if f"faithful_formula_exact_{size}" in s:
        print(f"FAITHFUL upload formula equals the measured bytes: "
              f"{s[f'faithful_formula_exact_{size}']}")
    print(f"Parity DEFAULT vs detectMultiScale(DEFAULT params): "
          f"{s[f'parity_boxes_matched_{size}']} of {s[f'parity_boxes_total_{size}']} boxes "
          f"matched, {s[f'parity_extra_boxes_{size}']} extra, "
          f"{s[f'parity_missing_boxes_{size}']} missing; "
          f"{s[f'parity_photos_equal_{size}']}/{n} photos identical")
    print(f"Recall vs dlib labels ({s[f'labels_{size}']} faces in "
          f"{s[f'labelled_photos_{size}']} photos): DEFAULT "
          f"{s[f'recall_{size}_default']:.3f} ({s[f'unmatched_detections_{size}_default']} "
          f"unmatched detections), FAITHFUL {s[f'recall_{size}_faithful']:.3f} "
          f"({s[f'unmatched_detections_{size}_faithful']} unmatched detections)")


def print_photos(rows: list[dict]) -> None:
    print("\n== per photo ==")
    table = []
    for r in rows:
        d = r["default"]
        p = r["parity"]
        table.append([r["photo"], f"{r['width']}x{r['height']}", d["positions"],
                      d["windows_sent"], d["bytes"] / 1e6, d["server_ms"], d["total_ms"],
                      r["faithful_computed"]["bytes"] / 1e6,
                      f"{p['matched']}/{p['total']}" + (f" +{p['extra']}" if p["extra"] else "")
                      + (f" -{p['missing']}" if p["missing"] else ""),
                      (f"{r['faithful']['total_ms'] / 1000:.0f} s, "
                       f"{r['faithful']['parity']['matched']}/{r['faithful']['parity']['total']}")
                      if "faithful" in r else ""])
    print_table(["photo", "size", "positions", "sent", "MB up", "server ms", "e2e ms",
                 "FAITHFUL MB", "DEFAULT = cv", "FAITHFUL run"], table)
    for r in rows:
        if "parity_diagnosis" in r:
            print(f"DIFFERENCE {r['photo']} @{r['size']}: secure {r['default']['boxes']} "
                  f"opencv {r['opencv_default_boxes']}: {r['parity_diagnosis']}")


# -- main ------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N photos")
    ap.add_argument("--faithful-runs", type=int, default=1,
                    help="photos run end to end in FAITHFUL mode at 640x480")
    ap.add_argument("--faithful-runs-1280", type=int, default=0,
                    help="photos run end to end in FAITHFUL mode at 1280x960 (~16 GB each)")
    ap.add_argument("--sizes", default="640,1280")
    args = ap.parse_args(argv)

    if not (DATA / "photos").is_dir():
        log(f"../shared/data is absent ({DATA}): real photos are needed")
        return 2
    photos = photo_list()
    if args.limit:
        photos = photos[:args.limit]
    sizes = [int(s) for s in args.sizes.split(",")]
    labels = load_labels()
    cv2.setNumThreads(1)
    start_all = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="detect_bench_") as tmp:
        local = start_local_server(Path(tmp) / "server")
        try:
            with PrivfaceClient(local.address, config=local.client_config) as client:
                cascade = load_cascade()
                key = sc.generate_product_key("frontalface_alt", cascade)
                vendor.publish(client, cascade, key, local.vendor_token)
                create_family(client)
                info = client.list_detectors()[0]
                meter = Meter()
                ctx: dict[str, Any] = {
                       "classifier": cv2.CascadeClassifier(default_cascade_path()),
                       "key": key, "cipher_dim": int(info.ciphertext_dim), "meter": meter,
                       "default": SecureDetector(client, key, DEFAULT),
                       "faithful": SecureDetector(client, key, FAITHFUL)}
                rows = []
                for size in sizes:
                    runs = args.faithful_runs if size == 640 else args.faithful_runs_1280
                    for i, path in enumerate(photos):
                        t0 = time.perf_counter()
                        original = read_photo(path)
                        row = run_photo(path, size, ctx, run_faithful=i < runs)
                        row["orig_width"], row["orig_height"] = original.shape[1], original.shape[0]
                        rows.append(row)
                        log(f"[{size}] {i + 1}/{len(photos)} {row['photo']}: DEFAULT "
                            f"{row['default']['bytes'] / 1e6:.0f} MB "
                            f"{row['default']['total_ms']:.0f} ms parity "
                            f"{row['parity']['matched']}/{row['parity']['total']}"
                            + (f"; FAITHFUL {row['faithful']['bytes'] / 1e9:.2f} GB "
                               f"{row['faithful']['total_ms'] / 1000:.0f} s parity "
                               f"{row['faithful']['parity']['matched']}/"
                               f"{row['faithful']['parity']['total']}"
                               if "faithful" in row else "")
                            + f" ({time.perf_counter() - t0:.1f} s)")
        finally:
            local.stop()

    figures: dict[str, Any] = {"photos": len(photos), "cipher_dim": ctx["cipher_dim"],
                               "max_batch_bytes": detect_mod.MAX_BATCH_BYTES,
                               "opencv_threads": 1, "server_in_process": True}
    for size in sizes:
        figures.update(summarise(rows, size, labels, ctx["cipher_dim"]))
    for k in ("matched", "total", "extra", "missing"):
        name = {"matched": "parity_boxes_matched", "total": "parity_boxes_total",
                "extra": "parity_extra_boxes", "missing": "parity_missing_boxes"}[k]
        figures[name] = sum(figures[f"{name}_{size}"] for size in sizes)
    figures["parity_differences"] = [
        {"photo": r["photo"], "size": r["size"], "secure": r["default"]["boxes"],
         "opencv": r["opencv_default_boxes"], "diagnosis": r["parity_diagnosis"]}
        for r in rows if "parity_diagnosis" in r]
    figures["per_photo"] = rows
    figures["bench_seconds"] = time.perf_counter() - start_all

    print_photos(rows)
    for size in sizes:
        print_size(figures, size)
    print(f"\nbench took {figures['bench_seconds']:.0f} s")
    write_json(args.json, _jsonable(figures))
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, float) and value != value:
        return None
    return value


if __name__ == "__main__":
    sys.exit(main())
