"""Every input gets a precise status, never INTERNAL: regressions of inputs that once
broke the server (issue 8, part 1), sent over real gRPC."""

from __future__ import annotations

import hashlib
import logging
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import pytest
from tenseal import sealapi

from client.keystore import FamilyBundle
from client.pipeline import faces
from client.pipeline import photos as pipeline
from client.rpc import PrivfaceClient
from common import ckks, errors, labels
from common.errors import MalformedInputError
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
from server.config import ServerConfig
from server.errors import MAX_LOGGED_CHARS, STATUS_OF, grpc_errors, printable
from server.gallery import pack_ciphertexts
from server.storage import Store
from tests.conftest import channel

INVALID = grpc.StatusCode.INVALID_ARGUMENT
EMBEDDING = np.full((1, ckks.DIM), 0.05)
SLOW = 120  # seconds: a deadline for calls that do CKKS work on a busy machine
UNDEFINED: Any = 99  # an enum value the protos do not define (what a raw client can send)


def rpc_error(call, *args, **kwargs) -> grpc.RpcError:
    """The gRPC error ``call`` raises (fails the test if it succeeds); a streamed answer is
    read to its end."""
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, timeout=SLOW, **kwargs)
        if isinstance(result, Iterator):
            list(result)
    return info.value


def with_scale(secret: ckks.SecretContext, wire: bytes, kind: int, index: int,
               scale: float) -> bytes:
    """A wire ciphertext re-serialised with another SEAL scale, header and digest valid."""
    ct = ckks._unwrap(secret, wire, kind, index)
    ct.scale = scale
    return ckks._wrap(secret, kind, index, ckks._save_bytes(ct))


@pytest.fixture
def gallery_family(family) -> tuple[PrivfaceClient, FamilyBundle, ckks.SecretContext]:
    """The family with its CKKS keys on the server and one gallery entry (slot 0)."""
    client, bundle = family
    faces.ensure_ckks_keys(client, bundle)
    secret = faces.secret_context(bundle)
    client.add_gallery_entries(0, 0, 0, 1, ckks.encrypt_entries(secret, EMBEDDING, 0))
    return client, bundle, secret


def match_distance(client: PrivfaceClient, secret: ckks.SecretContext) -> float:
    """The decrypted distance of EMBEDDING to gallery position 0."""
    reply, *_ = list(client.faces.MatchFaces(faces_pb2.MatchFacesRequest(
        faces=[faces_pb2.Ciphertexts(items=ckks.encrypt_query(secret, EMBEDDING[0]))]),
        metadata=client.metadata(), timeout=SLOW))
    return float(ckks.decrypt_distances(secret, reply.distances, 1)[0])


# -- gallery slots ---------------------------------------------------------------------------


def test_gallery_slots_outside_the_family_are_refused(gallery_family, server) -> None:
    """Slots at or above 2^31 were stored, then every gallery response of the family failed
    (responses carry slots as int32). Now the family's slot range bounds them."""
    client, bundle, secret = gallery_family
    md = client.metadata()
    for slot in (2**31, 2**32 - 1, 1024, bundle.label_key.cipher_dim):
        err = rpc_error(client.faces.AddGalleryEntries, faces_pb2.AddGalleryEntriesRequest(
            slot=slot, block=0, first_position=1, count=1,
            ciphertexts=faces_pb2.Ciphertexts(items=ckks.encrypt_entries(secret, EMBEDDING, 1))),
            metadata=md)
        assert err.code() == INVALID and "slot" in (err.details() or "")
    block = client.gallery_block(0)[0]

    def replacement(slots: list[int]) -> Iterator[faces_pb2.ReplaceGalleryRequest]:
        yield faces_pb2.ReplaceGalleryRequest(header=faces_pb2.ReplaceGalleryHeader(
            expected_positions=1, block_count=1))
        yield faces_pb2.ReplaceGalleryRequest(block=faces_pb2.ReplacementBlock(
            ciphertexts=faces_pb2.Ciphertexts(items=block), slots=slots))
    err = rpc_error(client.faces.ReplaceGallery, replacement([2**31]), metadata=md)
    assert err.code() == INVALID
    # Nothing was stored: the layout still answers, matching still works.
    assert client.gallery_layout() == {0: [0]}
    assert match_distance(client, secret) < 1e-3
    # The highest slot the family can have is accepted.
    top = bundle.label_key.cipher_dim // 2 - 2
    assert top >= bundle.capacity - 1
    client.add_gallery_entries(top, 0, 1, 1, ckks.encrypt_entries(secret, EMBEDDING, 1))
    assert client.gallery_layout() == {0: [0, top]}


