"""Who is in a photo, and who is in the family: steps 2-4 of the seed protocol on the phone.

Find faces (the vendor's encrypted detector on the server when the bundle holds a product
key, else the phone's own detector), embed them locally, identify them by encrypted
matching, and build the photo's label set. Also the gallery side of the roster: enroll a
member from photos, remove one (and re-pack the gallery), rename one.

Knows nothing of argparse, tqdm or Kivy: progress goes through a callback.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client.keystore import FamilyBundle, check_member_name
from client.pipeline import faces, family, recognize
from client.pipeline.detect import MODES, DetectionReport, SecureDetector
from client.rpc import PrivfaceClient
from common import secure_cascade as sc
from common.errors import MalformedInputError, PrivfaceError

log = logging.getLogger(__name__)

MAX_ENROLL_PHOTOS = 20

# Progress callback: (what is happening, units done since the last call).
Progress = Callable[[str, int], None]


def _quiet(what: str, amount: int) -> None:
    """The default progress callback: nothing to show."""


@dataclass(frozen=True)
class FoundFace:
    """One face of a photo: where, and who (name None: not a family member)."""

    box: recognize.Box  # (top, right, bottom, left)
    name: str | None
    slot: int | None
    distance: float


@dataclass
class PhotoLabelling:
    """The faces of one photo, the members among them, and the time each step took."""

    faces: list[FoundFace]
    detection: DetectionReport | None = None  # None: found by the phone's own detector
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def slots(self) -> list[int]:
        """The members' slots, sorted, each once: the photo's label set."""
        return sorted({f.slot for f in self.faces if f.slot is not None})

    @property
    def names(self) -> list[str]:
        """The members' names, in slot order."""
        return sorted({f.name for f in self.faces if f.name is not None})


def product_key(bundle: FamilyBundle) -> sc.ProductKey | None:
    """The detector product key the bundle holds (the newest, if several), else None."""
    if not bundle.product_keys:
        return None
    _, key_bytes = sorted(bundle.product_keys.items())[-1]
    return sc.ProductKey.from_bytes(key_bytes)


def secure_detect(client: PrivfaceClient, key: sc.ProductKey, bgr: np.ndarray,
                  mode: str = "default", progress: Progress = _quiet) -> DetectionReport:
    """Runs the vendor's encrypted detector on the server over one BGR photo."""
    if mode not in MODES:
        raise MalformedInputError(f"unknown detection mode {mode!r} (use one of "
                                  f"{', '.join(MODES)})")
    return SecureDetector(client, key, MODES[mode],
                          progress=lambda n: progress("secure detection", n)).detect(bgr)


def find_faces(client: PrivfaceClient, bundle: FamilyBundle, rgb: np.ndarray,
               mode: str = "default", progress: Progress = _quiet
               ) -> tuple[list[recognize.Box], DetectionReport | None]:
    """Face boxes: secure detection if the bundle has a product key, else local HOG."""
    key = product_key(bundle)
    if key is None:
        return recognize.detect_faces(rgb), None
    report = secure_detect(client, key, rgb[:, :, ::-1].copy(), mode, progress)
    return [(y, x + w, y + h, x) for x, y, w, h in report.boxes], report


def identify_faces(client: PrivfaceClient, bundle: FamilyBundle, embeddings: np.ndarray,
                   boxes: Sequence[recognize.Box], tolerance: float = faces.MATCH_TOLERANCE
                   ) -> list[FoundFace]:
    """Encrypted matching of each embedding; unknown faces when nobody is enrolled."""
    if len(boxes) == 0:
        return []
    if bundle.ckks_secret is None:  # no gallery yet: every face is a stranger
        return [FoundFace(b, None, None, float("inf")) for b in boxes]
    matches = faces.identify(client, bundle, embeddings, tolerance)
    return [FoundFace(b, m.name, m.slot, m.distance) for b, m in zip(boxes, matches, strict=True)]


