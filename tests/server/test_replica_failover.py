"""Failover under load (issue 9, part 6), the short CI version of bench/load_test.py
--replicas 2 --kill-replica-at: two privface-server replicas on one PostgreSQL database and
one blob directory, four phones balancing over both for 12 s, one replica SIGKILLed 4 s in
and restarted 1 s later. Afterwards each replica alone is asked for every family's data:
no acknowledged backup is lost (listed and fetched byte-identical from both), both show
the same photos, thumbnails, counts, gallery, search results and face matches, and the
only calls that failed were in flight at the moment of the kill.

The load runs in its own process (locust patches the standard library for gevent).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.replica_kill import CallEvent, KillRecord, windows_report
from tests.conftest import require_data

ROOT = Path(__file__).resolve().parents[2]


def test_a_replica_killed_under_load_loses_nothing(fresh_postgres_url: str,
                                                   tmp_path: Path) -> None:
    require_data("lfw", "images")
    out = tmp_path / "failover.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load_test.py"), "--families", "2",
         "--members", "2", "--enroll-photos", "1", "--query-faces", "1", "--photos", "4",
         "--detections", "1", "--users", "4", "--seconds", "12", "--replicas", "2",
         "--store", fresh_postgres_url, "--kill-replica-at", "4", "--restart-after", "1",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["replicas"] == 2 and figures["store_kind"] == "postgresql"
    kill = figures["kill"]
    assert kill is not None and kill["killed_at_s"] >= 4, "the replica was not killed"
    assert kill["serving_again_at_s"] < figures["seconds"], "restarted after the load ended"
    # (a) every acknowledged backup, from before and during the load, on both replicas
    assert figures["acked_uploads"] > figures["families"] * figures["photos"]
    assert figures["lost_uploads"] == 0, figures["lost_examples"]
    # (c) identical from either replica
    assert figures["consistent_across_replicas"], (figures["differences"],
                                                   figures["verify_problems"])
    assert len(figures["verified_replicas"]) == 2
    # (b) searches and matches kept succeeding while a replica was down; nothing failed
    # but calls in flight at the kill, and no answer was wrong
    windows = figures["by_window"]["windows"]
    for rpc in ("SearchPhotos", "MatchFaces", "BackupPhoto"):
        assert windows["during"]["calls"].get(rpc, 0) > 0, (rpc, windows["during"])
        assert windows["after"]["calls"].get(rpc, 0) > 0, (rpc, windows["after"])
    assert figures["by_window"]["failed_not_in_flight_total"] == 0, figures["by_window"]
    assert "WRONG_RESULT" not in figures["errors_by_status"], figures["error_examples"]
    assert figures["errors_total"] <= kill["calls_in_flight"], figures["errors_by_status"]
    assert figures["rps_search"] > 0 and figures["p99_ms_match"] is not None


def test_errors_are_split_by_window_and_by_whether_they_were_in_flight() -> None:
    kill = KillRecord(replica=1, address="127.0.0.1:1", killed_at=10.0, back_at=13.0)
    events = [CallEvent("SearchPhotos", 1.0, 1.1, "OK"),
              CallEvent("SearchPhotos", 9.9, 10.2, "UNAVAILABLE"),  # in flight at the kill
              CallEvent("MatchFaces", 9.5, 10.5, "OK"),  # in flight, retried, succeeded
              CallEvent("SearchPhotos", 11.0, 11.1, "OK"),
              CallEvent("BackupPhoto", 12.0, 12.3, "INTERNAL"),  # during, not in flight
              CallEvent("BackupPhoto", 14.0, 14.1, "OK")]
    report = windows_report(events, kill)
    assert report["windows"]["before"]["calls"] == {"SearchPhotos": 2, "MatchFaces": 1}
    assert report["windows"]["before"]["errors"] == {"SearchPhotos": {"UNAVAILABLE": 1}}
    assert report["windows"]["during"]["calls"] == {"SearchPhotos": 1, "BackupPhoto": 1}
    assert report["windows"]["during"]["errors"] == {"BackupPhoto": {"INTERNAL": 1}}
    assert report["windows"]["after"]["calls"] == {"BackupPhoto": 1}
    assert report["in_flight_at_kill"] == {"SearchPhotos": 1, "MatchFaces": 1}
    assert report["failed_in_flight"] == {"SearchPhotos": {"UNAVAILABLE": 1}}
    assert report["failed_not_in_flight"] == {"BackupPhoto": {"INTERNAL": 1}}
    assert report["failed_not_in_flight_total"] == 1
