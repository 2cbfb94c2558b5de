"""OpenCV Haar cascades as linear functionals over window pixels.

A stump-based Haar cascade (OpenCV's "new" XML format, e.g.
``haarcascade_frontalface_alt.xml``: 22 stages, 2135 weak classifiers, 20x20 window)
is turned into one weight vector ``y`` per weak classifier over the ``win_h*win_w``
pixels of a detection window (row-major), so that the Haar feature value of a window
``x`` is the inner product ``y . x``. Each weak classifier then decides

    left  if  y . x - theta * nf < 0      else  right

where ``nf`` is the window's variance normalisation factor (see
``client.pipeline.windows`` for how the phone computes it) and ``theta`` is the
classifier's threshold. Leaf values are summed per stage and the stage passes when the
sum is ``>= stage_threshold``; a window is a detection when it passes every stage.
This is exactly the form the secure protocol evaluates as ``c * (y . x - theta * nf)``.

Exactness with respect to OpenCV (4.x, ``predictOrderedStump`` / ``HaarEvaluator``):

* OpenCV computes ``value = float32(S * v)`` with ``S = y . x`` (an integer: the rect
  sums of an integral image times integer weights, exact in float32) and
  ``v = float32(1 / nf_true)``, and goes left when ``value < t`` with ``t`` the
  float32 threshold of the XML. Because ``float32`` rounding is monotone, that is the
  same as ``S * v < m`` for the real number ``m`` halfway between ``t`` and the next
  float32 below it (ties go to the even neighbour, so ``<=`` when ``t``'s mantissa is
  odd). ``S * v`` is a product of two float32 numbers and therefore exact in float64,
  so :attr:`Cascade.thresholds` stores that boundary (nudged one float64 step up when
  the tie goes left) and the float64 test ``S * v < theta`` reproduces OpenCV's float32
  decision bit for bit. :attr:`Cascade.raw_thresholds` keeps the plain float32 values.
* Windows carry ``nf = 1 / v`` (float64). The plaintext reference here evaluates the
  linear inequality exactly (as ``S * v < theta``, recovering ``v = float32(1/nf)``),
  so it never depends on rounding. The same inequality computed naively in float64,
  ``S - theta * nf < 0`` (:func:`linear_margins`), agrees except at exact ties
  ``S * v == theta``: they do occur on real photos (2 in 2.3e9 weak decisions over
  141 photos) and then the sign is decided by rounding or, in the encrypted protocol,
  by the evaluation noise. ``bench/cascade_parity.py`` counts them and the near ties.
* Stage sums are accumulated in float64, in classifier order, from float32 leaf values,
  and compared with ``float32(stage_threshold - 1e-5f)``, as OpenCV does.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "Cascade",
    "CascadeError",
    "default_cascade_path",
    "evaluate_windows",
    "feature_values",
    "inv_norm_factors",
    "linear_margins",
    "load_cascade",
    "opencv_weak_decisions",
    "rejection_stages",
    "stage_scores",
    "weak_decisions",
]

DEFAULT_CASCADE = "haarcascade_frontalface_alt.xml"
# OpenCV subtracts this (as float32) from every stage threshold when loading.
_STAGE_THRESHOLD_EPS = np.float32(1e-5)
# float32 holds every integer below 2**24 exactly: if |y|_1 * 255 stays below it, a
# float32 matrix product of integer pixels and integer weights is exact.
_FLOAT32_EXACT_LIMIT = 2**24


class CascadeError(ValueError):
    """The cascade file cannot be read or uses a feature this module does not support."""


@dataclass(frozen=True, eq=False)
class Cascade:
    """A stump-based Haar cascade flattened into per-pixel weight vectors.

    Attributes:
        name: file stem of the cascade (e.g. ``haarcascade_frontalface_alt``).
        window_size: ``(width, height)`` of the detection window in pixels.
        weights: ``(n_weak, h*w)`` float64, weak classifier ``i``'s feature as pixel
            weights over the row-major window.
        thresholds: ``(n_weak,)`` float64 decision boundaries ``theta`` such that
            ``S * v < theta`` <=> OpenCV goes left (see module docstring).
        raw_thresholds: ``(n_weak,)`` the float32 node thresholds of the XML.
        left_values, right_values: ``(n_weak,)`` float32 leaf values (as float64).
        stage_ends: ``(n_stages,)`` index after the last weak classifier of each stage.
        stage_thresholds: ``(n_stages,)`` float32 ``stageThreshold - 1e-5`` (as float64).
        feature_rects: per weak classifier, the XML rects ``(x, y, w, h, weight)``.
    """

    name: str
    window_size: tuple[int, int]
    weights: np.ndarray
    thresholds: np.ndarray
    raw_thresholds: np.ndarray
    left_values: np.ndarray
    right_values: np.ndarray
    stage_ends: np.ndarray
    stage_thresholds: np.ndarray
    feature_rects: tuple[tuple[tuple[int, int, int, int, float], ...], ...]
    # float32 copy of ``weights`` when a float32 product with uint8 pixels is exact
    # (integer weights, |y|_1 * 255 < 2**24), else None. Set by load_cascade.
    weights_f32: np.ndarray | None = None

    @property
    def n_weak(self) -> int:
        return int(self.weights.shape[0])

    @property
    def n_stages(self) -> int:
        return int(self.stage_ends.shape[0])

    @property
    def n_pixels(self) -> int:
        return int(self.weights.shape[1])

    def stage_slice(self, stage: int) -> slice:
        """Indices of the weak classifiers of ``stage``."""
        start = 0 if stage == 0 else int(self.stage_ends[stage - 1])
        return slice(start, int(self.stage_ends[stage]))



def default_cascade_path() -> str:
    """Path of OpenCV's bundled ``haarcascade_frontalface_alt.xml``."""
    import cv2.data  # local import: common must not need OpenCV just to parse a file

    return str(Path(cv2.data.haarcascades) / DEFAULT_CASCADE)


