//! The ONNX backend node tests run through capsules and through native tract in the same
//! run (`capsule-model` on the host, the same code the guest runs).
//!
//! A capsule must pass every test native tract passes; any difference is a bug to fix or to
//! explain in `docs/conformance.md`.

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use capsule_format::manifest::{Limits, ModelCard};
use capsule_format::wire::NamedTensorView;
use capsule_format::{DType, NamedTensor};
use capsule_model::LoadedModel;
use capsule_runtime::{BuildOptions, CapsuleBuilder};
use prost::Message;

/// The node tests of the installed `onnx` wheel (1.22.0 ships 1765 of them), or
/// `$CAPSULE_ONNX_NODE_TESTS`.
pub fn node_tests_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CAPSULE_ONNX_NODE_TESTS") {
        return Ok(PathBuf::from(dir));
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import onnx, os; print(os.path.dirname(onnx.__file__))",
        ])
        .output()
        .context("running python3 to find the onnx package")?;
    if !out.status.success() {
        bail!(
            "the onnx Python package is not installed (pip install onnx==1.22.0): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let dir =
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("backend/test/data/node");
    if !dir.is_dir() {
        bail!(
            "{} does not exist (onnx 1.22.0 ships the node tests; later versions do not)",
            dir.display()
        );
    }
    Ok(dir)
}

/// One node test: its model, inputs and expected outputs.
#[derive(Debug)]
pub struct Case {
    /// Test name (`test_abs`, ...).
    pub name: String,
    /// `model.onnx`.
    pub model: Vec<u8>,
    /// Inputs of `test_data_set_0`.
    pub inputs: Vec<NamedTensor>,
    /// Expected outputs of `test_data_set_0`.
    pub outputs: Vec<NamedTensor>,
}

fn read_tensors(dir: &Path, prefix: &str) -> Result<Vec<NamedTensor>> {
    let mut out = Vec::new();
    for i in 0.. {
        let path = dir.join(format!("{prefix}_{i}.pb"));
        if !path.exists() {
            break;
        }
        let bytes = std::fs::read(&path)?;
        let proto = tract_onnx::pb::TensorProto::decode(bytes.as_slice())
            .with_context(|| format!("{} is not a TensorProto", path.display()))?;
        let tensor = tract_onnx::tensor::load_tensor(
            &tract_onnx::data_resolver::FopenDataResolver,
            &proto,
            None,
        )
        .map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))?;
        out.push(NamedTensor {
            name: proto.name.clone(),
            tensor: capsule_model::from_tract(&proto.name, &tensor)?,
        });
    }
    Ok(out)
}

/// Reads one test directory.
pub fn load_case(dir: &Path) -> Result<Case> {
    let data = dir.join("test_data_set_0");
    Ok(Case {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        model: std::fs::read(dir.join("model.onnx"))?,
        inputs: read_tensors(&data, "input")?,
        outputs: read_tensors(&data, "output")?,
    })
}

/// numpy's `allclose(actual, expected, rtol=1e-3, atol=1e-7)`, as the ONNX backend tests
/// use; exact for integers, booleans and strings. Outputs are matched by position.
pub fn compare(expected: &[NamedTensor], actual: &[NamedTensor]) -> Result<(), String> {
    if expected.len() != actual.len() {
        return Err(format!(
            "{} outputs, expected {}",
            actual.len(),
            expected.len()
        ));
    }
    for (i, (e, a)) in expected.iter().zip(actual).enumerate() {
        let (e, a) = (&e.tensor, &a.tensor);
        if e.dtype != a.dtype {
            return Err(format!("output {i}: {} instead of {}", a.dtype, e.dtype));
        }
        if e.shape != a.shape {
            return Err(format!(
                "output {i}: shape {:?} instead of {:?}",
                a.shape, e.shape
            ));
        }
        if e.dtype == DType::Bytes {
            if e.data != a.data {
                return Err(format!("output {i}: strings differ"));
            }
            continue;
        }
        let (ev, av) = (
            e.to_f64_vec().map_err(|x| x.to_string())?,
            a.to_f64_vec().map_err(|x| x.to_string())?,
        );
        let float = matches!(e.dtype, DType::F16 | DType::F32 | DType::F64);
        for (j, (x, y)) in av.iter().zip(&ev).enumerate() {
            let ok = if float {
                (x.is_nan() && y.is_nan()) || x == y || (x - y).abs() <= 1e-7 + 1e-3 * y.abs()
            } else {
                x == y
            };
            if !ok {
                return Err(format!("output {i} element {j}: {x} instead of {y}"));
            }
        }
    }
    Ok(())
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".into())
}

fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("");
    if line.len() > 200 {
        format!("{}...", &line[..line.floor_char_boundary(200)])
    } else {
        line.to_owned()
    }
}

/// Runs a case on native tract; `Err` says why it failed (a tract panic included). Inputs
/// are matched to the graph's inputs by position (a few test files leave names empty).
pub fn run_native(case: &Case) -> Result<(), String> {
    let outcome =
        std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Vec<NamedTensor>, String> {
            let mut model = LoadedModel::load(&case.model, &[]).map_err(|e| e.to_string())?;
            let names: Vec<String> = model.inputs().iter().map(|s| s.name.clone()).collect();
            let views: Vec<NamedTensorView<'_>> = names
                .iter()
                .zip(&case.inputs)
                .map(|(name, t)| NamedTensorView {
                    name: name.as_str(),
                    tensor: t.tensor.view(),
                })
                .collect();
            model.run(&views).map_err(|e| e.to_string())
        }));
    match outcome {
        Ok(Ok(outputs)) => compare(&case.outputs, &outputs),
        Ok(Err(e)) => Err(first_line(&e)),
        Err(p) => Err(format!("tract panicked: {}", first_line(&panic_text(p)))),
    }
}

/// Runs a case through a capsule: build (load + snapshot inside the guest), install, infer.
pub fn run_capsule(builder: &CapsuleBuilder, case: &Case) -> Result<(), String> {
    let options = BuildOptions {
        name: case.name.replace('_', "-"),
        version: semver::Version::new(0, 0, 0),
        model: case.model.clone(),
        input_shapes: Vec::new(),
        card: ModelCard::default(),
        labels: Vec::new(),
        golden: Vec::new(),
        limits: Limits::default(),
        pipeline: None,
        reference: None,
        one_row_plan: Default::default(),
    };
    let capsule = builder
        .build(options)
        .map_err(|e| first_line(&e.to_string()))?
        .capsule;
    let inputs: Vec<NamedTensor> = capsule
        .manifest()
        .inputs
        .iter()
        .zip(&case.inputs)
        .map(|(spec, t)| NamedTensor {
            name: spec.name.clone(),
            tensor: t.tensor.clone(),
        })
        .collect();
    let outputs = capsule
        .infer(&inputs)
        .map_err(|e| first_line(&e.to_string()))?;
    compare(&case.outputs, &outputs)
}
