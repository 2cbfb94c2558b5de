"""The family across phones: creation, the shared roster, export/join and devices.

Keys are made on the phone and only public parts are registered. What every phone of the
family must share but the server must not read (the roster, the CKKS secret, device names)
is kept on the server as sealed items (common/sealed.py), written with compare-and-set so
two phones never overwrite each other's changes.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from client.keystore import FamilyBundle, load_bundle, save_bundle
from client.rpc import PrivfaceClient
from common import aspe, labels, photo_crypto, sealed
from common.errors import DecryptionError, MalformedInputError, NotFoundError, VersionConflictError

log = logging.getLogger(__name__)

ROSTER_ITEM = "roster"
MAX_DEVICE_NAME = 64
CAS_ATTEMPTS = 8
DEFAULT_INVITE_TTL = 24 * 3600

T = TypeVar("T")


@dataclass(frozen=True)
class Device:
    """One of the family's phones, its name decrypted here."""

    device_id: str
    name: str
    created_at: float
    last_seen_at: float
    revoked: bool
    this_device: bool


def new_device_id() -> str:
    """A random device id (32 hex characters), chosen by the phone."""
    return secrets.token_hex(16)


def _device_item(device_id: str) -> str:
    return f"device/{device_id}"


def seal_device_name(bundle: FamilyBundle, family_id: str, device_id: str, name: str) -> bytes:
    """The device's name sealed under the family master key (the server stores it blind)."""
    name = name.strip()
    if not name or len(name) > MAX_DEVICE_NAME or not name.isprintable():
        raise MalformedInputError(f"device names must be 1..{MAX_DEVICE_NAME} printable "
                                  "characters")
    return sealed.seal(bundle.master_key, family_id, _device_item(device_id), 0, name.encode())


def create_family(client: PrivfaceClient, capacity: int = labels.DEFAULT_CAPACITY,
                  device_name: str = "first phone") -> FamilyBundle:
    """Generates the label key and master key, registers the family and this phone as its
    first device, returns the bundle."""
    if not 1 <= capacity <= labels.MAX_CAPACITY:
        raise MalformedInputError(f"capacity must be within 1..{labels.MAX_CAPACITY}")
    label_key = aspe.generate_key(labels.label_dim(capacity))
    bundle = FamilyBundle(family_id="", server=client.address, access_token="",
                          capacity=capacity, label_key=label_key,
                          master_key=photo_crypto.new_master_key(),
                          device_id=new_device_id(), device_name=device_name.strip())
    # The sealed name binds the family id, which the server only now assigns: the first
    # device's name is written as a sealed item right after registration.
    credentials = client.register_family(label_key.fingerprint(), label_key.cipher_dim,
                                         device_id=bundle.device_id)
    bundle.family_id, bundle.access_token = credentials.family_id, credentials.access_token
    _write_device_name(client, bundle)
    return bundle


def _write_device_name(client: PrivfaceClient, bundle: FamilyBundle) -> None:
    """Stores this device's sealed name as a sealed item (read back by list_devices)."""
    item = _device_item(bundle.device_id)
    version, _ = client.get_sealed_item(_item_name(item))
    data = sealed.seal(bundle.master_key, bundle.family_id, item, version + 1,
                       bundle.device_name.encode())
    client.put_sealed_item(_item_name(item), version, data)


def _item_name(item: str) -> str:
    """Sealed item names on the wire allow [a-z0-9_-] only."""
    return item.replace("/", "-")


# -- the shared roster -------------------------------------------------------------------


ROSTER_PAD_BYTES = 4096


def _roster_bytes(bundle: FamilyBundle) -> bytes:
    """The roster as JSON padded with spaces to a multiple of ROSTER_PAD_BYTES, so the
    sealed item's size does not tell the server how many members or how long their names."""
    raw = json.dumps({"capacity": bundle.capacity, "roster": bundle.roster},
                     sort_keys=True).encode()
    return raw + b" " * (-len(raw) % ROSTER_PAD_BYTES)


def _read_roster(bundle: FamilyBundle, version: int, blob: bytes) -> dict[str, int]:
    data = json.loads(sealed.unseal(bundle.master_key, bundle.family_id, ROSTER_ITEM,
                                    version, blob))
    return {str(k): int(v) for k, v in data["roster"].items()}


def sync_roster(client: PrivfaceClient, bundle: FamilyBundle) -> bool:
    """Brings the bundle's roster up to the family's; True if it changed (save the bundle).

    A family that predates shared rosters gets this phone's roster as its first version."""
    version, blob = client.get_sealed_item(ROSTER_ITEM)
    if version == 0:
        if bundle.roster:
            update_roster(client, bundle, lambda b: None)
            return True
        return False
    if version == bundle.roster_version:
        return False
    bundle.roster, bundle.roster_version = _read_roster(bundle, version, blob), version
    return True


