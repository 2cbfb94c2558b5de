"""Two servers on one PostgreSQL and one blob store: a write acknowledged by one is seen by
the next call on the other (photos, searches, deletes, the gallery, keys, devices), and a
server whose database is unreachable reports NOT_SERVING, then SERVING again."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from psycopg.conninfo import conninfo_to_dict

from bench.server_process import ServerProcess
from client.keystore import FamilyBundle
from client.pipeline import faces
from client.pipeline import photos as pipeline
from client.pipeline.family import create_family
from client.rpc import PrivfaceClient
from common import labels
from common.errors import NotFoundError, PermissionDeniedError
from privface.v1 import family_pb2, family_pb2_grpc
from server import migrations
from server.app import create_server
from server.config import ServerConfig
from server.database_pg import PostgresDatabase
from server.tls import DevCerts
from tests.conftest import channel, connect, tls_server_config
from tests.server.test_photo_service import _photo_bytes

# Every call of these tests comes from 127.0.0.1: per-address limits must not bite.
GENEROUS = {"max_calls_per_address": 256, "register_per_minute": 1000,
            "auth_failures_per_minute": 1000}


def _migrated(url: str) -> str:
    db = PostgresDatabase(url, min_size=0, max_size=1)
    try:
        migrations.migrate(db)
    finally:
        db.close()
    return url


def _start(config: ServerConfig) -> tuple[grpc.Server, str]:
    server, port, _ = create_server(config)
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.fixture
def replica_configs(fresh_postgres_url: str, tmp_path: Path,
                    tls_certs: DevCerts) -> list[ServerConfig]:
    url = _migrated(fresh_postgres_url)
    return [tls_server_config(tls_certs, data_dir=tmp_path / f"replica{i}", store=url,
                              blobs=f"file:{tmp_path / 'shared-blobs'}", **GENEROUS)
            for i in range(2)]


@contextlib.contextmanager
def _serving(configs: list[ServerConfig]) -> Iterator[list[str]]:
    started = [_start(c) for c in configs]
    try:
        yield [address for _, address in started]
    finally:
        for server, _ in started:
            server.stop(0).wait()


@pytest.fixture
def replicas(replica_configs: list[ServerConfig]) -> Iterator[list[str]]:
    with _serving(replica_configs) as addresses:
        yield addresses


def _photo(i: int) -> bytes:
    return _photo_bytes(f"replica-{i}")


def _search(address: str, bundle: FamilyBundle, names: list[str]) -> list[str]:
    with connect(address, bundle) as client:
        ids, _server_ms = pipeline.search_photos(
            client, bundle, [bundle.slot_of(n) for n in names], labels.MatchMode.ALL)
        return ids


def test_photos_and_searches_follow_writes_on_the_other_replica(replicas: list[str]) -> None:
    _photos_and_searches_across(*replicas)


def test_replicas_on_postgresql_and_s3(replica_configs: list[ServerConfig],
                                       s3_bucket_url: str) -> None:
    """The production shape: `--store postgresql://... --blobs s3://...` (moto here)."""
    with _serving([replace(c, blobs=s3_bucket_url) for c in replica_configs]) as (a, b):
        _photos_and_searches_across(a, b)
    from server.blobs_s3 import S3Blobs

    keys = [blob.key for blob in S3Blobs.from_url(s3_bucket_url).list()]
    assert len(keys) == 2 and all(k.endswith(".blob") for k in keys)  # the two live photos


def _photos_and_searches_across(a: str, b: str) -> None:
    with PrivfaceClient(a) as first:
        bundle = create_family(first)
    for name in ("Mum", "Tom"):
        bundle.add_member(name)
    with connect(a, bundle) as on_a, connect(b, bundle) as on_b:
        mum = pipeline.backup_photo(on_a, bundle, _photo(1), [bundle.slot_of("Mum")])
        assert _search(b, bundle, ["Mum"]) == [mum.photo_id]  # loads B's index
        both = pipeline.backup_photo(on_a, bundle, _photo(2),
                                     [bundle.slot_of("Mum"), bundle.slot_of("Tom")])
        assert _search(b, bundle, ["Mum"]) == [both.photo_id, mum.photo_id]  # incremental
        assert on_b.list_photos() == [both.photo_id, mum.photo_id]
        assert pipeline.fetch_photo(on_b, bundle, both.photo_id) == _photo(2)
        again = pipeline.backup_photo(on_b, bundle, _photo(2),
                                      [bundle.slot_of("Mum"), bundle.slot_of("Tom")])
        assert again.already_stored  # idempotent by id, whichever replica answers
        tom = pipeline.backup_photo(on_b, bundle, _photo(3), [bundle.slot_of("Tom")])
        on_b.delete_photo(mum.photo_id)
        assert _search(a, bundle, ["Mum"]) == [both.photo_id]  # A's index saw the delete
        assert _search(a, bundle, ["Tom"]) == [tom.photo_id, both.photo_id]
        with pytest.raises(NotFoundError):
            on_a.fetch_photo(mum.photo_id)
        assert on_a.get_family().photo_count == on_b.get_family().photo_count == 2


def test_gallery_and_keys_follow_writes_on_the_other_replica(replicas: list[str]) -> None:
    a, b = replicas
    with PrivfaceClient(a) as first:
        bundle = create_family(first)
    rng = np.random.default_rng(3)
    embeddings = {name: rng.standard_normal((3, 128)) for name in ("Mum", "Tom", "Gran")}
    for emb in embeddings.values():
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    with connect(a, bundle) as on_a, connect(b, bundle) as on_b:
        faces.ensure_ckks_keys(on_a, bundle)
        faces.add_faces(on_a, bundle, bundle.add_member("Mum"), embeddings["Mum"])
        (match,) = faces.identify(on_b, bundle, embeddings["Mum"][:1])  # B loads the gallery
        assert match.name == "Mum"
        faces.add_faces(on_a, bundle, bundle.add_member("Tom"), embeddings["Tom"])
        matches = faces.identify(on_b, bundle, np.vstack([embeddings["Mum"][:1],
                                                          embeddings["Tom"][:1]]))
        assert [m.name for m in matches] == ["Mum", "Tom"]  # B refreshed the changed block
        # Positions are checked under the family's lock: enrolling through B right after A
        # lands at the next free position, not on top of A's entries.
        faces.add_faces(on_b, bundle, bundle.add_member("Gran"), embeddings["Gran"])
        assert faces.gallery_counts(on_a) == {bundle.slot_of(n): 3 for n in embeddings}
        on_a.remove_gallery_slot(bundle.remove_member("Tom"))
        before, after = faces.compact(on_a, bundle)  # a re-pack: B reloads from scratch
        assert (before, after) == (9, 6)
        matches = faces.identify(on_b, bundle, np.vstack([e[:1] for e in embeddings.values()]))
        assert [m.name for m in matches] == ["Mum", None, "Gran"]


def test_devices_and_invitations_work_across_replicas(replicas: list[str]) -> None:
    a, b = replicas
    with PrivfaceClient(a) as first:
        bundle = create_family(first)
    with connect(a, bundle) as on_a, connect(b, bundle) as on_b:
        token, _ = on_a.create_device_invite()
        with PrivfaceClient(b) as joiner:
            joined = joiner.join_family(bundle.family_id, token, "d" * 32, b"sealed")
        assert len(on_b.list_devices()) == 2
        on_b.revoke_device("d" * 32)
        with PrivfaceClient(a, joined) as revoked, \
                pytest.raises(PermissionDeniedError, match="revoked"):
            revoked.list_photos()


class _Proxy:
    """A TCP relay to the database that the test can cut and restore."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.open = threading.Event()
        self.open.set()
        self._sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.open.is_set():
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.open.clear()
        for s in self._sockets:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self._sockets.clear()

    def close(self) -> None:
        self.cut()
        self.listener.close()


