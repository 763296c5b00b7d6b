#!/bin/sh
# The project's tests, as CI runs them (.ci/run calls exactly this script):
# formatting, vet, a clean go.mod, the macOS build of the commands, the race
# detector on every package whose tests finish under it in CI's budget, then
# every test. Every go test has a -timeout. Run from anywhere.
set -eu
cd "$(dirname "$0")/.."
export GOTOOLCHAIN=local

echo "== gofmt"
bad=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go'))
if [ -n "$bad" ]; then
	echo "not gofmt-clean:"
	echo "$bad"
	exit 1
fi

echo "== go vet ./..."
go vet ./...

echo "== go mod tidy -diff"
go mod tidy -diff

echo "== GOOS=darwin go build ./cmd/..."
GOOS=darwin go build -o /dev/null ./cmd/... 2>&1 || { echo "the commands do not build for macOS"; exit 1; }

# The race detector slows tests 5-20x: it runs on the pure packages, the
# etcd store and the worker executor, and pkg/server's in-process tests
# (-short skips the ones that start worker processes). About 3 minutes on
# 2 cores.
echo "== go test -race"
go test -race -count=1 -timeout 20m \
	./pkg/control ./pkg/routing ./pkg/kvcache ./pkg/sampling ./pkg/shard ./pkg/cluster/... \
	./pkg/expertparallel ./pkg/placement ./pkg/tokenizer ./pkg/model ./pkg/steps ./pkg/supervise
go test -race -short -count=1 -timeout 20m ./pkg/server

echo "== go test ./..."
go test -count=1 -timeout 30m ./...
