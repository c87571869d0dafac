//! tract's eager im2col replayed from a table of sources.
//!
//! Where tract materializes a convolution's im2col before the product (`Im2col`, the 1-D
//! convolutions of Silero VAD's encoder among others), its `Patcher` walks every input
//! channel and kernel tap, works out which output positions fall in the padding, and hands
//! each value to a panel writer one at a time, resolving the geometry again on every call.
//! On Silero VAD's small convolutions (2,300 packed values in all) that was 22% of a
//! capsule's inference, about 12 ns per value (docs/benchmarks.md, "Dense layers of one
//! row").
//!
//! The packed panels depend only on the input's shape, which a one-row plan fixes. So
//! [`substitute`] runs the op once on a probe whose values are their own indices plus one:
//! every packed value then names the input element it copies, or is zero where tract writes
//! padding or the unused end of the last panel. [`Im2colGather`] then fills the same panels
//! from that table (and writes zeros in the padding record tract's packing adds after each
//! panel, which tract leaves uninitialized and the kernels do not sum). Before it replaces
//! the op, `learn` runs tract's op and the gather on a second input (negative zeros,
//! subnormals, other magnitudes) and compares every value of the panels' rows, so the
//! products see the same values and the outputs are the same bits.
//!
//! Taken only for f32 inputs of a concrete shape, with no explicit padding value, and a
//! table of at most [`MAX_SOURCES`] values per op (the table lives in the capsule's image).
//!
//! Only the guest substitutes (lib.rs): native tract, the baseline a capsule is measured
//! against, keeps its own packing.

use std::hash::{Hash, Hasher};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::conv::Im2Col;
use tract_onnx::tract_core::tract_linalg::mmm::{
    EagerPackedInput, MMMInputValue, PackedExoticFact, PackedMatrixStorage,
};

/// Most packed values one op's table holds (4 bytes each in the image).
pub const MAX_SOURCES: usize = 1 << 18;
/// Largest input probed: the probe and its check are built at load, and an im2col reads
/// each input value at least once unless its stride skips some, so a larger input has a
/// larger table than [`MAX_SOURCES`] allows (and indices plus one stay exact as f32).
const MAX_INPUT_LEN: usize = 4 * MAX_SOURCES;

/// One packed operand of the op's output (one per batch row and group).
#[derive(Debug)]
struct Packed {
    fact: PackedExoticFact,
    panel_bytes: usize,
    mn: usize,
    /// The buffer's alignment (the packing's).
    align: usize,
    /// Per packed f32: 0 for a zero, `i + 1` for input element `i`.
    sources: Vec<u32>,
}

#[derive(Debug)]
struct Table {
    input_shape: TVec<usize>,
    /// The output storage's batch shape.
    batch_shape: TVec<usize>,
    packed: Vec<Packed>,
    output: TypedFact,
}

/// tract's `Im2col` of one input shape, as a gather from [`Table`].
#[derive(Debug, Clone)]
pub struct Im2colGather {
    table: Arc<Table>,
}

impl PartialEq for Im2colGather {
    fn eq(&self, other: &Im2colGather) -> bool {
        Arc::ptr_eq(&self.table, &other.table)
    }
}

impl Eq for Im2colGather {}

impl Hash for Im2colGather {
    fn hash<H: Hasher>(&self, state: &mut H) {
        Arc::as_ptr(&self.table).hash(state);
    }
}

/// The f32 values of a packed operand's buffer, with 0 in place of its padding records
/// (left unread: tract leaves them uninitialized, see [`is_data`]).
fn packed_values(value: &EagerPackedInput) -> Vec<f32> {
    value
        .packed
        .as_bytes()
        .chunks_exact(4)
        .enumerate()
        .map(|(j, b)| {
            if is_data(value, j) {
                f32::from_le_bytes([b[0], b[1], b[2], b[3]])
            } else {
                0.0
            }
        })
        .collect()
}

/// Whether packed f32 `j` of `value` is one of its panels' `k` records of `r` values, not
/// the padding record after them (tract's packings add one, which its im2col leaves
/// uninitialized and the kernels do not sum).
fn is_data(value: &EagerPackedInput, j: usize) -> bool {
    let panel = value.panel_bytes / 4;
    panel > 0 && j % panel < value.fact.k.saturating_mul(value.fact.format.r())
}

/// The packed operands of an im2col output.
fn eager_values(output: &TValue) -> TractResult<Option<Vec<&EagerPackedInput>>> {
    let storage = output.try_storage_as::<PackedMatrixStorage>()?;
    Ok(storage
        .values()
        .iter()
        .map(|v| v.downcast_ref::<EagerPackedInput>())
        .collect())
}

