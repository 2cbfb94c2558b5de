"""Property-based fuzzing of every RPC: the family the fuzzer aims at, the strategies that
build malformed calls, and the recorder of what came back (tests/server/test_fuzz.py runs
them; bench/fuzz_run.py runs the long profile and writes the figures).

Every call goes over the wire as raw bytes (``channel.stream_stream`` with identity
serializers, whatever the method's cardinality), so a case can be anything a client could
send: a valid call, a valid call with a few fields or stream messages mutated, a message
built at random from the request's descriptor, or bytes that are not protobuf at all.

Baselines aim at real data of family A (photos, gallery, detectors) and are framed
correctly where the server checks framing first (an upload's announced size and SHA-256,
a CKKS ciphertext's header and checksum), so that mutated *content* reaches the parsers
behind those checks (SEAL, numpy, the cascade evaluator). Calls that may legitimately
destroy what the final check verifies are aimed elsewhere (see World): gallery and key
rewrites at family C, DeleteFamily at family D, DeletePhoto at expendable photos,
PutSealedItem at an expendable item.

What is drawn never depends on sizes that vary between runs (``pick``): hypothesis must be
able to replay a case to shrink it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

from client.config import ClientConfig
from client.keystore import FamilyBundle
from client.pipeline import faces
from client.pipeline import photos as pipeline
from client.pipeline.family import create_family
from client.rpc import PrivfaceClient
from common import ckks, labels, photo_crypto
from common.errors import AuthenticationError
from privface.v1 import detection_pb2, faces_pb2, family_pb2, photos_pb2

Draw = Callable[[st.SearchStrategy[Any]], Any]

# -- every RPC, from the descriptors ------------------------------------------------------

PROTO_MODULES = (family_pb2, photos_pb2, faces_pb2, detection_pb2)
METHODS: dict[str, MethodDescriptor] = {
    f"{service.full_name}/{method.name}": method
    for module in PROTO_MODULES for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods}
VENDOR_RPCS = {"privface.v1.DetectorService/PublishDetector"}
PUBLIC_RPCS = {"privface.v1.FamilyService/RegisterFamily",
               "privface.v1.FamilyService/JoinFamily",
               "privface.v1.DetectorService/ListDetectors"}

# Statuses that mean a server bug, never a bad input.
SERVER_BUGS = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)

KEEPER_EMBEDDING = np.full((1, ckks.DIM), 0.05)
OTHER_EMBEDDING = np.full((1, ckks.DIM), -0.04)
KEEPER_ITEM = ("keeper-item", b"sealed bytes the fuzzer must not change")
FUZZ_ITEM = "fuzz-item"
KEEPER_DETECTORS = ("tiny", "tinyprefix")
FUZZ_DETECTOR = "fuzzdet"


# -- the world the fuzzer aims at ---------------------------------------------------------


def tiny_detector(detector_id: str, prefix: bool = False, seed: int = 3
                  ) -> tuple[detection_pb2.DetectorHeader, bytes]:
    """Two stages of one weak classifier each over 4-value ciphertexts (with a prefix
    round of 3 values for the first stage if ``prefix``)."""
    stages = [detection_pb2.CascadeStage(weak_count=1, threshold=0.5, left_values=[0.0],
                                         right_values=[1.0]) for _ in range(2)]
    rng = np.random.default_rng(seed)
    full = rng.standard_normal(2 * 4).tobytes()
    extra = rng.standard_normal(3).tobytes() if prefix else b""
    matrix = full + extra
    return detection_pb2.DetectorHeader(
        detector_id=detector_id, key_version=1, key_fingerprint=bytes([seed]) * 16,
        window_width=20, window_height=20, ciphertext_dim=4, stages=stages,
        matrix_size=len(matrix), matrix_sha256=hashlib.sha256(matrix).digest(),
        prefix_stages=1 if prefix else 0, prefix_ciphertext_dim=3 if prefix else 0,
        prefix_matrix_size=len(extra)), matrix


def png(seed: int, size: tuple[int, int] = (24, 32)) -> bytes:
    """A small random PNG (a decodable photo for the client pipeline)."""
    ok, data = cv2.imencode(".png", np.random.default_rng(seed).integers(
        0, 255, (*size, 3), dtype=np.uint8))
    assert ok
    return bytes(data.tobytes())


def probe_batch(prefix: bool = False) -> detection_pb2.WindowBatch:
    """A fixed batch of 8 float64 windows (prefix windows if ``prefix``), for comparing a
    detector's answers over time."""
    dim = 3 if prefix else 4
    kind = detection_pb2.WINDOW_KIND_PREFIX if prefix else detection_pb2.WINDOW_KIND_FULL
    windows = np.random.default_rng(11).standard_normal((8, dim))
    return detection_pb2.WindowBatch(batch_id=1, count=8, windows=windows.tobytes(),
                                     encoding=detection_pb2.WINDOW_ENCODING_FLOAT64, kind=kind)


@dataclass
class Family:
    """One registered family as its phone holds it."""

    client: PrivfaceClient
    bundle: FamilyBundle
    secret: ckks.SecretContext | None = None
    entries_cache: dict[int, list[bytes]] = field(default_factory=dict)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The family's credentials."""
        return self.client.metadata()

    def ckks(self) -> ckks.SecretContext:
        """The family's CKKS secret context (it must have one)."""
        assert self.secret is not None
        return self.secret

    def entries_at(self, position: int) -> list[bytes]:
        """Ciphertexts of OTHER_EMBEDDING at ``position`` of a block (cached)."""
        if position not in self.entries_cache:
            self.entries_cache[position] = ckks.encrypt_entries(self.ckks(), OTHER_EMBEDDING,
                                                                position)
        return self.entries_cache[position]


def make_family(address: str, config: ClientConfig, photos: int, gallery: bool,
                seed: int) -> Family:
    """A registered family with members Mum, Tom, Dad, Gran, ``photos`` photos of Mum, and
    (``gallery``) CKKS keys and two gallery entries (slots 0 and 3)."""
    client = PrivfaceClient(address, config=config)
    bundle = create_family(client)
    for name in ("Mum", "Tom", "Dad", "Gran"):
        bundle.add_member(name)
    for i in range(photos):
        pipeline.backup_photo(client, bundle, png(seed + i), [0])
    family = Family(client, bundle)
    if gallery:
        faces.ensure_ckks_keys(client, bundle)
        family.secret = faces.secret_context(bundle)
        client.add_gallery_entries(0, 0, 0, 1, ckks.encrypt_entries(family.secret,
                                                                    KEEPER_EMBEDDING, 0))
        client.add_gallery_entries(3, 0, 1, 1, ckks.encrypt_entries(family.secret,
                                                                    OTHER_EMBEDDING, 1))
    return family


