"""Running the core off the UI thread, and turning its progress into something to show.

Worker: one background thread that runs jobs in order (urgent ones first), so the one
FamilySession is never used by two threads at once. Results, errors and progress go back
through ``post``, which the app binds to Kivy's Clock (tests bind it to a plain list).
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from common.errors import PrivfaceError

log = logging.getLogger(__name__)

Post = Callable[[Callable[[], None]], None]  # runs a function on the UI thread
Done = Callable[[Any], None]
Failed = Callable[[str], None]

URGENT, NORMAL, BACKGROUND = 0, 1, 2


def error_message(exc: BaseException) -> str:
    """The one line the app shows for an error."""
    if isinstance(exc, (PrivfaceError, OSError)):
        text = str(exc) or type(exc).__name__
    else:  # a bug, not the user's mistake: say what kind
        text = f"internal error ({type(exc).__name__}): {exc}"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


@dataclass(order=True)
class _Job:
    priority: int
    seq: int
    work: Callable[[], Any] | None = field(compare=False)
    done: Done | None = field(compare=False, default=None)
    failed: Failed | None = field(compare=False, default=None)


class Worker:
    """A single worker thread with a priority queue of jobs."""

    def __init__(self, post: Post, on_busy: Callable[[bool], None] | None = None) -> None:
        self._post = post
        self._on_busy = on_busy
        self._queue: queue.PriorityQueue[_Job] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._pending = 0
        self._thread = threading.Thread(target=self._loop, name="privface-worker", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        """Jobs queued or running."""
        with self._lock:
            return self._pending

    def submit(self, work: Callable[[], Any], done: Done | None = None,
               failed: Failed | None = None, priority: int = NORMAL) -> None:
        """Runs ``work()`` on the worker; then ``done(result)`` or ``failed(message)`` on
        the UI thread."""
        self._count(+1)
        self._queue.put(_Job(priority, next(self._seq), work, done, failed))

    def stop(self, timeout: float = 2.0) -> None:
        """Stops after the running job (queued jobs are dropped)."""
        self._queue.put(_Job(-1, next(self._seq), None))
        self._thread.join(timeout)

    def _count(self, delta: int) -> None:
        with self._lock:
            before = self._pending
            self._pending += delta
            after = self._pending
        on_busy = self._on_busy
        if on_busy is not None and (before == 0) != (after == 0):
            busy = after > 0
            self._post(lambda: on_busy(busy))

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            if job.work is None:
                return
            try:
                result = job.work()
            except Exception as exc:  # every error reaches the user, not only the log
                if not isinstance(exc, (PrivfaceError, OSError)):
                    log.exception("job failed")
                message = error_message(exc)
                if job.failed:
                    self._post(partial(job.failed, message))
            else:
                if job.done:
                    self._post(partial(job.done, result))
            finally:
                self._count(-1)


class ProgressTracker:
    """The core's ``progress(what, amount)`` increments as throttled updates
    ``emit(text, fraction)`` (fraction None: no known total)."""

    def __init__(self, emit: Callable[[str, float | None], None],
                 totals: Mapping[str, int] | None = None, min_interval: float = 0.1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self.totals = dict(totals or {})
        self.counts: dict[str, int] = {}
        self._min_interval = min_interval
        self._clock = clock
        self._last = float("-inf")

    def __call__(self, what: str, amount: int) -> None:
        self.counts[what] = self.counts.get(what, 0) + amount
        now = self._clock()
        finished = what in self.totals and self.counts[what] >= self.totals[what]
        if finished or now - self._last >= self._min_interval:
            self._last = now
            self._emit(self.text(), self.fraction())

    def text(self) -> str:
        parts = []
        for what, n in self.counts.items():
            total = self.totals.get(what)
            parts.append(f"{what} {n}/{total}" if total else f"{what} {n:,}")
        return ", ".join(parts)

    def fraction(self) -> float | None:
        for what, total in self.totals.items():
            if total > 0:
                return min(1.0, self.counts.get(what, 0) / total)
        return None
