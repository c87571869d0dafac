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

/// Channel order of the model's image input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColorMode {
    /// One channel, ITU-R 601-2 luma as Pillow's `convert("L")` computes it.
    Gray,
    /// Red, green, blue.
    #[default]
    Rgb,
    /// Blue, green, red (OpenCV's order).
    Bgr,
}

impl ColorMode {
    /// Number of channels.
    pub fn channels(self) -> u64 {
        match self {
            ColorMode::Gray => 1,
            ColorMode::Rgb | ColorMode::Bgr => 3,
        }
    }
}

/// Memory layout of the model's image input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `[N, C, H, W]` (PyTorch).
    #[default]
    Nchw,
    /// `[N, H, W, C]` (TensorFlow).
    Nhwc,
}

/// Resampling filter, named after Pillow's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// Nearest neighbour.
    Nearest,
    /// Triangle filter, antialiased when shrinking (Pillow `BILINEAR`).
    #[default]
    Bilinear,
    /// Cubic convolution with a = -0.5 (Pillow `BICUBIC`).
    Bicubic,
    /// Lanczos with a = 3 (Pillow `LANCZOS`).
    Lanczos3,
}

/// A resize: either to an exact size, or so that the shorter side has a length (aspect
/// ratio kept, then usually a center crop).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    /// Output width (with `height`).
    #[serde(default)]
    pub width: Option<u32>,
    /// Output height (with `width`).
    #[serde(default)]
    pub height: Option<u32>,
    /// Length of the shorter side (instead of `width`/`height`).
    #[serde(default)]
    pub shorter_side: Option<u32>,
    /// Filter.
    #[serde(default)]
    pub filter: Filter,
}

/// A width and height.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Size {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

fn default_scale() -> f32 {
    1.0 / 255.0
}
fn default_image_max_bytes() -> u64 {
    16 << 20
}
fn default_max_pixels() -> u64 {
    1 << 24
}

/// Decode, resize, crop, convert and normalize encoded images (PNG, JPEG). The V2 input is
/// `BYTES [N]`, one encoded image per element; the model input gets `N` images.
///
/// Per pixel and channel: `(value * scale - mean[c]) / std[c]`, `value` in 0..=255.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Channel order.
    #[serde(default)]
    pub color: ColorMode,
    /// Layout of the model input.
    #[serde(default)]
    pub layout: Layout,
    /// Resize (none: every image must already have the model's size).
    #[serde(default)]
    pub resize: Option<Resize>,
    /// Center crop after the resize.
    #[serde(default)]
    pub center_crop: Option<Size>,
    /// Multiplier applied to 0..=255 values (default 1/255).
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// Per-channel mean subtracted after scaling (one value, or one per channel).
    #[serde(default)]
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by (one value, or one per channel).
    #[serde(default)]
    pub std: Vec<f32>,
    /// Largest encoded image accepted, in bytes (default 16 MiB).
    #[serde(default = "default_image_max_bytes")]
    pub max_bytes: u64,
    /// Largest decoded image accepted, in pixels (default 16 Mi): a decompression bomb is
    /// refused from its header, before any pixel is decoded.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
}

/// The kind of a tabular field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    /// A JSON number.
    #[default]
    Number,
    /// A JSON boolean (or 0/1), as 0.0/1.0.
    Boolean,
    /// A JSON string from `categories`, one-hot encoded.
    Category,
}

/// How a missing value (absent, `null`, `NaN`) is filled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Impute {
    /// A missing value is an error naming the field.
    #[default]
    None,
    /// The training mean (fitted into `fill`).
    Mean,
    /// The training median (fitted into `fill`).
    Median,
    /// The constant in `fill`.
    Constant,
    /// The most frequent training category (fitted into `fill_category`).
    MostFrequent,
}

/// Scaling of a numeric field, after imputation and clipping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scaling {
    /// Unchanged.
    #[default]
    None,
    /// `(x - mean) / std` (scikit-learn `StandardScaler`, population std; 1 when 0).
    Standard,
    /// `(x - min) / (max - min)` (scikit-learn `MinMaxScaler`; range 1 when 0).
    MinMax,
}

/// What a category outside `categories` becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unknown {
    /// An extra one-hot column after the known categories.
    #[default]
    Bucket,
    /// An error naming the field and the value.
    Error,
}

