#!/usr/bin/env python3
"""The Python side of the lifecycle example: data, checks, training, traffic and the report.

Subcommands (run.sh and retrain.sh call them; each fails loudly with a message):
  prepare   split scikit-learn's bundled wine data into the history and two field pools
  check     data checks: schema, missing values, class balance
  train     k-fold cross-validation with a small search, ONNX export, card, golden samples,
            provenance and metrics for `capsule build` and `capsule push`
  traffic   send records to nodes, send the true labels back as feedback, keep what was sent
  wait      poll the hub until a condition holds (a rollout's state, a firing alert)
  report    what serves, why, with the alerts and the audit trail; checks the story held
"""

import argparse
import csv
import hashlib
import io
import json
import math
import os
import random
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "tools"))
import capsule_tabular  # noqa: E402  (the repository's tools/, the capsule's own preprocessing)


def fail(message):
    sys.exit(f"lifecycle: {message}")


def load_problem(path):
    with open(path, "rb") as f:
        return tomllib.load(f)


def feature_names(spec):
    return [f["name"] for f in capsule_tabular.tabular_inputs(spec)[0]["tabular"]["fields"]]


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def read_rows(paths):
    rows = []
    for p in paths:
        rows.extend(capsule_tabular.read_csv(p))
    return rows


# ---------------------------------------------------------------------------------------
# prepare


def prepare(args):
    from sklearn.datasets import load_wine

    problem = load_problem(args.problem)
    data = load_wine()
    names = list(data.feature_names)
    rng = np.random.default_rng(problem["training"]["seed"])
    order = rng.permutation(len(data.target))
    header = names + [problem["data"]["label"]]

    def rows(indices, missing):
        out = []
        for i in indices:
            cells = [f"{v:.6g}" for v in data.data[i]]
            # Field measurements arrive with gaps: the capsule imputes them.
            for j in range(len(cells)):
                if rng.random() < missing:
                    cells[j] = ""
            out.append(cells + [f"class_{data.target[i]}"])
        return out

    os.makedirs(args.out, exist_ok=True)
    # What the team had before the model shipped, and two pools of rows the field sends
    # later (the first before retraining, the second after: rows the retrained model never
    # saw). Stratified, so that the pools differ by the field's drift, not by their classes.
    from sklearn.model_selection import train_test_split

    seed = problem["training"]["seed"]
    history, field = train_test_split(order, train_size=100, stratify=data.target[order],
                                      random_state=seed)
    field_a, field_b = train_test_split(field, train_size=0.5, stratify=data.target[field],
                                        random_state=seed)
    history_rows = rows(history, 0.05)
    write_csv(os.path.join(args.out, "history.csv"), header, history_rows)
    # The pilot had the first 60 of them.
    write_csv(os.path.join(args.out, "pilot.csv"), header, history_rows[:60])
    write_csv(os.path.join(args.out, "field-a.csv"), header, rows(field_a, 0.05))
    write_csv(os.path.join(args.out, "field-b.csv"), header, rows(field_b, 0.05))
    print(
        f"prepared {len(history)} history rows (60 of them the pilot's) and {len(field_a)} + {len(field_b)} field rows "
        f"from scikit-learn's wine data set in {args.out}/"
    )


# ---------------------------------------------------------------------------------------
# check


