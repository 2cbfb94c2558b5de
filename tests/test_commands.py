"""The installed commands as a user runs them: `privface-server` as a process, then
`privface` (family, people, backup, search, list, fetch, delete) and `privface-vendor`
(keygen, publish, info) against it, and a clean exit on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

from server.tls import DevCerts

BIN = Path(sys.executable).parent
STARTUP_WAIT = 60.0  # seconds the server may take to start on a loaded machine
COMMAND_WAIT = 300  # seconds any one command may take


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server_process(data_dir: Path, certs: DevCerts, log_path: Path
                   ) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """`privface-server` on a free port over TLS; yields (process, address) once its log
    says it is listening. Killed if still running at the end."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVFACE_")}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "privface-server"), "--port", str(port), "--data-dir", str(data_dir),
             "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
             "--grace-seconds", "2"], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + STARTUP_WAIT
        while b"listening" not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "no 'listening' line:\n" + log_path.read_text()
            time.sleep(0.1)
        yield proc, f"127.0.0.1:{port}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run(command: str, *args: str | Path, env: dict[str, str]) -> str:
    """Runs an installed command; its stdout (fails the test with stderr on a non-zero
    exit)."""
    done = subprocess.run([str(BIN / command), *map(str, args)], capture_output=True,
                          text=True, env=env, timeout=COMMAND_WAIT)
    assert done.returncode == 0, f"{command} {args}: {done.returncode}\n{done.stderr}"
    return done.stdout


def write_photo(path: Path, seed: int, size: tuple[int, int]) -> bytes:
    """A decodable PNG of random pixels (noise does not compress: big sizes stay big)."""
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), pixels)
    return path.read_bytes()


@pytest.fixture
def client_env(tmp_path: Path) -> dict[str, str]:
    """The family phone's environment: bundle, passphrase, the test CA (inherited
    PRIVFACE_TLS_CA); no other PRIVFACE_ setting of the developer's shell."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PRIVFACE_") or k == "PRIVFACE_TLS_CA"}
    assert "PRIVFACE_TLS_CA" in env  # set for the session by tests/conftest.py
    env.update(PRIVFACE_BUNDLE=str(tmp_path / "family.bundle"),
               PRIVFACE_PASSPHRASE="a test passphrase")
    return env


def test_commands_against_a_server_process(tmp_path: Path, tls_certs: DevCerts,
                                           client_env: dict[str, str]) -> None:
    data_dir = tmp_path / "server"
    log_path = tmp_path / "server.log"
    photos = {name: write_photo(tmp_path / f"{name}.png", seed, size) for name, seed, size in
              [("small", 1, (48, 64)), ("big", 2, (700, 800)), ("tom", 3, (60, 80))]}
    assert len(photos["big"]) > 1024 * 1024  # more than one 1 MiB chunk each way
    with server_process(data_dir, tls_certs, log_path) as (proc, address):
        env = {**client_env, "PRIVFACE_SERVER": address}
        assert "family" in run("privface", "family", "create", "--capacity", "8", env=env)
        run("privface", "people", "add", "Mum", "Tom", env=env)
        assert {"Mum", "Tom"} <= set(run("privface", "people", "list", env=env).split())
        out = run("privface", "backup", tmp_path / "small.png", tmp_path / "big.png",
                  "--people", "Mum,Tom", env=env)
        ids = {line.split()[1]: line.split()[0] for line in out.splitlines()
               if line.split() and len(line.split()[0]) == 32}
        ids = {Path(path).stem: photo_id for path, photo_id in ids.items()}
        out = run("privface", "backup", tmp_path / "tom.png", "--people", "Tom", env=env)
        ids["tom"] = out.split()[0]
        assert set(ids) == {"small", "big", "tom"}

        both = run("privface", "search", "--people", "Mum,Tom", env=env).split()
        assert sorted(both) == sorted([ids["small"], ids["big"]])
        tom = run("privface", "search", "--people", "Tom", env=env).split()
        assert sorted(tom) == sorted(ids.values())
        assert sorted(run("privface", "list", env=env).split()) == sorted(ids.values())

        fetched = tmp_path / "fetched.png"
        run("privface", "fetch", ids["big"], "-o", fetched, env=env)
        assert fetched.read_bytes() == photos["big"]
        run("privface", "delete", ids["small"], env=env)
        assert run("privface", "search", "--people", "Mum", env=env).split() == [ids["big"]]
        shown = run("privface", "family", "show", env=env)
        assert "2" in shown

        key = tmp_path / "vendor.pfkey"
        run("privface-vendor", "keygen", "-o", key, "--prefix-stages", "0", env=env)
        out = run("privface-vendor", "publish", "--key", key, "--vendor-token-file",
                  data_dir / "vendor.token", env=env)
        assert "published frontalface_alt v1" in out
        info = run("privface-vendor", "info", env=env)
        assert "frontalface_alt v1: 22 stages, 2135 weak" in info
        run("privface", "detector", "import", key, env=env)

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=COMMAND_WAIT) == 0
    log = log_path.read_text()
    assert "received SIGTERM" in log and "stopped" in log
    assert "Traceback" not in log and "ERROR" not in log
    token = (data_dir / "vendor.token").read_text().strip()
    assert token not in log