@dataclass
class World:
    """What the fuzzer aims at.

    * Family A holds real data the final check verifies (keeper photos of Mum, a gallery,
      a sealed item, a second device); every RPC that cannot legitimately destroy that
      data is aimed at A.
    * Family C (photos, CKKS keys, a gallery) takes the calls that rewrite a gallery or the
      keys: a mutated ciphertext that SEAL still loads is indistinguishable from a real one
      and may legitimately be stored, so these must not be aimed at A's checked gallery.
    * Family D is deleted by the DeleteFamily cases that succeed and registered again.
    * Family B is another family on the server: its ids are among the interesting values
      and its photo must survive.
    Plus the published detectors and pools of interesting strings and bytes."""

    address: str
    config: ClientConfig
    vendor_token: str
    a: Family
    b: Family
    c: Family
    d: Family
    keepers: dict[str, bytes]  # A's photo id -> plaintext, labelled slot 0; never deleted
    expendable: list[str]  # A's photo ids DeletePhoto may aim at
    second_device: str
    b_photo: tuple[str, bytes]
    detectors: dict[str, tuple[detection_pb2.DetectorHeader, bytes]]
    probes: dict[str, bytes]  # keeper detector id -> outcomes of its probe batch
    query: list[bytes]  # A's keeper embedding as a query (MatchFaces)
    c_query: list[bytes]  # the same for family C
    c_public_context: bytes
    c_replacement: list[bytes]  # a block of C with the keeper embedding at position 0
    invites: list[str]
    strings: list[str] = field(default_factory=list)
    blobs: list[bytes] = field(default_factory=list)
    d_generation: int = 0

    @property
    def bundle(self) -> FamilyBundle:
        """Family A's bundle."""
        return self.a.bundle

    @property
    def client(self) -> PrivfaceClient:
        """Family A's phone."""
        return self.a.client

    def fresh_d(self) -> Family:
        """Family D, registered again if a DeleteFamily case deleted it."""
        try:
            self.d.client.get_family()
        except AuthenticationError:
            self.d.client.close()
            self.d_generation += 1
            self.d = make_family(self.address, self.config, 1, False, 900 + self.d_generation)
        return self.d


def _with_scale(secret: ckks.SecretContext, wire: bytes, kind: int, index: int,
                scale: float) -> bytes:
    ct = ckks._unwrap(secret, wire, kind, index)
    ct.scale = scale
    return ckks._wrap(secret, kind, index, ckks._save_bytes(ct))


def detect_outcomes(client: PrivfaceClient, header: detection_pb2.DetectorHeader,
                    batch: detection_pb2.WindowBatch) -> bytes:
    """The outcome bytes of one batch on a published detector."""
    def requests() -> Any:
        yield detection_pb2.DetectFacesRequest(session=detection_pb2.DetectionSession(
            detector_id=header.detector_id, key_version=header.key_version,
            key_fingerprint=header.key_fingerprint))
        yield detection_pb2.DetectFacesRequest(batch=batch)
    replies = list(client.detector.DetectFaces(requests(), metadata=client.metadata(),
                                               timeout=60))
    return b"".join(r.outcomes for r in replies)


def build_world(address: str, config: ClientConfig, vendor_token: str) -> World:
    """Registers and fills the families, publishes the detectors, fills the pools."""
    a = make_family(address, config, 0, True, 0)
    client, bundle = a.client, a.bundle
    keepers = {}
    for i in range(3):
        data = png(100 + i)
        keepers[pipeline.backup_photo(client, bundle, data, [0]).photo_id] = data
    expendable = [pipeline.backup_photo(client, bundle, png(200 + i), [1]).photo_id
                  for i in range(4)]
    client.put_sealed_item(KEEPER_ITEM[0], 0, KEEPER_ITEM[1])
    invite, _ = client.create_device_invite()
    second = secrets.token_hex(16)
    with PrivfaceClient(address, config=config) as phone:
        phone.join_family(bundle.family_id, invite, second, b"sealed name")
    invites = [client.create_device_invite()[0] for _ in range(8)]

    b = make_family(address, config, 0, False, 0)
    b_data = png(300)
    b_photo = pipeline.backup_photo(b.client, b.bundle, b_data, [0]).photo_id
    c = make_family(address, config, 3, True, 400)
    d = make_family(address, config, 1, False, 900)

    detectors = {"tiny": tiny_detector("tiny"),
                 "tinyprefix": tiny_detector("tinyprefix", prefix=True, seed=4),
                 FUZZ_DETECTOR: tiny_detector(FUZZ_DETECTOR, seed=5)}
    for header, matrix in detectors.values():
        client.publish_detector(header, matrix, vendor_token)
    probes = {"tiny": detect_outcomes(client, detectors["tiny"][0], probe_batch()),
              "tinyprefix": detect_outcomes(client, detectors["tinyprefix"][0],
                                            probe_batch(prefix=True))}

    secret = a.ckks()
    query = ckks.encrypt_query(secret, KEEPER_EMBEDDING[0])
    c_replacement = ckks.encrypt_entries(c.ckks(), KEEPER_EMBEDDING, 0)
    other_secret = ckks.create_secret_context()
    block, _ = client.gallery_block(0)
    blobs = [
        # CKKS ciphertexts of the wrong kind, key, scale or content (headers valid)
        block[0], query[0], c_replacement[1], ckks.encrypt_query(c.ckks(), OTHER_EMBEDDING[0])[0],
        ckks.encrypt_query(other_secret, KEEPER_EMBEDDING[0])[0],
        ckks.encrypt_entries(other_secret, KEEPER_EMBEDDING, 0)[0],
        _with_scale(secret, query[0], ckks.KIND_QUERY, 0, math.nan),
        _with_scale(secret, query[0], ckks.KIND_QUERY, 0, math.inf),
        _with_scale(secret, query[0], ckks.KIND_QUERY, 0, -1.0),
        _with_scale(c.ckks(), c_replacement[0], ckks.KIND_GALLERY, 0, 2.0**40),
        _with_scale(c.ckks(), c_replacement[0], ckks.KIND_GALLERY, 0, math.nan),
        ckks._wrap(secret, ckks.KIND_QUERY, 0, block[0][ckks._HEADER.size:]),
        # label vectors and queries of the family, another family, another length
        pipeline.encrypt_labels(bundle, [0, 1]),
        pipeline.encrypt_query(bundle, [0], labels.MatchMode.ANY),
        pipeline.encrypt_labels(b.bundle, [0]),
        np.full(bundle.label_key.cipher_dim, np.nan).tobytes(),
        np.full(bundle.label_key.cipher_dim, 1e308).tobytes(),
        # fingerprints, digests, photo blobs of others, contexts
        bundle.label_key.fingerprint(), b.bundle.label_key.fingerprint(), bytes(16),
        bytes(32), hashlib.sha256(b"").digest(),
        b.client.fetch_photo(b_photo), client.fetch_photo(next(iter(keepers))),
        ckks.public_context_bytes(other_secret), ckks.secret_context_bytes(other_secret),
        ckks.public_context_bytes(secret),
        detectors["tiny"][0].key_fingerprint, detectors["tiny"][1],
    ]
    keeper = next(iter(keepers))
    # (A's keeper photo ids are left out: a DeletePhoto mutated to one would rightly delete
    # it. FetchPhoto and BackupPhoto aim at them on purpose.)
    strings = [
        *expendable, b_photo, bundle.family_id, b.bundle.family_id,
        bundle.device_id, second, secrets.token_hex(16), "0" * 32, "f" * 32,
        "fam_" + "0" * 24, "fam_" + secrets.token_hex(12), keeper.upper(), keeper + "\n",
        keeper[:31], keeper + "0", "../" + keeper, "%s%n", "' OR 1=1 --", "roster",
        FUZZ_ITEM, "device-" + second, FUZZ_DETECTOR, "../tiny", "tiny\n", "", " ", "\x00",
        "\u202e\u0000\r\n", "\U0001f600" * 3, "a" * 65, "x" * 10_000, invites[-1],
        "Bearer x",
    ]
    return World(address, config, vendor_token, a, b, c, d, keepers, expendable, second,
                 (b_photo, b_data), detectors, probes, query,
                 ckks.encrypt_query(c.ckks(), KEEPER_EMBEDDING[0]),
                 ckks.public_context_bytes(c.ckks()),
                 c_replacement, invites, strings, blobs)


