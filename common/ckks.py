"""CKKS (TenSEAL / SEAL) encrypted face matching with a packed gallery.

Pure library: no gRPC, no storage. The phone holds a :class:`SecretContext`; the server
holds a :class:`PublicContext` (relinearisation key plus only the rotation keys the matcher
uses, never the secret key) and the encrypted gallery.

Parameters (default :data:`DEFAULT_PARAMS`): N = 4096, coefficient modulus [60, 49] bits
(109 bits, exactly the HomomorphicEncryption.org 128-bit bound for N = 4096), scale 2^27.
Only one ciphertext-ciphertext multiplication is needed and it is never rescaled: the
product lives at scale 2^54 inside the 60-bit data prime, with headroom for squared
distances up to 16 (embeddings are checked to have norm <= :data:`MAX_NORM`). The 49-bit
prime is the key-switching (special) prime. Measured: max abs error of the Euclidean
distance ~5e-6 ([54, 55] at scale 2^24 gave ~4e-5). A depth-1 chain with a rescale
(e.g. N = 8192, [60, 40, 60], scale 2^40) is also supported via :class:`CKKSParams`.

Packed layout (:class:`GalleryLayout`, k dims per entry per ciphertext, S = N/2 slots):
a *block* is 128/k ciphertexts; ciphertext c of a block holds dims [c*k, (c+1)*k) of
S/k gallery entries, entry e at slots [e*k, e*k+k). A query is 128/k ciphertexts, each
holding its k dims tiled S/k times. The server computes, per block,
sum_c (G_c - Q_c)^2 without relinearising each term, relinearises once, then does
log2(k) rotate-and-add steps so that slot e*k holds ||g_e - q||^2. Rotation keys: steps
1, 2, ..., k/2 only.

Wire format of one ciphertext (all functions take/return these bytes)::

    b"PFCT" | version (1) | kind (1) | log2 k (1) | index c (1) | key id (8)
           | blake2b-128 of the SEAL bytes (16) | SEAL ciphertext (zstd-compressed,
           seeded when freshly encrypted with the secret key)

The key id is a random 64-bit identifier of the family's CKKS key, copied into the public
context: a ciphertext made under a different key is rejected with ValueError. The digest
detects accidental corruption (a flipped byte raises ValueError); it is not a MAC (the
server, which computes results, could recompute it). A ciphertext whose header is
rewritten to carry another family's key id decrypts to garbage (values far from any
distance), which tests demonstrate.

Positions are append-only: global position p lives in block p // entries_per_block at
entry p % entries_per_block. Removal only marks positions dead on the phone. Empty or
dead positions decrypt to ||q||^2 or a stale distance and must be ignored via
``entry_slots`` in :func:`assign`.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import tenseal as ts
from tenseal import sealapi

__all__ = [
    "DIM",
    "MAX_NORM",
    "TOLERANCE",
    "SECURITY_BOUNDS_128",
    "CKKSParams",
    "DEFAULT_PARAMS",
    "DEFAULT_K",
    "GalleryLayout",
    "SecretContext",
    "PublicContext",
    "PreparedGallery",
    "check_security",
    "create_secret_context",
    "secret_context_bytes",
    "load_secret_context",
    "public_context_bytes",
    "load_public_context",
    "encrypt_entries",
    "encrypt_gallery",
    "add_into_block",
    "encrypt_query",
    "prepare_block",
    "prepare_query",
    "match_block",
    "match_prepared",
    "decrypt_squared_distances",
    "decrypt_distances",
    "decrypt_entries",
    "assign",
    "nearest",
]

DIM = 128
"""Embedding dimension (dlib ResNet / face_recognition)."""

MAX_NORM = 2.0
"""Largest accepted embedding L2 norm (face_recognition embeddings have norm ~1.4)."""

TOLERANCE = 0.6
"""face_recognition's default distance tolerance."""

# HomomorphicEncryption.org security standard, 128-bit classical security, ternary
# secret: largest total bit count of the coefficient modulus (q * special prime).
SECURITY_BOUNDS_128 = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}

_WIRE_MAGIC = b"PFCT"
_WIRE_VERSION = 1
_HEADER = struct.Struct(">4sBBBB8s16s")
KIND_GALLERY = 1
KIND_QUERY = 2
KIND_RESULT = 3
_KIND_NAMES = {KIND_GALLERY: "gallery", KIND_QUERY: "query", KIND_RESULT: "result"}

