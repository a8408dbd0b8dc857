# syntax=docker/dockerfile:1
# keyward's container image: the one binary (controller, verifier, crds, ...) on an empty
# base, run as the non-root user 65532:65532.
#
#   docker build -t ghcr.io/keyward/keyward:0.1.0 \
#     --build-arg REVISION="$(git rev-parse HEAD)" \
#     --build-arg SOURCE_DATE_EPOCH="$(git log -1 --format=%ct)" .
#
# hack/image.sh builds the same image without a daemon (umoci): both builds lay out the
# root filesystem with hack/image-rootfs.sh, and hack/image.sh takes the final stage's
# USER, WORKDIR, ENV, ENTRYPOINT, CMD and LABELs from this file. So keep the final stage
# to those instructions plus ARG and the one COPY, one instruction per line (a LABEL may
# continue over lines), ENTRYPOINT/CMD in JSON form, and values in double quotes;
# hack/image.sh refuses anything else, and tests/image.rs checks that both builds, the
# rootfs and the chart agree.

# The version labelled on the image: Cargo.toml's version and the chart's appVersion
# (tests/image.rs checks).
ARG VERSION=0.1.0
# The commit built (--build-arg REVISION=...); hack/image.sh passes `git rev-parse HEAD`.
ARG REVISION=
ARG RUST_IMAGE=rust:1.95-bookworm

FROM ${RUST_IMAGE} AS build
# Every file's mtime in the rootfs (hack/image-rootfs.sh); 0 unless given.
ARG SOURCE_DATE_EPOCH
WORKDIR /src
COPY . .
# The registry and target/ live in cache mounts (incremental rebuilds), so the binary is
# copied out of target/ by hack/image-rootfs.sh in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin keyward \
 && hack/image-rootfs.sh target/release/keyward /rootfs

FROM scratch
ARG VERSION
ARG REVISION
COPY --from=build /rootfs /
USER 65532:65532
WORKDIR /
ENV PATH="/usr/local/bin"
ENV SSL_CERT_FILE="/etc/ssl/certs/ca-certificates.crt"
ENTRYPOINT ["/usr/local/bin/keyward"]
LABEL org.opencontainers.image.title="keyward" \
      org.opencontainers.image.description="Kubernetes operator for the whole life of API keys: issue, stagger, flip, regenerate, expire, verify" \
      org.opencontainers.image.source="https://github.com/keyward/keyward" \
      org.opencontainers.image.url="https://github.com/keyward/keyward" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}"
