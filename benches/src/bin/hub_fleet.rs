//! Fleet benchmark (issue 18): one hub and N simulated nodes on loopback.
//!
//! The hub is the `capsule` binary in its own process (`CAPSULE`, default
//! `target/release/capsule`), so its CPU time is its own (`/proc/PID/stat`). Each simulated
//! node holds a long-poll on its desired state the whole time, as a real node's sync agent
//! does; when production changes it downloads the capsule and reports `serving`. Then every
//! node ships `--batches` telemetry batches (one per 10 s of simulated node time, shipped as
//! fast as `--concurrency` requests at a time allow), while the production version flips
//! every few seconds and an admin prober times the admin calls, `/metrics` and the
//! dashboard, once per second.
//!
//! Reported: hub CPU per batch and per node (at one batch every 10 s), the database's growth
//! per node-day, p50/p99 of long-poll wake-ups after a change and of the time until every node
//! serves it, p99 of each admin call in the first and the second half of the telemetry (a
//! request path whose cost grows with the history shows as a second half slower than the
//! first), and ingest throughput.
//!
//! ```text
//! cargo build --release -p capsule
//! cargo run --release -p capsule-benches --bin hub_fleet -- --nodes 1000 --batches 60
//! cargo run --release -p capsule-benches --bin hub_fleet -- --nodes 1000 --batches 60 \
//!     --database postgres://postgres:capsule@127.0.0.1:5432/postgres
//! ```
//! (`--database postgres://...` creates and drops a database of its own on that server.)

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsule_format::hub::{DesiredState, IssuedToken, ModelState, Report, ReportedModel};
use capsule_format::telemetry::{
    Feedback, LatencyHistogram, ModelWindow, Prediction, TelemetryBatch,
};
use capsule_tests::{WatCapsule, wat_capsule};
use serde_json::json;
use tokio::sync::{Mutex, Semaphore};

const ADMIN: &str = "fleet-bench-admin";

struct Args {
    nodes: usize,
    batches: u64,
    concurrency: usize,
    database: Option<String>,
    flip_every: Duration,
}

fn args() -> Result<Args> {
    let mut a = Args {
        nodes: 1000,
        batches: 60,
        concurrency: 32,
        database: None,
        flip_every: Duration::from_secs(5),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--nodes" => a.nodes = value()?.parse()?,
            "--batches" => a.batches = value()?.parse()?,
            "--concurrency" => a.concurrency = value()?.parse()?,
            "--database" => a.database = Some(value()?),
            "--flip-every-s" => a.flip_every = Duration::from_secs(value()?.parse()?),
            other => bail!(
                "unknown flag {other} (--nodes N --batches N --concurrency N --database URL --flip-every-s S)"
            ),
        }
    }
    Ok(a)
}

fn psql(url: &str, sql: &str) -> Result<()> {
    let status = Command::new("psql").args([url, "-q", "-c", sql]).status()?;
    if !status.success() {
        bail!("psql at {url}: {sql} failed");
    }
    Ok(())
}

/// The hub process, killed on drop.
struct HubProcess(Child);

impl Drop for HubProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("/proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based in proc(5)).
    let ticks = |i: usize| -> Result<f64> { Ok(fields.get(i - 3).context("stat field")?.parse()?) };
    let hz = 100.0; // USER_HZ on Linux
    Ok((ticks(14)? + ticks(15)?) / hz)
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

struct Hub {
    base: String,
    http: reqwest::Client,
}

impl Hub {
    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<serde_json::Value>,
    ) -> Result<reqwest::Response> {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            let status = resp.status();
            bail!("{path}: {status} {}", resp.text().await.unwrap_or_default());
        }
        Ok(resp)
    }
}

/// What one node saw: (version, when its long-poll returned with it, when it reported it
/// served).
type Seen = Vec<(String, Instant, Instant)>;

