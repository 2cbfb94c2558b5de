"""Blob stores (server/blobs.py, server/blobs_s3.py): a directory and S3 (moto's server)
behave the same, and the throwaway PostgreSQL of scripts/pg accepts connections."""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from common.errors import NotFoundError
from server.blobs import BlobStore, FileBlobs, open_blobs
from tests.backends import SCRIPTS_PG

MIB = 1024 * 1024


def random_chunks(total: int, chunk: int = MIB) -> Iterator[bytes]:
    """``total`` random bytes in chunks (made as they are asked for)."""
    sent = 0
    while sent < total:
        n = min(chunk, total - sent)
        sent += n
        yield os.urandom(n)


class Boom(Exception):
    pass


def failing_after(chunks: Iterator[bytes], n: int) -> Iterator[bytes]:
    """The first ``n`` chunks, then an exception (a dropped upload)."""
    for i, chunk in enumerate(chunks):
        if i == n:
            raise Boom("upload dropped")
        yield chunk


def no_incomplete_uploads(store: BlobStore) -> bool:
    from server.blobs_s3 import S3Blobs

    if not isinstance(store, S3Blobs):
        return True
    uploads = store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])
    return uploads == []


# -- both stores -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 1000, 3 * MIB + 7])
def test_round_trip(blob_store: BlobStore, size: int) -> None:
    data = os.urandom(size)
    assert blob_store.put("fam1/photo", data) == size
    assert blob_store.read("fam1/photo") == data
    assert b"".join(blob_store.open("fam1/photo")) == data
    chunks = list(blob_store.open("fam1/photo", chunk_bytes=4096))
    assert b"".join(chunks) == data
    assert all(len(c) <= 4096 for c in chunks)


def test_put_from_chunks(blob_store: BlobStore) -> None:
    parts = [b"", b"abc", b"", os.urandom(70_000), b"z"]
    assert blob_store.put("fam1/chunked", iter(parts)) == sum(map(len, parts))
    assert blob_store.read("fam1/chunked") == b"".join(parts)


def test_large_blob_streamed(blob_store: BlobStore) -> None:
    """20 MiB from a generator (more than two 8 MiB multipart parts on S3), read back in
    chunks, hashed on the way: neither side needs the whole blob."""
    sent = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        for chunk in random_chunks(20 * MIB):
            sent.update(chunk)
            yield chunk

    assert blob_store.put("fam1/big", chunks()) == 20 * MIB
    got = hashlib.sha256()
    total = 0
    for chunk in blob_store.open("fam1/big"):
        got.update(chunk)
        total += len(chunk)
    assert total == 20 * MIB
    assert got.digest() == sent.digest()
    assert [(b.key, b.size) for b in blob_store.list("fam1/")] == [("fam1/big", 20 * MIB)]
    assert no_incomplete_uploads(blob_store)


def test_list_with_prefix_and_sizes(blob_store: BlobStore) -> None:
    before = time.time()
    blob_store.put("fam1/a", b"x" * 10)
    blob_store.put("fam1/b", b"y" * 20)
    blob_store.put("fam10/c", b"z" * 5)
    blob_store.put("_detectors/d", b"")
    listed = {b.key: b.size for b in blob_store.list()}
    assert listed == {"fam1/a": 10, "fam1/b": 20, "fam10/c": 5, "_detectors/d": 0}
    assert {b.key: b.size for b in blob_store.list("fam1/")} == {"fam1/a": 10, "fam1/b": 20}
    assert {b.key for b in blob_store.list("fam1")} == {"fam1/a", "fam1/b", "fam10/c"}
    assert list(blob_store.list("nobody/")) == []
    for info in blob_store.list():
        assert before - 60 <= info.modified <= time.time() + 60


def test_delete_is_idempotent(blob_store: BlobStore) -> None:
    blob_store.put("fam1/a", b"data")
    blob_store.put("fam1/b", b"other")
    blob_store.delete("fam1/a")
    blob_store.delete("fam1/a")
    blob_store.delete("fam2/never-stored")
    with pytest.raises(NotFoundError):
        blob_store.read("fam1/a")
    assert [b.key for b in blob_store.list()] == ["fam1/b"]
    assert blob_store.read("fam1/b") == b"other"


def test_missing_blob_is_not_found(blob_store: BlobStore) -> None:
    with pytest.raises(NotFoundError, match="fam1/missing"):
        blob_store.read("fam1/missing")
    with pytest.raises(NotFoundError):
        blob_store.open("fam1/missing")


