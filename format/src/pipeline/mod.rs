//! The pipeline spec: the preprocessing and postprocessing a capsule runs around its model
//! (design section 4).
//!
//! A spec is authored as TOML (or JSON) next to the model, resolved and validated by the
//! builder against the model's signature, stored in the manifest, and executed inside the
//! guest by `capsule-pipeline`. The same types serve all three, so what the author wrote is
//! what runs. [`Pipeline::resolve`] is the one validation: every error names the step and
//! the field.
//!
//! ```toml
//! [[input]]
//! name = "image"                 # the raw V2 input (BYTES: encoded PNG or JPEG)
//! feeds = "input"                # the model input it produces
//! [input.image]
//! color = "gray"
//! resize = { width = 28, height = 28, filter = "bilinear" }
//! mean = [0.1307]
//! std = [0.3081]
//!
//! [[output]]
//! name = "label"
//! from = "logits"
//! steps = ["softmax", { top_k = { k = 1 } }, "labels"]
//! ```

use serde::{Deserialize, Serialize};

use crate::{DType, Dim, Error, Result, TensorSpec};

mod image;
mod output;
mod tabular;
mod text;

pub use image::*;
pub use output::*;
pub use tabular::*;
pub use text::*;

/// Largest vocabulary a text step accepts.
pub const MAX_VOCAB_TOKENS: usize = 1 << 20;
/// Largest token sequence a text step may produce.
pub const MAX_SEQUENCE_LENGTH: u32 = 1 << 16;
/// Largest `k` of a top-k step.
pub const MAX_TOP_K: u32 = 1 << 16;
/// Largest image side a resize or crop may ask for.
pub const MAX_IMAGE_SIDE: u32 = 1 << 14;

/// Preprocessing of raw inputs and postprocessing of model outputs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    /// Raw inputs, each turned into one or more model inputs. Model inputs that no raw
    /// input feeds are taken as tensors, unchanged.
    #[serde(default, rename = "input")]
    pub inputs: Vec<RawInput>,
    /// Outputs of the capsule. Empty: the model's outputs, unchanged.
    #[serde(default, rename = "output")]
    pub outputs: Vec<OutputSpec>,
}

/// One raw input: exactly one of `image`, `tabular`, `text`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInput {
    /// The V2 input name requests use.
    pub name: String,
    /// The model input an image or tabular input produces (default: the input of the same
    /// name, else the model's only input). Text names its model inputs itself.
    #[serde(default)]
    pub feeds: Option<String>,
    /// Encoded images.
    #[serde(default)]
    pub image: Option<ImageSpec>,
    /// JSON records.
    #[serde(default)]
    pub tabular: Option<TabularSpec>,
    /// UTF-8 text.
    #[serde(default)]
    pub text: Option<TextSpec>,
}

/// The kind of raw input, after validation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RawKind<'a> {
    /// Encoded images.
    Image(&'a ImageSpec),
    /// JSON records.
    Tabular(&'a TabularSpec),
    /// Text.
    Text(&'a TextSpec),
}

impl RawInput {
    /// The one kind set on this input.
    pub fn kind(&self) -> Result<RawKind<'_>> {
        match (&self.image, &self.tabular, &self.text) {
            (Some(i), None, None) => Ok(RawKind::Image(i)),
            (None, Some(t), None) => Ok(RawKind::Tabular(t)),
            (None, None, Some(t)) => Ok(RawKind::Text(t)),
            _ => Err(invalid(
                format!("input {:?}", self.name),
                "set exactly one of `image`, `tabular`, `text`",
            )),
        }
    }

    /// The model inputs this raw input produces (resolved `feeds`).
    pub fn model_inputs(&self) -> Vec<&str> {
        match (&self.text, &self.feeds) {
            (Some(t), _) => std::iter::once(t.input_ids.as_str())
                .chain(t.attention_mask.as_deref())
                .chain(t.token_type_ids.as_deref())
                .collect(),
            (None, Some(f)) => vec![f.as_str()],
            (None, None) => vec![self.name.as_str()],
        }
    }
}

/// The capsule's signature once a pipeline wraps the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// What requests carry.
    pub inputs: Vec<TensorSpec>,
    /// What responses carry.
    pub outputs: Vec<TensorSpec>,
}

pub(super) fn invalid(at: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::InvalidPipeline {
        at: at.into(),
        reason: reason.into(),
    }
}

