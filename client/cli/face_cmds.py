"""`privface enroll`, `identify` and `detect`."""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2

from client.cli.common import (
    CliError,
    add_detection_mode,
    open_session,
    progress_bars,
    say,
)
from client.pipeline.faces import MATCH_TOLERANCE
from common.errors import NotFoundError


def cmd_enroll(args: argparse.Namespace) -> int:
    with open_session(args) as s, progress_bars({"faces": len(args.photos)}) as progress:
        result = s.enroll(args.name, args.photos, progress)
    if result.keys == "created":
        say("made the family's CKKS keys and uploaded the public part (once per family)")
    elif result.keys == "adopted":
        say("using the family's CKKS keys made on another phone")
    for photo in result.photos:
        if photo.face is None:
            say(f"  skipped {photo.path}: {photo.reason}")
        elif photo.face.note:
            say(f"  {photo.path}: {photo.face.note}")
    print(f"enrolled {result.name} with {len(result.used)} of {len(result.photos)} photo(s)"
          f"; the gallery holds {result.gallery_size} encrypted faces")
    return 0


def cmd_identify(args: argparse.Namespace) -> int:
    with open_session(args) as s, progress_bars() as progress:
        found = s.identify(args.photo, args.tolerance, progress)
    if not found.faces:
        say("no face found")
        return 0
    for face in found.faces:
        top, right, bottom, left = face.box
        who = face.name or "unknown"
        distance = "-" if face.distance == float("inf") else f"{face.distance:.3f}"
        print(f"{who:20s} distance {distance}  box x={left} y={top} w={right - left} "
              f"h={bottom - top}")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    if not Path(args.photo).is_file():
        raise NotFoundError(f"no such photo: {args.photo}")
    image = cv2.imread(args.photo)
    if image is None:
        raise CliError(f"cannot read {args.photo} as an image")
    with open_session(args) as s, progress_bars() as progress:
        report = s.detect(image, args.mode, progress)
    for x, y, w, h in report.boxes:
        print(f"face x={x} y={y} w={w} h={h}")
    say(f"{len(report.boxes)} face(s); {report.positions:,} scan positions, "
        f"{report.windows_sent:,} windows sent ({report.bytes_uploaded / 1e6:.1f} MB), "
        f"server {report.server_ms:.0f} ms, total {report.total_ms:.0f} ms "
        f"[{s.config.detection_mode}]")
    if args.show:
        for x, y, w, h in report.boxes:
            cv2.rectangle(image, (x, y), (x + w, y + h), (0, 200, 0), 2)
        cv2.imwrite(args.show, image)
        say(f"wrote {args.show}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds these commands to the privface parser."""
    enroll = sub.add_parser(
        "enroll", help="add a family member (or more of their faces) from 1-20 photos",
        description="finds the face in each photo (the largest if several; tries harder "
        "before giving up), computes its embedding here, encrypts it (CKKS) into the "
        "family's gallery; photos without a usable face are skipped with the reason")
    enroll.add_argument("name", help="member name (stays on the family's phones)")
    enroll.add_argument("photos", nargs="+", help="photos of the member")
    enroll.set_defaults(fn=cmd_enroll)
    identify = sub.add_parser("identify", help="who is in a photo (encrypted matching)",
                              description="find faces, match them encrypted against the "
                              "family gallery on the server, decrypt the distances here")
    identify.add_argument("photo")
    identify.add_argument("--tolerance", type=float, default=MATCH_TOLERANCE,
                          help="largest distance that counts as a match (default %(default)s)")
    add_detection_mode(identify)
    identify.set_defaults(fn=cmd_identify)
    detect = sub.add_parser("detect", help="secure face detection of a photo",
                            description="run the vendor's encrypted detector on the server over "
                            "this photo's encrypted windows; print the face boxes")
    detect.add_argument("photo")
    add_detection_mode(detect)
    detect.add_argument("--show", metavar="OUT", help="write a copy with the boxes drawn")
    detect.set_defaults(fn=cmd_detect)
