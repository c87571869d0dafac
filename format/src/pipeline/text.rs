//! Text inputs: WordPiece tokenization settings and their checks against the model
//! inputs.

use super::*;

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

pub(super) fn yes() -> bool {
    true
}
pub(super) fn default_max_length() -> u32 {
    128
}
pub(super) fn default_cls() -> String {
    "[CLS]".into()
}
pub(super) fn default_sep() -> String {
    "[SEP]".into()
}
pub(super) fn default_pad() -> String {
    "[PAD]".into()
}
pub(super) fn default_unk() -> String {
    "[UNK]".into()
}
pub(super) fn default_prefix() -> String {
    "##".into()
}
pub(super) fn default_max_chars_per_word() -> u32 {
    100
}
pub(super) fn default_text_max_bytes() -> u64 {
    4 << 20
}
pub(super) fn default_input_ids() -> String {
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

pub(super) fn check_text(at: &str, text: &TextSpec, spec: &TensorSpec) -> Result<()> {
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
