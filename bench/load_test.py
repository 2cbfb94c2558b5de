"""The scripted gRPC load test: the phones of many families at once against privface-server.

Two phases, each a function so that a later test (several replicas behind one address
list) can reuse them:

* ``prebuild``: N families built once through the client pipeline on the first server:
  ``FamilySession.create``, members enrolled from real LFW face photos
  (../shared/data/lfw/images; 3 photos each, each member a different LFW person), the
  detector vendor's product key imported after ``vendor.publish`` of the encrypted
  ``haarcascade_frontalface_alt``, and ``--photos`` photos per family backed up
  (1-3 LFW faces side by side, labelled by who was placed: the ground truth). What the
  phones will send is precomputed where the phone's own work would compete with the
  server for the 2 cores: CKKS queries of held-out faces of each member (and one
  stranger), and secure detections recorded once through ``SecureDetector`` (the
  ciphertext batches of each round and the outcomes the server gave).
* ``run_load``: locust users in this process, one per phone (``--users``), each bound to
  a family (user i -> family i mod N) and a server (user i -> server i mod S), each with
  its own gRPC channel, calling the real RPCs back to back (closed loop, ``--wait`` 0) in
  a weighted mix (MIX): back up a new photo (a base photo with fresh random bytes in a
  JPEG comment, so a new photo id; encrypted here, AES-GCM + thumbnail + E-LV labels),
  search by 1-2 members (fresh E-Q; all-of, any-of or top 10), match a face (a
  pre-encrypted CKKS query), fetch a thumbnail, fetch a photo, and now and then a secure
  detection (the recorded batches replayed over one DetectFaces call). Only the RPC is
  timed; every answer is then checked (search ids against the ids the family holds,
  decrypted distances against the plaintext nearest member, decrypted photos, detection
  outcomes against the recorded ones) and a wrong answer counts as an error
  ("WRONG_RESULT").

The server runs as its own process (``python -m server``, TLS with a development
certificate from ``privface-server tls-init``, or plaintext with ``--insecure``) unless
``--server`` names running ones. Loopback only; bounded by ``--seconds`` and
``--max-requests``.

Importing this module patches the standard library for gevent (locust does so on
import) and sets up grpcio for gevent: run it as a script or import it first.

Usage::

    .venv/bin/python bench/load_test.py --families 8 --users 16 --seconds 60 \\
        --json bench/results/load.json [--profile out.svg] [--insecure]
    .venv/bin/python bench/load_test.py --server 127.0.0.1:50051,127.0.0.1:50052 \\
        --tls-ca ca.pem --vendor-token-file var/server/vendor.token ...
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

# locust monkey-patches the standard library for gevent on import: before grpc and ssl.
import locust  # noqa: I001
from locust import TaskSet, User, between, constant
from locust.env import Environment

import grpc
import grpc.experimental.gevent as grpc_gevent  # type: ignore[import-not-found]

grpc_gevent.init_gevent()  # before any channel is made

import argparse  # noqa: E402
import contextlib  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import gevent  # type: ignore[import-untyped]  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # type: ignore[import-untyped]  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import print_table, write_json  # noqa: E402
from client import vendor  # noqa: E402
from client.config import ClientConfig  # noqa: E402
from client.keystore import FamilyBundle  # noqa: E402
from client.pipeline import faces, photos  # noqa: E402
from client.pipeline.detect import DEFAULT, SecureDetector  # noqa: E402
from client.pipeline.labelling import enrollment_faces  # noqa: E402
from client.rpc import (  # noqa: E402
    Credentials,
    DetectionStream,
    PrivfaceClient,
    RemoteError,
    WindowOutcomes,
)
from client.session import FamilySession  # noqa: E402
from common import ckks, labels, photo_crypto  # noqa: E402
from common import secure_cascade as sc  # noqa: E402
from common.cascade import load_cascade  # noqa: E402
from privface.v1 import detection_pb2  # noqa: E402
from server.config import ServerConfig  # noqa: E402

LFW = ROOT.parent / "shared" / "data" / "lfw" / "images"
DETECTOR_ID = "frontalface_alt-load-test"  # on a shared server: never the demo's product
PASSPHRASE = "load-test-passphrase"
ENROLL_PHOTOS = 3  # per member (default)
QUERY_FACES = 2  # held-out faces per member, pre-encrypted as match queries (default)
LIBRARY_FACES = 2  # at least this many more photos per member, for the backed-up photos
FACES_P = {1: 0.4, 2: 0.35, 3: 0.25}  # faces per composed photo
MEMBER_P = 0.7  # a face is a member's (else a stranger's)
TIE_MARGIN = 1e-3  # queries this close to the 0.6 threshold are not used (an exact tie)
SEARCH_TOP_N = 10

# The mix: a phone's next call is drawn with these weights (percent).
MIX = {"backup": 20, "search": 30, "match": 15, "thumbnail": 22, "fetch": 12, "detect": 1}
RPC_NAMES = {"backup": "BackupPhoto", "search": "SearchPhotos", "match": "MatchFaces",
             "thumbnail": "FetchPhoto (thumbnail)", "fetch": "FetchPhoto (photo)",
             "detect": "DetectFaces"}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class WrongResult(Exception):
    """An RPC succeeded but its answer is not the right one."""


# -- what the phones send ------------------------------------------------------------------


@dataclass(frozen=True)
class BasePhoto:
    """A composed JPEG and its ground-truth member slots."""

    data: bytes
    slots: frozenset[int]


@dataclass(frozen=True)
class FaceQuery:
    """A pre-encrypted CKKS query face and the plaintext answer (nearest member's slot
    within the tolerance, None for unknown)."""

    ciphertexts: list[bytes]
    expected_slot: int | None


@dataclass(frozen=True)
class DetectionBatch:
    """One recorded DetectFaces batch: what was sent, and the outcomes the server gave."""

    windows: bytes
    count: int
    encoding: int
    first_stage: int
    prefix: bool
    outcomes: bytes


@dataclass(frozen=True)
class DetectionRecording:
    """One photo's secure detection, as SecureDetector ran it."""

    batches: list[DetectionBatch]
    windows: int
    bytes_uploaded: int
    boxes: int


