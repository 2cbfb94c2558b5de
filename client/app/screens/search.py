"""Search: tick members (all or any of them) or pick a query photo; decrypted thumbnails
stream into the grid; tap one to open the full photo."""

from __future__ import annotations

import itertools
from functools import partial

from kivy.properties import StringProperty
from kivy.uix.togglebutton import ToggleButton

from client.app.controllers.search import SearchResult
from client.app.controllers.tasks import BACKGROUND, URGENT
from client.app.screens.base import PrivfaceScreen
from client.app.widgets import FilePickerPopup, PhotoPopup, Thumb, texture_of


class MemberToggle(ToggleButton):
    """A member to tick for the search."""


class SearchScreen(PrivfaceScreen):
    title = "Search"
    message = StringProperty("Tick members and search, or search with a photo of them.")

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._generation = itertools.count()
        self._current = -1  # the search whose thumbnails are wanted
        self.expected = 0  # thumbnails of the current search
        self.popup: PhotoPopup | None = None  # the open full photo

    def refresh(self) -> None:
        self.run(self.app.controllers.search.member_names, self.show_members)

    def show_members(self, names: list[str]) -> None:
        ticked = set(self.ticked())
        box = self.ids.members
        box.clear_widgets()
        for name in names:
            box.add_widget(MemberToggle(text=name, state="down" if name in ticked else "normal"))

    def ticked(self) -> list[str]:
        return [b.text for b in reversed(self.ids.members.children) if b.state == "down"]

    def tick(self, names: list[str]) -> None:
        """Ticks exactly ``names`` (as a user would)."""
        for button in self.ids.members.children:
            button.state = "down" if button.text in names else "normal"

    def mode(self) -> str:
        return "any" if self.ids.mode_any.state == "down" else "all"

    def search(self) -> None:
        names, mode = self.ticked(), self.mode()
        search = self.app.controllers.search
        self.run(lambda: search.by_members(names, mode), self.show,
                 busy="searching (encrypted)...")

    def browse_query(self) -> None:
        def picked(paths: list[str]) -> None:
            self.ids.query.text = paths[0]
        FilePickerPopup(picked, self.ids.query.text, title="A photo of who to look for").open()

    def search_by_photo(self) -> None:
        path, mode = self.ids.query.text, self.mode()
        search = self.app.controllers.search
        progress = self.progress()
        self.run(lambda: search.by_photo(path, mode, progress), self.show,
                 busy="finding the faces of the query photo...")

    def show(self, result: SearchResult) -> None:
        """Shows the result and streams its thumbnails in, one job per photo."""
        self.message = result.message
        self.app.set_status(result.message)
        grid = self.ids.results
        grid.clear_widgets()
        generation = self._current = next(self._generation)
        self.expected = len(result.ids)
        search = self.app.controllers.search
        for index, photo_id in enumerate(result.ids):
            def fetch(photo_id: str = photo_id) -> bytes | None:
                if generation != self._current:  # a newer search replaced this one
                    return None
                return search.thumbnail(photo_id)
            self.app.worker.submit(fetch, partial(self._arrived, generation, index, photo_id),
                                   partial(self.app.set_status, error=True), BACKGROUND)

    def _arrived(self, generation: int, index: int, photo_id: str, data: bytes | None) -> None:
        if data is None or generation != self._current:
            return
        thumb = Thumb(data, title=f"photo {index + 1}", caption="tap to open",
                      photo_id=photo_id)
        thumb.bind(on_release=lambda t: self.open_photo(t.photo_id))
        self.ids.results.add_widget(thumb)
        self.app.set_progress(f"thumbnails {len(self.ids.results.children)}/{self.expected}",
                              len(self.ids.results.children) / max(1, self.expected))

    def open_photo(self, photo_id: str) -> None:
        """Downloads, decrypts and shows one full photo (ahead of queued thumbnails)."""
        search = self.app.controllers.search
        self.app.set_status(f"downloading photo {photo_id[:12]}...")
        self.app.worker.submit(lambda: search.photo(photo_id),
                               lambda data: self._show_photo(photo_id, data),
                               self.app.show_error, URGENT)

    def _show_photo(self, photo_id: str, data: bytes) -> None:
        self.app.set_status(f"photo {photo_id[:8]}: {len(data) // 1024} KB, decrypted on "
                            "this phone")
        self.popup = PhotoPopup(title=f"Photo {photo_id[:8]}", texture=texture_of(data))
        self.popup.open()
