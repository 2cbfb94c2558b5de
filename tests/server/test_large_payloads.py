"""Payloads larger than one chunk or one message, in every streaming direction: photo
upload and download, public context upload, detector publishing, gallery replacement,
match results and paged id lists."""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from client.config import ClientConfig
from client.pipeline import faces
from client.pipeline import photos as pipeline
from client.rpc import PrivfaceClient
from common import ckks, labels
from common import secure_cascade as sc
from privface.v1 import detection_pb2, detection_pb2_grpc, photos_pb2, photos_pb2_grpc
from server.app import vendor_token
from server.detection import MAX_CIPHER_DIM, cascade_from_header
from tests.conftest import channel, enroll_embeddings

MIB = 1024 * 1024
SLOW = 300


def test_photo_of_several_chunks_round_trips_byte_for_byte(family, address) -> None:
    """Upload in 1 MiB chunks, download in 1 MiB messages: nothing lost at any boundary."""
    client, bundle = family
    labels_ct = pipeline.encrypt_labels(bundle, [0])
    fp = bundle.label_key.fingerprint()
    for size in (MIB, MIB + 1, 3 * MIB - 1, 3 * MIB + 7):
        blob = np.random.default_rng(size).bytes(size)
        photo_id = hashlib.sha256(blob).hexdigest()[:32]
        assert client.backup_photo(photo_id, blob, labels_ct, fp) is False
        with channel(address) as ch:
            replies = list(photos_pb2_grpc.PhotoServiceStub(ch).FetchPhoto(
                photos_pb2.FetchPhotoRequest(photo_id=photo_id), metadata=client.metadata(),
                timeout=SLOW))
        assert len(replies) == -(-size // MIB)
        assert replies[0].blob_size == size
        assert replies[0].blob_sha256 == hashlib.sha256(blob).digest()
        assert b"".join(r.chunk for r in replies) == blob
        assert client.fetch_photo(photo_id) == blob


def test_large_real_photo_decrypts_to_the_original(family, tmp_path: Path) -> None:
    client, bundle = family
    pixels = np.random.default_rng(4).integers(0, 255, (800, 900, 3), dtype=np.uint8)
    ok, png = cv2.imencode(".png", pixels)
    assert ok and len(png) > 2 * MIB
    data = bytes(png.tobytes())
    receipt = pipeline.backup_photo(client, bundle, data, [0, 1])
    assert pipeline.fetch_photo(client, bundle, receipt.photo_id) == data
    thumb = pipeline.fetch_photo(client, bundle, receipt.photo_id, thumbnail_only=True)
    assert thumb[:2] == b"\xff\xd8" and len(thumb) < len(data)


def test_public_context_in_many_chunks(family, address, client_config: ClientConfig,
                                       server) -> None:
    client, bundle = family
    small_chunks = dataclasses.replace(client_config, chunk_bytes=16 * 1024)
    bundle.ckks_secret = ckks.secret_context_bytes(ckks.create_secret_context())
    secret = faces.secret_context(bundle)
    data = ckks.public_context_bytes(secret)
    assert len(data) > 8 * small_chunks.chunk_bytes
    with PrivfaceClient(address, client.credentials, small_chunks) as chunky:
        size, galois = chunky.upload_public_context(data)
    assert size == len(data) and galois == len(secret.layout.rotation_steps)
    stored = list((server[1].data_dir / "blobs" / bundle.family_id).glob("context-*"))
    assert [p.read_bytes() for p in stored] == [data]
    emb = np.full((1, ckks.DIM), 0.05)
    client.add_gallery_entries(0, 0, 0, 1, ckks.encrypt_entries(secret, emb, 0))
    (match,) = faces.identify(client, bundle, emb)
    assert match.name == bundle.name_of(0) and match.distance < 1e-3


def test_detector_of_several_chunks_evaluates_like_the_local_copy(server, family) -> None:
    """A detector matrix of ~2 MB (two 1 MiB chunks and a bit): the server's decisions on
    encrypted windows equal the ones computed locally on the same matrix, so every byte
    arrived in place."""
    address, config = server
    client, _ = family
    weak, dim = 14, MAX_CIPHER_DIM
    rng = np.random.default_rng(8)
    stages = [detection_pb2.CascadeStage(  # a stage passes when half its scores are >= 0
        weak_count=n, threshold=0.0, left_values=[-1.0] * n, right_values=[1.0] * n)
        for n in (3, 4, 7)]
    matrix = rng.standard_normal((weak, dim)).astype("<f8").tobytes()
    assert len(matrix) > 2 * MIB
    header = detection_pb2.DetectorHeader(
        detector_id="wide", key_version=3, key_fingerprint=b"w" * 16, window_width=24,
        window_height=24, ciphertext_dim=dim, stages=stages, matrix_size=len(matrix),
        matrix_sha256=hashlib.sha256(matrix).digest())
    client.publish_detector(header, matrix, vendor_token(config))
    windows = rng.standard_normal((16, dim))
    expected = sc.evaluate(cascade_from_header(header, matrix), windows,
                           detection_pb2.WINDOW_ENCODING_FLOAT64)
    assert len(set(expected.tolist())) > 1  # the windows do not all end alike

    def requests() -> Iterator[detection_pb2.DetectFacesRequest]:
        yield detection_pb2.DetectFacesRequest(session=detection_pb2.DetectionSession(
            detector_id="wide", key_version=3, key_fingerprint=b"w" * 16))
        for i in range(0, 16, 4):  # several batches in one bidirectional stream
            yield detection_pb2.DetectFacesRequest(batch=detection_pb2.WindowBatch(
                batch_id=i, count=4, windows=windows[i:i + 4].astype("<f8").tobytes(),
                encoding=detection_pb2.WINDOW_ENCODING_FLOAT64))
    with channel(address) as ch:
        replies = list(detection_pb2_grpc.DetectorServiceStub(ch).DetectFaces(
            requests(), metadata=client.metadata(), timeout=SLOW))
    assert [r.batch_id for r in replies] == [0, 4, 8, 12]
    assert np.frombuffer(b"".join(r.outcomes for r in replies), np.uint8).tolist() \
        == expected.tolist()


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.standard_normal((n, ckks.DIM))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_gallery_of_several_blocks_replaced_and_matched(family) -> None:
    """Three blocks enrolled, a member removed, the gallery re-packed into two blocks (a
    header and two block messages); matching streams one result per face and block."""
    client, bundle = family
    faces.ensure_ckks_keys(client, bundle)
    secret = faces.secret_context(bundle)
    per_block = secret.layout.entries_per_block
    rng = np.random.default_rng(21)
    people = {name: _unit(rng, 100) for name in ("Ann", "Ben", "Cat")}
    for name, emb in people.items():
        enroll_embeddings(client, bundle, name, emb)
    assert [len(s) for _, s in sorted(client.gallery_layout().items())] \
        == [per_block, per_block, 300 - 2 * per_block]
    client.remove_gallery_slot(bundle.remove_member("Ben"))
    assert faces.compact(client, bundle) == (300, 200)
    layout = client.gallery_layout()
    assert [len(s) for _, s in sorted(layout.items())] == [per_block, 200 - per_block]
    stored = np.vstack([ckks.decrypt_entries(secret, client.gallery_block(b)[0])
                        for b in sorted(layout)])[:200]
    assert np.allclose(stored, np.vstack([people["Ann"], people["Cat"]]), atol=1e-4)
    probes = np.vstack([people["Ann"][5], people["Ben"][5], people["Cat"][99]])
    replies = client.match_faces([ckks.encrypt_query(secret, p) for p in probes])
    assert sorted((r.face, r.block) for r in replies) == [
        (f, b) for f in range(3) for b in range(2)]
    assert [m.name for m in faces.identify(client, bundle, probes)] == ["Ann", None, "Cat"]


def test_search_and_list_pages(family, address) -> None:
    """More ids than a page: every page arrives, in order, none twice."""
    client, bundle = family
    fp = bundle.label_key.fingerprint()
    ids = []
    for i in range(23):
        blob = f"photo {i}".encode()
        ids.append(hashlib.sha256(blob).hexdigest()[:32])
        client.backup_photo(ids[-1], blob, pipeline.encrypt_labels(bundle, [0]), fp)
    newest_first = ids[::-1]
    query = pipeline.encrypt_query(bundle, [0], labels.MatchMode.ALL)
    with channel(address) as ch:
        stub = photos_pb2_grpc.PhotoServiceStub(ch)
        pages = list(stub.SearchPhotos(photos_pb2.SearchPhotosRequest(
            encrypted_query=query, label_key_fingerprint=fp, page_size=5),
            metadata=client.metadata(), timeout=SLOW))
        assert [len(p.photo_ids) for p in pages] == [5, 5, 5, 5, 3]
        assert {p.total_matches for p in pages} == {23}
        assert [i for p in pages for i in p.photo_ids] == newest_first
        listed = list(stub.ListPhotos(photos_pb2.ListPhotosRequest(page_size=4),
                                      metadata=client.metadata(), timeout=SLOW))
    assert [len(p.photo_ids) for p in listed] == [4] * 5 + [3]
    assert [i for p in listed for i in p.photo_ids] == newest_first
