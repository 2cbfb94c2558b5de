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
certificate, or plaintext with ``--insecure``) unless ``--server`` names running ones.
``--replicas N`` starts N processes on different ports sharing one store (``--store
sqlite:PATH | postgresql://...``, ``--blobs file:DIR | s3://BUCKET/PREFIX``; several
replicas without ``--store`` share one SQLite file); every phone's client is given the
comma-separated list of all of them (one channel, round-robin; the client retries
idempotent calls on UNAVAILABLE). ``--kill-replica-at S`` SIGKILLs one replica S seconds
into the load and restarts it ``--restart-after`` seconds later; the phones record every
acknowledged backup (photo id, SHA-256 of the encrypted blob), and after the run each
replica alone is checked: no acknowledged photo lost, every family's data identical from
every replica, errors by status before / during / after the kill (bench/replica_kill.py).
``--matrix`` runs the same load three times: SQLite (1 process), PostgreSQL (1 replica),
PostgreSQL (2 replicas), PostgreSQL from ``--pg-url`` or ``scripts/pg start``.
Loopback only; bounded by ``--seconds`` and ``--max-requests``.

Importing this module patches the standard library for gevent (locust does so on
import) and sets up grpcio for gevent: run it as a script or import it first.

Usage::

    .venv/bin/python bench/load_test.py --families 8 --users 16 --seconds 60 \\
        --json bench/results/load.json [--profile out.svg] [--insecure]
    .venv/bin/python bench/load_test.py --server 127.0.0.1:50051,127.0.0.1:50052 \\
        --tls-ca ca.pem --vendor-token-file var/server/vendor.token ...
    .venv/bin/python bench/load_test.py --replicas 2 --store "$(scripts/pg url)" \\
        --kill-replica-at 30 --json bench/results/load_replica_kill.json
    .venv/bin/python bench/load_test.py --matrix --json bench/results/load_matrix.json
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# Replicas are restarted from this process while its gRPC channels are busy: gRPC's fork
# handlers (for a fork that keeps running Python, not fork + exec) abort the child there.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "0"

# locust monkey-patches the standard library for gevent on import: before grpc and ssl.
import locust  # noqa: I001
from locust import TaskSet, User, between, constant
from locust.env import Environment

import grpc
import grpc.experimental.gevent as grpc_gevent  # type: ignore[import-not-found]

grpc_gevent.init_gevent()  # before any channel is made

import argparse  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import secrets  # noqa: E402
import shutil  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter, defaultdict  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import gevent  # type: ignore[import-untyped]  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # type: ignore[import-untyped]  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import replica_kill  # noqa: E402
from bench.common import print_table, write_json  # noqa: E402
from bench.replica_kill import CallEvent, KillRecord, ReplicaSet  # noqa: E402
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
    ServerUnavailableError,
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
    # backups that failed (maybe stored anyway: in flight when a replica died)
    unsettled: dict[str, frozenset[int]] = field(default_factory=dict)
    # acknowledged backups: photo id -> SHA-256 (hex) of the encrypted blob sent
    acked: dict[str, str] = field(default_factory=dict)

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


