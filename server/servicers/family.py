"""FamilyService: registration and the public CKKS context."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from common import ckks
from common.errors import MalformedInputError
from privface.v1 import family_pb2, family_pb2_grpc
from server.auth import authenticate
from server.config import ServerConfig
from server.errors import grpc_errors
from server.uploads import CheckedChunks, check_limit
from server.storage import Store

log = logging.getLogger(__name__)

FINGERPRINT_BYTES = 16
MAX_LABEL_DIM = 4096


class FamilyServicer(family_pb2_grpc.FamilyServiceServicer):
    """Registration and key upload."""

    def __init__(self, store: Store, config: ServerConfig, on_context_change=None) -> None:
        self.store = store
        self.config = config
        self._on_context_change = on_context_change

    @grpc_errors
    def RegisterFamily(self, request: family_pb2.RegisterFamilyRequest,
                       context: grpc.ServicerContext) -> family_pb2.RegisterFamilyResponse:
        if len(request.label_key_fingerprint) != FINGERPRINT_BYTES:
            raise MalformedInputError(
                f"label_key_fingerprint must be {FINGERPRINT_BYTES} bytes")
        if not 2 <= request.label_ciphertext_dim <= MAX_LABEL_DIM:
            raise MalformedInputError(f"label_ciphertext_dim must be within 2..{MAX_LABEL_DIM}")
        family_id, token = self.store.create_family(request.label_key_fingerprint,
                                                    request.label_ciphertext_dim)
        log.info("registered family %s", family_id)
        return family_pb2.RegisterFamilyResponse(family_id=family_id, access_token=token)

    @grpc_errors
    def UploadPublicContext(self, request_iterator: Iterator[family_pb2.UploadPublicContextRequest],
                            context: grpc.ServicerContext
                            ) -> family_pb2.UploadPublicContextResponse:
        family = authenticate(self.store, context)
        first = next(request_iterator, None)
        if first is None:
            raise MalformedInputError("empty upload: send the context in chunks")
        check_limit(first.total_size, self.config.max_context_bytes, "public context")
        last_sha = [first.sha256]

        def chunks() -> Iterator[bytes]:
            yield first.chunk
            for msg in request_iterator:
                if msg.sha256:
                    last_sha[0] = msg.sha256
                yield msg.chunk

        checked = CheckedChunks(chunks(), first.total_size, "public context")
        # Validate before storing: it must parse as a CKKS context and hold no secret key.
        data = b"".join(checked)
        checked.verify(last_sha[0])
        try:
            public = ckks.load_public_context(data)
        except ValueError as exc:
            raise MalformedInputError(f"not a usable public CKKS context: {exc}") from exc
        galois = len(public.layout.rotation_steps)
        size = self.store.store_public_context(family.family_id, iter([data]))
        if self._on_context_change:
            self._on_context_change(family.family_id)
        log.info("family %s uploaded a public context of %d bytes", family.family_id, size)
        return family_pb2.UploadPublicContextResponse(size=size, galois_key_count=galois)

    @grpc_errors
    def GetFamily(self, request: family_pb2.GetFamilyRequest,
                  context: grpc.ServicerContext) -> family_pb2.GetFamilyResponse:
        family = authenticate(self.store, context)
        photos, entries = self.store.family_counts(family.family_id)
        return family_pb2.GetFamilyResponse(
            family_id=family.family_id, photo_count=photos, gallery_entry_count=entries,
            has_public_context=family.context_file is not None,
            label_key_fingerprint=family.label_key_fp, label_ciphertext_dim=family.label_dim)
