"""Backup: photos (or folders) encrypted and uploaded, labelled by the faces they show."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from client.app.controllers.context import AppContext
from client.app.controllers.files import photo_files
from client.pipeline.labelling import Progress
from client.pipeline.library import BackupItem


def _quiet(what: str, amount: int) -> None:
    """No progress to show."""


@dataclass(frozen=True)
class BackupTile:
    """One backed-up photo in the result grid."""

    path: Path
    photo_id: str
    thumbnail: bytes  # JPEG preview (empty when the backup failed)
    names: list[str]
    ok: bool
    title: str  # who was found (or "failed")
    caption: str  # the file, and what happened to it

    @classmethod
    def of(cls, item: BackupItem) -> BackupTile:
        if item.receipt is None:
            return cls(item.path, "", b"", [], False, "failed",
                       f"{item.path.name}: {item.error}")
        again = " (already backed up)" if item.receipt.already_stored else ""
        who = ", ".join(item.names) if item.names else (
            f"{item.faces} unknown face{'' if item.faces == 1 else 's'}" if item.faces
            else "already backed up" if again else "no faces")
        return cls(item.path, item.receipt.photo_id, item.receipt.thumbnail, list(item.names),
                   True, who, f"{item.path.name}{again}")


@dataclass(frozen=True)
class BackupResult:
    """What a backup run did, in one line."""

    stored: int
    already: int
    failed: int
    seconds: float
    who: dict[str, int]
    bytes_sent: int = 0  # every message sent, secure detection included

    @property
    def message(self) -> str:
        found = ", ".join(f"{n} in {c}" for n, c in sorted(self.who.items())) or "no members"
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"backed up {self.stored} photo(s), {self.already} already there{failed} "
                f"in {self.seconds:.1f} s ({self.bytes_sent / 1e6:.1f} MB sent); "
                f"found {found}")


class BackupController:
    """Backs up photos through the open session."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def photos(self, paths_text: str, recursive: bool = False) -> list[Path]:
        """The photo files named by a path field (folders expanded)."""
        return photo_files(paths_text, recursive)

    def backup(self, paths: list[Path], progress: Progress = _quiet,
               on_tile: Callable[[BackupTile], None] | None = None) -> BackupResult:
        """Backs up each photo, labelled by the members its faces show; ``on_tile`` gets
        each photo's tile as soon as it is stored."""
        def each(item: BackupItem) -> None:
            if on_tile is not None:
                on_tile(BackupTile.of(item))

        summary = self.ctx.require().backup(paths, None, progress, each)
        return BackupResult(len(summary.stored), len(summary.already), len(summary.failed),
                            summary.seconds, dict(summary.who), summary.bytes_sent)
