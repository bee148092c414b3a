# syntax=docker/dockerfile:1
# One image for the operator and the injected session proxy: the one binary, non-root.

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, in their own layer: rebuilt only when Cargo.toml or Cargo.lock change.
# Cargo loads the manifest only with every target it declares in place: the script writes an
# empty stand-in for each, read from the manifest itself. The benches' stand-ins stay (the
# build below does not compile them, but the manifest names them); src is replaced.
COPY Cargo.toml Cargo.lock ./
COPY scripts/stand-in-targets.sh /usr/local/bin/stand-in-targets
RUN stand-in-targets \
    && cargo build --release --locked --bin mcp-session-operator \
    && rm -rf src
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
