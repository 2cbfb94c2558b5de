"""Builds the gRPC server: servicers, health checking, reflection, message limits."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from privface.v1 import (
    detection_pb2,
    detection_pb2_grpc,
    faces_pb2,
    faces_pb2_grpc,
    family_pb2,
    family_pb2_grpc,
    photos_pb2,
    photos_pb2_grpc,
)
from server.admission import Admission
from server.config import ServerConfig
from server.decoding import RequestDecodingInterceptor
from server.detection import DetectorRegistry
from server.gallery import GalleryService
from server.health_check import StoreHealthServicer
from server.label_index import LabelSearch
from server.limits import ResourceLimits
from server.servicers.detection import DetectorServicer
from server.servicers.faces import FaceServicer
from server.servicers.family import FamilyServicer
from server.servicers.photos import PhotoServicer
from server.storage import open_store
from server.tls import server_credentials
from server.vendor_token import VendorToken

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    family_pb2.DESCRIPTOR.services_by_name["FamilyService"].full_name,
    photos_pb2.DESCRIPTOR.services_by_name["PhotoService"].full_name,
    faces_pb2.DESCRIPTOR.services_by_name["FaceService"].full_name,
    detection_pb2.DESCRIPTOR.services_by_name["DetectorService"].full_name,
]


def create_server(config: ServerConfig) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-ready (not yet started) server bound to config.address; returns its port.
    Serves TLS, or plaintext only with config.insecure (TransportConfigError otherwise)."""
    credentials = server_credentials(config)
    limits = ResourceLimits.from_config(config)  # refuses an impossible thread budget
    store = open_store(config.store, config.blobs, config.data_dir)
    # Alone on its store, nothing is in flight at start-up: every orphan goes. Shared, a
    # young orphan may be another server's upload whose row is about to commit.
    store.sweep_orphans(config.sweep_grace_seconds if config.shared_store else 0.0)
    search = LabelSearch(store)
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes)]
    # Admission first: refused addresses and idle streams are handled before anything else.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers),
                         options=options,
                         interceptors=[Admission(config), RequestDecodingInterceptor()],
                         maximum_concurrent_rpcs=config.max_concurrent_rpcs)
    gallery = GalleryService(store, config.max_gallery_entries)

    def forget_family(family_id: str) -> None:  # a deleted family leaves nothing in memory
        search.forget(family_id)
        gallery.forget(family_id)
        limits.forget(family_id)

    family_pb2_grpc.add_FamilyServiceServicer_to_server(
        FamilyServicer(store, config, on_context_change=gallery.forget, limits=limits,
                       on_family_deleted=forget_family, check_context=gallery.check_context),
        server)
    photos_pb2_grpc.add_PhotoServiceServicer_to_server(
        PhotoServicer(store, config, search, limits), server)
    faces_pb2_grpc.add_FaceServiceServicer_to_server(FaceServicer(store, gallery, limits), server)
    registry = DetectorRegistry(store, config.max_window_batch, config.max_detector_bytes)
    detection_pb2_grpc.add_DetectorServiceServicer_to_server(
        DetectorServicer(store, registry, VendorToken(config), limits), server)
    health_servicer = StoreHealthServicer(store)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in [*SERVICE_NAMES, ""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*SERVICE_NAMES, reflection.SERVICE_NAME], server)
    port = (server.add_insecure_port(config.address) if credentials is None
            else server.add_secure_port(config.address, credentials))
    if port == 0:
        raise OSError(f"cannot bind {config.address}")
    return server, port, health_servicer


def vendor_token(config: ServerConfig) -> str:
    """The token vendors publish detectors with now: PRIVFACE_VENDOR_TOKEN, else the one in
    <data_dir>/vendor.token, made on first use (mode 0600; its path is logged, never the
    token)."""
    return VendorToken(config).current()
