"""Phone side of the detection scan: OpenCV's pyramid, windows and normalisation.

Reproduces what ``cv2.CascadeClassifier.detectMultiScale`` (OpenCV 4.x,
``CascadeClassifierImpl::detectMultiScaleNoGrouping`` and ``HaarEvaluator``) does before
and around the cascade, so that :func:`detect_plain` returns the same boxes:

1. Scales: ``factor`` starts at 1.0 (double) and is multiplied by ``scale_factor``;
   the window ``cvRound(win * factor)`` stops the loop once it exceeds ``max_size`` or
   the image, and is skipped while smaller than ``min_size``. Each kept factor is
   stored as float32.
2. Layer size ``cvRound(W / scale)`` computed in float32; step 2 when ``scale < 2``
   else 1. The layer is ``cv2.resize(gray, size, interpolation=INTER_LINEAR_EXACT)``:
   OpenCV's source (``FeatureEvaluator::setImage``, as stored for 4.x) asks for
   ``INTER_LINEAR``, yet in the opencv-python 4.14 wheel a Python
   ``cv2.resize(.., INTER_LINEAR)`` differs by +-1 grey level on about 10% of pixels
   from the layers the detector really scans (with or without IPP), while
   ``INTER_LINEAR_EXACT`` reproduces them: with it the raw candidates
   (``min_neighbors=0``) of every tested photo are identical, without it they are not.
   It is also the bit-exact, platform-independent variant, so a phone build agrees.
3. Positions ``x = 0, step, .. <= layer_w - win_w`` (same for y).
4. Normalisation over the inner rect ``(1, 1, win_w - 2, win_h - 2)`` (area 324 for a
   20x20 window): ``nf = sqrt(area * sum(x^2) - sum(x)^2)`` (exact integer sums, double
   sqrt), ``v = float32(1 / nf)``. When ``nf <= 0`` or ``area * v >= 0.1`` (standard
   deviation of the inner rect below about 10 grey levels) OpenCV rejects the window
   before any classifier ("low contrast", ``runAt`` returns -1).
5. Skip rule: a window rejected by stage 0 (``runAt`` returns 0) makes the scan skip
   the next position of its row. Low-contrast windows (-1) and windows rejected by a
   later stage do not. :func:`apply_skip_rule` computes which positions OpenCV visits
   from stage-0 decisions only, so the server can apply it.
6. Candidate box ``(cvRound(x*scale), cvRound(y*scale), cvRound(win_w*scale),
   cvRound(win_h*scale))`` (float32 products, round half to even), grouped with
   ``cv2.groupRectangles(.., min_neighbors, 0.2)`` and clipped to the image.

Windows are streamed as :class:`WindowBatch` (whole rows of one scale) so memory stays
bounded whatever the photo size.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import cv2
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from common.cascade import Cascade, rejection_stages

__all__ = [
    "GROUP_EPS",
    "Detector",
    "ScanParams",
    "ScaleLevel",
    "ScanOutcome",
    "WindowBatch",
    "apply_skip_rule",
    "detect_plain",
    "group_boxes",
    "positions_to_skip",
    "pyramid_levels",
    "scan_plain",
    "scan_windows",
]

GROUP_EPS = 0.2  # detectMultiScale's GROUP_EPS
_LOW_CONTRAST_LIMIT = 0.1  # HaarEvaluator::setWindow: area * v < 0.1 to be evaluated
_DEFAULT_BATCH_WINDOWS = 16384


class Detector(Protocol):
    """What scanning needs of a detector: its window. A Cascade, or the vendor's
    ProductKey on a phone that never sees the cascade."""

    @property
    def window_size(self) -> tuple[int, int]: ...


@dataclass(frozen=True)
class ScanParams:
    """detectMultiScale's parameters (``flags`` are ignored by OpenCV 4 new cascades)."""

    scale_factor: float = 1.1
    min_neighbors: int = 3
    min_size: tuple[int, int] = (0, 0)  # (width, height); (0, 0) = no minimum
    max_size: tuple[int, int] | None = None  # None or a zero side = the image size

    def __post_init__(self) -> None:
        if not self.scale_factor > 1.0:
            raise ValueError(f"scale_factor must be > 1, got {self.scale_factor}")
        if self.min_neighbors < 0:
            raise ValueError(f"min_neighbors must be >= 0, got {self.min_neighbors}")