def _split_boundary(t: np.float32) -> float:
    """Largest float64 ``theta`` with ``float32(z) < t`` <=> ``z < theta`` for float64 z.

    The rounding boundary between ``t`` and its float32 predecessor ``p`` is their
    midpoint (exact in float64). A real number exactly on it rounds to whichever of
    ``p``/``t`` has an even mantissa: when that is ``p`` the midpoint itself goes left,
    so the strict test needs the next float64 above the midpoint.
    """
    t = np.float32(t)
    p = np.nextafter(t, np.float32(-np.inf), dtype=np.float32)
    mid = (float(p) + float(t)) / 2.0
    p_even = (int(p.view(np.uint32)) & 1) == 0
    return float(np.nextafter(mid, np.inf)) if p_even else mid


def _floats(text: str | None) -> list[float]:
    return [float(tok) for tok in (text or "").split()]


def _required(node: ET.Element, tag: str, where: str) -> ET.Element:
    child = node.find(tag)
    if child is None:
        raise CascadeError(f"{where}: missing <{tag}>")
    return child


def load_cascade(path: str | Path | None = None) -> Cascade:
    """Parse an OpenCV cascade XML (new format) into a :class:`Cascade`.

    Args:
        path: the XML file; ``None`` loads OpenCV's ``haarcascade_frontalface_alt.xml``.

    Raises:
        CascadeError: unreadable file, old-format cascade, LBP/HOG features, tilted
            Haar features or weak classifiers that are not single-split stumps.
    """
    path = Path(path) if path is not None else Path(default_cascade_path())
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise CascadeError(f"cannot read cascade {path}: {exc}") from exc

    cascade_node = root.find("cascade")
    if cascade_node is None:
        # Old format (<haarcascade_... type_id="opencv-haar-classifier">) or not a cascade.
        first = root[0].tag if len(root) else "nothing"
        raise CascadeError(
            f"{path.name}: no <cascade> node (found <{first}>); only OpenCV's new cascade "
            "format is supported (convert old cascades with opencv_traincascade's tools)"
        )
    where = path.name
    stage_type = (_required(cascade_node, "stageType", where).text or "").strip()
    if stage_type != "BOOST":
        raise CascadeError(f"{where}: stage type {stage_type!r} is not supported (BOOST only)")
    feature_type = (_required(cascade_node, "featureType", where).text or "").strip()
    if feature_type != "HAAR":
        raise CascadeError(
            f"{where}: {feature_type} features are not supported: only HAAR features are "
            "linear in the window pixels"
        )
    win_w = int(_required(cascade_node, "width", where).text or 0)
    win_h = int(_required(cascade_node, "height", where).text or 0)
    if win_w <= 2 or win_h <= 2:
        raise CascadeError(f"{where}: bad window size {win_w}x{win_h}")
    feature_params = cascade_node.find("featureParams")
    max_cat = feature_params.find("maxCatCount") if feature_params is not None else None
    if max_cat is not None and int(max_cat.text or 0) > 0:
        raise CascadeError(f"{where}: categorical (LBP-style) nodes are not supported")

    # Weak classifiers, stage by stage.
    feature_idx: list[int] = []
    raw_thr: list[np.float32] = []
    lefts: list[float] = []
    rights: list[float] = []
    stage_ends: list[int] = []
    stage_thr: list[float] = []
    stages = _required(cascade_node, "stages", where)
    for si, stage in enumerate(stages.findall("_")):
        s_where = f"{where}: stage {si}"
        st = np.float32(float(_required(stage, "stageThreshold", s_where).text or "nan"))
        stage_thr.append(float(np.float32(st - _STAGE_THRESHOLD_EPS)))
        weaks = _required(stage, "weakClassifiers", s_where).findall("_")
        if not weaks:
            raise CascadeError(f"{s_where}: no weak classifiers")
        for wi, weak in enumerate(weaks):
            w_where = f"{s_where}, weak classifier {wi}"
            nodes = _floats(_required(weak, "internalNodes", w_where).text)
            leaves = _floats(_required(weak, "leafValues", w_where).text)
            if len(nodes) != 4 or len(leaves) != 2:
                raise CascadeError(
                    f"{w_where}: {len(nodes) // 4 if len(nodes) % 4 == 0 else len(nodes)} "
                    "internal nodes; only stump (single split, two leaves) cascades are "
                    "supported"
                )
            left, right, fidx, thr = nodes
            if (left, right) != (0.0, -1.0):
                raise CascadeError(f"{w_where}: unexpected stump layout {nodes[:2]}")
            feature_idx.append(int(fidx))
            raw_thr.append(np.float32(thr))
            lefts.append(float(np.float32(leaves[0])))
            rights.append(float(np.float32(leaves[1])))
        stage_ends.append(len(feature_idx))
    if not stage_ends:
        raise CascadeError(f"{where}: no stages")

    # Features: up to three weighted rects each, never tilted.
    features = _required(cascade_node, "features", where).findall("_")
    rect_lists: list[tuple[tuple[int, int, int, int, float], ...]] = []
    for fi, feat in enumerate(features):
        f_where = f"{where}: feature {fi}"
        tilted = feat.find("tilted")
        if tilted is not None and int(tilted.text or 0) != 0:
            raise CascadeError(
                f"{f_where}: tilted (45 degree) Haar features are not supported"
            )
        rects = []
        for rect in _required(feat, "rects", f_where).findall("_"):
            vals = _floats(rect.text)
            if len(vals) != 5:
                raise CascadeError(f"{f_where}: bad rect {rect.text!r}")
            x, y, w, h = (int(v) for v in vals[:4])
            if x < 0 or y < 0 or w <= 0 or h <= 0 or x + w > win_w or y + h > win_h:
                raise CascadeError(f"{f_where}: rect {vals[:4]} outside the {win_w}x{win_h} window")
            rects.append((x, y, w, h, float(np.float32(vals[4]))))
        if not 1 <= len(rects) <= 3:
            raise CascadeError(f"{f_where}: {len(rects)} rects (OpenCV reads 1 to 3)")
        rect_lists.append(tuple(rects))

    n_weak = len(feature_idx)
    weights: np.ndarray = np.zeros((n_weak, win_h, win_w), dtype=np.float64)
    feature_rects = []
    for i, fidx in enumerate(feature_idx):
        if not 0 <= fidx < len(rect_lists):
            raise CascadeError(f"{where}: weak classifier {i} uses missing feature {fidx}")
        for x, y, w, h, wt in rect_lists[fidx]:
            weights[i, y : y + h, x : x + w] += wt
        feature_rects.append(rect_lists[fidx])
    weights = weights.reshape(n_weak, win_h * win_w)
    integral = bool(np.all(weights == np.round(weights)))
    f32_exact = integral and float(np.abs(weights).sum(axis=1).max()) * 255.0 < _FLOAT32_EXACT_LIMIT

    def frozen(a: np.ndarray) -> np.ndarray:
        a = np.ascontiguousarray(a)
        a.setflags(write=False)
        return a

    return Cascade(
        name=path.stem,
        window_size=(win_w, win_h),
        weights=frozen(weights),
        thresholds=frozen(np.array([_split_boundary(t) for t in raw_thr], dtype=np.float64)),
        raw_thresholds=frozen(np.array(raw_thr, dtype=np.float32).astype(np.float64)),
        left_values=frozen(np.array(lefts, dtype=np.float64)),
        right_values=frozen(np.array(rights, dtype=np.float64)),
        stage_ends=frozen(np.array(stage_ends, dtype=np.int64)),
        stage_thresholds=frozen(np.array(stage_thr, dtype=np.float64)),
        feature_rects=tuple(feature_rects),
        weights_f32=frozen(weights.astype(np.float32)) if f32_exact else None,
    )