def test_a_slot_stored_by_an_older_server_shows_as_dead(gallery_family, server) -> None:
    """A position an older server stored with a slot beyond int32 no longer breaks every
    gallery response: it reads as dead (-1)."""
    client, _, secret = gallery_family
    config = server[1]
    family_id = client.credentials.family_id
    cts = ckks.encrypt_entries(secret, EMBEDDING, 0)
    Store(config.data_dir).put_gallery_block(family_id, 1, pack_ciphertexts(cts), 0,
                                             [2**31 + 5])
    restarted, port, _ = create_server(config)  # the same data, a fresh gallery cache
    restarted.start()
    try:
        with PrivfaceClient(f"127.0.0.1:{port}", client.credentials) as again:
            assert again.gallery_layout() == {0: [0], 1: [-1]}
            assert again.gallery_block(1)[1] == [-1]
            assert match_distance(again, secret) < 1e-3
    finally:
        restarted.stop(0).wait()


# -- CKKS scales -----------------------------------------------------------------------------


def test_nan_scale_query_is_invalid_argument(gallery_family) -> None:
    client, _, secret = gallery_family
    query = ckks.encrypt_query(secret, EMBEDDING[0])
    query[0] = with_scale(secret, query[0], ckks.KIND_QUERY, 0, math.nan)
    err = rpc_error(client.faces.MatchFaces, faces_pb2.MatchFacesRequest(
        faces=[faces_pb2.Ciphertexts(items=query)]), metadata=client.metadata())
    assert err.code() == INVALID and "scale" in (err.details() or "")


def test_nan_scale_block_is_refused_and_nothing_is_stored(gallery_family) -> None:
    """Through ReplaceGallery (and a new block of AddGalleryEntries) a NaN-scale block was
    stored and broke every later match of the family."""
    client, _, secret = gallery_family
    md = client.metadata()
    block = ckks.encrypt_entries(secret, EMBEDDING, 0)
    block[2] = with_scale(secret, block[2], ckks.KIND_GALLERY, 2, math.nan)

    def replacement() -> Iterator[faces_pb2.ReplaceGalleryRequest]:
        yield faces_pb2.ReplaceGalleryRequest(header=faces_pb2.ReplaceGalleryHeader(
            expected_positions=1, block_count=1))
        yield faces_pb2.ReplaceGalleryRequest(block=faces_pb2.ReplacementBlock(
            ciphertexts=faces_pb2.Ciphertexts(items=block), slots=[0]))
    assert rpc_error(client.faces.ReplaceGallery, replacement(), metadata=md).code() == INVALID
    per_block = secret.layout.entries_per_block
    new_block = ckks.encrypt_entries(secret, EMBEDDING, per_block)
    new_block[0] = with_scale(secret, new_block[0], ckks.KIND_GALLERY, 0, math.nan)
    err = rpc_error(client.faces.AddGalleryEntries, faces_pb2.AddGalleryEntriesRequest(
        slot=1, block=1, first_position=0, count=1,
        ciphertexts=faces_pb2.Ciphertexts(items=new_block)), metadata=md)
    assert err.code() == INVALID
    assert client.gallery_layout() == {0: [0]}
    assert match_distance(client, secret) < 1e-3


