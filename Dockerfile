# syntax=docker/dockerfile:1.7
# The one claudekey image: controller, webhook, proxy, crd and scan are roles of one binary.
#
#   docker build -t ghcr.io/claudekey/claudekey:0.1.0 .
#   docker buildx build --platform linux/amd64,linux/arm64 -t ... --push .   (native per platform)
#
# This builds a plain release binary; README's release steps build a profile-guided one
# (hack/pgo.sh, trained on loopback traffic the build container would have to serve) and image
# it with hack/image.sh. Same program, ~10% less CPU per proxied request.
#
# Runtime: distroless/cc (glibc, CA certificates, tzdata; no shell, no package manager) as the
# distroless "nonroot" user 65532, which the Helm chart's securityContext also pins. glibc rather
# than a static musl build: aws-lc-rs (rustls' crypto provider) and the AWS SDK build and perform
# best against glibc, and cc adds only libgcc to static.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

FROM docker.io/library/rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
# .dockerignore is an allowlist (manifests, src/, crds/, and the test/bench dirs Cargo.toml may
# declare targets in, since cargo checks every declared target's path).
COPY . .
# Cache mounts keep the registry and target dir between builds without putting them in a layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin claudekey \
 && install -D -m 0755 target/release/claudekey /out/claudekey

# Prove the binary starts in a glibc userland before shipping it (crd needs no cluster).
RUN /out/claudekey --version && /out/claudekey crd > /dev/null

FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="claudekey" \
      org.opencontainers.image.description="Anthropic Claude API keys, safe in Kubernetes" \
      org.opencontainers.image.source="https://github.com/claudekey/claudekey" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /out/claudekey /usr/local/bin/claudekey
USER 65532:65532
# 8443 webhook HTTPS, 8080 controller metrics / gateway proxy, 8484 proxy, 9484 proxy metrics,
# 9443 webhook metrics.
EXPOSE 8443 8080 8484 9484 9443
ENTRYPOINT ["/usr/local/bin/claudekey"]
