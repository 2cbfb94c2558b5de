"""Encrypted detectors on the server: publishing, caching, and secure evaluation (DC)."""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from common import secure_cascade as sc
from common.errors import (
    KeyMismatchError,
    MalformedInputError,
    NotFoundError,
    PreconditionError,
)
from privface.v1 import detection_pb2
from server.storage import Store
from server.uploads import CheckedChunks, check_limit

log = logging.getLogger(__name__)

MAX_STAGES = 256
MAX_WEAK = 100_000
MAX_CIPHER_DIM = 20_000
MAX_WINDOW_SIDE = 1024
DETECTOR_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
WINDOW_KINDS = (detection_pb2.WINDOW_KIND_UNSPECIFIED, detection_pb2.WINDOW_KIND_FULL,
                detection_pb2.WINDOW_KIND_PREFIX)


@dataclass(frozen=True)
class BatchResult:
    """Outcomes of one window batch and the time the server spent on it."""

    outcomes: bytes
    server_ms: float


def validate_header(header: detection_pb2.DetectorHeader) -> tuple[int, int]:
    """Checks every field of a detector header; returns (full, prefix) matrix byte sizes.

    Whatever passes here must evaluate: a published detector that cannot be loaded would
    break every DetectFaces on it."""
    if not DETECTOR_ID_RE.fullmatch(header.detector_id):
        raise MalformedInputError("detector_id must be 1..64 letters, digits, '.', '_' or '-', "
                                  "starting with a letter or digit")
    if not (1 <= header.window_width <= MAX_WINDOW_SIDE
            and 1 <= header.window_height <= MAX_WINDOW_SIDE):
        raise MalformedInputError(f"window_width and window_height must be within "
                                  f"1..{MAX_WINDOW_SIDE}")
    if not 1 <= len(header.stages) <= MAX_STAGES:
        raise MalformedInputError(f"a detector needs 1..{MAX_STAGES} stages")
    weak = sum(s.weak_count for s in header.stages)
    if not 1 <= weak <= MAX_WEAK:
        raise MalformedInputError(f"a detector needs 1..{MAX_WEAK} weak classifiers")
    for i, stage in enumerate(header.stages):
        if not (stage.weak_count == len(stage.left_values) == len(stage.right_values)):
            raise MalformedInputError(f"stage {i}: weak_count and leaf value counts differ")
        if stage.weak_count == 0:
            raise MalformedInputError(f"stage {i} has no weak classifier")
        if not (math.isfinite(stage.threshold) and np.all(np.isfinite(stage.left_values))
                and np.all(np.isfinite(stage.right_values))):
            raise MalformedInputError(f"stage {i}: threshold and leaf values must be finite")
    if not 1 <= header.ciphertext_dim <= MAX_CIPHER_DIM:
        raise MalformedInputError(f"ciphertext_dim must be within 1..{MAX_CIPHER_DIM}")
    if len(header.key_fingerprint) != 16 or len(header.matrix_sha256) != 32:
        raise MalformedInputError("key_fingerprint must be 16 bytes and matrix_sha256 32")
    full = weak * header.ciphertext_dim * 8
    prefix = 0
    if header.prefix_stages:
        if header.prefix_stages >= len(header.stages):
            raise MalformedInputError("prefix_stages must be fewer than the stages")
        if not 1 <= header.prefix_ciphertext_dim <= MAX_CIPHER_DIM:
            raise MalformedInputError(f"a detector with prefix stages needs a "
                                      f"prefix_ciphertext_dim within 1..{MAX_CIPHER_DIM}")
        prefix_weak = sum(s.weak_count for s in header.stages[:header.prefix_stages])
        prefix = prefix_weak * header.prefix_ciphertext_dim * 8
    elif header.prefix_ciphertext_dim:
        raise MalformedInputError("prefix_ciphertext_dim must be 0 without prefix stages")
    if header.matrix_size != full + prefix or header.prefix_matrix_size != prefix:
        raise MalformedInputError(
            f"matrix_size {header.matrix_size} does not match the structure: expected "
            f"{full} + {prefix} bytes of float64 ciphertexts")
    return full, prefix


