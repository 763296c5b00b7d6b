# qwenfleet/coordinator: the public gRPC API, scheduling, leader election (cmd/coordinator).
# Built by scripts/build-images.sh from a build dir it fills (no registry, no Go image: the
# binaries are built on the host, static, CGO_ENABLED=0, -trimpath):
#   rootfs/  /etc/passwd and /etc/group (root and qwenfleet, uid/gid 65532), /etc/nsswitch.conf,
#            the host's CA certificates when it has them, an empty /tmp (mode 1777)
#   owned/   /home/qwenfleet, /data, /tls, /keys, /models, owned by 65532 (a named volume
#            mounted there starts with that owner and mode)
FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="qwenfleet coordinator" \
      org.opencontainers.image.description="qwenfleet coordinator: public gRPC API, continuous batching, leader election" \
      org.opencontainers.image.version="${VERSION}" org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/qwenfleet/qwenfleet"
COPY rootfs/ /
COPY --chown=65532:65532 owned/ /
COPY coordinator /usr/local/bin/coordinator
USER 65532:65532
ENV HOME=/home/qwenfleet
WORKDIR /home/qwenfleet
# public gRPC API (--listen); metrics (--metrics-listen) and health (--health-listen) when asked
EXPOSE 50051
ENTRYPOINT ["/usr/local/bin/coordinator"]
