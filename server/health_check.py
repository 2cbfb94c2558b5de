"""Health checking that reports NOT_SERVING while the store's database is unreachable, so a
load balancer stops sending calls to a replica that cannot answer them."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from common.errors import StorageUnavailableError
from server.storage import Store

log = logging.getLogger(__name__)

PING_EVERY_S = 1.0  # at most one database ping per second, however many checks come


class StoreHealthServicer(health.HealthServicer):
    """The standard health service, plus a (cached) database ping on every Check."""

    def __init__(self, store: Store) -> None:
        super().__init__()
        self._store = store
        self._ping_lock = threading.Lock()  # (the base class has its own _lock)
        self._checked_at = 0.0
        self._reachable = True
        self.store_description = store.describe()  # for the start-up log line

    def store_reachable(self) -> bool:
        """Whether the database answered its last ping (pinged at most every second)."""
        with self._ping_lock:
            if time.monotonic() - self._checked_at < PING_EVERY_S:
                return self._reachable
            try:
                self._store.db.ping()
                reachable = True
            except StorageUnavailableError as exc:
                reachable = False
                if self._reachable:
                    log.warning("health: NOT_SERVING, %s", exc)
            if reachable and not self._reachable:
                log.info("health: the database answers again, SERVING")
            self._reachable, self._checked_at = reachable, time.monotonic()
            return reachable

    def Check(self, request: health_pb2.HealthCheckRequest,
              context: grpc.ServicerContext) -> Any:
        if not self.store_reachable():
            return health_pb2.HealthCheckResponse(
                status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return super().Check(request, context)
