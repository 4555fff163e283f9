# syntax=docker/dockerfile:1
#
# cloudmap-sidecar image: one static binary, CA certificates, nothing else.
#
#   docker build -t cloudmap-sidecar:0.1.0 .
#
# The build stage compiles for the musl target through scripts/build-static, the same script that
# builds the static binary on machines without Docker (there it falls back to static glibc: see the
# script). The final stage is `scratch`: no shell, no package manager, no libc, so there is nothing
# to patch but the binary itself. Consequences worth knowing:
#   - ECS `healthCheck` and `entryPoint`/`command` must use exec form (`CMD`, not `CMD-SHELL`).
#   - The container health check is the binary's own `healthcheck` subcommand (no curl needed).

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
# musl-tools gives musl-gcc, the C compiler aws-lc-sys (crypto under rustls) needs for the musl
# target (cmake is its fallback build system); ca-certificates gives the bundle copied into the
# final image.
RUN rustup target add "$(uname -m)-unknown-linux-musl" \
 && apt-get update \
 && apt-get install -y --no-install-recommends musl-tools cmake ca-certificates \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the build directory between builds, so a source change does
# not recompile every dependency. The binary is copied out in the same step (the cache is not part
# of the image). /rootfs/tmp exists, world-writable and sticky, because scratch has no /tmp.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    scripts/build-static --target musl \
 && mkdir -p /rootfs/etc/ssl/certs /rootfs/tmp \
 && chmod 1777 /rootfs/tmp \
 && cp target/static/cloudmap-sidecar /rootfs/cloudmap-sidecar \
 && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ca-certificates.crt \
 && /rootfs/cloudmap-sidecar --version

FROM scratch
COPY --from=build /rootfs/ /
# rustls-native-certs (the AWS SDK's HTTPS client) loads the system bundle from here.
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# Not root: the sidecar needs no privilege. Numeric, because scratch has no /etc/passwd
# (65532 is distroless's "nonroot", so volume permissions work the same as there).
USER 65532:65532
# Exec form: the sidecar is PID 1 and receives ECS's SIGTERM itself (a shell as PID 1 would
# swallow it, and the task would be SIGKILLed at stopTimeout with the instance still registered).
ENTRYPOINT ["/cloudmap-sidecar"]
CMD ["run"]
# For `docker run`/compose; ECS ignores this and uses the task definition's healthCheck.
HEALTHCHECK --interval=30s --timeout=5s --start-period=2m --retries=3 CMD ["/cloudmap-sidecar", "healthcheck"]
LABEL org.opencontainers.image.title="cloudmap-sidecar" \
      org.opencontainers.image.description="Keeps one AWS Cloud Map instance true for the ECS task or EC2 instance it runs beside" \
      org.opencontainers.image.licenses="Apache-2.0"
