#!/usr/bin/env bash
# Regenerates the gRPC/protobuf stubs beside the .proto files (they are not committed).
set -euo pipefail
cd "$(dirname "$0")"
PY="${PYTHON:-python}"
"$PY" -m grpc_tools.protoc -I protos \
  --python_out=protos --pyi_out=protos --grpc_python_out=protos \
  protos/privface/v1/*.proto
