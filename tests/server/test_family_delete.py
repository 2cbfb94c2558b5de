"""A family deletes itself and all its data: `privface family delete --yes` end to end, then
the store is scanned (rows, files, raw bytes of the database) for anything of it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from client.cli import main
from client.config import ClientConfig
from client.pipeline import faces
from client.rpc import Credentials, PrivfaceClient
from client.session import FamilySession
from common.errors import AuthenticationError
from privface.v1 import family_pb2
from server.config import ServerConfig
from server.storage import FAMILY_TABLES, FamilyDeletion, Store
from tests.conftest import enroll_embeddings
from tests.server.conftest import StoreFactory

PASSPHRASE = "a test passphrase"


def _photo(path: Path, seed: int) -> Path:
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (40, 50, 3), np.uint8))
    return path


def _family(address: str, folder: Path, photos: int, seed: int) -> FamilySession:
    """A family with members, photos, an encrypted gallery (so CKKS keys and sealed items)."""
    folder.mkdir()
    session = FamilySession.create(folder / "family.bundle", PASSPHRASE,
                                   ClientConfig.load(server=address))
    session.add_members(["Mum", "Tom"])
    session.backup([_photo(folder / f"{i}.png", seed + i) for i in range(photos)],
                   people=["Mum"])
    faces.ensure_ckks_keys(session.client, session.bundle)
    emb = np.random.default_rng(seed).standard_normal((3, 128))
    enroll_embeddings(session.client, session.bundle, "Dad",
                      emb / np.linalg.norm(emb, axis=1, keepdims=True))
    session.save()
    return session


def _rows(db: Path, family_id: str) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return {table: conn.execute(f"SELECT COUNT(*) FROM {table} WHERE family_id = ?",
                                    (family_id,)).fetchone()[0] for table in FAMILY_TABLES}


def test_family_delete_leaves_nothing_of_the_family(server: tuple[str, ServerConfig],
                                                    tmp_path: Path, capsys) -> None:
    address, config = server
    mum = _family(address, tmp_path / "mum", photos=2, seed=1)
    other = _family(address, tmp_path / "other", photos=1, seed=7)
    family_id, token = mum.bundle.family_id, mum.bundle.access_token
    # A second phone of the family, and an unused invitation.
    mum.export(tmp_path / "export.bundle", "the export passphrase")
    phone2 = FamilySession.join(tmp_path / "export.bundle", "the export passphrase",
                                tmp_path / "phone2.bundle", PASSPHRASE,
                                ClientConfig.load(server=address))
    mum.client.create_device_invite()
    db = config.data_dir / "privface.sqlite3"
    before = _rows(db, family_id)
    assert before["photos"] == 2 and before["gallery_positions"] == 3
    assert before["devices"] == 2 and before["invites"] == 1 and before["sealed_items"] >= 3
    with sqlite3.connect(db) as conn:
        label_vectors = [r[0] for r in conn.execute(
            "SELECT labels FROM photos WHERE family_id = ?", (family_id,))]
    other_rows = _rows(db, other.bundle.family_id)
    bundle = mum.bundle_path
    mum.close()

    # Without --yes nothing happens.
    cli = ["--bundle", str(bundle), "--server", address, "family", "delete"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRIVFACE_PASSPHRASE", PASSPHRASE)
        assert main(cli) == 2
        assert "--yes" in capsys.readouterr().err
        assert _rows(db, family_id) == before
        assert main([*cli, "--yes"]) == 0
    out, err = capsys.readouterr()
    assert f"deleted family {family_id}" in out
    assert "2 photos, 3 encrypted faces, 2 devices" in out
    assert f"removed the bundle {bundle}" in err and not bundle.exists()

    # The store: no row, no file, no byte of the family; the other family is intact.
    assert set(_rows(db, family_id).values()) == {0}
    assert _rows(db, other.bundle.family_id) == other_rows
    blobs = config.data_dir / "blobs"
    assert not (blobs / family_id).exists() and (blobs / other.bundle.family_id).is_dir()
    for path in config.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert family_id.encode() not in data, path
            assert not any(v in data for v in label_vectors), path
    # Neither phone's token works any more; the other family's does.
    for creds in (Credentials(family_id, token), Credentials(
            family_id, phone2.bundle.access_token)):
        with PrivfaceClient(address, creds) as client, pytest.raises(AuthenticationError):
            client.get_family()
    assert other.client.get_family().photo_count == 1
    assert len(other.search(["Mum"])[0]) == 1
    phone2.close()
    other.close()


def test_delete_needs_confirmation_and_is_idempotent(family, server) -> None:
    client, bundle = family
    _address, config = server
    request = family_pb2.DeleteFamilyRequest(confirm_family_id="fam_" + "0" * 24)
    with pytest.raises(grpc.RpcError) as info:
        client.family.DeleteFamily(request, metadata=client.metadata(), timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "confirm_family_id" in (info.value.details() or "")
    assert client.get_family().family_id == bundle.family_id  # nothing was deleted

    gone = client.delete_family()
    assert gone.family_id == bundle.family_id and gone.devices == 1 and gone.photos == 0
    with pytest.raises(AuthenticationError):  # a retry: the token went with the family
        client.delete_family()
    store = Store(config.data_dir)
    assert store.delete_family(bundle.family_id) == FamilyDeletion(0, 0, 0, 0, 0)


def test_blobs_left_by_a_crash_after_the_commit_are_swept(make_store: StoreFactory) -> None:
    store = make_store()
    family_id, _token = store.create_family(bytes(16), 50)
    key = store.new_photo_key(family_id, "a" * 32)
    store.blobs.put(key, b"encrypted photo")
    store.put_photo(family_id, "a" * 32, key, 15, bytes(32), bytes(400), None)
    # The crash: the rows are gone (one transaction) but the blobs were not removed yet.
    with store.db.transaction(family_id) as db:
        for table in FAMILY_TABLES:
            db.execute(f"DELETE FROM {table} WHERE family_id = ?", (family_id,))
    assert store.blobs.read(key) == b"encrypted photo"
    restarted = make_store()
    assert restarted.sweep_orphans(min_age_seconds=3600) == 0  # young: maybe in flight
    assert restarted.sweep_orphans() == 1
    assert list(restarted.blobs.list(f"{family_id}/")) == []
