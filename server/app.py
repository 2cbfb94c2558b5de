"""Builds the gRPC server: servicers, health checking, reflection, message limits."""

from __future__ import annotations

import logging
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from privface.v1 import (detection_pb2, detection_pb2_grpc, faces_pb2, faces_pb2_grpc,
                         family_pb2, family_pb2_grpc, photos_pb2, photos_pb2_grpc)
from server.config import ServerConfig
from server.label_index import LabelSearch
from server.gallery import GalleryService
from server.servicers.faces import FaceServicer
from server.servicers.family import FamilyServicer
from server.servicers.photos import PhotoServicer
from server.storage import Store

log = logging.getLogger(__name__)

SERVICE_NAMES = [
    family_pb2.DESCRIPTOR.services_by_name["FamilyService"].full_name,
    photos_pb2.DESCRIPTOR.services_by_name["PhotoService"].full_name,
    faces_pb2.DESCRIPTOR.services_by_name["FaceService"].full_name,
    detection_pb2.DESCRIPTOR.services_by_name["DetectorService"].full_name,
]


def create_server(config: ServerConfig) -> tuple[grpc.Server, int, health.HealthServicer]:
    """A started-ready (not yet started) server bound to config.address; returns its port."""
    store = Store(config.data_dir)
    store.sweep_orphans()
    search = LabelSearch(store)
    options = [("grpc.max_receive_message_length", config.max_message_bytes),
               ("grpc.max_send_message_length", config.max_message_bytes)]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.workers),
                         options=options)
    gallery = GalleryService(store)
    family_pb2_grpc.add_FamilyServiceServicer_to_server(
        FamilyServicer(store, config, on_context_change=gallery.forget), server)
    photos_pb2_grpc.add_PhotoServiceServicer_to_server(
        PhotoServicer(store, config, search), server)
    faces_pb2_grpc.add_FaceServiceServicer_to_server(FaceServicer(store, gallery), server)
    _add_optional_servicers(server, store, config)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in SERVICE_NAMES + [""]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(SERVICE_NAMES + [reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(config.address)
    if port == 0:
        raise OSError(f"cannot bind {config.address}")
    return server, port, health_servicer


def _add_optional_servicers(server: grpc.Server, store: Store, config: ServerConfig) -> None:
    """The detection servicer (registered when its module exists)."""
    try:
        from server.servicers.detection import DetectorServicer
    except ImportError:
        log.warning("DetectorService not available")
    else:
        detection_pb2_grpc.add_DetectorServiceServicer_to_server(
            DetectorServicer(store, config), server)
