"""Encrypted label search vs plaintext numpy over the same label matrix.

Stores n ASPE-encrypted label vectors of a family of 8 members (each member in a photo with
probability 0.3) in a real SQLite store, then times the server's MAT step (the code the
SearchPhotos servicer runs, index already in memory) for a two-person all-of query, side by
side with plaintext numpy (L @ Q == lambda) over the same labels. Also reports the one-time
index load from SQLite and one end-to-end gRPC search over the largest store.

    .venv/bin/python bench/search_bench.py --json bench/results/search.json
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # as the server runs (server/__init__.py)
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import median_ms, print_table, write_json
from common import aspe, labels
from server.label_index import LabelSearch, SearchResult
from server.storage import Family, Store

MEMBERS = 8
PRESENCE = 0.3
QUERY = [1, 4]


def build_store(store: Store, n: int, key: aspe.AspeKey, capacity: int,
                rng: np.random.Generator) -> tuple[Family, np.ndarray]:
    """A family with n encrypted label rows; returns (the family as the server sees it,
    plaintext label matrix)."""
    family_id, token = store.create_family(key.fingerprint(), key.cipher_dim)
    plain = np.zeros((n, capacity + 1))
    plain[:, :MEMBERS] = rng.random((n, MEMBERS)) < PRESENCE
    plain[:, -1] = 1.0
    for start in range(0, n, 100_000):
        block = plain[start:start + 100_000]
        enc = aspe.encrypt_stored(key, block, rng).astype("<f8")
        store.bulk_insert_labels(family_id, [(secrets.token_hex(16), row.tobytes())
                                             for row in enc])
    return store.authenticate(family_id, token), plain


def encrypted_search(search: LabelSearch, key: aspe.AspeKey, family: Family, capacity: int,
                     mode: labels.MatchMode) -> SearchResult:
    """One server search with a fresh E-Q, as a phone sends."""
    query = aspe.encrypt_query(key, labels.query_vector(QUERY, capacity, mode))
    return search.search(family, key.fingerprint(), query[0].astype("<f8").tobytes(), mode, 0)


def plaintext_search(plain: np.ndarray, q_plain: np.ndarray) -> np.ndarray:
    """The same search over the plaintext label matrix."""
    scores = plain @ q_plain
    hits: np.ndarray = np.flatnonzero(scores > 0)[::-1]
    return hits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000",
                        help="comma-separated store sizes (default %(default)s)")
    parser.add_argument("--capacity", type=int, default=labels.DEFAULT_CAPACITY,
                        help="family slots (default %(default)s, the family default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write figures to this JSON file")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(2026)
    key = aspe.generate_key(labels.label_dim(args.capacity), rng=rng)
    figures: dict[str, object] = {"members": MEMBERS, "capacity": args.capacity,
                                  "ciphertext_dim": key.cipher_dim, "query_people": len(QUERY)}
    rows = []
    with tempfile.TemporaryDirectory(prefix="privface-bench-") as tmp:
        store = Store(Path(tmp))
        search = LabelSearch(store)
        for n in (int(s) for s in args.sizes.split(",")):
            t0 = time.perf_counter()
            family, plain = build_store(store, n, key, args.capacity, rng)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            search.index(family.family_id, key.cipher_dim, family.label_version)
            load_ms = (time.perf_counter() - t0) * 1000
            mode = labels.MatchMode.ALL
            results = [encrypted_search(search, key, family, args.capacity, mode)
                       for _ in range(args.repeats + 1)]  # the first warms up
            search_ms = float(np.median([r.server_ms for r in results[1:]]))
            q_plain = labels.query_vector(QUERY, args.capacity, mode)
            plain_ms = median_ms(functools.partial(plaintext_search, plain, q_plain),
                                 args.repeats)
            hits = len(results[-1].photo_ids)
            assert hits == len(plaintext_search(plain, q_plain)), \
                "encrypted and plaintext results differ"
            figures[f"search_ms_{n}"] = round(search_ms, 3)
            figures[f"plain_ms_{n}"] = round(plain_ms, 3)
            figures[f"load_ms_{n}"] = round(load_ms, 1)
            figures[f"matches_{n}"] = hits
            rows.append([n, search_ms, plain_ms, search_ms / plain_ms, hits, load_ms, build_s])
    print_table(["photos", "encrypted ms", "plaintext ms", "ratio", "matches",
                 "index load ms", "setup s"], rows)
    write_json(args.json, figures)
    return 0


if __name__ == "__main__":
    sys.exit(main())
