"""Devices: the family's phones; revoke one; write an export file for a new phone."""

from __future__ import annotations

from kivy.properties import BooleanProperty, ObjectProperty, StringProperty
from kivy.uix.boxlayout import BoxLayout

from client.app.controllers.devices import DeviceRow
from client.app.screens.base import PrivfaceScreen
from client.app.widgets import ConfirmPopup


class DeviceLine(BoxLayout):
    """One device in the list, with Revoke."""

    device_id = StringProperty("")
    title = StringProperty("")
    detail = StringProperty("")
    can_revoke = BooleanProperty(False)
    screen = ObjectProperty(None)


class DevicesScreen(PrivfaceScreen):
    title = "Devices"

    def refresh(self) -> None:
        self.run(self.app.controllers.devices.devices, self.show_devices,
                 busy="reading the family's devices...")

    def show_devices(self, rows: list[DeviceRow]) -> None:
        box = self.ids.devices
        box.clear_widgets()
        for row in rows:
            box.add_widget(DeviceLine(device_id=row.device_id, title=row.name,
                                      detail=row.detail, can_revoke=row.can_revoke,
                                      screen=self))
        self.app.set_status(f"{len(rows)} device(s)")

    def ask_revoke(self, device_id: str, name: str) -> None:
        ConfirmPopup(lambda: self.revoke(device_id), title="Revoke a phone",
                     message=f"Revoke {name}? It can no longer reach the family's photos.",
                     yes_text="Revoke").open()

    def revoke(self, device_id: str) -> None:
        devices = self.app.controllers.devices
        self.run(lambda: devices.revoke(device_id), self._revoked, busy="revoking...")

    def _revoked(self, message: str) -> None:
        self.refresh()
        self.app.set_status(message)

    def export(self) -> None:
        ids = self.ids
        path, passphrase, confirm = ids.export_path.text, ids.passphrase.text, ids.confirm.text
        devices = self.app.controllers.devices
        self.run(lambda: devices.export(path, passphrase, confirm), self._exported,
                 busy="writing the export file...")

    def _exported(self, message: str) -> None:
        self.ids.passphrase.text = self.ids.confirm.text = ""
        self.ids.export_note.text = message
        self.app.set_status(message)
        self.refresh()
