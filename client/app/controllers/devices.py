"""Devices: the family's phones, revoking one, and an export file for a new phone."""

from __future__ import annotations

import time
from dataclasses import dataclass

from client.app.controllers.context import AppContext
from client.app.controllers.files import parse_paths
from client.pipeline.family import Device
from common.errors import MalformedInputError


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(epoch)) if epoch else "never"


@dataclass(frozen=True)
class DeviceRow:
    """One line of the device list."""

    device_id: str
    name: str
    detail: str
    can_revoke: bool

    @classmethod
    def of(cls, d: Device) -> DeviceRow:
        state = "revoked" if d.revoked else ("this phone" if d.this_device else "active")
        return cls(d.device_id, d.name,
                   f"{d.device_id[:8]} - {state} - added {_when(d.created_at)}, "
                   f"last seen {_when(d.last_seen_at)}",
                   not d.revoked and not d.this_device)


class DevicesController:
    """The family's phones through the open session."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def devices(self) -> list[DeviceRow]:
        """Every device of the family, oldest first."""
        return [DeviceRow.of(d) for d in self.ctx.require().devices()]

    def revoke(self, device_id: str) -> str:
        """Revokes another phone (by id): its token stops working at once."""
        device = self.ctx.require().revoke(device_id)
        return f"revoked {device.name} ({device.device_id[:8]})"

    def export(self, path_text: str, passphrase: str, confirm: str) -> str:
        """Writes an export file for a new phone (a one-time invitation inside)."""
        paths = parse_paths(path_text)
        if len(paths) != 1:
            raise MalformedInputError("type where to write the export file")
        if len(passphrase) < 8:
            raise MalformedInputError("the export passphrase must have at least 8 characters")
        if passphrase != confirm:
            raise MalformedInputError("the two export passphrases differ")
        expires = self.ctx.require().export(paths[0], passphrase)
        return (f"wrote {paths[0]}: join with it on the new phone before "
                f"{_when(expires)} (one use)")
