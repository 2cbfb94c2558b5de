"""AES-GCM envelope: round trip; flipped bit, swapped blob, wrong key all fail loudly."""

from __future__ import annotations

import pytest

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
