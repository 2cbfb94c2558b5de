"""Admission control for every call: per-address limits, lockouts and stalled calls.

The gRPC server here is synchronous: every call holds one worker thread from the moment
it arrives until it ends, including while it waits for a client. One interceptor
(:class:`Admission`, outermost) wraps every method, health and reflection included:

* every method is served as a request-streaming handler and this interceptor reads the
  request itself: gRPC would otherwise wait for a unary call's request message on a
  worker thread with no timeout, before any code of ours runs;
* calls in flight per peer address are capped (``max_calls_per_address``);
* an address that failed authentication too often is refused for a while, every call
  but health checks (RESOURCE_EXHAUSTED); failures are counted from the status each call
  ends with (UNAUTHENTICATED), so wrong family tokens, invitations and vendor tokens all
  count; RegisterFamily is rate-limited per address;
* a client stream that sends nothing for ``stream_idle_seconds`` ends with
  DEADLINE_EXCEEDED (:class:`IdleRequests`); a unary request that never arrives, or a
  response the client never reads, is cancelled after as long (:class:`StallWatchdog`);
* unauthenticated long calls (health Watch, reflection) have their own small pool;
* one log line per refusal, with the peer address (never a token).

Family streams take their slots in the servicers, after authentication (server/limits.py).
The thread budget is explained in docs/design.md ("Bounded resources").
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from typing import Any

import grpc

from common.errors import LimitExceededError, StreamIdleError
from server.config import ServerConfig
from server.limits import AddressSlots, Lockout, SlidingWindow, StreamSlots, peer_host

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_PREFIX = "grpc.reflection."
REGISTER_METHOD = "/privface.v1.FamilyService/RegisterFamily"

_END = object()


class IdleRequests:
    """A request iterator that gives up when no message arrives for ``idle_seconds``.

    gRPC's own iterator blocks without a timeout, so a helper thread reads it, one message
    per demand (never ahead: flow control and memory stay as they were), and the handler
    waits for that message with a timeout. ``close()`` ends the helper thread."""

    def __init__(self, requests: Iterator[Any], idle_seconds: float) -> None:
        self._requests = requests
        self.idle_seconds = idle_seconds
        self._want: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._got: queue.SimpleQueue[tuple[Any, BaseException | None]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._done = False

    def __iter__(self) -> IdleRequests:
        return self

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if self._thread is None:
            self._thread = threading.Thread(target=self._pump, name="privface-stream-reader",
                                            daemon=True)
            self._thread.start()
        self._want.put(True)
        try:
            item, error = self._got.get(timeout=self.idle_seconds)
        except queue.Empty:
            self.close()
            raise StreamIdleError(
                f"no message arrived for {self.idle_seconds:g} s, so the server closed the "
                "stream: check the connection and retry") from None
        if error is not None:
            self.close()
            raise error
        if item is _END:
            self.close()
            raise StopIteration
        return item

    def _pump(self) -> None:
        while self._want.get():
            try:
                item: tuple[Any, BaseException | None] = (next(self._requests), None)
            except StopIteration:
                item = (_END, None)
            except BaseException as exc:  # noqa: BLE001 - handed to the handler's thread
                item = (None, exc)
            self._got.put(item)
            if item[0] is None or item[0] is _END:
                return

    def close(self) -> None:
        """No more messages will be asked for: the helper thread ends (once gRPC's own
        iterator returns, at the latest when the call is over)."""
        self._done = True
        self._want.put(False)


class StallWatchdog:
    """Cancels calls stuck longer than ``idle_seconds`` in a wait gRPC gives no timeout
    for: a send to a client whose flow-control window stays full (it reads nothing), or a
    unary call's request message that never arrives. Calls mark when they start and stop
    waiting; one thread (running only while calls wait) cancels the stuck ones, which
    gives their worker threads back."""

    def __init__(self, idle_seconds: float) -> None:
        self.idle_seconds = idle_seconds
        self._waiting: dict[int, tuple[float, grpc.ServicerContext, str, str]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @contextmanager
    def waiting(self, context: grpc.ServicerContext, method: str, stuck: str) -> Iterator[None]:
        """Watches the block; ``stuck`` says what it means when it lasts too long."""
        key = next(self._ids)
        with self._lock:
            self._waiting[key] = (time.monotonic(), context, method, stuck)
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, daemon=True,
                                                name="privface-stall-watchdog")
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._waiting.pop(key, None)

    def _watch(self) -> None:
        tick = min(1.0, self.idle_seconds / 4)
        while True:
            time.sleep(tick)
            now = time.monotonic()
            with self._lock:
                if not self._waiting:
                    self._thread = None
                    return
                stale = [k for k, (since, *_rest) in self._waiting.items()
                         if now - since > self.idle_seconds]
                cancel = [self._waiting.pop(k) for k in stale]
            for _since, context, method, stuck in cancel:
                log.warning("cancelled %s from %s: %s for %g s", method, context.peer(), stuck,
                            self.idle_seconds)
                context.cancel()


class Admission(grpc.ServerInterceptor):
    """The interceptor described in the module docstring."""

    def __init__(self, config: ServerConfig, clock: Callable[[], float] = time.monotonic
                 ) -> None:
        self.idle_seconds = config.stream_idle_seconds
        self.registrations = SlidingWindow(config.register_per_minute, 60.0, clock)
        self.auth_failures = SlidingWindow(config.auth_failures_per_minute, 60.0, clock)
        self.lockout = Lockout(config.auth_lockout_seconds, clock)
        self.per_address = AddressSlots(config.max_calls_per_address)
        self.public_streams = StreamSlots(config.max_public_streams, config.max_public_streams)
        self.watchdog = StallWatchdog(config.stream_idle_seconds)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                       grpc.RpcMethodHandler | None],
                          handler_call_details: grpc.HandlerCallDetails
                          ) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        return self._wrap(handler, handler_call_details.method)

    # -- admission and accounting --------------------------------------------------------

    def _refuse(self, context: grpc.ServicerContext, method: str, message: str) -> None:
        log.warning("refused %s from %s: %s", method, context.peer(), message)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    @contextmanager
    def _call(self, method: str, context: grpc.ServicerContext, health: bool
              ) -> Iterator[None]:
        """One call from admission to accounting, holding one of its address's slots."""
        host = peer_host(context.peer())
        with ExitStack() as slot:
            try:
                slot.enter_context(self.per_address.hold(host))
            except LimitExceededError as exc:
                self._refuse(context, method, str(exc))
            if not health:  # health checks always answer, even a locked-out address
                self._admit(method, context, host)
            try:
                yield
            finally:
                self._account(method, context, host)

    def _admit(self, method: str, context: grpc.ServicerContext, host: str) -> None:
        left = self.lockout.remaining(host)
        if left > 0:
            self._refuse(context, method,
                         f"too many failed authentications from {host}: this address is "
                         f"refused for {left:.0f} more s; check the family bundle's (or the "
                         "vendor's) credentials, then retry")
        if method == REGISTER_METHOD:
            allowed, count = self.registrations.allow(host)
            if not allowed:
                self._refuse(context, method,
                             f"too many family registrations from {host}: {count} in the last "
                             f"60 s (limit {self.registrations.limit} per minute); retry in a "
                             "minute")

    def _account(self, method: str, context: grpc.ServicerContext, host: str) -> None:
        """Looks at how a call ended: counts failed authentications, logs refusals."""
        code = context.code()  # type: ignore[attr-defined]  # set by abort()
        if code is grpc.StatusCode.UNAUTHENTICATED:
            failures = self.auth_failures.hit(host)
            if failures >= self.auth_failures.limit and not self.lockout.remaining(host):
                self.lockout.lock(host)
                log.warning("locked out %s for %g s after %d failed authentications in 60 s "
                            "(last: %s)", context.peer(), self.lockout.seconds, failures,
                            method)
        elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
            details = context.details()  # type: ignore[attr-defined]
            log.warning("refused %s from %s: %s", method, context.peer(),
                        details.decode(errors="replace") if isinstance(details, bytes)
                        else details)

    def _first(self, requests: Iterator[Any], context: grpc.ServicerContext, method: str
               ) -> Any:
        """The one request message of a unary call (read here, under the watchdog, rather
        than by gRPC on a worker thread with no timeout)."""
        with self.watchdog.waiting(context, method, "no request message arrived"):
            request = next(requests, _END)
        if request is _END:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"{method} takes exactly one request message")
        return request

    # -- wrapping ------------------------------------------------------------------------

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The same method as a request-streaming handler: gRPC then starts it as soon as
        the call arrives (it would wait for a unary request message with no timeout on a
        worker thread), and this interceptor reads the request itself."""
        health = method.startswith(f"/{HEALTH_SERVICE}/")
        # Unauthenticated long calls (health Watch, reflection) share their own small pool.
        public = health or method.startswith(f"/{REFLECTION_PREFIX}")
        unary_request = not handler.request_streaming
        deserializer = handler.request_deserializer
        serializer = handler.response_serializer
        if handler.response_streaming:
            streamed = handler.unary_stream if unary_request else handler.stream_stream
            assert streamed is not None  # a handler has exactly one of the four behaviours

            def stream_behavior(requests: Iterator[Any], context: grpc.ServicerContext
                                ) -> Iterator[Any]:
                return self._streamed(streamed, requests, context, method, unary_request,
                                      health, public)
            return grpc.stream_stream_rpc_method_handler(stream_behavior, deserializer,
                                                         serializer)

        unary = handler.unary_unary if unary_request else handler.stream_unary
        assert unary is not None

        def unary_behavior(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            with self._call(method, context, health):
                if unary_request:
                    return unary(self._first(requests, context, method), context)
                with closing(IdleRequests(requests, self.idle_seconds)) as idle:
                    try:
                        return unary(idle, context)
                    except StreamIdleError as exc:  # a handler that does not map domain errors
                        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        return grpc.stream_unary_rpc_method_handler(unary_behavior, deserializer, serializer)

    def _streamed(self, inner: Callable[[Any, grpc.ServicerContext], Iterator[Any]],
                  requests: Iterator[Any], context: grpc.ServicerContext, method: str,
                  unary_request: bool, health: bool, public: bool) -> Iterator[Any]:
        with self._call(method, context, health), ExitStack() as stack:
            if public:
                try:
                    stack.enter_context(self.public_streams.hold(None))
                except LimitExceededError as exc:
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            if unary_request:
                request = self._first(requests, context, method)
            else:
                request = stack.enter_context(closing(IdleRequests(requests, self.idle_seconds)))
            try:
                for response in inner(request, context):
                    with self.watchdog.waiting(context, method, "the client read nothing"):
                        yield response
            except StreamIdleError as exc:  # a handler that does not map domain errors
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
