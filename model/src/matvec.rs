//! Matrix-vector products of a batch of one, without tract's per-call bookkeeping.
//!
//! A dense layer of a one-row plan is two ops in tract: `OptMatMulPack` copies the input
//! vector into a new packed tensor, then `OptMatMul` resolves its fused program (bias,
//! activation, store) into kernel calls through a scratch space it looks up per session,
//! syncs into thread-local storage and fills tile by tile. For a digits MLP (64 -> 128 ->
//! 10) that bookkeeping took twice the time of the products themselves: the two ops were
//! 58% of a capsule's inference, the kernels 25% (docs/benchmarks.md, "Dense layers of one
//! row").
//!
//! [`substitute`] replaces such a pair with one [`MatVec`], which calls the same kernel
//! (tract's choice, one of the guest's GEMV kernels in a capsule) on the same program:
//! `Clear`, the product of each packed panel of the weights by the input vector, the same
//! operations after it (their constants resolved once, when the op is made), and the store,
//! straight into the output or, for the last rows when they do not fill a tile, into a
//! local tile copied out as tract's border tiles are. The guest's kernels read the vector
//! in place; a kernel whose packing asks for more alignment or a padding record gets it
//! copied as tract packs it. The outputs are the same bits.
//!
//! It takes a product whose weights are constant, whose input is one vector (the packed
//! operand's source has `k` elements), whose output has one column stored along its `m`
//! axis, and whose program holds only a product, per-row, unicast, scalar and leaky-ReLU
//! operations with constant operands, and the store. Anything else stays tract's.
//!
//! Only the guest substitutes (lib.rs): native tract, the baseline a capsule is measured
//! against, keeps its own ops.

use std::any::Any;

use tract_linalg::BinOp;
use tract_linalg::mmm::{
    DynKernel, FusedKerSpec, MMMInputValue, MatMatMul, OutputStoreKer, OutputStoreSpec,
};
use tract_linalg::pack::PackedFormat;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, OptMatMul, ProtoFusedSpec};
use tract_onnx::tract_core::ops::matmul::pack::OptMatMulPack;
use tract_onnx::tract_core::tract_linalg;

/// tract's kernel calling convention.
type Kernel = unsafe fn(&[FusedKerSpec<f32>]) -> isize;

/// Most operations between the product and the store (tract fuses a handful).
const MAX_THEN: usize = 8;
/// Tallest kernel tile taken (the border tile lives on the stack).
const MAX_MR: usize = 128;

/// An operation of the program after the product, its operand resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Then {
    /// A scalar operand (bits of the f32).
    Scalar(BinOp, u32),
    /// `LeakyRelu` with this alpha (bits).
    LeakyRelu(u32),
    /// A per-row operand: one value per row (bits of the f32), padded to whole tiles.
    PerRow(BinOp, Arc<[u32]>),
    /// A tensor of the output's shape added to it (tract's `AddUnicast`; the output is
    /// one column, so a value per row), padded likewise.
    AddUnicast(Arc<[u32]>),
}

impl Then {
    /// The kernel's op for tile `tile` of `mr` rows.
    fn spec(&self, tile: usize, mr: usize) -> FusedKerSpec<f32> {
        use FusedKerSpec as F;
        match self {
            Then::Scalar(op, bits) => {
                let v = f32::from_bits(*bits);
                match op {
                    BinOp::Min => F::ScalarMin(v),
                    BinOp::Max => F::ScalarMax(v),
                    BinOp::Mul => F::ScalarMul(v),
                    BinOp::Add => F::ScalarAdd(v),
                    BinOp::Sub => F::ScalarSub(v),
                    BinOp::SubF => F::ScalarSubF(v),
                }
            }
            Then::LeakyRelu(bits) => F::LeakyRelu(f32::from_bits(*bits)),
            Then::PerRow(op, rows) => {
                // In bounds: `rows` holds whole tiles, `tile` is one of them. u32 and f32
                // have the same size and alignment.
                let p = rows[tile * mr..].as_ptr().cast::<f32>();
                match op {
                    BinOp::Min => F::PerRowMin(p),
                    BinOp::Max => F::PerRowMax(p),
                    BinOp::Add => F::PerRowAdd(p),
                    BinOp::Mul => F::PerRowMul(p),
                    BinOp::Sub => F::PerRowSub(p),
                    BinOp::SubF => F::PerRowSubF(p),
                }
            }
            Then::AddUnicast(rows) => F::AddUnicast(OutputStoreKer {
                // Read only (the kernel adds from it): the pointer type is the store's.
                ptr: rows[tile * mr..].as_ptr().cast::<u8>().cast_mut(),
                row_byte_stride: 4,
                col_byte_stride: 4,
                item_size: 4,
            }),
        }
    }
}