@dataclass(frozen=True)
class ScaleLevel:
    """One pyramid layer as OpenCV's ``FeatureEvaluator::ScaleData`` describes it."""

    index: int
    scale: np.float32  # float32 as in OpenCV
    size: tuple[int, int]  # (width, height) of the resized layer
    step: int  # stride of x and y positions
    window: tuple[int, int]  # (width, height) of a window in original image pixels
    xs: np.ndarray  # x positions in layer pixels
    ys: np.ndarray  # y positions in layer pixels

    @property
    def n_positions(self) -> int:
        return int(self.xs.size * self.ys.size)


@dataclass(frozen=True, eq=False)
class WindowBatch:
    """Windows of whole scan rows of one pyramid layer, in OpenCV's scan order.

    Window ``k`` sits at grid row ``k // n_cols`` and grid column ``k % n_cols`` of the
    batch (row-major), i.e. at layer pixel ``(xs[col], ys[row])``.

    Attributes:
        level: the pyramid layer.
        row_start: index of the batch's first row within the layer's rows.
        n_rows, n_cols: grid shape of the batch.
        pixels: ``(n, win_h*win_w)`` uint8 window pixels (the linear functionals' x).
        norm_factors: ``(n,)`` float64 ``nf = 1/v``: the window side of ``theta * nf``.
        inv_norm_factors: ``(n,)`` float32 ``v = float32(1/nf_true)`` as OpenCV keeps it.
        low_contrast: ``(n,)`` bool, windows OpenCV rejects before any classifier.
        rects: ``(n, 4)`` int32 ``x, y, w, h`` in original image pixels.
    """

    level: ScaleLevel
    row_start: int
    n_rows: int
    n_cols: int
    pixels: np.ndarray
    norm_factors: np.ndarray
    inv_norm_factors: np.ndarray
    low_contrast: np.ndarray
    rects: np.ndarray = field(repr=False)

    @property
    def n(self) -> int:
        return int(self.pixels.shape[0])


def _cv_round(a: np.ndarray) -> np.ndarray:
    """cvRound: round half to even (lrint), as OpenCV does on x86 and ARM."""
    rounded: np.ndarray = np.rint(a)
    return rounded.astype(np.int64)


def _cv_round_int(x: float | np.floating[Any]) -> int:
    """cvRound of one number."""
    return int(np.rint(x))


def pyramid_levels(
    image_size: tuple[int, int], cascade: Detector, params: ScanParams
) -> list[ScaleLevel]:
    """The scales detectMultiScale scans, with layer sizes, steps and positions.

    Args:
        image_size: ``(width, height)`` of the grey image.
    """
    img_w, img_h = image_size
    win_w, win_h = cascade.window_size
    max_w, max_h = params.max_size if params.max_size else (0, 0)
    if max_w == 0 or max_h == 0:
        max_w, max_h = img_w, img_h
    min_w, min_h = params.min_size

    scales: list[np.float32] = []
    factor = 1.0  # double, multiplied up exactly as OpenCV's loop does
    while True:
        ww = _cv_round_int(win_w * factor)
        wh = _cv_round_int(win_h * factor)
        if ww > max_w or wh > max_h or ww > img_w or wh > img_h:
            break
        if not (ww < min_w or wh < min_h):
            scales.append(np.float32(factor))
        factor *= params.scale_factor

    levels = []
    for i, sc in enumerate(scales):
        # int / float in C++ is a float32 division.
        lw = _cv_round_int(np.float32(img_w) / sc)
        lh = _cv_round_int(np.float32(img_h) / sc)
        step = 1 if sc >= np.float32(2.0) else 2
        # getWorkingSize: szi - win with szi = layer + 1, positions x < that.
        xs = np.arange(0, max(lw + 1 - win_w, 0), step, dtype=np.int64)
        ys = np.arange(0, max(lh + 1 - win_h, 0), step, dtype=np.int64)
        window = (_cv_round_int(np.float32(win_w) * sc), _cv_round_int(np.float32(win_h) * sc))
        levels.append(ScaleLevel(i, sc, (lw, lh), step, window, xs, ys))
    return levels


def _layer(gray: np.ndarray, level: ScaleLevel) -> np.ndarray:
    if (gray.shape[1], gray.shape[0]) == level.size:
        return gray
    return cv2.resize(gray, level.size, interpolation=cv2.INTER_LINEAR_EXACT)


def _as_gray(image: np.ndarray) -> np.ndarray:
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}")
    if image.ndim == 3:
        if image.shape[2] == 1:
            return np.ascontiguousarray(image[:, :, 0])
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)  # as detectMultiScale does
    if image.ndim != 2:
        raise ValueError(f"expected a grey or BGR image, got shape {image.shape}")
    return image


