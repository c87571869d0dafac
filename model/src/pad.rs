//! Padding by whole runs of bytes, without tract's per-index slicing.
//!
//! tract's `Pad` fills an `ndarray` of the output's shape, assigns the input to a slice of
//! it, and for reflect and edge padding assigns every padded index of every axis as its own
//! one-index slice, each built through `IxDyn` shapes and strides. Silero VAD reflects 64
//! samples on each side of its audio: in a capsule that padding took 23% of the inference
//! (docs/benchmarks.md, "The fixtures' per-op costs"). [`substitute`] replaces each `Pad` of a
//! plain-data tensor by [`PadRuns`], which writes the same bytes with one copy per row of the
//! input and one per padded slice: the same values from the same places, for every mode.
//!
//! Only the guest substitutes (lib.rs): native tract, the baseline a capsule is measured
//! against, keeps its own op.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::{Pad, PadMode};

/// tract's `Pad` (`pads` before and after each axis, `mode`) of a tensor of plain data: every
/// datum type whose values are their bytes (numbers, booleans, quantized types).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PadRuns {
    pads: Vec<(usize, usize)>,
    mode: PadMode,
}

/// Whether values of `dt` are their bytes (what [`PadRuns`] copies).
fn plain(dt: DatumType) -> bool {
    dt.is_copy() && !matches!(dt, DatumType::TDim) && dt.size_of() > 0
}

impl PadRuns {
    /// The replacement of `pad` reading `input`, when its data is plain and a constant
    /// mode's value converts to it.
    fn of(pad: &Pad, input: &TypedFact) -> Option<PadRuns> {
        let dt = input.datum_type;
        if !plain(dt) || pad.pads.len() != input.rank() {
            return None;
        }
        if let PadMode::Constant(c) = &pad.mode
            && c.cast_to_dt(dt).is_err()
        {
            return None;
        }
        Some(PadRuns {
            pads: pad.pads.clone(),
            mode: pad.mode.clone(),
        })
    }

    /// The output's shape for an input of `shape`.
    fn output_shape(&self, shape: &[usize]) -> TractResult<TVec<usize>> {
        ensure!(
            shape.len() == self.pads.len(),
            "Pad of rank {} given rank {}",
            self.pads.len(),
            shape.len()
        );
        shape
            .iter()
            .zip(&self.pads)
            .map(|(&d, &(a, b))| {
                d.checked_add(a)
                    .and_then(|d| d.checked_add(b))
                    .context("padded shape overflows")
            })
            .collect()
    }

