"""Paths the user typed or picked."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from client.pipeline.library import collect_photos
from common.errors import MalformedInputError, NotFoundError

_SEPARATORS = re.compile(r"[;\n]")


def parse_paths(text: str) -> list[Path]:
    """Paths typed into one field, separated by ';' or new lines; ~ is expanded."""
    return [Path(part.strip()).expanduser() for part in _SEPARATORS.split(text)
            if part.strip()]


def join_paths(paths: Iterable[str | Path]) -> str:
    """The text of a path field holding ``paths``."""
    return "; ".join(str(p) for p in paths)


def photo_files(text: str, recursive: bool = False) -> list[Path]:
    """The photos named in a path field: files, and the photos inside folders."""
    paths = parse_paths(text)
    if not paths:
        raise MalformedInputError("pick photos or a folder first (or type a path)")
    found = collect_photos(paths, recursive)
    if not found:
        raise NotFoundError(f"no photos in {join_paths(paths)}")
    return found


def one_file(text: str, what: str) -> Path:
    """The single existing file named in a path field."""
    paths = parse_paths(text)
    if len(paths) != 1:
        raise MalformedInputError(f"pick one {what} (or type its path)")
    if not paths[0].is_file():
        raise NotFoundError(f"no such {what}: {paths[0]}")
    return paths[0]
