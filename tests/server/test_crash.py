"""Crash test (issue 8, part 5): a privface-server process killed with SIGKILL during
concurrent uploads and deletes, restarted and checked each time (bench/crash_test.py,
whose ledger and checks these tests share; the benchmark run does 200 kills). And the
negative controls: the checks do report a loss."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.crash_test import CrashRun, verify
from bench.store_check import check_store


@pytest.fixture
def crash_run(tmp_path: Path) -> Iterator[CrashRun]:
    run = CrashRun(tmp_path, phones=3, seed=7, large_fraction=0.15)
    try:
        yield run
    finally:
        run.close()


def test_killed_server_loses_no_acknowledged_upload_or_delete(crash_run: CrashRun) -> None:
    crash_run.run(kills=4)
    figures = crash_run.figures()
    assert figures["kills"] == 4
    assert figures["problems"] == 0 and figures["lost"] == 0, figures["problem_examples"]
    assert figures["uploads_acked"] >= 10 and figures["deletes_acked"] >= 3, figures
    # Every acknowledged upload was read back after a restart, unless deleted first.
    assert figures["uploads_verified"] + figures["uploads_deleted_before_a_check"] \
        == figures["uploads_acked"]
    assert figures["deletes_verified"] == figures["deletes_acked"]
    assert figures["integrity_check_ok"] == figures["store_checks"] == 5  # 4 restarts + end
    store = check_store(crash_run.server.data_dir)
    assert store.ok and store.unnamed_files == [] and store.photo_rows == figures["photos_at_end"]


def test_checks_report_a_server_that_acknowledges_before_committing(tmp_path: Path) -> None:
    """Negative control: the same run against a server patched to answer BackupPhoto before
    the row commits (0.6 s later): the kills lose acknowledged uploads and the checks say
    so."""
    run = CrashRun(tmp_path, phones=3, seed=8, faulty_ack=True, min_delay=0.7, max_delay=1.0)
    try:
        run.run(kills=2)
    finally:
        run.close()
    figures = run.figures()
    assert figures["lost"] > 0, figures
    assert any("LOST" in p for p in figures["problem_examples"])


def test_checks_report_a_missing_blob_and_a_missing_row(crash_run: CrashRun) -> None:
    """Negative control on the store: an acknowledged photo's blob file removed, another's
    row removed; the ledger check and the store check both report each."""
    crash_run.run(kills=1)
    assert crash_run.ledger.lost() == 0
    present = sorted(p.photo_id for p in crash_run.ledger.photos.values() if p.state == "acked")
    assert len(present) >= 2
    data = crash_run.server.data_dir
    db = sqlite3.connect(data / "privface.sqlite3")
    blob_of = dict(db.execute("SELECT photo_id, blob_file FROM photos"))
    family = crash_run.bundle.family_id
    (data / "blobs" / family / blob_of[present[0]]).unlink()
    with db:
        db.execute("DELETE FROM photos WHERE photo_id = ?", (present[1],))
    db.close()

    store = check_store(data)
    assert store.rows_without_blob == [f"{family}/{present[0]}"]
    assert store.unnamed_files == [f"{family}/{blob_of[present[1]]}"]
    verify(crash_run.client, crash_run.bundle, crash_run.ledger, full=True)
    lost = [p for p in crash_run.ledger.problems if p.startswith("LOST")]
    assert crash_run.ledger.lost() == 2
    assert any(present[0] in p and "cannot be read back" in p for p in lost)
    assert any(present[1] in p and "missing" in p for p in lost)