    /// Writes the padding of `input` (of `shape`, `size` bytes a value) into `out` (the
    /// output's bytes, of `out_shape`): the input's rows and the fill (`fill`, one value)
    /// around them, then each axis's reflected or repeated slices in axis order, as tract
    /// assigns them.
    fn run(
        &self,
        input: &[u8],
        shape: &[usize],
        out: &mut [u8],
        out_shape: &[usize],
        size: usize,
        fill: &[u8],
    ) -> TractResult<()> {
        let Some((&width, outer)) = shape.split_last() else {
            // A scalar: nothing to pad.
            out.copy_from_slice(input);
            return Ok(());
        };
        let (left, _) = self.pads[shape.len() - 1];
        let out_row = out_shape[shape.len() - 1] * size;
        if out_row == 0 {
            return Ok(());
        }
        // Each output byte is written once, row by row (the last axis): a row of the input
        // between its fills, or all fill. Zeros are one `memory.fill` each; filling the whole
        // output value by value first made textdir with host kernels 3.2 -> 4.6 ms (its
        // Winograd convolutions pad with zeros).
        let zero = fill.iter().all(|&b| b == 0);
        let put = |to: &mut [u8]| {
            if zero {
                to.fill(0);
            } else {
                for value in to.chunks_exact_mut(size) {
                    value.copy_from_slice(fill);
                }
            }
        };
        let (row, start) = (width * size, left * size);
        let mut at = vec![0usize; outer.len()];
        for to in out.chunks_exact_mut(out_row) {
            // The input row this output row holds, if any.
            let mut from = Some(0usize);
            for ((&i, &d), &(before, _)) in at.iter().zip(outer).zip(&self.pads) {
                from = from
                    .filter(|_| i >= before && i - before < d)
                    .map(|f| f * d + i - before);
            }
            match from {
                Some(f) => {
                    put(&mut to[..start]);
                    to[start..start + row].copy_from_slice(&input[f * row..(f + 1) * row]);
                    put(&mut to[start + row..]);
                }
                None => put(to),
            }
            // The next output row's index, the last axis fastest.
            for (i, &d) in at.iter_mut().zip(&out_shape[..outer.len()]).rev() {
                *i += 1;
                if *i < d {
                    break;
                }
                *i = 0;
            }
        }
        if matches!(self.mode, PadMode::Constant(_)) {
            return Ok(());
        }
        for (ax, &(before, after)) in self.pads.iter().enumerate() {
            let dim = out_shape[ax];
            let slice = out_shape[ax + 1..].iter().product::<usize>() * size;
            let outer: usize = out_shape[..ax].iter().product();
            // tract's source indices: reading one outside the axis (reflecting by as much
            // as the axis is long, or repeating the edge of nothing) panics there.
            let source = |i: usize, is_before: bool| -> Option<usize> {
                match (&self.mode, is_before) {
                    (PadMode::Reflect, true) => Some(2 * before - i),
                    (PadMode::Reflect, false) => (dim - after).checked_sub(2 + i),
                    (_, true) => Some(before),
                    (_, false) => (dim - after).checked_sub(1),
                }
                .filter(|&s| s < dim)
            };
            let targets = (0..before)
                .map(|i| (i, source(i, true)))
                .chain((0..after).map(|i| (dim - after + i, source(i, false))));
            for (target, from) in targets {
                let Some(from) = from else {
                    bail!(
                        "Pad {:?}: axis {ax} of {} is too short for pads {:?}",
                        self.mode,
                        shape[ax],
                        self.pads[ax]
                    );
                };
                for o in 0..outer {
                    let base = o * dim * slice;
                    out.copy_within(
                        base + from * slice..base + (from + 1) * slice,
                        base + target * slice,
                    );
                }
            }
        }
        Ok(())
    }
}

impl Op for PadRuns {
    fn name(&self) -> StaticName {
        "PadRuns".into()
    }

    op_as_typed_op!();
}

impl EvalOp for PadRuns {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let dt = input.datum_type();
        let size = dt.size_of();
        ensure!(plain(dt), "PadRuns pads plain data, not {dt:?}");
        let shape = input.shape();
        let out_shape = self.output_shape(shape)?;
        let fill = match &self.mode {
            PadMode::Constant(c) => c.cast_to_dt(dt)?.into_owned(),
            // tract's `T::default()`: all-zero bytes for every plain type.
            _ => Tensor::zero_dt(dt, &[])?,
        };
        ensure!(fill.len() == 1, "Pad's constant is not one value");
        // SAFETY: `uninitialized_dt` allocates the output's values of a plain type; `run`
        // writes every byte of them (the fill first) before anything reads them.
        let mut output = unsafe { Tensor::uninitialized_dt(dt, &out_shape)? };
        if output.len() > 0 {
            let input_bytes = input.try_as_plain_ram()?;
            let mut out = output.try_as_plain_ram_mut()?;
            self.run(
                input_bytes.as_bytes(),
                shape,
                out.as_bytes_mut(),
                &out_shape,
                size,
                fill.try_as_plain_ram()?.as_bytes(),
            )?;
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for PadRuns {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Pad {
            pads: self.pads.clone(),
            mode: self.mode.clone(),
        }
        .output_facts(inputs)
    }

    as_op!();
}

/// Replaces every `Pad` of plain data by [`PadRuns`]; returns how many.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    crate::replace_unary::<Pad>(model, |pad, input, _| {
        PadRuns::of(pad, input).map(|op| Box::new(op) as Box<dyn TypedOp>)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn both(pad: &Pad, input: &Tensor) -> (TractResult<TVec<TValue>>, TVec<TValue>) {
        let fact = TypedFact::dt_shape(input.datum_type(), input.shape());
        let ours = PadRuns::of(pad, &fact)
            .expect("a plain tensor")
            .eval_out_of_plan(tvec![input.clone().into_tvalue()])
            .map(Option::unwrap);
        let theirs = pad
            .eval_out_of_plan(tvec![input.clone().into_tvalue()])
            .unwrap()
            .unwrap();
        (ours, theirs)
    }

