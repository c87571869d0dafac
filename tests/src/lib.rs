//! Shared helpers of the workspace integration tests: fixture paths, golden files, and one
//! engine and capsule cache per test process.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use anyhow::{Context, Result};
use capsule_format::manifest::{CapsuleManifest, GoldenSample, Limits, ModelCard};
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

/// Golden samples whose onnxruntime outputs tract does not reproduce. Kept out of the
/// capsules' own goldens; the fixture test asserts that they still differ, so it notices
/// when one starts to match. Empty: Silero VAD's samples 001 and 002 were listed here until
/// every inference started from the ops' initial states (they had run with the recurrent
/// state the previous sample left behind).
pub const KNOWN_ORT_DIVERGENCE: [(&str, &str); 0] = [];

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

/// The repository root.
pub fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
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
                // Deterministic: the tests compare the node with the browser and with stored
                // outputs bit for bit. `host_kernels.rs` runs the native kernels.
                host_kernels: false,
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
        pipeline: None,
        reference: None,
        one_row_plan: Default::default(),
    })
}

/// A capsule of `model` with a pipeline around it.
pub fn pipeline_capsule(
    name: &str,
    model: &Path,
    pipeline: capsule_format::Pipeline,
    labels: Vec<String>,
) -> Result<BuiltCapsule> {
    let model = std::fs::read(model).with_context(|| format!("reading {}", model.display()))?;
    Ok(builder().build(BuildOptions {
        name: name.into(),
        version: semver::Version::new(1, 0, 0),
        model,
        input_shapes: Vec::new(),
        card: ModelCard::default(),
        labels,
        golden: Vec::new(),
        limits: Limits::default(),
        pipeline: Some(pipeline),
        reference: None,
        one_row_plan: Default::default(),
    })?)
}

/// The capsule of one of the examples under `examples/` (`mnist-png`, `wine-tabular`,
/// `sentence-embedding`), built from its model, spec and labels.
pub fn example_capsule(example: &str) -> Result<BuiltCapsule> {
    let dir = repo_dir().join("examples").join(example);
    let model = match example {
        "mnist-png" => models_dir().join("mnist_cnn/model.onnx"),
        _ => dir.join("model.onnx"),
    };
    if !model.exists() {
        anyhow::bail!(
            "{} is missing (examples/sentence-embedding/fetch_model.py fetches the MiniLM model)",
            model.display()
        );
    }
    let spec = if dir.join("pipeline.json").exists() {
        dir.join("pipeline.json")
    } else {
        dir.join("pipeline.toml")
    };
    let labels = match std::fs::read_to_string(dir.join("labels.txt")) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(_) => Vec::new(),
    };
    pipeline_capsule(
        example,
        &model,
        capsule_runtime::spec::read_pipeline(&spec)?,
        labels,
    )
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

/// Settings of [`wat_capsule`].
#[derive(Debug, Clone)]
pub struct WatCapsule {
    /// Manifest name.
    pub name: String,
    /// Manifest version.
    pub version: semver::Version,
    /// The value of `y` it returns.
    pub y: f32,
    /// A golden sample `x = 0 -> y = golden_y`, when set (a value other than `y` makes a
    /// capsule that fails its probe).
    pub golden_y: Option<f32>,
}

impl Default for WatCapsule {
    fn default() -> Self {
        WatCapsule {
            name: "wat-guest".into(),
            version: semver::Version::new(1, 0, 0),
            y: 42.0,
            golden_y: None,
        }
    }
}