impl Table {
    /// The table of node `id` (an `Im2col` of `model`), when the probes show one that
    /// reproduces it (see the module's documentation).
    fn learn(model: &TypedModel, id: usize) -> TractResult<Option<Table>> {
        let node = model.node(id);
        let (true, [input]) = (node.op_is::<Im2Col>(), &node.inputs[..]) else {
            return Ok(None);
        };
        let fact = model.outlet_fact(*input)?;
        let Some(shape) = fact.shape.as_concrete() else {
            return Ok(None);
        };
        let len: usize = shape.iter().product();
        if fact.datum_type != f32::datum_type() || len == 0 || len > MAX_INPUT_LEN {
            return Ok(None);
        }
        // The table's size from the output's fact, before anything is evaluated: an
        // operand of `k` rows and `mn` columns per batch row and group.
        let output_fact = model.outlet_fact(OutletId::new(id, 0))?;
        let packed_fact = output_fact
            .exotic_fact
            .as_ref()
            .and_then(|f| f.downcast_ref::<PackedExoticFact>());
        let operands = output_fact
            .shape
            .as_concrete()
            .map(|s| s.iter().product::<usize>());
        let size = packed_fact.zip(operands).and_then(|(f, operands)| {
            f.mn.to_usize()
                .ok()?
                .checked_mul(f.k)?
                .checked_mul(operands)
        });
        if size.is_none_or(|size| size > MAX_SOURCES) {
            return Ok(None);
        }
        let probe: Vec<f32> = (1..=len).map(|i| i as f32).collect();
        let probe = Tensor::from_shape(shape, &probe)?.into_tvalue();
        // tract's op failing on the probe leaves it in place, to fail (or not) at run time.
        let Ok(Some(outputs)) = node.op.eval_out_of_plan(tvec!(probe)) else {
            return Ok(None);
        };
        let [output] = &outputs[..] else {
            return Ok(None);
        };
        let Ok(storage) = output.try_storage_as::<PackedMatrixStorage>() else {
            return Ok(None);
        };
        let Ok(Some(values)) = eager_values(output) else {
            return Ok(None);
        };
        let mut packed = Vec::with_capacity(values.len());
        let mut total = 0usize;
        for value in values {
            let mut sources = Vec::new();
            for (j, v) in packed_values(value).into_iter().enumerate() {
                if !is_data(value, j) {
                    // A panel's padding record, which tract leaves as it was allocated.
                    sources.push(0);
                    continue;
                }
                let source = v as u32;
                // Zero (padding, or the last panel's unused end), or an index plus one.
                if v.to_bits() != 0 && !(v >= 1.0 && v as usize <= len && source as f32 == v) {
                    return Ok(None);
                }
                sources.push(source);
            }
            total = total.saturating_add(sources.len());
            if total > MAX_SOURCES {
                return Ok(None);
            }
            packed.push(Packed {
                fact: value.fact.clone(),
                panel_bytes: value.panel_bytes,
                mn: value.mn,
                align: value.packed.layout().align(),
                sources,
            });
        }
        let table = Table {
            input_shape: shape.into(),
            batch_shape: storage.batch_shape().into(),
            packed,
            output: model.outlet_fact(OutletId::new(id, 0))?.clone(),
        };
        // The same bytes as tract's on other values.
        let check: Vec<f32> = (0..len)
            .map(|i| match i % 7 {
                0 => -0.0,
                1 => f32::from_bits(0x0000_0001 + i as u32),
                _ => ((i * 7919) % 1009) as f32 / 3.0 - 150.0,
            })
            .collect();
        let check = Tensor::from_shape(shape, &check)?.into_tvalue();
        let Ok(Some(expected)) = node.op.eval_out_of_plan(tvec!(check.clone())) else {
            return Ok(None);
        };
        let got = table.gather(&check)?;
        let (Ok(Some(expected)), Ok(Some(got))) = (eager_values(&expected[0]), eager_values(&got))
        else {
            return Ok(None);
        };
        let same = expected.len() == got.len()
            && expected.iter().zip(&got).all(|(e, g)| {
                let (e_values, g_values) = (packed_values(e), packed_values(g));
                (e.panel_bytes, e.mn, e.fact.k) == (g.panel_bytes, g.mn, g.fact.k)
                    && e_values.len() == g_values.len()
                    && e_values
                        .iter()
                        .zip(&g_values)
                        .enumerate()
                        .all(|(j, (a, b))| !is_data(e, j) || a.to_bits() == b.to_bits())
            });
        Ok(same.then_some(table))
    }

