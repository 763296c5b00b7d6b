#!/bin/sh
# Builds the container images with no registry: the Go binaries are built
# here (static: CGO_ENABLED=0, -trimpath), then each image is built FROM
# scratch (deploy/images/*.Dockerfile) with a build dir as its context, which
# holds the binaries and the few files they need (a passwd line for the
# non-root user 65532, the host's CA certificates, an empty /tmp, data dirs
# owned by the user). Nothing is pulled.
#
#   scripts/build-images.sh            # qwenfleet/{coordinator,worker,qwenctl,etcd}:VERSION and :latest
#   scripts/build-images.sh --cuda     # also qwenfleet/worker-cuda (deploy/cuda/Dockerfile: pulls its
#                                      # NVIDIA CUDA base image, so it needs a registry)
#
# VERSION is pkg/server/api.go's `const Version`. Environment:
#   QWENFLEET_IMAGE_PREFIX   image name prefix (default qwenfleet: qwenfleet/coordinator, ...)
#   QWENFLEET_IMAGE_BUILD    the build dir (default .bin/images, git-ignored)
#   DOCKER                   the docker command (default docker)
set -eu
cd "$(dirname "$0")/.."
export GOTOOLCHAIN=local

cuda=0
for a in "$@"; do
	case "$a" in
	--cuda) cuda=1 ;;
	-h | --help)
		sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*)
		echo "build-images: unknown argument $a (see --help)" >&2
		exit 2
		;;
	esac
done

die() {
	echo "build-images: $*" >&2
	exit 1
}

version=$(sed -n 's/^const Version = "\([^"]*\)".*/\1/p' pkg/server/api.go)
[ -n "$version" ] || die "no const Version in pkg/server/api.go"
prefix=${QWENFLEET_IMAGE_PREFIX:-qwenfleet}
build=${QWENFLEET_IMAGE_BUILD:-.bin/images}
docker=${DOCKER:-docker}
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
uid=65532

$docker info >/dev/null 2>&1 || die "no Docker engine answers ($docker info failed)"

# One build at a time in a build dir (go test ./deploy/... runs the compose and the chart
# tests at once, and each builds the images): the second waits for the first.
mkdir -p "$(dirname "$build")"
if command -v flock >/dev/null 2>&1; then
	exec 9>"$build.lock"
	flock 9
fi

echo "== go build (CGO_ENABLED=0, -trimpath) into $build/bin"
rm -rf "$build"
mkdir -p "$build/bin"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$build/bin/" \
	./cmd/coordinator ./cmd/worker ./cmd/qwenctl ./cmd/etcd ./deploy/composetool

# What every image holds besides its binaries.
root="$build/common/rootfs"
owned="$build/common/owned"
mkdir -p "$root/etc/ssl/certs" "$root/tmp"
chmod 1777 "$root/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nqwenfleet:x:%d:%d:qwenfleet:/home/qwenfleet:/sbin/nologin\n' $uid $uid >"$root/etc/passwd"
printf 'root:x:0:\nqwenfleet:x:%d:\n' $uid >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
for f in /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt /etc/ssl/cert.pem; do
	if [ -f "$f" ]; then
		cp "$f" "$root/etc/ssl/certs/ca-certificates.crt"
		break
	fi
done
[ -f "$root/etc/ssl/certs/ca-certificates.crt" ] || echo "build-images: no CA certificates on this host: the images get none" >&2
chmod 644 "$root/etc/passwd" "$root/etc/group" "$root/etc/nsswitch.conf"
for d in home/qwenfleet data tls keys models; do
	mkdir -p "$owned/$d"
done
chmod 700 "$owned/home/qwenfleet" "$owned/data" "$owned/tls" "$owned/keys"
chmod 755 "$owned/models" "$owned/home"

# image NAME BINARIES...: a context of its own (the classic builder sends the
# whole context: only what the image needs), tagged VERSION and latest.
image() {
	name=$1
	shift
	ctx="$build/ctx/$name"
	mkdir -p "$ctx"
	cp -a "$root" "$owned" "$ctx/"
	for b in "$@"; do
		ln "$build/bin/$b" "$ctx/$b" 2>/dev/null || cp "$build/bin/$b" "$ctx/$b"
	done
	echo "== $prefix/$name:$version"
	$docker build -q -f "deploy/images/$name.Dockerfile" --build-arg VERSION="$version" --build-arg REVISION="$revision" \
		-t "$prefix/$name:$version" -t "$prefix/$name:latest" "$ctx" >/dev/null ||
		die "docker build of $prefix/$name failed"
}
image coordinator coordinator
image worker worker
image qwenctl qwenctl composetool
image etcd etcd

if [ $cuda = 1 ]; then
	echo "== go build -tags cuda ./cmd/worker (glibc: loads libcuda and NVRTC at run time)"
	ctx="$build/ctx/worker-cuda"
	mkdir -p "$ctx"
	CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -tags cuda -o "$ctx/worker" ./cmd/worker
	echo "== $prefix/worker-cuda:$version"
	$docker build -f deploy/cuda/Dockerfile --build-arg VERSION="$version" --build-arg REVISION="$revision" \
		-t "$prefix/worker-cuda:$version" -t "$prefix/worker-cuda:latest" "$ctx" ||
		die "docker build of $prefix/worker-cuda failed (it pulls an NVIDIA CUDA base image: is a registry reachable?)"
fi

$docker images --filter "reference=$prefix/*:$version" --format '{{.Repository}}:{{.Tag}}  {{.Size}}'
