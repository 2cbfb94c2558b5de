"""The privface CLI in-process against a real server: the user-visible flow and errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from client.cli import main
from tests.conftest import require_data

PASSPHRASE = "a test passphrase"


@pytest.fixture
def cli_env(address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PRIVFACE_SERVER", address)
    monkeypatch.setenv("PRIVFACE_BUNDLE", str(tmp_path / "family.bundle"))
    monkeypatch.setenv("PRIVFACE_PASSPHRASE", PASSPHRASE)
    monkeypatch.setenv("PRIVFACE_EXPORT_PASSPHRASE", "the export passphrase")
    return tmp_path


def _photo(path: Path, seed: int) -> Path:
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 255, (40, 50, 3), np.uint8))
    return path


def _one_clear_line(err: str, *fragments: str) -> None:
    """A person's error: one `error:` line naming the problem, never a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def test_family_backup_search_fetch_delete(cli_env: Path, capsys) -> None:
    assert main(["family", "create"]) == 0
    assert main(["people", "add", "Mum", "Tom"]) == 0
    a, b = _photo(cli_env / "a.png", 1), _photo(cli_env / "b.png", 2)
    assert main(["backup", str(a), "--people", "Mum,Tom"]) == 0
    assert main(["backup", str(b), "--people", "Tom"]) == 0
    capsys.readouterr()
    assert main(["search", "--people", "Mum,Tom"]) == 0
    both = capsys.readouterr().out.split()
    assert main(["search", "--people", "Tom"]) == 0
    tom = capsys.readouterr().out.split()
    assert len(both) == 1 and len(tom) == 2 and both[0] in tom
    assert main(["fetch", both[0], "-o", str(cli_env / "out.png")]) == 0
    assert (cli_env / "out.png").read_bytes() == a.read_bytes()
    assert main(["delete", both[0]]) == 0
    capsys.readouterr()
    assert main(["list"]) == 0
    assert capsys.readouterr().out.split() == [t for t in tom if t != both[0]]


def test_backup_folder_recursive_summary_and_fetch_many(cli_env: Path, capsys) -> None:
    assert main(["family", "create"]) == 0
    assert main(["people", "add", "Mum"]) == 0
    (cli_env / "album" / "2025").mkdir(parents=True)
    top = _photo(cli_env / "album" / "top.png", 3)
    deep = _photo(cli_env / "album" / "2025" / "deep.png", 4)
    (cli_env / "album" / "notes.txt").write_text("not a photo")
    capsys.readouterr()
    assert main(["backup", str(cli_env / "album"), "--people", "Mum"]) == 0
    assert len(capsys.readouterr().out.split("\n")) - 1 == 1  # only the top level
    assert main(["backup", str(cli_env / "album"), "--recursive", "--people", "Mum"]) == 0
    out, err = capsys.readouterr()
    # the photo already there is not sent or labelled again: only the new one counts
    assert "2 photo(s): 1 new, 1 already there, 0 failed" in err and "Mum 1" in err
    ids = [line.split()[0] for line in out.splitlines()]
    assert main(["fetch", *ids, "-o", str(cli_env / "got")]) == 0
    fetched = sorted(p.read_bytes() for p in (cli_env / "got").iterdir())
    assert fetched == sorted([top.read_bytes(), deep.read_bytes()])
    assert main(["fetch", *ids, "--thumbnail", "-o", str(cli_env / "thumbs")]) == 0
    assert all(p.name.endswith(".thumb.jpg") for p in (cli_env / "thumbs").iterdir())


def test_every_error_a_person_can_cause_is_one_clear_line(
        cli_env: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["search", "--people", "Mum"]) == 1
    _one_clear_line(capsys.readouterr().err, "privface family create")
    assert main(["family", "create"]) == 0
    assert main(["people", "add", "Mum"]) == 0
    capsys.readouterr()
    # an unknown member name
    assert main(["search", "--people", "Bob"]) == 1
    _one_clear_line(capsys.readouterr().err, "unknown person 'Bob'", "Mum")
    # a missing photo
    assert main(["backup", str(cli_env / "missing.jpg"), "--people", "Mum"]) == 1
    _one_clear_line(capsys.readouterr().err, "missing.jpg")
    assert main(["search", "--photo", str(cli_env / "missing.jpg")]) == 1
    _one_clear_line(capsys.readouterr().err, "no such photo")
    # an unreadable photo
    broken = cli_env / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff this is not really a JPEG")
    assert main(["enroll", "Mum", str(broken)]) == 1
    _one_clear_line(capsys.readouterr().err, "no usable face for Mum", "broken.jpg")
    # a photo with no face
    noise = _photo(cli_env / "noise.png", 5)
    assert main(["search", "--photo", str(noise)]) == 1
    _one_clear_line(capsys.readouterr().err, "no face found")
    # an unknown photo id
    assert main(["fetch", "0" * 32, "-o", str(cli_env / "x")]) == 1
    _one_clear_line(capsys.readouterr().err, "no photo")
    # a wrong passphrase
    monkeypatch.setenv("PRIVFACE_PASSPHRASE", "the wrong passphrase")
    assert main(["people"]) == 1
    _one_clear_line(capsys.readouterr().err, "wrong passphrase")
    monkeypatch.setenv("PRIVFACE_PASSPHRASE", PASSPHRASE)
    # an unreachable server
    monkeypatch.setenv("PRIVFACE_SERVER", "127.0.0.1:1")
    assert main(["list"]) == 1
    _one_clear_line(capsys.readouterr().err, "is privface-server running")