pub(super) fn batch_dim(spec: &TensorSpec) -> Dim {
    spec.shape
        .first()
        .cloned()
        .unwrap_or(Dim::Symbolic("N".into()))
}

pub(super) fn check_fixed(at: &str, field: &str, dim: Option<&Dim>, want: u64) -> Result<()> {
    match dim {
        Some(Dim::Fixed(n)) if *n != want => Err(invalid(
            at,
            format!("{field} gives {want}, but the model input has {n} there"),
        )),
        _ => Ok(()),
    }
}

impl Pipeline {
    /// One line per raw input and per output, for people (`capsule build`, `capsule inspect`).
    pub fn describe(&self) -> Vec<String> {
        let mut lines = Vec::new();
        for raw in &self.inputs {
            let targets = raw.model_inputs().join(", ");
            let what = match raw.kind() {
                Ok(RawKind::Image(i)) => {
                    let mut steps = vec![format!("{:?}", i.color).to_lowercase()];
                    if let Some(r) = &i.resize {
                        let size = match (r.width, r.height, r.shorter_side) {
                            (Some(w), Some(h), _) => format!("{w}x{h}"),
                            (_, _, Some(s)) => format!("shorter side {s}"),
                            _ => "?".into(),
                        };
                        steps.push(format!("resize {size} {:?}", r.filter).to_lowercase());
                    }
                    if let Some(c) = &i.center_crop {
                        steps.push(format!("center crop {}x{}", c.width, c.height));
                    }
                    steps.push(format!("scale {}", i.scale));
                    if !i.mean.is_empty() || !i.std.is_empty() {
                        steps.push(format!("mean {:?} std {:?}", i.mean, i.std));
                    }
                    steps.push(format!("{:?}", i.layout).to_uppercase());
                    format!("image (PNG/JPEG): {}", steps.join(", "))
                }
                Ok(RawKind::Tabular(t)) => format!(
                    "records (JSON): {} fields, {} features",
                    t.fields.len(),
                    t.width()
                ),
                Ok(RawKind::Text(t)) => format!(
                    "text: WordPiece, {} tokens{}, max_length {} ({:?} padding)",
                    t.tokens.len(),
                    if t.lowercase { ", lowercase" } else { "" },
                    t.max_length,
                    t.padding
                )
                .to_lowercase(),
                Err(e) => e.to_string(),
            };
            lines.push(format!("{} -> {targets}: {what}", raw.name));
        }
        for o in &self.outputs {
            let steps: Vec<String> = o
                .steps
                .iter()
                .map(|step| match step {
                    PostOp::TopK { k } | PostOp::TopKScores { k } => {
                        format!("{}({k})", step.name())
                    }
                    PostOp::Threshold { value } => format!("threshold({value})"),
                    PostOp::MeanPool { mask } => format!("mean_pool({mask})"),
                    other => other.name().to_owned(),
                })
                .collect();
            let steps = if steps.is_empty() {
                "unchanged".to_owned()
            } else {
                steps.join(", ")
            };
            lines.push(format!("{} <- {}: {steps}", o.name, o.source()));
        }
        lines
    }

    /// Whether the pipeline changes nothing.
    pub fn is_empty(&self) -> bool {
        self.inputs.is_empty() && self.outputs.is_empty()
    }