# -- values ----------------------------------------------------------------------------------

_SIGNED32 = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32,
             FieldDescriptor.TYPE_SFIXED32, FieldDescriptor.TYPE_ENUM}
_SIGNED64 = {FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64,
             FieldDescriptor.TYPE_SFIXED64}
_UNSIGNED32 = {FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32}
_UNSIGNED64 = {FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64}
SPECIAL_FLOATS = [math.nan, -math.nan, math.inf, -math.inf, -0.0, 0.0, 1e308, -1e308,
                  5e-324, 1.0, -1.0, 0.5, 2.0**63, 1e-300]
SPECIAL_INTS = [0, 1, 2, 3, 7, 8, 16, 64, 127, 128, 255, 256, 1023, 1024, 1025, 16_384,
                16_385, 65_535, 1_000_000, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**53,
                2**63 - 1, 2**63, 2**64 - 1, -1, -2, -(2**31), -(2**63)]


def int_bounds(f: FieldDescriptor) -> tuple[int, int]:
    """The range a protobuf integer field can hold."""
    if f.type in _SIGNED32:
        return -(2**31), 2**31 - 1
    if f.type in _SIGNED64:
        return -(2**63), 2**63 - 1
    if f.type in _UNSIGNED32:
        return 0, 2**32 - 1
    return 0, 2**64 - 1


def int_values(f: FieldDescriptor) -> st.SearchStrategy[int]:
    """Boundary and random values of an integer (or enum: undefined values too) field."""
    lo, hi = int_bounds(f)
    specials = [v for v in SPECIAL_INTS if lo <= v <= hi]
    options = [st.sampled_from(specials), st.integers(lo, hi), st.integers(0, 300)]
    if f.enum_type is not None:
        options.append(st.sampled_from([v.number for v in f.enum_type.values]))
    return st.one_of(*options)


def float_values(f: FieldDescriptor) -> st.SearchStrategy[float]:
    """NaN, infinities, signed zero, extremes and random values."""
    if f.type == FieldDescriptor.TYPE_FLOAT:
        return st.one_of(st.sampled_from(SPECIAL_FLOATS),
                         st.floats(allow_nan=True, allow_infinity=True, width=32))
    return st.one_of(st.sampled_from(SPECIAL_FLOATS),
                     st.floats(allow_nan=True, allow_infinity=True))


def sized_bytes(draw: Draw) -> bytes:
    """Zeros or pseudo-random bytes of a size from tiny to over the server's 32 MiB message
    limit (the large sizes drawn rarely)."""
    if draw(st.integers(0, 9)):
        size = draw(st.integers(0, 4096))
    elif draw(st.integers(0, 9)):
        size = draw(st.sampled_from([65_536, 1 << 20, (1 << 20) + 1, 4 << 20]))
    else:
        size = 33 << 20  # over the server's message limit: gRPC refuses it
    if draw(st.booleans()):
        return bytes(size)
    return random.Random(draw(st.integers(0, 2**32))).randbytes(size)


def string_values(world: World) -> st.SearchStrategy[str]:
    """Ids of this and other families, malformed ids, control characters, long strings."""
    return st.one_of(st.sampled_from(world.strings),
                     st.text(st.characters(codec="utf-8"), max_size=40),
                     st.text("0123456789abcdef", min_size=30, max_size=34))


def pick(draw: Draw, n: int) -> int:
    """An index below ``n`` (0 when ``n`` is 0), drawn from a fixed range: what is drawn
    must not depend on sizes that vary between runs (ciphertext lengths, the world's
    lists), or hypothesis cannot replay and shrink a case."""
    index = int(draw(st.integers(0, 2**20)))
    return index % n if n else 0


def string_variant(draw: Draw, world: World, current: str) -> str:
    """``current`` slightly wrong, or another interesting string."""
    op = draw(st.sampled_from(["other", "other", "newline", "upper", "shorter", "longer",
                               "nul", "unicode", "repeat"]))
    if op == "newline":
        return current + "\n"
    if op == "upper":
        return current.upper() if current.upper() != current else current + "A"
    if op == "shorter":
        return current[:-1]
    if op == "longer":
        return current + draw(st.sampled_from(["0", "g", " ", "é"]))
    if op == "nul":
        return "\x00" + current
    if op == "unicode":
        return current + draw(st.text(st.characters(codec="utf-8"), min_size=1, max_size=4))
    if op == "repeat":
        return current * draw(st.integers(2, 400))
    return str(draw(string_values(world)))


def bytes_values(world: World) -> st.SearchStrategy[bytes]:
    """Interesting byte strings: other ciphertexts, digests, label vectors, garbage."""
    return st.one_of(st.sampled_from(world.blobs), st.binary(max_size=96),
                     st.builds(bytes, st.integers(0, 64)))


def poke_floats(draw: Draw, data: bytes) -> bytes:
    """One float64 (or float32, or float16) inside ``data`` set to NaN, an infinity or an
    extreme value: the length stays a multiple of the element size."""
    dtype = draw(st.sampled_from(["<f8", "<f4", "<f2"]))
    index = draw(st.integers(0, 2**20))
    value = draw(st.sampled_from([math.nan, math.inf, -math.inf, 1e308, -1e308, 5e-324, 0.0,
                                  65504.0]))
    width = np.dtype(dtype).itemsize
    usable = len(data) - len(data) % width
    if usable == 0:
        return data
    arr = np.frombuffer(data[:usable], dtype).copy()
    with np.errstate(over="ignore"):  # 1e308 as float32 is an infinity: as meant
        arr[index % len(arr)] = value
    return arr.tobytes() + data[usable:]