    #[test]
    fn pads_the_bytes_tracts_pad_writes() {
        let shapes: [&[usize]; 5] = [&[7], &[1, 576], &[2, 3, 4], &[3, 1, 5, 4], &[2, 0, 3]];
        let modes = [
            PadMode::Reflect,
            PadMode::Edge,
            PadMode::Constant(Arc::new(tensor0(-1.5f32))),
            PadMode::Constant(Arc::new(tensor0(0.0f32))),
        ];
        for shape in shapes {
            let len: usize = shape.iter().product();
            let values: Vec<f32> = (0..len).map(|i| i as f32 * 0.5 - 3.0).collect();
            let input = Tensor::from_shape(shape, &values).unwrap();
            for mode in &modes {
                // Every axis padded by up to one less than its length (reflect's limit),
                // some by nothing, some only on one side.
                for variant in 0..4usize {
                    let pads: Vec<(usize, usize)> = shape
                        .iter()
                        .enumerate()
                        .map(|(ax, &d)| {
                            let most = d.saturating_sub(1);
                            match (variant + ax) % 4 {
                                0 => (most, most),
                                1 => (0, most),
                                2 => (most.min(1), 0),
                                _ => (0, 0),
                            }
                        })
                        .collect();
                    let pad = Pad {
                        pads: pads.clone(),
                        mode: mode.clone(),
                    };
                    if *mode == PadMode::Edge && shape.contains(&0) {
                        continue;
                    }
                    let (ours, theirs) = both(&pad, &input);
                    let ours = ours.unwrap();
                    assert_eq!(
                        ours[0].shape(),
                        theirs[0].shape(),
                        "{shape:?} {pads:?} {mode:?}"
                    );
                    assert_eq!(
                        ours[0].as_bytes(),
                        theirs[0].as_bytes(),
                        "{shape:?} {pads:?} {mode:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn other_plain_types_pad_alike() {
        let input = Tensor::from_shape(&[2, 3], &[1i64, -2, 3, -4, 5, -6]).unwrap();
        for mode in [
            PadMode::Reflect,
            PadMode::Edge,
            PadMode::Constant(Arc::new(tensor0(7.0f32))),
        ] {
            let pad = Pad {
                pads: vec![(1, 1), (2, 1)],
                mode,
            };
            let (ours, theirs) = both(&pad, &input);
            assert_eq!(ours.unwrap()[0], theirs[0]);
        }
        let bytes = Tensor::from_shape(&[5], &[1u8, 2, 3, 4, 5]).unwrap();
        let pad = Pad {
            pads: vec![(3, 2)],
            mode: PadMode::Reflect,
        };
        let (ours, theirs) = both(&pad, &bytes);
        assert_eq!(ours.unwrap()[0], theirs[0]);
    }

    /// Reflecting by as much as the axis is long reads outside it: tract panics, ours is an
    /// error.
    #[test]
    fn reflecting_past_the_axis_is_an_error() {
        let input = Tensor::from_shape(&[3], &[1f32, 2., 3.]).unwrap();
        let op = PadRuns {
            pads: vec![(5, 0)],
            mode: PadMode::Reflect,
        };
        let err = op.eval_out_of_plan(tvec![input.into_tvalue()]).unwrap_err();
        assert!(format!("{err:#}").contains("too short"), "{err:#}");
    }

    #[test]
    fn strings_are_left_to_tract() {
        let fact = String::fact([2]);
        let pad = Pad {
            pads: vec![(1, 1)],
            mode: PadMode::Edge,
        };
        assert!(PadRuns::of(&pad, &fact).is_none());
    }
}
