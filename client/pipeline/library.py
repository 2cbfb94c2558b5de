"""The family's photo library from the phone: back up many photos (labelled by hand or by
their faces), search by members or by an example photo, fetch many.

Builds on photos.py (one photo's encryption) and labelling.py (who is in a photo).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path

from client.keystore import FamilyBundle
from client.pipeline import labelling, photos, recognize
from client.pipeline.faces import MATCH_TOLERANCE
from client.pipeline.labelling import PhotoLabelling, Progress
from client.rpc import PrivfaceClient, ServerUnavailableError
from common import labels
from common.errors import AuthenticationError, MalformedInputError, NotFoundError, PrivfaceError

log = logging.getLogger(__name__)

PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"})


def _quiet(what: str, amount: int) -> None:
    """The default progress callback."""


def collect_photos(paths: Iterable[str | Path], recursive: bool = False) -> list[Path]:
    """The photo files named, and those inside named folders (sub-folders too with
    ``recursive``), sorted per folder, each once. Hidden files are skipped."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            pattern = path.rglob("*") if recursive else path.glob("*")
            found = sorted(p for p in pattern if p.is_file() and
                           p.suffix.lower() in PHOTO_SUFFIXES and
                           not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                hint = "" if recursive else " (add --recursive for its sub-folders)"
                log.warning("no photos in %s%s", path, hint)
            out.extend(found)
        elif path.is_file():
            out.append(path)
        else:
            raise NotFoundError(f"no such photo or folder: {path}")
    seen: set[Path] = set()
    unique = []
    for p in out:
        resolved = p.resolve()
        if resolved not in seen:
            seen.add(resolved)
            unique.append(p)
    return unique


@dataclass(frozen=True)
class BackupItem:
    """One photo's backup: its receipt and who was found, or why it failed."""

    path: Path
    receipt: photos.BackupReceipt | None
    names: list[str] = field(default_factory=list)
    faces: int = 0
    error: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)
    bytes_up: int = 0  # every message this photo's backup sent (detection, matching, photo)
    bytes_down: int = 0


