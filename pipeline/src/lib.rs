//! Capsule's preprocessing and postprocessing (design section 4), executed inside the guest
//! around the model, and natively for comparison.
//!
//! A [`capsule_format::Pipeline`] spec is resolved against the model's signature once
//! ([`CompiledPipeline::new`], at build time, so the vocabulary's hash map lands in the
//! snapshot), then every request goes through [`CompiledPipeline::preprocess`], the model,
//! and [`CompiledPipeline::postprocess`].
//!
//! Every raw input is untrusted: an undecodable image, a record with a wrong type, a text over
//! its size limit are [`Error::BadInput`]s that name the input (and the field), never panics.

mod image;
mod post;
mod tabular;
mod text;

use capsule_format::pipeline::{RawKind, Signature};
use capsule_format::wire::NamedTensorView;
use capsule_format::{DType, NamedTensor, Pipeline, Tensor, TensorSpec, byte_elements};

pub use image::{Planes, prepare as prepare_image};
pub use post::strings;
pub use tabular::encode_record;
pub use text::WordPiece;

/// Errors of preprocessing and postprocessing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A raw input that cannot be turned into model inputs.
    #[error("input {input:?}: {reason}")]
    BadInput {
        /// The raw input's name.
        input: String,
        /// What is wrong (naming the element, field or limit).
        reason: String,
    },
    /// A model output that a postprocessing step cannot take.
    #[error("output {output:?}: {reason}")]
    BadOutput {
        /// The capsule output's name.
        output: String,
        /// What is wrong.
        reason: String,
    },
    /// The spec does not fit the model.
    #[error(transparent)]
    Spec(#[from] capsule_format::Error),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn bad_input(input: &str, reason: impl Into<String>) -> Error {
    Error::BadInput {
        input: input.to_owned(),
        reason: reason.into(),
    }
}

/// An error about element `i` of a batch of `count` (named only when there are several).
pub(crate) fn element_error(
    input: &str,
    label: &str,
    i: usize,
    count: usize,
    reason: String,
) -> Error {
    if count == 1 {
        bad_input(input, reason)
    } else {
        bad_input(input, format!("{label} {i}: {reason}"))
    }
}

enum Step {
    Image(image::ImageStep),
    Tabular(tabular::TabularStep),
    Text(Box<text::TextStep>),
}

/// A validated pipeline, ready to run.
pub struct CompiledPipeline {
    spec: Pipeline,
    signature: Signature,
    steps: Vec<Step>,
    labels: Vec<String>,
}

impl std::fmt::Debug for CompiledPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledPipeline")
            .field("signature", &self.signature)
            .finish_non_exhaustive()
    }
}

impl CompiledPipeline {
    /// Validates `spec` against the model's signature and prepares it (vocabulary lookup
    /// tables, resize plans).
    pub fn new(
        spec: &Pipeline,
        model_inputs: &[TensorSpec],
        model_outputs: &[TensorSpec],
        labels: &[String],
    ) -> Result<CompiledPipeline> {
        let (spec, signature) = spec.resolve(model_inputs, model_outputs, labels)?;
        let mut steps = Vec::with_capacity(spec.inputs.len());
        for raw in &spec.inputs {
            let target = |name: &str| {
                model_inputs
                    .iter()
                    .find(|m| m.name == name)
                    .cloned()
                    .ok_or_else(|| bad_input(&raw.name, format!("no model input {name:?}")))
            };
            let feeds = raw.model_inputs();
            steps.push(match raw.kind()? {
                RawKind::Image(i) => Step::Image(image::ImageStep::new(i, target(feeds[0])?)),
                RawKind::Tabular(t) => {
                    Step::Tabular(tabular::TabularStep::new(t, target(feeds[0])?))
                }
                RawKind::Text(t) => Step::Text(Box::new(text::TextStep::new(t, model_inputs)?)),
            });
        }
        Ok(CompiledPipeline {
            spec,
            signature,
            steps,
            labels: labels.to_vec(),
        })
    }

    /// The resolved spec (defaults filled in).
    pub fn spec(&self) -> &Pipeline {
        &self.spec
    }

    /// What requests and responses carry.
    pub fn signature(&self) -> &Signature {
        &self.signature
    }

    /// Turns the request's raw inputs into model inputs. Model inputs that no raw input
    /// feeds are not returned: the caller passes the request's tensors through.
    pub fn preprocess(&self, request: &[NamedTensorView<'_>]) -> Result<Vec<NamedTensor>> {
        let mut out = Vec::new();
        for (raw, step) in self.spec.inputs.iter().zip(&self.steps) {
            let Some(given) = request.iter().find(|t| t.name == raw.name) else {
                return Err(bad_input(&raw.name, "missing"));
            };
            if given.tensor.dtype != DType::Bytes {
                return Err(bad_input(
                    &raw.name,
                    format!("expected BYTES, got {}", given.tensor.dtype),
                ));
            }
            let items = byte_elements(given.tensor.data)
                .map_err(|e| bad_input(&raw.name, e.to_string()))?;
            if items.is_empty() {
                return Err(bad_input(&raw.name, "the batch is empty"));
            }
            match step {
                Step::Image(s) => out.push(s.run(&raw.name, &items)?),
                Step::Tabular(s) => out.push(s.run(&raw.name, &items)?),
                Step::Text(s) => out.extend(s.run(&raw.name, &items)?),
            }
        }
        Ok(out)
    }

    /// Turns model outputs into the capsule's outputs. `inputs` are the model inputs of the
    /// same call (for steps such as `mean_pool` that read a mask).
    pub fn postprocess(
        &self,
        inputs: &[NamedTensorView<'_>],
        outputs: Vec<NamedTensor>,
    ) -> Result<Vec<NamedTensor>> {
        if self.spec.outputs.is_empty() {
            return Ok(outputs);
        }
        self.spec
            .outputs
            .iter()
            .map(|o| {
                let source = outputs
                    .iter()
                    .find(|t| t.name == o.source())
                    .ok_or_else(|| Error::BadOutput {
                        output: o.name.clone(),
                        reason: format!("the model did not return {:?}", o.source()),
                    })?;
                let mut tensor: Tensor = source.tensor.clone();
                for step in &o.steps {
                    tensor = post::apply(step, tensor, inputs, &self.labels).map_err(|reason| {
                        Error::BadOutput {
                            output: o.name.clone(),
                            reason,
                        }
                    })?;
                }
                Ok(NamedTensor {
                    name: o.name.clone(),
                    tensor,
                })
            })
            .collect()
    }
}

/// Little-endian f32 data of a tensor of these values.
pub(crate) fn f32_tensor(shape: Vec<u64>, values: &[f32]) -> Result<Tensor, String> {
    Tensor::from_f32(shape, values).map_err(|e| e.to_string())
}
