//! `capsule demo`: the one-command tour on the bundled sample model (the scikit-learn digits
//! MLP of `tests/fixtures`) and embedded defaults: build a capsule, inspect it, run a request,
//! bench it against native tract; then the fleet in one process: publisher keys, a hub on
//! SQLite, a node synced with it, a signed push, inferences over V2, an update to 2.0.0 that
//! the node picks up, telemetry reaching the hub, and the dashboard (`--keep` leaves the hub
//! and the node running).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsule_format::hub::Summary;
use capsule_format::manifest::{Limits, ModelCard};
use capsule_format::v2::{InferenceRequest, InferenceResponse};
use capsule_runtime::{BuildOptions, CapsuleImage, LoadedCapsule, RunConfig};
use clap::Parser;

use crate::{Cli, bench, build, bytes, golden};

const MODEL: &[u8] = include_bytes!("../../tests/fixtures/models/digits_mlp/model.onnx");
const CARD: &str = include_str!("../../tests/fixtures/models/digits_mlp/card.toml");
const REQUEST: &str = include_str!("../../tests/fixtures/models/digits_mlp/sample_request.json");
const GOLDEN: [(&str, &str); 4] = [
    (
        "000",
        include_str!("../../tests/fixtures/models/digits_mlp/golden/000.json"),
    ),
    (
        "001",
        include_str!("../../tests/fixtures/models/digits_mlp/golden/001.json"),
    ),
    (
        "002",
        include_str!("../../tests/fixtures/models/digits_mlp/golden/002.json"),
    ),
    (
        "003",
        include_str!("../../tests/fixtures/models/digits_mlp/golden/003.json"),
    ),
];

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Where to keep the demo's files (default: a temporary directory, removed at the end
    /// unless --keep).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Leave the hub and the node running (until Ctrl-C), to open the dashboard and query
    /// the node.
    #[arg(long)]
    keep: bool,
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    let temporary = args.dir.is_none();
    let dir = match &args.dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("capsule-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;
    let result = tour(cli, &dir, args.keep);
    if temporary && !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

fn tour(cli: &Cli, dir: &Path, keep: bool) -> Result<()> {
    let args = Dir {
        dir: dir.to_owned(),
    };
    let golden_dir = args.dir.join("golden");
    std::fs::create_dir_all(&golden_dir)?;
    for (name, text) in GOLDEN {
        std::fs::write(golden_dir.join(format!("{name}.json")), text)?;
    }
    std::fs::write(args.dir.join("digits_mlp.onnx"), MODEL)?;
    std::fs::write(args.dir.join("request.json"), REQUEST)?;
    std::fs::write(args.dir.join("card.toml"), CARD)?;
    let labels: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    std::fs::write(args.dir.join("labels.txt"), labels.join("\n") + "\n")?;
    let card: ModelCard = toml::from_str(CARD).context("parsing the bundled model card")?;

    println!(
        "== 1. build: digits MLP (ONNX, {}) -> capsule",
        bytes(MODEL.len() as u64)
    );
    let engine = cli.engine()?;
    let built = build::build_with_progress(
        &engine,
        BuildOptions {
            name: "digits".into(),
            version: semver::Version::new(1, 0, 0),
            model: MODEL.to_vec(),
            input_shapes: Vec::new(),
            card,
            labels,
            golden: golden::read_dir(&golden_dir)?,
            limits: Limits::default(),
            pipeline: None,
            reference: None,
            one_row_plan: Default::default(),
        },
    )?;
    let path = args.dir.join("digits.capsule.wasm");
    std::fs::write(&path, &built.bytes)?;
    println!(
        "   wrote {} ({}), sha256 {}",
        path.display(),
        bytes(built.bytes.len() as u64),
        built.sha256
    );
    println!(
        "   model loaded in the guest in {:.1} ms, snapshot {:.1} ms, {} golden samples verified",
        built.load_time.as_secs_f64() * 1e3,
        built.snapshot_time.as_secs_f64() * 1e3,
        built.manifest.golden.len()
    );

    println!("\n== 2. inspect");
    let image = CapsuleImage::parse(built.bytes.clone())?;
    println!(
        "   imports: {}",
        if image.imports.is_empty() {
            "none (fully sandboxed)".to_owned()
        } else {
            // Only the host kernels (`CapsuleImage::parse` refuses anything else).
            format!(
                "{} (the host's matrix kernel, on its own memory only; nothing else)",
                image.imports.join(", ")
            )
        }
    );
    for i in &image.manifest.inputs {
        println!("   input  {i}");
    }
    for o in &image.manifest.outputs {
        println!("   output {o}");
    }

    println!(
        "\n== 3. run {} (Open Inference Protocol V2)",
        args.dir.join("request.json").display()
    );
    let capsule = LoadedCapsule::install(&engine, image, RunConfig::default())?;
    let request = InferenceRequest::from_json(REQUEST.as_bytes())?;
    let outputs = capsule.infer(&request.to_tensors()?)?;
    let m = capsule.manifest();
    let response =
        InferenceResponse::from_tensors(&m.name, Some(m.version.to_string()), None, &outputs)?;
    if let (Some(label), Some(probs)) = (
        outputs.iter().find(|o| o.name == "label"),
        outputs.iter().find(|o| o.name == "probabilities"),
    ) {
        let digit = label
            .tensor
            .to_f64_vec()?
            .first()
            .copied()
            .unwrap_or(f64::NAN);
        let p = probs.tensor.to_f64_vec()?;
        println!(
            "   predicted digit: {digit} (probability {:.4})",
            p.get(digit as usize).copied().unwrap_or(f64::NAN)
        );
    }
    println!(
        "   response: {}",
        serde_json::to_string(&response)?
            .chars()
            .take(160)
            .collect::<String>()
            + "..."
    );

    println!("\n== 4. bench: capsule vs native tract, interleaved in one run");
    let mut native = bench::native_model(m, MODEL, Default::default())?;
    let args = bench::Args::quick();
    let report = bench::measure(&capsule, Some(&mut native), &args)?;
    bench::print(&report);
    fleet(cli, dir, keep)
}

/// The demo's directory.
struct Dir {
    dir: PathBuf,
}

/// Runs `capsule ARGS` in this process as a user would type it (printed as `shown`, which
/// leaves out the hub's address and token), with this invocation's global options.
fn capsule(cli: &Cli, shown: &str, args: &[&str]) -> Result<()> {
    println!("$ capsule {shown}");
    let mut argv: Vec<String> = vec!["capsule".into()];
    argv.extend(args.iter().map(|a| (*a).to_owned()));
    argv.extend(global_args(cli));
    let parsed = Cli::try_parse_from(&argv).with_context(|| format!("capsule {shown}"))?;
    crate::dispatch(&parsed)
}

/// The global options of this invocation, for the commands the demo runs.
fn global_args(cli: &Cli) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(dir) = &cli.cache_dir {
        out.push("--cache-dir".into());
        out.push(dir.display().to_string());
    }
    if cli.no_cache {
        out.push("--no-cache".into());
    }
    if let Some(on) = cli.host_kernels {
        out.push(format!("--host-kernels={on}"));
    }
    out
}

