"""Backup, search, fetch and delete of photos: the phone side of steps 5 and 10-12.

Everything is encrypted here before it reaches the rpc layer: the photo and its thumbnail
with AES-256-GCM under the family master key, the label vector and the query with ASPE
under the family's label key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import cv2
import numpy as np

from client.keystore import FamilyBundle
from client.rpc import PrivfaceClient
from common import aspe, labels, photo_crypto
from common.errors import AlreadyExistsError, MalformedInputError

log = logging.getLogger(__name__)

THUMBNAIL_MAX_SIDE = 160


@dataclass(frozen=True)
class BackupReceipt:
    """What happened to one photo."""

    photo_id: str
    already_stored: bool
    bytes_sent: int = 0
    thumbnail: bytes = b""  # the JPEG preview (plaintext, for the phone's own display)
    timings_ms: dict[str, float] = field(default_factory=dict)


def photo_id_for(bundle: FamilyBundle, data: bytes) -> str:
    """A keyed hash of the content: re-backing up the same photo reuses its id (idempotent),
    while the server cannot test a guess of the content without the master key."""
    return hmac.new(bundle.master_key, b"privface/photo-id/v1" + data,
                    hashlib.sha256).hexdigest()[:32]


def make_thumbnail(data: bytes) -> bytes:
    """A small JPEG preview; MalformedInputError if the bytes are not a decodable image."""
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise MalformedInputError("not a readable image (JPEG, PNG, ...)")
    h, w = image.shape[:2]
    scale = THUMBNAIL_MAX_SIDE / max(h, w)
    if scale < 1:
        image = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    if not ok:
        raise MalformedInputError("could not encode a thumbnail")
    return jpeg.tobytes()


def encrypt_labels(bundle: FamilyBundle, slots: Iterable[int]) -> bytes:
    """E-LV: the photo's label vector, ASPE-encrypted, as float64 bytes."""
    vector = labels.label_vector(slots, bundle.capacity)
    row: np.ndarray = aspe.encrypt_stored(bundle.label_key, vector)[0]
    return row.astype("<f8").tobytes()


def encrypt_query(bundle: FamilyBundle, slots: Iterable[int], mode: labels.MatchMode) -> bytes:
    """E-Q: the query vector (threshold folded in, fresh random scale), as float64 bytes."""
    vector = labels.query_vector(slots, bundle.capacity, mode)
    row: np.ndarray = aspe.encrypt_query(bundle.label_key, vector)[0]
    return row.astype("<f8").tobytes()


def backup_photo(client: PrivfaceClient, bundle: FamilyBundle, data: bytes,
                 slots: Iterable[int]) -> BackupReceipt:
    """Encrypts and uploads one photo labelled with the members in ``slots``."""
    start = time.perf_counter()
    thumbnail = make_thumbnail(data)
    photo_id = photo_id_for(bundle, data)
    blob = photo_crypto.encrypt_photo(bundle.master_key, bundle.family_id, photo_id, data)
    thumb_blob = photo_crypto.encrypt_photo(bundle.master_key, bundle.family_id, photo_id,
                                            thumbnail, kind="thumbnail")
    encrypted = encrypt_labels(bundle, slots)
    sent = len(blob) + len(thumb_blob) + len(encrypted)
    encrypted_at = time.perf_counter()
    try:
        already = client.backup_photo(photo_id, blob, encrypted,
                                      bundle.label_key.fingerprint(), thumb_blob)
    except AlreadyExistsError:  # same content, backed up before (other randomness)
        already = True
    done = time.perf_counter()
    return BackupReceipt(photo_id, already, sent, thumbnail,
                         {"encryption": (encrypted_at - start) * 1000,
                          "upload": (done - encrypted_at) * 1000})


def search_photos(client: PrivfaceClient, bundle: FamilyBundle, slots: Iterable[int],
                  mode: labels.MatchMode = labels.MatchMode.ALL, top_n: int = 0
                  ) -> tuple[list[str], float]:
    """Photo ids showing the members in ``slots`` (per ``mode``), and server match ms."""
    query = encrypt_query(bundle, slots, mode)
    return client.search_photos(query, bundle.label_key.fingerprint(), mode, top_n)


def fetch_photo(client: PrivfaceClient, bundle: FamilyBundle, photo_id: str,
                thumbnail_only: bool = False) -> bytes:
    """Downloads and decrypts one photo (or its thumbnail)."""
    blob = client.fetch_photo(photo_id, thumbnail_only)
    kind = "thumbnail" if thumbnail_only else "photo"
    return photo_crypto.decrypt_photo(bundle.master_key, bundle.family_id, photo_id, blob, kind)