/// One named field of a tabular record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// The record key.
    pub name: String,
    /// Its kind.
    #[serde(default, rename = "type")]
    pub kind: FieldKind,
    /// Missing-value policy.
    #[serde(default)]
    pub impute: Impute,
    /// The value a missing number becomes (fitted for `mean`/`median`).
    #[serde(default)]
    pub fill: Option<f64>,
    /// The value a missing category becomes (fitted for `most_frequent`, or a constant).
    #[serde(default)]
    pub fill_category: Option<String>,
    /// `[low, high]` bounds applied after imputation.
    #[serde(default)]
    pub clip: Option<[f64; 2]>,
    /// Scaling.
    #[serde(default)]
    pub scale: Scaling,
    /// Fitted mean (standard scaling).
    #[serde(default)]
    pub mean: Option<f64>,
    /// Fitted standard deviation (standard scaling).
    #[serde(default)]
    pub std: Option<f64>,
    /// Fitted minimum (min-max scaling).
    #[serde(default)]
    pub min: Option<f64>,
    /// Fitted maximum (min-max scaling).
    #[serde(default)]
    pub max: Option<f64>,
    /// Known categories, in one-hot column order.
    #[serde(default)]
    pub categories: Vec<String>,
    /// What an unknown category becomes.
    #[serde(default)]
    pub unknown: Unknown,
}

impl Field {
    /// Number of model features this field produces.
    pub fn width(&self) -> usize {
        match self.kind {
            FieldKind::Category => {
                self.categories.len() + usize::from(self.unknown == Unknown::Bucket)
            }
            FieldKind::Number | FieldKind::Boolean => 1,
        }
    }
}

fn default_record_max_bytes() -> u64 {
    1 << 20
}

/// JSON records to a feature matrix `[N, F]`, features in field order. The V2 input is
/// `BYTES [N]`, each element a JSON object (one record) or a JSON array of objects. Keys
/// that are not fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TabularSpec {
    /// The fields, in feature order.
    pub fields: Vec<Field>,
    /// Largest JSON element accepted, in bytes (default 1 MiB).
    #[serde(default = "default_record_max_bytes")]
    pub max_bytes: u64,
}

impl TabularSpec {
    /// Number of features of one record.
    pub fn width(&self) -> usize {
        self.fields.iter().map(Field::width).sum()
    }
}

/// Padding of token sequences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// Every sequence is padded to `max_length`.
    #[default]
    MaxLength,
    /// Sequences are padded to the longest one of the request.
    Longest,
}

fn yes() -> bool {
    true
}
fn default_max_length() -> u32 {
    128
}
fn default_cls() -> String {
    "[CLS]".into()
}
fn default_sep() -> String {
    "[SEP]".into()
}
fn default_pad() -> String {
    "[PAD]".into()
}
fn default_unk() -> String {
    "[UNK]".into()
}
fn default_prefix() -> String {
    "##".into()
}
fn default_max_chars_per_word() -> u32 {
    100
}
fn default_text_max_bytes() -> u64 {
    4 << 20
}
fn default_input_ids() -> String {
    "input_ids".into()
}

/// BERT WordPiece tokenization (Hugging Face `BertNormalizer` + `BertPreTokenizer` +
/// `WordPiece` + `[CLS] … [SEP]`). The V2 input is `BYTES [N]`, one UTF-8 text per
/// element. Text past `max_length - 2` tokens is truncated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextSpec {
    /// Where the vocabulary came from (`vocab.txt` or `tokenizer.json`, relative to the
    /// spec); the builder reads it into `tokens`.
    #[serde(default)]
    pub vocab: Option<String>,
    /// The vocabulary, token id order.
    #[serde(default)]
    pub tokens: Vec<String>,
    /// Lowercase the text.
    #[serde(default = "yes")]
    pub lowercase: bool,
    /// Remove accents (default: as `lowercase`).
    #[serde(default)]
    pub strip_accents: Option<bool>,
    /// Drop control characters and map whitespace to spaces.
    #[serde(default = "yes")]
    pub clean_text: bool,
    /// Put spaces around CJK ideographs.
    #[serde(default = "yes")]
    pub handle_chinese_chars: bool,
    /// Sequence length, special tokens included (default 128).
    #[serde(default = "default_max_length")]
    pub max_length: u32,
    /// Padding.
    #[serde(default)]
    pub padding: Padding,
    /// Model input of the token ids (default `input_ids`).
    #[serde(default = "default_input_ids")]
    pub input_ids: String,
    /// Model input of the attention mask, if the model has one.
    #[serde(default)]
    pub attention_mask: Option<String>,
    /// Model input of the token type ids (all 0), if the model has one.
    #[serde(default)]
    pub token_type_ids: Option<String>,
    /// Classification token.
    #[serde(default = "default_cls")]
    pub cls_token: String,
    /// Separator token.
    #[serde(default = "default_sep")]
    pub sep_token: String,
    /// Padding token.
    #[serde(default = "default_pad")]
    pub pad_token: String,
    /// Unknown-word token.
    #[serde(default = "default_unk")]
    pub unk_token: String,
    /// Tokens matched in the raw text before normalization and kept whole, as Hugging Face
    /// `tokenizers` does with a tokenizer's special tokens (default: `[PAD]`, `[UNK]`,
    /// `[CLS]`, `[SEP]`, `[MASK]`, those of them in the vocabulary).
    #[serde(default)]
    pub special_tokens: Option<Vec<String>>,
    /// Prefix of word continuations.
    #[serde(default = "default_prefix")]
    pub continuing_subword_prefix: String,
    /// Words longer than this (in characters) become `unk_token`.
    #[serde(default = "default_max_chars_per_word")]
    pub max_input_chars_per_word: u32,
    /// Largest text accepted, in bytes (default 4 MiB).
    #[serde(default = "default_text_max_bytes")]
    pub max_bytes: u64,
}

