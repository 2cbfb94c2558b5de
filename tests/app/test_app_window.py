"""The real app in a real window under Xvfb, against a real server: create a family,
enroll two members, back up photos, search by members and by photo, open a photo, export,
revoke a phone; checks what the screens show and saves a screenshot of every screen.

The app runs in a subprocess (tests/app/app_driver.py) so Kivy's global state stays out
of this process. Screenshots land in var/app-screenshots/ (the test prints the path).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_data

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "var" / "app-screenshots"
SCREENS = ["01-setup", "02-people", "03-file-picker", "04-backup-progress", "05-backup",
           "06-search-members", "07-search-photo", "08-photo", "09-devices", "10-settings",
           "11-error"]


def _require_window() -> None:
    if importlib.util.find_spec("kivy") is None:
        pytest.skip("kivy is not installed: run scripts/setup")
    if shutil.which("xvfb-run") is None or shutil.which("xauth") is None:
        pytest.skip("xvfb-run/xauth are missing: scripts/setup installs the Debian packages "
                    "xvfb and xauth when run as root (apt-get install xvfb xauth)")


def test_app_in_a_window(address: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                         ) -> None:
    photos = require_data("photos")
    _require_window()
    shutil.rmtree(SHOTS, ignore_errors=True)
    result_file = tmp_path / "result.json"
    # The transport settings (PRIVFACE_TLS_CA of the test CA) pass on; the app's own do not.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KIVY_") and k not in ("PRIVFACE_BUNDLE", "PRIVFACE_APP_DIR")}
    env.update(PRIVFACE_SERVER=address, PRIVFACE_APP_DIR=str(tmp_path / "app"),
               KIVY_HOME=str(tmp_path / "kivy"), KIVY_NO_ARGS="1", KIVY_NO_CONSOLELOG="1",
               KIVY_NO_FILELOG="1")
    proc = subprocess.run(
        ["xvfb-run", "-a", "-s", "-screen 0 1024x768x24", sys.executable, "-m",
         "tests.app.app_driver", str(photos), str(SHOTS), str(result_file)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    with capsys.disabled():
        print(f"\n[app window test] screenshots of every screen: {SHOTS}")  # noqa: T201
    assert result_file.exists(), f"the app did not finish (exit {proc.returncode}):\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    r = json.loads(result_file.read_text())
    assert r["errors"] == []
    assert [Path(p).stem for p in r["screenshots"]] == SCREENS
    assert all(Path(p).stat().st_size > 10_000 for p in r["screenshots"])  # real pictures

    assert r["family_open"] and r["after_create"] == "people"
    assert r["members"] == ["obama (2 faces)", "biden (1 face)"]
    assert r["enroll_faces"] == ["face used: biden.jpg"] and all(r["enroll_textures"])
    assert "obama.jpg" in r["picker_files"] and "obama3.jpg" in r["picker_files"]
    assert r["picked"] == str(photos / "people" / "obama" / "obama3.jpg")
    assert r["backup_progress"][0] and r["backup_progress"][1].startswith("photos ")
    assert r["backup_tiles"] == ["obama: obama3.jpg", "obama: test_obama1.jpg",
                                 "biden: biden2.jpg", "biden, obama: obama_and_biden.jpg",
                                 "1 unknown face: carell.jpg"]
    assert all(r["backup_textures"])
    assert r["search_members"] == ["obama", "biden"]
    for key, count in (("obama", 3), ("both_all", 1), ("both_any", 4), ("photo", 2)):
        assert r[f"search_{key}"]["thumbnails"] == r[f"search_{key}"]["expected"] == count
    assert r["search_photo"]["message"] == "biden.jpg shows biden: 2 photos with biden"
    assert r["photo_size"][0] > 600  # the full photo, not its thumbnail
    assert "one use" in r["export_note"]
    assert [(name, detail.split(" - ")[1]) for name, detail in r["devices"]] == [
        ("test phone", "this phone"), ("Gran's tablet", "revoked")]
    assert "own detector" in r["settings_info"]
    assert r["error_shown"] == r["status"] == "tick at least one member to search for"
