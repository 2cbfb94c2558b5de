"""Bounded resources through a real server: a few clients cannot stop it for everyone.

Idle streams (more than the worker threads, from one family and from several) leave
health and short calls answering; idle and stalled streams are ended; a cancelled
MatchFaces or DetectFaces stops evaluating; quotas and per-address rate limits answer
RESOURCE_EXHAUSTED saying which limit, the current value and what to do. Limits are set
small per test through ServerConfig; no assertion depends on tight timing.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.pipeline import faces
from client.rpc import PrivfaceClient
from common import ckks, secure_cascade
from common.errors import LimitExceededError
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
from tests.conftest import enroll_embeddings

Metadata = tuple[tuple[str, str], ...]
LABEL_DIM = 50
FINGERPRINT = bytes(16)
MIB = 1024 * 1024
PATIENCE = 15.0  # seconds a test waits for something that should take well under one


@pytest.fixture
def server_config(server_config: ServerConfig, request: pytest.FixtureRequest) -> ServerConfig:
    """conftest's config, with overrides from indirect parametrisation if any."""
    return replace(server_config, **getattr(request, "param", {}))


def wait_until(predicate: Callable[[], bool], what: str, seconds: float = PATIENCE) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


@contextmanager
def running(config: ServerConfig) -> Iterator[tuple[PrivfaceClient, ServerConfig]]:
    """A server for ``config``; yields a credential-less client (for its channel)."""
    srv, port, _health = create_server(config)
    srv.start()
    try:
        with PrivfaceClient(f"127.0.0.1:{port}") as client:
            yield client, config
    finally:
        srv.stop(0).wait()


class Stubs:
    """Raw stubs on one channel."""

    def __init__(self, client: PrivfaceClient) -> None:
        self.family = family_pb2_grpc.FamilyServiceStub(client.channel)
        self.photos = photos_pb2_grpc.PhotoServiceStub(client.channel)
        self.faces = faces_pb2_grpc.FaceServiceStub(client.channel)
        self.detector = detection_pb2_grpc.DetectorServiceStub(client.channel)
        self.health = health_pb2_grpc.HealthStub(client.channel)

    def register(self) -> Metadata:
        r = self.family.RegisterFamily(family_pb2.RegisterFamilyRequest(
            label_key_fingerprint=FINGERPRINT, label_ciphertext_dim=LABEL_DIM), timeout=10)
        return (("x-privface-family", r.family_id), ("authorization", f"Bearer {r.access_token}"))

    def backup(self, md: Metadata, blob: bytes, photo_id: str | None = None,
               timeout: float = 30) -> photos_pb2.BackupPhotoResponse:
        return self.photos.BackupPhoto(iter(backup_requests(blob, photo_id)), metadata=md,
                                       timeout=timeout)

    def healthy(self) -> bool:
        return self.health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
            health_pb2.HealthCheckResponse.SERVING

    def search(self, md: Metadata) -> list[photos_pb2.SearchPhotosResponse]:
        return list(self.photos.SearchPhotos(photos_pb2.SearchPhotosRequest(
            encrypted_query=np.ones(LABEL_DIM).tobytes(), label_key_fingerprint=FINGERPRINT),
            metadata=md, timeout=5))

    def photo_ids(self, md: Metadata) -> list[str]:
        return [i for page in self.photos.ListPhotos(photos_pb2.ListPhotosRequest(),
                                                     metadata=md, timeout=5)
                for i in page.photo_ids]


def backup_requests(blob: bytes, photo_id: str | None = None
                    ) -> list[photos_pb2.BackupPhotoRequest]:
    """A raw upload: the server checks sizes, hashes and label shapes, never contents."""
    header = photos_pb2.PhotoHeader(
        photo_id=photo_id or hashlib.sha256(blob).hexdigest()[:32], blob_size=len(blob),
        blob_sha256=hashlib.sha256(blob).digest(),
        encrypted_labels=np.ones(LABEL_DIM).tobytes(), label_key_fingerprint=FINGERPRINT)
    return [photos_pb2.BackupPhotoRequest(header=header)] + [
        photos_pb2.BackupPhotoRequest(chunk=blob[i:i + MIB]) for i in range(0, len(blob), MIB)]


