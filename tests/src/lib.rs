//! Shared helpers of the workspace integration tests: fixture paths, golden files, and one
//! engine and capsule cache per test process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};
use capsule_format::manifest::{GoldenSample, Limits, ModelCard};
use capsule_format::v2::RequestInput;
use capsule_runtime::{BuildOptions, BuiltCapsule, CapsuleBuilder, CapsuleEngine, EngineConfig};

pub mod conformance;

/// Fixture models with golden outputs from onnxruntime (`tests/fixtures/generate.py`).
pub const FIXTURE_MODELS: [&str; 5] = [
    "digits_logreg",
    "digits_mlp",
    "digits_rf",
    "mnist_cnn",
    "silero_vad",
];

/// Golden samples whose onnxruntime outputs tract does not reproduce, natively and in a
/// capsule alike (Silero VAD v6 on non-silent audio: 0.2409 vs onnxruntime's 0.0614 for
/// sample 001). They are kept out of the capsules' own goldens; the fixture test asserts that
/// the capsule equals native tract on them and still differs from onnxruntime, so it notices
/// when tract changes.
pub const KNOWN_ORT_DIVERGENCE: [(&str, &str); 2] = [("silero_vad", "001"), ("silero_vad", "002")];

/// Whether a sample is in [`KNOWN_ORT_DIVERGENCE`].
pub fn diverges_from_ort(model: &str, sample: &str) -> bool {
    KNOWN_ORT_DIVERGENCE.contains(&(model, sample))
}

/// `tests/fixtures/models`.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join("models")
}

/// The ONNX bytes of a fixture.
pub fn model_bytes(name: &str) -> Result<Vec<u8>> {
    let path = models_dir().join(name).join("model.onnx");
    std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
}

/// The golden samples of a fixture (inputs and onnxruntime's outputs).
pub fn golden(name: &str) -> Result<Vec<GoldenSample>> {
    let dir = models_dir().join(name).join("golden");
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| {
            let v: serde_json::Value = serde_json::from_slice(&std::fs::read(p)?)?;
            let tensors = |key: &str| -> Result<Vec<_>> {
                let list: Vec<RequestInput> = serde_json::from_value(v[key].clone())?;
                Ok(list
                    .iter()
                    .map(RequestInput::to_named_tensor)
                    .collect::<Result<_, _>>()?)
            };
            Ok(GoldenSample {
                name: p
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                inputs: tensors("inputs")?,
                outputs: tensors("outputs")?,
                tolerance: v["tolerance"].as_f64().unwrap_or(1e-4),
            })
        })
        .collect()
}

/// A compiled-code cache shared by test processes (under the target directory), so the guest
/// is compiled once per guest build, not once per test binary.
pub fn test_cache_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("capsule-test-cache")
}

/// The engine shared by the tests of one process.
pub fn engine() -> Arc<CapsuleEngine> {
    static ENGINE: OnceLock<Arc<CapsuleEngine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| {
            let config = EngineConfig {
                cache_dir: Some(test_cache_dir()),
                ..EngineConfig::default()
            };
            match CapsuleEngine::new(config) {
                Ok(e) => e,
                Err(e) => panic!("cannot create the test engine: {e}"),
            }
        })
        .clone()
}

/// The builder shared by the tests of one process.
pub fn builder() -> &'static CapsuleBuilder {
    static BUILDER: OnceLock<CapsuleBuilder> = OnceLock::new();
    BUILDER.get_or_init(|| match CapsuleBuilder::new(&engine()) {
        Ok(b) => b,
        Err(e) => panic!("cannot create the capsule builder: {e}"),
    })
}

/// Build options for a fixture, with its golden samples.
pub fn options(name: &str) -> Result<BuildOptions> {
    Ok(BuildOptions {
        name: name.replace('_', "-"),
        version: semver::Version::new(1, 0, 0),
        model: model_bytes(name)?,
        input_shapes: Vec::new(),
        card: ModelCard::default(),
        labels: Vec::new(),
        golden: golden(name)?
            .into_iter()
            .filter(|g| !diverges_from_ort(name, &g.name))
            .collect(),
        limits: Limits::default(),
    })
}

/// The capsule of a fixture, built once per process.
pub fn fixture_capsule(name: &str) -> Result<Arc<BuiltCapsule>> {
    static BUILT: OnceLock<Mutex<HashMap<String, Arc<BuiltCapsule>>>> = OnceLock::new();
    let cache = BUILT.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(b) = cache
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .get(name)
    {
        return Ok(b.clone());
    }
    let built = Arc::new(builder().build(options(name)?)?);
    cache
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .insert(name.to_owned(), built.clone());
    Ok(built)
}
