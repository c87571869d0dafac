#!/usr/bin/env bash
# The whole lifecycle on one machine, from data to a retrained model in production:
# data checks, training with cross-validation and a search, a signed capsule pushed with its
# provenance and metrics, a canary to one of three nodes and its promotion, drifted traffic,
# the hub's drift alert, the retraining it triggers (retrain.sh), a canary the hub promotes
# by itself when its error rate and live accuracy hold, and a final report.
#
# Uses `capsule` from PATH (else target/release/capsule), python3 with scikit-learn,
# skl2onnx, onnx and onnxruntime, and ports 8400 (hub) and 8010-8030 (nodes) on 127.0.0.1.
# Everything it writes goes to $LIFECYCLE_WORK (default ./lifecycle-run), replaced each run.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="$(mkdir -p "${LIFECYCLE_WORK:-lifecycle-run}" && cd "${LIFECYCLE_WORK:-lifecycle-run}" && pwd)"
if ! command -v capsule >/dev/null; then
  PATH="$HERE/../../target/release:$PATH"
  command -v capsule >/dev/null || { echo "lifecycle: no capsule on PATH or in target/release (cargo build --release -p capsule)" >&2; exit 1; }
fi
HUB_PORT="${LIFECYCLE_HUB_PORT:-8400}"
NODES=(node-1 node-2 node-3)
PORTS=(8010 8020 8030)
RINGS=(canary main main)
LC=(python3 "$HERE/lifecycle.py")
FEEDBACK_TOKEN="lifecycle-feedback"
step() { printf '\n== %s\n' "$*"; }

