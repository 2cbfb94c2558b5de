"""The privface-server process: starts (TLS, or plaintext only with --insecure), serves
health, drains and exits 0 on SIGTERM; its helper commands."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.tls import DevCerts
from tests.conftest import channel as tls_channel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVFACE_")}
    return {**env, **extra}


def test_sigterm_drains_and_exits_cleanly(tmp_path: Path, tls_certs: DevCerts) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port),
                             "--data-dir", str(tmp_path / "data"), "--grace-seconds", "1"],
                            env=_server_env(PRIVFACE_TLS_CERT=str(tls_certs.server_cert),
                                            PRIVFACE_TLS_KEY=str(tls_certs.server_key)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with tls_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            reply = health_pb2_grpc.HealthStub(ch).Check(
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
    assert "(TLS; data in" in out and "WARNING" not in out
    assert (tmp_path / "data" / "privface.sqlite3").exists()
    token = (tmp_path / "data" / "vendor.token").read_text().strip()
    assert "created the vendor token" in out and token not in out  # the path, never the key


def test_help_lists_every_flag_and_no_vendor_token_value_flag() -> None:
    out = subprocess.run([sys.executable, "-m", "server", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ("--port", "--data-dir", "--max-photo-bytes", "--tls-cert", "--tls-key",
                 "--tls-client-ca", "--insecure", "tls-init", "rotate-vendor-token",
                 "PRIVFACE_VENDOR_TOKEN", "PRIVFACE_"):
        assert flag in out
    assert "--vendor-token" not in out  # a secret on the command line shows in `ps`
    refused = subprocess.run([sys.executable, "-m", "server", "--vendor-token", "s3cret"],
                             capture_output=True, text=True, env=_server_env())
    assert refused.returncode == 2 and "unrecognized arguments" in refused.stderr


def test_refuses_to_start_without_tls_or_insecure(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "server", "--port", str(_free_port()),
                           "--data-dir", str(tmp_path / "data")], capture_output=True,
                          text=True, timeout=60, env=_server_env())
    assert proc.returncode == 2, proc.stderr
    assert "refusing to serve plaintext" in proc.stderr
    for fix in ("--tls-cert", "--tls-key", "privface-server tls-init", "--insecure"):
        assert fix in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "data").exists()  # refused before touching any storage


def test_insecure_server_starts_with_a_warning(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "server", "--port", str(port),
                             "--data-dir", str(tmp_path / "data")],
                            env=_server_env(PRIVFACE_INSECURE="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=30, wait_for_ready=True)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    warnings = [line for line in out.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "PLAINTEXT" in warnings[0] and "--insecure" in warnings[0]
    assert "(PLAINTEXT; data in" in out


def test_tls_init_writes_a_usable_certificate_set(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "server", "tls-init", str(tmp_path / "tls"),
                          "--host", "photos.example", "--host", "10.0.0.7"],
                         capture_output=True, text=True, check=True).stdout
    names = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "tls").iterdir()}
    assert names == {"ca.pem": 0o644, "server.pem": 0o644, "server.key": 0o600,
                     "client.pem": 0o644, "client.key": 0o600}
    assert "--tls-cert" in out and "PRIVFACE_TLS_CA" in out
    cert = x509.load_pem_x509_certificate((tmp_path / "tls" / "server.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "photos.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == [
        "127.0.0.1", "::1", "10.0.0.7"]
    ca = x509.load_pem_x509_certificate((tmp_path / "tls" / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert not list((tmp_path / "tls").glob("ca.key"))  # the CA key is never kept