def rewrap_ckks(draw: Draw, data: bytes) -> bytes:
    """A privface CKKS wire ciphertext whose SEAL body (or a header field) is changed and
    whose header checksum is made valid again, so the change reaches SEAL's loader; a
    privface CKKS context with one header field changed (the key id kept: a context that
    claims the family's key with another layout, scale, kind or version). Bytes that are
    neither get a bit flipped instead."""
    body_change = draw(st.booleans())
    header_change = draw(st.integers(0, 4))
    delta = draw(st.sampled_from([-1, 1, 2, -7, 13, 128]))
    if len(data) > ckks._CTX_HEADER.size and data.startswith(ckks._CTX_MAGIC):
        # magic, version, kind, log2 k, scale bits, key id: change log2 k, scale, kind or version
        fields = list(ckks._CTX_HEADER.unpack_from(data))
        index = [3, 4, 2, 1][header_change % 4]
        fields[index] = (fields[index] + delta) % 256
        return ckks._CTX_HEADER.pack(*fields) + data[ckks._CTX_HEADER.size:]
    size = ckks._HEADER.size
    if len(data) <= size or not data.startswith(ckks._WIRE_MAGIC):
        return bytes_variant(draw, None, data, op="flip")
    magic, version, kind, log2k, index, key_id, _ = ckks._HEADER.unpack_from(data)
    body = data[size:]
    if body_change:
        body = bytes_variant(draw, None, body)
    else:
        version, kind, index, log2k = [
            (version, 3 - kind, index, log2k), (version, kind, index + 1, log2k),
            (version, kind, index, log2k + 1), (version + 1, kind, index, log2k),
            (version, 9, 255, 0)][header_change]
    digest = hashlib.blake2b(body, digest_size=16).digest()
    return ckks._HEADER.pack(magic, version % 256, kind % 256, log2k % 256, index % 256,
                             key_id, digest) + body


BYTES_OPS = ["ckks", "truncate", "flip", "floats", "pool", "ckks", "extend", "overwrite",
             "empty", "garbage", "big", "repeat", "pool", "ckks"]


def bytes_variant(draw: Draw, world: World | None, current: bytes, op: str = "") -> bytes:
    """``current`` truncated, extended, bit-flipped, overwritten, with a NaN inside,
    re-checksummed (CKKS), or replaced by an interesting value, garbage or a huge blob.
    (Without a ``world``, "pool" and "ckks" become flips: no recursion, no pool.)"""
    op = op or draw(st.sampled_from(BYTES_OPS))
    if world is None and op in ("pool", "ckks"):
        op = "flip"
    n = len(current)
    if op == "empty":
        return b""
    if op == "truncate":
        return current[:pick(draw, n)]
    if op == "extend":
        return current + draw(st.binary(min_size=1, max_size=64))
    if op == "flip":
        pos, bit = pick(draw, n), draw(st.integers(0, 7))
        if not n:
            return b"\x00"
        return current[:pos] + bytes([current[pos] ^ (1 << bit)]) + current[pos + 1:]
    if op == "overwrite":
        pos, patch = pick(draw, n), draw(st.binary(min_size=1, max_size=16))
        return current[:pos] + patch + current[pos + len(patch):]
    if op == "floats":
        return poke_floats(draw, current)
    if op == "big":
        return sized_bytes(draw)
    if op == "repeat":
        return current * draw(st.integers(2, 5))
    if op == "pool" and world is not None:
        return bytes(draw(st.sampled_from(world.blobs)))
    if op == "ckks":
        return rewrap_ckks(draw, current)
    return bytes(draw(st.binary(max_size=128)))


def value_variant(draw: Draw, world: World, f: FieldDescriptor, current: Any) -> Any:
    """A wrong value of field ``f`` (scalar), derived from ``current`` or not."""
    if f.type == FieldDescriptor.TYPE_STRING:
        return string_variant(draw, world, current)
    if f.type == FieldDescriptor.TYPE_BYTES:
        return bytes_variant(draw, world, current)
    if f.type == FieldDescriptor.TYPE_BOOL:
        return not current
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return draw(float_values(f))
    lo, hi = int_bounds(f)
    if draw(st.integers(0, 3)):
        return draw(int_values(f))
    near = current + draw(st.sampled_from([1, -1]))
    return near if lo <= near <= hi else lo


def random_value(draw: Draw, world: World, f: FieldDescriptor) -> Any:
    """Any value of scalar field ``f``."""
    if f.type == FieldDescriptor.TYPE_STRING:
        return draw(string_values(world))
    if f.type == FieldDescriptor.TYPE_BYTES:
        return draw(bytes_values(world))
    if f.type == FieldDescriptor.TYPE_BOOL:
        return draw(st.booleans())
    if f.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return draw(float_values(f))
    return draw(int_values(f))


# -- messages --------------------------------------------------------------------------------


def random_message(draw: Draw, world: World, desc: Descriptor, depth: int = 0) -> Message:
    """A message of type ``desc`` with random fields set (nested messages to depth 3, one
    member of each oneof at most)."""
    msg = message_factory.GetMessageClass(desc)()
    for f in desc.fields:
        if f.containing_oneof is not None or not draw(st.booleans()):
            continue
        _set_random(draw, world, msg, f, depth)
    for oneof in desc.oneofs:
        chosen = draw(st.sampled_from([None, *oneof.fields]))
        if chosen is not None:
            _set_random(draw, world, msg, chosen, depth)
    return msg


def _set_random(draw: Draw, world: World, msg: Message, f: FieldDescriptor,
                depth: int) -> None:
    if f.message_type is not None:
        if depth >= 3:
            return
        if f.is_repeated:
            for _ in range(draw(st.integers(0, 3))):
                getattr(msg, f.name).add().CopyFrom(
                    random_message(draw, world, f.message_type, depth + 1))
        else:
            getattr(msg, f.name).CopyFrom(random_message(draw, world, f.message_type,
                                                         depth + 1))
    elif f.is_repeated:
        getattr(msg, f.name).extend(random_value(draw, world, f)
                                    for _ in range(draw(st.integers(0, 5))))
    else:
        setattr(msg, f.name, random_value(draw, world, f))