/// `y = then(A x)` for a constant packed `A` of `m` rows and `k` columns and an input
/// vector `x` of `k` f32: tract's `OptMatMulPack` and `OptMatMul` of one column in one op.
#[derive(Clone, Debug)]
pub struct MatVec {
    /// The kernel tract picked (for equality and the plan's description).
    mmm: Box<dyn MatMatMul>,
    /// Its entry point.
    kernel: Kernel,
    /// Its tile's row count.
    mr: usize,
    /// Its packing index for this product.
    packing: usize,
    /// The input vector's alignment for the kernel's B packing.
    b_align: usize,
    /// Zero records the packing adds after the vector's `k` (read by tract's kernels).
    b_pad: usize,
    /// Whether the kernel may read the input vector in place: it reads exactly `k` values,
    /// or its packing adds no padding record.
    in_place: bool,
    /// The packed weights.
    a: Box<dyn MMMInputValue>,
    m: usize,
    k: usize,
    then: Vec<Then>,
    /// A softmax over rows of this many values run on the output
    /// ([`crate::absorb_into_products`]).
    softmax: Option<(crate::softmax::RowSoftmax, usize)>,
    output: TypedFact,
    /// The last output, when kept ([`crate::reuse`]).
    reuse: crate::reuse::Reused,
}

impl PartialEq for MatVec {
    fn eq(&self, other: &MatVec) -> bool {
        // The kernel's entry point is named by `mmm` (equal by name).
        self.mmm.name() == other.mmm.name()
            && self.mr == other.mr
            && self.packing == other.packing
            && (self.b_align, self.b_pad, self.in_place)
                == (other.b_align, other.b_pad, other.in_place)
            && self.a == other.a
            && (self.m, self.k) == (other.m, other.k)
            && self.then == other.then
            && self.softmax == other.softmax
            && self.output == other.output
    }
}

impl Eq for MatVec {}

/// The entry point and row count of a one-column f32 kernel.
fn kernel_of(mmm: &dyn MatMatMul) -> Option<(Kernel, usize)> {
    let any = mmm as &dyn Any;
    macro_rules! try_mr {
        ($($mr:literal)+) => {
            $(if let Some(k) = any.downcast_ref::<DynKernel<$mr, 1, f32>>() {
                return Some((k.kernel, $mr));
            })+
        };
    }
    try_mr!(1 2 4 8 16 24 32 48 64 96 128);
    None
}