def test_stored_block_sent_back_as_a_query_is_invalid_argument(gallery_family) -> None:
    """The block GetGalleryBlock returns, re-labelled as a query: every difference is zero
    and SEAL threw a RuntimeError (a transparent ciphertext), which became INTERNAL."""
    client, _, secret = gallery_family
    block = client.gallery_block(0)[0]
    forged = [ckks._wrap(secret, ckks.KIND_QUERY, c, x[ckks._HEADER.size:])
              for c, x in enumerate(block)]
    err = rpc_error(client.faces.MatchFaces, faces_pb2.MatchFacesRequest(
        faces=[faces_pb2.Ciphertexts(items=forged)]), metadata=client.metadata())
    assert err.code() == INVALID and "transparent" in (err.details() or "")
    assert match_distance(client, secret) < 1e-3


def test_entries_that_cancel_the_stored_block_are_invalid_argument(gallery_family) -> None:
    """New entries equal to the stored block negated: the homomorphic sum is all zero and
    SEAL threw (INTERNAL); nothing is stored now."""
    client, _, secret = gallery_family
    negated = []
    for c, wire in enumerate(client.gallery_block(0)[0]):
        ct = ckks._unwrap(secret, wire, ckks.KIND_GALLERY, c)
        out = sealapi.Ciphertext()
        secret._evaluator.negate(ct, out)
        negated.append(ckks._wrap(secret, ckks.KIND_GALLERY, c, ckks._save_bytes(out)))
    err = rpc_error(client.faces.AddGalleryEntries, faces_pb2.AddGalleryEntriesRequest(
        slot=1, block=0, first_position=1, count=1,
        ciphertexts=faces_pb2.Ciphertexts(items=negated)), metadata=client.metadata())
    assert err.code() == INVALID
    assert client.gallery_layout() == {0: [0]}
    assert match_distance(client, secret) < 1e-3


def test_match_after_another_server_grew_the_gallery(gallery_family, server) -> None:
    """A server that cached the family's gallery, then another server on the same data
    (or a re-pack racing the match) stored more blocks: the match read a block its cache
    did not have (IndexError, INTERNAL). Now that block is prepared from the store."""
    client, _, secret = gallery_family
    assert match_distance(client, secret) < 1e-3  # this server caches one block
    per_block = secret.layout.entries_per_block
    other, port, _ = create_server(server[1])
    other.start()
    try:
        with PrivfaceClient(f"127.0.0.1:{port}", client.credentials) as elsewhere:
            far = np.full((1, ckks.DIM), -0.05)
            blocks = [(ckks.encrypt_entries(secret, EMBEDDING, 0), [0]),
                      (ckks.encrypt_entries(secret, far, per_block), [1])]
            assert elsewhere.replace_gallery(1, blocks) == 2
    finally:
        other.stop(0).wait()
    replies = client.match_faces([ckks.encrypt_query(secret, EMBEDDING[0])])
    assert sorted(r.block for r in replies) == [0, 1]
    by_block = {r.block: ckks.decrypt_distances(secret, r.ciphertext, 1)[0] for r in replies}
    assert by_block[0] < 1e-3 and abs(by_block[1] - np.linalg.norm(EMBEDDING - far)) < 1e-3


# -- detectors -------------------------------------------------------------------------------