def mutate_message(draw: Draw, world: World, msg: Message, depth: int = 0) -> str:
    """Changes one field of ``msg`` (in place, possibly nested); a short description."""
    fields = list(msg.DESCRIPTOR.fields)
    if not fields:
        return "no fields"
    f = draw(st.sampled_from(fields))
    # A stream message is a oneof (header or part): mostly change what it carries, not which.
    chosen = [msg.WhichOneof(o.name) for o in msg.DESCRIPTOR.oneofs]
    if draw(st.integers(0, 3)) and any(chosen):
        f = msg.DESCRIPTOR.fields_by_name[next(c for c in chosen if c)]
    if f.is_repeated:
        container = getattr(msg, f.name)
        op = draw(st.sampled_from(["mutate", "drop", "dup", "clear", "append", "mutate"]))
        i = pick(draw, len(container))
        if op == "clear":
            msg.ClearField(f.name)
        elif op == "append" or not container:
            op = "append"
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                container.add().CopyFrom(random_message(draw, world, f.message_type, depth + 1))
            else:
                container.append(random_value(draw, world, f))
        else:
            if op == "drop":
                del container[i]
            elif op == "dup":
                if f.type == FieldDescriptor.TYPE_MESSAGE:
                    container.add().CopyFrom(container[i])
                else:
                    container.append(container[i])
            elif f.type == FieldDescriptor.TYPE_MESSAGE:
                return f"{f.name}[{i}]." + mutate_message(draw, world, container[i], depth + 1)
            else:
                container[i] = value_variant(draw, world, f, container[i])
        return f"{f.name}:{op}"
    if f.type == FieldDescriptor.TYPE_MESSAGE:
        op = draw(st.sampled_from(["clear", "random", "mutate", "mutate"]))
        if op == "clear":
            msg.ClearField(f.name)
        elif op == "random" or depth >= 4:
            getattr(msg, f.name).CopyFrom(random_message(draw, world, f.message_type, depth + 1))
        else:
            return f"{f.name}." + mutate_message(draw, world, getattr(msg, f.name), depth + 1)
        return f"{f.name}:{op}"
    setattr(msg, f.name, value_variant(draw, world, f, getattr(msg, f.name)))
    return f.name


# -- baselines: a near-valid call per RPC (aimed at family A, or C or D: see World) ---------
#
# Each returns the request messages (one for a unary request). Uploads draw their payload
# (as sent, or with its content changed) and frame it correctly: size and SHA-256 match,
# so the change reaches what parses the payload.

Baseline = Callable[[Draw, World], list[Message]]


def _chunks(draw: Draw, data: bytes) -> list[bytes]:
    size = draw(st.sampled_from([len(data) or 1, 1 << 20, 65_536, 4096, 1000, 1]))
    if size == 1 and len(data) > 2000:
        size = 4096  # a stream of one-byte chunks is drawn below, not here
    return [data[i:i + size] for i in range(0, len(data), size)] or [b""]


def _payload(draw: Draw, world: World, data: bytes) -> bytes:
    """The payload as it is, or (half the time) its content changed (framing valid)."""
    if draw(st.booleans()):
        return data
    return bytes_variant(draw, world, data)


def _hex_id(draw: Draw) -> str:
    return bytes(draw(st.binary(min_size=16, max_size=16))).hex()


def b_register(draw: Draw, w: World) -> list[Message]:
    return [family_pb2.RegisterFamilyRequest(
        client_version="fuzz", label_key_fingerprint=draw(st.binary(min_size=16, max_size=16)),
        label_ciphertext_dim=draw(st.sampled_from([w.bundle.label_key.cipher_dim, 2, 4096])),
        device_id=_hex_id(draw), sealed_device_name=draw(st.binary(max_size=40)))]


def b_upload_context(draw: Draw, w: World) -> list[Message]:
    data = _payload(draw, w, w.c_public_context)
    sha = hashlib.sha256(data).digest()
    parts = _chunks(draw, data)
    return [family_pb2.UploadPublicContextRequest(total_size=len(data), chunk=part,
                                                  sha256=sha if i == len(parts) - 1 else b"")
            for i, part in enumerate(parts)]


def b_put_sealed(draw: Draw, w: World) -> list[Message]:
    return [family_pb2.PutSealedItemRequest(name=FUZZ_ITEM,
                                            expected_version=draw(st.integers(0, 3)),
                                            data=draw(st.binary(max_size=64)))]


def b_join(draw: Draw, w: World) -> list[Message]:
    use_invite = draw(st.booleans())
    invite = w.invites.pop() if use_invite and w.invites else secrets.token_urlsafe(32)
    return [family_pb2.JoinFamilyRequest(family_id=w.bundle.family_id, invite_token=invite,
                                         device_id=secrets.token_hex(16),
                                         sealed_device_name=draw(st.binary(max_size=40)))]


def b_backup(draw: Draw, w: World) -> list[Message]:
    """A new photo (now and then under a keeper's id: ALREADY_EXISTS)."""
    reuse = draw(st.integers(0, 9)) == 0
    photo_id = next(iter(w.keepers)) if reuse else secrets.token_hex(16)
    if not reuse:
        w.expendable.append(photo_id)
    seed = draw(st.integers(0, 2**32))
    plain = random.Random(seed).randbytes(draw(st.integers(0, 5000)))
    blob = _payload(draw, w, photo_crypto.encrypt_photo(w.bundle.master_key, w.bundle.family_id,
                                                        photo_id, plain))
    thumb = photo_crypto.encrypt_photo(w.bundle.master_key, w.bundle.family_id, photo_id,
                                       plain[:100], kind="thumbnail")
    header = photos_pb2.PhotoHeader(
        photo_id=photo_id, blob_size=len(blob), blob_sha256=hashlib.sha256(blob).digest(),
        encrypted_labels=pipeline.encrypt_labels(w.bundle, [1]),
        label_key_fingerprint=w.bundle.label_key.fingerprint(),
        encrypted_thumbnail=thumb if draw(st.booleans()) else b"")
    return [photos_pb2.BackupPhotoRequest(header=header),
            *(photos_pb2.BackupPhotoRequest(chunk=c) for c in _chunks(draw, blob) if c)]


def b_search(draw: Draw, w: World) -> list[Message]:
    mode = draw(st.sampled_from(list(labels.MatchMode)))
    proto_mode = {labels.MatchMode.ALL: photos_pb2.MATCH_MODE_ALL,
                  labels.MatchMode.ANY: photos_pb2.MATCH_MODE_ANY,
                  labels.MatchMode.RANKED: photos_pb2.MATCH_MODE_RANKED}[mode]
    return [photos_pb2.SearchPhotosRequest(
        encrypted_query=pipeline.encrypt_query(w.bundle, [0], mode),
        label_key_fingerprint=w.bundle.label_key.fingerprint(), mode=proto_mode,
        top_n=draw(st.integers(1, 20)), page_size=draw(st.integers(0, 3)))]


def b_fetch(draw: Draw, w: World) -> list[Message]:
    ids = [*w.keepers, *w.expendable[-8:], w.b_photo[0]]
    return [photos_pb2.FetchPhotoRequest(photo_id=ids[pick(draw, len(ids))],
                                         thumbnail_only=draw(st.booleans()))]


def b_delete(draw: Draw, w: World) -> list[Message]:
    unknown = _hex_id(draw)
    photo_id = w.expendable.pop() if w.expendable else unknown
    return [photos_pb2.DeletePhotoRequest(photo_id=photo_id)]


def b_add_entries(draw: Draw, w: World) -> list[Message]:
    layout = w.c.client.gallery_layout()
    per_block = w.c.ckks().layout.entries_per_block
    last = max(layout) if layout else -1
    used = len(layout.get(last, [])) if layout else per_block
    block, position = (last, used) if used < per_block else (last + 1, 0)
    return [faces_pb2.AddGalleryEntriesRequest(
        slot=2, block=block, first_position=position, count=1,
        ciphertexts=faces_pb2.Ciphertexts(items=w.c.entries_at(position)))]


