"""Secure face detection, phone side (steps 2-3): scan, encrypt, stream, group.

The phone builds OpenCV's pyramid and windows (client/pipeline/windows.py), encrypts them
under the vendor's product key and streams them over one bidirectional DetectFaces call;
the server answers one outcome per window, never a score. The phone then applies OpenCV's
skip rule and groups the candidate rectangles, so the boxes equal
``cv2.CascadeClassifier.detectMultiScale`` at the scan parameters used.

Two modes (docs/detection.md has the measurements and what the server learns in each):

* ``faithful``: the seed paper's protocol at OpenCV's default parameters: every window of
  the pyramid, float64, one round, in scan order.
* ``default``: the photo scaled to a 640-pixel working resolution, scale factor 1.25, faces
  of at least 40 px; low-contrast windows (which OpenCV rejects before any classifier)
  not sent; a float32 prefix round on a 66-dim projection for the first 3 stages, then
  float32 full windows only for the survivors that OpenCV visits; any UNCERTAIN window
  re-sent in float64; the whole photo's windows shuffled before they are sent, so the
  server sees neither positions nor scales, only how many windows each round holds.
* ``small-faces``: ``default`` with faces from 24 px (OpenCV's first window at this scale
  ladder: 31 px, about 5% of the long side instead of 7.6%), for group photos taken from a
  few metres; about 1.9x the windows of ``default``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from client.pipeline.windows import (
    ScanParams,
    WindowBatch,
    apply_skip_rule,
    group_boxes,
    scan_windows,
)
from client.rpc import DetectionStream, PrivfaceClient
from common import secure_cascade as sc
from common.errors import MalformedInputError

log = logging.getLogger(__name__)

MAX_BATCH_BYTES = 8 * 1024 * 1024  # well under the server's 32 MiB message limit
MAX_BATCH_WINDOWS = 16_384


@dataclass(frozen=True)
class DetectionMode:
    """How a photo is scanned and uploaded."""

    name: str
    working_long_side: int | None  # scale the photo so its long side is this (None: as is)
    params: ScanParams
    encoding: sc.Encoding
    prefix_round: bool
    omit_low_contrast: bool
    shuffle: bool


FAITHFUL = DetectionMode("faithful", None, ScanParams(), sc.Encoding.FLOAT64,
                         prefix_round=False, omit_low_contrast=False, shuffle=False)
DEFAULT = DetectionMode("default", 640, ScanParams(scale_factor=1.25, min_neighbors=2,
                                                   min_size=(40, 40)),
                        sc.Encoding.FLOAT32, prefix_round=True, omit_low_contrast=True,
                        shuffle=True)
SMALL_FACES = dataclasses.replace(DEFAULT, name="small-faces", params=dataclasses.replace(
    DEFAULT.params, min_size=(24, 24)))
MODES = {m.name: m for m in (DEFAULT, SMALL_FACES, FAITHFUL)}


@dataclass
class DetectionReport:
    """Boxes (x, y, w, h in the original photo) and what it cost."""

    boxes: list[tuple[int, int, int, int]]
    positions: int = 0
    windows_sent: int = 0
    bytes_uploaded: int = 0
    batches: int = 0
    resent_float64: int = 0
    phone_ms: float = 0.0
    server_ms: float = 0.0
    total_ms: float = 0.0
    scale: float = 1.0
    candidates: list[tuple[int, int, int, int]] = field(default_factory=list)


def working_image(gray: np.ndarray, long_side: int | None) -> tuple[np.ndarray, float]:
    """The grey photo scaled so its long side is ``long_side`` (never enlarged), and the
    scale factor; boxes found on it map back to the photo by dividing by that factor."""
    h, w = gray.shape
    if long_side is None or max(h, w) <= long_side:
        return gray, 1.0
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(gray, size, interpolation=cv2.INTER_AREA), scale


class SecureDetector:
    """Runs the vendor's encrypted detector on the server over this phone's photos."""

    def __init__(self, client: PrivfaceClient, product_key: sc.ProductKey,
                 mode: DetectionMode = DEFAULT, rng: np.random.Generator | None = None,
                 progress: Callable[[int], None] | None = None) -> None:
        self.client = client
        self.key = product_key
        self.mode = mode
        self.rng = rng or np.random.default_rng()
        self.progress = progress  # called with the number of windows each message carried

    def detect(self, image: np.ndarray) -> DetectionReport:
        """Face boxes of a BGR or grey photo, in its own pixel coordinates."""
        start = time.perf_counter()
        gray = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        work, scale = working_image(gray, self.mode.working_long_side)
        report = DetectionReport(boxes=[], scale=scale)
        stream = self.client.open_detection(self.key.detector_id, self.key.version,
                                            self.key.fingerprint())
        rects = []
        try:
            for windows in self._window_sets(work):
                report.positions += windows.n
                rects.append(windows.rects[self._faces(stream, windows, report)])
        finally:
            stream.close()
        candidates = np.concatenate(rects) if rects else np.zeros((0, 4), np.int32)
        boxes = group_boxes(candidates, self.mode.params.min_neighbors,
                            (work.shape[1], work.shape[0]))
        report.candidates = [(int(x), int(y), int(w), int(h)) for x, y, w, h in candidates]
        report.boxes = sorted((round(x / scale), round(y / scale), round(w / scale),
                               round(h / scale)) for x, y, w, h in boxes)
        report.total_ms = (time.perf_counter() - start) * 1000
        report.phone_ms = report.total_ms - report.server_ms
        return report

    def _window_sets(self, work: np.ndarray) -> Iterator[_WindowSet]:
        """The photo's windows: all at once when shuffling (so the server cannot tell
        which rows or scales a window came from), else scan batch by scan batch."""
        batches = scan_windows(work, self.key, self.mode.params)
        if self.mode.shuffle:
            yield _WindowSet.of(list(batches))
        else:
            for batch in batches:
                yield _WindowSet.of([batch])

    # -- one set of windows -------------------------------------------------------------

    def _send(self, stream: DetectionStream, windows: _WindowSet, idx: np.ndarray,
              report: DetectionReport, *, prefix: bool, encoding: sc.Encoding,
              first_stage: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Outcomes for windows ``idx`` (shuffled on the wire if the mode says), and a mask
        of those that were re-sent whole in float64 (their outcome is then final)."""
        result = np.zeros(idx.size, dtype=np.uint8)
        resent = np.zeros(idx.size, dtype=bool)
        if idx.size == 0:
            return result, resent
        order = self.rng.permutation(idx.size) if self.mode.shuffle else np.arange(idx.size)
        key = self.key.prefix_key if prefix else self.key.key
        if key is None:
            raise MalformedInputError("this product key has no prefix round")
        dim = key.cipher_dim
        per_message = min(MAX_BATCH_WINDOWS, max(1, MAX_BATCH_BYTES // (
            dim * np.dtype(sc.DTYPES[encoding]).itemsize)))
        for i in range(0, idx.size, per_message):  # every message stays small
            part = order[i:i + per_message]
            chosen = idx[part]
            data = sc.encrypt_windows(self.key, windows.pixels[chosen],
                                      windows.norm_factors[chosen], encoding, prefix=prefix,
                                      rng=self.rng)
            answer = stream.run(data, chosen.size, int(encoding), first_stage, prefix)
            report.bytes_uploaded += answer.request_bytes
            report.windows_sent += chosen.size
            report.batches += 1
            report.server_ms += answer.server_ms
            result[part] = np.frombuffer(answer.outcomes, dtype=np.uint8)
            if self.progress is not None:
                self.progress(chosen.size)
        uncertain = np.flatnonzero(result == sc.Outcome.UNCERTAIN)
        if uncertain.size:  # too close to call at this precision: ask again in float64
            report.resent_float64 += uncertain.size
            # A prefix window comes back whole: a full float64 evaluation from stage 0.
            result[uncertain], _ = self._send(stream, windows, idx[uncertain], report,
                                              prefix=False, encoding=sc.Encoding.FLOAT64,
                                              first_stage=0 if prefix else first_stage)
            resent[uncertain] = True
        return result, resent

    def _faces(self, stream: DetectionStream, windows: _WindowSet, report: DetectionReport
               ) -> np.ndarray:
        """Indices of the windows that OpenCV would report as candidates."""
        low = windows.low_contrast
        sent = np.flatnonzero(~low) if self.mode.omit_low_contrast else np.arange(windows.n)
        use_prefix = self.mode.prefix_round and self.key.prefix_stages > 0
        outcome = np.full(windows.n, sc.Outcome.REJECTED, dtype=np.uint8)
        final = np.zeros(windows.n, dtype=bool)
        outcome[sent], final[sent] = self._send(stream, windows, sent, report,
                                                prefix=use_prefix, encoding=self.mode.encoding)
        outcome[low] = sc.Outcome.REJECTED  # OpenCV rejects these before any classifier
        visited = windows.visited(outcome == sc.Outcome.REJECTED_STAGE0)
        if use_prefix:
            # Prefix survivors that OpenCV visits go on with their full windows (those
            # already re-sent whole after an UNCERTAIN prefix answer are final).
            survivors = np.flatnonzero((outcome == sc.Outcome.PASSED) & visited & ~final)
            outcome[survivors], _ = self._send(stream, windows, survivors, report, prefix=False,
                                               encoding=self.mode.encoding,
                                               first_stage=self.key.prefix_stages)
        return np.flatnonzero((outcome == sc.Outcome.PASSED) & visited)


