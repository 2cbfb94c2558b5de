"""Settings: the server address, the detection mode, the detector's product key."""

from __future__ import annotations

from kivy.properties import StringProperty

from client.app.controllers.setup import FamilyView
from client.app.screens.base import PrivfaceScreen
from client.app.widgets import FilePickerPopup

MODE_NOTES = {
    "default": "default: 640-px working size, faces of 40 px and more, far less upload",
    "small-faces": "small-faces: faces from about 5% of the photo's long side (group "
                   "photos), about twice the upload of default",
    "faithful": "faithful: the paper's protocol at OpenCV's defaults (gigabytes per photo)",
}


class SettingsScreen(PrivfaceScreen):
    title = "Settings"
    needs_family = False
    info = StringProperty("")

    def refresh(self) -> None:
        view = self.app.controllers.settings.view()
        self.ids.server.text = view.server
        self.ids.server.hint_text = f"HOST:PORT (empty: {view.effective_server})"
        self.ids.tls_ca.text = view.tls_ca
        self.ids.tls_ca.hint_text = (f"empty: {view.effective_tls_ca}" if view.effective_tls_ca
                                     else "the CA certificate (PEM) that signed the server's")
        self.ids.mode.values = view.modes
        self.ids.mode.text = view.detection_mode
        detection = {None: "open the family to see", True: "the vendor's encrypted "
                     "detector on the server", False: "this phone's own detector (no "
                     "product key)"}[view.secure_detection]
        self.info = (f"Server: {view.effective_server}, TLS trusting "
                     f"{view.effective_tls_ca or '(no CA set)'}\n"
                     f"Family bundle: {view.bundle}\nFaces are found by: {detection}")

    def save(self) -> None:
        server, mode, tls_ca = self.ids.server.text, self.ids.mode.text, self.ids.tls_ca.text
        settings = self.app.controllers.settings
        setup = self.app.controllers.setup

        def work() -> FamilyView | None:
            return setup.reconnect() if settings.save(server, mode, tls_ca) else None

        self.run(work, self._saved, busy="saving...")

    def _saved(self, view: FamilyView | None) -> None:
        if view is not None:
            self.app.show_family(view)
        self.app.set_status("settings saved" + (": reconnected" if view else ""))
        self.refresh()

    def browse_ca(self) -> None:
        def picked(paths: list[str]) -> None:
            self.ids.tls_ca.text = paths[0]
        FilePickerPopup(picked, self.ids.tls_ca.text, title="The server's CA certificate",
                        filters=["*.pem", "*.crt"]).open()

    def browse_key(self) -> None:
        def picked(paths: list[str]) -> None:
            self.ids.key_path.text = paths[0]
        FilePickerPopup(picked, self.ids.key_path.text, title="Detector product key",
                        filters=["*"]).open()

    def import_key(self) -> None:
        path = self.ids.key_path.text
        settings = self.app.controllers.settings
        self.run(lambda: settings.import_product_key(path), self._imported,
                 busy="importing the product key...")

    def _imported(self, message: str) -> None:
        self.app.set_status(message)
        self.refresh()
        self.app.refresh_family()