def b_replace(draw: Draw, w: World) -> list[Message]:
    positions = sum(len(slots) for slots in w.c.client.gallery_layout().values())
    expected = positions if draw(st.integers(0, 4)) == 0 else positions + 1
    return [faces_pb2.ReplaceGalleryRequest(header=faces_pb2.ReplaceGalleryHeader(
                expected_positions=expected, block_count=1)),
            faces_pb2.ReplaceGalleryRequest(block=faces_pb2.ReplacementBlock(
                ciphertexts=faces_pb2.Ciphertexts(items=w.c_replacement), slots=[0]))]


def b_match(draw: Draw, w: World) -> list[Message]:
    count = draw(st.integers(1, 2))
    return [faces_pb2.MatchFacesRequest(faces=[faces_pb2.Ciphertexts(items=w.query)
                                               for _ in range(count)])]


def b_publish(draw: Draw, w: World) -> list[Message]:
    header, matrix = tiny_detector(FUZZ_DETECTOR, prefix=draw(st.booleans()), seed=5)
    matrix = _payload(draw, w, matrix)
    header.matrix_sha256 = hashlib.sha256(matrix).digest()
    return [detection_pb2.PublishDetectorRequest(header=header),
            *(detection_pb2.PublishDetectorRequest(chunk=c) for c in _chunks(draw, matrix))]


ENCODINGS = {detection_pb2.WINDOW_ENCODING_FLOAT64: "<f8",
             detection_pb2.WINDOW_ENCODING_FLOAT32: "<f4",
             detection_pb2.WINDOW_ENCODING_FLOAT16: "<f2"}


def b_detect(draw: Draw, w: World) -> list[Message]:
    detector_id = draw(st.sampled_from([*KEEPER_DETECTORS, FUZZ_DETECTOR]))
    header = w.detectors[detector_id][0]
    messages: list[Message] = [detection_pb2.DetectFacesRequest(
        session=detection_pb2.DetectionSession(detector_id=detector_id,
                                               key_version=header.key_version,
                                               key_fingerprint=header.key_fingerprint))]
    for batch_id in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from([detection_pb2.WINDOW_KIND_UNSPECIFIED,
                                     detection_pb2.WINDOW_KIND_FULL,
                                     detection_pb2.WINDOW_KIND_PREFIX]))
        encoding = draw(st.sampled_from(list(ENCODINGS)))
        count = draw(st.integers(1, 6))
        dim = 3 if kind == detection_pb2.WINDOW_KIND_PREFIX else 4
        windows = np.random.default_rng(draw(st.integers(0, 2**32))).standard_normal(
            (count, dim)).astype(ENCODINGS[encoding])
        messages.append(detection_pb2.DetectFacesRequest(batch=detection_pb2.WindowBatch(
            batch_id=batch_id, count=count, windows=windows.tobytes(), encoding=encoding,
            stage_count=draw(st.integers(0, 2)), first_stage=draw(st.integers(0, 2)),
            kind=kind)))
    return messages


def b_delete_family(draw: Draw, w: World) -> list[Message]:
    """Sent as family D: mostly aimed at another family's id (refused), now and then at D's
    own (D is deleted, and registered again for the next case)."""
    own = w.fresh_d().bundle.family_id
    target = own if draw(st.integers(0, 4)) == 0 else w.b.bundle.family_id
    return [family_pb2.DeleteFamilyRequest(confirm_family_id=target)]


BASELINES: dict[str, Baseline] = {
    "privface.v1.FamilyService/RegisterFamily": b_register,
    "privface.v1.FamilyService/UploadPublicContext": b_upload_context,
    "privface.v1.FamilyService/GetFamily": lambda draw, w: [family_pb2.GetFamilyRequest()],
    "privface.v1.FamilyService/GetSealedItem": lambda draw, w: [family_pb2.GetSealedItemRequest(
        name=draw(st.sampled_from(["roster", KEEPER_ITEM[0], FUZZ_ITEM, "ckks-secret"])))],
    "privface.v1.FamilyService/PutSealedItem": b_put_sealed,
    "privface.v1.FamilyService/CreateDeviceInvite":
        lambda draw, w: [family_pb2.CreateDeviceInviteRequest(
            ttl_seconds=draw(st.sampled_from([0, 1, 3600, 2**32 - 1])))],
    "privface.v1.FamilyService/JoinFamily": b_join,
    "privface.v1.FamilyService/ListDevices": lambda draw, w: [family_pb2.ListDevicesRequest()],
    "privface.v1.FamilyService/RevokeDevice":
        lambda draw, w: [family_pb2.RevokeDeviceRequest(device_id=draw(st.sampled_from(
            [w.second_device, w.bundle.device_id])))],
    "privface.v1.FamilyService/DeleteFamily": b_delete_family,
    "privface.v1.PhotoService/BackupPhoto": b_backup,
    "privface.v1.PhotoService/SearchPhotos": b_search,
    "privface.v1.PhotoService/FetchPhoto": b_fetch,
    "privface.v1.PhotoService/DeletePhoto": b_delete,
    "privface.v1.PhotoService/ListPhotos":
        lambda draw, w: [photos_pb2.ListPhotosRequest(page_size=draw(st.integers(0, 3)))],
    "privface.v1.FaceService/AddGalleryEntries": b_add_entries,
    "privface.v1.FaceService/RemoveGallerySlot":
        lambda draw, w: [faces_pb2.RemoveGallerySlotRequest(slot=3)],
    "privface.v1.FaceService/GetGalleryLayout":
        lambda draw, w: [faces_pb2.GetGalleryLayoutRequest()],
    "privface.v1.FaceService/GetGalleryBlock":
        lambda draw, w: [faces_pb2.GetGalleryBlockRequest(block=draw(st.integers(0, 2)))],
    "privface.v1.FaceService/ReplaceGallery": b_replace,
    "privface.v1.FaceService/MatchFaces": b_match,
    "privface.v1.DetectorService/PublishDetector": b_publish,
    "privface.v1.DetectorService/ListDetectors":
        lambda draw, w: [detection_pb2.ListDetectorsRequest()],
    "privface.v1.DetectorService/DetectFaces": b_detect,
}


# -- cases -----------------------------------------------------------------------------------


@dataclass
class Case:
    """One call: the method path, the raw request messages, metadata, and what it is."""

    rpc: str
    messages: list[bytes]
    metadata: tuple[tuple[str, str], ...]
    kind: str  # baseline, mutated, random, garbage (see draw_case)
    notes: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """A short description for failure messages (sizes, not bytes)."""
        sizes = [len(m) for m in self.messages]
        shown = sizes if len(sizes) <= 12 else [*sizes[:12], f"... {len(sizes)} messages"]
        return (f"{self.rpc} [{self.kind}: {'; '.join(self.notes) or '-'}] message sizes "
                f"{shown}, metadata keys {[k for k, _ in self.metadata]}")


