//! `capsule build`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsule_format::manifest::{Dim, Limits, ModelCard};
use capsule_format::wire::{InputShape, OneRowPlan};
use capsule_runtime::reference::{Reference, ReferenceData, ReferencePrivacy};
use capsule_runtime::{BuildOptions, BuiltCapsule, CapsuleBuilder};
use indicatif::{ProgressBar, ProgressStyle};

use crate::{Cli, bytes, golden, gzip_size, read_limited};

/// Largest model file read.
const MAX_MODEL_BYTES: u64 = 2 << 30;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The ONNX model.
    model: PathBuf,
    /// Output file (default: NAME.capsule.wasm; NAME.capsule.img with --split).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Write the split form instead of one file: the model image (the output) and, beside it,
    /// the guest code module as `<sha256>.wasm` (kept when already there). `capsule join`
    /// makes the single file again, byte for byte.
    #[arg(long)]
    split: bool,
    /// Model name (default: the model file's stem).
    #[arg(long)]
    name: Option<String>,
    /// Model version (semver).
    #[arg(long, default_value = "0.1.0")]
    version: semver::Version,
    /// Fix an input's shape: name=1,3,224,224 (a dimension may be a symbol, e.g. N,3,224,224).
    #[arg(long = "input-shape", value_name = "NAME=DIMS")]
    input_shapes: Vec<String>,
    /// Model card (TOML: description, intended_use, limitations, training_data, owner, [[metrics]]).
    #[arg(long)]
    card: Option<PathBuf>,
    /// Directory of golden samples (*.json with inputs, expected outputs, tolerance), verified
    /// before the capsule is written and carried in its manifest.
    #[arg(long)]
    golden: Option<PathBuf>,
    /// Class labels, one per line.
    #[arg(long)]
    labels: Option<PathBuf>,
    /// Preprocessing and postprocessing spec (TOML or JSON; docs/pipeline.md), compiled into
    /// the capsule.
    #[arg(long)]
    pipeline: Option<PathBuf>,
    /// Training data for drift detection: a CSV file with a header (columns named after the
    /// tabular pipeline's fields, or one per column of an [N, F] input) or a 2-D .npy array.
    /// Its per-feature histograms and moments go into the manifest.
    #[arg(long, value_name = "FILE")]
    reference: Option<PathBuf>,
    /// What the reference statistics may reveal of the training data (browsers download the
    /// manifest): a comma-separated list of `bins=N` (quantile bins, default 10),
    /// `round=DIGITS` (bin edges, minima and maxima rounded to significant digits, so none is
    /// an exact training value), `min-count=K` (leave out category values seen fewer than K
    /// times), `no-categories` (no categorical feature in the reference). docs/monitoring.md,
    /// "Data privacy".
    #[arg(long, value_name = "OPTIONS", requires = "reference")]
    reference_privacy: Option<ReferencePrivacy>,
    /// Memory cap recorded in the manifest, in MiB.
    #[arg(long, default_value_t = 1024)]
    max_memory_mib: u64,
    /// Time budget of one inference recorded in the manifest, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    time_budget_ms: u64,
    /// A second plan for batches of one (the batch dimension made concrete): auto (when the
    /// weights it does not share with the general plan are at most a quarter of the model's),
    /// always, never. Faster for a batch of one (SqueezeNet and ResNet-50 about 1.5x); what it
    /// holds on its own grows the model image (docs/benchmarks.md).
    #[arg(long, value_name = "WHEN", default_value = "auto")]
    one_row_plan: OneRowPlan,
}

/// Largest reference data file read.
const MAX_REFERENCE_BYTES: u64 = 1 << 30;

