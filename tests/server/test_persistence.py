"""State survives a server restart; racing identical uploads leave one consistent photo."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np
import pytest

from client.pipeline import faces
from client.pipeline import photos as pipeline
from client.pipeline.family import create_family
from client.rpc import Credentials, PrivfaceClient
from common import labels, photo_crypto
from common.errors import (
    AlreadyExistsError,
    AuthenticationError,
    LimitExceededError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
)
from server.app import create_server
from server.config import ServerConfig
from server.limits import PhotoQuota
from server.storage import (
    DEFAULT_INVITE_TTL,
    MAX_INVITE_TTL,
    MAX_LIVE_INVITES,
    Store,
)
from server.tls import DevCerts
from tests.conftest import enroll_embeddings, tls_server_config
from tests.server.conftest import StoreFactory
from tests.server.test_photo_service import _photo_bytes


def _serve(config: ServerConfig):
    server, port, _ = create_server(config)
    server.start()
    return server, f"127.0.0.1:{port}"


def test_photos_labels_and_gallery_survive_a_restart(tmp_path: Path,
                                                     tls_certs: DevCerts) -> None:
    config = tls_server_config(tls_certs, data_dir=tmp_path / "data")
    server, address = _serve(config)
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((3, 128))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    with PrivfaceClient(address) as client:
        bundle = create_family(client)
        bundle.add_member("Mum")
        bundle.add_member("Tom")
        ids = [pipeline.backup_photo(client, bundle, _photo_bytes(f"p{i}"), slots).photo_id
               for i, slots in enumerate([[0], [0, 1], [1]])]
        before, _ = pipeline.search_photos(client, bundle, [0], labels.MatchMode.ALL)
        faces.ensure_ckks_keys(client, bundle)
        enroll_embeddings(client, bundle, "Gran", gallery)
    server.stop(0).wait()

    server, address = _serve(config)  # a new process would see exactly these files
    try:
        with PrivfaceClient(address, Credentials(bundle.family_id, bundle.access_token)) as c:
            after, _ = pipeline.search_photos(c, bundle, [0], labels.MatchMode.ALL)
            assert after == before == [ids[1], ids[0]]
            assert pipeline.fetch_photo(c, bundle, ids[2]) == _photo_bytes("p2")
            (match,) = faces.identify(c, bundle, gallery[1:2])
            assert match.name == "Gran" and match.distance < 1e-3
            assert not faces.ensure_ckks_keys(c, bundle)  # the public context was kept
    finally:
        server.stop(0).wait()


def test_racing_identical_uploads_store_one_photo(family, server) -> None:
    client, bundle = family
    data = _photo_bytes("race")
    photo_id = pipeline.photo_id_for(bundle, data)
    blob = photo_crypto.encrypt_photo(bundle.master_key, bundle.family_id, photo_id,
                                               data)
    labels_ct = pipeline.encrypt_labels(bundle, [0])
    results, errors = [], []

    def upload() -> None:
        try:
            results.append(client.backup_photo(photo_id, blob, labels_ct,
                                               bundle.label_key.fingerprint()))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [False, True, True, True]
    assert client.list_photos() == [photo_id]
    blobs = [p for p in (server[1].data_dir / "blobs" / bundle.family_id).iterdir()]
    assert len(blobs) == 1
    assert pipeline.fetch_photo(client, bundle, photo_id) == data


class _Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def _put(store: Store, family_id: str, photo_id: str, blob: bytes,
         thumbnail: bytes | None = None, quota: PhotoQuota | None = None) -> tuple[int, bool]:
    key = store.new_photo_key(family_id, photo_id)
    store.blobs.put(key, blob)
    return store.put_photo(family_id, photo_id, key, len(blob), hashlib.sha256(blob).digest(),
                           b"labels-" + photo_id.encode(), thumbnail, quota)


def _blob_files(store: Store, family_id: str) -> list[str]:
    return sorted(b.key for b in store.blobs.list(f"{family_id}/") if b.key.endswith(".blob"))


def test_store_photo_records_usage_and_retries(make_store: StoreFactory) -> None:
    store = make_store()
    family_id, _ = store.create_family(b"fp", 3)
    seq1, created1 = _put(store, family_id, "a" * 32, b"x" * 100, b"t" * 10)
    seq2, created2 = _put(store, family_id, "b" * 32, b"y" * 50)
    assert created1 and created2 and seq2 > seq1
    record = store.get_photo(family_id, "a" * 32)
    assert (record.photo_id, record.seq, record.blob_size) == ("a" * 32, seq1, 100)
    assert record.blob_sha256 == hashlib.sha256(b"x" * 100).digest()
    assert (record.labels, record.thumbnail) == (b"labels-" + b"a" * 32, b"t" * 10)
    assert store.blobs.read(record.blob_key) == b"x" * 100
    assert store.has_photo(family_id, "a" * 32) and not store.has_photo(family_id, "c" * 32)
    assert store.photo_usage(family_id) == (2, 160)  # blobs and thumbnails
    assert make_store().photo_usage(family_id) == (2, 160)  # as another server sees it

    # The same photo again: acknowledged, the second copy removed; another blob: refused.
    assert _put(store, family_id, "a" * 32, b"x" * 100, b"t" * 10) == (seq1, False)
    with pytest.raises(AlreadyExistsError):
        _put(store, family_id, "a" * 32, b"z" * 100)
    assert len(_blob_files(store, family_id)) == 2
    assert store.photo_usage(family_id) == (2, 160)

    # Over the quota: refused, its file removed, the usage recounted right.
    with pytest.raises(LimitExceededError):
        _put(store, family_id, "c" * 32, b"w" * 100, quota=PhotoQuota(10, 200))
    assert len(_blob_files(store, family_id)) == 2
    assert store.photo_usage(family_id) == (2, 160)
    _put(store, family_id, "c" * 32, b"w" * 40, quota=PhotoQuota(10, 200))
    assert store.photo_usage(family_id) == (3, 200)

    assert store.delete_photo(family_id, "a" * 32) == seq1
    assert store.photo_usage(family_id) == (2, 90)
    with pytest.raises(NotFoundError):
        store.blobs.read(record.blob_key)
    store.blobs.delete(store.get_photo(family_id, "b" * 32).blob_key)  # a row, its blob lost
    store.delete_photo(family_id, "b" * 32)  # can still be deleted
    assert store.photo_usage(family_id) == (1, 40)
    restarted = make_store()  # another server (or a restart) keeps the same count
    restarted.delete_photo(family_id, "c" * 32)
    assert restarted.photo_usage(family_id) == (0, 0)
    with pytest.raises(NotFoundError):
        store.delete_photo(family_id, "a" * 32)
    other, _ = store.create_family(b"fp", 3)
    assert store.photo_usage(other) == (0, 0)
    with pytest.raises(NotFoundError):
        store.get_photo(other, "b" * 32)


def test_store_family_deletion_counts_and_forgets_usage(make_store: StoreFactory) -> None:
    store = make_store()
    family_id, _ = store.create_family(b"fp", 3, device_id="d1")
    token = store.join_family(family_id, store.create_invite(family_id)[0], "d2", b"name")
    assert store.authenticate(family_id, token).device_id == "d2"
    store.put_sealed(family_id, "roster", 0, b"sealed")
    _put(store, family_id, "a" * 32, b"x" * 10)
    _put(store, family_id, "b" * 32, b"y" * 10)
    assert store.photo_usage(family_id) == (2, 20)
    deletion = store.delete_family(family_id)
    assert (deletion.photos, deletion.devices, deletion.sealed_items, deletion.files) == (
        2, 2, 1, 2)
    assert store.photo_usage(family_id) == (0, 0)
    assert store.delete_family(family_id).photos == 0


def test_store_invitations(make_store: StoreFactory) -> None:
    clock = _Clock()
    store = make_store(clock=clock)
    family_id, _ = store.create_family(b"fp", 3, device_id="d1")
    assert store.create_invite(family_id, ttl_seconds=1)[1] == clock.now + 1
    assert store.create_invite(family_id, ttl_seconds=0)[1] == clock.now + DEFAULT_INVITE_TTL
    assert store.create_invite(family_id, ttl_seconds=1e9)[1] == clock.now + MAX_INVITE_TTL
    short = store.create_invite(family_id, ttl_seconds=10)[0]
    for _ in range(MAX_LIVE_INVITES - 4):
        store.create_invite(family_id)
    with pytest.raises(LimitExceededError, match="unused invitations"):
        store.create_invite(family_id)
    clock.now += 11  # two have expired: room for two more
    with pytest.raises(AuthenticationError):
        store.join_family(family_id, short, "d2", b"")
    store.create_invite(family_id)
    invite = store.create_invite(family_id)[0]
    with pytest.raises(LimitExceededError):
        store.create_invite(family_id)
    assert len(invite) >= 43  # 32 random bytes
    token = store.join_family(family_id, invite, "d2", b"")
    with pytest.raises(AuthenticationError):  # used exactly once
        store.join_family(family_id, invite, "d3", b"")
    with pytest.raises(AlreadyExistsError):
        store.join_family(family_id, store.create_invite(family_id)[0], "d2", b"")
    assert store.authenticate(family_id, token).device_id == "d2"


def test_store_revocation(make_store: StoreFactory) -> None:
    store = make_store()
    family_id, first = store.create_family(b"fp", 3, device_id="d1")
    second = store.join_family(family_id, store.create_invite(family_id)[0], "d2", b"")
    by_d2 = store.create_invite(family_id, created_by="d2")[0]
    by_d1 = store.create_invite(family_id, created_by="d1")[0]
    assert store.revoke_device(family_id, "d2", "d1") is True
    assert store.revoke_device(family_id, "d2", "d1") is False  # already revoked
    with pytest.raises(PermissionDeniedError):
        store.authenticate(family_id, second)
    with pytest.raises(AuthenticationError):  # its invitations went with it
        store.join_family(family_id, by_d2, "d3", b"")
    assert store.join_family(family_id, by_d1, "d4", b"")
    with pytest.raises(PreconditionError):
        store.revoke_device(family_id, "d1", "d1")
    with pytest.raises(NotFoundError):
        store.revoke_device(family_id, "d9", "d1")
    assert store.revoke_device(family_id, "d4", "d1") is True
    with pytest.raises(PreconditionError, match="last active device"):
        store.revoke_device(family_id, "d1", "d4")
    assert store.authenticate(family_id, first).device_id == "d1"
