"""The face commands of `privface`: enroll and identify (registered by client/cli.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from common import ckks
from common import secure_cascade as sc


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


def face_boxes(s, rgb, mode_name: str = "default") -> list[tuple[int, int, int, int]]:
    """(top, right, bottom, left) boxes: secure detection if the bundle has a product key,
    else face_recognition's local HOG detector."""
    from client.pipeline import recognize
    if not s.bundle.product_keys:
        return recognize.detect_faces(rgb)
    report = secure_detect(s, rgb[:, :, ::-1].copy(), mode_name)
    return [(y, x + w, y + h, x) for x, y, w, h in report.boxes]


def secure_detect(s, bgr, mode_name: str):
    """Runs the vendor's encrypted detector on the server over one BGR photo."""
    from client.pipeline.detect import MODES, SecureDetector
    _, key_bytes = next(iter(sorted(s.bundle.product_keys.items())))
    key = sc.ProductKey.from_bytes(key_bytes)
    with tqdm(desc=f"secure detection [{mode_name}]", unit=" windows", unit_scale=True,
              leave=False, disable=not sys.stderr.isatty()) as bar:
        return SecureDetector(s.client, key, MODES[mode_name], progress=bar.update).detect(bgr)


def cmd_detect(args: argparse.Namespace) -> int:
    import cv2
    from client.cli import CliError, Session
    s = Session(args)
    if not s.bundle.product_keys:
        raise CliError("no product key: get one from the detector vendor and run "
                       "`privface detector import KEYFILE`")
    if not Path(args.photo).is_file():
        raise CliError(f"no such file: {args.photo}")
    image = cv2.imread(args.photo)
    if image is None:
        raise CliError(f"cannot read {args.photo} as an image")
    report = secure_detect(s, image, args.mode)
    for x, y, w, h in report.boxes:
        print(f"face x={x} y={y} w={w} h={h}")
    print(f"{len(report.boxes)} face(s); {report.positions:,} scan positions, "
          f"{report.windows_sent:,} windows sent ({report.bytes_uploaded / 1e6:.1f} MB), "
          f"server {report.server_ms:.0f} ms, total {report.total_ms:.0f} ms [{args.mode}]",
          file=sys.stderr)
    if args.show:
        for x, y, w, h in report.boxes:
            cv2.rectangle(image, (x, y), (x + w, y + h), (0, 200, 0), 2)
        cv2.imwrite(args.show, image)
        print(f"wrote {args.show}", file=sys.stderr)
    return 0


def cmd_detector_import(args: argparse.Namespace) -> int:
    from client.cli import Session
    s = Session(args)
    data = Path(args.keyfile).read_bytes()
    key = sc.ProductKey.from_bytes(data)
    s.bundle.product_keys = {key.detector_id: data}
    s.save()
    print(f"imported product key {key.detector_id} v{key.version} into the family bundle")
    return 0


def recognise_members(s, path: Path) -> list[int]:
    """Slots of the enrolled members recognised in a photo (steps 2-4)."""
    from client.pipeline import faces, recognize
    rgb = recognize.load_rgb(path)
    boxes = face_boxes(s, rgb)
    if not boxes:
        return []
    matches = faces.identify(s.client, s.bundle, recognize.face_embeddings(rgb, boxes))
    return sorted({m.slot for m in matches if m.slot is not None})


def cmd_identify(args: argparse.Namespace) -> int:
    from client.cli import Session
    from client.pipeline import faces, recognize
    s = Session(args)
    rgb = recognize.load_rgb(Path(args.photo))
    boxes = face_boxes(s, rgb)
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
    detect = sub.add_parser("detect", help="secure face detection of a photo",
                            description="run the vendor's encrypted detector on the server over "
                            "this photo's encrypted windows; print the face boxes")
    detect.add_argument("photo")
    detect.add_argument("--mode", choices=["default", "faithful"], default="default",
                        help="default: compact upload; faithful: the paper's protocol at "
                        "OpenCV's default parameters (gigabytes)")
    detect.add_argument("--show", metavar="OUT", help="write a copy with the boxes drawn")
    detect.set_defaults(fn=cmd_detect)
    detector = sub.add_parser("detector", help="manage the detector product key",
                              description="import the product key a detector vendor gave you")
    detector_sub = detector.add_subparsers(dest="detector_command", required=True,
                                           metavar="ACTION")
    imp = detector_sub.add_parser("import", help="store a product key in the family bundle")
    imp.add_argument("keyfile")
    imp.set_defaults(fn=cmd_detector_import)
