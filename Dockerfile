# Build: a full Rust toolchain; protobufs compile with protox, so no protoc is needed.
FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p keypackage-server

# Run: a slim Debian with the binary, curl for the health check, and a non-root user.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin kps \
 && mkdir -p /data && chown kps:kps /data
COPY --from=build /src/target/release/keypackage-server /usr/local/bin/keypackage-server
ENV KPS_LISTEN_ADDR=0.0.0.0:8080 \
    KPS_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8080
USER kps
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["keypackage-server"]
CMD ["serve"]
