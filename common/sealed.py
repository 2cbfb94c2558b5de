"""Sealed items: small family secrets kept on the server but readable only by the family's
phones (AES-256-GCM under the family master key).

Used for what every phone of a family must share and the server must not read: the
roster (member names <-> slots), the CKKS secret context, device names. The associated
data binds the family id, the item's name and its version, so the server cannot swap one
item for another, or serve an older version under a newer number, without the
authentication failing.

Layout (version 1): magic "PFSI" | format u8 | nonce 12 | ciphertext ... | tag 16
"""

from __future__ import annotations

import secrets
import struct

from Crypto.Cipher import AES

from common.errors import DecryptionError, MalformedInputError

MAGIC = b"PFSI"
FORMAT_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_PREFIX = struct.Struct("<4sB")
OVERHEAD_BYTES = _PREFIX.size + NONCE_BYTES + TAG_BYTES


def _associated_data(family_id: str, name: str, version: int) -> bytes:
    fields = [b"privface/sealed-item", family_id.encode(), name.encode(),
              struct.pack("<Q", version), bytes([FORMAT_VERSION])]
    # Length-prefix every field so no two different tuples serialise alike.
    return b"".join(struct.pack("<I", len(f)) + f for f in fields)


def _check_key(master_key: object) -> None:
    if not isinstance(master_key, (bytes, bytearray)) or len(master_key) != KEY_BYTES:
        raise MalformedInputError(f"master key must be {KEY_BYTES} bytes")


def seal(master_key: bytes, family_id: str, name: str, version: int, data: bytes) -> bytes:
    """Encrypts ``data`` as version ``version`` of item ``name`` (fresh random nonce)."""
    _check_key(master_key)
    cipher = AES.new(master_key, AES.MODE_GCM, nonce=secrets.token_bytes(NONCE_BYTES))
    cipher.update(_associated_data(family_id, name, version))
    ciphertext, tag = cipher.encrypt_and_digest(data)
    return _PREFIX.pack(MAGIC, FORMAT_VERSION) + cipher.nonce + ciphertext + tag


def unseal(master_key: bytes, family_id: str, name: str, version: int, blob: bytes) -> bytes:
    """Decrypts a sealed item; DecryptionError for a wrong key, item, version or any change."""
    _check_key(master_key)
    if len(blob) < OVERHEAD_BYTES:
        raise MalformedInputError(f"sealed item {name!r} is truncated ({len(blob)} bytes)")
    magic, fmt = _PREFIX.unpack_from(blob)
    if magic != MAGIC or fmt != FORMAT_VERSION:
        raise MalformedInputError(f"sealed item {name!r} has an unknown format")
    nonce = blob[_PREFIX.size:_PREFIX.size + NONCE_BYTES]
    cipher = AES.new(master_key, AES.MODE_GCM, nonce=nonce)
    cipher.update(_associated_data(family_id, name, version))
    try:
        return cipher.decrypt_and_verify(blob[_PREFIX.size + NONCE_BYTES:-TAG_BYTES],
                                         blob[-TAG_BYTES:])
    except ValueError:
        raise DecryptionError(
            f"sealed item {name!r} v{version} failed authentication: another family's key, "
            "or it was altered or replayed") from None
