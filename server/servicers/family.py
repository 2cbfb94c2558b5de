"""FamilyService: registration, the public CKKS context, devices and sealed family items."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator

import grpc

from common import ckks
from common.errors import AuthenticationError, MalformedInputError, NotFoundError
from privface.v1 import family_pb2, family_pb2_grpc
from server.auth import authenticate
from server.config import ServerConfig
from server.errors import grpc_errors
from server.limits import ResourceLimits
from server.storage import BAD_INVITE, Family, Store
from server.uploads import CheckedChunks, check_limit

log = logging.getLogger(__name__)

FINGERPRINT_BYTES = 16
MAX_LABEL_DIM = 4096
MAX_SEALED_NAME_BYTES = 1024  # a sealed device name: a short name plus AES-GCM overhead
MAX_INVITE_TOKEN_CHARS = 256  # ours are 43; anything far longer is not one of ours
DEVICE_ID_RE = re.compile(r"[0-9a-f]{32}")
ITEM_NAME_RE = re.compile(r"[a-z0-9_-]{1,64}")
FAMILY_ID_RE = re.compile(r"fam_[0-9a-f]{24}")


def check_device_id(device_id: str) -> None:
    """INVALID_ARGUMENT unless the id is exactly 32 lowercase hex characters."""
    if not DEVICE_ID_RE.fullmatch(device_id):
        raise MalformedInputError("device_id must be exactly 32 lowercase hex characters")


def check_item_name(name: str) -> None:
    """INVALID_ARGUMENT unless the name is 1-64 of [a-z0-9_-]."""
    if not ITEM_NAME_RE.fullmatch(name):
        raise MalformedInputError(
            "sealed item names are 1-64 lowercase letters, digits, '-' or '_'")


def check_sealed_name(sealed_name: bytes) -> None:
    """INVALID_ARGUMENT for a sealed device name over MAX_SEALED_NAME_BYTES."""
    if len(sealed_name) > MAX_SEALED_NAME_BYTES:
        raise MalformedInputError(
            f"sealed_device_name must be at most {MAX_SEALED_NAME_BYTES} bytes")


class FamilyServicer(family_pb2_grpc.FamilyServiceServicer):
    """Registration, key upload, devices and sealed items."""

    def __init__(self, store: Store, config: ServerConfig, on_context_change=None,
                 limits: ResourceLimits | None = None,
                 on_family_deleted: Callable[[str], None] | None = None,
                 check_context: Callable[[str, ckks.PublicContext], None] | None = None
                 ) -> None:
        self.store = store
        self.config = config
        self._on_context_change = on_context_change
        self._check_context = check_context  # the stored gallery must load under a new context
        self.limits = limits or ResourceLimits.from_config(config)
        self._on_family_deleted = on_family_deleted  # evicts in-memory caches

    # -- registration and keys -----------------------------------------------------------

    @grpc_errors
    def RegisterFamily(self, request: family_pb2.RegisterFamilyRequest,
                       context: grpc.ServicerContext) -> family_pb2.RegisterFamilyResponse:
        if len(request.label_key_fingerprint) != FINGERPRINT_BYTES:
            raise MalformedInputError(
                f"label_key_fingerprint must be {FINGERPRINT_BYTES} bytes")
        if not 2 <= request.label_ciphertext_dim <= MAX_LABEL_DIM:
            raise MalformedInputError(f"label_ciphertext_dim must be within 2..{MAX_LABEL_DIM}")
        if request.device_id:  # empty: the server picks one
            check_device_id(request.device_id)
        check_sealed_name(request.sealed_device_name)
        family_id, token = self.store.create_family(
            request.label_key_fingerprint, request.label_ciphertext_dim,
            request.device_id, request.sealed_device_name)
        log.info("registered family %s", family_id)
        return family_pb2.RegisterFamilyResponse(family_id=family_id, access_token=token)

    @grpc_errors
    def UploadPublicContext(self, request_iterator: Iterator[family_pb2.UploadPublicContextRequest],
                            context: grpc.ServicerContext
                            ) -> family_pb2.UploadPublicContextResponse:
        family = authenticate(self.store, context)
        with self.limits.streams.hold(family.family_id):  # before waiting for the body
            return self._upload_context(family, request_iterator)

    def _upload_context(self, family: Family,
                        request_iterator: Iterator[family_pb2.UploadPublicContextRequest]
                        ) -> family_pb2.UploadPublicContextResponse:
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
        stored_key = self._context_key_id(family)  # the store's refusal needs it recorded
        # The store refuses another key under a gallery; a context claiming the family's key
        # must also fit the gallery (layout, scale, parameters), or no gallery call would work.
        if self._check_context and public.key_id == stored_key:
            self._check_context(family.family_id, public)
        size = self.store.store_public_context(family.family_id, data, public.key_id)
        if self._on_context_change:
            self._on_context_change(family.family_id)
        log.info("family %s uploaded a public context of %d bytes", family.family_id, size)
        return family_pb2.UploadPublicContextResponse(size=size, galois_key_count=galois)

    def _context_key_id(self, family: Family) -> bytes:
        """Key id of the stored public context (empty if none), recorded on first need for
        contexts uploaded before key ids were kept."""
        if family.ckks_key_id is not None or family.context_file is None:
            return family.ckks_key_id or b""
        try:
            data = self.store.public_context(family.family_id)
            key_id = ckks.load_public_context(data).key_id if data else b""
        except (NotFoundError, ValueError):
            log.warning("family %s: stored public context is unreadable", family.family_id)
            return b""
        self.store.set_ckks_key_id(family.family_id, key_id)
        return key_id

    @grpc_errors
    def GetFamily(self, request: family_pb2.GetFamilyRequest,
                  context: grpc.ServicerContext) -> family_pb2.GetFamilyResponse:
        family = authenticate(self.store, context)
        photos, entries = self.store.family_counts(family.family_id)
        return family_pb2.GetFamilyResponse(
            family_id=family.family_id, photo_count=photos, gallery_entry_count=entries,
            has_public_context=family.context_file is not None,
            label_key_fingerprint=family.label_key_fp, label_ciphertext_dim=family.label_dim,
            ckks_key_id=self._context_key_id(family), device_id=family.device_id)

    # -- sealed items --------------------------------------------------------------------

    @grpc_errors
    def GetSealedItem(self, request: family_pb2.GetSealedItemRequest,
                      context: grpc.ServicerContext) -> family_pb2.GetSealedItemResponse:
        family = authenticate(self.store, context)
        check_item_name(request.name)
        version, data = self.store.get_sealed(family.family_id, request.name)
        return family_pb2.GetSealedItemResponse(version=version, data=data)

    @grpc_errors
    def PutSealedItem(self, request: family_pb2.PutSealedItemRequest,
                      context: grpc.ServicerContext) -> family_pb2.PutSealedItemResponse:
        family = authenticate(self.store, context)
        check_item_name(request.name)
        check_limit(len(request.data), self.config.max_sealed_bytes, "sealed item")
        version = self.store.put_sealed(family.family_id, request.name,
                                        request.expected_version, request.data)
        log.info("family %s: device %s wrote sealed item %s (version %d, %d bytes)",
                 family.family_id, family.device_id, request.name, version, len(request.data))
        return family_pb2.PutSealedItemResponse(version=version)

    # -- devices -------------------------------------------------------------------------

    @grpc_errors
    def CreateDeviceInvite(self, request: family_pb2.CreateDeviceInviteRequest,
                           context: grpc.ServicerContext
                           ) -> family_pb2.CreateDeviceInviteResponse:
        family = authenticate(self.store, context)
        token, expires_at = self.store.create_invite(family.family_id, request.ttl_seconds,
                                                     created_by=family.device_id)
        log.info("family %s: device %s made an invitation (expires at %.0f)",
                 family.family_id, family.device_id, expires_at)
        return family_pb2.CreateDeviceInviteResponse(invite_token=token, expires_at=expires_at)

    @grpc_errors
    def JoinFamily(self, request: family_pb2.JoinFamilyRequest,
                   context: grpc.ServicerContext) -> family_pb2.JoinFamilyResponse:
        # Authenticated by the invitation, not metadata; a malformed family id or token
        # gets the same answer as a wrong one.
        if (not FAMILY_ID_RE.fullmatch(request.family_id) or not request.invite_token
                or len(request.invite_token) > MAX_INVITE_TOKEN_CHARS):
            raise AuthenticationError(BAD_INVITE)
        check_device_id(request.device_id)
        check_sealed_name(request.sealed_device_name)
        token = self.store.join_family(request.family_id, request.invite_token,
                                       request.device_id, request.sealed_device_name)
        log.info("family %s: device %s joined", request.family_id, request.device_id)
        return family_pb2.JoinFamilyResponse(access_token=token)

    @grpc_errors
    def ListDevices(self, request: family_pb2.ListDevicesRequest,
                    context: grpc.ServicerContext) -> family_pb2.ListDevicesResponse:
        family = authenticate(self.store, context)
        return family_pb2.ListDevicesResponse(devices=[
            family_pb2.DeviceInfo(device_id=d.device_id, sealed_name=d.sealed_name,
                                  created_at=d.created, last_seen_at=d.last_seen,
                                  revoked=d.revoked)
            for d in self.store.list_devices(family.family_id)])

    @grpc_errors
    def RevokeDevice(self, request: family_pb2.RevokeDeviceRequest,
                     context: grpc.ServicerContext) -> family_pb2.RevokeDeviceResponse:
        family = authenticate(self.store, context)
        check_device_id(request.device_id)
        if self.store.revoke_device(family.family_id, request.device_id, family.device_id):
            log.info("family %s: device %s revoked device %s", family.family_id,
                     family.device_id, request.device_id)
        return family_pb2.RevokeDeviceResponse()

    # -- deleting the family -------------------------------------------------------------

    @grpc_errors
    def DeleteFamily(self, request: family_pb2.DeleteFamilyRequest,
                     context: grpc.ServicerContext) -> family_pb2.DeleteFamilyResponse:
        family = authenticate(self.store, context)
        if request.confirm_family_id != family.family_id:
            raise MalformedInputError("confirm_family_id must be the calling family's own id: "
                                      "deleting a family needs that explicit confirmation")
        gone = self.store.delete_family(family.family_id)
        if self._on_family_deleted:
            self._on_family_deleted(family.family_id)
        log.info("family %s deleted by device %s: %d photos, %d gallery entries, %d devices, "
                 "%d sealed items, %d files", family.family_id, family.device_id, gone.photos,
                 gone.gallery_entries, gone.devices, gone.sealed_items, gone.files)
        return family_pb2.DeleteFamilyResponse(
            photos_deleted=gone.photos, gallery_entries_deleted=gone.gallery_entries,
            devices_deleted=gone.devices, sealed_items_deleted=gone.sealed_items)
