#!/usr/bin/env bash
# The retraining command the hub runs when a drift alert fires (monitor.toml's [retrain]):
# its argument is the hub's retraining report (the drifting features, the version). It trains
# the next version on the history and the labeled field data collected since, checks and
# cross-validates it, builds, signs and pushes it with its provenance (the report that
# triggered it), and starts a canary rollout that the hub promotes by itself when the canary's
# error rate and live accuracy hold (problem.toml), or aborts otherwise.
# Environment (run.sh sets it before it starts the hub): LIFECYCLE_HERE, LIFECYCLE_WORK,
# CAPSULE_HUB, CAPSULE_HUB_TOKEN; the hub adds CAPSULE_MODEL and CAPSULE_VERSION.
set -euo pipefail
REPORT="$1"
cd "$LIFECYCLE_WORK"
trap 'echo "retraining failed (line $LINENO)"; touch "$LIFECYCLE_WORK/retrain-failed"' ERR
export CAPSULE_HUB_TOKEN="${CAPSULE_HUB_TOKEN:-$(cat hub-admin.token)}"
LC=(python3 "$LIFECYCLE_HERE/lifecycle.py")
echo "== $(date -u +%FT%TZ) retraining $CAPSULE_MODEL $CAPSULE_VERSION on $(basename "$REPORT")"
if [ -e stop-retraining ]; then echo "the example is over: not retraining"; exit 0; fi
# One retraining at a time, and none while a rollout of the model is in flight.
exec 9>retrain.lock
flock -n 9 || { echo "a retraining is running: not starting another"; exit 0; }
if capsule rollout list | python3 -c '
import json, os, sys
sys.exit(any(r["state"] == "active" and r["model"] == os.environ["CAPSULE_MODEL"]
             for r in json.load(sys.stdin)["rollouts"]))'; then :; else
  echo "a rollout of $CAPSULE_MODEL is active: not retraining"; exit 0
fi
# The next minor version after the newest one registered.
NEXT=$(capsule models show "$CAPSULE_MODEL" | python3 -c '
import json, sys
vs = [tuple(map(int, v["version"].split("."))) for v in json.load(sys.stdin)["versions"]]
major, minor, _ = max(vs)
print(f"{major}.{minor + 1}.0")')
# What was collected so far (whole rows: the traffic appends one request at a time).
cp data/collected.csv "data/collected-for-$NEXT.csv"
"${LC[@]}" train data/history.csv "data/collected-for-$NEXT.csv" --out "build/$NEXT" \
  --trigger "$(basename "$REPORT")"
D="build/$NEXT"
# The drift reference is what the model will see from now on: the field data.
capsule build "$D/model.onnx" --name "$CAPSULE_MODEL" --version "$NEXT" \
  --pipeline "$D/pipeline.json" --labels "$D/labels.txt" --card "$D/card.toml" \
  --golden "$D/golden" --reference "data/collected-for-$NEXT.csv" -o "$D/wine.capsule.wasm"
capsule sign --targets targets.json --add "$D/wine.capsule.wasm" --key publisher.key
capsule push "$D/wine.capsule.wasm" --targets targets.json \
  --provenance "$D/provenance.json" --metrics "$D/metrics.json"
capsule models compare "$CAPSULE_MODEL" "$CAPSULE_VERSION" "$NEXT" | "${LC[@]}" compare
POLICY=$(python3 -c '
import sys, tomllib
t = tomllib.load(open(sys.argv[1], "rb"))["target"]
print(t["max_error_rate"], t["min_live_accuracy"])' "$LIFECYCLE_HERE/problem.toml")
read -r MAX_ERRORS MIN_ACCURACY <<<"$POLICY"
capsule rollout start --model "$CAPSULE_MODEL" --version "$NEXT" --selector ring=canary \
  --steps 100 --auto-promote --promote-min-requests 30 --promote-max-error-rate "$MAX_ERRORS" \
  --promote-min-accuracy "$MIN_ACCURACY" --promote-min-labels 200 --promote-hold-s 5
echo "== $(date -u +%FT%TZ) $CAPSULE_MODEL $NEXT pushed; its canary is in the hub's hands"