def generous_limits(users: int, families: int) -> dict[str, int]:
    """Server limits (ServerConfig fields) raised where the defaults would refuse this
    load: every phone may hold a long call at once (all on one replica when another is
    down), a family's phones all at once, and every family registers within the same
    minute from 127.0.0.1. Only the fields this server has; defaults that are already
    enough are kept."""
    base = ServerConfig()
    wanted = {"max_streams": users + 8,
              "max_family_streams": -(-users // max(1, families)) + 2,
              "register_per_minute": families + 10,
              "max_calls_per_address": users + 8}  # every phone is 127.0.0.1
    out = {k: v for k, v in wanted.items() if isinstance(getattr(base, k, None), int)
           and v > getattr(base, k)}
    if "max_streams" in out and hasattr(base, "workers"):
        public = int(getattr(base, "max_public_streams", 0))
        out["workers"] = max(base.workers, out["max_streams"] + public + 8)
    return out


def limit_flags(limits: dict[str, int]) -> list[str]:
    """``--max-streams 24 ...`` for a server's command line."""
    return [x for k, v in limits.items() for x in ("--" + k.replace("_", "-"), str(v))]


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
                 key: sc.ProductKey | None = None, retried_ack_ok: bool = False) -> None:
        self.family = family
        self.client = client
        self.rng = rng
        self.detections = detections
        self.key = key
        # With a replica killed mid-run, a backup retried after its acknowledgement was lost
        # is rightly answered "already stored" (the ids are fresh, so only a retry can be).
        self.retried_ack_ok = retried_ack_ok
        self.already_on_retry = 0
        self.rpc_start: float | None = None  # perf_counter when the last RPC began

    def started(self, default: float) -> float:
        """When the last call's RPC began (``default`` if it never did: failed before)."""
        return default if self.rpc_start is None else self.rpc_start

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
            self.rpc_start = start = time.perf_counter()
            already = self.client.backup_photo(photo_id, blob, encrypted,
                                               bundle.label_key.fingerprint(), thumb)
            seconds = time.perf_counter() - start
        except BaseException:
            f.unsettled[photo_id] = base.slots  # maybe stored anyway: not acknowledged
            raise
        finally:
            f.pending.pop(photo_id, None)

        def check(already: bool) -> None:
            if already and not self.retried_ack_ok:
                raise WrongResult(f"a new photo {photo_id} was reported as already stored")
            self.already_on_retry += already
            f.stored[photo_id] = base.slots
            f.acked[photo_id] = hashlib.sha256(blob).hexdigest()
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
        self.rpc_start = start = time.perf_counter()
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
        may = must | {i for i, s in [*f.stored.items(), *f.pending.items(),
                                     *f.unsettled.items()]
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
        self.rpc_start = start = time.perf_counter()
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
        self.rpc_start = start = time.perf_counter()
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
        self.rpc_start = start = time.perf_counter()
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
    by_server: dict[str, int]  # calls per server address (list) the phones were given
    loadavg: tuple[float, float]  # the machine's 1-minute load average before and after
    events: list[CallEvent] = field(default_factory=list)  # every call, on the load's clock
    kill: KillRecord | None = None  # the replica killed and restarted, if any
    already_on_retry: int = 0  # backups answered "already stored" after a retry
    server_cpu_by_replica: list[float] | None = None  # CPU seconds per replica


def status_of(exc: BaseException) -> str:
    """The gRPC status code name of a failed call (WRONG_RESULT for a wrong answer)."""
    if isinstance(exc, WrongResult):
        return "WRONG_RESULT"
    for e in (exc, exc.__context__):
        if isinstance(e, grpc.RpcError) and hasattr(e, "code"):
            return str(e.code().name)
    if isinstance(exc, RemoteError):
        return exc.code.name
    if isinstance(exc, ServerUnavailableError):  # UNAVAILABLE, translated by the client
        return "UNAVAILABLE"
    return type(exc).__name__


def _make_user(prebuilt: Prebuilt, servers: Sequence[str], config: ClientConfig,
               mix: dict[str, int], wait: float, seed: int, each_first: bool,
               spread: bool, retried_ack_ok: bool, phones: list[_Phone]) -> type[User]:
    counter = itertools.count()
    families = prebuilt.families
    balanced = ",".join(servers)

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
            # One channel over every server (round-robin), or (spread) server i mod S.
            self.server = servers[i % len(servers)] if spread else balanced
            self.client = PrivfaceClient(self.server, family.credentials, config)
            self.phone = _Phone(family, self.client, random.Random(seed * 1000 + i),
                                prebuilt.detections, prebuilt.product_key, retried_ack_ok)
            phones.append(self.phone)
            if each_first:
                for kind, weight in mix.items():
                    if weight > 0:
                        self.call(kind)

        def on_stop(self) -> None:
            self.client.close()

        def call(self, kind: str) -> None:
            start = time.perf_counter()
            self.phone.rpc_start = None
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
                context={"server": self.server, "server_ms": server_ms,
                         "rpc_start": self.phone.started(start),
                         "end": time.perf_counter()})

    return Phone