async fn node_loop(
    hub: Arc<Hub>,
    id: String,
    token: String,
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
) -> Result<()> {
    let mut generation: Option<i64> = None;
    let mut serving = String::new();
    while !stop.load(Ordering::Relaxed) {
        let query = match generation {
            Some(g) => format!("?after={g}&wait_ms=20000"),
            None => String::new(),
        };
        let resp = hub
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/nodes/{id}/desired{query}"),
                &token,
                None,
            )
            .await;
        let state: DesiredState = match resp {
            Ok(r) => r.json().await?,
            Err(_) if stop.load(Ordering::Relaxed) => return Ok(()),
            Err(e) => return Err(e),
        };
        let woke = Instant::now();
        if Some(state.generation) == generation {
            continue;
        }
        generation = Some(state.generation);
        let Some(m) = state.models.first() else {
            continue;
        };
        if m.version == serving {
            continue;
        }
        let blob = hub
            .call(
                reqwest::Method::GET,
                &format!("/api/v1/blobs/{}", m.sha256),
                &token,
                None,
            )
            .await?
            .bytes()
            .await?;
        if blob.len() as u64 != m.length {
            bail!("{id}: {} bytes for {}", blob.len(), m.length);
        }
        let report = Report {
            generation: state.generation,
            models: vec![ReportedModel {
                model: m.model.clone(),
                version: m.version.clone(),
                state: ModelState::Serving,
                detail: String::new(),
            }],
        };
        hub.call(
            reqwest::Method::POST,
            &format!("/api/v1/nodes/{id}/report"),
            &token,
            Some(serde_json::to_value(&report)?),
        )
        .await?;
        serving = m.version.clone();
        seen.lock()
            .await
            .push((serving.clone(), woke, Instant::now()));
    }
    Ok(())
}

/// Batch `seq` of a node: 100 requests of one model version, 2 failed, 20 predictions kept,
/// 5 of the previous batch's predictions labeled.
fn batch(node: &str, seq: u64, start_ms: u64, version: &str) -> TelemetryBatch {
    let mut latency = LatencyHistogram::default();
    for i in 0..100 {
        latency.observe(0.5 + f64::from(i % 7));
    }
    TelemetryBatch {
        node_id: node.into(),
        seq,
        window_start_ms: start_ms,
        window_end_ms: start_ms + 10_000,
        dropped_batches: 0,
        dropped_requests: 0,
        models: vec![ModelWindow {
            model: "wat".into(),
            version: version.into(),
            requests: 100,
            errors: BTreeMap::from([("invalid_input".to_owned(), 2)]),
            rows: 100,
            latency,
            classes: BTreeMap::from([("a".to_owned(), 60), ("b".to_owned(), 40)]),
            predictions: (0..20)
                .map(|i| Prediction {
                    id: format!("{node}-{seq}-{i}"),
                    class: if i % 3 == 0 { "b" } else { "a" }.into(),
                })
                .collect(),
            ..ModelWindow::default()
        }],
        feedback: (0..5)
            .filter(|_| seq > 1)
            .map(|i| Feedback {
                model: "wat".into(),
                id: format!("{node}-{}-{i}", seq - 1),
                label: "a".into(),
            })
            .collect(),
    }
}

/// The admin calls the prober times.
const PROBED: [&str; 5] = [
    "/api/v1/nodes",
    "/api/v1/rollouts",
    "/api/v1/telemetry/summary",
    "/metrics",
    "/dashboard",
];

#[derive(Default)]
struct Probes {
    /// (endpoint, phase) -> seconds.
    times: BTreeMap<(&'static str, &'static str), Vec<f64>>,
}

async fn probe(hub: &Hub, phase: &'static str, probes: &Mutex<Probes>) -> Result<()> {
    for path in PROBED {
        let t = Instant::now();
        hub.call(reqwest::Method::GET, path, ADMIN, None)
            .await?
            .bytes()
            .await?;
        probes
            .lock()
            .await
            .times
            .entry((path, phase))
            .or_default()
            .push(t.elapsed().as_secs_f64());
    }
    Ok(())
}

/// Flips production to `version` and returns when it did.
async fn flip(hub: &Hub, version: &str) -> Result<Instant> {
    let t = Instant::now();
    hub.call(
        reqwest::Method::PUT,
        "/api/v1/models/wat/aliases/production",
        ADMIN,
        Some(json!({ "version": version })),
    )
    .await?;
    Ok(t)
}

