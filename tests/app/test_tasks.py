"""The worker thread, progress and path helpers the screens rely on (no window)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest

from client.app.controllers.files import join_paths, one_file, parse_paths, photo_files
from client.app.controllers.tasks import BACKGROUND, URGENT, ProgressTracker, Worker, error_message
from common.errors import MalformedInputError, NotFoundError


def _drain(ui: queue.Queue[Callable[[], None]], count: int) -> None:
    """Runs ``count`` posted callbacks here, as the UI thread would."""
    for _ in range(count):
        ui.get(timeout=10)()


def test_worker_runs_jobs_in_order_off_the_calling_thread() -> None:
    ui: queue.Queue[Callable[[], None]] = queue.Queue()
    busy: list[bool] = []
    worker = Worker(ui.put, on_busy=busy.append)
    threads: list[str] = []
    results: list[object] = []
    def job(n: int) -> int:
        threads.append(threading.current_thread().name)
        return n

    for n in range(3):
        worker.submit(partial(job, n), results.append)
    _drain(ui, 4)  # busy, three results
    worker.stop()
    _drain(ui, 1)  # idle
    assert results == [0, 1, 2]
    assert threads == ["privface-worker"] * 3
    assert busy == [True, False] and worker.pending == 0


def test_worker_reports_errors_as_one_line() -> None:
    ui: queue.Queue[Callable[[], None]] = queue.Queue()
    worker = Worker(ui.put)
    failures: list[str] = []

    def bad_input() -> None:
        raise NotFoundError("no such photo: x.jpg")

    def bug() -> None:
        raise ZeroDivisionError("division by zero\nsecond line")

    worker.submit(bad_input, failed=failures.append)
    worker.submit(Path("/nonexistent/file").read_bytes, failed=failures.append)
    worker.submit(bug, failed=failures.append)
    _drain(ui, 3)
    worker.stop()
    assert failures[0] == "no such photo: x.jpg"
    assert "No such file or directory" in failures[1]
    assert failures[2] == "internal error (ZeroDivisionError): division by zero"


def test_urgent_jobs_overtake_queued_ones() -> None:
    ui: queue.Queue[Callable[[], None]] = queue.Queue()
    worker = Worker(ui.put)
    gate = threading.Event()
    order: list[str] = []
    worker.submit(gate.wait)  # holds the worker while the rest queue up
    for name in ("thumb 1", "thumb 2"):
        worker.submit(partial(order.append, name), priority=BACKGROUND)
    worker.submit(lambda: order.append("open photo"), priority=URGENT)
    worker.submit(lambda: None, done=lambda _r: None, priority=BACKGROUND)  # the last one
    gate.set()
    _drain(ui, 1)
    worker.stop()
    assert order == ["open photo", "thumb 1", "thumb 2"]


def test_progress_is_throttled_and_says_how_far() -> None:
    now = [0.0]
    seen: list[tuple[str, float | None]] = []
    track = ProgressTracker(lambda text, f: seen.append((text, f)), {"photos": 4},
                            min_interval=1.0, clock=lambda: now[0])
    track("photos", 1)
    track("secure detection", 5000)  # within the interval: not shown
    now[0] = 2.0
    track("secure detection", 7000)
    track("photos", 3)  # the last photo is always shown
    assert seen == [("photos 1/4", 0.25),
                    ("photos 1/4, secure detection 12,000", 0.25),
                    ("photos 4/4, secure detection 12,000", 1.0)]
    unknown: list[tuple[str, float | None]] = []
    ProgressTracker(lambda text, f: unknown.append((text, f)))("faces", 2)
    assert unknown == [("faces 2", None)]


def test_error_message_is_one_line() -> None:
    assert error_message(MalformedInputError("bad name\nmore")) == "bad name"
    assert error_message(OSError()) == "OSError"


def test_path_fields(tmp_path: Path) -> None:
    assert parse_paths(" a.jpg ;b c.jpg\n\n ~/d.jpg ") == [
        Path("a.jpg"), Path("b c.jpg"), Path.home() / "d.jpg"]
    assert parse_paths(join_paths([Path("x.jpg"), "y z.png"])) == [Path("x.jpg"),
                                                                 Path("y z.png")]
    (tmp_path / "sub").mkdir()
    for name in ("b.jpg", "a.png", "notes.txt", "sub/c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    assert photo_files(str(tmp_path)) == [tmp_path / "a.png", tmp_path / "b.jpg"]
    assert len(photo_files(str(tmp_path), recursive=True)) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFoundError, match="no photos"):
        photo_files(str(tmp_path / "empty"))
    with pytest.raises(NotFoundError, match="no such photo"):
        photo_files(str(tmp_path / "missing.jpg"))
    assert one_file(str(tmp_path / "b.jpg"), "query photo") == tmp_path / "b.jpg"
    with pytest.raises(MalformedInputError, match="pick one query photo"):
        one_file("a.jpg; b.jpg", "query photo")
    with pytest.raises(NotFoundError, match="no such query photo"):
        one_file(str(tmp_path / "missing.jpg"), "query photo")