# ----------------------------------------------------------------------------- evaluation


def _operand(cascade: Cascade, pixels: np.ndarray) -> np.ndarray:
    """Pixels in the dtype used for the products: float32 when provably exact."""
    if cascade.weights_f32 is not None and pixels.dtype == np.uint8:
        return pixels.astype(np.float32)
    return np.asarray(pixels, dtype=np.float64)


def _products(cascade: Cascade, operand: np.ndarray, weak: slice | np.ndarray) -> np.ndarray:
    weights_f32 = cascade.weights_f32
    # float32 operands are only made by _operand, from uint8 pixels, when weights_f32 exists.
    if operand.dtype == np.float32 and weights_f32 is not None:
        # einsum, not BLAS: these products are skinny and many, and a threaded BLAS
        # spends more time waking threads than computing (18x slower on a busy 2-core
        # machine). Sums of integers below 2**24 are exact in any order.
        prod: np.ndarray = np.einsum("ij,kj->ik", operand, weights_f32[weak], optimize=False)
        return prod.astype(np.float64)
    products: np.ndarray = operand @ cascade.weights[weak].T
    return products


def feature_values(cascade: Cascade, pixels: np.ndarray, weak: slice | np.ndarray) -> np.ndarray:
    """``y . x`` for the selected weak classifiers: ``(n, k)`` float64, exact integers.

    Uses a float32 matrix product when that is provably exact (uint8 pixels, integer
    weights, small L1 norm: true for OpenCV's Haar cascades), float64 otherwise.
    """
    return _products(cascade, _operand(cascade, pixels), weak)