def run_load(prebuilt: Prebuilt, servers: Sequence[str], config: ClientConfig,
             users: int = 16, seconds: float = 60, seed: int = 1,
             mix: dict[str, int] | None = None, wait: float = 0.0,
             max_requests: int = 200_000, server_pid: int | None = None,
             profile: Path | None = None, each_first: bool = False,
             replicas: ReplicaSet | None = None, kill_at: float | None = None,
             kill_replica: int = -1, restart_after: float = 2.0,
             spread: bool = False) -> LoadResult:
    """``users`` phones for ``seconds`` (or ``max_requests`` calls) in one locust
    environment; every call's latency and status recorded. ``each_first``: each phone
    starts with one call of every kind in the mix (so a short run covers them all).
    ``replicas``: the servers started here (their CPU is measured); with ``kill_at``,
    replica ``kill_replica`` is SIGKILLed that many seconds into the load and restarted
    ``restart_after`` s later (the run lasts at least until it serves again). ``spread``:
    each phone talks to one server (i mod S) instead of balancing over all of them."""
    mix = dict(mix or MIX)
    if prebuilt.product_key is None or not prebuilt.detections:
        mix["detect"] = 0
    phones: list[_Phone] = []
    phone_class = _make_user(prebuilt, servers, config, mix, wait, seed, each_first, spread,
                             kill_at is not None, phones)
    env = Environment(user_classes=[phone_class], stop_timeout=60)
    samples: dict[str, list[float]] = defaultdict(list)
    server_ms: dict[str, list[float]] = defaultdict(list)
    by_server: Counter[str] = Counter()
    errors: dict[str, Counter[str]] = defaultdict(Counter)
    examples: dict[str, str] = {}
    events: list[CallEvent] = []
    runner = env.create_local_runner()
    t0 = time.perf_counter()

    def on_request(name: str, response_time: float, exception: BaseException | None,
                   context: dict[str, Any], **_: Any) -> None:
        samples[name].append(response_time)
        by_server[context["server"]] += 1
        if context.get("server_ms") is not None and exception is None:
            server_ms[name].append(context["server_ms"])
        code = "OK"
        if exception is not None:
            code = status_of(exception)
            errors[name][code] += 1
            examples.setdefault(f"{name} {code}", str(exception)[:300])
        events.append(CallEvent(name, context["rpc_start"] - t0, context["end"] - t0, code))
        if sum(len(s) for s in samples.values()) == max_requests:
            gevent.spawn(runner.quit)

    env.events.request.add_listener(on_request)
    server_proc = psutil.Process(server_pid) if server_pid and replicas is None else None
    server_cpu0 = _cpu(server_proc)
    replica_cpu0 = replicas.cpu_seconds() if replicas is not None else None
    driver_cpu0 = _cpu(psutil.Process())
    profiler = _start_profile(profile, server_pid, seconds)
    load_before = os.getloadavg()[0]
    t0 = start = time.perf_counter()
    killer = None
    if replicas is not None and kill_at is not None:
        index = kill_replica % len(replicas.servers)
        killer = gevent.spawn(replicas.kill_and_restart, index, kill_at, restart_after, t0)
    runner.start(users, spawn_rate=users)
    stopper = gevent.spawn_later(seconds, runner.quit)
    runner.greenlet.join()
    stopper.kill()
    elapsed = time.perf_counter() - start
    kill = None
    if killer is not None:
        if not killer.ready() and kill_at is not None and kill_at >= elapsed:
            killer.kill()  # the load ended before the kill: none happened
        else:
            kill = killer.get()  # waits for the restart
            kill = replace(kill, in_flight=sum(1 for e in events
                                               if e.start < kill.killed_at <= e.end))
    server_cpu = _cpu(server_proc) - server_cpu0 if server_proc else None
    by_replica = None
    if replicas is not None and replica_cpu0 is not None:
        by_replica = [round(b - a, 2) for a, b in zip(replica_cpu0, replicas.cpu_seconds(),
                                                      strict=True)]
        server_cpu = sum(by_replica)
    driver_cpu = _cpu(psutil.Process()) - driver_cpu0
    if profiler is not None:
        profiler.wait()
    return LoadResult(dict(samples), dict(errors), elapsed, users, server_cpu, driver_cpu,
                      bool(runner.cpu_warning_emitted), examples, dict(server_ms),
                      dict(by_server), (load_before, os.getloadavg()[0]), events, kill,
                      sum(p.already_on_retry for p in phones), by_replica)


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
        loadavg_before=round(result.loadavg[0], 2), loadavg_after=round(result.loadavg[1], 2),
        server_cpu_ms_per_call=(round(result.server_cpu_s * 1000 / total, 2)
                                if result.server_cpu_s is not None and total else None),
        server_cpu_s_by_replica=result.server_cpu_by_replica,
        backups_already_stored_on_retry=result.already_on_retry,
        kill_at_s=round(result.kill.killed_at, 2) if result.kill else None,
        kill=(None if result.kill is None else
              {"replica": result.kill.replica, "address": result.kill.address,
               "killed_at_s": round(result.kill.killed_at, 2),
               "serving_again_at_s": round(result.kill.back_at, 2),
               "down_s": round(result.kill.back_at - result.kill.killed_at, 2),
               "calls_in_flight": result.kill.in_flight}),
        by_window=replica_kill.windows_report(result.events, result.kill))
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
    kill = figures.get("kill")
    if kill:
        print(f"replica {kill['replica']} ({kill['address']}) SIGKILLed at "
              f"{kill['killed_at_s']} s, serving again at {kill['serving_again_at_s']} s; "
              f"{kill['calls_in_flight']} calls in flight at the kill; "
              f"{figures['backups_already_stored_on_retry']} backups acknowledged on a retry "
              "as already stored")
        report = figures["by_window"]
        rows = []
        for kind, name in RPC_NAMES.items():
            if not figures["rpcs"][kind]["requests"]:
                continue
            row: list[Any] = [name]
            for w in ("before", "during", "after"):
                win = report["windows"][w]
                errs = win["errors"].get(name, {})
                row.append(f"{win['calls'].get(name, 0)} / "
                           + (", ".join(f"{c} x{n}" for c, n in sorted(errs.items())) or "0"))
            flying = report["failed_in_flight"].get(name, {})
            other = report["failed_not_in_flight"].get(name, {})
            row += [f"{report['in_flight_at_kill'].get(name, 0)} / {sum(flying.values())}",
                    sum(other.values())]
            rows.append(row)
        print_table(["RPC", "before: calls / errors", "during", "after",
                     "in flight at kill / failed", "failed, not in flight"], rows)
    if "lost_uploads" in figures:
        print(f"acknowledged uploads: {figures['acked_uploads']}, lost: "
              f"{figures['lost_uploads']}; every family identical from each of "
              f"{len(figures['verified_replicas'])} replica(s): "
              f"{figures['consistent_across_replicas']}"
              + "".join(f"\n  {d}" for d in [*figures["lost_examples"],
                                               *figures["differences"],
                                               *figures["verify_problems"]][:10]))


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