impl MatVec {
    /// The replacement of `node` (an `OptMatMul` of `model`) and its input, when it is a
    /// product this op computes (see the module's documentation).
    fn of(model: &TypedModel, node: &TypedNode) -> TractResult<Option<(MatVec, OutletId)>> {
        let Some(op) = node.op_as::<OptMatMul>() else {
            return Ok(None);
        };
        let [mmm] = &op.mmm[..] else {
            return Ok(None);
        };
        let Some((kernel, mr)) = kernel_of(&**mmm) else {
            return Ok(None);
        };
        let Some(shape) = op.c_fact.shape.as_concrete() else {
            return Ok(None);
        };
        let Some(m_axis_c) = op.c_m_axis else {
            return Ok(None);
        };
        let m = shape[m_axis_c];
        if op.c_fact.datum_type != f32::datum_type()
            || shape.iter().product::<usize>() != m
            || mr > MAX_MR
            || m == 0
        {
            return Ok(None);
        }
        let Some((ProtoFusedSpec::AddMatMul { a, b, packings, .. }, rest)) =
            op.micro_ops.split_first()
        else {
            return Ok(None);
        };
        let (
            MatMulOperand::Const(a),
            &MatMulOperand::Input(b),
            [(packing, None)],
            Some((ProtoFusedSpec::Store(stores), rest)),
        ) = (a, b, &packings[..], rest.split_last())
        else {
            return Ok(None);
        };
        // The store tract would do: into its output tensor's view, rows along the `m` axis.
        let [OutputStoreSpec::View { m_axis, .. }] = &stores[..] else {
            return Ok(None);
        };
        if *m_axis != Some(m_axis_c) {
            return Ok(None);
        }
        let k = a.k();
        if a.mn() != m
            || a.scratch_panel_buffer_layout().is_some()
            || a.panels_count() < m.div_ceil(mr)
            || rest.len() > MAX_THEN
            || k == 0
        {
            return Ok(None);
        }
        let Some(b_format) = mmm
            .packings()
            .get(*packing)
            .and_then(|(_, b)| b.downcast_ref::<PackedFormat>())
        else {
            return Ok(None);
        };
        if b_format.r != 1 || b_format.dt != f32::datum_type() {
            return Ok(None);
        }
        // The vector: the source of the packing op, k values in any shape of ones.
        let Some(&packed) = node.inputs.get(b) else {
            return Ok(None);
        };
        let pack = model.node(packed.node);
        let (true, [source]) = (pack.op_is::<OptMatMulPack>(), &pack.inputs[..]) else {
            return Ok(None);
        };
        let source_fact = model.outlet_fact(*source)?;
        let Some(source_shape) = source_fact.shape.as_concrete() else {
            return Ok(None);
        };
        if source_fact.datum_type != f32::datum_type()
            || source_shape.iter().product::<usize>() != k
        {
            return Ok(None);
        }
        let constant = |v: usize| -> TractResult<Option<Arc<Tensor>>> {
            let Some(&outlet) = node.inputs.get(v) else {
                return Ok(None);
            };
            let fact = model.outlet_fact(outlet)?;
            Ok(fact
                .konst
                .clone()
                .filter(|t| t.datum_type() == f32::datum_type()))
        };
        let scalar = |v: usize| -> TractResult<Option<u32>> {
            Ok(constant(v)?
                .filter(|t| t.len() == 1)
                .and_then(|t| {
                    t.try_as_plain_ram()
                        .ok()?
                        .as_slice::<f32>()
                        .ok()?
                        .first()
                        .copied()
                })
                .map(f32::to_bits))
        };
        let rows = |v: usize| -> TractResult<Option<Arc<[u32]>>> {
            Ok(constant(v)?.and_then(|t| {
                let values = t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec();
                let mut bits: Vec<u32> = values.iter().map(|v| v.to_bits()).collect();
                bits.resize(m.div_ceil(mr) * mr, 0);
                (values.len() == m).then(|| bits.into())
            }))
        };
        let mut then = Vec::with_capacity(rest.len());
        for spec in rest {
            let next = match spec {
                ProtoFusedSpec::BinScalar(v, op) => scalar(*v)?.map(|s| Then::Scalar(*op, s)),
                ProtoFusedSpec::LeakyRelu(v) => scalar(*v)?.map(Then::LeakyRelu),
                ProtoFusedSpec::BinPerRow(v, op, _) => rows(*v)?.map(|r| Then::PerRow(*op, r)),
                ProtoFusedSpec::AddUnicast(_, v, _) => rows(*v)?.map(Then::AddUnicast),
                _ => None,
            };
            let Some(next) = next else {
                return Ok(None);
            };
            then.push(next);
        }
        Ok(Some((
            MatVec {
                mmm: mmm.clone(),
                kernel,
                mr,
                packing: *packing,
                b_align: b_format.alignment_bytes.max(1),
                b_pad: b_format.end_padding_record,
                in_place: b_format.end_padding_record == 0
                    || crate::kernels::gemv_reads_exactly_k(mmm.name()),
                a: a.clone(),
                m,
                k,
                then,
                softmax: None,
                output: op.c_fact.clone(),
                reuse: crate::reuse::Reused::default(),
            },
            *source,
        )))
    }

