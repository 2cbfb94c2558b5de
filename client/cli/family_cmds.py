"""`privface family ...`, `devices`, `people` and `detector import`."""

from __future__ import annotations

import argparse
import socket
import time
from pathlib import Path

from client.cli.common import config, device_name, open_session, passphrase, say
from client.session import FamilySession
from common import labels


def cmd_family_create(args: argparse.Namespace) -> int:
    cfg = config(args)
    with FamilySession.create(cfg.bundle, passphrase(confirm=True), cfg, args.capacity,
                              device_name(args, socket.gethostname() or "first phone"),
                              force=args.force) as s:
        print(f"family {s.bundle.family_id} created on {s.client.address}; "
              f"bundle saved to {s.bundle_path}")
    say("keep the bundle and its passphrase safe: they hold the family's keys "
        "(`privface family export` makes a copy for another phone)")
    return 0


def cmd_family_show(args: argparse.Namespace) -> int:
    with open_session(args) as s:
        s.sync()
        info = s.summary()
    print(f"family:   {info.family_id}\nserver:   {info.server}\n"
          f"device:   {info.device_name or '(unnamed)'}\n"
          f"members:  {info.members} of {info.capacity} slots\nphotos:   {info.photos}\n"
          f"gallery:  {info.gallery_faces} encrypted faces\n"
          f"ckks key: {'uploaded' if info.has_keys else 'not uploaded'}\n"
          f"detector: {'product key imported' if info.has_product_key else 'none (local)'}")
    return 0


def cmd_family_export(args: argparse.Namespace) -> int:
    out = Path(args.to)
    if out.exists() and not args.force:
        say(f"error: {out} already exists (use --force to replace it)")
        return 2
    with open_session(args) as s:
        secret = passphrase("PRIVFACE_EXPORT_PASSPHRASE", "Passphrase for the export file: ",
                            confirm=True)
        expires = s.export(out, secret, int(args.valid_hours * 3600))
    print(f"wrote {out}: the family's keys and a one-time invitation, valid until "
          f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(expires))}")
    say("on the other phone: privface --bundle PATH family join FILE "
        "(it asks for this file's passphrase, then a passphrase for its own bundle)")
    return 0


def cmd_family_join(args: argparse.Namespace) -> int:
    cfg = config(args)
    export_secret = passphrase("PRIVFACE_EXPORT_PASSPHRASE", "Passphrase of the export file: ")
    own = passphrase(prompt="New passphrase for this phone's bundle: ", confirm=True)
    with FamilySession.join(args.file, export_secret, cfg.bundle, own, cfg,
                            device_name(args, socket.gethostname() or "another phone"),
                            force=args.force) as s:
        print(f"joined family {s.bundle.family_id} on {s.client.address} as device "
              f"{s.bundle.device_name!r}; bundle saved to {s.bundle_path}")
        say(f"{len(s.bundle.roster)} member(s) known; the export file is used up: delete it")
    return 0


def cmd_family_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        say("error: this deletes the family on the server for every phone: every backed-up "
            "photo, enrolled face, shared key and device, with no way back; run "
            "`privface family delete --yes` to confirm")
        return 2
    with open_session(args) as s:
        bundle = s.bundle_path
        gone = s.delete_family(remove_bundle=not args.keep_bundle)
    print(f"deleted family {gone.family_id} from the server: {gone.photos} photos, "
          f"{gone.gallery_entries} encrypted faces, {gone.devices} devices, "
          f"{gone.sealed_items} sealed items")
    say(f"kept the bundle {bundle} (its keys open nothing on the server any more)"
        if args.keep_bundle else f"removed the bundle {bundle}")
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    with open_session(args) as s:
        if args.action == "revoke":
            if not args.name:
                say("error: name the device to revoke: privface devices revoke NAME")
                return 2
            gone = s.revoke(args.name)
            print(f"revoked {gone.name} ({gone.device_id[:8]}): its next call is refused")
            return 0
        devices = s.devices()
    print(f"{'id':8s}  {'registered':16s}  {'last seen':16s}  state    name")
    for d in devices:
        state = "revoked" if d.revoked else ("this" if d.this_device else "active")
        seen = time.strftime("%Y-%m-%d %H:%M", time.localtime(d.last_seen_at)) \
            if d.last_seen_at else "-"
        print(f"{d.device_id[:8]}  {time.strftime('%Y-%m-%d %H:%M', time.localtime(d.created_at))}"
              f"  {seen:16s}  {state:7s}  {d.name}")
    return 0


