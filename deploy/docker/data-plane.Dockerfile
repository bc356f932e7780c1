# syntax=docker/dockerfile:1.7
# aigw data plane: OpenAI-compatible proxy on :3000, /livez /readyz /metrics
# on :9090. Stateless apart from a snapshot cache and a usage spool (both under
# /var/lib/aigw; an emptyDir is enough).
#
#   docker build -f deploy/docker/data-plane.Dockerfile -t aigw-data-plane .
#
# Build context: the repository root.

FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p aigw-data-plane \
 && install -D -m 0755 target/release/aigw-data-plane /out/aigw-data-plane \
 && mkdir -p /out/data

# Small runtime: glibc, libgcc, CA certificates, no shell; runs as uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/aigw-data-plane /usr/local/bin/aigw-data-plane
# A data dir the non-root user owns (a mounted volume replaces it).
COPY --from=build --chown=65532:65532 /out/data /var/lib/aigw
WORKDIR /var/lib/aigw
ENV AIGW__DATA_PLANE__LISTEN=0.0.0.0:3000 \
    AIGW__DATA_PLANE__METRICS_LISTEN=0.0.0.0:9090 \
    AIGW__DATA_PLANE__SNAPSHOT_CACHE=/var/lib/aigw/snapshot-cache.json \
    AIGW__TELEMETRY__LOG_FORMAT=json
EXPOSE 3000 9090
USER 65532:65532
# SIGTERM: stop accepting, drain in-flight calls (30 s limit), flush usage
# events to NATS (or the spool), exit 0. Give it a stop timeout above 30 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/aigw-data-plane"]
CMD ["--config", "/etc/aigw/config.yaml"]
