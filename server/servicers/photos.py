"""PhotoService: encrypted backup, encrypted label search, fetch, delete."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc
import numpy as np

from common import labels
from common.errors import KeyMismatchError, MalformedInputError
from privface.v1 import photos_pb2, photos_pb2_grpc
from server.auth import authenticate
from server.config import ServerConfig
from server.errors import grpc_errors
from server.label_index import LabelSearch
from server.limits import ResourceLimits
from server.servicers.chunks import header_then_parts
from server.storage import PHOTO_ID_RE, Family, Store
from server.uploads import CheckedChunks, check_limit

log = logging.getLogger(__name__)

FETCH_CHUNK_BYTES = 1024 * 1024
DEFAULT_PAGE = 1000
MAX_THUMBNAIL_BYTES = 1024 * 1024
MODES = {
    photos_pb2.MATCH_MODE_UNSPECIFIED: labels.MatchMode.ALL,
    photos_pb2.MATCH_MODE_ALL: labels.MatchMode.ALL,
    photos_pb2.MATCH_MODE_ANY: labels.MatchMode.ANY,
    photos_pb2.MATCH_MODE_RANKED: labels.MatchMode.RANKED,
}


def _check_photo_id(photo_id: str) -> None:
    if not PHOTO_ID_RE.fullmatch(photo_id):
        raise MalformedInputError("photo_id must be 32 lowercase hex characters")


def _pages(ids: list[str], page_size: int) -> Iterator[list[str]]:
    size = page_size or DEFAULT_PAGE
    for start in range(0, max(len(ids), 1), size):
        yield ids[start:start + size]


class PhotoServicer(photos_pb2_grpc.PhotoServiceServicer):
    """Photo storage and search for authenticated families."""

    def __init__(self, store: Store, config: ServerConfig, search: LabelSearch,
                 limits: ResourceLimits | None = None) -> None:
        self.store = store
        self.config = config
        self.search = search
        self.limits = limits or ResourceLimits.from_config(config)

    @grpc_errors
    def BackupPhoto(self, request_iterator: Iterator[photos_pb2.BackupPhotoRequest],
                    context: grpc.ServicerContext) -> photos_pb2.BackupPhotoResponse:
        family = authenticate(self.store, context)
        with self.limits.streams.hold(family.family_id):  # before waiting for the body
            return self._backup(family, request_iterator)

    def _backup(self, family: Family, request_iterator: Iterator[photos_pb2.BackupPhotoRequest]
                ) -> photos_pb2.BackupPhotoResponse:
        header, chunks = header_then_parts(request_iterator, "BackupPhoto", "chunk")
        _check_photo_id(header.photo_id)
        check_limit(header.blob_size, self.config.max_photo_bytes, "photo")
        check_limit(len(header.encrypted_thumbnail), MAX_THUMBNAIL_BYTES, "thumbnail")
        if header.label_key_fingerprint != family.label_key_fp:
            raise KeyMismatchError("the label vector was encrypted with another label key than "
                                   "the family's: use this family's bundle")
        vec = np.frombuffer(header.encrypted_labels, dtype="<f8") \
            if len(header.encrypted_labels) % 8 == 0 else np.empty(0)
        if vec.size != family.label_dim or not np.all(np.isfinite(vec)):
            raise MalformedInputError(
                f"encrypted_labels must be {family.label_dim} finite float64 values")
        if len(header.blob_sha256) != 32:
            raise MalformedInputError("blob_sha256 must be 32 bytes")
        if not self.store.has_photo(family.family_id, header.photo_id):  # a retry is answered
            # Refused before the body is read; put_photo checks again, exactly.
            self.limits.photos.check(*self.store.photo_usage(family.family_id),
                                     header.blob_size + len(header.encrypted_thumbnail))

        key = self.store.new_photo_key(family.family_id, header.photo_id)
        checked = CheckedChunks(chunks, header.blob_size, "photo blob")
        try:
            self.store.blobs.put(key, checked)
            checked.verify(header.blob_sha256)
        except BaseException:
            self.store.blobs.delete(key)  # a dropped or bad upload leaves nothing behind
            raise
        _, created = self.store.put_photo(
            family.family_id, header.photo_id, key, header.blob_size, header.blob_sha256,
            header.encrypted_labels, header.encrypted_thumbnail or None, self.limits.photos)
        if created:  # searches on any server see it from their next call (label_version)
            log.info("family %s stored photo %s (%d bytes)", family.family_id, header.photo_id,
                     header.blob_size)
        return photos_pb2.BackupPhotoResponse(photo_id=header.photo_id,
                                              already_stored=not created)

    @grpc_errors
    def SearchPhotos(self, request: photos_pb2.SearchPhotosRequest,
                     context: grpc.ServicerContext) -> Iterator[photos_pb2.SearchPhotosResponse]:
        family = authenticate(self.store, context)
        if request.mode not in MODES:
            raise MalformedInputError(f"unknown match mode {request.mode}")
        result = self.search.search(family, request.label_key_fingerprint,
                                    request.encrypted_query, MODES[request.mode], request.top_n)
        log.info("family %s search: %d matches in %.1f ms", family.family_id,
                 len(result.photo_ids), result.server_ms)
        for i, page in enumerate(_pages(result.photo_ids, request.page_size)):
            if not context.is_active():  # the phone gave up: send no more pages
                return
            yield photos_pb2.SearchPhotosResponse(
                photo_ids=page, total_matches=len(result.photo_ids),
                server_ms=result.server_ms if i == 0 else 0.0)

    @grpc_errors
    def FetchPhoto(self, request: photos_pb2.FetchPhotoRequest,
                   context: grpc.ServicerContext) -> Iterator[photos_pb2.FetchPhotoResponse]:
        family = authenticate(self.store, context)
        with self.limits.streams.hold(family.family_id):
            yield from self._fetch(family, request, context)

    def _fetch(self, family: Family, request: photos_pb2.FetchPhotoRequest,
               context: grpc.ServicerContext) -> Iterator[photos_pb2.FetchPhotoResponse]:
        _check_photo_id(request.photo_id)
        record = self.store.get_photo(family.family_id, request.photo_id)
        if request.thumbnail_only:
            if not record.thumbnail:
                raise MalformedInputError(f"photo {request.photo_id} has no thumbnail")
            yield photos_pb2.FetchPhotoResponse(blob_size=len(record.thumbnail),
                                                chunk=record.thumbnail)
            return
        chunks = self.store.blobs.open(record.blob_key, FETCH_CHUNK_BYTES)
        try:
            chunk = next(chunks, b"")  # the first message carries size and hash
            yield photos_pb2.FetchPhotoResponse(blob_size=record.blob_size,
                                                blob_sha256=record.blob_sha256, chunk=chunk)
            while context.is_active() and (chunk := next(chunks, b"")):
                yield photos_pb2.FetchPhotoResponse(chunk=chunk)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()

    @grpc_errors
    def DeletePhoto(self, request: photos_pb2.DeletePhotoRequest,
                    context: grpc.ServicerContext) -> photos_pb2.DeletePhotoResponse:
        family = authenticate(self.store, context)
        _check_photo_id(request.photo_id)
        self.store.delete_photo(family.family_id, request.photo_id)
        log.info("family %s deleted photo %s", family.family_id, request.photo_id)
        return photos_pb2.DeletePhotoResponse(photo_id=request.photo_id)

    @grpc_errors
    def ListPhotos(self, request: photos_pb2.ListPhotosRequest,
                   context: grpc.ServicerContext) -> Iterator[photos_pb2.ListPhotosResponse]:
        family = authenticate(self.store, context)
        for page in _pages(self.store.list_photo_ids(family.family_id), request.page_size):
            yield photos_pb2.ListPhotosResponse(photo_ids=page)
