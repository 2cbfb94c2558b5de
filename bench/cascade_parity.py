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
from client.pipeline.windows import (  # noqa: E402
    ScanParams,
    apply_skip_rule,
    group_boxes,
    scan_windows,
)

DATA = ROOT.parent / "shared" / "data"
NEAR_TIE_LEVELS = (1e-12, 1e-9, 1e-7, 1e-6, 1e-4)


def photo_list(lfw_count: int) -> list[Path]:
    """Group photos, people, two-people photos, then an evenly spread LFW sample."""
    photos = DATA / "photos"
    files: list[Path] = []
    for pattern in ("dlib_examples_group/*", "group_*/*", "people/*/*"):
        files += sorted(p for p in photos.glob(pattern) if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
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

    def add(self, cascade: Cascade, px: np.ndarray, nf: np.ndarray, v: np.ndarray, sl: slice) -> None:
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
    return {tuple(int(v) for v in r) for r in np.asarray(rects).reshape(-1, 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="write results to this JSON file")
    ap.add_argument("--limit", type=int, default=0, help="at most N photos (0 = all)")
    ap.add_argument("--lfw", type=int, default=60, help="LFW images to include (default 60)")
    ap.add_argument("--max-width", type=int, default=0, help="downscale wider photos (0 = no)")
    ap.add_argument("--scale-factor", type=float, default=1.1)
    ap.add_argument("--min-neighbors", type=int, default=3)
    ap.add_argument("--min-size", type=int, default=0)
    args = ap.parse_args(argv)

    if not DATA.is_dir():
        print(f"../shared/data is absent: {DATA}", file=sys.stderr)
        return 2
    cascade = load_cascade()
    ocv = cv2.CascadeClassifier(default_cascade_path())
    params = ScanParams(args.scale_factor, args.min_neighbors, (args.min_size, args.min_size))
    files = photo_list(args.lfw)
    if args.limit:
        files = files[: args.limit]

    prec = Precision()
    rows = []
    tot = dict(matched=0, total=0, extra=0, missing=0, raw_matched=0, raw_total=0, raw_extra=0,
               t_ours=0.0, t_cv=0.0)
    hist_all = np.zeros(cascade.n_stages + 1, np.int64)
    agg = dict(positions=0, low_contrast=0, skipped=0, stage0_rejected_all=0)
    hdr = f"{'photo':42s} {'size':>9s} {'windows':>9s} {'cv':>3s} {'ours':>4s} {'match':>5s} {'extra':>5s} {'miss':>4s} {'raw ok':>7s} {'t ours':>7s} {'t cv':>6s}"
    print(hdr)
    for path in files:
        img = cv2.imread(str(path))
        if img is None:
            continue
        gray = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
        if args.max_width and gray.shape[1] > args.max_width:
            h = round(gray.shape[0] * args.max_width / gray.shape[1])
            gray = cv2.resize(gray, (args.max_width, h), interpolation=cv2.INTER_AREA)
        photo_prec = Precision()
        t0 = time.perf_counter()
        st = scan_with_diagnostics(gray, cascade, params, photo_prec)
        cand = np.concatenate(st.candidates) if st.candidates else np.zeros((0, 4), np.int32)
        ours = as_set(group_boxes(cand, params.min_neighbors, (gray.shape[1], gray.shape[0])))
        t_ours = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = as_set(ocv.detectMultiScale(gray, params.scale_factor, params.min_neighbors,
                                           minSize=params.min_size))
        t_cv = time.perf_counter() - t0
        raw_ref = as_set(ocv.detectMultiScale(gray, params.scale_factor, 0, minSize=params.min_size))
        # detectMultiScale clips its raw candidates to the image too (clipObjects).
        raw_ours = as_set(group_boxes(cand, 0, (gray.shape[1], gray.shape[0])))
        matched = len(ours & ref)
        row = dict(
            photo=str(path.relative_to(DATA)), width=gray.shape[1], height=gray.shape[0],
            positions=st.positions, low_contrast=st.low_contrast, skipped=st.skipped,
            stage0_rejected_all=st.stage0_rejected_all,
            reject_hist=st.reject_hist.tolist(), passed_all=int(st.reject_hist[-1]),
            boxes_opencv=len(ref), boxes_ours=len(ours), matched=matched,
            extra=len(ours - ref), missing=len(ref - ours),
            raw_opencv=len(raw_ref), raw_ours=len(raw_ours), raw_matched=len(raw_ours & raw_ref),
            min_rel_margin=photo_prec.min_rel_margin, linear_mismatches=photo_prec.mismatch_linear,
            t_ours_s=round(t_ours, 4), t_opencv_s=round(t_cv, 4),
        )
        rows.append(row)
        for k in ("decisions", "mismatch_linear", "mismatch_exact", "mismatch_naive", "exact_ties"):
            setattr(prec, k, getattr(prec, k) + getattr(photo_prec, k))
        prec.min_rel_margin = min(prec.min_rel_margin, photo_prec.min_rel_margin)
        prec.min_abs_margin = min(prec.min_abs_margin, photo_prec.min_abs_margin)
        for lv in NEAR_TIE_LEVELS:
            prec.near_ties[lv] += photo_prec.near_ties[lv]
        tot["matched"] += matched
        tot["total"] += len(ref)
        tot["extra"] += len(ours - ref)
        tot["missing"] += len(ref - ours)
        tot["raw_matched"] += len(raw_ours & raw_ref)
        tot["raw_total"] += len(raw_ref)
        tot["raw_extra"] += len(raw_ours - raw_ref)
        tot["t_ours"] += t_ours
        tot["t_cv"] += t_cv
        hist_all += st.reject_hist
        for k in agg:
            agg[k] += row[k]
        raw_ok = f"{len(raw_ours & raw_ref)}/{len(raw_ref)}"
        print(f"{row['photo'][-42:]:42s} {gray.shape[1]:4d}x{gray.shape[0]:<4d} {st.positions:9d} "
              f"{len(ref):3d} {len(ours):4d} {matched:5d} {len(ours - ref):5d} {len(ref - ours):4d} "
              f"{raw_ok:>7s} {t_ours:7.2f} {t_cv:6.3f}", flush=True)

    visited_eval = int(hist_all.sum())
    print()
    print(f"photos: {len(rows)}  boxes matched {tot['matched']}/{tot['total']}, extra {tot['extra']}, "
          f"missing {tot['missing']}; raw candidates matched {tot['raw_matched']}/{tot['raw_total']}, "
          f"extra {tot['raw_extra']}")
    print(f"time: detect_plain {tot['t_ours']:.1f} s, OpenCV detectMultiScale {tot['t_cv']:.2f} s")
    print(f"windows: {agg['positions']} positions, {agg['low_contrast']} low contrast "
          f"({agg['low_contrast'] / max(agg['positions'], 1):.1%}), {agg['skipped']} skipped by the "
          f"stage-0 rule ({agg['skipped'] / max(agg['positions'], 1):.1%}), {visited_eval} evaluated")
    print("rejected by stage (share of evaluated windows, cumulative):")
    cum = 0
    for k, n in enumerate(hist_all):
        cum += n
        label = f"stage {k:2d}" if k < cascade.n_stages else "passed  "
        if k < 6 or k >= cascade.n_stages - 1:
            print(f"  {label}: {n:10d}  {n / max(visited_eval, 1):8.4%}  cum {cum / max(visited_eval, 1):8.4%}")
    print(f"precision: {prec.decisions} weak decisions; float64 linear form vs OpenCV float32: "
          f"{prec.mismatch_linear} mismatches (exact evaluation: {prec.mismatch_exact}; plain "
          f"float32 threshold: {prec.mismatch_naive}); min |y.x - theta*nf|/nf = {prec.min_rel_margin:.3e}, "
          f"min |y.x - theta*nf| = {prec.min_abs_margin:.3e}")
    print(f"exact ties (S*v == theta): {prec.exact_ties}")
    print("near ties (|y.x - theta*nf|/nf below): "
          + ", ".join(f"{lv:g}: {n}" for lv, n in prec.near_ties.items()))

    out = dict(
        cascade=cascade.name, params=dict(scale_factor=params.scale_factor,
                                          min_neighbors=params.min_neighbors,
                                          min_size=list(params.min_size)),
        opencv_version=cv2.__version__, photos=len(rows),
        parity_boxes_matched=tot["matched"], parity_boxes_total=tot["total"],
        parity_extra_boxes=tot["extra"], parity_missing_boxes=tot["missing"],
        parity_raw_candidates_matched=tot["raw_matched"], parity_raw_candidates_total=tot["raw_total"],
        parity_raw_extra=tot["raw_extra"],
        time_detect_plain_s=round(tot["t_ours"], 3), time_opencv_s=round(tot["t_cv"], 3),
        windows=dict(agg, evaluated=visited_eval, reject_hist=hist_all.tolist()),
        precision=dict(decisions=prec.decisions, mismatch_linear=prec.mismatch_linear,
                       mismatch_exact_product=prec.mismatch_exact,
                       mismatch_plain_threshold=prec.mismatch_naive, exact_ties=prec.exact_ties,
                       min_rel_margin=prec.min_rel_margin, min_abs_margin=prec.min_abs_margin,
                       near_ties={f"{lv:g}": n for lv, n in prec.near_ties.items()}),
        per_photo=rows,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return 0 if tot["matched"] == tot["total"] and tot["extra"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