@pytest.mark.parametrize("good_chunks", [0, 1, 20])
def test_failed_put_stores_nothing(blob_store: BlobStore, good_chunks: int) -> None:
    """An exception from the chunk iterator (before any data, within the first part, after
    two 8 MiB parts went up) leaves no blob and no incomplete multipart upload."""
    with pytest.raises(Boom):
        blob_store.put("fam1/dropped", failing_after(random_chunks(30 * MIB), good_chunks))
    with pytest.raises(NotFoundError):
        blob_store.read("fam1/dropped")
    assert list(blob_store.list()) == []
    assert no_incomplete_uploads(blob_store)


def test_failed_put_keeps_the_previous_blob_of_another_key(blob_store: BlobStore) -> None:
    blob_store.put("fam1/kept", b"kept")
    with pytest.raises(Boom):
        blob_store.put("fam1/dropped", failing_after(random_chunks(MIB), 0))
    assert [b.key for b in blob_store.list()] == ["fam1/kept"]


@pytest.mark.parametrize("key", ["", "/abs", "../up", "fam1/../x", "fam1//x", "fam1/",
                                 ".hidden", "fam1/.tmp", "a b", "fam1\\x", "..", "fam1/.."])
def test_invalid_keys_are_refused(blob_store: BlobStore, key: str) -> None:
    with pytest.raises(ValueError, match="invalid blob key"):
        blob_store.put(key, b"x")
    with pytest.raises(ValueError, match="invalid blob key"):
        blob_store.read(key)
    with pytest.raises(ValueError, match="invalid blob key"):
        blob_store.open(key)
    with pytest.raises(ValueError, match="invalid blob key"):
        blob_store.delete(key)
    assert list(blob_store.list()) == []


def test_stores_exactly_the_bytes_given(blob_store: BlobStore) -> None:
    """The store keeps ciphertext as given: the bytes at rest are the bytes put (nothing
    added, nothing decoded), and a read returns them unchanged."""
    data = os.urandom(100_000)
    blob_store.put("fam1/sealed", data)
    assert blob_store.read("fam1/sealed") == data
    if isinstance(blob_store, FileBlobs):
        at_rest = blob_store.path("fam1/sealed").read_bytes()
    else:
        from server.blobs_s3 import S3Blobs

        assert isinstance(blob_store, S3Blobs)
        raw = blob_store.client.get_object(Bucket=blob_store.bucket, Key="blobs/fam1/sealed")
        at_rest = raw["Body"].read()
    assert at_rest == data


# -- S3 only ---------------------------------------------------------------------------------


def test_s3_from_url_and_open_blobs(s3_bucket_url: str, tmp_path: Path) -> None:
    from server.blobs_s3 import S3Blobs

    store = open_blobs(s3_bucket_url, tmp_path)
    assert isinstance(store, S3Blobs)
    assert store.url == s3_bucket_url
    assert (store.bucket, store.prefix) == (s3_bucket_url[5:].split("/")[0], "blobs")
    store.put("fam1/x", b"1")
    assert open_blobs(s3_bucket_url, tmp_path).read("fam1/x") == b"1"  # same bucket, found


