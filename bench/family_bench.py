"""A whole family end to end: encrypted search quality and cost beside the plaintext pipeline.

A family is composed from LFW (../shared/data/lfw/images), seeded:

* members: the first ``--members`` of LFW's people with the most photos (MEMBERS below);
  each member's photos are shuffled and split into enrollment photos (``--enroll``, plain
  LFW images, used as they are), held-out query faces and library faces: the three sets
  are disjoint;
* strangers: other LFW people (never enrolled), each of their images used once;
* library photos (``--photos``): 1-4 faces tiled on a canvas (cells of 250 px in a row or
  a 2x2 grid; each face the centre 190x190 of an LFW image, so background bystanders are
  cut off, possibly mirrored, scaled 0.9-1.15 and placed at a random offset in its cell,
  on a smooth random background), each face a member with probability 0.65 (a member at
  most once per photo), else a stranger; written as JPEG quality 95. Ground truth: the
  set of members placed. Rows of 3 or 4 cells are wider than 640 px, so the detector's
  working image shrinks them (faces of ~70-95 px), the 2x2 grids it keeps (~110 px);
* query photos (``--query-photos``): composed the same way from the held-out faces: one
  or two members (each member first in turn) and at most one stranger.

Encrypted pipeline (the product): the real privface server (in this process on port 0
over TLS with a development certificate and a temp data dir; or ``--server``, trusted
through PRIVFACE_TLS_CA), a fresh product key and the encrypted
``haarcascade_frontalface_alt`` published with the vendor token (on ``--server`` under its
own detector id, so the server's other product keys stay valid), ``FamilySession.create``,
``import_product_key``, ``enroll`` per member, ``backup(paths, people=None)`` (secure
detection in the default mode, embeddings, encrypted matching, encrypted labels, AES-GCM
upload), ``search(names)`` and ``search_by_photo(path)``.

Plaintext pipeline (the reference, no server): the same working image and scan parameters
with ``cv2.CascadeClassifier.detectMultiScale``, face_recognition embeddings of those
boxes, numpy distances to the same enrollment embeddings, the product's own decision on
them (``faces.decide``: nearest member within ``faces.MATCH_TOLERANCE``),
numpy label matching with common.labels' vectors (all-of: L.Q > lambda - 1/2).

Queries: every set of 1, 2 and 3 members with at least one relevant library photo
(relevant = photos whose ground truth contains all of them), and every query photo
(relevant = photos containing all the members it shows, by ground truth; the pipeline
itself decides who it shows). Precision, recall and F1 per query, then the mean over the
queries of a kind (macro); an empty answer counts as precision 0.

Usage::

    python bench/family_bench.py --json bench/results/family.json [--members 6]
        [--photos 150] [--seed 1] [--quick] [--server HOST:PORT --vendor-token-file F]
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import print_table, start_local_server, write_json  # noqa: E402
from client import rpc as rpc_mod  # noqa: E402
from client import vendor  # noqa: E402
from client.config import ClientConfig  # noqa: E402
from client.pipeline import faces as faces_mod  # noqa: E402
from client.pipeline import labelling, recognize  # noqa: E402
from client.pipeline.detect import MODES, DetectionMode, working_image  # noqa: E402
from client.rpc import PrivfaceClient  # noqa: E402
from client.session import FamilySession  # noqa: E402
from common import labels  # noqa: E402
from common import secure_cascade as sc  # noqa: E402
from common.cascade import default_cascade_path, load_cascade  # noqa: E402
from common.errors import PrivfaceError  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
LFW = DATA / "lfw" / "images"
MEMBERS = ["George_W_Bush", "Colin_Powell", "Tony_Blair", "Ariel_Sharon", "Hugo_Chavez",
           "Junichiro_Koizumi", "Jean_Chretien", "John_Ashcroft", "Serena_Williams",
           "Vladimir_Putin", "Laura_Bush", "Arnold_Schwarzenegger"]
CELL = 250  # canvas cell per face
CROP = (30, 220)  # the centre 190x190 of a 250x250 LFW image: the face, not bystanders
FACES_P = {1: 0.2, 2: 0.3, 3: 0.25, 4: 0.25}  # faces per library photo
MEMBER_P = 0.65  # probability that a face is a member's
DETECTOR_ID = "frontalface_alt"
BENCH_DETECTOR_ID = "frontalface_alt-family-bench"  # on a shared server: never replaces
# the demo family's own product


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def med(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# -- composition ---------------------------------------------------------------------------


@dataclass
class Placed:
    """One face on a composed photo: whose LFW image, where (x0, y0, x1, y1)."""

    person: str
    image: str
    mirrored: bool
    member: bool
    rect: tuple[int, int, int, int]


@dataclass
class Composed:
    """A composed photo and its ground truth."""

    name: str
    path: Path
    layout: str
    size: tuple[int, int]  # width, height
    faces: list[Placed]

    @property
    def members(self) -> frozenset[str]:
        return frozenset(f.person for f in self.faces if f.member)

    @property
    def strangers(self) -> int:
        return sum(not f.member for f in self.faces)


@dataclass
class Family:
    members: list[str]
    enroll: dict[str, list[Path]]
    library: list[Composed]
    queries: list[Composed]
    reuse: dict[str, int]  # library face uses beyond each member's distinct (image, mirror)


class FacePool:
    """A member's faces handed out in a seeded order: every image, then every mirror image,
    then again (counted as reuse)."""

    def __init__(self, images: list[Path], rng: np.random.Generator) -> None:
        self.variants = [(p, False) for p in images] + [(p, True) for p in images]
        self.order = [self.variants[i] for i in rng.permutation(len(self.variants))]
        self.used = 0

    def take(self) -> tuple[Path, bool]:
        out = self.order[self.used % len(self.order)]
        self.used += 1
        return out

    @property
    def reuse(self) -> int:
        return max(0, self.used - len(self.order))


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    base = rng.uniform(40, 215, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx / w + np.sin(angle) * yy / h)[..., None] * rng.uniform(-40, 40, 3)
    blotch = cv2.resize(rng.normal(0, 12, (max(1, h // 50), max(1, w // 50), 3)).astype(
        np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    return np.clip(base + ramp + blotch, 0, 255).astype(np.uint8)


def _tile(path: Path, mirrored: bool, rng: np.random.Generator) -> np.ndarray:
    img = cv2.imread(str(path))
    if img is None:
        raise SystemExit(f"cannot read {path}")
    if mirrored:
        img = img[:, ::-1]
    a, b = CROP
    face = np.ascontiguousarray(img[a:b, a:b])
    side = round((b - a) * rng.uniform(0.9, 1.15))
    interp = cv2.INTER_AREA if side < b - a else cv2.INTER_LINEAR
    return cv2.resize(face, (side, side), interpolation=interp)


def _grid(k: int, rng: np.random.Generator) -> tuple[str, int, int]:
    """(layout name, rows, cols) for k faces."""
    choices = {1: [(1, 1)], 2: [(1, 2), (2, 1)], 3: [(1, 3), (2, 2)], 4: [(2, 2), (1, 4)]}[k]
    rows, cols = choices[int(rng.integers(len(choices)))]
    return f"{rows}x{cols}", rows, cols


def compose_photo(name: str, out_dir: Path, faces: list[tuple[str, Path, bool, bool]],
                  rng: np.random.Generator) -> Composed:
    """Tiles ``faces`` (person, image, mirrored, member) on a canvas, in random cells."""
    layout, rows, cols = _grid(len(faces), rng)
    h, w = rows * CELL, cols * CELL
    canvas = _background(rng, h, w)
    cells = rng.permutation(rows * cols)[:len(faces)]
    placed = []
    for (person, path, mirrored, member), cell in zip(faces, cells, strict=True):
        tile = _tile(path, mirrored, rng)
        t = tile.shape[0]
        r, c = divmod(int(cell), cols)
        y = r * CELL + int(rng.integers(0, CELL - t + 1))
        x = c * CELL + int(rng.integers(0, CELL - t + 1))
        canvas[y:y + t, x:x + t] = tile
        placed.append(Placed(person, str(path.relative_to(LFW)), mirrored, member,
                             (x, y, x + t, y + t)))
    path = out_dir / f"{name}.jpg"
    cv2.imwrite(str(path), canvas, [cv2.IMWRITE_JPEG_QUALITY, 95])
    return Composed(name, path, layout, (w, h), placed)


def compose_family(n_members: int, n_photos: int, n_queries: int, n_enroll: int,
                   seed: int, out_dir: Path) -> Family:
    """The seeded family: enrollment photos, library photos and query photos."""
    rng = np.random.default_rng(seed)
    members = MEMBERS[:n_members]
    enroll: dict[str, list[Path]] = {}
    held_out: dict[str, FacePool] = {}
    library_pool: dict[str, FacePool] = {}
    per_member_queries = -(-n_queries // n_members) * 2  # first in its own, maybe in others
    for m in members:
        images = sorted((LFW / m).glob("*.jpg"))
        images = [images[i] for i in rng.permutation(len(images))]
        q = min(per_member_queries, 4)
        if len(images) < n_enroll + q + 5:
            raise SystemExit(f"{m} has only {len(images)} images")
        enroll[m] = images[:n_enroll]
        held_out[m] = FacePool(images[n_enroll:n_enroll + q], rng)
        library_pool[m] = FacePool(images[n_enroll + q:], rng)
    excluded = set(MEMBERS)
    strangers = sorted(p for d in LFW.iterdir() if d.is_dir() and d.name not in excluded
                       for p in d.glob("*.jpg"))
    stranger_order = iter(rng.permutation(len(strangers)).tolist())

    def stranger() -> tuple[str, Path, bool, bool]:
        p = strangers[next(stranger_order)]
        return (p.parent.name, p, bool(rng.integers(2)), False)

    out_dir.mkdir(parents=True, exist_ok=True)
    library = []
    ks = np.array(sorted(FACES_P))
    for i in range(n_photos):
        k = int(rng.choice(ks, p=[FACES_P[int(v)] for v in ks]))
        n_mem = min(int((rng.random(k) < MEMBER_P).sum()), n_members)
        chosen = [members[j] for j in rng.permutation(n_members)[:n_mem]]
        faces = [(m, *library_pool[m].take(), True) for m in chosen]
        faces += [stranger() for _ in range(k - n_mem)]
        faces = [faces[j] for j in rng.permutation(k)]
        library.append(compose_photo(f"photo_{i:04d}", out_dir, faces, rng))

    queries = []
    for i in range(n_queries):
        first = members[i % n_members]
        who = [first]
        if n_members > 1 and rng.random() < 0.4:
            others = [m for m in members if m != first]
            second = others[int(rng.integers(len(others)))]
            if any({first, second} <= p.members for p in library):
                who.append(second)
        faces = [(m, *held_out[m].take(), True) for m in who]
        if rng.random() < 0.5:
            faces.append(stranger())
        faces = [faces[j] for j in rng.permutation(len(faces))]
        queries.append(compose_photo(f"query_{i:03d}", out_dir, faces, rng))
    reuse = {m: library_pool[m].reuse for m in members}
    return Family(members, enroll, library, queries, reuse)


# -- the plaintext pipeline ----------------------------------------------------------------


@dataclass
class PlainFace:
    box: recognize.Box  # (top, right, bottom, left)
    name: str | None
    distance: float


@dataclass
class PlainResult:
    faces: list[PlainFace]
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return sorted({f.name for f in self.faces if f.name is not None})


class PlainPipeline:
    """The same steps on the phone alone: OpenCV, face_recognition, numpy."""

    def __init__(self, members: list[str], capacity: int, mode: DetectionMode) -> None:
        self.classifier = cv2.CascadeClassifier(default_cascade_path())
        self.mode = mode
        self.params = mode.params
        self.members = list(members)
        self.slot = {m: i for i, m in enumerate(members)}
        self.capacity = capacity
        self.gallery = np.zeros((0, recognize.EMBEDDING_DIM))
        self.gallery_names: list[str] = []

    def enroll(self, name: str, paths: Sequence[Path]) -> int:
        """The faces ``FamilySession.enroll`` would add (same function, same photos)."""
        added = 0
        for photo in labelling.enrollment_faces(list(paths)):
            if photo.face is not None:
                self.gallery = np.vstack([self.gallery, photo.face.embedding])
                self.gallery_names.append(name)
                added += 1
        return added

    def detect(self, rgb: np.ndarray) -> list[recognize.Box]:
        """detectMultiScale on the secure detection mode's working image, boxes mapped back
        as SecureDetector maps them."""
        gray = cv2.cvtColor(rgb[:, :, ::-1].copy(), cv2.COLOR_BGR2GRAY)
        work, scale = working_image(gray, self.mode.working_long_side)
        p = self.params
        found = self.classifier.detectMultiScale(
            work, scaleFactor=p.scale_factor, minNeighbors=p.min_neighbors,
            minSize=p.min_size, maxSize=p.max_size or (0, 0))
        boxes = sorted(tuple(round(v / scale) for v in b) for b in found)
        return [(y, x + w, y + h, x) for x, y, w, h in boxes]

    def label(self, path: Path) -> PlainResult:
        timings = {}
        rgb = recognize.load_rgb(path)
        start = time.perf_counter()
        boxes = self.detect(rgb)
        timings["detection"] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        emb = recognize.face_embeddings(rgb, boxes)
        timings["embedding"] = (time.perf_counter() - start) * 1000
        start = time.perf_counter()
        faces = []
        entry_slots = [self.slot[n] for n in self.gallery_names]
        for box, e in zip(boxes, emb, strict=True):
            d = np.linalg.norm(self.gallery - e, axis=1)
            slot, dist = faces_mod.decide(d, entry_slots)  # the product's rule, same function
            faces.append(PlainFace(box, None if slot is None else self.members[slot], dist))
        timings["matching"] = (time.perf_counter() - start) * 1000
        return PlainResult(faces, timings)

    def label_matrix(self, names_per_photo: Sequence[Sequence[str]]) -> np.ndarray:
        return np.array([labels.label_vector([self.slot[n] for n in names], self.capacity)
                         for names in names_per_photo]).reshape(-1, self.capacity + 1)

    def search(self, matrix: np.ndarray, names: Sequence[str]) -> np.ndarray:
        """Indices of photos matching all of ``names`` (common.labels' all-of rule)."""
        q = labels.query_vector([self.slot[n] for n in names], self.capacity,
                                labels.MatchMode.ALL)
        return np.flatnonzero(matrix @ q > 0)


# -- instrumentation of the encrypted pipeline ---------------------------------------------


class Meter:
    """Bytes of secure detection and encrypted matching, and each photo's PhotoLabelling,
    by wrapping the functions the session calls."""

    def __init__(self, session: FamilySession) -> None:
        self.det_up = self.det_down = self.match_up = self.match_down = 0
        self.labellings: dict[Path, labelling.PhotoLabelling] = {}
        real_run = rpc_mod.DetectionStream.run
        real_match = session.client.match_faces
        real_label = labelling.label_photo

        def run(stream, windows, count, encoding, first_stage, prefix):
            answer = real_run(stream, windows, count, encoding, first_stage, prefix)
            self.det_up += answer.request_bytes
            self.det_down += len(answer.outcomes)
            return answer

        def match(faces):
            self.match_up += sum(len(ct) for f in faces for ct in f)
            replies = real_match(faces)
            self.match_down += sum(len(r.ciphertext) for r in replies)
            return replies

        def label_photo(client, bundle, path, *args, **kwargs):
            out = real_label(client, bundle, path, *args, **kwargs)
            self.labellings[Path(path)] = out
            return out

        rpc_mod.DetectionStream.run = run  # type: ignore[method-assign]
        session.client.match_faces = match  # type: ignore[method-assign]
        labelling.label_photo = label_photo

    def snapshot(self) -> tuple[int, int, int, int]:
        return self.det_up, self.det_down, self.match_up, self.match_down


# -- metrics -------------------------------------------------------------------------------


def prf(retrieved: set[str], relevant: set[str]) -> tuple[float, float, float]:
    hit = len(retrieved & relevant)
    p = hit / len(retrieved) if retrieved else 0.0
    r = hit / len(relevant) if relevant else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def mean_prf(rows: list[dict], side: str) -> dict[str, float]:
    if not rows:
        return {"p": float("nan"), "r": float("nan"), "f1": float("nan")}
    return {k: float(np.mean([q[side][k] for q in rows])) for k in ("p", "r", "f1")}


def face_accuracy(photos: list[Composed], found: Callable[[Composed], list[tuple]]) -> dict:
    """Per placed face: detected? named right? (a box belongs to the tile holding its
    centre). ``found(photo)`` gives (box, name) pairs."""
    c = dict(member_faces=0, member_detected=0, member_named_right=0, member_named_other=0,
             member_unknown=0, stranger_faces=0, stranger_detected=0,
             stranger_named_member=0, boxes_outside_faces=0, faces_with_two_boxes=0)
    for photo in photos:
        per_face: dict[int, list[str | None]] = {}
        for (top, right, bottom, left), name in found(photo):
            cy, cx = (top + bottom) / 2, (left + right) / 2
            owner = next((i for i, f in enumerate(photo.faces)
                          if f.rect[0] <= cx < f.rect[2] and f.rect[1] <= cy < f.rect[3]), None)
            if owner is None:
                c["boxes_outside_faces"] += 1
            else:
                per_face.setdefault(owner, []).append(name)
        for i, f in enumerate(photo.faces):
            names = per_face.get(i, [])
            c["faces_with_two_boxes"] += len(names) > 1
            if f.member:
                c["member_faces"] += 1
                if names:
                    c["member_detected"] += 1
                    c["member_named_right"] += f.person in names
                    c["member_named_other"] += any(n and n != f.person for n in names)
                    c["member_unknown"] += all(n is None for n in names)
            else:
                c["stranger_faces"] += 1
                c["stranger_detected"] += bool(names)
                c["stranger_named_member"] += any(n is not None for n in names)
    return c


# -- the run -------------------------------------------------------------------------------


def start_server(data_dir: Path):
    """An in-process server over TLS (a development certificate made in data_dir/tls); this
    process's clients (ClientConfig.load()) trust its CA through PRIVFACE_TLS_CA."""
    local = start_local_server(data_dir)
    os.environ["PRIVFACE_TLS_CA"] = str(local.client_config.tls_ca)
    return local.server, local.address, local.vendor_token


def vendor_key(address: str, token: str, shared: bool) -> tuple[sc.ProductKey, float]:
    """The vendor's side: a product key and the encrypted cascade published with it."""
    start = time.perf_counter()
    cascade = load_cascade()
    key = sc.generate_product_key(BENCH_DETECTOR_ID if shared else DETECTOR_ID, cascade)
    if not token:
        raise SystemExit("publishing the detector needs the server's vendor token: "
                         "give --vendor-token-file (<data-dir>/vendor.token)")
    with PrivfaceClient(address) as client:
        vendor.publish(client, cascade, key, token)
    return key, time.perf_counter() - start


def run_plain(fam: Family, capacity: int, mode: DetectionMode
              ) -> tuple[PlainPipeline, dict[str, PlainResult]]:
    plain = PlainPipeline(fam.members, capacity, mode)
    for m in fam.members:
        plain.enroll(m, fam.enroll[m])
    results = {}
    photos = fam.library + fam.queries
    for i, photo in enumerate(photos):
        results[photo.name] = plain.label(photo.path)
        if (i + 1) % 25 == 0 or i + 1 == len(photos):
            log(f"[plaintext] {i + 1}/{len(photos)} photos labelled")
    return plain, results


def run_encrypted(fam: Family, address: str, key: sc.ProductKey, capacity: int,
                  bundle_path: Path, passphrase: str, mode: DetectionMode
                  ) -> dict[str, Any]:
    out: dict[str, Any] = {"items": {}, "queries": {}, "photo_queries": {}}
    config = ClientConfig.load(server=address, detection_mode=mode.name)
    t0 = time.perf_counter()
    session = FamilySession.create(bundle_path, passphrase, config, capacity=capacity,
                                   device_name="family bench", force=True)
    session.import_product_key(key.to_bytes())
    out["create_s"] = time.perf_counter() - t0
    meter = Meter(session)
    with session:
        t0 = time.perf_counter()
        enrolled = {}
        for m in fam.members:
            result = session.enroll(m, fam.enroll[m])
            enrolled[m] = {"used": len(result.used),
                           "skipped": [f"{p.path.name}: {p.reason}" for p in result.skipped]}
            log(f"[encrypted] enrolled {m}: {len(result.used)} faces")
        out["enroll_s"] = time.perf_counter() - t0
        out["enrolled"] = enrolled

        by_path = {p.path: p for p in fam.library}
        state: dict[str, Any] = {"t": time.perf_counter(), "bytes": meter.snapshot(), "n": 0}

        def on_item(item) -> None:
            now = time.perf_counter()
            b = meter.snapshot()
            photo = by_path[Path(item.path)]
            lab = meter.labellings.get(Path(item.path))
            state["n"] += 1
            d = [b[i] - state["bytes"][i] for i in range(4)]
            out["items"][photo.name] = {
                "names": list(item.names), "error": item.error,
                "photo_id": item.receipt.photo_id if item.receipt else None,
                "wall_s": now - state["t"], "timings_ms": dict(item.timings_ms),
                "photo_bytes_up": item.receipt.bytes_sent if item.receipt else 0,
                "detection_bytes_up": d[0], "detection_bytes_down": d[1],
                "matching_bytes_up": d[2], "matching_bytes_down": d[3],
                "faces": [(list(f.box), f.name, f.distance) for f in lab.faces] if lab else [],
                "detection_bytes_reported": lab.detection.bytes_uploaded
                if lab and lab.detection else None}
            state["t"], state["bytes"] = now, b
            log(f"[encrypted] backup {state['n']}/{len(fam.library)} {photo.name} "
                f"({photo.layout}, {len(photo.faces)} faces): found {item.faces}, "
                f"{','.join(item.names) or '-'}{' ERROR ' + item.error if item.error else ''} "
                f"({out['items'][photo.name]['wall_s']:.1f} s)")

        summary = session.backup([p.path for p in fam.library], people=None, on_item=on_item)
        out["backup_s"] = summary.seconds

        for size in (1, 2, 3):
            for combo in itertools.combinations(fam.members, size):
                start = time.perf_counter()
                ids, server_ms = session.search(list(combo))
                out["queries"][combo] = {"ids": ids, "server_ms": server_ms,
                                         "wall_ms": (time.perf_counter() - start) * 1000}
        log(f"[encrypted] {len(out['queries'])} member searches done")

        for i, q in enumerate(fam.queries):
            start = time.perf_counter()
            try:
                res = session.search_by_photo(q.path)
                ids, names, server_ms, error = res.ids, res.names, res.server_ms, ""
            except PrivfaceError as exc:  # no face, or no member among them
                ids, names, server_ms, error = [], [], 0.0, str(exc)
            lab = meter.labellings.get(q.path)
            out["photo_queries"][q.name] = {
                "ids": ids, "names": names, "server_ms": server_ms, "error": error,
                "wall_ms": (time.perf_counter() - start) * 1000,
                "faces": [(list(f.box), f.name, f.distance) for f in lab.faces] if lab else []}
            log(f"[encrypted] query photo {i + 1}/{len(fam.queries)} {q.name}: "
                f"{','.join(names) or '-'} -> {len(ids)} photos")
    return out


def explain(photo: str, enc_faces: list, plain: PlainResult) -> str:
    """Why the two pipelines labelled one photo differently."""
    enc_boxes = [tuple(b) for b, _, _ in enc_faces]
    plain_boxes = [f.box for f in plain.faces]
    if sorted(enc_boxes) != sorted(plain_boxes):
        return (f"{photo}: detection differs (secure boxes {sorted(enc_boxes)}, "
                f"detectMultiScale {sorted(plain_boxes)})")
    notes = []
    for (b, name, dist), f in zip(sorted(enc_faces, key=lambda x: tuple(x[0])),
                                  sorted(plain.faces, key=lambda x: x.box), strict=True):
        if name != f.name:
            notes.append(f"face {tuple(b)}: encrypted distance {dist:.7f} -> {name}, "
                         f"plaintext {f.distance:.7f} -> {f.name} (tolerance "
                         f"{faces_mod.MATCH_TOLERANCE}; CKKS error ~1e-6: a tie at the "
                         "threshold)"
                         if abs(f.distance - faces_mod.MATCH_TOLERANCE) < 1e-4 else
                         f"face {tuple(b)}: encrypted {name} ({dist:.7f}) vs plaintext "
                         f"{f.name} ({f.distance:.7f})")
    return f"{photo}: same boxes; " + ("; ".join(notes) or "same names: a search error")


def evaluate(fam: Family, plain: PlainPipeline, plain_res: dict[str, PlainResult],
             enc: dict[str, Any]) -> dict[str, Any]:
    lib = fam.library
    names = [p.name for p in lib]
    truth = [p.members for p in lib]
    id_to_name = {v["photo_id"]: k for k, v in enc["items"].items() if v["photo_id"]}
    plain_matrix = plain.label_matrix([plain_res[n].names for n in names])
    enc_matrix = plain.label_matrix([enc["items"][n]["names"] for n in names])
    differences: list[dict] = []
    label_diff = {n: explain(n, enc["items"][n]["faces"], plain_res[n]) for n in names
                  if sorted(enc["items"][n]["names"]) != plain_res[n].names}
    search_exact = True  # the server's answer equals numpy over the secure labels

    def compare(query: str, enc_set: set[str], plain_set: set[str], extra: str = "") -> bool:
        if enc_set == plain_set:
            return True
        why = [label_diff.get(n, f"{n}: labels equal") for n in sorted(enc_set ^ plain_set)]
        differences.append({"query": query, "only_encrypted": sorted(enc_set - plain_set),
                            "only_plaintext": sorted(plain_set - enc_set),
                            "explanation": ([extra] if extra else []) + why})
        return False

    rows: dict[str, list[dict]] = {"one": [], "two": [], "three": [], "photo": []}
    plain_ms = []
    skipped = {1: 0, 2: 0, 3: 0}
    for combo, res in enc["queries"].items():
        relevant = {names[i] for i, t in enumerate(truth) if set(combo) <= t}
        if not relevant:
            skipped[len(combo)] += 1
            continue
        start = time.perf_counter()
        hits = plain.search(plain_matrix, combo)
        plain_ms.append((time.perf_counter() - start) * 1000)
        plain_set = {names[i] for i in hits}
        enc_set = {id_to_name.get(i, i) for i in res["ids"]}
        search_exact &= enc_set == {names[i] for i in plain.search(enc_matrix, combo)}
        p, r, f = prf(enc_set, relevant)
        pp, pr, pf = prf(plain_set, relevant)
        kind = {1: "one", 2: "two", 3: "three"}[len(combo)]
        rows[kind].append({"query": "+".join(combo), "relevant": len(relevant),
                           "encrypted": {"p": p, "r": r, "f1": f, "returned": len(enc_set)},
                           "plaintext": {"p": pp, "r": pr, "f1": pf,
                                         "returned": len(plain_set)},
                           "same": compare("+".join(combo), enc_set, plain_set),
                           "wall_ms": res["wall_ms"], "server_ms": res["server_ms"]})
    for q in fam.queries:
        res = enc["photo_queries"][q.name]
        want = q.members
        relevant = {names[i] for i, t in enumerate(truth) if want <= t}
        pq = plain_res[q.name]
        plain_set = ({names[i] for i in plain.search(plain_matrix, pq.names)}
                     if pq.names else set())
        enc_set = {id_to_name.get(i, i) for i in res["ids"]}
        p, r, f = prf(enc_set, relevant)
        pp, pr, pf = prf(plain_set, relevant)
        extra = ""
        if sorted(res["names"]) != pq.names:
            extra = "query photo " + explain(q.name, res["faces"], pq)
        rows["photo"].append({"query": q.name, "shows": sorted(want),
                              "strangers": q.strangers, "relevant": len(relevant),
                              "found_encrypted": sorted(res["names"]),
                              "found_plaintext": pq.names, "error": res["error"],
                              "encrypted": {"p": p, "r": r, "f1": f, "returned": len(enc_set)},
                              "plaintext": {"p": pp, "r": pr, "f1": pf,
                                            "returned": len(plain_set)},
                              "same": compare(q.name, enc_set, plain_set, extra),
                              "wall_ms": res["wall_ms"], "server_ms": res["server_ms"]})

    # costs
    items = [enc["items"][n] for n in names]
    ok = [it for it in items if not it["error"]]
    steps = ["detection", "embedding", "matching", "encryption", "upload"]
    step_ms = {s: med([it["timings_ms"].get(s, 0.0) for it in ok]) for s in steps}
    up = [it["detection_bytes_up"] + it["matching_bytes_up"] + it["photo_bytes_up"] for it in ok]
    down = [it["detection_bytes_down"] + it["matching_bytes_down"] for it in ok]
    reported = [it for it in ok if it["detection_bytes_reported"] is not None]
    mq = [r for k in ("one", "two", "three") for r in rows[k]]
    enc_faces = {n: [(tuple(b), nm) for b, nm, _ in enc["items"][n]["faces"]] for n in names}
    boxes_equal = sum(sorted(b for b, _, _ in enc["items"][n]["faces"])
                      == sorted(list(f.box) for f in plain_res[n].faces) for n in names)
    dist_err = [abs(d - f.distance) for n in names
                for (b, _, d), f in zip(sorted(enc["items"][n]["faces"], key=lambda x: x[0]),
                                        sorted(plain_res[n].faces, key=lambda x: x.box),
                                        strict=False)
                if tuple(b) == f.box]
    result: dict[str, Any] = {
        "f1_one_member": mean_prf(rows["one"], "encrypted")["f1"],
        "f1_two_members": mean_prf(rows["two"], "encrypted")["f1"],
        "f1_three_members": mean_prf(rows["three"], "encrypted")["f1"],
        "f1_by_photo": mean_prf(rows["photo"], "encrypted")["f1"],
        "f1_plain_one_member": mean_prf(rows["one"], "plaintext")["f1"],
        "f1_plain_two_members": mean_prf(rows["two"], "plaintext")["f1"],
        "f1_plain_three_members": mean_prf(rows["three"], "plaintext")["f1"],
        "f1_plain_by_photo": mean_prf(rows["photo"], "plaintext")["f1"],
        "f1_averaging": "macro: mean over the queries of a kind of each query's F1 "
                        "(an empty answer has precision 0)",
        "quality": {k: {"queries": len(v), "encrypted": mean_prf(v, "encrypted"),
                        "plaintext": mean_prf(v, "plaintext"),
                        "identical": sum(r["same"] for r in v)} for k, v in rows.items()},
        "member_sets_without_relevant_photos": {str(k): v for k, v in skipped.items()},
        "encrypted_equals_plain": not differences,
        "differences": differences,
        "label_differences": list(label_diff.values()),
        "encrypted_search_equals_numpy_on_secure_labels": search_exact,
        "photos_with_identical_boxes": boxes_equal,
        "max_abs_distance_error": max(dist_err) if dist_err else None,
        "median_abs_distance_error": med(dist_err) if dist_err else None,
        "faces_encrypted": face_accuracy(lib, lambda p: enc_faces[p.name]),
        "faces_plaintext": face_accuracy(lib, lambda p: [(f.box, f.name)
                                                         for f in plain_res[p.name].faces]),
        "backup_s_per_photo": med([it["wall_s"] for it in ok]),
        "backup_s_per_photo_mean": enc["backup_s"] / max(1, len(items)),
        "backup_step_ms_median": step_ms,
        "backup_failed": [f"{n}: {enc['items'][n]['error']}" for n in names
                          if enc["items"][n]["error"]],
        "plain_step_ms_median": {s: med([plain_res[n].timings_ms[s] for n in names])
                                 for s in ("detection", "embedding", "matching")},
        "upload_bytes_per_photo": med(up),
        "upload_bytes_per_photo_detection": med([it["detection_bytes_up"] for it in ok]),
        "upload_bytes_per_photo_matching": med([it["matching_bytes_up"] for it in ok]),
        "upload_bytes_per_photo_photo": med([it["photo_bytes_up"] for it in ok]),
        "download_bytes_per_photo": med(down),
        "download_bytes_per_photo_detection": med([it["detection_bytes_down"] for it in ok]),
        "download_bytes_per_photo_matching": med([it["matching_bytes_down"] for it in ok]),
        "detection_bytes_match_report": all(it["detection_bytes_up"] ==
                                            it["detection_bytes_reported"] for it in reported),
        "photo_file_bytes": med([p.path.stat().st_size for p in lib]),
        "search_ms": med([r["wall_ms"] for r in mq]),
        "search_server_ms": med([r["server_ms"] for r in mq]),
        "search_plain_ms": med(plain_ms),
        "search_by_photo_ms": med([r["wall_ms"] for r in rows["photo"]]),
        "queries": rows,
    }
    return result


def family_stats(fam: Family) -> dict[str, Any]:
    lib = fam.library
    return {
        "members": fam.members,
        "enrollment_photos_per_member": len(next(iter(fam.enroll.values()))),
        "library_photos": len(lib),
        "query_photos": len(fam.queries),
        "faces": sum(len(p.faces) for p in lib),
        "member_faces": sum(len(p.members) for p in lib),
        "stranger_faces": sum(p.strangers for p in lib),
        "photos_by_face_count": {str(k): sum(len(p.faces) == k for p in lib) for k in FACES_P},
        "photos_by_member_count": {str(k): sum(len(p.members) == k for p in lib)
                                   for k in range(0, 5)},
        "group_photos_two_plus_members": sum(len(p.members) >= 2 for p in lib),
        "photos_without_members": sum(not p.members for p in lib),
        "photos_per_member": {m: sum(m in p.members for p in lib) for m in fam.members},
        "layouts": {lay: sum(p.layout == lay for p in lib) for lay in
                    sorted({p.layout for p in lib})},
        "library_face_reuse": fam.reuse,
    }


def print_report(fig: dict[str, Any], brief: bool = False) -> None:
    s = fig["family"]
    print(f"\n== family: {len(s['members'])} members ({', '.join(s['members'])}), "
          f"{s['enrollment_photos_per_member']} enrollment photos each; "
          f"{s['library_photos']} composed photos, {s['faces']} faces ({s['member_faces']} "
          f"of members, {s['stranger_faces']} of strangers), "
          f"{s['group_photos_two_plus_members']} with 2+ members, "
          f"{s['photos_without_members']} without members; {s['query_photos']} query photos; "
          f"seed {fig['seed']}")
    q = fig["quality"]
    rows = []
    for kind, label in (("one", "1 member"), ("two", "2 members (all-of)"),
                        ("three", "3 members (all-of)"), ("photo", "by photo")):
        e, p = q[kind]["encrypted"], q[kind]["plaintext"]
        rows.append([label, q[kind]["queries"], e["p"], e["r"], e["f1"], p["p"], p["r"],
                     p["f1"], f"{q[kind]['identical']}/{q[kind]['queries']}"])
    print("\nsearch quality (mean over queries of each query's P / R / F1):")
    print_table(["query", "queries", "enc P", "enc R", "enc F1", "plain P", "plain R",
                 "plain F1", "same photo sets"], rows)
    print(f"encrypted_equals_plain: {fig['encrypted_equals_plain']}; encrypted search = numpy "
          f"on the secure labels: {fig['encrypted_search_equals_numpy_on_secure_labels']}; "
          f"photos with identical boxes: {fig['photos_with_identical_boxes']}/"
          f"{s['library_photos']}; encrypted distance error max "
          f"{fig['max_abs_distance_error'] or 0:.2e}")
    for d in fig["differences"]:
        print(f"  DIFFERENCE {d['query']}: only encrypted {d['only_encrypted']}, only plaintext "
              f"{d['only_plaintext']}: " + " | ".join(d["explanation"]))
    if brief:
        print(f"backup {fig['backup_s_per_photo']:.1f} s per photo (median; plaintext "
              f"{sum(fig['plain_step_ms_median'].values()) / 1000:.2f} s), search by members "
              f"{fig['search_ms']:.1f} ms, by photo {fig['search_by_photo_ms'] / 1000:.1f} s")
        return
    fe, fp = fig["faces_encrypted"], fig["faces_plaintext"]
    print("\nfaces (library photos; a box belongs to the face whose tile holds its centre):")
    print_table(["", "encrypted", "plaintext"], [[k.replace("_", " "), fe[k], fp[k]]
                                                 for k in fe])
    st = fig["backup_step_ms_median"]
    ps = fig["plain_step_ms_median"]
    print("\nbackup cost per photo (medians):")
    print_table(["step", "encrypted ms", "plaintext ms"], [
        ["detection (secure / detectMultiScale)", st["detection"], ps["detection"]],
        ["embedding (face_recognition)", st["embedding"], ps["embedding"]],
        ["matching (CKKS / numpy)", st["matching"], ps["matching"]],
        ["encryption (AES-GCM + labels)", st["encryption"], "-"],
        ["upload", st["upload"], "-"],
        ["whole photo, wall s", fig["backup_s_per_photo"], "-"]])
    kb = 1024
    print("\nbytes per photo (medians): up "
          f"{fig['upload_bytes_per_photo'] / kb / kb:.1f} MiB (detection "
          f"{fig['upload_bytes_per_photo_detection'] / kb / kb:.1f} MiB, matching "
          f"{fig['upload_bytes_per_photo_matching'] / kb:.0f} KiB, photo + thumbnail + labels "
          f"{fig['upload_bytes_per_photo_photo'] / kb:.0f} KiB); down "
          f"{fig['download_bytes_per_photo'] / kb:.0f} KiB (detection outcomes "
          f"{fig['download_bytes_per_photo_detection'] / kb:.0f} KiB, encrypted distances "
          f"{fig['download_bytes_per_photo_matching'] / kb:.0f} KiB); the JPEG itself "
          f"{fig['photo_file_bytes'] / kb:.0f} KiB")
    print(f"search latency (medians): by members {fig['search_ms']:.1f} ms end to end "
          f"({fig['search_server_ms']:.2f} ms on the server; plaintext numpy "
          f"{fig['search_plain_ms']:.3f} ms); by photo {fig['search_by_photo_ms'] / 1000:.1f} s "
          "(secure detection + matching + search)")
    print(f"bench took {fig['bench_seconds']:.0f} s (enrollment {fig['enroll_s']:.0f} s, "
          f"backup {fig['backup_s']:.0f} s, vendor key + publish {fig['vendor_s']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--members", type=int, default=None, help="family members (default 6)")
    ap.add_argument("--photos", type=int, default=None, help="composed photos (default 150)")
    ap.add_argument("--query-photos", type=int, default=None,
                    help="composed query photos (default 2 per member)")
    ap.add_argument("--enroll", type=int, default=5, help="enrollment photos per member")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--mode", choices=[m for m in MODES if m != "faithful"], default="default",
                    help="secure detection mode, and the same scan parameters in plaintext")
    ap.add_argument("--quick", action="store_true",
                    help="3 members, 30 photos, 3 query photos (a few minutes)")
    ap.add_argument("--server", help="use this running server (HOST:PORT) instead of one "
                    "started in this process")
    ap.add_argument("--vendor-token-file", help="the server's vendor token, to publish the "
                    "detector to --server")
    ap.add_argument("--workdir", help="write the composed photos here (default: a temp dir)")
    ap.add_argument("--brief", action="store_true",
                    help="print only the family, the F1 table and the equality check")
    ap.add_argument("--bundle", help="keep the bench family's bundle here (passphrase: "
                    "PRIVFACE_PASSPHRASE or 'family bench passphrase')")
    args = ap.parse_args(argv)
    n_members = args.members or (3 if args.quick else 6)
    n_photos = args.photos or (30 if args.quick else 150)
    n_queries = args.query_photos or (n_members if args.quick else 2 * n_members)
    if not 1 <= n_members <= len(MEMBERS):
        ap.error(f"--members must be 1..{len(MEMBERS)}")
    if not LFW.is_dir():
        log(f"../shared/data is absent ({LFW}): LFW photos are needed")
        return 2
    cv2.setNumThreads(1)
    mode = MODES[args.mode]
    capacity = max(labels.DEFAULT_CAPACITY, n_members)
    passphrase = os.environ.get("PRIVFACE_PASSPHRASE") or "family bench passphrase"
    start_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="family_bench_") as tmp:
        work = Path(args.workdir) if args.workdir else Path(tmp) / "photos"
        fam = compose_family(n_members, n_photos, n_queries, args.enroll, args.seed, work)
        stats = family_stats(fam)
        log(f"composed {len(fam.library)} photos and {len(fam.queries)} query photos in {work}: "
            f"{stats['faces']} faces, {stats['group_photos_two_plus_members']} with 2+ members")
        plain, plain_res = run_plain(fam, capacity, mode)
        server = None
        if args.server:
            address = args.server
            token = (Path(args.vendor_token_file).read_text().strip()
                     if args.vendor_token_file else os.environ.get("PRIVFACE_VENDOR_TOKEN", ""))
        else:
            server, address, token = start_server(Path(tmp) / "server")
        try:
            key, vendor_s = vendor_key(address, token, shared=bool(args.server))
            log(f"[vendor] product key {key.detector_id} v{key.version} published to "
                f"{address} ({vendor_s:.1f} s)")
            bundle = Path(args.bundle) if args.bundle else Path(tmp) / "family.bundle"
            enc = run_encrypted(fam, address, key, capacity, bundle, passphrase, mode)
        finally:
            if server is not None:
                server.stop(0).wait()
        fig = evaluate(fam, plain, plain_res, enc)
    fig.update({"seed": args.seed, "quick": args.quick, "family": stats,
                "server": "external" if args.server else "in-process",
                "detection_mode": mode.name,
                "scan_params": {"working_long_side": mode.working_long_side,
                                "scale_factor": mode.params.scale_factor,
                                "min_neighbors": mode.params.min_neighbors,
                                "min_size": list(mode.params.min_size)},
                "tolerance": faces_mod.MATCH_TOLERANCE, "enrolled": enc["enrolled"],
                "enroll_s": enc["enroll_s"], "backup_s": enc["backup_s"],
                "create_s": enc["create_s"], "vendor_s": vendor_s,
                "bench_seconds": time.perf_counter() - start_all,
                "per_photo": [{"photo": p.name, "layout": p.layout, "size": list(p.size),
                               "truth": sorted(p.members), "strangers": p.strangers,
                               "faces": [f.__dict__ for f in p.faces],
                               "encrypted": enc["items"][p.name]["names"],
                               "plaintext": plain_res[p.name].names,
                               "encrypted_faces": enc["items"][p.name]["faces"],
                               "plaintext_faces": [(list(f.box), f.name, f.distance)
                                                   for f in plain_res[p.name].faces],
                               "wall_s": enc["items"][p.name]["wall_s"],
                               "timings_ms": enc["items"][p.name]["timings_ms"]}
                              for p in fam.library]})
    print_report(fig, args.brief)
    write_json(args.json, _jsonable(fig))
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {(k if isinstance(k, str) else "+".join(k) if isinstance(k, tuple) else str(k)):
                _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:
        return None
    return value


if __name__ == "__main__":
    sys.exit(main())
