"""Client settings: one frozen object, read once from explicit values, PRIVFACE_* environment
variables and defaults (in that order), as ServerConfig is on the server."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_BUNDLE = Path.home() / ".privface" / "family.bundle"


@dataclass(frozen=True)
class ClientConfig:
    """Where the server is and how the phone talks to it."""

    # HOST:PORT; or several replicas' IP:PORT separated by commas, or one DNS name that
    # resolves to them (one channel balances calls round-robin over all of them). Empty: the
    # address stored in the family bundle, else DEFAULT_SERVER.
    server: str = ""
    bundle: Path = DEFAULT_BUNDLE
    timeout: float = 60.0  # seconds for short calls
    upload_timeout: float = 600.0  # seconds for a photo, a gallery or a key upload
    detect_timeout: float = 1800.0  # seconds for one photo's secure detection
    max_message_bytes: int = 64 * MIB  # above the server's 32 MiB so its limit decides
    chunk_bytes: int = 1 * MIB
    # Idempotent calls (client/rpc.py RETRY_POLICY) are retried on UNAVAILABLE: at most
    # retry_attempts tries in all, waiting retry_initial_backoff seconds, doubling (+-20%
    # jitter) up to retry_max_backoff, always within the call's timeout.
    retry_attempts: int = 5
    retry_initial_backoff: float = 0.1
    retry_max_backoff: float = 2.0
    detection_mode: str = "default"  # a name in client/pipeline/detect.py's MODES
    # Transport security: the server's certificate must chain to tls_ca (PEM); for mutual TLS
    # this phone also presents tls_client_cert/tls_client_key (names distinct from the
    # server's PRIVFACE_TLS_CERT/KEY, so one shell can hold both). Plaintext only with
    # insecure=True. tls_server_name: the name to check in the certificate instead of the
    # host in the address (an IP the certificate does not list).
    tls_ca: Path | None = None
    tls_client_cert: Path | None = None
    tls_client_key: Path | None = None
    tls_server_name: str = ""
    insecure: bool = False

    def server_or(self, fallback: str) -> str:
        """The configured server, else ``fallback`` (the bundle's), else the default."""
        return self.server or fallback or DEFAULT_SERVER

    @classmethod
    def load(cls, **overrides: Any) -> ClientConfig:
        """Defaults, overridden by PRIVFACE_<FIELD> variables, overridden by the non-None
        keyword arguments (flags)."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = os.environ.get(f"PRIVFACE_{f.name.upper()}")
            if raw:
                values[f.name] = _convert(f.default, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return replace(cls(), **values)


def _convert(default: object, raw: str) -> object:
    if default is None or isinstance(default, Path):  # the optional settings are file paths
        return Path(raw).expanduser()
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, int):
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw
