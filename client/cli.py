"""privface: the family phone's command line.

Every command reads the family bundle (``--bundle`` or PRIVFACE_BUNDLE, default
~/.privface/family.bundle), unlocked by PRIVFACE_PASSPHRASE or a prompt.
"""

from __future__ import annotations

import argparse
import getpass
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from client.keystore import load_bundle, save_bundle
from client.rpc import Credentials, PrivfaceClient
from common import labels
from common.errors import PrivfaceError

DEFAULT_BUNDLE = Path.home() / ".privface" / "family.bundle"
DEFAULT_SERVER = "127.0.0.1:50051"

log = logging.getLogger("privface.cli")


class CliError(PrivfaceError):
    """A usage problem reported as `error: ...` with exit code 2."""


# -- context ---------------------------------------------------------------------------


def _passphrase(confirm: bool = False) -> str:
    env = os.environ.get("PRIVFACE_PASSPHRASE")
    if env:
        return env
    if not sys.stdin.isatty():
        raise CliError("no passphrase: set PRIVFACE_PASSPHRASE or run in a terminal")
    first = getpass.getpass("Family passphrase: ")
    if confirm and getpass.getpass("Repeat passphrase: ") != first:
        raise CliError("the passphrases differ")
    return first


class Session:
    """The unlocked bundle and a connected client for one command."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.bundle_path = Path(args.bundle)
        self._passphrase = _passphrase()
        self.bundle = load_bundle(self.bundle_path, self._passphrase)
        server = args.server or self.bundle.server
        self.client = PrivfaceClient(server, Credentials(self.bundle.family_id,
                                                         self.bundle.access_token))

    def save(self) -> None:
        """Writes the bundle back (after roster or key changes)."""
        save_bundle(self.bundle, self.bundle_path, self._passphrase)

    def slots(self, people: str) -> list[int]:
        """Slots of a comma-separated list of member names."""
        names = [n.strip() for n in people.split(",") if n.strip()]
        if not names:
            raise CliError("--people needs at least one name")
        return [self.bundle.slot_of(n) for n in names]


# -- commands --------------------------------------------------------------------------


def cmd_family_create(args: argparse.Namespace) -> int:
    from client.pipeline.family import create_family
    path = Path(args.bundle)
    if path.exists() and not args.force:
        raise CliError(f"{path} already exists: use --force to replace it, or --bundle PATH")
    passphrase = _passphrase(confirm=True)
    server = args.server or DEFAULT_SERVER
    with PrivfaceClient(server) as client:
        bundle = create_family(client, args.capacity)
    save_bundle(bundle, path, passphrase)
    print(f"family {bundle.family_id} created on {server}; bundle saved to {path}")
    print("keep the bundle and its passphrase safe: they are the only copy of the keys")
    return 0


def cmd_family_show(args: argparse.Namespace) -> int:
    s = Session(args)
    info = s.client.get_family()
    print(f"family:   {info.family_id}\nserver:   {s.client.address}\n"
          f"members:  {len(s.bundle.roster)} of {s.bundle.capacity} slots\n"
          f"photos:   {info.photo_count}\ngallery:  {info.gallery_entry_count} encrypted faces\n"
          f"ckks key: {'uploaded' if info.has_public_context else 'not uploaded'}")
    return 0


def cmd_people(args: argparse.Namespace) -> int:
    s = Session(args)
    if args.action == "add":
        for name in args.names:
            print(f"{name}: slot {s.bundle.add_member(name)}")
        s.save()
    elif args.action == "remove":
        for name in args.names:
            slot = s.bundle.slot_of(name)
            dead = s.client.remove_gallery_slot(slot) if s.bundle.ckks_secret else 0
            s.bundle.remove_member(name)
            print(f"removed {name} ({dead} gallery faces)")
        s.save()
        if s.bundle.ckks_secret:
            from client.pipeline.faces import compact
            before, after = compact(s.client, s.bundle)
            print(f"gallery re-packed: {before} positions -> {after} encrypted faces "
                  "(the removed faces' ciphertexts are deleted from the server)")
    elif not s.bundle.roster:
        print("no members yet: `privface people add NAME` or `privface enroll NAME PHOTO...`")
    else:
        counts: dict[int, int] = {}
        if s.bundle.ckks_secret:
            from client.pipeline.faces import gallery_counts
            counts = gallery_counts(s.client)
        print("slot  faces  name")
        for name, slot in sorted(s.bundle.roster.items(), key=lambda kv: kv[1]):
            print(f"{slot:4d}  {counts.get(slot, 0):5d}  {name}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    from client.pipeline.photos import backup_photo
    s = Session(args)
    if args.auto and args.people:
        raise CliError("give either --people or --auto")
    slots = s.slots(args.people) if args.people else []
    stored = skipped = 0
    for path in tqdm(args.photos, desc="backup", unit="photo", disable=len(args.photos) < 2):
        if args.auto:
            from client.faces_cli import recognise_members
            slots = recognise_members(s, Path(path))
            names = ", ".join(s.bundle.name_of(x) or "?" for x in slots) or "nobody known"
            print(f"  {path}: {names}", file=sys.stderr)
        receipt = backup_photo(s.client, s.bundle, Path(path).read_bytes(), slots)
        if receipt.already_stored:
            skipped += 1
        else:
            stored += 1
        print(f"{receipt.photo_id}  {path}{'  (already backed up)' if receipt.already_stored else ''}")
    print(f"{stored} photo(s) backed up, {skipped} already there", file=sys.stderr)
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from client.pipeline.photos import search_photos
    s = Session(args)
    mode = labels.MatchMode.RANKED if args.top else (
        labels.MatchMode.ANY if args.any else labels.MatchMode.ALL)
    ids, server_ms = search_photos(s.client, s.bundle, s.slots(args.people), mode,
                                   args.top or 0)
    for photo_id in ids:
        print(photo_id)
    print(f"{len(ids)} photo(s); server matched in {server_ms:.1f} ms", file=sys.stderr)
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    from client.pipeline.photos import fetch_photo
    s = Session(args)
    data = fetch_photo(s.client, s.bundle, args.photo_id, thumbnail_only=args.thumbnail)
    Path(args.output).write_bytes(data)
    print(f"wrote {len(data)} bytes to {args.output}", file=sys.stderr)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    s = Session(args)
    for photo_id in args.photo_ids:
        s.client.delete_photo(photo_id)
        print(f"deleted {photo_id}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    s = Session(args)
    for photo_id in s.client.list_photos():
        print(photo_id)
    return 0


# -- parser ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used for --help docs)."""
    p = argparse.ArgumentParser(prog="privface", description=(
        "Back up photos encrypted, find them by who is in them; the server never sees a "
        "photo, a face, a name or a query in the clear."))
    p.add_argument("--bundle", default=os.environ.get("PRIVFACE_BUNDLE", str(DEFAULT_BUNDLE)),
                   help="family bundle file (env PRIVFACE_BUNDLE; default %(default)s)")
    p.add_argument("--server", default=os.environ.get("PRIVFACE_SERVER"),
                   help="server host:port (env PRIVFACE_SERVER; default: the bundle's)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str
            ) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    fam = sub.add_parser("family", help="create or show the family",
                         description="create or show the family")
    fam_sub = fam.add_subparsers(dest="family_command", required=True, metavar="ACTION")
    create = fam_sub.add_parser("create", help="make keys, register with the server, "
                                "write the passphrase-protected bundle")
    create.add_argument("--capacity", type=int, default=labels.DEFAULT_CAPACITY,
                        help="member slots (default %(default)s)")
    create.add_argument("--force", action="store_true", help="replace an existing bundle")
    create.set_defaults(fn=cmd_family_create)
    fam_sub.add_parser("show", help="what the server holds for the family").set_defaults(
        fn=cmd_family_show)

    people = add("people", cmd_people, "list, add or remove family members (the roster)")
    people.add_argument("action", nargs="?", choices=["list", "add", "remove"], default="list")
    people.add_argument("names", nargs="*", help="member names")

    backup = add("backup", cmd_backup, "encrypt and back up photos")
    backup.add_argument("photos", nargs="+", help="photo files (JPEG, PNG, ...)")
    backup.add_argument("--people", help="comma-separated members shown in the photos")
    backup.add_argument("--auto", action="store_true",
                        help="label each photo by detecting and recognising faces (encrypted "
                        "detection if a product key is imported, encrypted matching)")

    search = add("search", cmd_search, "find photos by who is in them (all of, by default)")
    search.add_argument("--people", required=True, help="comma-separated member names")
    group = search.add_mutually_exclusive_group()
    group.add_argument("--any", action="store_true", help="photos with any of them")
    group.add_argument("--top", type=int, metavar="N",
                       help="the N photos with the most of them, best first")

    fetch = add("fetch", cmd_fetch, "download and decrypt one photo")
    fetch.add_argument("photo_id")
    fetch.add_argument("-o", "--output", required=True, help="file to write")
    fetch.add_argument("--thumbnail", action="store_true", help="only the small preview")

    delete = add("delete", cmd_delete, "delete photos from the server")
    delete.add_argument("photo_ids", nargs="+")

    add("list", cmd_list, "list the family's photo ids, newest first")
    _add_extension_commands(sub)
    return p


def _add_extension_commands(sub: argparse._SubParsersAction) -> None:
    """Commands of the face pipeline (enroll, identify, detect) when available."""
    try:
        from client import faces_cli
    except ImportError:
        return
    faces_cli.register(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `privface`."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.fn(args)
    except PrivfaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, CliError) else 1
    except (FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
