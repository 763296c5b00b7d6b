# qwenfleet/worker: the CPU worker (cmd/worker); GPU workers: deploy/cuda/Dockerfile.
# Built by scripts/build-images.sh from a build dir it fills (no registry, no Go image: the
# binaries are built on the host, static, CGO_ENABLED=0, -trimpath):
#   rootfs/  /etc/passwd and /etc/group (root and qwenfleet, uid/gid 65532), /etc/nsswitch.conf,
#            the host's CA certificates when it has them, an empty /tmp (mode 1777)
#   owned/   /home/qwenfleet, /data, /tls, /keys, /models, owned by 65532 (a named volume
#            mounted there starts with that owner and mode)
FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="qwenfleet worker" \
      org.opencontainers.image.description="qwenfleet worker (CPU): registers in etcd, loads its slice of the model, runs forward steps" \
      org.opencontainers.image.version="${VERSION}" org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/qwenfleet/qwenfleet"
COPY rootfs/ /
COPY --chown=65532:65532 owned/ /
COPY worker /usr/local/bin/worker
USER 65532:65532
ENV HOME=/home/qwenfleet
WORKDIR /home/qwenfleet
# the worker gRPC API as the compose file and the chart set it (--listen 0.0.0.0:7000)
EXPOSE 7000
ENTRYPOINT ["/usr/local/bin/worker"]