impl TextSpec {
    /// Whether accents are stripped.
    pub fn strips_accents(&self) -> bool {
        self.strip_accents.unwrap_or(self.lowercase)
    }

    /// The special tokens matched in raw text.
    pub fn special_tokens(&self) -> Vec<&str> {
        match &self.special_tokens {
            Some(list) => list.iter().map(String::as_str).collect(),
            None => ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
                .into_iter()
                .filter(|t| self.tokens.iter().any(|v| v == t))
                .collect(),
        }
    }
}

/// One postprocessing step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostOp {
    /// Softmax over the last axis.
    Softmax,
    /// Index of the largest value of the last axis (the first one on ties): `INT64`,
    /// last axis removed.
    Argmax,
    /// Indices of the `k` largest values of the last axis, largest first (lower index
    /// first on ties): `INT64`, last axis `k`.
    TopK {
        /// How many.
        k: u32,
    },
    /// The `k` largest values of the last axis, largest first.
    TopKScores {
        /// How many.
        k: u32,
    },
    /// Class indices to the capsule's labels: `BYTES`.
    Labels,
    /// `value >= threshold`: `BOOL`.
    Threshold {
        /// The threshold.
        value: f32,
    },
    /// Mean over the sequence axis of `[N, T, D]`, weighted by a `[N, T]` attention mask
    /// (a model input): `[N, D]`.
    MeanPool {
        /// The model input holding the mask.
        mask: String,
    },
    /// Divides the last axis by its L2 norm (kept when the norm is below 1e-12).
    L2Normalize,
}

impl PostOp {
    /// The step's name in the spec.
    pub fn name(&self) -> &'static str {
        match self {
            PostOp::Softmax => "softmax",
            PostOp::Argmax => "argmax",
            PostOp::TopK { .. } => "top_k",
            PostOp::TopKScores { .. } => "top_k_scores",
            PostOp::Labels => "labels",
            PostOp::Threshold { .. } => "threshold",
            PostOp::MeanPool { .. } => "mean_pool",
            PostOp::L2Normalize => "l2_normalize",
        }
    }
}

/// One output of the capsule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The V2 output name.
    pub name: String,
    /// The model output it is computed from (default: `name`).
    #[serde(default)]
    pub from: Option<String>,
    /// Steps, in order.
    #[serde(default)]
    pub steps: Vec<PostOp>,
}

