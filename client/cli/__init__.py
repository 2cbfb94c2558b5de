"""privface: the family phone's command line, a thin face over the client core.

Every command reads the family bundle (``--bundle`` or PRIVFACE_BUNDLE, default
~/.privface/family.bundle), unlocked by PRIVFACE_PASSPHRASE or a prompt.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from client.cli import face_cmds, family_cmds, photo_cmds
from client.cli.common import CliError
from client.config import DEFAULT_BUNDLE
from common.errors import PrivfaceError

log = logging.getLogger("privface.cli")


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser (also used for --help docs)."""
    p = argparse.ArgumentParser(prog="privface", description=(
        "Back up photos encrypted, find them by who is in them; the server never sees a "
        "photo, a face, a name or a query in the clear."))
    p.add_argument("--bundle", default=os.environ.get("PRIVFACE_BUNDLE"),
                   help=f"family bundle file (env PRIVFACE_BUNDLE; default {DEFAULT_BUNDLE})")
    p.add_argument("--server", default=None,
                   help="server host:port, or several replicas as a comma-separated list "
                        "(balanced, with retries) (env PRIVFACE_SERVER; default: the bundle's)")
    p.add_argument("--tls-ca", metavar="FILE", default=None,
                   help="CA certificate (PEM) the server's certificate must chain to "
                        "(env PRIVFACE_TLS_CA)")
    p.add_argument("--tls-client-cert", metavar="FILE", default=None,
                   help="mutual TLS: this phone's certificate (env PRIVFACE_TLS_CLIENT_CERT)")
    p.add_argument("--tls-client-key", metavar="FILE", default=None,
                   help="mutual TLS: its private key (env PRIVFACE_TLS_CLIENT_KEY)")
    p.add_argument("--insecure", action="store_const", const=True, default=None,
                   help="connect without TLS, to a test server started with --insecure "
                        "(env PRIVFACE_INSECURE=1)")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    family_cmds.register(sub)
    photo_cmds.register(sub)
    face_cmds.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of `privface`: one clear line and a non-zero exit for every error."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.fn(args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except PrivfaceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a person never sees a traceback
        log.debug("unexpected failure", exc_info=True)
        print(f"error: unexpected failure ({type(exc).__name__}: {exc}); run with -v for "
              "details", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
