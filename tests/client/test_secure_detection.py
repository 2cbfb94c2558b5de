"""Secure face detection end to end through a real server.

* Parity: SecureDetector's boxes equal ``cv2.CascadeClassifier.detectMultiScale`` at the
  mode's scan parameters on the same working image, on real photos (DEFAULT mode on
  group photos, people photos and LFW; FAITHFUL mode on one small image).
* Security and robustness over real gRPC: wrong product key (version or key), unknown
  detector, malformed window batches, publishing without the vendor token, a tampered
  detector upload.
* The server never holds plaintext cascade weights.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from client.pipeline.detect import (
    DEFAULT,
    FAITHFUL,
    SMALL_FACES,
    DetectionMode,
    SecureDetector,
    working_image,
)
from client.rpc import PrivfaceClient, detector_header, translate
from common import errors
from common import secure_cascade as sc
from common.cascade import Cascade, default_cascade_path, load_cascade
from privface.v1 import detection_pb2
from server.app import vendor_token
from server.config import ServerConfig
from tests.conftest import require_data

DETECTOR_ID = "frontalface_alt"
N_GROUP = 11  # every dlib group photo
N_PEOPLE = 14  # people and group_* photos (the slowest: scaled to 640 px)
N_LFW = 30  # 250x250, fast


# -- vendor material (module scope) and per-server publication ------------------------


@dataclasses.dataclass(frozen=True)
class VendorMaterial:
    cascade: Cascade
    key: sc.ProductKey
    enc: sc.EncryptedCascade
    header: detection_pb2.DetectorHeader
    matrix: bytes


@pytest.fixture(scope="module")
def material() -> VendorMaterial:
    """The vendor's cascade, product key (version 1) and encrypted upload, made once."""
    cascade = load_cascade()
    key = sc.generate_product_key(DETECTOR_ID, cascade, rng=np.random.default_rng(1))
    enc = sc.encrypt_cascade(cascade, key, rng=np.random.default_rng(2))
    return VendorMaterial(cascade, key, enc, detector_header(enc), enc.matrix_bytes())


@pytest.fixture
def server_config(server_config: ServerConfig, request: pytest.FixtureRequest) -> ServerConfig:
    """conftest's config, with overrides from indirect parametrisation if any."""
    return dataclasses.replace(server_config, **getattr(request, "param", {}))


@pytest.fixture
def published(server: tuple[str, ServerConfig], family, material: VendorMaterial
              ) -> Iterator[tuple[PrivfaceClient, ServerConfig]]:
    """A server with the vendor's detector published; yields (family client, config)."""
    client, _bundle = family
    _address, config = server
    client.publish_detector(material.header, material.matrix, vendor_token(config))
    yield client, config


@functools.lru_cache(maxsize=1)
def _opencv() -> cv2.CascadeClassifier:
    classifier = cv2.CascadeClassifier(default_cascade_path())
    assert not classifier.empty()
    return classifier


def _opencv_boxes(detector: SecureDetector, image: np.ndarray) -> list[tuple[int, ...]]:
    """detectMultiScale at the mode's parameters on the detector's own working image,
    mapped back to photo pixels as SecureDetector maps its boxes."""
    gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    work, scale = working_image(gray, detector.mode.working_long_side)
    p = detector.mode.params
    boxes = _opencv().detectMultiScale(work, scaleFactor=p.scale_factor,
                                       minNeighbors=p.min_neighbors, minSize=p.min_size,
                                       maxSize=p.max_size or (0, 0))
    return sorted(tuple(round(v / scale) for v in b) for b in np.reshape(boxes, (-1, 4)))


def _check_parity(client: PrivfaceClient, key: sc.ProductKey, paths: list[Path],
                  mode: DetectionMode = DEFAULT) -> None:
    detector = SecureDetector(client, key, mode, rng=np.random.default_rng(3))
    differences, faces = [], 0
    for path in paths:
        image = cv2.imread(str(path))
        assert image is not None, path
        report = detector.detect(image)
        expected = _opencv_boxes(detector, image)
        faces += len(expected)
        if report.boxes != expected:
            differences.append(f"{path.name}: secure {report.boxes} opencv {expected}")
        assert report.positions > 0 and report.windows_sent > 0 and report.bytes_uploaded > 0
    assert not differences, "boxes differ from detectMultiScale:\n" + "\n".join(differences)
    assert faces > 0  # the photos do contain faces OpenCV finds


