"""Thin client over the gRPC API: deadlines, chunking, credentials, error translation.

Nothing here sees a key: callers pass ciphertexts in and get ciphertexts out.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from common import errors
from privface.v1 import (detection_pb2, detection_pb2_grpc, faces_pb2, faces_pb2_grpc,
                         family_pb2, family_pb2_grpc, photos_pb2, photos_pb2_grpc)

CHUNK_BYTES = 1024 * 1024
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_TIMEOUT = 60.0
UPLOAD_TIMEOUT = 600.0

T = TypeVar("T")


class ServerUnavailableError(errors.PrivfaceError):
    """The server cannot be reached."""


_ERROR_OF = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.MalformedInputError,
    grpc.StatusCode.FAILED_PRECONDITION: errors.PreconditionError,
    grpc.StatusCode.NOT_FOUND: errors.NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExistsError,
    grpc.StatusCode.UNAUTHENTICATED: errors.AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: errors.AuthenticationError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.LimitExceededError,
}


class RemoteError(errors.PrivfaceError):
    """Any other server-side failure; carries the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code


def translate(exc: grpc.RpcError, address: str) -> errors.PrivfaceError:
    """A domain error for a gRPC failure (keeps the server's message)."""
    code, details = exc.code(), exc.details() or ""
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED) and \
            ("connect" in details.lower() or code is grpc.StatusCode.UNAVAILABLE):
        return ServerUnavailableError(
            f"cannot reach the privface server at {address} ({details}): is privface-server "
            "running there? (set --server or PRIVFACE_SERVER)")
    cls = _ERROR_OF.get(code)
    if cls is not None:
        return cls(details)
    return RemoteError(code, details)


@dataclass
class Credentials:
    """A family's id and access token."""

    family_id: str
    access_token: str

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("x-privface-family", self.family_id),
                ("authorization", f"Bearer {self.access_token}"))


