"""The in-memory limiters (server/limits.py) and the idle-stream reader (server/admission.py)
on a fake clock: no server, no sleeping beyond a few short idle timeouts."""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from dataclasses import replace

import pytest

from common.errors import LimitExceededError, MalformedInputError, StreamIdleError
from server.admission import IdleRequests
from server.config import ServerConfig
from server.limits import (
    AddressSlots,
    HourlyQuota,
    Lockout,
    PhotoQuota,
    ResourceLimits,
    SlidingWindow,
    StreamSlots,
    peer_host,
)
from server.uploads import CheckedChunks, check_limit


class FakeClock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(("peer", "host"), [
    ("ipv4:10.0.0.7:51234", "10.0.0.7"),
    ("ipv6:[::1]:51234", "::1"),
    ("ipv6:[2001:db8::5]:443", "2001:db8::5"),
    ("unix:/tmp/privface.sock", "unix:/tmp/privface.sock"),
])
def test_peer_host_drops_the_port(peer: str, host: str) -> None:
    assert peer_host(peer) == host


def test_stream_slots_per_family_and_server_wide() -> None:
    slots = StreamSlots(total=3, per_family=2)
    with slots.hold("fam_a"), slots.hold("fam_a"):
        with pytest.raises(LimitExceededError, match=r"this family.*2 allowed"), \
                slots.hold("fam_a"):
            pass
        with slots.hold("fam_b"):
            assert slots.running == 3
            with pytest.raises(LimitExceededError, match=r"server is busy.*limit 3"), \
                    slots.hold("fam_c"):
                pass
            # A vendor upload needs a server-wide slot too.
            with pytest.raises(LimitExceededError, match="server is busy"), slots.hold(None):
                pass
    assert slots.running == 0
    with slots.hold("fam_a"), slots.hold("fam_a"), slots.hold("fam_c"):  # all released
        assert slots.running == 3


def test_a_slot_is_released_when_the_call_fails() -> None:
    slots = StreamSlots(total=1, per_family=1)
    with pytest.raises(RuntimeError), slots.hold("fam_a"):
        raise RuntimeError("the upload broke")
    with slots.hold("fam_a"):
        assert slots.running == 1


def test_hourly_quota_refuses_without_counting_and_rolls_over() -> None:
    clock = FakeClock()
    quota = HourlyQuota(100, "detection window", "--max-detect-windows-per-hour", clock)
    assert quota.charge("fam_a", 60) == 60
    clock.now += 30 * 60
    assert quota.charge("fam_a", 40) == 100
    with pytest.raises(LimitExceededError) as info:
        quota.charge("fam_a", 1)
    message = str(info.value)
    assert "used 100" in message and "limit 100 per hour" in message
    assert "--max-detect-windows-per-hour" in message
    assert quota.used("fam_a") == 100  # the refused window was not counted
    assert quota.charge("fam_b", 100) == 100  # per family
    clock.now += 31 * 60  # the first 60 are older than an hour now
    assert quota.used("fam_a") == 40
    assert quota.charge("fam_a", 60) == 100
    quota.forget("fam_a")
    assert quota.used("fam_a") == 0


def test_sliding_window_and_lockout() -> None:
    clock = FakeClock()
    window = SlidingWindow(3, 60.0, clock)
    assert [window.allow("10.0.0.1")[0] for _ in range(4)] == [True, True, True, False]
    assert window.allow("10.0.0.2") == (True, 1)  # per address
    clock.now += 61
    assert window.allow("10.0.0.1") == (True, 1)
    assert [window.hit("10.0.0.3") for _ in range(3)] == [1, 2, 3]

    lockout = Lockout(300.0, clock)
    assert lockout.remaining("10.0.0.1") == 0
    lockout.lock("10.0.0.1")
    clock.now += 100
    assert lockout.remaining("10.0.0.1") == pytest.approx(200)
    assert lockout.remaining("10.0.0.2") == 0
    clock.now += 201
    assert lockout.remaining("10.0.0.1") == 0


