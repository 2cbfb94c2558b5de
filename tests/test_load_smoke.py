"""The scripted load test (bench/load_test.py) stays working: a short run over TLS with two
families and two phones, every RPC kind of the mix called, no error and no wrong answer.

The script runs in its own process: locust patches the standard library for gevent on
import, which must not leak into the test process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_data

ROOT = Path(__file__).resolve().parents[1]


def test_load_smoke_calls_every_rpc_without_errors(tmp_path: Path) -> None:
    require_data("lfw", "images")
    out = tmp_path / "load.json"
    run = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "load_test.py"), "--families", "2",
         "--members", "2", "--enroll-photos", "1", "--query-faces", "1", "--photos", "4",
         "--detections", "1", "--users", "2", "--seconds", "4", "--each-first",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["errors_total"] == 0, figures["error_examples"]
    assert figures["tls"] is True
    assert figures["concurrency"] == 2
    ran = {kind: entry["requests"] for kind, entry in figures["rpcs"].items()}
    assert set(ran) == {"backup", "search", "match", "thumbnail", "fetch", "detect"}
    assert all(n >= 2 for n in ran.values()), ran  # each phone called each kind at least once
    assert figures["rps_search"] > 0 and figures["p99_ms_search"] > 0
    assert "SearchPhotos" in run.stdout  # the table was printed
