//! Load benchmark of the edge node (`docs/benchmarks.md`, "Edge node").
//!
//! Starts `capsule serve` (a release build) on loopback with the digits MLP and the MNIST
//! CNN, and measures in one run:
//! - start-up time from process start to `/v2/health/ready` with a warm code cache;
//! - resident memory idle and under load, with 2 capsules and with 10 capsules loaded;
//! - requests/s and p50/p99 latency over HTTP (closed loop, keep-alive, V2 JSON) at several
//!   concurrencies, next to the in-process capsule throughput of the same model (two threads
//!   calling `LoadedCapsule::infer`, like the node's two instances);
//! - with `--peer-mlserver`, the same load on Seldon MLServer's scikit-learn runtime serving
//!   the same MLP (`benches/peers/mlserver_digits.py`).
//!
//! Usage: `cargo run --release -p capsule-benches --bin node_load -- [--seconds 5]
//! [--concurrency 1,2,4,8,16] [--peer-mlserver]` (after `cargo build --release -p capsule`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsule_format::NamedTensor;
use capsule_format::v2::InferenceRequest;
use capsule_runtime::{LoadedCapsule, RunConfig};
use capsule_tests::{engine, fixture_capsule, golden};

struct Args {
    seconds: f64,
    concurrency: Vec<usize>,
    peer_mlserver: bool,
    capsule_bin: PathBuf,
}