def test_health_is_not_serving_while_the_database_is_unreachable(
        replica_configs: list[ServerConfig]) -> None:
    url = replica_configs[0].store
    info = conninfo_to_dict(url)
    port = str(info.get("port") or 5432)
    proxy = _Proxy((str(info.get("host") or "127.0.0.1"), int(port)))
    proxied = url.replace(f":{port}/", f":{proxy.port}/")
    server, address = _start(replace(replica_configs[0], store=proxied))
    stub = health_pb2_grpc.HealthStub(channel(address))

    def status() -> int:
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status

    try:
        assert status() == health_pb2.HealthCheckResponse.SERVING
        proxy.cut()
        deadline = time.monotonic() + 30
        while status() != health_pb2.HealthCheckResponse.NOT_SERVING:
            assert time.monotonic() < deadline, "health never reported NOT_SERVING"
            time.sleep(0.5)
        family = family_pb2_grpc.FamilyServiceStub(channel(address))
        with pytest.raises(grpc.RpcError) as err:  # a call that needs the database
            family.GetFamily(family_pb2.GetFamilyRequest(), timeout=60, metadata=(
                ("x-privface-family", "fam_" + "0" * 24), ("authorization", "Bearer x")))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "unreachable" in (err.value.details() or "")
        proxy.open.set()
        deadline = time.monotonic() + 30
        while status() != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "health never recovered"
            time.sleep(0.5)
    finally:
        server.stop(0).wait()
        proxy.close()


def test_two_server_processes_on_postgresql_and_s3_behind_one_client(
        replica_configs: list[ServerConfig], s3_bucket_url: str, tls_certs: DevCerts,
        tmp_path: Path) -> None:
    """`privface-server --store postgresql://... --blobs s3://...` twice, one balancing
    client over both; one process SIGKILLed: the client's calls keep succeeding."""
    env = {name: os.environ[name] for name in
           ("PRIVFACE_S3_ENDPOINT", "PRIVFACE_S3_REGION", "PRIVFACE_S3_CREATE_BUCKET")}
    limits = [f"--{name.replace('_', '-')}={value}" for name, value in GENEROUS.items()]
    processes = [ServerProcess(tmp_path / f"process{i}", tls_certs.server_cert,
                               tls_certs.server_key, tls_certs.ca, tmp_path / f"process{i}.log",
                               store=replica_configs[0].store, blobs=s3_bucket_url, env=env,
                               flags=limits) for i in range(2)]
    try:
        for process in processes:
            process.start()
        both = ",".join(p.address for p in processes)
        with PrivfaceClient(both) as first:
            bundle = create_family(first)
        bundle.add_member("Mum")
        with connect(both, bundle) as client:
            ids = [pipeline.backup_photo(client, bundle, _photo(10 + i),
                                         [bundle.slot_of("Mum")]).photo_id for i in range(4)]
            newest_first = ids[::-1]
            for _ in range(4):  # spread over both processes by the round-robin channel
                assert client.list_photos() == newest_first
                assert _search(both, bundle, ["Mum"]) == newest_first
            processes[0].kill()
            for i, photo_id in enumerate(ids):  # the other process answers everything
                assert pipeline.fetch_photo(client, bundle, photo_id) == _photo(10 + i)
                assert client.list_photos() == newest_first
        for process in processes:
            assert "postgres@127.0.0.1" in process.log_text()
            assert s3_bucket_url in process.log_text()
    finally:
        for process in processes:
            process.stop()