    /// Runs the program on each tile: `x` holds `k` f32 aligned for the kernel, `y` `m`.
    ///
    /// # Safety
    /// `x` is readable for `k` f32 (`k + b_pad` records when the kernel does not read the
    /// vector in place: `in_place` is false) and `y` writable for `m`.
    unsafe fn run(&self, x: *const f32, y: *mut f32) -> TractResult<()> {
        let mut program = [FusedKerSpec::Done; MAX_THEN + 4];
        let last = self.then.len() + 2;
        program[0] = FusedKerSpec::Clear;
        // Written by the kernel's store before the rows copied out of it are read.
        let mut border = [const { std::mem::MaybeUninit::<f32>::uninit() }; MAX_MR];
        for tile in 0..self.m.div_ceil(self.mr) {
            let first = tile * self.mr;
            let rows = self.mr.min(self.m - first);
            program[1] = FusedKerSpec::AddMatMul {
                k: self.k,
                pa: self.a.panel_bytes(tile, None)?,
                pb: x.cast(),
                packing: self.packing,
            };
            for (slot, then) in program[2..last].iter_mut().zip(&self.then) {
                *slot = then.spec(tile, self.mr);
            }
            let out = if rows == self.mr {
                // SAFETY: the tile's rows are rows `first..first + mr` of `y`.
                unsafe { y.add(first) }
            } else {
                border.as_mut_ptr().cast::<f32>()
            };
            program[last] = FusedKerSpec::Store(OutputStoreKer {
                ptr: out.cast(),
                row_byte_stride: 4,
                col_byte_stride: 4,
                item_size: 4,
            });
            // SAFETY: `pa` is the tile's packed panel of `k` steps of `mr` rows, `pb` the `k`
            // values of `x`, each per-row operand holds `mr` values from the tile's first
            // row, and the store writes `mr` rows of one column into `y` or `border`.
            let err = unsafe { (self.kernel)(&program[..=last + 1]) };
            ensure!(err == 0, "kernel {} returned error {err}", self.mmm.name());
            if rows < self.mr {
                // SAFETY: rows `first..m` of `y`, from the first `rows` of `border`, which the
                // kernel's store wrote (all `mr` of them).
                unsafe {
                    std::ptr::copy_nonoverlapping(border.as_ptr().cast::<f32>(), y.add(first), rows)
                };
            }
        }
        Ok(())
    }
}

impl MatVec {
    /// The op with its output shaped `dims`, when they hold its `m` values.
    pub(crate) fn reshaped(&self, dims: &[usize]) -> Option<MatVec> {
        (dims.iter().product::<usize>() == self.m).then(|| MatVec {
            output: f32::fact(dims),
            ..self.clone()
        })
    }
}

impl MatVec {
    /// The op with `softmax` run on its output, when its rows (the output's last axes)
    /// tile the output.
    pub(crate) fn with_softmax(&self, softmax: &crate::softmax::RowSoftmax) -> Option<MatVec> {
        let shape = self.output.shape.as_concrete()?;
        let rows = shape.len().checked_sub(softmax.axes())?;
        let row_len: usize = shape[rows..].iter().product();
        (self.softmax.is_none() && row_len > 0 && self.m.is_multiple_of(row_len)).then(|| MatVec {
            softmax: Some((softmax.clone(), row_len)),
            ..self.clone()
        })
    }
}

impl Op for MatVec {
    fn name(&self) -> StaticName {
        "MatVecF32".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "m:{} k:{} with {} (then {:?})",
            self.m,
            self.k,
            self.mmm.name(),
            self.then
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for MatVec {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        ensure!(
            input.datum_type() == f32::datum_type() && input.len() == self.k,
            "{} expects {} f32, got {:?} {:?}",
            self.name(),
            self.k,
            input.datum_type(),
            input.shape()
        );
        let Some(shape) = self.output.shape.as_concrete() else {
            bail!("{} has a symbolic output shape", self.name());
        };
        let x = input.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        // `run` writes every one of the output's `m` f32.
        let output = self.reuse.output(f32::datum_type(), shape, |output| {
            let mut y = output.try_as_plain_ram_mut()?;
            let y = y.as_slice_mut::<f32>()?;
            ensure!(
                y.len() == self.m,
                "{} output of {} values",
                self.name(),
                y.len()
            );
            self.compute(x, y)
        })?;
        Ok(tvec!(output))
    }
}

impl MatVec {
    /// `y = then(A x)`, then the softmax when one was folded in: `x` holds `k` values, `y`
    /// `m`.
    fn compute(&self, x: &[f32], y: &mut [f32]) -> TractResult<()> {
        ensure!(x.len() == self.k && y.len() == self.m);
        if self.in_place && (x.as_ptr() as usize).is_multiple_of(self.b_align) {
            // SAFETY: `x` holds `k` f32 and `y` `m`, checked above.
            unsafe { self.run(x.as_ptr(), y.as_mut_ptr())? };
        } else {
            // Packed as tract packs it: aligned, then the padding records zeroed.
            let Some(bytes) = self
                .k
                .checked_add(self.b_pad)
                .and_then(|n| n.checked_mul(4))
            else {
                bail!("{} of {} values", self.name(), self.k);
            };
            let mut packed = Tensor::zero_aligned::<f32>(&[bytes / 4], self.b_align)?;
            let mut view = packed.try_as_plain_ram_mut()?;
            let packed_x = view.as_slice_mut::<f32>()?;
            packed_x[..self.k].copy_from_slice(x);
            // SAFETY: `packed_x` holds the `k` f32 of `x` and the padding; `y` holds `m`.
            unsafe { self.run(packed_x.as_ptr(), y.as_mut_ptr())? };
        }
        if let Some((softmax, row_len)) = &self.softmax {
            softmax.run(y, *row_len)?;
        }
        Ok(())
    }

