//! Output tensors the guest's ops keep from one inference to the next.
//!
//! Every op of a plan makes its output tensor anew at each inference, and tract's `Tensor`
//! construction (shape, strides, aligned storage) and its drop cost about as much as a
//! dense layer of a digits MLP's product (docs/benchmarks.md, "Allocation"). An op given a
//! [`Reused`] keeps its last output and, when nothing else holds it any more (the plan
//! dropped its copy, the caller the model's outputs), writes the next one into it.
//!
//! A kept output is shared while the plan runs, so a consumer that would take it over
//! (tract's ops call `into_tensor`, which moves a tensor held once and copies a shared one)
//! would copy it: [`enable`] gives a [`Reused`] only to ops whose every consumer reads its
//! inputs in place (the guest's own one-column products and arg-extremes) or that are model
//! outputs.

use std::sync::Mutex;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;

/// An op's last output, when its consumers allow keeping it ([`enable`]).
#[derive(Debug, Default)]
pub(crate) struct Reused {
    /// `None` when the op makes a new output each time.
    slot: Option<Mutex<Option<Arc<Tensor>>>>,
}

impl Reused {
    /// A slot that keeps the op's output.
    pub(crate) fn kept() -> Reused {
        Reused {
            slot: Some(Mutex::new(None)),
        }
    }

    /// Whether outputs are kept.
    pub(crate) fn is_kept(&self) -> bool {
        self.slot.is_some()
    }

    /// Drops the kept output, if any.
    pub(crate) fn clear(&self) {
        if let Some(Ok(mut slot)) = self.slot.as_ref().map(Mutex::lock) {
            *slot = None;
        }
    }

    /// Whether an output is kept now.
    #[cfg(test)]
    fn holds(&self) -> bool {
        self.slot
            .as_ref()
            .is_some_and(|slot| slot.lock().is_ok_and(|s| s.is_some()))
    }

    /// An output of `dt` and `shape` with every element written by `fill`: the last one,
    /// when kept, of that type and shape and held by nothing else; else a new one (kept for
    /// next time when the slot allows).
    pub(crate) fn output(
        &self,
        dt: DatumType,
        shape: &[usize],
        fill: impl FnOnce(&mut Tensor) -> TractResult<()>,
    ) -> TractResult<TValue> {
        let Some(slot) = &self.slot else {
            return Ok(new_output(dt, shape, fill)?.into_tvalue());
        };
        // A poisoned lock (a panic while filling, which traps the guest) is never reused.
        let Ok(mut slot) = slot.lock() else {
            return Ok(new_output(dt, shape, fill)?.into_tvalue());
        };
        if let Some(last) = slot.as_mut()
            && last.datum_type() == dt
            && last.shape() == shape
            && let Some(tensor) = Arc::get_mut(last)
        {
            fill(tensor)?;
            return Ok(TValue::from_const(Arc::clone(last)));
        }
        let tensor = Arc::new(new_output(dt, shape, fill)?);
        *slot = Some(Arc::clone(&tensor));
        Ok(TValue::from_const(tensor))
    }
}

/// A new tensor of `dt` and `shape`, filled by `fill`.
fn new_output(
    dt: DatumType,
    shape: &[usize],
    fill: impl FnOnce(&mut Tensor) -> TractResult<()>,
) -> TractResult<Tensor> {
    // SAFETY: `fill` writes every element before anything reads one (`Reused::output`'s
    // contract with its callers); a plain datatype has no drop to run on garbage.
    ensure!(
        dt.is_copy(),
        "kept outputs are of plain datatypes, not {dt:?}"
    );
    let mut tensor = unsafe { Tensor::uninitialized_dt(dt, shape)? };
    fill(&mut tensor)?;
    Ok(tensor)
}

/// Clones start empty: an op's copy in another plan keeps its own output.
impl Clone for Reused {
    fn clone(&self) -> Reused {
        Reused {
            slot: self.slot.as_ref().map(|_| Mutex::new(None)),
        }
    }
}

/// What an op computes does not depend on its kept output.
impl std::hash::Hash for Reused {
    fn hash<H: std::hash::Hasher>(&self, _: &mut H) {}
}

/// What an op computes does not depend on its kept output.
impl PartialEq for Reused {
    fn eq(&self, _: &Reused) -> bool {
        true
    }
}

impl Eq for Reused {}

/// Whether the op of `node` reads its inputs in place (never takes one over).
fn reads_in_place(node: &TypedNode) -> bool {
    node.op_is::<crate::matvec::MatVec>() || node.op_is::<crate::reduce::ArgExtreme>()
}

