"""Secure inner products by ASPE (Wong et al. 2009), as the seed paper uses them.

Two sides share one secret key (M1, M2, S):

* the *stored* side (the paper's E-FD for classifiers, E-LV for label vectors) is encrypted
  once and kept by the server: ``[M1^T y', M2^T y'']``;
* the *query* side (E-DW for windows, E-Q for label queries) is encrypted per use:
  ``[M1^-1 w', M2^-1 w'']``.

The server's only operation is a dot product of the two, which equals ``y . w``.

Hardening beyond the paper (see docs/crypto.md):

* the caller folds the threshold into the vectors (``y = [y, -theta]``, ``w = [w, 1]``) so the
  server decides on the *sign* of the product and never compares against a known threshold;
* every query-side vector is multiplied by a fresh random ``c > 0``: the server sees
  ``c * (y . w - theta)``, which keeps every decision exact but hides magnitudes;
* ``noise_dim`` dummy dimensions carry fresh random values on the stored side against zeros
  on the query side, and ``noise_dim`` more the other way round: they randomise every
  ciphertext without changing any inner product;
* the split shares are fresh per element and per vector (not one ``r`` per vector);
* M1, M2 are random with a *bounded* condition number, so float32 encodings stay exact
  enough for sign decisions.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np

from common.errors import KeyMismatchError, MalformedInputError

KEY_MAGIC = b"PFASPE1\0"
DEFAULT_NOISE_DIM = 4
DEFAULT_MAX_CONDITION = 100.0
FINGERPRINT_BYTES = 16
_HEADER = struct.Struct("<8sIIId")


def _random_well_conditioned(n: int, max_condition: float, rng: np.random.Generator) -> np.ndarray:
    """A random invertible n x n matrix whose condition number is at most max_condition.

    Built as U diag(s) V^T with U, V Haar-random orthogonal and singular values spread
    log-uniformly over [1/sqrt(k), sqrt(k)]: random in every entry, never ill-conditioned.
    """
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    half = 0.5 * np.log(max_condition)
    singular = np.exp(rng.uniform(-half, half, size=n))
    # Pin the extremes so the bound is reached but never exceeded.
    if n >= 2:
        singular[0], singular[1] = np.exp(half), np.exp(-half)
    matrix: np.ndarray = (u * singular) @ v.T
    return matrix


@dataclass(frozen=True, eq=False)
class AspeKey:
    """A secret ASPE key. ``data_dim`` counts the caller's dims (threshold column included)."""

    version: int
    data_dim: int
    noise_dim: int
    max_condition: float
    m1: np.ndarray
    m2: np.ndarray
    split: np.ndarray  # bool, True = copy on the stored side, split on the query side
    m1_inv: np.ndarray = field(repr=False)
    m2_inv: np.ndarray = field(repr=False)

    @property
    def extended_dim(self) -> int:
        """Dims of one half after the noise dims are appended."""
        return self.data_dim + 2 * self.noise_dim

    @property
    def cipher_dim(self) -> int:
        """Dims of one ciphertext (both halves)."""
        return 2 * self.extended_dim

    def fingerprint(self) -> bytes:
        """A public identifier of the key (a hash: it reveals nothing of the matrices)."""
        h = hashlib.sha256(b"privface/aspe-key-fingerprint/v1")
        h.update(struct.pack("<III", self.version, self.data_dim, self.noise_dim))
        h.update(self.m1.tobytes() + self.m2.tobytes() + self.split.tobytes())
        return h.digest()[:FINGERPRINT_BYTES]

    def condition_numbers(self) -> tuple[float, float]:
        """Measured 2-norm condition numbers of M1 and M2."""
        return float(np.linalg.cond(self.m1)), float(np.linalg.cond(self.m2))

    def to_bytes(self) -> bytes:
        """Serialises the key (secret material: store only inside an encrypted bundle)."""
        header = _HEADER.pack(KEY_MAGIC, self.version, self.data_dim, self.noise_dim,
                              self.max_condition)
        return (header + self.m1.astype("<f8").tobytes() + self.m2.astype("<f8").tobytes()
                + np.packbits(self.split).tobytes())

    @classmethod
    def from_bytes(cls, data: bytes) -> AspeKey:
        """Parses :meth:`to_bytes` output; raises MalformedInputError on any inconsistency."""
        if len(data) < _HEADER.size:
            raise MalformedInputError("ASPE key is truncated")
        magic, version, data_dim, noise_dim, max_condition = _HEADER.unpack_from(data)
        if magic != KEY_MAGIC:
            raise MalformedInputError("not an ASPE key (bad magic)")
        n = data_dim + 2 * noise_dim
        matrix_bytes = n * n * 8
        expected = _HEADER.size + 2 * matrix_bytes + (n + 7) // 8
        if len(data) != expected:
            raise MalformedInputError(f"ASPE key has {len(data)} bytes, expected {expected}")
        off = _HEADER.size
        m1 = np.frombuffer(data, "<f8", n * n, off).reshape(n, n).copy()
        m2 = np.frombuffer(data, "<f8", n * n, off + matrix_bytes).reshape(n, n).copy()
        split = np.unpackbits(np.frombuffer(data, np.uint8, offset=off + 2 * matrix_bytes))[:n]
        return cls._build(version, data_dim, noise_dim, max_condition, m1, m2, split.astype(bool))

    @classmethod
    def _build(cls, version: int, data_dim: int, noise_dim: int, max_condition: float,
               m1: np.ndarray, m2: np.ndarray, split: np.ndarray) -> AspeKey:
        return cls(version=version, data_dim=data_dim, noise_dim=noise_dim,
                   max_condition=max_condition, m1=m1, m2=m2, split=split,
                   m1_inv=np.linalg.inv(m1), m2_inv=np.linalg.inv(m2))