def weak_decisions(
    cascade: Cascade, pixels: np.ndarray, norm_factors: np.ndarray, weak: slice | np.ndarray
) -> np.ndarray:
    """Left/right of each selected weak classifier: ``(n, k)`` bool, True = left.

    Decides ``y . x - theta * nf < 0`` exactly (see :func:`_decide`), which is OpenCV's
    float32 decision bit for bit.
    """
    return _decide(cascade, _operand(cascade, pixels), norm_factors, weak)


def linear_margins(
    cascade: Cascade, pixels: np.ndarray, norm_factors: np.ndarray, weak: slice | np.ndarray
) -> np.ndarray:
    """``y . x - theta * nf`` in plain float64, ``(n, k)``: what the server sees, up to ``c``.

    Its sign is the weak decision (negative = left) except at float64 rounding level:
    exact ties ``S * v == theta`` do occur on real photos (about one per 10**9
    decisions, because ``S * v`` and the float32 rounding boundary are both short binary
    numbers), and any noise added by an encrypted evaluation decides them.
    """
    s = feature_values(cascade, pixels, weak)
    return s - cascade.thresholds[weak][None, :] * np.asarray(norm_factors, np.float64)[:, None]


def inv_norm_factors(norm_factors: np.ndarray) -> np.ndarray:
    """OpenCV's ``v = float32(1 / nf)`` (float64 array of float32 values).

    Works for the true ``nf`` (that is how OpenCV rounds it) and for ``nf = 1 / v`` as
    windows carry it: the float64 round trip is far inside float32's half ulp.
    """
    return (1.0 / np.asarray(norm_factors, dtype=np.float64)).astype(np.float32).astype(np.float64)


