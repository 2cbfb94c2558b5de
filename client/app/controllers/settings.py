"""Settings: the server address, the detection mode, the detector's product key."""

from __future__ import annotations

from dataclasses import dataclass

from client.app.controllers.context import AppContext, AppSettings
from client.app.controllers.files import one_file
from client.pipeline.detect import MODES


@dataclass(frozen=True)
class SettingsView:
    """What the Settings screen shows."""

    server: str  # as stored ("" : PRIVFACE_SERVER, the bundle's, or the default)
    effective_server: str
    tls_ca: str  # as stored ("": PRIVFACE_TLS_CA)
    effective_tls_ca: str  # "" : none (the connection fails unless the server is plaintext)
    detection_mode: str
    modes: list[str]
    bundle: str
    secure_detection: bool | None  # None: no family open


class SettingsController:
    """Reads and changes the app's settings."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def view(self) -> SettingsView:
        s = self.ctx.settings
        session = self.ctx.session
        config = self.ctx.config()
        effective = session.client.address if session else config.server_or("")
        ca = config.tls_ca
        return SettingsView(s.server, effective, s.tls_ca, str(ca) if ca else "",
                            s.detection_mode, list(MODES),
                            str(self.ctx.paths.bundle),
                            bool(session.bundle.product_keys) if session else None)

    def save(self, server: str, detection_mode: str, tls_ca: str = "") -> bool:
        """Stores the settings; True if the open family must reconnect to apply them."""
        before = self.ctx.config()
        self.ctx.save_settings(AppSettings(server, detection_mode, tls_ca))
        return self.ctx.is_open and before != self.ctx.config()

    def import_product_key(self, path_text: str) -> str:
        """Stores a detector vendor's product key: faces are then found by the vendor's
        encrypted detector on the server."""
        path = one_file(path_text, "product key file")
        key = self.ctx.require().import_product_key(path.read_bytes())
        return f"product key for detector {key.detector_id} stored: secure detection is on"
