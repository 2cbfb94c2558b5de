"""The app's screens, in navigation order: one module and one .kv file each."""

from __future__ import annotations

from pathlib import Path

from client.app.screens.backup import BackupScreen
from client.app.screens.base import PrivfaceScreen
from client.app.screens.devices import DevicesScreen
from client.app.screens.people import PeopleScreen
from client.app.screens.search import SearchScreen
from client.app.screens.settings import SettingsScreen
from client.app.screens.setup import SetupScreen

# name -> screen class; the navigation bar shows them in this order
SCREENS: dict[str, type[PrivfaceScreen]] = {
    "setup": SetupScreen,
    "people": PeopleScreen,
    "backup": BackupScreen,
    "search": SearchScreen,
    "devices": DevicesScreen,
    "settings": SettingsScreen,
}

HERE = Path(__file__).resolve().parent


def kv_files() -> list[Path]:
    """Each screen's .kv file, beside its module."""
    return [HERE / f"{name}.kv" for name in SCREENS]