rm -rf "${WORK:?}"/*
cd "$WORK"
cleanup() {
  touch "$WORK/stop-retraining" "$WORK/stop-traffic" 2>/dev/null || true
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
}
trap cleanup EXIT

step "1. Data: scikit-learn's wine set split into history and field pools; checks"
"${LC[@]}" prepare --out data
"${LC[@]}" check data/pilot.csv
"${LC[@]}" check data/history.csv

step "2. The pilot model (1.0.0): cross-validated, exported, built into a signed capsule"
"${LC[@]}" train data/pilot.csv --out build/1.0.0
build() { # VERSION [REFERENCE]
  local v=$1 dir=build/$1
  capsule build "$dir/model.onnx" --name wine --version "$v" --pipeline "$dir/pipeline.json" \
    --labels "$dir/labels.txt" --card "$dir/card.toml" --golden "$dir/golden" \
    --reference "${2:-$dir/reference.csv}" -o "$dir/wine.capsule.wasm"
}
build 1.0.0
capsule keys generate root >/dev/null && capsule keys generate publisher >/dev/null
capsule keys root --root-key root.pub --targets-key publisher.pub --sign root.key -o root.json

step "3. A hub (SQLite) with the monitoring rules, and three nodes (one canary ring)"
python3 - "$HERE/problem.toml" <<'PY' > monitor.toml
import sys, tomllib
t = tomllib.load(open(sys.argv[1], "rb"))["target"]
print(f"""window_ms = 2000
grace_ms = 1000
group_label = "site"
reports_dir = "retrain-reports"

# References of 70-118 rows are noisy (PSI of a same-distribution sample reaches 0.3-0.5):
# these thresholds are for a large shift, which the field brings.
[drift]
psi = 1.0
ks = 0.5
min_count = 100

[errors]
rate = 0.5

[latency]
p99_ms = {t["latency_budget_ms"]}

[retrain]
on = ["drift"]
command = ["bash", "-c", 'exec bash "$LIFECYCLE_HERE/retrain.sh" "$1" >>"$LIFECYCLE_WORK/retrain.log" 2>&1', "retrain"]
""")
PY
# retrain.sh runs under the hub and inherits these (and reads the admin token from its file).
export LIFECYCLE_HERE="$HERE" LIFECYCLE_WORK="$WORK" CAPSULE_HUB="http://127.0.0.1:$HUB_PORT"
capsule hub --database sqlite://hub.db --blobs hub-blobs --http "127.0.0.1:$HUB_PORT" \
  --monitor monitor.toml 2>hub.log &
until curl -sf "$CAPSULE_HUB/api/v1/health" >/dev/null; do sleep 0.2; done
export CAPSULE_HUB_TOKEN="$(cat hub-admin.token)"
URLS=()
for i in 0 1 2; do
  token=$(curl -sf -X POST -H "Authorization: Bearer $CAPSULE_HUB_TOKEN" \
    "$CAPSULE_HUB/api/v1/nodes/${NODES[$i]}/token" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token"])')
  mkdir -p "nodes/${NODES[$i]}"
  capsule serve --models "nodes/${NODES[$i]}" --http "127.0.0.1:${PORTS[$i]}" --no-grpc \
    --hub "$CAPSULE_HUB" --hub-token "$token" --node-id "${NODES[$i]}" --trusted-root root.json \
    --label "ring=${RINGS[$i]}" --label site=field --telemetry-window-ms 500 \
    --feedback-token "$FEEDBACK_TOKEN" 2>"nodes/${NODES[$i]}.log" &
  URLS+=("http://127.0.0.1:${PORTS[$i]}")
done
ALL=$(IFS=,; echo "${URLS[*]}")
serving() { # VERSION NODE-INDEX...
  local v=$1; shift
  for i in "$@"; do
    until curl -sf "${URLS[$i]}/v2/models/wine" | grep -q "\"$v\""; do sleep 0.2; done
  done
}

step "4. Publish 1.0.0 as production: every node verifies, probes and serves it"
push() { # VERSION [ARGS...]
  local v=$1; shift
  capsule sign --targets targets.json --add "build/$v/wine.capsule.wasm" --key publisher.key
  capsule push "build/$v/wine.capsule.wasm" --targets targets.json \
    --provenance "build/$v/provenance.json" --metrics "build/$v/metrics.json" "$@"
}
push 1.0.0 --alias production
serving 1.0.0 0 1 2
"${LC[@]}" traffic --nodes "$ALL" --data data/history.csv --requests 15 --tag pilot \
  --feedback-token "$FEEDBACK_TOKEN"

step "5. 1.1.0 on the whole history, compared, canaried on ring=canary, promoted"
"${LC[@]}" train data/history.csv --out build/1.1.0
build 1.1.0
push 1.1.0
capsule models compare wine 1.0.0 1.1.0 | "${LC[@]}" compare
capsule rollout start --model wine --version 1.1.0 --selector ring=canary --steps 100 >rollout-1.1.0.json
ROLLOUT=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["id"])' rollout-1.1.0.json)
serving 1.1.0 0
"${LC[@]}" traffic --nodes "$ALL" --data data/history.csv --requests 15 --tag canary \
  --feedback-token "$FEEDBACK_TOKEN"
python3 - <<'PY'
# The canary's own numbers, as the hub aggregated them from the nodes' telemetry.
import json, os, time, urllib.request
req = urllib.request.Request(os.environ["CAPSULE_HUB"] + "/api/v1/telemetry/summary?model=wine",
                             headers={"Authorization": "Bearer " + os.environ["CAPSULE_HUB_TOKEN"]})
for _ in range(100):
    v = {x["version"]: x for x in json.load(urllib.request.urlopen(req))["versions"]}.get("1.1.0")
    if v and v["requests"] >= 5:
        break
    time.sleep(0.2)
else:
    raise SystemExit("lifecycle: the canary's telemetry never reached the hub")
if v["errors"]:
    raise SystemExit(f"lifecycle: the canary failed {v['errors']} requests: not promoting")
print(f"canary 1.1.0: {v['requests']} requests, {v['errors']} errors: promoting")
PY
capsule rollout promote "$ROLLOUT" >/dev/null
serving 1.1.0 0 1 2

"${LC[@]}" wait --no-alerts

step "6. The field drifts (a new lab's instruments): the hub's drift alert triggers retraining"
SHIFT='{"color_intensity": [1.8, 1.0], "alcohol": [1.0, 1.2], "flavanoids": [0.6, 0.0]}'
"${LC[@]}" traffic --nodes "$ALL" --data data/field-a.csv --shift "$SHIFT" --seconds 600 \
  --stop-file stop-traffic --rows 20 --pause-ms 20 --tag field-a --collect data/collected.csv \
  --feedback-token "$FEEDBACK_TOKEN" &
TRAFFIC=$!
"${LC[@]}" wait --alert drift --timeout 60
echo "retrain.sh runs under the hub (retrain.log): retrain, rebuild, sign, push, canary"
"${LC[@]}" wait --version-exists 1.2.0 --fail-if retrain-failed --timeout 300 || { cat retrain.log >&2; exit 1; }
touch stop-traffic && wait $TRAFFIC && rm stop-traffic

step "7. The retrained canary on rows it never saw: the hub judges it and promotes it"
"${LC[@]}" traffic --nodes "$ALL" --data data/field-b.csv --shift "$SHIFT" --seconds 600 \
  --stop-file stop-traffic --rows 20 --pause-ms 20 --tag field-b \
  --feedback-token "$FEEDBACK_TOKEN" &
TRAFFIC=$!
"${LC[@]}" wait --rollout-of 1.2.0 --expect promoted --timeout 120 || { cat retrain.log >&2; exit 1; }
touch stop-retraining stop-traffic && wait $TRAFFIC
serving 1.2.0 0 1 2

step "8. Report"
"${LC[@]}" report --out report.md --expect-production 1.2.0 >/dev/null
cat report.md
echo "lifecycle: done; everything is in $WORK (report.md, retrain.log, hub.log, nodes/)"
