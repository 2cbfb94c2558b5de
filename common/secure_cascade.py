"""Secure Viola-Jones detection (section 3.1 of the seed paper), hardened and compacted.

* Vendor (:func:`encrypt_cascade`, the paper's E-FD): every weak classifier ``y`` with
  threshold ``theta`` becomes the stored-side ASPE ciphertext of ``[y, sum(y), -theta*K]``.
* Phone (:func:`encrypt_windows`, E-DW): every window ``x`` (normalisation factor ``nf``,
  mean ``m``) becomes the query-side ciphertext of ``c * [x - m, m, nf / K]``, fresh
  ``c > 0`` per window. The product is ``c * (y . x - theta * nf)`` exactly; negative means
  the left leaf, as in OpenCV. Centring the pixels and dividing nf by the window area ``K``
  keep ciphertext norms small, which matters for the compact encodings below.
* Server (:func:`evaluate`, DC): stage by stage on live windows; leaf values and stage
  thresholds are public to it, as in the paper. Scores never leave the server.

Two measured ways to upload less (docs/detection.md has the figures and the leakage):

1. **Certified float32.** The server bounds the rounding error of every score exactly from
   what it holds: ``|err| <= eps * (|w~| . |y|) + eta * sum|y|``. A decision farther from
   zero than that is certified identical to the float64 decision; a window with any
   uncertain decision is answered UNCERTAIN and the phone re-sends it in float64.
2. **Prefix rounds.** The first ``prefix_stages`` stages (40 of 2135 weak classifiers for
   frontalface_alt, rejecting about 60% of windows) only involve a low-dimensional subspace
   of window space. The product key carries an orthonormal basis ``P`` of a subspace that
   contains those classifiers' span plus random directions; the phone sends every window
   as ``[P (x - m), m, nf / K]`` under a small prefix key, and only the survivors in full.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

from common import aspe
from common.cascade import Cascade
from common.errors import KeyMismatchError, MalformedInputError

NOISE_DIM = aspe.DEFAULT_NOISE_DIM
PRODUCT_KEY_MAGIC = b"PFPKEY2\0"
DEFAULT_PREFIX_STAGES = 3
DEFAULT_PREFIX_EXTRA_DIMS = 24  # random directions hiding the exact prefix span


class Encoding(IntEnum):
    """How window ciphertext values travel (values match detection.proto)."""

    FLOAT64 = 1
    FLOAT32 = 2
    FLOAT16 = 3


class Outcome(IntEnum):
    """Per-window answer (one byte each; values match detection.proto WindowOutcome)."""

    REJECTED_STAGE0 = 1  # the phone needs this one for OpenCV's skip rule
    REJECTED = 2
    PASSED = 3
    UNCERTAIN = 4  # re-send this window in float64


# Relative rounding bound and absolute (subnormal) bound per encoding, with margin.
_ROUNDING = {
    Encoding.FLOAT64: (0.0, 0.0),
    Encoding.FLOAT32: (2.0**-23, 2.0**-148),
    Encoding.FLOAT16: (2.0**-10, 2.0**-24),
}
DTYPES = {Encoding.FLOAT64: "<f8", Encoding.FLOAT32: "<f4", Encoding.FLOAT16: "<f2"}
# Error of the float64 arithmetic itself (ASPE, projection, products), relative to
# |w| . |y|: measured below 1e-13, bounded generously.
_EVAL_EPS = 2.0**-40


def nf_scale(window_size: tuple[int, int]) -> float:
    """K: nf is sent divided by the normalisation area (nf is about area x std, so unscaled
    it would dominate every ciphertext's norm; measured: 100% uncertain float16 windows
    and 2.6% uncertain float32 windows without it, 0.24% with it)."""
    w, h = window_size
    return float((w - 2) * (h - 2))


@dataclass(frozen=True, eq=False)
class ProductKey:
    """The vendor's product key for one detector: the full key SK = (M1, M2, S), and the
    prefix basis and prefix key of the interactive first round. Versioned."""

    detector_id: str
    window_size: tuple[int, int]
    key: aspe.AspeKey
    prefix_stages: int
    prefix_basis: np.ndarray  # (r, pixels), orthonormal rows
    prefix_key: aspe.AspeKey | None

    @property
    def version(self) -> int:
        return self.key.version

    @property
    def n_pixels(self) -> int:
        return self.window_size[0] * self.window_size[1]

    def fingerprint(self) -> bytes:
        h = hashlib.sha256(b"privface/product-key/v2")
        h.update(self.key.fingerprint())
        if self.prefix_key is not None:
            h.update(self.prefix_key.fingerprint() + self.prefix_basis.tobytes())
        return h.digest()[:aspe.FINGERPRINT_BYTES]

    def to_bytes(self) -> bytes:
        name = self.detector_id.encode()
        key = self.key.to_bytes()
        prefix = self.prefix_key.to_bytes() if self.prefix_key is not None else b""
        basis = self.prefix_basis.astype("<f8").tobytes()
        return (PRODUCT_KEY_MAGIC
                + struct.pack("<HIIIIQQQ", len(name), *self.window_size, self.prefix_stages,
                              self.prefix_basis.shape[0], len(key), len(prefix), len(basis))
                + name + key + prefix + basis)

    @classmethod
    def from_bytes(cls, data: bytes) -> ProductKey:
        if not data.startswith(PRODUCT_KEY_MAGIC):
            raise MalformedInputError("not a privface product key (or an older format)")
        head = struct.Struct("<HIIIIQQQ")
        off = len(PRODUCT_KEY_MAGIC)
        try:
            n, w, h, stages, rank, lk, lp, lb = head.unpack_from(data, off)
        except struct.error:
            raise MalformedInputError("product key is truncated") from None
        off += head.size
        if len(data) != off + n + lk + lp + lb:
            raise MalformedInputError("product key is truncated or has trailing bytes")
        name = data[off:off + n].decode()
        off += n
        key = aspe.AspeKey.from_bytes(data[off:off + lk])
        off += lk
        prefix = aspe.AspeKey.from_bytes(data[off:off + lp]) if lp else None
        off += lp
        basis = np.frombuffer(data, "<f8", lb // 8, off).reshape(rank, w * h).copy()
        return cls(name, (w, h), key, stages, basis, prefix)


def _prefix_basis(cascade: Cascade, stages: int, extra: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Orthonormal rows spanning the prefix classifiers plus ``extra`` random directions."""
    end = int(cascade.stage_ends[stages - 1])
    span = np.vstack([cascade.weights[:end], rng.standard_normal((extra, cascade.n_pixels))])
    q, r = np.linalg.qr(span.T)
    rank = int(np.sum(np.abs(np.diag(r)) > 1e-9 * np.abs(r).max()))
    # A random rotation inside the subspace, so row order reveals nothing.
    rot, _ = np.linalg.qr(rng.standard_normal((rank, rank)))
    basis: np.ndarray = (q[:, :rank] @ rot).T
    return basis