/// For each flip (version, time): the nodes' wake-up delays and delays until they served.
fn flip_stats(
    flips: &[(String, Instant)],
    seen: &[Seen],
    nodes: usize,
) -> (Vec<f64>, Vec<f64>, usize) {
    let (mut wake, mut served, mut missed) = (Vec::new(), Vec::new(), 0);
    for (i, (version, t0)) in flips.iter().enumerate() {
        let until = flips.get(i + 1).map(|(_, t)| *t);
        let mut got = 0;
        for s in seen {
            if let Some((_, woke, done)) = s
                .iter()
                .find(|(v, w, _)| v == version && *w >= *t0 && until.is_none_or(|u| *w < u))
            {
                wake.push(woke.duration_since(*t0).as_secs_f64());
                served.push(done.duration_since(*t0).as_secs_f64());
                got += 1;
            }
        }
        missed += nodes - got;
    }
    (wake, served, missed)
}

fn main() -> Result<()> {
    let a = args()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(a))
}

async fn run(a: Args) -> Result<()> {
    let capsule =
        PathBuf::from(std::env::var("CAPSULE").unwrap_or_else(|_| "target/release/capsule".into()));
    if !capsule.exists() {
        bail!(
            "{} is missing: cargo build --release -p capsule, or set CAPSULE",
            capsule.display()
        );
    }
    let dir = tempfile::tempdir()?;
    let (database, pg_admin) = match &a.database {
        None => (
            format!("sqlite://{}", dir.path().join("hub.db").display()),
            None,
        ),
        Some(url) if url.starts_with("postgres") => {
            let name = format!("capsule_fleet_{}", std::process::id());
            psql(url, &format!("CREATE DATABASE {name}"))?;
            let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(url);
            (format!("{base}/{name}"), Some((url.clone(), name)))
        }
        Some(url) => (url.clone(), None),
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(&capsule)
        .args([
            "hub",
            "--database",
            &database,
            "--http",
            &format!("127.0.0.1:{port}"),
            "--blobs",
        ])
        .arg(dir.path().join("blobs"))
        .arg("--admin-token-file")
        .arg(dir.path().join("admin.token"))
        .env("CAPSULE_HUB_ADMIN_TOKEN", ADMIN)
        .env("CAPSULE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let _hub_process = HubProcess(child);
    let hub = Arc::new(Hub {
        base: format!("http://127.0.0.1:{port}"),
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(usize::MAX)
            .timeout(Duration::from_secs(60))
            .build()?,
    });
    let started = Instant::now();
    while hub
        .call(reqwest::Method::GET, "/api/v1/health", ADMIN, None)
        .await
        .is_err()
    {
        if started.elapsed() > Duration::from_secs(60) {
            bail!("the hub did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let db = capsule_hub::Store::connect(&database).await?;

    // Two versions of a small capsule: the fleet's update is the hub's work, not the bytes.
    for (version, y) in [("1.0.0", 1.0), ("2.0.0", 2.0)] {
        let bytes = wat_capsule(&WatCapsule {
            name: "wat".into(),
            version: semver::Version::parse(version)?,
            y,
            golden_y: Some(y),
        })?;
        let uploaded: serde_json::Value = hub
            .http
            .post(format!("{}/api/v1/blobs", hub.base))
            .bearer_auth(ADMIN)
            .body(bytes)
            .send()
            .await?
            .json()
            .await?;
        hub.call(
            reqwest::Method::POST,
            "/api/v1/models/wat/versions",
            ADMIN,
            Some(json!({ "sha256": uploaded["sha256"] })),
        )
        .await?;
    }
    flip(&hub, "1.0.0").await?;

    // Tokens and registrations.
    eprintln!(
        "hub_fleet: issuing tokens to and registering {} nodes",
        a.nodes
    );
    let t = Instant::now();
    let gate = Arc::new(Semaphore::new(a.concurrency));
    let mut setup = tokio::task::JoinSet::new();
    for i in 0..a.nodes {
        let (hub, gate) = (Arc::clone(&hub), Arc::clone(&gate));
        setup.spawn(async move {
            let _permit = gate.acquire_owned().await?;
            let id = format!("node-{i:05}");
            let issued: IssuedToken = hub
                .call(
                    reqwest::Method::POST,
                    &format!("/api/v1/nodes/{id}/token"),
                    ADMIN,
                    None,
                )
                .await?
                .json()
                .await?;
            hub.call(
                reqwest::Method::POST,
                &format!("/api/v1/nodes/{id}/register"),
                &issued.token,
                Some(json!({"labels": {"group": format!("g{}", i % 4)}})),
            )
            .await?;
            anyhow::Ok((id, issued.token))
        });
    }
    let mut nodes = Vec::new();
    while let Some(r) = setup.join_next().await {
        nodes.push(r??);
    }
    nodes.sort();
    let setup_s = t.elapsed().as_secs_f64();

    // Every node long-polls from now on.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Vec<Arc<Mutex<Seen>>> = (0..a.nodes).map(|_| Arc::default()).collect();
    let mut pollers = tokio::task::JoinSet::new();
    for ((id, token), s) in nodes.iter().zip(&seen) {
        pollers.spawn(node_loop(
            Arc::clone(&hub),
            id.clone(),
            token.clone(),
            Arc::clone(&stop),
            Arc::clone(s),
        ));
    }
    // Until every node serves 1.0.0.
    eprintln!(
        "hub_fleet: {} long-polls; waiting for every node to serve 1.0.0",
        a.nodes
    );
    let t = Instant::now();
    loop {
        let mut all = true;
        for s in &seen {
            all &= !s.lock().await.is_empty();
        }
        if all {
            break;
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!("not every node came up in 300 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_sync_s = t.elapsed().as_secs_f64();

    // Idle fleet: flips with nothing else going on.
    eprintln!("hub_fleet: three updates of the idle fleet");
    let probes = Arc::new(Mutex::new(Probes::default()));
    let mut idle_flips = Vec::new();
    for version in ["2.0.0", "1.0.0", "2.0.0"] {
        idle_flips.push((version.to_owned(), flip(&hub, version).await?));
        probe(&hub, "idle", &probes).await?;
        tokio::time::sleep(a.flip_every).await;
    }

    // Telemetry, with flips and probes alongside.
    let size_before = db.size_bytes().await?;
    let cpu_before = cpu_seconds(pid)?;
    let t_load = Instant::now();
    let loading = Arc::new(AtomicBool::new(true));
    let half = Arc::new(AtomicBool::new(false));
    let side = {
        let (hub, probes, loading, half) = (
            Arc::clone(&hub),
            Arc::clone(&probes),
            Arc::clone(&loading),
            Arc::clone(&half),
        );
        let flip_every = a.flip_every;
        tokio::spawn(async move {
            let mut flips = Vec::new();
            // The first flip at once, so even a short load has one.
            let mut next_flip = Instant::now();
            let mut version = "1.0.0";
            loop {
                let phase = if half.load(Ordering::Relaxed) {
                    "load, 2nd half"
                } else {
                    "load, 1st half"
                };
                probe(&hub, phase, &probes).await?;
                if Instant::now() >= next_flip {
                    flips.push((version.to_owned(), flip(&hub, version).await?));
                    version = if version == "1.0.0" { "2.0.0" } else { "1.0.0" };
                    next_flip += flip_every;
                }
                if !loading.load(Ordering::Relaxed) {
                    break;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            anyhow::Ok(flips)
        })
    };
    let now_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis(),
    )?;
    let sim_start = now_ms - a.batches * 10_000;
    let mut post_times = Vec::new();
    for seq in 1..=a.batches {
        eprintln!(
            "hub_fleet: telemetry round {seq} of {} ({} batches)",
            a.batches, a.nodes
        );
        if seq > a.batches / 2 {
            half.store(true, Ordering::Relaxed);
        }
        let mut round = tokio::task::JoinSet::new();
        for (id, token) in &nodes {
            let (hub, gate) = (Arc::clone(&hub), Arc::clone(&gate));
            let b = batch(id, seq, sim_start + (seq - 1) * 10_000, "1.0.0");
            let token = token.clone();
            round.spawn(async move {
                let _permit = gate.acquire_owned().await?;
                let t = Instant::now();
                hub.call(
                    reqwest::Method::POST,
                    "/api/v1/telemetry",
                    &token,
                    Some(json!({ "batches": [b] })),
                )
                .await?;
                anyhow::Ok(t.elapsed().as_secs_f64())
            });
        }
        while let Some(r) = round.join_next().await {
            post_times.push(r??);
        }
    }
    let load_s = t_load.elapsed().as_secs_f64();
    let cpu_load = cpu_seconds(pid)? - cpu_before;
    loading.store(false, Ordering::Relaxed);
    let load_flips = side.await??;
    let size_after = db.size_bytes().await?;
    // The last flip's nodes finish.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen_all = Vec::new();
    for s in &seen {
        seen_all.push(s.lock().await.clone());
    }
    pollers.abort_all();

    // The report.
    let n = a.nodes;
    let total_batches = n as f64 * a.batches as f64;
    let cpu_per_batch_ms = cpu_load / total_batches * 1e3;
    let node_day_batches = 86_400.0 / 10.0;
    println!(
        "## Hub fleet benchmark: {n} nodes, {} ({})",
        if pg_admin.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        capsule.display()
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!("| tokens + registrations of {n} nodes | {setup_s:.1} s |");
    println!("| first desired state to every node (serving 1.0.0) | {first_sync_s:.2} s |");
    println!(
        "| telemetry: {} batches in | {load_s:.1} s ({:.0} batches/s, {} at a time) |",
        total_batches,
        total_batches / load_s,
        a.concurrency
    );
    let mut pt = post_times.clone();
    println!(
        "| telemetry POST p50 / p99 | {:.1} / {:.1} ms |",
        percentile(&mut pt, 0.5) * 1e3,
        percentile(&mut pt, 0.99) * 1e3
    );
    println!("| hub CPU per batch | {cpu_per_batch_ms:.2} ms |");
    println!(
        "| hub CPU per node at one batch per 10 s | {:.3}% of a core ({:.1} cores for {n} nodes) |",
        cpu_per_batch_ms / 10_000.0 * 100.0,
        cpu_per_batch_ms / 10_000.0 * n as f64
    );
    let growth = (size_after - size_before) as f64;
    println!(
        "| database growth | {:.0} bytes per batch, {:.1} MB per node-day (retention 30 days: {:.1} GB for {n} nodes) |",
        growth / total_batches,
        growth / total_batches * node_day_batches / 1e6,
        growth / total_batches * node_day_batches * 30.0 * n as f64 / 1e9
    );
    for (label, flips) in [
        ("idle fleet", &idle_flips),
        ("under telemetry load", &load_flips),
    ] {
        let (mut wake, mut served, missed) = flip_stats(flips, &seen_all, n);
        println!(
            "| update ({} flips, {label}): long-poll wake-up p50 / p99 / max | {:.0} / {:.0} / {:.0} ms |",
            flips.len(),
            percentile(&mut wake, 0.5) * 1e3,
            percentile(&mut wake, 0.99) * 1e3,
            percentile(&mut wake, 1.0) * 1e3,
        );
        println!(
            "| update ({label}): every node downloaded and reported serving, p50 / p99 / max | {:.0} / {:.0} / {:.0} ms ({missed} node-flips missed) |",
            percentile(&mut served, 0.5) * 1e3,
            percentile(&mut served, 0.99) * 1e3,
            percentile(&mut served, 1.0) * 1e3,
        );
    }
    println!();
    println!("| admin call | idle p99 | load, 1st half p99 | load, 2nd half p99 |");
    println!("|---|---|---|---|");
    let probes = probes.lock().await;
    for path in PROBED {
        let mut cells = Vec::new();
        for phase in ["idle", "load, 1st half", "load, 2nd half"] {
            let mut v = probes
                .times
                .get(&(path, phase))
                .cloned()
                .unwrap_or_default();
            cells.push(format!(
                "{:.1} ms ({})",
                percentile(&mut v, 0.99) * 1e3,
                v.len()
            ));
        }
        println!("| `{path}` | {} |", cells.join(" | "));
    }
    drop(db);
    drop(_hub_process);
    if let Some((url, name)) = pg_admin {
        psql(
            &url,
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
        )?;
    }
    Ok(())
}