def _rect_sums(s: np.ndarray, y0: np.ndarray, y1: np.ndarray, x0: np.ndarray,
               x1: np.ndarray) -> np.ndarray:
    """Sums over the rects [y0, y1) x [x0, x1) of every (row, column) pair, from the
    integral image ``s``; flattened row by row."""
    sums: np.ndarray = (
        s[y1[:, None], x1[None, :]]
        - s[y0[:, None], x1[None, :]]
        - s[y1[:, None], x0[None, :]]
        + s[y0[:, None], x0[None, :]]
    )
    return sums.ravel()


def scan_windows(
    gray: np.ndarray,
    cascade: Detector,
    params: ScanParams = ScanParams(),
    batch_windows: int = _DEFAULT_BATCH_WINDOWS,
) -> Iterator[WindowBatch]:
    """Every scan position of detectMultiScale, as batches of whole rows.

    Args:
        gray: uint8 grey image (a BGR image is converted as OpenCV does).
        batch_windows: target windows per batch (at least one row per batch).
    """
    gray = _as_gray(gray)
    win_w, win_h = cascade.window_size
    area = float((win_w - 2) * (win_h - 2))
    for level in pyramid_levels((gray.shape[1], gray.shape[0]), cascade, params):
        if level.n_positions == 0:
            continue
        layer = _layer(gray, level)
        # Exact integral images (OpenCV's int32 ones wrap, but window differences of
        # wrapped sums are exact, so int64 gives the same numbers).
        lay64 = layer.astype(np.int64)
        s1 = np.zeros((layer.shape[0] + 1, layer.shape[1] + 1), dtype=np.int64)
        s2 = np.zeros_like(s1)
        s1[1:, 1:] = lay64.cumsum(0).cumsum(1)
        s2[1:, 1:] = (lay64 * lay64).cumsum(0).cumsum(1)
        views = sliding_window_view(layer, (win_h, win_w))
        xs, ys = level.xs, level.ys
        n_cols = xs.size
        rows_per_batch = max(1, batch_windows // n_cols)
        sc = level.scale
        rx = _cv_round(xs.astype(np.float32) * sc).astype(np.int32)
        for r0 in range(0, ys.size, rows_per_batch):
            yb = ys[r0 : r0 + rows_per_batch]
            n_rows = yb.size
            pixels = views[yb[:, None], xs[None, :]].reshape(n_rows * n_cols, win_h * win_w)
            # Inner normalisation rect (1, 1, win_w - 2, win_h - 2).
            y0, y1 = yb + 1, yb + win_h - 1
            x0, x1 = xs + 1, xs + win_w - 1
            vsum = _rect_sums(s1, y0, y1, x0, x1).astype(np.float64)
            vsq = _rect_sums(s2, y0, y1, x0, x1).astype(np.float64)
            nf_sq = area * vsq - vsum * vsum  # exact: integers far below 2**53
            positive = nf_sq > 0.0
            nf_true = np.sqrt(np.where(positive, nf_sq, 1.0))
            inv = np.where(positive, (1.0 / nf_true).astype(np.float32), np.float32(1.0))
            inv = inv.astype(np.float32)
            low = ~positive | ~(area * inv.astype(np.float64) < _LOW_CONTRAST_LIMIT)
            ry = _cv_round(yb.astype(np.float32) * sc).astype(np.int32)
            rects = np.empty((n_rows * n_cols, 4), dtype=np.int32)
            rects[:, 0] = np.tile(rx, n_rows)
            rects[:, 1] = np.repeat(ry, n_cols)
            rects[:, 2] = level.window[0]
            rects[:, 3] = level.window[1]
            yield WindowBatch(
                level=level,
                row_start=r0,
                n_rows=n_rows,
                n_cols=n_cols,
                pixels=pixels,
                norm_factors=1.0 / inv.astype(np.float64),
                inv_norm_factors=inv,
                low_contrast=low,
                rects=rects,
            )


def apply_skip_rule(stage0_rejected: np.ndarray) -> np.ndarray:
    """Which scan positions OpenCV visits, from stage-0 rejections only.

    In each row the first position is visited; a visited position whose window is
    rejected by stage 0 (evaluated, not low contrast) makes the scan jump over the next
    position. Everything the server needs: ``stage0_rejected`` must be False for
    low-contrast windows (OpenCV's ``runAt`` returns -1 for them, which does not skip).

    Args:
        stage0_rejected: ``(n_rows, n_cols)`` bool in scan order.

    Returns:
        ``(n_rows, n_cols)`` bool, True where OpenCV evaluates the window. A window that
        is not visited is never reported, whatever its cascade outcome.
    """
    rej = np.asarray(stage0_rejected, dtype=bool)
    visited = np.ones_like(rej)
    for j in range(1, rej.shape[1]):
        visited[:, j] = ~(visited[:, j - 1] & rej[:, j - 1])
    return visited


def positions_to_skip(stage0_rejected: np.ndarray) -> np.ndarray:
    """Complement of :func:`apply_skip_rule`: positions OpenCV jumps over."""
    return ~apply_skip_rule(stage0_rejected)


@dataclass
class ScanOutcome:
    """Raw candidates of a plaintext scan plus the statistics the protocol needs.

    ``reject_hist[k]`` counts visited, evaluated windows rejected by stage ``k``
    (``reject_hist[n_stages]``: passed every stage).
    """

    candidates: np.ndarray  # (m, 4) int32 boxes before grouping
    positions: int = 0
    low_contrast: int = 0
    skipped: int = 0
    stage0_rejected_all: int = 0  # stage-0 rejections among all evaluable windows
    reject_hist: np.ndarray | None = None


def scan_plain(
    gray: np.ndarray, cascade: Cascade, params: ScanParams = ScanParams()
) -> ScanOutcome:
    """Scan + plaintext cascade + skip rule: OpenCV's raw candidate boxes."""
    hist = np.zeros(cascade.n_stages + 1, dtype=np.int64)
    out = ScanOutcome(candidates=np.zeros((0, 4), np.int32), reject_hist=hist)
    found = []
    for batch in scan_windows(gray, cascade, params):
        ok = ~batch.low_contrast
        idx = np.flatnonzero(ok)
        # Stage 0 on every evaluable window: the skip rule needs it row by row.
        stage0 = np.zeros(batch.n, dtype=bool)
        s0 = rejection_stages(cascade, batch.pixels[idx], batch.norm_factors[idx], 0, 1)
        stage0[idx] = s0 == 0
        visited = apply_skip_rule(stage0.reshape(batch.n_rows, batch.n_cols)).ravel()
        todo = np.flatnonzero(visited & ok & ~stage0)
        rs = rejection_stages(cascade, batch.pixels[todo], batch.norm_factors[todo], 1)
        hits = todo[rs == cascade.n_stages]
        found.append(batch.rects[hits])
        out.positions += batch.n
        out.low_contrast += int((~ok).sum())
        out.skipped += int((~visited).sum())
        out.stage0_rejected_all += int(stage0.sum())
        hist[0] += int((visited & stage0).sum())
        hist += np.bincount(rs, minlength=cascade.n_stages + 1)
    if found:
        out.candidates = np.concatenate(found).astype(np.int32)
    return out


def group_boxes(
    rects: np.ndarray, min_neighbors: int, image_size: tuple[int, int] | None = None
) -> np.ndarray:
    """Group raw candidates as detectMultiScale does, then clip to the image.

    ``cv2.groupRectangles(rects, min_neighbors, 0.2)`` (no grouping when
    ``min_neighbors <= 0``), then ``clipObjects``: intersection with the image, boxes
    of empty intersection dropped. Returns ``(k, 4)`` int32 ``x, y, w, h``.
    """
    rects = np.asarray(rects, dtype=np.int32).reshape(-1, 4)
    if min_neighbors > 0 and len(rects):
        grouped, _ = cv2.groupRectangles(rects.tolist(), int(min_neighbors), GROUP_EPS)
        rects = np.asarray(grouped, dtype=np.int32).reshape(-1, 4)
    if image_size is not None and len(rects):
        w, h = image_size
        x0 = np.maximum(rects[:, 0], 0)
        y0 = np.maximum(rects[:, 1], 0)
        x1 = np.minimum(rects[:, 0] + rects[:, 2], w)
        y1 = np.minimum(rects[:, 1] + rects[:, 3], h)
        keep = (x1 > x0) & (y1 > y0)
        rects = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1)[keep].astype(np.int32)
    return rects


def detect_plain(
    gray: np.ndarray, cascade: Cascade, params: ScanParams = ScanParams()
) -> list[tuple[int, int, int, int]]:
    """Plaintext detection through the linear functionals: equals detectMultiScale.

    Returns boxes ``(x, y, w, h)`` sorted (OpenCV's own order depends on its thread
    scheduling; the set is what is reproduced).
    """
    gray = _as_gray(gray)
    outcome = scan_plain(gray, cascade, params)
    boxes = group_boxes(outcome.candidates, params.min_neighbors, (gray.shape[1], gray.shape[0]))
    return sorted((int(x), int(y), int(w), int(h)) for x, y, w, h in boxes)
