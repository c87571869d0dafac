//! The model engine inside every capsule: tract glue shared by the guest and the host.
//!
//! [`LoadedModel::load`] parses, type-checks and optimizes an ONNX model into a runnable tract
//! plan; [`LoadedModel::run`] runs it on capsule tensors. The guest (`capsule-guest`) wraps
//! exactly this code in the wasm ABI, and the host uses the very same code as the *native*
//! baseline (`capsule bench`, the conformance runner, the tests), so a capsule and native tract
//! are compared on identical logic and differ only in where they run.
//!
//! Model files are untrusted: on the host this crate must only load models that the user
//! trusts (tract can panic on crafted ONNX); untrusted models are parsed inside the guest,
//! where a panic is a trap.
#![deny(missing_docs)]

use std::sync::Arc;

use capsule_format::manifest::{Dim, TensorSpec};
use capsule_format::wire::{BuildReport, InputShape, NamedTensorView};
use capsule_format::{DType, NamedTensor, Tensor};
use tract_onnx::prelude::*;

mod pool;

/// Errors of loading or running a model.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The model cannot be parsed, typed or optimized (tract's full error chain, which names
    /// the failing node and operator).
    #[error("cannot load model: {0}")]
    Load(String),
    /// A request that does not fit the model's inputs.
    #[error("{0}")]
    BadInput(String),
    /// An input whose shape tract refuses.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// Tract failed while running the plan.
    #[error("inference failed: {0}")]
    Run(String),
}

/// Clears the upper halves of the AVX registers; [`LoadedModel::run`] calls it after every
/// native run.
///
/// tract's native x86 kernels (AVX2/AVX-512) can return with dirty upper register state, and
/// Cranelift's code then pays an AVX-SSE transition penalty on every SIMD instruction: it made
/// capsules look 20-60x slower than native in interleaved benchmark runs (1.6-2x once
/// cleared). Benchmarks, tests and the conformance runner run native tract and wasm in one
/// process; doing it here covers them all. In the guest (wasm32) it compiles to nothing.
fn clear_avx_upper_state() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: `vzeroupper` only needs AVX, checked above.
        unsafe { clear_upper() }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn clear_upper() {
    std::arch::x86_64::_mm256_zeroupper();
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

type Plan = TypedSimplePlan;

/// A model parsed and optimized into a tract plan, with its input and output signature.
pub struct LoadedModel {
    state: TypedSimpleState,
    /// The ops' initial states (recurrent and stateful ops keep state across `run`s, for
    /// streaming): restored before every inference so that each one is independent, as on a
    /// fresh instance. Empty when no op has state (nothing to restore).
    pristine: Vec<Option<Box<dyn tract_onnx::tract_core::internal::OpState>>>,
    inputs: Vec<TensorSpec>,
    input_types: Vec<DatumType>,
    outputs: Vec<TensorSpec>,
    node_count: u32,
}

impl std::fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModel")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("node_count", &self.node_count)
            .finish()
    }
}

fn chain(e: &TractError) -> String {
    // `{:#}` prints the whole anyhow-style context chain on one line: the node and operator
    // that failed are in the outer contexts, the reason in the innermost.
    format!("{e:#}")
}

fn to_dtype(dt: DatumType) -> Option<DType> {
    Some(match dt {
        DatumType::Bool => DType::Bool,
        DatumType::U8 => DType::U8,
        DatumType::U16 => DType::U16,
        DatumType::U32 => DType::U32,
        DatumType::U64 => DType::U64,
        DatumType::I8 => DType::I8,
        DatumType::I16 => DType::I16,
        DatumType::I32 => DType::I32,
        DatumType::I64 => DType::I64,
        DatumType::F16 => DType::F16,
        DatumType::F32 => DType::F32,
        DatumType::F64 => DType::F64,
        DatumType::String => DType::Bytes,
        _ => return None,
    })
}

fn to_datum(dt: DType) -> DatumType {
    match dt {
        DType::Bool => DatumType::Bool,
        DType::U8 => DatumType::U8,
        DType::U16 => DatumType::U16,
        DType::U32 => DatumType::U32,
        DType::U64 => DatumType::U64,
        DType::I8 => DatumType::I8,
        DType::I16 => DatumType::I16,
        DType::I32 => DatumType::I32,
        DType::I64 => DatumType::I64,
        DType::F16 => DatumType::F16,
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        DType::Bytes => DatumType::String,
    }
}