def generate_product_key(detector_id: str, cascade: Cascade, version: int = 1, *,
                         prefix_stages: int = DEFAULT_PREFIX_STAGES,
                         prefix_extra_dims: int = DEFAULT_PREFIX_EXTRA_DIMS,
                         rng: np.random.Generator | None = None) -> ProductKey:
    """D-KeyGen: full key sized for the cascade's windows, plus the prefix material."""
    rng = rng or np.random.default_rng()
    if not 0 <= prefix_stages < cascade.n_stages:
        raise ValueError(f"prefix_stages must be within 0..{cascade.n_stages - 1}")
    key = aspe.generate_key(cascade.n_pixels + 2, noise_dim=NOISE_DIM, version=version, rng=rng)
    if prefix_stages == 0:
        return ProductKey(detector_id, cascade.window_size, key, 0,
                          np.zeros((0, cascade.n_pixels)), None)
    basis = _prefix_basis(cascade, prefix_stages, prefix_extra_dims, rng)
    prefix = aspe.generate_key(basis.shape[0] + 2, noise_dim=NOISE_DIM, version=version, rng=rng)
    return ProductKey(detector_id, cascade.window_size, key, prefix_stages, basis, prefix)


@dataclass(frozen=True, eq=False)
class EncryptedCascade:
    """What the server holds: encrypted classifiers plus the public stage structure."""

    detector_id: str
    key_version: int
    key_fingerprint: bytes
    window_size: tuple[int, int]
    classifiers: np.ndarray  # (n_weak, cipher_dim) float64
    prefix_classifiers: np.ndarray  # (weak in prefix stages, prefix_cipher_dim) float64
    prefix_stages: int
    stage_ends: np.ndarray
    stage_thresholds: np.ndarray
    left_values: np.ndarray
    right_values: np.ndarray

    @property
    def cipher_dim(self) -> int:
        return int(self.classifiers.shape[1])

    @property
    def prefix_cipher_dim(self) -> int:
        return int(self.prefix_classifiers.shape[1]) if self.prefix_stages else 0

    @property
    def n_stages(self) -> int:
        return int(self.stage_ends.shape[0])

    @property
    def n_weak(self) -> int:
        return int(self.classifiers.shape[0])

    def matrix_bytes(self) -> bytes:
        """The full matrix then the prefix matrix, float64 little-endian."""
        return (self.classifiers.astype("<f8").tobytes()
                + self.prefix_classifiers.astype("<f8").tobytes())