def record_baseline(address: str, config: ClientConfig, families: Sequence[LoadFamily]
                    ) -> None:
    """The photos backed up while building the families are acknowledged too: each is
    fetched once (before any load or fault) and its blob's SHA-256 goes in the ledger."""
    for f in families:
        with PrivfaceClient(address, f.credentials, config) as client:
            for photo_id in f.stored:
                f.acked[photo_id] = hashlib.sha256(client.fetch_photo(photo_id)).hexdigest()


def storage_costs(replicas: ReplicaSet, photos: int, families: int) -> dict[str, Any]:
    """What the store and blob store hold after the run, per photo and per family."""
    out: dict[str, Any] = {"photos": photos, "families": families}
    if replica_kill.store_kind(replicas.store) == "postgresql":
        sizes = replica_kill.postgres_sizes(replicas.store)
        out["db_bytes"] = sizes["database_bytes"]
        out["db_tables"] = sizes["tables"]
        out["db_photo_rows_bytes"] = sizes["tables"].get("photos", {}).get("bytes")
    else:
        db = (Path(replicas.store[len("sqlite:"):]) if replicas.store
              else replicas.work / "data-0" / "privface.sqlite3")
        out["db_bytes"] = sum(f.stat().st_size for f in db.parent.glob(db.name + "*"))
    blob_dir = (Path(replicas.blobs[len("file:"):]) if replicas.blobs.startswith("file:")
                else None if replicas.blobs else replicas.work / "data-0")
    if blob_dir is not None:
        files, size = replica_kill.tree_bytes(blob_dir)
        if not replicas.blobs:  # the default data dir holds the database too
            size -= out["db_bytes"]
        out.update(blob_files=files, blob_bytes=size,
                   blob_kinds=replica_kill.blob_kinds(blob_dir))
    if photos:
        out["db_bytes_per_photo"] = round(out["db_bytes"] / photos)
        if out.get("db_photo_rows_bytes"):
            out["db_photo_row_bytes_per_photo"] = round(out["db_photo_rows_bytes"] / photos)
        if "blob_bytes" in out:
            out["blob_bytes_per_photo"] = round(out["blob_bytes"] / photos)
    return out