class HeldStream:
    """A client stream that sends only what the test gives it: idle until then."""

    def __init__(self, method: Any, md: Metadata) -> None:
        self._requests: queue.Queue[Any] = queue.Queue()
        self.call = method.future(iter(self._requests.get, None), metadata=md, timeout=60)

    def send(self, message: Any) -> None:
        self._requests.put(message)

    def end(self) -> None:
        self._requests.put(None)

    def done(self) -> bool:
        return bool(self.call.done())

    def status(self) -> tuple[grpc.StatusCode, str]:
        return self.call.code(), self.call.details() or ""


def refused_code(call: Callable[[], Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if isinstance(result, Iterator):
            list(result)
    return info.value.code(), info.value.details() or ""


def status_of(call: Callable[[], Any]) -> grpc.StatusCode:
    """The status a call ends with (OK if it succeeds)."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


# -- idle streams cannot take the server down ----------------------------------------------


def test_idle_streams_leave_health_and_short_calls_answering(server_config) -> None:
    """17 idle uploads on a 6-worker server: 4 hold stream slots, the others are refused,
    and health, search, list and family summaries still answer within 5 s."""
    config = replace(server_config, workers=6, max_streams=4, max_family_streams=2,
                     max_public_streams=1, stream_idle_seconds=60, max_calls_per_address=64)
    with running(config) as (client, _):
        stubs = Stubs(client)
        mum = stubs.register()
        others = [stubs.register() for _ in range(3)]
        stored = stubs.backup(mum, b"an encrypted photo").photo_id

        # One family opens 8 idle uploads: 2 are admitted (its limit), 6 refused at once.
        own = [HeldStream(stubs.photos.BackupPhoto, mum) for _ in range(8)]
        wait_until(lambda: sum(s.done() for s in own) == 6, "6 of one family's 8 are refused")
        for s in (s for s in own if s.done()):
            code, details = s.status()
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "for this family" in details and "2 allowed" in details
        # Three other families open 9 more: the server-wide cap (4) admits only 2 of them.
        theirs = [HeldStream(stubs.photos.BackupPhoto, md) for md in others for _ in range(3)]
        wait_until(lambda: sum(s.done() for s in theirs) == 7, "7 of the other 9 are refused")
        statuses = [s.status() for s in theirs if s.done()]
        assert {code for code, _ in statuses} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert any("server is busy" in d and "limit 4" in d for _, d in statuses)
        held = [s for s in own + theirs if not s.done()]
        assert len(held) == 4 and len(own) + len(theirs) > config.workers

        # Short calls answer while the 4 idle streams hold their workers.
        for _ in range(10):
            assert stubs.healthy()
        assert stubs.photo_ids(mum) == [stored]
        assert stubs.search(mum)[0].total_matches == 1
        assert stubs.search(others[2])[0].total_matches == 0
        assert stubs.family.GetFamily(family_pb2.GetFamilyRequest(), metadata=others[2],
                                      timeout=5).photo_count == 0
        assert not any(s.done() for s in held)  # they really were still held

        for s in held:  # ending the streams frees the slots
            s.end()
        wait_until(lambda: all(s.done() for s in held), "the held streams end")
        assert all(s.status()[0] is grpc.StatusCode.INVALID_ARGUMENT for s in held)
        assert not stubs.backup(mum, b"another photo").already_stored


def test_unauthenticated_streams_are_refused_before_the_body(server_config) -> None:
    config = replace(server_config, workers=6, max_streams=2, max_family_streams=1,
                     max_public_streams=1, max_calls_per_address=64)
    with running(config) as (client, _):
        stubs = Stubs(client)
        mum = stubs.register()
        wrong = (mum[0], ("authorization", "Bearer not-the-token"))
        streams = [HeldStream(stubs.photos.BackupPhoto, wrong) for _ in range(10)]
        wait_until(lambda: all(s.done() for s in streams), "every unauthenticated stream ends")
        assert {s.status()[0] for s in streams} == {grpc.StatusCode.UNAUTHENTICATED}
        assert not stubs.backup(mum, b"a photo").already_stored  # no slot was taken
        for s in streams:
            s.end()


def test_every_long_call_takes_a_family_stream_slot(server_config) -> None:
    config = replace(server_config, max_family_streams=1)
    with running(config) as (client, _):
        stubs = Stubs(client)
        mum = stubs.register()
        holder = HeldStream(stubs.photos.BackupPhoto, mum)
        wait_until(lambda: status_of(lambda: stubs.backup(mum, b"x", photo_id="1" * 32))
                   is grpc.StatusCode.RESOURCE_EXHAUSTED, "the idle upload holds the slot")
        long_calls = {
            "UploadPublicContext": lambda: stubs.family.UploadPublicContext(iter(
                [family_pb2.UploadPublicContextRequest(total_size=1, chunk=b"x")]),
                metadata=mum, timeout=5),
            "ReplaceGallery": lambda: stubs.faces.ReplaceGallery(iter(
                [faces_pb2.ReplaceGalleryRequest(header=faces_pb2.ReplaceGalleryHeader())]),
                metadata=mum, timeout=5),
            "MatchFaces": lambda: stubs.faces.MatchFaces(faces_pb2.MatchFacesRequest(),
                                                         metadata=mum, timeout=5),
            "FetchPhoto": lambda: stubs.photos.FetchPhoto(
                photos_pb2.FetchPhotoRequest(photo_id="0" * 32), metadata=mum, timeout=5),
            "DetectFaces": lambda: stubs.detector.DetectFaces(iter(
                [detection_pb2.DetectFacesRequest(session=detection_pb2.DetectionSession())]),
                metadata=mum, timeout=5),
        }
        for name, call in long_calls.items():
            code, details = refused_code(call)
            assert code is grpc.StatusCode.RESOURCE_EXHAUSTED, (name, code, details)
            assert "for this family" in details, name
        assert stubs.healthy() and stubs.photo_ids(mum) in ([], ["1" * 32]) and stubs.search(mum)
        other = stubs.register()  # another family is not affected
        assert not stubs.backup(other, b"x").already_stored
        holder.end()


def test_unary_calls_without_their_message_cannot_pin_the_workers(server_config, caplog
                                                                  ) -> None:
    """A client that opens unary calls and never sends the request (a raw client can) holds
    at most its address's share of the workers, and only until the stall timeout."""
    caplog.set_level(logging.WARNING, logger="server.admission")
    config = replace(server_config, host="[::]", workers=6, max_streams=2,
                     max_public_streams=1, max_calls_per_address=3, stream_idle_seconds=1.0)
    srv, port, _health = create_server(config)  # on IPv6 and IPv4: two peer addresses
    srv.start()
    try:
        with PrivfaceClient(f"127.0.0.1:{port}") as attacker, \
                PrivfaceClient(f"[::1]:{port}") as phone:
            get_family = attacker.channel.stream_unary(
                "/privface.v1.FamilyService/GetFamily", request_serializer=None,
                response_deserializer=None)
            silent = [queue.Queue[Any]() for _ in range(10)]
            calls = [get_family.future(iter(q.get, None), timeout=60) for q in silent]
            wait_until(lambda: sum(c.done() for c in calls) == 7,
                       "7 of the 10 silent calls are refused")
            refused = [c for c in calls if c.done()]
            assert {c.code() for c in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert all("too many calls at once from" in c.details() and "3 allowed"
                       in c.details() for c in refused)
            # Another address is served meanwhile: health, registration, a family call.
            stubs = Stubs(phone)
            assert stubs.healthy()
            assert stubs.photo_ids(stubs.register()) == []
            wait_until(lambda: all(c.done() for c in calls), "the silent calls are cancelled")
            assert {c.code() for c in calls if c not in refused} == {grpc.StatusCode.CANCELLED}
            assert "no request message arrived for 1 s" in caplog.text
            assert Stubs(attacker).healthy()  # the address got its slots back
            for q in silent:
                q.put(None)
    finally:
        srv.stop(0).wait()


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "privface-stream-reader"]


def test_idle_client_streams_end_with_deadline_exceeded(server_config) -> None:
    config = replace(server_config, max_family_streams=1, stream_idle_seconds=1.0)
    with running(config) as (client, _):
        stubs = Stubs(client)
        mum = stubs.register()
        silent = HeldStream(stubs.photos.BackupPhoto, mum)  # not even a header
        stalled = HeldStream(stubs.photos.BackupPhoto, stubs.register())
        stalled.send(backup_requests(b"0123456789")[0])  # the header, then nothing
        wait_until(lambda: silent.done() and stalled.done(), "the idle streams are ended")
        for stream in (silent, stalled):
            code, details = stream.status()
            assert code is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no message arrived for 1 s" in details and "retry" in details
        assert not stubs.backup(mum, b"a photo").already_stored  # the slot is free again
        assert stubs.photo_ids(stubs.register()) == []
        silent.end()
        stalled.end()
        wait_until(lambda: not _readers(), "the helper reader threads end")


def test_a_client_that_stops_reading_is_cancelled(server_config, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="server.admission")
    config = replace(server_config, max_family_streams=1, stream_idle_seconds=1.0,
                     max_photo_bytes=32 * MIB)
    with running(config) as (client, _):
        stubs = Stubs(client)
        mum = stubs.register()
        big = np.random.default_rng(0).bytes(24 * MIB)  # far more than gRPC buffers
        photo_id = stubs.backup(mum, big).photo_id
        fetch = stubs.photos.FetchPhoto(photos_pb2.FetchPhotoRequest(photo_id=photo_id),
                                        metadata=mum, timeout=60)
        assert next(fetch).blob_size == len(big)  # then the phone reads nothing more
        code, details = refused_code(lambda: stubs.backup(mum, b"small"))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "for this family" in details

        def backup_works() -> bool:
            try:
                return not stubs.backup(mum, b"small", timeout=5).already_stored
            except grpc.RpcError as exc:
                assert exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                return False
        wait_until(backup_works, "the stalled download is cancelled and its slot freed")
        assert "the client read nothing for 1 s" in caplog.text
        assert "ipv4:127.0.0.1" in caplog.text
        with pytest.raises(grpc.RpcError) as info:
            list(fetch)
        assert info.value.code() is grpc.StatusCode.CANCELLED


# -- cancellation stops server work ----------------------------------------------------------


class SlowCounter:
    """Wraps a server function: counts calls and makes each take a while."""

    def __init__(self, fn: Callable[..., Any], delay: float) -> None:
        self.fn = fn
        self.delay = delay
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        time.sleep(self.delay)
        return self.fn(*args, **kwargs)


def _logged(caplog, pattern: str) -> re.Match[str] | None:
    for record in caplog.records:
        if m := re.search(pattern, record.getMessage()):
            return m
    return None


def test_cancelled_match_stops_evaluating(family, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="server")
    client, bundle = family
    faces.ensure_ckks_keys(client, bundle)
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((2, 128))
    enroll_embeddings(client, bundle, "Mum", emb / np.linalg.norm(emb, axis=1, keepdims=True))
    probes = rng.standard_normal((64, 128))
    probes /= np.linalg.norm(probes, axis=1, keepdims=True)
    secret = faces.secret_context(bundle)
    request = faces_pb2.MatchFacesRequest(faces=[
        faces_pb2.Ciphertexts(items=ckks.encrypt_query(secret, p)) for p in probes])
    slow = SlowCounter(ckks.match_prepared, 0.05)  # 64 x 50 ms of work on the server
    monkeypatch.setattr(ckks, "match_prepared", slow)

    call = client.faces.MatchFaces(request, metadata=client.metadata(), timeout=60)
    assert next(call).face == 0
    call.cancel()
    wait_until(lambda: _logged(caplog, r"MatchFaces cancelled after (\d+)") is not None,
               "the server logs the cancelled match")
    match = _logged(caplog, r"MatchFaces cancelled after (\d+)")
    assert match is not None
    evaluated = slow.calls
    time.sleep(0.5)
    assert slow.calls == evaluated  # nothing is evaluated after the cancellation
    assert int(match.group(1)) <= evaluated < len(probes) // 2


TINY_ID = "tiny"
TINY_FP = bytes(range(16))


def _publish_tiny_detector(client: PrivfaceClient, config: ServerConfig) -> None:
    """A one-classifier detector over 4-value windows: the server only evaluates it."""
    matrix = np.array([1.0, 0.0, 0.0, 0.0], "<f8").tobytes()
    header = detection_pb2.DetectorHeader(
        detector_id=TINY_ID, key_version=1, key_fingerprint=TINY_FP, window_width=20,
        window_height=20, ciphertext_dim=4, stages=[detection_pb2.CascadeStage(
            weak_count=1, threshold=0.5, left_values=[0.0], right_values=[1.0])],
        matrix_size=len(matrix), matrix_sha256=hashlib.sha256(matrix).digest())
    client.publish_detector(header, matrix, vendor_token(config))


def _session() -> detection_pb2.DetectFacesRequest:
    return detection_pb2.DetectFacesRequest(session=detection_pb2.DetectionSession(
        detector_id=TINY_ID, key_version=1, key_fingerprint=TINY_FP))


def _batch(i: int, count: int = 8) -> detection_pb2.DetectFacesRequest:
    return detection_pb2.DetectFacesRequest(batch=detection_pb2.WindowBatch(
        batch_id=i, count=count, windows=np.ones((count, 4)).tobytes(),
        encoding=detection_pb2.WINDOW_ENCODING_FLOAT64))


def test_cancelled_detection_stops_evaluating(family, server, monkeypatch, caplog) -> None:
    caplog.set_level(logging.INFO, logger="server")
    client, _bundle = family
    _publish_tiny_detector(client, server[1])
    slow = SlowCounter(secure_cascade.evaluate, 0.05)  # the server's DC, per batch
    monkeypatch.setattr(secure_cascade, "evaluate", slow)
    batches = 100
    call = client.detector.DetectFaces(iter([_session()] + [_batch(i) for i in range(batches)]),
                                       metadata=client.metadata(), timeout=60)
    assert next(call).batch_id == 0
    call.cancel()
    pattern = r"(\d+) windows in (\d+) batches \(cancelled\)"
    wait_until(lambda: _logged(caplog, pattern) is not None,
               "the server logs the cancelled detection")
    evaluated = slow.calls
    time.sleep(0.5)
    assert slow.calls == evaluated  # nothing is evaluated after the cancellation
    match = _logged(caplog, pattern)
    assert match is not None and int(match.group(2)) <= evaluated < batches // 2


# -- quotas ----------------------------------------------------------------------------------


def test_photo_count_and_byte_quotas(server_config, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="server.admission")
    config = replace(server_config, max_family_photos=2, max_family_bytes=1000)
    with running(config) as (client, _):
        stubs = Stubs(client)
        mum = stubs.register()
        first = stubs.backup(mum, b"a" * 300).photo_id
        second = stubs.backup(mum, b"b" * 300).photo_id
        assert stubs.backup(mum, b"b" * 300).already_stored  # a retry is still answered
        code, details = refused_code(lambda: stubs.backup(mum, b"c" * 10))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "photo quota" in details and "stores 2 photos (limit 2)" in details
        assert "privface delete" in details
        assert "refused /privface.v1.PhotoService/BackupPhoto from ipv4:127.0.0.1" in caplog.text
        blobs = list((config.data_dir / "blobs").rglob("*.blob"))
        assert len(blobs) == 2  # the refused upload left nothing behind
        stubs.photos.DeletePhoto(photos_pb2.DeletePhotoRequest(photo_id=first), metadata=mum,
                                 timeout=5)
        code, details = refused_code(lambda: stubs.backup(mum, b"d" * 701))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "storage quota" in details and "stores 300 bytes" in details
        assert "701 more" in details and "1,000" in details
        stubs.backup(mum, b"d" * 700)  # exactly at the limit
        assert sorted(stubs.photo_ids(mum)) == sorted([second, hashlib.sha256(
            b"d" * 700).hexdigest()[:32]])
        assert not stubs.backup(stubs.register(), b"e" * 700).already_stored  # per family


@pytest.mark.parametrize("server_config", [{"max_gallery_entries": 3}], indirect=True)
def test_gallery_quota(family) -> None:
    client, bundle = family
    faces.ensure_ckks_keys(client, bundle)
    rng = np.random.default_rng(2)
    emb = rng.standard_normal((2, 128))
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert enroll_embeddings(client, bundle, "Mum", emb) == 2
    with pytest.raises(LimitExceededError, match=r"holds 2 encrypted faces.*limit of 3"):
        enroll_embeddings(client, bundle, "Tom", emb)
    assert enroll_embeddings(client, bundle, "Tom", emb[:1]) == 3


@pytest.mark.parametrize("server_config", [{"max_detect_windows_per_hour": 20}], indirect=True)
def test_detection_windows_per_hour(family, server) -> None:
    client, _bundle = family
    _publish_tiny_detector(client, server[1])
    call = client.detector.DetectFaces(iter([_session(), _batch(0), _batch(1), _batch(2)]),
                                       metadata=client.metadata(), timeout=30)
    assert [next(call).batch_id, next(call).batch_id] == [0, 1]
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    details = info.value.details() or ""
    assert "used 16 in the last hour" in details and "limit 20 per hour" in details
    assert "--max-detect-windows-per-hour" in details
    small = list(client.detector.DetectFaces(iter([_session(), _batch(0, count=4)]),
                                             metadata=client.metadata(), timeout=30))
    assert [r.count for r in small] == [4]  # what is left of the hour is still usable


# -- per-address rate limits ------------------------------------------------------------------


def test_register_family_is_rate_limited_per_address(server_config, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="server.admission")
    with running(replace(server_config, register_per_minute=3)) as (client, _):
        stubs = Stubs(client)
        for _ in range(3):
            stubs.register()
        code, details = refused_code(stubs.register)
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many family registrations from 127.0.0.1" in details
        assert "limit 3 per minute" in details and "retry in a minute" in details
        assert "refused /privface.v1.FamilyService/RegisterFamily from ipv4:127.0.0.1" \
            in caplog.text


def test_failed_authentication_locks_the_address_out(server_config, caplog) -> None:
    caplog.set_level(logging.INFO)
    config = replace(server_config, auth_failures_per_minute=3, auth_lockout_seconds=300)
    with running(config) as (client, _):
        stubs = Stubs(client)
        mum = stubs.register()
        guess = "guessed-token-4242"
        wrong = (mum[0], ("authorization", f"Bearer {guess}"))
        get = family_pb2.GetFamilyRequest()
        for _ in range(3):
            code, _details = refused_code(lambda: stubs.family.GetFamily(get, metadata=wrong,
                                                                          timeout=5))
            assert code is grpc.StatusCode.UNAUTHENTICATED
        # Now even the right token is refused from this address, for a while.
        code, details = refused_code(lambda: stubs.family.GetFamily(get, metadata=mum,
                                                                     timeout=5))
        assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many failed authentications from 127.0.0.1" in details
        assert "refused for 300 more s" in details and "credentials" in details
        assert refused_code(lambda: stubs.backup(mum, b"x"))[0] \
            is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stubs.healthy()  # health checks are never refused
        assert "locked out ipv4:127.0.0.1" in caplog.text
        assert "refused /privface.v1.FamilyService/GetFamily from ipv4:127.0.0.1" in caplog.text
        assert guess not in caplog.text and mum[1][1].split()[1] not in caplog.text
