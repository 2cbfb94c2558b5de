"""Regressions of what the fuzzer (tests/server/test_fuzz.py) found, over real gRPC."""

from __future__ import annotations

import hashlib

import grpc
import numpy as np
import pytest

from client.pipeline import faces
from client.rpc import PrivfaceClient
from common import ckks
from common.errors import PreconditionError
from privface.v1 import family_pb2
from server.app import create_server
from server.storage import Store

EMBEDDING = np.full((1, ckks.DIM), 0.05)


def with_header(public: bytes, *, log2k: int | None = None, scale_bits: int | None = None
                ) -> bytes:
    """A serialised public context whose header claims another layout or scale (same key
    id, same keys: what a buggy or hostile phone can send)."""
    magic, version, kind, old_log2k, old_scale, key_id = ckks._CTX_HEADER.unpack_from(public)
    header = ckks._CTX_HEADER.pack(magic, version, kind,
                                   old_log2k if log2k is None else log2k,
                                   old_scale if scale_bits is None else scale_bits, key_id)
    return header + public[ckks._CTX_HEADER.size:]


@pytest.fixture
def gallery_family(family) -> tuple[PrivfaceClient, ckks.SecretContext]:
    client, bundle = family
    faces.ensure_ckks_keys(client, bundle)
    secret = faces.secret_context(bundle)
    client.add_gallery_entries(0, 0, 0, 1, ckks.encrypt_entries(secret, EMBEDDING, 0))
    return client, secret


def distance(client: PrivfaceClient, secret: ckks.SecretContext) -> float:
    (reply,) = client.match_faces([ckks.encrypt_query(secret, EMBEDDING[0])])
    return float(ckks.decrypt_distances(secret, reply.ciphertext, 1)[0])


@pytest.mark.parametrize("change", [{"log2k": 3}, {"scale_bits": 20}])
def test_context_claiming_the_family_key_with_another_layout_is_refused(
        gallery_family, change: dict[str, int]) -> None:
    """The fuzzer found it: a public context with the family's key id but another layout
    (k = 8) or scale was stored, and then every gallery call of the family (layout, add,
    match, re-pack) ended in INTERNAL. It is refused now and the gallery keeps working."""
    client, secret = gallery_family
    forged = with_header(ckks.public_context_bytes(secret), **change)
    ckks.load_public_context(forged)  # on its own it is a valid context
    with pytest.raises(PreconditionError, match="does not fit the family's encrypted gallery"):
        client.upload_public_context(forged)
    assert client.gallery_layout() == {0: [0]}
    assert distance(client, secret) < 1e-3
    client.upload_public_context(ckks.public_context_bytes(secret))  # its own: still fine


def test_gallery_under_an_unfitting_stored_context_is_failed_precondition(
        gallery_family, server) -> None:
    """Such a context stored by a server before the check: the family's gallery calls say
    what is wrong (FAILED_PRECONDITION) instead of INTERNAL."""
    client, secret = gallery_family
    assert client.credentials is not None
    config = server[1]
    forged = with_header(ckks.public_context_bytes(secret), log2k=3)
    Store(config.data_dir).store_public_context(client.credentials.family_id, forged,
                                                secret.key_id)
    restarted, port, _ = create_server(config)  # a fresh gallery cache on the same data
    restarted.start()
    try:
        with PrivfaceClient(f"127.0.0.1:{port}", client.credentials) as again:
            for call in (again.gallery_layout,
                         lambda: again.match_faces([ckks.encrypt_query(secret, EMBEDDING[0])])):
                with pytest.raises(PreconditionError, match="does not load under its stored"):
                    call()
            # The family's own context, uploaded again, repairs it.
            again.upload_public_context(ckks.public_context_bytes(secret))
            assert distance(again, secret) < 1e-3
    finally:
        restarted.stop(0).wait()


def test_refusal_is_failed_precondition_on_the_wire(gallery_family) -> None:
    client, secret = gallery_family
    forged = with_header(ckks.public_context_bytes(secret), log2k=3)
    request = family_pb2.UploadPublicContextRequest(
        total_size=len(forged), chunk=forged, sha256=hashlib.sha256(forged).digest())
    with pytest.raises(grpc.RpcError) as info:
        client.family.UploadPublicContext(iter([request]), metadata=client.metadata(),
                                          timeout=120)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
