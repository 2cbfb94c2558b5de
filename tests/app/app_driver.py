"""Drives the real privface app in a real window (run under Xvfb by test_app_window.py).

Usage: python -m tests.app.app_driver PHOTOS_DIR SHOTS_DIR RESULT_JSON
(PRIVFACE_SERVER and PRIVFACE_APP_DIR come from the environment.)

The scenario calls the methods the buttons call, waits on Kivy's Clock for the worker's
results, records what the screens show, and saves a screenshot of every screen.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kivy.clock import Clock

from client.app.main import PrivfaceApp
from client.app.widgets import FilePickerPopup
from client.session import FamilySession

TIMEOUT = 240.0  # seconds for one step (enrollment, backup) on a slow machine

Step = Callable[[], bool] | float | None  # wait for a condition, a delay, or the worker


class Driver:
    """Runs a generator of steps on Kivy's Clock."""

    def __init__(self, app: PrivfaceApp, photos: Path, shots: Path, result: Path) -> None:
        self.app, self.photos, self.shots, self.result_path = app, photos, shots, result
        self.result: dict[str, Any] = {"screenshots": [], "errors": []}
        self.steps = self.scenario()
        self.wait: Callable[[], bool] | None = None
        self.expect_error = False  # the step under way means to make the app show an error
        self.waited = 0.0
        self.idle_ticks = 0

    def start(self) -> None:
        Clock.schedule_interval(self.tick, 0.1)

    def tick(self, dt: float) -> bool | None:
        try:
            if self.wait is not None:
                self.waited += dt
                if self.waited > TIMEOUT:
                    raise TimeoutError(f"a step waited more than {TIMEOUT:.0f} s")
                if not self.wait():
                    return None
            self.wait, self.waited = None, 0.0
            if self.app.last_error and not self.expect_error:
                raise RuntimeError(f"the app showed an error: {self.app.last_error}")
            step = next(self.steps)
        except StopIteration:
            self.finish()
            return False
        except Exception:  # noqa: BLE001 - recorded for the test, then the app stops
            self.result["errors"].append(traceback.format_exc())
            self.finish()
            return False
        self.idle_ticks = 0
        self.wait = self.idle if step is None else (self.after(step)
                                                    if isinstance(step, float) else step)
        return None

    def idle(self) -> bool:
        """True once the worker is empty and its callbacks have run (two quiet ticks)."""
        self.idle_ticks = self.idle_ticks + 1 if self.app.worker.pending == 0 else 0
        return self.idle_ticks >= 3

    def after(self, seconds: float) -> Callable[[], bool]:
        deadline = [seconds]

        def waited() -> bool:
            deadline[0] -= 0.1
            return deadline[0] <= 0
        return waited

    def shot(self, name: str) -> None:
        made = kivy_window().screenshot(name=str(self.shots / f"{name}.png"))
        final = self.shots / f"{name}.png"
        os.replace(made, final)
        self.result["screenshots"].append(str(final))

    def finish(self) -> None:
        self.result["last_error"] = self.app.last_error
        self.result_path.write_text(json.dumps(self.result, indent=2))
        self.app.stop()

    # -- the scenario -------------------------------------------------------------------

    def scenario(self) -> Iterator[Step]:
        app, r = self.app, self.result
        people_dir = self.photos / "people"
        yield 0.5
        setup = app.screens["setup"]
        self.shot("01-setup")
        setup.ids.device.text = "test phone"
        setup.ids.passphrase.text = setup.ids.confirm.text = "a window passphrase"
        setup.create()
        yield None
        r["family_open"] = app.family_open
        r["after_create"] = app.root.ids.manager.current

        people = app.screens["people"]
        people.ids.enroll_name.text = "obama"
        people.ids.enroll_paths.text = (f"{people_dir / 'obama' / 'obama.jpg'}; "
                                        f"{people_dir / 'obama' / 'obama2.jpg'}")
        people.enroll()
        yield None
        people.ids.enroll_name.text = "biden"
        people.ids.enroll_paths.text = str(people_dir / "biden" / "biden.jpg")
        people.enroll()
        yield None
        yield 0.3
        r["members"] = [f"{line.member} ({line.detail})"
                        for line in reversed(people.ids.members.children)]
        r["enroll_faces"] = [f"{t.title}: {t.caption}" for t in reversed(people.ids.faces.children)]
        r["enroll_textures"] = [t.texture is not None for t in people.ids.faces.children]
        self.shot("02-people")

        app.go("backup")
        backup = app.screens["backup"]
        backup.ids.paths.text = str(people_dir / "obama" / "obama.jpg")
        backup.browse_photos()  # the file picker, opened where the typed path is
        yield 0.5
        picker = next(w for w in kivy_window().children if isinstance(w, FilePickerPopup))
        r["picker_files"] = sorted(Path(f).name for f in picker.ids.chooser.files)
        picker.ids.chooser.selection = [str(people_dir / "obama" / "obama3.jpg")]
        yield 0.3
        self.shot("03-file-picker")
        picker.pick(picker.ids.chooser.selection, picker.ids.chooser.path)  # "Choose"
        yield 0.3
        r["picked"] = backup.ids.paths.text
        backup.ids.paths.text = "; ".join(str(p) for p in backup_photos(self.photos))
        backup.backup()
        yield lambda: len(backup.ids.tiles.children) >= 2
        yield 0.2
        r["backup_progress"] = [app.busy, app.progress_text]
        self.shot("04-backup-progress")
        yield None
        yield 0.3
        r["backup_tiles"] = [f"{t.title}: {t.caption}"
                             for t in reversed(backup.ids.tiles.children)]
        r["backup_textures"] = [t.texture is not None for t in backup.ids.tiles.children]
        r["backup_message"] = backup.message
        self.shot("05-backup")

        app.go("search")
        search = app.screens["search"]
        yield None
        r["search_members"] = [b.text for b in reversed(search.ids.members.children)]
        for key, names, mode in (("obama", ["obama"], "all"),
                                 ("both_all", ["obama", "biden"], "all"),
                                 ("both_any", ["obama", "biden"], "any")):
            search.tick(names)
            (search.ids.mode_any if mode == "any" else search.ids.mode_all).state = "down"
            (search.ids.mode_all if mode == "any" else search.ids.mode_any).state = "normal"
            search.search()
            yield None
            yield 0.3
            r[f"search_{key}"] = {"thumbnails": len(search.ids.results.children),
                                  "expected": search.expected, "message": search.message}
            if key == "obama":
                self.shot("06-search-members")
        search.ids.mode_all.state, search.ids.mode_any.state = "down", "normal"
        search.ids.query.text = str(people_dir / "biden" / "biden.jpg")
        search.search_by_photo()
        yield None
        yield 0.3
        r["search_photo"] = {"thumbnails": len(search.ids.results.children),
                             "expected": search.expected, "message": search.message}
        self.shot("07-search-photo")
        first = search.ids.results.children[-1]
        search.open_photo(first.photo_id)
        yield None
        yield 0.5
        r["photo_size"] = list(search.popup.texture.size) if search.popup else None
        self.shot("08-photo")
        search.popup.dismiss()

        app.go("devices")
        devices = app.screens["devices"]
        yield None
        devices.ids.export_path.text = str(Path(os.environ["PRIVFACE_APP_DIR"]) / "x.export")
        devices.ids.passphrase.text = devices.ids.confirm.text = "an export passphrase"
        devices.export()
        yield None
        r["export_note"] = devices.ids.export_note.text
        app.worker.submit(lambda: join_as_second_phone(app, Path(devices.ids.export_path.text)))
        yield None
        devices.refresh()
        yield None
        second = [line for line in devices.ids.devices.children if line.can_revoke]
        devices.revoke(second[0].device_id)
        yield None
        yield 0.3
        r["devices"] = [[line.title, line.detail] for line in
                        reversed(devices.ids.devices.children)]
        self.shot("09-devices")

        app.go("settings")
        yield None
        yield 0.3
        r["settings_info"] = app.screens["settings"].info
        self.shot("10-settings")

        app.go("search")
        yield None
        search.tick([])
        self.expect_error = True
        search.search()  # nothing ticked: the error must show in the app
        yield None
        yield 0.5
        r["error_shown"] = app.last_error
        r["status"] = app.status
        self.shot("11-error")


