"""Blob stores: where encrypted photos, CKKS contexts and detector matrices live.

The metadata store names blobs by key ("<family_id>/<name>", "_detectors/<name>"); a blob
is written completely and durably by :meth:`BlobStore.put` *before* the row naming it
commits, so a row never names a missing or partial blob. Keys are never reused: every put
writes a fresh name, so replicas and readers never see a blob change under them.

Two implementations: :class:`FileBlobs` (a directory: local disk or a shared mount) and
``server.blobs_s3.S3Blobs`` (any S3-compatible service). Only ciphertext is ever stored.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from common.errors import NotFoundError

READ_CHUNK_BYTES = 1024 * 1024
# A key: folders and file names of letters, digits, '_', '-', '.', never '..' or a leading '/'.
KEY_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")


def check_key(key: str) -> str:
    """The key itself; ValueError for one that could escape its folder."""
    if not KEY_RE.fullmatch(key) or ".." in key:
        raise ValueError(f"invalid blob key {key!r}")
    return key


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob as listed (for sweeping orphans)."""

    key: str
    size: int
    modified: float  # seconds since the epoch


class BlobStore(Protocol):
    """What the metadata store needs from a blob store."""

    url: str  # where the blobs are, for logs ("file:/srv/blobs", "s3://bucket/prefix")

    def put(self, key: str, chunks: Iterable[bytes] | bytes) -> int:
        """Stores the blob durably and atomically (readers never see a part); returns its
        size. An exception (a dropped upload, a failed check in the iterator) stores
        nothing."""
        ...

    def read(self, key: str) -> bytes:
        """The whole blob; NotFoundError if there is none."""
        ...

    def open(self, key: str, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        """The blob in chunks (the first read happens on the first next()); NotFoundError
        if there is none."""
        ...

    def delete(self, key: str) -> None:
        """Removes the blob; a missing one is not an error."""
        ...

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        """Every blob whose key starts with ``prefix``."""
        ...


class FileBlobs:
    """Blobs as files under one directory: temp file, fsync, rename, fsync of the folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = f"file:{self.root}"

    def path(self, key: str) -> Path:
        """The file of a key (tests and tools look at it directly)."""
        return self.root / check_key(key)

    def put(self, key: str, chunks: Iterable[bytes] | bytes) -> int:
        return write_file_atomically(self.path(key), chunks)

    def read(self, key: str) -> bytes:
        try:
            return self.path(key).read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {key} is missing from {self.url}") from None

    def open(self, key: str, chunk_bytes: int = READ_CHUNK_BYTES) -> Iterator[bytes]:
        path = self.path(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - closed by the generator below
        except FileNotFoundError:
            raise NotFoundError(f"blob {key} is missing from {self.url}") from None
        return _read_chunks(f, chunk_bytes)

    def delete(self, key: str) -> None:
        path = self.path(key)
        path.unlink(missing_ok=True)
        folder = path.parent
        if folder != self.root:
            with contextlib.suppress(OSError):  # only when empty: it goes with its last blob
                folder.rmdir()

    def list(self, prefix: str = "") -> Iterator[BlobInfo]:
        for path in sorted(self.root.rglob("*")):
            if not path.is_file():
                continue
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix) and not path.name.startswith(".tmp-"):
                try:
                    stat = path.stat()
                except FileNotFoundError:  # removed meanwhile
                    continue
                yield BlobInfo(key, stat.st_size, stat.st_mtime)

    def sweep_temp_files(self, older_than: float) -> int:
        """Removes temp files of writes that never finished (a crash mid-upload)."""
        removed = 0
        for path in self.root.rglob(".tmp-*"):
            try:
                if path.stat().st_mtime <= older_than:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


def _read_chunks(f: BinaryIO, chunk_bytes: int) -> Iterator[bytes]:
    with f:
        while chunk := f.read(chunk_bytes):
            yield chunk


def write_file_atomically(path: Path, chunks: Iterable[bytes] | bytes) -> int:
    """Writes ``path`` durably: temp file, fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    size = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in ([chunks] if isinstance(chunks, bytes) else chunks):
                f.write(chunk)
                size += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return size


def fsync_dir(folder: Path) -> None:
    """Makes a rename or unlink in ``folder`` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def open_blobs(url: str, default_root: Path) -> BlobStore:
    """The blob store a ``--blobs`` setting names: "" (``default_root``), "file:DIR" or
    "s3://BUCKET/PREFIX" (endpoint and credentials from the PRIVFACE_S3_* / AWS_*
    environment, see server.blobs_s3)."""
    if not url:
        return FileBlobs(default_root)
    if url.startswith("file:"):
        return FileBlobs(Path(url[len("file:"):]).expanduser())
    if url.startswith("s3://"):
        from server.blobs_s3 import S3Blobs  # boto3 is loaded only when S3 is used
        return S3Blobs.from_url(url)
    raise ValueError(f"unknown blob store {url!r}: use file:DIR or s3://BUCKET/PREFIX")
