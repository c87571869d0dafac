#!/usr/bin/env bash
# The browser example in one command: builds the mnist-png capsule, signs it, lays out a
# model repository and a static site, and starts an edge node serving both.
#
#   examples/browser/run.sh                      # then open http://127.0.0.1:8000/
#   examples/browser/run.sh --http 127.0.0.1:9000
#   examples/browser/run.sh --prepare-only DIR   # only write DIR/{keys,models,site}; no node
#
# The work directory (default target/browser-example) holds:
#   keys/publisher.{key,pub}, keys/root.{key,pub}, keys/root.json    (kept across runs)
#   targets.json                                  the signed targets (its version grows)
#   models/mnist/1.0.0/mnist.capsule.wasm         the node's repository (NAME/VERSION/)
#   site/                                         the page, config.json, targets.json, sdk/
#
# The capsule CLI: $CAPSULE if set (a path, or a command line), else target/debug/capsule
# (built with `cargo build -p capsule` when missing). The SDK: sdk-js/dist (built with
# `npm ci --prefix sdk-js && bash sdk-js/build.sh` when missing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/examples/browser"
MODEL=mnist
VERSION=1.0.0
HTTP=127.0.0.1:8000
PREPARE_ONLY=0
DIR=""

usage() {
  sed -n '2,17p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
  case "$1" in
    --prepare-only) PREPARE_ONLY=1 ;;
    --http) HTTP="${2:?--http needs an address}"; shift ;;
    --http=*) HTTP="${1#--http=}" ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; usage >&2; exit 2 ;;
    *) [ -z "$DIR" ] || { echo "run.sh: one work directory only" >&2; exit 2; }; DIR="$1" ;;
  esac
  shift
done
DIR="${DIR:-$ROOT/target/browser-example}"
mkdir -p "$DIR"
DIR="$(cd "$DIR" && pwd)"

if [ -t 2 ]; then
  step() { printf '\033[1m==>\033[0m %s\n' "$*" >&2; }
else
  step() { printf '==> %s\n' "$*" >&2; }
fi

# 1. The CLI.
if [ -n "${CAPSULE:-}" ] && [ -x "$CAPSULE" ]; then
  CLI=("$CAPSULE")
elif [ -n "${CAPSULE:-}" ]; then
  read -r -a CLI <<<"$CAPSULE" # a command line, e.g. "cargo run -q -p capsule --"
else
  BIN="${CARGO_TARGET_DIR:-$ROOT/target}/debug/capsule"
  if [ ! -x "$BIN" ]; then
    step "building the capsule CLI (cargo build -p capsule)"
    cargo build --manifest-path "$ROOT/Cargo.toml" -p capsule
  fi
  CLI=("$BIN")
fi
capsule() { "${CLI[@]}" "$@"; }

# 2. The SDK.
if [ ! -f "$ROOT/sdk-js/dist/capsule.js" ]; then
  step "building the browser SDK (sdk-js)"
  [ -d "$ROOT/sdk-js/node_modules" ] || npm ci --prefix "$ROOT/sdk-js"
  bash "$ROOT/sdk-js/build.sh"
fi

# 3. The capsule: the MNIST CNN taking PNG bytes (examples/mnist-png).
step "building the $MODEL capsule (examples/mnist-png)"
capsule build "$ROOT/tests/fixtures/models/mnist_cnn/model.onnx" --name "$MODEL" --version "$VERSION" \
  --pipeline "$ROOT/examples/mnist-png/pipeline.toml" --labels "$ROOT/examples/mnist-png/labels.txt" \
  -o "$DIR/$MODEL.capsule.wasm" >&2

# 4. Keys: a publisher key signs the targets; root metadata names it (for hub setups).
mkdir -p "$DIR/keys"
K="$DIR/keys"
if [ ! -f "$K/publisher.key" ] || [ ! -f "$K/publisher.pub" ] || [ ! -f "$K/root.json" ]; then
  step "generating a root key and a publisher key in $K"
  capsule keys generate "$K/root" >&2
  capsule keys generate "$K/publisher" >&2
  capsule keys root --root-key "$K/root.pub" --targets-key "$K/publisher.pub" \
    --sign "$K/root.key" -o "$K/root.json" >&2
  rm -f "$DIR/targets.json" # signed by keys that are gone
fi
PUBLIC="$(sed -n 's/.*"public"[[:space:]]*:[[:space:]]*"\([0-9a-fA-F]*\)".*/\1/p' "$K/publisher.pub")"
[ -n "$PUBLIC" ] || { echo "run.sh: no public key in $K/publisher.pub" >&2; exit 1; }

# 5. The node's repository, and the signed targets for the browser (the node serves the
# installed capsule at /capsules/MODEL/VERSION.capsule.wasm, the target's path).
rm -rf "$DIR/models" "$DIR/site"
mkdir -p "$DIR/models/$MODEL/$VERSION" "$DIR/site"
cp "$DIR/$MODEL.capsule.wasm" "$DIR/models/$MODEL/$VERSION/$MODEL.capsule.wasm"
step "signing $MODEL $VERSION into the targets metadata"
capsule sign --targets "$DIR/targets.json" --add "$DIR/models/$MODEL/$VERSION/$MODEL.capsule.wasm" \
  --key "$K/publisher.key" >&2

# 6. The site: the page, its config, the targets, the SDK.
cp "$HERE/index.html" "$HERE/app.js" "$HERE/style.css" "$DIR/site/"
cp "$DIR/targets.json" "$DIR/site/targets.json"
cp -R "$ROOT/sdk-js/dist" "$DIR/site/sdk"
printf '{\n  "model": "%s",\n  "publicKey": "%s"\n}\n' "$MODEL" "$PUBLIC" >"$DIR/site/config.json"

# --host-kernels false: the node computes every product in wasm, as the browser does, so the
# two answers are the same bits (with native kernels they differ within the golden tolerance).
SERVE=(serve --host-kernels false --models "$DIR/models" --static "$DIR/site" --http "$HTTP" --no-grpc)
if [ "$PREPARE_ONLY" = 1 ]; then
  step "prepared $DIR; serve it with:"
  { printf '   '; printf ' %q' "${CLI[@]}" "${SERVE[@]}"; printf '\n'; } >&2
  exit 0
fi

HOST="${HTTP%:*}"
case "$HOST" in 0.0.0.0|"") HOST=127.0.0.1 ;; esac
step "starting the edge node; open  http://$HOST:${HTTP##*:}/  (Ctrl-C stops it)"
exec "${CLI[@]}" "${SERVE[@]}"
