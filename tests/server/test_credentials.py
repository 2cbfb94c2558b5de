"""Every RPC of every service with no credentials, wrong credentials and another family's
credentials. The RPCs are enumerated from the proto descriptors: a new RPC without an
entry in the tables below fails test_every_rpc_has_a_credentials_entry."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest

from client.keystore import FamilyBundle
from client.pipeline import faces
from client.pipeline import photos as pipeline
from client.pipeline.family import create_family
from client.rpc import PrivfaceClient
from common import ckks, labels
from common.errors import AuthenticationError
from privface.v1 import (
    detection_pb2,
    detection_pb2_grpc,
    faces_pb2,
    faces_pb2_grpc,
    family_pb2,
    family_pb2_grpc,
    photos_pb2,
    photos_pb2_grpc,
)
from server.app import create_server, vendor_token
from server.auth import authenticate
from server.config import ServerConfig
from server.storage import Family, Store, hash_token
from tests.conftest import channel

SLOW = 120
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
STUBS = {
    "privface.v1.FamilyService": (family_pb2, family_pb2_grpc.FamilyServiceStub),
    "privface.v1.PhotoService": (photos_pb2, photos_pb2_grpc.PhotoServiceStub),
    "privface.v1.FaceService": (faces_pb2, faces_pb2_grpc.FaceServiceStub),
    "privface.v1.DetectorService": (detection_pb2, detection_pb2_grpc.DetectorServiceStub),
}
ALL_RPCS = {f"{service}/{method.name}": method
            for service, (module, _) in STUBS.items()
            for method in module.DESCRIPTOR.services_by_name[service.split(".")[-1]].methods}
EMBEDDING = np.full((1, ckks.DIM), 0.05)


@dataclass
class World:
    """Family A (the target, with a photo, a gallery, a sealed item and two devices),
    family B (another family of the same server) and a published detector."""

    a: PrivfaceClient
    a_bundle: FamilyBundle
    a_secret: ckks.SecretContext
    a_photo: str
    a_second_device: str
    a_item: tuple[str, int, bytes]
    b: PrivfaceClient
    detector: detection_pb2.DetectorHeader
    vendor_token: str

    def a_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.a.metadata()


# -- what each RPC is called with: a request aimed at family A's data --------------------------

Build = Callable[[World], Any]  # a request, or the list of messages of a client stream


def _backup(w: World) -> list[photos_pb2.BackupPhotoRequest]:
    blob = b"blob"
    return [photos_pb2.BackupPhotoRequest(header=photos_pb2.PhotoHeader(
        photo_id=w.a_photo, blob_size=len(blob), blob_sha256=hashlib.sha256(blob).digest(),
        encrypted_labels=pipeline.encrypt_labels(w.a_bundle, [0]),
        label_key_fingerprint=w.a_bundle.label_key.fingerprint())),
        photos_pb2.BackupPhotoRequest(chunk=blob)]


def _context(w: World) -> list[family_pb2.UploadPublicContextRequest]:
    data = ckks.public_context_bytes(w.a_secret)
    return [family_pb2.UploadPublicContextRequest(total_size=len(data), chunk=data,
                                                  sha256=hashlib.sha256(data).digest())]


def _query(w: World) -> photos_pb2.SearchPhotosRequest:
    return photos_pb2.SearchPhotosRequest(
        encrypted_query=pipeline.encrypt_query(w.a_bundle, [0], labels.MatchMode.ALL),
        label_key_fingerprint=w.a_bundle.label_key.fingerprint())


def _entries(w: World) -> faces_pb2.AddGalleryEntriesRequest:
    return faces_pb2.AddGalleryEntriesRequest(
        slot=1, block=0, first_position=1, count=1, ciphertexts=faces_pb2.Ciphertexts(
            items=ckks.encrypt_entries(w.a_secret, EMBEDDING, 1)))


def _replace(w: World) -> list[faces_pb2.ReplaceGalleryRequest]:
    return [faces_pb2.ReplaceGalleryRequest(header=faces_pb2.ReplaceGalleryHeader(
        expected_positions=1, block_count=1)),
        faces_pb2.ReplaceGalleryRequest(block=faces_pb2.ReplacementBlock(
            ciphertexts=faces_pb2.Ciphertexts(items=ckks.encrypt_entries(
                w.a_secret, EMBEDDING, 0)), slots=[0]))]


def _match(w: World) -> faces_pb2.MatchFacesRequest:
    return faces_pb2.MatchFacesRequest(faces=[faces_pb2.Ciphertexts(
        items=ckks.encrypt_query(w.a_secret, EMBEDDING[0]))])


def _detect(w: World) -> list[detection_pb2.DetectFacesRequest]:
    return [detection_pb2.DetectFacesRequest(session=detection_pb2.DetectionSession(
        detector_id=w.detector.detector_id, key_version=w.detector.key_version,
        key_fingerprint=w.detector.key_fingerprint)),
        detection_pb2.DetectFacesRequest(batch=detection_pb2.WindowBatch(
            batch_id=1, count=1, windows=np.ones(4).tobytes(),
            encoding=detection_pb2.WINDOW_ENCODING_FLOAT64))]


FAMILY_RPCS: dict[str, Build] = {
    "privface.v1.FamilyService/UploadPublicContext": _context,
    "privface.v1.FamilyService/GetFamily": lambda w: family_pb2.GetFamilyRequest(),
    "privface.v1.FamilyService/GetSealedItem":
        lambda w: family_pb2.GetSealedItemRequest(name=w.a_item[0]),
    "privface.v1.FamilyService/PutSealedItem": lambda w: family_pb2.PutSealedItemRequest(
        name=w.a_item[0], expected_version=w.a_item[1], data=b"overwritten"),
    "privface.v1.FamilyService/CreateDeviceInvite":
        lambda w: family_pb2.CreateDeviceInviteRequest(),
    "privface.v1.FamilyService/ListDevices": lambda w: family_pb2.ListDevicesRequest(),
    "privface.v1.FamilyService/RevokeDevice":
        lambda w: family_pb2.RevokeDeviceRequest(device_id=w.a_second_device),
    "privface.v1.FamilyService/DeleteFamily": lambda w: family_pb2.DeleteFamilyRequest(
        confirm_family_id=w.a_bundle.family_id),
    "privface.v1.PhotoService/BackupPhoto": _backup,
    "privface.v1.PhotoService/SearchPhotos": _query,
    "privface.v1.PhotoService/FetchPhoto":
        lambda w: photos_pb2.FetchPhotoRequest(photo_id=w.a_photo),
    "privface.v1.PhotoService/DeletePhoto":
        lambda w: photos_pb2.DeletePhotoRequest(photo_id=w.a_photo),
    "privface.v1.PhotoService/ListPhotos": lambda w: photos_pb2.ListPhotosRequest(),
    "privface.v1.FaceService/AddGalleryEntries": _entries,
    "privface.v1.FaceService/RemoveGallerySlot":
        lambda w: faces_pb2.RemoveGallerySlotRequest(slot=0),
    "privface.v1.FaceService/GetGalleryLayout": lambda w: faces_pb2.GetGalleryLayoutRequest(),
    "privface.v1.FaceService/GetGalleryBlock":
        lambda w: faces_pb2.GetGalleryBlockRequest(block=0),
    "privface.v1.FaceService/ReplaceGallery": _replace,
    "privface.v1.FaceService/MatchFaces": _match,
    "privface.v1.DetectorService/DetectFaces": _detect,
}
# Authenticated otherwise: by the server's vendor token, or by nothing / an invitation.
VENDOR_RPCS = {"privface.v1.DetectorService/PublishDetector"}
PUBLIC_RPCS = {"privface.v1.FamilyService/RegisterFamily",
               "privface.v1.FamilyService/JoinFamily",
               "privface.v1.DetectorService/ListDetectors"}


def test_every_rpc_has_a_credentials_entry() -> None:
    """A new RPC must be classified here (and so get the checks below)."""
    assert len(ALL_RPCS) >= 24
    assert set(ALL_RPCS) == set(FAMILY_RPCS) | VENDOR_RPCS | PUBLIC_RPCS
    assert not set(FAMILY_RPCS) & (VENDOR_RPCS | PUBLIC_RPCS)


def invoke(ch: grpc.Channel, rpc: str, request: Any,
           metadata: tuple[tuple[str, str], ...]) -> Any:
    """Calls ``rpc`` through its generated stub; the response, or every streamed one."""
    service, name = rpc.split("/")
    method = ALL_RPCS[rpc]
    call = getattr(STUBS[service][1](ch), name)
    result = call(iter(request) if method.client_streaming else request, metadata=metadata,
                  timeout=SLOW)
    return list(result) if method.server_streaming else result


def status_of(ch: grpc.Channel, rpc: str, request: Any,
              metadata: tuple[tuple[str, str], ...]) -> grpc.StatusCode:
    try:
        invoke(ch, rpc, request, metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def tiny_detector() -> tuple[detection_pb2.DetectorHeader, bytes]:
    stages = [detection_pb2.CascadeStage(weak_count=1, threshold=0.5, left_values=[0.0],
                                         right_values=[1.0]) for _ in range(2)]
    matrix = np.random.default_rng(3).standard_normal(8).tobytes()
    return detection_pb2.DetectorHeader(
        detector_id="tiny", key_version=1, key_fingerprint=b"k" * 16, window_width=20,
        window_height=20, ciphertext_dim=4, stages=stages, matrix_size=len(matrix),
        matrix_sha256=hashlib.sha256(matrix).digest()), matrix


def publish_requests(header: detection_pb2.DetectorHeader, matrix: bytes
                     ) -> list[detection_pb2.PublishDetectorRequest]:
    return [detection_pb2.PublishDetectorRequest(header=header),
            detection_pb2.PublishDetectorRequest(chunk=matrix)]


@pytest.fixture
def lenient_server(server_config: ServerConfig) -> Iterator[tuple[str, ServerConfig]]:
    """A server that never locks an address out: these tests fail authentication on
    purpose, far more often than the admission control allows a real client."""
    config = dataclasses.replace(server_config, auth_failures_per_minute=1_000_000)
    srv, port, _ = create_server(config)
    srv.start()
    try:
        yield f"127.0.0.1:{port}", config
    finally:
        srv.stop(0).wait()


@pytest.fixture
def world(lenient_server: tuple[str, ServerConfig]) -> Iterator[World]:
    address, config = lenient_server
    token = vendor_token(config)
    with PrivfaceClient(address) as a, PrivfaceClient(address) as b:
        a_bundle = create_family(a)
        a_bundle.add_member("Mum")
        photo = pipeline.backup_photo(a, a_bundle, _png(), [0]).photo_id
        faces.ensure_ckks_keys(a, a_bundle)
        secret = faces.secret_context(a_bundle)
        a.add_gallery_entries(0, 0, 0, 1, ckks.encrypt_entries(secret, EMBEDDING, 0))
        version = a.put_sealed_item("probe", 0, b"family A's sealed bytes")
        invite, _ = a.create_device_invite()
        second = "5e" * 16
        with PrivfaceClient(address) as phone:
            phone.join_family(a_bundle.family_id, invite, second, b"sealed name")
        create_family(b)
        header, matrix = tiny_detector()
        with channel(address) as ch:
            invoke(ch, "privface.v1.DetectorService/PublishDetector",
                   publish_requests(header, matrix), (("authorization", f"Bearer {token}"),))
        yield World(a, a_bundle, secret, photo, second,
                    ("probe", version, b"family A's sealed bytes"), b, header, token)


def _png() -> bytes:
    import cv2
    ok, png = cv2.imencode(".png", np.random.default_rng(1).integers(
        0, 255, (32, 40, 3), dtype=np.uint8))
    assert ok
    return bytes(png.tobytes())


def a_state(w: World) -> tuple[Any, ...]:
    """What family A holds, as A itself sees it."""
    devices = tuple((d.device_id, d.revoked) for d in w.a.list_devices())
    return (tuple(w.a.list_photos()), w.a.fetch_photo(w.a_photo),
            tuple(sorted((b, tuple(s)) for b, s in w.a.gallery_layout().items())),
            tuple(w.a.gallery_block(0)[0]), w.a.get_sealed_item(w.a_item[0]), devices,
            w.a.get_family().photo_count)


def test_family_rpcs_refuse_missing_wrong_and_mixed_credentials(world: World,
                                                                lenient_server) -> None:
    a_id = world.a_bundle.family_id
    a_token = world.a_bundle.access_token
    assert world.b.credentials is not None
    b_token = world.b.credentials.access_token
    refused: dict[str, tuple[tuple[str, str], ...]] = {
        "none": (),
        "family id only": (("x-privface-family", a_id),),
        "token only": (("authorization", f"Bearer {a_token}"),),
        "wrong token": (("x-privface-family", a_id), ("authorization", "Bearer wrong-token")),
        "not a bearer token": (("x-privface-family", a_id), ("authorization", a_token)),
        "unknown family": (("x-privface-family", "fam_" + "0" * 24),
                           ("authorization", f"Bearer {a_token}")),
        "A's id with B's token": (("x-privface-family", a_id),
                                  ("authorization", f"Bearer {b_token}")),
        "vendor token": (("x-privface-family", a_id),
                         ("authorization", f"Bearer {world.vendor_token}")),
    }
    before = a_state(world)
    with channel(lenient_server[0]) as ch:
        for rpc, build in FAMILY_RPCS.items():
            request = build(world)
            for what, metadata in refused.items():
                assert status_of(ch, rpc, request, metadata) == UNAUTHENTICATED, (rpc, what)
    assert a_state(world) == before


def test_another_familys_credentials_never_reach_the_family(world: World,
                                                            lenient_server) -> None:
    """Family B calls every RPC with requests aimed at A's photo, gallery, sealed item and
    device: nothing of A comes back and nothing of A changes."""
    before = a_state(world)
    a_secrets = {"sealed item": world.a_item[2], "gallery": world.a.gallery_block(0)[0][0][-64:],
                 "photo blob": world.a.fetch_photo(world.a_photo)[-64:],
                 "device id": world.a_bundle.device_id.encode(),
                 "family id": world.a_bundle.family_id.encode()}
    codes: dict[str, grpc.StatusCode] = {}
    with channel(lenient_server[0]) as ch:
        for rpc, build in FAMILY_RPCS.items():
            try:
                reply = invoke(ch, rpc, build(world), world.b.metadata())
            except grpc.RpcError as exc:
                codes[rpc] = exc.code()
                assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                                          UNAUTHENTICATED), (rpc, exc.details())
                continue
            codes[rpc] = grpc.StatusCode.OK
            wire = b"".join(r.SerializeToString()
                            for r in (reply if isinstance(reply, list) else [reply]))
            for what, secret in a_secrets.items():
                assert secret not in wire, (rpc, what)
    assert a_state(world) == before
    # A's ids answer exactly like unknown ones (no existence oracle).
    for rpc in ("PhotoService/FetchPhoto", "PhotoService/DeletePhoto",
                "FamilyService/RevokeDevice", "FaceService/GetGalleryBlock"):
        assert codes[f"privface.v1.{rpc}"] == grpc.StatusCode.NOT_FOUND, rpc
    assert codes["privface.v1.FamilyService/DeleteFamily"] == grpc.StatusCode.INVALID_ARGUMENT
    assert codes["privface.v1.PhotoService/BackupPhoto"] == grpc.StatusCode.FAILED_PRECONDITION
    assert codes["privface.v1.PhotoService/SearchPhotos"] == grpc.StatusCode.FAILED_PRECONDITION


def test_vendor_rpc_needs_the_vendor_token(world: World, lenient_server) -> None:
    header, matrix = tiny_detector()
    header.detector_id = "other"
    requests = publish_requests(header, matrix)
    rpc = "privface.v1.DetectorService/PublishDetector"
    with channel(lenient_server[0]) as ch:
        for metadata in [(), (("authorization", "Bearer wrong"),), world.a_metadata(),
                         (("authorization", world.vendor_token),)]:
            assert status_of(ch, rpc, requests, metadata) == UNAUTHENTICATED, metadata
        listed = invoke(ch, "privface.v1.DetectorService/ListDetectors",
                        detection_pb2.ListDetectorsRequest(), ())
        assert [d.detector_id for d in listed.detectors] == ["tiny"]
        invoke(ch, rpc, requests, (("authorization", f"Bearer {world.vendor_token}"),))


def test_public_rpcs_work_without_credentials(world: World, lenient_server) -> None:
    with channel(lenient_server[0]) as ch:
        registered = invoke(ch, "privface.v1.FamilyService/RegisterFamily",
                            family_pb2.RegisterFamilyRequest(label_key_fingerprint=bytes(16),
                                                             label_ciphertext_dim=50), ())
        assert registered.family_id.startswith("fam_") and registered.access_token
        listed = invoke(ch, "privface.v1.DetectorService/ListDetectors",
                        detection_pb2.ListDetectorsRequest(), ())
        assert [d.detector_id for d in listed.detectors] == ["tiny"]
        # JoinFamily is authenticated by its one-time invitation, not by metadata.
        join = family_pb2.JoinFamilyRequest(family_id=world.a_bundle.family_id,
                                            invite_token="not-an-invitation",
                                            device_id="6f" * 16)
        assert status_of(ch, "privface.v1.FamilyService/JoinFamily", join, ()) \
            == UNAUTHENTICATED
        invite, _ = world.a.create_device_invite()
        other_family = family_pb2.JoinFamilyRequest(family_id=registered.family_id,
                                                    invite_token=invite, device_id="6f" * 16)
        assert status_of(ch, "privface.v1.FamilyService/JoinFamily", other_family, ()) \
            == UNAUTHENTICATED  # A's invitation does not open another family
        join.invite_token = invite
        assert invoke(ch, "privface.v1.FamilyService/JoinFamily", join, ()).access_token


@dataclass
class _Call:
    """What authenticate reads of a call: its invocation metadata."""

    metadata: tuple[tuple[str, str | bytes], ...]

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self.metadata


def _authenticate(store: Store, *metadata: tuple[str, str | bytes]) -> Family:
    return authenticate(store, cast(grpc.ServicerContext, _Call(metadata)))


FAM, AUTH = "x-privface-family", "authorization"


@pytest.mark.parametrize("metadata", [
    (), ((FAM, "fam_x"),), ((AUTH, "Bearer tok"),), ((FAM, "fam_x"), (AUTH, "tok")),
    ((FAM, ""), (AUTH, "Bearer tok")), ((FAM, b"fam_x"), (AUTH, "Bearer tok")),
    ((FAM, "fam_x"), (AUTH, b"Bearer tok")), ((FAM, "fam_x"), (AUTH, "bearer tok")),
], ids=["none", "family-only", "token-only", "no-bearer", "empty-family", "bytes-family",
        "bytes-token", "lowercase-bearer"])
def test_incomplete_credentials_are_missing_credentials(tmp_path: Path, metadata) -> None:
    store = Store(tmp_path / "s")
    with pytest.raises(AuthenticationError, match="missing credentials"):
        _authenticate(store, *metadata)


def test_credentials_name_the_device_and_the_familys_ckks_key(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    family_id, token = store.create_family(b"fp", 5, device_id="d1")
    store.set_ckks_key_id(family_id, b"key-id-8")
    family = _authenticate(store, (FAM, family_id), (AUTH, "Bearer " + token))
    assert (family.family_id, family.label_key_fp, family.label_dim) == (family_id, b"fp", 5)
    assert (family.device_id, family.ckks_key_id) == ("d1", b"key-id-8")
    for wrong in ((FAM, "fam_other"), (AUTH, "Bearer " + token)), (
            (FAM, family_id), (AUTH, "Bearer " + token + "x")):
        with pytest.raises(AuthenticationError, match="unknown family or wrong access token"):
            _authenticate(store, *wrong)


def test_stored_token_hashes_are_the_documented_domain_separated_sha256() -> None:
    """SHA-256("privface/<kind>/v1" || token): what an older server wrote must still match."""
    assert hash_token("tok") == hashlib.sha256(b"privface/token/v1tok").digest()
    assert hash_token("tok", "invite") == hashlib.sha256(b"privface/invite/v1tok").digest()