def test_export_join_search_across_phones_and_revoke(cli_env: Path, capsys,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    phone_a, phone_b = cli_env / "a.bundle", cli_env / "b.bundle"
    a = ["--bundle", str(phone_a)]
    b = ["--bundle", str(phone_b)]
    assert main([*a, "family", "create", "--device-name", "Mum's phone"]) == 0
    assert main([*a, "people", "add", "Mum", "Tom"]) == 0
    first = _photo(cli_env / "first.png", 6)
    assert main([*a, "backup", str(first), "--people", "Mum"]) == 0
    export = cli_env / "family.export"
    assert main([*a, "family", "export", "--to", str(export)]) == 0
    assert main([*b, "family", "join", str(export), "--device-name", "Tom's phone"]) == 0
    capsys.readouterr()
    # the second phone finds what the first backed up, and the other way round
    assert main([*b, "search", "--people", "Mum"]) == 0
    found_on_b = capsys.readouterr().out.split()
    assert len(found_on_b) == 1
    second = _photo(cli_env / "second.png", 7)
    assert main([*b, "people", "add", "Gran"]) == 0  # the roster is shared
    assert main([*b, "backup", str(second), "--people", "Tom,Gran"]) == 0
    capsys.readouterr()
    assert main([*a, "search", "--people", "Gran"]) == 0
    found_on_a = capsys.readouterr().out.split()
    assert len(found_on_a) == 1 and found_on_a != found_on_b
    assert main([*a, "fetch", found_on_a[0], "-o", str(cli_env / "from_b.png")]) == 0
    assert (cli_env / "from_b.png").read_bytes() == second.read_bytes()
    capsys.readouterr()
    # the export is used up
    assert main([*b, "family", "join", str(export), "--force"]) == 1
    _one_clear_line(capsys.readouterr().err, "invitation")
    # devices: both listed, names readable only on the phones
    assert main([*a, "devices"]) == 0
    listing = capsys.readouterr().out
    assert "Mum's phone" in listing and "Tom's phone" in listing
    assert main([*a, "devices", "revoke", "Tom's phone"]) == 0
    capsys.readouterr()
    assert main([*b, "list"]) == 1
    _one_clear_line(capsys.readouterr().err, "revoked")
    assert main([*a, "list"]) == 0


def test_enroll_real_photos_skips_bad_ones_and_uses_the_largest_face(cli_env: Path,
                                                                     capsys) -> None:
    people = require_data("photos", "people")
    group = require_data("photos", "group_face_recognition_examples", "obama_and_biden.jpg")
    dogs = require_data("photos", "dlib_examples_group", "dogs.jpg")
    broken = cli_env / "broken.jpg"
    broken.write_bytes(b"not an image")
    assert main(["family", "create"]) == 0
    capsys.readouterr()
    assert main(["enroll", "Obama", str(people / "obama" / "obama.jpg"), str(group),
                 str(dogs), str(broken)]) == 0
    out, err = capsys.readouterr()
    assert "enrolled Obama with 2 of 4 photo(s)" in out
    assert "faces: used the largest" in err
    assert "skipped" in err and "dogs.jpg" in err and "broken.jpg" in err
    assert main(["identify", str(people / "obama" / "obama2.jpg")]) == 0
    assert capsys.readouterr().out.startswith("Obama")


def test_second_phone_adopts_the_family_keys(cli_env: Path, capsys) -> None:
    people = require_data("photos", "people")
    a = ["--bundle", str(cli_env / "a.bundle")]
    b = ["--bundle", str(cli_env / "b.bundle")]
    assert main([*a, "family", "create"]) == 0
    export = cli_env / "family.export"
    # exported before any key exists: both phones could make one; only one may win
    assert main([*a, "family", "export", "--to", str(export)]) == 0
    assert main([*b, "family", "join", str(export)]) == 0
    assert main([*b, "enroll", "Biden", str(people / "biden" / "biden.jpg")]) == 0
    capsys.readouterr()
    assert main([*a, "enroll", "Obama", str(people / "obama" / "obama.jpg")]) == 0
    assert "using the family's CKKS keys made on another phone" in capsys.readouterr().err
    for phone in (a, b):
        assert main([*phone, "identify", str(people / "biden" / "biden2.jpg")]) == 0
        assert capsys.readouterr().out.startswith("Biden")
        assert main([*phone, "people"]) == 0
        listing = capsys.readouterr().out
        assert "Obama" in listing and "Biden" in listing


def test_sealed_roster_size_does_not_follow_the_names(cli_env: Path, address: str) -> None:
    from client.config import ClientConfig
    from client.session import FamilySession
    assert main(["family", "create"]) == 0
    sizes = []
    with FamilySession(cli_env / "family.bundle", PASSPHRASE, ClientConfig.load()) as s:
        for names in (["Al"], ["Bartholomew-Alexander"], ["C", "Dorothea", "E"]):
            s.add_members(names)
            sizes.append(len(s.client.get_sealed_item("roster")[1]))
    assert len(set(sizes)) == 1
