"""Label vectors and queries: all-of, any-of and ranked semantics survive ASPE exactly."""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pytest

from common import aspe, labels
from common.errors import MalformedInputError

CAPACITY = 5


def _subsets() -> list[tuple[int, ...]]:
    return [c for r in range(CAPACITY + 1) for c in combinations(range(CAPACITY), r)]


def test_every_photo_and_query_subset_matches_exactly() -> None:
    key = aspe.generate_key(labels.label_dim(CAPACITY), rng=np.random.default_rng(5))
    photos = _subsets()
    stored = aspe.encrypt_stored(key, np.array([labels.label_vector(p, CAPACITY) for p in photos]))
    for query in photos[1:]:
        for mode in labels.MatchMode:
            q = aspe.encrypt_query(key, labels.query_vector(query, CAPACITY, mode))
            scores = aspe.evaluate(stored, q)[0]
            overlap = np.array([len(set(p) & set(query)) for p in photos])
            expect = overlap == len(query) if mode is labels.MatchMode.ALL else overlap >= 1
            assert np.array_equal(scores > 0, expect), (query, mode)
            if mode is labels.MatchMode.RANKED:  # larger score = more of the queried people
                hit = np.flatnonzero(expect)
                assert np.all(np.diff(overlap[hit][np.argsort(-scores[hit])]) <= 0)


def test_rejects_empty_query_and_out_of_range_slots() -> None:
    with pytest.raises(MalformedInputError):
        labels.query_vector([], CAPACITY)
    with pytest.raises(MalformedInputError):
        labels.label_vector([CAPACITY], CAPACITY)
