"""Set-up: create a family, join one from an export file, or unlock this phone's bundle."""

from __future__ import annotations

from dataclasses import dataclass, replace

from client.app.controllers.context import AppContext
from client.app.controllers.files import one_file
from client.session import FamilySession, FamilySummaryView
from common.errors import MalformedInputError

MIN_PASSPHRASE = 8  # the keystore's own minimum, checked before anything is registered


@dataclass(frozen=True)
class FamilyView:
    """What the app's header shows about the open family."""

    family_id: str
    server: str
    device: str
    members: int
    photos: int
    faces: int
    secure_detection: bool

    @classmethod
    def of(cls, s: FamilySummaryView) -> FamilyView:
        return cls(s.family_id, s.server, s.device_name, s.members, s.photos,
                   s.gallery_faces, s.has_product_key)

    @property
    def headline(self) -> str:
        return (f"{self.members} members, {self.photos} photos, {self.faces} faces "
                f"- {self.device} @ {self.server}")


def _check_passphrase(passphrase: str, confirm: str | None = None) -> str:
    if len(passphrase) < MIN_PASSPHRASE:
        raise MalformedInputError(f"the passphrase must have at least {MIN_PASSPHRASE} "
                                  "characters")
    if confirm is not None and confirm != passphrase:
        raise MalformedInputError("the two passphrases differ")
    return passphrase


def _device_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise MalformedInputError("give this phone a name (other phones see it in Devices)")
    return name


class SetupController:
    """Creates, joins or unlocks the family this phone works with."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def use_server(self, server: str, tls_ca: str = "") -> None:
        """Stores the server address and CA certificate typed on the set-up screen (empty:
        PRIVFACE_SERVER / PRIVFACE_TLS_CA, else the defaults)."""
        wanted = replace(self.ctx.settings, server=server, tls_ca=tls_ca).checked()
        if wanted != self.ctx.settings:
            self.ctx.save_settings(wanted)

    def create(self, passphrase: str, confirm: str, device_name: str) -> FamilyView:
        """Makes a new family's keys here, registers it and opens it."""
        _check_passphrase(passphrase, confirm)
        session = FamilySession.create(self.ctx.paths.bundle, passphrase, self.ctx.config(),
                                       device_name=_device_name(device_name))
        return self._opened(session, passphrase)

    def join(self, export_path: str, export_passphrase: str, passphrase: str, confirm: str,
             device_name: str) -> FamilyView:
        """Joins the family of an export file as a new device."""
        export = one_file(export_path, "export file")
        if not export_passphrase:
            raise MalformedInputError("type the passphrase the export file was made with")
        _check_passphrase(passphrase, confirm)
        session = FamilySession.join(export, export_passphrase, self.ctx.paths.bundle,
                                     passphrase, self.ctx.config(),
                                     device_name=_device_name(device_name))
        return self._opened(session, passphrase)

    def unlock(self, passphrase: str) -> FamilyView:
        """Opens this phone's bundle."""
        if not passphrase:
            raise MalformedInputError("type the family passphrase")
        return self._opened(FamilySession(self.ctx.paths.bundle, passphrase,
                                          self.ctx.config()), passphrase)

    def reconnect(self) -> FamilyView:
        """Re-opens the open family with the current settings (after they changed)."""
        session = self.ctx.require()
        return self._opened(FamilySession(session.bundle_path, self.ctx.passphrase,
                                          self.ctx.config()), self.ctx.passphrase)

    def lock(self) -> None:
        """Closes the family (the passphrase is needed again)."""
        self.ctx.close()

    def summary(self) -> FamilyView:
        """The open family, as the server and this phone see it."""
        return FamilyView.of(self.ctx.require().summary())

    def _opened(self, session: FamilySession, passphrase: str) -> FamilyView:
        try:
            view = FamilyView.of(session.summary())
        except BaseException:
            session.close()
            raise
        self.ctx.adopt(session, passphrase)
        return view
