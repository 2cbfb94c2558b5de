"""What the server-side CKKS checks refuse: forged scales, insecure parameters inside a
context whose header looks fine, scales that cannot fit the modulus."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tenseal as ts
from tenseal import sealapi

from common import ckks

EMBEDDING = np.full(ckks.DIM, 0.05)


@pytest.fixture(scope="module")
def secret() -> ckks.SecretContext:
    return ckks.create_secret_context()


@pytest.fixture(scope="module")
def public(secret: ckks.SecretContext) -> ckks.PublicContext:
    return ckks.load_public_context(ckks.public_context_bytes(secret))


def with_scale(secret: ckks.SecretContext, wire: bytes, kind: int, index: int,
               scale: float) -> bytes:
    """``wire`` re-serialised with its SEAL scale set to ``scale`` and a valid header and
    digest: what a client that writes its own ciphertexts can send."""
    ct = ckks._unwrap(secret, wire, kind, index)
    ct.scale = scale
    return ckks._wrap(secret, kind, index, ckks._save_bytes(ct))


@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, -(2.0**27), 2.0**28])
def test_forged_query_scales_are_refused(secret, public, scale: float) -> None:
    query = ckks.encrypt_query(secret, EMBEDDING)
    query[3] = with_scale(secret, query[3], ckks.KIND_QUERY, 3, scale)
    with pytest.raises(ValueError, match="scale"):
        ckks.prepare_query(public, query)


@pytest.mark.parametrize("scale", [math.nan, math.inf])
def test_forged_gallery_scales_are_refused_before_anything_is_kept(secret, public,
                                                                  scale: float) -> None:
    entries = ckks.encrypt_entries(secret, EMBEDDING[None, :], 0)
    entries[0] = with_scale(secret, entries[0], ckks.KIND_GALLERY, 0, scale)
    with pytest.raises(ValueError, match="scale"):
        ckks.add_into_block(public, None, entries)  # a new block: bytes kept as they are
    with pytest.raises(ValueError, match="scale"):
        ckks.prepare_block(public, entries)


def test_a_nan_scale_result_is_refused_on_the_phone(secret, public) -> None:
    block = ckks.add_into_block(public, None, ckks.encrypt_entries(secret, EMBEDDING[None], 0))
    result = ckks.match_block(public, block, ckks.encrypt_query(secret, EMBEDDING))
    forged = with_scale(secret, result, ckks.KIND_RESULT, 0, math.nan)
    with pytest.raises(ValueError, match="scale"):
        ckks.decrypt_distances(secret, forged, 1)


def public_bytes_of_raw_context(context: ts.Context, log2k: int = 4,
                                scale_bits: int = 27) -> bytes:
    """A public context in our wire format built straight from a TenSEAL context (no
    SecretContext, whose own checks would refuse insecure parameters first): header, SEAL
    parameters, relinearisation key and the rotation keys of k = 2^log2k."""
    seal = context.seal_context().data
    n = seal.key_context_data().parms().poly_modulus_degree()
    public = context.copy()
    public.make_context_public()
    params = public.serialize(save_public_key=False, save_secret_key=False,
                              save_galois_keys=False, save_relin_keys=False)
    keygen = sealapi.KeyGenerator(seal, context.secret_key().data)
    relin = ckks._save_bytes(keygen.create_relin_keys())
    galois = ckks._save_bytes(keygen.create_galois_keys(
        [ckks._galois_elt(1 << i, n) for i in range(log2k)]))
    header = ckks._CTX_HEADER.pack(ckks._CTX_MAGIC, ckks._CTX_VERSION, ckks._CTX_PUBLIC,
                                   log2k, scale_bits, b"key-id-8")
    return ckks._pack_sections(header, [params, relin, galois])


def test_raw_builder_makes_a_loadable_context() -> None:
    """The builder itself is sound: default parameters load (so the refusals below are
    about the parameters, not the builder)."""
    context = ts.Context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096,
                         coeff_mod_bit_sizes=[60, 49])
    public = ckks.load_public_context(public_bytes_of_raw_context(context))
    assert public.coeff_mod_bit_sizes == (60, 49) and public.is_public()


def test_loaded_context_with_insecure_parameters_is_refused() -> None:
    """SEAL accepts a 17-bit prime (and TenSEAL builds the context), but it is outside the
    20..60-bit primes check_security allows: the header says nothing about the primes, so
    only the re-check of the parameters SEAL actually loaded can refuse it."""
    context = ts.Context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=4096,
                         coeff_mod_bit_sizes=[60, 17])
    data = public_bytes_of_raw_context(context)
    with pytest.raises(ValueError, match=r"20\.\.60 bits"):
        ckks.load_public_context(data)


@pytest.mark.parametrize("scale_bits", [0, 28, 60, 255])
def test_context_header_scale_must_fit_the_modulus(secret, scale_bits: int) -> None:
    """The scale travels in the header; one whose square overflows the 60-bit data prime
    would make SEAL throw inside every match (2^27 is the largest with its margin)."""
    data = bytearray(ckks.public_context_bytes(secret))
    assert data[9] == secret.scale_bits  # magic 6, version, kind, log2 k, then scale bits
    data[9] = scale_bits
    with pytest.raises(ValueError, match="scale"):
        ckks.load_public_context(bytes(data))


def _as_kind(secret: ckks.SecretContext, wire: list[bytes], kind: int) -> list[bytes]:
    """The same SEAL ciphertexts under another kind's header."""
    return [ckks._wrap(secret, kind, c, x[ckks._HEADER.size:]) for c, x in enumerate(wire)]


def test_a_query_equal_to_the_stored_block_is_a_value_error(secret, public) -> None:
    """The phone gets its stored block back (GetGalleryBlock): sent back as a query, every
    difference is exactly zero and SEAL throws (a transparent ciphertext), which must
    surface as ValueError, not as SEAL's RuntimeError."""
    block = ckks.add_into_block(public, None, ckks.encrypt_entries(secret, EMBEDDING[None], 0))
    query = ckks.prepare_query(public, _as_kind(secret, block, ckks.KIND_QUERY))
    with pytest.raises(ValueError, match="transparent"):
        ckks.match_prepared(public, ckks.prepare_block(public, block), query)
    with pytest.raises(ValueError, match="transparent"):
        ckks.match_block(public, block, query)


def test_adding_the_negated_block_is_a_value_error(secret, public) -> None:
    block = ckks.add_into_block(public, None, ckks.encrypt_entries(secret, EMBEDDING[None], 0))
    negated = []
    for c, ct in enumerate(ckks.prepare_block(public, block)):
        out = sealapi.Ciphertext()
        secret._evaluator.negate(ct, out)
        negated.append(ckks._wrap(secret, ckks.KIND_GALLERY, c, ckks._save_bytes(out)))
    with pytest.raises(ValueError, match="transparent"):
        ckks.add_into_block(public, block, negated)
