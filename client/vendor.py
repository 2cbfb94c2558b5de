"""The detector vendor's side: product keys and the encrypted detector upload (E-FD)."""

from __future__ import annotations

import hashlib

from client.rpc import PrivfaceClient
from common import secure_cascade as sc
from common.cascade import Cascade
from privface.v1 import detection_pb2


def detector_header(enc: sc.EncryptedCascade) -> detection_pb2.DetectorHeader:
    """The public part of an encrypted detector: ids, sizes, leaf values, stage thresholds."""
    matrix = enc.matrix_bytes()
    stages = []
    start = 0
    for stop, threshold in zip(enc.stage_ends, enc.stage_thresholds, strict=True):
        stop = int(stop)
        stages.append(detection_pb2.CascadeStage(
            weak_count=stop - start, threshold=float(threshold),
            left_values=enc.left_values[start:stop].tolist(),
            right_values=enc.right_values[start:stop].tolist()))
        start = stop
    prefix_size = enc.prefix_classifiers.size * 8 if enc.prefix_stages else 0
    return detection_pb2.DetectorHeader(
        detector_id=enc.detector_id, key_version=enc.key_version,
        key_fingerprint=enc.key_fingerprint, window_width=enc.window_size[0],
        window_height=enc.window_size[1], ciphertext_dim=enc.cipher_dim, stages=stages,
        matrix_size=len(matrix), matrix_sha256=hashlib.sha256(matrix).digest(),
        prefix_stages=enc.prefix_stages, prefix_ciphertext_dim=enc.prefix_cipher_dim,
        prefix_matrix_size=prefix_size)


def publish(client: PrivfaceClient, cascade: Cascade, key: sc.ProductKey,
            vendor_token: str) -> detection_pb2.PublishDetectorResponse:
    """E-FD then upload: the server receives ciphertexts and public structure only."""
    enc = sc.encrypt_cascade(cascade, key)
    return client.publish_detector(detector_header(enc), enc.matrix_bytes(), vendor_token)
