"""Devices, invitations, revocation, sealed items and the family's CKKS key id, through the
real server's FamilyService stubs (and the Store for time-dependent rules and migration)."""

from __future__ import annotations

import hashlib
import logging
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from common import ckks
from common.errors import AuthenticationError, PreconditionError
from privface.v1 import faces_pb2, faces_pb2_grpc, family_pb2, family_pb2_grpc
from server.app import create_server
from server.config import ServerConfig
from server.storage import DEFAULT_INVITE_TTL, MAX_INVITE_TTL, Store, hash_token, legacy_device_id
from server.tls import DevCerts
from tests.conftest import channel as tls_channel
from tests.conftest import tls_server_config
from tests.server.conftest import StoreFactory

SEALED_LIMIT = 64 * 1024
PHONE_A = "a" * 32
PHONE_B = "b" * 32
PHONE_C = "c" * 32
Metadata = tuple[tuple[str, str], ...]


@pytest.fixture
def server_config(tmp_path: Path, tls_certs: DevCerts) -> ServerConfig:
    """The shared fixture's config with a small sealed-item limit (overrides conftest's)."""
    return tls_server_config(tls_certs, data_dir=tmp_path / "server",
                             max_sealed_bytes=SEALED_LIMIT, grace_seconds=0.5)


@pytest.fixture
def channel(address: str) -> Iterator[grpc.Channel]:
    """A channel to the test server."""
    with tls_channel(address) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.Channel) -> family_pb2_grpc.FamilyServiceStub:
    """FamilyService stub."""
    return family_pb2_grpc.FamilyServiceStub(channel)


@pytest.fixture(scope="module")
def secrets_pair() -> tuple[ckks.SecretContext, ckks.SecretContext]:
    """Two different families' CKKS secret contexts (made once per module)."""
    return ckks.create_secret_context(), ckks.create_secret_context()


def meta(family_id: str, token: str) -> Metadata:
    """Credentials metadata of one device."""
    return (("x-privface-family", family_id), ("authorization", "Bearer " + token))


def register(stub, device_id: str = PHONE_A, name: bytes = b"sealed-a") -> tuple[str, Metadata]:
    """A new family; returns (family_id, the first device's metadata)."""
    r = stub.RegisterFamily(family_pb2.RegisterFamilyRequest(
        label_key_fingerprint=bytes(16), label_ciphertext_dim=50, device_id=device_id,
        sealed_device_name=name), timeout=10)
    return r.family_id, meta(r.family_id, r.access_token)


def invite(stub, md: Metadata, ttl: int = 0) -> family_pb2.CreateDeviceInviteResponse:
    """A fresh invitation made by the device of ``md``."""
    return stub.CreateDeviceInvite(family_pb2.CreateDeviceInviteRequest(ttl_seconds=ttl),
                                   metadata=md, timeout=10)


def join(stub, family_id: str, token: str, device_id: str, name: bytes = b"sealed") -> str:
    """Joins with an invitation; returns the new device's access token."""
    return stub.JoinFamily(family_pb2.JoinFamilyRequest(
        family_id=family_id, invite_token=token, device_id=device_id,
        sealed_device_name=name), timeout=10).access_token


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The gRPC error ``call`` raises (fails the test if it succeeds)."""
    with pytest.raises(grpc.RpcError) as info:
        call(*args, timeout=10, **kwargs)
    return info.value


def devices(stub, md: Metadata) -> list[family_pb2.DeviceInfo]:
    """The family's device list."""
    return list(stub.ListDevices(family_pb2.ListDevicesRequest(), metadata=md,
                                 timeout=10).devices)


def upload_context(stub, md: Metadata, data: bytes) -> None:
    """Uploads a public CKKS context in one chunk."""
    stub.UploadPublicContext(iter([family_pb2.UploadPublicContextRequest(
        total_size=len(data), chunk=data, sha256=hashlib.sha256(data).digest())]),
        metadata=md, timeout=60)


# -- devices and invitations ---------------------------------------------------------------