_CTX_MAGIC = b"PFCKKS"
_CTX_VERSION = 1
_CTX_SECRET = ord("S")
_CTX_PUBLIC = ord("P")
_CTX_HEADER = struct.Struct(">6sBBBB8s")  # magic, version, kind, log2 k, scale bits, key id

# tenseal ships no type information: its SEAL handles (contexts, encoders, keys,
# ciphertexts) are typed as this.
SealObject = Any


def check_security(poly_modulus_degree: int, coeff_mod_bit_sizes: Sequence[int]) -> int:
    """Return the total modulus bit count; raise ValueError if not 128-bit secure."""
    n = int(poly_modulus_degree)
    if n not in SECURITY_BOUNDS_128:
        raise ValueError(
            f"poly_modulus_degree {n} not in the 128-bit table {sorted(SECURITY_BOUNDS_128)}"
        )
    sizes = [int(b) for b in coeff_mod_bit_sizes]
    if len(sizes) < 2:
        raise ValueError("need at least two primes (one data prime, one special prime)")
    if any(b < 20 or b > 60 for b in sizes):
        raise ValueError(f"each prime must have 20..60 bits, got {sizes}")
    total = sum(sizes)
    bound = SECURITY_BOUNDS_128[n]
    if total > bound:
        raise ValueError(
            f"coefficient modulus {sizes} has {total} bits > {bound} allowed for "
            f"N={n} at 128-bit security (HomomorphicEncryption.org table)"
        )
    return total


@dataclass(frozen=True)
class CKKSParams:
    poly_modulus_degree: int = 4096
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 49)
    scale_bits: int = 27

    def __post_init__(self) -> None:
        check_security(self.poly_modulus_degree, self.coeff_mod_bit_sizes)
        if self.scale_bits < 1:
            raise ValueError(f"scale 2^{self.scale_bits} must be at least 2^1")
        data_bits = list(self.coeff_mod_bit_sizes[:-1])
        if self.rescale:
            # product scale 2^(2s) / last data prime ~ 2^s must fit the remaining primes
            remaining = sum(data_bits[:-1])
            prod_bits = 2 * self.scale_bits - data_bits[-1]
        else:
            remaining = data_bits[0]
            prod_bits = 2 * self.scale_bits
        # values up to MAX_NORM^2 * 4 = 16 (4 bits) plus sign and margin (2 bits)
        if prod_bits + 6 > remaining:
            raise ValueError(
                f"scale 2^{self.scale_bits} leaves no headroom in a {remaining}-bit modulus"
            )

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def rescale(self) -> bool:
        """Rescale after the multiplication only if the chain has two or more data primes."""
        return len(self.coeff_mod_bit_sizes) >= 3


DEFAULT_PARAMS = CKKSParams()
DEFAULT_K = 16
DEFAULT_TOTAL_BITS = check_security(
    DEFAULT_PARAMS.poly_modulus_degree, DEFAULT_PARAMS.coeff_mod_bit_sizes
)


