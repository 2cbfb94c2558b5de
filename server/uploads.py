"""Checks for streamed uploads: announced size limits, exact length and SHA-256."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from common.errors import LimitExceededError, MalformedInputError


class CheckedChunks:
    """Iterates upload chunks, enforcing the announced size and hashing as it goes."""

    def __init__(self, chunks: Iterator[bytes], expected_size: int, what: str) -> None:
        self._chunks = chunks
        self.expected_size = expected_size
        self.what = what
        self.size = 0
        self._hash = hashlib.sha256()

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self.size += len(chunk)
            if self.size > self.expected_size:
                raise MalformedInputError(
                    f"{self.what} is longer than the announced {self.expected_size} bytes")
            self._hash.update(chunk)
            yield chunk
        if self.size != self.expected_size:
            raise MalformedInputError(
                f"{self.what} ended after {self.size} of {self.expected_size} bytes: "
                "the upload was cut short, retry it")

    def verify(self, sha256: bytes) -> None:
        """Raises unless the streamed bytes hash to ``sha256``."""
        if self._hash.digest() != sha256:
            raise MalformedInputError(f"{self.what} does not match its SHA-256: corrupted "
                                      "in transit, retry the upload")


def check_limit(size: int, limit: int, what: str) -> None:
    """RESOURCE_EXHAUSTED if an announced size is over the server's limit."""
    if size > limit:
        raise LimitExceededError(f"{what} of {size} bytes exceeds the server limit of {limit}")
