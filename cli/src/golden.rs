//! Golden sample files: one JSON file per sample, `{"inputs": [V2 tensors], "outputs":
//! [V2 tensors], "tolerance": 1e-4}` (the V2 request/response tensor shapes).

use std::path::Path;

use anyhow::{Context, Result, bail};
use capsule_format::manifest::GoldenSample;
use capsule_format::v2::RequestInput;
use serde::Deserialize;

/// Largest golden sample file read.
const MAX_SAMPLE_BYTES: u64 = 16 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SampleFile {
    inputs: Vec<RequestInput>,
    outputs: Vec<RequestInput>,
    #[serde(default = "default_tolerance")]
    tolerance: f64,
}

fn default_tolerance() -> f64 {
    1e-4
}

/// Reads one golden sample file.
pub fn read_sample(path: &Path) -> Result<GoldenSample> {
    let text = crate::read_limited(path, MAX_SAMPLE_BYTES, "golden sample")?;
    let file: SampleFile =
        serde_json::from_slice(&text).with_context(|| format!("parsing {}", path.display()))?;
    let tensors = |list: &[RequestInput]| -> Result<Vec<_>> {
        list.iter()
            .map(|t| {
                t.to_named_tensor()
                    .with_context(|| format!("in {}", path.display()))
            })
            .collect()
    };
    if file.tolerance.is_nan() || file.tolerance < 0.0 {
        bail!("{}: tolerance must be a number >= 0", path.display());
    }
    Ok(GoldenSample {
        name: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        inputs: tensors(&file.inputs)?,
        outputs: tensors(&file.outputs)?,
        tolerance: file.tolerance,
    })
}

/// Reads every `*.json` file of a directory, in name order.
pub fn read_dir(dir: &Path) -> Result<Vec<GoldenSample>> {
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("reading golden directory {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    if paths.is_empty() {
        bail!("golden directory {} has no *.json sample", dir.display());
    }
    paths.iter().map(|p| read_sample(p)).collect()
}
