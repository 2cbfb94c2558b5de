"""The family bundle: every secret a phone holds, in one passphrase-protected file.

It holds the server address and access token, the label (ASPE) key, the photo master key,
the roster (member name <-> opaque slot), and, when present, the CKKS secret context and
detector product keys. The file is AES-256-GCM encrypted under a key derived from the
passphrase with scrypt; the header (KDF parameters, salt, nonce) is authenticated too.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from Crypto.Cipher import AES
from Crypto.Protocol.KDF import scrypt

from common import aspe
from common.errors import MalformedInputError, NotFoundError, WrongPassphraseError

MAGIC = b"PFBUNDLE1\n"
SCRYPT_N = 2**15  # ~0.1 s and 32 MiB per unlock on a phone-class CPU
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_NAME_LENGTH = 64
# Bounds on the KDF parameters a bundle's header may ask for: the header is authenticated
# only after the key is derived, so an altered one must not make the phone derive for
# minutes or with gigabytes of memory first.
MAX_SCRYPT_N = 2**20
MAX_SCRYPT_RP = 16


@dataclass
class FamilyBundle:
    """A family's secrets. Mutable: the roster grows as members are enrolled."""

    family_id: str
    server: str
    access_token: str
    capacity: int
    label_key: aspe.AspeKey
    master_key: bytes
    roster: dict[str, int] = field(default_factory=dict)
    ckks_secret: bytes | None = None
    product_keys: dict[str, bytes] = field(default_factory=dict)
    device_id: str = ""
    device_name: str = ""
    roster_version: int = 0  # version of the family's sealed roster this copy reflects
    invite_token: str = ""  # only in an export file: the one-time invitation to join with

    def slot_of(self, name: str) -> int:
        """The opaque slot of a member; NotFoundError names the known members."""
        try:
            return self.roster[name]
        except KeyError:
            known = ", ".join(sorted(self.roster)) or "none yet"
            raise NotFoundError(f"unknown person {name!r} (known: {known})") from None

    def name_of(self, slot: int) -> str | None:
        """The member name of a slot, or None if the slot is free."""
        for name, s in self.roster.items():
            if s == slot:
                return name
        return None

    def add_member(self, name: str) -> int:
        """Gives a new member the lowest free slot (existing members keep theirs)."""
        name = check_member_name(name)
        if name in self.roster:
            return self.roster[name]
        used = set(self.roster.values())
        free = next((s for s in range(self.capacity) if s not in used), None)
        if free is None:
            raise MalformedInputError(f"the family is full ({self.capacity} members)")
        self.roster[name] = free
        return free

    def remove_member(self, name: str) -> int:
        """Forgets a member; returns the freed slot."""
        slot = self.slot_of(name)
        del self.roster[name]
        return slot

    def rename_member(self, old: str, new: str) -> None:
        """Gives a member a new name (same slot, so photos and faces stay theirs)."""
        new = check_member_name(new)
        if new in self.roster and new != old:
            raise MalformedInputError(f"there is already a member called {new!r}")
        self.roster[new] = self.roster.pop(self._known(old))

    def _known(self, name: str) -> str:
        self.slot_of(name)  # raises NotFoundError naming the known members
        return name

    # -- serialisation -------------------------------------------------------------------

    def _sections(self) -> dict[str, bytes]:
        meta = {"family_id": self.family_id, "server": self.server,
                "access_token": self.access_token, "capacity": self.capacity,
                "roster": self.roster, "device_id": self.device_id,
                "device_name": self.device_name, "roster_version": self.roster_version,
                "invite_token": self.invite_token}
        sections = {"meta": json.dumps(meta, sort_keys=True).encode(),
                    "label_key": self.label_key.to_bytes(), "master_key": self.master_key}
        if self.ckks_secret is not None:
            sections["ckks_secret"] = self.ckks_secret
        for key_id, key in self.product_keys.items():
            sections[f"product_key:{key_id}"] = key
        return sections

    @classmethod
    def _from_sections(cls, sections: dict[str, bytes]) -> FamilyBundle:
        meta = json.loads(sections["meta"])
        return cls(family_id=meta["family_id"], server=meta["server"],
                   access_token=meta["access_token"], capacity=int(meta["capacity"]),
                   roster={k: int(v) for k, v in meta["roster"].items()},
                   label_key=aspe.AspeKey.from_bytes(sections["label_key"]),
                   master_key=sections["master_key"],
                   ckks_secret=sections.get("ckks_secret"),
                   product_keys={k.split(":", 1)[1]: v for k, v in sections.items()
                                 if k.startswith("product_key:")},
                   device_id=meta.get("device_id", ""),
                   device_name=meta.get("device_name", ""),
                   roster_version=int(meta.get("roster_version", 0)),
                   invite_token=meta.get("invite_token", ""))


