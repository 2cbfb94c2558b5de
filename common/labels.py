"""Label vectors (who is in a photo) and label queries, in the form ASPE encrypts.

A family has ``capacity`` opaque slots (one per member). A photo's label vector is
L in {0,1}^capacity; a query is Q in {0,1}^capacity with lambda = |Q| people.
The threshold is folded into the vectors so the server decides on the sign of one inner
product and never sees lambda:

* photo side (stored): ``[L, 1]``
* all-of query:        ``[Q, -(lambda - 1/2)]``  -> positive iff L.Q = lambda
* any-of / ranked:     ``[Q, -1/2]``             -> positive iff L.Q >= 1, and larger
  scores mean more of the queried people (the query's random scale is common to all photos).
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

import numpy as np

from common.errors import MalformedInputError

DEFAULT_CAPACITY = 16
MAX_CAPACITY = 1024


class MatchMode(StrEnum):
    """How a query selects photos."""

    ALL = "all"
    ANY = "any"
    RANKED = "ranked"


def _indicator(slots: Iterable[int], capacity: int) -> np.ndarray:
    if not 1 <= capacity <= MAX_CAPACITY:
        raise MalformedInputError(f"capacity must be within 1..{MAX_CAPACITY}")
    vec = np.zeros(capacity)
    for slot in slots:
        if not 0 <= slot < capacity:
            raise MalformedInputError(f"slot {slot} is outside 0..{capacity - 1}")
        vec[slot] = 1.0
    return vec


def label_vector(slots: Iterable[int], capacity: int) -> np.ndarray:
    """The stored-side vector of a photo showing the members in ``slots``."""
    return np.append(_indicator(slots, capacity), 1.0)


def query_vector(slots: Iterable[int], capacity: int, mode: MatchMode = MatchMode.ALL
                 ) -> np.ndarray:
    """The query-side vector; the server keeps photos whose score is positive."""
    indicator = _indicator(slots, capacity)
    wanted = int(indicator.sum())
    if wanted == 0:
        raise MalformedInputError("a query needs at least one person")
    offset = -(wanted - 0.5) if MatchMode(mode) is MatchMode.ALL else -0.5
    return np.append(indicator, offset)


def label_dim(capacity: int) -> int:
    """Plaintext dims of a label or query vector (the folded threshold included)."""
    return capacity + 1
