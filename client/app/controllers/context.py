"""What every controller shares: where the app keeps its files, its settings, and the one
open FamilySession."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from client.config import ClientConfig
from client.pipeline.detect import MODES
from client.session import FamilySession
from common.errors import MalformedInputError, NotFoundError, PreconditionError

log = logging.getLogger(__name__)

SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class AppSettings:
    """What the Settings screen changes. Empty values fall back to the environment:
    PRIVFACE_SERVER (else the bundle's server) and PRIVFACE_TLS_CA."""

    server: str = ""
    detection_mode: str = "default"
    tls_ca: str = ""  # the CA certificate (PEM) that signed the server's TLS certificate

    def checked(self) -> AppSettings:
        """The settings with the server trimmed; MalformedInputError if one is invalid."""
        server = ",".join(part.strip() for part in self.server.split(",") if part.strip())
        for address in server.split(",") if server else []:  # replicas: a list
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise MalformedInputError(f"server address {address!r}: use HOST:PORT, "
                                          "e.g. 127.0.0.1:50051 (several: comma-separated)")
        if self.detection_mode not in MODES:
            raise MalformedInputError(f"unknown detection mode {self.detection_mode!r} "
                                      f"(use one of {', '.join(MODES)})")
        tls_ca = self.tls_ca.strip()
        if tls_ca and not Path(tls_ca).expanduser().is_file():
            raise NotFoundError(f"no such CA certificate file: {tls_ca}")
        return replace(self, server=server, tls_ca=tls_ca)


@dataclass(frozen=True)
class AppPaths:
    """The app's data folder, its bundle and its settings file."""

    data_dir: Path
    bundle: Path

    @classmethod
    def from_env(cls, default_dir: str | Path) -> AppPaths:
        """PRIVFACE_APP_DIR (else ``default_dir``) and PRIVFACE_BUNDLE (else a bundle in
        the data folder)."""
        data_dir = Path(os.environ.get("PRIVFACE_APP_DIR") or default_dir).expanduser()
        bundle = os.environ.get("PRIVFACE_BUNDLE")
        return cls(data_dir, Path(bundle).expanduser() if bundle
                   else data_dir / "family.bundle")

    @property
    def settings(self) -> Path:
        return self.data_dir / SETTINGS_FILE


class AppContext:
    """The app's state outside the widgets. The session is used from the worker thread
    only; the UI thread just asks whether one is open."""

    def __init__(self, paths: AppPaths) -> None:
        self.paths = paths
        self.settings = load_settings(paths.settings)
        self.session: FamilySession | None = None
        self.passphrase = ""  # the open bundle's, to reconnect after a settings change

    @classmethod
    def from_env(cls, default_dir: str | Path) -> AppContext:
        return cls(AppPaths.from_env(default_dir))

    @property
    def is_open(self) -> bool:
        return self.session is not None

    @property
    def has_bundle(self) -> bool:
        return self.paths.bundle.exists()

    def config(self) -> ClientConfig:
        """The client settings: the app's, over PRIVFACE_* variables, over defaults."""
        s = self.settings
        return ClientConfig.load(server=s.server or None, detection_mode=s.detection_mode,
                                 tls_ca=Path(s.tls_ca).expanduser() if s.tls_ca else None,
                                 bundle=self.paths.bundle)

    def require(self) -> FamilySession:
        """The open session; PreconditionError if the family is not set up or unlocked."""
        if self.session is None:
            raise PreconditionError("set up or unlock the family first (Set-up screen)")
        return self.session

    def adopt(self, session: FamilySession, passphrase: str) -> FamilySession:
        """Makes ``session`` the open one (closing any other)."""
        self.close()
        self.session, self.passphrase = session, passphrase
        return session

    def close(self) -> None:
        """Closes the open session, if any."""
        if self.session is not None:
            self.session.close()
            self.session, self.passphrase = None, ""

    def save_settings(self, settings: AppSettings) -> None:
        """Checks and stores the settings (they apply to the next connection)."""
        self.settings = settings.checked()
        self.paths.data_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.paths.settings.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self.settings), indent=2))
        os.replace(tmp, self.paths.settings)


def load_settings(path: Path) -> AppSettings:
    """The stored settings; defaults when there are none or the file is unreadable."""
    try:
        raw = json.loads(path.read_text())
        return AppSettings(str(raw.get("server", "")),
                           str(raw.get("detection_mode", "default")),
                           str(raw.get("tls_ca", ""))).checked()
    except FileNotFoundError:
        return AppSettings()
    except (OSError, ValueError, AttributeError, NotFoundError) as exc:
        log.warning("ignoring unreadable settings %s: %s", path, exc)
        return AppSettings()
