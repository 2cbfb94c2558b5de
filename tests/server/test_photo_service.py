"""The real server over real gRPC: backup, search, fetch, delete, isolation, errors."""

from __future__ import annotations

import hashlib
import secrets
import threading
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.config import ClientConfig
from client.pipeline import photos as pipeline
from client.pipeline.family import create_family
from client.rpc import Credentials, PrivfaceClient, ServerUnavailableError
from common import labels
from common.errors import (
    AuthenticationError,
    LimitExceededError,
    MalformedInputError,
    NotFoundError,
    PreconditionError,
)
from privface.v1 import photos_pb2
from server.app import create_server
from server.tls import DevCerts
from tests.conftest import channel as tls_channel
from tests.conftest import require_data, tls_server_config

PEOPLE = {"mum_tom": ["Mum", "Tom"], "mum": ["Mum"], "tom_dad": ["Tom", "Dad"],
          "all": ["Mum", "Tom", "Dad"], "nobody": []}


def _photo_bytes(tag: str) -> bytes:
    """A small real PNG, distinct per tag (thumbnails need a decodable image)."""
    import cv2
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(tag.encode()).digest()[:4], "little"))
    ok, png = cv2.imencode(".png", rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8))
    assert ok
    return png.tobytes()


@pytest.fixture
def stored(family):
    client, bundle = family
    ids = {}
    for tag, names in PEOPLE.items():
        receipt = pipeline.backup_photo(client, bundle, _photo_bytes(tag),
                                        [bundle.slot_of(n) for n in names])
        ids[tag] = receipt.photo_id
    return client, bundle, ids


def _search(client, bundle, names, mode=labels.MatchMode.ALL, top_n=0):
    ids, _ = pipeline.search_photos(client, bundle, [bundle.slot_of(n) for n in names], mode, top_n)
    return ids


def test_search_by_one_and_by_two_people(stored) -> None:
    client, bundle, ids = stored
    assert set(_search(client, bundle, ["Mum"])) == {ids["mum_tom"], ids["mum"], ids["all"]}
    assert set(_search(client, bundle, ["Mum", "Tom"])) == {ids["mum_tom"], ids["all"]}
    assert _search(client, bundle, ["Mum", "Tom", "Dad"]) == [ids["all"]]
    assert _search(client, bundle, ["Gran"]) == []
    any_hits = _search(client, bundle, ["Mum", "Dad"], labels.MatchMode.ANY)
    assert set(any_hits) == {ids["mum_tom"], ids["mum"], ids["tom_dad"], ids["all"]}
    ranked = _search(client, bundle, ["Mum", "Tom", "Dad"], labels.MatchMode.RANKED, 2)
    assert ranked[0] == ids["all"] and len(ranked) == 2


def test_fetch_returns_the_same_bytes_and_delete_removes_everything(stored, server) -> None:
    client, bundle, ids = stored
    assert pipeline.fetch_photo(client, bundle, ids["mum"]) == _photo_bytes("mum")
    thumb = pipeline.fetch_photo(client, bundle, ids["mum"], thumbnail_only=True)
    assert thumb[:2] == b"\xff\xd8"  # a JPEG preview
    client.delete_photo(ids["mum"])
    assert ids["mum"] not in _search(client, bundle, ["Mum"])
    with pytest.raises(NotFoundError):
        client.fetch_photo(ids["mum"])
    with pytest.raises(NotFoundError):
        client.delete_photo(ids["mum"])
    blobs = list((server[1].data_dir / "blobs" / bundle.family_id).glob(f"{ids['mum']}*"))
    assert blobs == []


def test_backup_is_idempotent(stored) -> None:
    client, bundle, ids = stored
    again = pipeline.backup_photo(client, bundle, _photo_bytes("mum"), [bundle.slot_of("Mum")])
    assert again.photo_id == ids["mum"] and again.already_stored
    assert len(client.list_photos()) == len(PEOPLE)


def test_search_never_returns_another_familys_photo(stored, address) -> None:
    client, bundle, ids = stored
    with PrivfaceClient(address) as other_client:
        other = create_family(other_client)
        other.add_member("Mum")
        mine = pipeline.backup_photo(other_client, other, _photo_bytes("other"), [0])
        assert _search(other_client, other, ["Mum"]) == [mine.photo_id]
        assert other_client.list_photos() == [mine.photo_id]
        with pytest.raises(NotFoundError):  # same answer as for an unknown id
            other_client.fetch_photo(ids["mum"])
        with pytest.raises(NotFoundError):
            other_client.delete_photo(ids["mum"])
        # The other family's query under its own key, sent with our key id: refused.
        query = pipeline.encrypt_query(other, [0], labels.MatchMode.ALL)
        with pytest.raises((PreconditionError, MalformedInputError)):
            client.search_photos(query, other.label_key.fingerprint())
    assert mine.photo_id not in _search(client, bundle, ["Mum"])


def test_store_holds_neither_photo_bytes_nor_label_vectors_in_clear(stored, server) -> None:
    _, bundle, _ = stored
    files = [p for p in server[1].data_dir.rglob("*") if p.is_file()]
    content = b"".join(p.read_bytes() for p in files)
    for tag in PEOPLE:
        photo = _photo_bytes(tag)
        assert photo[100:164] not in content
    for names in filter(None, PEOPLE.values()):  # plaintext label vectors, common encodings
        vec = labels.label_vector([bundle.slot_of(n) for n in names], bundle.capacity)
        for dtype in ("<f8", "<f4", "<i4"):
            assert vec.astype(dtype).tobytes() not in content
    # Names as any serialisation would hold them (JSON, a length prefix, a NUL end): a bare
    # 3-byte name turns up by chance in megabytes of ciphertext about one run in five.
    for name in ("Mum", "Tom", "Dad"):
        for form in (f'"{name}"'.encode(), b"\x03" + name.encode(), name.encode() + b"\x00",
                     name.encode("utf-16-le")):
            assert form not in content, form


def test_precise_errors(family, address) -> None:
    client, bundle = family
    fp = bundle.label_key.fingerprint()
    labels_ct = pipeline.encrypt_labels(bundle, [0])
    with PrivfaceClient(address, Credentials(bundle.family_id, "wrong-token")) as bad, \
            pytest.raises(AuthenticationError):
        bad.list_photos()
    with pytest.raises(MalformedInputError, match="32 lowercase hex"):
        client.backup_photo("not-an-id", b"x", labels_ct, fp)
    with pytest.raises(MalformedInputError, match="float64"):
        client.backup_photo(secrets.token_hex(16), b"x", labels_ct[:-8], fp)
    with pytest.raises(PreconditionError):
        client.backup_photo(secrets.token_hex(16), b"x", labels_ct, b"\0" * 16)
    with pytest.raises(LimitExceededError):
        client.backup_photo(secrets.token_hex(16), b"x" * (9 * 1024 * 1024), labels_ct, fp)
    with pytest.raises(MalformedInputError):
        client.search_photos(b"\0" * 8, fp)
    with pytest.raises(MalformedInputError, match="top_n"):
        client.search_photos(pipeline.encrypt_query(bundle, [0], labels.MatchMode.RANKED), fp,
                             labels.MatchMode.RANKED, 0)
    with pytest.raises(MalformedInputError):
        pipeline.backup_photo(client, bundle, b"not an image", [0])
    assert client.list_photos() == []


def test_dropped_upload_leaves_nothing_behind(family, server) -> None:
    client, bundle = family
    photo_id = secrets.token_hex(16)
    blob = b"z" * (3 * 1024 * 1024)
    header = photos_pb2.PhotoHeader(
        photo_id=photo_id, blob_size=len(blob), blob_sha256=hashlib.sha256(blob).digest(),
        encrypted_labels=pipeline.encrypt_labels(bundle, [0]),
        label_key_fingerprint=bundle.label_key.fingerprint())
    sent = threading.Event()

    def requests():
        yield photos_pb2.BackupPhotoRequest(header=header)
        yield photos_pb2.BackupPhotoRequest(chunk=blob[:1024 * 1024])
        sent.set()
        threading.Event().wait(0.5)
        raise RuntimeError("phone lost its connection")

    with pytest.raises(grpc.RpcError):
        client.photos.BackupPhoto(requests(), timeout=10, metadata=client.metadata())
    with pytest.raises(NotFoundError):
        client.fetch_photo(photo_id)
    leftovers = [p for p in (server[1].data_dir / "blobs").rglob("*") if p.is_file()]
    assert leftovers == []
    # A short upload (fewer bytes than announced) is refused too.
    def short():
        yield photos_pb2.BackupPhotoRequest(header=header)
        yield photos_pb2.BackupPhotoRequest(chunk=blob[:10])
    with pytest.raises(grpc.RpcError) as info:
        client.photos.BackupPhoto(short(), timeout=10, metadata=client.metadata())
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_health_and_unreachable_server(address) -> None:
    with tls_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="privface.v1.PhotoService"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    with PrivfaceClient("127.0.0.1:1", config=ClientConfig.load(timeout=2)) as dead, \
            pytest.raises(ServerUnavailableError, match="is privface-server running"):
        dead.register_family(b"\0" * 16, 34)


def test_real_photos_round_trip(family) -> None:
    folder = require_data("photos", "group_face_recognition_examples")
    client, bundle = family
    for path in sorted(folder.glob("*.jpg"))[:2]:
        data = Path(path).read_bytes()
        receipt = pipeline.backup_photo(client, bundle, data, [0, 1])
        assert pipeline.fetch_photo(client, bundle, receipt.photo_id) == data


