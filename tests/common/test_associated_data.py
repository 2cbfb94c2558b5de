"""The associated data of photo blobs and sealed items binds each field on its own: tuples
that a naive concatenation of the fields would confuse must not decrypt as each other."""

from __future__ import annotations

import pytest

from common import photo_crypto, sealed
from common.errors import DecryptionError

KEY = photo_crypto.new_master_key()
DATA = b"the same bytes under every label"

# (family id, photo id, kind) pairs whose fields concatenate to the same bytes, or differ
# in exactly one field.
PHOTO_CONFUSIONS = [
    (("fam_ab", "c1", "photo"), ("fam_a", "bc1", "photo")),  # family|photo boundary
    (("fam_a", "bc1", "photo"), ("fam_ab", "c1", "photo")),
    (("fam_a", "", "photo"), ("fam_", "a", "photo")),
    (("fam", "p1", "photo"), ("fam", "p1", "thumbnail")),  # kind
    (("fam", "p1", "photo"), ("fam", "p2", "photo")),  # photo id
    (("fam1", "p1", "photo"), ("fam2", "p1", "photo")),  # family id
]


@pytest.mark.parametrize("sealed_as,opened_as", PHOTO_CONFUSIONS)
def test_photo_blob_opens_only_under_its_own_fields(sealed_as: tuple[str, str, str],
                                                    opened_as: tuple[str, str, str]) -> None:
    family, photo, kind = sealed_as
    blob = photo_crypto.encrypt_photo(KEY, family, photo, DATA, kind)
    assert photo_crypto.decrypt_photo(KEY, family, photo, blob, kind) == DATA
    with pytest.raises((DecryptionError, ValueError)):
        photo_crypto.decrypt_photo(KEY, *opened_as[:2], blob, opened_as[2])


def test_photo_blob_and_its_thumbnail_are_not_interchangeable() -> None:
    """The same family and photo id: the full photo's blob is no valid thumbnail and
    vice versa (a server cannot serve one for the other)."""
    photo = photo_crypto.encrypt_photo(KEY, "fam", "p1", DATA, "photo")
    thumb = photo_crypto.encrypt_photo(KEY, "fam", "p1", DATA, "thumbnail")
    with pytest.raises(DecryptionError):
        photo_crypto.decrypt_photo(KEY, "fam", "p1", photo, "thumbnail")
    with pytest.raises(DecryptionError):
        photo_crypto.decrypt_photo(KEY, "fam", "p1", thumb, "photo")


# (family id, item name, version) triples that a naive concatenation would confuse, or
# that differ in exactly one field.
SEALED_CONFUSIONS = [
    (("fam_ab", "c", 1), ("fam_a", "bc", 1)),  # family|name boundary
    (("fam_a", "bc", 1), ("fam_ab", "c", 1)),
    (("fam_", "aroster", 1), ("fam_a", "roster", 1)),
    (("fam", "roster", 2), ("fam", "roster", 1)),  # a rolled-back version
    (("fam", "roster", 1), ("fam", "roster", 2)),
    (("fam", "roster", 1), ("fam", "ckks-secret", 1)),  # another item
    (("fam", "roster", 256), ("fam", "roster", 1)),  # versions differing in a high byte
]


@pytest.mark.parametrize("sealed_as,opened_as", SEALED_CONFUSIONS)
def test_sealed_item_opens_only_under_its_own_fields(sealed_as: tuple[str, str, int],
                                                     opened_as: tuple[str, str, int]) -> None:
    blob = sealed.seal(KEY, *sealed_as, DATA)
    assert sealed.unseal(KEY, *sealed_as, blob) == DATA
    with pytest.raises(DecryptionError):
        sealed.unseal(KEY, *opened_as, blob)


def test_sealed_item_and_photo_domains_are_separate() -> None:
    """A sealed item is never accepted as a photo blob of the same family (and the other
    way round), whatever the names."""
    item = sealed.seal(KEY, "fam", "p1", 1, DATA)
    with pytest.raises((DecryptionError, ValueError)):
        photo_crypto.decrypt_photo(KEY, "fam", "p1", item)
    blob = photo_crypto.encrypt_photo(KEY, "fam", "p1", DATA)
    with pytest.raises((DecryptionError, ValueError)):
        sealed.unseal(KEY, "fam", "p1", 1, blob)
