"""`privface backup`, `search`, `fetch`, `delete` and `list`."""

from __future__ import annotations

import argparse
from pathlib import Path

from client.cli.common import (
    CliError,
    add_detection_mode,
    open_session,
    progress_bars,
    say,
)
from client.pipeline.library import BackupItem, collect_photos, image_suffix
from common import labels


def _names(people: str) -> list[str]:
    names = [n.strip() for n in people.split(",") if n.strip()]
    if not names:
        raise CliError("--people needs at least one name")
    return names


def _mode(args: argparse.Namespace) -> labels.MatchMode:
    if args.top is not None and args.top < 1:
        raise CliError("--top needs N >= 1")
    return labels.MatchMode.RANKED if args.top else (
        labels.MatchMode.ANY if args.any else labels.MatchMode.ALL)


def cmd_backup(args: argparse.Namespace) -> int:
    if args.auto and args.people:
        raise CliError("give either --people or --auto")
    paths = collect_photos(args.photos, args.recursive)
    if not paths:
        raise CliError("no photos found (JPEG, PNG, BMP, WebP, TIFF); folders need "
                       "--recursive to include their sub-folders")
    people = _names(args.people) if args.people else None

    def report(item: BackupItem) -> None:
        if item.receipt is None:
            say(f"  skipped {item.path}: {item.error}")
            return
        again = item.receipt.already_stored
        who = ", ".join(item.names) or ("nobody known" if people is None and not again else "")
        state = "  (already backed up)" if again else ""
        print(f"{item.receipt.photo_id}  {item.path}{state}" + (f"  [{who}]" if who else ""))

    with open_session(args) as s:
        secure = bool(s.bundle.product_keys)
        if people is None and not secure:
            say("(no detector product key: faces are found on this phone; "
                "`privface detector import KEYFILE` uses the vendor's encrypted detector)")
        with progress_bars({"photos": len(paths)}) as progress:
            summary = s.backup(paths, people, progress, report)
        mode = s.config.detection_mode
    faceless = [i for i in summary.stored if i.faces == 0]
    if people is None and secure and mode == "default" and faceless:
        say(f"{len(faceless)} new photo(s) showed no face; faces smaller than about 7.6% of a "
            "photo's long side (group photos from a few metres) need `--mode small-faces` "
            "(about twice the upload); delete and back them up again with it")
    who = ", ".join(f"{n} {c}" for n, c in summary.who.most_common()) or "nobody known"
    say(f"{len(summary.items)} photo(s): {len(summary.stored)} new, {len(summary.already)} "
        f"already there, {len(summary.failed)} failed; {summary.faces} face(s) found; "
        f"who: {who}; {summary.bytes_sent / 1e6:.1f} MB sent, "
        f"{summary.bytes_received / 1e6:.1f} MB received; {summary.seconds:.1f} s")
    return 1 if summary.failed else 0


def cmd_search(args: argparse.Namespace) -> int:
    mode = _mode(args)
    if bool(args.people) == bool(args.photo):
        raise CliError("search with --people A,B or with --photo FILE")
    with open_session(args) as s:
        if args.photo:
            with progress_bars() as progress:
                query = s.search_by_photo(args.photo, mode, args.top or 0, progress)
            unknown = len(query.labelling.faces) - len(query.labelling.slots)
            say(f"query photo shows: {', '.join(query.names)}"
                + (f" (+{unknown} face(s) not in the family)" if unknown > 0 else ""))
            ids, server_ms = query.ids, query.server_ms
        else:
            ids, server_ms = s.search(_names(args.people), mode, args.top or 0)
    for photo_id in ids:
        print(photo_id)
    say(f"{len(ids)} photo(s); server matched in {server_ms:.1f} ms")
    return 0


def cmd_fetch(args: argparse.Namespace) -> int:
    out = Path(args.output)
    single_file = len(args.photo_ids) == 1 and not out.is_dir()
    if not single_file:
        out.mkdir(parents=True, exist_ok=True)
    with open_session(args) as s, progress_bars({"photos": len(args.photo_ids)}) as progress:
        fetched = s.fetch(args.photo_ids, args.thumbnail, progress)
    for item in fetched:
        path = out if single_file else out / (item.photo_id + (
            ".thumb.jpg" if args.thumbnail else image_suffix(item.data)))
        path.write_bytes(item.data)
        print(path)
    say(f"wrote {len(fetched)} {'thumbnail' if args.thumbnail else 'photo'}(s), "
        f"{sum(len(f.data) for f in fetched):,} bytes")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with open_session(args) as s:
        s.delete(args.photo_ids)
    for photo_id in args.photo_ids:
        print(f"deleted {photo_id}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with open_session(args) as s:
        for photo_id in s.list_photos():
            print(photo_id)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds these commands to the privface parser."""
    backup = sub.add_parser(
        "backup", help="encrypt and back up photos (labelled by their faces, or --people)",
        description="encrypts each photo (AES-256-GCM) and its label vector (ASPE) and "
        "uploads them; by default the labels come from the faces each photo shows (secure "
        "detection with a product key, encrypted matching)")
    backup.add_argument("photos", nargs="+", help="photo files or folders")
    backup.add_argument("-r", "--recursive", action="store_true",
                        help="include photos in sub-folders of the folders given")
    backup.add_argument("--people", help="comma-separated members shown in every photo "
                        "(labels by hand instead of by faces)")
    backup.add_argument("--auto", action="store_true",
                        help="label by faces (the default; kept for older scripts)")
    add_detection_mode(backup, " for the faces of each photo")
    backup.set_defaults(fn=cmd_backup)

    search = sub.add_parser("search", help="find photos by who is in them",
                            description="an encrypted query: photos with all of the members "
                            "(default), any of them, or the N best; the members come from "
                            "--people or from the faces of a query --photo")
    search.add_argument("--people", help="comma-separated member names")
    search.add_argument("--photo", metavar="FILE",
                        help="a query photo: the family members it shows become the query")
    group = search.add_mutually_exclusive_group()
    group.add_argument("--any", action="store_true", help="photos with any of them")
    group.add_argument("--top", type=int, metavar="N",
                       help="the N photos with the most of them, best first")
    add_detection_mode(search, " for --photo")
    search.set_defaults(fn=cmd_search)

    fetch = sub.add_parser("fetch", help="download and decrypt photos",
                           description="downloads and decrypts photos into a folder (or one "
                           "photo into a file)")
    fetch.add_argument("photo_ids", nargs="+", metavar="ID")
    fetch.add_argument("-o", "--output", required=True,
                       help="a file for one photo; a folder (made if missing) for several, "
                       "or an existing folder for one")
    fetch.add_argument("--thumbnail", action="store_true", help="only the small previews")
    fetch.set_defaults(fn=cmd_fetch)

    delete = sub.add_parser("delete", help="delete photos from the server")
    delete.add_argument("photo_ids", nargs="+", metavar="ID")
    delete.set_defaults(fn=cmd_delete)

    sub.add_parser("list", help="list the family's photo ids, newest first").set_defaults(
        fn=cmd_list)
