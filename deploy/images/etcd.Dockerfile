# qwenfleet/etcd: the real etcd server (go.etcd.io/etcd/server/v3/etcdmain, cmd/etcd), configured by
# its own flags or ETCD_* variables; data under /data (give it a volume).
# Built by scripts/build-images.sh from a build dir it fills (no registry, no Go image: the
# binaries are built on the host, static, CGO_ENABLED=0, -trimpath):
#   rootfs/  /etc/passwd and /etc/group (root and qwenfleet, uid/gid 65532), /etc/nsswitch.conf,
#            the host's CA certificates when it has them, an empty /tmp (mode 1777)
#   owned/   /home/qwenfleet, /data, /tls, /keys, /models, owned by 65532 (a named volume
#            mounted there starts with that owner and mode)
FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="qwenfleet etcd" \
      org.opencontainers.image.description="etcd server (etcdmain of go.etcd.io/etcd/server/v3) built from the qwenfleet module" \
      org.opencontainers.image.version="${VERSION}" org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/qwenfleet/qwenfleet"
COPY rootfs/ /
COPY --chown=65532:65532 owned/ /
COPY etcd /usr/local/bin/etcd
USER 65532:65532
ENV HOME=/home/qwenfleet ETCD_DATA_DIR=/data/etcd
WORKDIR /home/qwenfleet
# client, peer
EXPOSE 2379 2380
ENTRYPOINT ["/usr/local/bin/etcd"]
