"""Parity of the linear-functional Haar detector with OpenCV, plus window statistics.

For every usable photo of ../shared/data (group photos, people, and a sample of LFW):

* boxes of ``detect_plain`` vs ``cv2.CascadeClassifier.detectMultiScale`` (matched,
  extra, missing), and raw candidates (``min_neighbors=0``) of both;
* the scan statistics the secure protocol needs: scan positions, low-contrast windows,
  positions skipped by the stage-0 rule, how many visited windows each stage rejects,
  how many pass every stage;
* float precision: for every weak classifier evaluated along the cascade, the decision
  of the float64 linear form ``y.x - theta*nf < 0`` against OpenCV's float32 arithmetic,
  and the smallest margins ``|y.x - theta*nf| / nf``.

Usage::

    python bench/cascade_parity.py --json out/cascade_parity.json [--limit N] [--lfw 60]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from client.pipeline.windows import (  # noqa: E402
    ScanParams,
    apply_skip_rule,
    detect_plain,
    group_boxes,
    scan_windows,
)
from common.cascade import (  # noqa: E402
    Cascade,
    default_cascade_path,
    feature_values,
    linear_margins,
    load_cascade,
    opencv_weak_decisions,
    stage_scores,
    weak_decisions,
)

DATA = ROOT.parent / "shared" / "data"
NEAR_TIE_LEVELS = (1e-12, 1e-9, 1e-7, 1e-6, 1e-4)


def photo_list(lfw_count: int) -> list[Path]:
    """Group photos, people, two-people photos, then an evenly spread LFW sample."""
    photos = DATA / "photos"
    files: list[Path] = []
    for pattern in ("dlib_examples_group/*", "group_*/*", "people/*/*"):
        files += sorted(
            p for p in photos.glob(pattern) if p.suffix.lower() in {".jpg", ".jpeg", ".png"}
        )
    lfw = sorted((DATA / "lfw" / "images").glob("*/*.jpg"))
    if lfw and lfw_count > 0:
        idx = np.linspace(0, len(lfw) - 1, num=min(lfw_count, len(lfw))).astype(int)
        files += [lfw[i] for i in idx]
    return files


@dataclass
class Precision:
    """Decisions of the float64 linear form against OpenCV's float32 arithmetic."""

    decisions: int = 0
    mismatch_linear: int = 0  # naive float64 y.x - theta*nf < 0 (adjusted theta) vs OpenCV
    mismatch_exact: int = 0  # exact evaluation (weak_decisions) vs OpenCV
    exact_ties: int = 0  # S*v exactly on the float32 rounding boundary of the threshold
    mismatch_naive: int = 0  # y.x - t*nf < 0 with the plain float32 threshold t
    min_rel_margin: float = float("inf")
    min_abs_margin: float = float("inf")
    near_ties: dict[float, int] = field(default_factory=lambda: {lv: 0 for lv in NEAR_TIE_LEVELS})

    def add(
        self, cascade: Cascade, px: np.ndarray, nf: np.ndarray, v: np.ndarray, sl: slice
    ) -> None:
        s = feature_values(cascade, px, sl)
        lin = linear_margins(cascade, px, nf, sl)
        ref = opencv_weak_decisions(cascade, px, v, sl)
        exact = weak_decisions(cascade, px, nf, sl)
        naive = s - cascade.raw_thresholds[sl][None, :] * nf[:, None] < 0
        rel = np.abs(lin) / nf[:, None]
        self.decisions += lin.size
        self.mismatch_linear += int(((lin < 0) != ref).sum())
        self.mismatch_exact += int((exact != ref).sum())
        self.mismatch_naive += int((naive != ref).sum())
        # S*v is exact in float64; a tie is S*v on OpenCV's float32 rounding boundary.
        prod = s * (1.0 / nf).astype(np.float32).astype(np.float64)[:, None]
        theta = cascade.thresholds[sl][None, :]
        self.exact_ties += int((np.abs(prod - theta) <= np.spacing(theta)).sum())
        if lin.size:
            self.min_rel_margin = min(self.min_rel_margin, float(rel.min()))
            self.min_abs_margin = min(self.min_abs_margin, float(np.abs(lin).min()))
        for lv in NEAR_TIE_LEVELS:
            self.near_ties[lv] += int((rel < lv).sum())


    def merge(self, other: Precision) -> None:
        for k in ("decisions", "mismatch_linear", "mismatch_exact", "mismatch_naive",
                  "exact_ties"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.min_rel_margin = min(self.min_rel_margin, other.min_rel_margin)
        self.min_abs_margin = min(self.min_abs_margin, other.min_abs_margin)
        for lv in NEAR_TIE_LEVELS:
            self.near_ties[lv] += other.near_ties[lv]


@dataclass
class PhotoStats:
    positions: int = 0
    low_contrast: int = 0
    skipped: int = 0
    stage0_rejected_all: int = 0
    reject_hist: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    candidates: list = field(default_factory=list)


def scan_with_diagnostics(
    gray: np.ndarray, cascade: Cascade, params: ScanParams, prec: Precision
) -> PhotoStats:
    """Same logic as ``client.pipeline.windows.scan_plain``, instrumented."""
    st = PhotoStats(reject_hist=np.zeros(cascade.n_stages + 1, np.int64))
    for b in scan_windows(gray, cascade, params):
        ok = ~b.low_contrast
        st.positions += b.n
        st.low_contrast += int((~ok).sum())
        alive = np.flatnonzero(ok)
        stage_of = np.full(b.n, -1, np.int64)  # -1: low contrast / not evaluated
        visited = np.ones(b.n, dtype=bool)
        for stage in range(cascade.n_stages):
            if alive.size == 0:
                break
            sl = cascade.stage_slice(stage)
            px, nf, v = b.pixels[alive], b.norm_factors[alive], b.inv_norm_factors[alive]
            prec.add(cascade, px, nf, v, sl)
            dead = stage_scores(cascade, stage, px, nf) < cascade.stage_thresholds[stage]
            stage_of[alive[dead]] = stage
            alive = alive[~dead]
            if stage == 0:
                # Apply the skip rule once stage 0 is known, as the server would.
                rej0 = (stage_of == 0).reshape(b.n_rows, b.n_cols)
                visited = apply_skip_rule(rej0).ravel()
                st.skipped += int((~visited).sum())
                st.stage0_rejected_all += int(rej0.sum())
                alive = alive[visited[alive]]
        stage_of[alive] = cascade.n_stages
        visited_eval = visited & ok
        counted = stage_of[visited_eval]
        st.reject_hist += np.bincount(counted[counted >= 0], minlength=cascade.n_stages + 1)
        st.candidates.append(b.rects[alive])
    return st


def as_set(rects) -> set[tuple[int, int, int, int]]:
    return {(int(x), int(y), int(w), int(h)) for x, y, w, h in np.asarray(rects).reshape(-1, 4)}


def load_gray(path: Path, max_width: int) -> np.ndarray | None:
    img = cv2.imread(str(path))
    if img is None:
        return None
    gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if max_width and gray.shape[1] > max_width:
        h = round(gray.shape[0] * max_width / gray.shape[1])
        gray = cv2.resize(gray, (max_width, h), interpolation=cv2.INTER_AREA)
    return gray


def run_photo(
    path: Path, gray: np.ndarray, cascade: Cascade, ocv: cv2.CascadeClassifier,
    params: ScanParams, prec: Precision,
) -> dict:
    """Everything measured on one photo, as a JSON-ready dict."""
    size = (gray.shape[1], gray.shape[0])
    photo_prec = Precision()
    st = scan_with_diagnostics(gray, cascade, params, photo_prec)
    prec.merge(photo_prec)
    cand = np.concatenate(st.candidates) if st.candidates else np.zeros((0, 4), np.int32)
    ours = as_set(group_boxes(cand, params.min_neighbors, size))
    # Timed separately: the instrumented scan above does much more work.
    t0 = time.perf_counter()
    plain = detect_plain(gray, cascade, params)
    t_ours = time.perf_counter() - t0
    if set(plain) != ours:
        raise AssertionError(f"{path}: detect_plain differs from the instrumented scan")
    t0 = time.perf_counter()
    ref = as_set(ocv.detectMultiScale(gray, params.scale_factor, params.min_neighbors,
                                      minSize=params.min_size))
    t_cv = time.perf_counter() - t0
    raw_ref = as_set(ocv.detectMultiScale(gray, params.scale_factor, 0, minSize=params.min_size))
    # detectMultiScale clips its raw candidates to the image too (clipObjects).
    raw_ours = as_set(group_boxes(cand, 0, size))
    return dict(
        photo=str(path.relative_to(DATA)), width=size[0], height=size[1],
        positions=st.positions, low_contrast=st.low_contrast, skipped=st.skipped,
        stage0_rejected_all=st.stage0_rejected_all,
        reject_hist=st.reject_hist.tolist(), passed_all=int(st.reject_hist[-1]),
        boxes_opencv=len(ref), boxes_ours=len(ours), matched=len(ours & ref),
        extra=len(ours - ref), missing=len(ref - ours),
        raw_opencv=len(raw_ref), raw_ours=len(raw_ours), raw_matched=len(raw_ours & raw_ref),
        raw_extra=len(raw_ours - raw_ref),
        min_rel_margin=photo_prec.min_rel_margin, linear_mismatches=photo_prec.mismatch_linear,
        t_ours_s=round(t_ours, 4), t_opencv_s=round(t_cv, 4),
    )


HEADER = (f"{'photo':42s} {'size':>9s} {'windows':>9s} {'cv':>3s} {'ours':>4s} {'match':>5s} "
          f"{'extra':>5s} {'miss':>4s} {'raw ok':>9s} {'t ours':>7s} {'t cv':>6s}")


def print_row(r: dict) -> None:
    raw_ok = f"{r['raw_matched']}/{r['raw_opencv']}"
    print(f"{r['photo'][-42:]:42s} {r['width']:4d}x{r['height']:<4d} {r['positions']:9d} "
          f"{r['boxes_opencv']:3d} {r['boxes_ours']:4d} {r['matched']:5d} {r['extra']:5d} "
          f"{r['missing']:4d} {raw_ok:>9s} {r['t_ours_s']:7.2f} {r['t_opencv_s']:6.3f}", flush=True)


def summarise(rows: list[dict], prec: Precision, n_stages: int) -> dict:
    """Totals over all photos; printed and returned for the JSON file."""
    def total(key: str) -> int:
        return int(sum(r[key] for r in rows))

    hist = np.sum([r["reject_hist"] for r in rows], axis=0).astype(np.int64)
    evaluated = int(hist.sum())
    positions = total("positions")
    out = dict(
        photos=len(rows),
        parity_boxes_matched=total("matched"), parity_boxes_total=total("boxes_opencv"),
        parity_extra_boxes=total("extra"), parity_missing_boxes=total("missing"),
        parity_raw_candidates_matched=total("raw_matched"),
        parity_raw_candidates_total=total("raw_opencv"), parity_raw_extra=total("raw_extra"),
        time_detect_plain_s=round(sum(r["t_ours_s"] for r in rows), 3),
        time_opencv_s=round(sum(r["t_opencv_s"] for r in rows), 3),
        windows=dict(positions=positions, low_contrast=total("low_contrast"),
                     skipped=total("skipped"), stage0_rejected_all=total("stage0_rejected_all"),
                     evaluated=evaluated, reject_hist=hist.tolist()),
        precision=dict(decisions=prec.decisions, mismatch_linear=prec.mismatch_linear,
                       mismatch_exact=prec.mismatch_exact,
                       mismatch_plain_threshold=prec.mismatch_naive, exact_ties=prec.exact_ties,
                       min_rel_margin=prec.min_rel_margin, min_abs_margin=prec.min_abs_margin,
                       near_ties={f"{lv:g}": n for lv, n in prec.near_ties.items()}),
    )
    pct = lambda n, d: f"{n / max(d, 1):.2%}"  # noqa: E731
    print()
    print(f"photos: {len(rows)}; boxes matched {out['parity_boxes_matched']}/"
          f"{out['parity_boxes_total']}, extra {out['parity_extra_boxes']}, missing "
          f"{out['parity_missing_boxes']}; raw candidates (minNeighbors=0) matched "
          f"{out['parity_raw_candidates_matched']}/{out['parity_raw_candidates_total']}, "
          f"extra {out['parity_raw_extra']}")
    print(f"time: detect_plain {out['time_detect_plain_s']:.1f} s (numpy, one thread), "
          f"OpenCV detectMultiScale {out['time_opencv_s']:.2f} s")
    w = out["windows"]
    print(f"windows: {positions} scan positions; low contrast {w['low_contrast']} "
          f"({pct(w['low_contrast'], positions)}); skipped by the stage-0 rule {w['skipped']} "
          f"({pct(w['skipped'], positions)}); evaluated {evaluated} ({pct(evaluated, positions)})")
    print(f"stage 0 rejects {w['stage0_rejected_all']} of the "
          f"{positions - w['low_contrast']} windows that are not low contrast "
          f"({pct(w['stage0_rejected_all'], positions - w['low_contrast'])})")
    print("evaluated windows by rejecting stage (share, cumulative share):")
    cum = 0
    for k, n in enumerate(hist):
        cum += int(n)
        label = f"stage {k:2d}" if k < n_stages else "passed  "
        print(f"  {label}: {int(n):10d}  {pct(n, evaluated):>7s}  cum {pct(cum, evaluated):>7s}")
    print(f"precision: {prec.decisions} weak decisions checked against OpenCV's float32: exact "
          f"evaluation {prec.mismatch_exact} mismatches; naive float64 y.x - theta*nf: "
          f"{prec.mismatch_linear}; float64 with the plain float32 threshold: "
          f"{prec.mismatch_naive}")
    print(f"exact ties S*v == theta: {prec.exact_ties}; min |y.x - theta*nf|/nf = "
          f"{prec.min_rel_margin:.3e}; min |y.x - theta*nf| = {prec.min_abs_margin:.3e}")
    print("near ties, |y.x - theta*nf|/nf below: "
          + ", ".join(f"{lv:g}: {n}" for lv, n in prec.near_ties.items()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--json", required=True, help="write results to this JSON file")
    ap.add_argument("--limit", type=int, default=0, help="at most N photos (0 = all)")
    ap.add_argument("--lfw", type=int, default=60, help="LFW images to include (default 60)")
    ap.add_argument("--max-width", type=int, default=0, help="downscale wider photos (0 = no)")
    ap.add_argument("--scale-factor", type=float, default=1.1)
    ap.add_argument("--min-neighbors", type=int, default=3)
    ap.add_argument("--min-size", type=int, default=0)
    args = ap.parse_args(argv)

    if not (DATA / "photos").is_dir():
        print(f"../shared/data is absent: {DATA} not found", file=sys.stderr)
        return 2
    cascade = load_cascade()
    ocv = cv2.CascadeClassifier(default_cascade_path())
    params = ScanParams(args.scale_factor, args.min_neighbors, (args.min_size, args.min_size))
    files = photo_list(args.lfw)
    if args.limit:
        files = files[: args.limit]

    prec = Precision()
    rows = []
    print(HEADER)
    for path in files:
        gray = load_gray(path, args.max_width)
        if gray is None:
            continue
        rows.append(run_photo(path, gray, cascade, ocv, params, prec))
        print_row(rows[-1])
    out = dict(cascade=cascade.name, opencv_version=cv2.__version__,
               params=dict(scale_factor=params.scale_factor,
                           min_neighbors=params.min_neighbors, min_size=list(params.min_size)),
               **summarise(rows, prec, cascade.n_stages), per_photo=rows)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    ok = out["parity_boxes_matched"] == out["parity_boxes_total"] and not out["parity_extra_boxes"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