fn spec(name: String, fact: &TypedFact) -> Result<TensorSpec> {
    let dtype = to_dtype(fact.datum_type.unquantized()).ok_or_else(|| {
        Error::Load(format!(
            "{name}: datatype {:?} is not supported",
            fact.datum_type
        ))
    })?;
    let shape = fact
        .shape
        .iter()
        .map(|d| match d.to_i64() {
            Ok(v) => u64::try_from(v)
                .map(Dim::Fixed)
                .map_err(|_| Error::Load(format!("{name}: negative dimension {v}"))),
            Err(_) => Ok(Dim::Symbolic(d.to_string())),
        })
        .collect::<Result<_>>()?;
    Ok(TensorSpec { name, dtype, shape })
}

impl LoadedModel {
    /// Parses, types and optimizes an ONNX model. `input_shapes` fixes the shapes of the
    /// named inputs; other symbolic dimensions stay symbolic.
    pub fn load(onnx: &[u8], input_shapes: &[InputShape]) -> Result<LoadedModel> {
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &*onnx)
            .map_err(|e| Error::Load(chain(&e)))?;
        for fixed in input_shapes {
            let outlets = model
                .input_outlets()
                .map_err(|e| Error::Load(chain(&e)))?
                .to_vec();
            let Some(ix) = outlets
                .iter()
                .position(|o| model.node(o.node).name == fixed.name)
            else {
                let names: Vec<&str> = outlets
                    .iter()
                    .map(|o| model.node(o.node).name.as_str())
                    .collect();
                return Err(Error::Load(format!(
                    "--input-shape names input {:?}, but the model's inputs are {names:?}",
                    fixed.name
                )));
            };
            let dims: Vec<TDim> = fixed
                .shape
                .iter()
                .map(|d| match d {
                    Dim::Fixed(n) => usize::try_from(*n)
                        .map(TDim::from)
                        .map_err(|_| Error::Load(format!("dimension {n} is too large"))),
                    Dim::Symbolic(s) => Ok(TDim::Sym(model.symbols.sym(s))),
                })
                .collect::<Result<_>>()?;
            let fact = model
                .input_fact(ix)
                .map_err(|e| Error::Load(chain(&e)))?
                .clone();
            let fact = fact.with_shape(
                dims.into_iter()
                    .collect::<tract_onnx::tract_hir::infer::ShapeFactoid>(),
            );
            model = model
                .with_input_fact(ix, fact)
                .map_err(|e| Error::Load(chain(&e)))?;
        }
        let typed = model.into_optimized().map_err(|e| Error::Load(chain(&e)))?;
        Self::from_typed(typed)
    }

    fn from_typed(mut typed: TypedModel) -> Result<LoadedModel> {
        let load = |e: TractError| Error::Load(chain(&e));
        pool::substitute(&mut typed).map_err(load)?;
        let mut inputs = Vec::new();
        let mut input_types = Vec::new();
        for (ix, outlet) in typed.input_outlets().map_err(load)?.iter().enumerate() {
            let fact = typed.input_fact(ix).map_err(load)?;
            input_types.push(fact.datum_type);
            inputs.push(spec(typed.node(outlet.node).name.clone(), fact)?);
        }
        let mut outputs = Vec::new();
        for (ix, outlet) in typed.output_outlets().map_err(load)?.iter().enumerate() {
            let name = typed
                .outlet_label(*outlet)
                .map(str::to_owned)
                .unwrap_or_else(|| typed.node(outlet.node).name.clone());
            outputs.push(spec(name, typed.output_fact(ix).map_err(load)?)?);
        }
        let node_count = u32::try_from(typed.nodes().len()).unwrap_or(u32::MAX);
        let plan: Arc<Plan> = typed.into_runnable().map_err(load)?;
        let state = TypedSimpleState::new(&plan).map_err(load)?;
        let pristine = if state.op_states.iter().any(Option::is_some) {
            state.op_states.clone()
        } else {
            Vec::new()
        };
        Ok(LoadedModel {
            state,
            pristine,
            inputs,
            input_types,
            outputs,
            node_count,
        })
    }

    /// Inputs, in the model's order.
    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    /// Outputs, in the model's order.
    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// The signature as the builder records it.
    pub fn report(&self) -> BuildReport {
        BuildReport {
            inputs: self.inputs.clone(),
            outputs: self.outputs.clone(),
            node_count: self.node_count,
        }
    }

    /// Runs the plan. Inputs are matched by name, in any order; every model input must be
    /// given exactly once.
    pub fn run(&mut self, given: &[NamedTensorView<'_>]) -> Result<Vec<NamedTensor>> {
        for (i, t) in given.iter().enumerate() {
            if !self.inputs.iter().any(|s| s.name == t.name) {
                return Err(Error::BadInput(format!("unknown input {:?}", t.name)));
            }
            if given[..i].iter().any(|o| o.name == t.name) {
                return Err(Error::BadInput(format!(
                    "input {:?} is given twice",
                    t.name
                )));
            }
        }
        let mut values: TVec<TValue> = TVec::with_capacity(self.inputs.len());
        for (spec, dt) in self.inputs.iter().zip(&self.input_types) {
            let t = given
                .iter()
                .find(|t| t.name == spec.name)
                .ok_or_else(|| Error::BadInput(format!("missing input {:?}", spec.name)))?;
            values.push(to_tract_checked(&spec.name, *dt, &t.tensor)?.into());
        }
        if !self.pristine.is_empty() {
            self.state.op_states.clone_from(&self.pristine);
        }
        let outputs = self.state.run(values);
        clear_avx_upper_state();
        let outputs = outputs.map_err(|e| Error::Run(chain(&e)))?;
        outputs
            .iter()
            .zip(&self.outputs)
            .map(|(value, spec)| {
                Ok(NamedTensor {
                    name: spec.name.clone(),
                    tensor: from_tract(&spec.name, value)?,
                })
            })
            .collect()
    }
}

