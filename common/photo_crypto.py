"""AES-256-GCM envelope encryption of photos (and their thumbnails).

Each blob gets a fresh random 256-bit data key, itself wrapped (AES-256-GCM) by the family
master key. The associated data binds the blob to its family, photo id, kind (photo or
thumbnail) and format version, so a blob swapped between photos, families or kinds, a
flipped bit anywhere, or a wrong master key all fail authentication.

Blob layout (all fixed sizes, version 1)::

    magic "PFPH" | version u8 | wrap nonce 12 | wrapped key 32 | wrap tag 16
    | data nonce 12 | ciphertext ... | data tag 16
"""

from __future__ import annotations

import secrets
import struct

from Crypto.Cipher import AES

from common.errors import DecryptionError, MalformedInputError

MAGIC = b"PFPH"
FORMAT_VERSION = 1
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
KINDS = ("photo", "thumbnail")
_PREFIX = struct.Struct("<4sB")
HEADER_BYTES = _PREFIX.size + NONCE_BYTES + KEY_BYTES + TAG_BYTES + NONCE_BYTES
OVERHEAD_BYTES = HEADER_BYTES + TAG_BYTES


def new_master_key() -> bytes:
    """A fresh random 256-bit family master key."""
    return secrets.token_bytes(KEY_BYTES)


def _associated_data(purpose: bytes, family_id: str, photo_id: str, kind: str) -> bytes:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    fields = [purpose, family_id.encode(), photo_id.encode(), kind.encode(),
              bytes([FORMAT_VERSION])]
    # Length-prefix every field so no two different tuples serialise alike.
    return b"".join(struct.pack("<I", len(f)) + f for f in fields)


def _check_key(master_key: object) -> None:
    if not isinstance(master_key, (bytes, bytearray)) or len(master_key) != KEY_BYTES:
        raise ValueError(f"master key must be {KEY_BYTES} bytes")


def encrypt_photo(master_key: bytes, family_id: str, photo_id: str, data: bytes,
                  kind: str = "photo") -> bytes:
    """Encrypts photo bytes under a fresh data key wrapped by ``master_key``."""
    _check_key(master_key)
    data_key = secrets.token_bytes(KEY_BYTES)
    wrap = AES.new(master_key, AES.MODE_GCM, nonce=secrets.token_bytes(NONCE_BYTES))
    wrap.update(_associated_data(b"privface/data-key", family_id, photo_id, kind))
    wrapped, wrap_tag = wrap.encrypt_and_digest(data_key)
    body = AES.new(data_key, AES.MODE_GCM, nonce=secrets.token_bytes(NONCE_BYTES))
    body.update(_associated_data(b"privface/photo", family_id, photo_id, kind))
    ciphertext, tag = body.encrypt_and_digest(data)
    return b"".join([_PREFIX.pack(MAGIC, FORMAT_VERSION), wrap.nonce, wrapped, wrap_tag,
                     body.nonce, ciphertext, tag])


def decrypt_photo(master_key: bytes, family_id: str, photo_id: str, blob: bytes,
                  kind: str = "photo") -> bytes:
    """Decrypts and authenticates a blob; raises DecryptionError if anything is off."""
    _check_key(master_key)
    if len(blob) < OVERHEAD_BYTES:
        raise MalformedInputError(f"encrypted photo is truncated ({len(blob)} bytes)")
    magic, version = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise MalformedInputError("not a privface encrypted photo (bad magic)")
    if version != FORMAT_VERSION:
        raise MalformedInputError(f"unsupported photo format version {version}")
    off = _PREFIX.size
    wrap_nonce = blob[off:off + NONCE_BYTES]
    off += NONCE_BYTES
    wrapped = blob[off:off + KEY_BYTES]
    off += KEY_BYTES
    wrap_tag = blob[off:off + TAG_BYTES]
    off += TAG_BYTES
    data_nonce = blob[off:off + NONCE_BYTES]
    off += NONCE_BYTES
    ciphertext, tag = blob[off:-TAG_BYTES], blob[-TAG_BYTES:]
    try:
        wrap = AES.new(master_key, AES.MODE_GCM, nonce=wrap_nonce)
        wrap.update(_associated_data(b"privface/data-key", family_id, photo_id, kind))
        data_key = wrap.decrypt_and_verify(wrapped, wrap_tag)
        body = AES.new(data_key, AES.MODE_GCM, nonce=data_nonce)
        body.update(_associated_data(b"privface/photo", family_id, photo_id, kind))
        return body.decrypt_and_verify(ciphertext, tag)
    except ValueError as exc:  # pycryptodome raises ValueError("MAC check failed")
        raise DecryptionError(
            f"photo {photo_id} failed authentication: wrong family key, or the blob was "
            "altered or belongs to another photo") from exc
