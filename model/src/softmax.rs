//! Softmax over the trailing axes of f32 tensors, its kernels looked up once.
//!
//! tract evaluates such a softmax row by row with three of its linalg kernels (a max, a
//! sum of exponentials, a scaling), but looks the three up and boxes them on every
//! evaluation, then hands the rows to its thread pool's chunking. A classifier's softmax is
//! one row of a few classes, so that was most of its cost: in a capsule of the digits
//! logistic regression the softmax took 11% of the inference, 3% of it the lookup
//! (docs/benchmarks.md, "Dense layers of one row"). [`RowSoftmax`] holds the kernels from
//! when the model is loaded and runs the same calls on each row, so the outputs are the same
//! bits; where tract would take its whole-rows kernel (rows of a multiple of four values,
//! on machines that have one) it takes that one too.
//!
//! Only the guest substitutes (lib.rs): native tract, the baseline a capsule is measured
//! against, keeps its own op.

use tract_linalg::element_wise::ElementWise;
use tract_linalg::reduce::{MapReduce, Reduce};
use tract_linalg::routines::{Func, SoftmaxRowsF32};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};
use tract_onnx::tract_core::tract_linalg;

/// tract's f32 row kernels of a softmax.
#[derive(Debug)]
struct Kernels {
    max: Box<dyn Reduce<f32>>,
    exp_sum: Box<dyn MapReduce<f32, f32>>,
    scale: Box<dyn ElementWise<f32, f32>>,
    /// The whole-rows kernel, where this machine has one.
    rows: Option<SoftmaxRowsF32>,
}

/// tract's `Softmax` (not `LogSoftmax`) of f32 over the last `axes` axes, with its kernels.
#[derive(Debug, Clone)]
pub struct RowSoftmax {
    /// How many trailing axes a row spans.
    axes: usize,
    kernels: Arc<Kernels>,
}

impl PartialEq for RowSoftmax {
    fn eq(&self, other: &RowSoftmax) -> bool {
        // The kernels are this machine's for the same functions.
        self.axes == other.axes
    }
}

impl Eq for RowSoftmax {}

impl RowSoftmax {
    /// The replacement of `softmax` reading `input`, when it is an f32 softmax over trailing
    /// axes.
    fn of(softmax: &Softmax, input: &TypedFact) -> TractResult<Option<RowSoftmax>> {
        let rank = input.rank();
        let mut axes: TVec<usize> = softmax.axes.clone();
        axes.sort_unstable();
        let trailing = !axes.is_empty()
            && axes.len() <= rank
            && axes
                .iter()
                .enumerate()
                .all(|(i, &a)| a == rank - axes.len() + i);
        if !trailing
            || softmax.kind != SoftmaxKind::Softmax
            || softmax.quant_output_dt.is_some()
            || input.datum_type != f32::datum_type()
        {
            return Ok(None);
        }
        Ok(Some(RowSoftmax {
            axes: axes.len(),
            kernels: Arc::new(Kernels {
                max: Func::ReduceMax.reduce_f32()?,
                exp_sum: Func::Softmax2.map_reduce_f32()?,
                scale: Func::MulByScalar.ew_f32_param()?,
                rows: tract_linalg::routines::softmax_rows_f32(),
            }),
        }))
    }

    /// Each row of `row_len` values of `data` in place, as tract's `Softmax` computes it.
    pub(crate) fn run(&self, data: &mut [f32], row_len: usize) -> TractResult<()> {
        let k = &*self.kernels;
        if let Some(rows) = k.rows.filter(|_| row_len.is_multiple_of(4)) {
            rows(data, row_len);
            return Ok(());
        }
        for row in data.chunks_exact_mut(row_len) {
            let max = k.max.run(row)?;
            let sum = k.exp_sum.run_with_params(row, max)?;
            k.scale.run_with_params(row, sum.recip())?;
        }
        Ok(())
    }
}

impl RowSoftmax {
    /// How many trailing axes a row spans.
    pub(crate) fn axes(&self) -> usize {
        self.axes
    }
}

impl Op for RowSoftmax {
    fn name(&self) -> StaticName {
        "RowSoftmaxF32".into()
    }

    op_as_typed_op!();
}

