"""Search: by ticked members (all or any of them) or by a query photo; thumbnails and full
photos fetched one at a time and decrypted here."""

from __future__ import annotations

from dataclasses import dataclass

from client.app.controllers.context import AppContext
from client.app.controllers.files import one_file
from client.pipeline.labelling import Progress
from common.errors import MalformedInputError
from common.labels import MatchMode

MODES = {"all": MatchMode.ALL, "any": MatchMode.ANY}


def _quiet(what: str, amount: int) -> None:
    """No progress to show."""


@dataclass(frozen=True)
class SearchResult:
    """The matching photo ids and a line saying what was searched."""

    ids: list[str]
    message: str


def _mode(mode: str) -> MatchMode:
    try:
        return MODES[mode]
    except KeyError:
        raise MalformedInputError(f"unknown match mode {mode!r} (all or any)") from None


def _found(count: int) -> str:
    return f"{count} photo{'' if count == 1 else 's'}"


class SearchController:
    """Encrypted search and photo download through the open session."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def member_names(self) -> list[str]:
        """The names to tick, in slot order."""
        return [m.name for m in self.ctx.require().members()]

    def by_members(self, names: list[str], mode: str = "all") -> SearchResult:
        """Photos showing all (or any) of ``names``."""
        if not names:
            raise MalformedInputError("tick at least one member to search for")
        ids, server_ms = self.ctx.require().search(names, _mode(mode))
        joiner = " and " if mode == "all" else " or "
        return SearchResult(ids, f"{_found(len(ids))} with {joiner.join(names)} "
                                 f"(server matched in {server_ms:.1f} ms)")

    def by_photo(self, path_text: str, mode: str = "all", progress: Progress = _quiet
                 ) -> SearchResult:
        """Photos showing the members a query photo shows."""
        path = one_file(path_text, "query photo")
        query = self.ctx.require().search_by_photo(path, _mode(mode), progress=progress)
        joiner = " and " if mode == "all" else " or "
        return SearchResult(query.ids, f"{path.name} shows {', '.join(query.names)}: "
                                       f"{_found(len(query.ids))} with "
                                       f"{joiner.join(query.names)}")

    def thumbnail(self, photo_id: str) -> bytes:
        """One photo's decrypted thumbnail (JPEG)."""
        return self.ctx.require().fetch([photo_id], thumbnail_only=True)[0].data

    def photo(self, photo_id: str) -> bytes:
        """One photo, downloaded and decrypted."""
        return self.ctx.require().fetch([photo_id])[0].data
