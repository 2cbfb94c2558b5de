"""Fixtures of the app's tests: controllers over a real server, without a window."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from client.app.controllers.context import AppContext, AppPaths
from client.app.controllers.registry import Controllers

PASSPHRASE = "a test passphrase"


@pytest.fixture
def make_app(address: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
             ) -> Iterator[Callable[[str], Controllers]]:
    """Makes the controllers of one phone (its own data folder) talking to the test server."""
    monkeypatch.setenv("PRIVFACE_SERVER", address)
    monkeypatch.delenv("PRIVFACE_BUNDLE", raising=False)
    made: list[AppContext] = []

    def make(phone: str = "phone") -> Controllers:
        ctx = AppContext(AppPaths(tmp_path / phone, tmp_path / phone / "family.bundle"))
        made.append(ctx)
        return Controllers.of(ctx)

    yield make
    for ctx in made:
        ctx.close()


@pytest.fixture
def app(make_app: Callable[[str], Controllers]) -> Controllers:
    """One phone's controllers, no family yet."""
    return make_app("phone")


@pytest.fixture
def family_app(app: Controllers) -> Controllers:
    """One phone's controllers with a family created and open."""
    app.setup.create(PASSPHRASE, PASSPHRASE, "test phone")
    return app
