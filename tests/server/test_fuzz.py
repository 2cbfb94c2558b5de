"""Property-based fuzzing of every RPC against a real privface-server process (issue 8,
part 5).

Every RPC is enumerated from the proto descriptors and must have a strategy
(tests/server/fuzzing.py): near-valid calls, calls with fields, stream messages or bytes
mutated (wrong lengths, NaN and infinities, truncated and flooded streams, bad digests,
unknown and malformed ids, wrong versions, CKKS ciphertexts and contexts changed behind a
valid checksum), messages built at random from the descriptor, and bytes that are not
protobuf; each RPC on its own, then runs of mixed RPCs. After each call: the status is
neither INTERNAL nor UNKNOWN (nor a client deadline: the server never hangs) and the
server still answers a health check; after a call that changed stored state, reads of
what it changed. At the end: reads of every family and detector, the store is consistent
(bench/store_check.py), family A's data still decrypts, searches and matches, and the
server logged no traceback.

Profiles (PRIVFACE_FUZZ_PROFILE): "ci" (default, bounded: the whole file in one to two
minutes) and "long" (bench/fuzz_run.py). PRIVFACE_FUZZ_EXAMPLES overrides the examples per
RPC; PRIVFACE_FUZZ_REPORT names a JSON file for the figures (cases and statuses per RPC).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.server_process import ServerProcess
from bench.store_check import check_store
from client.config import ClientConfig
from client.pipeline import photos as pipeline
from client.rpc import open_channel
from server.tls import DevCerts
from tests.server.fuzzing import (
    BASELINES,
    C_RPCS,
    D_RPCS,
    KEEPER_DETECTORS,
    KEEPER_ITEM,
    METHODS,
    PUBLIC_RPCS,
    SERVER_BUGS,
    VENDOR_RPCS,
    Case,
    Outcome,
    Recorder,
    World,
    build_world,
    call_raw,
    detect_outcomes,
    draw_case,
    follow_up_cases,
    keeper_distance,
    probe_batch,
    sweep_cases,
)

PROFILE = os.environ.get("PRIVFACE_FUZZ_PROFILE", "ci")
_EXAMPLES = {"ci": 80, "long": 400}
settings.register_profile(
    "privface-fuzz", deadline=None, print_blob=True,
    max_examples=int(os.environ.get("PRIVFACE_FUZZ_EXAMPLES", _EXAMPLES[PROFILE])),
    suppress_health_check=list(HealthCheck))
FUZZ = settings(settings.get_profile("privface-fuzz"))
CALL_TIMEOUT = 90.0  # seconds: no case needs more than a few; more means the server hung
CALL_ENDINGS_THAT_ARE_BUGS = (*SERVER_BUGS, grpc.StatusCode.DEADLINE_EXCEEDED)
# Methods served beside ours (every method goes through the same interceptors).
OTHER_METHODS = ["grpc.health.v1.Health/Check",
                 "grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"]


@pytest.fixture(scope="module")
def vendor_token() -> str:
    return secrets.token_urlsafe(32)


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, tls_certs: DevCerts,
                vendor_token: str) -> Iterator[ServerProcess]:
    """A privface-server process whose address limits never refuse this one busy client
    (failed authentications and registrations are part of the fuzzing)."""
    work = tmp_path_factory.mktemp("fuzz")
    server = ServerProcess(
        work / "data", tls_certs.server_cert, tls_certs.server_key, tls_certs.ca,
        work / "server.log",
        flags=["--auth-failures-per-minute", "1000000000",
               "--register-per-minute", "1000000000", "--grace-seconds", "1"],
        env={"PRIVFACE_VENDOR_TOKEN": vendor_token})
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def world(fuzz_server: ServerProcess, tls_certs: DevCerts, vendor_token: str) -> World:
    return build_world(fuzz_server.address, ClientConfig(tls_ca=tls_certs.ca), vendor_token)


@pytest.fixture(scope="module")
def raw_channel(fuzz_server: ServerProcess, tls_certs: DevCerts) -> Iterator[grpc.Channel]:
    with open_channel(fuzz_server.address, ClientConfig(tls_ca=tls_certs.ca)) as channel:
        yield channel


@pytest.fixture(scope="module")
def recorder() -> Recorder:
    return Recorder()


def test_every_rpc_has_a_strategy() -> None:
    """A new RPC fails here until it has a baseline (and a family to aim at)."""
    assert len(METHODS) >= 24
    assert set(BASELINES) == set(METHODS), set(METHODS) ^ set(BASELINES)
    assert set(METHODS) >= (PUBLIC_RPCS | VENDOR_RPCS | C_RPCS | D_RPCS)


def _run(case: Case, world: World, server: ServerProcess, channel: grpc.Channel,
         recorder: Recorder) -> None:
    """Calls, checks, and after a call that changed state, reads what it changed."""
    outcome = call_raw(channel, case, CALL_TIMEOUT)
    _check(case, outcome, server, recorder)
    if outcome.code == grpc.StatusCode.OK and case.kind != "sweep":
        for read in follow_up_cases(world, case.rpc):
            _check(read, call_raw(channel, read, CALL_TIMEOUT), server, recorder)


def _check(case: Case, outcome: Outcome, server: ServerProcess, recorder: Recorder) -> None:
    recorder.record(case, outcome)
    assert outcome.code not in CALL_ENDINGS_THAT_ARE_BUGS, (
        f"{outcome.code.name} after {outcome.seconds:.1f} s: {outcome.details}\n"
        f"{case.describe()}\nserver log:\n{server.log_tail(2000)}")
    if not server.healthy():
        recorder.crashes += 1
        pytest.fail(f"the server stopped answering health checks after {case.describe()}\n"
                    f"{server.log_tail()}")


@pytest.mark.parametrize("rpc", sorted(METHODS))
@FUZZ
@given(data=st.data())
def test_malformed_calls_get_precise_statuses(rpc: str, data: st.DataObject, world: World,
                                              fuzz_server: ServerProcess,
                                              raw_channel: grpc.Channel,
                                              recorder: Recorder) -> None:
    _run(draw_case(data.draw, world, rpc), world, fuzz_server, raw_channel, recorder)


@pytest.mark.parametrize("rpc", OTHER_METHODS)
@FUZZ
@given(messages=st.lists(st.binary(max_size=200), max_size=3))
def test_garbage_to_health_and_reflection(rpc: str, messages: list[bytes],
                                          fuzz_server: ServerProcess,
                                          raw_channel: grpc.Channel,
                                          recorder: Recorder) -> None:
    case = Case(rpc, messages if "Reflection" in rpc else messages[:1] or [b""], (), "garbage")
    _check(case, call_raw(raw_channel, case, CALL_TIMEOUT), fuzz_server, recorder)


@FUZZ
@given(data=st.data())
def test_interleaved_calls(data: st.DataObject, world: World, fuzz_server: ServerProcess,
                           raw_channel: grpc.Channel, recorder: Recorder) -> None:
    """Runs of one to six cases of any RPCs: what one call stored is what the next one
    reads (the tests above run each RPC's cases together)."""
    for _ in range(data.draw(st.integers(1, 6))):
        rpc = data.draw(st.sampled_from(sorted(METHODS)))
        _run(draw_case(data.draw, world, rpc), world, fuzz_server, raw_channel, recorder)


def test_reads_after_fuzzing_never_fail_internally(world: World, fuzz_server: ServerProcess,
                                                   raw_channel: grpc.Channel,
                                                   recorder: Recorder) -> None:
    """Every family's reads and every published detector still answer precisely."""
    for case in sweep_cases(world):
        _check(case, call_raw(raw_channel, case, CALL_TIMEOUT), fuzz_server, recorder)


def test_store_consistent_and_family_data_intact_after_fuzzing(
        world: World, fuzz_server: ServerProcess, recorder: Recorder) -> None:
    """Runs after the fuzzing above (file order): nothing it sent broke the store or the
    data of family A (and B) that no fuzz case was allowed to change."""
    assert fuzz_server.healthy()
    store = check_store(fuzz_server.data_dir)
    log = fuzz_server.log_text()
    tracebacks = log.count("Traceback")
    errors = sum(1 for line in log.splitlines() if " ERROR " in line)
    report_path = os.environ.get("PRIVFACE_FUZZ_REPORT")
    figures = {"profile": PROFILE, "store": store.summary(), "server_log_tracebacks": tracebacks,
               "server_log_errors": errors, "server_alive": fuzz_server.alive(),
               "server_log": str(fuzz_server.log_path), "family_data_intact": False}
    if report_path:
        recorder.write(Path(report_path), **figures)
    assert store.ok, store.problems()
    assert tracebacks == 0 and errors == 0, fuzz_server.log_tail()
    assert recorder.bugs == [] and recorder.crashes == 0

    a, bundle = world.a.client, world.bundle
    for photo_id, plain in world.keepers.items():
        assert pipeline.fetch_photo(a, bundle, photo_id) == plain
    found, _ = pipeline.search_photos(a, bundle, [0])
    listed = set(a.list_photos())
    assert set(world.keepers) <= set(found) <= listed
    assert keeper_distance(world) < 1e-3
    for detector_id in KEEPER_DETECTORS:
        header = world.detectors[detector_id][0]
        batch = probe_batch(prefix=bool(header.prefix_stages))
        assert detect_outcomes(a, header, batch) == world.probes[detector_id]
    assert a.get_sealed_item(KEEPER_ITEM[0]) == (1, KEEPER_ITEM[1])
    b_photo, b_plain = world.b_photo
    assert pipeline.fetch_photo(world.b.client, world.b.bundle, b_photo) == b_plain
    assert world.c.client.get_family().family_id == world.c.bundle.family_id
    assert world.fresh_d().client.get_family().photo_count >= 0
    if report_path:
        recorder.write(Path(report_path), **{**figures, "family_data_intact": True})