def test_address_slots() -> None:
    slots = AddressSlots(per_address=2)
    with slots.hold("10.0.0.1"), slots.hold("10.0.0.1"), slots.hold("10.0.0.2"), \
            pytest.raises(LimitExceededError, match=r"from 10\.0\.0\.1: 2 allowed"), \
            slots.hold("10.0.0.1"):
        pass
    with slots.hold("10.0.0.1"), slots.hold("10.0.0.1"):  # released
        pass


def test_photo_quota_messages() -> None:
    quota = PhotoQuota(max_photos=2, max_bytes=1000)
    quota.check(1, 400, 600)  # exactly at both limits after this photo
    with pytest.raises(LimitExceededError, match=r"stores 2 photos \(limit 2\).*privface delete"):
        quota.check(2, 0, 1)
    with pytest.raises(LimitExceededError, match=r"stores 401 bytes.*600 more.*1,000"):
        quota.check(1, 401, 600)


def test_thread_budget_must_leave_free_workers(tmp_path) -> None:
    config = ServerConfig(data_dir=tmp_path)
    assert ResourceLimits.from_config(config).streams.total == config.max_streams
    assert config.max_streams + config.max_public_streams < config.workers
    with pytest.raises(ValueError, match="below --workers"):
        ResourceLimits.from_config(replace(config, workers=8, max_streams=8))


def _readers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "privface-stream-reader"]


def _wait_for_no_readers() -> None:
    deadline = time.monotonic() + 5
    while _readers() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _readers()


def test_idle_requests_pass_messages_then_time_out() -> None:
    source: queue.Queue[str | None] = queue.Queue()
    requests = IdleRequests(iter(source.get, None), idle_seconds=0.3)
    source.put("header")
    source.put("chunk")
    assert next(requests) == "header"
    assert next(requests) == "chunk"
    with pytest.raises(StreamIdleError, match=r"no message arrived for 0\.3 s"):
        next(requests)
    with pytest.raises(StopIteration):  # once given up, the iterator stays finished
        next(requests)
    source.put(None)  # gRPC's iterator ends when the call does: the helper thread ends too
    _wait_for_no_readers()


def test_idle_requests_end_and_errors() -> None:
    requests = IdleRequests(iter(["a", "b"]), idle_seconds=5)
    assert list(requests) == ["a", "b"]

    def broken():
        yield "a"
        raise ConnectionError("the call was cancelled")
    failing = IdleRequests(broken(), idle_seconds=5)
    assert next(failing) == "a"
    with pytest.raises(ConnectionError):
        next(failing)
    unused = IdleRequests(iter(["a"]), idle_seconds=5)
    assert next(unused) == "a"
    unused.close()  # the handler stopped early: the helper thread does not wait forever
    _wait_for_no_readers()


def _consume(chunks: list[bytes], size: int) -> CheckedChunks:
    checked = CheckedChunks(iter(chunks), size, "photo blob")
    assert b"".join(checked) == b"".join(chunks)
    return checked


def test_uploads_must_stream_exactly_the_announced_bytes() -> None:
    """Counted over every chunk: a stream longer than announced is refused at the chunk
    that overruns (so no announced size can be used to slip a larger body past the
    limit), a shorter one at its end; the SHA-256 covers all chunks."""
    checked = _consume([b"ab", b"cd", b"e"], 5)
    checked.verify(hashlib.sha256(b"abcde").digest())
    with pytest.raises(MalformedInputError, match="photo blob does not match its SHA-256"):
        checked.verify(hashlib.sha256(b"abcd").digest())
    with pytest.raises(MalformedInputError, match="photo blob is longer than the announced 2"):
        _consume([b"ab", b"cd"], 2)
    with pytest.raises(MalformedInputError, match="photo blob ended after 4 of 5 bytes"):
        _consume([b"ab", b"cd"], 5)
    check_limit(10, 10, "photo")
    with pytest.raises(LimitExceededError, match="photo of 11 bytes exceeds"):
        check_limit(11, 10, "photo")