def test_fetch_announces_size_and_hash_then_sends_bounded_chunks(family) -> None:
    """The first message carries the blob's size and SHA-256, every chunk is at most 1 MiB,
    and a thumbnail comes whole with its size."""
    client, bundle = family
    photo_id = secrets.token_hex(16)
    blob = secrets.token_bytes(2 * 1024 * 1024 + 12345)
    client.backup_photo(photo_id, blob, pipeline.encrypt_labels(bundle, [0]),
                        bundle.label_key.fingerprint(), encrypted_thumbnail=b"thumb" * 10)
    messages = list(client.photos.FetchPhoto(photos_pb2.FetchPhotoRequest(photo_id=photo_id),
                                             timeout=30, metadata=client.metadata()))
    assert messages[0].blob_size == len(blob)
    assert messages[0].blob_sha256 == hashlib.sha256(blob).digest()
    assert [len(m.chunk) for m in messages] == [1024 * 1024, 1024 * 1024, 12345]
    assert b"".join(m.chunk for m in messages) == blob
    (thumb,) = client.photos.FetchPhoto(
        photos_pb2.FetchPhotoRequest(photo_id=photo_id, thumbnail_only=True), timeout=30,
        metadata=client.metadata())
    assert (thumb.blob_size, thumb.chunk) == (50, b"thumb" * 10)


def test_label_vectors_of_a_partial_float_are_invalid_argument(family) -> None:
    client, bundle = family
    labels_ct = pipeline.encrypt_labels(bundle, [0])
    for bad in (labels_ct[:-1], labels_ct + b"\0" * 3):
        with pytest.raises(MalformedInputError, match="float64"):
            client.backup_photo(secrets.token_hex(16), b"x", bad,
                                bundle.label_key.fingerprint())
    assert client.list_photos() == []


def test_photo_quota_holds_against_racing_uploads_and_retries(tmp_path: Path,
                                                              tls_certs: DevCerts) -> None:
    """The quota (2 photos here) is checked before the body is read and again, exactly,
    when the photo commits: an upload that passed the first check while another one
    completed is still refused; a retry of a stored photo is acknowledged at the quota."""
    config = tls_server_config(tls_certs, data_dir=tmp_path / "data", max_family_photos=2)
    server, port, _ = create_server(config)
    server.start()
    try:
        with PrivfaceClient(f"127.0.0.1:{port}") as client:
            bundle = create_family(client)
            labels_ct, fp = pipeline.encrypt_labels(bundle, [0]), bundle.label_key.fingerprint()
            first, late, other = (secrets.token_hex(16) for _ in range(3))
            assert client.backup_photo(first, b"first", labels_ct, fp) is False
            go, outcome = threading.Event(), {}
            header = photos_pb2.PhotoHeader(
                photo_id=late, blob_size=4, blob_sha256=hashlib.sha256(b"late").digest(),
                encrypted_labels=labels_ct, label_key_fingerprint=fp)

            def slow():
                yield photos_pb2.BackupPhotoRequest(header=header)
                go.wait(20)
                yield photos_pb2.BackupPhotoRequest(chunk=b"late")

            def upload() -> None:
                try:
                    client.photos.BackupPhoto(slow(), timeout=30, metadata=client.metadata())
                    outcome["code"] = grpc.StatusCode.OK
                except grpc.RpcError as exc:
                    outcome["code"] = exc.code()

            racer = threading.Thread(target=upload)
            racer.start()
            threading.Event().wait(1.0)  # its header has passed the first check (1 of 2)
            client.backup_photo(other, b"other", labels_ct, fp)  # now 2 of 2
            go.set()
            racer.join(30)
            assert outcome["code"] is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert sorted(client.list_photos()) == sorted([first, other])
            assert client.backup_photo(first, b"first", labels_ct, fp) is True  # a retry

            answered = threading.Event()

            def header_then_lost():
                yield photos_pb2.BackupPhotoRequest(header=photos_pb2.PhotoHeader(
                    photo_id=secrets.token_hex(16), blob_size=5,
                    blob_sha256=hashlib.sha256(b"third").digest(),
                    encrypted_labels=labels_ct, label_key_fingerprint=fp))
                if not answered.wait(5):  # a server waiting for the body gets none
                    raise RuntimeError("the body never comes")

            with pytest.raises(grpc.RpcError) as refused:  # refused before the body
                client.photos.BackupPhoto(header_then_lost(), timeout=30,
                                          metadata=client.metadata())
            answered.set()
            assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            response = client.photos.BackupPhoto(
                iter([photos_pb2.BackupPhotoRequest(header=photos_pb2.PhotoHeader(
                    photo_id=other, blob_size=5, blob_sha256=hashlib.sha256(b"other").digest(),
                    encrypted_labels=labels_ct, label_key_fingerprint=fp)),
                      photos_pb2.BackupPhotoRequest(chunk=b"other")]),
                timeout=30, metadata=client.metadata())
            assert (response.photo_id, response.already_stored) == (other, True)
    finally:
        server.stop(0).wait()
