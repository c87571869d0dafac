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
    /// The capsule.
    capsule: PathBuf,
    /// A V2 inference request (JSON).
    #[arg(long, conflicts_with = "inputs")]
    request: Option<PathBuf>,
    /// An input from a NumPy file: name=file.npy (repeat for several inputs).
    #[arg(long = "input", value_name = "NAME=FILE.npy")]
    inputs: Vec<String>,
    /// Write the V2 response here instead of stdout.
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Per-call deadline in milliseconds (default: the capsule's time budget).
    #[arg(long)]
    deadline_ms: Option<u64>,
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
        (None, false) => {
            let tensors = args
                .inputs
                .iter()
                .map(|spec| {
                    let (name, file) = spec
                        .split_once('=')
                        .with_context(|| format!("--input {spec:?}: expected NAME=FILE.npy"))?;
                    Ok(NamedTensor {
                        name: name.to_owned(),
                        tensor: npy::read(file.as_ref())?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            (None, tensors, None)
        }
        (None, true) => bail!("give the inputs with --request req.json or --input name=file.npy"),
    };
    let bytes = std::fs::read(&args.capsule)
        .with_context(|| format!("reading {}", args.capsule.display()))?;
    let config = RunConfig {
        deadline: args.deadline_ms.map(std::time::Duration::from_millis),
        ..RunConfig::default()
    };
    let engine = cli.engine()?;
    let capsule = LoadedCapsule::load(&engine, bytes, config)
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
