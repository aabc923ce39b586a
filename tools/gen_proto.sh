#!/usr/bin/env bash
# Generates Python + gRPC code (and .pyi stubs) from proto/ into libs/contracts/src. Never committed.
# --if-stale: do nothing when every generated file is newer than every .proto.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=libs/contracts/src
STAMP=$OUT/.generated
protos=$(find proto -name '*.proto' | sort)

if [ "${1:-}" = "--if-stale" ] && [ -f "$STAMP" ] && [ -z "$(find proto -name '*.proto' -newer "$STAMP")" ] \
   && [ "$(cat "$STAMP")" = "$(echo "$protos" | sha256sum)" ]; then
  exit 0
fi

find "$OUT" \( -name '*_pb2.py' -o -name '*_pb2.pyi' -o -name '*_pb2_grpc.py' \) -delete
.venv/bin/python -m grpc_tools.protoc -I proto \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" $protos
echo "$protos" | sha256sum > "$STAMP"
echo "proto: generated $(echo "$protos" | wc -l) files into $OUT"
