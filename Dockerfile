# Multi-stage build: compile in the Rust image, run in a slim Debian as a non-root user.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src src
COPY migrations migrations
RUN cargo build --release --locked --bin ltmc --bin ltmc-bench

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /data --shell /usr/sbin/nologin ltmc \
 && mkdir -p /data && chown ltmc /data
COPY --from=build /src/target/release/ltmc /src/target/release/ltmc-bench /usr/local/bin/
USER ltmc
WORKDIR /data
VOLUME ["/data"]
# In a container the service must listen on all interfaces, which needs tokens
# (LTMC_ADMIN_TOKEN, LTMC_READ_TOKEN) or an explicit --insecure-no-auth.
ENV LTMC_BIND=0.0.0.0:8080 \
    LTMC_DATABASE_URL=sqlite:///data/ltmc.db \
    LTMC_LOG_FORMAT=json
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD curl -fsS http://127.0.0.1:8080/healthz || exit 1
ENTRYPOINT ["ltmc"]
CMD ["serve"]
