//! ArgMax and ArgMin of f32 tensors along one axis, without tract's per-output slicing.
//!
//! tract evaluates `Reduce` with `ArgMax`/`ArgMin` by building, for every output element, an
//! `ndarray` slice description of the input (a `Vec` of slice specs, a `SliceInfo`, a view)
//! and folding it. A classifier's label is one such element over a few classes, so the fold
//! is nothing and the bookkeeping everything: in a capsule of the digits logistic regression
//! (a product, a softmax and an ArgMax) the ArgMax took 15% of the inference, more than the
//! softmax (docs/benchmarks.md, "The fixtures' per-op costs"). [`substitute`] replaces each
//! such reduction of an f32 input along one axis with [`ArgExtreme`], which walks the
//! input's elements with plain index arithmetic.
//!
//! The fold is tract's: from index 0 and `f32::MIN` (`f32::MAX` for ArgMin), a value takes
//! the place of the running one when it is greater (smaller), or equal with `last` set. A
//! NaN never takes it, and the index stays 0 when no value does (every value NaN, or below
//! `f32::MIN`: minus infinity). The indices are the same.
//!
//! Only the guest substitutes (lib.rs): native tract, the baseline a capsule is measured
//! against, keeps its own reduction.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

/// The index of the greatest (or smallest) f32 along `axis`, as i64, the axis kept with
/// size 1: tract's `Reduce` with `Reducer::ArgMax(last)` or `Reducer::ArgMin(last)` on one
/// axis.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ArgExtreme {
    axis: usize,
    /// ArgMax when set, ArgMin otherwise.
    max: bool,
    /// On equal values, the last one's index rather than the first's.
    last: bool,
    /// The output's shape when a reshape after the op was folded into it
    /// ([`crate::absorb_reshapes`]); the input's with the axis at 1 otherwise.
    dims: Option<TVec<usize>>,
    /// The last output, when kept ([`crate::reuse`]).
    reuse: crate::reuse::Reused,
}

impl ArgExtreme {
    /// The replacement of `reduce` reading `input`, when it is an ArgMax or ArgMin of an f32
    /// tensor along one axis.
    fn of(reduce: &Reduce, input: &TypedFact) -> Option<ArgExtreme> {
        let (max, last) = match reduce.reducer {
            Reducer::ArgMax(last) => (true, last),
            Reducer::ArgMin(last) => (false, last),
            _ => return None,
        };
        let &[axis] = &reduce.axes[..] else {
            return None;
        };
        (input.datum_type == f32::datum_type() && axis < input.rank()).then_some(ArgExtreme {
            axis,
            max,
            last,
            dims: None,
            reuse: crate::reuse::Reused::default(),
        })
    }

    /// The index tract's fold picks among `values`, read `stride` elements apart.
    fn fold(&self, values: &[f32], n: usize, stride: usize) -> i64 {
        let (mut best, mut at) = (if self.max { f32::MIN } else { f32::MAX }, 0);
        for j in 0..n {
            let v = values[j * stride];
            let wins = if self.max { v > best } else { v < best };
            if wins || (self.last && v == best) {
                (best, at) = (v, j);
            }
        }
        at as i64
    }

    /// Writes the indices for an input of `shape` holding `values` into `out`, in the
    /// output's order (`out` has an element per output).
    fn run(&self, shape: &[usize], values: &[f32], out: &mut [i64]) {
        let n = shape[self.axis];
        let inner: usize = shape[self.axis + 1..].iter().product();
        if n == 0 || inner == 0 {
            // No output (inner == 0), or tract's fold of no value: index 0 everywhere.
            out.fill(0);
            return;
        }
        for (block, out) in values
            .chunks_exact(n * inner)
            .zip(out.chunks_exact_mut(inner))
        {
            for (i, o) in out.iter_mut().enumerate() {
                *o = self.fold(&block[i..], n, inner);
            }
        }
    }
}

impl Op for ArgExtreme {
    fn name(&self) -> StaticName {
        if self.max { "ArgMaxF32" } else { "ArgMinF32" }.into()
    }

    op_as_typed_op!();
}

impl EvalOp for ArgExtreme {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        if input.datum_type() != f32::datum_type() || self.axis >= input.rank() {
            bail!(
                "{} along axis {} expects f32 of a higher rank, got {:?} {:?}",
                self.name(),
                self.axis,
                input.datum_type(),
                input.shape()
            );
        }
        let shape = input.shape();
        let mut out_shape: TVec<usize> = shape.into();
        out_shape[self.axis] = 1;
        if let Some(dims) = &self.dims {
            ensure!(
                dims.iter().product::<usize>() == out_shape.iter().product::<usize>(),
                "{} of {shape:?} into {dims:?}",
                self.name()
            );
            out_shape.clone_from(dims);
        }
        // `run` sets every one of the output's i64.
        let output = self.reuse.output(i64::datum_type(), &out_shape, |output| {
            if output.len() > 0 {
                let mut plain = output.try_as_plain_ram_mut()?;
                let out = plain.as_slice_mut::<i64>()?;
                self.run(shape, input.try_as_plain_ram()?.as_slice::<f32>()?, out);
            }
            Ok(())
        })?;
        Ok(tvec!(output))
    }
}

impl TypedOp for ArgExtreme {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let Some(input) = inputs.first() else {
            bail!("{} has one input", self.name());
        };
        let mut shape: TVec<TDim> = input.shape.to_tvec();
        let Some(d) = shape.get_mut(self.axis) else {
            bail!(
                "{} along axis {} of rank {}",
                self.name(),
                self.axis,
                input.rank()
            );
        };
        *d = 1.to_dim();
        if let Some(dims) = &self.dims {
            return Ok(tvec!(i64::fact(dims)));
        }
        Ok(tvec!(i64::fact(shape)))
    }

    as_op!();
}

