#!/bin/sh
# Installs helm (v4.3.2, built from source with the Go toolchain) into .bin/helm, once:
# a later run finds .bin/helm and does nothing. The first build compiles for several minutes
# on 2 cores. HELM_VERSION overrides the version; the binary is checked with `helm version`.
set -eu
cd "$(dirname "$0")/.."
version=${HELM_VERSION:-v4.3.2}
bin=$PWD/.bin
if [ -x "$bin/helm" ] && "$bin/helm" version --short >/dev/null 2>&1; then
	echo "helm: $("$bin/helm" version --short) (cached in .bin/helm)"
	exit 0
fi
mkdir -p "$bin"
export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
major=$(echo "$version" | sed -e 's/^v\([0-9]*\).*/\1/')
pkg=helm.sh/helm/cmd/helm
[ "$major" -ge 3 ] && pkg=helm.sh/helm/v$major/cmd/helm
# Outside the module, so that the project's go.mod is left alone.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && GOBIN="$bin" GOFLAGS=-mod=mod go install "$pkg@$version")
"$bin/helm" version --short