impl EvalOp for RowSoftmax {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        ensure!(
            input.datum_type() == f32::datum_type() && self.axes <= input.rank(),
            "{} over {} axes expects f32 of a higher rank, got {:?} {:?}",
            self.name(),
            self.axes,
            input.datum_type(),
            input.shape()
        );
        let mut output = input.into_tensor();
        let row_len: usize = output.shape()[output.rank() - self.axes..].iter().product();
        if row_len > 0 {
            let mut plain = output.try_as_plain_ram_mut()?;
            self.run(plain.as_slice_mut::<f32>()?, row_len)?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for RowSoftmax {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(input) = inputs.first() else {
            bail!("{} has one input", self.name());
        };
        Ok(tvec!(input.datum_type.fact(input.shape.clone())))
    }

    as_op!();
}

/// Replaces each f32 softmax over trailing axes with a [`RowSoftmax`]; returns how many.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut made = None;
    let replaced =
        crate::replace_unary::<Softmax>(model, |op, input, _| match RowSoftmax::of(op, input) {
            Ok(new) => new.map(|new| Box::new(new) as Box<dyn TypedOp>),
            Err(e) => {
                made = Some(e);
                None
            }
        })?;
    match made {
        Some(e) => Err(e),
        None => Ok(replaced),
    }
}

/// Checks that [`RowSoftmax`] computes tract's `Softmax`, bit for bit, in whatever build
/// this is: the guest's whole-rows kernel included (tract has one for wasm, none for
/// x86-64), which the native tests do not reach. The builder runs it with the kernel check,
/// before it loads a model. Rows of 0 to 23 values, some a multiple of four (the
/// whole-rows kernel) and some not (the three row kernels), both with ties, large
/// magnitudes, infinities and NaNs.
pub fn check() -> Result<(), String> {
    let special = [
        0.0,
        -0.0,
        88.0,
        -104.0,
        1e30,
        f32::INFINITY,
        f32::NEG_INFINITY,
    ];
    let values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|i| match i % 23 {
                5 => special[(i / 23) % special.len()],
                17 if i % 3 == 0 => f32::NAN,
                _ => ((i * 37) % 101) as f32 / 7.0 - 6.0,
            })
            .collect()
    };
    let cases: [(&[usize], &[usize]); 9] = [
        (&[6, 23], &[1]),
        (&[1, 10], &[1]),
        (&[3, 7], &[1]),
        (&[2, 8], &[1]),
        (&[2, 3, 4], &[1, 2]),
        (&[2, 3, 5], &[2, 1]),
        (&[40, 4], &[1]),
        (&[2, 0], &[1]),
        (&[1, 1], &[1]),
    ];
    let bits = |t: &TValue| -> TractResult<Vec<u32>> {
        Ok(t.try_as_plain_ram()?
            .as_slice::<f32>()?
            .iter()
            .map(|v| v.to_bits())
            .collect())
    };
    for (shape, axes) in cases {
        let run = || -> TractResult<(Vec<u32>, Vec<u32>)> {
            let input = Tensor::from_shape(shape, &values(shape.iter().product()))?;
            let tract = Softmax {
                axes: axes.into(),
                quant_output_dt: None,
                kind: SoftmaxKind::Softmax,
            };
            let Some(ours) = RowSoftmax::of(&tract, &f32::fact(shape))? else {
                bail!("not replaced");
            };
            let expected = tract.eval(&EvalContext::out_of_plan(), tvec![input.clone().into()])?;
            let got = ours.eval(&EvalContext::out_of_plan(), tvec![input.into()])?;
            ensure!(got[0].shape() == shape, "shape {:?}", got[0].shape());
            Ok((bits(&got[0])?, bits(&expected[0])?))
        };
        match run() {
            Ok((got, expected)) if got == expected => {}
            Ok(_) => {
                return Err(format!(
                    "softmax of {shape:?} over {axes:?}: other bits than tract's"
                ));
            }
            Err(e) => return Err(format!("softmax of {shape:?} over {axes:?}: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn softmax(axes: &[usize]) -> Softmax {
        Softmax {
            axes: axes.into(),
            quant_output_dt: None,
            kind: SoftmaxKind::Softmax,
        }
    }

    #[test]
    fn rows_get_tracts_bits() {
        check().unwrap();
    }

    #[test]
    fn takes_only_f32_softmax_over_trailing_axes() {
        let fact = f32::fact([2, 3, 4]);
        assert!(RowSoftmax::of(&softmax(&[1]), &fact).unwrap().is_none());
        assert!(RowSoftmax::of(&softmax(&[0, 2]), &fact).unwrap().is_none());
        let log = Softmax {
            kind: SoftmaxKind::LogSoftmax,
            ..softmax(&[2])
        };
        assert!(RowSoftmax::of(&log, &fact).unwrap().is_none());
        assert!(
            RowSoftmax::of(&softmax(&[2]), &f64::fact([2, 3, 4]))
                .unwrap()
                .is_none()
        );
        assert!(RowSoftmax::of(&softmax(&[2]), &fact).unwrap().is_some());
    }
}
