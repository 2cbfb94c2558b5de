"""AES-GCM envelope: round trip; flipped bit, swapped blob, wrong key all fail loudly."""

from __future__ import annotations

import struct

import pytest
from Crypto.Cipher import AES

from common import photo_crypto
from common.errors import DecryptionError, MalformedInputError

KEY = photo_crypto.new_master_key()
DATA = bytes(range(256)) * 40


def test_round_trip_and_fresh_randomness() -> None:
    a = photo_crypto.encrypt_photo(KEY, "fam", "p1", DATA)
    b = photo_crypto.encrypt_photo(KEY, "fam", "p1", DATA)
    assert a != b
    assert DATA not in a
    assert photo_crypto.decrypt_photo(KEY, "fam", "p1", a) == DATA
    assert len(a) == len(DATA) + photo_crypto.OVERHEAD_BYTES


@pytest.mark.parametrize("position", [5, 20, 50, 80, photo_crypto.HEADER_BYTES + 3, -1])
def test_flipped_bit_anywhere_fails(position: int) -> None:
    blob = bytearray(photo_crypto.encrypt_photo(KEY, "fam", "p1", DATA))
    blob[position] ^= 0x01
    with pytest.raises((DecryptionError, MalformedInputError)):
        photo_crypto.decrypt_photo(KEY, "fam", "p1", bytes(blob))


def test_wrong_key_fails() -> None:
    blob = photo_crypto.encrypt_photo(KEY, "fam", "p1", DATA)
    with pytest.raises(DecryptionError, match="failed authentication"):
        photo_crypto.decrypt_photo(photo_crypto.new_master_key(), "fam", "p1", blob)


@pytest.mark.parametrize("family,photo,kind", [("other", "p1", "photo"), ("fam", "p2", "photo"),
                                               ("fam", "p1", "thumbnail")])
def test_swapped_blob_fails(family: str, photo: str, kind: str) -> None:
    blob = photo_crypto.encrypt_photo(KEY, "fam", "p1", DATA)
    with pytest.raises(DecryptionError):
        photo_crypto.decrypt_photo(KEY, family, photo, blob, kind)


def test_truncated_blob_and_bad_key_size() -> None:
    with pytest.raises(MalformedInputError):
        photo_crypto.decrypt_photo(KEY, "fam", "p1", b"PFPH\x01short")
    with pytest.raises(ValueError):
        photo_crypto.encrypt_photo(b"short", "fam", "p1", DATA)


# A blob written by format version 1 (key bytes(range(32)), family "fam-1", photo id below):
# every phone and server must keep reading what earlier versions stored.
V1_KEY = bytes(range(32))
V1_PHOTO_ID = "0123456789abcdef0123456789abcdef"
V1_BLOB = bytes.fromhex(
    "5046504801ae4f172a260dc22f541ad08ed8ae63c89b05ec5230a4e85991f8fb03ef65c8bda0e917d0ab"
    "900d826cfe849b097e932253ff390b5547e1207af03cbf6cf6fe27b3fafbabfae8798ad39bdd746b4c1f"
    "314948f68b39cdc38f86f1dcfc997db8683cd976daa24a")


def test_a_stored_version_1_blob_still_decrypts() -> None:
    assert photo_crypto.decrypt_photo(V1_KEY, "fam-1", V1_PHOTO_ID, V1_BLOB) == b"privface photo"


def _documented_ad(purpose: bytes, family: str, photo: str, kind: str) -> bytes:
    fields = [purpose, family.encode(), photo.encode(), kind.encode(), b"\x01"]
    return b"".join(struct.pack("<I", len(f)) + f for f in fields)


def test_blob_layout_and_associated_data_are_as_documented() -> None:
    """An independent reader that follows the module docstring (layout, and associated data
    = each field length-prefixed as u32 little-endian) opens a fresh blob."""
    blob = photo_crypto.encrypt_photo(KEY, "fam", "p1", DATA, "thumbnail")
    assert blob[:5] == b"PFPH\x01"
    wrap_nonce, wrapped, wrap_tag = blob[5:17], blob[17:49], blob[49:65]
    data_nonce, body, tag = blob[65:77], blob[77:-16], blob[-16:]
    wrap = AES.new(KEY, AES.MODE_GCM, nonce=wrap_nonce)
    wrap.update(_documented_ad(b"privface/data-key", "fam", "p1", "thumbnail"))
    data_key = wrap.decrypt_and_verify(wrapped, wrap_tag)
    cipher = AES.new(data_key, AES.MODE_GCM, nonce=data_nonce)
    cipher.update(_documented_ad(b"privface/photo", "fam", "p1", "thumbnail"))
    assert cipher.decrypt_and_verify(body, tag) == DATA
    assert len(data_key) == photo_crypto.KEY_BYTES and data_key != KEY


def test_an_empty_photo_round_trips() -> None:
    """The shortest valid blob (no ciphertext bytes) is not mistaken for a truncated one."""
    blob = photo_crypto.encrypt_photo(KEY, "fam", "p1", b"")
    assert len(blob) == photo_crypto.OVERHEAD_BYTES
    assert photo_crypto.decrypt_photo(KEY, "fam", "p1", blob) == b""
    with pytest.raises(MalformedInputError, match="truncated"):
        photo_crypto.decrypt_photo(KEY, "fam", "p1", blob[:-1])


@pytest.mark.parametrize("key", ["k" * 32, KEY[:31], KEY + b"\x00", None],
                         ids=["str", "31-bytes", "33-bytes", "none"])
def test_master_key_must_be_32_bytes(key: object) -> None:
    """A key of the wrong type or size is refused by its size, before any AES call (a
    32-character str is not a key)."""
    blob = photo_crypto.encrypt_photo(KEY, "fam", "p1", DATA)
    with pytest.raises(ValueError, match="master key must be 32 bytes"):
        photo_crypto.encrypt_photo(key, "fam", "p1", DATA)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="master key must be 32 bytes"):
        photo_crypto.decrypt_photo(key, "fam", "p1", blob)  # type: ignore[arg-type]


def test_unknown_version_and_kind_are_refused() -> None:
    blob = bytearray(photo_crypto.encrypt_photo(KEY, "fam", "p1", DATA))
    blob[4] = 2
    with pytest.raises(MalformedInputError, match="unsupported photo format version 2"):
        photo_crypto.decrypt_photo(KEY, "fam", "p1", bytes(blob))
    with pytest.raises(ValueError, match="kind must be one of"):
        photo_crypto.encrypt_photo(KEY, "fam", "p1", DATA, "video")
