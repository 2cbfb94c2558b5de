"""Set-up: the server, then create a family, join one from an export file, or unlock."""

from __future__ import annotations

from collections.abc import Callable

from kivy.properties import BooleanProperty, StringProperty

from client.app.controllers.setup import FamilyView
from client.app.screens.base import PrivfaceScreen
from client.app.widgets import FilePickerPopup


class SetupScreen(PrivfaceScreen):
    title = "Set-up"
    needs_family = False
    has_bundle = BooleanProperty(False)
    state_text = StringProperty("")

    def refresh(self) -> None:
        ctx = self.app.ctx
        self.has_bundle = ctx.has_bundle
        view = self.app.controllers.settings.view()
        self.ids.server.text = view.server
        self.ids.server.hint_text = f"HOST:PORT (empty: {view.effective_server})"
        self.ids.tls_ca.text = view.tls_ca
        self.ids.tls_ca.hint_text = (f"CA certificate, PEM (empty: {view.effective_tls_ca})"
                                     if view.effective_tls_ca else
                                     "the CA certificate (PEM) that signed the server's")
        if ctx.is_open:
            self.state_text = f"The family is open on this phone (bundle: {ctx.paths.bundle})."
        elif ctx.has_bundle:
            self.state_text = (f"This phone has a family bundle at {ctx.paths.bundle}: type "
                               "its passphrase and unlock it.")
        else:
            self.state_text = ("No family on this phone yet: create one, or join one from "
                               "a file exported on another phone.")

    def _open(self, action: Callable[[], FamilyView], busy: str) -> None:
        """Stores the typed server, then runs ``action`` on the worker."""
        server, tls_ca = self.ids.server.text, self.ids.tls_ca.text
        setup = self.app.controllers.setup

        def work() -> FamilyView:
            setup.use_server(server, tls_ca)
            return action()
        self.run(work, self._opened, busy=busy)

    def create(self) -> None:
        passphrase, confirm = self.ids.passphrase.text, self.ids.confirm.text
        device = self.ids.device.text
        setup = self.app.controllers.setup
        self._open(lambda: setup.create(passphrase, confirm, device),
                   "making the family's keys and registering the family...")

    def join(self) -> None:
        ids = self.ids
        export, export_pass = ids.export_path.text, ids.export_passphrase.text
        passphrase, confirm, device = ids.passphrase.text, ids.confirm.text, ids.device.text
        setup = self.app.controllers.setup
        self._open(lambda: setup.join(export, export_pass, passphrase, confirm, device),
                   "joining the family...")

    def unlock(self) -> None:
        passphrase = self.ids.passphrase.text
        setup = self.app.controllers.setup
        self._open(lambda: setup.unlock(passphrase), "unlocking...")

    def lock(self) -> None:
        self.app.controllers.setup.lock()
        self.app.family_closed()
        self.app.set_status("family locked: type the passphrase to open it again")
        self.refresh()

    def browse_ca(self) -> None:
        def picked(paths: list[str]) -> None:
            self.ids.tls_ca.text = paths[0]
        FilePickerPopup(picked, self.ids.tls_ca.text, title="The server's CA certificate",
                        filters=["*.pem", "*.crt"]).open()

    def browse_export(self) -> None:
        def picked(paths: list[str]) -> None:
            self.ids.export_path.text = paths[0]
        FilePickerPopup(picked, self.ids.export_path.text, title="Export file",
                        filters=["*"]).open()

    def _opened(self, view: FamilyView) -> None:
        for field in ("passphrase", "confirm", "export_passphrase"):
            self.ids[field].text = ""
        self.app.family_opened(view)
        self.app.set_status(f"family {view.family_id} open")
        self.refresh()
        self.app.go("people")
