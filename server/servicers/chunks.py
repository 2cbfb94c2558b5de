"""Servicer helper for client streams made of a header followed by parts."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from common.errors import MalformedInputError


def header_then_parts(request_iterator: Iterator, rpc: str, part: str) -> tuple[Any, Iterator]:
    """Splits a client stream of `oneof part { header = 1; <part> = 2; }` messages into the
    header and an iterator over the parts, with a clear error for any other order."""
    first = next(request_iterator, None)
    if first is None or not first.HasField("header"):
        raise MalformedInputError(f"the first {rpc} message must be the header")

    def parts() -> Iterator:
        for msg in request_iterator:
            if not msg.HasField(part):
                raise MalformedInputError(f"only {part} messages may follow the header")
            yield getattr(msg, part)
    return first.header, parts()
