"""Per-call family authentication from gRPC metadata."""

from __future__ import annotations

import grpc

from common.errors import AuthenticationError
from server.storage import Family, Store

FAMILY_HEADER = "x-privface-family"
AUTH_HEADER = "authorization"


def authenticate(store: Store, context: grpc.ServicerContext) -> Family:
    """The calling family and device, from `x-privface-family` and
    `authorization: Bearer <token>` (PERMISSION_DENIED for a revoked device)."""
    metadata = dict(context.invocation_metadata())
    family_id = metadata.get(FAMILY_HEADER, "")
    auth = metadata.get(AUTH_HEADER, "")
    # (bytes values only come with "-bin" headers: never valid credentials)
    if not isinstance(family_id, str) or not isinstance(auth, str) or not family_id \
            or not auth.startswith("Bearer "):
        raise AuthenticationError(
            "missing credentials: send x-privface-family and authorization: Bearer <token>")
    return store.authenticate(family_id, auth[len("Bearer "):])
