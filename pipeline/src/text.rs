//! BERT WordPiece tokenization, step for step as Hugging Face `tokenizers` does it
//! (`BertNormalizer`, `BertPreTokenizer`, `WordPiece`, `TemplateProcessing` for
//! `[CLS] A [SEP]`), with the same Unicode tables (`unicode_categories`,
//! `unicode-normalization-alignments`).
//!
//! The `tokenizers` crate itself cannot be used in the guest: it depends on `getrandom`,
//! which needs JavaScript imports on `wasm32-unknown-unknown`, and a capsule has no imports.
//! The token ids are tested equal to `tokenizers`' on a corpus (tests/fixtures/text).

use std::collections::HashMap;

use capsule_format::pipeline::{Padding, TextSpec};
use capsule_format::{DType, NamedTensor, Tensor, TensorSpec};
use unicode_categories::UnicodeCategories;
use unicode_normalization_alignments::UnicodeNormalization;

use crate::{Error, Result, bad_input, element_error};

/// A WordPiece tokenizer: normalization, pre-tokenization and greedy longest-match-first
/// subwords over a vocabulary.
#[derive(Debug, Clone)]
pub struct WordPiece {
    vocab: HashMap<String, u32>,
    /// Special tokens matched in raw text, with their ids.
    specials: Vec<(String, u32)>,
    spec: TextSpec,
    cls: u32,
    sep: u32,
    pad: u32,
    unk: u32,
}

fn is_whitespace(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || c.is_whitespace()
}

fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r') && c.is_other()
}

