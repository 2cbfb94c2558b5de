"""What every screen shares: running controller calls on the worker, progress, errors."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from kivy.app import App
from kivy.clock import Clock
from kivy.properties import BooleanProperty
from kivy.uix.screenmanager import Screen

from client.app.controllers.tasks import NORMAL, ProgressTracker

if TYPE_CHECKING:
    from client.app.main import PrivfaceApp


def post(fn: Callable[[], None]) -> None:
    """Runs ``fn`` on the UI thread at the next frame (safe from any thread)."""
    Clock.schedule_once(lambda _dt: fn(), 0)


class PrivfaceScreen(Screen):
    """A screen of the app. Subclasses set ``title`` and ``needs_family``."""

    title = "?"
    needs_family = True
    working = BooleanProperty(False)  # a job of this screen is running: its buttons wait

    @property
    def app(self) -> PrivfaceApp:
        return App.get_running_app()

    def on_enter(self, *args: Any) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Reloads what the screen shows (on entering it)."""

    def run(self, work: Callable[[], Any], done: Callable[[Any], None],
            busy: str = "", priority: int = NORMAL,
            failed: Callable[[str], None] | None = None) -> None:
        """Runs ``work()`` on the worker thread, then ``done(result)`` here; an error
        goes to the status line and a popup (and to ``failed``)."""
        self.working = True
        if busy:
            self.app.set_status(busy)

        def ok(result: Any) -> None:
            self.working = False
            done(result)

        def bad(message: str) -> None:
            self.working = False
            self.app.show_error(message)
            if failed:
                failed(message)

        self.app.worker.submit(work, ok, bad, priority)

    def progress(self, totals: Mapping[str, int] | None = None) -> ProgressTracker:
        """A progress callback for the core that updates the app's progress bar."""
        app = self.app
        return ProgressTracker(lambda text, fraction: post(
            lambda: app.set_progress(text, fraction)), totals)
