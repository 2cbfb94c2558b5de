"""Request decoding that never ends in INTERNAL: bytes that are not a valid protobuf
message of the method's request type get INVALID_ARGUMENT and one log line.

grpcio decodes every request message with the method handler's ``request_deserializer``;
when that raises, grpcio answers INTERNAL ("Exception deserializing request!") and logs a
multi-line traceback, before any servicer code (and so before any credentials check) runs:
a cheap way for anyone to flood the log. :class:`RequestDecodingInterceptor` gives every
method a deserializer that never raises (it returns :data:`UNDECODABLE` instead) and a
behaviour that refuses that marker, for unary and streamed requests alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from common.errors import MalformedInputError

log = logging.getLogger(__name__)


class _Undecodable:
    """The type of :data:`UNDECODABLE`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "UNDECODABLE"


UNDECODABLE = _Undecodable()
"""What the safe deserializer returns for bytes its message type cannot parse."""


class UndecodableRequestError(MalformedInputError):
    """A streamed request message was not a valid protobuf message (INVALID_ARGUMENT)."""


def _safe(deserializer: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - whatever fails to parse is the caller's bad input
            return UNDECODABLE
    return deserialize


def _complaint(method: str) -> str:
    return (f"the request to {method} is not a valid protobuf message of its type: "
            "use the client generated from the privface protos")


def _refuse(context: grpc.ServicerContext, method: str) -> None:
    """Aborts with INVALID_ARGUMENT after one log line (no traceback)."""
    message = _complaint(method)
    log.info("INVALID_ARGUMENT: %s", message)
    context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)


def _checked(requests: Iterator[Any], method: str) -> Iterator[Any]:
    for request in requests:
        if request is UNDECODABLE:
            # Raised inside the servicer: its error mapping (server/errors.py) or, for a
            # servicer without one, the wrapper below turns it into INVALID_ARGUMENT.
            raise UndecodableRequestError(_complaint(method))
        yield request


def _wrap(handler: grpc.RpcMethodHandler, method: str,
          request_deserializer: Callable[[bytes], Any]) -> grpc.RpcMethodHandler:
    deserializer = _safe(request_deserializer)
    serializer = handler.response_serializer
    if handler.unary_unary is not None:
        unary_unary = handler.unary_unary

        def uu(request: Any, context: grpc.ServicerContext) -> Any:
            if request is UNDECODABLE:
                _refuse(context, method)
            return unary_unary(request, context)
        return grpc.unary_unary_rpc_method_handler(uu, deserializer, serializer)
    if handler.unary_stream is not None:
        unary_stream = handler.unary_stream

        def us(request: Any, context: grpc.ServicerContext) -> Any:
            if request is UNDECODABLE:
                _refuse(context, method)
            return unary_stream(request, context)
        return grpc.unary_stream_rpc_method_handler(us, deserializer, serializer)
    if handler.stream_unary is not None:
        stream_unary = handler.stream_unary

        def su(requests: Iterator[Any], context: grpc.ServicerContext) -> Any:
            try:
                return stream_unary(_checked(requests, method), context)
            except UndecodableRequestError:
                _refuse(context, method)
        return grpc.stream_unary_rpc_method_handler(su, deserializer, serializer)
    stream_stream = handler.stream_stream
    assert stream_stream is not None  # a handler has exactly one of the four behaviours

    def ss(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from stream_stream(_checked(requests, method), context)
        except UndecodableRequestError:
            _refuse(context, method)
    return grpc.stream_stream_rpc_method_handler(ss, deserializer, serializer)


class RequestDecodingInterceptor(grpc.ServerInterceptor):
    """Wraps every method handler (ours, health, reflection) with the safe decoding."""

    def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         grpc.RpcMethodHandler | None],
            handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        return _wrap(handler, handler_call_details.method, handler.request_deserializer)
