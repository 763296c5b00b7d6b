#!/bin/bash
# Regenerates the Go code of proto/ with the plugins pinned in go.mod's tool
# block (installed into .bin/) and the system protoc (Debian protobuf-compiler,
# installed when missing and apt is available).
set -euo pipefail
cd "$(dirname "$0")/.."
export GOTOOLCHAIN=local
if ! command -v protoc >/dev/null; then
  if command -v apt-get >/dev/null; then apt-get install -y protobuf-compiler >/dev/null || (apt-get update >/dev/null && apt-get install -y protobuf-compiler >/dev/null); fi
fi
command -v protoc >/dev/null || { echo "protogen: protoc not found (install protobuf-compiler)" >&2; exit 1; }
GOBIN=$PWD/.bin go install tool
PATH=$PWD/.bin:$PATH protoc -I proto \
  --go_out=proto --go_opt=paths=source_relative \
  --go-grpc_out=proto --go-grpc_opt=paths=source_relative \
  proto/qwenfleet/v1/generate.proto proto/worker/v1/worker.proto
echo "protogen: regenerated $(ls proto/*/v1/*.pb.go | wc -l) files"