    /// Validates the pipeline against the model's signature and the capsule's labels, and
    /// resolves defaults (`feeds`). Returns the resolved pipeline and the signature requests
    /// and responses follow.
    pub fn resolve(
        &self,
        model_inputs: &[TensorSpec],
        model_outputs: &[TensorSpec],
        labels: &[String],
    ) -> Result<(Pipeline, Signature)> {
        let mut resolved = self.clone();
        let mut fed: Vec<&str> = Vec::new();
        let mut raw_specs = Vec::with_capacity(self.inputs.len());
        for (raw, out) in self.inputs.iter().zip(resolved.inputs.iter_mut()) {
            let at = format!("input {:?}", raw.name);
            if raw.name.is_empty() {
                return Err(invalid("input", "`name` is empty"));
            }
            if self.inputs.iter().filter(|r| r.name == raw.name).count() > 1 {
                return Err(invalid(at, "`name` is used twice"));
            }
            let kind = raw.kind()?;
            if !matches!(kind, RawKind::Text(_)) && raw.feeds.is_none() {
                let feeds = if model_inputs.iter().any(|m| m.name == raw.name) {
                    raw.name.clone()
                } else if model_inputs.len() == 1 {
                    model_inputs[0].name.clone()
                } else {
                    return Err(invalid(
                        at,
                        format!(
                            "`feeds`: say which model input this produces (the model has {:?})",
                            model_inputs.iter().map(|m| &m.name).collect::<Vec<_>>()
                        ),
                    ));
                };
                out.feeds = Some(feeds);
            }
            if matches!(kind, RawKind::Text(_)) && raw.feeds.is_some() {
                return Err(invalid(
                    at,
                    "`feeds` does not apply to text: name the model inputs with `input_ids`, `attention_mask`, `token_type_ids`",
                ));
            }
            let targets = out.model_inputs();
            let mut batch = None;
            for target in &targets {
                let Some(spec) = model_inputs.iter().find(|m| m.name == *target) else {
                    return Err(invalid(
                        at,
                        format!(
                            "model input {target:?} does not exist (the model has {:?})",
                            model_inputs.iter().map(|m| &m.name).collect::<Vec<_>>()
                        ),
                    ));
                };
                if fed.contains(target) {
                    return Err(invalid(
                        at,
                        format!("model input {target:?} is fed by two raw inputs"),
                    ));
                }
                fed.push(target);
                batch.get_or_insert_with(|| batch_dim(spec));
                match kind {
                    RawKind::Image(image) => check_image(&at, image, spec)?,
                    RawKind::Tabular(tab) => check_tabular(&at, tab, spec)?,
                    RawKind::Text(text) => check_text(&at, text, spec)?,
                }
            }
            raw_specs.push(TensorSpec {
                name: raw.name.clone(),
                dtype: DType::Bytes,
                shape: vec![batch.unwrap_or(Dim::Symbolic("N".into()))],
            });
        }
        let mut inputs: Vec<TensorSpec> = model_inputs
            .iter()
            .filter(|m| !fed.contains(&m.name.as_str()))
            .cloned()
            .collect();
        for r in &raw_specs {
            if inputs.iter().any(|i| i.name == r.name) {
                return Err(invalid(
                    format!("input {:?}", r.name),
                    "`name` clashes with a model input taken as a tensor",
                ));
            }
        }
        inputs.extend(raw_specs);

        let outputs = if self.outputs.is_empty() {
            model_outputs.to_vec()
        } else {
            let mut outputs = Vec::with_capacity(self.outputs.len());
            for o in &self.outputs {
                let at = format!("output {:?}", o.name);
                if o.name.is_empty() {
                    return Err(invalid("output", "`name` is empty"));
                }
                if self.outputs.iter().filter(|x| x.name == o.name).count() > 1 {
                    return Err(invalid(at, "`name` is used twice"));
                }
                let Some(source) = model_outputs.iter().find(|m| m.name == o.source()) else {
                    return Err(invalid(
                        at,
                        format!(
                            "`from`: model output {:?} does not exist (the model has {:?})",
                            o.source(),
                            model_outputs.iter().map(|m| &m.name).collect::<Vec<_>>()
                        ),
                    ));
                };
                let mut spec = source.clone();
                for (i, step) in o.steps.iter().enumerate() {
                    let at = format!("output {:?} step {} ({})", o.name, i + 1, step.name());
                    spec = post_signature(&at, step, spec, model_inputs, labels)?;
                }
                spec.name = o.name.clone();
                outputs.push(spec);
            }
            outputs
        };
        Ok((resolved, Signature { inputs, outputs }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, dtype: DType, shape: &[Dim]) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            dtype,
            shape: shape.to_vec(),
        }
    }

    fn n() -> Dim {
        Dim::Symbolic("N".into())
    }

    fn image_pipeline() -> Pipeline {
        toml::from_str(
            r#"
            [[input]]
            name = "png"
            [input.image]
            color = "gray"
            resize = { width = 28, height = 28 }
            mean = [0.5]
            std = [0.25]

            [[output]]
            name = "label"
            from = "logits"
            steps = ["softmax", { top_k = { k = 2 } }, "labels"]
            "#,
        )
        .unwrap()
    }

