"""People: the family's members with their face counts; enroll, rename, remove."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from client.app.controllers.context import AppContext
from client.app.controllers.files import parse_paths
from client.app.controllers.images import face_preview, photo_preview
from client.pipeline import recognize
from client.pipeline.labelling import MAX_ENROLL_PHOTOS, EnrollResult, Progress
from common.errors import MalformedInputError, PrivfaceError


def _quiet(what: str, amount: int) -> None:
    """No progress to show."""


@dataclass(frozen=True)
class MemberRow:
    """One line of the member list."""

    name: str
    faces: int

    @property
    def detail(self) -> str:
        return f"{self.faces} face{'' if self.faces == 1 else 's'}"

    @property
    def label(self) -> str:
        return f"{self.name} ({self.detail})"


@dataclass(frozen=True)
class EnrollFace:
    """One enrollment photo as the screen shows it: the detected face, or why not."""

    path: Path
    preview: bytes  # JPEG: the face with its box, or a small copy of the photo
    used: bool
    note: str  # what the detector did, or why the photo was skipped

    @property
    def title(self) -> str:
        return "face used" if self.used else "skipped"

    @property
    def caption(self) -> str:
        return self.path.name + (f": {self.note}" if self.note else "")


@dataclass(frozen=True)
class EnrollView:
    """The outcome of an enrollment, for the screen."""

    name: str
    faces: list[EnrollFace]
    gallery_size: int

    @property
    def message(self) -> str:
        used = sum(f.used for f in self.faces)
        return (f"enrolled {self.name}: {used} of {len(self.faces)} photo(s) used; "
                f"the family gallery holds {self.gallery_size} encrypted faces")


class PeopleController:
    """The roster and the gallery, through the open session."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def members(self) -> list[MemberRow]:
        """Members in slot order, with their encrypted face counts."""
        return [MemberRow(m.name, m.faces) for m in self.ctx.require().members()]

    def enroll(self, name: str, paths_text: str, progress: Progress = _quiet) -> EnrollView:
        """Adds a member (or more faces of one) from the photos in ``paths_text``."""
        name = name.strip()
        if not name:
            raise MalformedInputError("type the member's name")
        paths = parse_paths(paths_text)
        if not 1 <= len(paths) <= MAX_ENROLL_PHOTOS:
            raise MalformedInputError(f"pick 1 to {MAX_ENROLL_PHOTOS} photos of {name} "
                                      f"(got {len(paths)})")
        result = self.ctx.require().enroll(name, paths, progress)
        return EnrollView(result.name, enroll_faces(result), result.gallery_size)

    def rename(self, old: str, new: str) -> None:
        """Renames a member on every phone."""
        if not new.strip():
            raise MalformedInputError("type the new name")
        self.ctx.require().rename_member(old, new.strip())

    def remove(self, name: str) -> str:
        """Removes a member and their encrypted faces; returns what happened."""
        removal = self.ctx.require().remove_member(name)
        return (f"removed {removal.name} and {removal.faces_removed} encrypted face(s); "
                f"the gallery now holds {removal.entries_after}")


def enroll_faces(result: EnrollResult) -> list[EnrollFace]:
    """Previews of each enrollment photo: its face with the detector's box."""
    out = []
    for photo in result.photos:
        if photo.face is None:
            out.append(EnrollFace(photo.path, _plain_preview(photo.path), False, photo.reason))
            continue
        rgb = recognize.load_rgb(photo.path)
        out.append(EnrollFace(photo.path, face_preview(rgb, photo.face.box), True,
                              photo.face.note))
    return out


def _plain_preview(path: Path) -> bytes:
    """A small copy of a skipped photo; empty when it is not a readable image."""
    try:
        return photo_preview(path)
    except (PrivfaceError, OSError):
        return b""