# The calls that may legitimately rewrite a gallery or the CKKS keys go to family C, the
# deletions to family D (see World); every other family call to family A.
C_RPCS = {"privface.v1.FamilyService/UploadPublicContext",
          "privface.v1.FaceService/AddGalleryEntries",
          "privface.v1.FaceService/ReplaceGallery",
          "privface.v1.FaceService/RemoveGallerySlot"}
D_RPCS = {"privface.v1.FamilyService/DeleteFamily"}


def proper_metadata(w: World, rpc: str) -> tuple[tuple[str, str], ...]:
    """The credentials a correct client would send for ``rpc``."""
    if rpc in PUBLIC_RPCS:
        return ()
    if rpc in VENDOR_RPCS:
        return (("authorization", f"Bearer {w.vendor_token}"),)
    if rpc in C_RPCS:
        return w.c.metadata()
    if rpc in D_RPCS:
        return w.d.metadata()
    return w.a.metadata()


def _credentials(draw: Draw, w: World, rpc: str) -> tuple[tuple[str, str], ...]:
    proper = proper_metadata(w, rpc)
    choice = draw(st.integers(0, 19))  # (hypothesis favours 0: the proper credentials)
    if choice == 17:
        return ()
    if choice == 18:
        return (("x-privface-family", w.bundle.family_id), ("authorization", "Bearer wrong"))
    if choice == 19:
        return (("x-privface-family", draw(st.sampled_from(["", "fam_", "x" * 300]))),
                ("authorization", draw(st.sampled_from(["", "Bearer ", "Basic abc"]))))
    return proper


def _stream_mutation(draw: Draw, w: World, method: MethodDescriptor,
                     messages: list[Message]) -> tuple[list[Message], str]:
    """Messages dropped, cut short, repeated, reordered, added (many: a huge stream)."""
    ops = ["truncate", "drop", "dup", "swap", "empty", "extra", "flood"]
    op = draw(st.sampled_from(ops))
    out = list(messages)
    n = len(out)
    i, j = pick(draw, n), pick(draw, n + 1)
    if op == "empty":
        return [], op
    if op == "truncate" and n > 1:
        return out[:1 + pick(draw, n - 1)], op
    if op == "drop" and out:
        del out[i]
        return out, op
    if op == "dup" and out:
        out.insert(j, out[i])
        return out, op
    if op == "swap" and n > 1:
        j %= n
        out[i], out[j] = out[j], out[i]
        return out, op
    if op == "flood" and out:
        count = draw(st.sampled_from([100, 1000, 3000]))
        return [*out, *[_shrunk(out[-1])] * count], f"flood x{count}"
    out.append(random_message(draw, w, method.input_type))
    return out, "extra"


def _byte_mutation(draw: Draw, raw: list[bytes]) -> tuple[list[bytes], str]:
    """One serialized message cut, flipped, extended by garbage or an unknown field, or
    replaced by bytes that are not protobuf."""
    if not raw:
        return [bytes(draw(st.binary(max_size=64)))], "garbage only"
    i = pick(draw, len(raw))
    data = raw[i]
    op = draw(st.sampled_from(["cut", "flip", "garbage", "append", "unknown field",
                               "wrong wire type"]))
    pos, flip = pick(draw, len(data)), draw(st.integers(1, 255))
    if op == "cut" and data:
        data = data[:pos]
    elif op == "flip" and data:
        data = data[:pos] + bytes([data[pos] ^ flip]) + data[pos + 1:]
    elif op == "append":
        data = data + bytes(draw(st.binary(min_size=1, max_size=16)))
    elif op == "unknown field":
        data = data + bytes([(draw(st.integers(16, 2000)) << 3 | 0) & 0x7F]) + b"\x01"
    elif op == "wrong wire type":
        data = bytes([(draw(st.integers(1, 12)) << 3) | draw(st.sampled_from([0, 1, 2, 5]))]) \
            + bytes(draw(st.binary(min_size=1, max_size=12))) + data
    else:
        data = bytes(draw(st.binary(max_size=64)))
    return [*raw[:i], data, *raw[i + 1:]], f"bytes:{op}"


def draw_case(draw: Draw, w: World, rpc: str) -> Case:
    """One fuzz case for ``rpc``, of one of four kinds:

    * baseline: the RPC's near-valid call as its baseline builds it (correct framing; an
      upload's payload content may be changed, chunking and ids vary);
    * mutated: a baseline with one to three fields, stream messages or bytes changed;
    * random: messages built at random from the request's descriptor;
    * garbage: random bytes as the request messages."""
    method = METHODS[rpc]
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "mutated", "baseline",
                                 "baseline", "baseline", "random", "garbage"]))
    notes: list[str] = []
    if kind == "garbage":
        count = draw(st.integers(0, 3)) if method.client_streaming else 1
        raw = [bytes(draw(st.binary(max_size=256))) for _ in range(count)]
        return Case(rpc, raw, _credentials(draw, w, rpc), kind)
    if kind == "random":
        count = draw(st.integers(0, 4)) if method.client_streaming else 1
        messages = [random_message(draw, w, method.input_type) for _ in range(count)]
    else:
        messages = BASELINES[rpc](draw, w)
    corrupt_bytes = False
    if kind == "mutated":
        for _ in range(draw(st.integers(1, 3))):
            target = draw(st.sampled_from(["message", "message", "message", "stream",
                                           "bytes"]))
            if target == "bytes":
                corrupt_bytes = True
            elif target == "message" and messages:
                i = pick(draw, len(messages))
                messages[i] = _copy(messages[i])
                notes.append(f"#{i}." + mutate_message(draw, w, messages[i]))
            elif target == "stream" and method.client_streaming:
                messages, note = _stream_mutation(draw, w, method, messages)
                notes.append(note)
            elif target == "stream":  # a unary request sent as none or several messages
                messages = messages * draw(st.sampled_from([0, 2, 3]))
                notes.append(f"{len(messages)} messages to a unary request")
    raw = [m.SerializeToString() for m in messages]
    if corrupt_bytes:
        raw, note = _byte_mutation(draw, raw)
        notes.append(note)
    return Case(rpc, raw, _credentials(draw, w, rpc), kind, notes)


def _shrunk(msg: Message) -> Message:
    """A copy with every bytes or string field cut to one element (a flood of small
    messages rather than of megabyte chunks)."""
    out = _copy(msg)
    for f, value in out.ListFields():
        if f.is_repeated:
            continue
        if f.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(out, f.name).CopyFrom(_shrunk(value))
        elif f.type in (FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_STRING):
            setattr(out, f.name, value[:1])
    return out


def _copy(msg: Message) -> Message:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


# -- calling and recording -------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """How a call ended."""

    code: grpc.StatusCode
    details: str
    responses: int
    seconds: float


