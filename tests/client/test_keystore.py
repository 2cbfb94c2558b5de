"""The family bundle: round trip, wrong passphrase, tampering, roster rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.keystore import FamilyBundle, load_bundle, save_bundle
from common import aspe, photo_crypto
from common.errors import MalformedInputError, NotFoundError, WrongPassphraseError


def _bundle() -> FamilyBundle:
    return FamilyBundle(family_id="fam_x", server="h:1", access_token="tok", capacity=4,
                        label_key=aspe.generate_key(5), master_key=photo_crypto.new_master_key(),
                        ckks_secret=b"ckks-secret-bytes", product_keys={"frontal:1": b"pk"})


def test_round_trip(tmp_path: Path) -> None:
    bundle = _bundle()
    bundle.add_member("Mum")
    save_bundle(bundle, tmp_path / "b", "a good passphrase")
    again = load_bundle(tmp_path / "b", "a good passphrase")
    assert again.roster == {"Mum": 0} and again.master_key == bundle.master_key
    assert again.label_key.fingerprint() == bundle.label_key.fingerprint()
    assert again.ckks_secret == b"ckks-secret-bytes" and again.product_keys == {"frontal:1": b"pk"}
    raw = (tmp_path / "b").read_bytes()
    assert bundle.master_key not in raw and b"Mum" not in raw and b"tok" not in raw
    assert (tmp_path / "b").stat().st_mode & 0o077 == 0


def test_wrong_passphrase_and_tampering_fail(tmp_path: Path) -> None:
    save_bundle(_bundle(), tmp_path / "b", "a good passphrase")
    with pytest.raises(WrongPassphraseError):
        load_bundle(tmp_path / "b", "a bad passphrase")
    data = bytearray((tmp_path / "b").read_bytes())
    data[-40] ^= 1
    (tmp_path / "c").write_bytes(bytes(data))
    with pytest.raises(WrongPassphraseError):
        load_bundle(tmp_path / "c", "a good passphrase")
    with pytest.raises(NotFoundError):
        load_bundle(tmp_path / "missing", "a good passphrase")


def test_roster_slots() -> None:
    bundle = _bundle()
    assert [bundle.add_member(n) for n in ("A", "B", "C")] == [0, 1, 2]
    assert bundle.remove_member("B") == 1
    assert bundle.add_member("D") == 1  # lowest free slot is reused
    bundle.add_member("E")
    with pytest.raises(MalformedInputError, match="full"):
        bundle.add_member("F")
    with pytest.raises(NotFoundError, match="known: A, C, D, E"):
        bundle.slot_of("Zed")
    with pytest.raises(MalformedInputError):
        bundle.add_member("a,b")
    with pytest.raises(MalformedInputError):
        save_bundle(bundle, Path("/tmp/never"), "short")