def check_member_name(name: str) -> str:
    """The name stripped; MalformedInputError unless 1..64 characters without commas."""
    name = name.strip()
    if not name or len(name) > MAX_NAME_LENGTH or "," in name or not name.isprintable():
        raise MalformedInputError(
            f"member names must be 1..{MAX_NAME_LENGTH} printable characters without commas")
    return name


def _pack(sections: dict[str, bytes]) -> bytes:
    out = []
    for name, data in sections.items():
        raw = name.encode()
        out.append(struct.pack("<HQ", len(raw), len(data)) + raw + data)
    return b"".join(out)


def _unpack(payload: bytes) -> dict[str, bytes]:
    sections, off = {}, 0
    while off < len(payload):
        name_len, data_len = struct.unpack_from("<HQ", payload, off)
        off += struct.calcsize("<HQ")
        name = payload[off:off + name_len].decode()
        off += name_len
        sections[name] = payload[off:off + data_len]
        off += data_len
    return sections


def _derive(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return scrypt(passphrase.encode("utf-8"), salt, key_len=32, N=n, r=r, p=p)


def save_bundle(bundle: FamilyBundle, path: Path, passphrase: str) -> None:
    """Encrypts the bundle under the passphrase and writes it atomically (mode 0600)."""
    if len(passphrase) < 8:
        raise MalformedInputError("the passphrase must have at least 8 characters")
    salt = secrets.token_bytes(SALT_BYTES)
    header = json.dumps({"kdf": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P,
                         "salt": salt.hex()}).encode()
    cipher = AES.new(_derive(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P), AES.MODE_GCM,
                     nonce=secrets.token_bytes(NONCE_BYTES))
    cipher.update(MAGIC + header)
    ciphertext, tag = cipher.encrypt_and_digest(_pack(bundle._sections()))
    blob = MAGIC + struct.pack("<I", len(header)) + header + cipher.nonce + ciphertext + tag
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".bundle-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_bundle(path: Path, passphrase: str) -> FamilyBundle:
    """Decrypts a bundle; WrongPassphraseError if the passphrase is wrong or the file altered."""
    path = Path(path)
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        raise NotFoundError(
            f"no family bundle at {path}: run `privface family create` first") from None
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 4:
        raise MalformedInputError(f"{path} is not a privface family bundle")
    off = len(MAGIC)
    (header_len,) = struct.unpack_from("<I", blob, off)
    off += 4
    header_raw = blob[off:off + header_len]
    off += header_len
    try:
        header = json.loads(header_raw)
        salt = bytes.fromhex(header["salt"])
        n, r, p = (int(header[k]) for k in ("n", "r", "p"))
    except (ValueError, KeyError, TypeError):
        raise MalformedInputError(
            f"{path} is not a privface family bundle (unreadable header)") from None
    if (header.get("kdf") != "scrypt" or not 2 <= n <= MAX_SCRYPT_N or n & (n - 1)
            or not 1 <= r <= MAX_SCRYPT_RP or not 1 <= p <= MAX_SCRYPT_RP):
        raise MalformedInputError(f"{path} asks for key derivation parameters out of bounds")
    nonce, body = blob[off:off + NONCE_BYTES], blob[off + NONCE_BYTES:]
    key = _derive(passphrase, salt, n, r, p)
    cipher = AES.new(key, AES.MODE_GCM, nonce=nonce)
    cipher.update(MAGIC + header_raw)
    try:
        payload = cipher.decrypt_and_verify(body[:-TAG_BYTES], body[-TAG_BYTES:])
    except ValueError:
        raise WrongPassphraseError(
            f"cannot open {path}: wrong passphrase (or the file was altered)") from None
    return FamilyBundle._from_sections(_unpack(payload))
