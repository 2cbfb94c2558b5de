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


# --------------------------------------------------------------------------- boundaries


def test_prime_sizes_of_exactly_20_and_60_bits_are_allowed() -> None:
    assert ckks.check_security(4096, [20, 20]) == 40
    assert ckks.check_security(4096, [60, 49]) == 109  # exactly the 128-bit bound
    for sizes in ([19, 40], [61, 40], [60]):
        with pytest.raises(ValueError):
            ckks.check_security(4096, sizes)


def test_scale_headroom_with_two_primes() -> None:
    """No rescale (one data prime): the squared scale plus 6 bits must fit it."""
    assert ckks.CKKSParams(4096, (60, 49), 1).scale_bits == 1
    assert ckks.CKKSParams(4096, (60, 49), 27).scale_bits == 27
    for scale_bits in (0, 28):
        with pytest.raises(ValueError, match="scale"):
            ckks.CKKSParams(4096, (60, 49), scale_bits)


def test_scale_headroom_with_a_rescaling_chain() -> None:
    """Three data primes (60, 40, 30) and a special prime: after the rescale by the last
    data prime (30 bits), 2s - 30 + 6 bits must fit the other data primes (100 bits), so
    s = 62 is the largest scale allowed."""
    params = ckks.CKKSParams(8192, (60, 40, 30, 60), 62)
    assert params.rescale and params.scale_bits == 62
    with pytest.raises(ValueError, match="headroom"):
        ckks.CKKSParams(8192, (60, 40, 30, 60), 63)


def test_gallery_layout_bounds() -> None:
    for k, slots in ((1, 2048), (1, 1), (128, 2048), (16, 16)):
        layout = ckks.GalleryLayout(k=k, slots=slots)
        assert (layout.k, layout.slots) == (k, slots)
    for k, slots in ((0, 2048), (3, 2048), (256, 2048), (16, 8), (16, 3000)):
        with pytest.raises(ValueError):
            ckks.GalleryLayout(k=k, slots=slots)


def test_a_public_context_needs_both_key_sets(secret, public) -> None:
    for relin, galois in ((public.relin_keys, None), (None, public.galois_keys)):
        with pytest.raises(ValueError, match="relinearisation and rotation keys"):
            ckks.PublicContext(public.context, public.layout, public.key_id,
                               public.scale_bits, relin_keys=relin, galois_keys=galois)


@pytest.mark.parametrize("k", [1, 8])
def test_contexts_of_other_sizes_round_trip_with_their_layout(k: int) -> None:
    """k = 1 (no rotation keys at all) and N = 8192 (4096 slots): what the header and the
    parameters say is what the loaded contexts use."""
    secret = ckks.create_secret_context(ckks.CKKSParams(8192, (60, 49), 27), k=k)
    data = ckks.public_context_bytes(secret)
    public = ckks.load_public_context(data)
    again = ckks.load_secret_context(ckks.secret_context_bytes(secret))
    for ctx in (public, again):
        assert (ctx.layout.k, ctx.layout.slots, ctx.key_id) == (k, 4096, secret.key_id)
    assert ckks.context_key_id(data) == secret.key_id
    assert ckks.context_key_id(data[:ckks._CTX_HEADER.size]) == secret.key_id
    embeddings = np.zeros((2, ckks.DIM))
    embeddings[1, 0] = 1.0
    block = ckks.add_into_block(public, None, ckks.encrypt_entries(secret, embeddings, 0))
    result = ckks.match_block(public, block, ckks.encrypt_query(secret, embeddings[0]))
    squared = ckks.decrypt_squared_distances(secret, result, 2)
    assert squared == pytest.approx([0.0, 1.0], abs=1e-4)


def test_context_headers_shorter_than_the_header_are_refused(public_bytes) -> None:
    for cut in (0, 7, ckks._CTX_HEADER.size - 1):
        with pytest.raises(ValueError, match="bad magic"):
            ckks.context_key_id(public_bytes[:cut])


@pytest.fixture(scope="module")
def public_bytes(secret: ckks.SecretContext) -> bytes:
    return ckks.public_context_bytes(secret)


def test_section_framing() -> None:
    packed = ckks._pack_sections(b"H", [b"abc", b""])
    assert ckks._unpack_sections(packed, 1, 2) == [b"abc", b""]
    for bad in (packed[:-1], packed[:3]):
        with pytest.raises(ValueError, match="truncated"):
            ckks._unpack_sections(bad, 1, 2)
    with pytest.raises(ValueError, match="truncated"):  # a length past the end
        ckks._unpack_sections(b"H" + b"\xff\xff\xff\xff" + b"abc", 1, 1)
    with pytest.raises(ValueError, match="trailing"):
        ckks._unpack_sections(packed + b"x", 1, 2)


def test_ciphertext_headers_are_checked_field_by_field(secret, public) -> None:
    query = ckks.encrypt_query(secret, EMBEDDING)
    wire = query[0]
    bad_version = wire[:4] + bytes([wire[4] + 1]) + wire[5:]
    with pytest.raises(ValueError, match="bad magic/version"):
        ckks.prepare_query(public, [bad_version, *query[1:]])
    with pytest.raises(ValueError, match="too short"):
        ckks.prepare_query(public, [wire[:ckks._HEADER.size], *query[1:]])


def test_no_distances_can_be_asked_of_a_result(secret, public) -> None:
    block = ckks.add_into_block(public, None, ckks.encrypt_entries(secret, EMBEDDING[None], 0))
    result = ckks.match_block(public, block, ckks.encrypt_query(secret, EMBEDDING))
    assert ckks.decrypt_distances(secret, result, 0).shape == (0,)


def test_embedding_batches_and_norms_at_the_bounds(secret) -> None:
    with pytest.raises(ValueError, match="no embeddings"):
        ckks.encrypt_entries(secret, np.zeros((0, ckks.DIM)), 0)
    on_bound = np.zeros(ckks.DIM)
    on_bound[0] = ckks.MAX_NORM
    assert len(ckks.encrypt_query(secret, on_bound)) == secret.layout.cts_per_block


def test_nearest_and_assign_skip_dead_entries_and_keep_the_first_tie() -> None:
    slot, distance = ckks.nearest([0.1, 0.2, 0.2], [None, 5, 6])
    assert slot == 5 and distance == pytest.approx(0.2)
    assert ckks.nearest([0.3, 0.3], [1, 2])[0] == 1
    assert ckks.assign([ckks.TOLERANCE], [3]) == 3  # "within" the tolerance includes it


def test_a_rescaling_chain_matches_and_drops_a_prime_from_the_result() -> None:
    """Two data primes (60, 40) and a special prime: the server rescales after the
    multiplication, so the result holds one prime fewer than the query (a smaller
    download), and the distances still decrypt right."""
    params = ckks.CKKSParams(8192, (60, 40, 60), 40)
    assert params.rescale
    secret = ckks.create_secret_context(params)
    public = ckks.load_public_context(ckks.public_context_bytes(secret))
    embeddings = np.zeros((2, ckks.DIM))
    embeddings[1, 0] = 1.0
    block = ckks.add_into_block(public, None, ckks.encrypt_entries(secret, embeddings, 0))
    query = ckks.encrypt_query(secret, embeddings[0])
    result = ckks.match_block(public, block, query)
    squared = ckks.decrypt_squared_distances(secret, result, 2)
    assert squared == pytest.approx([0.0, 1.0], abs=1e-4)
    fresh = ckks.prepare_query(public, query)[0]
    assert ckks._unwrap(secret, result, ckks.KIND_RESULT, None).coeff_modulus_size() == (
        fresh.coeff_modulus_size() - 1)
