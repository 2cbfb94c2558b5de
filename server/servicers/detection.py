"""DetectorService: encrypted detector publishing and secure detection (thin)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import grpc

from common.errors import AuthenticationError, MalformedInputError
from privface.v1 import detection_pb2, detection_pb2_grpc
from server.auth import authenticate
from server.config import ServerConfig
from server.detection import DetectorRegistry
from server.errors import grpc_errors
from server.limits import ResourceLimits
from server.servicers.chunks import header_then_parts
from server.storage import Family, Store
from server.vendor_token import VendorToken

log = logging.getLogger(__name__)


class DetectorServicer(detection_pb2_grpc.DetectorServiceServicer):
    """Vendors publish encrypted cascades; families run them on encrypted windows."""

    def __init__(self, store: Store, registry: DetectorRegistry,
                 vendor_token: VendorToken, limits: ResourceLimits | None = None) -> None:
        self.store = store
        self.registry = registry
        self.vendor_token = vendor_token
        self.limits = limits or ResourceLimits.from_config(ServerConfig())

    def _check_vendor(self, context: grpc.ServicerContext) -> None:
        auth = dict(context.invocation_metadata()).get("authorization", "")
        if not isinstance(auth, str) or not auth.startswith("Bearer ") or \
                not self.vendor_token.matches(auth.removeprefix("Bearer ")):
            raise AuthenticationError(
                "publishing needs the server's current vendor token (privface-vendor publish "
                "--vendor-token-file FILE, or PRIVFACE_VENDOR_TOKEN)")

    @grpc_errors
    def PublishDetector(self, request_iterator: Iterator[detection_pb2.PublishDetectorRequest],
                        context: grpc.ServicerContext) -> detection_pb2.PublishDetectorResponse:
        self._check_vendor(context)
        with self.limits.streams.hold(None):  # a server-wide slot, before reading the body
            header, chunks = header_then_parts(request_iterator, "PublishDetector", "chunk")
            self.registry.publish(header, chunks)
        return detection_pb2.PublishDetectorResponse(detector_id=header.detector_id,
                                                     key_version=header.key_version)

    @grpc_errors
    def ListDetectors(self, request: detection_pb2.ListDetectorsRequest,
                      context: grpc.ServicerContext) -> detection_pb2.ListDetectorsResponse:
        return detection_pb2.ListDetectorsResponse(detectors=[
            detection_pb2.DetectorInfo(
                detector_id=h.detector_id, key_version=h.key_version,
                key_fingerprint=h.key_fingerprint, stage_count=len(h.stages),
                weak_count=sum(s.weak_count for s in h.stages), ciphertext_dim=h.ciphertext_dim,
                window_width=h.window_width, window_height=h.window_height)
            for h in self.registry.list()])

    @grpc_errors
    def DetectFaces(self, request_iterator: Iterator[detection_pb2.DetectFacesRequest],
                    context: grpc.ServicerContext) -> Iterator[detection_pb2.DetectFacesResponse]:
        family = authenticate(self.store, context)
        with self.limits.streams.hold(family.family_id):  # before waiting for the session
            yield from self._detect(family, request_iterator, context)

    def _detect(self, family: Family, request_iterator: Iterator[detection_pb2.DetectFacesRequest],
                context: grpc.ServicerContext) -> Iterator[detection_pb2.DetectFacesResponse]:
        first = next(request_iterator, None)
        if first is None or not first.HasField("session"):
            raise MalformedInputError("the first DetectFaces message must be the session")
        session = first.session
        cascade = self.registry.open_session(session.detector_id, session.key_version,
                                             session.key_fingerprint)
        windows = batches = 0
        try:
            for msg in request_iterator:
                if not msg.HasField("batch"):
                    raise MalformedInputError("only window batches may follow the session")
                if not context.is_active():  # cancelled or past its deadline: stop evaluating
                    return
                count = msg.batch.count
                if 1 <= count <= self.registry.max_window_batch:  # else evaluate() says why
                    self.limits.detect_windows.charge(family.family_id, count)
                result = self.registry.evaluate(cascade, msg.batch)
                windows += count
                batches += 1
                yield detection_pb2.DetectFacesResponse(
                    batch_id=msg.batch.batch_id, count=count,
                    outcomes=result.outcomes, server_ms=result.server_ms)
        finally:
            log.info("family %s: detection session on %s v%d: %d windows in %d batches%s",
                     family.family_id, session.detector_id, session.key_version, windows,
                     batches, "" if context.is_active() else " (cancelled)")