def check_rows(rows, problem, names, what):
    d = problem["data"]
    label = d["label"]
    problems = []
    if len(rows) < d["min_rows"]:
        problems.append(f"{len(rows)} rows, fewer than {d['min_rows']}")
    columns = set(rows[0].keys()) if rows else set()
    missing_columns = [n for n in names + [label] if n not in columns]
    extra = sorted(columns - set(names) - {label})
    if missing_columns:
        problems.append(f"missing columns {missing_columns}")
    if extra:
        problems.append(f"unexpected columns {extra}")
    if not problems:
        for n in names:
            cells = [r[n] for r in rows]
            empty = sum(1 for c in cells if c.strip() == "")
            if empty / len(rows) > d["max_missing"]:
                problems.append(
                    f"column {n!r}: {empty} of {len(rows)} cells missing "
                    f"(more than {d['max_missing']:.0%})"
                )
            for c in cells:
                if c.strip() == "":
                    continue
                try:
                    v = float(c)
                except ValueError:
                    problems.append(f"column {n!r}: {c!r} is not a number")
                    break
                if not math.isfinite(v):
                    problems.append(f"column {n!r}: {c!r} is not finite")
                    break
        labels = [r[label] for r in rows]
        unknown = sorted(set(labels) - set(d["classes"]))
        if unknown:
            problems.append(f"unknown labels {unknown}")
        for c in d["classes"]:
            share = labels.count(c) / len(rows)
            if share < d["min_class_share"]:
                problems.append(
                    f"class {c}: {share:.1%} of the rows, under {d['min_class_share']:.0%}"
                )
    if problems:
        fail(f"data checks failed for {what}:\n  " + "\n  ".join(problems))
    counts = {c: [r[label] for r in rows].count(c) for c in d["classes"]}
    print(f"data checks passed for {what}: {len(rows)} rows, classes {counts}")


def check(args):
    problem = load_problem(args.problem)
    spec = capsule_tabular.load_spec(args.pipeline)
    check_rows(read_rows(args.data), problem, feature_names(spec), ", ".join(args.data))


# ---------------------------------------------------------------------------------------
# train


def t_quantile_975(df):
    # Two-sided 95% Student t quantiles for small fold counts (scipy is not needed for this).
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
             9: 2.262, 10: 2.228}
    return table.get(df, 1.96)


