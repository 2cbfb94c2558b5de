"""Bounded resources: stream slots, per-family hourly quotas and per-address rate limits.

Pure bookkeeping (no gRPC): the servicers and the admission interceptor
(server/admission.py) ask these objects and turn a refusal into RESOURCE_EXHAUSTED by
raising LimitExceededError. Everything here is in memory, per server process; a restart
forgets rates and hourly counts (quotas on stored data live in the store).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from common.errors import LimitExceededError
from server.config import ServerConfig

Clock = Callable[[], float]
MAX_TRACKED_KEYS = 10_000  # per limiter: stale keys are dropped beyond this
HOUR = 3600.0
BUCKET_SECONDS = 60.0  # the hourly quota counts in one-minute buckets


def peer_host(peer: str) -> str:
    """The address part of a gRPC peer string, without the port: what per-address limits
    are keyed by (each connection of one phone has its own port).

    ``ipv4:10.0.0.7:51234`` -> ``10.0.0.7``; ``ipv6:[::1]:51234`` -> ``::1``; anything else
    (``unix:...``) is kept whole."""
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]")
    return peer


class StreamSlots:
    """Long calls (streams) running at once: at most ``per_family`` for one family and
    ``total`` over the whole server, so that some worker threads always stay free for
    short calls and health checks."""

    def __init__(self, total: int, per_family: int) -> None:
        self.total = total
        self.per_family = per_family
        self._running = 0
        self._by_family: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def running(self) -> int:
        """Streams holding a slot now."""
        return self._running

    @contextmanager
    def hold(self, family_id: str | None) -> Iterator[None]:
        """Holds one slot (of ``family_id``, or only a server-wide one for vendor calls)
        for the duration of the block; LimitExceededError if none is free."""
        with self._lock:
            mine = self._by_family.get(family_id, 0) if family_id else 0
            if family_id and mine >= self.per_family:
                raise LimitExceededError(
                    f"too many streaming calls at once for this family (uploads, downloads, "
                    f"detection and matching together): {self.per_family} allowed, "
                    f"{mine} running; retry later")
            if self._running >= self.total:
                raise LimitExceededError(
                    f"the server is busy: {self._running} streaming calls are running "
                    f"(limit {self.total}); retry later")
            self._running += 1
            if family_id:
                self._by_family[family_id] = mine + 1
        try:
            yield
        finally:
            with self._lock:
                self._running -= 1
                if family_id:
                    left = self._by_family[family_id] - 1
                    if left:
                        self._by_family[family_id] = left
                    else:
                        del self._by_family[family_id]


class AddressSlots:
    """Calls in flight per peer address (what one client, or one NAT, may hold at once)."""

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self._by_address: dict[str, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, host: str) -> Iterator[None]:
        """Holds one of ``host``'s slots for the block; LimitExceededError if none is free."""
        with self._lock:
            mine = self._by_address.get(host, 0)
            if mine >= self.per_address:
                raise LimitExceededError(
                    f"too many calls at once from {host}: {self.per_address} allowed; let "
                    "some finish, then retry")
            self._by_address[host] = mine + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._by_address[host] - 1
                if left:
                    self._by_address[host] = left
                else:
                    del self._by_address[host]


