//! `capsule demo`: the one-command tour on the bundled sample model (the scikit-learn digits
//! MLP of `tests/fixtures`): build a capsule, inspect it, run a request, bench it against
//! native tract.

use std::path::PathBuf;

use anyhow::{Context, Result};
use capsule_format::manifest::{Limits, ModelCard};
use capsule_format::v2::{InferenceRequest, InferenceResponse};
use capsule_runtime::{BuildOptions, CapsuleImage, LoadedCapsule, RunConfig};

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
    /// Where to write the demo capsule and request.
    #[arg(long, default_value = "capsule-demo")]
    dir: PathBuf,
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let golden_dir = args.dir.join("golden");
    std::fs::create_dir_all(&golden_dir)?;
    for (name, text) in GOLDEN {
        std::fs::write(golden_dir.join(format!("{name}.json")), text)?;
    }
    std::fs::write(args.dir.join("digits_mlp.onnx"), MODEL)?;
    std::fs::write(args.dir.join("request.json"), REQUEST)?;
    let card: ModelCard = toml::from_str(CARD).context("parsing the bundled model card")?;
    let labels = (0..10).map(|d| d.to_string()).collect();

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
    println!(
        "\nNext: capsule inspect {0}; capsule run {0} --request {1}",
        path.display(),
        args_dir_request(&path)
    );
    if let Some(dir) = path.parent() {
        println!(
            "Serve it: capsule serve --models {} (then POST {} to http://localhost:8000/v2/models/{}/infer)",
            dir.display(),
            args_dir_request(&path),
            report.capsule
        );
    }
    Ok(())
}

fn args_dir_request(capsule: &std::path::Path) -> String {
    capsule.with_file_name("request.json").display().to_string()
}