def detector(detector_id: str = "tiny", dim: int = 4, prefix_stages: int = 0,
             prefix_dim: int = 0) -> tuple[detection_pb2.DetectorHeader, bytes]:
    """A two-stage detector of one weak classifier each over ``dim``-value ciphertexts."""
    stages = [detection_pb2.CascadeStage(weak_count=1, threshold=0.5, left_values=[0.0],
                                         right_values=[1.0]) for _ in range(2)]
    prefix = prefix_stages * prefix_dim * 8
    matrix = np.random.default_rng(0).standard_normal((2 * dim * 8 + prefix) // 8).tobytes()
    return detection_pb2.DetectorHeader(
        detector_id=detector_id, key_version=1, key_fingerprint=b"f" * 16, window_width=20,
        window_height=20, ciphertext_dim=dim, stages=stages, matrix_size=len(matrix),
        matrix_sha256=hashlib.sha256(matrix).digest(), prefix_stages=prefix_stages,
        prefix_ciphertext_dim=prefix_dim, prefix_matrix_size=prefix), matrix


def publish(stub, config: ServerConfig, header: detection_pb2.DetectorHeader,
            matrix: bytes) -> detection_pb2.PublishDetectorResponse:
    def requests() -> Iterator[detection_pb2.PublishDetectorRequest]:
        yield detection_pb2.PublishDetectorRequest(header=header)
        if matrix:
            yield detection_pb2.PublishDetectorRequest(chunk=matrix)
    return stub.PublishDetector(requests(), timeout=SLOW, metadata=(
        ("authorization", f"Bearer {vendor_token(config)}"),))


def detect(stub, md, header: detection_pb2.DetectorHeader, batch: detection_pb2.WindowBatch,
           timeout: float = SLOW) -> list[detection_pb2.DetectFacesResponse]:
    def requests() -> Iterator[detection_pb2.DetectFacesRequest]:
        yield detection_pb2.DetectFacesRequest(session=detection_pb2.DetectionSession(
            detector_id=header.detector_id, key_version=header.key_version,
            key_fingerprint=header.key_fingerprint))
        yield detection_pb2.DetectFacesRequest(batch=batch)
    return list(stub.DetectFaces(requests(), metadata=md, timeout=timeout))


def one_window(dim: int, kind: Any = detection_pb2.WINDOW_KIND_FULL
               ) -> detection_pb2.WindowBatch:
    return detection_pb2.WindowBatch(batch_id=7, count=1, windows=np.ones(dim).tobytes(),
                                     encoding=detection_pb2.WINDOW_ENCODING_FLOAT64, kind=kind)


def _zero_prefix_dim() -> tuple[detection_pb2.DetectorHeader, bytes]:
    return detector("zero-prefix-dim", prefix_stages=1, prefix_dim=0)


def _nan_threshold() -> tuple[detection_pb2.DetectorHeader, bytes]:
    header, matrix = detector("nan-threshold")
    header.stages[1].threshold = math.nan
    return header, matrix


def _infinite_leaf() -> tuple[detection_pb2.DetectorHeader, bytes]:
    header, matrix = detector("inf-leaf")
    header.stages[0].left_values[0] = math.inf
    return header, matrix


def _empty_stage() -> tuple[detection_pb2.DetectorHeader, bytes]:
    header, matrix = detector("empty-stage")
    header.stages.append(detection_pb2.CascadeStage(weak_count=0, threshold=0.0))
    return header, matrix


def _prefix_dim_without_stages() -> tuple[detection_pb2.DetectorHeader, bytes]:
    header, matrix = detector("prefix-dim-only")
    header.prefix_ciphertext_dim = 3
    return header, matrix


def _window(width: int) -> tuple[detection_pb2.DetectorHeader, bytes]:
    header, matrix = detector("window")
    header.window_width = width
    return header, matrix


BAD_DETECTORS = {
    "prefix stages, zero prefix dim": _zero_prefix_dim,
    "NaN stage threshold": _nan_threshold,
    "infinite leaf value": _infinite_leaf,
    "stage without weak classifiers": _empty_stage,
    "prefix dim without prefix stages": _prefix_dim_without_stages,
    "zero window width": lambda: _window(0),
    "huge window width": lambda: _window(2**31),
    "newline in the id": lambda: detector("tiny\n"),
    "slash in the id": lambda: detector("../tiny"),
    "empty id": lambda: detector(""),
}


@pytest.mark.parametrize("case", BAD_DETECTORS)
def test_malformed_detector_headers_are_refused_at_publish(server, family, case: str) -> None:
    """A detector with prefix stages but a zero prefix dimension was stored, then every
    DetectFaces on it failed with INTERNAL: the whole header is checked at publish."""
    address, config = server
    client, _ = family
    with channel(address) as ch:
        stub = detection_pb2_grpc.DetectorServiceStub(ch)
        header, matrix = BAD_DETECTORS[case]()
        with pytest.raises(grpc.RpcError) as info:
            publish(stub, config, header, matrix)
        assert info.value.code() == INVALID, info.value.details()
        assert stub.ListDetectors(detection_pb2.ListDetectorsRequest(),
                                  timeout=10).detectors == []
        # A sound detector of the same shape publishes and evaluates.
        good, matrix = detector()
        publish(stub, config, good, matrix)
        (reply,) = detect(stub, client.metadata(), good, one_window(4))
        assert reply.batch_id == 7 and len(reply.outcomes) == 1


def test_a_stored_unusable_detector_is_failed_precondition(server, family) -> None:
    """A detector stored before the header checks were complete is refused with a message
    that says what to do, not INTERNAL."""
    address, config = server
    client, _ = family
    header, matrix = _zero_prefix_dim()
    Store(config.data_dir).put_detector(header.detector_id, 1, header.key_fingerprint,
                                        header.SerializeToString(), [matrix])
    with channel(address) as ch:
        stub = detection_pb2_grpc.DetectorServiceStub(ch)
        err = rpc_error(detect, stub, client.metadata(), header, one_window(4))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "publish it again" in (err.details() or "")


def test_unknown_window_kind_is_invalid_argument(server, family) -> None:
    address, config = server
    client, _ = family
    with channel(address) as ch:
        stub = detection_pb2_grpc.DetectorServiceStub(ch)
        header, matrix = detector()
        publish(stub, config, header, matrix)
        err = rpc_error(detect, stub, client.metadata(), header, one_window(4, kind=UNDEFINED))
    assert err.code() == INVALID and "window kind" in (err.details() or "")


# -- bytes that are not protobuf -------------------------------------------------------------

NOT_PROTOBUF = [
    b"\xff\xff\xff\xff",  # an invalid tag
    b"\x0a\x05abc",  # a length running past the end
]
# Invalid UTF-8 in field 1: undecodable where field 1 is a string, an unknown field (so a
# valid message) where it is not.
BAD_UTF8 = b"\x0a\x02\xff\xfe"

SERVICES = {
    family_pb2.DESCRIPTOR.services_by_name["FamilyService"]: family_pb2,
    photos_pb2.DESCRIPTOR.services_by_name["PhotoService"]: photos_pb2,
    faces_pb2.DESCRIPTOR.services_by_name["FaceService"]: faces_pb2,
    detection_pb2.DESCRIPTOR.services_by_name["DetectorService"]: detection_pb2,
}
METHODS = [(service.full_name, method) for service in SERVICES for method in service.methods]


def raw_call(ch: grpc.Channel, path: str, client_streaming: bool, server_streaming: bool,
             messages: list[bytes], metadata=()) -> None:
    """Sends raw bytes (identity serializers) and reads the whole answer."""
    if client_streaming and server_streaming:
        list(ch.stream_stream(path, None, None)(iter(messages), timeout=30, metadata=metadata))
    elif client_streaming:
        ch.stream_unary(path, None, None)(iter(messages), timeout=30, metadata=metadata)
    elif server_streaming:
        list(ch.unary_stream(path, None, None)(messages[0], timeout=30, metadata=metadata))
    else:
        ch.unary_unary(path, None, None)(messages[0], timeout=30, metadata=metadata)


def test_undecodable_requests_are_invalid_argument_in_one_log_line(server, family,
                                                                   caplog) -> None:
    """Garbage request bytes got INTERNAL and a multi-line traceback from grpcio, without
    any credentials. Every method of every service (plus health checking) now answers
    INVALID_ARGUMENT and logs one line without a traceback. (Without credentials, a
    client-streaming method may answer UNAUTHENTICATED first: it checks them before
    reading its first message.)"""
    address, config = server
    client, _ = family
    caplog.set_level(logging.INFO)
    assert len(METHODS) >= 20
    invalid = 0
    vendor = (("authorization", f"Bearer {vendor_token(config)}"),)
    with channel(address) as ch:
        for service, method in METHODS:
            path = f"/{service}/{method.name}"
            own = vendor if method.name == "PublishDetector" else client.metadata()
            for metadata in ((), own):
                try:
                    raw_call(ch, path, method.client_streaming, method.server_streaming,
                             [BAD_UTF8], metadata)
                except grpc.RpcError as exc:
                    assert exc.code() not in (grpc.StatusCode.INTERNAL,
                                              grpc.StatusCode.UNKNOWN), path
                    invalid += "not a valid protobuf" in (exc.details() or "")
                for garbage in NOT_PROTOBUF:
                    with pytest.raises(grpc.RpcError) as info:
                        raw_call(ch, path, method.client_streaming, method.server_streaming,
                                 [garbage], metadata)
                    code = info.value.code()
                    allowed = {INVALID}
                    if method.client_streaming and not metadata:
                        allowed.add(grpc.StatusCode.UNAUTHENTICATED)
                    assert code in allowed, (path, metadata, info.value.details())
                    if code == INVALID:
                        invalid += 1
                        assert "not a valid protobuf" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            ch.unary_unary("/grpc.health.v1.Health/Check", None, None)(NOT_PROTOBUF[0], timeout=30)
        assert info.value.code() == INVALID
        invalid += 1
    assert invalid >= 2 * len(METHODS) * len(NOT_PROTOBUF) * 3 // 4
    refusals = [r for r in caplog.records if "not a valid protobuf" in r.getMessage()]
    assert len(refusals) == invalid
    for record in caplog.records:
        assert record.exc_info is None and record.levelno < logging.ERROR, record.getMessage()
        assert "\n" not in record.getMessage()


def test_undecodable_message_after_a_valid_header_is_invalid_argument(family, server) -> None:
    """Inside an authenticated upload: the header is fine, a later chunk is not protobuf.
    Nothing is stored."""
    client, bundle = family
    blob = b"x" * 100
    header = photos_pb2.BackupPhotoRequest(header=photos_pb2.PhotoHeader(
        photo_id="ab" * 16, blob_size=len(blob), blob_sha256=hashlib.sha256(blob).digest(),
        encrypted_labels=pipeline.encrypt_labels(bundle, [0]),
        label_key_fingerprint=bundle.label_key.fingerprint()))
    with channel(server[0]) as ch:
        for path, first in [("/privface.v1.PhotoService/BackupPhoto", header.SerializeToString()),
                            ("/privface.v1.FamilyService/UploadPublicContext",
                             family_pb2.UploadPublicContextRequest(
                                 total_size=10, chunk=b"01234").SerializeToString())]:
            with pytest.raises(grpc.RpcError) as info:
                ch.stream_unary(path, None, None)(iter([first, NOT_PROTOBUF[0]]), timeout=30,
                                      metadata=client.metadata())
            assert info.value.code() == INVALID, info.value.details()
    assert client.list_photos() == []
    assert not client.get_family().has_public_context
    blobs = [p for p in (server[1].data_dir / "blobs").rglob("*") if p.is_file()]
    assert blobs == []


# -- ids, names and log lines ----------------------------------------------------------------


def test_photo_id_with_a_trailing_newline_is_refused(family, server) -> None:
    """`re.match` with `$` accepted "<32 hex>\\n" as a distinct id: a newline in a file name
    and in log lines."""
    client, bundle = family
    fp = bundle.label_key.fingerprint()
    good = "ab" * 16
    for photo_id in (good + "\n", "\n" + good, good + "\r", good.upper(), good[:-1]):
        with pytest.raises(MalformedInputError, match="32 lowercase hex"):
            client.backup_photo(photo_id, b"blob", pipeline.encrypt_labels(bundle, [0]), fp)
        with pytest.raises(MalformedInputError, match="32 lowercase hex"):
            client.fetch_photo(photo_id)
        with pytest.raises(MalformedInputError, match="32 lowercase hex"):
            client.delete_photo(photo_id)
    assert client.list_photos() == []
    names = [p.name for p in Path(server[1].data_dir).rglob("*")]
    assert not any("\n" in n or "\r" in n for n in names)


def test_client_strings_never_break_a_log_line(family, server, caplog) -> None:
    caplog.set_level(logging.INFO)
    client, _ = family
    md = client.metadata()
    forged = "x\n2030-01-01 00:00:00 INFO server: forged line \x1b[2J"
    with channel(server[0]) as ch:
        for call, request in [
                (detection_pb2_grpc.DetectorServiceStub(ch).DetectFaces,
                 iter([detection_pb2.DetectFacesRequest(
                     session=detection_pb2.DetectionSession(detector_id=forged))])),
                (family_pb2_grpc.FamilyServiceStub(ch).GetSealedItem,
                 family_pb2.GetSealedItemRequest(name=forged)),
                (family_pb2_grpc.FamilyServiceStub(ch).JoinFamily,
                 family_pb2.JoinFamilyRequest(family_id=forged, invite_token=forged,
                                              device_id=forged)),
                (family_pb2_grpc.FamilyServiceStub(ch).RevokeDevice,
                 family_pb2.RevokeDeviceRequest(device_id=forged)),
                (photos_pb2_grpc.PhotoServiceStub(ch).FetchPhoto,
                 photos_pb2.FetchPhotoRequest(photo_id=forged))]:
            rpc_error(call, request, metadata=md)
    assert caplog.records
    for record in caplog.records:
        message = record.getMessage()
        assert "\n" not in message and "\x1b" not in message, message
    assert printable(forged) == ("x\\n2030-01-01 00:00:00 INFO server: forged line \\x1b[2J")
    assert printable("é ok") == "é ok"
    assert printable("y" * 1000).endswith("y...") and len(printable("y" * 1000)) < 600


# -- float fields ------------------------------------------------------------------------------

NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_label_vectors_and_queries_are_invalid_argument(family, value) -> None:
    client, bundle = family
    fp = bundle.label_key.fingerprint()
    good = np.frombuffer(pipeline.encrypt_labels(bundle, [0]), "<f8").copy()
    good[3] = value
    with pytest.raises(MalformedInputError, match="finite"):
        client.backup_photo("cd" * 16, b"blob", good.tobytes(), fp)
    query = np.frombuffer(pipeline.encrypt_query(bundle, [0], labels.MatchMode.ALL),
                          "<f8").copy()
    query[-1] = value
    with pytest.raises(MalformedInputError, match="NaN or infinity"):
        client.search_photos(query.tobytes(), fp)
    assert client.list_photos() == []


@pytest.mark.parametrize("value", NON_FINITE)
def test_non_finite_windows_are_invalid_argument(server, family, value) -> None:
    address, config = server
    client, _ = family
    with channel(address) as ch:
        stub = detection_pb2_grpc.DetectorServiceStub(ch)
        header, matrix = detector()
        publish(stub, config, header, matrix)
        batch = one_window(4)
        batch.windows = struct.pack("<4d", 1.0, value, 1.0, 1.0)
        err = rpc_error(detect, stub, client.metadata(), header, batch)
    assert err.code() == INVALID and "NaN or infinity" in (err.details() or "")


def test_empty_and_extreme_requests_never_internal(family, gallery_family_stubs) -> None:
    """Empty requests and extreme numbers on every unary or server-streaming call of an
    enrolled family: a precise status (or success), never INTERNAL or UNKNOWN."""
    client, _ = family
    md = client.metadata()
    fam, photos, faces_stub = gallery_family_stubs
    calls = [
        (fam.GetFamily, family_pb2.GetFamilyRequest()),
        (fam.GetSealedItem, family_pb2.GetSealedItemRequest()),
        (fam.PutSealedItem, family_pb2.PutSealedItemRequest(name="z", expected_version=2**63)),
        (fam.CreateDeviceInvite, family_pb2.CreateDeviceInviteRequest(ttl_seconds=2**32 - 1)),
        (fam.ListDevices, family_pb2.ListDevicesRequest()),
        (fam.RevokeDevice, family_pb2.RevokeDeviceRequest()),
        (photos.SearchPhotos, photos_pb2.SearchPhotosRequest()),
        (photos.SearchPhotos, photos_pb2.SearchPhotosRequest(mode=UNDEFINED, top_n=2**32 - 1,
                                                             page_size=2**32 - 1)),
        (photos.FetchPhoto, photos_pb2.FetchPhotoRequest()),
        (photos.DeletePhoto, photos_pb2.DeletePhotoRequest()),
        (photos.ListPhotos, photos_pb2.ListPhotosRequest(page_size=2**32 - 1)),
        (faces_stub.AddGalleryEntries, faces_pb2.AddGalleryEntriesRequest()),
        (faces_stub.AddGalleryEntries, faces_pb2.AddGalleryEntriesRequest(
            slot=2**32 - 1, block=2**32 - 1, first_position=2**32 - 1, count=2**32 - 1)),
        (faces_stub.RemoveGallerySlot, faces_pb2.RemoveGallerySlotRequest(slot=2**32 - 1)),
        (faces_stub.GetGalleryLayout, faces_pb2.GetGalleryLayoutRequest()),
        (faces_stub.GetGalleryBlock, faces_pb2.GetGalleryBlockRequest(block=2**32 - 1)),
        (faces_stub.MatchFaces, faces_pb2.MatchFacesRequest()),
        (faces_stub.MatchFaces, faces_pb2.MatchFacesRequest(faces=[faces_pb2.Ciphertexts(
            items=[b""] * 8)])),
    ]
    for call, request in calls:
        try:
            result = call(request, metadata=md, timeout=SLOW)
            if isinstance(result, Iterator):
                list(result)
        except grpc.RpcError as exc:
            assert exc.code() not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN), \
                (call, request, exc.details())


