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
use capsule_format::wire::{BuildReport, InputShape, NamedTensorView, OneRowPlan};
use capsule_format::{DType, NamedTensor, Tensor};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, OptMatMul, ProtoFusedSpec};
use tract_onnx::tract_core::tract_linalg::mmm::EagerPackedInput;

#[macro_use]
mod steps;
mod eager_im2col;
mod im2col;
pub mod kernels;
mod matvec;
mod pad;
mod pool;
mod reduce;
mod reuse;
mod softmax;

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
    /// The guest's f32 kernels, max pools or softmaxes computed other bits than tract's on the
    /// builder's checks (`kernels::check`, `pool::check`, `softmax::check`): the guest is
    /// broken, so it builds no capsule.
    #[error("the guest's kernels disagree with tract's: {0}")]
    Kernel(String),
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

/// Weights (constants of the decluttered model) above which `auto` makes no one-row plan:
/// building it holds both plans' packed weights at once in the guest's 4 GiB of memory.
pub const ONE_ROW_PLAN_MAX_WEIGHT_BYTES: usize = 256 << 20;

/// What `auto` lets the one-row plan hold on its own, after [`share_constants`]: a quarter of
/// the weights, or 1 MiB for small models. Measured (guest-release, one-row plan against
/// none): SqueezeNet at 224x224 holds 325 KiB on its own and its image grows 5.63 -> 6.28
/// MiB; ResNet-50 10.3 MiB, 98.6 -> 109.5 MiB; each runs a batch of one 1.5-1.9x faster.
fn one_row_plan_budget(weights: usize) -> usize {
    (weights / 4).max(1 << 20)
}

/// What a one-row plan holds on its own after [`share_constants`], and the limit `auto` put
/// on it (none under `always`).
#[derive(Debug, Clone, Copy)]
struct OneRowCost {
    own_bytes: usize,
    budget: Option<usize>,
}

/// An optimized plan and the state it runs with.
struct Runner {
    state: TypedSimpleState,
    /// The ops' initial states (recurrent and stateful ops keep state across `run`s, for
    /// streaming): restored before every inference so that each one is independent, as on a
    /// fresh instance. Empty when no op has state (nothing to restore).
    pristine: Vec<Option<Box<dyn tract_onnx::tract_core::internal::OpState>>>,
}

impl Runner {
    fn new(mut typed: TypedModel) -> TractResult<Runner> {
        pool::substitute(&mut typed)?;
        // The guest packs convolutions' panels with vector copies (im2col.rs) or from a
        // table of sources (eager_im2col.rs), takes ArgMax and ArgMin (reduce.rs) and pads
        // (pad.rs) without tract's per-index slicing, one-column products without tract's
        // packing and scratch space (matvec.rs), and softmaxes with their kernels looked up
        // once (softmax.rs), then folds what follows its products into them; native tract,
        // the baseline a capsule is measured against, keeps tract's own ops.
        if cfg!(target_arch = "wasm32") {
            fuse_max_over_reshapes(&mut typed)?;
            im2col::substitute(&mut typed)?;
            eager_im2col::substitute(&mut typed)?;
            reduce::substitute(&mut typed)?;
            pad::substitute(&mut typed)?;
            matvec::substitute(&mut typed)?;
            softmax::substitute(&mut typed)?;
            absorb_into_products(&mut typed)?;
            reuse::enable(&mut typed)?;
        }
        let plan: Arc<Plan> = typed.into_runnable()?;
        Self::from_plan(&plan)
    }

    fn from_plan(plan: &Arc<Plan>) -> TractResult<Runner> {
        let state = TypedSimpleState::new(plan)?;
        let pristine = if state.op_states.iter().any(Option::is_some) {
            state.op_states.clone()
        } else {
            Vec::new()
        };
        Ok(Runner { state, pristine })
    }

    /// A fresh state for the same plan: drops what earlier runs (the check of
    /// [`rows_apart`], on the builder) left in the ops' session caches and scratch buffers,
    /// and the outputs the plan's ops keep ([`reuse`]), so that none of it lands in the
    /// snapshot.
    fn reset(&mut self) -> TractResult<()> {
        let plan = Arc::clone(self.state.plan());
        reuse::release(plan.model());
        *self = Runner::from_plan(&plan)?;
        Ok(())
    }

    fn run(&mut self, values: TVec<TValue>) -> TractResult<TVec<TValue>> {
        if !self.pristine.is_empty() {
            self.state.op_states.clone_from(&self.pristine);
        }
        let outputs = self.state.run(values);
        clear_avx_upper_state();
        outputs
    }
}

