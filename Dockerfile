# Capsule: one image for the edge node (`capsule serve`) and the hub (`capsule hub`).
#
#   docker build -t capsule:0.1.0 .            (or: podman build -t capsule:0.1.0 .)
#   docker run --rm -p 8000:8000 -v "$PWD/models:/models:ro" capsule:0.1.0 serve --models /models
#
# The runtime image holds only the `capsule` binary (debug info stripped), the C libraries
# it links, CA certificates and a non-root user (uid 65532): no shell, no package manager.
# Its final stage is deploy/container/Containerfile.prebuilt, which builds the same image
# offline from a binary built outside (cli/tests/container.rs builds and runs that one).

FROM docker.io/library/rust:1.95-bookworm AS build
RUN rustup target add wasm32-unknown-unknown
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p capsule \
 && deploy/container/rootfs.sh target/release/capsule /out

FROM scratch
COPY --from=build /out/rootfs/ /
# The user's home (the compiled-code cache, ~/.cache/capsule) and /data: the only places it may write.
COPY --chown=65532:65532 --from=build /out/writable/ /
USER 65532:65532
WORKDIR /home/capsule
ENV HOME=/home/capsule
EXPOSE 8000 8001 8400
ENTRYPOINT ["/usr/local/bin/capsule"]
CMD ["--help"]