@dataclass
class LoadFamily:
    """A prebuilt family: its bundle, what its phones send, and the photos it holds."""

    name: str
    bundle: FamilyBundle
    secret: ckks.SecretContext
    members: dict[str, int]  # name -> slot
    base_photos: list[BasePhoto]
    queries: list[FaceQuery]
    stored: dict[str, frozenset[int]] = field(default_factory=dict)  # id -> slots
    pending: dict[str, frozenset[int]] = field(default_factory=dict)  # backups in flight

    @property
    def credentials(self) -> Credentials:
        return Credentials(self.bundle.family_id, self.bundle.access_token)


@dataclass
class Prebuilt:
    """Everything ``run_load`` needs."""

    families: list[LoadFamily]
    product_key: sc.ProductKey | None
    detections: list[DetectionRecording]
    seconds: float
    notes: list[str] = field(default_factory=list)


# -- the server ----------------------------------------------------------------------------


@dataclass
class LocalServer:
    """A privface-server process on loopback."""

    address: str
    process: subprocess.Popen[bytes]
    vendor_token: str
    tls_ca: Path | None
    log_path: Path


def generous_limits(users: int, families: int) -> dict[str, int]:
    """Server limits (ServerConfig fields) raised where the defaults would refuse this
    load: every phone may hold a long call at once, a family's phones all at once, and
    every family registers within the same minute from 127.0.0.1. Only the fields this
    server has; defaults that are already enough are kept."""
    base = ServerConfig()
    wanted = {"max_streams": users + 8,
              "max_family_streams": -(-users // max(1, families)) + 2,
              "register_per_minute": families + 10}
    out = {k: v for k, v in wanted.items() if isinstance(getattr(base, k, None), int)
           and v > getattr(base, k)}
    if "max_streams" in out and hasattr(base, "workers"):
        public = int(getattr(base, "max_public_streams", 0))
        out["workers"] = max(base.workers, out["max_streams"] + public + 8)
    return out


@contextlib.contextmanager
def local_server(work: Path, insecure: bool, limits: dict[str, int] | None = None
                 ) -> Iterator[LocalServer]:
    """Starts ``python -m server`` on 127.0.0.1 (port 0) with a fresh data dir: TLS with a
    development certificate, or plaintext if ``insecure``; ``limits`` as flags. Stops it
    (SIGTERM) on exit."""
    data = work / "server"
    args = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", "0",
            "--data-dir", str(data)]
    for name, value in (limits or {}).items():
        args += ["--" + name.replace("_", "-"), str(value)]
    tls_ca = None
    if insecure:
        args.append("--insecure")
    else:
        tls_dir = work / "tls"
        subprocess.run([sys.executable, "-m", "server", "tls-init", str(tls_dir)], cwd=ROOT,
                       check=True, stdout=subprocess.DEVNULL)
        args += ["--tls-cert", str(tls_dir / "server.pem"), "--tls-key",
                 str(tls_dir / "server.key")]
        tls_ca = tls_dir / "ca.pem"
    token = secrets.token_urlsafe(32)
    env = dict(os.environ, PRIVFACE_VENDOR_TOKEN=token)
    log_path = work / "server.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        port = _wait_for_port(proc, log_path)
        yield LocalServer(f"127.0.0.1:{port}", proc, token, tls_ca, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_for_port(proc: subprocess.Popen[bytes], log_path: Path, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.search(r"listening on [^\s:]+:(\d+)", log_path.read_text(errors="replace"))
        if found:
            return int(found.group(1))
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    tail = log_path.read_text(errors="replace")[-2000:]
    raise SystemExit(f"privface-server did not start (exit {proc.poll()}):\n{tail}")


# -- prebuild ------------------------------------------------------------------------------


def _people(n_families: int, n_members: int, need: int, rng: np.random.Generator
            ) -> tuple[list[list[str]], list[Path]]:
    """Distinct LFW people per family (``need`` photos each at least), and stranger
    photos (people with fewer)."""
    counts = {d.name: len(list(d.glob("*.jpg"))) for d in LFW.iterdir() if d.is_dir()}
    eligible = sorted(p for p, c in counts.items() if c >= need)
    wanted = n_families * n_members
    if len(eligible) < wanted:
        raise SystemExit(f"LFW has only {len(eligible)} people with >= {need} photos; "
                         f"{n_families} families x {n_members} members need {wanted}")
    chosen = [eligible[i] for i in rng.permutation(len(eligible))[:wanted]]
    strangers = sorted(p for name, c in counts.items() if c < need
                       for p in (LFW / name).glob("*.jpg"))
    return [chosen[f * n_members:(f + 1) * n_members] for f in range(n_families)], strangers


def _compose(tiles: list[Path]) -> bytes:
    """LFW photos side by side, as one JPEG."""
    images = []
    for path in tiles:
        image = cv2.imread(str(path))
        if image is None:
            raise SystemExit(f"cannot read {path}")
        images.append(image)
    h = min(i.shape[0] for i in images)
    row = cv2.hconcat([i[:h] for i in images])
    ok, jpeg = cv2.imencode(".jpg", row, [cv2.IMWRITE_JPEG_QUALITY, 90])
    if not ok:
        raise SystemExit("cannot encode a composed photo")
    return bytes(jpeg.tobytes())


def _base_photos(members: dict[str, int], library: dict[str, list[Path]],
                 strangers: list[Path], n: int, rng: np.random.Generator) -> list[BasePhoto]:
    out = []
    ks = sorted(FACES_P)
    for _ in range(n):
        k = int(rng.choice(ks, p=[FACES_P[v] for v in ks]))
        names = list(members)
        placed = [names[i] for i in rng.permutation(len(names))[:k] if rng.random() < MEMBER_P]
        tiles = [library[m][int(rng.integers(len(library[m])))] for m in placed]
        tiles += [strangers[int(rng.integers(len(strangers)))] for _ in range(k - len(placed))]
        tiles = [tiles[i] for i in rng.permutation(len(tiles))]
        out.append(BasePhoto(_compose(tiles), frozenset(members[m] for m in placed)))
    return out


def _plain_answer(gallery: np.ndarray, slots: list[int], embedding: np.ndarray
                  ) -> tuple[int | None, float]:
    d = np.linalg.norm(gallery - embedding, axis=1)
    i = int(np.argmin(d))
    return (slots[i] if d[i] <= ckks.TOLERANCE else None), float(d[i])


def _build_family(index: int, people: list[str], strangers: list[Path], n_photos: int,
                  address: str, config: ClientConfig, key: sc.ProductKey | None, work: Path,
                  rng: np.random.Generator, n_enroll: int, n_queries: int) -> LoadFamily:
    """One family through the client pipeline: create, enroll, back up, queries."""
    name = f"family-{index:02d}"
    session = FamilySession.create(work / f"{name}.bundle", PASSPHRASE,
                                   replace(config, server=address),
                                   device_name=f"{name} load phone", force=True)
    with session:
        if key is not None:
            session.import_product_key(key.to_bytes())
        gallery, gallery_slots = [], []
        held_out: dict[str, list[Path]] = {}
        library: dict[str, list[Path]] = {}
        for person in people:
            images = sorted((LFW / person).glob("*.jpg"))
            images = [images[i] for i in rng.permutation(len(images))]
            result = session.enroll(person, images[:n_enroll])
            for p in result.used:
                assert p.face is not None
                gallery.append(p.face.embedding)
                gallery_slots.append(result.slot)
            held_out[person] = images[n_enroll:n_enroll + n_queries]
            library[person] = images[n_enroll + n_queries:]
        members = dict(session.bundle.roster)
        secret = faces.secret_context(session.bundle)
        queries = []
        stranger_faces = [strangers[int(rng.integers(len(strangers)))]]
        for face in enrollment_faces([p for ps in held_out.values() for p in ps]
                                     + stranger_faces):
            if face.face is None:
                continue
            slot, dist = _plain_answer(np.array(gallery), gallery_slots, face.face.embedding)
            if abs(dist - ckks.TOLERANCE) < TIE_MARGIN:
                continue
            queries.append(FaceQuery(ckks.encrypt_query(secret, face.face.embedding), slot))
        base = _base_photos(members, library, strangers, n_photos, rng)
        family = LoadFamily(name, session.bundle, secret, members, base, queries)
        for photo in base:
            receipt = photos.backup_photo(session.client, session.bundle, photo.data,
                                          sorted(photo.slots))
            family.stored[receipt.photo_id] = photo.slots
        # Warm-up (the server's label index and gallery) and a first check of the answers:
        # one search per member, every query face.
        phone = _Phone(family, session.client, random.Random(index))
        for slot in members.values():
            found = photos.search_photos(session.client, session.bundle, [slot])
            phone.check_search([slot], labels.MatchMode.ALL, found, None)
        for q in queries:
            phone.check_match(q, session.client.match_faces([q.ciphertexts]))
    return family


class _RecordingStream(DetectionStream):
    """A DetectFaces call that keeps every batch sent and the outcomes received."""

    def __init__(self, client: PrivfaceClient, session: detection_pb2.DetectionSession,
                 into: list[DetectionBatch]) -> None:
        super().__init__(client, session)
        self._into = into

    def run(self, windows: bytes, count: int, encoding: int, first_stage: int,
            prefix: bool) -> WindowOutcomes:
        answer = super().run(windows, count, encoding, first_stage, prefix)
        self._into.append(DetectionBatch(windows, count, encoding, first_stage, prefix,
                                         answer.outcomes))
        return answer


class _RecordingClient(PrivfaceClient):
    """A client whose detection calls are recorded (for the replays of the load phase)."""

    batches: list[DetectionBatch]

    def open_detection(self, detector_id: str, key_version: int, key_fingerprint: bytes
                       ) -> DetectionStream:
        return _RecordingStream(self, detection_pb2.DetectionSession(
            detector_id=detector_id, key_version=key_version, key_fingerprint=key_fingerprint),
            self.batches)


def record_detection(address: str, credentials: Credentials, config: ClientConfig,
                     key: sc.ProductKey, photo: Path) -> DetectionRecording:
    """One real secure detection (default mode) of ``photo``, recorded."""
    image = cv2.imread(str(photo))
    if image is None:
        raise SystemExit(f"cannot read {photo}")
    client = _RecordingClient(address, credentials, config)
    client.batches = []
    try:
        report = SecureDetector(client, key, DEFAULT).detect(image)
    finally:
        client.close()
    return DetectionRecording(list(client.batches), report.windows_sent,
                              report.bytes_uploaded, len(report.boxes))


def prebuild(address: str, config: ClientConfig, n_families: int = 8, n_members: int = 4,
             n_photos: int = 24, seed: int = 1, vendor_token: str = "",
             n_detections: int = 2, work: Path | None = None,
             n_enroll: int = ENROLL_PHOTOS, n_queries: int = QUERY_FACES) -> Prebuilt:
    """Builds the families (and the vendor's detector, if ``vendor_token``) on the server at
    ``address``, through the client pipeline; precomputes what the phones will send."""
    if not LFW.is_dir():
        raise SystemExit(f"the load test needs real face photos in {LFW} (absent): "
                         "skipped, nothing was run")
    start = time.perf_counter()
    work = work or Path(tempfile.mkdtemp(prefix="privface-load-"))
    rng = np.random.default_rng(seed)
    notes = []
    key = None
    if vendor_token:
        cascade = load_cascade()
        key = sc.generate_product_key(DETECTOR_ID, cascade)
        with PrivfaceClient(address, config=config) as client:
            vendor.publish(client, cascade, key, vendor_token)
        log(f"[prebuild] published the encrypted detector {DETECTOR_ID}")
    else:
        notes.append("no vendor token: secure detection left out of the mix")
        log("[prebuild] no vendor token (--vendor-token-file or PRIVFACE_VENDOR_TOKEN): "
            "secure detection is left out of the mix")
    groups, strangers = _people(n_families, n_members, n_enroll + n_queries + LIBRARY_FACES,
                                rng)
    families = []
    for i, people in enumerate(groups):
        t0 = time.perf_counter()
        families.append(_build_family(i, people, strangers, n_photos, address, config, key,
                                      work, rng, n_enroll, n_queries))
        log(f"[prebuild] family {i + 1}/{n_families}: {len(people)} members enrolled, "
            f"{len(families[-1].stored)} photos, {len(families[-1].queries)} match queries "
            f"({time.perf_counter() - t0:.1f} s)")
    detections = []
    if key is not None:
        first = families[0]
        for person in list(first.members)[:n_detections]:
            photo = sorted((LFW / person).glob("*.jpg"))[0]
            detections.append(record_detection(address, first.credentials, config, key, photo))
            d = detections[-1]
            log(f"[prebuild] recorded a secure detection of {photo.name}: {d.windows:,} "
                f"windows, {d.bytes_uploaded / 1e6:.1f} MB, {len(d.batches)} batches, "
                f"{d.boxes} face(s)")
    return Prebuilt(families, key, detections, time.perf_counter() - start, notes)


# -- the phones ----------------------------------------------------------------------------


def _with_comment(jpeg: bytes, payload: bytes) -> bytes:
    """The same JPEG with a comment segment (COM) after SOI: a new photo for the server."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG")
    return jpeg[:2] + b"\xff\xfe" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _query_matches(slots: frozenset[int], query: Sequence[int], mode: labels.MatchMode
                   ) -> bool:
    if mode is labels.MatchMode.ALL:
        return set(query) <= slots
    return bool(set(query) & slots)


@dataclass(frozen=True)
class Timed:
    """One RPC made by a phone: its result, its wall time alone (what was prepared before
    and is checked after is not counted), the check of its answer, and the compute time
    the server reported in its answer (search and detection report one)."""

    result: Any
    seconds: float
    check: Callable[[Any], None]
    server_ms: float | None = None


class _Phone:
    """What one phone does: build a call, time the RPC alone, check the answer."""

    def __init__(self, family: LoadFamily, client: PrivfaceClient, rng: random.Random,
                 detections: Sequence[DetectionRecording] = (),
                 key: sc.ProductKey | None = None) -> None:
        self.family = family
        self.client = client
        self.rng = rng
        self.detections = detections
        self.key = key

    # each returns (the RPC's result, its seconds, a check to run on it)

    def backup(self) -> Timed:
        f, bundle = self.family, self.family.bundle
        base = self.rng.choice(f.base_photos)
        data = _with_comment(base.data, b"privface load " + secrets.token_hex(8).encode())
        thumbnail = photos.make_thumbnail(data)
        photo_id = photos.photo_id_for(bundle, data)
        blob = photo_crypto.encrypt_photo(bundle.master_key, bundle.family_id, photo_id, data)
        thumb = photo_crypto.encrypt_photo(bundle.master_key, bundle.family_id, photo_id,
                                           thumbnail, kind="thumbnail")
        encrypted = photos.encrypt_labels(bundle, sorted(base.slots))
        f.pending[photo_id] = base.slots
        try:
            start = time.perf_counter()
            already = self.client.backup_photo(photo_id, blob, encrypted,
                                               bundle.label_key.fingerprint(), thumb)
            seconds = time.perf_counter() - start
        finally:
            f.pending.pop(photo_id, None)

        def check(already: bool) -> None:
            if already:
                raise WrongResult(f"a new photo {photo_id} was reported as already stored")
            f.stored[photo_id] = base.slots
        return Timed(already, seconds, check)

    def search(self) -> Timed:
        f = self.family
        slots = self.rng.sample(sorted(f.members.values()),
                                min(len(f.members), self.rng.choice((1, 1, 2))))
        draw = self.rng.random()
        mode = (labels.MatchMode.ALL if draw < 0.8 else labels.MatchMode.ANY if draw < 0.9
                else labels.MatchMode.RANKED)
        top_n = SEARCH_TOP_N if mode is labels.MatchMode.RANKED else 0
        query = photos.encrypt_query(f.bundle, slots, mode)
        snapshot = dict(f.stored)  # committed before the call: each must be found
        start = time.perf_counter()
        result = self.client.search_photos(query, f.bundle.label_key.fingerprint(), mode,
                                           top_n)
        seconds = time.perf_counter() - start
        return Timed(result, seconds, lambda r: self.check_search(slots, mode, r, snapshot),
                     result[1])

    def check_search(self, slots: Sequence[int], mode: labels.MatchMode,
                     result: tuple[list[str], float],
                     family_snapshot: dict[str, frozenset[int]] | None) -> None:
        """Every photo stored before the call that matches is found (top N: N of them), and
        nothing else but photos that match and were backed up meanwhile."""
        f = self.family
        ids = set(result[0])
        before = f.stored if family_snapshot is None else family_snapshot
        any_mode = labels.MatchMode.ANY if mode is labels.MatchMode.RANKED else mode
        must = {i for i, s in before.items() if _query_matches(s, slots, any_mode)}
        may = must | {i for i, s in [*f.stored.items(), *f.pending.items()]
                      if _query_matches(s, slots, any_mode)}
        if not ids <= may:
            raise WrongResult(f"search {slots} {mode}: {len(ids - may)} photo(s) that do not "
                              "match")
        if mode is labels.MatchMode.RANKED:
            if len(ids) < min(SEARCH_TOP_N, len(must)) or len(ids) > SEARCH_TOP_N:
                raise WrongResult(f"top {SEARCH_TOP_N} search gave {len(ids)} photos")
        elif not must <= ids:
            raise WrongResult(f"search {slots} {mode}: {len(must - ids)} matching photo(s) "
                              "missing")

    def match(self) -> Timed:
        query = self.rng.choice(self.family.queries)
        start = time.perf_counter()
        replies = self.client.match_faces([query.ciphertexts])
        seconds = time.perf_counter() - start
        return Timed(replies, seconds, lambda r: self.check_match(query, r))

    def check_match(self, query: FaceQuery, replies: list[Any]) -> None:
        """The decrypted nearest member within the tolerance is the plaintext one."""
        distances, entry_slots = [], []
        for reply in sorted(replies, key=lambda r: r.block):
            distances.append(ckks.decrypt_distances(self.family.secret, reply.ciphertext,
                                                    len(reply.position_slots)))
            entry_slots += [s if s >= 0 else None for s in reply.position_slots]
        slot, dist = ckks.nearest(np.concatenate(distances) if distances else np.zeros(0),
                                  entry_slots)
        got = slot if dist <= ckks.TOLERANCE else None
        if got != query.expected_slot:
            raise WrongResult(f"face matched slot {got}, plaintext says {query.expected_slot}")

    def _fetch(self, thumbnail: bool) -> Timed:
        f = self.family
        photo_id = self.rng.choice(list(f.stored))
        start = time.perf_counter()
        blob = self.client.fetch_photo(photo_id, thumbnail)
        seconds = time.perf_counter() - start

        def check(blob: bytes) -> None:
            photo_crypto.decrypt_photo(f.bundle.master_key, f.bundle.family_id, photo_id,
                                       blob, "thumbnail" if thumbnail else "photo")
        return Timed(blob, seconds, check)

    def thumbnail(self) -> Timed:
        return self._fetch(True)

    def fetch(self) -> Timed:
        return self._fetch(False)

    def detect(self) -> Timed:
        if self.key is None or not self.detections:
            raise WrongResult("no recorded detection to replay")
        recording = self.rng.choice(self.detections)
        start = time.perf_counter()
        stream = self.client.open_detection(self.key.detector_id, self.key.version,
                                            self.key.fingerprint())
        answers = []
        try:
            for b in recording.batches:
                answers.append(stream.run(b.windows, b.count, b.encoding, b.first_stage,
                                          b.prefix))
        finally:
            stream.close()
        seconds = time.perf_counter() - start

        def check(answers: list[WindowOutcomes]) -> None:
            if [a.outcomes for a in answers] != [b.outcomes for b in recording.batches]:
                raise WrongResult("detection outcomes differ from the recorded ones")
        return Timed(answers, seconds, check, sum(a.server_ms for a in answers))


# -- the load ------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """Per RPC: every latency (ms) and errors by status code; the run's wall time."""

    samples: dict[str, list[float]]
    errors: dict[str, Counter[str]]
    seconds: float
    users: int
    server_cpu_s: float | None
    driver_cpu_s: float
    driver_cpu_warning: bool
    error_examples: dict[str, str]
    server_ms: dict[str, list[float]]  # compute time the server reported (search, detection)
    by_server: dict[str, int]  # calls per server address
    loadavg: tuple[float, float]  # the machine's 1-minute load average before and after


def status_of(exc: BaseException) -> str:
    """The gRPC status code name of a failed call (WRONG_RESULT for a wrong answer)."""
    if isinstance(exc, WrongResult):
        return "WRONG_RESULT"
    for e in (exc, exc.__context__):
        if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
            return str(e.code().name)
    if isinstance(exc, RemoteError):
        return exc.code.name
    return type(exc).__name__


def _make_user(prebuilt: Prebuilt, servers: Sequence[str], config: ClientConfig,
               mix: dict[str, int], wait: float, seed: int, each_first: bool) -> type[User]:
    counter = itertools.count()
    families = prebuilt.families

    def task(kind: str) -> Callable[[Any], None]:
        def run(user: Any) -> None:
            user.call(kind)
        run.__name__ = kind
        return run

    weighted: list[TaskSet | Callable[..., Any]] = [
        task(kind) for kind, weight in mix.items() for _ in range(max(0, weight))]

    class Phone(User):
        wait_time = between(0, 2 * wait) if wait > 0 else constant(0)
        tasks = weighted  # locust draws the next one uniformly: each kind `weight` times

        def on_start(self) -> None:
            i = next(counter)
            family = families[i % len(families)]
            self.server = servers[i % len(servers)]
            self.client = PrivfaceClient(self.server, family.credentials, config)
            self.phone = _Phone(family, self.client, random.Random(seed * 1000 + i),
                                prebuilt.detections, prebuilt.product_key)
            if each_first:
                for kind, weight in mix.items():
                    if weight > 0:
                        self.call(kind)

        def on_stop(self) -> None:
            self.client.close()

        def call(self, kind: str) -> None:
            start = time.perf_counter()
            exc: BaseException | None = None
            server_ms = None
            try:
                timed: Timed = getattr(self.phone, kind)()
                elapsed_ms, server_ms = timed.seconds * 1000, timed.server_ms
                timed.check(timed.result)
            except Exception as e:  # noqa: BLE001 - every failure is counted, by status code
                exc = e
                elapsed_ms = (time.perf_counter() - start) * 1000
            self.environment.events.request.fire(
                request_type="grpc", name=RPC_NAMES[kind], response_time=elapsed_ms,
                response_length=0, exception=exc,
                context={"server": self.server, "server_ms": server_ms})

    return Phone


def run_load(prebuilt: Prebuilt, servers: Sequence[str], config: ClientConfig,
             users: int = 16, seconds: float = 60, seed: int = 1,
             mix: dict[str, int] | None = None, wait: float = 0.0,
             max_requests: int = 200_000, server_pid: int | None = None,
             profile: Path | None = None, each_first: bool = False) -> LoadResult:
    """``users`` phones for ``seconds`` (or ``max_requests`` calls) in one locust
    environment; every call's latency and status recorded. ``each_first``: each phone
    starts with one call of every kind in the mix (so a short run covers them all)."""
    mix = dict(mix or MIX)
    if prebuilt.product_key is None or not prebuilt.detections:
        mix["detect"] = 0
    phone_class = _make_user(prebuilt, servers, config, mix, wait, seed, each_first)
    env = Environment(user_classes=[phone_class], stop_timeout=60)
    samples: dict[str, list[float]] = defaultdict(list)
    server_ms: dict[str, list[float]] = defaultdict(list)
    by_server: Counter[str] = Counter()
    errors: dict[str, Counter[str]] = defaultdict(Counter)
    examples: dict[str, str] = {}
    runner = env.create_local_runner()

    def on_request(name: str, response_time: float, exception: BaseException | None,
                   context: dict[str, Any], **_: Any) -> None:
        samples[name].append(response_time)
        by_server[context["server"]] += 1
        if context.get("server_ms") is not None and exception is None:
            server_ms[name].append(context["server_ms"])
        if exception is not None:
            code = status_of(exception)
            errors[name][code] += 1
            examples.setdefault(f"{name} {code}", str(exception)[:300])
        if sum(len(s) for s in samples.values()) == max_requests:
            gevent.spawn(runner.quit)

    env.events.request.add_listener(on_request)
    server_proc = psutil.Process(server_pid) if server_pid else None
    server_cpu0 = _cpu(server_proc)
    driver_cpu0 = _cpu(psutil.Process())
    profiler = _start_profile(profile, server_pid, seconds)
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    runner.start(users, spawn_rate=users)
    stopper = gevent.spawn_later(seconds, runner.quit)
    runner.greenlet.join()
    stopper.kill()
    elapsed = time.perf_counter() - start
    server_cpu = _cpu(server_proc) - server_cpu0 if server_proc else None
    driver_cpu = _cpu(psutil.Process()) - driver_cpu0
    if profiler is not None:
        profiler.wait()
    return LoadResult(dict(samples), dict(errors), elapsed, users, server_cpu, driver_cpu,
                      bool(runner.cpu_warning_emitted), examples, dict(server_ms),
                      dict(by_server), (load_before, os.getloadavg()[0]))


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    t = proc.cpu_times()
    return float(t.user + t.system)


def _start_profile(path: Path | None, pid: int | None, seconds: float
                   ) -> subprocess.Popen[bytes] | None:
    """py-spy sampling the server for the run (flame graph .svg, speedscope .json, else
    collapsed stacks)."""
    if path is None:
        return None
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if pid is None or not Path(spy).exists():
        log("[profile] needs py-spy (pip install py-spy) and a server started here: skipped")
        return None
    fmt = {".svg": "flamegraph", ".json": "speedscope"}.get(path.suffix, "raw")
    path.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration",
                             str(max(1, int(seconds))), "--rate", "50", "--nonblocking",
                             "--format", fmt, "--output", str(path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


_SERVICER_FRAME = re.compile(r"(\w+Servicer)\.([A-Z]\w*) ")
_OWN_FRAME = re.compile(r"\((?:common|server)/")


def profile_summary(path: Path, top: int = 5) -> dict[str, Any]:
    """Where the server's busy threads were, from py-spy's collapsed stacks: the share of
    samples per RPC (the servicer method on the stack; "grpc runtime" when none is: the
    gRPC server's own threads, polling, dispatch and sending), and per RPC the deepest
    frames of privface's own code (common/, server/) that the samples fell in."""
    total = 0
    per_rpc: Counter[str] = Counter()
    frames: dict[str, Counter[str]] = defaultdict(Counter)
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        parts = stack.split(";")
        at = next((i for i, f in enumerate(parts) if _SERVICER_FRAME.match(f)), None)
        rpc = "grpc runtime" if at is None else parts[at].split(" ")[0].split(".")[1]
        per_rpc[rpc] += n
        below = parts[at + 1:] if at is not None else parts
        own = next((f for f in reversed(below) if _OWN_FRAME.search(f)), below[-1] if below
                   else "?")
        frames[rpc][own] += n
    return {"samples": total,
            "share": {k: round(v / total, 3) for k, v in per_rpc.most_common()},
            "top_frames": {k: {f: round(n / per_rpc[k], 3)
                               for f, n in frames[k].most_common(top)}
                           for k, _ in per_rpc.most_common()}}


# -- report --------------------------------------------------------------------------------


def summarise(result: LoadResult, mix: dict[str, int]) -> dict[str, Any]:
    """Per-RPC figures and the flat keys other tools read (rps_search, p99_ms_backup...)."""
    rpcs: dict[str, Any] = {}
    flat: dict[str, Any] = {}
    for kind, name in RPC_NAMES.items():
        times = np.array(result.samples.get(name, []))
        errs = result.errors.get(name, Counter())
        stats: dict[str, float | None] = dict.fromkeys(
            ("p50_ms", "p95_ms", "p99_ms", "mean_ms", "max_ms"))  # null: the RPC never ran
        if times.size:
            p50, p95, p99 = np.percentile(times, [50, 95, 99])
            stats = {k: round(float(v), 1) for k, v in zip(
                stats, (p50, p95, p99, times.mean(), times.max()), strict=True)}
        entry = {"rpc": name, "weight": mix.get(kind, 0), "requests": int(times.size),
                 "errors": dict(errs), "rps": round(times.size / result.seconds, 2), **stats}
        reported = result.server_ms.get(name)
        if reported:
            entry["server_reported_p50_ms"] = round(float(np.median(reported)), 2)
        rpcs[kind] = entry
        flat[f"rps_{kind}"] = entry["rps"]
        for p in ("p50", "p95", "p99"):
            flat[f"{p}_ms_{kind}"] = entry[f"{p}_ms"]
    total = sum(len(s) for s in result.samples.values())
    flat.update(
        rpcs=rpcs, requests_total=total, rps_total=round(total / result.seconds, 2),
        errors_total=sum(sum(c.values()) for c in result.errors.values()),
        errors_by_status=dict(sum(result.errors.values(), Counter())),
        error_examples=result.error_examples, concurrency=result.users,
        seconds=round(result.seconds, 2),
        server_cpu_cores=(round(result.server_cpu_s / result.seconds, 2)
                          if result.server_cpu_s is not None else None),
        driver_cpu_cores=round(result.driver_cpu_s / result.seconds, 2),
        driver_cpu_saturated=result.driver_cpu_warning, requests_by_server=result.by_server,
        loadavg_before=round(result.loadavg[0], 2), loadavg_after=round(result.loadavg[1], 2))
    return flat


def print_report(figures: dict[str, Any]) -> None:
    rows = []
    for entry in figures["rpcs"].values():
        errs = ", ".join(f"{c} x{n}" for c, n in sorted(entry["errors"].items())) or "0"
        rows.append([entry["rpc"], f"{entry['weight']}%", entry["requests"], errs,
                     entry["rps"], *(("-" if entry[k] is None else entry[k])
                                     for k in ("p50_ms", "p95_ms", "p99_ms"))])
    rows.append(["all", "", figures["requests_total"], str(figures["errors_total"]),
                 figures["rps_total"], "", "", ""])
    print_table(["RPC", "mix", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms"],
                rows)
    cpu = figures.get("server_cpu_cores")
    print(f"{figures['concurrency']} phones, {figures['seconds']:.1f} s; server process "
          f"{'?' if cpu is None else cpu} cores busy, load driver "
          f"{figures['driver_cpu_cores']} cores"
          + (" (saturated: locust warned)" if figures["driver_cpu_saturated"] else "")
          + f"; machine load average {figures['loadavg_before']} -> "
            f"{figures['loadavg_after']} on {os.cpu_count()} cores")


# -- command line --------------------------------------------------------------------------


def parse_mix(text: str) -> dict[str, int]:
    mix = dict(MIX)
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, _, weight = part.partition("=")
        if kind not in MIX or not weight.isdigit():
            raise argparse.ArgumentTypeError(f"--mix takes KIND=WEIGHT with KIND in "
                                             f"{', '.join(MIX)} (got {part!r})")
        mix[kind] = int(weight)
    return mix


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--families", type=int, default=8)
    parser.add_argument("--members", type=int, default=4, help="per family (default 4)")
    parser.add_argument("--photos", type=int, default=24,
                        help="photos backed up per family before the load (default 24)")
    parser.add_argument("--enroll-photos", type=int, default=ENROLL_PHOTOS,
                        help=f"enrollment photos per member (default {ENROLL_PHOTOS})")
    parser.add_argument("--query-faces", type=int, default=QUERY_FACES,
                        help="held-out faces per member pre-encrypted as match queries "
                             f"(default {QUERY_FACES})")
    parser.add_argument("--detections", type=int, default=2,
                        help="photos whose secure detection is recorded to be replayed "
                             "(default 2)")
    parser.add_argument("--users", type=int, default=16,
                        help="concurrent phones (default 16)")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-requests", type=int, default=200_000,
                        help="stop after this many calls (default 200,000)")
    parser.add_argument("--wait", type=float, default=0.0,
                        help="mean think time between a phone's calls, s (default 0: "
                             "closed loop, back to back)")
    parser.add_argument("--mix", type=parse_mix, default=dict(MIX),
                        help="weights, e.g. detect=0,search=40 (default "
                             + ",".join(f"{k}={v}" for k, v in MIX.items()) + ")")
    parser.add_argument("--server", default="",
                        help="comma-separated host:port of running servers (phones spread "
                             "over them; families are built on the first); default: start "
                             "one here")
    parser.add_argument("--tls-ca", type=Path, help="CA (PEM) the servers' certificates "
                        "chain to (with --server)")
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext gRPC (the server started here too)")
    parser.add_argument("--vendor-token-file", type=Path,
                        help="with --server: the server's vendor token (else "
                             "PRIVFACE_VENDOR_TOKEN); without one, no secure detection")
    parser.add_argument("--each-first", action="store_true",
                        help="each phone first makes one call of every kind (smoke tests)")
    parser.add_argument("--profile", type=Path,
                        help="py-spy profile of the server started here (.svg, .json, or "
                             "collapsed stacks)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="write figures to this JSON file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="privface-load-")))
        if args.server:
            servers = [s.strip() for s in args.server.split(",") if s.strip()]
            token = (args.vendor_token_file.read_text().strip() if args.vendor_token_file
                     else os.environ.get("PRIVFACE_VENDOR_TOKEN", ""))
            tls_ca, server_pid = args.tls_ca, None
        else:
            limits = generous_limits(args.users, args.families)
            local = stack.enter_context(local_server(work, args.insecure, limits))
            servers, token, tls_ca = [local.address], local.vendor_token, local.tls_ca
            server_pid = local.process.pid
            log(f"[server] privface-server pid {server_pid} on {local.address} "
                f"({'plaintext' if args.insecure else 'TLS'}"
                + "".join(f", {k}={v}" for k, v in limits.items()) + ")")
        config = ClientConfig.load(tls_ca=tls_ca, insecure=args.insecure or None)
        prebuilt = prebuild(servers[0], config, args.families, args.members, args.photos,
                            args.seed, token, args.detections, work, args.enroll_photos,
                            args.query_faces)
        log(f"[prebuild] {len(prebuilt.families)} families in {prebuilt.seconds:.0f} s; "
            f"load: {args.users} phones for {args.seconds:.0f} s on {', '.join(servers)}")
        result = run_load(prebuilt, servers, config, args.users, args.seconds, args.seed,
                          args.mix, args.wait, args.max_requests, server_pid, args.profile,
                          args.each_first)
    figures = summarise(result, args.mix)
    figures.update(families=args.families, members=args.members, photos=args.photos,
                   servers=servers, tls=not args.insecure, wait_s=args.wait,
                   requested_seconds=args.seconds, seed=args.seed,
                   prebuild_s=round(prebuilt.seconds, 1), notes=prebuilt.notes,
                   cores=os.cpu_count(), locust=locust.__version__,
                   detection_windows=[d.windows for d in prebuilt.detections],
                   detection_mb=[round(d.bytes_uploaded / 1e6, 1)
                                 for d in prebuilt.detections])
    if args.profile is not None and args.profile.suffix not in (".svg", ".json") and \
            args.profile.exists():
        figures["server_profile"] = profile = profile_summary(args.profile)
        print(f"server busy-thread samples by RPC ({args.profile}): " + ", ".join(
            f"{k} {v:.0%}" for k, v in profile["share"].items()))
    print_report(figures)
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