/// Moves into a product's epilogue the max by a scalar (a ReLU) that tract leaves after it
/// when a reshape stands between them: tract computes a convolution over its lazy im2col
/// as a product whose output is reshaped to the convolution's (`reshape_group`), and it
/// fuses only what directly follows a product. The max then cost a pass over the output
/// (1.6% of SqueezeNet's inference with host kernels, where its first convolution and its
/// first expand layers' 3x3 are such products). A max by a scalar commutes with any
/// reshape, so the product takes it as a fused `BinScalar` (the kernels' `ScalarMax`,
/// applied to the accumulators before the store) and the reshape follows unchanged. Every
/// value but a NaN comes out the same: the fused max keeps a NaN where the separate one
/// gave the bound. Returns how many it fused.
fn fuse_max_over_reshapes(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::binary::OptBinByScalar;
    use tract_onnx::tract_core::ops::change_axes::IntoShape;
    use tract_onnx::tract_core::tract_linalg::BinOp;

    let mut fused = 0;
    for id in 0..model.nodes().len() {
        let max = model.node(id);
        let Some(op) = max.op_as::<OptBinByScalar>() else {
            continue;
        };
        let [x, bound] = max.inputs[..] else {
            continue;
        };
        let bound_fact = model.outlet_fact(bound)?;
        let scalar = bound_fact.konst.as_ref().filter(|k| {
            k.datum_type() == f32::datum_type()
                && k.len() == 1
                && k.cast_to_scalar::<f32>().is_ok_and(|v| !v.is_nan())
        });
        if op.linalg_op != BinOp::Max || scalar.is_none() {
            continue;
        }
        // The reshape and the product each feed only the next, and neither is an output.
        let alone = |outlet: OutletId| {
            let node = model.node(outlet.node);
            outlet.slot == 0
                && node.outputs.len() == 1
                && node.outputs[0].successors.len() == 1
                && !model.outputs.contains(&outlet)
        };
        let reshape = model.node(x.node);
        if !alone(x) || !reshape.op_is::<IntoShape>() || reshape.inputs.len() != 1 {
            continue;
        }
        let product = model.node(reshape.inputs[0].node);
        let Some(mm) = product.op_as::<OptMatMul>() else {
            continue;
        };
        let store_last = matches!(mm.micro_ops.last(), Some(ProtoFusedSpec::Store(_)));
        let f32_kernels = mm
            .mmm
            .iter()
            .all(|k| k.internal_type() == f32::datum_type());
        if !alone(reshape.inputs[0])
            || !store_last
            || !f32_kernels
            || mm.c_fact.datum_type != f32::datum_type()
            || model.outlet_fact(OutletId::new(id, 0))?.datum_type != f32::datum_type()
        {
            continue;
        }
        let mut with_max = mm.clone();
        let last = with_max.micro_ops.len() - 1;
        with_max.micro_ops.insert(
            last,
            ProtoFusedSpec::BinScalar(product.inputs.len(), BinOp::Max),
        );
        let (reshape_op, names) = (
            reshape.op.clone(),
            [
                format!("{}.max", product.name),
                format!("{}.max", reshape.name),
            ],
        );
        let mut from: Vec<OutletId> = product.inputs.to_vec();
        from.push(bound);
        TypedModelPatch::rewire(model, &from, &[OutletId::new(id, 0)], &|patch, taps| {
            let wire = patch.wire_node(&names[0], with_max.clone(), taps)?;
            patch.wire_node(&names[1], reshape_op.clone(), &wire)
        })?
        .apply(model)?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// Folds into the guest's own ops what follows them where the plan would spend a step on
/// it: tract reshapes a dense layer's output (`IntoShape`, a leading axis added), drops an
/// ArgMax's reduced axis after it, and a classifier's softmax follows its last product;
/// each plan step costs its op's dispatch and the plan's bookkeeping, about as much as a
/// small op's work (6% of the digits logistic regression's inference for its one reshape).
/// A `MatVec` or `ArgExtreme` whose only consumer is an `IntoShape` (a reshape of the same
/// values in the same order) writes its output in the reshaped shape, and a `MatVec` whose
/// only consumer is a `RowSoftmax` over whole rows of its output runs that softmax on it
/// (the same kernels on the same values); the follower goes. Returns how many.
fn absorb_into_products(model: &mut TypedModel) -> TractResult<usize> {
    use tract_onnx::tract_core::ops::change_axes::IntoShape;
    let mut absorbed = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let [input] = &node.inputs[..] else {
            continue;
        };
        let producer = model.node(input.node);
        if producer.outputs.len() != 1
            || producer.outputs[0].successors.len() != 1
            || model.output_outlets()?.contains(input)
        {
            continue;
        }
        let matvec = producer.op_as::<matvec::MatVec>();
        let op: Option<Box<dyn TypedOp>> = if let Some(reshape) = node.op_as::<IntoShape>() {
            let natural =
                reshape.strides[..] == *tract_onnx::prelude::Tensor::natural_strides(&reshape.dims);
            match (matvec, producer.op_as::<reduce::ArgExtreme>()) {
                _ if !natural => None,
                (Some(op), _) => op
                    .reshaped(&reshape.dims)
                    .map(|op| Box::new(op) as Box<dyn TypedOp>),
                (_, Some(op)) => Some(Box::new(op.reshaped(&reshape.dims))),
                _ => None,
            }
        } else if let (Some(softmax), Some(op)) = (node.op_as::<softmax::RowSoftmax>(), matvec) {
            op.with_softmax(softmax)
                .map(|op| Box::new(op) as Box<dyn TypedOp>)
        } else {
            None
        };
        let Some(op) = op else {
            continue;
        };
        let mut patch = TypedModelPatch::default();
        let taps = patch.taps(model, &producer.inputs)?;
        let wire = patch.wire_node(&producer.name, op, &taps)?;
        let (after, before) = (
            patch.outlet_fact(wire[0])?.clone(),
            model.outlet_fact(OutletId::new(id, 0))?,
        );
        if after.shape != before.shape || after.datum_type != before.datum_type {
            continue;
        }
        patch.shunt_outside(model, OutletId::new(id, 0), wire[0])?;
        patch.obliterate(input.node)?;
        patch.obliterate(id)?;
        patch.apply(model)?;
        absorbed += 1;
    }
    Ok(absorbed)
}

/// Replaces each node of `model` whose op is an `O` with one input by what `make` returns
/// for that op, its input's fact and its output's, when the replacement gives the same
/// output fact (so nothing downstream changes); returns how many.
pub(crate) fn replace_unary<O: Op>(
    model: &mut TypedModel,
    mut make: impl FnMut(&O, &TypedFact, &TypedFact) -> Option<Box<dyn TypedOp>>,
) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let (Some(op), [input]) = (node.op_as::<O>(), &node.inputs[..]) else {
            continue;
        };
        let input_fact = model.outlet_fact(*input)?;
        let before = model.outlet_fact(OutletId::new(id, 0))?;
        let Some(new) = make(op, input_fact, before) else {
            continue;
        };
        let after = new.output_facts(&[input_fact])?;
        if after.len() != 1
            || after[0].shape != before.shape
            || after[0].datum_type != before.datum_type
        {
            continue;
        }
        model.node_mut(id).op = new;
        replaced += 1;
    }
    Ok(replaced)
}

