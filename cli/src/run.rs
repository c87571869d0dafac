//! `capsule run`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use capsule_format::NamedTensor;
use capsule_format::v2::{InferenceRequest, InferenceResponse};
use capsule_runtime::{LoadedCapsule, RunConfig};

use crate::{Cli, npy};

/// Largest request file read.
const MAX_REQUEST_BYTES: u64 = 256 << 20;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The capsule: a single file, or a model image (split form).
    capsule: PathBuf,
    /// The model image's guest code: a file, or a directory holding `<sha256>.wasm`
    /// [default: the image's directory]. Only for model images (`.capsule.img`).
    #[arg(long, value_name = "PATH")]
    code: Option<PathBuf>,
    /// A V2 inference request (JSON).
    #[arg(long, conflicts_with = "inputs")]
    request: Option<PathBuf>,
    /// An input from a file: name=file.npy for a tensor; any other file (an image, a text,
    /// a JSON record) becomes one element of a BYTES input for the capsule's pipeline, and
    /// repeating the name batches several files.
    #[arg(long = "input", value_name = "NAME=FILE")]
    inputs: Vec<String>,
    /// Write the V2 response here instead of stdout.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Per-call deadline in milliseconds (default: the capsule's time budget).
    #[arg(long)]
    deadline_ms: Option<u64>,
}

/// Largest raw input file read.
const MAX_INPUT_FILE_BYTES: u64 = 256 << 20;

/// `--input` values: `.npy` files as tensors, other files as BYTES elements grouped by name.
fn file_inputs(specs: &[String]) -> Result<Vec<NamedTensor>> {
    let mut tensors: Vec<NamedTensor> = Vec::new();
    let mut raw: Vec<(String, Vec<Vec<u8>>)> = Vec::new();
    for spec in specs {
        let (name, file) = spec
            .split_once('=')
            .with_context(|| format!("--input {spec:?}: expected NAME=FILE"))?;
        let path = std::path::Path::new(file);
        if path.extension().is_some_and(|e| e == "npy") {
            tensors.push(NamedTensor {
                name: name.to_owned(),
                tensor: npy::read(path)?,
            });
            continue;
        }
        let bytes = crate::read_limited(path, MAX_INPUT_FILE_BYTES, "input")?;
        match raw.iter_mut().find(|(n, _)| n == name) {
            Some((_, items)) => items.push(bytes),
            None => raw.push((name.to_owned(), vec![bytes])),
        }
    }
    for (name, items) in raw {
        if tensors.iter().any(|t| t.name == name) {
            bail!("--input {name}: given both as a .npy tensor and as files");
        }
        tensors.push(NamedTensor {
            tensor: capsule_format::Tensor::from_byte_strings(vec![items.len() as u64], &items)?,
            name,
        });
    }
    Ok(tensors)
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    let (id, tensors, wanted) = match (&args.request, args.inputs.is_empty()) {
        (Some(path), _) => {
            let body = crate::read_limited(path, MAX_REQUEST_BYTES, "request")?;
            let request = InferenceRequest::from_json(&body)
                .with_context(|| format!("{}", path.display()))?;
            let wanted = request
                .outputs
                .as_ref()
                .map(|o| o.iter().map(|o| o.name.clone()).collect::<Vec<_>>());
            (request.id.clone(), request.to_tensors()?, wanted)
        }
        (None, false) => (None, file_inputs(&args.inputs)?, None),
        (None, true) => bail!("give the inputs with --request req.json or --input name=FILE"),
    };
    let image = crate::split::read_capsule(&args.capsule, args.code.as_deref())?;
    let config = RunConfig {
        deadline: args.deadline_ms.map(std::time::Duration::from_millis),
        ..RunConfig::default()
    };
    let engine = cli.engine()?;
    let capsule = LoadedCapsule::install(&engine, image, config)
        .with_context(|| format!("{}", args.capsule.display()))?;
    let mut outputs = capsule.infer(&tensors)?;
    if let Some(wanted) = wanted {
        for w in &wanted {
            if !outputs.iter().any(|o| &o.name == w) {
                bail!("the request asks for output {w:?}, which the capsule does not have");
            }
        }
        outputs.retain(|o| wanted.contains(&o.name));
    }
    let m = capsule.manifest();
    let response =
        InferenceResponse::from_tensors(&m.name, Some(m.version.to_string()), id, &outputs)?;
    let text = serde_json::to_string_pretty(&response)?;
    match &args.output {
        Some(path) => std::fs::write(path, text + "\n")
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{text}"),
    }
    Ok(())
}
