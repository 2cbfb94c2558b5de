"""Clients across replicas (issue 9, part 4): one channel balanced round-robin over several
real servers, idempotent calls retried on UNAVAILABLE (and only those), uploads idempotent by
photo id, deletes and compare-and-set writes settled when a retry follows a lost answer.

The servers here are real and separate (each its own data dir, so its own families); only
the retry loop's own unit tests use fake stub callables.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from client import rpc
from client.config import ClientConfig
from client.keystore import FamilyBundle
from client.pipeline.family import create_family
from client.pipeline.photos import encrypt_labels
from client.rpc import (
    RETRY_POLICY,
    Credentials,
    PrivfaceClient,
    ServerAddressError,
    ServerUnavailableError,
    TransportSecurityError,
    channel_target,
    service_config,
)
from common.errors import NotFoundError, VersionConflictError
from privface.v1 import detection_pb2, faces_pb2, family_pb2, photos_pb2
from server.app import create_server
from server.tls import DevCerts
from tests.conftest import channel as tls_channel
from tests.conftest import tls_server_config

PHOTO = "0123456789abcdef" * 2  # photo ids are 32 lowercase hex characters
# Generous per-address limits: every call of these tests comes from 127.0.0.1.
GENEROUS = {"max_calls_per_address": 256, "register_per_minute": 10_000,
            "auth_failures_per_minute": 10_000, "grace_seconds": 0.0}


class Replica:
    """One real privface server on a fixed port once started; stop() and start() again
    bring it back on the same port with the same data."""

    def __init__(self, certs: DevCerts, data_dir: Path) -> None:
        self.config = tls_server_config(certs, data_dir=data_dir, **GENEROUS)
        self.server: grpc.Server | None = None
        self.port = 0

    def start(self) -> Replica:
        config = dataclasses.replace(self.config, port=self.port)
        self.server, self.port, _ = create_server(config)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait()
            self.server = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def replicas(tmp_path: Path, tls_certs: DevCerts) -> Iterator[Callable[[], Replica]]:
    """Starts replicas (each with its own data dir); stops them all at the end."""
    started: list[Replica] = []

    def start() -> Replica:
        replica = Replica(tls_certs, tmp_path / f"replica{len(started)}").start()
        started.append(replica)
        return replica

    yield start
    for replica in started:
        replica.stop()


def _config(tls_certs: DevCerts, **fields: Any) -> ClientConfig:
    return ClientConfig(tls_ca=tls_certs.ca, **fields)


def _register(client: PrivfaceClient) -> Credentials:
    """A bare RegisterFamily (one unary call; create_family makes several)."""
    return client.register_family(b"\x01" * 16, 8)


def _home_of(credentials: Credentials, replicas: list[Replica], config: ClientConfig
             ) -> Replica:
    """The replica that holds a family (asked each one alone)."""
    homes = []
    for replica in replicas:
        with PrivfaceClient(replica.address, credentials, config) as one:
            try:
                one.get_family()
            except Exception:  # noqa: BLE001 - any refusal means: not here
                continue
            homes.append(replica)
    assert len(homes) == 1, "a family lives on exactly one of two unshared replicas"
    return homes[0]


# -- round-robin over real replicas --------------------------------------------------------


def test_round_robin_spreads_unary_calls_over_both_replicas(
        replicas: Callable[[], Replica], tls_certs: DevCerts) -> None:
    a, b = replicas(), replicas()
    config = _config(tls_certs)
    registered = []
    with PrivfaceClient(f"{a.address},{b.address}", config=config) as client:
        assert channel_target(client.address).target == f"ipv4:{a.address},{b.address}"
        for _ in range(12):
            registered.append(_register(client))
    homes = [_home_of(c, [a, b], config) for c in registered]
    served = {r.address: homes.count(r) for r in (a, b)}
    assert served[a.address] >= 3 and served[b.address] >= 3, served


def test_calls_keep_succeeding_when_one_replica_is_stopped(
        replicas: Callable[[], Replica], tls_certs: DevCerts,
        caplog: pytest.LogCaptureFixture) -> None:
    a, b = replicas(), replicas()
    config = _config(tls_certs, timeout=20.0)
    with PrivfaceClient(a.address, config=config) as one:
        bundle = create_family(one)
    credentials = Credentials(bundle.family_id, bundle.access_token)
    # The stopped replica first in the list: its address is still dialled (and refused).
    with PrivfaceClient(f"{b.address},{a.address}", config=config) as client:
        for _ in range(6):
            assert client.list_detectors() == []  # unauthenticated: both replicas answer
        caplog.set_level(logging.INFO, logger="client.rpc")
        b.stop()
        for _ in range(20):
            assert client.list_detectors() == []
        client.credentials = credentials  # a family of the surviving replica
        for i in range(10):
            assert client.get_family().family_id == bundle.family_id
            assert not client.backup_photo(f"{i:032x}", b"x" * 100, encrypt_labels(bundle, [0]),
                                           bundle.label_key.fingerprint())
        assert len(client.list_photos()) == 10
    assert bundle.access_token not in caplog.text


def _server_process(certs: DevCerts, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A privface-server process (generous limits) on a free port, once it serves."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVFACE_")}
    env.update(PRIVFACE_TLS_CERT=str(certs.server_cert), PRIVFACE_TLS_KEY=str(certs.server_key),
               **{f"PRIVFACE_{k.upper()}": str(v) for k, v in GENEROUS.items()})
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port),
                             "--data-dir", str(data_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with tls_channel(f"127.0.0.1:{port}") as ch:
        grpc.channel_ready_future(ch).result(timeout=60)
    return proc, f"127.0.0.1:{port}"


@pytest.mark.parametrize("grpc_retries", [True, False], ids=["grpc-and-loop", "loop-only"])
def test_a_replica_killed_under_load_fails_no_call(
        replicas: Callable[[], Replica], tls_certs: DevCerts, tmp_path: Path,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
        grpc_retries: bool) -> None:
    """SIGKILL one of two replicas (frozen just before) while 4 threads keep calling: the
    calls in flight on it fail UNAVAILABLE and are retried on the other, so no caller sees
    an error. Without gRPC's own retry policy the client's loop alone does it (and logs
    each retry)."""
    if not grpc_retries:
        monkeypatch.setattr(rpc, "_RECONNECT_OPTIONS", [
            *(o for o in rpc._RECONNECT_OPTIONS if o[0] != "grpc.enable_retries"),
            ("grpc.enable_retries", 0)])
    survivor = replicas()
    proc, doomed = _server_process(tls_certs, tmp_path / "doomed")
    caplog.set_level(logging.INFO, logger="client.rpc")
    failures: list[Exception] = []
    calls = [0]
    stop = threading.Event()
    try:
        with PrivfaceClient(f"{doomed},{survivor.address}",
                            config=_config(tls_certs, timeout=20.0)) as client:
            def keep_calling() -> None:
                while not stop.is_set():
                    try:
                        assert client.list_detectors() == []
                        calls[0] += 1
                    except Exception as exc:  # noqa: BLE001 - counted, asserted below
                        failures.append(exc)
            threads = [threading.Thread(target=keep_calling) for _ in range(4)]
            for thread in threads:
                thread.start()
            time.sleep(0.5)
            # Frozen first, so that calls are surely in flight on it when it dies (on a busy
            # machine the threads may otherwise all sit between calls at that instant).
            proc.send_signal(signal.SIGSTOP)
            time.sleep(0.5)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            time.sleep(0.5)
            stop.set()
            for thread in threads:
                thread.join()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not failures and calls[0] > 20, (failures[:3], calls)
    if not grpc_retries:
        assert "ListDetectors failed with UNAVAILABLE (attempt 1 of 5)" in caplog.text


def test_a_call_waiting_in_retry_succeeds_when_its_server_comes_back(
        replicas: Callable[[], Replica], tls_certs: DevCerts,
        caplog: pytest.LogCaptureFixture) -> None:
    server = replicas()
    config = _config(tls_certs, timeout=30.0, retry_attempts=10)
    with PrivfaceClient(server.address, config=config) as client:
        bundle = create_family(client)
        assert client.get_family().family_id == bundle.family_id
        caplog.set_level(logging.INFO, logger="client.rpc")
        server.stop()
        restart = threading.Timer(1.0, server.start)  # same port, same data dir
        restart.start()
        started = time.monotonic()
        try:
            summary = client.get_family()  # UNAVAILABLE, retried until the server is back
        finally:
            restart.join()
        assert summary.family_id == bundle.family_id
        assert time.monotonic() - started >= 0.9
        assert client.list_photos() == []
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert retries and all(m.startswith("GetFamily failed with UNAVAILABLE (attempt ")
                           for m in retries), retries
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == "client.rpc"
               and "retrying" in r.getMessage())
    assert bundle.access_token not in caplog.text


def test_an_unreachable_list_of_replicas_names_every_address(tls_certs: DevCerts) -> None:
    config = _config(tls_certs, timeout=3.0)
    with PrivfaceClient("127.0.0.1:1,127.0.0.1:2", config=config) as client, \
            pytest.raises(ServerUnavailableError,
                          match=r"127\.0\.0\.1:1, 127\.0\.0\.1:2.*is privface-server running"):
        client.list_detectors()


# -- TLS with several addresses ------------------------------------------------------------


def test_tls_over_several_addresses_checks_the_first_host_or_the_configured_name(
        replicas: Callable[[], Replica], tls_certs: DevCerts) -> None:
    a, b = replicas(), replicas()
    servers = f"{a.address},{b.address}"
    with PrivfaceClient(servers, config=_config(tls_certs)) as client:
        assert client.list_detectors() == []  # the certificate lists 127.0.0.1
    with PrivfaceClient(servers, config=_config(tls_certs, tls_server_name="localhost")) as c:
        assert c.list_detectors() == []  # ... and localhost
    wrong = _config(tls_certs, tls_server_name="elsewhere.example", timeout=5.0)
    with PrivfaceClient(servers, config=wrong) as client, \
            pytest.raises(TransportSecurityError, match="PRIVFACE_TLS_SERVER_NAME"):
        client.list_detectors()


def test_a_dns_name_balances_over_what_it_resolves_to(
        replicas: Callable[[], Replica], tls_certs: DevCerts) -> None:
    server = replicas()
    address = f"localhost:{server.port}"
    assert channel_target(address).target == f"dns:///{address}"
    assert channel_target(address).balanced
    with PrivfaceClient(address, config=_config(tls_certs)) as client:
        assert client.list_detectors() == []


def test_the_server_setting_from_the_environment_may_list_replicas(
        replicas: Callable[[], Replica], tls_certs: DevCerts,
        monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = replicas(), replicas()
    monkeypatch.setenv("PRIVFACE_SERVER", f"{a.address}, {b.address}")
    config = ClientConfig.load()
    with PrivfaceClient(config.server_or(""), config=config) as client:
        assert client.list_detectors() == []


def test_channel_targets() -> None:
    single = channel_target("127.0.0.1:50051")
    assert (single.target, single.balanced, single.tls_name) == ("127.0.0.1:50051", False, "")
    assert channel_target("[::1]:50051").target == "[::1]:50051"
    several = channel_target("127.0.0.1:50051, 127.0.0.1:50052")
    assert (several.target, several.balanced, several.tls_name, several.authority) == (
        "ipv4:127.0.0.1:50051,127.0.0.1:50052", True, "127.0.0.1", "127.0.0.1:50051")
    assert channel_target("[::1]:1,[::1]:2").target == "ipv6:[::1]:1,[::1]:2"
    assert channel_target("dns:///replicas.example:443").target == "dns:///replicas.example:443"
    assert channel_target("ipv4:10.0.0.1:1,10.0.0.2:1").tls_name == "10.0.0.1"
    with pytest.raises(ServerAddressError, match="IP addresses"):
        channel_target("a.example:1,b.example:1")
    with pytest.raises(ServerAddressError, match="mixes IPv4 and IPv6"):
        channel_target("127.0.0.1:1,[::1]:1")
    with pytest.raises(ServerAddressError):
        channel_target(" , ")


def test_service_config_balances_and_retries_only_plain_idempotent_calls() -> None:
    assert "loadBalancingConfig" not in json.loads(service_config(False))
    config = json.loads(service_config(True))
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    (method_config,) = config["methodConfig"]
    assert method_config["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    names = {n["method"] for n in method_config["name"]}
    assert {"GetFamily", "SearchPhotos", "FetchPhoto", "ListPhotos", "MatchFaces"} <= names
    # Uploads (request streams), and retries that must be seen (delete, compare-and-set):
    # the client's own loop; non-idempotent calls: nowhere.
    assert not names & {"BackupPhoto", "UploadPublicContext", "PublishDetector",
                        "DeletePhoto", "PutSealedItem", "RegisterFamily", "JoinFamily",
                        "AddGalleryEntries", "ReplaceGallery", "DetectFaces"}


def test_the_retry_table_covers_every_rpc() -> None:
    every = {m.name for module in (family_pb2, photos_pb2, faces_pb2, detection_pb2)
             for service in module.DESCRIPTOR.services_by_name.values()
             for m in service.methods}
    assert set(RETRY_POLICY) == every


# -- uploads idempotent by photo id --------------------------------------------------------


@pytest.fixture
def home(replicas: Callable[[], Replica], tls_certs: DevCerts
         ) -> Iterator[tuple[PrivfaceClient, FamilyBundle]]:
    """A family on one real server, its client sending 4 KiB chunks."""
    server = replicas()
    config = _config(tls_certs, chunk_bytes=4096)
    with PrivfaceClient(server.address, config=config) as client:
        yield client, create_family(client)


class FakeRpcError(grpc.RpcError):
    """What a stub raises for a failed call (code and details)."""

    def __init__(self, code: grpc.StatusCode, details: str = "") -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _answer_lost_once(real: Callable[..., Any], log: list[int]) -> Callable[..., Any]:
    """The real call, except that the first attempt's answer is lost (UNAVAILABLE after
    the server did the work). Logs how many request messages each attempt sent."""
    def call(request: Any, **kwargs: Any) -> Any:
        sent = [0]

        def counted(messages: Iterator[Any]) -> Iterator[Any]:
            for message in messages:
                sent[0] += 1
                yield message
        is_stream = not hasattr(request, "SerializeToString")
        log.append(0)
        attempt = len(log)
        response = real(counted(request) if is_stream else request, **kwargs)
        log[attempt - 1] = sent[0]
        if attempt == 1:
            raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "Socket closed")
        return response
    return call


def test_a_repeated_backup_with_the_same_id_is_stored_once(
        home: tuple[PrivfaceClient, FamilyBundle]) -> None:
    client, bundle = home
    blob, labels = b"encrypted photo" * 1000, encrypt_labels(bundle, [0, 1])
    fingerprint = bundle.label_key.fingerprint()
    assert client.backup_photo(PHOTO, blob, labels, fingerprint) is False
    assert client.backup_photo(PHOTO, blob, labels, fingerprint) is True
    assert client.list_photos() == [PHOTO]
    assert client.get_family().photo_count == 1


def test_a_backup_whose_answer_was_lost_is_retried_without_a_duplicate(
        home: tuple[PrivfaceClient, FamilyBundle], caplog: pytest.LogCaptureFixture) -> None:
    client, bundle = home
    caplog.set_level(logging.INFO, logger="client.rpc")
    sent: list[int] = []
    client.photos.BackupPhoto = _answer_lost_once(client.photos.BackupPhoto, sent)
    blob = bytes(range(256)) * 64  # 16 KiB: a header and 4 chunks per attempt
    already = client.backup_photo(PHOTO, blob, encrypt_labels(bundle, [0]),
                                  bundle.label_key.fingerprint())
    assert already is True  # the retry found the first attempt's photo
    assert sent == [5, 5]  # each attempt sent the whole request stream again
    assert client.list_photos() == [PHOTO]
    assert client.get_family().photo_count == 1
    assert client.fetch_photo(PHOTO) == blob
    assert "BackupPhoto failed with UNAVAILABLE (attempt 1 of 5)" in caplog.text


def test_a_delete_whose_answer_was_lost_counts_as_done(
        home: tuple[PrivfaceClient, FamilyBundle]) -> None:
    client, bundle = home
    fingerprint, labels = bundle.label_key.fingerprint(), encrypt_labels(bundle, [0])
    client.backup_photo(PHOTO, b"blob", labels, fingerprint)
    with pytest.raises(NotFoundError):  # the server's answer for an unknown id
        client.delete_photo("f" * 32)
    sent: list[int] = []
    client.photos.DeletePhoto = _answer_lost_once(client.photos.DeletePhoto, sent)
    client.delete_photo(PHOTO)  # the retry gets NOT_FOUND: the first attempt deleted it
    assert len(sent) == 2
    assert client.list_photos() == []


def test_a_sealed_write_whose_answer_was_lost_is_settled_by_reading_it_back(
        home: tuple[PrivfaceClient, FamilyBundle]) -> None:
    client, _ = home
    sent: list[int] = []
    real = client.family.PutSealedItem
    client.family.PutSealedItem = _answer_lost_once(real, sent)
    assert client.put_sealed_item("notes", 0, b"sealed-1") == 1  # ABORTED on the retry
    assert len(sent) == 2 and client.get_sealed_item("notes") == (1, b"sealed-1")
    client.family.PutSealedItem = real
    with pytest.raises(VersionConflictError):  # a plain conflict
        client.put_sealed_item("notes", 0, b"sealed-again")

    def other_phone_first(request: Any, **kwargs: Any) -> Any:
        """This attempt never arrives; another phone's write does."""
        client.family.PutSealedItem = real
        real(family_pb2.PutSealedItemRequest(name="notes", expected_version=1,
                                             data=b"sealed-other"), **kwargs)
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE, "connection refused")
    client.family.PutSealedItem = other_phone_first
    with pytest.raises(VersionConflictError):  # the retry's conflict is another phone's
        client.put_sealed_item("notes", 1, b"sealed-2")
    assert client.get_sealed_item("notes") == (2, b"sealed-other")