def test_register_lists_the_first_device(stub) -> None:
    before = time.time()
    family_id, md = register(stub, PHONE_A, b"sealed-name-a")
    (device,) = devices(stub, md)
    assert device.device_id == PHONE_A and device.sealed_name == b"sealed-name-a"
    assert before <= device.created_at <= time.time() and not device.revoked
    assert device.last_seen_at >= device.created_at  # ListDevices itself was a call
    summary = stub.GetFamily(family_pb2.GetFamilyRequest(), metadata=md, timeout=10)
    assert summary.family_id == family_id and summary.device_id == PHONE_A
    assert summary.ckks_key_id == b""
    # No device id: the server picks a random one of the same shape.
    _, md2 = register(stub, "")
    chosen = stub.GetFamily(family_pb2.GetFamilyRequest(), metadata=md2, timeout=10).device_id
    assert re.fullmatch(r"[0-9a-f]{32}", chosen) and chosen != PHONE_A


def test_invite_join_gives_a_new_working_token(stub) -> None:
    family_id, md_a = register(stub)
    inv = invite(stub, md_a)
    assert abs(inv.expires_at - (time.time() + DEFAULT_INVITE_TTL)) < 60
    token_b = join(stub, family_id, inv.invite_token, PHONE_B, b"sealed-b")
    md_b = meta(family_id, token_b)
    summary = stub.GetFamily(family_pb2.GetFamilyRequest(), metadata=md_b, timeout=10)
    assert summary.device_id == PHONE_B and summary.family_id == family_id
    assert [(d.device_id, d.sealed_name) for d in devices(stub, md_a)] == [
        (PHONE_A, b"sealed-a"), (PHONE_B, b"sealed-b")]
    # One-time: the same invitation is refused, with a message saying what to do.
    err = rpc_error(stub.JoinFamily, family_pb2.JoinFamilyRequest(
        family_id=family_id, invite_token=inv.invite_token, device_id=PHONE_C))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "unknown, used or expired" in str(err.details())
    # An invitation works for its own family only; a made-up one is refused alike.
    other_id, _ = register(stub)
    fresh = invite(stub, md_a)
    for fid, token in ((other_id, fresh.invite_token), (family_id, "made-up"),
                       ("fam_nonsense", fresh.invite_token)):
        err = rpc_error(stub.JoinFamily, family_pb2.JoinFamilyRequest(
            family_id=fid, invite_token=token, device_id=PHONE_C))
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, fid
    assert len(devices(stub, md_a)) == 2


def test_ttl_is_capped(stub) -> None:
    _, md = register(stub)
    assert abs(invite(stub, md, ttl=3600).expires_at - (time.time() + 3600)) < 60
    capped = invite(stub, md, ttl=10 ** 9).expires_at
    assert abs(capped - (time.time() + MAX_INVITE_TTL)) < 60


def test_join_with_a_taken_device_id_keeps_the_invitation(stub) -> None:
    family_id, md = register(stub)
    inv = invite(stub, md)
    err = rpc_error(stub.JoinFamily, family_pb2.JoinFamilyRequest(
        family_id=family_id, invite_token=inv.invite_token, device_id=PHONE_A))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    join(stub, family_id, inv.invite_token, PHONE_C)  # the failed join did not consume it
    assert [d.device_id for d in devices(stub, md)] == [PHONE_A, PHONE_C]


