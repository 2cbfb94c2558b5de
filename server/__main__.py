"""privface-server: run the server until SIGTERM/SIGINT, then drain gracefully."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from common.errors import PrivfaceError
from server import migrations, tls, vendor_token
from server.app import create_server
from server.config import ServerConfig, parse_config
from server.database import open_database
from server.limits import ResourceConfigError

log = logging.getLogger("privface.server")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `privface-server` and `python -m server` (and of its two helper
    commands, `tls-init` and `rotate-vendor-token`)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tls-init"]:
        return tls_init(argv[1:])
    if argv[:1] == ["rotate-vendor-token"]:
        return rotate_vendor_token(argv[1:])
    if argv[:1] == ["migrate"]:
        return migrate(argv[1:])
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        server, port, health_servicer = create_server(config)
    except (tls.TransportConfigError, ResourceConfigError, PrivfaceError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    server.start()
    transport = ("PLAINTEXT" if config.insecure else
                 "mutual TLS" if config.tls_client_ca else "TLS")
    log.info("privface-server listening on %s:%d (%s; data in %s)", config.host, port,
             transport, health_servicer.store_description)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: draining for up to %.0f s", signal.Signals(signum).name,
                 config.grace_seconds)
        health_servicer.enter_graceful_shutdown()  # every service reports NOT_SERVING
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    server.stop(config.grace_seconds).wait()
    log.info("stopped")
    return 0


def tls_init(argv: list[str]) -> int:
    """`privface-server tls-init DIR`: a development CA, server and client certificates."""
    parser = argparse.ArgumentParser(
        prog="privface-server tls-init",
        description="Writes a throwaway CA (ca.pem; its key is not kept), a server certificate "
                    "for localhost, 127.0.0.1 and ::1 (server.pem, server.key) and a client "
                    "certificate for mutual TLS (client.pem, client.key). For development "
                    "and tests: use a real CA's certificate in production.")
    parser.add_argument("dir", type=Path, help="directory to write the PEM files to")
    parser.add_argument("--host", action="append", default=[],
                        help="another DNS name or IP address the server certificate names "
                             "(repeatable)")
    args = parser.parse_args(argv)
    paths = tls.write_dev_certs(args.dir, args.host)
    sys.stdout.write(
        f"wrote {paths.ca}, {paths.server_cert}, {paths.server_key}, {paths.client_cert}, "
        f"{paths.client_key}\n"
        f"server: privface-server --tls-cert {paths.server_cert} --tls-key {paths.server_key}"
        f" [--tls-client-ca {paths.ca}]\n"
        f"client: PRIVFACE_TLS_CA={paths.ca} [PRIVFACE_TLS_CLIENT_CERT={paths.client_cert} "
        f"PRIVFACE_TLS_CLIENT_KEY={paths.client_key}]\n")
    return 0


def migrate(argv: list[str]) -> int:
    """`privface-server migrate`: creates or upgrades the database schema."""
    parser = argparse.ArgumentParser(
        prog="privface-server migrate",
        description="Creates the database schema, or upgrades it to this server's version "
                    "(each step once, in a transaction; safe to run again). Run it before "
                    "starting servers on a new or upgraded PostgreSQL; the SQLite default "
                    "upgrades itself at start-up.")
    parser.add_argument("--store", default=os.environ.get("PRIVFACE_STORE", ""),
                        help="sqlite:PATH or postgresql://USER@HOST:PORT/DB (env "
                             "PRIVFACE_STORE; default: SQLite in --data-dir)")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("PRIVFACE_DATA_DIR")
                                     or ServerConfig.data_dir),
                        help="the default SQLite's directory (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        db = open_database(args.store, args.data_dir / "privface.sqlite3")
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        before = migrations.current_version(db)
        applied = migrations.migrate(db)
    except PrivfaceError as exc:
        log.error("%s", exc)
        return 1
    finally:
        db.close()
    sys.stdout.write(f"{db.url}: schema version {before} -> {migrations.LATEST} "
                     f"({len(applied)} migration(s) applied)\n")
    return 0


def rotate_vendor_token(argv: list[str]) -> int:
    """`privface-server rotate-vendor-token`: a new vendor token, live for a running server."""
    parser = argparse.ArgumentParser(
        prog="privface-server rotate-vendor-token",
        description="Writes a new random vendor token to <data-dir>/vendor.token (mode 0600). "
                    "A running server uses it from the next publish on and refuses the old "
                    "one; give the file to the detector vendor over a secure channel.")
    parser.add_argument("--data-dir", type=Path,
                        default=Path(os.environ.get("PRIVFACE_DATA_DIR")
                                     or ServerConfig.data_dir),
                        help="the server's data directory (env PRIVFACE_DATA_DIR; "
                             "default: %(default)s)")
    args = parser.parse_args(argv)
    path = vendor_token.rotate(args.data_dir)
    sys.stdout.write(f"wrote a new vendor token to {path}\n")
    if os.environ.get("PRIVFACE_VENDOR_TOKEN"):
        sys.stderr.write("warning: PRIVFACE_VENDOR_TOKEN is set; a server started with it "
                         "uses that value and ignores the file\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
