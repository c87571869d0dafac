#!/usr/bin/env bash
# Browser benchmark: capsule SDK vs onnxruntime-web in the same headless chromium.
#
#   bash benches/browser/run.sh            # 3 runs, each prints one JSON line
#   RUNS=1 MODELS=mnist_cnn bash benches/browser/run.sh
#
# Settings (environment): RUNS (3), MODELS (fixture directories under tests/fixtures/models:
# mnist_cnn digits_mlp digits_logreg; or the real networks textdir, squeezenet, resnet50, which
# benches/models/generate.py writes into target/bench-models on demand), FIRST_REPS (cold page loads per runtime and run, 3),
# WARMUP (200), ITERATIONS (200), RAW=1 (every steady-state sample in the JSON), CAPSULE (the
# CLI, target/debug/capsule: its guest is guest-dev; a CLI built with
# CAPSULE_GUEST_PROFILE=guest-release carries the guest that ships), CHROMIUM
# (/usr/bin/chromium), BATCH (dynamic: the models' batch dimension N stays symbolic in both
# runtimes; 1: both are told it is 1, the capsules with `capsule build --input-shape` and
# onnxruntime-web with the session option freeDimensionOverrides {N: 1}), PROFILE=1 (V8's
# sampling profiler records the steady-state page; the JSON gets its top frames as
# `v8_profile`: build the CLI with CAPSULE_GUEST_PROFILE=guest-profile for the guest's
# function names).
#
# In a temporary directory: builds a capsule of each fixture model with the CLI
# ($CAPSULE, default target/debug/capsule), signs them into a static repository
# (repo/targets.json + repo/MODEL/1.0.0.capsule.wasm), copies the SDK (sdk-js/dist), the
# onnxruntime-web files (npm, pinned in package.json) and the .onnx models next to
# bench.html and its diagnostic helper (bench-direct.mjs), serves the lot
# with `capsule serve --static` on loopback, and runs bench.mjs RUNS times. Needs node, npm
# (first run: npm ci) and Debian's chromium ($CHROMIUM). Everything is served locally;
# nothing comes from a CDN.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE="$ROOT/benches/browser"
CAPSULE=${CAPSULE:-$ROOT/target/debug/capsule}
RUNS=${RUNS:-3}
MODELS=${MODELS:-mnist_cnn digits_mlp digits_logreg}
FIRST_REPS=${FIRST_REPS:-3}
WARMUP=${WARMUP:-200}
BATCH=${BATCH:-dynamic}
case "$BATCH" in dynamic|1) ;; *) echo "BATCH is dynamic or 1, not $BATCH" >&2; exit 1 ;; esac
ITERATIONS=${ITERATIONS:-200}

if [ ! -x "$CAPSULE" ]; then
  echo "no capsule CLI at $CAPSULE: cargo build -p capsule (or set CAPSULE)" >&2
  exit 1
fi
if [ ! -f "$ROOT/sdk-js/dist/capsule.js" ]; then
  echo "no SDK build in sdk-js/dist: bash sdk-js/build.sh" >&2
  exit 1
fi
if [ ! -d "$HERE/node_modules/onnxruntime-web" ] || [ ! -d "$HERE/node_modules/playwright-core" ]; then
  (cd "$HERE" && npm ci --no-audit --no-fund >&2)
fi