    /// The packed operands for `input`, stored as tract stores them.
    fn gather(&self, input: &TValue) -> TractResult<TValue> {
        ensure!(
            input.datum_type() == f32::datum_type() && input.shape() == &*self.input_shape,
            "im2col gather of {:?} f32 got {:?} {:?}",
            self.input_shape,
            input.datum_type(),
            input.shape()
        );
        let x = input.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let mut values: TVec<Box<dyn MMMInputValue>> = TVec::with_capacity(self.packed.len());
        for p in &self.packed {
            // SAFETY: every one of the buffer's f32 is set below before anything reads it.
            let mut data = unsafe {
                Tensor::uninitialized_aligned_dt(f32::datum_type(), &[p.sources.len()], p.align)?
            };
            let mut view = data.try_as_plain_ram_mut()?;
            for (out, &source) in view.as_slice_mut::<f32>()?.iter_mut().zip(&p.sources) {
                *out = match (source as usize).checked_sub(1) {
                    None => 0.0,
                    // In bounds: `learn` bounds every source by the input's length, and the
                    // shape is checked above.
                    Some(i) => x[i],
                };
            }
            values.push(Box::new(EagerPackedInput {
                fact: p.fact.clone(),
                packed: data.into_blob()?.into(),
                panel_bytes: p.panel_bytes,
                mn: p.mn,
            }));
        }
        Ok(PackedMatrixStorage::new_batched(&self.batch_shape, values)
            .into_tensor(f32::datum_type())
            .into_tvalue())
    }
}

impl Op for Im2colGather {
    fn name(&self) -> StaticName {
        "Im2colGather".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "{} packed values from {:?}",
            self.table
                .packed
                .iter()
                .map(|p| p.sources.len())
                .sum::<usize>(),
            self.table.input_shape
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Im2colGather {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        Ok(tvec!(self.table.gather(&input)?))
    }
}

impl TypedOp for Im2colGather {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "{} has one input", self.name());
        Ok(tvec!(self.table.output.clone()))
    }

    as_op!();
}

/// Replaces each eager im2col that a table reproduces (see the module's documentation);
/// returns how many.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        if let Some(table) = Table::learn(model, id)? {
            model.node_mut(id).op = Box::new(Im2colGather {
                table: Arc::new(table),
            });
            replaced += 1;
        }
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silero(rows: usize) -> TypedModel {
        let path = format!(
            "{}/../tests/fixtures/models/silero_vad/model.onnx",
            env!("CARGO_MANIFEST_DIR")
        );
        tract_onnx::onnx()
            .model_for_path(path)
            .unwrap()
            .with_input_fact(0, f32::fact([rows, 576]).into())
            .unwrap()
            .into_optimized()
            .unwrap()
    }

    fn inputs(model: &TypedModel) -> TVec<TValue> {
        model
            .input_outlets()
            .unwrap()
            .iter()
            .map(|o| {
                let shape = model
                    .outlet_fact(*o)
                    .unwrap()
                    .shape
                    .as_concrete()
                    .unwrap()
                    .to_vec();
                let n: usize = shape.iter().product();
                let values: Vec<f32> = (0..n)
                    .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                    .collect();
                Tensor::from_shape(&shape, &values).unwrap().into_tvalue()
            })
            .collect()
    }

    fn run(model: TypedModel, inputs: TVec<TValue>) -> Vec<Vec<u8>> {
        let plan = model.into_runnable().unwrap();
        let outputs = plan.run(inputs).unwrap();
        outputs.iter().map(|o| o.as_bytes().to_vec()).collect()
    }

    #[test]
    fn silero_vads_convolutions_pack_the_same_bytes() {
        let model = silero(1);
        let inputs = inputs(&model);
        let expected = run(model.clone(), inputs.clone());
        let mut ours = model;
        let before = ours.nodes().iter().filter(|n| n.op_is::<Im2Col>()).count();
        assert!(before > 0);
        assert_eq!(substitute(&mut ours).unwrap(), before);
        assert!(!ours.nodes().iter().any(|n| n.op_is::<Im2Col>()));
        assert_eq!(run(ours, inputs), expected);
    }

    #[test]
    fn another_shape_is_an_error() {
        let mut model = silero(1);
        substitute(&mut model).unwrap();
        let node = model
            .nodes()
            .iter()
            .find(|n| n.op_is::<Im2colGather>())
            .unwrap();
        let err = node
            .op
            .eval_out_of_plan(tvec![
                Tensor::zero::<f32>(&[1, 5, 129]).unwrap().into_tvalue()
            ])
            .unwrap_err()
            .to_string();
        assert!(err.contains("im2col gather of"), "{err}");
    }
}
