//! The browser example (`examples/browser`) end to end: `run.sh --prepare-only` builds the
//! mnist-png capsule, signs it and lays out the node's repository and the page; the node
//! serves both; headless Chromium draws a "1" on the page, and the page's two answers (the SDK
//! in the browser, the node over V2 REST) must be the same, to the last digit.

use std::process::Command;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::common::*;

#[test]
fn the_browser_example_answers_like_the_edge() -> Result<()> {
    if !browser_available()? {
        return Ok(());
    }
    // The SDK as the other browser tests of this process build it (run.sh builds it when
    // `sdk-js/dist` is missing; two builds at once would break each other's).
    sdk_dist()?;
    let dir = tempfile::tempdir()?;
    let work = dir.path().join("example");

    // 1. The example's own script lays everything out (with this test's binary).
    let out = Command::new("bash")
        .arg(repo().join("examples/browser/run.sh"))
        .arg("--prepare-only")
        .arg(&work)
        .env("CAPSULE", bin())
        .env("CAPSULE_CACHE_DIR", cache())
        .output()?;
    if !out.status.success() {
        bail!(
            "run.sh --prepare-only failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let site = work.join("site");
    for file in [
        "models/mnist/1.0.0/mnist.capsule.wasm",
        "site/index.html",
        "site/app.js",
        "site/targets.json",
        "site/sdk/capsule.js",
        "site/sdk/capsule-worker.js",
    ] {
        assert!(work.join(file).is_file(), "run.sh wrote no {file}");
    }
    let config: Value = serde_json::from_slice(&std::fs::read(site.join("config.json"))?)?;
    assert_eq!(
        config,
        json!({"model": "mnist", "publicKey": public_hex(&work.join("keys/publisher.pub"))?})
    );

    // 2. The node, as run.sh starts it, on a free port.
    let node = Proc::spawn(&[
        "serve",
        "--host-kernels",
        "false",
        "--models",
        &work.join("models").to_string_lossy(),
        "--static",
        &site.to_string_lossy(),
        "--http",
        "127.0.0.1:0",
        "--no-grpc",
    ])?;
    let url = node.address("REST on")?;
    wait_until("the node to load the capsule", || {
        http()
            .get(format!("{url}/v2/health/ready"))
            .send()
            .is_ok_and(|r| r.status().is_success())
    })?;

    // 3. Chromium draws a "1" and compares the two answers on the page.
    let screenshot = repo().join("target/browser-example.png");
    let _ = std::fs::remove_file(&screenshot);
    let out = Command::new("node")
        .arg(repo().join("tests/browser/example.mjs"))
        .arg(format!("{url}/"))
        .arg(&screenshot)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let result = script_result("example.mjs", &out)?;
    assert_eq!(result["ok"], json!(true), "{result}\n{stderr}");

    let (browser, edge) = (&result["browser"], &result["edge"]);
    assert_eq!(browser["top3"], edge["top3"], "{result}");
    assert_eq!(browser["scores"], edge["scores"], "{result}");
    assert_eq!(browser["shownValues"], edge["shownValues"], "{result}");
    let top3 = browser["top3"].as_array().context("top3")?;
    assert_eq!(top3.len(), 3, "{result}");
    let top = top3[0].as_str().unwrap_or_default();
    assert!(
        top.len() == 1 && top.chars().all(|c| c.is_ascii_digit()),
        "{result}"
    );
    let scores = browser["scores"].as_array().context("scores")?;
    assert!(
        scores
            .iter()
            .all(|s| s.as_f64().is_some_and(|s| (0.0..=1.0).contains(&s))),
        "{result}"
    );
    assert_eq!(result["verdict"]["kind"], "identical", "{result}");
    assert!(
        result["status"]
            .as_str()
            .unwrap_or_default()
            .contains("signature verified"),
        "{result}"
    );
    assert_eq!(result["console_errors"], json!([]), "{result}");
    let png = std::fs::read(&screenshot)?;
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "no PNG screenshot");
    eprintln!(
        "the page drew a \"1\": browser {} ({}), edge {} ({}); screenshot {}",
        browser["top3"],
        browser["ms"],
        edge["top3"],
        edge["ms"],
        screenshot.display()
    );
    drop(node);
    Ok(())
}
