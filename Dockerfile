# syntax=docker/dockerfile:1
# One image with every binary of the workspace (ticket-publisher, inference-worker, result-writer,
# dlq-alerter, lag-autoscaler, llm-sim, loadgen). The Helm chart picks the binary with `command`;
# `docker run` runs the one named by the SERVICE build argument:
#   docker build -t ticket-triage .                          # all binaries, entrypoint ticket-publisher
#   docker build --build-arg SERVICE=inference-worker -t inference-worker .
#   docker build --target llm-sim -t llm-sim .               # one target per binary, too
# Without a registry, `make image` (deploy/image.sh) builds it with podman from binaries built on
# the host (BINARIES_FROM=prebuilt) on a Debian base made with mmdebstrap (RUNTIME_IMAGE).

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim
# Where the binaries come from: `builder` compiles them here (needs RUST_IMAGE from a registry);
# `prebuilt` copies ones built on the host, staged under bin/ in the build context (what
# `make image` does: deploy/image.sh). Both feed the same runtime stage, so what is tested ships.
ARG BINARIES_FROM=builder
# Every binary the image holds; deploy/image.sh stages exactly these for the prebuilt path.
ARG BINARIES="ticket-publisher inference-worker result-writer dlq-alerter lag-autoscaler llm-sim loadgen"

FROM ${RUST_IMAGE} AS builder
ARG BINARIES
# librdkafka is built from source by rdkafka-sys (make, a C compiler, perl) against the system's
# OpenSSL and zlib; protoc comes vendored with the build, so no protobuf package is needed.
# Debian's versions are not pinned: bookworm only ships security fixes, and a pin breaks on each.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential pkg-config libssl-dev zlib1g-dev perl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cached target directory is keyed on vendor/patches/: rdkafka-sys keeps librdkafka's object
# files from its last build, so a changed patch under an old cache would ship the old librdkafka.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    target="target/patches-$(cat vendor/patches/*.patch | sha256sum | cut -c1-16)" \
    && CARGO_TARGET_DIR="$target" cargo build --release --locked --bins \
    && mkdir -p /out \
    && for bin in $BINARIES; do \
         objcopy --strip-debug "$target/release/$bin" "/out/$bin"; \
       done

# Binaries built outside (a host's `cargo build`, same Debian release as the runtime, so the same
# glibc and OpenSSL). The check stops an image with a binary missing from being built at all.
# Both stages drop the binaries' debug info: the release profile keeps line tables of every
# dependency (debug = "line-tables-only"), 80 MB of a 100 MB binary.
FROM ${RUNTIME_IMAGE} AS prebuilt
ARG BINARIES
COPY bin/ /out/
RUN for bin in $BINARIES; do \
      [ -x "/out/$bin" ] || { echo "prebuilt: bin/$bin is missing from the build context" >&2; exit 1; }; \
    done

FROM ${BINARIES_FROM} AS binaries

FROM ${RUNTIME_IMAGE} AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
    && apt-get clean \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 65532 triage \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin triage
COPY --from=binaries /out/ /usr/local/bin/
# OCI image annotations; `make image` passes the workspace version, the commit and the repository.
ARG VERSION=unknown
ARG REVISION=unknown
# The repository the chart's image, ghcr.io/ticket-triage/ticket-triage, is published from.
ARG SOURCE=https://github.com/ticket-triage/ticket-triage
LABEL org.opencontainers.image.title="ticket-triage" \
      org.opencontainers.image.description="Event-driven LLM ticket triage on Apache Kafka: every service binary" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}"
# Non-root, and nothing to write outside /tmp (the chart mounts the root filesystem read-only).
USER 65532:65532
WORKDIR /tmp
# Admin (/healthz, /readyz, /metrics), ticket HTTP and gRPC, result-writer API and console,
# dlq-alerter dead-letter API, External Metrics, llm-sim.
EXPOSE 9090 8080 50051 8081 8082 6443 8089

FROM runtime AS ticket-publisher
ENTRYPOINT ["/usr/local/bin/ticket-publisher"]

FROM runtime AS inference-worker
ENTRYPOINT ["/usr/local/bin/inference-worker"]

FROM runtime AS result-writer
ENTRYPOINT ["/usr/local/bin/result-writer"]

FROM runtime AS dlq-alerter
ENTRYPOINT ["/usr/local/bin/dlq-alerter"]

FROM runtime AS lag-autoscaler
ENTRYPOINT ["/usr/local/bin/lag-autoscaler"]

FROM runtime AS llm-sim
ENTRYPOINT ["/usr/local/bin/llm-sim"]

# The default target. SERVICE_BINARY, not TRIAGE_*: every TRIAGE_ variable is read as configuration.
FROM runtime AS ticket-triage
ARG SERVICE=ticket-publisher
ENV SERVICE_BINARY=${SERVICE}
ENTRYPOINT ["/bin/sh", "-c", "exec /usr/local/bin/\"$SERVICE_BINARY\" \"$@\"", "--"]