/// A model parsed and optimized into a tract plan, with its input and output signature.
pub struct LoadedModel {
    runner: Runner,
    /// For a model whose symbolic inputs share one symbolic leading (batch) dimension and
    /// nothing else symbolic (inputs of fixed shape, like a recurrent model's state, may sit
    /// beside them): a second plan optimized for a batch of one, and the input shapes it
    /// serves. tract optimizes concrete shapes much further (e.g. lazy im2col for
    /// convolutions: the MNIST CNN runs in less than half the time), and a batch of one is
    /// what browsers and most edge callers send. Which plan runs depends only on the
    /// request's shapes, so a given request always gets the same outputs.
    one_row: Option<(Vec<Vec<usize>>, Runner)>,
    /// What the one-row plan held on its own, when one was made (see [`BuildReport`]).
    one_row_cost: Option<OneRowCost>,
    /// Run a batch of several rows as that many batches of one on the one-row plan (see
    /// [`rows_apart`]): set for convolutional models whose rows are independent.
    split_rows: bool,
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
        Self::load_with(onnx, input_shapes, OneRowPlan::Auto)
    }

    /// [`LoadedModel::load`], choosing whether to make the one-row plan.
    pub fn load_with(
        onnx: &[u8],
        input_shapes: &[InputShape],
        one_row_plan: OneRowPlan,
    ) -> Result<LoadedModel> {
        kernels::keep();
        kernels::check()
            .and_then(|()| pool::check())
            .and_then(|()| softmax::check())
            .map_err(Error::Kernel)?;
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
        let load = |e: TractError| Error::Load(chain(&e));
        let mut decluttered = model
            .into_typed()
            .and_then(TypedModel::into_decluttered)
            .map_err(load)?;
        let convolutional = decluttered
            .nodes()
            .iter()
            .any(|n| n.op_is::<tract_onnx::tract_core::ops::cnn::Conv>());
        // Before both plans are made from it: they share the op's transformed filters.
        kernels::substitute_winograd(&mut decluttered).map_err(load)?;
        let one_row = match one_row_plan {
            OneRowPlan::Auto => make_one_row_plan(&decluttered, ONE_ROW_PLAN_MAX_WEIGHT_BYTES)
                .map(|(shapes, weights, plan)| (shapes, Some(one_row_plan_budget(weights)), plan)),
            OneRowPlan::Always => make_one_row_plan(&decluttered, usize::MAX)
                .map(|(shapes, _, plan)| (shapes, None, plan)),
            OneRowPlan::Never => None,
        };
        let typed = decluttered.into_optimized().map_err(load)?;
        let mut one_row_cost = None;
        let one_row = one_row.and_then(|(shapes, budget, mut optimized)| {
            let shared = share_constants(&typed, &mut optimized).ok()?;
            one_row_cost = Some(OneRowCost {
                own_bytes: shared.unshared_bytes,
                budget,
            });
            if budget.is_some_and(|budget| shared.unshared_bytes > budget) {
                return None;
            }
            Some((shapes, Runner::new(optimized).ok()?))
        });
        let mut loaded = Self::from_typed(typed)?;
        loaded.one_row = one_row;
        loaded.one_row_cost = one_row_cost;
        loaded.split_rows = convolutional && rows_apart(&mut loaded);
        loaded.runner.reset().map_err(load)?;
        if let Some((_, r)) = &mut loaded.one_row {
            r.reset().map_err(load)?;
        }
        Ok(loaded)
    }

    /// Whether a second plan serves batches of one (see [`LoadedModel`]), and for which
    /// input shapes.
    pub fn one_row_shapes(&self) -> Option<&[Vec<usize>]> {
        self.one_row.as_ref().map(|(shapes, _)| shapes.as_slice())
    }

    /// Whether batches of several rows run row by row on the one-row plan.
    pub fn splits_rows(&self) -> bool {
        self.split_rows
    }

    fn from_typed(typed: TypedModel) -> Result<LoadedModel> {
        let load = |e: TractError| Error::Load(chain(&e));
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
        Ok(LoadedModel {
            runner: Runner::new(typed).map_err(load)?,
            one_row: None,
            one_row_cost: None,
            split_rows: false,
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
            one_row_plan: self.one_row.is_some(),
            one_row_plan_own_bytes: self.one_row_cost.map(|c| c.own_bytes as u64),
            one_row_plan_budget: self.one_row_cost.and_then(|c| c.budget).map(|b| b as u64),
        }
    }

    /// Runs the plan. Inputs are matched by name, in any order; every model input must be
    /// given exactly once.
    pub fn run(&mut self, given: &[NamedTensorView<'_>]) -> Result<Vec<NamedTensor>> {
        let outputs = self.run_tract(given)?;
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

    /// [`LoadedModel::run`], handing `f` views of the outputs, in the order of
    /// [`LoadedModel::outputs`], over the runtime's own tensors: nothing is copied for
    /// fixed-size datatypes (the guest encodes its response from them).
    pub fn run_with<R>(
        &mut self,
        given: &[NamedTensorView<'_>],
        f: impl FnOnce(&[NamedTensorView<'_>]) -> R,
    ) -> Result<R> {
        let outputs = self.run_tract(given)?;
        let strings = string_outputs(&outputs, &self.outputs)?;
        Ok(f(&output_views(&outputs, &self.outputs, &strings)?))
    }

    /// Checks the inputs, converts them and runs the plan.
    fn run_tract(&mut self, given: &[NamedTensorView<'_>]) -> Result<TVec<TValue>> {
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
        self.run_values(values).map_err(|e| Error::Run(chain(&e)))
    }
}

impl LoadedModel {
    /// Runs tract values on the plan their shapes select: the one-row plan for a batch of
    /// one; for a batch of several rows, that plan once per row when the model splits rows;
    /// the general plan otherwise. The choice depends only on the shapes, so a request
    /// always gets the same outputs.
    fn run_values(&mut self, values: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let Some((shapes, one_row)) = &mut self.one_row else {
            return self.runner.run(values);
        };
        if values
            .iter()
            .zip(shapes.iter())
            .all(|(v, s)| v.shape() == s.as_slice())
        {
            return one_row.run(values);
        }
        match self.split_rows.then(|| rows(&values, shapes)).flatten() {
            Some(n) => run_rows(one_row, &values, n),
            None => self.runner.run(values),
        }
    }
}

/// The rows of a batch the one-row plan can take one at a time: every input is `[n, ...]`
/// with the rest of its one-row shape, the same `n > 1` for all.
fn rows(values: &[TValue], shapes: &[Vec<usize>]) -> Option<usize> {
    let mut n = None;
    for (v, s) in values.iter().zip(shapes) {
        let (first, rest) = v.shape().split_first()?;
        if rest != &s[1..] || n.is_some_and(|n| n != *first) {
            return None;
        }
        n = Some(*first);
    }
    n.filter(|n| *n > 1)
}

/// Runs `n` rows one at a time on `plan` and stacks each output's rows.
fn run_rows(plan: &mut Runner, values: &[TValue], n: usize) -> TractResult<TVec<TValue>> {
    let mut per_output: Vec<Vec<tract_onnx::prelude::Tensor>> = Vec::new();
    for row in 0..n {
        let inputs = values
            .iter()
            .map(|v| Ok(v.slice(0, row, row + 1)?.into_tvalue()))
            .collect::<TractResult<TVec<TValue>>>()?;
        let outputs = plan.run(inputs)?;
        per_output.resize_with(outputs.len(), Vec::new);
        for (all, o) in per_output.iter_mut().zip(outputs) {
            all.push(o.into_tensor());
        }
    }
    per_output
        .iter()
        .map(|rows| Ok(tract_onnx::prelude::Tensor::stack_tensors(0, rows)?.into_tvalue()))
        .collect()
}

/// Whether the model's rows are independent, so that a batch can run row by row on its
/// one-row plan: a convolutional model's general plan materializes im2col for a symbolic
/// batch (textdir's batch of 8 cost 3.2x a batch of one per row, in wasm and natively), so
/// for those the row loop is faster. Checked on numbers, not assumed: two rows of fixed
/// pseudo-random inputs on the general plan and row by row must agree to rounding (an op
/// that mixes rows, a reduction over the batch, would not). Float inputs only. The check
/// runs where the model loads, on the builder before the snapshot, so the general plan's
/// buffers for two rows set the snapshot's memory size (zero pages: textdir's 7.81 MiB
/// became 20.25 MiB, its image 1.94 -> 1.97 MiB); a batch at run time no longer grows it.
fn rows_apart(m: &mut LoadedModel) -> bool {
    const ROWS: usize = 2;
    let Some((shapes, _)) = &m.one_row else {
        return false;
    };
    // A batch splits into rows only when every input has the batch dimension (see `rows`).
    if !m
        .inputs
        .iter()
        .all(|s| matches!(s.shape.first(), Some(Dim::Symbolic(_))))
    {
        return false;
    }
    let mut seed = 0x9e37_79b9_u32;
    let mut values = TVec::new();
    for (shape, dt) in shapes.iter().zip(&m.input_types) {
        if *dt != DatumType::F32 {
            return false;
        }
        let mut batch = shape.clone();
        batch[0] = ROWS;
        let len: usize = batch.iter().product();
        let data: Vec<f32> = (0..len)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        let Ok(t) = tract_onnx::prelude::Tensor::from_shape(&batch, &data) else {
            return false;
        };
        values.push(t.into_tvalue());
    }
    let Ok(general) = m.runner.run(values.clone()) else {
        return false;
    };
    let Some((_, one_row)) = &mut m.one_row else {
        return false;
    };
    let Ok(split) = run_rows(one_row, &values, ROWS) else {
        return false;
    };
    general.len() == split.len()
        && general.iter().zip(&split).all(|(a, b)| {
            let (Ok(a), Ok(b)) = (
                a.to_plain_array_view::<f32>(),
                b.to_plain_array_view::<f32>(),
            ) else {
                return false;
            };
            let scale = a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
            a.shape() == b.shape()
                && a.iter()
                    .zip(b.iter())
                    .all(|(x, y)| (x - y).abs() <= 1e-3 * scale)
        })
}

/// The one-row plan of a decluttered model (see [`LoadedModel`]), its input shapes and the
/// model's weight bytes, when its inputs of symbolic shape share one symbolic leading
/// dimension (inputs of fixed shape may sit beside them), nothing else is symbolic and its
/// weights are at most `max_weight_bytes`. It is an optimization: when
/// tract cannot make it, the model runs on its general plan alone.
fn make_one_row_plan(
    decluttered: &TypedModel,
    max_weight_bytes: usize,
) -> Option<(Vec<Vec<usize>>, usize, TypedModel)> {
    let mut batch: Option<Symbol> = None;
    for ix in 0..decluttered.inputs.len() {
        let fact = decluttered.input_fact(ix).ok()?;
        if fact.shape.is_concrete() {
            // The same in both plans: a recurrent model's state beside its symbolic input.
            continue;
        }
        let (first, rest) = fact.shape.dims().split_first()?;
        let TDim::Sym(s) = first else {
            return None;
        };
        if batch.as_ref().is_some_and(|b| b != s) || rest.iter().any(|d| d.to_i64().is_err()) {
            return None;
        }
        batch = Some(s.clone());
    }
    let batch = batch?;
    let mut weights = 0usize;
    for node in decluttered.nodes() {
        if let Some(c) = node.op_as::<tract_onnx::tract_core::ops::konst::Const>() {
            let t = c.val();
            weights = weights.checked_add(t.len().checked_mul(t.datum_type().size_of())?)?;
        }
    }
    if weights > max_weight_bytes {
        return None;
    }
    let subs = std::collections::HashMap::from([(batch, TDim::Val(1))]);
    let optimized = decluttered.set_symbols(&subs).ok()?.into_optimized().ok()?;
    let mut shapes = Vec::new();
    for ix in 0..optimized.inputs.len() {
        let fact = optimized.input_fact(ix).ok()?;
        shapes.push(fact.shape.as_concrete()?.to_vec());
    }
    Some((shapes, weights, optimized))
}

/// Makes every constant of `other` that equals one of `first`'s hold `first`'s bytes, so
/// that what both plans hold the same (most packed weights: both plans pack them for the
/// same kernel; the biases) is in memory, and in the capsule's snapshot, once. Two places
/// hold constants in an optimized plan:
///
/// - `Const` nodes: an equal constant (same type, shape and bytes) becomes `first`'s tensor,
///   in its op and in its output fact;
/// - the packed operands that tract bakes into its matrix products (`OptMatMul`'s
///   `MatMulOperand::Const`, made when the model is optimized, so each plan holds its own
///   copy): an equal packed operand (same packing, geometry and bytes) takes `first`'s
///   packed buffer.
///
/// Returns what was shared.
fn share_constants(first: &TypedModel, other: &mut TypedModel) -> TractResult<Shared> {
    use tract_onnx::tract_core::ops::konst::Const;
    type Constant = Arc<tract_onnx::prelude::Tensor>;
    let mut by_shape: std::collections::HashMap<(DatumType, &[usize]), Vec<&Constant>> =
        std::collections::HashMap::new();
    for node in first.nodes() {
        if let Some(c) = node.op_as::<Const>() {
            by_shape
                .entry((c.val().datum_type(), c.val().shape()))
                .or_default()
                .push(c.val());
        }
    }
    let mut packed_by_len: std::collections::HashMap<usize, Vec<&EagerPackedInput>> =
        std::collections::HashMap::new();
    for node in first.nodes() {
        for operand in packed_operands(node) {
            packed_by_len
                .entry(operand.packed.len())
                .or_default()
                .push(operand);
        }
    }
    let mut shared = Shared::default();
    for id in 0..other.nodes().len() {
        if let Some(c) = other.node(id).op_as::<Const>() {
            let Some(same) = by_shape
                .get(&(c.val().datum_type(), c.val().shape()))
                .and_then(|candidates| candidates.iter().find(|t| same_constant(t, c.val())))
                .copied()
            else {
                shared.unshared_bytes = shared.unshared_bytes.saturating_add(tensor_bytes(c.val()));
                continue;
            };
            if Arc::ptr_eq(same, c.val()) {
                continue;
            }
            let op = Const::new_with_opt_exotic_fact(
                Arc::clone(same),
                c.exotic_fact()
                    .map(tract_onnx::tract_core::dyn_clone::clone_box),
            )?;
            let node = other.node_mut(id);
            node.op = Box::new(op);
            // The output fact carries the value too; the old tensor must go from both.
            for output in node.outputs.iter_mut() {
                if output.fact.konst.is_some() {
                    output.fact.konst = Some(Arc::clone(same));
                }
            }
            shared.constants += 1;
            continue;
        }
        let Some(op) = other.node_mut(id).op_as_mut::<OptMatMul>() else {
            continue;
        };
        for spec in op.micro_ops.iter_mut() {
            let ProtoFusedSpec::AddMatMul { a, b, .. } = spec else {
                continue;
            };
            for operand in [a, b] {
                let MatMulOperand::Const(value) = operand else {
                    continue;
                };
                let Some(mine) = value.downcast_ref::<EagerPackedInput>() else {
                    continue;
                };
                let Some(same) = packed_by_len
                    .get(&mine.packed.len())
                    .and_then(|candidates| candidates.iter().find(|p| same_packed(p, mine)))
                else {
                    shared.unshared_bytes = shared.unshared_bytes.saturating_add(mine.packed.len());
                    continue;
                };
                if Arc::ptr_eq(&same.packed, &mine.packed) {
                    continue;
                }
                let one = EagerPackedInput {
                    packed: Arc::clone(&same.packed),
                    ..mine.clone()
                };
                *value = Box::new(one);
                shared.packed_operands += 1;
            }
        }
    }
    Ok(shared)
}

/// What [`share_constants`] shared, and what it found nothing equal for.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Shared {
    /// `Const` nodes made the first plan's tensor.
    constants: usize,
    /// Baked packed operands made the first plan's buffer.
    packed_operands: usize,
    /// Bytes of the constants and packed operands the second plan keeps to itself.
    unshared_bytes: usize,
}

/// Whether two packed operands hold the same values in the same layout: the same packing,
/// geometry and panel size, and the same bytes in each panel's `k` records. Not compared:
/// the padding after them (the end record and the alignment), which no kernel computes
/// with, and which holds whatever the allocator left there (dlmalloc writes its free-list
/// links into freed blocks, so two packings of the same weights differ in a few padding
/// bytes).
fn same_packed(a: &EagerPackedInput, b: &EagerPackedInput) -> bool {
    use tract_onnx::tract_core::tract_linalg::pack::PackedFormat;
    if a.fact != b.fact || a.panel_bytes != b.panel_bytes || a.mn != b.mn {
        return false;
    }
    let Some(format) = b.fact.format.downcast_ref::<PackedFormat>() else {
        return a == b;
    };
    let used = b
        .fact
        .k
        .checked_mul(format.r)
        .and_then(|n| n.checked_mul(format.dt.size_of()));
    let (x, y): (&[u8], &[u8]) = (&a.packed, &b.packed);
    match used {
        Some(used) if used <= b.panel_bytes && b.panel_bytes > 0 && x.len() == y.len() => x
            .chunks(b.panel_bytes)
            .zip(y.chunks(b.panel_bytes))
            .all(|(p, q)| p.get(..used) == q.get(..used)),
        _ => a == b,
    }
}

/// Whether two constants hold the same values: packed weights compared by
/// [`same_packed`], other tensors byte for byte.
fn same_constant(a: &tract_onnx::prelude::Tensor, b: &tract_onnx::prelude::Tensor) -> bool {
    use tract_onnx::tract_core::tract_linalg::mmm::PackedMatrixStorage;
    match (
        a.try_storage_as::<PackedMatrixStorage>(),
        b.try_storage_as::<PackedMatrixStorage>(),
    ) {
        (Ok(x), Ok(y)) => {
            a.datum_type() == b.datum_type()
                && a.shape() == b.shape()
                && x.batch_shape() == y.batch_shape()
                && x.values().len() == y.values().len()
                && x.values().iter().zip(y.values()).all(|(p, q)| {
                    match (
                        p.downcast_ref::<EagerPackedInput>(),
                        q.downcast_ref::<EagerPackedInput>(),
                    ) {
                        (Some(p), Some(q)) => same_packed(p, q),
                        _ => p == q,
                    }
                })
        }
        _ => a == b,
    }
}

/// Bytes a constant holds: its packed buffers for packed weights, its elements otherwise.
fn tensor_bytes(t: &tract_onnx::prelude::Tensor) -> usize {
    use tract_onnx::tract_core::tract_linalg::mmm::PackedMatrixStorage;
    match t.try_storage_as::<PackedMatrixStorage>() {
        Ok(storage) => storage
            .values()
            .iter()
            .filter_map(|value| value.downcast_ref::<EagerPackedInput>())
            .fold(0usize, |sum, p| sum.saturating_add(p.packed.len())),
        Err(_) => t.len().saturating_mul(t.datum_type().size_of()),
    }
}

/// The packed operands a node holds: those tract baked into its matrix products, or the
/// packed value of a `Const` (none for other ops).
fn packed_operands(node: &TypedNode) -> impl Iterator<Item = &EagerPackedInput> {
    use tract_onnx::tract_core::ops::konst::Const;
    use tract_onnx::tract_core::tract_linalg::mmm::PackedMatrixStorage;
    let konst = node
        .op_as::<Const>()
        .and_then(|c| c.val().try_storage_as::<PackedMatrixStorage>().ok())
        .into_iter()
        .flat_map(|storage| storage.values())
        .filter_map(|value| value.downcast_ref::<EagerPackedInput>());
    let baked = node
        .op_as::<OptMatMul>()
        .into_iter()
        .flat_map(|op| &op.micro_ops)
        .flat_map(|spec| match spec {
            ProtoFusedSpec::AddMatMul { a, b, .. } => [Some(a), Some(b)],
            _ => [None, None],
        })
        .flatten()
        .filter_map(|operand| match operand {
            MatMulOperand::Const(value) => value.downcast_ref::<EagerPackedInput>(),
            MatMulOperand::Input(_) => None,
        });
    konst.chain(baked)
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

/// The wire bytes of each string output (`None` for the others): strings are the only
/// outputs without a byte layout of their own to borrow.
fn string_outputs(values: &[TValue], specs: &[TensorSpec]) -> Result<Vec<Option<Vec<u8>>>> {
    values
        .iter()
        .zip(specs)
        .map(|(value, spec)| {
            Ok(match output_dtype(&spec.name, value)? {
                DType::Bytes => Some(from_tract(&spec.name, value)?.data),
                _ => None,
            })
        })
        .collect()
}

/// Views of outputs named by `specs`, over their tensors' bytes, or `strings`' (from
/// [`string_outputs`]) for strings.
fn output_views<'a>(
    values: &'a [TValue],
    specs: &'a [TensorSpec],
    strings: &'a [Option<Vec<u8>>],
) -> Result<Vec<NamedTensorView<'a>>> {
    values
        .iter()
        .zip(specs)
        .zip(strings)
        .map(|((value, spec), string)| {
            let dtype = output_dtype(&spec.name, value)?;
            Ok(NamedTensorView {
                name: &spec.name,
                tensor: capsule_format::TensorView {
                    dtype,
                    shape: value.shape().iter().map(|&d| d as u64).collect(),
                    data: string.as_deref().unwrap_or_else(|| value.as_bytes()),
                },
            })
        })
        .collect()
}

/// The capsule datatype of output `name`'s tract tensor.
fn output_dtype(name: &str, value: &tract_onnx::prelude::Tensor) -> Result<DType> {
    let dt = value.datum_type().unquantized();
    to_dtype(dt)
        .ok_or_else(|| Error::Run(format!("output {name:?} has unsupported datatype {dt:?}")))
}

/// Converts a tract tensor (an output, or a tensor read from an ONNX `TensorProto`) to a
/// capsule tensor.
pub fn from_tract(name: &str, value: &tract_onnx::prelude::Tensor) -> Result<Tensor> {
    let dtype = output_dtype(name, value)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use capsule_format::TensorView;

    fn fixture(name: &str) -> Vec<u8> {
        let path = format!(
            "{}/../tests/fixtures/models/{name}/model.onnx",
            env!("CARGO_MANIFEST_DIR")
        );
        std::fs::read(path).unwrap()
    }

    /// A fixture as `LoadedModel::load` has it before optimizing.
    fn decluttered(name: &str) -> TypedModel {
        tract_onnx::onnx()
            .model_for_read(&mut &*fixture(name))
            .unwrap()
            .into_typed()
            .unwrap()
            .into_decluttered()
            .unwrap()
    }

    fn images(n: usize) -> Vec<u8> {
        (0..n * 784)
            .flat_map(|i| (((i * 37) % 101) as f32 / 101.0).to_le_bytes())
            .collect()
    }

    fn run(m: &mut LoadedModel, n: usize) -> Vec<f32> {
        let data = images(n);
        let input = NamedTensorView {
            name: "input",
            tensor: TensorView {
                dtype: DType::F32,
                shape: vec![n as u64, 1, 28, 28],
                data: &data,
            },
        };
        let out = m.run(&[input]).unwrap();
        out[0]
            .tensor
            .data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    #[test]
    fn reshapes_and_softmaxes_fold_into_dense_layers_and_argmax_with_the_same_outputs() {
        use tract_onnx::tract_core::ops::change_axes::IntoShape;
        // The MLP: the reshape after its hidden layer, the softmax after its output layer,
        // the reshape after its ArgMax; the logistic regression: the last two.
        for (name, folded) in [("digits_mlp", 3), ("digits_logreg", 2)] {
            let model = tract_onnx::onnx()
                .model_for_read(&mut &*fixture(name))
                .unwrap()
                .with_input_fact(0, f32::fact([1, 64]).into())
                .unwrap()
                .into_optimized()
                .unwrap();
            let values: Vec<f32> = (0..64)
                .map(|i| ((i * 37) % 101) as f32 / 6.0 - 8.0)
                .collect();
            let input = tract_onnx::prelude::Tensor::from_shape(&[1, 64], &values).unwrap();
            let run = |m: TypedModel| -> Vec<(Vec<usize>, Vec<u8>)> {
                let outputs = m
                    .into_runnable()
                    .unwrap()
                    .run(tvec![input.clone().into()])
                    .unwrap();
                outputs
                    .iter()
                    .map(|o| (o.shape().to_vec(), o.as_bytes().to_vec()))
                    .collect()
            };
            let expected = run(model.clone());
            let mut ours = model;
            matvec::substitute(&mut ours).unwrap();
            reduce::substitute(&mut ours).unwrap();
            softmax::substitute(&mut ours).unwrap();
            assert_eq!(absorb_into_products(&mut ours).unwrap(), folded, "{name}");
            let plan = ours.clone().into_runnable().unwrap();
            let ops: Vec<String> = plan
                .order_without_consts()
                .iter()
                .map(|&n| ours.node(n).op.name().to_string())
                .collect();
            assert!(
                !plan.order_without_consts().iter().any(|&n| {
                    let op = &ours.node(n).op;
                    op.is::<IntoShape>() || op.is::<softmax::RowSoftmax>()
                }),
                "{name}: {ops:?}"
            );
            assert_eq!(run(ours), expected, "{name}");
        }
    }

    #[test]
    fn output_views_hold_what_owned_outputs_hold() {
        let specs: Vec<TensorSpec> = ["probabilities", "label", "flag"]
            .iter()
            .map(|name| TensorSpec {
                name: (*name).into(),
                dtype: DType::F32,
                shape: vec![],
            })
            .collect();
        let values: Vec<TValue> = vec![
            tract_ndarray::arr2(&[[0.25f32, 0.75]])
                .into_tensor()
                .into_tvalue(),
            tract_ndarray::arr1(&["seven".to_string(), String::new()])
                .into_tensor()
                .into_tvalue(),
            tract_ndarray::arr1(&[true, false])
                .into_tensor()
                .into_tvalue(),
        ];
        let strings = string_outputs(&values, &specs).unwrap();
        let views = output_views(&values, &specs, &strings).unwrap();
        for ((view, value), spec) in views.iter().zip(&values).zip(&specs) {
            assert_eq!(view.name, spec.name);
            assert_eq!(
                view.tensor.to_owned(),
                from_tract(&spec.name, value).unwrap()
            );
        }
        assert_eq!(views[1].tensor.dtype, DType::Bytes);
    }

    #[test]
    fn a_symbolic_batch_gets_a_one_row_plan_that_agrees_with_the_general_one() {
        let mut m = LoadedModel::load(&fixture("mnist_cnn"), &[]).unwrap();
        assert_eq!(m.one_row_shapes(), Some(&[vec![1, 1, 28, 28]][..]));
        // A convolutional model with independent rows: a batch runs row by row on the
        // one-row plan, so its first row is exactly the batch of one.
        assert!(m.splits_rows());
        let one = run(&mut m, 1);
        let three = run(&mut m, 3);
        assert_eq!(one.len(), 10);
        assert_eq!(three.len(), 30);
        assert_eq!(one, three[..10]);
        // The general plan (rows not split) agrees to rounding.
        m.split_rows = false;
        let general = run(&mut m, 3);
        for (a, b) in general.iter().zip(&three) {
            assert!((a - b).abs() < 1e-6, "{general:?} vs {three:?}");
        }
        m.split_rows = true;
        // Each request always gets the same outputs.
        assert_eq!(run(&mut m, 1), one);
        assert_eq!(run(&mut m, 3), three);
    }

    /// Silero VAD's audio is `[seq_len, 576]` beside a fixed-shape LSTM state (`h`, `c`:
    /// `[1, 1, 128]`): it gets a one-row plan for `seq_len` 1, which agrees with the general
    /// plan, and other lengths still run on the general one.
    #[test]
    fn fixed_shape_inputs_beside_the_batch_still_get_a_one_row_plan() {
        let onnx = fixture("silero_vad");
        let mut one_row = LoadedModel::load(&onnx, &[]).unwrap();
        let mut general = LoadedModel::load_with(&onnx, &[], OneRowPlan::Never).unwrap();
        assert_eq!(
            one_row.one_row_shapes(),
            Some(&[vec![1, 576], vec![1, 1, 128], vec![1, 1, 128]][..])
        );
        // Not every input has the batch dimension: a batch is never split into rows.
        assert!(!one_row.splits_rows());
        let bytes = |n: usize, seed: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|i| ((((i + seed) * 37) % 101) as f32 / 101.0 - 0.5).to_le_bytes())
                .collect()
        };
        for rows in [1, 2] {
            let (audio, h, c) = (bytes(rows * 576, 1), bytes(128, 2), bytes(128, 3));
            let view = |name, shape: Vec<u64>, data| NamedTensorView {
                name,
                tensor: TensorView {
                    dtype: DType::F32,
                    shape,
                    data,
                },
            };
            let inputs = [
                view("input", vec![rows as u64, 576], &audio[..]),
                view("h", vec![1, 1, 128], &h[..]),
                view("c", vec![1, 1, 128], &c[..]),
            ];
            let (a, b) = (one_row.run(&inputs).unwrap(), general.run(&inputs).unwrap());
            assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(&b) {
                assert_eq!((&a.name, &a.tensor.shape), (&b.name, &b.tensor.shape));
                let floats = |t: &Tensor| -> Vec<f32> {
                    t.data
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect()
                };
                for (x, y) in floats(&a.tensor).iter().zip(&floats(&b.tensor)) {
                    assert!((x - y).abs() <= 1e-5, "{}: {x} vs {y}", a.name);
                }
            }
        }
    }

    /// A dense model keeps batches on its general plan: a batch's product is a matrix
    /// product there, cheaper per row than a matrix-vector product per row.
    #[test]
    fn only_convolutional_models_split_rows() {
        let m = LoadedModel::load(&fixture("digits_mlp"), &[]).unwrap();
        assert!(m.one_row_shapes().is_some());
        assert!(!m.splits_rows());
    }

    /// Packed operands are the same when their panels' `k` records are, whatever their
    /// padding holds.
    #[test]
    fn packed_operands_compare_by_their_records_not_their_padding() {
        use tract_onnx::tract_core::tract_linalg::pack::PackedFormat;
        let weights: Vec<f32> = (0..5 * 12).map(|i| i as f32).collect();
        let t = tract_onnx::prelude::Tensor::from_shape(&[5, 12], &weights).unwrap();
        let format = PackedFormat::new(DatumType::F32, 8, 256);
        let packed = format.pack_tensor(&t, 0, 1).unwrap();
        let packed = packed.downcast_ref::<EagerPackedInput>().unwrap();
        // Two panels of 8 columns, 5 records of 8 f32 used in each, the rest padding.
        let used = 5 * 8 * 4;
        assert_eq!(packed.packed.len(), 2 * packed.panel_bytes);
        assert!(packed.panel_bytes > used);
        let with = |offset: usize| {
            let mut other = packed.clone();
            Arc::make_mut(&mut other.packed)[offset] ^= 0xff;
            other
        };
        assert!(same_packed(packed, &packed.clone()));
        assert!(same_packed(packed, &with(used)));
        assert!(same_packed(packed, &with(packed.panel_bytes + used + 7)));
        assert!(!same_packed(packed, &with(0)));
        assert!(!same_packed(packed, &with(packed.panel_bytes + used - 1)));
        let other = PackedFormat::new(DatumType::F32, 8, 8)
            .pack_tensor(&t, 0, 1)
            .unwrap();
        let other = other.downcast_ref::<EagerPackedInput>().unwrap();
        assert!(!same_packed(packed, other));
    }

    /// What `auto` lets the one-row plan keep to itself: a quarter of the weights, at least
    /// 1 MiB.
    #[test]
    fn the_one_row_plan_budget_is_a_quarter_of_the_weights() {
        assert_eq!(one_row_plan_budget(0), 1 << 20);
        assert_eq!(one_row_plan_budget(2 << 20), 1 << 20);
        assert_eq!(one_row_plan_budget(100 << 20), 25 << 20);
    }

    #[test]
    fn no_one_row_plan_over_the_weight_limit_or_for_fixed_shapes() {
        let decluttered = decluttered("mnist_cnn");
        // The CNN's weights are 21 KB.
        assert!(make_one_row_plan(&decluttered, 64 << 10).is_some());
        assert!(make_one_row_plan(&decluttered, 16 << 10).is_none());
        let fixed = InputShape {
            name: "input".into(),
            shape: [1, 1, 28, 28].map(Dim::Fixed).to_vec(),
        };
        let m = LoadedModel::load(&fixture("mnist_cnn"), &[fixed]).unwrap();
        assert_eq!(m.one_row_shapes(), None);
    }

    /// tract leaves the MNIST CNN's ReLUs behind the reshapes of its im2col products: fused,
    /// none is left, a second pass finds nothing, and the outputs keep their bits.
    #[test]
    fn a_relu_behind_a_reshape_joins_its_product_with_the_same_outputs() {
        use tract_onnx::tract_core::ops::binary::OptBinByScalar;
        let (_, _, plain) = make_one_row_plan(&decluttered("mnist_cnn"), usize::MAX).unwrap();
        let separate = |m: &TypedModel| {
            m.nodes()
                .iter()
                .filter(|n| n.op_is::<OptBinByScalar>())
                .count()
        };
        assert!(separate(&plain) > 0, "tract fused the CNN's ReLUs itself");
        let mut fused = plain.clone();
        let n = fuse_max_over_reshapes(&mut fused).unwrap();
        assert_eq!(n, separate(&plain), "every ReLU behind a reshape");
        assert_eq!(separate(&fused), 0);
        assert_eq!(fuse_max_over_reshapes(&mut fused).unwrap(), 0);
        // Inputs from -1 to 1, so that some products are negative before their ReLU.
        let data: Vec<f32> = (0..784)
            .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let input = tract_onnx::prelude::Tensor::from_shape(&[1, 1, 28, 28], &data).unwrap();
        let outputs = |m: TypedModel| {
            let plan = m.into_runnable().unwrap();
            let out = plan.run(tvec!(input.clone().into_tvalue())).unwrap();
            out[0].to_plain_array_view::<f32>().unwrap().to_owned()
        };
        let (before, after) = (outputs(plain), outputs(fused));
        assert!(before.iter().any(|v| *v != 0.0));
        assert_eq!(
            before.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            after.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }

    /// The two plans hold the constants they share once: after sharing, every constant of
    /// the one-row plan equal to one of the general plan's is the same tensor, in its op
    /// and in its output fact, and a second pass finds nothing left to share.
    #[test]
    fn the_plans_share_equal_constants() {
        use tract_onnx::tract_core::ops::konst::Const;
        let decluttered = decluttered("mnist_cnn");
        let (_, _, mut one_row) = make_one_row_plan(&decluttered, 64 << 10).unwrap();
        let general = decluttered.into_optimized().unwrap();
        let first = share_constants(&general, &mut one_row).unwrap();
        assert!(first.constants + first.packed_operands > 0, "{first:?}");
        let again = share_constants(&general, &mut one_row).unwrap();
        assert_eq!(
            (again.constants, again.packed_operands),
            (0, 0),
            "{again:?}"
        );
        let consts: Vec<_> = general
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<Const>().map(|c| c.val().clone()))
            .collect();
        for node in one_row.nodes() {
            let Some(c) = node.op_as::<Const>() else {
                continue;
            };
            if let Some(same) = consts.iter().find(|u| same_constant(u, c.val())) {
                assert!(Arc::ptr_eq(same, c.val()), "{}", node.name);
                let fact = node.outputs[0].fact.konst.as_ref().unwrap();
                assert!(Arc::ptr_eq(same, fact), "{}", node.name);
            }
        }
        // The packed weights tract baked into its products, likewise.
        let packed: Vec<&EagerPackedInput> =
            general.nodes().iter().flat_map(packed_operands).collect();
        let mut baked = 0;
        for node in one_row.nodes() {
            for p in packed_operands(node) {
                baked += 1;
                if let Some(same) = packed.iter().find(|q| same_packed(q, p)) {
                    assert!(Arc::ptr_eq(&same.packed, &p.packed), "{}", node.name);
                }
            }
        }
        assert!(baked > 0, "the CNN's plan packs no weights");
    }
}
