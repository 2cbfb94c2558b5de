"""What every `privface` command shares: the passphrase prompt, opening the session,
progress bars. The workflow itself is in the client core (client/session.py)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

from client.config import ClientConfig
from client.pipeline.detect import MODES
from client.pipeline.labelling import Progress
from client.session import FamilySession
from common.errors import PrivfaceError


class CliError(PrivfaceError):
    """A usage problem reported as `error: ...` with exit code 2."""


def passphrase(env: str = "PRIVFACE_PASSPHRASE", prompt: str = "Family passphrase: ",
               confirm: bool = False) -> str:
    """From the environment variable, else asked (twice with ``confirm``) in a terminal."""
    value = os.environ.get(env)
    if value:
        return value
    if not sys.stdin.isatty():
        raise CliError(f"no passphrase: set {env} or run in a terminal")
    first = getpass.getpass(prompt)
    if confirm and getpass.getpass("Repeat it: ") != first:
        raise CliError("the passphrases differ")
    return first


def config(args: argparse.Namespace) -> ClientConfig:
    """The client settings: flags over PRIVFACE_* variables over defaults."""
    def path(value: str | None) -> Path | None:
        return Path(value).expanduser() if value else None

    return ClientConfig.load(server=args.server, bundle=path(args.bundle),
                             detection_mode=getattr(args, "mode", None),
                             tls_ca=path(args.tls_ca), tls_client_cert=path(args.tls_client_cert),
                             tls_client_key=path(args.tls_client_key), insecure=args.insecure)


def open_session(args: argparse.Namespace) -> FamilySession:
    """The unlocked family bundle and a connection, for one command."""
    cfg = config(args)
    return FamilySession(cfg.bundle, passphrase(), cfg)


def device_name(args: argparse.Namespace, default: str) -> str:
    """--device-name, else PRIVFACE_DEVICE_NAME, else ``default``."""
    return args.device_name or os.environ.get("PRIVFACE_DEVICE_NAME") or default


def say(message: str) -> None:
    """A status line for people (stderr), kept apart from results (stdout)."""
    print(message, file=sys.stderr)


UNITS = {"secure detection": "windows", "photos": "photos", "faces": "photos",
         "upload": "faces"}


@contextmanager
def progress_bars(totals: dict[str, int] | None = None) -> Iterator[Progress]:
    """A progress callback ``(what, amount)`` showing one tqdm bar per kind of work (only
    in a terminal); ``totals`` gives the known sizes."""
    bars: dict[str, tqdm] = {}
    totals = totals or {}
    show = sys.stderr.isatty()

    def update(what: str, amount: int) -> None:
        if not show:
            return
        bar = bars.get(what)
        if bar is None:
            bar = bars[what] = tqdm(desc=what, unit=" " + UNITS.get(what, "items"),
                                    total=totals.get(what), unit_scale=what not in totals,
                                    leave=what in totals, position=len(bars))
        bar.update(amount)

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


def add_detection_mode(parser: argparse.ArgumentParser, what: str = "") -> None:
    """The --mode flag: how secure detection scans photos (client/pipeline/detect.py)."""
    parser.add_argument(
        "--mode", choices=list(MODES),
        help=f"secure detection mode{what} (env PRIVFACE_DETECTION_MODE; default: default, "
        "faces from about 49 px on a 640-px working copy, 7.6%% of its long side; "
        "small-faces: from about 31 px, 5%%, for group photos, at about twice the upload; "
        "faithful: the paper's protocol at full size, gigabytes per photo)")
