//! Fault injection, scripted and repeatable (issue 16): a synced node killed with SIGKILL at
//! chosen moments of its download and install, again and again, must come back serving a
//! verified version, with every file in its repository matching its signed hash; and a node
//! whose disk fills up (a small tmpfs under its repository) keeps serving, says why its
//! install failed, recovers when space comes back, and accounts for the telemetry it could
//! not buffer.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::common::*;
use anyhow::{Context, Result, bail};
use capsule_tests::{builder, options};
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

/// A hub on SQLite in `dir` with `capsule` signed (the keys of `publisher_keys(dir)`), pushed
/// and made production; returns it and its URL.
fn hub_serving(dir: &Path, capsule: &Path) -> Result<(Proc, String)> {
    let database = format!("sqlite://{}", dir.join("hub.db").display());
    let port = free_port()?;
    let hub_proc = start_hub(dir, &database, port, &[])?;
    let hub = format!("http://127.0.0.1:{port}");
    sign_and_push(
        dir,
        &hub,
        capsule,
        &dir.join("targets.json"),
        &["--alias", "production"],
    )?;
    Ok((hub_proc, hub))
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
    let (_hub, hub) = hub_serving(d, &capsule)?;
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

/// `mount`/`umount` as root: directly, or through `sudo -n` for a user allowed to.
fn as_root(command: &str) -> Command {
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if root {
        Command::new(command)
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", command]);
        c
    }
}

/// Unmounts the test's tmpfs (lazily: a node may still hold files there).
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = as_root("umount").arg("-l").arg(&self.0).status();
    }
}

fn mount_tmpfs(at: &Path, size: &str) -> Result<Option<Mounted>> {
    std::fs::create_dir_all(at)?;
    let out = as_root("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(at)
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(Some(Mounted(at.to_path_buf()))),
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).into_owned(),
                Err(e) => e.to_string(),
            };
            if in_ci() {
                bail!("CI must let the tests mount a tmpfs (root, or sudo -n): {why}");
            }
            eprintln!("skipped: mounting a tmpfs needs root or sudo -n ({why})");
            Ok(None)
        }
    }
}

/// Fills the file system of `dir` with a file until the disk refuses (ENOSPC).
fn fill(dir: &Path) -> Result<PathBuf> {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path)?;
    let chunk = vec![0u8; 64 << 10];
    loop {
        match f.write_all(&chunk).and_then(|()| f.sync_all()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(28) => return Ok(path),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The disk under a node's repository is full (a tmpfs smaller than the guest code): the
/// install fails with the cause in the node's report, the node stays up, and once space is
/// freed it installs and serves without a restart. Then, serving with the disk full again,
/// the telemetry windows it cannot buffer are counted as dropped (requests and batches), so
/// the hub's totals still account for every request: shipped + dropped = served.
#[test]
fn a_full_disk_stops_installs_and_buffering_not_serving() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let models = d.join("models-node-f");
    let Some(_mounted) = mount_tmpfs(&models, "4m")? else {
        return Ok(());
    };
    publisher_keys(d, &[])?;
    let fixture = repo().join("tests/fixtures/models/digits_mlp");
    let capsule = d.join("digits.capsule.wasm");
    run(&[
        "build",
        &fixture.join("model.onnx").to_string_lossy(),
        "--name",
        "digits",
        "-o",
        &capsule.to_string_lossy(),
    ])?;
    let (_hub, hub) = hub_serving(d, &capsule)?;
    let token = node_token(&hub, "node-f")?;
    let (node, url) =
        start_synced_node(d, &hub, "node-f", &token, &["--telemetry-window-ms", "300"])?;

    // 1. The guest code does not fit: the node says why and stays up.
    let mut last = Value::Null;
    wait_until("the node to report the full disk", || {
        let Ok((_, v)) = api(&hub, "GET", "/api/v1/nodes", ADMIN, None) else {
            return false;
        };
        last = v["nodes"][0]["report"]["models"][0].clone();
        matches!(
            last["state"].as_str(),
            Some("download_failed" | "install_failed")
        )
    })
    .with_context(|| {
        format!(
            "last report: {last}; node log: {:?}",
            node.log.lock().map(|l| l.join("\n"))
        )
    })?;
    let detail = last["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("No space left") || detail.contains("os error 28"),
        "the report names the cause: {last}"
    );
    let live = http().get(format!("{url}/v2/health/live")).send()?;
    assert_eq!(live.status(), 200, "the node is up");

    // 2. Space comes back: the node installs and serves without a restart.
    let status = as_root("mount")
        .args(["-o", "remount,size=256m"])
        .arg(&models)
        .status()?;
    assert!(status.success(), "remount");
    wait_until("the node to serve digits once space is back", || {
        http()
            .get(format!("{url}/v2/models/digits/ready"))
            .send()
            .is_ok_and(|r| r.status().is_success())
    })?;

    // 3. Serving on a full disk: every request answered; what cannot be buffered is counted.
    let request = std::fs::read(fixture.join("sample_request.json"))?;
    let infer = || -> Result<()> {
        let resp = http()
            .post(format!("{url}/v2/models/digits/infer"))
            .header("content-type", "application/json")
            .body(request.clone())
            .send()?;
        if resp.status() != 200 {
            bail!("infer: {}", resp.status());
        }
        Ok(())
    };
    let filler = fill(&models)?;
    for _ in 0..20 {
        infer()?;
    }
    // Two windows close while the disk is full.
    std::thread::sleep(Duration::from_millis(700));
    std::fs::remove_file(&filler)?;
    for _ in 0..10 {
        infer()?;
    }
    let served = 30;
    let mut s = Value::Null;
    wait_until("the hub to account for every request", || {
        let Ok((_, v)) = api(&hub, "GET", "/api/v1/telemetry/summary", ADMIN, None) else {
            return false;
        };
        s = v["nodes"]["node-f"].clone();
        let shipped = s["requests"].as_u64().unwrap_or(0);
        let dropped = s["dropped_requests"].as_u64().unwrap_or(0);
        shipped + dropped == served
    })
    .with_context(|| format!("node totals at the hub: {s}"))?;
    assert!(
        s["dropped_requests"].as_u64().unwrap_or(0) > 0,
        "windows closed on the full disk were counted as dropped: {s}"
    );
    Ok(())
}
