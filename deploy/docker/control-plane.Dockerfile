# syntax=docker/dockerfile:1.7
# aigw control plane: admin API (REST :3001, gRPC + config stream :50051),
# event store under /var/lib/aigw (mount a volume there).
#
#   docker build -f deploy/docker/control-plane.Dockerfile -t aigw-control-plane .
#
# Build context: the repository root.

FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the registry and target dir between builds; the binary is
# copied out of the cached target dir in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p aigw-control-plane \
 && install -D -m 0755 target/release/aigw-control-plane /out/aigw-control-plane \
 && mkdir -p /out/data

# Small runtime: glibc, libgcc, CA certificates, no shell; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/aigw-control-plane /usr/local/bin/aigw-control-plane
# A data dir the non-root user owns (a mounted volume replaces it).
COPY --from=build --chown=65532:65532 /out/data /var/lib/aigw
WORKDIR /var/lib/aigw
ENV AIGW__CONTROL_PLANE__DATA_DIR=/var/lib/aigw \
    AIGW__CONTROL_PLANE__ADMIN_LISTEN=0.0.0.0:3001 \
    AIGW__CONTROL_PLANE__GRPC_LISTEN=0.0.0.0:50051 \
    AIGW__TELEMETRY__LOG_FORMAT=json
EXPOSE 3001 50051
VOLUME ["/var/lib/aigw"]
USER 65532:65532
# SIGTERM shuts down gracefully; config from --config and AIGW__* variables
# (secrets: AIGW_MASTER_KEY, AIGW__ADMIN__KEYS, AIGW__NODES__TOKEN).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/aigw-control-plane"]
CMD ["--config", "/etc/aigw/config.yaml"]
