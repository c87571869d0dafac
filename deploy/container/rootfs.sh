#!/usr/bin/env bash
# Assembles the files of Capsule's runtime image in OUT:
#   OUT/rootfs/    owned by root: the `capsule` binary (debug info stripped), the shared
#                  libraries it links (glibc, libgcc_s, libm: from the build machine, as
#                  `ldd` lists them), CA certificates, /etc/passwd with the user `capsule`
#                  (65532) and /tmp;
#   OUT/writable/  the directories the user owns (the image copies them --chown): its home
#                  (the compiled-code cache, ~/.cache/capsule) and /data (the hub's default
#                  place for its database and blobs in deploy/compose.yaml).
#
#   deploy/container/rootfs.sh target/release/capsule OUT
#
# The Dockerfile runs it in its build stage; cli/tests/all/container.rs runs it on the binary
# under test and builds deploy/container/Containerfile.prebuilt with podman, offline.
set -euo pipefail
binary="$1"
root="$2/rootfs"
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp" "$2/writable/home/capsule" "$2/writable/data"
objcopy --strip-debug "$binary" "$root/usr/local/bin/capsule"
# Every library the binary needs, and the dynamic loader, at the paths the binary asks for.
ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | while read -r lib; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
printf 'root:x:0:0:root:/root:/sbin/nologin\ncapsule:x:65532:65532:capsule:/home/capsule:/sbin/nologin\n' > "$root/etc/passwd"
printf 'root:x:0:\ncapsule:x:65532:\n' > "$root/etc/group"
chmod 1777 "$root/tmp"
