# qwenfleet/qwenctl: the CLI (cmd/qwenctl), and composetool (deploy/composetool), the one-shot
# jobs of docker-compose.yml (certificates, API keys, the demo model, the bench's exit status).
# Built by scripts/build-images.sh from a build dir it fills (no registry, no Go image: the
# binaries are built on the host, static, CGO_ENABLED=0, -trimpath):
#   rootfs/  /etc/passwd and /etc/group (root and qwenfleet, uid/gid 65532), /etc/nsswitch.conf,
#            the host's CA certificates when it has them, an empty /tmp (mode 1777)
#   owned/   /home/qwenfleet, /data, /tls, /keys, /models, owned by 65532 (a named volume
#            mounted there starts with that owner and mode)
FROM scratch
ARG VERSION=dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="qwenfleet qwenctl" \
      org.opencontainers.image.description="qwenctl: client and operator CLI of qwenfleet (generate, status, bench, certs, mkmodel, ...)" \
      org.opencontainers.image.version="${VERSION}" org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.source="https://github.com/qwenfleet/qwenfleet"
COPY rootfs/ /
COPY --chown=65532:65532 owned/ /
COPY qwenctl composetool /usr/local/bin/
USER 65532:65532
ENV HOME=/home/qwenfleet
WORKDIR /home/qwenfleet
ENTRYPOINT ["/usr/local/bin/qwenctl"]