/// Polls `ok` every 100 ms until it holds; fails with `what` after `limit`.
fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if ok()? {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {limit:?} waiting for {what}")
}

/// The fleet on embedded defaults, in `dir`: keys, hub, node, pushes, traffic, telemetry.
fn fleet(cli: &Cli, dir: &Path, keep: bool) -> Result<()> {
    std::env::set_current_dir(dir).with_context(|| format!("entering {}", dir.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("capsule-demo")
        .build()
        .context("cannot start the async runtime")?;
    let http = reqwest::Client::new();

    println!(
        "\n== 5. publisher keys and the root metadata nodes pin (in {})",
        dir.display()
    );
    capsule(cli, "keys generate root", &["keys", "generate", "root"])?;
    capsule(
        cli,
        "keys generate publisher",
        &["keys", "generate", "publisher"],
    )?;
    let root_args = [
        "keys",
        "root",
        "--root-key",
        "root.pub",
        "--targets-key",
        "publisher.pub",
        "--sign",
        "root.key",
        "-o",
        "root.json",
    ];
    capsule(cli, &root_args.join(" "), &root_args)?;

    println!("\n== 6. a hub on SQLite and a node synced with it");
    let hub_cli = Cli::try_parse_from([
        "capsule",
        "hub",
        "--database",
        "sqlite://hub.db",
        "--blobs",
        "hub-blobs",
        "--http",
        "127.0.0.1:0",
    ])?;
    let crate::Command::Hub(hub_args) = &hub_cli.command else {
        bail!("not the hub command");
    };
    let mut hub_config = hub_args.config()?;
    // Short telemetry windows, so that the hub shows this demo's traffic within seconds.
    hub_config.monitor.window_ms = 2_000;
    hub_config.monitor.grace_ms = 500;
    let hub = rt.block_on(capsule_hub::Hub::start(hub_config))?;
    let hub_url = format!("http://{}", hub.addr());
    let admin = std::fs::read_to_string("hub-admin.token")
        .context("reading the hub's generated admin token")?
        .trim()
        .to_owned();
    println!("$ capsule hub --database sqlite://hub.db --blobs hub-blobs &");
    println!("   hub at {hub_url} (admin token generated into hub-admin.token)");
    let token: serde_json::Value = rt.block_on(async {
        http.post(format!("{hub_url}/api/v1/nodes/demo-node/token"))
            .bearer_auth(&admin)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    })?;
    let token = token["token"].as_str().context("no node token")?.to_owned();
    std::fs::create_dir_all("models")?;
    let node_argv = [
        "capsule",
        "serve",
        "--models",
        "models",
        "--http",
        "127.0.0.1:0",
        "--no-grpc",
        "--hub",
        &hub_url,
        "--hub-token",
        &token,
        "--node-id",
        "demo-node",
        "--label",
        "site=demo",
        "--trusted-root",
        "root.json",
        "--telemetry-window-ms",
        "500",
    ];
    let node_cli = Cli::try_parse_from(
        node_argv
            .iter()
            .copied()
            .chain(global_args(cli).iter().map(String::as_str)),
    )?;
    let crate::Command::Serve(node_args) = &node_cli.command else {
        bail!("not the serve command");
    };
    let node = rt.block_on(capsule_node::Node::start(node_args.node_config(&node_cli)?))?;
    let node_url = format!("http://{}", node.http_addr());
    println!(
        "$ capsule serve --models models --hub {hub_url} --hub-token $NODE_TOKEN --node-id demo-node --trusted-root root.json &"
    );
    println!("   node at {node_url}, long-polling the hub for what to run");

    let result = (|| -> Result<()> {
        println!("\n== 7. sign 1.0.0 into the targets metadata, push it as production");
        // Signs FILE into the targets metadata and pushes it as production; returns when
        // the push began.
        let publish = |file: &str| -> Result<Instant> {
            let sign = [
                "sign",
                "--targets",
                "targets.json",
                "--add",
                file,
                "--key",
                "publisher.key",
            ];
            capsule(cli, &sign.join(" "), &sign)?;
            let push = [
                "push",
                file,
                "--targets",
                "targets.json",
                "--alias",
                "production",
                "--hub",
                &hub_url,
                "--token",
                &admin,
            ];
            let pushed = Instant::now();
            capsule(cli, &push[..6].join(" "), &push)?;
            Ok(pushed)
        };
        let pushed = publish("digits.capsule.wasm")?;
        let serving = |version: &'static str| {
            let http = http.clone();
            let url = format!("{node_url}/v2/models/digits");
            let rt = &rt;
            move || -> Result<bool> {
                rt.block_on(async {
                    let Ok(resp) = http.get(&url).send().await else {
                        return Ok(false);
                    };
                    let v: serde_json::Value = resp.json().await.unwrap_or_default();
                    Ok(v["versions"]
                        .as_array()
                        .is_some_and(|vs| vs.iter().any(|x| x == version)))
                })
            }
        };
        wait_for(
            "the node to serve 1.0.0",
            Duration::from_secs(60),
            serving("1.0.0"),
        )?;
        println!(
            "   the node verified the signed metadata, probed the golden samples and serves 1.0.0, {:.2} s after the push",
            pushed.elapsed().as_secs_f64()
        );

        println!("\n== 8. inferences over Open Inference Protocol V2 (REST)");
        let infer = |n: usize| -> Result<(Vec<f64>, serde_json::Value)> {
            rt.block_on(async {
                let mut times = Vec::with_capacity(n);
                let mut last = serde_json::Value::Null;
                for _ in 0..n {
                    let started = Instant::now();
                    let resp = http
                        .post(format!("{node_url}/v2/models/digits/infer"))
                        .header("content-type", "application/json")
                        .body(REQUEST)
                        .send()
                        .await?
                        .error_for_status()?;
                    last = resp.json().await?;
                    times.push(started.elapsed().as_secs_f64() * 1e3);
                }
                times.sort_by(f64::total_cmp);
                Ok::<_, anyhow::Error>((times, last))
            })
        };
        let (times, answer) = infer(20)?;
        let label = answer["outputs"]
            .as_array()
            .and_then(|o| o.iter().find(|o| o["name"] == "label"))
            .map(|o| o["data"][0].clone())
            .unwrap_or_default();
        println!(
            "$ curl -s {node_url}/v2/models/digits/infer -d @request.json   (x20)\n   model_version {}, label {label}; round trip p50 {:.2} ms over loopback",
            answer["model_version"].as_str().unwrap_or_default(),
            times[times.len() / 2]
        );

        println!(
            "\n== 9. an update: 2.0.0 built, signed, pushed as production; the node swaps it in"
        );
        let build2 = [
            "build",
            "digits_mlp.onnx",
            "--name",
            "digits",
            "--version",
            "2.0.0",
            "--card",
            "card.toml",
            "--labels",
            "labels.txt",
            "--golden",
            "golden",
            "-o",
            "digits-2.0.0.capsule.wasm",
        ];
        capsule(cli, &build2.join(" "), &build2)?;
        let pushed = publish("digits-2.0.0.capsule.wasm")?;
        wait_for(
            "the node to serve 2.0.0",
            Duration::from_secs(60),
            serving("2.0.0"),
        )?;
        println!(
            "   the node serves 2.0.0 {:.2} s after the push (only the model image travelled: the guest code was already there)",
            pushed.elapsed().as_secs_f64()
        );
        let (_, answer) = infer(10)?;
        println!(
            "   answers now come from model_version {}",
            answer["model_version"].as_str().unwrap_or_default()
        );

        println!("\n== 10. telemetry: the node's windows reach the hub");
        let mut totals = Vec::new();
        wait_for(
            "the hub's telemetry totals",
            Duration::from_secs(30),
            || {
                let summary: Summary = rt.block_on(async {
                    http.get(format!("{hub_url}/api/v1/telemetry/summary?model=digits"))
                        .bearer_auth(&admin)
                        .send()
                        .await?
                        .error_for_status()?
                        .json()
                        .await
                })?;
                totals = summary
                    .versions
                    .into_iter()
                    .map(|v| (v.version, v.requests))
                    .collect();
                // The 20 requests to 1.0.0, the 10 to 2.0.0 (the golden probes are not traffic).
                let sum: u64 = totals.iter().map(|(_, n)| n).sum();
                Ok(sum >= 30)
            },
        )?;
        for (version, requests) in &totals {
            println!("   hub: digits {version}: {requests} requests");
        }
        if keep {
            println!(
                "\n== the dashboard: {hub_url}/dashboard (sign in with the token in {})",
                dir.join("hub-admin.token").display()
            );
        } else {
            println!(
                "\nThe hub serves a dashboard at /dashboard: `capsule demo --keep` leaves the hub and the node running to open it."
            );
        }
        Ok(())
    })();

    if result.is_ok() && keep {
        println!(
            "\n--keep: the hub ({hub_url}) and the node ({node_url}) run until Ctrl-C; files in {}",
            dir.display()
        );
        rt.block_on(async {
            let _ = tokio::signal::ctrl_c().await;
        });
    }
    rt.block_on(async {
        node.shutdown().await;
        hub.shutdown().await;
    });
    result
}
