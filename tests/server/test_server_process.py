"""The privface-server process: starts, serves health, drains and exits 0 on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port),
                             "--data-dir", str(tmp_path / "data"), "--grace-seconds", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out and "stopped" in out
    assert (tmp_path / "data" / "privface.sqlite3").exists()
    token = (tmp_path / "data" / "vendor.token").read_text().strip()
    assert "created the vendor token" in out and token not in out  # the path, never the key


def test_help_lists_every_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--port", "--data-dir", "--max-photo-bytes", "--vendor-token", "PRIVFACE_"):
        assert flag in out