WORK=$(mktemp -d)
SERVER=""
cleanup() {
  if [ -n "$SERVER" ]; then kill "$SERVER" 2>/dev/null || true; wait "$SERVER" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

SITE="$WORK/site"
mkdir -p "$SITE/repo" "$SITE/models" "$SITE/ort" "$WORK/empty" "$WORK/keys"

# Capsules (the compiled-code cache makes every build after the first take about a second).
for dir in $MODELS; do
  name=${dir//_/-}
  mkdir -p "$SITE/repo/$name"
  case "$dir" in
    textdir|squeezenet|resnet50)
      python3 "$ROOT/benches/models/generate.py" --out "$ROOT/target/bench-models" --models "$dir" >&2
      cp "$ROOT/target/bench-models/$dir/model.onnx" "$SITE/models/$dir.onnx" ;;
    *) cp "$ROOT/tests/fixtures/models/$dir/model.onnx" "$SITE/models/$dir.onnx" ;;
  esac
  fixed=()
  if [ "$BATCH" = 1 ]; then
    case "$dir" in
      mnist_cnn) fixed=(--input-shape input=1,1,28,28) ;;
      textdir) fixed=(--input-shape input=1,3,48,192) ;;
      squeezenet|resnet50) fixed=(--input-shape input=1,3,224,224) ;;
      *) fixed=(--input-shape input=1,64) ;;
    esac
  fi
  "$CAPSULE" build "$SITE/models/$dir.onnx" --name "$name" --version 1.0.0 "${fixed[@]}" \
    -o "$SITE/repo/$name/1.0.0.capsule.wasm" >&2
  # The split form beside it (model image + the guest code every model shares), which the
  # SDK loads when the signed targets name it.
  "$CAPSULE" split "$SITE/repo/$name/1.0.0.capsule.wasm" --out-dir "$SITE/repo/$name" >&2
  mkdir -p "$SITE/repo/code"
  for code in "$SITE/repo/$name"/*.wasm; do
    case "$code" in *.capsule.wasm) ;; *) mv -f "$code" "$SITE/repo/code/" ;; esac
  done
done

# Signed targets metadata (one publisher key; the page trusts its public half).
"$CAPSULE" keys generate "$WORK/keys/pub1" >&2
adds=()
for dir in $MODELS; do adds+=(--add "$SITE/repo/${dir//_/-}/1.0.0.capsule.wasm"); done
"$CAPSULE" sign --targets "$SITE/repo/targets.json" "${adds[@]}" --key "$WORK/keys/pub1.key" >&2
KEY=$(node -e 'process.stdout.write(JSON.parse(require("fs").readFileSync(process.argv[1], "utf8")).public)' "$WORK/keys/pub1.pub")

# The SDK, onnxruntime-web's wasm backend (ESM build + its one wasm binary and loader), the page.
cp -r "$ROOT/sdk-js/dist" "$SITE/sdk"
ORT="$HERE/node_modules/onnxruntime-web/dist"
cp "$ORT/ort.wasm.min.mjs" "$ORT/ort-wasm-simd-threaded.mjs" "$ORT/ort-wasm-simd-threaded.wasm" "$SITE/ort/"
cp "$HERE/bench.html" "$HERE/bench-direct.mjs" "$SITE/"

# Serve on a free loopback port.
"$CAPSULE" serve --models "$WORK/empty" --http 127.0.0.1:0 --no-grpc --static "$SITE" \
  --poll-interval-ms 0 --instances 1 2>"$WORK/serve.log" &
SERVER=$!
BASE=""
for _ in $(seq 1 200); do
  BASE=$(grep -o 'REST on http://[0-9.:]*' "$WORK/serve.log" | head -1 | sed 's/^REST on //' || true)
  [ -n "$BASE" ] && break
  if ! kill -0 "$SERVER" 2>/dev/null; then cat "$WORK/serve.log" >&2; exit 1; fi
  sleep 0.1
done
if [ -z "$BASE" ]; then
  echo "capsule serve did not start" >&2
  cat "$WORK/serve.log" >&2
  exit 1
fi
echo "serving $SITE at $BASE/" >&2
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no -- sdk-js benches/browser 2>/dev/null)" ]; then COMMIT="$COMMIT+dirty"; fi

for run in $(seq 1 "$RUNS"); do
  echo "run $run of $RUNS" >&2
  node "$HERE/bench.mjs" --base "$BASE/" --key "$KEY" --site "$SITE" --commit "$COMMIT" \
    --models "$(echo $MODELS | tr ' ' ',')" --first-reps "$FIRST_REPS" --warmup "$WARMUP" --runs "$ITERATIONS" \
    --batch "$BATCH" --profile "${PROFILE:-0}" --guest "$("$CAPSULE" --version 2>/dev/null | head -1 || echo unknown)"
done