fn to_tract_checked(
    name: &str,
    declared: DatumType,
    t: &capsule_format::TensorView<'_>,
) -> Result<tract_onnx::prelude::Tensor> {
    t.validate()
        .map_err(|e| Error::BadInput(format!("input {name:?}: {e}")))?;
    let dt = to_datum(t.dtype);
    if dt != declared.unquantized() {
        return Err(Error::BadInput(format!(
            "input {name:?} has datatype {}, the model expects {:?}",
            t.dtype, declared
        )));
    }
    let shape = t
        .shape
        .iter()
        .map(|&d| {
            usize::try_from(d)
                .map_err(|_| Error::BadInput(format!("input {name:?}: dimension {d} is too large")))
        })
        .collect::<Result<Vec<usize>>>()?;
    match t.dtype {
        DType::Bytes => {
            let mut strings = Vec::new();
            let mut rest = t.data;
            while let Some((len, tail)) = rest.split_first_chunk::<4>() {
                let len = u32::from_le_bytes(*len) as usize;
                let bytes = tail
                    .get(..len)
                    .ok_or_else(|| Error::BadInput(format!("input {name:?}: truncated string")))?;
                strings.push(String::from_utf8_lossy(bytes).into_owned());
                rest = &tail[len..];
            }
            tract_ndarray::ArrayD::from_shape_vec(shape, strings)
                .map(tract_onnx::prelude::Tensor::from)
                .map_err(|e| Error::BadInput(format!("input {name:?}: {e}")))
        }
        DType::Bool if t.data.iter().any(|&b| b > 1) => Err(Error::BadInput(format!(
            "input {name:?}: BOOL elements must be 0 or 1"
        ))),
        // SAFETY: every remaining datatype is plain old data for which any bit pattern is
        // valid (booleans were checked above), and `validate` checked the byte length.
        _ => unsafe { tract_onnx::prelude::Tensor::from_raw_dt(dt, &shape, t.data) }
            .map_err(|e| Error::BadInput(format!("input {name:?}: {}", chain(&e)))),
    }
}

/// Converts a tract tensor (an output, or a tensor read from an ONNX `TensorProto`) to a
/// capsule tensor.
pub fn from_tract(name: &str, value: &tract_onnx::prelude::Tensor) -> Result<Tensor> {
    let dt = value.datum_type().unquantized();
    let dtype = to_dtype(dt)
        .ok_or_else(|| Error::Run(format!("output {name:?} has unsupported datatype {dt:?}")))?;
    let shape = value.shape().iter().map(|&d| d as u64).collect();
    let data = if dtype == DType::Bytes {
        let strings = value
            .to_plain_array_view::<String>()
            .map_err(|e| Error::Run(chain(&e)))?;
        let mut data = Vec::new();
        for s in strings {
            let len = u32::try_from(s.len())
                .map_err(|_| Error::Run(format!("output {name:?}: string over 4 GiB")))?;
            data.extend_from_slice(&len.to_le_bytes());
            data.extend_from_slice(s.as_bytes());
        }
        data
    } else {
        value.as_bytes().to_vec()
    };
    Tensor::new(dtype, shape, data).map_err(|e| Error::Run(format!("output {name:?}: {e}")))
}
