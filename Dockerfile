# One image for the whole system: `dmd` runs the service named by the command
# (`orchestrator`, `auth`, `gateway`, `notification`, `provisioning`, `all`), with
# `--config FILE` or DMD_CONFIG. The image also carries `dmdctl` (operator CLI),
# `dm-client-sim` (simulated device fleet) and `dmd-probe` (health check for compose).
#
#   docker build -t dmd .                          # public bases, compiled in the build
#   docker run --rm dmd orchestrator --config /etc/dmd/dmd.toml
#
# Without a registry (see scripts/containers-smoke): build the binaries on the host, put them in
# target/containers/bin, and pass local bases:
#   podman build --build-arg PREBUILT=1 --build-arg BUILDER_IMAGE=localhost/debian:bookworm \
#                --build-arg RUNTIME_IMAGE=localhost/debian:bookworm -t localhost/dmd:dev .
#
# The runtime stage has no RUN instruction: nothing in it needs a shell, and the default
# runtime base (distroless) has none.

ARG BUILDER_IMAGE=docker.io/library/rust:1.89-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${BUILDER_IMAGE} AS build
# 1: copy binaries built outside (target/containers/bin) instead of compiling here.
ARG PREBUILT=0
WORKDIR /src
COPY . .
RUN set -eu; \
    mkdir -p /out; \
    if [ "$PREBUILT" = 1 ]; then \
      for b in dmd dmdctl dm-client-sim dmd-probe; do \
        test -x "target/containers/bin/$b" || { echo "PREBUILT=1 needs target/containers/bin/$b" >&2; exit 1; }; \
        cp "target/containers/bin/$b" /out/; \
      done; \
    else \
      CARGO_PROFILE_RELEASE_DEBUG=0 CARGO_PROFILE_RELEASE_STRIP=symbols \
        cargo build --release --locked -p dmd -p dmdctl -p dm-client; \
      rustc --edition 2024 -C opt-level=2 -C strip=symbols deploy/docker/probe.rs -o /out/dmd-probe; \
      cp target/release/dmd target/release/dmdctl target/release/dm-client-sim /out/; \
    fi

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="dmd" \
      org.opencontainers.image.description="OMA DM server delegation: orchestrator, auth, gateway, notification and provisioning services in one binary, with dmdctl and dm-client-sim" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/oma-dm-delegation" \
      org.opencontainers.image.documentation="https://example.invalid/oma-dm-delegation/blob/main/docs/operations.md"
COPY --from=build /out/ /usr/local/bin/
# Bases made with `podman import` carry no environment at all.
ENV PATH=/usr/local/bin:/usr/bin:/bin
# 8081 health (/livez, /readyz), 7443 admin API (orchestrator), 8443 peer endpoint (gateway),
# 8080 device endpoint (provisioning), 8700 the simulated fleet.
EXPOSE 8081 7443 8443 8080 8700
# distroless's "nonroot"; numeric, so it needs no /etc/passwd entry on other bases.
USER 65532:65532
ENTRYPOINT ["dmd"]
CMD ["--help"]