fn parse_args() -> Result<Args> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = Args {
        seconds: 5.0,
        concurrency: vec![1, 2, 4, 8, 16],
        peer_mlserver: false,
        capsule_bin: root.join("target/release/capsule"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => args.seconds = it.next().context("--seconds N")?.parse()?,
            "--concurrency" => {
                args.concurrency = it
                    .next()
                    .context("--concurrency 1,2,4")?
                    .split(',')
                    .map(str::parse)
                    .collect::<Result<_, _>>()?
            }
            "--peer-mlserver" => args.peer_mlserver = true,
            "--capsule-bin" => args.capsule_bin = it.next().context("--capsule-bin PATH")?.into(),
            "--bench" => {}
            other => bail!("unknown argument {other:?}"),
        }
    }
    if !args.capsule_bin.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p capsule` first",
            args.capsule_bin.display()
        );
    }
    Ok(args)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_ready(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    limit: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        if let Ok(r) = client.get(format!("{base}{path}")).send().await
            && r.status().is_success()
        {
            return Ok(started.elapsed());
        }
        if started.elapsed() > limit {
            bail!("{base}{path} not ready after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn start_node(
    bin: &Path,
    repo: &Path,
    cache: &Path,
    client: &reqwest::Client,
) -> Result<(Server, Duration)> {
    let port = free_port()?;
    let started = Instant::now();
    let child = Command::new(bin)
        .args([
            "serve",
            "--no-grpc",
            "--instances",
            "2",
            "--poll-interval-ms",
            "0",
            "--http",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--models")
        .arg(repo)
        .env("CAPSULE_CACHE_DIR", cache)
        .env("CAPSULE_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting capsule serve")?;
    let server = Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    };
    wait_ready(
        client,
        &server.base,
        "/v2/health/ready",
        Duration::from_secs(120),
    )
    .await?;
    Ok((server, started.elapsed()))
}

struct LoadResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    max_rss_kib: u64,
}

/// Closed loop: `concurrency` clients each send the next request when the last one returns.
async fn load(
    client: &reqwest::Client,
    urls: &[String],
    body: &Body,
    concurrency: usize,
    seconds: f64,
    pid: Option<u32>,
) -> Result<LoadResult> {
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let max_rss = Arc::new(AtomicU64::new(0));
    let sampler = pid.map(|pid| {
        let (stop, max_rss) = (Arc::clone(&stop), Arc::clone(&max_rss));
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if let Some(r) = rss_kib(pid) {
                    max_rss.fetch_max(r, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    });
    let body = body.clone();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let (client, stop, errors, body) = (
            client.clone(),
            Arc::clone(&stop),
            Arc::clone(&errors),
            body.clone(),
        );
        let url = urls[i % urls.len()].clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let mut request = client.post(&url).body(body.bytes.clone());
                request = match body.json_len {
                    Some(n) => request
                        .header("content-type", "application/octet-stream")
                        .header("inference-header-content-length", n),
                    None => request.header("content-type", "application/json"),
                };
                let ok = match request.send().await {
                    Ok(r) => r.status().is_success() && r.bytes().await.is_ok(),
                    Err(_) => false,
                };
                if ok {
                    latencies.push(t.elapsed());
                } else {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    if let Some(s) = sampler {
        let _ = s.join();
    }
    all.sort();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    Ok(LoadResult {
        rps: all.len() as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors: errors.load(Ordering::Relaxed),
        max_rss_kib: max_rss.load(Ordering::Relaxed),
    })
}

/// A request body: V2 JSON, or the binary tensor extension (`json_len` set).
#[derive(Clone)]
struct Body {
    bytes: Vec<u8>,
    json_len: Option<usize>,
}

fn json_body(inputs: &[NamedTensor]) -> Result<Body> {
    Ok(Body {
        bytes: serde_json::to_vec(&InferenceRequest::from_tensors(inputs)?)?,
        json_len: None,
    })
}

/// Every input as binary data, every output asked as binary (what `tritonclient` sends by
/// default for numpy arrays).
fn binary_body(inputs: &[NamedTensor], outputs: &[&str]) -> Result<Body> {
    let (bytes, json_len) = capsule_format::v2::encode_binary_request(inputs, outputs)?;
    Ok(Body {
        bytes,
        json_len: Some(json_len),
    })
}

/// Two threads calling the capsule in-process for `seconds`: the node's compute ceiling.
fn in_process_rps(bytes: &[u8], inputs: &[NamedTensor], seconds: f64) -> Result<f64> {
    let capsule = Arc::new(LoadedCapsule::load(
        &engine(),
        bytes.to_vec(),
        RunConfig {
            max_idle_instances: 2,
            ..RunConfig::default()
        },
    )?);
    capsule.prewarm(2)?;
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (capsule, stop, count, inputs) = (
                Arc::clone(&capsule),
                Arc::clone(&stop),
                Arc::clone(&count),
                inputs.to_vec(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if capsule.infer(&inputs).is_ok() {
                        count.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(seconds));
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        let _ = t.join();
    }
    Ok(count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

fn put(repo: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let dir = repo.join(name).join("1");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join(format!("{name}.capsule.wasm")), bytes)?;
    Ok(())
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let work = tempfile::tempdir()?;
    let cache = work.path().join("cache");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    let models = ["digits_mlp", "mnist_cnn"];
    let repo = work.path().join("repo");
    let mut capsules = Vec::new();
    for m in models {
        let built = fixture_capsule(m)?;
        put(&repo, m, &built.bytes)?;
        capsules.push(built);
    }
    println!(
        "guest profile: {}, {} s per point, client: 1 tokio thread in this process\n",
        capsule_runtime::GUEST_PROFILE,
        args.seconds
    );
    runtime.block_on(async {
        // The first start compiles the guest into the cache; the second is the warm start.
        drop(start_node(&args.capsule_bin, &repo, &cache, &client).await?);
        let (server, startup) = start_node(&args.capsule_bin, &repo, &cache, &client).await?;
        let pid = server.child.id();
        tokio::time::sleep(Duration::from_millis(300)).await;
        println!("start-up to ready (warm code cache, 2 capsules): {:.1} ms", startup.as_secs_f64() * 1e3);
        println!("resident memory idle, 2 capsules: {:.1} MiB\n", rss_kib(pid).unwrap_or(0) as f64 / 1024.0);
        println!("| model | body | concurrency | HTTP req/s | p50 ms | p99 ms | errors | HTTP / in-process | max RSS MiB |");
        println!("|---|---|---|---|---|---|---|---|---|");
        let mut in_process = Vec::new();
        for (m, built) in models.iter().zip(&capsules) {
            let sample = golden(m)?.remove(0);
            let outputs: Vec<&str> = built.manifest.outputs.iter().map(|o| o.name.as_str()).collect();
            let url = format!("{}/v2/models/{m}/infer", server.base);
            // In-process throughput before and after the HTTP points; their mean is the
            // reference.
            let before = in_process_rps(&built.bytes, &sample.inputs, args.seconds)?;
            let mut rows = Vec::new();
            for (kind, body) in [("binary", binary_body(&sample.inputs, &outputs)?), ("JSON", json_body(&sample.inputs)?)] {
                for &c in &args.concurrency {
                    let r = load(&client, std::slice::from_ref(&url), &body, c, args.seconds, Some(pid)).await?;
                    rows.push((kind, c, r));
                }
            }
            let after = in_process_rps(&built.bytes, &sample.inputs, args.seconds)?;
            let inproc = (before + after) / 2.0;
            in_process.push(format!("{m}: {before:.0} and {after:.0} req/s (mean {inproc:.0})"));
            for (kind, c, r) in rows {
                println!(
                    "| {m} | {kind} | {c} | {:.0} | {:.3} | {:.3} | {} | {:.2} | {:.1} |",
                    r.rps, r.p50_ms, r.p99_ms, r.errors, r.rps / inproc, r.max_rss_kib as f64 / 1024.0
                );
            }
        }
        println!("\nin-process (2 threads calling the capsule, before and after the HTTP points): {}", in_process.join("; "));
        drop(server);

        // Ten capsules: the MLP under ten names (one guest build: code compiled once).
        let repo10 = work.path().join("repo10");
        for i in 0..10 {
            put(&repo10, &format!("mlp{i}"), &capsules[0].bytes)?;
        }
        let (server, startup) = start_node(&args.capsule_bin, &repo10, &cache, &client).await?;
        let pid = server.child.id();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let idle = rss_kib(pid).unwrap_or(0);
        let sample = golden("digits_mlp")?.remove(0);
        let body = binary_body(&sample.inputs, &["label", "probabilities"])?;
        let urls: Vec<String> = (0..10).map(|i| format!("{}/v2/models/mlp{i}/infer", server.base)).collect();
        let r = load(&client, &urls, &body, 10, args.seconds, Some(pid)).await?;
        println!("\n10 capsules: start-up to ready {:.1} ms; resident memory idle {:.1} MiB, under load (10 clients, one per model) max {:.1} MiB; {:.0} req/s, p50 {:.3} ms, p99 {:.3} ms, {} errors",
            startup.as_secs_f64() * 1e3, idle as f64 / 1024.0, r.max_rss_kib as f64 / 1024.0, r.rps, r.p50_ms, r.p99_ms, r.errors);
        drop(server);

        if args.peer_mlserver {
            let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("peers/mlserver_digits.py");
            let (http, grpc) = (free_port()?, free_port()?);
            let dir = work.path().join("mlserver");
            std::fs::create_dir_all(&dir)?;
            let child = Command::new("python3")
                .arg(&script)
                .arg(&dir)
                .args([http.to_string(), grpc.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting MLServer (pip install mlserver mlserver-sklearn)")?;
            let server = Server { child, base: format!("http://127.0.0.1:{http}") };
            wait_ready(&client, &server.base, "/v2/models/digits_mlp/ready", Duration::from_secs(180)).await?;
            let mut scaled = sample.inputs.clone();
            let values: Vec<f32> = scaled[0].tensor.to_f64_vec()?.iter().map(|v| (*v / 16.0) as f32).collect();
            scaled[0].tensor = capsule_format::Tensor::from_f32(scaled[0].tensor.shape.clone(), &values)?;
            // MLServer takes V2 JSON (its binary extension support is partial).
            let body = json_body(&scaled)?;
            let url = format!("{}/v2/models/digits_mlp/infer", server.base);
            println!("\n| peer | concurrency | HTTP req/s | p50 ms | p99 ms | errors | max RSS MiB |");
            println!("|---|---|---|---|---|---|---|");
            for &c in &args.concurrency {
                let r = load(&client, std::slice::from_ref(&url), &body, c, args.seconds, Some(server.child.id())).await?;
                println!("| MLServer sklearn digits MLP | {c} | {:.0} | {:.3} | {:.3} | {} | {:.1} |", r.rps, r.p50_ms, r.p99_ms, r.errors, r.max_rss_kib as f64 / 1024.0);
            }
        }
        anyhow::Ok(())
    })
}
