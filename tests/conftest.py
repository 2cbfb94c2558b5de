"""Shared fixtures: the real server on port 0, a temp store, a registered family."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from client.keystore import FamilyBundle
from client.pipeline import faces
from client.pipeline.family import create_family
from client.rpc import Credentials, PrivfaceClient
from server.app import create_server
from server.config import ServerConfig

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def require_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with the reason."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"../shared/data is absent ({path} not found): real photos are needed")
    return path


@pytest.fixture
def server_config(tmp_path: Path) -> ServerConfig:
    """A config on port 0 with a fresh data dir and small limits for limit tests."""
    return ServerConfig(host="127.0.0.1", port=0, data_dir=tmp_path / "server",
                        max_photo_bytes=8 * 1024 * 1024, grace_seconds=0.5)


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