@dataclass(frozen=True, eq=False)
class _WindowSet:
    """Scan batches concatenated; each keeps its (rows x cols) grid for the skip rule."""

    pixels: np.ndarray
    norm_factors: np.ndarray
    low_contrast: np.ndarray
    rects: np.ndarray
    grids: tuple[tuple[int, int, int], ...]  # (first index, rows, cols) per scan batch

    @property
    def n(self) -> int:
        return int(self.low_contrast.size)

    @classmethod
    def of(cls, batches: list[WindowBatch]) -> _WindowSet:
        if not batches:
            return cls(np.zeros((0, 0), np.uint8), np.zeros(0), np.zeros(0, bool),
                       np.zeros((0, 4), np.int32), ())
        grids, first = [], 0
        for b in batches:
            grids.append((first, b.n_rows, b.n_cols))
            first += b.n
        return cls(np.concatenate([b.pixels for b in batches]),
                   np.concatenate([b.norm_factors for b in batches]),
                   np.concatenate([b.low_contrast for b in batches]),
                   np.concatenate([b.rects for b in batches]), tuple(grids))

    def visited(self, stage0_rejected: np.ndarray) -> np.ndarray:
        """OpenCV's skip rule, row by row within each scan batch."""
        out = np.zeros(self.n, dtype=bool)
        for first, rows, cols in self.grids:
            block = stage0_rejected[first:first + rows * cols].reshape(rows, cols)
            out[first:first + rows * cols] = apply_skip_rule(block).ravel()
        return out