def _stored_rows(cascade: Cascade, basis: np.ndarray | None, end: int) -> np.ndarray:
    weights = cascade.weights[:end]
    projected = weights if basis is None else weights @ basis.T
    return np.hstack([projected, weights.sum(axis=1, keepdims=True),
                      -nf_scale(cascade.window_size) * cascade.thresholds[:end, None]])


def encrypt_cascade(cascade: Cascade, product_key: ProductKey,
                    rng: np.random.Generator | None = None) -> EncryptedCascade:
    """E-FD: every weak classifier as ``[y, sum(y), -theta*K]`` (and its prefix form)."""
    if product_key.window_size != cascade.window_size:
        raise KeyMismatchError(f"product key is for {product_key.window_size} windows, the "
                               f"cascade uses {cascade.window_size}")
    full = aspe.encrypt_stored(product_key.key, _stored_rows(cascade, None, cascade.n_weak), rng)
    if product_key.prefix_stages:
        if product_key.prefix_key is None:
            raise MalformedInputError("product key has prefix stages but no prefix key")
        end = int(cascade.stage_ends[product_key.prefix_stages - 1])
        prefix = aspe.encrypt_stored(product_key.prefix_key,
                                     _stored_rows(cascade, product_key.prefix_basis, end), rng)
    else:
        prefix = np.zeros((0, 0))
    return EncryptedCascade(
        detector_id=product_key.detector_id, key_version=product_key.version,
        key_fingerprint=product_key.fingerprint(), window_size=cascade.window_size,
        classifiers=full, prefix_classifiers=prefix, prefix_stages=product_key.prefix_stages,
        stage_ends=np.asarray(cascade.stage_ends), stage_thresholds=cascade.stage_thresholds,
        left_values=cascade.left_values, right_values=cascade.right_values)


def encrypt_windows(product_key: ProductKey, pixels: np.ndarray, norm_factors: np.ndarray,
                    encoding: Encoding = Encoding.FLOAT32, prefix: bool = False,
                    rng: np.random.Generator | None = None) -> bytes:
    """E-DW: windows (n x pixels) with their nf, encrypted and encoded for the wire.

    ``prefix`` encrypts their projection for the prefix round instead of the full window.
    """
    pixels = np.asarray(pixels, dtype=np.float64)
    nf = np.asarray(norm_factors, dtype=np.float64).reshape(-1, 1)
    if pixels.ndim != 2 or pixels.shape[1] != product_key.n_pixels \
            or pixels.shape[0] != nf.shape[0]:
        raise MalformedInputError(
            f"pixels must be (n, {product_key.n_pixels}) with one nf per window")
    mean = pixels.mean(axis=1, keepdims=True)
    centred = pixels - mean
    if prefix:
        if product_key.prefix_key is None:
            raise MalformedInputError("this product key has no prefix round")
        key, centred = product_key.prefix_key, centred @ product_key.prefix_basis.T
    else:
        key = product_key.key
    plain = np.hstack([centred, mean, nf / nf_scale(product_key.window_size)])
    ct = aspe.encrypt_query(key, plain, rng)
    if encoding is not Encoding.FLOAT64:
        # Every row scaled to max |value| = 1: one more positive factor (signs unchanged)
        # that keeps compact encodings far from overflow and subnormals.
        ct = ct / np.max(np.abs(ct), axis=1, keepdims=True)
    return ct.astype(DTYPES[encoding]).tobytes()