def kivy_window() -> Any:
    """Kivy's window, imported only after client.app.main has set its size."""
    from kivy.core.window import Window as window

    return window


def join_as_second_phone(app: PrivfaceApp, export: Path) -> None:
    """Another phone joins with the export file (on the app's worker thread)."""
    bundle = Path(os.environ["PRIVFACE_APP_DIR"]) / "second.bundle"
    FamilySession.join(export, "an export passphrase", bundle, "second passphrase",
                       app.ctx.config(), device_name="Gran's tablet").close()


def backup_photos(photos: Path) -> list[Path]:
    """What the scenario backs up: obama twice, biden once, both, and a stranger."""
    people = photos / "people"
    return [people / "obama" / "obama3.jpg", people / "obama" / "test_obama1.jpg",
            people / "biden" / "biden2.jpg",
            photos / "group_face_recognition_examples" / "obama_and_biden.jpg",
            people / "carell" / "carell.jpg"]


def main(argv: list[str]) -> int:
    photos, shots, result = (Path(a) for a in argv[:3])
    shots.mkdir(parents=True, exist_ok=True)

    class DrivenApp(PrivfaceApp):
        def on_start(self) -> None:
            self.driver = Driver(self, photos, shots, result)  # Clock holds weak refs
            self.driver.start()

    DrivenApp().run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
