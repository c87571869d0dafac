//! `capsule bench`: latency of a capsule next to the same model on native tract, measured
//! interleaved in one run (this machine is shared and noisy, so only same-run ratios mean
//! anything).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsule_format::manifest::Dim;
use capsule_format::wire::OneRowPlan;
use capsule_format::{CapsuleManifest, NamedTensor, Tensor};
use capsule_model::LoadedModel;
use capsule_runtime::{LoadedCapsule, RunConfig};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::Cli;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The capsule: a single file, or a model image (split form).
    capsule: PathBuf,
    /// The model image's guest code: a file, or a directory holding `<sha256>.wasm`
    /// [default: the image's directory]. Only for model images (`.capsule.img`).
    #[arg(long, value_name = "PATH")]
    code: Option<PathBuf>,
    /// The ONNX model the capsule was built from, to run on native tract in the same run
    /// (checked against the manifest's source hash).
    #[arg(long)]
    model: Option<PathBuf>,
    /// The native baseline's plan for batches of one. `always` (the default) gives native
    /// tract its fastest plan for a batch of one, whatever the capsule was built with; give
    /// `auto` or `never` to compare on the general plan. The native side cannot follow the
    /// capsule's `auto`: it packs weights for other kernels, so its choice can differ.
    #[arg(long, value_name = "WHEN", default_value = "always")]
    one_row_plan: OneRowPlan,
    /// Timed iterations.
    #[arg(long, default_value_t = 200)]
    iterations: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Cold starts to time (fresh instance to first output).
    #[arg(long, default_value_t = 20)]
    cold_starts: usize,
    /// Rows per request: the bench input's first row repeated (inputs whose leading
    /// dimension is symbolic). Latencies stay per request; divide by this for per row.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch: u64,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