@dataclass
class BackupSummary:
    """What a backup run did."""

    items: list[BackupItem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def stored(self) -> list[BackupItem]:
        return [i for i in self.items if i.receipt and not i.receipt.already_stored]

    @property
    def already(self) -> list[BackupItem]:
        return [i for i in self.items if i.receipt and i.receipt.already_stored]

    @property
    def failed(self) -> list[BackupItem]:
        return [i for i in self.items if i.receipt is None]

    @property
    def faces(self) -> int:
        return sum(i.faces for i in self.items)

    @property
    def who(self) -> Counter[str]:
        """Photos per member found."""
        return Counter(n for i in self.items for n in i.names)

    @property
    def bytes_sent(self) -> int:
        """Everything sent: secure detection, encrypted matching and the photos."""
        return sum(i.bytes_up for i in self.items)

    @property
    def bytes_received(self) -> int:
        return sum(i.bytes_down for i in self.items)


Labeller = Callable[[Path], PhotoLabelling]


def face_labeller(client: PrivfaceClient, bundle: FamilyBundle, mode: str = "default",
                  progress: Progress = _quiet) -> Labeller:
    """Labels a photo by its faces (secure detection, encrypted matching)."""
    return lambda path: labelling.label_photo(client, bundle, path, mode, progress=progress)


def backup_one(client: PrivfaceClient, bundle: FamilyBundle, path: Path,
               labeller: Labeller | None = None, slots: Sequence[int] = (),
               known: Set[str] = frozenset()) -> BackupItem:
    """Backs up one photo with the given slots, or those its faces show. A photo whose id
    is in ``known`` (the server has it) is neither labelled nor sent again."""
    data = Path(path).read_bytes()
    photo_id = photos.photo_id_for(bundle, data)
    if photo_id in known:
        receipt = photos.BackupReceipt(photo_id, True, 0, photos.make_thumbnail(data))
        return BackupItem(Path(path), receipt)
    before = client.traffic.snapshot()
    found: PhotoLabelling | None = labeller(path) if labeller else None
    use = found.slots if found else list(slots)
    receipt = photos.backup_photo(client, bundle, data, use)
    names = found.names if found else [n for n in (bundle.name_of(s) for s in use) if n]
    timings = {**(found.timings_ms if found else {}), **receipt.timings_ms}
    sent, received = (after - was for after, was in
                      zip(client.traffic.snapshot(), before, strict=True))
    return BackupItem(Path(path), receipt, names, len(found.faces) if found else 0, "",
                      timings, sent, received)


def backup_files(client: PrivfaceClient, bundle: FamilyBundle, paths: Sequence[Path],
                 labeller: Labeller | None = None, slots: Sequence[int] = (),
                 progress: Progress = _quiet,
                 on_item: Callable[[BackupItem], None] | None = None) -> BackupSummary:
    """Backs up every photo; a photo that fails is reported and the others go on. A lost
    server or revoked device stops the run (every photo would fail the same way)."""
    summary = BackupSummary()
    start = time.perf_counter()
    # One listing up front (about 33 bytes per stored photo) spares photos already backed
    # up their secure detection, tens of megabytes each, when a folder is backed up again.
    known = frozenset(client.list_photos()) if paths else frozenset()
    for path in paths:
        try:
            item = backup_one(client, bundle, path, labeller, slots, known)
        except (ServerUnavailableError, AuthenticationError):
            raise
        except (PrivfaceError, OSError) as exc:
            item = BackupItem(Path(path), None, error=str(exc))
            log.info("backup of %s failed: %s", path, exc)
        summary.items.append(item)
        if on_item:
            on_item(item)
        progress("photos", 1)
    summary.seconds = time.perf_counter() - start
    return summary


@dataclass(frozen=True)
class PhotoQuery:
    """A search by example photo: the faces found, and the members they became."""

    labelling: PhotoLabelling
    ids: list[str]
    server_ms: float

    @property
    def names(self) -> list[str]:
        return self.labelling.names


def search_by_names(client: PrivfaceClient, bundle: FamilyBundle, names: Sequence[str],
                    mode: labels.MatchMode = labels.MatchMode.ALL, top_n: int = 0
                    ) -> tuple[list[str], float]:
    """Photo ids showing the named members (all of them, any, or the best ``top_n``)."""
    clean = [n.strip() for n in names if n.strip()]
    if not clean:
        raise MalformedInputError("name at least one member to search for")
    if mode is labels.MatchMode.RANKED and top_n < 1:
        raise MalformedInputError("a ranked search needs --top N with N >= 1")
    return photos.search_photos(client, bundle, [bundle.slot_of(n) for n in clean], mode,
                                top_n)


def search_by_photo(client: PrivfaceClient, bundle: FamilyBundle, path: Path,
                    mode: labels.MatchMode = labels.MatchMode.ALL, top_n: int = 0,
                    detection_mode: str = "default", tolerance: float = MATCH_TOLERANCE,
                    progress: Progress = _quiet) -> PhotoQuery:
    """Steps 6-10 with a query photo: its faces are found and identified (encrypted), and
    the members among them become the query."""
    found = labelling.label_photo(client, bundle, path, detection_mode, tolerance, progress)
    if not found.faces:
        raise recognize.NoFaceError(f"no face found in the query photo {path}")
    if not found.slots:
        raise NotFoundError(f"none of the {len(found.faces)} face(s) in {path} is an enrolled "
                            "family member")
    ids, server_ms = photos.search_photos(client, bundle, found.slots, mode, top_n)
    return PhotoQuery(found, ids, server_ms)


@dataclass(frozen=True)
class Fetched:
    """One fetched photo (or thumbnail), decrypted."""

    photo_id: str
    data: bytes


def fetch_many(client: PrivfaceClient, bundle: FamilyBundle, photo_ids: Sequence[str],
               thumbnail_only: bool = False, progress: Progress = _quiet) -> list[Fetched]:
    """Downloads and decrypts each photo (all or nothing: the first failure is raised)."""
    out = []
    for photo_id in photo_ids:
        out.append(Fetched(photo_id, photos.fetch_photo(client, bundle, photo_id,
                                                        thumbnail_only)))
        progress("photos", 1)
    return out


def image_suffix(data: bytes) -> str:
    """A file suffix for decrypted photo bytes, from their magic number."""
    for magic, suffix in ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"BM", ".bmp"),
                          (b"RIFF", ".webp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif")):
        if data.startswith(magic):
            return suffix
    return ".bin"
