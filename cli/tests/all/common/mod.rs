//! Helpers shared by the CLI's process-level tests: the `capsule` binary, child processes
//! with their stderr collected, publisher keys, the hub API.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

pub const ADMIN: &str = "test-admin-token";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_capsule")
}

pub fn cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/capsule-test-cache")
}

pub fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(bin())
        .args(args)
        .env("CAPSULE_CACHE_DIR", cache())
        .output()?;
    if !out.status.success() {
        bail!(
            "capsule {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A child process whose stderr is collected, killed on drop.
pub struct Proc {
    pub child: Child,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<Proc> {
        let mut child = Command::new(bin())
            .args(args)
            .env("CAPSULE_CACHE_DIR", cache())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        Ok(Proc { child, log })
    }

    /// Waits for a stderr line containing `marker`, returns the `http(s)://ADDR` after it.
    pub fn address(&self, marker: &str) -> Result<String> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(lines) = self.log.lock()
                && let Some(line) = lines.iter().find(|l| l.contains(marker))
                && let Some(at) = line.find("https://").or_else(|| line.find("http://"))
            {
                let rest = &line[at..];
                let end = rest.find([';', ' ', ',']).unwrap_or(rest.len());
                return Ok(rest[..end].to_owned());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "no {marker:?} line; stderr: {:?}",
            self.log.lock().map(|l| l.clone())
        )
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `capsule serve` of the (empty) repository `models` on free loopback ports, REST and the
/// `extra` flags (`--no-grpc`, or `--grpc 127.0.0.1:0`).
pub fn serve_empty(models: &Path, extra: &[&str]) -> Result<Proc> {
    let models = models.to_string_lossy();
    let mut args = vec!["serve", "--models", &models, "--http", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Proc::spawn(&args)
}

/// Keys `root`, `pub1`, `pub2` (and `extra` ones) in `dir`, and `root.json`: the root key
/// signs root metadata, two of the two publisher keys must sign targets.
pub fn publisher_keys(dir: &Path, extra: &[&str]) -> Result<()> {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    for k in ["root", "pub1", "pub2"].iter().chain(extra) {
        run(&["keys", "generate", &p(k)])?;
    }
    run(&[
        "keys",
        "root",
        "--root-key",
        &p("root.pub"),
        "--targets-key",
        &p("pub1.pub"),
        "--targets-key",
        &p("pub2.pub"),
        "--targets-threshold",
        "2",
        "--sign",
        &p("root.key"),
        "-o",
        &p("root.json"),
    ])?;
    Ok(())
}

pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

pub fn api(
    hub: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let c = http();
    let mut req = match method {
        "GET" => c.get(format!("{hub}{path}")),
        "PUT" => c.put(format!("{hub}{path}")),
        "DELETE" => c.delete(format!("{hub}{path}")),
        _ => c.post(format!("{hub}{path}")),
    }
    .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send()?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().unwrap_or(Value::Null)))
}

pub fn wait_until(what: &str, ok: impl FnMut() -> bool) -> Result<()> {
    wait_until_within(what, Duration::from_secs(30), ok)
}

/// [`wait_until`] with its own limit, for waits that include work such as compiling a
/// capsule's code from scratch, which the other tests of this binary running beside it on
/// the same cores can slow several-fold.
pub fn wait_until_within(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out waiting for {what}")
}

/// Runs `f` on a fresh PostgreSQL database (created and dropped with psql, on the server of
/// `CAPSULE_TEST_POSTGRES_URL`); skipped when that is unset, except in CI.
pub fn with_postgres(tag: &str, f: impl FnOnce(&str) -> Result<()>) -> Result<()> {
    let Ok(url) = std::env::var("CAPSULE_TEST_POSTGRES_URL") else {
        if std::env::var_os("CI").is_some() {
            bail!("CAPSULE_TEST_POSTGRES_URL is not set in CI");
        }
        eprintln!("skipped: set CAPSULE_TEST_POSTGRES_URL=postgres://... (as .ci/run does)");
        return Ok(());
    };
    let db = format!("capsule_test_{tag}_{}", std::process::id());
    let status = Command::new("psql")
        .args([&url, "-q", "-c", &format!("CREATE DATABASE {db}")])
        .status()?;
    if !status.success() {
        bail!("cannot create database {db} with psql at {url}");
    }
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&url);
    let result = f(&format!("{base}/{db}"));
    let _ = Command::new("psql")
        .args([
            &url,
            "-q",
            "-c",
            &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        ])
        .status();
    result
}

/// Starts `capsule serve` synced with the hub (pinning `DIR/root.json`, repository
/// `DIR/models-ID`, one instance, no gRPC); returns the process and its REST URL.
pub fn start_synced_node(
    dir: &Path,
    hub: &str,
    id: &str,
    token: &str,
    extra: &[&str],
) -> Result<(Proc, String)> {
    let models = dir.join(format!("models-{id}"));
    std::fs::create_dir_all(&models)?;
    let mut args: Vec<String> = [
        "serve",
        "--models",
        &models.to_string_lossy(),
        "--http",
        "127.0.0.1:0",
        "--no-grpc",
        "--instances",
        "1",
        "--poll-interval-ms",
        "0",
        "--hub",
        hub,
        "--hub-token",
        token,
        "--node-id",
        id,
        "--trusted-root",
        &dir.join("root.json").to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    let p = Proc::spawn(&args)?;
    let url = p.address("REST on")?;
    Ok((p, url))
}

/// Starts `capsule hub` on `127.0.0.1:port` with the test admin token, blobs in `DIR/blobs`,
/// and `extra` arguments; waits until it listens.
pub fn start_hub(dir: &Path, database: &str, port: u16, extra: &[&str]) -> Result<Proc> {
    let mut args: Vec<String> = vec![
        "hub".into(),
        "--database".into(),
        database.into(),
        "--blobs".into(),
        dir.join("blobs").to_string_lossy().into_owned(),
        "--http".into(),
        format!("127.0.0.1:{port}"),
        "--admin-token".into(),
        ADMIN.into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let p = Proc::spawn(&args)?;
    p.address("capsule hub:")?;
    Ok(p)
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Whether the tests run in CI (where every optional tool must be present).
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Whether Chromium, playwright-core and the SDK's npm packages are here; they must be in CI.
pub fn browser_available() -> Result<bool> {
    let ok = repo()
        .join("tests/browser/node_modules/playwright-core")
        .exists()
        && Path::new(&std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()))
            .exists()
        && repo().join("sdk-js/node_modules/esbuild").exists();
    if !ok && in_ci() {
        bail!("CI must provide chromium, tests/browser/node_modules and sdk-js/node_modules");
    }
    if !ok {
        eprintln!(
            "skipped: needs chromium, `npm ci --prefix tests/browser` and `npm ci --prefix sdk-js`"
        );
    }
    Ok(ok)
}

/// The hex ed25519 key of a `capsule keys generate` NAME.pub file.
pub fn public_hex(path: &Path) -> Result<String> {
    let v: Value = serde_json::from_slice(&std::fs::read(path)?)?;
    Ok(v["public"].as_str().context("no public key")?.to_owned())
}

/// A node token for `id` from the hub.
pub fn node_token(hub: &str, id: &str) -> Result<String> {
    let (status, v) = api(
        hub,
        "POST",
        &format!("/api/v1/nodes/{id}/token"),
        ADMIN,
        None,
    )?;
    if status != 200 {
        bail!("token for {id}: {status} {v}");
    }
    Ok(v["token"].as_str().unwrap_or_default().to_owned())
}

/// Signs `capsule` into `targets` with `DIR/pub1.key` and `DIR/pub2.key`, then pushes it to
/// the hub (with `extra` push arguments: alias, provenance, metrics).
pub fn sign_and_push(
    dir: &Path,
    hub: &str,
    capsule: &Path,
    targets: &Path,
    extra: &[&str],
) -> Result<()> {
    let key = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let capsule = capsule.to_string_lossy();
    let targets = targets.to_string_lossy();
    run(&[
        "sign",
        "--targets",
        &targets,
        "--add",
        &capsule,
        "--key",
        &key("pub1.key"),
        "--key",
        &key("pub2.key"),
    ])?;
    let mut args = vec![
        "push",
        &capsule,
        "--hub",
        hub,
        "--token",
        ADMIN,
        "--targets",
        &targets,
    ];
    args.extend_from_slice(extra);
    run(&args)?;
    Ok(())
}

/// The result a browser script (`tests/browser/*.mjs`) prints: the last line of its stdout
/// that is JSON. The error names the script and shows both of its streams.
pub fn script_result(script: &str, out: &Output) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .with_context(|| {
            format!(
                "no JSON from {script}; stdout {stdout}; stderr {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
}

/// The `y` a node answers for model `wat`, or None when it does not serve it.
pub fn served_y(node: &str) -> Option<f64> {
    let body = serde_json::json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.0]}]});
    let resp = http()
        .post(format!("{node}/v2/models/wat/infer"))
        .json(&body)
        .send()
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json::<Value>().ok()?["outputs"][0]["data"][0].as_f64()
}

