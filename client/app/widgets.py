"""Widgets the screens share: thumbnails from JPEG bytes, a file picker, small popups."""

from __future__ import annotations

import os
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

from kivy.core.image import Image as CoreImage
from kivy.graphics.texture import Texture
from kivy.properties import BooleanProperty, ListProperty, ObjectProperty, StringProperty
from kivy.uix.behaviors import ButtonBehavior
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.popup import Popup

from client.pipeline.library import image_suffix

PHOTO_FILTERS = ["*.jpg", "*.jpeg", "*.png", "*.bmp", "*.webp", "*.tif", "*.tiff",
                 "*.JPG", "*.JPEG", "*.PNG"]


def texture_of(data: bytes) -> Texture | None:
    """A texture from encoded image bytes (JPEG, PNG, ...); None if they are empty."""
    if not data:
        return None
    return CoreImage(BytesIO(data), ext=image_suffix(data).lstrip(".") or "jpg").texture


class Thumb(ButtonBehavior, BoxLayout):
    """A picture with a title and a caption (``photo_id``: the photo it shows, if any)."""

    texture = ObjectProperty(None, allownone=True)
    title = StringProperty("")
    caption = StringProperty("")
    photo_id = StringProperty("")
    ok = BooleanProperty(True)

    def __init__(self, data: bytes = b"", **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.texture = texture_of(data)


class MessagePopup(Popup):
    """A message with an OK button (errors use it too)."""

    message = StringProperty("")


class ConfirmPopup(Popup):
    """A question; ``on_yes`` runs only when the user confirms."""

    message = StringProperty("")
    yes_text = StringProperty("Yes")

    def __init__(self, on_yes: Callable[[], None], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._on_yes = on_yes

    def confirm(self) -> None:
        self.dismiss()
        self._on_yes()


class PromptPopup(Popup):
    """Asks for one line of text; ``on_ok(text)`` when the user accepts."""

    message = StringProperty("")
    value = StringProperty("")

    def __init__(self, on_ok: Callable[[str], None], **kwargs: object) -> None:
        super().__init__(**kwargs)
        self._on_ok = on_ok

    def accept(self, text: str) -> None:
        self.dismiss()
        self._on_ok(text)


class PhotoPopup(Popup):
    """A full photo."""

    texture = ObjectProperty(None, allownone=True)


class FilePickerPopup(Popup):
    """Kivy's file chooser in a popup, with a typed path as an alternative.

    ``on_pick(paths)`` gets the chosen files (several with ``multiple``) or, with
    ``folders``, the chosen folder (the one shown when nothing is selected)."""

    start = StringProperty("")
    multiple = BooleanProperty(False)
    folders = BooleanProperty(False)
    filters = ListProperty(PHOTO_FILTERS)

    def __init__(self, on_pick: Callable[[list[str]], None], start: str = "",
                 **kwargs: object) -> None:
        path = Path(start).expanduser() if start else Path.home()
        while not path.is_dir() and path != path.parent:
            path = path.parent
        super().__init__(start=str(path), **kwargs)
        self._on_pick = on_pick

    def pick(self, selection: list[str], current: str) -> None:
        chosen = list(selection) or ([current] if self.folders else [])
        if not chosen:
            return
        self.dismiss()
        self._on_pick([os.path.normpath(p) for p in chosen])
