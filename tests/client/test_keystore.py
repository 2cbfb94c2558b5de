"""The family bundle: round trip, wrong passphrase, tampering, roster rules."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
from Crypto.Cipher import AES
from Crypto.Protocol.KDF import scrypt

from client import keystore
from client.keystore import FamilyBundle, check_member_name, load_bundle, save_bundle
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


def _full_bundle() -> FamilyBundle:
    bundle = _bundle()
    bundle.device_id, bundle.device_name = "dev-1", "Mum's phone"
    bundle.roster_version, bundle.invite_token = 7, "invite-xyz"
    bundle.add_member("Mum")
    bundle.add_member("Dad")
    return bundle


def test_every_field_round_trips(tmp_path: Path) -> None:
    bundle = _full_bundle()
    bundle.product_keys = {"frontal:1": b"pk1", "profile:2": b"pk2"}
    save_bundle(bundle, tmp_path / "b", "a good passphrase")
    again = load_bundle(tmp_path / "b", "a good passphrase")
    for name in ("family_id", "server", "access_token", "capacity", "roster", "master_key",
                 "ckks_secret", "product_keys", "device_id", "device_name", "roster_version",
                 "invite_token"):
        assert getattr(again, name) == getattr(bundle, name), name
    bundle.ckks_secret, bundle.product_keys = None, {}
    save_bundle(bundle, tmp_path / "b", "a good passphrase")
    again = load_bundle(tmp_path / "b", "a good passphrase")
    assert again.ckks_secret is None and again.product_keys == {}


def _read_as_documented(path: Path, passphrase: str) -> tuple[dict[str, object], bytes]:
    """An independent reader of the file format in the module docstring: magic, u32 LE header
    length, JSON header (scrypt parameters, salt), nonce, AES-256-GCM body and tag with
    magic + header as associated data."""
    blob = path.read_bytes()
    assert blob.startswith(keystore.MAGIC)
    (header_len,) = struct.unpack_from("<I", blob, len(keystore.MAGIC))
    start = len(keystore.MAGIC) + 4
    header_raw = blob[start:start + header_len]
    header = json.loads(header_raw)
    body = blob[start + header_len:]
    key = scrypt(passphrase.encode(), bytes.fromhex(header["salt"]), key_len=32,
                 N=header["n"], r=header["r"], p=header["p"])
    cipher = AES.new(key, AES.MODE_GCM, nonce=body[:12])
    cipher.update(keystore.MAGIC + header_raw)
    return header, cipher.decrypt_and_verify(body[12:-16], body[-16:])


def test_file_format_is_as_documented(tmp_path: Path) -> None:
    save_bundle(_full_bundle(), tmp_path / "b", "a good passphrase")
    header, payload = _read_as_documented(tmp_path / "b", "a good passphrase")
    assert {k: header[k] for k in ("kdf", "n", "r", "p")} == {"kdf": "scrypt", "n": 2**15,
                                                              "r": 8, "p": 1}
    sections = keystore._unpack(payload)
    assert set(sections) >= {"meta", "label_key", "master_key", "ckks_secret"}
    meta = json.loads(sections["meta"])
    assert meta["device_id"] == "dev-1" and meta["roster"] == {"Mum": 0, "Dad": 1}


def test_a_bundle_from_before_devices_still_opens(tmp_path: Path) -> None:
    """A bundle written before issue 7 has no device, roster version or invitation in its
    meta section: they load as empty."""
    bundle = _bundle()
    meta = {"family_id": "fam_x", "server": "h:1", "access_token": "tok", "capacity": 4,
            "roster": {"Mum": "2"}}
    sections = {"meta": json.dumps(meta).encode(), "label_key": bundle.label_key.to_bytes(),
                "master_key": bundle.master_key}
    salt, nonce = b"s" * 16, b"n" * 12
    header = json.dumps({"kdf": "scrypt", "n": 2**10, "r": 8, "p": 1,
                         "salt": salt.hex()}).encode()
    cipher = AES.new(scrypt(b"a good passphrase", salt, key_len=32, N=2**10, r=8, p=1),
                     AES.MODE_GCM, nonce=nonce)
    cipher.update(keystore.MAGIC + header)
    body, tag = cipher.encrypt_and_digest(keystore._pack(sections))
    (tmp_path / "old").write_bytes(keystore.MAGIC + struct.pack("<I", len(header)) + header
                                   + nonce + body + tag)
    old = load_bundle(tmp_path / "old", "a good passphrase")
    assert (old.device_id, old.device_name, old.roster_version, old.invite_token) == (
        "", "", 0, "")
    assert old.roster == {"Mum": 2} and old.ckks_secret is None and old.product_keys == {}


def test_the_header_is_authenticated(tmp_path: Path) -> None:
    """The same KDF parameters written differently (JSON spacing) must not open: the header
    bytes are associated data."""
    save_bundle(_bundle(), tmp_path / "b", "a good passphrase")
    blob = (tmp_path / "b").read_bytes()
    start = len(keystore.MAGIC) + 4
    (header_len,) = struct.unpack_from("<I", blob, len(keystore.MAGIC))
    header = json.loads(blob[start:start + header_len])
    respaced = json.dumps(header, separators=(",", ":")).encode()
    assert respaced != blob[start:start + header_len]
    forged = (keystore.MAGIC + struct.pack("<I", len(respaced)) + respaced
              + blob[start + header_len:])
    (tmp_path / "c").write_bytes(forged)
    with pytest.raises(WrongPassphraseError):
        load_bundle(tmp_path / "c", "a good passphrase")


@pytest.mark.parametrize("content", [b"", b"not a bundle at all, but long enough", b"PFBUNDLE1\n",
                                     b"PFBUNDLE1\n\x00\x00\x00"],
                         ids=["empty", "other", "magic-only", "short-length"])
def test_files_that_are_not_bundles(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x").write_bytes(content)
    with pytest.raises(MalformedInputError, match="not a privface family bundle"):
        load_bundle(tmp_path / "x", "a good passphrase")


def test_passphrase_of_exactly_eight_characters(tmp_path: Path) -> None:
    save_bundle(_bundle(), tmp_path / "b", "8 chars!")
    assert load_bundle(tmp_path / "b", "8 chars!").family_id == "fam_x"
    with pytest.raises(MalformedInputError, match="at least 8"):
        save_bundle(_bundle(), tmp_path / "c", "7 chars")


def test_write_is_atomic_and_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written to a hidden temp file beside the target (same file system), synced, made
    0600, then renamed over it, into folders made on the way."""
    path = tmp_path / "new" / "dir" / "family.bundle"
    calls: list[tuple[str, str]] = []
    real_fsync, real_chmod, real_replace = os.fsync, os.chmod, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", ""))
        real_fsync(fd)

    def chmod(p: str, mode: int) -> None:
        calls.append(("chmod", f"{p}:{mode:o}"))
        real_chmod(p, mode)

    def replace(src: str, dst: str) -> None:
        calls.append(("replace", src))
        assert Path(dst) == path
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "chmod", chmod)
    monkeypatch.setattr(os, "replace", replace)
    save_bundle(_bundle(), path, "a good passphrase")
    assert [c[0] for c in calls] == ["fsync", "chmod", "replace"]
    tmp = Path(calls[2][1])
    assert tmp.parent == path.parent and tmp.name.startswith(".bundle-")
    assert calls[1][1] == f"{tmp}:600"
    assert [p.name for p in path.parent.iterdir()] == ["family.bundle"]


