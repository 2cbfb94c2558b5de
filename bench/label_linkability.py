"""What an honest-but-curious server learns from ASPE-encrypted label vectors and queries.

A family of 6-8 members backs up photos with 1-4 people each (correlated: parents, kids,
grandparents, an aunt, gatherings); every label vector and query is encrypted by the
phone's own functions (client/pipeline/photos.py: encrypt_labels, encrypt_query) under a
fresh label key made as `privface family create` makes it. Then the server's attacks:

1. Ciphertext-only linkability of stored label vectors (no key, no query, nothing known):
   PCA + k-means, ICA + k-means, and a structural attack that uses the linear form of ASPE
   (ciphertext = fixed map of [label vector] + fixed map of [fresh randomness]: the
   randomness lives in one fixed subspace W, so photos with the same label set lie on
   parallel translates of W). It finds W from any cluster whose points are affinely
   dependent, projects W out and groups identical points. Scored by the adjusted Rand
   index (ARI) against the true label sets; k = the true number of label sets is given
   to the k-means attacks.
2. The same attack on libraries of other sizes and on keys with more noise dims (a format
   change, measured to size the recommendation, not shipped).
3. Queries: two queries for the same people are linkable by their score vectors over the
   stored photos; q unknown queries group the photos by how many queried people each holds.
4. Known plaintext: how many known (label vector, ciphertext) pairs decrypt every other
   label vector (least squares alone, or after the structural attack), and how many known
   label vectors decrypt every query.

Medians over 5 seeds (the phone's encryption randomness is not seeded, as in the app, so
figures move a little between runs). About 2-4 minutes on 2 busy cores.

    .venv/bin/python bench/label_linkability.py --json bench/results/linkability.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# One BLAS thread, as the server runs: on 2 cores, threads only fight (k-means, ICA).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sklearn.cluster import KMeans  # type: ignore[import-untyped]
from sklearn.decomposition import PCA, FastICA  # type: ignore[import-untyped]
from sklearn.exceptions import ConvergenceWarning  # type: ignore[import-untyped]
from sklearn.metrics import adjusted_rand_score  # type: ignore[import-untyped]

from bench.common import print_table, write_json
from client.keystore import FamilyBundle
from client.pipeline import photos
from common import aspe, labels, photo_crypto

CAPACITY = labels.DEFAULT_CAPACITY
LabelSet = tuple[int, ...]

# Roles of a family of n members (slots 0..n-1, as the roster hands them out).
_ROLES = {
    6: {"parents": [0, 1], "kids": [2, 3], "grandparents": [4, 5], "aunt": []},
    7: {"parents": [0, 1], "kids": [2, 3, 4], "grandparents": [5, 6], "aunt": []},
    8: {"parents": [0, 1], "kids": [2, 3, 4], "grandparents": [5, 6], "aunt": [7]},
}


def _scenes(members: int) -> list[tuple[float, dict[int, float]]]:
    """Kinds of photo with their weight and each member's chance to be in one."""
    r = _ROLES[members]
    kids, parents, grand, aunt = r["kids"], r["parents"], r["grandparents"], r["aunt"]
    scenes = [
        (0.30, dict.fromkeys(kids, 0.55)),                                   # the kids
        (0.20, dict.fromkeys(parents, 0.5) | dict.fromkeys(kids, 0.4)),      # parent + kids
        (0.12, dict.fromkeys(parents, 0.8)),                                 # the couple
        (0.15, dict.fromkeys(grand, 0.7) | dict.fromkeys(kids, 0.3)),        # grandparents
        (0.15, dict.fromkeys(range(members), 0.35)),                         # gatherings
    ]
    if aunt:
        scenes.append((0.08, dict.fromkeys(aunt, 0.9) | dict.fromkeys(kids, 0.3)))
    return scenes


def family_photos(rng: np.random.Generator, n: int, members: int) -> list[LabelSet]:
    """n photos' label sets: 1-4 people each, correlated through scenes."""
    scenes = _scenes(members)
    weights = np.array([w for w, _ in scenes])
    weights /= weights.sum()
    out: list[LabelSet] = []
    while len(out) < n:
        probs = scenes[rng.choice(len(scenes), p=weights)][1]
        people = [m for m, p in probs.items() if rng.random() < p]
        if not people:
            continue
        if len(people) > 4:
            people = [int(m) for m in rng.choice(people, 4, replace=False)]
        out.append(tuple(sorted(people)))
    return out


