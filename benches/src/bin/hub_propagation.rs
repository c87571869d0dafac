//! Propagation benchmark: time from publishing a new production version on the hub until N
//! nodes serve it, and the bytes each node moves for it, for the single-file form and the
//! split form (guest code once, then model images) side by side.
//!
//! One process: a hub (SQLite) and N edge nodes (`capsule_node::Node`, each with its own
//! sync agent, engine and model repository) on loopback. Each node verifies the signed
//! targets metadata, downloads what it lacks, probes and swaps, then reports; the clock stops
//! when the hub has a `serving` report of the new version from every node. Bytes per node come
//! from the hub's download counters (`capsule_hub_blob_downloads_total{kind}`) times the blob
//! sizes.
//!
//! `cargo run -p capsule-benches --bin hub_propagation -- [--model mnist_cnn] [--form single|split] 10 100` (what
//! docs/benchmarks.md reports; `--model wat` is the 640-byte test capsule of earlier runs; the
//! workspace's dev profile optimizes every dependency, its guest is `guest-dev`)

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsule_format::split;
use capsule_format::tuf::{self, Root, Signed, SigningKey, Targets};
use capsule_hub::{Hub, HubConfig};
use capsule_node::{HubSync, Node, NodeConfig};
use capsule_tests::{WatCapsule, builder, options, test_cache_dir, wat_capsule};
use serde_json::{Value, json};

const ADMIN: &str = "bench-admin";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn call(
    c: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Vec<u8>>,
) -> Result<Value> {
    let mut req = c.request(method, &url).bearer_auth(token);
    if let Some(b) = body {
        req = req.body(b);
    }
    let resp = req.send().await?;
    let status = resp.status();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        bail!("{url}: {status} {v}");
    }
    Ok(v)
}

fn sha(b: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(b))
}

/// The two versions of the benchmark's model: the test capsule (`wat`), or a fixture built
/// twice (1.0.0 and 2.0.0: same guest code, other manifests).
fn versions(model: &str) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let mut out = Vec::new();
    for (v, y) in [("1.0.0", 1.0), ("2.0.0", 2.0)] {
        let bytes = if model == "wat" {
            wat_capsule(&WatCapsule {
                name: "wat".into(),
                version: semver::Version::parse(v)?,
                y,
                golden_y: Some(y),
            })?
        } else {
            let mut o = options(model)?;
            o.name = "wat".into();
            o.version = semver::Version::parse(v)?;
            builder().build(o)?.bytes
        };
        out.push((v, bytes));
    }
    Ok(out)
}

/// The hub's download counters: capsule, image, code.
async fn downloads(c: &reqwest::Client, base: &str) -> Result<[u64; 3]> {
    let text = c
        .get(format!("{base}/metrics"))
        .bearer_auth(ADMIN)
        .send()
        .await?
        .text()
        .await?;
    let (capsule, image, code) = capsule_tests::blob_downloads(&text);
    Ok([capsule, image, code])
}