def test_a_failed_write_leaves_the_old_bundle_and_no_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_bundle(_bundle(), tmp_path / "b", "a good passphrase")
    before = (tmp_path / "b").read_bytes()

    def fail(fd: int) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        save_bundle(_full_bundle(), tmp_path / "b", "a good passphrase")
    assert (tmp_path / "b").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


def test_member_names() -> None:
    assert check_member_name("  Mum \t") == "Mum"
    assert check_member_name("x" * 64) == "x" * 64
    for bad in ("", "   ", "x" * 65, "a,b", ",", "tab\there", "new\nline"):
        with pytest.raises(MalformedInputError, match="member names"):
            check_member_name(bad)
    bundle = _bundle()
    with pytest.raises(MalformedInputError, match="member names"):
        bundle.add_member("a,b")  # refused for its name, not because the family is full
    assert bundle.roster == {}


def test_roster_lookups_and_renames() -> None:
    bundle = _bundle()
    with pytest.raises(NotFoundError, match="none yet"):
        bundle.slot_of("Zed")
    assert [bundle.add_member(n) for n in ("A", "B")] == [0, 1]
    assert bundle.add_member("A") == 0  # already there: same slot
    assert (bundle.name_of(0), bundle.name_of(1), bundle.name_of(2)) == ("A", "B", None)
    bundle.rename_member("A", " Anna ")
    assert bundle.roster == {"Anna": 0, "B": 1} and bundle.name_of(0) == "Anna"
    bundle.rename_member("Anna", "Anna")  # to itself: nothing changes
    assert bundle.roster == {"Anna": 0, "B": 1}
    with pytest.raises(MalformedInputError, match="already a member called 'B'"):
        bundle.rename_member("Anna", "B")
    with pytest.raises(NotFoundError, match="known: Anna, B"):
        bundle.rename_member("Zed", "Zoe")
    with pytest.raises(MalformedInputError):
        bundle.rename_member("B", "B,C")
    assert bundle.roster == {"Anna": 0, "B": 1}
    with pytest.raises(NotFoundError):
        bundle.remove_member("Zed")