def family_queries(rng: np.random.Generator, n: int, members: int
                   ) -> list[tuple[LabelSet, labels.MatchMode]]:
    """n searches: mostly one or two people, all-of mostly, sometimes any-of."""
    r = _ROLES[members]
    favourites = [(k,) for k in r["kids"]] + [tuple(r["parents"]), tuple(r["grandparents"])]
    out = []
    for _ in range(n):
        if rng.random() < 0.6:
            people = favourites[rng.integers(len(favourites))]
        else:
            size = int(rng.integers(1, 4))
            people = tuple(sorted(int(m) for m in rng.choice(members, size, replace=False)))
        mode = labels.MatchMode.ALL if rng.random() < 0.8 else labels.MatchMode.ANY
        out.append((people, mode))
    return out


def new_bundle(rng: np.random.Generator, noise_dim: int = aspe.DEFAULT_NOISE_DIM
               ) -> FamilyBundle:
    """A family bundle whose label key is made as `privface family create` makes it
    (other noise dims only for the measured recommendation)."""
    key = aspe.generate_key(labels.label_dim(CAPACITY), noise_dim=noise_dim, rng=rng)
    return FamilyBundle(family_id="fam_bench", server="", access_token="", capacity=CAPACITY,
                        label_key=key, master_key=photo_crypto.new_master_key())


def stored_ciphertexts(bundle: FamilyBundle, sets: Sequence[LabelSet]) -> np.ndarray:
    """What the server stores: the phone's E-LV bytes, read as the server reads them."""
    return np.vstack([np.frombuffer(photos.encrypt_labels(bundle, s), "<f8") for s in sets])


def query_ciphertexts(bundle: FamilyBundle,
                      queries: Sequence[tuple[LabelSet, labels.MatchMode]]) -> np.ndarray:
    """What the server receives: the phone's E-Q bytes."""
    return np.vstack([np.frombuffer(photos.encrypt_query(bundle, s, m), "<f8")
                      for s, m in queries])


def plain_labels(sets: Sequence[LabelSet]) -> np.ndarray:
    """The true [L, 1] vectors (ground truth only)."""
    return np.vstack([labels.label_vector(s, CAPACITY) for s in sets])


def truth_ids(items: Sequence[Any]) -> np.ndarray:
    """Ground-truth cluster id of each item (equal items, equal ids)."""
    index: dict[Any, int] = {}
    return np.array([index.setdefault(item, len(index)) for item in items])


def group_identical(points: np.ndarray, digits: int = 6) -> np.ndarray:
    """Cluster ids of points equal up to `digits` significant digits of the largest value."""
    scale = float(np.abs(points).max()) or 1.0
    keys = np.round(points / scale * 10**digits).astype(np.int64)
    _, ids = np.unique(keys, axis=0, return_inverse=True)
    return ids.ravel()


def ari(truth: np.ndarray, found: np.ndarray) -> float:
    return float(adjusted_rand_score(truth, found))


# -- 1. ciphertext-only attacks on stored label vectors ----------------------------------


def whiten(ciphertexts: np.ndarray) -> np.ndarray:
    """Centred ciphertexts in orthonormal coordinates of their span, unit variance."""
    centred = ciphertexts - ciphertexts.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    rank = int((s > s[0] * 1e-9).sum())
    whitened: np.ndarray = u[:, :rank] * np.sqrt(len(centred))
    return whitened


def discreteness(sources: np.ndarray) -> np.ndarray:
    """Per column: the best 2-cluster within-variance over the total variance (0 for a
    column with two values, about 0.36 for a Gaussian)."""
    out = []
    for column in sources.T:
        x = np.sort(column)
        n = len(x)
        cs, cs2 = np.cumsum(x), np.cumsum(x * x)
        i = np.arange(1, n)
        left = cs2[:-1] - cs[:-1] ** 2 / i
        right = (cs2[-1] - cs2[:-1]) - (cs[-1] - cs[:-1]) ** 2 / (n - i)
        out.append(float((left + right).min() / (n * x.var())))
    return np.array(out)


def _affine_rank(points: np.ndarray) -> tuple[int, np.ndarray]:
    """Affine dimension of a point set and an orthonormal basis of its directions."""
    _, s, vt = np.linalg.svd(points - points.mean(axis=0), full_matrices=False)
    rank = int((s > s[0] * 1e-8).sum()) if len(s) and s[0] > 0 else 0
    return rank, vt[:rank]


