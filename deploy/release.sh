#!/usr/bin/env bash
# Release artifacts: the full `capsule` binary and the node build (`--no-default-features`:
# serve, run, inspect, split, join and the hub's admin client; no builder, no hub server, no
# native tract), each stripped, with its debug information in a file beside it
# (`NAME.debug`, which gdb and addr2line find through the binary's .gnu_debuglink), their
# sizes and SHA-256 sums.
#
#   deploy/release.sh [OUT]                    build both with `--profile dist` into OUT (dist/)
#   deploy/release.sh --package BIN NAME OUT   only split and strip BIN into OUT/NAME{,.debug}
#
# Needs binutils (objcopy). A cold build of both takes about 25 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."

package() { # BIN NAME OUT
  local bin out name=$2
  bin="$(realpath "$1")"
  mkdir -p "$3"
  out="$(realpath "$3")"
  objcopy --only-keep-debug "$bin" "$out/$name.debug"
  # The link names the debug file by its base name (and a checksum): keep the two in one
  # directory, or put the .debug file under /usr/lib/debug.
  (cd "$out" && objcopy --strip-all --add-gnu-debuglink="$name.debug" "$bin" "$name")
  chmod 755 "$out/$name"
  chmod 644 "$out/$name.debug"
}

if [ "${1:-}" = "--package" ]; then
  [ $# -eq 4 ] || { echo "usage: $0 --package BIN NAME OUT" >&2; exit 2; }
  package "$2" "$3" "$4"
  exit 0
fi

OUT="${1:-dist}"
mkdir -p "$OUT"
cargo build --profile dist -p capsule --no-default-features
package target/dist/capsule capsule-node "$OUT"
cargo build --profile dist -p capsule
package target/dist/capsule capsule "$OUT"
(
  cd "$OUT"
  sha256sum capsule capsule-node capsule.debug capsule-node.debug > SHA256SUMS
  {
    echo "| file | bytes |"
    echo "|---|---|"
    for f in capsule capsule-node capsule.debug capsule-node.debug; do
      echo "| $f | $(stat -c %s "$f") |"
    done
  } > SIZES.md
  cat SIZES.md
)
echo "release artifacts in $OUT/ (ship capsule and capsule-node; keep the .debug files)"