impl ArgExtreme {
    /// The op with its output shaped `dims` (the same indices in the same order).
    pub(crate) fn reshaped(&self, dims: &[usize]) -> ArgExtreme {
        ArgExtreme {
            dims: Some(dims.into()),
            ..self.clone()
        }
    }

    /// Its slot for a kept output ([`crate::reuse`]).
    pub(crate) fn kept_output(&self) -> &crate::reuse::Reused {
        &self.reuse
    }

    /// The op keeping its output from one inference to the next ([`crate::reuse`]).
    pub(crate) fn with_kept_output(&self) -> Option<ArgExtreme> {
        (!self.reuse.is_kept()).then(|| ArgExtreme {
            reuse: crate::reuse::Reused::kept(),
            ..self.clone()
        })
    }
}

/// Replaces every ArgMax and ArgMin of an f32 tensor along one axis by [`ArgExtreme`];
/// returns how many.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    crate::replace_unary::<Reduce>(model, |reduce, input, _| {
        ArgExtreme::of(reduce, input).map(|op| Box::new(op) as Box<dyn TypedOp>)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values that tell tract's fold apart from others: NaNs, both infinities, `f32::MIN`
    /// and `f32::MAX` (which only equal values beat), zeros of both signs and repeats.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let special = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MIN,
            f32::MAX,
            0.0,
            -0.0,
            1.5,
            -1.5,
            1.5,
        ];
        let mut s = seed | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                match s % 4 {
                    0 => special[(s >> 8) as usize % special.len()],
                    _ => ((s >> 16) % 7) as f32 - 3.0,
                }
            })
            .collect()
    }

    fn reduce_with_tract(reducer: Reducer, axis: usize, input: &Tensor) -> Tensor {
        reducer.reduce(&[axis], input).unwrap()
    }

    #[test]
    fn picks_the_index_tracts_reduce_picks() {
        let shapes: [&[usize]; 7] = [
            &[10],
            &[1, 10],
            &[3, 7],
            &[2, 3, 4],
            &[2, 1, 5, 3],
            &[4, 0, 2],
            &[1, 1000],
        ];
        let mut seed = 7;
        for shape in shapes {
            for axis in 0..shape.len() {
                for reducer in [
                    Reducer::ArgMax(false),
                    Reducer::ArgMax(true),
                    Reducer::ArgMin(false),
                    Reducer::ArgMin(true),
                ] {
                    for uniform in [None, Some(f32::NAN), Some(f32::NEG_INFINITY), Some(2.0)] {
                        seed += 1;
                        let len = shape.iter().product();
                        let data = match uniform {
                            Some(v) => vec![v; len],
                            None => values(len, seed),
                        };
                        let input = Tensor::from_shape(shape, &data).unwrap();
                        let reduce = Reduce {
                            axes: tvec![axis],
                            reducer,
                        };
                        let op = ArgExtreme::of(&reduce, &f32::fact(shape)).unwrap();
                        let got = op
                            .eval_out_of_plan(tvec![input.clone().into_tvalue()])
                            .unwrap()
                            .unwrap();
                        let want = reduce_with_tract(reducer, axis, &input);
                        assert_eq!(
                            *got[0], want,
                            "{reducer:?} along {axis} of {shape:?}: {data:?}"
                        );
                        let fact = op.output_facts(&[&f32::fact(shape)]).unwrap();
                        assert_eq!(fact[0], i64::fact(want.shape()));
                    }
                }
            }
        }
    }

    #[test]
    fn only_f32_reductions_along_one_axis_are_taken() {
        let taken = |axes: TVec<usize>, reducer, fact: &TypedFact| {
            ArgExtreme::of(&Reduce { axes, reducer }, fact).is_some()
        };
        let fact = f32::fact([2, 3]);
        assert!(taken(tvec![1], Reducer::ArgMin(true), &fact));
        assert!(!taken(tvec![1], Reducer::Max, &fact));
        assert!(!taken(tvec![0, 1], Reducer::ArgMax(false), &fact));
        assert!(!taken(tvec![2], Reducer::ArgMax(false), &fact));
        assert!(!taken(tvec![1], Reducer::ArgMax(false), &f64::fact([2, 3])));
    }

    #[test]
    fn a_classifiers_argmax_is_replaced_with_the_same_outputs() {
        let onnx = std::fs::read(format!(
            "{}/../tests/fixtures/models/digits_logreg/model.onnx",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let optimized = tract_onnx::onnx()
            .model_for_read(&mut &*onnx)
            .unwrap()
            .with_input_fact(0, f32::fact([1, 64]).into())
            .unwrap()
            .into_optimized()
            .unwrap();
        let mut replaced = optimized.clone();
        assert_eq!(substitute(&mut replaced).unwrap(), 1);
        assert_eq!(substitute(&mut replaced).unwrap(), 0, "substituted twice");
        let input = optimized
            .input_fact(0)
            .unwrap()
            .shape
            .as_concrete()
            .unwrap()
            .to_vec();
        let len: usize = input.iter().product();
        for seed in 0..20 {
            let x = Tensor::from_shape(&input, &values(len, seed)).unwrap();
            let run = |m: &TypedModel| {
                m.clone()
                    .into_runnable()
                    .unwrap()
                    .run(tvec![x.clone().into()])
                    .unwrap()
            };
            let (a, b) = (run(&optimized), run(&replaced));
            assert_eq!(a.len(), b.len());
            for (a, b) in a.iter().zip(&b) {
                assert_eq!(a.as_bytes(), b.as_bytes(), "seed {seed}");
            }
        }
    }
}