def cmd_people(args: argparse.Namespace) -> int:
    with open_session(args) as s:
        if args.action == "add":
            for name, slot in s.add_members(args.names).items():
                print(f"{name}: slot {slot}")
        elif args.action == "remove":
            for name in args.names:
                gone = s.remove_member(name)
                print(f"removed {name} ({gone.faces_removed} encrypted faces deleted)")
        elif args.action == "rename":
            if len(args.names) != 2:
                say("error: privface people rename OLD NEW")
                return 2
            s.rename_member(*args.names)
            print(f"renamed {args.names[0]} to {args.names[1]} on every phone")
        else:
            members = s.members()
            if not members:
                say("no members yet: `privface enroll NAME PHOTO...` (or `people add NAME`)")
                return 0
            print("slot  faces  name")
            for m in members:
                print(f"{m.slot:4d}  {m.faces:5d}  {m.name}")
    return 0


def cmd_detector_import(args: argparse.Namespace) -> int:
    data = Path(args.keyfile).read_bytes()
    with open_session(args) as s:
        key = s.import_product_key(data)
    print(f"imported product key {key.detector_id} v{key.version} into the family bundle")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds these commands to the privface parser."""
    fam = sub.add_parser("family", help="create, show, export or join the family",
                         description="the family: create it, show it, copy it to another "
                         "phone (export) and join it from that copy")
    fam_sub = fam.add_subparsers(dest="family_command", required=True, metavar="ACTION")
    create = fam_sub.add_parser("create", help="make keys, register with the server, write "
                                "the passphrase-protected bundle")
    create.add_argument("--capacity", type=int, default=labels.DEFAULT_CAPACITY,
                        help="member slots (default %(default)s)")
    create.add_argument("--device-name", help="this phone's name in `privface devices` "
                        "(default: the host name; sealed, the server cannot read it)")
    create.add_argument("--force", action="store_true", help="replace an existing bundle")
    create.set_defaults(fn=cmd_family_create)
    fam_sub.add_parser("show", help="what the server holds for the family").set_defaults(
        fn=cmd_family_show)
    export = fam_sub.add_parser(
        "export", help="write a passphrase-protected copy of the keys for another phone",
        description="writes the family's keys with a one-time invitation (not this phone's "
        "token) into FILE, protected by its own passphrase (PRIVFACE_EXPORT_PASSPHRASE or a "
        "prompt)")
    export.add_argument("--to", required=True, metavar="FILE", help="the export file")
    export.add_argument("--valid-hours", type=float, default=24.0,
                        help="how long the invitation stays valid (default %(default)s)")
    export.add_argument("--force", action="store_true", help="replace an existing FILE")
    export.set_defaults(fn=cmd_family_export)
    join = fam_sub.add_parser(
        "join", help="join the family of an export file as a new device",
        description="imports an export file into this phone's bundle (--bundle) and "
        "registers this phone as a new device with its own token")
    join.add_argument("file", help="the export file from `privface family export`")
    join.add_argument("--device-name", help="this phone's name (default: the host name)")
    join.add_argument("--force", action="store_true", help="replace an existing bundle")
    join.set_defaults(fn=cmd_family_join)
    delete = fam_sub.add_parser(
        "delete", help="delete the family and all its data from the server (every phone)",
        description="deletes every photo, encrypted face, sealed item, device and invitation "
        "of the family from the server, then this phone's bundle; irreversible")
    delete.add_argument("--yes", action="store_true", help="confirm the deletion")
    delete.add_argument("--keep-bundle", action="store_true",
                        help="keep this phone's bundle file")
    delete.set_defaults(fn=cmd_family_delete)

    devices = sub.add_parser("devices", help="list or revoke the family's devices",
                             description="the family's authorised devices; a revoked device "
                             "is refused from its next call")
    devices.add_argument("action", nargs="?", choices=["list", "revoke"], default="list")
    devices.add_argument("name", nargs="?", help="device name or id (for revoke)")
    devices.set_defaults(fn=cmd_devices)

    people = sub.add_parser("people", help="list, add, rename or remove family members",
                            description="the roster (names stay on the phones, sealed); "
                            "`remove` also deletes the member's encrypted faces")
    people.add_argument("action", nargs="?", choices=["list", "add", "remove", "rename"],
                        default="list")
    people.add_argument("names", nargs="*", help="member names (rename: OLD NEW)")
    people.set_defaults(fn=cmd_people)

    detector = sub.add_parser("detector", help="manage the detector product key",
                              description="import the product key a detector vendor gave you")
    detector_sub = detector.add_subparsers(dest="detector_command", required=True,
                                           metavar="ACTION")
    imp = detector_sub.add_parser("import", help="store a product key in the family bundle")
    imp.add_argument("keyfile")
    imp.set_defaults(fn=cmd_detector_import)