    /// Its slot for a kept output ([`crate::reuse`]).
    pub(crate) fn kept_output(&self) -> &crate::reuse::Reused {
        &self.reuse
    }

    /// The op keeping its output from one inference to the next ([`crate::reuse`]).
    pub(crate) fn with_kept_output(&self) -> Option<MatVec> {
        (!self.reuse.is_kept()).then(|| MatVec {
            reuse: crate::reuse::Reused::kept(),
            ..self.clone()
        })
    }
}

impl TypedOp for MatVec {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "{} has one input", self.name());
        Ok(tvec!(self.output.clone()))
    }

    as_op!();
}

/// Replaces each one-column product [`MatVec`] computes (see the module's documentation);
/// returns how many. The packing ops it bypasses are left without a consumer, so the plan
/// drops them.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let Some((op, source)) = MatVec::of(model, model.node(id))? else {
            continue;
        };
        let node = model.node(id);
        let patch = TypedModelPatch::replace_single_op(model, node, &[source], op)?;
        patch.apply(model)?;
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A digits fixture optimized by tract for a batch of `rows`.
    pub(crate) fn optimized(name: &str, rows: usize) -> TypedModel {
        let path = format!(
            "{}/../tests/fixtures/models/{name}/model.onnx",
            env!("CARGO_MANIFEST_DIR")
        );
        tract_onnx::onnx()
            .model_for_path(path)
            .unwrap()
            .with_input_fact(0, f32::fact([rows, 64]).into())
            .unwrap()
            .into_optimized()
            .unwrap()
    }

    /// Every output's bits.
    fn run(model: TypedModel, input: &Tensor) -> Vec<Vec<u8>> {
        let plan = model.into_runnable().unwrap();
        let outputs = plan.run(tvec![input.clone().into_tvalue()]).unwrap();
        outputs.iter().map(|o| o.as_bytes().to_vec()).collect()
    }

    fn images(rows: usize) -> Tensor {
        let values: Vec<f32> = (0..rows * 64)
            .map(|i| ((i * 37) % 101) as f32 / 6.0 - 8.0)
            .collect();
        Tensor::from_shape(&[rows, 64], &values).unwrap()
    }

    fn ops(model: &TypedModel) -> Vec<String> {
        let plan = model.clone().into_runnable().unwrap();
        plan.order_without_consts()
            .iter()
            .map(|&n| model.node(n).op.name().to_string())
            .collect()
    }

    #[test]
    fn dense_layers_of_one_row_give_tracts_bits() {
        // The MLP's hidden layer has a bias and a ReLU (per-row and scalar operations), its
        // output layer 10 rows (a border tile for any kernel taller than 10).
        for (name, layers) in [("digits_mlp", 2), ("digits_logreg", 1)] {
            let model = optimized(name, 1);
            let input = images(1);
            let expected = run(model.clone(), &input);
            let mut ours = model;
            assert_eq!(substitute(&mut ours).unwrap(), layers, "{name}");
            let ops = ops(&ours);
            assert_eq!(
                ops.iter().filter(|o| *o == "MatVecF32").count(),
                layers,
                "{name}: {ops:?}"
            );
            assert!(
                !ops.iter().any(|o| o.starts_with("OptMatMul")),
                "{name}: {ops:?}"
            );
            assert_eq!(run(ours, &input), expected, "{name}");
        }
    }

    #[test]
    fn products_of_several_columns_stay_tracts() {
        let mut model = optimized("digits_mlp", 3);
        assert_eq!(substitute(&mut model).unwrap(), 0);
    }

    #[test]
    fn an_input_of_another_length_is_an_error() {
        let mut model = optimized("digits_logreg", 1);
        assert_eq!(substitute(&mut model).unwrap(), 1);
        let node = model.nodes().iter().find(|n| n.op_is::<MatVec>()).unwrap();
        let short = Tensor::from_shape(&[1, 63], &[0f32; 63]).unwrap();
        let err = node
            .op
            .eval_out_of_plan(tvec![short.into_tvalue()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("expects 64 f32"), "{err}");
    }
}
