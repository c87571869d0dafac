//! Fault injection, scripted and repeatable (issue 16): a synced node killed with SIGKILL at
//! chosen moments of its download and install, again and again, must come back serving a
//! verified version, with every file in its repository matching its signed hash.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsule_tests::{builder, options};
use common::*;
use serde_json::Value;

/// The kill moments: a fixed sequence, spread over the node's first 300 ms (start-up,
/// long-poll, the code and image downloads, the writes, the install and probe).
fn kill_after_ms(kills: usize) -> Vec<u64> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..kills)
        .map(|_| {
            // xorshift64: the same moments on every run.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % 300
        })
        .collect()
}

/// Every file the agent may have written, with its SHA-256.
fn repository_files(models: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut stack = vec![models.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if path.is_dir() {
                if name != ".capsule-agent" {
                    stack.push(path);
                }
                continue;
            }
            // Hidden files are writes in progress, which the repository scan skips.
            if name.starts_with('.') {
                continue;
            }
            if name.ends_with(".capsule.wasm")
                || name.ends_with(".capsule.img")
                || (dir.ends_with(".capsule-code") && name.ends_with(".wasm"))
            {
                let bytes = std::fs::read(&path)?;
                out.push((
                    path.display().to_string(),
                    capsule_format::split::sha256_hex(&bytes),
                ));
            }
        }
    }
    Ok(out)
}

/// How far the node had got when it was killed: partial downloads, the code installed, the
/// model image installed.
fn stage(models: &Path) -> &'static str {
    let any = |dir: &Path, pred: &dyn Fn(&str) -> bool| {
        std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| pred(&e.file_name().to_string_lossy()))
        })
    };
    let image = any(&models.join("cnn").join("1.0.0"), &|n| {
        n.ends_with(".capsule.img")
    });
    let code = any(&models.join(".capsule-code"), &|n| !n.starts_with('.'));
    let partial = any(&models.join(".capsule-agent").join("downloads"), &|n| {
        n.ends_with(".part")
    });
    match (code, image, partial) {
        (_, true, _) => "image installed",
        (true, false, _) => "code installed",
        (false, false, true) => "code downloading",
        _ => "before any download",
    }
}

#[test]
fn a_node_killed_during_its_downloads_and_installs_recovers() -> Result<()> {
    let kills: usize = std::env::var("CAPSULE_FAULT_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    publisher_keys(d, &[])?;
    // A real model (the MNIST CNN fixture: a 16 MB code module in this build and its image),
    // so the downloads and writes take long enough to be interrupted.
    let mut o = options("mnist_cnn")?;
    o.name = "cnn".into();
    o.version = semver::Version::new(1, 0, 0);
    let capsule = d.join("cnn-1.0.0.capsule.wasm");
    std::fs::write(&capsule, &builder().build(o)?.bytes)?;
    let database = format!("sqlite://{}", d.join("hub.db").display());
    let port = free_port()?;
    let _hub = start_hub(d, &database, port, &[])?;
    let hub = format!("http://127.0.0.1:{port}");
    sign_and_push(
        d,
        &hub,
        &capsule,
        &d.join("targets.json"),
        &["--alias", "production"],
    )?;
    let signed: Value = serde_json::from_slice(&std::fs::read(d.join("targets.json"))?)?;
    let signed_hashes: Vec<String> = signed["signed"]["targets"]
        .as_object()
        .context("targets")?
        .values()
        .filter_map(|t| t["sha256"].as_str().map(str::to_owned))
        .collect();
    let token = node_token(&hub, "node-k")?;
    let models = d.join("models-node-k");
    let moments = kill_after_ms(kills);
    let mut stages = Vec::new();
    for (i, ms) in moments.iter().enumerate() {
        // Each round fetches and installs again: the installed files go (as if a new version
        // were due), while the agent's state and partial downloads stay as the kill left them.
        let _ = std::fs::remove_dir_all(models.join("cnn"));
        let _ = std::fs::remove_dir_all(models.join(".capsule-code"));
        let (mut node, _) = start_synced_node(d, &hub, "node-k", &token, &[])?;
        std::thread::sleep(Duration::from_millis(*ms));
        // SIGKILL: no drain, no flush.
        node.kill();
        stages.push(stage(&models));
        for (path, sha) in repository_files(&models)? {
            assert!(
                signed_hashes.contains(&sha),
                "after kill {i} at {ms} ms: {path} has sha256 {sha}, which no signed target has"
            );
        }
    }
    let (_node, url) = start_synced_node(d, &hub, "node-k", &token, &[])?;
    let started = Instant::now();
    loop {
        let ready = http()
            .get(format!("{url}/v2/models/cnn/versions/1.0.0/ready"))
            .send()
            .is_ok_and(|r| r.status().is_success());
        if ready {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the node does not serve cnn 1.0.0 after {kills} kills");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let files = repository_files(&models)?;
    assert!(!files.is_empty());
    for (path, sha) in &files {
        assert!(
            signed_hashes.contains(sha),
            "{path} has sha256 {sha}, which no signed target has"
        );
    }
    eprintln!(
        "{kills} kills at {moments:?} ms, leaving the node at {stages:?}; then serving, with {} files all matching their signed hashes",
        files.len()
    );
    Ok(())
}
