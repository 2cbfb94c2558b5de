"""privface-server: run the server until SIGTERM/SIGINT, then drain gracefully."""

from __future__ import annotations

import logging
import signal
import sys
import threading

from server.app import create_server
from server.config import parse_config

log = logging.getLogger("privface.server")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `privface-server` and `python -m server`."""
    config = parse_config(argv)
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server, port, health_servicer = create_server(config)
    server.start()
    log.info("privface-server listening on %s:%d (data in %s)", config.host, port,
             config.data_dir)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: draining for up to %.0f s", signal.Signals(signum).name,
                 config.grace_seconds)
        health_servicer.enter_graceful_shutdown()  # every service reports NOT_SERVING
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    stop.wait()
    server.stop(config.grace_seconds).wait()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