fn is_chinese_char(c: char) -> bool {
    matches!(
        c as u32,
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B920..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

fn is_bert_punctuation(c: char) -> bool {
    c.is_ascii_punctuation() || c.is_punctuation()
}

impl WordPiece {
    /// A tokenizer for this spec (its `tokens` are the vocabulary).
    pub fn new(spec: &TextSpec) -> Result<WordPiece> {
        let mut vocab = HashMap::with_capacity(spec.tokens.len());
        for (id, token) in spec.tokens.iter().enumerate() {
            let id = u32::try_from(id).map_err(|_| bad_input("vocab", "too many tokens"))?;
            // vocab.txt semantics: a repeated token keeps its last id, as `tokenizers` does.
            vocab.insert(token.clone(), id);
        }
        let id = |field: &str, token: &str| {
            vocab.get(token).copied().ok_or_else(|| {
                Error::Spec(capsule_format::Error::InvalidPipeline {
                    at: "text".into(),
                    reason: format!("`{field}` {token:?} is not in the vocabulary"),
                })
            })
        };
        let specials = spec
            .special_tokens()
            .into_iter()
            .map(|t| Ok((t.to_owned(), id("special_tokens", t)?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(WordPiece {
            specials,
            cls: id("cls_token", &spec.cls_token)?,
            sep: id("sep_token", &spec.sep_token)?,
            pad: id("pad_token", &spec.pad_token)?,
            unk: id("unk_token", &spec.unk_token)?,
            vocab,
            spec: spec.clone(),
        })
    }

    /// `BertNormalizer`: clean text, space around CJK ideographs, strip accents, lowercase.
    pub fn normalize(&self, text: &str) -> String {
        let s = &self.spec;
        let mut out = String::with_capacity(text.len());
        for c in text.chars() {
            if s.clean_text {
                if c == '\0' || c == '\u{fffd}' || is_control(c) {
                    continue;
                }
                if is_whitespace(c) {
                    out.push(' ');
                    continue;
                }
            }
            if s.handle_chinese_chars && is_chinese_char(c) {
                out.push(' ');
                out.push(c);
                out.push(' ');
            } else {
                out.push(c);
            }
        }
        if s.strips_accents() {
            out = out
                .nfd()
                .map(|(c, _)| c)
                .filter(|c| !c.is_mark_nonspacing())
                .collect();
        }
        if s.lowercase {
            out = out.chars().flat_map(char::to_lowercase).collect();
        }
        out
    }

    /// Appends the WordPiece ids of one pre-tokenized word.
    fn word(&self, word: &str, out: &mut Vec<u32>) {
        if word.chars().count() > self.spec.max_input_chars_per_word as usize {
            out.push(self.unk);
            return;
        }
        let start_len = out.len();
        let mut start = 0;
        let mut piece = String::new();
        while start < word.len() {
            let mut end = word.len();
            let mut found = None;
            while start < end {
                piece.clear();
                if start > 0 {
                    piece.push_str(&self.spec.continuing_subword_prefix);
                }
                piece.push_str(&word[start..end]);
                if let Some(&id) = self.vocab.get(piece.as_str()) {
                    found = Some(id);
                    break;
                }
                end -= word[start..end]
                    .chars()
                    .next_back()
                    .map_or(1, char::len_utf8);
            }
            match found {
                Some(id) => {
                    out.push(id);
                    start = end;
                }
                None => {
                    out.truncate(start_len);
                    out.push(self.unk);
                    return;
                }
            }
        }
    }

    /// The leftmost (then longest) special token in `text`: its byte offset, length and id.
    fn next_special(&self, text: &str) -> Option<(usize, usize, u32)> {
        let mut best: Option<(usize, usize, u32)> = None;
        for (token, id) in &self.specials {
            if let Some(at) = text.find(token.as_str())
                && best.is_none_or(|(b, len, _)| at < b || (at == b && token.len() > len))
            {
                best = Some((at, token.len(), *id));
            }
        }
        best
    }

    /// Token ids of a text without `[CLS]`/`[SEP]` framing, stopping once `limit` ids are
    /// there. Special tokens in the text are kept whole (`AddedVocabulary`), the rest is
    /// normalized and pre-tokenized segment by segment.
    pub fn encode_words(&self, text: &str, limit: usize) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() && ids.len() < limit {
            match self.next_special(rest) {
                Some((at, len, id)) => {
                    self.encode_segment(&rest[..at], limit, &mut ids);
                    if ids.len() < limit {
                        ids.push(id);
                    }
                    rest = &rest[at + len..];
                }
                None => {
                    self.encode_segment(rest, limit, &mut ids);
                    rest = "";
                }
            }
        }
        ids.truncate(limit);
        ids
    }

    fn encode_segment(&self, text: &str, limit: usize, ids: &mut Vec<u32>) {
        let normalized = self.normalize(text);
        // BertPreTokenizer: split on whitespace (dropped), then isolate punctuation.
        for chunk in normalized.split(char::is_whitespace) {
            let mut rest = chunk;
            while !rest.is_empty() {
                if ids.len() >= limit {
                    return;
                }
                let split = rest
                    .char_indices()
                    .find(|&(_, c)| is_bert_punctuation(c))
                    .map(|(i, _)| i);
                match split {
                    Some(0) => {
                        let len = rest.chars().next().map_or(1, char::len_utf8);
                        self.word(&rest[..len], ids);
                        rest = &rest[len..];
                    }
                    Some(i) => {
                        self.word(&rest[..i], ids);
                        rest = &rest[i..];
                    }
                    None => {
                        self.word(rest, ids);
                        rest = "";
                    }
                }
            }
        }
    }

    /// `[CLS] ids [SEP]`, truncated to `max_length`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let room = (self.spec.max_length as usize).saturating_sub(2);
        let mut ids = Vec::with_capacity(room + 2);
        ids.push(self.cls);
        ids.extend(self.encode_words(text, room));
        ids.push(self.sep);
        ids
    }
}

pub(crate) struct TextStep {
    tokenizer: WordPiece,
    ids: (String, DType),
    mask: Option<(String, DType)>,
    types: Option<(String, DType)>,
}

impl TextStep {
    pub(crate) fn new(spec: &TextSpec, model_inputs: &[TensorSpec]) -> Result<TextStep> {
        let find = |name: &str| {
            model_inputs
                .iter()
                .find(|m| m.name == name)
                .map(|m| (m.name.clone(), m.dtype))
                .ok_or_else(|| bad_input("text", format!("no model input {name:?}")))
        };
        Ok(TextStep {
            tokenizer: WordPiece::new(spec)?,
            ids: find(&spec.input_ids)?,
            mask: spec.attention_mask.as_deref().map(find).transpose()?,
            types: spec.token_type_ids.as_deref().map(find).transpose()?,
        })
    }

    pub(crate) fn run(&self, input: &str, items: &[&[u8]]) -> Result<Vec<NamedTensor>> {
        let spec = &self.tokenizer.spec;
        let mut sequences = Vec::with_capacity(items.len());
        for (i, bytes) in items.iter().enumerate() {
            let at = |reason: String| element_error(input, "text", i, items.len(), reason);
            if bytes.len() as u64 > spec.max_bytes {
                return Err(at(format!(
                    "the text is {} bytes, over the limit of {}",
                    bytes.len(),
                    spec.max_bytes
                )));
            }
            let text = std::str::from_utf8(bytes)
                .map_err(|e| at(format!("the text is not UTF-8: {e}")))?;
            sequences.push(self.tokenizer.encode(text));
        }
        let width = match spec.padding {
            Padding::MaxLength => spec.max_length as usize,
            Padding::Longest => sequences.iter().map(Vec::len).max().unwrap_or(2),
        };
        let n = sequences.len();
        let mut ids = Vec::with_capacity(n * width);
        let mut mask = Vec::with_capacity(n * width);
        for seq in &sequences {
            ids.extend(seq.iter().map(|&id| i64::from(id)));
            ids.extend(std::iter::repeat_n(
                i64::from(self.tokenizer.pad),
                width - seq.len(),
            ));
            mask.extend(std::iter::repeat_n(1i64, seq.len()));
            mask.extend(std::iter::repeat_n(0i64, width - seq.len()));
        }
        let shape = vec![n as u64, width as u64];
        let tensor = |(name, dtype): &(String, DType), values: &[i64]| -> Result<NamedTensor> {
            let data: Vec<u8> = if *dtype == DType::I32 {
                values
                    .iter()
                    .flat_map(|&v| (v as i32).to_le_bytes())
                    .collect()
            } else {
                values.iter().flat_map(|&v| v.to_le_bytes()).collect()
            };
            let tensor = Tensor::new(*dtype, shape.clone(), data)
                .map_err(|e| bad_input(input, e.to_string()))?;
            Ok(NamedTensor {
                name: name.clone(),
                tensor,
            })
        };
        let mut out = vec![tensor(&self.ids, &ids)?];
        if let Some(m) = &self.mask {
            out.push(tensor(m, &mask)?);
        }
        if let Some(t) = &self.types {
            out.push(tensor(t, &vec![0; ids.len()])?);
        }
        Ok(out)
    }
}