def test_s3_missing_bucket_is_a_clear_error(s3_env: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from server.blobs_s3 import S3Blobs, S3ConfigError

    monkeypatch.delenv("PRIVFACE_S3_CREATE_BUCKET")
    with pytest.raises(S3ConfigError, match="'privface-no-such-bucket' does not exist"):
        S3Blobs.from_url("s3://privface-no-such-bucket/blobs")


@pytest.mark.parametrize("url", ["s3://", "s3://Bad_Bucket/x", "s3://ok-bucket/../x",
                                 "s3://ok-bucket/x?versionId=1", "http://ok-bucket/x"])
def test_s3_bad_urls(s3_env: str, url: str) -> None:
    from server.blobs_s3 import S3Blobs, S3ConfigError

    with pytest.raises(S3ConfigError):
        S3Blobs.from_url(url)


def test_s3_prefixes_do_not_see_each_other(s3_blobs: Any) -> None:
    from server.blobs_s3 import S3Blobs

    other = S3Blobs(s3_blobs.client, s3_blobs.bucket, "blobs2")
    whole = S3Blobs(s3_blobs.client, s3_blobs.bucket)
    s3_blobs.put("fam1/a", b"a")
    other.put("fam1/a", b"other")
    assert s3_blobs.read("fam1/a") == b"a"
    assert [b.key for b in other.list()] == ["fam1/a"]
    assert {b.key for b in whole.list()} == {"blobs/fam1/a", "blobs2/fam1/a"}


def test_s3_small_blob_is_one_put_and_large_one_multipart(s3_blobs: Any) -> None:
    calls: list[str] = []
    s3_blobs.client.meta.events.register(
        "before-call.s3", lambda model, **_: calls.append(model.name))
    s3_blobs.put("fam1/small", os.urandom(8 * MIB))  # exactly one part: a single PutObject
    assert calls == ["PutObject"]
    calls.clear()
    s3_blobs.put("fam1/large", random_chunks(8 * MIB + 1))
    assert calls == ["CreateMultipartUpload", "UploadPart", "UploadPart",
                     "CompleteMultipartUpload"]
    head = s3_blobs.client.head_object(Bucket=s3_blobs.bucket, Key="blobs/fam1/large")
    assert head["ContentLength"] == 8 * MIB + 1
    assert head["ETag"].strip('"').endswith("-2")


def test_s3_parts_go_up_while_the_iterator_still_runs(s3_blobs: Any) -> None:
    """Streaming: the first part is sent before the iterator is done, so at most about one
    part (plus a chunk) is ever held in memory."""
    parts_sent: list[int] = []
    seen_at_chunk: list[int] = []
    s3_blobs.client.meta.events.register(
        "before-call.s3.UploadPart", lambda **_: parts_sent.append(1))

    def chunks() -> Iterator[bytes]:
        for chunk in random_chunks(20 * MIB):
            seen_at_chunk.append(len(parts_sent))
            yield chunk

    s3_blobs.put("fam1/streamed", chunks())
    assert seen_at_chunk[8] == 0  # the 9th MiB starts nothing: the first part is full...
    assert seen_at_chunk[9] == 1  # ...and goes up once the 10th shows more follows
    assert seen_at_chunk[-1] == 2
    assert len(parts_sent) == 3


def test_s3_every_body_carries_its_sha256(s3_blobs: Any) -> None:
    """PutObject and every UploadPart send x-amz-checksum-sha256 of their own bytes, which
    S3 checks before storing (moto does not check; the header is what matters here)."""
    sent: list[tuple[str, bytes, str]] = []

    def record(request: Any, **_: Any) -> None:
        headers = request.headers
        body = request.body
        data = body if isinstance(body, bytes) else body.read()
        if hasattr(body, "seek"):
            body.seek(0)
        if "x-amz-checksum-sha256" in headers:
            sent.append((request.url, data, headers["x-amz-checksum-sha256"].decode()
                         if isinstance(headers["x-amz-checksum-sha256"], bytes)
                         else headers["x-amz-checksum-sha256"]))

    s3_blobs.client.meta.events.register("before-send.s3.PutObject", record)
    s3_blobs.client.meta.events.register("before-send.s3.UploadPart", record)
    s3_blobs.put("fam1/small", b"small blob")
    s3_blobs.put("fam1/large", random_chunks(9 * MIB))
    assert len(sent) == 3
    for _url, data, checksum in sent:
        assert checksum == base64.b64encode(hashlib.sha256(data).digest()).decode()
    assert [len(d) for _, d, _ in sent] == [10, 8 * MIB, MIB]


def test_s3_read_checks_the_stored_checksum(s3_blobs: Any) -> None:
    """An object whose bytes do not match its SHA-256 (altered at rest or in transit) is
    refused on read, not returned."""
    from botocore.exceptions import FlexibleChecksumError

    wrong = base64.b64encode(hashlib.sha256(b"other bytes").digest()).decode()
    s3_blobs.client.put_object(Bucket=s3_blobs.bucket, Key="blobs/fam1/altered",
                               Body=b"these bytes", ChecksumAlgorithm="SHA256",
                               ChecksumSHA256=wrong)
    with pytest.raises(FlexibleChecksumError):
        s3_blobs.read("fam1/altered")


def test_s3_read_resumes_after_a_broken_stream(s3_blobs: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from botocore.exceptions import ResponseStreamingError

    data = os.urandom(3 * MIB)
    s3_blobs.put("fam1/photo", data)
    real_get = s3_blobs.client.get_object
    ranges: list[str | None] = []

    class Flaky:
        """A body that breaks after its first chunk."""

        def __init__(self, body: Any) -> None:
            self.body, self.reads = body, 0

        def read(self, n: int) -> bytes:
            self.reads += 1
            if self.reads == 2:
                raise ResponseStreamingError(error="connection reset")
            return bytes(self.body.read(n))

        def close(self) -> None:
            self.body.close()

    def get_object(**kwargs: Any) -> Any:
        ranges.append(kwargs.get("Range"))
        response = real_get(**kwargs)
        if len(ranges) == 1:
            response["Body"] = Flaky(response["Body"])
        return response

    monkeypatch.setattr(s3_blobs.client, "get_object", get_object)
    assert b"".join(s3_blobs.open("fam1/photo", MIB)) == data
    assert ranges == [None, f"bytes={MIB}-"]


def test_s3_sweep_aborts_old_incomplete_uploads(s3_blobs: Any) -> None:
    client = s3_blobs.client
    client.create_multipart_upload(Bucket=s3_blobs.bucket, Key="blobs/fam1/crashed")
    client.create_multipart_upload(Bucket=s3_blobs.bucket, Key="elsewhere/not-ours")
    assert s3_blobs.sweep_incomplete_uploads(older_than=0) == 0  # none that old
    assert s3_blobs.sweep_incomplete_uploads(older_than=time.time() + 3600) == 1
    left = client.list_multipart_uploads(Bucket=s3_blobs.bucket).get("Uploads", [])
    assert [u["Key"] for u in left] == ["elsewhere/not-ours"]
    client.abort_multipart_upload(Bucket=s3_blobs.bucket, Key=left[0]["Key"],
                                  UploadId=left[0]["UploadId"])


# -- PostgreSQL (scripts/pg) -----------------------------------------------------------------


def test_postgres_accepts_a_psycopg_connection(postgres_url: str) -> None:
    import psycopg

    assert postgres_url.startswith("postgresql://postgres@127.0.0.1:")
    assert postgres_url.endswith("/privface")
    with psycopg.connect(postgres_url, connect_timeout=10) as conn:
        version = conn.execute("SHOW server_version_num").fetchone()
        fsync = conn.execute("SHOW fsync").fetchone()
        database = conn.execute("SELECT current_database()").fetchone()
    assert version is not None and int(version[0]) >= 150000
    assert fsync == ("on",)
    assert database == ("privface",)


def test_fresh_postgres_databases_are_empty_and_separate(fresh_postgres_url: str,
                                                         postgres_url: str) -> None:
    import psycopg

    assert fresh_postgres_url != postgres_url
    with psycopg.connect(fresh_postgres_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE t (x int)")
    with psycopg.connect(postgres_url) as conn:
        names = [r[0] for r in conn.execute("SELECT datname FROM pg_database")]
        here = conn.execute("SELECT to_regclass('public.t')").fetchone()
    assert fresh_postgres_url.rsplit("/", 1)[1] in names
    assert here == (None,)  # the table went to the fresh database only


def test_scripts_pg_start_is_idempotent_and_survives_a_taken_port(postgres_url: str) -> None:
    """A second cluster asked for the port the first one holds takes the next free one;
    start twice gives the same URL; stop, start again (same cluster), destroy."""
    import psycopg

    taken = postgres_url.rsplit(":", 1)[1].split("/")[0]
    folder = Path("/tmp") / f"privface-pg-pytest-cycle-{os.getpid()}"
    env = {**os.environ, "PRIVFACE_PG_DIR": str(folder), "PRIVFACE_PG_PORT": taken,
           "PRIVFACE_PG_OWNER": str(os.getpid())}

    def pg(*args: str) -> str:
        done = subprocess.run([str(SCRIPTS_PG), *args], env=env, capture_output=True,
                              text=True, timeout=180, check=False)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    try:
        url = pg("start")
        assert url.startswith("postgresql://postgres@127.0.0.1:")
        assert f":{taken}/" not in url
        assert pg("start") == url
        assert pg("url") == url
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (x int)")
        pg("stop")
        assert "not running" in subprocess.run(
            [str(SCRIPTS_PG), "status"], env=env, capture_output=True, text=True,
            check=False).stdout
        url2 = pg("start")
        with psycopg.connect(url2) as conn:
            assert conn.execute("SELECT to_regclass('public.kept')").fetchone() == ("kept",)
    finally:
        pg("destroy")
    assert not folder.exists()


def test_an_unreachable_s3_service_is_unavailable_not_internal() -> None:
    """A service that stops answering (after botocore's own retries) is
    StorageUnavailableError for every operation: the server answers UNAVAILABLE."""
    import boto3
    from botocore.config import Config

    from common.errors import StorageUnavailableError
    from server.blobs_s3 import S3Blobs

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    client = boto3.session.Session().client(
        "s3", endpoint_url=f"http://127.0.0.1:{port}", aws_access_key_id="x",
        aws_secret_access_key="y", region_name="us-east-1",
        config=Config(connect_timeout=1, retries={"max_attempts": 1}))
    store = S3Blobs(client, "privface-down")
    for operation in (lambda: store.put("a/b", b"x"), lambda: store.read("a/b"),
                      lambda: store.delete("a/b"), lambda: list(store.list())):
        with pytest.raises(StorageUnavailableError, match="retry shortly"):
            operation()
