"""Shared fixtures: the real server on port 0 (TLS, on a throwaway CA made once per
session), a temp store, a registered family.

The session trusts that CA through PRIVFACE_TLS_CA (set below for the whole run), so
``PrivfaceClient(address)``, ``ClientConfig.load()`` and CLI or app subprocesses that
inherit the environment all connect with TLS and need no extra setting.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from client.config import ClientConfig
from client.keystore import FamilyBundle
from client.pipeline import faces
from client.pipeline.family import create_family
from client.rpc import Credentials, PrivfaceClient, open_channel
from server.app import create_server
from server.config import ServerConfig
from server.tls import DevCerts, write_dev_certs

pytest_plugins = ["tests.backends"]  # PostgreSQL and S3 (moto) fixtures: tests/backends.py

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/data is absent ({path} not found): real photos are needed")
    return path


# Transport settings of the developer's shell must not leak into the tests.
TRANSPORT_ENV = ("PRIVFACE_TLS_CA", "PRIVFACE_TLS_CLIENT_CERT", "PRIVFACE_TLS_CLIENT_KEY",
                 "PRIVFACE_TLS_SERVER_NAME", "PRIVFACE_INSECURE", "PRIVFACE_TLS_CERT",
                 "PRIVFACE_TLS_KEY", "PRIVFACE_TLS_CLIENT_CA", "PRIVFACE_VENDOR_TOKEN")


@pytest.fixture(scope="session")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> DevCerts:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client
    certificate, made once per session."""
    return write_dev_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="session", autouse=True)
def trust_test_ca(tls_certs: DevCerts) -> Iterator[None]:
    """Every client of the session trusts the test CA (PRIVFACE_TLS_CA) and nothing else
    of the shell's transport settings applies."""
    saved = {name: os.environ.pop(name, None) for name in TRANSPORT_ENV}
    os.environ["PRIVFACE_TLS_CA"] = str(tls_certs.ca)
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def tls_server_config(certs: DevCerts, **fields: Any) -> ServerConfig:
    """A TLS ServerConfig on the test certificate (host 127.0.0.1, port 0 unless given)."""
    return replace(ServerConfig(host="127.0.0.1", port=0, tls_cert=certs.server_cert,
                                tls_key=certs.server_key), **fields)


@pytest.fixture
def server_config(tmp_path: Path, tls_certs: DevCerts) -> ServerConfig:
    """A TLS config on port 0 with a fresh data dir and small limits for limit tests."""
    return tls_server_config(tls_certs, data_dir=tmp_path / "server",
                             max_photo_bytes=8 * 1024 * 1024, grace_seconds=0.5)


@pytest.fixture
def client_config(tls_certs: DevCerts) -> ClientConfig:
    """Client settings that trust the test CA (what ClientConfig.load() gives in tests)."""
    return ClientConfig(tls_ca=tls_certs.ca)


def channel(address: str) -> grpc.Channel:
    """A raw gRPC channel to a test server (TLS, trusting the test CA)."""
    return open_channel(address, ClientConfig.load())


@pytest.fixture
def server(server_config: ServerConfig) -> Iterator[tuple[str, ServerConfig]]:
    """A real privface server; yields (address, config)."""
    srv, port, _health = create_server(server_config)
    srv.start()
    try:
        yield f"127.0.0.1:{port}", server_config
    finally:
        srv.stop(0).wait()


@pytest.fixture
def address(server: tuple[str, ServerConfig]) -> str:
    """The server's host:port."""
    return server[0]


@pytest.fixture
def family(address: str) -> Iterator[tuple[PrivfaceClient, FamilyBundle]]:
    """A registered family with members Mum, Tom, Dad, Gran; yields (client, bundle)."""
    with PrivfaceClient(address) as client:
        bundle = create_family(client)
        for name in ("Mum", "Tom", "Dad", "Gran"):
            bundle.add_member(name)
        yield client, bundle


def enroll_embeddings(client: PrivfaceClient, bundle: FamilyBundle, name: str,
                      embeddings: np.ndarray) -> int:
    """Adds a member's embeddings to the gallery (keys already ensured); the gallery size."""
    return faces.add_faces(client, bundle, bundle.add_member(name), embeddings)


def connect(address: str, bundle: FamilyBundle) -> PrivfaceClient:
    """A client with the bundle's credentials."""
    return PrivfaceClient(address, Credentials(bundle.family_id, bundle.access_token))