def _dependent_core(points: np.ndarray) -> np.ndarray:
    """The points that take part in an affine dependency (sum a_i p_i = 0, sum a_i = 0):
    photos of one label set, once there are dim W + 2 of them; a lone photo of another
    label set adds noise in general position and takes part in none."""
    system = np.vstack([points.T, np.ones(len(points))])
    _, s, vt = np.linalg.svd(system)
    rank = int((s > s[0] * 1e-9).sum())
    null = vt[rank:]  # every affine dependency among the points
    weight = np.linalg.norm(null, axis=0)
    core: np.ndarray = points[weight > 1e-6 * max(float(weight.max()), 1e-300)]
    return core


def _trim(points: np.ndarray) -> tuple[int, np.ndarray]:
    """Drops, one at a time, points whose removal lowers the affine rank (two photos of
    another label set do take part in a dependency: their difference lies in W); returns
    the final rank and basis."""
    keep = np.arange(len(points))
    rank = _affine_rank(points)[0]
    while len(keep) > 2:
        lowest, i = min((_affine_rank(points[np.delete(keep, j)])[0], j)
                        for j in range(len(keep)))
        if lowest >= rank:
            break
        keep, rank = np.delete(keep, i), lowest
    return _affine_rank(points[keep])


def _intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Orthonormal rows spanning the intersection of two row spaces (orthonormal rows)."""
    u, s, _ = np.linalg.svd(a @ b.T)
    basis: np.ndarray = u[:, s > 1 - 1e-9].T @ a
    return basis


def structural_attack(z: np.ndarray, clusterings: Sequence[np.ndarray]
                      ) -> tuple[np.ndarray, np.ndarray] | None:
    """From rough clusterings, the randomness subspace W and the exact grouping.

    Fresh randomness enters an ASPE ciphertext linearly through fixed matrices, so the
    ciphertexts of one label set span at most dim W affine dims however many there are.
    A cluster holding dim W + 2 or more photos of one label set is therefore affinely
    dependent (rank < size - 1), which continuous noise in general position never is;
    the photos that take part in the dependencies are that label set (after dropping
    the few pairs of other sets), and their affine hull is W. A cluster of two label
    sets gives W plus one direction; intersecting the spans of several clusters removes
    it. Projecting W out leaves a point that depends only on the label vector, so the
    library collapses to one point per label set: the attacker sees it work without any
    ground truth. Returns (groups, orthonormal basis of W as rows), or None if no
    cluster was affinely dependent."""
    full_rank = z.shape[1]
    spans = []
    for clusters in clusterings:
        for c in np.unique(clusters):
            idx = np.flatnonzero(clusters == c)
            if len(idx) < 3:
                continue
            rank, _ = _affine_rank(z[idx])
            if rank >= min(len(idx) - 1, full_rank):
                continue  # affinely independent: nothing to learn from this cluster
            spans.append(_trim(_dependent_core(z[idx])))
    if not spans:
        return None
    spans.sort(key=lambda t: t[0])
    basis = spans[0][1]
    groups = group_identical(z - (z @ basis.T) @ basis)
    for _, other in spans[1:]:
        smaller = _intersection(basis, other)
        if 0 < len(smaller) < len(basis):
            trial = group_identical(z - (z @ smaller.T) @ smaller)
            if trial.max() + 1 < 0.9 * len(z):  # still collapses: W is inside
                basis, groups = smaller, trial
    return groups, basis


class Structure:
    """The ciphertext-only attacks on one library, and what they recovered."""

    def __init__(self, ciphertexts: np.ndarray, truth: np.ndarray, seed: int) -> None:
        k = int(truth.max() + 1)
        self.z = whiten(ciphertexts)
        f: dict[str, Any] = {"span_dims": self.z.shape[1], "label_sets": k,
                             "largest_label_set": int(np.bincount(truth).max())}
        f["ari_kmeans_raw"] = ari(truth, KMeans(k, n_init=2, random_state=seed)
                                  .fit_predict(ciphertexts))
        pca = PCA(self.z.shape[1], whiten=True).fit_transform(ciphertexts)
        f["ari_pca_kmeans"] = ari(truth, KMeans(k, n_init=2, random_state=seed)
                                  .fit_predict(pca))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sources = FastICA(self.z.shape[1], whiten="unit-variance", max_iter=1000,
                              tol=1e-4, random_state=seed).fit_transform(self.z)
        score = discreteness(sources)
        keep = np.flatnonzero(score < 0.3)
        if len(keep) == 0:
            keep = np.argsort(score)[:8]
        f["ica_two_valued_components"] = int((score < 0.05).sum())
        rough = [KMeans(kk, n_init=2, random_state=seed).fit_predict(sources[:, keep])
                 for kk in (k, max(2, k // 2), max(2, k // 4))]
        f["ari_ica_kmeans"] = ari(truth, rough[0])
        found = structural_attack(self.z, rough)
        self.groups: np.ndarray | None = None
        self.collapsed: np.ndarray | None = None
        if found is None:
            f.update(w_dims=None, groups_found=None, ari_structural=f["ari_ica_kmeans"])
        else:
            self.groups, basis = found
            self.collapsed = self.z - (self.z @ basis.T) @ basis
            f.update(w_dims=basis.shape[0], groups_found=int(self.groups.max() + 1),
                     ari_structural=ari(truth, self.groups))
        self.figures = f


# -- 3. queries ---------------------------------------------------------------------------


def query_linkability(scores: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """Queries grouped by their score vectors over the stored photos, up to scale."""
    unit = scores / np.linalg.norm(scores, axis=1, keepdims=True)
    groups = group_identical(unit, digits=8)
    same = truth[:, None] == truth[None, :]
    cos = unit @ unit.T
    off = ~np.eye(len(truth), dtype=bool)
    return {"queries": len(truth), "distinct_queries": int(truth.max() + 1),
            "ari_queries_by_scores": ari(truth, groups),
            "min_cos_same_query": float(cos[same & off].min()),
            "max_cos_other_query": float(cos[~same].max())}


def photos_by_unknown_queries(scores: np.ndarray, truth: np.ndarray,
                              counts: Sequence[int]) -> dict[str, float]:
    """ARI of photos grouped by their scores under the first q queries (none known)."""
    return {str(q): ari(truth, group_identical(scores[:q].T, digits=8)) for q in counts}


# -- 4. known plaintext -------------------------------------------------------------------


def _exact_rows(predicted: np.ndarray, plain: np.ndarray) -> float:
    return float(np.mean(np.all(np.abs(predicted - plain) < 0.25, axis=1)))


def threshold(fraction: Callable[[int], float], upto: int) -> int | None:
    """Smallest n whose fraction is 1 (every unknown item decrypted exactly)."""
    for n in range(1, upto + 1):
        if fraction(n) == 1.0:
            return n
    return None


def spanning_first(plain: np.ndarray, order: np.ndarray) -> np.ndarray:
    """`order` with, first, the photos that each add a dimension to the known label
    vectors (the attacker's best case: a few photos chosen to show every member)."""
    chosen: list[int] = []
    for i in order:
        if np.linalg.matrix_rank(plain[[*chosen, i]]) > len(chosen):
            chosen.append(int(i))
    rest = [int(i) for i in order if i not in set(chosen)]
    return np.array(chosen + rest)


def known_plaintext(ciphertexts: np.ndarray, plain: np.ndarray, structure: Structure,
                    scores: np.ndarray, query_plain: np.ndarray, order: np.ndarray
                    ) -> dict[str, Any]:
    """The server learns the label vectors of the first n photos of `order` (say, posted
    publicly with names): how large must n be for every other label vector, and every
    query, to be decrypted exactly?"""

    def labels_least_squares(n: int) -> float:
        k, rest = order[:n], order[n:]
        g, *_ = np.linalg.lstsq(ciphertexts[k], plain[k], rcond=None)
        return _exact_rows(ciphertexts[rest] @ g, plain[rest])

    def labels_after_structure(n: int) -> float:
        # The collapsed points are an affine image of the label vectors: fit it on the
        # known photos, apply it to all.
        if structure.collapsed is None:
            return 0.0
        k, rest = order[:n], order[n:]
        a = np.hstack([structure.collapsed, np.ones((len(plain), 1))])
        g, *_ = np.linalg.lstsq(a[k], plain[k], rcond=None)
        return _exact_rows(a[rest] @ g, plain[rest])

    def queries_from_known_labels(n: int) -> float:
        # Query j scores photo i as s_j * (x_i . y_j): least squares over the n known x_i
        # gives s_j * y_j, and the queried slots (all equal to s_j) give s_j.
        k = order[:n]
        sy, *_ = np.linalg.lstsq(plain[k], scores[:, k].T, rcond=None)
        sy = sy.T
        s = sy[:, :-1].max(axis=1, keepdims=True)
        return _exact_rows(sy / np.where(s > 0, s, 1.0), query_plain)

    upto = min(len(plain) - 1, 150)
    return {
        "labels_by_least_squares": threshold(labels_least_squares, upto),
        "labels_after_ciphertext_only_attack": threshold(labels_after_structure, upto),
        "queries_by_known_labels": threshold(queries_from_known_labels, upto),
        "least_squares_fraction": {str(n): labels_least_squares(n)
                                   for n in (5, 10, 15, 20, 25, 30, 40)},
    }


def key_geometry(bundle: FamilyBundle, rng: np.random.Generator) -> dict[str, int]:
    """Measured: dim W (spread of many encryptions of one label vector) and the dims the
    query ciphertexts span; they add up to the ciphertext's dims, so the stored side's
    randomness already fills every direction that no query can see."""
    dim = bundle.label_key.cipher_dim
    one = stored_ciphertexts(bundle, [(0, 2)] * (2 * dim))
    w = int(np.linalg.matrix_rank(one - one.mean(axis=0), tol=1e-9 * np.abs(one).max()))
    queries = []
    for _ in range(3 * dim):
        size = int(rng.integers(1, CAPACITY + 1))
        slots = tuple(int(m) for m in rng.choice(CAPACITY, size, replace=False))
        mode = labels.MatchMode.ALL if rng.random() < 0.5 else labels.MatchMode.ANY
        queries.append((slots, mode))
    q = query_ciphertexts(bundle, queries)
    span = int(np.linalg.matrix_rank(q, tol=1e-9 * np.abs(q).max()))
    return {"w_true": w, "query_span": span, "cipher_dim": dim}


# -- driver -------------------------------------------------------------------------------


def one_library(seed: int, members: int, n_photos: int, noise_dim: int,
                n_queries: int = 0) -> dict[str, Any]:
    """Encrypts one family's library (and queries) and runs the attacks."""
    rng = np.random.default_rng(seed)
    bundle = new_bundle(rng, noise_dim)
    sets = family_photos(rng, n_photos, members)
    truth = truth_ids(sets)
    stored = stored_ciphertexts(bundle, sets)
    start = time.perf_counter()
    structure = Structure(stored, truth, seed)
    out = dict(structure.figures, seed=seed, members=members, photos=n_photos,
               noise_dim=noise_dim)
    out["attack_s"] = time.perf_counter() - start
    out.update(key_geometry(bundle, rng))
    if n_queries:
        queries = family_queries(rng, n_queries, members)
        qct = query_ciphertexts(bundle, queries)
        scores = aspe.evaluate(stored, qct)  # what MAT computes, (queries, photos)
        # The server's answers equal the plaintext matches (the leak is exactly the answer).
        plain = plain_labels(sets)
        q_plain = np.vstack([labels.query_vector(s, CAPACITY, m) for s, m in queries])
        assert np.array_equal(scores > 0, q_plain @ plain.T > 0)
        # Same query = same plaintext vector (a one-person all-of query equals the any-of
        # one; the mode travels in clear anyway).
        out["queries"] = query_linkability(scores, truth_ids([tuple(v) for v in q_plain]))
        out["photos_by_unknown_queries"] = photos_by_unknown_queries(
            scores, truth, (1, 2, 4, 8, 16, 32))
        order = rng.permutation(len(sets))
        out["known_random"] = known_plaintext(stored, plain, structure, scores, q_plain,
                                              order)
        out["known_chosen"] = known_plaintext(stored, plain, structure, scores, q_plain,
                                              spanning_first(plain, order))
    return out


def median(values: Sequence[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    seeds = range(args.seeds)
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}

    print(f"1. Ciphertext-only linkability, {args.photos} photos, capacity {CAPACITY}, "
          f"shipped key ({aspe.DEFAULT_NOISE_DIM} noise dims); ARI, median of "
          f"{args.seeds} seeds\n")
    rows = []
    for members in (6, 7, 8):
        name = f"family{members}"
        runs[name] = [one_library(s, members, args.photos, aspe.DEFAULT_NOISE_DIM,
                                  args.queries if members == 8 else 0) for s in seeds]
        rows.append(_row(f"{members} members", runs[name]))
    headers = ["library", "label sets", "largest set", "span dims", "dim W", "W found",
               "k-means raw", "PCA+k-means", "ICA+k-means", "structural", "exact runs"]
    print_table(headers, rows)
    every = [r for name in runs for r in runs[name]]
    print(f"\ndim W + dims spanned by queries = ciphertext dims in "
          f"{sum(r['w_true'] + r['query_span'] == r['cipher_dim'] for r in every)} of "
          f"{len(every)} keys: the stored randomness already fills every direction no "
          "query sees")

    print("\n2. Structural attack vs library size (8 members) and noise dims "
          "(noise dims > 4 change the key format: measured, not shipped)\n")
    rows = []
    for n in (150, 300, 600):
        name = f"family8_photos{n}"
        runs[name] = [one_library(s, 8, n, aspe.DEFAULT_NOISE_DIM) for s in seeds]
        rows.append(_row(f"{n} photos", runs[name]))
    for nd in (16, 32):
        name = f"family8_noise{nd}"
        runs[name] = [one_library(s, 8, args.photos, nd) for s in seeds]
        rows.append(_row(f"noise dims {nd}", runs[name]))
    print_table(headers, rows)

    base = runs["family8"]
    print(f"\n3. Queries ({args.queries} searches of the 8-member family, 1-3 people, "
          "all-of or any-of), median of seeds\n")
    q = [r["queries"] for r in base]
    print_table(["distinct queries", "ARI, queries by score vectors",
                 "min cos same query", "max cos other query"],
                [[median([x["distinct_queries"] for x in q]),
                  median([x["ari_queries_by_scores"] for x in q]),
                  f"{median([x['min_cos_same_query'] for x in q]):.12f}",
                  f"{median([x['max_cos_other_query'] for x in q]):.4f}"]])
    print("\nphotos grouped by their scores under q unknown queries (ARI vs true label sets)")
    counts = list(base[0]["photos_by_unknown_queries"])
    print_table(["q", *counts], [["ARI", *[median([r["photos_by_unknown_queries"][c]
                                                    for r in base]) for c in counts]]])

    print("\n4. Known plaintext (8 members): smallest number n of known photos (label "
          "vector + ciphertext) after which every other label vector / every query is "
          "decrypted exactly\n")
    rows = []
    for which, title in (("known_random", "random known photos"),
                         ("known_chosen", "photos chosen to span the labels")):
        kp = [r[which] for r in base]
        rows.append([title, median([x["labels_by_least_squares"] for x in kp]),
                     median([x["labels_after_ciphertext_only_attack"] for x in kp]),
                     median([x["queries_by_known_labels"] for x in kp])])
    print_table(["known photos", "labels: least squares alone",
                 "labels: after the ciphertext-only attack", "every query"], rows)
    print(f"(span dims {median([r['span_dims'] for r in base])}: least squares alone needs "
          "span dims + 1 known photos in general position)")
    kp = [r["known_random"] for r in base]
    curve = list(kp[0]["least_squares_fraction"])
    print("\nleast squares alone, random known photos: fraction of the others decrypted "
          "exactly")
    print_table(["known", *curve], [["fraction", *[median([x["least_squares_fraction"][c]
                                                           for x in kp]) for c in curve]]])
    elapsed = time.perf_counter() - started
    print(f"\n{elapsed:.0f} s")
    write_json(args.json, {"runs": runs, "seeds": args.seeds, "photos": args.photos,
                           "capacity": CAPACITY, "seconds": elapsed})


def _row(name: str, runs: Sequence[dict[str, Any]]) -> list[Any]:
    def m(key: str) -> Any:
        return median([r[key] for r in runs])
    return [name, m("label_sets"), m("largest_label_set"), m("span_dims"), m("w_true"),
            m("w_dims"),
            m("ari_kmeans_raw"), m("ari_pca_kmeans"), m("ari_ica_kmeans"),
            m("ari_structural"),
            f"{sum(r['ari_structural'] == 1.0 for r in runs)}/{len(runs)}"]


if __name__ == "__main__":
    main()
