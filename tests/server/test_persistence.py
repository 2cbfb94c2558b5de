"""State survives a server restart; racing identical uploads leave one consistent photo."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from client.pipeline import faces
from client.pipeline import photos as pipeline
from client.pipeline.family import create_family
from client.rpc import Credentials, PrivfaceClient
from common import labels, photo_crypto
from server.app import create_server
from server.config import ServerConfig
from server.tls import DevCerts
from tests.conftest import enroll_embeddings, tls_server_config
from tests.server.test_photo_service import _photo_bytes


def _serve(config: ServerConfig):
    server, port, _ = create_server(config)
    server.start()
    return server, f"127.0.0.1:{port}"


def test_photos_labels_and_gallery_survive_a_restart(tmp_path: Path,
                                                     tls_certs: DevCerts) -> None:
    config = tls_server_config(tls_certs, data_dir=tmp_path / "data")
    server, address = _serve(config)
    rng = np.random.default_rng(0)
    gallery = rng.standard_normal((3, 128))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    with PrivfaceClient(address) as client:
        bundle = create_family(client)
        bundle.add_member("Mum")
        bundle.add_member("Tom")
        ids = [pipeline.backup_photo(client, bundle, _photo_bytes(f"p{i}"), slots).photo_id
               for i, slots in enumerate([[0], [0, 1], [1]])]
        before, _ = pipeline.search_photos(client, bundle, [0], labels.MatchMode.ALL)
        faces.ensure_ckks_keys(client, bundle)
        enroll_embeddings(client, bundle, "Gran", gallery)
    server.stop(0).wait()

    server, address = _serve(config)  # a new process would see exactly these files
    try:
        with PrivfaceClient(address, Credentials(bundle.family_id, bundle.access_token)) as c:
            after, _ = pipeline.search_photos(c, bundle, [0], labels.MatchMode.ALL)
            assert after == before == [ids[1], ids[0]]
            assert pipeline.fetch_photo(c, bundle, ids[2]) == _photo_bytes("p2")
            (match,) = faces.identify(c, bundle, gallery[1:2])
            assert match.name == "Gran" and match.distance < 1e-3
            assert not faces.ensure_ckks_keys(c, bundle)  # the public context was kept
    finally:
        server.stop(0).wait()


def test_racing_identical_uploads_store_one_photo(family, server) -> None:
    client, bundle = family
    data = _photo_bytes("race")
    photo_id = pipeline.photo_id_for(bundle, data)
    blob = photo_crypto.encrypt_photo(bundle.master_key, bundle.family_id, photo_id,
                                               data)
    labels_ct = pipeline.encrypt_labels(bundle, [0])
    results, errors = [], []

    def upload() -> None:
        try:
            results.append(client.backup_photo(photo_id, blob, labels_ct,
                                               bundle.label_key.fingerprint()))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(results) == [False, True, True, True]
    assert client.list_photos() == [photo_id]
    blobs = [p for p in (server[1].data_dir / "blobs" / bundle.family_id).iterdir()]
    assert len(blobs) == 1
    assert pipeline.fetch_photo(client, bundle, photo_id) == data