def generate_key(data_dim: int, *, noise_dim: int = DEFAULT_NOISE_DIM, version: int = 1,
                 max_condition: float = DEFAULT_MAX_CONDITION,
                 rng: np.random.Generator | None = None) -> AspeKey:
    """KeyGen (the paper's D-KeyGen / M-KeyGen): random well-conditioned M1, M2 and split S."""
    if data_dim < 1:
        raise ValueError("data_dim must be at least 1")
    if noise_dim < 0:
        raise ValueError("noise_dim must be non-negative")
    if max_condition < 1.0:
        raise ValueError("max_condition must be >= 1")
    rng = rng or np.random.default_rng()
    n = data_dim + 2 * noise_dim
    m1 = _random_well_conditioned(n, max_condition, rng)
    m2 = _random_well_conditioned(n, max_condition, rng)
    split = rng.integers(0, 2, size=n).astype(bool)
    return AspeKey._build(version, data_dim, noise_dim, max_condition, m1, m2, split)


def _as_rows(key: AspeKey, vectors: np.ndarray) -> np.ndarray:
    rows = np.asarray(vectors, dtype=np.float64)
    if rows.ndim == 1:
        rows = rows[None, :]
    if rows.ndim != 2 or rows.shape[1] != key.data_dim:
        raise MalformedInputError(
            f"expected vectors of {key.data_dim} dims, got shape {np.shape(vectors)}")
    if not np.all(np.isfinite(rows)):
        raise MalformedInputError("vectors contain NaN or infinity")
    return rows


def _share_scale(rows: np.ndarray) -> np.ndarray:
    """Per-vector magnitude of the random shares: comparable to the data, never zero."""
    rms = np.sqrt(np.mean(rows * rows, axis=1, keepdims=True))
    return np.where(rms > 0, rms, 1.0)


def _split(rows: np.ndarray, split_mask: np.ndarray, rng: np.random.Generator
           ) -> tuple[np.ndarray, np.ndarray]:
    """Splits each row into two shares at the masked positions, fresh randomness per element."""
    r = rng.standard_normal(rows.shape) * _share_scale(rows)
    a = np.where(split_mask, 0.5 * rows - r, rows)
    b = np.where(split_mask, 0.5 * rows + r, rows)
    return a, b


def encrypt_stored(key: AspeKey, vectors: np.ndarray,
                   rng: np.random.Generator | None = None) -> np.ndarray:
    """Stored-side encryption (E-FD, E-LV): returns k x cipher_dim float64."""
    rng = rng or np.random.default_rng()
    rows = _as_rows(key, vectors)
    k = rows.shape[0]
    noise = rng.standard_normal((k, key.noise_dim)) * _share_scale(rows)
    zeros = np.zeros((k, key.noise_dim))
    ext = np.hstack([rows, noise, zeros])
    first, second = _split(ext, ~key.split, rng)
    return np.hstack([first @ key.m1, second @ key.m2])  # rows of M1^T y', M2^T y''


def encrypt_query(key: AspeKey, vectors: np.ndarray, rng: np.random.Generator | None = None,
                  *, scale_range: tuple[float, float] = (1.0, 16.0)) -> np.ndarray:
    """Query-side encryption (E-DW, E-Q), each vector scaled by a fresh random c > 0."""
    rng = rng or np.random.default_rng()
    rows = _as_rows(key, vectors)
    k = rows.shape[0]
    lo, hi = scale_range
    if not 0 < lo <= hi:
        raise ValueError("scale_range must satisfy 0 < lo <= hi")
    scales = np.exp(rng.uniform(np.log(lo), np.log(hi), size=(k, 1)))
    zeros = np.zeros((k, key.noise_dim))
    noise = rng.standard_normal((k, key.noise_dim)) * _share_scale(rows)
    ext = np.hstack([rows, zeros, noise]) * scales
    first, second = _split(ext, key.split, rng)
    return np.hstack([first @ key.m1_inv.T, second @ key.m2_inv.T])  # M1^-1 w', M2^-1 w''


def evaluate(stored: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Server side (DC, MAT): all inner products, shape (queries, stored)."""
    stored = np.asarray(stored)
    queries = np.asarray(queries)
    if stored.shape[-1] != queries.shape[-1]:
        raise KeyMismatchError(
            f"ciphertext dimensions differ ({stored.shape[-1]} vs {queries.shape[-1]}): "
            "they were made with different keys")
    products: np.ndarray = np.atleast_2d(queries) @ np.atleast_2d(stored).T
    return products