class HourlyQuota:
    """An amount per family over the last hour (one-minute buckets), e.g. detection windows.

    ``charge`` is all-or-nothing: a refused amount is not counted."""

    def __init__(self, limit: int, what: str, flag: str, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self.what = what
        self.flag = flag
        self.clock = clock
        self._buckets: dict[str, deque[list[float]]] = {}  # family -> [bucket start, amount]
        self._lock = threading.Lock()

    def _used(self, family_id: str, now: float) -> tuple[deque[list[float]], int]:
        buckets = self._buckets.setdefault(family_id, deque())
        while buckets and buckets[0][0] <= now - HOUR:
            buckets.popleft()
        return buckets, int(sum(amount for _, amount in buckets))

    def used(self, family_id: str) -> int:
        """The family's amount over the last hour."""
        with self._lock:
            return self._used(family_id, self.clock())[1]

    def charge(self, family_id: str, amount: int) -> int:
        """Counts ``amount`` for the family; returns the new hourly total, or raises
        LimitExceededError (counting nothing) if it would go over the limit."""
        with self._lock:
            now = self.clock()
            buckets, used = self._used(family_id, now)
            if used + amount > self.limit:
                if not buckets:
                    del self._buckets[family_id]
                raise LimitExceededError(
                    f"hourly {self.what} quota reached: this family used {used:,} in the last "
                    f"hour and asked for {amount:,} more (limit {self.limit:,} per hour); "
                    f"retry later, or ask the server operator to raise {self.flag}")
            start = now - now % BUCKET_SECONDS
            if buckets and buckets[-1][0] == start:
                buckets[-1][1] += amount
            else:
                buckets.append([start, amount])
            return used + amount

    def forget(self, family_id: str) -> None:
        """Drops a family's counts (the family was deleted)."""
        with self._lock:
            self._buckets.pop(family_id, None)


class SlidingWindow:
    """Events per key (a peer address) over the last ``window`` seconds."""

    def __init__(self, limit: int, window: float = 60.0, clock: Clock = time.monotonic) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._events: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        events = self._events.get(key)
        if events is None:
            if len(self._events) >= MAX_TRACKED_KEYS:
                self._prune(now)
            events = self._events[key] = deque(maxlen=max(self.limit, 1))
        while events and events[0] <= now - self.window:
            events.popleft()
        return events

    def _prune(self, now: float) -> None:
        for key in [k for k, ev in self._events.items() if not ev or ev[-1] <= now - self.window]:
            del self._events[key]

    def count(self, key: str) -> int:
        """Events of ``key`` in the window."""
        with self._lock:
            return len(self._recent(key, self.clock()))

    def allow(self, key: str) -> tuple[bool, int]:
        """Records one event if the key is under its limit; (allowed, events in window)."""
        with self._lock:
            events = self._recent(key, self.clock())
            if len(events) >= self.limit:
                return False, len(events)
            events.append(self.clock())
            return True, len(events)

    def hit(self, key: str) -> int:
        """Records one event unconditionally; returns the events in the window."""
        with self._lock:
            events = self._recent(key, self.clock())
            events.append(self.clock())
            return len(events)


class Lockout:
    """Addresses refused until a given time (after too many failed authentications)."""

    def __init__(self, seconds: float, clock: Clock = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self._until: dict[str, float] = {}
        self._lock = threading.Lock()

    def lock(self, key: str) -> None:
        """Refuses ``key`` for ``seconds`` from now."""
        with self._lock:
            now = self.clock()
            if len(self._until) >= MAX_TRACKED_KEYS:
                self._until = {k: t for k, t in self._until.items() if t > now}
            self._until[key] = now + self.seconds

    def remaining(self, key: str) -> float:
        """Seconds ``key`` stays refused (0 if it is not)."""
        with self._lock:
            until = self._until.get(key)
            if until is None:
                return 0.0
            left = until - self.clock()
            if left <= 0:
                del self._until[key]
                return 0.0
            return left


@dataclass(frozen=True)
class PhotoQuota:
    """How much one family may store: photos and bytes (blobs and thumbnails)."""

    max_photos: int
    max_bytes: int

    def check(self, photos: int, stored: int, size: int) -> None:
        """LimitExceededError unless one more photo of ``size`` bytes fits."""
        if photos + 1 > self.max_photos:
            raise LimitExceededError(
                f"photo quota reached: the family stores {photos:,} photos (limit "
                f"{self.max_photos:,}); delete photos (privface delete) or ask the server "
                "operator to raise --max-family-photos")
        if stored + size > self.max_bytes:
            raise LimitExceededError(
                f"storage quota reached: the family stores {stored:,} bytes and this photo "
                f"needs {size:,} more (limit {self.max_bytes:,} bytes); delete photos "
                "(privface delete) or ask the server operator to raise --max-family-bytes")


class ResourceConfigError(ValueError):
    """Resource settings that cannot work together (the server refuses to start)."""


def check_thread_budget(config: ServerConfig) -> None:
    """ResourceConfigError unless streams leave worker threads free for short calls."""
    streams = config.max_streams + config.max_public_streams
    if streams >= config.workers:
        raise ResourceConfigError(
            f"--max-streams ({config.max_streams}) + --max-public-streams "
            f"({config.max_public_streams}) must stay below --workers ({config.workers}), so "
            "that short calls and health checks always find a free worker")
    if min(config.max_streams, config.max_family_streams, config.max_public_streams,
           config.max_calls_per_address, config.stream_idle_seconds) <= 0:
        raise ResourceConfigError("--max-streams, --max-family-streams, --max-public-streams, "
                         "--max-calls-per-address and --stream-idle-seconds must be positive")


@dataclass(frozen=True)
class ResourceLimits:
    """The in-memory limits one server shares between its servicers."""

    streams: StreamSlots
    detect_windows: HourlyQuota
    photos: PhotoQuota
    max_gallery_entries: int

    @classmethod
    def from_config(cls, config: ServerConfig, clock: Clock = time.monotonic
                    ) -> ResourceLimits:
        """The limits a config asks for (ResourceConfigError for an impossible budget)."""
        check_thread_budget(config)
        return cls(StreamSlots(config.max_streams, config.max_family_streams),
                   HourlyQuota(config.max_detect_windows_per_hour, "detection window",
                               "--max-detect-windows-per-hour", clock),
                   PhotoQuota(config.max_family_photos, config.max_family_bytes),
                   config.max_gallery_entries)

    def forget(self, family_id: str) -> None:
        """Drops what is kept in memory about a deleted family."""
        self.detect_windows.forget(family_id)
