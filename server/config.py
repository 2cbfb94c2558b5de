"""Server settings: one frozen object, read from flags and PRIVFACE_* environment variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server can be told. Flags override environment variables."""

    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = Path("var/server")
    # Storage (docs/design.md, "Storage"): empty = SQLite and blob files under data_dir.
    store: str = ""  # sqlite:PATH | postgresql://USER@HOST:PORT/DB
    blobs: str = ""  # file:DIR | s3://BUCKET/PREFIX
    # Orphan blobs younger than this are left alone at start-up when the store is shared
    # (another server's upload may not have committed its row yet); 0 for the default.
    sweep_grace_seconds: float = 3600.0
    workers: int = 32  # > max_streams + max_public_streams: unary calls keep free workers
    max_message_bytes: int = 32 * MIB
    max_photo_bytes: int = 256 * MIB
    max_context_bytes: int = 64 * MIB
    max_detector_bytes: int = 64 * MIB
    max_sealed_bytes: int = 8 * MIB  # one sealed family item (roster, CKKS secret context)
    max_window_batch: int = 16_384  # windows per DetectFaces message (the client sends <= 16,384)
    # Bounded resources (docs/design.md, "Bounded resources"): streams, quotas, rates.
    max_concurrent_rpcs: int = 512  # last resort: calls beyond this are refused at once
    max_streams: int = 24  # long calls (uploads, detection, matching, fetch) server-wide
    max_family_streams: int = 8  # long calls at once per family
    max_public_streams: int = 2  # unauthenticated streams (health Watch, reflection)
    max_calls_per_address: int = 16  # calls in flight from one peer address
    stream_idle_seconds: float = 60.0  # a stream sending (or reading) nothing this long ends
    max_family_photos: int = 1_000_000
    max_family_bytes: int = 1024 * 1024 * MIB  # 1 TiB of photo blobs and thumbnails
    max_gallery_entries: int = 100_000  # encrypted faces per family (removed ones included)
    max_detect_windows_per_hour: int = 50_000_000  # per family
    register_per_minute: int = 20  # RegisterFamily calls per peer address
    auth_failures_per_minute: int = 30  # per peer address, then it is locked out
    auth_lockout_seconds: float = 300.0
    grace_seconds: float = 5.0
    log_level: str = "INFO"
    # Transport security: TLS with a certificate and key, optionally requiring client
    # certificates signed by tls_client_ca (mutual TLS); plaintext only with insecure=True.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    insecure: bool = False
    # Environment only (PRIVFACE_VENDOR_TOKEN), never a flag (flags show in `ps`); empty: the
    # token in <data_dir>/vendor.token, re-read when it changes (rotate-vendor-token).
    vendor_token: str = field(default="", repr=False)

    @property
    def shared_store(self) -> bool:
        """Whether other servers may use the same store (anything but the default)."""
        return bool(self.store or self.blobs)

    @property
    def address(self) -> str:
        """host:port to bind."""
        return f"{self.host}:{self.port}"


def _env_default(name: str, default: object) -> object:
    raw = os.environ.get(f"PRIVFACE_{name.upper()}")
    if raw is None:
        return default
    if default is None:  # the optional settings are file paths
        return Path(raw) if raw else None
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, Path):
        return Path(raw)
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


ENV_ONLY = frozenset({"vendor_token"})  # secrets: never a flag (flags show in `ps`)
HELP = {
    "store": "metadata database: sqlite:PATH or postgresql://USER@HOST:PORT/DB (empty: "
             "SQLite in --data-dir); several servers may share one PostgreSQL",
    "blobs": "blob store for encrypted photos, contexts and detectors: file:DIR or "
             "s3://BUCKET/PREFIX (endpoint and keys: PRIVFACE_S3_ENDPOINT, AWS_ACCESS_KEY_ID, "
             "AWS_SECRET_ACCESS_KEY; empty: files in --data-dir)",
    "sweep_grace_seconds": "with a shared store, orphan blobs younger than this survive the "
                           "start-up sweep",
    "tls_cert": "TLS certificate chain (PEM) the server presents",
    "tls_key": "private key (PEM) of --tls-cert",
    "tls_client_ca": "mutual TLS: require client certificates signed by this CA (PEM)",
    "insecure": "serve plaintext gRPC without TLS (local testing only; logged as a warning)",
}
EPILOG = """commands:
  privface-server migrate [--store URL]
      creates or upgrades the database schema (run once before starting servers on a
      new or upgraded PostgreSQL; the SQLite default upgrades itself)
  privface-server tls-init DIR [--host NAME ...]
      writes a development CA (ca.pem), a server certificate and key for localhost
      (server.pem, server.key) and a client certificate (client.pem, client.key)
  privface-server rotate-vendor-token [--data-dir DIR]
      writes a new vendor token to <data-dir>/vendor.token; a running server uses it
      from the next publish on and refuses the old one

The vendor token is read from PRIVFACE_VENDOR_TOKEN or <data-dir>/vendor.token, never
from a flag."""


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    """Builds the config from argv (flags) over the environment over defaults."""
    parser = argparse.ArgumentParser(
        prog="privface-server", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="privface server: stores encrypted photos, runs encrypted detection, "
                    "matching and search. Every flag can also be set as PRIVFACE_<FLAG> "
                    "(e.g. PRIVFACE_PORT=50051).")
    for f in fields(ServerConfig):
        if f.name in ENV_ONLY:
            continue
        default = _env_default(f.name, f.default)
        flag = "--" + f.name.replace("_", "-")
        help_text = HELP.get(f.name, "") + f" (default: {default})"
        if isinstance(f.default, bool):
            parser.add_argument(flag, dest=f.name, default=default, action="store_true",
                                help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, default=default,
                                type=Path if f.default is None else type(f.default),
                                help=help_text)
    values = vars(parser.parse_args(argv))
    values.update({name: _env_default(name, ServerConfig.__dataclass_fields__[name].default)
                   for name in ENV_ONLY})
    return ServerConfig(**values)