def _read(path: Path) -> np.ndarray:
    image = cv2.imread(str(path))
    assert image is not None, path
    return image


def _photos(folder_glob: str) -> list[Path]:
    root = require_data("photos")
    return sorted(p for p in root.glob(folder_glob)
                  if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


# -- (a) DEFAULT parity on real photos --------------------------------------------------


def test_default_parity_group_photos(published, material) -> None:
    paths = [p for p in _photos("dlib_examples_group/*") if p.name != "dogs.jpg"]
    assert len(paths) == N_GROUP
    _check_parity(published[0], material.key, paths)


def test_small_faces_parity_group_photos(published, material) -> None:
    """The small-faces mode (faces from 24 px) equals detectMultiScale at its parameters, and
    on these photos of small faces it finds more than the default mode."""
    paths = [p for p in _photos("dlib_examples_group/*") if p.name != "dogs.jpg"][:6]
    _check_parity(published[0], material.key, paths, SMALL_FACES)
    found = {}
    for mode in (DEFAULT, SMALL_FACES):
        detector = SecureDetector(published[0], material.key, mode)
        found[mode.name] = sum(len(_opencv_boxes(detector, _read(p))) for p in paths)
    assert found["small-faces"] > found["default"]


def test_detection_traffic_is_what_the_report_says(published, material) -> None:
    """Every window message is counted by the client's traffic meter, as in the report."""
    client = published[0]
    path = _photos("group_*/*")[0]
    sent0, received0 = client.traffic.snapshot()
    report = SecureDetector(client, material.key).detect(_read(path))
    sent, received = (a - b for a, b in zip(client.traffic.snapshot(), (sent0, received0),
                                            strict=True))
    assert report.bytes_uploaded <= sent <= report.bytes_uploaded + 200  # + the opening
    assert report.windows_sent <= received


def test_default_parity_people_photos(published, material) -> None:
    paths = _photos("group_*/*") + _photos("people/*/*")
    # A fixed spread: every group_* photo, then people photos evenly.
    groups = [p for p in paths if p.parent.name.startswith("group_")]
    people = [p for p in paths if p not in groups]
    chosen = groups + people[:: max(1, len(people) // (N_PEOPLE - len(groups)))]
    _check_parity(published[0], material.key, chosen[:N_PEOPLE])


def test_default_parity_lfw(published, material) -> None:
    root = require_data("lfw", "images")
    people = sorted(d for d in root.iterdir() if d.is_dir())
    chosen = [sorted(d.glob("*.jpg"))[0] for d in people[:: len(people) // N_LFW][:N_LFW]]
    _check_parity(published[0], material.key, chosen)


# -- (b) FAITHFUL parity on one small image ----------------------------------------------


def test_faithful_parity_small_image(published, material) -> None:
    path = require_data("lfw", "images", "George_W_Bush", "George_W_Bush_0001.jpg")
    client, _ = published
    image = cv2.imread(str(path))
    assert image is not None
    detector = SecureDetector(client, material.key, FAITHFUL)
    report = detector.detect(image)
    found = _opencv().detectMultiScale(cv2.cvtColor(image, cv2.COLOR_BGR2GRAY))
    expected = sorted((int(x), int(y), int(w), int(h))
                      for x, y, w, h in np.asarray(found).reshape(-1, 4))
    assert expected and report.boxes == expected
    # Faithful: every position, once, float64, one round.
    assert report.windows_sent == report.positions
    assert report.resent_float64 == 0
    dim = material.enc.cipher_dim
    assert report.positions * dim * 8 < report.bytes_uploaded < report.positions * dim * 8 * 1.001
    # About 88 MB of float64 windows per scan batch here: split to fit the server's limit.
    assert report.bytes_uploaded / report.batches < published[1].max_message_bytes


# -- (c) keys, unknown detectors, malformed batches, vendor token, tampering -------------


def _session(key_version: int, fingerprint: bytes, detector_id: str = DETECTOR_ID
             ) -> detection_pb2.DetectFacesRequest:
    return detection_pb2.DetectFacesRequest(session=detection_pb2.DetectionSession(
        detector_id=detector_id, key_version=key_version, key_fingerprint=fingerprint))


def _run_raw(client: PrivfaceClient, requests: list[detection_pb2.DetectFacesRequest]
             ) -> list[detection_pb2.DetectFacesResponse]:
    """Drives DetectFaces directly with the family's credentials."""
    return list(client.detector.DetectFaces(iter(requests), timeout=30,
                                            metadata=client.metadata()))


def _raw_error(client: PrivfaceClient, requests: list[detection_pb2.DetectFacesRequest]
               ) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _run_raw(client, requests)
    return info.value


def _windows(key: sc.ProductKey, n: int, encoding=sc.Encoding.FLOAT32, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (n, key.n_pixels)).astype(np.float64)
    return sc.encrypt_windows(key, pixels, np.full(n, 1000.0), encoding, rng=rng)


def _batch(count: int, windows: bytes, encoding: int = sc.Encoding.FLOAT32, **kw
           ) -> detection_pb2.DetectFacesRequest:
    return detection_pb2.DetectFacesRequest(batch=detection_pb2.WindowBatch(
        # Raw wire values on purpose, invalid ones included (the stub types only names).
        count=count, windows=windows, encoding=encoding,  # type: ignore[arg-type]
        kind=kw.pop("kind", detection_pb2.WINDOW_KIND_FULL), **kw))


def _other_keys(material: VendorMaterial) -> dict[str, tuple[sc.ProductKey, str]]:
    cascade = material.cascade
    return {
        "other version": (sc.generate_product_key(DETECTOR_ID, cascade, version=2,
                                                  rng=np.random.default_rng(4)), "version 2"),
        "other key": (sc.generate_product_key(DETECTOR_ID, cascade, version=1,
                                              rng=np.random.default_rng(5)), "v1"),
    }


@pytest.mark.parametrize("which", ["other version", "other key"])
def test_wrong_product_key_is_failed_precondition(published, material, which) -> None:
    client, _ = published
    key, names = _other_keys(material)[which]
    exc = _raw_error(client, [_session(key.version, key.fingerprint()),
                              _batch(1, _windows(key, 1))])
    assert exc.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert names in str(exc.details())
    err = translate(exc, client.address)
    assert isinstance(err, errors.PreconditionError) and names in str(err)


@pytest.mark.parametrize("which", ["other version", "other key", "unknown detector"])
def test_session_errors_through_secure_detector(published, material, which) -> None:
    if which == "unknown detector":
        key = dataclasses.replace(material.key, detector_id="no_such_detector")
        expected: type[errors.PrivfaceError] = errors.NotFoundError
        names = "no_such_detector"
    else:
        key, names = _other_keys(material)[which]
        expected = errors.PreconditionError
    image = np.full((60, 60, 3), 128, np.uint8)
    image[20:40, 20:40] = 0  # contrast, so windows are sent
    with pytest.raises(expected, match=names):
        SecureDetector(published[0], key, DEFAULT).detect(image)


def test_unknown_detector_is_not_found(published, material) -> None:
    client, _ = published
    key = material.key
    exc = _raw_error(client, [_session(key.version, key.fingerprint(), "no_such_detector"),
                              _batch(1, _windows(key, 1))])
    assert exc.code() is grpc.StatusCode.NOT_FOUND
    assert isinstance(translate(exc, client.address), errors.NotFoundError)
    assert "no_such_detector" in str(exc.details())


def test_valid_raw_batch_is_answered(published, material) -> None:
    """Positive control for the malformed-batch cases below."""
    client, _ = published
    key = material.key
    responses = _run_raw(client, [_session(key.version, key.fingerprint()),
                                  _batch(5, _windows(key, 5), batch_id=7)])
    assert len(responses) == 1
    assert responses[0].batch_id == 7 and responses[0].count == 5
    assert set(responses[0].outcomes) <= {int(o) for o in sc.Outcome}
    assert len(responses[0].outcomes) == 5


def _nan_windows(key: sc.ProductKey, dim: int) -> bytes:
    values = np.frombuffer(_windows(key, 2), "<f4").copy()
    values[dim + 3] = np.nan
    return values.tobytes()


@pytest.mark.parametrize("server_config", [{"max_window_batch": 8}], indirect=True)
@pytest.mark.parametrize("case", ["wrong length", "unknown encoding", "unspecified encoding",
                                  "nan", "infinity", "count 0", "count above limit",
                                  "prefix first_stage out of range"])
def test_malformed_batch_is_invalid_argument(published, material, case) -> None:
    client, config = published
    key = material.key
    dim = material.enc.cipher_dim
    assert config.max_window_batch == 8
    good = _windows(key, 2)
    batch = {
        "wrong length": lambda: _batch(2, good[:-4]),
        "unknown encoding": lambda: _batch(2, good, encoding=9),
        "unspecified encoding": lambda: _batch(2, good, encoding=0),
        "nan": lambda: _batch(2, _nan_windows(key, dim)),
        "infinity": lambda: _batch(2, (np.frombuffer(good, "<f4") * np.float32(np.inf))
                                   .astype("<f4").tobytes()),
        "count 0": lambda: _batch(0, b""),
        # Correctly sized, so only the count is wrong.
        "count above limit": lambda: _batch(9, _windows(key, 9)),
        "prefix first_stage out of range": lambda: _batch(
            2, b"\0" * (2 * material.enc.prefix_cipher_dim * 4), first_stage=key.prefix_stages,
            kind=detection_pb2.WINDOW_KIND_PREFIX),
    }[case]()
    exc = _raw_error(client, [_session(key.version, key.fingerprint()), batch])
    assert exc.code() is grpc.StatusCode.INVALID_ARGUMENT, exc.details()
    if case == "count above limit":
        assert "8" in str(exc.details())
    # Within the limit the same key and windows are answered (the limit, not the data).
    if case == "count above limit":
        assert len(_run_raw(client, [_session(key.version, key.fingerprint()),
                                     _batch(8, _windows(key, 8))])[0].outcomes) == 8


def test_publish_needs_vendor_token(server, family, material) -> None:
    client, _ = family
    for token in ("", "not-the-token", vendor_token(server[1]) + "x"):
        with pytest.raises(errors.AuthenticationError):
            client.publish_detector(material.header, material.matrix, token)
    # Raw status too.
    with pytest.raises(grpc.RpcError) as info:
        client.detector.PublishDetector(
            iter([detection_pb2.PublishDetectorRequest(header=material.header)]), timeout=30)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert client.list_detectors() == []


def _detector_files(config: ServerConfig) -> list[Path]:
    return sorted((Path(config.data_dir) / "blobs" / "_detectors").glob("*"))


@pytest.mark.parametrize("tamper", ["flipped byte", "wrong sha", "truncated"])
def test_tampered_upload_is_refused(server, family, material, tamper) -> None:
    client, _ = family
    config = server[1]
    header = detection_pb2.DetectorHeader()
    header.CopyFrom(material.header)
    matrix = bytearray(material.matrix)
    if tamper == "flipped byte":
        matrix[len(matrix) // 2] ^= 0x01
    elif tamper == "wrong sha":
        header.matrix_sha256 = hashlib.sha256(b"something else").digest()
    else:
        matrix = matrix[:-8]
    with pytest.raises(errors.MalformedInputError):
        client.publish_detector(header, bytes(matrix), vendor_token(config))
    assert client.list_detectors() == []
    assert _detector_files(config) == []
    # The intact upload then goes through.
    client.publish_detector(material.header, material.matrix, vendor_token(config))
    assert [d.detector_id for d in client.list_detectors()] == [DETECTOR_ID]


# -- (d) the server never holds plaintext weights ----------------------------------------


def test_server_stores_no_plaintext_weights(published, material) -> None:
    _client, config = published
    files = [p for p in Path(config.data_dir).rglob("*") if p.is_file()]  # db, blobs
    stored = _detector_files(config)
    assert len(stored) == 1 and stored[0].stat().st_size == len(material.matrix)
    rows = np.unique(np.asarray(material.cascade.weights, dtype="<f8"), axis=0)
    # Every third distinct row keeps the scan to about a second.
    needles = [r.tobytes() for r in rows[::3] if np.count_nonzero(r)]
    # The scan finds plaintext rows where they are (guards the byte layout).
    control = b"".join(needles[:3])
    assert all(control.find(n) >= 0 for n in needles[:3])
    for path in files:
        data = path.read_bytes()
        found = [i for i, n in enumerate(needles) if data.find(n) >= 0]
        assert not found, f"{path} contains {len(found)} plaintext weight rows"
