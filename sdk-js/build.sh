#!/usr/bin/env bash
# Builds the npm package into dist/: the Rust core (capsule-sdk-core) for wasm32 with
# wasm-bindgen (the CLI at the exact version of the wasm-bindgen crate), the page module and
# the worker with esbuild, and type declarations with tsc. Needs `npm ci` first.
set -euo pipefail
cd "$(dirname "$0")"
ROOT="$(cd .. && pwd)"
WB_VERSION="$(grep -A1 '^name = "wasm-bindgen"$' "$ROOT/Cargo.lock" | sed -n 's/^version = "\(.*\)"/\1/p')"
if ! command -v wasm-bindgen >/dev/null || [ "$(wasm-bindgen --version | cut -d' ' -f2)" != "$WB_VERSION" ]; then
  echo "installing wasm-bindgen-cli $WB_VERSION (the version of the wasm-bindgen crate)" >&2
  cargo install wasm-bindgen-cli --version "$WB_VERSION"
fi
# Size-optimized, its own target directory (other RUSTFLAGS/profiles must not rebuild the host).
CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_OPT_LEVEL=s CARGO_PROFILE_RELEASE_LTO=true \
CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 \
  cargo build --manifest-path "$ROOT/Cargo.toml" -p capsule-sdk-core --release \
    --target wasm32-unknown-unknown --target-dir "$ROOT/target/sdk"
rm -rf dist src/core
mkdir -p dist/core
# Generated: the glue, its type declarations (for tsc) and the core's .wasm.
wasm-bindgen --target web --out-dir src/core \
  "$ROOT/target/sdk/wasm32-unknown-unknown/release/capsule_sdk_core.wasm"
cp src/core/capsule_sdk_core.js src/core/capsule_sdk_core_bg.wasm dist/core/
# The worker bundles the core's glue (one request less before the core starts) and loads the
# core's .wasm from core/ next to itself. The page module loads the worker script, as a
# worker or (worker: false) as a module.
npx --no-install esbuild src/index.ts --bundle --format=esm --target=es2022 --outfile=dist/capsule.js
npx --no-install esbuild src/worker.ts --bundle --format=esm --target=es2022 --outfile=dist/capsule-worker.js
npx --no-install tsc -p .
echo "built $(du -sh dist | cut -f1) in sdk-js/dist"