def cross_validate(rows, spec, labels, classes, c, folds, seed):
    """Accuracy per fold; the pipeline's statistics are fitted on each fold's training part
    only, as the capsule would be built from it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    y = np.array([classes.index(r) for r in labels])
    scores = []
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(rows, y):
        fitted = capsule_tabular.fit(spec, [rows[i] for i in train])
        xtr = capsule_tabular.transform(fitted, [rows[i] for i in train])
        xte = capsule_tabular.transform(fitted, [rows[i] for i in test])
        model = LogisticRegression(C=c, max_iter=5000).fit(xtr, y[train])
        scores.append(float((model.predict(xte) == y[test]).mean()))
    return scores


def records(rows, names):
    """CSV rows as the JSON records a client sends (missing cells left out)."""
    out = []
    for r in rows:
        out.append({n: float(r[n]) for n in names if r[n].strip() != ""})
    return out


def code_revision():
    try:
        rev = subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True).stdout.strip()
        if rev:
            return rev
    except (OSError, subprocess.CalledProcessError):
        pass
    # Outside a git checkout: the hash of the code that trained the model.
    h = hashlib.sha256()
    for f in ("lifecycle.py", "pipeline.toml", "problem.toml"):
        with open(os.path.join(HERE, f), "rb") as fh:
            h.update(fh.read())
    return "sha256:" + h.hexdigest()


def train(args):
    from sklearn.linear_model import LogisticRegression
    from skl2onnx import to_onnx
    import onnx
    import onnxruntime

    problem = load_problem(args.problem)
    spec = capsule_tabular.load_spec(args.pipeline)
    names = feature_names(spec)
    rows = read_rows(args.data)
    check_rows(rows, problem, names, ", ".join(args.data))
    label = problem["data"]["label"]
    classes = problem["data"]["classes"]
    t = problem["training"]
    labels = [r[label] for r in rows]

    # The search: k-fold cross-validation of each candidate, the best mean wins.
    results = {}
    for c in t["c_values"]:
        results[c] = cross_validate(rows, spec, labels, classes, c, t["folds"], t["seed"])
        s = results[c]
        print(f"  C={c:<6} cv accuracy {np.mean(s):.3f} (folds {', '.join(f'{x:.3f}' for x in s)})")
    best = max(t["c_values"], key=lambda c: (np.mean(results[c]), -c))
    scores = np.array(results[best])
    mean = float(scores.mean())
    half = t_quantile_975(len(scores) - 1) * float(scores.std(ddof=1)) / math.sqrt(len(scores))
    low, high = max(0.0, mean - half), min(1.0, mean + half)
    print(f"chose C={best}: cv accuracy {mean:.3f}, 95% interval [{low:.3f}, {high:.3f}]")
    need = problem["target"]["min_cv_accuracy"]
    if mean < need:
        fail(f"cross-validated accuracy {mean:.3f} is under the target {need} (problem.toml)")

    # The final model on every row, on the features the capsule computes.
    fitted = capsule_tabular.fit(spec, rows)
    x = capsule_tabular.transform(fitted, rows).astype(np.float32)
    y = np.array([classes.index(r) for r in labels])
    model = LogisticRegression(C=best, max_iter=5000).fit(x, y)
    onx = to_onnx(model, x[:1], options={id(model): {"zipmap": False}}, target_opset=17)
    for v in list(onx.graph.input) + list(onx.graph.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims):
            dims[0].dim_param = "N"  # any batch size
    out = args.out
    os.makedirs(os.path.join(out, "golden"), exist_ok=True)
    onnx.save(onx, os.path.join(out, "model.onnx"))
    with open(os.path.join(out, "pipeline.json"), "w", encoding="utf-8") as f:
        json.dump(fitted, f, indent=2)
    with open(os.path.join(out, "labels.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(classes) + "\n")
    # The drift reference: the rows the model learned from.
    write_csv(os.path.join(out, "reference.csv"), names,
              [[r[n] for n in names] for r in rows])

    # The exported model must agree with scikit-learn before anything is built from it.
    session = onnxruntime.InferenceSession(onx.SerializeToString())
    probabilities = session.run(["probabilities"], {"X": x})[0]
    gap = float(np.abs(probabilities - model.predict_proba(x)).max())
    if gap > 1e-4:
        fail(f"the ONNX export differs from scikit-learn by {gap:g}")

    # Golden samples: records in, onnxruntime's answers out; `capsule build` checks them.
    recs = records(rows, names)
    for k, i in enumerate(range(0, len(rows), max(1, len(rows) // 4))):
        sample = {
            "inputs": [{"name": "record", "shape": [1], "datatype": "BYTES", "data": [recs[i]]}],
            "outputs": [
                {"name": "probabilities", "shape": [1, len(classes)], "datatype": "FP32",
                 "data": [float(p) for p in probabilities[i]]},
                {"name": "label", "shape": [1], "datatype": "BYTES",
                 "data": [classes[int(np.argmax(probabilities[i]))]]},
            ],
            "tolerance": 1e-4,
        }
        with open(os.path.join(out, "golden", f"{k:03}.json"), "w", encoding="utf-8") as f:
            json.dump(sample, f)

    digest = hashlib.sha256()
    for p in args.data:
        with open(p, "rb") as f:
            digest.update(f.read())
    metrics = {"cv_accuracy": mean, "cv_accuracy_low": low, "cv_accuracy_high": high,
               "folds": len(scores)}
    provenance = {
        "dataset_sha256": digest.hexdigest(),
        "datasets": [os.path.basename(p) for p in args.data],
        "rows": len(rows),
        "params": {"model": "LogisticRegression", "C": best, "max_iter": 5000,
                   "searched": {"C": t["c_values"]}, "folds": t["folds"], "seed": t["seed"]},
        "code_revision": code_revision(),
        "trigger": args.trigger,
    }
    with open(os.path.join(out, "metrics.json"), "w", encoding="utf-8") as f:
        json.dump(metrics, f, indent=2)
    with open(os.path.join(out, "provenance.json"), "w", encoding="utf-8") as f:
        json.dump(provenance, f, indent=2)
    p = problem["problem"]
    with open(os.path.join(out, "card.toml"), "w", encoding="utf-8") as f:
        f.write(
            f'description = "{p["task"]}"\n'
            'intended_use = "The Capsule lifecycle example: training to retraining on one machine"\n'
            'limitations = "178 rows of one data set; the field drift is simulated"\n'
            f'training_data = "{" + ".join(provenance["datasets"])} ({len(rows)} rows)"\n'
            f'owner = "{p["owner"]}"\n\n'
            "[[metrics]]\n"
            'name = "accuracy"\n'
            f"value = {mean:.4f}\n"
            f'dataset = "{t["folds"]}-fold cross-validation, 95% interval [{low:.3f}, {high:.3f}]"\n'
        )
    print(f"wrote model.onnx, pipeline.json, card.toml, golden/, metrics.json, provenance.json to {out}/")


# ---------------------------------------------------------------------------------------
# traffic


def http(method, url, body=None, token=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def shifted(record, shift):
    out = dict(record)
    for name, (scale, offset) in shift.items():
        if name in out:
            out[name] = out[name] * scale + offset
    return out


def traffic(args):
    problem = load_problem(args.problem)
    spec = capsule_tabular.load_spec(args.pipeline)
    names = feature_names(spec)
    label = problem["data"]["label"]
    rows = read_rows([args.data])
    recs = records(rows, names)
    shift = json.loads(args.shift) if args.shift else {}
    rng = random.Random(args.seed)
    nodes = args.nodes.split(",")
    sent = correct = 0
    served_by = {}
    collect = None
    if args.collect:
        # One write per request on an O_APPEND descriptor: a reader (the retraining, at any
        # time) sees whole rows only.
        fresh = not os.path.exists(args.collect)
        collect = os.open(args.collect, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if fresh:
            os.write(collect, (",".join(names + [label]) + "\n").encode())
    deadline = time.monotonic() + args.seconds if args.seconds else None
    n = 0
    while (deadline is None and n < args.requests) or (deadline and time.monotonic() < deadline):
        if args.stop_file and os.path.exists(args.stop_file):
            break
        node = nodes[n % len(nodes)]
        request_id = f"{args.tag}-{n}"
        picks = [rng.randrange(len(rows)) for _ in range(args.rows)]
        batch = []
        for i in picks:
            # Jitter: no two requests carry exactly the same record.
            r = {k: v * (1 + rng.gauss(0, 0.01)) for k, v in recs[i].items()}
            batch.append(shifted(r, shift))
        status, answer = http("POST", f"{node}/v2/models/{args.model}/infer", {
            "id": request_id,
            "inputs": [{"name": "record", "shape": [len(batch)], "datatype": "BYTES",
                        "data": batch}],
        })
        n += 1
        if status != 200:
            fail(f"{node} answered {status}: {answer}")
        out = {o["name"]: o for o in answer["outputs"]}
        predicted = out["label"]["data"]
        feedback = []
        lines = io.StringIO()
        for index, (i, p) in enumerate(zip(picks, predicted)):
            truth = rows[i][label]
            sent += 1
            correct += p == truth
            feedback.append({"id": request_id, "index": index, "label": truth})
            csv.writer(lines, lineterminator="\n").writerow(
                [f"{batch[index][k]:.6g}" if k in batch[index] else "" for k in names] + [truth])
        version = answer.get("model_version", "?")
        served_by[version] = served_by.get(version, 0) + 1
        # The true labels come back later in real life (an audit, a customer): here at once.
        status, answer = http("POST", f"{node}/v2/models/{args.model}/feedback",
                              {"feedback": feedback}, token=args.feedback_token)
        if status != 200:
            fail(f"{node} refused the feedback: {status} {answer}")
        if collect is not None:
            os.write(collect, lines.getvalue().encode())
        if args.pause_ms:
            time.sleep(args.pause_ms / 1000)
    if collect is not None:
        os.close(collect)
    accuracy = correct / sent if sent else float("nan")
    print(f"traffic {args.tag}: {n} requests, {sent} rows, accuracy {accuracy:.3f}, "
          f"requests by version {dict(sorted(served_by.items()))}")


# ---------------------------------------------------------------------------------------
# wait / report


def hub_get(path):
    status, body = http("GET", os.environ["CAPSULE_HUB"] + path,
                        token=os.environ["CAPSULE_HUB_TOKEN"])
    if status != 200:
        fail(f"hub GET {path}: {status} {body}")
    return body


def rollouts(model, version=None):
    return [r for r in hub_get("/api/v1/rollouts")["rollouts"]
            if r["model"] == model and (version is None or r["version"] == version)]


def wait(args):
    if args.no_alerts:
        firing = [f"{a['rule']} {a['version']} {a['feature']}"
                  for a in hub_get("/api/v1/alerts")["alerts"] if a["state"] == "firing"]
        if firing:
            fail(f"alerts fire on traffic like the training data: {firing}")
        print("no alert fires on traffic like the training data")
        return
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        if args.fail_if and os.path.exists(args.fail_if):
            fail(f"{args.fail_if} exists")
        if args.rollout_of:
            rs = rollouts(args.model, args.rollout_of)
            if rs and rs[0]["state"] != "active":
                r = rs[0]
                print(f"rollout of {args.model} {args.rollout_of}: {r['state']} ({r['reason']})")
                if r["state"] != args.expect:
                    fail(f"the rollout ended {r['state']}, not {args.expect}")
                return
        elif args.alert:
            firing = [a for a in hub_get("/api/v1/alerts")["alerts"]
                      if a["rule"] == args.alert and a["state"] == "firing"
                      and a["model"] == args.model]
            if firing:
                feats = sorted({a["feature"] for a in firing})
                print(f"{args.alert} alert firing for {args.model} "
                      f"{firing[0]['version']}: {', '.join(feats)}")
                return
        elif args.version_exists:
            versions = [v["version"] for v in hub_get(f"/api/v1/models/{args.model}")["versions"]]
            if args.version_exists in versions:
                print(f"{args.model} {args.version_exists} is registered")
                return
        time.sleep(0.5)
    fail(f"timed out after {args.timeout} s waiting ({vars(args)})")


def report(args):
    model = args.model
    m = hub_get(f"/api/v1/models/{model}")
    production = m["aliases"].get("production")
    alerts = [a for a in hub_get("/api/v1/alerts")["alerts"] if a["model"] == model]
    audit = hub_get("/api/v1/audit")["audit"]
    rs = sorted(rollouts(model), key=lambda r: r["created_at"])
    versions = {v["version"]: v for v in m["versions"]}
    lines = [f"# Lifecycle report: {model}", ""]
    lines.append(f"**Serving:** {model} {production} is production.")
    why = next((r for r in reversed(rs) if r["version"] == production), None)
    if why:
        lines.append(f"**Why:** rollout {why['id'][:8]} {why['state']}: {why['reason']}.")
    lines += ["", "| version | cv accuracy (95% interval) | rows | trigger | dataset sha256 |",
              "|---|---|---|---|---|"]
    for v in m["versions"]:
        me, pr = v.get("metrics") or {}, v.get("provenance") or {}
        lines.append(
            f"| {v['version']} | {me.get('cv_accuracy', float('nan')):.3f} "
            f"[{me.get('cv_accuracy_low', float('nan')):.3f}, "
            f"{me.get('cv_accuracy_high', float('nan')):.3f}] | {pr.get('rows', '?')} | "
            f"{pr.get('trigger') or '-'} | {str(pr.get('dataset_sha256', ''))[:12]} |")
    lines += ["", "## Rollouts", ""]
    for r in rs:
        policy = " auto-promote" if r.get("auto_promote") else ""
        lines.append(f"- {r['version']} (from {r['previous'] or 'nothing'}, steps "
                     f"{r['steps']}{policy}): {r['state']}; {r['reason'] or '-'}")
    lines += ["", "## Alerts", ""]
    for a in alerts:
        lines.append(f"- {a['rule']} {a['version']} {a['group']} {a['feature']}: {a['state']} "
                     f"(value {a['value']:.3f}, threshold {a['threshold']})")
    lines += ["", "## Audit trail", ""]
    for e in sorted(audit, key=lambda e: e["at_us"]):
        if model in e["detail"] or e["action"].startswith("rollout"):
            lines.append(f"- {e['actor']}: {e['action']} {e['detail'][:160]}")
    text = "\n".join(lines) + "\n"
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)

    # The story must have happened as told; anything else fails the example.
    problems = []
    if production != args.expect_production:
        problems.append(f"production is {production}, not {args.expect_production}")
    if not any(a["rule"] == "drift" for a in alerts):
        problems.append("no drift alert")
    auto = [r for r in rs if r.get("auto_promote") and r["version"] == args.expect_production]
    if not auto or auto[0]["state"] != "promoted":
        problems.append(f"{args.expect_production} was not promoted by the hub's canary policy")
    if not any(e["action"] == "rollout.promote" and e["actor"] == "hub" for e in audit):
        problems.append("no promotion by the hub in the audit trail")
    if args.expect_production in versions and \
            (versions[args.expect_production].get("provenance") or {}).get("trigger") is None:
        problems.append(f"{args.expect_production} does not name the trigger that retrained it")
    if problems:
        fail("the lifecycle did not go as expected:\n  " + "\n  ".join(problems))


def compare(args):
    """A summary of `capsule models compare` (JSON on stdin): metrics and what changed."""
    c = json.load(sys.stdin)
    a, b = c["a"], c["b"]
    print(f"{b['model']} {a['version']} -> {b['version']}:")
    for k, d in sorted(c["metrics_diff"].items()):
        print(f"  {k:<18} {a['metrics'].get(k, 0):.4f} -> {b['metrics'].get(k, 0):.4f} ({d:+.4f})")
    pa, pb = a.get("provenance") or {}, b.get("provenance") or {}
    print(f"  rows               {pa.get('rows')} -> {pb.get('rows')}")
    print(f"  params             {pa.get('params', {}).get('C')} -> {pb.get('params', {}).get('C')} (C)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problem", default=os.path.join(HERE, "problem.toml"))
    ap.add_argument("--pipeline", default=os.path.join(HERE, "pipeline.toml"))
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p = sub.add_parser("check")
    p.add_argument("data", nargs="+")
    p = sub.add_parser("train")
    p.add_argument("data", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--trigger", help="what started this training (a retraining report)")
    p = sub.add_parser("traffic")
    p.add_argument("--nodes", required=True, help="node URLs, comma-separated")
    p.add_argument("--model", default="wine")
    p.add_argument("--data", required=True)
    p.add_argument("--shift", help='JSON: {"feature": [scale, offset]}')
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--seconds", type=float, help="send for this long instead")
    p.add_argument("--stop-file", help="stop when this file exists")
    p.add_argument("--rows", type=int, default=10)
    p.add_argument("--pause-ms", type=int, default=0)
    p.add_argument("--tag", required=True)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--feedback-token", required=True)
    p.add_argument("--collect", help="append the labeled records sent to this CSV file")
    p = sub.add_parser("wait")
    p.add_argument("--model", default="wine")
    p.add_argument("--rollout-of", help="a version: wait until its rollout ends")
    p.add_argument("--expect", default="promoted")
    p.add_argument("--alert", help="a rule: wait until one of its alerts fires")
    p.add_argument("--version-exists")
    p.add_argument("--no-alerts", action="store_true", help="fail if any alert fires, now")
    p.add_argument("--fail-if", help="fail at once when this file exists")
    p.add_argument("--timeout", type=float, default=120)
    p = sub.add_parser("report")
    p.add_argument("--model", default="wine")
    p.add_argument("--out", required=True)
    p.add_argument("--expect-production", required=True)
    sub.add_parser("compare")
    args = ap.parse_args()
    {"compare": compare, "prepare": prepare, "check": check, "train": train, "traffic": traffic, "wait": wait,
     "report": report}[args.cmd](args)


if __name__ == "__main__":
    main()
