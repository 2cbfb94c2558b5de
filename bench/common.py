"""Small helpers shared by the benchmark scripts: timing, tables, JSON output, an
in-process server."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import grpc

    from client.config import ClientConfig


def median_ms(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn`` in milliseconds (after warm-up runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


@dataclass(frozen=True)
class LocalServer:
    """An in-process server and what its clients need."""

    server: grpc.Server
    address: str
    client_config: ClientConfig  # trusts the server's development CA
    vendor_token: str

    def stop(self) -> None:
        """Stops the server at once."""
        self.server.stop(0).wait()


def start_local_server(data_dir: Path) -> LocalServer:
    """A privface server in this process on 127.0.0.1, port 0, serving TLS with a
    development certificate made in ``data_dir``/tls, as a deployment would: the measured
    traffic is encrypted."""
    from client.config import ClientConfig
    from server.app import create_server, vendor_token
    from server.config import ServerConfig
    from server.tls import write_dev_certs

    certs = write_dev_certs(data_dir / "tls")
    config = ServerConfig(host="127.0.0.1", port=0, data_dir=data_dir,
                          tls_cert=certs.server_cert, tls_key=certs.server_key)
    server, port, _ = create_server(config)
    server.start()
    return LocalServer(server, f"127.0.0.1:{port}", ClientConfig(tls_ca=certs.ca),
                       vendor_token(config))


def print_table(headers: list[str], rows: list[list[Any]]) -> None:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def write_json(path: str | None, figures: dict[str, Any]) -> None:
    """Writes the figures with machine details, if a path was given."""
    if not path:
        return
    figures = dict(figures, machine=platform.platform(), python=platform.python_version(),
                   when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(figures, indent=2, sort_keys=True))
    print(f"wrote {path}")
