"""Server settings: one frozen object, read from flags and PRIVFACE_* environment variables."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

MIB = 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server can be told. Flags override environment variables."""

    host: str = "127.0.0.1"
    port: int = 50051
    data_dir: Path = Path("var/server")
    workers: int = 16
    max_message_bytes: int = 32 * MIB
    max_photo_bytes: int = 256 * MIB
    max_context_bytes: int = 64 * MIB
    max_detector_bytes: int = 64 * MIB
    max_sealed_bytes: int = 8 * MIB  # one sealed family item (roster, CKKS secret context)
    max_window_batch: int = 16_384  # windows per DetectFaces message (the client sends <= 16,384)
    grace_seconds: float = 5.0
    log_level: str = "INFO"
    vendor_token: str = ""  # empty: a random token in <data_dir>/vendor.token

    @property
    def address(self) -> str:
        """host:port to bind."""
        return f"{self.host}:{self.port}"


def _env_default(name: str, default: object) -> object:
    raw = os.environ.get(f"PRIVFACE_{name.upper()}")
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, Path):
        return Path(raw)
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def parse_config(argv: list[str] | None = None) -> ServerConfig:
    """Builds the config from argv (flags) over the environment over defaults."""
    parser = argparse.ArgumentParser(
        prog="privface-server",
        description="privface server: stores encrypted photos, runs encrypted detection, "
                    "matching and search. Every flag can also be set as PRIVFACE_<FLAG> "
                    "(e.g. PRIVFACE_PORT=50051).")
    for f in fields(ServerConfig):
        default = _env_default(f.name, f.default)
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=default,
                            type=type(f.default), help=f"(default: {default})")
    return ServerConfig(**vars(parser.parse_args(argv)))