# -- the retry loop (fake stub callables) --------------------------------------------------


@pytest.fixture
def offline(tls_certs: DevCerts) -> Iterator[PrivfaceClient]:
    """A client whose stubs the test replaces (its channel never connects)."""
    config = _config(tls_certs, retry_initial_backoff=0.001, retry_max_backoff=0.01,
                     timeout=10.0)
    with PrivfaceClient("127.0.0.1:1", Credentials("f" * 32, "token"), config) as client:
        yield client


class Flaky:
    """A fake stub callable: fails with ``codes`` in turn, then answers ``response``; keeps
    each attempt's request (a request stream read to its end) and timeout."""

    def __init__(self, response: Any, *codes: grpc.StatusCode) -> None:
        self.response, self.codes = response, list(codes)
        self.requests: list[Any] = []
        self.timeouts: list[float] = []

    def __call__(self, request: Any, *, timeout: float, metadata: Any) -> Any:
        self.requests.append(request if hasattr(request, "SerializeToString")
                             else list(request))
        self.timeouts.append(timeout)
        if self.codes:
            raise FakeRpcError(self.codes.pop(0), "connection refused")
        return self.response


def test_the_retry_loop_recreates_the_request_stream(offline: PrivfaceClient) -> None:
    fake = Flaky(photos_pb2.BackupPhotoResponse(already_stored=True),
                 grpc.StatusCode.UNAVAILABLE)
    offline.photos.BackupPhoto = fake
    assert offline.backup_photo(PHOTO, b"x" * 10, b"\0" * 8, b"\1" * 32)
    assert len(fake.requests) == 2 and fake.requests[0] == fake.requests[1]
    assert len(fake.requests[1]) == 2  # header and the chunk, sent again in full
    assert fake.timeouts[1] < fake.timeouts[0] <= 600.0  # one budget for every attempt