@pytest.fixture
def gallery_family_stubs(gallery_family, address):
    """Raw stubs of the three family services, for the enrolled family."""
    with channel(address) as ch:
        yield (family_pb2_grpc.FamilyServiceStub(ch), photos_pb2_grpc.PhotoServiceStub(ch),
               faces_pb2_grpc.FaceServiceStub(ch))


class _Aborted(Exception):
    pass


class _Context:
    """What grpc_errors uses of a servicer context: abort (which raises) and is_active."""

    def __init__(self) -> None:
        self.aborted: tuple[grpc.StatusCode, str] | None = None

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.aborted = (code, details)
        raise _Aborted

    def is_active(self) -> bool:
        return True


def _status(call: str, exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    class Servicer:  # decorated here, not at import: the decorator is under test too
        @grpc_errors
        def Unary(self, request: Exception, context: grpc.ServicerContext) -> None:
            raise request

        @grpc_errors
        def Stream(self, request: Exception, context: grpc.ServicerContext) -> Iterator[int]:
            yield 1
            raise request

    context = _Context()
    with pytest.raises(_Aborted):
        if call == "unary":
            Servicer().Unary(exc, cast(grpc.ServicerContext, context))
        else:
            assert list(Servicer().Stream(exc, cast(grpc.ServicerContext, context))) == [1]
    return context.aborted


@pytest.mark.parametrize("call", ["unary", "stream"])
def test_domain_errors_map_to_statuses_in_unary_and_streaming_methods(call: str) -> None:
    """In unary and streaming methods alike (an error raised while a stream is being
    consumed too): each domain error its status with its message; any other exception
    INTERNAL with a fixed message that leaks nothing of it."""
    for cls, code in STATUS_OF:
        assert _status(call, cls("what went wrong")) == (code, "what went wrong"), cls
    assert _status(call, errors.PermissionDeniedError("revoked"))[0] is (  # type: ignore[index]
        grpc.StatusCode.PERMISSION_DENIED)  # not its base class's UNAUTHENTICATED
    assert _status(call, RuntimeError("/srv/secret/path")) == (
        grpc.StatusCode.INTERNAL, "internal server error; the server log has details")


def test_logged_client_strings_are_escaped_and_cut() -> None:
    assert printable("a\nforged line\r\x1b[31m") == "a\\nforged line\\r\\x1b[31m"
    assert printable("x" * MAX_LOGGED_CHARS) == "x" * MAX_LOGGED_CHARS
    assert printable("x" * (MAX_LOGGED_CHARS + 1)) == "x" * MAX_LOGGED_CHARS + "..."
