"""One controller per screen, over one shared AppContext."""

from __future__ import annotations

from dataclasses import dataclass

from client.app.controllers.backup import BackupController
from client.app.controllers.context import AppContext
from client.app.controllers.devices import DevicesController
from client.app.controllers.people import PeopleController
from client.app.controllers.search import SearchController
from client.app.controllers.settings import SettingsController
from client.app.controllers.setup import SetupController


@dataclass(frozen=True)
class Controllers:
    """The controllers of the app's screens."""

    ctx: AppContext
    setup: SetupController
    people: PeopleController
    backup: BackupController
    search: SearchController
    devices: DevicesController
    settings: SettingsController

    @classmethod
    def of(cls, ctx: AppContext) -> Controllers:
        return cls(ctx, SetupController(ctx), PeopleController(ctx), BackupController(ctx),
                   SearchController(ctx), DevicesController(ctx), SettingsController(ctx))