def test_malformed_device_ids_are_invalid_arguments(stub) -> None:
    family_id, md = register(stub)
    inv = invite(stub, md)
    for bad in (PHONE_B + "\n", PHONE_B.upper(), PHONE_B[:31], PHONE_B + "0", "g" * 32):
        err = rpc_error(stub.JoinFamily, family_pb2.JoinFamilyRequest(
            family_id=family_id, invite_token=inv.invite_token, device_id=bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(bad)
        err = rpc_error(stub.RevokeDevice, family_pb2.RevokeDeviceRequest(device_id=bad),
                        metadata=md)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(bad)
        err = rpc_error(stub.RegisterFamily, family_pb2.RegisterFamilyRequest(
            label_key_fingerprint=bytes(16), label_ciphertext_dim=50, device_id=bad))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(bad)
    err = rpc_error(stub.JoinFamily, family_pb2.JoinFamilyRequest(
        family_id=family_id, invite_token=inv.invite_token, device_id=PHONE_B,
        sealed_device_name=bytes(1025)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    join(stub, family_id, inv.invite_token, PHONE_B, bytes(1024))  # the limit itself is fine


def test_revoked_device_is_refused_and_the_others_still_work(stub) -> None:
    family_id, md_a = register(stub)
    md_b = meta(family_id, join(stub, family_id, invite(stub, md_a).invite_token, PHONE_B))
    pending = invite(stub, md_b)  # made by B before its revocation
    stub.RevokeDevice(family_pb2.RevokeDeviceRequest(device_id=PHONE_B), metadata=md_a,
                      timeout=10)
    err = rpc_error(stub.GetFamily, family_pb2.GetFamilyRequest(), metadata=md_b)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    details = str(err.details())
    assert "revoked by the family" in details and "join again" in details
    err = rpc_error(stub.GetSealedItem, family_pb2.GetSealedItemRequest(name="roster"),
                    metadata=md_b)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stub.GetFamily(family_pb2.GetFamilyRequest(), metadata=md_a,
                          timeout=10).device_id == PHONE_A
    assert [(d.device_id, d.revoked) for d in devices(stub, md_a)] == [
        (PHONE_A, False), (PHONE_B, True)]
    # The revoked phone's earlier invitation cannot bring it back.
    err = rpc_error(stub.JoinFamily, family_pb2.JoinFamilyRequest(
        family_id=family_id, invite_token=pending.invite_token, device_id=PHONE_C))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    # Revoking again is a no-op, not an error.
    stub.RevokeDevice(family_pb2.RevokeDeviceRequest(device_id=PHONE_B), metadata=md_a,
                      timeout=10)


def test_revoke_errors(stub) -> None:
    family_id, md_a = register(stub)
    join(stub, family_id, invite(stub, md_a).invite_token, PHONE_B)
    err = rpc_error(stub.RevokeDevice, family_pb2.RevokeDeviceRequest(device_id=PHONE_A),
                    metadata=md_a)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "another phone" in str(err.details())
    err = rpc_error(stub.RevokeDevice, family_pb2.RevokeDeviceRequest(device_id=PHONE_C),
                    metadata=md_a)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # Another family's device is unknown here, not revocable.
    _, md_other = register(stub, PHONE_C)
    err = rpc_error(stub.RevokeDevice, family_pb2.RevokeDeviceRequest(device_id=PHONE_B),
                    metadata=md_other)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert not any(d.revoked for d in devices(stub, md_a))


def test_store_expiry_last_device_and_last_seen(make_store: StoreFactory) -> None:
    now = [1_000_000.0]
    store = make_store(clock=lambda: now[0])
    family_id, token_a = store.create_family(bytes(16), 50, PHONE_A)
    short, expires = store.create_invite(family_id, 60, created_by=PHONE_A)
    assert expires == now[0] + 60
    assert store.create_invite(family_id, 0)[1] == now[0] + DEFAULT_INVITE_TTL
    assert store.create_invite(family_id, 10 ** 9)[1] == now[0] + MAX_INVITE_TTL
    now[0] += 61
    with pytest.raises(AuthenticationError, match="unknown, used or expired"):
        store.join_family(family_id, short, PHONE_B, b"")
    long, _ = store.create_invite(family_id, 3600)
    store.join_family(family_id, long, PHONE_B, b"")
    # last_seen is written at most once a minute per device.
    store.authenticate(family_id, token_a)
    first = now[0]
    now[0] += 30
    store.authenticate(family_id, token_a)
    assert store.list_devices(family_id)[0].last_seen == first
    now[0] += 31
    store.authenticate(family_id, token_a)
    assert store.list_devices(family_id)[0].last_seen == now[0]
    # The last active device stays (only reachable here: the caller is always active).
    store.revoke_device(family_id, PHONE_B, PHONE_A)
    with pytest.raises(PreconditionError, match="last active device"):
        store.revoke_device(family_id, PHONE_A, PHONE_B)


# -- sealed items --------------------------------------------------------------------------


def test_sealed_item_compare_and_set(stub) -> None:
    family_id, md_a = register(stub)
    md_b = meta(family_id, join(stub, family_id, invite(stub, md_a).invite_token, PHONE_B))

    def put(md: Metadata, expected: int, data: bytes) -> int:
        return stub.PutSealedItem(family_pb2.PutSealedItemRequest(
            name="roster", expected_version=expected, data=data), metadata=md,
            timeout=10).version

    def get(md: Metadata) -> tuple[int, bytes]:
        r = stub.GetSealedItem(family_pb2.GetSealedItemRequest(name="roster"), metadata=md,
                               timeout=10)
        return r.version, r.data

    assert get(md_a) == (0, b"")
    assert put(md_a, 0, b"first") == 1
    err = rpc_error(stub.PutSealedItem, family_pb2.PutSealedItemRequest(
        name="roster", expected_version=0, data=b"stale"), metadata=md_b)
    assert err.code() == grpc.StatusCode.ABORTED
    details = str(err.details())
    assert "changed on another phone" in details and "version 1" in details
    assert get(md_b) == (1, b"first")
    assert put(md_b, 1, b"second") == 2
    assert get(md_a) == (2, b"second")
    # Items are independent of each other.
    assert stub.GetSealedItem(family_pb2.GetSealedItemRequest(name="ckks-secret"),
                              metadata=md_a, timeout=10).version == 0


def test_sealed_item_limits_and_names(stub) -> None:
    _, md = register(stub)
    ok = stub.PutSealedItem(family_pb2.PutSealedItemRequest(
        name="big_item-1", expected_version=0, data=bytes(SEALED_LIMIT)), metadata=md,
        timeout=10)
    assert ok.version == 1
    err = rpc_error(stub.PutSealedItem, family_pb2.PutSealedItemRequest(
        name="big_item-1", expected_version=1, data=bytes(SEALED_LIMIT + 1)), metadata=md)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    for bad in ("", "Roster", "roster\n", "a/b", "../x", "x" * 65, "r\u00f6ster"):
        err = rpc_error(stub.PutSealedItem, family_pb2.PutSealedItemRequest(
            name=bad, expected_version=0, data=b"x"), metadata=md)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(bad)
        err = rpc_error(stub.GetSealedItem, family_pb2.GetSealedItemRequest(name=bad),
                        metadata=md)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, repr(bad)


def test_another_familys_token_cannot_read_sealed_items(stub) -> None:
    family_id, md = register(stub)
    stub.PutSealedItem(family_pb2.PutSealedItemRequest(
        name="roster", expected_version=0, data=b"family one"), metadata=md, timeout=10)
    _, other_md = register(stub)
    other_token = other_md[1][1][len("Bearer "):]
    err = rpc_error(stub.GetSealedItem, family_pb2.GetSealedItemRequest(name="roster"),
                    metadata=meta(family_id, other_token))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    own = stub.GetSealedItem(family_pb2.GetSealedItemRequest(name="roster"),
                             metadata=other_md, timeout=10)
    assert (own.version, own.data) == (0, b"")


def test_logs_hold_no_token_and_no_sealed_bytes(stub, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    family_id, md = register(stub)
    inv = invite(stub, md)
    token_b = join(stub, family_id, inv.invite_token, PHONE_B, b"SEALED-NAME-BYTES")
    stub.PutSealedItem(family_pb2.PutSealedItemRequest(
        name="roster", expected_version=0, data=b"SEALED-ROSTER-BYTES"), metadata=md,
        timeout=10)
    stub.RevokeDevice(family_pb2.RevokeDeviceRequest(device_id=PHONE_B), metadata=md,
                      timeout=10)
    rpc_error(stub.GetFamily, family_pb2.GetFamilyRequest(), metadata=meta(family_id, token_b))
    assert "joined" in caplog.text and "revoked" in caplog.text
    for secret in (md[1][1][len("Bearer "):], inv.invite_token, token_b,
                   "SEALED-NAME-BYTES", "SEALED-ROSTER-BYTES"):
        assert secret not in caplog.text


# -- the family's CKKS keys ----------------------------------------------------------------


def test_public_context_replacement_refused_while_a_gallery_exists(
        stub, channel, secrets_pair) -> None:
    first, second = secrets_pair
    _, md = register(stub)

    def key_id() -> bytes:
        return stub.GetFamily(family_pb2.GetFamilyRequest(), metadata=md,
                              timeout=10).ckks_key_id

    upload_context(stub, md, ckks.public_context_bytes(first))
    assert key_id() == first.key_id
    upload_context(stub, md, ckks.public_context_bytes(first))  # same keys: idempotent
    upload_context(stub, md, ckks.public_context_bytes(second))  # empty gallery: allowed
    assert key_id() == second.key_id
    faces_stub = faces_pb2_grpc.FaceServiceStub(channel)
    emb = np.full((1, 128), 0.05)
    faces_stub.AddGalleryEntries(faces_pb2.AddGalleryEntriesRequest(
        slot=0, block=0, first_position=0, count=1,
        ciphertexts=faces_pb2.Ciphertexts(items=ckks.encrypt_entries(second, emb, 0))),
        metadata=md, timeout=60)
    with pytest.raises(grpc.RpcError) as info:
        upload_context(stub, md, ckks.public_context_bytes(first))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already has CKKS keys" in str(info.value.details())
    assert key_id() == second.key_id
    # Dead positions still hold ciphertexts under the family's keys: still refused.
    faces_stub.RemoveGallerySlot(faces_pb2.RemoveGallerySlotRequest(slot=0), metadata=md,
                                 timeout=10)
    with pytest.raises(grpc.RpcError) as info:
        upload_context(stub, md, ckks.public_context_bytes(first))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    upload_context(stub, md, ckks.public_context_bytes(second))  # the family's own keys
    assert key_id() == second.key_id


# -- migration -----------------------------------------------------------------------------

OLD_FAMILIES = """
CREATE TABLE families (
    family_id TEXT PRIMARY KEY,
    token_hash BLOB NOT NULL,
    label_key_fp BLOB NOT NULL,
    label_dim INTEGER NOT NULL,
    context_file TEXT,
    context_size INTEGER,
    created REAL NOT NULL
);
"""


def test_old_database_still_authenticates_its_token(tmp_path: Path, secrets_pair,
                                                    tls_certs: DevCerts) -> None:
    root = tmp_path / "server"
    root.mkdir()
    family_id, other_id = "fam_" + "1" * 24, "fam_" + "2" * 24
    context = ckks.public_context_bytes(secrets_pair[0])
    (root / "blobs" / other_id).mkdir(parents=True)
    (root / "blobs" / other_id / "context-old.bin").write_bytes(context)
    with sqlite3.connect(root / "privface.sqlite3") as db:
        db.executescript(OLD_FAMILIES)
        db.execute("INSERT INTO families VALUES (?, ?, ?, 50, NULL, NULL, 1.0)",
                   (family_id, hash_token("old-token"), bytes(16)))
        db.execute("INSERT INTO families VALUES (?, ?, ?, 50, 'context-old.bin', ?, 2.0)",
                   (other_id, hash_token("other-token"), bytes(16), len(context)))
    db.close()
    server, port, _ = create_server(tls_server_config(tls_certs, data_dir=root))
    server.start()
    try:
        with tls_channel(f"127.0.0.1:{port}") as channel:
            stub = family_pb2_grpc.FamilyServiceStub(channel)
            summary = stub.GetFamily(family_pb2.GetFamilyRequest(),
                                     metadata=meta(family_id, "old-token"), timeout=10)
            assert summary.device_id == legacy_device_id(family_id)
            assert summary.ckks_key_id == b"" and not summary.has_public_context
            err = rpc_error(stub.GetFamily, family_pb2.GetFamilyRequest(),
                            metadata=meta(family_id, "other-token"))
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            # A context stored before key ids were kept reports its key id.
            other = stub.GetFamily(family_pb2.GetFamilyRequest(),
                                   metadata=meta(other_id, "other-token"), timeout=10)
            assert other.ckks_key_id == secrets_pair[0].key_id
            (device,) = devices(stub, meta(family_id, "old-token"))
            assert device.device_id == legacy_device_id(family_id) and device.created_at == 1.0
    finally:
        server.stop(0).wait()
    # Opening it again adds nothing; the old column is left for an older server.
    store = Store(root)
    assert len(store.list_devices(family_id)) == 1
    with sqlite3.connect(root / "privface.sqlite3") as db:
        assert db.execute("SELECT token_hash FROM families WHERE family_id = ?",
                          (family_id,)).fetchone()[0] == hash_token("old-token")
    db.close()