def test_idempotent_calls_stop_after_the_attempts_allowed(offline: PrivfaceClient) -> None:
    fake = Flaky(None, *[grpc.StatusCode.UNAVAILABLE] * 10)
    offline.family.GetFamily = fake
    with pytest.raises(ServerUnavailableError, match=r"127\.0\.0\.1:1"):
        offline.get_family()
    assert len(fake.requests) == offline.config.retry_attempts == 5


@pytest.mark.parametrize("code", [grpc.StatusCode.DEADLINE_EXCEEDED,
                                  grpc.StatusCode.INTERNAL, grpc.StatusCode.NOT_FOUND])
def test_only_unavailable_is_retried(offline: PrivfaceClient, code: grpc.StatusCode) -> None:
    fake = Flaky(faces_pb2.GetGalleryLayoutResponse(), code)
    offline.faces.GetGalleryLayout = fake
    with pytest.raises(Exception):  # noqa: B017 - each code has its own domain error
        offline.gallery_layout()
    assert len(fake.requests) == 1


@pytest.mark.parametrize("method, run", [
    ("RegisterFamily", lambda c: c.register_family(b"\1" * 16, 8)),
    ("JoinFamily", lambda c: c.join_family("f" * 32, "invite", "device", b"")),
    ("CreateDeviceInvite", lambda c: c.create_device_invite()),
    ("DeleteFamily", lambda c: c.delete_family()),
    ("AddGalleryEntries", lambda c: c.add_gallery_entries(0, 0, 0, 1, [b"ct"])),
    ("ReplaceGallery", lambda c: c.replace_gallery(1, [([b"ct"], [0])])),
])
def test_non_idempotent_calls_are_not_retried(offline: PrivfaceClient, method: str,
                                              run: Callable[[PrivfaceClient], Any]) -> None:
    assert not RETRY_POLICY[method].retry
    fake = Flaky(None, grpc.StatusCode.UNAVAILABLE)
    stub = {"RegisterFamily": offline.family, "JoinFamily": offline.family,
            "CreateDeviceInvite": offline.family, "DeleteFamily": offline.family,
            "AddGalleryEntries": offline.faces, "ReplaceGallery": offline.faces}[method]
    setattr(stub, method, fake)
    with pytest.raises(ServerUnavailableError):
        run(offline)
    assert len(fake.requests) == 1


