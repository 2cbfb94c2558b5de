"""The detector vendor's side: product keys and the encrypted detector upload (E-FD)."""

from __future__ import annotations

from client.rpc import PrivfaceClient, PublishedDetector, detector_header
from common import secure_cascade as sc
from common.cascade import Cascade


def publish(client: PrivfaceClient, cascade: Cascade, key: sc.ProductKey,
            vendor_token: str) -> PublishedDetector:
    """E-FD then upload: the server receives ciphertexts and public structure only."""
    enc = sc.encrypt_cascade(cascade, key)
    return client.publish_detector(detector_header(enc), enc.matrix_bytes(), vendor_token)