def label_image(client: PrivfaceClient, bundle: FamilyBundle, rgb: np.ndarray,
                mode: str = "default", tolerance: float = faces.MATCH_TOLERANCE,
                progress: Progress = _quiet) -> PhotoLabelling:
    """Steps 2-4 on one RGB photo: faces, embeddings, encrypted identification."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    boxes, report = find_faces(client, bundle, rgb, mode, progress)
    timings["detection"] = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    embeddings = recognize.face_embeddings(rgb, boxes)
    timings["embedding"] = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    found = identify_faces(client, bundle, embeddings, boxes, tolerance)
    timings["matching"] = (time.perf_counter() - start) * 1000
    return PhotoLabelling(found, report, timings)


def label_photo(client: PrivfaceClient, bundle: FamilyBundle, path: Path,
                mode: str = "default", tolerance: float = faces.MATCH_TOLERANCE,
                progress: Progress = _quiet) -> PhotoLabelling:
    """Steps 2-4 on one photo file."""
    return label_image(client, bundle, recognize.load_rgb(path), mode, tolerance, progress)


# -- the gallery side of the roster -------------------------------------------------------


@dataclass(frozen=True)
class EnrollPhoto:
    """What one enrollment photo gave: a face (with a note) or the reason it was skipped."""

    path: Path
    face: recognize.EnrollmentFace | None
    reason: str = ""

    @property
    def used(self) -> bool:
        return self.face is not None


@dataclass(frozen=True)
class EnrollResult:
    """The outcome of enrolling one member."""

    name: str
    slot: int
    photos: list[EnrollPhoto]
    gallery_size: int
    keys: str | None  # "created" / "adopted" when the family's CKKS key came to this phone

    @property
    def used(self) -> list[EnrollPhoto]:
        return [p for p in self.photos if p.used]

    @property
    def skipped(self) -> list[EnrollPhoto]:
        return [p for p in self.photos if not p.used]


def enrollment_faces(paths: Sequence[Path], progress: Progress = _quiet) -> list[EnrollPhoto]:
    """The face of each enrollment photo; a bad photo is skipped with its reason."""
    out = []
    for path in paths:
        try:
            out.append(EnrollPhoto(Path(path), recognize.enrollment_face(
                recognize.load_rgb(path))))
        except PrivfaceError as exc:
            out.append(EnrollPhoto(Path(path), None, str(exc)))
        progress("faces", 1)
    return out


def enroll_member(client: PrivfaceClient, bundle: FamilyBundle, name: str,
                  paths: Sequence[Path], progress: Progress = _quiet) -> EnrollResult:
    """Adds a member (or more faces of one) from 1-20 photos; the caller saves the bundle.

    Each photo contributes its largest face; photos without a usable face are skipped with
    the reason. MalformedInputError if none is usable."""
    if not 1 <= len(paths) <= MAX_ENROLL_PHOTOS:
        raise MalformedInputError(f"enroll a member with 1 to {MAX_ENROLL_PHOTOS} photos "
                                  f"(got {len(paths)})")
    name = check_member_name(name)
    photos = enrollment_faces(paths, progress)
    usable = [p.face.embedding for p in photos if p.face is not None]
    if not usable:
        reasons = "; ".join(f"{p.path.name}: {p.reason}" for p in photos)
        raise MalformedInputError(f"no usable face for {name}: {reasons}")
    keys = faces.ensure_ckks_keys(client, bundle)
    slot = family.update_roster(client, bundle, lambda b: b.add_member(name))
    size = faces.add_faces(client, bundle, slot, np.array(usable))
    progress("upload", len(usable))
    return EnrollResult(name, slot, photos, size, keys)


@dataclass(frozen=True)
class Member:
    """A family member as the phone shows them."""

    name: str
    slot: int
    faces: int  # live encrypted faces in the gallery


def members(client: PrivfaceClient, bundle: FamilyBundle) -> list[Member]:
    """The roster with gallery counts, in slot order."""
    counts = faces.gallery_counts(client) if bundle.ckks_secret else {}
    return [Member(n, s, counts.get(s, 0))
            for n, s in sorted(bundle.roster.items(), key=lambda kv: kv[1])]


@dataclass(frozen=True)
class Removal:
    """What removing a member deleted."""

    name: str
    faces_removed: int
    positions_before: int
    entries_after: int


def remove_member(client: PrivfaceClient, bundle: FamilyBundle, name: str) -> Removal:
    """Removes a member from the roster and their encrypted faces from the server (the
    gallery is re-packed here so the ciphertexts really go). The caller saves the bundle."""
    family.sync_roster(client, bundle)
    slot = bundle.slot_of(name)
    dead = client.remove_gallery_slot(slot) if bundle.ckks_secret else 0
    family.update_roster(client, bundle, lambda b: b.remove_member(name))
    before = after = 0
    if bundle.ckks_secret:
        before, after = faces.compact(client, bundle)
    return Removal(name, dead, before, after)


def rename_member(client: PrivfaceClient, bundle: FamilyBundle, old: str, new: str) -> None:
    """Renames a member on every phone of the family (the slot, photos and faces stay)."""
    family.update_roster(client, bundle, lambda b: b.rename_member(old, new))
