"""The app's controllers against a real server on port 0, without a window."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from client.app.controllers.backup import BackupTile
from client.app.controllers.context import AppContext, AppPaths, AppSettings
from client.app.controllers.registry import Controllers
from client.rpc import ServerUnavailableError
from common.errors import (
    AlreadyExistsError,
    AuthenticationError,
    MalformedInputError,
    NotFoundError,
    PreconditionError,
    WrongPassphraseError,
)
from tests.app.conftest import PASSPHRASE
from tests.conftest import require_data

JPEG = b"\xff\xd8\xff"


def _noise(path: Path) -> Path:
    """A photo without a face."""
    cv2.imwrite(str(path), np.random.default_rng(7).integers(0, 255, (120, 160, 3), np.uint8))
    return path


def test_create_lock_unlock(app: Controllers) -> None:
    with pytest.raises(PreconditionError, match="set up or unlock"):
        app.people.members()
    with pytest.raises(MalformedInputError, match="at least 8"):
        app.setup.create("short", "short", "phone")
    with pytest.raises(MalformedInputError, match="differ"):
        app.setup.create(PASSPHRASE, PASSPHRASE + "!", "phone")
    with pytest.raises(MalformedInputError, match="name"):
        app.setup.create(PASSPHRASE, PASSPHRASE, "  ")
    assert not app.ctx.has_bundle  # nothing was registered or written for those
    view = app.setup.create(PASSPHRASE, PASSPHRASE, "kitchen phone")
    assert (view.members, view.photos, view.device) == (0, 0, "kitchen phone")
    assert view.family_id.startswith("fam_") and "kitchen phone" in view.headline
    with pytest.raises(AlreadyExistsError):
        app.setup.create(PASSPHRASE, PASSPHRASE, "again")
    app.setup.lock()
    assert not app.ctx.is_open
    with pytest.raises(WrongPassphraseError):
        app.setup.unlock("not the passphrase")
    assert app.setup.unlock(PASSPHRASE).family_id == view.family_id
    assert app.people.members() == []


def test_enroll_backup_search_fetch_rename_remove(family_app: Controllers,
                                                  tmp_path: Path) -> None:
    photos = require_data("photos")
    people = photos / "people"
    app = family_app
    progress: list[tuple[str, int]] = []
    enrolled = app.people.enroll(
        "obama", f"{people / 'obama' / 'obama.jpg'}; {_noise(tmp_path / 'wall.png')}",
        lambda what, n: progress.append((what, n)))
    assert [(f.used, f.path.name) for f in enrolled.faces] == [(True, "obama.jpg"),
                                                               (False, "wall.png")]
    assert enrolled.faces[0].preview.startswith(JPEG)  # the face crop with its box
    assert "no face" in enrolled.faces[1].note and enrolled.faces[1].preview.startswith(JPEG)
    assert "1 of 2 photo(s) used" in enrolled.message
    assert ("faces", 1) in progress
    app.people.enroll("biden", str(people / "biden" / "biden.jpg"))
    assert [r.label for r in app.people.members()] == ["obama (1 face)",
                                                      "biden (1 face)"]

    files = [people / "obama" / "obama3.jpg", people / "biden" / "biden2.jpg",
             photos / "group_face_recognition_examples" / "obama_and_biden.jpg"]
    with pytest.raises(MalformedInputError, match="pick photos"):
        app.backup.photos(" ; ")
    chosen = app.backup.photos("; ".join(map(str, files)))
    assert chosen == files
    tiles: list[BackupTile] = []
    result = app.backup.backup(chosen, on_tile=tiles.append)
    assert [(t.path.name, t.names) for t in tiles] == [
        ("obama3.jpg", ["obama"]), ("biden2.jpg", ["biden"]),
        ("obama_and_biden.jpg", ["biden", "obama"])]
    assert all(t.ok and t.thumbnail.startswith(JPEG) for t in tiles)
    assert (result.stored, result.already, result.failed) == (3, 0, 0)
    assert result.who == {"obama": 2, "biden": 2}
    again = app.backup.backup(chosen[:1])
    assert (again.stored, again.already) == (0, 1)
    assert result.bytes_sent > sum(len(p.read_bytes()) for p in chosen) and again.bytes_sent == 0
    assert "MB sent" in result.message

    ids = {t.path.name: t.photo_id for t in tiles}
    obama = app.search.by_members(["obama"])
    assert sorted(obama.ids) == sorted([ids["obama3.jpg"], ids["obama_and_biden.jpg"]])
    assert "2 photos with obama" in obama.message
    assert app.search.by_members(["obama", "biden"]).ids == [ids["obama_and_biden.jpg"]]
    assert len(app.search.by_members(["obama", "biden"], "any").ids) == 3
    with pytest.raises(MalformedInputError, match="tick at least one"):
        app.search.by_members([])
    by_photo = app.search.by_photo(str(people / "biden" / "biden.jpg"))
    assert sorted(by_photo.ids) == sorted([ids["biden2.jpg"], ids["obama_and_biden.jpg"]])
    assert by_photo.message.startswith("biden.jpg shows biden")
    assert app.search.thumbnail(ids["biden2.jpg"]) == tiles[1].thumbnail
    assert app.search.photo(ids["biden2.jpg"]) == files[1].read_bytes()

    app.people.rename("obama", "Barack")
    assert sorted(app.search.by_members(["Barack"]).ids) == sorted(obama.ids)
    assert "removed biden and 1 encrypted face(s)" in app.people.remove("biden")
    assert [r.name for r in app.people.members()] == ["Barack"]
    with pytest.raises(NotFoundError):
        app.search.by_members(["biden"])


def test_export_join_revoke(make_app: Callable[[str], Controllers], tmp_path: Path) -> None:
    first = make_app("first")
    first.setup.create(PASSPHRASE, PASSPHRASE, "Mum's phone")
    export = tmp_path / "family.export"
    with pytest.raises(MalformedInputError, match="differ"):
        first.devices.export(str(export), "export passphrase", "another one")
    assert "one use" in first.devices.export(str(export), "export passphrase",
                                             "export passphrase")
    second = make_app("second")
    with pytest.raises(WrongPassphraseError):
        second.setup.join(str(export), "wrong passphrase", PASSPHRASE, PASSPHRASE, "tablet")
    view = second.setup.join(str(export), "export passphrase", PASSPHRASE, PASSPHRASE,
                             "Gran's tablet")
    assert view.device == "Gran's tablet"
    rows = first.devices.devices()
    assert [(r.name, r.can_revoke) for r in rows] == [("Mum's phone", False),
                                                     ("Gran's tablet", True)]
    assert "this phone" in rows[0].detail
    assert first.devices.revoke(rows[1].device_id).startswith("revoked Gran's tablet")
    assert "revoked" in first.devices.devices()[1].detail
    with pytest.raises(AuthenticationError):
        second.people.members()


def test_settings_persist_and_reconnect(family_app: Controllers, address: str) -> None:
    app = family_app
    with pytest.raises(MalformedInputError, match="HOST:PORT"):
        app.settings.save("no-port", "default")
    with pytest.raises(MalformedInputError, match="detection mode"):
        app.settings.save("", "fastest")
    with pytest.raises(NotFoundError, match="CA certificate"):
        app.settings.save("", "default", str(app.ctx.paths.data_dir / "missing.pem"))
    test_ca = os.environ["PRIVFACE_TLS_CA"]  # the test CA (tests/conftest.py)
    assert app.settings.view().effective_tls_ca == test_ca  # from the environment
    assert app.settings.save("127.0.0.1:1", "faithful", test_ca)  # must reconnect to apply
    with pytest.raises(ServerUnavailableError):
        app.setup.reconnect()
    assert app.ctx.is_open and app.ctx.require().client.address == address  # still usable
    stored = json.loads(app.ctx.paths.settings.read_text())
    assert stored == {"server": "127.0.0.1:1", "detection_mode": "faithful", "tls_ca": test_ca}
    again = AppContext(app.ctx.paths)
    assert again.settings == AppSettings("127.0.0.1:1", "faithful", test_ca)
    assert app.settings.save(f" {address} ", "default", test_ca)
    assert app.setup.reconnect().server == address
    view = app.settings.view()
    assert (view.server, view.effective_server, view.detection_mode) == (address, address,
                                                                         "default")
    assert view.secure_detection is False
    assert not app.settings.save(address, "default", test_ca)  # nothing changed
    with pytest.raises(NotFoundError):
        app.settings.import_product_key(str(app.ctx.paths.data_dir / "missing.key"))


def test_bundle_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRIVFACE_APP_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("PRIVFACE_BUNDLE", raising=False)
    assert AppPaths.from_env("/nowhere").bundle == tmp_path / "data" / "family.bundle"
    monkeypatch.setenv("PRIVFACE_BUNDLE", str(tmp_path / "elsewhere.bundle"))
    paths = AppPaths.from_env("/nowhere")
    assert (paths.data_dir, paths.bundle) == (tmp_path / "data", tmp_path / "elsewhere.bundle")
    paths.data_dir.mkdir()
    paths.settings.write_text("{not json")
    assert AppContext(paths).settings == AppSettings()  # unreadable settings: defaults