impl Args {
    /// The short run of `capsule demo`.
    #[cfg(all(feature = "build", feature = "hub"))]
    pub fn quick() -> Args {
        Args {
            capsule: PathBuf::new(),
            code: None,
            model: None,
            one_row_plan: OneRowPlan::Always,
            iterations: 200,
            warmup: 20,
            cold_starts: 20,
            batch: 1,
            json: false,
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Serialize)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
    pub samples: usize,
}

impl Percentiles {
    pub fn of(mut samples: Vec<Duration>) -> Percentiles {
        samples.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let at = |q: f64| {
            samples
                .get(((samples.len() as f64 - 1.0) * q).round() as usize)
                .map(|d| ms(*d))
                .unwrap_or(f64::NAN)
        };
        let mean = if samples.is_empty() {
            f64::NAN
        } else {
            samples.iter().map(|d| ms(*d)).sum::<f64>() / samples.len() as f64
        };
        Percentiles {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            mean,
            samples: samples.len(),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub capsule: String,
    pub version: String,
    pub guest_profile: &'static str,
    pub input_from: String,
    pub batch: u64,
    pub capsule_latency: Percentiles,
    pub native_latency: Option<Percentiles>,
    /// Whether native tract ran a one-row plan (`--one-row-plan`; `None` without `--model`).
    pub native_one_row_plan: Option<bool>,
    pub ratio_p50: Option<f64>,
    pub cold_start_instantiate: Percentiles,
    pub cold_start_first_output: Percentiles,
    /// 8x8 product tiles the node's native kernels computed per warm inference (0: every
    /// product ran in wasm).
    pub host_kernel_tiles_per_inference: f64,
}

/// The bench input: the first golden sample, else zeros shaped by the manifest (symbolic
/// dimensions set to 1).
pub fn bench_inputs(m: &CapsuleManifest) -> Result<(Vec<NamedTensor>, String)> {
    if let Some(g) = m.golden.first() {
        return Ok((g.inputs.clone(), format!("golden sample {:?}", g.name)));
    }
    let inputs = m
        .inputs
        .iter()
        .map(|spec| {
            let shape: Vec<u64> = spec
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => *n,
                    Dim::Symbolic(_) => 1,
                })
                .collect();
            let count = shape.iter().product::<u64>();
            let size =
                spec.dtype
                    .size()
                    .context("BYTES inputs need a golden sample to bench")? as u64;
            let len = usize::try_from(count * size)?;
            Ok(NamedTensor {
                name: spec.name.clone(),
                tensor: Tensor::new(spec.dtype, shape, vec![0; len])?,
            })
        })
        .collect::<Result<_>>()?;
    Ok((inputs, "zeros".into()))
}

/// The bench inputs with their first row repeated `batch` times along a symbolic leading
/// dimension.
pub fn batched(
    m: &CapsuleManifest,
    inputs: Vec<NamedTensor>,
    batch: u64,
) -> Result<Vec<NamedTensor>> {
    if batch == 1 {
        return Ok(inputs);
    }
    inputs
        .into_iter()
        .map(|input| {
            let spec = m
                .inputs
                .iter()
                .find(|s| s.name == input.name)
                .with_context(|| format!("input {:?} is not in the manifest", input.name))?;
            if !matches!(spec.shape.first(), Some(Dim::Symbolic(_))) {
                bail!("--batch needs a symbolic leading dimension; the manifest has {spec}");
            }
            let t = &input.tensor;
            let rows = t.shape.first().copied().unwrap_or(0);
            if rows == 0 {
                bail!("input {:?} has no row to repeat", input.name);
            }
            let row = &t.data[..t.data.len() / usize::try_from(rows)?];
            let mut shape = t.shape.clone();
            shape[0] = batch;
            let data = row.repeat(usize::try_from(batch)?);
            Ok(NamedTensor {
                name: input.name,
                tensor: Tensor::new(t.dtype, shape, data)?,
            })
        })
        .collect()
}

/// Loads the native tract baseline with the capsule's (possibly user-fixed) input shapes.
pub fn native_model(
    m: &CapsuleManifest,
    onnx: &[u8],
    one_row_plan: OneRowPlan,
) -> Result<LoadedModel> {
    let hash = hex::encode(Sha256::digest(onnx));
    if hash != m.source.sha256 {
        bail!(
            "the model's sha256 {hash} is not the capsule's source {}",
            m.source.sha256
        );
    }
    Ok(LoadedModel::load_with(
        onnx,
        &m.input_shapes(),
        one_row_plan,
    )?)
}

pub fn measure(
    capsule: &LoadedCapsule,
    native: Option<&mut LoadedModel>,
    args: &Args,
) -> Result<BenchReport> {
    let m = capsule.manifest();
    let (inputs, input_from) = bench_inputs(m)?;
    let inputs = batched(m, inputs, args.batch)?;
    let views = capsule_format::wire::views(&inputs);
    let mut native = native;
    for _ in 0..args.warmup {
        capsule.infer(&inputs)?;
        if let Some(n) = native.as_deref_mut() {
            n.run(&views)?;
        }
    }
    let (mut caps, mut nat) = (
        Vec::with_capacity(args.iterations),
        Vec::with_capacity(args.iterations),
    );
    for i in 0..args.iterations {
        // Alternate which side goes first, so neither always runs on a warmer cache.
        let order = [i % 2 == 0, i % 2 != 0];
        for capsule_turn in order {
            if capsule_turn {
                let t = Instant::now();
                capsule.infer(&inputs)?;
                caps.push(t.elapsed());
            } else if let Some(n) = native.as_deref_mut() {
                let t = Instant::now();
                n.run(&views)?;
                nat.push(t.elapsed());
            }
        }
    }
    let (mut inst, mut first) = (Vec::new(), Vec::new());
    for _ in 0..args.cold_starts {
        let c = capsule.cold_start(&inputs)?;
        inst.push(c.instantiate);
        first.push(c.first_output);
    }
    let stats = capsule.stats();
    let tiles = stats.host_kernel_calls.load(Ordering::Relaxed) as f64
        / (stats.inferences.load(Ordering::Relaxed).max(1)) as f64;
    let capsule_latency = Percentiles::of(caps);
    let native_latency = native.is_some().then(|| Percentiles::of(nat));
    let native_one_row_plan = native.map(|n| n.one_row_shapes().is_some());
    Ok(BenchReport {
        capsule: m.name.clone(),
        version: m.version.to_string(),
        guest_profile: capsule_runtime::GUEST_PROFILE,
        input_from,
        batch: args.batch,
        ratio_p50: native_latency.as_ref().map(|n| capsule_latency.p50 / n.p50),
        capsule_latency,
        native_latency,
        native_one_row_plan,
        cold_start_instantiate: Percentiles::of(inst),
        cold_start_first_output: Percentiles::of(first),
        host_kernel_tiles_per_inference: tiles,
    })
}

pub fn print(r: &BenchReport) {
    println!(
        "{} {} (guest profile {}, input: {}, batch {})",
        r.capsule, r.version, r.guest_profile, r.input_from, r.batch
    );
    if r.host_kernel_tiles_per_inference > 0.0 {
        println!(
            "  host kernels: on ({:.0} native 8x8 product tiles per inference)",
            r.host_kernel_tiles_per_inference
        );
    } else {
        println!("  host kernels: off (every product in wasm)");
    }
    println!(
        "  {:<34} {:>9} {:>9} {:>9} {:>9}",
        "", "p50 ms", "p90 ms", "p99 ms", "mean ms"
    );
    let row = |label: &str, p: &Percentiles| {
        if p.samples == 0 {
            println!("  {label:<34} not measured (no samples)");
            return;
        }
        println!(
            "  {label:<34} {:>9.4} {:>9.4} {:>9.4} {:>9.4}",
            p.p50, p.p90, p.p99, p.mean
        )
    };
    row("capsule (warm instance)", &r.capsule_latency);
    if let Some(n) = &r.native_latency {
        row(
            if r.native_one_row_plan == Some(true) {
                "native tract (same run, one-row)"
            } else {
                "native tract (same run)"
            },
            n,
        );
    }
    row("cold start: fresh instance", &r.cold_start_instantiate);
    row("cold start: first output", &r.cold_start_first_output);
    if let Some(ratio) = r.ratio_p50 {
        println!("  capsule / native tract (p50): {ratio:.2}x");
    }
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    let image = crate::split::read_capsule(&args.capsule, args.code.as_deref())?;
    let engine = cli.engine()?;
    let capsule = LoadedCapsule::install(&engine, image, RunConfig::default())?;
    let mut native = match &args.model {
        Some(path) => {
            let onnx =
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            Some(native_model(capsule.manifest(), &onnx, args.one_row_plan)?)
        }
        None => None,
    };
    let report = measure(&capsule, native.as_mut(), args)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
        if args.model.is_none() {
            println!("  (pass --model MODEL.onnx to run native tract side by side)");
        }
    }
    Ok(())
}