/// The report `node` sent for a generation at or after `after`.
pub fn wait_report(hub: &str, node: &str, after: i64) -> Result<Value> {
    let mut last = Value::Null;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        let (_, v) = api(hub, "GET", "/api/v1/nodes", ADMIN, None)?;
        if let Some(n) = v["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["id"] == node))
        {
            last = n["report"].clone();
            if last["generation"].as_i64().is_some_and(|g| g >= after) {
                return Ok(last);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("no report of {node} for generation {after}; last: {last}")
}

/// The hub's generation.
pub fn generation(hub: &str) -> Result<i64> {
    let (_, v) = api(hub, "GET", "/api/v1/health", ADMIN, None)?;
    v["generation"].as_i64().context("generation")
}

/// The capsules installed under `dir` (relative paths, sorted; hidden directories skipped).
pub fn capsule_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if name.ends_with(".capsule.wasm") {
                out.push(
                    p.strip_prefix(dir)
                        .unwrap_or(&p)
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    out.sort();
    out
}

/// Builds the SDK (`sdk-js/build.sh`: the Rust core with wasm-bindgen, esbuild, tsc) once per
/// test process: every test that needs `sdk-js/dist` calls this first (`build.sh` starts with
/// `rm -rf dist`, so two builds at once break each other's output).
pub fn sdk_dist() -> Result<PathBuf> {
    static BUILT: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let sdk = repo().join("sdk-js");
            if !sdk.join("node_modules/esbuild").exists() {
                return Err("sdk-js/node_modules is missing: run `npm ci --prefix sdk-js`".into());
            }
            let out = Command::new("bash")
                .arg(sdk.join("build.sh"))
                .output()
                .map_err(|e| e.to_string())?;
            if !out.status.success() {
                return Err(format!(
                    "sdk-js/build.sh failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            Ok(sdk.join("dist"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}