/// The [`Reused`] slot of `node`'s op, if it has one.
fn slot_of(node: &TypedNode) -> Option<&Reused> {
    if let Some(op) = node.op_as::<crate::matvec::MatVec>() {
        Some(op.kept_output())
    } else {
        node.op_as::<crate::reduce::ArgExtreme>()
            .map(crate::reduce::ArgExtreme::kept_output)
    }
}

/// Drops every output `model`'s ops keep (the builder's runs before the snapshot).
pub(crate) fn release(model: &TypedModel) {
    for node in model.nodes() {
        if let Some(slot) = slot_of(node) {
            slot.clear();
        }
    }
}

/// Gives the ops that can keep their outputs a [`Reused`] slot: those whose output every
/// consumer reads in place. Returns how many.
pub(crate) fn enable(model: &mut TypedModel) -> TractResult<usize> {
    let mut enabled = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let [output] = &node.outputs[..] else {
            continue;
        };
        if !output
            .successors
            .iter()
            .all(|s| reads_in_place(model.node(s.node)))
        {
            continue;
        }
        let kept: Option<Box<dyn TypedOp>> = if let Some(op) = node.op_as::<crate::matvec::MatVec>()
        {
            op.with_kept_output().map(|op| Box::new(op) as _)
        } else if let Some(op) = node.op_as::<crate::reduce::ArgExtreme>() {
            op.with_kept_output().map(|op| Box::new(op) as _)
        } else {
            None
        };
        if let Some(kept) = kept {
            model.node_mut(id).op = kept;
            enabled += 1;
        }
    }
    Ok(enabled)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn optimized(name: &str) -> TypedModel {
        crate::matvec::tests::optimized(name, 1)
    }

    fn image(seed: usize) -> TValue {
        let values: Vec<f32> = (0..64)
            .map(|i| (((i + seed) * 37) % 101) as f32 / 6.0 - 8.0)
            .collect();
        Tensor::from_shape(&[1, 64], &values).unwrap().into_tvalue()
    }

    /// The MLP as the guest runs it: one-column products, arg-max, folded followers.
    fn guests(name: &str) -> (TypedModel, usize) {
        let mut model = optimized(name);
        crate::reduce::substitute(&mut model).unwrap();
        crate::matvec::substitute(&mut model).unwrap();
        crate::softmax::substitute(&mut model).unwrap();
        crate::absorb_into_products(&mut model).unwrap();
        let kept = enable(&mut model).unwrap();
        (model, kept)
    }

    #[test]
    fn kept_outputs_give_tracts_outputs_run_after_run() {
        for (name, kept) in [("digits_mlp", 3), ("digits_logreg", 2)] {
            let tracts = optimized(name).into_runnable().unwrap();
            let (ours, n) = guests(name);
            assert_eq!(n, kept, "{name}: ops keeping their output");
            let mut state = SimpleState::new(&ours.into_runnable().unwrap()).unwrap();
            for seed in 0..4 {
                let expected = tracts.run(tvec![image(seed)]).unwrap();
                let outputs = state.run(tvec![image(seed)]).unwrap();
                assert_eq!(outputs, expected, "{name}, run {seed}");
            }
        }
    }

    #[test]
    fn an_output_still_held_is_never_overwritten() {
        let (model, _) = guests("digits_mlp");
        let mut state = SimpleState::new(&model.into_runnable().unwrap()).unwrap();
        let first = state.run(tvec![image(0)]).unwrap();
        let copy: Vec<Tensor> = first.iter().map(|t| (**t).clone()).collect();
        let second = state.run(tvec![image(1)]).unwrap();
        assert_ne!(second[0], first[0], "the inputs give other outputs");
        for (held, copy) in first.iter().zip(&copy) {
            assert_eq!(&**held, copy, "a held output was written over");
        }
        drop(first);
        let third = state.run(tvec![image(1)]).unwrap();
        assert_eq!(third, second);
    }

    #[test]
    fn release_drops_every_kept_output() {
        let (model, _) = guests("digits_mlp");
        let plan = model.into_runnable().unwrap();
        let mut state = SimpleState::new(&plan).unwrap();
        state.run(tvec![image(0)]).unwrap();
        let holding = || {
            plan.model()
                .nodes()
                .iter()
                .filter(|n| slot_of(n).is_some_and(Reused::holds))
                .count()
        };
        assert_eq!(holding(), 3);
        release(plan.model());
        assert_eq!(holding(), 0);
    }

    #[test]
    fn outputs_taken_over_by_their_consumer_are_not_kept() {
        // The logistic regression without folding: its product's output goes to tract's
        // reshape, which takes it over.
        let mut model = optimized("digits_logreg");
        crate::matvec::substitute(&mut model).unwrap();
        assert_eq!(enable(&mut model).unwrap(), 0);
    }
}
