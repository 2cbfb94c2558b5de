"""The long fuzzing run: tests/server/test_fuzz.py under the "long" hypothesis profile
(PRIVFACE_FUZZ_PROFILE=long), its figures collected in JSON and printed as the README's
table: cases per RPC, statuses seen, INTERNAL/UNKNOWN (goal 0), crashes, store
consistency afterwards.

    .venv/bin/python bench/fuzz_run.py --examples 400 --json bench/results/fuzz.json

pytest runs in its own process (the suite's fixtures: TLS certificates, a privface-server
process); its exit status is this script's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import print_table, write_json  # noqa: E402

COLUMNS = ["OK", "INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "UNAUTHENTICATED",
           "RESOURCE_EXHAUSTED", "ABORTED", "ALREADY_EXISTS"]
SHORT = {"OK": "OK", "INVALID_ARGUMENT": "INVALID_ARG", "FAILED_PRECONDITION": "FAILED_PRE",
         "NOT_FOUND": "NOT_FOUND", "UNAUTHENTICATED": "UNAUTH", "RESOURCE_EXHAUSTED": "RES_EXH",
         "ABORTED": "ABORTED", "ALREADY_EXISTS": "ALREADY"}
BUGS = ("INTERNAL", "UNKNOWN")


def table_rows(report: dict[str, Any]) -> list[list[Any]]:
    """One row per RPC (cases, statuses by code, INTERNAL/UNKNOWN), and the totals."""
    rows = []
    for rpc, entry in report["rpcs"].items():
        if not entry["cases"]:
            continue
        statuses = entry["statuses"]
        other = sum(n for code, n in statuses.items() if code not in COLUMNS + list(BUGS))
        rows.append([rpc.removeprefix("privface.v1."), entry["cases"],
                     *(statuses.get(c, 0) for c in COLUMNS), other,
                     sum(statuses.get(c, 0) for c in BUGS)])
    totals = report["statuses"]
    rows.append(["all", report["cases"], *(totals.get(c, 0) for c in COLUMNS),
                 sum(n for c, n in totals.items() if c not in COLUMNS + list(BUGS)),
                 sum(totals.get(c, 0) for c in BUGS)])
    return rows


def print_report(report: dict[str, Any]) -> None:
    """The per-RPC table and the summary lines."""
    print_table(["rpc", "cases", *(SHORT[c] for c in COLUMNS), "other", "INTERNAL/UNKNOWN"],
                table_rows(report))
    store = report.get("store", {})
    print(f"\nreads after state-changing calls and in the final sweep: {report['reads']} "
          f"({report['read_statuses']})")
    print(f"INTERNAL or UNKNOWN: {report['internal_or_unknown']}; crashes: {report['crashes']}; "
          f"server log tracebacks: {report.get('server_log_tracebacks')}, "
          f"ERROR lines: {report.get('server_log_errors')}")
    print(f"store afterwards: integrity_check {store.get('integrity_check')}, "
          f"{store.get('photo_rows')} photo rows, {store.get('rows_without_blob')} without "
          f"blob, {store.get('blobs_mismatched')} mismatched, {store.get('unnamed_files')} "
          f"files no row names; family data intact: {report.get('family_data_intact')}")
    for bug in report.get("bugs", [])[:10]:
        print(f"  {bug['code']}: {bug['details']}\n    {bug['case']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=400,
                        help="hypothesis examples per RPC (and for the interleaved runs)")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("-k", dest="select", help="pytest -k expression (a subset of RPCs)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="privface-fuzz-") as tmp:
        report_path = Path(tmp) / "fuzz.json"
        env = dict(os.environ, PRIVFACE_FUZZ_PROFILE="long",
                   PRIVFACE_FUZZ_EXAMPLES=str(args.examples),
                   PRIVFACE_FUZZ_REPORT=str(report_path))
        command = [sys.executable, "-m", "pytest", "tests/server/test_fuzz.py", "-q",
                   "-p", "no:cacheprovider", "--basetemp", str(Path(tmp) / "pytest")]
        if args.select:
            command += ["-k", args.select]
        started = time.perf_counter()
        status = subprocess.run(command, cwd=ROOT, env=env).returncode
        seconds = time.perf_counter() - started
        if not report_path.exists():
            print("no figures: the run ended before its final check", file=sys.stderr)
            return status or 1
        report = json.loads(report_path.read_text())
    report.update(seconds=round(seconds, 1), examples_per_rpc=args.examples,
                  pytest_exit_status=status)
    print()
    print_report(report)
    print(f"\n{report['cases']:,} cases and {report['reads']:,} reads in {seconds / 60:.1f} min")
    write_json(args.json, report)
    return status


if __name__ == "__main__":
    sys.exit(main())
