"""FaceService: the encrypted gallery and encrypted matching (thin: see server/gallery.py)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from common.errors import LimitExceededError, MalformedInputError
from privface.v1 import faces_pb2, faces_pb2_grpc
from server.auth import authenticate
from server.config import ServerConfig
from server.errors import grpc_errors
from server.gallery import GalleryService
from server.limits import ResourceLimits
from server.servicers.chunks import header_then_parts
from server.storage import Family, Store

log = logging.getLogger(__name__)


class FaceServicer(faces_pb2_grpc.FaceServiceServicer):
    """Gallery and matching for authenticated families."""

    def __init__(self, store: Store, gallery: GalleryService,
                 limits: ResourceLimits | None = None) -> None:
        self.store = store
        self.gallery = gallery
        self.streams = (limits or ResourceLimits.from_config(ServerConfig())).streams

    @grpc_errors
    def AddGalleryEntries(self, request: faces_pb2.AddGalleryEntriesRequest,
                          context: grpc.ServicerContext) -> faces_pb2.AddGalleryEntriesResponse:
        family = authenticate(self.store, context)
        total = self.gallery.add_entries(family, request.slot, request.block,
                                         request.first_position, request.count,
                                         list(request.ciphertexts.items))
        log.info("family %s: %d gallery entries added to block %d", family.family_id,
                 request.count, request.block)
        return faces_pb2.AddGalleryEntriesResponse(gallery_entry_count=total)

    @grpc_errors
    def RemoveGallerySlot(self, request: faces_pb2.RemoveGallerySlotRequest,
                          context: grpc.ServicerContext) -> faces_pb2.RemoveGallerySlotResponse:
        family = authenticate(self.store, context)
        return faces_pb2.RemoveGallerySlotResponse(
            removed=self.gallery.remove_slot(family, request.slot))

    @grpc_errors
    def GetGalleryLayout(self, request: faces_pb2.GetGalleryLayoutRequest,
                         context: grpc.ServicerContext) -> faces_pb2.GetGalleryLayoutResponse:
        family = authenticate(self.store, context)
        layout, blocks = self.gallery.layout(family)
        return faces_pb2.GetGalleryLayoutResponse(
            dims_per_ciphertext=layout.k, entries_per_block=layout.entries_per_block,
            blocks=[faces_pb2.GalleryBlock(block=b, position_slots=slots)
                    for b, slots in sorted(blocks.items())])

    @grpc_errors
    def GetGalleryBlock(self, request: faces_pb2.GetGalleryBlockRequest,
                        context: grpc.ServicerContext) -> faces_pb2.GetGalleryBlockResponse:
        family = authenticate(self.store, context)
        cts, slots = self.gallery.block(family, request.block)
        return faces_pb2.GetGalleryBlockResponse(
            ciphertexts=faces_pb2.Ciphertexts(items=cts), position_slots=slots)

    @grpc_errors
    def ReplaceGallery(self, request_iterator: Iterator[faces_pb2.ReplaceGalleryRequest],
                       context: grpc.ServicerContext) -> faces_pb2.ReplaceGalleryResponse:
        family = authenticate(self.store, context)
        with self.streams.hold(family.family_id):  # before waiting for the body
            return self._replace(family, request_iterator)

    def _replace(self, family: Family, request_iterator: Iterator[faces_pb2.ReplaceGalleryRequest]
                 ) -> faces_pb2.ReplaceGalleryResponse:
        header, parts = header_then_parts(request_iterator, "ReplaceGallery", "block")
        most = self.gallery.max_blocks(family)
        if header.block_count > most:
            raise LimitExceededError(f"a gallery of {header.block_count} blocks exceeds this "
                                     f"server's gallery quota ({most} blocks)")
        blocks: list[tuple[list[bytes], list[int]]] = []
        for b in parts:
            if len(blocks) == header.block_count:
                raise MalformedInputError(f"more blocks than the {header.block_count} the "
                                          "header announced")
            blocks.append((list(b.ciphertexts.items), list(b.slots)))
        if len(blocks) != header.block_count:
            raise MalformedInputError(f"{len(blocks)} blocks arrived, the header announced "
                                      f"{header.block_count}: retry")
        total = self.gallery.replace(family, header.expected_positions, blocks)
        log.info("family %s re-packed its gallery: %d blocks, %d entries", family.family_id,
                 len(blocks), total)
        return faces_pb2.ReplaceGalleryResponse(gallery_entry_count=total)

    @grpc_errors
    def MatchFaces(self, request: faces_pb2.MatchFacesRequest,
                   context: grpc.ServicerContext) -> Iterator[faces_pb2.MatchFacesResponse]:
        family = authenticate(self.store, context)
        faces = [list(face.items) for face in request.faces]
        evaluated = 0
        with self.streams.hold(family.family_id):
            try:
                # The gallery checks context.is_active() before every (face, block): a
                # cancelled call or a passed deadline stops the work, not just the sending.
                for result in self.gallery.match(family, faces, context.is_active):
                    evaluated += 1
                    yield faces_pb2.MatchFacesResponse(face=result.face, block=result.block,
                                                       distances=result.distances,
                                                       position_slots=result.position_slots)
            finally:
                if not context.is_active():
                    log.info("family %s: MatchFaces cancelled after %d (face, block) "
                             "evaluations", family.family_id, evaluated)
