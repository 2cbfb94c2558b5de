"""A privface-server process on loopback that can be killed and restarted on the same port
and data directory (the crash test, the replica-kill load test) or watched for a crash (the
fuzz tests).

The process is ``python -m server`` (the installed ``privface-server``), TLS on a given
certificate (or plaintext when none is given), its log appended to one file across
restarts. Several of them may share one store (``store``/``blobs``: replicas).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.config import ClientConfig
from client.rpc import open_channel

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``python -m server`` on 127.0.0.1:``port`` over TLS with ``data_dir``.

    ``tls_cert``/``tls_key``/``tls_ca`` None: plaintext (``--insecure``). ``store`` and
    ``blobs``: ``--store``/``--blobs`` (a shared database and blob store: replicas);
    ``flags``: extra command-line flags; ``command``: the Python arguments that run the
    server instead of ``-m server`` (the crash test's faulty server for its negative
    control); ``env``: extra environment (PRIVFACE_* of the caller's shell are dropped)."""

    def __init__(self, data_dir: Path, tls_cert: Path | None, tls_key: Path | None,
                 tls_ca: Path | None, log_path: Path, port: int = 0,
                 flags: Sequence[str] = (), env: dict[str, str] | None = None,
                 command: Sequence[str] = ("-m", "server"), store: str = "",
                 blobs: str = "") -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = Path(log_path)
        if tls_cert is None or tls_key is None or tls_ca is None:
            self.client_config = ClientConfig(insecure=True)
            transport = ["--insecure"]
        else:
            self.client_config = ClientConfig(tls_ca=Path(tls_ca))
            transport = ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
        storage = [*(["--store", store] if store else []),
                   *(["--blobs", blobs] if blobs else [])]
        self._args = [sys.executable, *command, "--host", "127.0.0.1",
                      "--port", str(self.port), "--data-dir", str(self.data_dir),
                      *transport, *storage, *flags]
        base = {k: v for k, v in os.environ.items() if not k.startswith("PRIVFACE_")}
        self._env = {**base, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 60.0) -> None:
        """Starts the process and waits until it answers a health check."""
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self._args, cwd=ROOT, env=self._env, stdout=log,
                                            stderr=subprocess.STDOUT)
        self.starts += 1
        self.wait_healthy(timeout)

    def wait_healthy(self, timeout: float) -> None:
        """Returns once the server answers SERVING; RuntimeError if it exits or times out."""
        deadline = time.monotonic() + timeout
        with open_channel(self.address, self.client_config) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"privface-server exited with {self.process.returncode}"
                                       f":\n{self.log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"privface-server not healthy after {timeout:.0f} s:\n"
                                       f"{self.log_tail()}")
                time.sleep(0.05)

    def healthy(self, timeout: float = 10.0) -> bool:
        """Whether the process runs and answers a health check now."""
        if not self.alive():
            return False
        try:
            with open_channel(self.address, self.client_config) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=timeout)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def alive(self) -> bool:
        """Whether the process is running."""
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        """The running process's id (None before the first start)."""
        return self.process.pid if self.process is not None else None

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or closed by the server."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait (SIGKILL after ``timeout``); the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def log_text(self) -> str:
        """Everything the process (all its starts) logged."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the log."""
        return self.log_text()[-chars:]