def per_rpc_costs(prebuilt: Prebuilt, servers: Sequence[str], config: ClientConfig,
                  replicas: ReplicaSet, users: int, seconds: float, seed: int
                  ) -> dict[str, Any]:
    """Server CPU per call of each kind alone: a short load of that kind only."""
    out: dict[str, Any] = {}
    for kind in ("search", "match", "backup", "thumbnail", "fetch", "detect"):
        if kind == "detect" and not prebuilt.detections:
            continue
        mix = {k: int(k == kind) for k in MIX}
        result = run_load(prebuilt, servers, config, users, seconds, seed, mix,
                          replicas=replicas)
        calls = sum(len(v) for v in result.samples.values())
        cpu = result.server_cpu_s or 0.0
        out[kind] = {"calls": calls, "rps": round(calls / result.seconds, 1),
                     "server_cpu_ms_per_call": round(cpu * 1000 / calls, 2) if calls else None,
                     "server_cpu_cores": round(cpu / result.seconds, 2),
                     "errors": sum(sum(c.values()) for c in result.errors.values())}
        log(f"[cost] {kind}: {out[kind]}")
    return out


def run_once(args: argparse.Namespace, n_replicas: int, store: str, blobs: str,
             kill_at: float | None, label: str = "", cost_per_rpc: float = 0.0
             ) -> dict[str, Any]:
    """One load run: servers started here (or --server), families built, the load, the
    checks (and ``cost_per_rpc`` s of each RPC alone); the figures."""
    verify = bool(args.verify or n_replicas > 1 or kill_at is not None)
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="privface-load-")))
        replicas = None
        if args.server:
            servers = [s.strip() for s in args.server.split(",") if s.strip()]
            token = (args.vendor_token_file.read_text().strip() if args.vendor_token_file
                     else os.environ.get("PRIVFACE_VENDOR_TOKEN", ""))
            tls_ca, server_pid = args.tls_ca, None
        else:
            limits = generous_limits(args.users, args.families)
            replicas = ReplicaSet(work, n_replicas, insecure=args.insecure, store=store,
                                  blobs=blobs, flags=limit_flags(limits),
                                  vendor_token=secrets.token_urlsafe(32))
            stack.callback(replicas.stop)
            replicas.start()
            servers, token, tls_ca = replicas.addresses, replicas.vendor_token, replicas.tls_ca
            server_pid = replicas.servers[0].pid
            log(f"[server] {n_replicas} privface-server replica(s) on {', '.join(servers)} "
                f"({'plaintext' if args.insecure else 'TLS'}; store "
                f"{replica_kill.redact(replicas.store) or 'default (SQLite in the data dir)'}"
                f", blobs {replicas.blobs or 'default'}"
                + "".join(f", {k}={v}" for k, v in limits.items()) + ")")
        rss_idle = replicas.rss_mb() if replicas else None
        config = ClientConfig.load(tls_ca=tls_ca, insecure=args.insecure or None)
        balanced = ",".join(servers)
        prebuilt = prebuild(balanced, config, args.families, args.members, args.photos,
                            args.seed, token, args.detections, work, args.enroll_photos,
                            args.query_faces)
        if verify:
            record_baseline(balanced, config, prebuilt.families)
        log(f"[prebuild] {len(prebuilt.families)} families in {prebuilt.seconds:.0f} s; "
            f"load: {args.users} phones for {args.seconds:.0f} s on {', '.join(servers)}"
            + (f", replica {args.kill_replica % n_replicas} SIGKILLed at {kill_at:.0f} s"
               if kill_at is not None else ""))
        if kill_at is not None and replicas is None:
            raise SystemExit("--kill-replica-at needs servers started here (not --server)")
        result = run_load(prebuilt, servers, config, args.users, args.seconds, args.seed,
                          args.mix, args.wait, args.max_requests, server_pid, args.profile,
                          args.each_first, replicas, kill_at, args.kill_replica,
                          args.restart_after, args.spread)
        figures = summarise(result, args.mix)
        if verify:
            log("[verify] each replica alone: lists, photos, counts, gallery, searches, "
                "matches")
            figures.update(replica_kill.verify_replicas(servers, prebuilt.families, config))
        if replicas is not None:
            photos_held = figures.get("photos_on_server") or sum(
                len(f.stored) for f in prebuilt.families)
            figures["costs"] = storage_costs(replicas, photos_held, args.families)
            figures["costs"].update(rss_mb_idle=rss_idle, rss_mb_after=replicas.rss_mb())
            if cost_per_rpc:
                figures["costs"]["per_rpc"] = per_rpc_costs(
                    prebuilt, servers, config, replicas, args.users, cost_per_rpc, args.seed)
    store_name = (replica_kill.redact(replicas.store) if replicas and replicas.store
                  else "sqlite (default, data dir)" if replicas else "running servers")
    figures.update(label=label, replicas=n_replicas if replicas else len(servers),
                   store=store_name, store_kind=replica_kill.store_kind(store),
                   blobs=replicas.blobs if replicas else None,
                   families=args.families, members=args.members, photos=args.photos,
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
    return figures


def _pg_base_url(args: argparse.Namespace) -> tuple[str, bool]:
    """The PostgreSQL to use: --pg-url, else ``scripts/pg url`` (started with ``scripts/pg
    start`` when not running); whether it was started here."""
    if args.pg_url:
        return args.pg_url, False
    script = ROOT / "scripts" / "pg"
    if not script.exists():
        raise SystemExit("--matrix needs PostgreSQL: give --pg-url URL (scripts/pg is absent)")
    url = subprocess.run([str(script), "url"], cwd=ROOT, capture_output=True, text=True)
    if url.returncode == 0 and url.stdout.strip():
        return url.stdout.strip().splitlines()[-1], False
    subprocess.run([str(script), "start"], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    url = subprocess.run([str(script), "url"], cwd=ROOT, capture_output=True, text=True,
                         check=True)
    return url.stdout.strip().splitlines()[-1], True


MATRIX_KEYS = ["label", "replicas", "rps_total", "rps_search", "p99_ms_search", "rps_backup",
               "p99_ms_backup", "rps_match", "p99_ms_match", "errors_total",
               "server_cpu_cores", "lost_uploads", "consistent_across_replicas"]


def run_matrix(args: argparse.Namespace) -> dict[str, Any]:
    """SQLite (1 process), PostgreSQL (1 replica), PostgreSQL (2 replicas), the same load
    and duration, each on a fresh store; with --kill-replica-at, a fourth run on
    PostgreSQL (2 replicas) with one replica killed and restarted."""
    base, started = _pg_base_url(args)
    args.verify = True  # every row: acknowledged backups and the data checked afterwards
    rows: list[tuple[str, int, bool, float | None]] = [
        ("SQLite, 1 process", 1, False, None), ("PostgreSQL, 1 replica", 1, True, None),
        ("PostgreSQL, 2 replicas", 2, True, None)]
    if args.kill_replica_at is not None:
        rows.append((f"PostgreSQL, 2 replicas, one SIGKILLed at {args.kill_replica_at:.0f} s",
                     2, True, args.kill_replica_at))
    results = []
    try:
        for i, (label, n, pg, kill_at) in enumerate(rows):
            log(f"[matrix] {i + 1}/{len(rows)}: {label}")
            name = f"privface_load_{i}"
            store = replica_kill.fresh_database(base, name) if pg else ""
            try:
                results.append(run_once(args, n, store, args.blobs if pg else "", kill_at,
                                        label, args.cost_per_rpc if i == 1 else 0.0))
            finally:
                if pg and not args.keep_databases:
                    replica_kill.drop_database(base, name)
            print_report(results[-1])
    finally:
        if started:
            subprocess.run([str(ROOT / "scripts" / "pg"), "stop"], cwd=ROOT, check=False)
    print_table(MATRIX_KEYS, [[("-" if r.get(k) is None else r.get(k)) for k in MATRIX_KEYS]
                              for r in results])
    return {"rows": results, "table": [{k: r.get(k) for k in MATRIX_KEYS} for r in results],
            "users": args.users, "seconds": args.seconds, "families": args.families,
            "cores": os.cpu_count()}


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
                        help="comma-separated host:port of running servers (every phone "
                             "balances over all of them; --spread: phone i on server i mod "
                             "S); default: start --replicas here")
    parser.add_argument("--spread", action="store_true",
                        help="each phone talks to one server (i mod S) instead of "
                             "balancing over the list")
    parser.add_argument("--replicas", type=int, default=1,
                        help="privface-server processes started here, on different ports, "
                             "sharing --store and --blobs (default 1)")
    parser.add_argument("--store", default="",
                        help="sqlite:PATH or postgresql://... for the servers started here "
                             "(default: SQLite in the data dir; several replicas share "
                             "one SQLite file)")
    parser.add_argument("--blobs", default="",
                        help="file:DIR or s3://BUCKET/PREFIX (S3 endpoint and keys from "
                             "PRIVFACE_S3_* / AWS_*; default: files beside the store)")
    parser.add_argument("--kill-replica-at", type=float, metavar="SECONDS",
                        help="SIGKILL one replica this many seconds into the load, restart "
                             "it --restart-after later; then check every acknowledged "
                             "backup and every family on each replica")
    parser.add_argument("--kill-replica", type=int, default=-1,
                        help="which replica to kill (index, default -1: the last)")
    parser.add_argument("--restart-after", type=float, default=2.0,
                        help="seconds between the SIGKILL and the restart (default 2)")
    parser.add_argument("--verify", action="store_true",
                        help="check each server alone after the run (on by default with "
                             "several replicas or a kill)")
    parser.add_argument("--matrix", action="store_true",
                        help="three runs of the same load: SQLite (1 process), PostgreSQL "
                             "(1 replica), PostgreSQL (2 replicas), each on a fresh store "
                             "(and with --kill-replica-at a fourth: 2 replicas, one killed)")
    parser.add_argument("--pg-url", default="",
                        help="with --matrix: a PostgreSQL URL whose server may create "
                             "databases (default: scripts/pg url, after scripts/pg start)")
    parser.add_argument("--keep-databases", action="store_true",
                        help="with --matrix: keep each run's database")
    parser.add_argument("--cost-per-rpc", type=float, default=0, metavar="SECONDS",
                        help="after the load, each RPC kind alone for this long: server CPU "
                             "per call (with --matrix: in the PostgreSQL 1-replica run)")
    parser.add_argument("--tls-ca", type=Path, help="CA (PEM) the servers' certificates "
                        "chain to (with --server)")
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext gRPC (the servers started here too)")
    parser.add_argument("--vendor-token-file", type=Path,
                        help="with --server: the server's vendor token (else "
                             "PRIVFACE_VENDOR_TOKEN); without one, no secure detection")
    parser.add_argument("--each-first", action="store_true",
                        help="each phone first makes one call of every kind (smoke tests)")
    parser.add_argument("--profile", type=Path,
                        help="py-spy profile of the (first) server started here (.svg, "
                             ".json, or collapsed stacks)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", help="write figures to this JSON file")
    args = parser.parse_args(argv)
    if args.server and (args.matrix or args.kill_replica_at is not None
                        or args.replicas != 1 or args.store or args.blobs):
        parser.error("--server targets running servers: --replicas, --store, --blobs, "
                     "--kill-replica-at and --matrix start their own")
    if args.kill_replica_at is not None and args.replicas < 2 and not args.matrix:
        parser.error("--kill-replica-at needs --replicas 2 or more (someone must serve)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.matrix:
        write_json(args.json, run_matrix(args))
        return 0
    figures = run_once(args, args.replicas, args.store, args.blobs, args.kill_replica_at,
                       cost_per_rpc=args.cost_per_rpc)
    print_report(figures)
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