def call_raw(channel: grpc.Channel, case: Case, timeout: float) -> Outcome:
    """Sends the case's raw messages as one call and reads every response."""
    multi = channel.stream_stream("/" + case.rpc, request_serializer=None,
                                  response_deserializer=None)
    start = time.perf_counter()
    try:
        responses = list(multi(iter(case.messages), metadata=case.metadata, timeout=timeout))
    except grpc.RpcError as exc:
        return Outcome(exc.code(), exc.details() or "", 0, time.perf_counter() - start)
    return Outcome(grpc.StatusCode.OK, "", len(responses), time.perf_counter() - start)


class Recorder:
    """Counts per RPC: fuzz cases and their statuses, the reads that followed (kind
    "sweep"), case kinds, time; the server bugs found."""

    def __init__(self) -> None:
        self.codes: dict[str, dict[bool, collections.Counter[str]]] = collections.defaultdict(
            lambda: {True: collections.Counter(), False: collections.Counter()})
        self.kinds: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter)
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.messages: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter)
        self.bugs: list[dict[str, str]] = []
        self.crashes = 0
        self._lock = threading.Lock()

    def record(self, case: Case, outcome: Outcome) -> None:
        """One finished call."""
        with self._lock:
            self.codes[case.rpc][case.kind != "sweep"][outcome.code.name] += 1
            self.kinds[case.rpc][case.kind] += 1
            self.seconds[case.rpc] += outcome.seconds
            self.messages[case.rpc][f"{case.kind} {outcome.code.name}: "
                                    f"{outcome.details[:90]}"] += 1
            if outcome.code in SERVER_BUGS:
                self.bugs.append({"case": case.describe(), "code": outcome.code.name,
                                  "details": outcome.details[:500]})

    def totals(self, fuzz: bool) -> collections.Counter[str]:
        """Statuses over every RPC, of the fuzz cases (or of the reads after them)."""
        total: collections.Counter[str] = collections.Counter()
        for codes in self.codes.values():
            total.update(codes[fuzz])
        return total

    def report(self, **extra: Any) -> dict[str, Any]:
        """The figures as JSON values."""
        fuzz, reads = self.totals(True), self.totals(False)
        return {
            "rpcs": {rpc: {"cases": sum(codes[True].values()), "statuses": dict(codes[True]),
                           "reads": sum(codes[False].values()),
                           "read_statuses": dict(codes[False]),
                           "kinds": dict(self.kinds[rpc]),
                           "top_messages": dict(self.messages[rpc].most_common(12)),
                           "seconds": round(self.seconds[rpc], 2)}
                     for rpc, codes in sorted(self.codes.items())},
            "cases": sum(fuzz.values()), "statuses": dict(fuzz),
            "reads": sum(reads.values()), "read_statuses": dict(reads),
            "internal_or_unknown": sum(fuzz[c.name] + reads[c.name] for c in SERVER_BUGS),
            "crashes": self.crashes, "bugs": self.bugs[:50], **extra}

    def write(self, path: Path, **extra: Any) -> None:
        """Writes :meth:`report` as JSON."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.report(**extra), indent=2, sort_keys=True))


def keeper_distance(w: World) -> float:
    """The decrypted distance of A's keeper embedding to gallery block 0, position 0."""
    replies = w.a.client.match_faces([w.query])
    first = next(r for r in replies if r.block == 0)
    return float(ckks.decrypt_distances(w.a.ckks(), first.ciphertext, 1)[0])


def _read(rpc: str, family: Family | None, *messages: Message) -> Case:
    return Case(rpc, [m.SerializeToString() for m in messages],
                family.metadata() if family else (), "sweep")


def family_reads(family: Family, query: list[bytes] | None = None) -> list[Case]:
    """Well-formed reads of one family's state (MatchFaces if ``query`` is given)."""
    bundle = family.bundle
    cases = [
        _read("privface.v1.FamilyService/GetFamily", family, family_pb2.GetFamilyRequest()),
        _read("privface.v1.FamilyService/ListDevices", family, family_pb2.ListDevicesRequest()),
        _read("privface.v1.PhotoService/ListPhotos", family, photos_pb2.ListPhotosRequest()),
        _read("privface.v1.PhotoService/SearchPhotos", family, photos_pb2.SearchPhotosRequest(
            encrypted_query=pipeline.encrypt_query(bundle, [0], labels.MatchMode.ANY),
            label_key_fingerprint=bundle.label_key.fingerprint(),
            mode=photos_pb2.MATCH_MODE_ANY)),
        _read("privface.v1.FaceService/GetGalleryLayout", family,
              faces_pb2.GetGalleryLayoutRequest()),
        _read("privface.v1.FaceService/GetGalleryBlock", family,
              faces_pb2.GetGalleryBlockRequest(block=0))]
    if query is not None:
        cases.append(_read("privface.v1.FaceService/MatchFaces", family,
                           faces_pb2.MatchFacesRequest(faces=[faces_pb2.Ciphertexts(
                               items=query)])))
    return cases


def detector_reads(w: World) -> list[Case]:
    """One small batch on every published detector (full windows)."""
    cases = []
    for info in w.a.client.list_detectors():
        windows = np.random.default_rng(5).standard_normal((2, info.ciphertext_dim))
        cases.append(_read(
            "privface.v1.DetectorService/DetectFaces", w.a,
            detection_pb2.DetectFacesRequest(session=detection_pb2.DetectionSession(
                detector_id=info.detector_id, key_version=info.key_version,
                key_fingerprint=info.key_fingerprint)),
            detection_pb2.DetectFacesRequest(batch=detection_pb2.WindowBatch(
                batch_id=1, count=2, windows=windows.tobytes(),
                encoding=detection_pb2.WINDOW_ENCODING_FLOAT64))))
    return cases


def follow_up_cases(w: World, rpc: str) -> list[Case]:
    """After a call that changed stored state (it answered OK): reads of what it changed.
    A call that stores something a later call cannot use shows up here, while the cases
    of other RPCs might otherwise overwrite it first."""
    if rpc in C_RPCS:
        return family_reads(w.c, w.c_query)
    if rpc == "privface.v1.DetectorService/PublishDetector":
        return detector_reads(w)
    if rpc in ("privface.v1.PhotoService/BackupPhoto", "privface.v1.PhotoService/DeletePhoto",
               "privface.v1.FamilyService/PutSealedItem",
               "privface.v1.FamilyService/JoinFamily", "privface.v1.FamilyService/RevokeDevice"):
        return family_reads(w.a)
    return []


def sweep_cases(w: World) -> list[Case]:
    """Well-formed reads of everything the fuzzing may have changed, for every family and
    every published detector: stored state that a call accepted must never make a later
    call fail with INTERNAL (a bad context or block stored, a detector that no longer
    loads)."""
    return [*family_reads(w.a, w.query), *family_reads(w.b), *family_reads(w.c, w.c_query),
            *family_reads(w.fresh_d()), *detector_reads(w)]