def decode_windows(data: bytes, count: int, cipher_dim: int, encoding: int) -> np.ndarray:
    """Server: wire bytes -> (count, cipher_dim) float64; MalformedInputError if inconsistent."""
    try:
        enc = Encoding(encoding)
    except ValueError:
        raise MalformedInputError(f"unknown window encoding {encoding}") from None
    itemsize = np.dtype(DTYPES[enc]).itemsize
    if len(data) != count * cipher_dim * itemsize:
        raise MalformedInputError(
            f"window batch has {len(data)} bytes, expected {count} windows x {cipher_dim} "
            f"values x {itemsize} bytes: were they encrypted for this detector and key?")
    windows = np.frombuffer(data, dtype=DTYPES[enc]).astype(np.float64).reshape(count, cipher_dim)
    if not np.all(np.isfinite(windows)):
        raise MalformedInputError("window batch contains NaN or infinity")
    return windows


def evaluate(cascade: EncryptedCascade, windows: np.ndarray, encoding: int,
             first_stage: int = 0, stage_count: int = 0, prefix: bool = False) -> np.ndarray:
    """DC over encrypted windows, stage by stage on live windows only; one Outcome each.

    Scores decide leaves and are then dropped; only outcomes are returned.
    """
    n_stages = cascade.prefix_stages if prefix else cascade.n_stages
    if not 0 <= first_stage < n_stages:
        raise MalformedInputError(f"first_stage must be within 0..{n_stages - 1}")
    last = n_stages if stage_count == 0 else min(n_stages, first_stage + stage_count)
    matrix = cascade.prefix_classifiers if prefix else cascade.classifiers
    if windows.shape[1] != matrix.shape[1]:
        raise MalformedInputError(f"windows have {windows.shape[1]} values, this detector's "
                                  f"{'prefix ' if prefix else ''}ciphertexts {matrix.shape[1]}")
    eps, eta = _ROUNDING[Encoding(encoding)]
    outcome = np.full(windows.shape[0], Outcome.PASSED, dtype=np.uint8)
    alive = np.arange(windows.shape[0])
    abs_windows = np.abs(windows) if eps > 0 else None  # None: exact, nothing to certify
    for stage in range(first_stage, last):
        if alive.size == 0:
            break
        start = 0 if stage == 0 else int(cascade.stage_ends[stage - 1])
        stop = int(cascade.stage_ends[stage])
        ys = matrix[start:stop]
        scores = windows[alive] @ ys.T
        if abs_windows is not None:
            abs_ys = np.abs(ys)
            bound = (eps + _EVAL_EPS) * (abs_windows[alive] @ abs_ys.T) \
                + eta * abs_ys.sum(axis=1)[None, :]
            uncertain = np.any(np.abs(scores) <= bound, axis=1)
        else:
            uncertain = np.zeros(alive.size, dtype=bool)
        leaves = np.where(scores < 0, cascade.left_values[start:stop],
                          cascade.right_values[start:stop])
        total = np.zeros(alive.size)
        for j in range(leaves.shape[1]):  # classifier order, as OpenCV accumulates
            total += leaves[:, j]
        rejected = (total < cascade.stage_thresholds[stage]) & ~uncertain
        outcome[alive[uncertain]] = Outcome.UNCERTAIN
        outcome[alive[rejected]] = Outcome.REJECTED_STAGE0 if stage == 0 else Outcome.REJECTED
        alive = alive[~uncertain & ~rejected]
    return outcome