def cascade_from_header(header: detection_pb2.DetectorHeader, matrix: bytes
                        ) -> sc.EncryptedCascade:
    """Rebuilds the server's EncryptedCascade from a stored header and matrix."""
    full, _ = validate_header(header)
    weak = sum(s.weak_count for s in header.stages)
    classifiers = np.frombuffer(matrix[:full], "<f8").reshape(weak, header.ciphertext_dim)
    if header.prefix_stages:
        prefix = np.frombuffer(matrix[full:], "<f8").reshape(-1, header.prefix_ciphertext_dim)
    else:
        prefix = np.zeros((0, 0))
    return sc.EncryptedCascade(
        detector_id=header.detector_id, key_version=header.key_version,
        key_fingerprint=header.key_fingerprint,
        window_size=(header.window_width, header.window_height),
        classifiers=classifiers, prefix_classifiers=prefix, prefix_stages=header.prefix_stages,
        stage_ends=np.cumsum([s.weak_count for s in header.stages]),
        stage_thresholds=np.array([s.threshold for s in header.stages]),
        left_values=np.concatenate([s.left_values for s in header.stages]),
        right_values=np.concatenate([s.right_values for s in header.stages]))


class DetectorRegistry:
    """Published detectors, loaded once into memory."""

    def __init__(self, store: Store, max_window_batch: int, max_detector_bytes: int) -> None:
        self.store = store
        self.max_window_batch = max_window_batch
        self.max_detector_bytes = max_detector_bytes
        self._cache: dict[tuple[str, int, str], sc.EncryptedCascade] = {}
        self._lock = threading.Lock()

    def publish(self, header: detection_pb2.DetectorHeader, chunks: Iterator[bytes]) -> None:
        """Stores a detector after checking size and hash of the streamed matrix."""
        validate_header(header)
        check_limit(header.matrix_size, self.max_detector_bytes, "detector matrix")
        checked = CheckedChunks(chunks, header.matrix_size, "detector matrix")
        size = self.store.put_detector(header.detector_id, header.key_version,
                                       header.key_fingerprint, header.SerializeToString(),
                                       checked, verify=lambda: checked.verify(header.matrix_sha256))
        log.info("published detector %s v%d (%d bytes)", header.detector_id,
                 header.key_version, size)

    def list(self) -> list[detection_pb2.DetectorHeader]:
        """Headers of every published detector."""
        return [detection_pb2.DetectorHeader.FromString(h)
                for _, _, _, h in self.store.list_detectors()]

    def open_session(self, detector_id: str, key_version: int,
                     key_fingerprint: bytes) -> sc.EncryptedCascade:
        """The detector a phone asked for, after checking its product key matches."""
        versions = self.store.detector_versions(detector_id)
        if not versions:
            raise NotFoundError(f"no detector {detector_id!r} is published on this server")
        if key_version not in versions:
            raise KeyMismatchError(
                f"detector {detector_id!r} is published with key version(s) "
                f"{sorted(versions)}, the phone's product key is version {key_version}: ask "
                "the vendor for the current product key")
        if versions[key_version] != key_fingerprint:
            raise KeyMismatchError(
                f"the phone's product key for {detector_id!r} v{key_version} is not the one "
                "the detector was published with: re-import the vendor's product key")
        # Keyed by the matrix blob too: a version published again (through any server
        # sharing the store) has a new blob, so no server keeps serving the old one.
        _, header, matrix_key = self.store.detector_record(detector_id, key_version)
        with self._lock:
            cascade = self._cache.get((detector_id, key_version, matrix_key))
            if cascade is None:
                try:
                    cascade = cascade_from_header(
                        detection_pb2.DetectorHeader.FromString(header),
                        self.store.blobs.read(matrix_key))
                except ValueError as exc:  # published before the header checks were complete
                    raise PreconditionError(
                        f"detector {detector_id!r} v{key_version} is stored but unusable "
                        f"({exc}): ask the vendor to publish it again") from exc
                self._cache = {k: v for k, v in self._cache.items()
                               if k[:2] != (detector_id, key_version)}
                self._cache[(detector_id, key_version, matrix_key)] = cascade
        return cascade

    def evaluate(self, cascade: sc.EncryptedCascade, batch: detection_pb2.WindowBatch
                 ) -> BatchResult:
        """DC on one batch of encrypted windows: one outcome byte per window."""
        if not 1 <= batch.count <= self.max_window_batch:
            raise MalformedInputError(f"a window batch holds 1..{self.max_window_batch} windows")
        if batch.kind not in WINDOW_KINDS:
            raise MalformedInputError(f"unknown window kind {batch.kind}")
        prefix = batch.kind == detection_pb2.WINDOW_KIND_PREFIX
        if prefix and not cascade.prefix_stages:
            raise MalformedInputError("this detector has no prefix round")
        dim = cascade.prefix_cipher_dim if prefix else cascade.cipher_dim
        start = time.perf_counter()
        windows = sc.decode_windows(batch.windows, batch.count, dim, batch.encoding)
        outcomes = sc.evaluate(cascade, windows, batch.encoding, batch.first_stage,
                               batch.stage_count, prefix=prefix)
        return BatchResult(outcomes.tobytes(), (time.perf_counter() - start) * 1000)
