"""Backup: pick photos or a folder; progress; the thumbnails of what was backed up and who
was found in each."""

from __future__ import annotations

from kivy.properties import StringProperty

from client.app.controllers.backup import BackupResult, BackupTile
from client.app.controllers.files import join_paths
from client.app.screens.base import PrivfaceScreen, post
from client.app.widgets import FilePickerPopup, Thumb


class BackupScreen(PrivfaceScreen):
    title = "Backup"
    message = StringProperty("Pick photos or a folder. Each photo is labelled by the faces "
                             "it shows, then encrypted here and uploaded.")

    def browse_photos(self) -> None:
        FilePickerPopup(self._picked, self._start(), multiple=True,
                        title="Photos to back up (tick several)").open()

    def browse_folder(self) -> None:
        FilePickerPopup(self._picked, self._start(), folders=True,
                        title="A folder of photos (open it, or tick it)").open()

    def _start(self) -> str:
        return self.ids.paths.text.split(";")[0].strip()

    def _picked(self, paths: list[str]) -> None:
        self.ids.paths.text = join_paths(paths)

    def backup(self) -> None:
        text, recursive = self.ids.paths.text, self.ids.recursive.active
        backup = self.app.controllers.backup
        progress = self.progress()

        def work() -> BackupResult:
            photos = backup.photos(text, recursive)
            progress.totals["photos"] = len(photos)
            post(lambda: self.app.set_status(f"backing up {len(photos)} photo(s)..."))
            return backup.backup(photos, progress, lambda tile: post(lambda: self.add(tile)))

        self.ids.tiles.clear_widgets()
        self.run(work, self.done, busy="looking for photos...")

    def add(self, tile: BackupTile) -> None:
        self.ids.tiles.add_widget(Thumb(tile.thumbnail, title=tile.title, caption=tile.caption,
                                        ok=tile.ok, photo_id=tile.photo_id))

    def done(self, result: BackupResult) -> None:
        self.message = result.message
        self.app.set_status(result.message)
        self.app.refresh_family()
