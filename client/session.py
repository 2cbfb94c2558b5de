"""The client core's entry point: one unlocked family bundle and one connection.

Both faces of the phone (the `privface` CLI and the Kivy app) open a FamilySession and call
its methods; the workflow itself lives in client/pipeline/. No prompts and no argparse
here: the passphrase and the settings come in as parameters, and only errors of the
common/errors.py tree come out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from client.config import ClientConfig
from client.keystore import load_bundle, save_bundle
from client.pipeline import family, labelling, library
from client.pipeline.detect import DetectionReport
from client.pipeline.faces import MATCH_TOLERANCE, share_ckks_secret
from client.pipeline.labelling import Progress
from client.rpc import Credentials, FamilyDeletion, PrivfaceClient
from common import labels
from common import secure_cascade as sc
from common.errors import AlreadyExistsError, MalformedInputError, PreconditionError

log = logging.getLogger(__name__)


def _quiet(what: str, amount: int) -> None:
    """The default progress callback."""


def _check_new_bundle(path: Path, force: bool) -> None:
    if path.exists() and not force:
        raise AlreadyExistsError(f"{path} already exists: choose another bundle path, or "
                                 "replace it explicitly (--force)")


class FamilySession:
    """An unlocked family bundle and a connected client. Close it (or use ``with``)."""

    def __init__(self, bundle_path: str | Path, passphrase: str,
                 config: ClientConfig | None = None) -> None:
        self.config = config or ClientConfig.load()
        self.bundle_path = Path(bundle_path)
        self._passphrase = passphrase
        self.bundle = load_bundle(self.bundle_path, passphrase)
        if self.bundle.invite_token:
            raise MalformedInputError(f"{self.bundle_path} is an export file for a new phone: "
                                      "join with it first (privface family join FILE)")
        self.client = PrivfaceClient(
            self.config.server_or(self.bundle.server),
            Credentials(self.bundle.family_id, self.bundle.access_token), self.config)

    @classmethod
    def create(cls, bundle_path: str | Path, passphrase: str, config: ClientConfig | None = None,
               capacity: int = labels.DEFAULT_CAPACITY, device_name: str = "first phone",
               force: bool = False) -> FamilySession:
        """Makes a new family's keys here, registers it, writes the bundle, opens it."""
        config = config or ClientConfig.load()
        path = Path(bundle_path)
        _check_new_bundle(path, force)
        with PrivfaceClient(config.server_or(""), config=config) as client:
            bundle = family.create_family(client, capacity, device_name)
        save_bundle(bundle, path, passphrase)
        return cls(path, passphrase, config)

    @classmethod
    def join(cls, export_path: str | Path, export_passphrase: str, bundle_path: str | Path,
             passphrase: str, config: ClientConfig | None = None,
             device_name: str = "another phone", force: bool = False) -> FamilySession:
        """Joins the family of an export file as a new device with its own token."""
        config = config or ClientConfig.load()
        path = Path(bundle_path)
        _check_new_bundle(path, force)
        invite = family.read_export(Path(export_path), export_passphrase)
        with PrivfaceClient(config.server_or(invite.server), config=config) as client:
            bundle = family.join_family(client, invite, device_name)
        save_bundle(bundle, path, passphrase)
        return cls(path, passphrase, config)

    def __enter__(self) -> FamilySession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the connection."""
        self.client.close()

    def save(self) -> None:
        """Writes the bundle back (after roster or key changes)."""
        save_bundle(self.bundle, self.bundle_path, self._passphrase)

    def sync(self) -> bool:
        """Fetches what other phones changed in the roster; True (and saved) if anything."""
        changed = family.sync_roster(self.client, self.bundle)
        if changed:
            self.save()
        return changed

    # -- family and devices --------------------------------------------------------------

    def summary(self) -> FamilySummaryView:
        """What the server holds, with this phone's view of the roster."""
        info = self.client.get_family()
        return FamilySummaryView(info.family_id, self.client.address, len(self.bundle.roster),
                                 self.bundle.capacity, info.photo_count,
                                 info.gallery_entry_count, info.has_public_context,
                                 self.bundle.device_name, bool(self.bundle.product_keys))

    def export(self, path: str | Path, passphrase: str,
               ttl_seconds: int = family.DEFAULT_INVITE_TTL) -> float:
        """Writes an export file for another phone; returns when its invitation expires."""
        self.sync()
        share_ckks_secret(self.client, self.bundle)
        return family.export_bundle(self.client, self.bundle, Path(path), passphrase,
                                    ttl_seconds)

    def devices(self) -> list[family.Device]:
        """The family's devices."""
        return family.list_devices(self.client, self.bundle)

    def revoke(self, name_or_id: str) -> family.Device:
        """Revokes another phone of the family."""
        return family.revoke_device(self.client, self.bundle, name_or_id)

    def delete_family(self, remove_bundle: bool = True) -> FamilyDeletion:
        """Deletes the family on the server: every photo, face, key, sealed item and device,
        for every phone. Then (``remove_bundle``) deletes this phone's bundle, whose keys
        no longer open anything."""
        gone = self.client.delete_family()
        log.info("deleted family %s from %s", gone.family_id, self.client.address)
        if remove_bundle:
            self.bundle_path.unlink(missing_ok=True)
        return gone

    def import_product_key(self, data: bytes) -> sc.ProductKey:
        """Stores a detector vendor's product key in the bundle."""
        key = sc.ProductKey.from_bytes(data)
        self.bundle.product_keys = {key.detector_id: data}
        self.save()
        return key

    # -- members -------------------------------------------------------------------------

    def members(self) -> list[labelling.Member]:
        """The roster with gallery counts."""
        self.sync()
        return labelling.members(self.client, self.bundle)

    def add_members(self, names: Sequence[str]) -> dict[str, int]:
        """Adds members by name only (labels by hand); returns name -> slot."""
        slots = family.update_roster(self.client, self.bundle,
                                     lambda b: {n.strip(): b.add_member(n) for n in names})
        self.save()
        return slots

    def enroll(self, name: str, paths: Sequence[str | Path], progress: Progress = _quiet
               ) -> labelling.EnrollResult:
        """Adds a member (or more of their faces) from photos."""
        try:
            return labelling.enroll_member(self.client, self.bundle, name,
                                           [Path(p) for p in paths], progress)
        finally:
            self.save()  # keys or roster may have changed even if a later step failed

    def remove_member(self, name: str) -> labelling.Removal:
        """Removes a member and their encrypted faces."""
        try:
            return labelling.remove_member(self.client, self.bundle, name)
        finally:
            self.save()

    def rename_member(self, old: str, new: str) -> None:
        """Renames a member on every phone."""
        labelling.rename_member(self.client, self.bundle, old, new)
        self.save()

    def slots(self, names: Sequence[str]) -> list[int]:
        """Slots of member names (NotFoundError names the known members)."""
        return [self.bundle.slot_of(n.strip()) for n in names if n.strip()]

    # -- photos --------------------------------------------------------------------------

    def backup(self, paths: Sequence[Path], people: Sequence[str] | None = None,
               progress: Progress = _quiet,
               on_item: Callable[[library.BackupItem], None] | None = None
               ) -> library.BackupSummary:
        """Backs up photos labelled with ``people``, or (None) by the faces they show."""
        self.sync()
        labeller = None
        slots: list[int] = []
        if people is None:
            labeller = library.face_labeller(self.client, self.bundle,
                                             self.config.detection_mode, progress)
        else:
            slots = self.slots(people)
        return library.backup_files(self.client, self.bundle, paths, labeller, slots,
                                    progress, on_item)

    def search(self, names: Sequence[str], mode: labels.MatchMode = labels.MatchMode.ALL,
               top_n: int = 0) -> tuple[list[str], float]:
        """Photo ids with the named members, and the server's match time in ms."""
        self.sync()
        return library.search_by_names(self.client, self.bundle, names, mode, top_n)

    def search_by_photo(self, path: str | Path, mode: labels.MatchMode = labels.MatchMode.ALL,
                        top_n: int = 0, progress: Progress = _quiet) -> library.PhotoQuery:
        """Photo ids with the members a query photo shows."""
        self.sync()
        return library.search_by_photo(self.client, self.bundle, Path(path), mode, top_n,
                                       self.config.detection_mode, progress=progress)

    def fetch(self, photo_ids: Sequence[str], thumbnail_only: bool = False,
              progress: Progress = _quiet) -> list[library.Fetched]:
        """Downloads and decrypts photos (or thumbnails)."""
        return library.fetch_many(self.client, self.bundle, photo_ids, thumbnail_only,
                                  progress)

    def list_photos(self) -> list[str]:
        """The family's photo ids, newest first."""
        return self.client.list_photos()

    def delete(self, photo_ids: Sequence[str]) -> None:
        """Deletes photos from the server."""
        for photo_id in photo_ids:
            self.client.delete_photo(photo_id)

    # -- faces ---------------------------------------------------------------------------

    def identify(self, path: str | Path, tolerance: float = MATCH_TOLERANCE,
                 progress: Progress = _quiet) -> labelling.PhotoLabelling:
        """Who is in a photo (faces found, encrypted matching)."""
        self.sync()
        return labelling.label_photo(self.client, self.bundle, Path(path),
                                     self.config.detection_mode, tolerance, progress)

    def detect(self, bgr: np.ndarray, mode: str | None = None,
               progress: Progress = _quiet) -> DetectionReport:
        """Secure detection of one BGR photo (PreconditionError without a product key)."""
        key = labelling.product_key(self.bundle)
        if key is None:
            raise PreconditionError("no product key: get one from the detector vendor and "
                                    "run `privface detector import KEYFILE`")
        return labelling.secure_detect(self.client, key, bgr,
                                       mode or self.config.detection_mode, progress)


@dataclass(frozen=True)
class FamilySummaryView:
    """What `family show` and the app's header display."""

    family_id: str
    server: str
    members: int
    capacity: int
    photos: int
    gallery_faces: int
    has_keys: bool
    device_name: str
    has_product_key: bool
