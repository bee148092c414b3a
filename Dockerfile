# syntax=docker/dockerfile:1
# One image for the operator and the injected session proxy: the one binary, non-root.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when Cargo.toml or Cargo.lock change.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && for bench in store operator webhook; do echo 'fn main() {}' > "benches/${bench}.rs"; done \
    && cargo build --release --locked --bin mcp-session-operator \
    && rm -rf src benches
COPY src ./src
COPY crds ./crds
COPY examples ./examples
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin mcp-session-operator \
    && cp target/release/mcp-session-operator /mcp-session-operator

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /mcp-session-operator /usr/local/bin/mcp-session-operator
USER 65532:65532
EXPOSE 8080 8443 8090 8091
ENTRYPOINT ["/usr/local/bin/mcp-session-operator"]
CMD ["run"]
