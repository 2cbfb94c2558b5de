"""The server refuses a detector larger than its limit before reading it."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from client import vendor
from client.rpc import PrivfaceClient
from common import secure_cascade as sc
from common.cascade import load_cascade
from common.errors import LimitExceededError
from server.app import create_server, vendor_token


def test_oversized_detector_is_resource_exhausted(server_config) -> None:
    config = dataclasses.replace(server_config, max_detector_bytes=1024 * 1024)
    server, port, _ = create_server(config)
    server.start()
    try:
        cascade = load_cascade()
        key = sc.generate_product_key("frontalface_alt", cascade, prefix_stages=0,
                                      rng=np.random.default_rng(1))
        with PrivfaceClient(f"127.0.0.1:{port}") as client:
            with pytest.raises(LimitExceededError, match="detector matrix"):
                vendor.publish(client, cascade, key, vendor_token(config))
            assert client.list_detectors() == []
    finally:
        server.stop(0).wait()