async fn run(n: usize, model: &str, split_form: bool) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let publisher = SigningKey::from_secret([7; 32]);
    let mut root = Signed {
        signed: Root::new(
            &[publisher.public()],
            1,
            &[publisher.public()],
            1,
            now() + 3600,
        ),
        signatures: vec![],
    };
    publisher.sign(&mut root)?;
    let root_path = dir.path().join("root.json");
    std::fs::write(&root_path, serde_json::to_vec(&root)?)?;
    let hub = Hub::start(HubConfig {
        database: format!("sqlite://{}", dir.path().join("hub.db").display()),
        blobs: dir.path().join("blobs"),
        http: "127.0.0.1:0".parse()?,
        admin_token: Some(ADMIN.into()),
        ..HubConfig::default()
    })
    .await?;
    let base = format!("http://{}", hub.addr());
    let c = reqwest::Client::new();
    let mut nodes = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("node-{i:03}");
        let t = call(
            &c,
            reqwest::Method::POST,
            format!("{base}/api/v1/nodes/{id}/token"),
            ADMIN,
            None,
        )
        .await?;
        let models = dir.path().join(&id);
        std::fs::create_dir_all(&models)?;
        let node = Node::start(NodeConfig {
            models,
            http: "127.0.0.1:0".parse()?,
            grpc: None,
            instances: 1,
            poll_interval_ms: 0,
            cache_dir: Some(test_cache_dir()),
            hub: Some(HubSync {
                url: base.clone(),
                token: t["token"].as_str().unwrap_or_default().to_owned(),
                node_id: id,
                labels: Default::default(),
                trusted_root: root_path.clone(),
                wait_ms: 25_000,
                ca: None,
            }),
            ..NodeConfig::default()
        })
        .await?;
        nodes.push(node);
    }
    let versions = versions(model)?;
    let mut targets = Signed {
        signed: Targets {
            kind: "targets".into(),
            version: 0,
            expires: now() + 3600,
            targets: Default::default(),
        },
        signatures: vec![],
    };
    for (round, (v, bytes)) in versions.iter().enumerate() {
        let parts = split::split(bytes)?;
        // What `capsule push` uploads: the code once, then the image. The hub registers both
        // forms either way; only the signed targets decide what nodes fetch.
        for blob in [&parts.code, &parts.image] {
            call(
                &c,
                reqwest::Method::POST,
                format!("{base}/api/v1/blobs"),
                ADMIN,
                Some(blob.clone()),
            )
            .await?;
        }
        call(
            &c,
            reqwest::Method::POST,
            format!("{base}/api/v1/models/wat/versions"),
            ADMIN,
            Some(serde_json::to_vec(&json!({"sha256": sha(&parts.image)}))?),
        )
        .await?;
        targets.signed.version += 1;
        let (capsule_sha, image_sha) = (sha(bytes), sha(&parts.image));
        let signed = tuf::capsule_targets(
            "wat",
            v,
            (bytes.len() as u64, &capsule_sha),
            (parts.image.len() as u64, &image_sha),
            (parts.code.len() as u64, &parts.code_sha256),
        );
        // The single file only, or with its split form.
        let keep = if split_form { 3 } else { 1 };
        targets.signed.targets.extend(signed.into_iter().take(keep));
        targets.signatures.clear();
        publisher.sign(&mut targets)?;
        let metadata = serde_json::to_vec(&targets)?;
        let before = downloads(&c, &base).await?;
        // The clock starts when the publisher starts publishing.
        let started = Instant::now();
        call(
            &c,
            reqwest::Method::POST,
            format!("{base}/api/v1/metadata/targets"),
            ADMIN,
            Some(metadata.clone()),
        )
        .await?;
        call(
            &c,
            reqwest::Method::PUT,
            format!("{base}/api/v1/models/wat/aliases/production"),
            ADMIN,
            Some(serde_json::to_vec(&json!({"version": v}))?),
        )
        .await?;
        loop {
            let all = call(
                &c,
                reqwest::Method::GET,
                format!("{base}/api/v1/nodes"),
                ADMIN,
                None,
            )
            .await?;
            let serving = all["nodes"]
                .as_array()
                .context("nodes")?
                .iter()
                .filter(|node| {
                    node["report"]["models"].as_array().is_some_and(|ms| {
                        ms.iter()
                            .any(|m| m["version"] == *v && m["state"] == "serving")
                    })
                })
                .count();
            if serving == n {
                break;
            }
            if started.elapsed() > Duration::from_secs(120) {
                bail!("{serving}/{n} nodes serve {v} after 120 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = started.elapsed();
        let after = downloads(&c, &base).await?;
        let sizes = [bytes.len(), parts.image.len(), parts.code.len()];
        let moved: u64 = (0..3)
            .map(|k| (after[k] - before[k]) * sizes[k] as u64)
            .sum();
        let desired = call(
            &c,
            reqwest::Method::GET,
            format!("{base}/api/v1/nodes/node-000/desired"),
            ADMIN,
            None,
        )
        .await?;
        let desired_bytes = serde_json::to_vec(&desired)?.len();
        println!(
            "{model} {} nodes {n:>4}  {}  {v}: all serving after {:8.1} ms; per node: blobs {} B ({} capsule, {} image, {} code downloads in all) + desired state {} B (signed metadata {} B inside)",
            if split_form { "split " } else { "single" },
            if round == 0 {
                "first publish"
            } else {
                "update       "
            },
            elapsed.as_secs_f64() * 1e3,
            moved / n as u64,
            after[0] - before[0],
            after[1] - before[1],
            after[2] - before[2],
            desired_bytes,
            metadata.len()
        );
    }
    for node in nodes {
        node.shutdown().await;
    }
    hub.shutdown().await;
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let model = args
        .iter()
        .position(|a| a == "--model")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "wat".to_owned());
    let forms: Vec<bool> = match args
        .iter()
        .position(|a| a == "--form")
        .and_then(|i| args.get(i + 1))
        .map(String::as_str)
    {
        Some("single") => vec![false],
        Some("split") => vec![true],
        _ => vec![false, true],
    };
    let counts: Vec<usize> = args.iter().filter_map(|a| a.parse().ok()).collect();
    for n in if counts.is_empty() {
        vec![10, 100]
    } else {
        counts
    } {
        for &split_form in &forms {
            run(n, &model, split_form).await?;
        }
    }
    Ok(())
}
