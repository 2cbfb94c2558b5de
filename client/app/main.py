"""privface-app: the Kivy phone app (entry point ``privface-app``).

Settings: PRIVFACE_SERVER (else the Settings screen's, else the bundle's), PRIVFACE_BUNDLE
(else family.bundle in the app's data folder), PRIVFACE_APP_DIR (the data folder).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("KIVY_NO_ARGS", "1")  # Kivy must not parse our command line

from kivy.config import Config

Config.set("graphics", "width", os.environ.get("PRIVFACE_APP_WIDTH", "1000"))
Config.set("graphics", "height", os.environ.get("PRIVFACE_APP_HEIGHT", "720"))
Config.set("input", "mouse", "mouse,disable_multitouch")
Config.set("kivy", "exit_on_escape", "0")

from kivy.app import App  # noqa: E402
from kivy.clock import Clock  # noqa: E402
from kivy.lang import Builder  # noqa: E402
from kivy.properties import BooleanProperty, NumericProperty, StringProperty  # noqa: E402
from kivy.uix.boxlayout import BoxLayout  # noqa: E402
from kivy.uix.togglebutton import ToggleButton  # noqa: E402

from client.app.controllers.context import AppContext  # noqa: E402
from client.app.controllers.registry import Controllers  # noqa: E402
from client.app.controllers.setup import FamilyView  # noqa: E402
from client.app.controllers.tasks import Worker  # noqa: E402
from client.app.screens import SCREENS, kv_files  # noqa: E402
from client.app.screens.base import PrivfaceScreen, post  # noqa: E402
from client.app.widgets import MessagePopup  # noqa: E402

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent


class RootLayout(BoxLayout):
    """Header, navigation bar, the screens, and the status line (root.kv)."""


class NavButton(ToggleButton):
    """A navigation bar button."""


class PrivfaceApp(App):
    """The app: one AppContext, one worker thread, the screens of SCREENS."""

    title = "privface"
    status = StringProperty("")
    status_error = BooleanProperty(False)
    busy = BooleanProperty(False)
    progress_text = StringProperty("")
    progress_value = NumericProperty(0)  # 0..100
    family_open = BooleanProperty(False)
    header = StringProperty("no family open")

    def build(self) -> RootLayout:
        self.ctx = AppContext.from_env(self.user_data_dir)
        self.controllers = Controllers.of(self.ctx)
        self.worker = Worker(post, on_busy=self._set_busy)
        self.last_error = ""
        self._pulse: Any = None  # the Clock event moving the bar while no total is known
        for kv in [HERE / "widgets.kv", HERE / "root.kv", *kv_files()]:
            Builder.load_file(str(kv))
        root = RootLayout()
        self.screens: dict[str, PrivfaceScreen] = {}
        self.nav: dict[str, NavButton] = {}
        for name, cls in SCREENS.items():
            screen = cls(name=name)
            self.screens[name] = screen
            root.ids.manager.add_widget(screen)
            button = NavButton(text=cls.title)
            button.bind(on_release=lambda _b, n=name: self.go(n))
            self.nav[name] = button
            root.ids.nav.add_widget(button)
        self.bind(family_open=lambda *_: self._update_nav())
        self._update_nav()
        root.ids.manager.current = "setup"
        self.nav["setup"].state = "down"
        return root

    # -- navigation and family state -------------------------------------------------------

    def go(self, name: str) -> None:
        """Shows the screen ``name`` (screens that need a family wait for one)."""
        if SCREENS[name].needs_family and not self.family_open:
            self.show_error("set up or unlock the family first")
            name = "setup"
        for n, button in self.nav.items():
            button.state = "down" if n == name else "normal"
        self.root.ids.manager.current = name

    def _update_nav(self) -> None:
        for name, button in self.nav.items():
            button.disabled = SCREENS[name].needs_family and not self.family_open

    def family_opened(self, view: FamilyView) -> None:
        """A family was created, joined or unlocked."""
        self.family_open = True
        self.show_family(view)

    def family_closed(self) -> None:
        self.family_open = False
        self.header = "no family open"

    def show_family(self, view: FamilyView) -> None:
        self.header = view.headline

    def refresh_family(self) -> None:
        """Updates the header from the server (after backups, enrollments...)."""
        if self.ctx.is_open:
            self.worker.submit(self.controllers.setup.summary, self.show_family,
                               lambda m: log.info("summary failed: %s", m))

    # -- status, errors, progress ----------------------------------------------------------

    def set_status(self, text: str, error: bool = False) -> None:
        self.status = text
        self.status_error = error

    def show_error(self, message: str) -> None:
        """An error's one-line message in the status line and a popup."""
        self.last_error = message
        self.set_status(message, error=True)
        MessagePopup(title="Something went wrong", message=message).open()

    def set_progress(self, text: str, fraction: float | None) -> None:
        self.progress_text = text
        if fraction is not None:
            self._stop_pulse()
            self.progress_value = round(fraction * 100)

    def _set_busy(self, busy: bool) -> None:
        self.busy = busy
        if busy:  # no known total yet: a moving bar says the app is working
            if self._pulse is None:
                self._pulse = Clock.schedule_interval(self._step_pulse, 0.05)
        else:
            self._stop_pulse()
            self.progress_text = ""
            self.progress_value = 0

    def _step_pulse(self, _dt: float) -> None:
        self.progress_value = (self.progress_value + 2) % 101

    def _stop_pulse(self) -> None:
        if self._pulse is not None:
            self._pulse.cancel()
            self._pulse = None

    def on_stop(self) -> None:
        self.worker.stop()
        self.ctx.close()


def main() -> int:
    """Runs the app until its window closes."""
    logging.basicConfig(level=os.environ.get("PRIVFACE_LOG", "WARNING"))
    PrivfaceApp().run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