class PrivfaceClient:
    """One channel to a server. Use as a context manager or call close()."""

    def __init__(self, address: str, credentials: Credentials | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.address = address
        self.credentials = credentials
        self.timeout = timeout
        self.channel = grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])
        self.family = family_pb2_grpc.FamilyServiceStub(self.channel)
        self.photos = photos_pb2_grpc.PhotoServiceStub(self.channel)
        self.faces = faces_pb2_grpc.FaceServiceStub(self.channel)
        self.detector = detection_pb2_grpc.DetectorServiceStub(self.channel)

    def __enter__(self) -> "PrivfaceClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self.channel.close()

    # -- plumbing ------------------------------------------------------------------------

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Credentials metadata; an error if the client has none."""
        if self.credentials is None:
            raise errors.AuthenticationError("this call needs a family: create one first")
        return self.credentials.metadata()

    def call(self, fn: Callable[..., T], request: Any, *, timeout: float | None = None,
             auth: bool = True, metadata: tuple[tuple[str, str], ...] | None = None) -> T:
        """A unary or client-streaming call with deadline, credentials (the family's, or
        ``metadata`` when given), translated errors."""
        if metadata is None and auth:
            metadata = self.metadata()
        try:
            return fn(request, timeout=timeout or self.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            raise translate(exc, self.address) from None

    def stream(self, fn: Callable[..., Iterator[T]], request: Any, *,
               timeout: float | None = None) -> Iterator[T]:
        """A server-streaming call; errors are translated while iterating."""
        try:
            yield from fn(request, timeout=timeout or self.timeout, metadata=self.metadata())
        except grpc.RpcError as exc:
            raise translate(exc, self.address) from None

    # -- family --------------------------------------------------------------------------

    def register_family(self, label_key_fingerprint: bytes, label_dim: int) -> Credentials:
        """Creates a family on the server; returns (and adopts) its credentials."""
        response = self.call(self.family.RegisterFamily, family_pb2.RegisterFamilyRequest(
            client_version="privface-cli/0.1", label_key_fingerprint=label_key_fingerprint,
            label_ciphertext_dim=label_dim), auth=False)
        self.credentials = Credentials(response.family_id, response.access_token)
        return self.credentials

    def get_family(self) -> family_pb2.GetFamilyResponse:
        """Counts the server holds for this family."""
        return self.call(self.family.GetFamily, family_pb2.GetFamilyRequest())

    def upload_public_context(self, data: bytes) -> family_pb2.UploadPublicContextResponse:
        """Uploads the public CKKS context in chunks."""
        digest = hashlib.sha256(data).digest()

        def requests() -> Iterator[family_pb2.UploadPublicContextRequest]:
            for start in range(0, max(len(data), 1), CHUNK_BYTES):
                last = start + CHUNK_BYTES >= len(data)
                yield family_pb2.UploadPublicContextRequest(
                    total_size=len(data), chunk=data[start:start + CHUNK_BYTES],
                    sha256=digest if last else b"")
        return self.call(self.family.UploadPublicContext, requests(), timeout=UPLOAD_TIMEOUT)

    # -- photos --------------------------------------------------------------------------

    def backup_photo(self, photo_id: str, blob: bytes, encrypted_labels: bytes,
                     label_key_fingerprint: bytes, encrypted_thumbnail: bytes = b""
                     ) -> photos_pb2.BackupPhotoResponse:
        """Uploads one encrypted photo (header, then 1 MiB chunks)."""
        header = photos_pb2.PhotoHeader(
            photo_id=photo_id, blob_size=len(blob), blob_sha256=hashlib.sha256(blob).digest(),
            encrypted_labels=encrypted_labels, label_key_fingerprint=label_key_fingerprint,
            encrypted_thumbnail=encrypted_thumbnail)

        def requests() -> Iterator[photos_pb2.BackupPhotoRequest]:
            yield photos_pb2.BackupPhotoRequest(header=header)
            for start in range(0, len(blob), CHUNK_BYTES):
                yield photos_pb2.BackupPhotoRequest(chunk=blob[start:start + CHUNK_BYTES])
        return self.call(self.photos.BackupPhoto, requests(), timeout=UPLOAD_TIMEOUT)

    def search_photos(self, encrypted_query: bytes, label_key_fingerprint: bytes,
                      mode: int = photos_pb2.MATCH_MODE_ALL, top_n: int = 0
                      ) -> tuple[list[str], float]:
        """All matching ids (pages joined) and the server's match time in ms."""
        ids: list[str] = []
        server_ms = 0.0
        for page in self.stream(self.photos.SearchPhotos, photos_pb2.SearchPhotosRequest(
                encrypted_query=encrypted_query, label_key_fingerprint=label_key_fingerprint,
                mode=mode, top_n=top_n)):
            ids.extend(page.photo_ids)
            server_ms = max(server_ms, page.server_ms)
        return ids, server_ms

    def fetch_photo(self, photo_id: str, thumbnail_only: bool = False) -> bytes:
        """Downloads one encrypted blob and checks its SHA-256."""
        parts, expected = [], b""
        for msg in self.stream(self.photos.FetchPhoto, photos_pb2.FetchPhotoRequest(
                photo_id=photo_id, thumbnail_only=thumbnail_only), timeout=UPLOAD_TIMEOUT):
            if msg.blob_sha256:
                expected = msg.blob_sha256
            parts.append(msg.chunk)
        blob = b"".join(parts)
        if expected and hashlib.sha256(blob).digest() != expected:
            raise errors.DecryptionError(f"photo {photo_id} arrived corrupted: retry")
        return blob

    def delete_photo(self, photo_id: str) -> None:
        """Deletes one photo."""
        self.call(self.photos.DeletePhoto, photos_pb2.DeletePhotoRequest(photo_id=photo_id))

    def list_photos(self) -> list[str]:
        """All photo ids, newest first."""
        ids: list[str] = []
        for page in self.stream(self.photos.ListPhotos, photos_pb2.ListPhotosRequest()):
            ids.extend(page.photo_ids)
        return ids

    # -- faces ---------------------------------------------------------------------------

    def gallery_layout(self) -> faces_pb2.GetGalleryLayoutResponse:
        """The gallery's blocks and their position slots."""
        return self.call(self.faces.GetGalleryLayout, faces_pb2.GetGalleryLayoutRequest())

    def add_gallery_entries(self, slot: int, block: int, first_position: int, count: int,
                            ciphertexts: list[bytes]) -> int:
        """Adds encrypted entries; returns the gallery's entry count."""
        return self.call(self.faces.AddGalleryEntries, faces_pb2.AddGalleryEntriesRequest(
            slot=slot, block=block, first_position=first_position, count=count,
            ciphertexts=faces_pb2.Ciphertexts(items=ciphertexts)),
            timeout=UPLOAD_TIMEOUT).gallery_entry_count

    def remove_gallery_slot(self, slot: int) -> int:
        """Marks a member's gallery entries dead; returns how many."""
        return self.call(self.faces.RemoveGallerySlot,
                         faces_pb2.RemoveGallerySlotRequest(slot=slot)).removed

    def match_faces(self, faces: list[list[bytes]]) -> list[faces_pb2.MatchFacesResponse]:
        """Encrypted distances of each face to each gallery block."""
        request = faces_pb2.MatchFacesRequest(faces=[faces_pb2.Ciphertexts(items=f)
                                                     for f in faces])
        return list(self.stream(self.faces.MatchFaces, request, timeout=UPLOAD_TIMEOUT))

    # -- detectors -----------------------------------------------------------------------

    def publish_detector(self, header: detection_pb2.DetectorHeader, matrix: bytes,
                         vendor_token: str) -> detection_pb2.PublishDetectorResponse:
        """Uploads an encrypted detector (header, then 1 MiB chunks) with the vendor token."""
        def requests() -> Iterator[detection_pb2.PublishDetectorRequest]:
            yield detection_pb2.PublishDetectorRequest(header=header)
            for start in range(0, len(matrix), CHUNK_BYTES):
                yield detection_pb2.PublishDetectorRequest(chunk=matrix[start:start + CHUNK_BYTES])
        return self.call(self.detector.PublishDetector, requests(), timeout=UPLOAD_TIMEOUT,
                         metadata=(("authorization", f"Bearer {vendor_token}"),))

    def list_detectors(self) -> list[detection_pb2.DetectorInfo]:
        """Published detectors (public descriptions only)."""
        return list(self.call(self.detector.ListDetectors, detection_pb2.ListDetectorsRequest(),
                              auth=False).detectors)

    def gallery_block(self, block: int) -> faces_pb2.GetGalleryBlockResponse:
        """One block's ciphertexts and position slots."""
        return self.call(self.faces.GetGalleryBlock,
                         faces_pb2.GetGalleryBlockRequest(block=block), timeout=UPLOAD_TIMEOUT)

    def replace_gallery(self, expected_positions: int,
                        blocks: list[tuple[list[bytes], list[int]]]) -> int:
        """Swaps in a re-packed gallery; returns the live entry count."""
        def requests() -> Iterator[faces_pb2.ReplaceGalleryRequest]:
            yield faces_pb2.ReplaceGalleryRequest(header=faces_pb2.ReplaceGalleryHeader(
                expected_positions=expected_positions, block_count=len(blocks)))
            for cts, slots in blocks:
                yield faces_pb2.ReplaceGalleryRequest(block=faces_pb2.ReplacementBlock(
                    ciphertexts=faces_pb2.Ciphertexts(items=cts), slots=slots))
        return self.call(self.faces.ReplaceGallery, requests(),
                         timeout=UPLOAD_TIMEOUT).gallery_entry_count