impl OutputSpec {
    /// The model output this output is computed from.
    pub fn source(&self) -> &str {
        self.from.as_deref().unwrap_or(&self.name)
    }
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

fn invalid(at: impl Into<String>, reason: impl Into<String>) -> Error {
    Error::InvalidPipeline {
        at: at.into(),
        reason: reason.into(),
    }
}

fn batch_dim(spec: &TensorSpec) -> Dim {
    spec.shape
        .first()
        .cloned()
        .unwrap_or(Dim::Symbolic("N".into()))
}

fn check_fixed(at: &str, field: &str, dim: Option<&Dim>, want: u64) -> Result<()> {
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

fn check_image(at: &str, image: &ImageSpec, spec: &TensorSpec) -> Result<()> {
    if !matches!(spec.dtype, DType::F32) {
        return Err(invalid(
            at,
            format!(
                "the model input {:?} is {}, images need FP32",
                spec.name, spec.dtype
            ),
        ));
    }
    if spec.shape.len() != 4 {
        return Err(invalid(
            at,
            format!(
                "the model input {:?} has rank {}, images need rank 4",
                spec.name,
                spec.shape.len()
            ),
        ));
    }
    let channels = image.color.channels();
    for (field, values) in [("mean", &image.mean), ("std", &image.std)] {
        if !(values.is_empty() || values.len() == 1 || values.len() as u64 == channels) {
            return Err(invalid(
                at,
                format!(
                    "`{field}` has {} values; give 1 or {channels}",
                    values.len()
                ),
            ));
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(invalid(
                at,
                format!("`{field}` has a value that is not finite"),
            ));
        }
    }
    if image.std.contains(&0.0) {
        return Err(invalid(at, "`std` has a zero"));
    }
    if !image.scale.is_finite() {
        return Err(invalid(at, "`scale` is not finite"));
    }
    if image.max_bytes == 0 || image.max_pixels == 0 {
        return Err(invalid(at, "`max_bytes` and `max_pixels` must be positive"));
    }
    let side = |field: &str, v: u32| {
        if v == 0 || v > MAX_IMAGE_SIDE {
            Err(invalid(
                at,
                format!("`{field}` must be in 1..={MAX_IMAGE_SIDE}, not {v}"),
            ))
        } else {
            Ok(u64::from(v))
        }
    };
    let mut size = None;
    if let Some(r) = &image.resize {
        size = match (r.width, r.height, r.shorter_side) {
            (Some(w), Some(h), None) => Some((side("resize.width", w)?, side("resize.height", h)?)),
            (None, None, Some(s)) => {
                side("resize.shorter_side", s)?;
                None
            }
            _ => {
                return Err(invalid(
                    at,
                    "`resize`: give `width` and `height`, or `shorter_side` alone",
                ));
            }
        };
    }
    if let Some(c) = &image.center_crop {
        size = Some((
            side("center_crop.width", c.width)?,
            side("center_crop.height", c.height)?,
        ));
    } else if image
        .resize
        .as_ref()
        .is_some_and(|r| r.shorter_side.is_some())
    {
        return Err(invalid(
            at,
            "`resize.shorter_side` keeps the aspect ratio: add a `center_crop` so every image gets one size",
        ));
    }
    let (c_axis, h_axis, w_axis) = match image.layout {
        Layout::Nchw => (1, 2, 3),
        Layout::Nhwc => (3, 1, 2),
    };
    check_fixed(at, "`color`", spec.shape.get(c_axis), channels)?;
    if let Some((w, h)) = size {
        check_fixed(at, "the height", spec.shape.get(h_axis), h)?;
        check_fixed(at, "the width", spec.shape.get(w_axis), w)?;
    } else if !matches!(spec.shape.get(h_axis), Some(Dim::Fixed(_)))
        || !matches!(spec.shape.get(w_axis), Some(Dim::Fixed(_)))
    {
        return Err(invalid(
            at,
            "the model input's height and width are not fixed: add a `resize` (or `center_crop`)",
        ));
    }
    Ok(())
}

fn check_tabular(at: &str, tab: &TabularSpec, spec: &TensorSpec) -> Result<()> {
    if !matches!(spec.dtype, DType::F32 | DType::F64) {
        return Err(invalid(
            at,
            format!(
                "the model input {:?} is {}, records need FP32 or FP64",
                spec.name, spec.dtype
            ),
        ));
    }
    if spec.shape.len() != 2 {
        return Err(invalid(
            at,
            format!(
                "the model input {:?} has rank {}, records need rank 2",
                spec.name,
                spec.shape.len()
            ),
        ));
    }
    if tab.fields.is_empty() {
        return Err(invalid(at, "`fields` is empty"));
    }
    if tab.max_bytes == 0 {
        return Err(invalid(at, "`max_bytes` must be positive"));
    }
    for f in &tab.fields {
        let at = format!("{at} field {:?}", f.name);
        if tab.fields.iter().filter(|g| g.name == f.name).count() > 1 {
            return Err(invalid(at, "the field is declared twice"));
        }
        let finite = |name: &str, v: Option<f64>| match v {
            Some(x) if !x.is_finite() => Err(invalid(&at, format!("`{name}` is not finite"))),
            _ => Ok(()),
        };
        for (name, v) in [
            ("fill", f.fill),
            ("mean", f.mean),
            ("std", f.std),
            ("min", f.min),
            ("max", f.max),
        ] {
            finite(name, v)?;
        }
        match f.kind {
            FieldKind::Category => {
                if f.categories.is_empty() {
                    return Err(invalid(at, "`categories` is empty"));
                }
                if f.scale != Scaling::None || f.clip.is_some() {
                    return Err(invalid(at, "`scale` and `clip` do not apply to a category"));
                }
                match f.impute {
                    Impute::None => {}
                    Impute::MostFrequent | Impute::Constant => match &f.fill_category {
                        Some(c) if f.categories.contains(c) => {}
                        Some(c) => {
                            return Err(invalid(
                                at,
                                format!("`fill_category` {c:?} is not one of `categories`"),
                            ));
                        }
                        None => {
                            return Err(invalid(
                                at,
                                "`fill_category` is missing (fit the spec, or set it)",
                            ));
                        }
                    },
                    Impute::Mean | Impute::Median => {
                        return Err(invalid(
                            at,
                            "`impute`: a category takes `most_frequent` or `constant`",
                        ));
                    }
                }
            }
            FieldKind::Number | FieldKind::Boolean => {
                if !f.categories.is_empty() || f.fill_category.is_some() {
                    return Err(invalid(
                        at,
                        "`categories` and `fill_category` apply to categories only",
                    ));
                }
                match f.impute {
                    Impute::None => {}
                    Impute::MostFrequent => {
                        return Err(invalid(
                            at,
                            "`impute`: `most_frequent` applies to categories",
                        ));
                    }
                    Impute::Mean | Impute::Median | Impute::Constant => {
                        if f.fill.is_none() {
                            return Err(invalid(at, "`fill` is missing (fit the spec, or set it)"));
                        }
                    }
                }
                if let Some([lo, hi]) = f.clip
                    && !(lo.is_finite() && hi.is_finite() && lo <= hi)
                {
                    return Err(invalid(at, "`clip` must be [low, high] with low <= high"));
                }
                match f.scale {
                    Scaling::None => {}
                    Scaling::Standard => match (f.mean, f.std) {
                        (Some(_), Some(s)) if s > 0.0 => {}
                        (Some(_), Some(_)) => return Err(invalid(at, "`std` must be positive")),
                        _ => {
                            return Err(invalid(at, "`mean` and `std` are missing (fit the spec)"));
                        }
                    },
                    Scaling::MinMax => match (f.min, f.max) {
                        (Some(lo), Some(hi)) if lo <= hi => {}
                        (Some(_), Some(_)) => return Err(invalid(at, "`min` is above `max`")),
                        _ => return Err(invalid(at, "`min` and `max` are missing (fit the spec)")),
                    },
                }
            }
        }
    }
    check_fixed(
        at,
        "the fields' width",
        spec.shape.get(1),
        tab.width() as u64,
    )
}

fn check_text(at: &str, text: &TextSpec, spec: &TensorSpec) -> Result<()> {
    if !matches!(spec.dtype, DType::I64 | DType::I32) {
        return Err(invalid(
            at,
            format!(
                "the model input {:?} is {}, token ids need INT64 or INT32",
                spec.name, spec.dtype
            ),
        ));
    }
    if spec.shape.len() != 2 {
        return Err(invalid(
            at,
            format!(
                "the model input {:?} has rank {}, token ids need rank 2",
                spec.name,
                spec.shape.len()
            ),
        ));
    }
    if text.tokens.is_empty() {
        return Err(invalid(at, "the vocabulary is empty (set `vocab`)"));
    }
    if text.tokens.len() > MAX_VOCAB_TOKENS {
        return Err(invalid(
            at,
            format!(
                "the vocabulary has {} tokens, over {MAX_VOCAB_TOKENS}",
                text.tokens.len()
            ),
        ));
    }
    if text.max_length < 2 || text.max_length > MAX_SEQUENCE_LENGTH {
        return Err(invalid(
            at,
            format!("`max_length` must be in 2..={MAX_SEQUENCE_LENGTH}"),
        ));
    }
    if text.max_bytes == 0 || text.max_input_chars_per_word == 0 {
        return Err(invalid(
            at,
            "`max_bytes` and `max_input_chars_per_word` must be positive",
        ));
    }
    for token in text.special_tokens.iter().flatten() {
        if token.is_empty() || !text.tokens.contains(token) {
            return Err(invalid(
                at,
                format!("`special_tokens`: {token:?} is not in the vocabulary"),
            ));
        }
    }
    for (field, token) in [
        ("cls_token", &text.cls_token),
        ("sep_token", &text.sep_token),
        ("pad_token", &text.pad_token),
        ("unk_token", &text.unk_token),
    ] {
        if !text.tokens.contains(token) {
            return Err(invalid(
                at,
                format!("`{field}` {token:?} is not in the vocabulary"),
            ));
        }
    }
    if text.padding == Padding::MaxLength {
        check_fixed(
            at,
            "`max_length`",
            spec.shape.get(1),
            u64::from(text.max_length),
        )?;
    } else if matches!(spec.shape.get(1), Some(Dim::Fixed(_))) {
        return Err(invalid(
            at,
            "`padding = \"longest\"` needs a model whose sequence axis is not fixed",
        ));
    }
    Ok(())
}

fn post_signature(
    at: &str,
    step: &PostOp,
    mut spec: TensorSpec,
    model_inputs: &[TensorSpec],
    labels: &[String],
) -> Result<TensorSpec> {
    let numeric = !matches!(spec.dtype, DType::Bytes | DType::Bool);
    let float = matches!(spec.dtype, DType::F32 | DType::F64 | DType::F16);
    let need = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(invalid(at, format!("needs {what}, got {}", spec.dtype)))
        }
    };
    let last_axis = |spec: &TensorSpec| {
        if spec.shape.is_empty() {
            Err(invalid(at, "needs a tensor of rank 1 or more"))
        } else {
            Ok(spec.shape.len() - 1)
        }
    };
    match step {
        PostOp::Softmax | PostOp::L2Normalize => {
            need(float, "a floating-point tensor")?;
            last_axis(&spec)?;
            spec.dtype = DType::F32;
        }
        PostOp::Argmax => {
            need(numeric, "a numeric tensor")?;
            let axis = last_axis(&spec)?;
            spec.shape.truncate(axis);
            spec.dtype = DType::I64;
        }
        PostOp::TopK { k } | PostOp::TopKScores { k } => {
            need(numeric, "a numeric tensor")?;
            let axis = last_axis(&spec)?;
            if *k == 0 || *k > MAX_TOP_K {
                return Err(invalid(at, format!("`k` must be in 1..={MAX_TOP_K}")));
            }
            if let Dim::Fixed(n) = spec.shape[axis]
                && u64::from(*k) > n
            {
                return Err(invalid(
                    at,
                    format!("`k` is {k}, but the last axis has {n} values"),
                ));
            }
            spec.shape[axis] = Dim::Fixed(u64::from(*k));
            spec.dtype = if matches!(step, PostOp::TopK { .. }) {
                DType::I64
            } else {
                DType::F32
            };
        }
        PostOp::Labels => {
            need(
                matches!(
                    spec.dtype,
                    DType::I64
                        | DType::I32
                        | DType::U8
                        | DType::U16
                        | DType::U32
                        | DType::U64
                        | DType::I8
                        | DType::I16
                ),
                "an integer tensor (class indices)",
            )?;
            if labels.is_empty() {
                return Err(invalid(
                    at,
                    "the capsule has no labels (build with --labels)",
                ));
            }
            spec.dtype = DType::Bytes;
        }
        PostOp::Threshold { value } => {
            need(numeric, "a numeric tensor")?;
            if !value.is_finite() {
                return Err(invalid(at, "`value` is not finite"));
            }
            spec.dtype = DType::Bool;
        }
        PostOp::MeanPool { mask } => {
            need(float, "a floating-point tensor")?;
            if spec.shape.len() != 3 {
                return Err(invalid(
                    at,
                    format!("needs [N, T, D], got rank {}", spec.shape.len()),
                ));
            }
            let Some(m) = model_inputs.iter().find(|m| &m.name == mask) else {
                return Err(invalid(
                    at,
                    format!("`mask`: model input {mask:?} does not exist"),
                ));
            };
            if m.shape.len() != 2 {
                return Err(invalid(
                    at,
                    format!("`mask`: model input {mask:?} is not [N, T]"),
                ));
            }
            spec.shape.remove(1);
            spec.dtype = DType::F32;
        }
    }
    Ok(spec)
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
