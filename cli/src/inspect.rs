//! `capsule inspect`.

use std::path::PathBuf;

use anyhow::Result;
use capsule_format::CapsuleManifest;
use capsule_runtime::CapsuleImage;
use serde::Serialize;

use crate::{bytes, gzip_size};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The capsule: a single file, or a model image (split form).
    capsule: PathBuf,
    /// The model image's guest code: a file, or a directory holding `<sha256>.wasm`
    /// [default: the image's directory]. Only for model images (`.capsule.img`).
    #[arg(long, value_name = "PATH")]
    code: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Section {
    name: String,
    size: usize,
}

#[derive(Serialize)]
struct GoldenSummary {
    name: String,
    inputs: Vec<String>,
    outputs: Vec<String>,
    tolerance: f64,
}

#[derive(Serialize)]
struct Report<'a> {
    file: String,
    sha256: &'a str,
    size: usize,
    gzip_size: u64,
    /// Size of the model image file, when the capsule was given in split form.
    model_image_size: Option<usize>,
    guest_code_sha256: &'a str,
    memory_pages: u64,
    image_bytes: usize,
    imports: &'a [String],
    exports: &'a [String],
    sections: Vec<Section>,
    name: &'a str,
    version: String,
    abi_version: u32,
    created_at_unix: u64,
    builder_version: &'a str,
    guest_sha256: &'a str,
    numerics: capsule_format::manifest::Numerics,
    host_kernels: capsule_format::HostKernels,
    source: &'a capsule_format::manifest::SourceModel,
    inputs: &'a [capsule_format::TensorSpec],
    outputs: &'a [capsule_format::TensorSpec],
    model_inputs: &'a [capsule_format::TensorSpec],
    model_outputs: &'a [capsule_format::TensorSpec],
    pipeline: Vec<String>,
    /// Drift features: name, kind, bins.
    reference: Vec<String>,
    labels: &'a [String],
    card: &'a capsule_format::manifest::ModelCard,
    golden: Vec<GoldenSummary>,
    limits: capsule_format::manifest::Limits,
}

fn report<'a>(
    args: &Args,
    image: &'a CapsuleImage,
    model_image_size: Option<usize>,
) -> Result<Report<'a>> {
    let m: &CapsuleManifest = &image.manifest;
    Ok(Report {
        file: args.capsule.display().to_string(),
        sha256: &image.sha256,
        size: image.size(),
        gzip_size: gzip_size(image.bytes())?,
        model_image_size,
        guest_code_sha256: &image.code_sha256,
        memory_pages: image.memory_pages,
        image_bytes: image.image_bytes(),
        imports: &image.imports,
        exports: &image.exports,
        sections: image
            .sections
            .iter()
            .map(|(name, size)| Section {
                name: name.clone(),
                size: *size,
            })
            .collect(),
        name: &m.name,
        version: m.version.to_string(),
        abi_version: m.abi_version,
        created_at_unix: m.created_at_unix,
        builder_version: &m.builder_version,
        guest_sha256: &m.guest_sha256,
        numerics: m.numerics,
        host_kernels: m.host_kernels,
        source: &m.source,
        inputs: &m.inputs,
        outputs: &m.outputs,
        model_inputs: &m.model_inputs,
        model_outputs: &m.model_outputs,
        pipeline: m
            .pipeline
            .iter()
            .flat_map(capsule_format::Pipeline::describe)
            .collect(),
        reference: m
            .reference
            .iter()
            .flat_map(|r| &r.features)
            .map(|f| {
                let kind = match f.binning {
                    capsule_format::telemetry::Binning::Numeric { .. } => "numeric",
                    capsule_format::telemetry::Binning::Categorical { .. } => "categorical",
                };
                format!("{} ({kind}, {} bins)", f.name, f.binning.bins())
            })
            .collect(),
        labels: &m.labels,
        card: &m.card,
        golden: m
            .golden
            .iter()
            .map(|g| GoldenSummary {
                name: g.name.clone(),
                inputs: g
                    .inputs
                    .iter()
                    .map(|t| format!("{}: {}{:?}", t.name, t.tensor.dtype, t.tensor.shape))
                    .collect(),
                outputs: g
                    .outputs
                    .iter()
                    .map(|t| format!("{}: {}{:?}", t.name, t.tensor.dtype, t.tensor.shape))
                    .collect(),
                tolerance: g.tolerance,
            })
            .collect(),
        limits: m.limits,
    })
}

pub fn run(args: &Args) -> Result<()> {
    let (image, model_image_size) = crate::split::read_either(&args.capsule, args.code.as_deref())?;
    let r = report(args, &image, model_image_size)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!("{}  {} {}", r.file, r.name, r.version);
    println!("  sha256        {}", r.sha256);
    println!(
        "  size          {} ({} gzipped)",
        bytes(r.size as u64),
        bytes(r.gzip_size)
    );
    if let Some(size) = r.model_image_size {
        println!(
            "  split form    model image {} + guest code {}",
            bytes(size as u64),
            r.guest_code_sha256
        );
    }
    println!(
        "  guest code    sha256 {} (build {})",
        r.guest_code_sha256, r.guest_sha256
    );
    println!(
        "  memory        {} pages ({}), image {}",
        r.memory_pages,
        bytes(r.memory_pages * 65536),
        bytes(r.image_bytes as u64)
    );
    println!(
        "  abi           version {}, builder {}, numerics {}, host kernels {}",
        r.abi_version, r.builder_version, r.numerics, r.host_kernels
    );
    println!(
        "  source        {}, {}, sha256 {}",
        r.source.format,
        bytes(r.source.size_bytes),
        r.source.sha256
    );
    for i in r.inputs {
        println!("  input         {i}");
    }
    for o in r.outputs {
        println!("  output        {o}");
    }
    for line in &r.pipeline {
        println!("  pipeline      {line}");
    }
    if !r.reference.is_empty() {
        println!(
            "  reference     {} drift features: {}",
            r.reference.len(),
            r.reference.join(", ")
        );
    }
    if !r.labels.is_empty() {
        println!("  labels        {}", r.labels.join(", "));
    }
    if !r.card.description.is_empty() {
        println!("  description   {}", r.card.description);
    }
    for metric in &r.card.metrics {
        println!(
            "  metric        {} = {} ({})",
            metric.name, metric.value, metric.dataset
        );
    }
    println!("  golden        {} samples", r.golden.len());
    println!(
        "  limits        memory {}, {} ms per call",
        bytes(r.limits.max_memory_bytes),
        r.limits.time_budget_ms
    );
    println!(
        "  imports       {}",
        if r.imports.is_empty() {
            "none".to_owned()
        } else {
            r.imports.join(", ")
        }
    );
    println!("  exports       {}", r.exports.join(", "));
    println!("  sections");
    for s in &r.sections {
        println!("    {:<26} {:>12}", s.name, bytes(s.size as u64));
    }
    Ok(())
}