def test_a_bare_request_iterator_is_sent_once(offline: PrivfaceClient) -> None:
    fake = Flaky(None, grpc.StatusCode.UNAVAILABLE)
    offline.photos.BackupPhoto = fake
    with pytest.raises(ServerUnavailableError):
        offline.call(offline.photos.BackupPhoto, iter([photos_pb2.BackupPhotoRequest()]))
    assert len(fake.requests) == 1


def test_a_server_stream_is_retried_until_its_first_message(
        offline: PrivfaceClient) -> None:
    pages = [photos_pb2.ListPhotosResponse(photo_ids=["a"]),
             photos_pb2.ListPhotosResponse(photo_ids=["b"])]

    class BrokenMidway:
        calls = 0

        def __call__(self, request: Any, *, timeout: float, metadata: Any
                     ) -> Iterator[photos_pb2.ListPhotosResponse]:
            self.calls += 1
            if self.calls == 1:
                raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
            yield pages[0]
            if self.calls == 2:
                raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)
            yield pages[1]

    broken = BrokenMidway()
    offline.photos.ListPhotos = broken
    assert offline.list_photos() == ["a", "b"]  # collect(): read again from the start
    assert broken.calls == 3
    broken.calls = 1  # stream(): retried before its first page, not after
    got = offline.stream(offline.photos.ListPhotos, photos_pb2.ListPhotosRequest())
    assert next(got) == pages[0]
    with pytest.raises(ServerUnavailableError):
        next(got)
    assert broken.calls == 2


def test_the_stubs_named_in_the_table_are_this_clients(offline: PrivfaceClient) -> None:
    assert offline.method_name(offline.photos.BackupPhoto) == "BackupPhoto"
    assert offline.method_name(offline.detector.DetectFaces) == "DetectFaces"
    assert offline.method_name(lambda *a, **k: None) == ""
