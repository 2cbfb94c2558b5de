"""The one place where domain errors become gRPC statuses."""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable
from typing import Any

import grpc

from common import errors

log = logging.getLogger(__name__)

STATUS_OF: list[tuple[type[Exception], grpc.StatusCode]] = [
    (errors.MalformedInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.KeyMismatchError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.PreconditionError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.NotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.AlreadyExistsError, grpc.StatusCode.ALREADY_EXISTS),
    # Before AuthenticationError, its base class: the first match wins.
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.AuthenticationError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.VersionConflictError, grpc.StatusCode.ABORTED),
    (errors.LimitExceededError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.StreamIdleError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.DecryptionError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.StorageUnavailableError, grpc.StatusCode.UNAVAILABLE),
]


MAX_LOGGED_CHARS = 500


def printable(text: str) -> str:
    """``text`` safe for one log line: control and other unprintable characters escaped
    (a client-chosen string can never start a forged line), cut at MAX_LOGGED_CHARS."""
    out = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
                  for ch in text[:MAX_LOGGED_CHARS])
    return out + "..." if len(text) > MAX_LOGGED_CHARS else out


def _abort(context: grpc.ServicerContext, exc: Exception) -> None:
    for cls, code in STATUS_OF:
        if isinstance(exc, cls):
            log.info("%s: %s", code.name, printable(str(exc)))
            context.abort(code, str(exc))
    log.error("internal error", exc_info=exc)
    context.abort(grpc.StatusCode.INTERNAL, "internal server error; the server log has details")


def grpc_errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Maps domain exceptions raised by a servicer method (unary or streaming) to aborts."""
    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
            try:
                yield from method(self, request, context)
            except errors.PrivfaceError as exc:
                _abort(context, exc)
            except Exception as exc:  # noqa: BLE001 - never leak a traceback as UNKNOWN
                if isinstance(exc, grpc.RpcError) or not context.is_active():
                    return
                _abort(context, exc)
        return stream_wrapper

    @functools.wraps(method)
    def unary_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except errors.PrivfaceError as exc:
            _abort(context, exc)
        except Exception as exc:  # never leak a traceback as UNKNOWN
            if isinstance(exc, grpc.RpcError) or not context.is_active():
                raise
            _abort(context, exc)
    return unary_wrapper