@dataclass(frozen=True)
class GalleryLayout:
    """k embedding dims per entry per ciphertext; ``slots`` = N/2."""

    k: int = DEFAULT_K
    slots: int = DEFAULT_PARAMS.slots

    def __post_init__(self) -> None:
        if self.k < 1 or self.k > DIM or DIM % self.k or self.k & (self.k - 1):
            raise ValueError(f"k must be a power of two dividing {DIM}, got {self.k}")
        if self.slots < self.k or self.slots & (self.slots - 1):
            raise ValueError(f"slots must be a power of two >= k, got {self.slots}")

    @property
    def entries_per_block(self) -> int:
        return self.slots // self.k

    @property
    def cts_per_block(self) -> int:
        return DIM // self.k

    @property
    def log2k(self) -> int:
        return self.k.bit_length() - 1

    @property
    def rotation_steps(self) -> list[int]:
        return [1 << i for i in range(self.log2k)]

    def block_of(self, position: int) -> int:
        return int(position) // self.entries_per_block

    def entry_of(self, position: int) -> int:
        return int(position) % self.entries_per_block

    def blocks_for(self, n_entries: int) -> int:
        return -(-int(n_entries) // self.entries_per_block)


# --------------------------------------------------------------------------- contexts


@dataclass(eq=False)
class _Base:
    context: ts.Context
    layout: GalleryLayout
    key_id: bytes
    scale_bits: int
    _seal: SealObject = field(init=False, repr=False)
    _encoder: SealObject = field(init=False, repr=False)
    _evaluator: SealObject = field(init=False, repr=False)
    _first_parms_id: SealObject = field(init=False, repr=False)
    _rescale: bool = field(init=False, repr=False)
    poly_modulus_degree: int = field(init=False, repr=False)
    coeff_mod_bit_sizes: tuple[int, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._seal = self.context.seal_context().data
        self._encoder = sealapi.CKKSEncoder(self._seal)
        self._evaluator = sealapi.Evaluator(self._seal)
        self._first_parms_id = self._seal.first_parms_id()
        parms = self._seal.key_context_data().parms()
        self.poly_modulus_degree = int(parms.poly_modulus_degree())
        self.coeff_mod_bit_sizes = tuple(m.bit_count() for m in parms.coeff_modulus())
        # Re-checked on every load, whatever the header says: 128-bit security of the
        # parameters SEAL actually holds, and a scale whose square fits the modulus.
        CKKSParams(self.poly_modulus_degree, self.coeff_mod_bit_sizes, self.scale_bits)
        self._rescale = len(self.coeff_mod_bit_sizes) >= 3
        if self.layout.slots != self.poly_modulus_degree // 2:
            raise ValueError(
                f"layout has {self.layout.slots} slots but the context has "
                f"{self.poly_modulus_degree // 2}"
            )

    @property
    def scale(self) -> float:
        return float(2**self.scale_bits)

    def is_public(self) -> bool:
        return bool(self.context.is_public())


@dataclass(eq=False)
class SecretContext(_Base):
    """Phone-side context: secret key, encryption and decryption. Never upload it."""

    _encryptor: SealObject = field(init=False, repr=False)
    _decryptor: SealObject = field(init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.context.is_private():
            raise ValueError("SecretContext needs a context holding the secret key")
        sk = self.context.secret_key().data
        self._encryptor = sealapi.Encryptor(self._seal, sk)
        self._decryptor = sealapi.Decryptor(self._seal, sk)


@dataclass(eq=False)
class PublicContext(_Base):
    """Server-side context: relinearisation and chosen rotation keys, no secret key."""

    relin_keys: SealObject = None
    galois_keys: SealObject = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.context.is_public() or self.context.has_secret_key():
            raise ValueError("PublicContext must not contain a secret key")
        if self.relin_keys is None or self.galois_keys is None:
            raise ValueError("PublicContext needs relinearisation and rotation keys")
        for step in self.layout.rotation_steps:
            if not self.galois_keys.has_key(_galois_elt(step, self.poly_modulus_degree)):
                raise ValueError(f"public context lacks the rotation key for step {step}")


def create_secret_context(
    params: CKKSParams = DEFAULT_PARAMS, k: int = DEFAULT_K, n_threads: int = 1
) -> SecretContext:
    """A fresh CKKS key for one family (phone only)."""
    if not isinstance(params, CKKSParams):
        raise ValueError("params must be a CKKSParams")
    layout = GalleryLayout(k=k, slots=params.slots)
    ctx = ts.Context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        n_threads=n_threads,
    )
    ctx.global_scale = float(2**params.scale_bits)
    return SecretContext(ctx, layout, os.urandom(8), params.scale_bits)


def _pack_sections(header: bytes, sections: Iterable[bytes]) -> bytes:
    out = [header]
    for s in sections:
        out.append(struct.pack(">I", len(s)))
        out.append(s)
    return b"".join(out)


def _unpack_sections(data: bytes, offset: int, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        if offset + 4 > len(data):
            raise ValueError("truncated CKKS context")
        (n,) = struct.unpack_from(">I", data, offset)
        offset += 4
        if offset + n > len(data):
            raise ValueError("truncated CKKS context")
        out.append(bytes(data[offset : offset + n]))
        offset += n
    if offset != len(data):
        raise ValueError("trailing bytes after CKKS context")
    return out


def _parse_ctx_header(data: bytes) -> tuple[int, int, int, bytes]:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError("CKKS context must be bytes")
    data = bytes(data)
    if len(data) < _CTX_HEADER.size or data[:6] != _CTX_MAGIC:
        raise ValueError("not a privface CKKS context (bad magic)")
    _magic, version, kind, log2k, scale_bits, key_id = _CTX_HEADER.unpack_from(data)
    if version != _CTX_VERSION:
        raise ValueError(f"unsupported CKKS context version {version}")
    return kind, log2k, scale_bits, key_id


def context_key_id(data: bytes) -> bytes:
    """The key id in a serialised (secret or public) context's header, without loading it."""
    return _parse_ctx_header(data)[3]


def secret_context_bytes(secret: SecretContext) -> bytes:
    """Serialise the phone's secret context (for the passphrase-protected family bundle)."""
    if not isinstance(secret, SecretContext):
        raise ValueError("secret_context_bytes needs a SecretContext")
    body = secret.context.serialize(
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    header = _CTX_HEADER.pack(
        _CTX_MAGIC, _CTX_VERSION, _CTX_SECRET, secret.layout.log2k, secret.scale_bits,
        secret.key_id,
    )
    return _pack_sections(header, [body])


def load_secret_context(data: bytes, n_threads: int = 1) -> SecretContext:
    kind, log2k, scale_bits, key_id = _parse_ctx_header(data)
    if kind != _CTX_SECRET:
        raise ValueError("this is a public CKKS context, not a secret one")
    (body,) = _unpack_sections(bytes(data), _CTX_HEADER.size, 1)
    try:
        ctx = ts.Context.load(body, n_threads=n_threads)
    except Exception as exc:  # SEAL / protobuf errors
        raise ValueError(f"corrupt secret CKKS context: {exc}") from exc
    if not ctx.is_private():
        raise ValueError("secret CKKS context holds no secret key")
    n = ctx.seal_context().data.key_context_data().parms().poly_modulus_degree()
    return SecretContext(ctx, GalleryLayout(k=1 << log2k, slots=n // 2), key_id, scale_bits)


def public_context_bytes(secret: SecretContext) -> bytes:
    """What the phone uploads once: parameters, relin key and the log2(k) rotation keys.

    No secret key and no public key (the server never encrypts). The keys are SEAL
    "seeded" serialisations (half the size); SEAL expands them on load.
    """
    if not isinstance(secret, SecretContext):
        raise ValueError("public_context_bytes needs a SecretContext")
    pub = secret.context.copy()
    pub.make_context_public()
    params = pub.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False,
        save_relin_keys=False,
    )
    keygen = sealapi.KeyGenerator(secret._seal, secret.context.secret_key().data)
    relin = _save_bytes(keygen.create_relin_keys())
    elts = [_galois_elt(s, secret.poly_modulus_degree) for s in secret.layout.rotation_steps]
    galois = _save_bytes(keygen.create_galois_keys(elts)) if elts else b""
    header = _CTX_HEADER.pack(
        _CTX_MAGIC, _CTX_VERSION, _CTX_PUBLIC, secret.layout.log2k, secret.scale_bits,
        secret.key_id,
    )
    return _pack_sections(header, [params, relin, galois])


def load_public_context(data: bytes, n_threads: int = 1) -> PublicContext:
    """Server side. Raises ValueError for a secret context or anything malformed."""
    kind, log2k, scale_bits, key_id = _parse_ctx_header(data)
    if kind == _CTX_SECRET:
        raise ValueError("refusing a CKKS context that contains the secret key")
    if kind != _CTX_PUBLIC:
        raise ValueError(f"unknown CKKS context kind {kind}")
    params, relin_b, galois_b = _unpack_sections(bytes(data), _CTX_HEADER.size, 3)
    try:
        ctx = ts.Context.load(params, n_threads=n_threads)
    except Exception as exc:
        raise ValueError(f"corrupt public CKKS context: {exc}") from exc
    if not ctx.is_public() or ctx.has_secret_key():
        raise ValueError("refusing a CKKS context that contains the secret key")
    seal = ctx.seal_context().data
    n = seal.key_context_data().parms().poly_modulus_degree()
    try:
        relin = _load_obj(sealapi.RelinKeys(), seal, relin_b)
        galois = _load_obj(sealapi.GaloisKeys(), seal, galois_b) if galois_b else (
            sealapi.GaloisKeys()
        )
    except Exception as exc:
        raise ValueError(f"corrupt key material in public CKKS context: {exc}") from exc
    return PublicContext(
        ctx, GalleryLayout(k=1 << log2k, slots=n // 2), key_id, scale_bits,
        relin_keys=relin, galois_keys=galois,
    )


# --------------------------------------------------------------------------- serialisation

_TMPDIR = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _save_bytes(obj: SealObject) -> bytes:
    """SEAL objects in tenseal.sealapi only save to a path: go through a private tmp file."""
    fd, path = tempfile.mkstemp(prefix="pfckks-", dir=_TMPDIR)
    os.close(fd)
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def _load_obj(obj: SealObject, seal: SealObject, data: bytes) -> SealObject:
    fd, path = tempfile.mkstemp(prefix="pfckks-", dir=_TMPDIR)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        obj.load(seal, path)
        return obj
    finally:
        os.unlink(path)


def _galois_elt(step: int, n: int) -> int:
    """SEAL's Galois element for a left rotation by ``step`` of the N/2 CKKS slots."""
    if not 0 < step < n // 2:
        raise ValueError(f"rotation step {step} out of range")
    return pow(3, step, 2 * n)


def _wrap(ctx: _Base, kind: int, index: int, seal_bytes: bytes) -> bytes:
    digest = hashlib.blake2b(seal_bytes, digest_size=16).digest()
    return _HEADER.pack(
        _WIRE_MAGIC, _WIRE_VERSION, kind, ctx.layout.log2k, index, ctx.key_id, digest
    ) + seal_bytes


def _unwrap(ctx: _Base, data: object, kind: int, index: int | None) -> SealObject:
    """Parse and validate one wire ciphertext; returns a sealapi.Ciphertext."""
    if isinstance(data, sealapi.Ciphertext):
        return data
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"{_KIND_NAMES[kind]} ciphertext must be bytes, got {type(data)}")
    data = bytes(data)
    if len(data) <= _HEADER.size:
        raise ValueError(f"{_KIND_NAMES[kind]} ciphertext too short ({len(data)} bytes)")
    magic, version, got_kind, log2k, got_index, key_id, digest = _HEADER.unpack_from(data)
    if magic != _WIRE_MAGIC or version != _WIRE_VERSION:
        raise ValueError("not a privface CKKS ciphertext (bad magic/version)")
    if got_kind != kind:
        raise ValueError(
            f"expected a {_KIND_NAMES[kind]} ciphertext, got {_KIND_NAMES.get(got_kind, got_kind)}"
        )
    if key_id != ctx.key_id:
        raise ValueError("ciphertext was made under a different CKKS key (key id mismatch)")
    if log2k != ctx.layout.log2k:
        raise ValueError(f"ciphertext layout k={1 << log2k} != context k={ctx.layout.k}")
    if index is not None and got_index != index:
        raise ValueError(f"ciphertext index {got_index} where {index} was expected")
    body = data[_HEADER.size :]
    if hashlib.blake2b(body, digest_size=16).digest() != digest:
        raise ValueError("ciphertext corrupted (checksum mismatch)")
    try:
        ct = _load_obj(sealapi.Ciphertext(), ctx._seal, body)
    except Exception as exc:
        raise ValueError(f"malformed SEAL ciphertext: {exc}") from exc
    if ct.size() != 2:
        raise ValueError(f"ciphertext has size {ct.size()}, expected 2")
    scale = float(ct.scale)
    # (NaN compares false with everything: without this a NaN scale passed the check
    # below, was stored, and broke SEAL's arithmetic on every later match)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"ciphertext scale {scale!r} is not a finite positive number")
    if kind in (KIND_GALLERY, KIND_QUERY):
        if ct.parms_id() != ctx._first_parms_id:
            raise ValueError("fresh ciphertext is not at the top data level")
        if abs(math.log2(scale) - ctx.scale_bits) > 1e-6:
            raise ValueError(f"ciphertext scale 2^{math.log2(scale):.2f} unexpected")
    return ct



# --------------------------------------------------------------------------- phone side


def _check_embeddings(embeddings: npt.ArrayLike, what: str = "embeddings") -> np.ndarray:
    arr = np.asarray(embeddings, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != DIM:
        raise ValueError(f"{what} must have shape (n, {DIM}), got {np.shape(embeddings)}")
    if arr.shape[0] == 0:
        raise ValueError(f"no {what} given")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} contain NaN or infinite values")
    norms = np.linalg.norm(arr, axis=1)
    if np.any(norms > MAX_NORM):
        raise ValueError(f"{what} norm {norms.max():.3f} exceeds {MAX_NORM}")
    return arr


def _encrypt_slots(secret: SecretContext, values: np.ndarray) -> bytes:
    pt = sealapi.Plaintext()
    secret._encoder.encode(values.tolist(), secret.scale, pt)
    # Symmetric (secret-key) encryption, serialised seeded: about half the bytes.
    return _save_bytes(secret._encryptor.encrypt_symmetric(pt))


def encrypt_entries(secret: SecretContext, embeddings: npt.ArrayLike,
                    first_position: int) -> list[bytes]:
    """Encrypt gallery entries at positions first_position.. (all within one block).

    Returns one block's worth (``cts_per_block``) of ciphertexts; positions of the block
    that are not being written hold zeros, so the result can be added into a stored block.
    """
    if not isinstance(secret, SecretContext):
        raise ValueError("encrypt_entries needs the phone's SecretContext")
    arr = _check_embeddings(embeddings)
    lay = secret.layout
    if int(first_position) != first_position or first_position < 0:
        raise ValueError(f"first_position must be a non-negative int, got {first_position}")
    first = int(first_position)
    start = lay.entry_of(first)
    if start + arr.shape[0] > lay.entries_per_block:
        raise ValueError(
            f"{arr.shape[0]} entries from position {first} cross a block boundary "
            f"({lay.entries_per_block} entries per block); split them per block"
        )
    grid = np.zeros((lay.entries_per_block, DIM))
    grid[start : start + arr.shape[0]] = arr
    k = lay.k
    return [
        _wrap(secret, KIND_GALLERY, c, _encrypt_slots(secret, grid[:, c * k : (c + 1) * k].ravel()))
        for c in range(lay.cts_per_block)
    ]


def encrypt_gallery(secret: SecretContext, embeddings: npt.ArrayLike) -> list[list[bytes]]:
    """A whole gallery packed from position 0: one list of ciphertexts per block (for
    re-packing a gallery after removals, and for benchmarks)."""
    arr = _check_embeddings(embeddings)
    per = secret.layout.entries_per_block
    return [encrypt_entries(secret, arr[b * per:(b + 1) * per], b * per)
            for b in range(secret.layout.blocks_for(len(arr)))]


def encrypt_query(secret: SecretContext, embedding: npt.ArrayLike) -> list[bytes]:
    """One query face -> ``cts_per_block`` seeded ciphertexts (k dims tiled per entry)."""
    if not isinstance(secret, SecretContext):
        raise ValueError("encrypt_query needs the phone's SecretContext")
    arr = _check_embeddings(embedding, "query embedding")
    if arr.shape[0] != 1:
        raise ValueError(f"encrypt_query takes one embedding, got {arr.shape[0]}")
    q = arr[0]
    lay = secret.layout
    k = lay.k
    return [
        _wrap(secret, KIND_QUERY, c, _encrypt_slots(
            secret, np.tile(q[c * k : (c + 1) * k], lay.entries_per_block)))
        for c in range(lay.cts_per_block)
    ]


def decrypt_squared_distances(secret: SecretContext, result: bytes,
                              n_entries: int | None = None) -> np.ndarray:
    """Squared distances of the first ``n_entries`` entries of one block's result."""
    if not isinstance(secret, SecretContext):
        raise ValueError("decryption needs the phone's SecretContext")
    lay = secret.layout
    if n_entries is None:
        n_entries = lay.entries_per_block
    if not 0 <= int(n_entries) <= lay.entries_per_block:
        raise ValueError(f"n_entries must be in 0..{lay.entries_per_block}, got {n_entries}")
    ct = _unwrap(secret, result, KIND_RESULT, None)
    pt = sealapi.Plaintext()
    try:
        secret._decryptor.decrypt(ct, pt)
    except Exception as exc:
        raise ValueError(f"cannot decrypt result: {exc}") from exc
    vals = np.asarray(secret._encoder.decode_double(pt))
    return vals[:: lay.k][: int(n_entries)]


def decrypt_entries(secret: SecretContext, block: Sequence[bytes]) -> np.ndarray:
    """Phone: the embeddings stored in one gallery block, (entries_per_block, 128).

    Used to re-pack the gallery (drop removed members' entries) without the server ever
    seeing a decrypted value.
    """
    if not isinstance(secret, SecretContext):
        raise ValueError("decryption needs the phone's SecretContext")
    lay = secret.layout
    cts = _check_block_list(secret, block, KIND_GALLERY, "gallery block")
    out = np.zeros((lay.entries_per_block, DIM))
    for c, ct in enumerate(cts):
        pt = sealapi.Plaintext()
        secret._decryptor.decrypt(ct, pt)
        vals = np.asarray(secret._encoder.decode_double(pt))
        out[:, c * lay.k:(c + 1) * lay.k] = vals.reshape(lay.entries_per_block, lay.k)
    return out


def decrypt_distances(secret: SecretContext, result: bytes,
                      n_entries: int | None = None) -> np.ndarray:
    """Euclidean distances (sqrt of the decrypted squared distances, clipped at 0)."""
    sq = decrypt_squared_distances(secret, result, n_entries)
    distances: np.ndarray = np.sqrt(np.clip(sq, 0.0, None))
    return distances


def nearest(distances: npt.ArrayLike,
            entry_slots: Sequence[int | None]) -> tuple[int | None, float]:
    """(member slot of the nearest live entry, its distance); (None, inf) if none live."""
    d = np.asarray(distances, dtype=np.float64).ravel()
    if len(entry_slots) > d.size:
        raise ValueError(f"{len(entry_slots)} entry slots but only {d.size} distances")
    best: int | None = None
    best_d = math.inf
    for pos, slot in enumerate(entry_slots):
        if slot is None:
            continue
        if d[pos] < best_d:
            best, best_d = slot, float(d[pos])
    return best, best_d


def assign(distances: npt.ArrayLike, entry_slots: Sequence[int | None],
           tolerance: float = TOLERANCE) -> int | None:
    """Member slot of the nearest live entry if within ``tolerance``, else None.

    ``distances[p]`` is the Euclidean distance to gallery position p (concatenate the
    per-block results); ``entry_slots[p]`` is the member slot of position p or None for
    free/dead positions.
    """
    slot, dist = nearest(distances, entry_slots)
    return slot if slot is not None and dist <= tolerance else None


# --------------------------------------------------------------------------- server side


def _check_block_list(ctx: _Base, cts: Sequence[object] | None, kind: int,
                      what: str) -> list[SealObject]:
    if cts is None or len(cts) != ctx.layout.cts_per_block:
        n = None if cts is None else len(cts)
        raise ValueError(f"{what} must have {ctx.layout.cts_per_block} ciphertexts, got {n}")
    return [_unwrap(ctx, ct, kind, c) for c, ct in enumerate(cts)]


def add_into_block(public: PublicContext, block: Sequence[bytes] | None,
                   new: Sequence[bytes]) -> list[bytes]:
    """Server: homomorphically add newly encrypted entries into a stored block.

    ``block`` None starts a new block (the phone's seeded bytes are kept as they are).
    The phone must only write free positions (it keeps the position counter).
    """
    if not isinstance(public, (PublicContext, SecretContext)):
        raise ValueError("add_into_block needs a PublicContext")
    new_cts = _check_block_list(public, new, KIND_GALLERY, "new entries")
    if block is None:
        return [bytes(b) for b in new]
    old_cts = _check_block_list(public, block, KIND_GALLERY, "stored block")
    out = []
    for c, (a, b) in enumerate(zip(old_cts, new_cts, strict=True)):
        s = sealapi.Ciphertext()
        try:
            public._evaluator.add(a, b, s)
        except RuntimeError as exc:  # e.g. a transparent sum: the stored block negated
            raise ValueError(f"cannot add the new entries into the block: {exc}") from exc
        out.append(_wrap(public, KIND_GALLERY, c, _save_bytes(s)))
    return out


def prepare_block(public: PublicContext, block: Sequence[bytes]) -> list[SealObject]:
    """Deserialise and validate one stored block once (cache the result in memory)."""
    return _check_block_list(public, block, KIND_GALLERY, "gallery block")


def prepare_query(public: PublicContext, query: Sequence[bytes]) -> list[SealObject]:
    return _check_block_list(public, query, KIND_QUERY, "query")


def _match_prepared(public: PublicContext, block_cts: Sequence[SealObject],
                    query_cts: Sequence[SealObject]) -> SealObject:
    try:
        return _squared_distances(public, block_cts, query_cts)
    except RuntimeError as exc:
        # SEAL refuses, e.g., a transparent (all-zero) difference: a "query" made of the
        # very ciphertexts of the stored block (which GetGalleryBlock hands out).
        raise ValueError(f"encrypted matching refused the query: {exc}") from exc


def _squared_distances(public: PublicContext, block_cts: Sequence[SealObject],
                       query_cts: Sequence[SealObject]) -> SealObject:
    ev = public._evaluator
    acc = None
    for g, q in zip(block_cts, query_cts, strict=True):
        d = sealapi.Ciphertext()
        ev.sub(g, q, d)
        ev.square_inplace(d)  # size-3 ciphertext; relinearised once below
        if acc is None:
            acc = d
        else:
            ev.add_inplace(acc, d)
    ev.relinearize_inplace(acc, public.relin_keys)
    if public._rescale:
        ev.rescale_to_next_inplace(acc)
    tmp = sealapi.Ciphertext()
    for step in reversed(public.layout.rotation_steps):
        ev.rotate_vector(acc, step, public.galois_keys, tmp)
        ev.add_inplace(acc, tmp)
    return acc


def match_block(public: PublicContext, block: Sequence[object],
                query: Sequence[object]) -> bytes:
    """Server: one block (bytes or prepared) x one query (bytes or prepared) -> result bytes.

    Slot e*k of the result holds ||g_e - q||^2 under the family key.
    """
    if not isinstance(public, PublicContext):
        raise ValueError("match_block needs a PublicContext")
    g = _check_block_list(public, block, KIND_GALLERY, "gallery block")
    q = _check_block_list(public, query, KIND_QUERY, "query")
    return _wrap(public, KIND_RESULT, 0, _save_bytes(_match_prepared(public, g, q)))


def match_prepared(public: PublicContext, block_cts: Sequence[SealObject],
                   query_cts: Sequence[SealObject]) -> bytes:
    """Server: a prepared block x a prepared query -> serialised result ciphertext."""
    return _wrap(public, KIND_RESULT, 0, _save_bytes(_match_prepared(public, block_cts, query_cts)))


class PreparedGallery:
    """Server-side cache of a family's deserialised gallery blocks.

    ``blocks`` is a list of stored blocks (each a list of ``cts_per_block`` bytes).
    ``set_block(i, block)`` replaces/appends block i after an ``add_into_block``.
    """

    def __init__(self, public: PublicContext, blocks: Sequence[Sequence[bytes]] = ()) -> None:
        if not isinstance(public, PublicContext):
            raise ValueError("PreparedGallery needs a PublicContext")
        self.public = public
        self._blocks = [prepare_block(public, b) for b in blocks]

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def capacity(self) -> int:
        return len(self._blocks) * self.public.layout.entries_per_block

    def block(self, index: int) -> list[SealObject]:
        """The prepared (deserialised) ciphertexts of block ``index``."""
        return self._blocks[index]

    def set_block(self, index: int, block: Sequence[bytes]) -> None:
        if not 0 <= index <= len(self._blocks):
            raise ValueError(f"block index {index} out of range 0..{len(self._blocks)}")
        prepared = prepare_block(self.public, block)
        if index == len(self._blocks):
            self._blocks.append(prepared)
        else:
            self._blocks[index] = prepared

    def match(self, query: Sequence[bytes]) -> list[bytes]:
        """One query face against every block: one result ciphertext per block."""
        q = prepare_query(self.public, query)
        return [
            _wrap(self.public, KIND_RESULT, 0, _save_bytes(_match_prepared(self.public, b, q)))
            for b in self._blocks
        ]

    def match_many(self, queries: Sequence[Sequence[bytes]]) -> list[list[bytes]]:
        """Several query faces (e.g. all faces of one photo): results[face][block]."""
        return [self.match(q) for q in queries]
