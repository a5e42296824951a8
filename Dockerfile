# migrate for CI: `docker build -t bluegreen-migrate .`, then
# `docker run --rm -e BLUE_URL -e GREEN_URL -v "$PWD/plans:/plans" bluegreen-migrate plan /plans/x.toml`.
# Not built on this project's machines (no Docker there); the steps are those of `scripts/test`.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends pkg-config libssl-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --profile dist --bin migrate

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libssl3 ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/dist/migrate /usr/local/bin/migrate
ENTRYPOINT ["migrate"]
