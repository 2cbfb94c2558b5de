"""The detector vendor's publishing token: from PRIVFACE_VENDOR_TOKEN, else the file
<data_dir>/vendor.token (mode 0600), re-read whenever the file changes so the operator can
rotate it (``privface-server rotate-vendor-token``) without a restart."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from pathlib import Path

from server.config import ServerConfig

log = logging.getLogger(__name__)

TOKEN_FILE = "vendor.token"
TOKEN_BYTES = 32


def token_path(data_dir: str | Path) -> Path:
    """Where the server keeps the vendor token."""
    return Path(data_dir) / TOKEN_FILE


def _write_new(path: Path) -> None:
    """A fresh random token, written atomically with mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(TOKEN_BYTES) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def rotate(data_dir: str | Path) -> Path:
    """Replaces the vendor token with a new random one; returns the file's path. A running
    server picks it up at the next publish and refuses the old token from then on."""
    path = token_path(data_dir)
    _write_new(path)
    return path


class VendorToken:
    """The current vendor token, checked in constant time."""

    def __init__(self, config: ServerConfig) -> None:
        self._fixed = config.vendor_token
        self.path = token_path(config.data_dir)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._token = ""
        if not self._fixed and not self.path.exists():
            _write_new(self.path)
            log.info("created the vendor token in %s", self.path)
        self.current()

    def current(self) -> str:
        """The token in force now (the file is re-read when its inode, size or mtime
        changed since the last read)."""
        if self._fixed:
            return self._fixed
        st = self.path.stat()
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if stamp != self._stamp:
                token = self.path.read_text().strip()
                if not token:
                    raise OSError(f"the vendor token file {self.path} is empty")
                if self._stamp is not None:
                    log.info("the vendor token in %s changed: the previous one is refused "
                             "from now on", self.path)
                self._token, self._stamp = token, stamp
            return self._token

    def matches(self, presented: str) -> bool:
        """True if ``presented`` is the current token."""
        return secrets.compare_digest(presented.encode(), self.current().encode())
