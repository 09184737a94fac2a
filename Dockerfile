# ferrolb's image for those who build with docker; image/build makes the same image with
# no container engine (both fill the root filesystem with image/rootfs).
#
#   docker build -t ferrolb:dev .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin ferrolb

FROM debian:bookworm-slim AS rootfs
RUN apt-get update && apt-get install -y --no-install-recommends nftables binutils \
    && rm -rf /var/lib/apt/lists/*
COPY image/rootfs /usr/local/bin/ferrolb-rootfs
COPY --from=build /src/target/release/ferrolb /tmp/ferrolb
RUN bash /usr/local/bin/ferrolb-rootfs /rootfs /tmp/ferrolb

FROM scratch
COPY --from=rootfs /rootfs/ /
# The controller runs as nobody; the speaker's Pod sets uid 0 for NET_RAW and NET_ADMIN.
USER 65534:65534
ENV PATH=/usr/local/bin:/usr/sbin:/usr/bin
ENTRYPOINT ["/usr/local/bin/ferrolb"]