def update_roster(client: PrivfaceClient, bundle: FamilyBundle,
                  change: Callable[[FamilyBundle], T]) -> T:
    """Applies ``change`` to the family's latest roster and writes it back with
    compare-and-set, retrying when another phone wrote first. The caller saves the bundle."""
    for _ in range(CAS_ATTEMPTS):
        version, blob = client.get_sealed_item(ROSTER_ITEM)
        if version:
            bundle.roster = _read_roster(bundle, version, blob)
        result = change(bundle)
        data = sealed.seal(bundle.master_key, bundle.family_id, ROSTER_ITEM, version + 1,
                           _roster_bytes(bundle))
        try:
            bundle.roster_version = client.put_sealed_item(ROSTER_ITEM, version, data)
        except VersionConflictError:
            log.info("roster changed on another phone meanwhile; retrying")
            continue
        return result
    raise VersionConflictError("the roster keeps changing on another phone: try again")


# -- several phones ----------------------------------------------------------------------


def export_bundle(client: PrivfaceClient, bundle: FamilyBundle, path: Path, passphrase: str,
                  ttl_seconds: int = DEFAULT_INVITE_TTL) -> float:
    """Writes a passphrase-protected copy of the family's keys for another phone, with a
    one-time invitation instead of this phone's token. Returns when the invitation expires."""
    token, expires_at = client.create_device_invite(ttl_seconds)
    copy = replace(bundle, access_token="", device_id="", device_name="", invite_token=token,
                   roster=dict(bundle.roster), product_keys=dict(bundle.product_keys))
    save_bundle(copy, path, passphrase)
    return expires_at


def read_export(path: Path, passphrase: str) -> FamilyBundle:
    """An export file's contents; MalformedInputError if it is a phone's own bundle."""
    invite = load_bundle(path, passphrase)
    if not invite.invite_token:
        raise MalformedInputError(f"{path} is a phone's own bundle, not an export: make one "
                                  "with `privface family export --to FILE`")
    return invite


def join_family(client: PrivfaceClient, invite: FamilyBundle, device_name: str
                ) -> FamilyBundle:
    """Registers this phone into the exported family; returns its own bundle."""
    bundle = replace(invite, device_id=new_device_id(), device_name=device_name.strip(),
                     invite_token="", server=client.address)
    sealed_name = seal_device_name(bundle, bundle.family_id, bundle.device_id,
                                   bundle.device_name)
    credentials = client.join_family(invite.family_id, invite.invite_token, bundle.device_id,
                                     sealed_name)
    bundle.access_token = credentials.access_token
    sync_roster(client, bundle)
    return bundle


def _device_name(bundle: FamilyBundle, client: PrivfaceClient, device_id: str,
                 sealed_name: bytes) -> str:
    item = _device_item(device_id)
    version, blob = client.get_sealed_item(_item_name(item))
    try:
        if version:
            return sealed.unseal(bundle.master_key, bundle.family_id, item, version,
                                 blob).decode()
        if sealed_name:
            return sealed.unseal(bundle.master_key, bundle.family_id, item, 0,
                                 sealed_name).decode()
    except DecryptionError:
        return "(unreadable name)"
    return "(unnamed)"


def list_devices(client: PrivfaceClient, bundle: FamilyBundle) -> list[Device]:
    """The family's devices with their names, oldest first."""
    return [Device(d.device_id, _device_name(bundle, client, d.device_id, d.sealed_name),
                   d.created_at, d.last_seen_at, d.revoked, d.device_id == bundle.device_id)
            for d in client.list_devices()]


def revoke_device(client: PrivfaceClient, bundle: FamilyBundle, name_or_id: str) -> Device:
    """Revokes the one active device called ``name_or_id`` (or with that id or id prefix)."""
    active = [d for d in list_devices(client, bundle) if not d.revoked]
    found = [d for d in active if d.name == name_or_id] or \
        [d for d in active if len(name_or_id) >= 6 and d.device_id.startswith(name_or_id)]
    if not found:
        names = ", ".join(f"{d.name} ({d.device_id[:8]})" for d in active) or "none"
        raise NotFoundError(f"no active device {name_or_id!r} (active: {names})")
    if len(found) > 1:
        raise MalformedInputError(f"{len(found)} devices are called {name_or_id!r}: give the "
                                  "device id shown by `privface devices` instead")
    client.revoke_device(found[0].device_id)
    return found[0]