/// Reads `--reference`: a CSV file with a header, or a 2-D `.npy` array.
fn read_reference(path: &Path) -> Result<ReferenceData> {
    if path.extension().is_some_and(|e| e == "npy") {
        let tensor = crate::npy::read(path)?;
        let [_, width] = tensor.shape[..] else {
            bail!(
                "{}: a reference array must have two dimensions (rows, features), not {:?}",
                path.display(),
                tensor.shape
            );
        };
        let width = usize::try_from(width).context("reference array too wide")?;
        if width == 0 {
            bail!("{}: the reference array has no columns", path.display());
        }
        return Ok(ReferenceData::Matrix {
            width,
            values: tensor.to_f64_vec()?,
        });
    }
    let bytes = read_limited(path, MAX_REFERENCE_BYTES, "reference data")?;
    let mut reader = csv::ReaderBuilder::new().from_reader(&bytes[..]);
    let columns: Vec<String> = reader
        .headers()
        .with_context(|| format!("{}: no CSV header", path.display()))?
        .iter()
        .map(str::to_owned)
        .collect();
    let mut rows = Vec::new();
    for (i, record) in reader.records().enumerate() {
        let record = record.with_context(|| format!("{}: CSV row {}", path.display(), i + 1))?;
        rows.push(record.iter().map(str::to_owned).collect());
    }
    Ok(ReferenceData::Table { columns, rows })
}

/// Parses `name=1,3,224,224`.
pub fn parse_input_shape(spec: &str) -> Result<InputShape> {
    let Some((name, dims)) = spec.split_once('=') else {
        bail!("--input-shape {spec:?}: expected NAME=DIM,DIM,... (e.g. input=1,3,224,224)");
    };
    if name.is_empty() {
        bail!("--input-shape {spec:?}: the input name is empty");
    }
    let shape = dims
        .split(',')
        .map(|d| {
            let d = d.trim();
            match d.parse::<u64>() {
                Ok(n) => Ok(Dim::Fixed(n)),
                Err(_) if !d.is_empty() && d.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                    Ok(Dim::Symbolic(d.to_owned()))
                }
                Err(_) => bail!("--input-shape {spec:?}: {d:?} is neither a number nor a symbol"),
            }
        })
        .collect::<Result<_>>()?;
    Ok(InputShape {
        name: name.to_owned(),
        shape,
    })
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    let name = match &args.name {
        Some(n) => n.clone(),
        None => args
            .model
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .context("cannot derive a name from the model path; pass --name")?,
    };
    let output = args.output.clone().unwrap_or_else(|| {
        PathBuf::from(if args.split {
            format!("{name}{}", capsule_format::split::IMAGE_SUFFIX)
        } else {
            format!("{name}.capsule.wasm")
        })
    });
    let card: ModelCard = match &args.card {
        Some(path) => {
            let text = String::from_utf8(read_limited(path, 1 << 20, "card")?)
                .context("card is not UTF-8")?;
            toml::from_str(&text).with_context(|| format!("parsing card {}", path.display()))?
        }
        None => ModelCard::default(),
    };
    let labels = match &args.labels {
        Some(path) => String::from_utf8(read_limited(path, 16 << 20, "labels")?)
            .context("labels file is not UTF-8")?
            .lines()
            .map(str::to_owned)
            .collect(),
        None => Vec::new(),
    };
    let golden = match &args.golden {
        Some(dir) => golden::read_dir(dir)?,
        None => Vec::new(),
    };
    let options = BuildOptions {
        name,
        version: args.version.clone(),
        model: read_limited(&args.model, MAX_MODEL_BYTES, "model")?,
        input_shapes: args
            .input_shapes
            .iter()
            .map(|s| parse_input_shape(s))
            .collect::<Result<_>>()?,
        card,
        labels,
        golden,
        limits: Limits {
            max_memory_bytes: args.max_memory_mib.saturating_mul(1 << 20),
            time_budget_ms: args.time_budget_ms,
        },
        pipeline: args
            .pipeline
            .as_deref()
            .map(capsule_runtime::spec::read_pipeline)
            .transpose()?,
        reference: args
            .reference
            .as_deref()
            .map(|path| -> Result<Reference> {
                Ok(Reference {
                    data: read_reference(path)?,
                    privacy: args.reference_privacy.unwrap_or_default(),
                })
            })
            .transpose()?,
        one_row_plan: args.one_row_plan,
    };
    let privacy = options.reference.as_ref().map(|r| r.privacy);
    let engine = cli.engine()?;
    let built = build_with_progress(&engine, options)?;
    if args.split {
        let written = crate::split::write_split(&built.bytes, &output)?;
        print_summary(&built, &output, privacy.as_ref())?;
        crate::split::print_written(&written, built.bytes.len());
        return Ok(());
    }
    std::fs::write(&output, &built.bytes)
        .with_context(|| format!("writing {}", output.display()))?;
    print_summary(&built, &output, privacy.as_ref())?;
    Ok(())
}

fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// Builds with a progress indicator on stderr (hidden when stderr is not a terminal).
pub fn build_with_progress(
    engine: &std::sync::Arc<capsule_runtime::CapsuleEngine>,
    options: BuildOptions,
) -> Result<BuiltCapsule> {
    let started = Instant::now();
    let before = engine.compilations();
    let bar = spinner("preparing the guest (compiled once per guest build, then cached)");
    let builder = CapsuleBuilder::new(engine)?;
    bar.set_message(format!(
        "loading {} inside the guest and taking the snapshot",
        options.name
    ));
    let built = builder.build(options);
    bar.finish_and_clear();
    let built = built?;
    let compiled = engine.compilations() - before;
    if compiled > 0 {
        eprintln!("compiled the guest build ({compiled} module(s)); later builds reuse the cache");
    }
    eprintln!("built in {:.1} ms", started.elapsed().as_secs_f64() * 1e3);
    Ok(built)
}

fn print_summary(
    built: &BuiltCapsule,
    output: &Path,
    privacy: Option<&ReferencePrivacy>,
) -> Result<()> {
    let m = &built.manifest;
    println!(
        "wrote {} ({} raw, {} gzipped)",
        output.display(),
        bytes(built.bytes.len() as u64),
        bytes(gzip_size(&built.bytes)?)
    );
    println!(
        "  capsule   {} {}  sha256 {}",
        m.name, m.version, built.sha256
    );
    println!(
        "  source    onnx, {}  sha256 {}",
        bytes(m.source.size_bytes),
        m.source.sha256
    );
    println!("  guest     sha256 {}", m.guest_sha256);
    for i in &m.inputs {
        println!("  input     {i}");
    }
    for o in &m.outputs {
        println!("  output    {o}");
    }
    for line in m
        .pipeline
        .iter()
        .flat_map(capsule_format::Pipeline::describe)
    {
        println!("  pipeline  {line}");
    }
    if let Some(r) = &m.reference {
        println!(
            "  reference {} features from {} training rows (drift detection)",
            r.features.len(),
            r.rows
        );
    }
    if let Some(p) = privacy {
        println!("  privacy   reference statistics: {p}");
    }
    let r = &built.report;
    let one_row = match (
        r.one_row_plan,
        r.one_row_plan_own_bytes,
        r.one_row_plan_budget,
    ) {
        (true, Some(own), _) => format!(
            " (and a one-row plan for batches of one, with {} of weights of its own)",
            bytes(own)
        ),
        (true, None, _) => " (and a one-row plan for batches of one)".to_owned(),
        (false, Some(own), Some(budget)) => format!(
            "; no one-row plan: it would have {} of weights of its own, over auto's {} \
             (--one-row-plan always makes it)",
            bytes(own),
            bytes(budget)
        ),
        (false, _, _) => String::new(),
    };
    println!(
        "  plan      {} nodes{one_row}; snapshot image {}",
        r.node_count,
        bytes(built.image_bytes as u64)
    );
    println!(
        "  time      load+optimize {:.1} ms, snapshot {:.1} ms, verify {:.1} ms ({} golden samples passed)",
        built.load_time.as_secs_f64() * 1e3,
        built.snapshot_time.as_secs_f64() * 1e3,
        built.verify_time.as_secs_f64() * 1e3,
        m.golden.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_shapes_parse() {
        let s = parse_input_shape("input=N,3,224,224").unwrap();
        assert_eq!(s.name, "input");
        assert_eq!(
            s.shape,
            vec![
                Dim::Symbolic("N".into()),
                Dim::Fixed(3),
                Dim::Fixed(224),
                Dim::Fixed(224)
            ]
        );
        assert_eq!(
            parse_input_shape("x").unwrap_err().to_string(),
            "--input-shape \"x\": expected NAME=DIM,DIM,... (e.g. input=1,3,224,224)"
        );
        assert_eq!(
            parse_input_shape("x=1,-2").unwrap_err().to_string(),
            "--input-shape \"x=1,-2\": \"-2\" is neither a number nor a symbol"
        );
    }
}
