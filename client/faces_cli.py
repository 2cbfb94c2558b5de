"""The face commands of `privface`: enroll and identify (registered by client/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from common import ckks


def cmd_enroll(args: argparse.Namespace) -> int:
    from client.cli import Session
    from client.pipeline import faces, recognize
    s = Session(args)
    if faces.ensure_ckks_keys(s.client, s.bundle):
        s.save()  # the new CKKS secret lives only in the bundle
        print("uploaded the family's public CKKS keys (once)", file=sys.stderr)
    embeddings = [recognize.single_face_embedding(Path(p))
                  for p in tqdm(args.photos, desc="faces", unit="photo",
                                disable=len(args.photos) < 3)]
    total = faces.enroll(s.client, s.bundle, args.name, embeddings)
    s.save()
    print(f"enrolled {args.name} with {len(embeddings)} face(s); the gallery holds {total}")
    return 0


def cmd_identify(args: argparse.Namespace) -> int:
    from client.cli import Session
    from client.pipeline import faces, recognize
    s = Session(args)
    rgb = recognize.load_rgb(Path(args.photo))
    boxes = recognize.detect_faces(rgb)
    if not boxes:
        print("no face found", file=sys.stderr)
        return 0
    embeddings = recognize.face_embeddings(rgb, boxes)
    for (top, right, bottom, left), match in zip(boxes, faces.identify(
            s.client, s.bundle, embeddings, args.tolerance)):
        who = match.name or "unknown"
        print(f"{who:20s} distance {match.distance:.3f}  box x={left} y={top} "
              f"w={right - left} h={bottom - top}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Adds the face commands to the privface parser."""
    enroll = sub.add_parser("enroll", help="add a family member from 1-20 face photos",
                            description="compute face embeddings on this phone, encrypt them "
                            "(CKKS) and add them to the family's encrypted gallery")
    enroll.add_argument("name", help="member name (stays on the phone)")
    enroll.add_argument("photos", nargs="+", help="photos showing exactly one face each")
    enroll.set_defaults(fn=cmd_enroll)
    identify = sub.add_parser("identify", help="who is in a photo (encrypted matching)",
                              description="find faces locally, match them encrypted against "
                              "the family gallery on the server, decrypt the distances here")
    identify.add_argument("photo")
    identify.add_argument("--tolerance", type=float, default=ckks.TOLERANCE,
                          help="largest distance that counts as a match (default %(default)s)")
    identify.set_defaults(fn=cmd_identify)