/// A hand-written capsule with input `x` (FP32 [1]) and output `y` (FP32 [1]): x = 1 loops
/// forever, x = 2 grows memory until refused and then hits `unreachable` (what Rust's
/// allocator does), x >= 1000 spins `x * 1000` iterations (a slow request) and returns, and
/// anything else returns `y` at once.
pub fn wat_capsule(settings: &WatCapsule) -> Result<Vec<u8>> {
    use capsule_format::wire::{InferResponse, encode};
    use capsule_format::{NamedTensor, Tensor};
    let response = encode(
        &InferResponse::Outputs(vec![NamedTensor {
            name: "y".into(),
            tensor: Tensor::from_f32(vec![1], &[settings.y])?,
        }]),
        "response",
    )?;
    let escaped: String = response.iter().map(|b| format!("\\{b:02x}")).collect();
    // The request lands at 1024: [count=1][len=1]['x'][dtype][rank=1][1][len=4][f32] puts the
    // value at byte 7.
    let wat = format!(
        r#"(module
          (memory (export "memory") 1)
          (data (i32.const 4096) "{escaped}")
          (func (export "capsule_abi_version") (result i32) i32.const 1)
          (func (export "capsule_init") (result i32) i32.const 0)
          (func (export "capsule_alloc") (param i32 i32) (result i32) i32.const 1024)
          (func (export "capsule_free") (param i32 i32 i32))
          (func (export "capsule_infer") (param $p i32) (param $n i32) (result i64)
            (local $x f32)
            (local $i i32)
            (local.set $x (f32.load (i32.add (local.get $p) (i32.const 7))))
            (if (f32.eq (local.get $x) (f32.const 1)) (then (loop $forever (br $forever))))
            (if (f32.eq (local.get $x) (f32.const 2))
              (then
                (loop $grow
                  (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
                unreachable))
            (if (f32.ge (local.get $x) (f32.const 1000))
              (then
                (local.set $i (i32.mul (i32.trunc_f32_u (local.get $x)) (i32.const 1000)))
                (loop $spin
                  (local.set $i (i32.sub (local.get $i) (i32.const 1)))
                  (br_if $spin (i32.gt_s (local.get $i) (i32.const 0))))))
            (i64.or (i64.shl (i64.const 4096) (i64.const 32)) (i64.const {len}))))"#,
        len = response.len()
    );
    let mut wasm = wat::parse_str(&wat)?;
    let mut manifest = fixture_capsule("digits_logreg")?.manifest.clone();
    manifest.name = settings.name.clone();
    manifest.version = settings.version.clone();
    manifest.host_kernels = capsule_format::HostKernels::None;
    manifest.inputs = vec![capsule_format::TensorSpec {
        name: "x".into(),
        dtype: capsule_format::DType::F32,
        shape: vec![capsule_format::Dim::Fixed(1)],
    }];
    manifest.outputs = vec![capsule_format::TensorSpec {
        name: "y".into(),
        dtype: capsule_format::DType::F32,
        shape: vec![capsule_format::Dim::Fixed(1)],
    }];
    manifest.golden.clear();
    if let Some(golden_y) = settings.golden_y {
        manifest.golden.push(GoldenSample {
            name: "zero".into(),
            inputs: vec![NamedTensor {
                name: "x".into(),
                tensor: Tensor::from_f32(vec![1], &[0.0])?,
            }],
            outputs: vec![NamedTensor {
                name: "y".into(),
                tensor: Tensor::from_f32(vec![1], &[golden_y])?,
            }],
            tolerance: 0.0,
        });
    }
    append_manifest(&mut wasm, &manifest)?;
    Ok(wasm)
}

/// Appends `manifest` to the module `wasm` as its manifest section.
pub fn append_manifest(wasm: &mut Vec<u8>, manifest: &CapsuleManifest) -> Result<()> {
    wasm_encoder::Section::append_to(
        &wasm_encoder::CustomSection {
            name: capsule_format::MANIFEST_SECTION.into(),
            data: manifest.to_section_bytes()?.into(),
        },
        wasm,
    );
    Ok(())
}

/// The hub's blob download counters in its `/metrics` text: (capsule, image, code).
pub fn blob_downloads(metrics: &str) -> (u64, u64, u64) {
    let count = |kind: &str| {
        let prefix = format!("capsule_hub_blob_downloads_total{{kind=\"{kind}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    (count("capsule"), count("image"), count("code"))
}