def _decide(
    cascade: Cascade, operand: np.ndarray, norm_factors: np.ndarray, weak: slice | np.ndarray
) -> np.ndarray:
    """Exact evaluation of ``y . x - theta * nf < 0`` with ``nf = 1 / v``.

    Multiplying by ``v > 0`` gives ``S * v < theta``; ``S`` (integer below 2**20) times
    ``v`` (24-bit mantissa) is exact in float64, so no rounding decides a tie.
    """
    s = _products(cascade, operand, weak)
    v = inv_norm_factors(norm_factors)[:, None]
    decisions: np.ndarray = s * v < cascade.thresholds[weak][None, :]
    return decisions


def stage_scores(
    cascade: Cascade, stage: int, pixels: np.ndarray, norm_factors: np.ndarray
) -> np.ndarray:
    """Sum of the leaf values of ``stage`` for each window, ``(n,)`` float64.

    Summed in classifier order (not numpy's pairwise order) so that sums equal
    OpenCV's sequential double accumulation bit for bit.
    """
    return _stage_scores(cascade, stage, _operand(cascade, pixels), norm_factors)


def _stage_scores(
    cascade: Cascade, stage: int, operand: np.ndarray, norm_factors: np.ndarray
) -> np.ndarray:
    sl = cascade.stage_slice(stage)
    left = _decide(cascade, operand, norm_factors, sl)
    leaves = np.where(left, cascade.left_values[sl], cascade.right_values[sl])
    total = np.zeros(leaves.shape[0], dtype=np.float64)
    for j in range(leaves.shape[1]):
        total += leaves[:, j]
    return total


def rejection_stages(
    cascade: Cascade,
    pixels: np.ndarray,
    norm_factors: np.ndarray,
    first_stage: int = 0,
    last_stage: int | None = None,
) -> np.ndarray:
    """Index of the stage that rejects each window, ``n_stages`` when all pass.

    Evaluates stage by stage, each stage only on the windows still alive, over stages
    ``first_stage .. last_stage - 1`` (default: all). Windows alive after ``last_stage``
    get ``last_stage``.

    Args:
        pixels: ``(n, win_h*win_w)`` window pixels (uint8 or float), row-major.
        norm_factors: ``(n,)`` variance normalisation factors ``nf`` (float64).
    """
    last = cascade.n_stages if last_stage is None else last_stage
    n = pixels.shape[0]
    out = np.full(n, last, dtype=np.int32)
    alive = np.arange(n)
    nf = np.asarray(norm_factors, dtype=np.float64)
    operand = _operand(cascade, pixels)  # converted once, not per stage
    for stage in range(first_stage, last):
        if alive.size == 0:
            break
        rows = operand if alive.size == n else operand[alive]
        scores = _stage_scores(cascade, stage, rows, nf[alive])
        dead = scores < cascade.stage_thresholds[stage]
        out[alive[dead]] = stage
        alive = alive[~dead]
    return out


def evaluate_windows(cascade: Cascade, pixels: np.ndarray, norm_factors: np.ndarray) -> np.ndarray:
    """Plaintext reference of the whole cascade: ``(n,)`` bool, True = passes all stages.

    ``norm_factors`` may be OpenCV's true ``nf`` or ``1 / v`` as windows carry it; both
    give OpenCV's ``v``. Low-contrast windows must be filtered out by the caller (OpenCV
    never evaluates them). Batch large inputs: memory is ``n x 400`` float32.
    """
    passed: np.ndarray = rejection_stages(cascade, pixels, norm_factors) == cascade.n_stages
    return passed


def opencv_weak_decisions(
    cascade: Cascade, pixels: np.ndarray, inv_norm_factors: np.ndarray, weak: slice | np.ndarray
) -> np.ndarray:
    """OpenCV's own float32 arithmetic, for checking the linear form: True = left.

    ``float32(float32(S) * v) < float32(t)`` with ``v = float32(1/nf)`` as
    ``HaarEvaluator::operator()`` computes it.
    """
    s = feature_values(cascade, pixels, weak).astype(np.float32)
    v = np.asarray(inv_norm_factors, dtype=np.float32)[:, None]
    value = s * v  # float32 * float32 -> float32, one rounding as in C++
    return value < cascade.raw_thresholds[weak].astype(np.float32)[None, :]