def _with_header(header: bytes, rest: bytes = b"n" * 12 + b"body" + b"t" * 16) -> bytes:
    return keystore.MAGIC + struct.pack("<I", len(header)) + header + rest


@pytest.mark.parametrize("header", [b"", b"{", b"[]", b'{"kdf": "scrypt"}',
                                    b'{"kdf": "scrypt", "n": 1024, "r": 8, "p": 1, "salt": "zz"}'],
                         ids=["empty", "cut", "list", "no-params", "bad-salt"])
def test_an_unreadable_header_is_not_a_bundle(tmp_path: Path, header: bytes) -> None:
    (tmp_path / "x").write_bytes(_with_header(header))
    with pytest.raises(MalformedInputError, match="not a privface family bundle"):
        load_bundle(tmp_path / "x", "a good passphrase")


@pytest.mark.parametrize("params", [(2**21, 8, 1), (1000, 8, 1), (1, 8, 1), (2**10, 17, 1),
                                    (2**10, 8, 0), (2**10, 8, 17)],
                         ids=["huge-n", "n-not-power-of-two", "n-1", "r", "p-0", "p"])
def test_key_derivation_parameters_are_bounded_before_deriving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, params: tuple[int, int, int]) -> None:
    """The header is authenticated only by the key it derives: a forged one asking for a
    huge scrypt cost is refused without deriving anything."""
    n, r, p = params
    header = json.dumps({"kdf": "scrypt", "n": n, "r": r, "p": p, "salt": "00" * 16}).encode()
    (tmp_path / "x").write_bytes(_with_header(header))

    def no_derivation(*args: object) -> bytes:
        raise AssertionError("derived a key from out-of-bounds parameters")

    monkeypatch.setattr(keystore, "_derive", no_derivation)
    with pytest.raises(MalformedInputError, match="out of bounds"):
        load_bundle(tmp_path / "x", "a good passphrase")
    for n, r, p in ((2**20, 16, 16), (2, 1, 1)):  # at the bounds: derivation starts
        bounded = json.dumps({"kdf": "scrypt", "n": n, "r": r, "p": p,
                              "salt": "00" * 16}).encode()
        (tmp_path / "y").write_bytes(_with_header(bounded))
        with pytest.raises(AssertionError, match="derived"):
            load_bundle(tmp_path / "y", "a good passphrase")
