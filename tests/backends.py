"""Pytest plugin: real storage back ends for the tests (registered in tests/conftest.py).

PostgreSQL
    ``postgres_url`` (session): ``postgresql://postgres@127.0.0.1:PORT/privface`` of a
    throwaway cluster. ``$PRIVFACE_TEST_POSTGRES`` names one already running (scripts/test and
    so CI start it with scripts/pg and export it: a broken one fails loudly there);
    ``PRIVFACE_TEST_POSTGRES=skip`` skips the PostgreSQL tests; unset, the plugin starts its own
    cluster with scripts/pg once per session (in a fresh folder, on a free port) and removes it
    at the end, and skips those tests with the reason when PostgreSQL cannot start (outside CI;
    with ``CI`` set that is a failure).
    ``fresh_postgres_url`` (function): a new empty database ``t_<random>`` on that cluster for
    one test, dropped afterwards (``WITH (FORCE)``: open connections do not keep it).

S3
    ``moto_s3_endpoint`` (session): ``http://127.0.0.1:PORT`` of moto's standalone
    S3-compatible server (the only one installable here), running in a thread of the session.
    ``s3_env`` (function): points ``PRIVFACE_S3_ENDPOINT``/``PRIVFACE_S3_REGION``, test
    credentials (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) and
    ``PRIVFACE_S3_CREATE_BUCKET=1`` at it for one test (monkeypatch: subprocesses started by the
    test inherit them); returns the endpoint.
    ``s3_bucket_url`` (function): ``s3://<fresh bucket>/blobs``, emptied and removed afterwards.
    ``s3_blobs`` (function): an ``S3Blobs`` on that URL.

Both
    ``blob_store`` (function, parametrised ``file`` / ``s3``): a ``FileBlobs`` in a temp folder or
    the ``s3_blobs`` above, so one test runs against both blob stores.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from server.blobs import BlobStore, FileBlobs

if TYPE_CHECKING:
    from server.blobs_s3 import S3Blobs

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_PG = ROOT / "scripts" / "pg"
PG_START_TIMEOUT = 600  # seconds: may install Debian's postgresql first


def with_database(url: str, name: str) -> str:
    """The same PostgreSQL URL naming database ``name``."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def _check_postgres(url: str) -> None:
    import psycopg

    with psycopg.connect(url, connect_timeout=10) as conn:
        conn.execute("SELECT 1")


def _start_cluster() -> tuple[str, dict[str, str]]:
    """Starts a scripts/pg cluster in a fresh folder; (url, its environment)."""
    folder = tempfile.mkdtemp(prefix="privface-pg-pytest-", dir="/tmp")
    env = {**os.environ, "PRIVFACE_PG_DIR": folder, "PRIVFACE_PG_OWNER": str(os.getpid())}
    env.pop("PRIVFACE_PG_PORT", None)
    try:
        done = subprocess.run([str(SCRIPTS_PG), "start"], env=env, capture_output=True,
                              text=True, timeout=PG_START_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = f"scripts/pg start: {exc}"
    else:
        if done.returncode == 0:
            return done.stdout.strip().splitlines()[-1], env
        reason = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    subprocess.run([str(SCRIPTS_PG), "destroy"], env=env, capture_output=True, check=False)
    message = f"PostgreSQL could not be started ({reason})"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """The URL of the session's PostgreSQL database ``privface`` (see the module's docstring)."""
    given = os.environ.get("PRIVFACE_TEST_POSTGRES", "")
    if given == "skip":
        pytest.skip("PRIVFACE_TEST_POSTGRES=skip: PostgreSQL tests not run")
    if given:
        try:
            _check_postgres(given)
        except Exception as exc:  # noqa: BLE001 - any failure to connect is reported as is
            pytest.fail(f"PRIVFACE_TEST_POSTGRES={given} does not accept connections: {exc}")
        yield given
        return
    url, env = _start_cluster()
    try:
        yield url
    finally:
        subprocess.run([str(SCRIPTS_PG), "destroy"], env=env, capture_output=True, check=False)


@pytest.fixture
def fresh_postgres_url(postgres_url: str) -> Iterator[str]:
    """A new empty database on the session's cluster, for this test only."""
    import psycopg
    from psycopg import sql

    name = f"t_{secrets.token_hex(8)}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield with_database(postgres_url, name)
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))


@pytest.fixture(scope="session")
def moto_s3_endpoint() -> Iterator[str]:
    """moto's S3-compatible server on a free port of 127.0.0.1, for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


# Settings of the developer's shell that must not reach the S3 tests.
AWS_ENV = ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ENDPOINT_URL",
           "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION")


@pytest.fixture
def s3_env(moto_s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """PRIVFACE_S3_* and test AWS credentials pointing at moto, for this test."""
    for name in AWS_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PRIVFACE_S3_ENDPOINT", moto_s3_endpoint)
    monkeypatch.setenv("PRIVFACE_S3_REGION", "us-east-1")
    monkeypatch.setenv("PRIVFACE_S3_CREATE_BUCKET", "1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "privface-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "privface-test-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return moto_s3_endpoint


def _empty_bucket(client: Any, bucket: str) -> None:
    for page in client.get_paginator("list_multipart_uploads").paginate(Bucket=bucket):
        for upload in page.get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"],
                                          UploadId=upload["UploadId"])
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            client.delete_object(Bucket=bucket, Key=item["Key"])
    client.delete_bucket(Bucket=bucket)


@pytest.fixture
def s3_bucket_url(s3_env: str) -> Iterator[str]:
    """``s3://<fresh bucket>/blobs`` on moto (created on first use, removed afterwards)."""
    from server.blobs_s3 import S3Blobs

    bucket = f"privface-test-{secrets.token_hex(6)}"
    url = f"s3://{bucket}/blobs"
    yield url
    store = S3Blobs.from_url(url)  # (creates it if the test never did)
    _empty_bucket(store.client, bucket)


@pytest.fixture
def s3_blobs(s3_bucket_url: str) -> S3Blobs:
    """An S3Blobs on a fresh moto bucket, under the prefix ``blobs``."""
    from server.blobs_s3 import S3Blobs

    return S3Blobs.from_url(s3_bucket_url)


@pytest.fixture(params=["file", "s3"])
def blob_store(request: pytest.FixtureRequest, tmp_path: Path) -> BlobStore:
    """Each blob store in turn: a directory, then S3 (moto)."""
    if request.param == "file":
        return FileBlobs(tmp_path / "blobs")
    store: BlobStore = request.getfixturevalue("s3_blobs")
    return store