    fn cnn() -> (Vec<TensorSpec>, Vec<TensorSpec>) {
        (
            vec![t(
                "x",
                DType::F32,
                &[n(), Dim::Fixed(1), Dim::Fixed(28), Dim::Fixed(28)],
            )],
            vec![t("logits", DType::F32, &[n(), Dim::Fixed(10)])],
        )
    }

    #[test]
    fn resolves_an_image_pipeline() {
        let (i, o) = cnn();
        let labels: Vec<String> = (0..10).map(|d| d.to_string()).collect();
        let (resolved, sig) = image_pipeline().resolve(&i, &o, &labels).unwrap();
        assert_eq!(resolved.inputs[0].feeds.as_deref(), Some("x"));
        assert_eq!(sig.inputs, vec![t("png", DType::Bytes, &[n()])]);
        assert_eq!(
            sig.outputs,
            vec![t("label", DType::Bytes, &[n(), Dim::Fixed(2)])]
        );
        // The stored form decodes to the same pipeline.
        let bytes = crate::wire::encode(&resolved, "pipeline").unwrap();
        assert_eq!(
            crate::wire::decode::<Pipeline>(&bytes, "pipeline").unwrap(),
            resolved
        );
    }

    #[test]
    fn errors_name_the_step_and_the_field() {
        let (i, o) = cnn();
        let err =
            |p: &Pipeline, labels: &[String]| p.resolve(&i, &o, labels).unwrap_err().to_string();
        let p = image_pipeline();
        assert_eq!(
            err(&p, &[]),
            "invalid pipeline: output \"label\" step 3 (labels): the capsule has no labels (build with --labels)"
        );
        let mut q = p.clone();
        q.inputs[0]
            .image
            .as_mut()
            .unwrap()
            .resize
            .as_mut()
            .unwrap()
            .width = Some(32);
        assert_eq!(
            err(&q, &[]),
            "invalid pipeline: input \"png\": the width gives 32, but the model input has 28 there"
        );
        let mut q = p.clone();
        q.inputs[0].image.as_mut().unwrap().color = ColorMode::Rgb;
        assert_eq!(
            err(&q, &[]),
            "invalid pipeline: input \"png\": `color` gives 3, but the model input has 1 there"
        );
        let mut q = p.clone();
        q.outputs[0].steps[1] = PostOp::TopK { k: 11 };
        assert_eq!(
            err(&q, &["a".into()]),
            "invalid pipeline: output \"label\" step 2 (top_k): `k` is 11, but the last axis has 10 values"
        );
        let mut q = p.clone();
        q.outputs[0].from = Some("nope".into());
        assert_eq!(
            err(&q, &[]),
            "invalid pipeline: output \"label\": `from`: model output \"nope\" does not exist (the model has [\"logits\"])"
        );
        let mut q = p;
        q.inputs[0].text = Some(toml::from_str("").unwrap());
        assert_eq!(
            err(&q, &[]),
            "invalid pipeline: input \"png\": set exactly one of `image`, `tabular`, `text`"
        );
    }

    #[test]
    fn tabular_fields_are_checked() {
        let inputs = vec![t("x", DType::F32, &[n(), Dim::Fixed(3)])];
        let outputs = vec![t("y", DType::I64, &[n()])];
        let p: Pipeline = toml::from_str(
            r#"
            [[input]]
            name = "record"
            [[input.tabular.fields]]
            name = "age"
            impute = "mean"
            fill = 40.0
            scale = "standard"
            mean = 41.5
            std = 9.0
            [[input.tabular.fields]]
            name = "color"
            type = "category"
            categories = ["red"]
            "#,
        )
        .unwrap();
        let (_, sig) = p.resolve(&inputs, &outputs, &[]).unwrap();
        assert_eq!(sig.inputs, vec![t("record", DType::Bytes, &[n()])]);
        let mut q = p.clone();
        q.inputs[0].tabular.as_mut().unwrap().fields[0].std = Some(0.0);
        assert_eq!(
            q.resolve(&inputs, &outputs, &[]).unwrap_err().to_string(),
            "invalid pipeline: input \"record\" field \"age\": `std` must be positive"
        );
        let mut q = p;
        q.inputs[0].tabular.as_mut().unwrap().fields[1].unknown = Unknown::Error;
        assert_eq!(
            q.resolve(&inputs, &outputs, &[]).unwrap_err().to_string(),
            "invalid pipeline: input \"record\": the fields' width gives 2, but the model input has 3 there"
        );
    }
}
