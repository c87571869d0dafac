//! Reading a pipeline spec from disk: TOML or JSON, with text vocabularies resolved.

use std::path::Path;

use capsule_format::Pipeline;

use crate::{Error, Result};

/// Largest spec file read.
const MAX_SPEC_BYTES: u64 = 4 << 20;
/// Largest vocabulary file read (`vocab.txt` or `tokenizer.json`).
const MAX_VOCAB_BYTES: u64 = 64 << 20;

fn read(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let size = std::fs::metadata(path)
        .map_err(Error::io(format!("reading {what} {}", path.display())))?
        .len();
    if size > limit {
        return Err(Error::Build(format!(
            "{what} {} is {size} bytes, over the limit of {limit}",
            path.display()
        )));
    }
    std::fs::read(path).map_err(Error::io(format!("reading {what} {}", path.display())))
}

/// Reads a pipeline spec (`.toml`, or `.json`) and loads the vocabulary files its text
/// inputs name (relative to the spec's directory) into their `tokens`.
pub fn read_pipeline(path: &Path) -> Result<Pipeline> {
    let bytes = read(path, MAX_SPEC_BYTES, "pipeline spec")?;
    let text = String::from_utf8(bytes)
        .map_err(|_| Error::Build(format!("pipeline spec {} is not UTF-8", path.display())))?;
    let parsed = if path.extension().is_some_and(|e| e == "json") {
        serde_json::from_str::<Pipeline>(&text).map_err(|e| e.to_string())
    } else {
        toml::from_str::<Pipeline>(&text).map_err(|e| e.to_string())
    };
    let mut pipeline =
        parsed.map_err(|e| Error::Build(format!("pipeline spec {}: {e}", path.display())))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    for raw in &mut pipeline.inputs {
        let Some(text) = raw.text.as_mut() else {
            continue;
        };
        let Some(vocab) = &text.vocab else {
            continue;
        };
        let file = dir.join(vocab);
        let bytes = read(&file, MAX_VOCAB_BYTES, "vocabulary")?;
        text.tokens = parse_vocab(&file, &bytes).map_err(|e| {
            Error::Build(format!(
                "pipeline spec {}: input {:?}: vocabulary {}: {e}",
                path.display(),
                raw.name,
                file.display()
            ))
        })?;
    }
    Ok(pipeline)
}

/// `vocab.txt` (one token per line, id = line number) or a WordPiece `tokenizer.json`
/// (`model.vocab`, token -> id).
pub fn parse_vocab(path: &Path, bytes: &[u8]) -> Result<Vec<String>, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_owned())?;
    if path.extension().is_some_and(|e| e == "json") {
        let json: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let model = &json["model"];
        if model["type"] != "WordPiece" {
            return Err(format!(
                "model.type is {}, only WordPiece tokenizers are supported",
                model["type"]
            ));
        }
        let Some(map) = model["vocab"].as_object() else {
            return Err("model.vocab is not an object".into());
        };
        let mut tokens = vec![None; map.len()];
        for (token, id) in map {
            let slot = id
                .as_u64()
                .and_then(|i| usize::try_from(i).ok())
                .and_then(|i| tokens.get_mut(i))
                .ok_or_else(|| format!("token {token:?} has id {id}, outside 0..{}", map.len()))?;
            if slot.replace(token.clone()).is_some() {
                return Err(format!("id {id} is given twice"));
            }
        }
        tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| t.ok_or_else(|| format!("no token has id {i}")))
            .collect()
    } else {
        Ok(text.lines().map(|l| l.trim_end().to_owned()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vocabularies_from_vocab_txt_and_tokenizer_json() {
        let txt = parse_vocab(Path::new("vocab.txt"), b"[PAD]\n[UNK]\nhello \n##s\n").unwrap();
        assert_eq!(txt, ["[PAD]", "[UNK]", "hello", "##s"]);
        let json = br###"{"model": {"type": "WordPiece", "vocab": {"b": 1, "a": 0, "##c": 2}}}"###;
        let tokens = parse_vocab(Path::new("tokenizer.json"), json).unwrap();
        assert_eq!(tokens, ["a", "b", "##c"]);
        let bpe = br#"{"model": {"type": "BPE", "vocab": {}}}"#;
        assert_eq!(
            parse_vocab(Path::new("tokenizer.json"), bpe).unwrap_err(),
            "model.type is \"BPE\", only WordPiece tokenizers are supported"
        );
        let gap = br#"{"model": {"type": "WordPiece", "vocab": {"a": 0, "b": 5}}}"#;
        assert_eq!(
            parse_vocab(Path::new("tokenizer.json"), gap).unwrap_err(),
            "token \"b\" has id 5, outside 0..2"
        );
    }

    #[test]
    fn specs_read_with_their_vocabulary_and_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("vocab.txt"), "[CLS]\n[SEP]\nhi\n").unwrap();
        let spec = dir.path().join("p.toml");
        std::fs::write(
            &spec,
            "[[input]]\nname = \"t\"\n[input.text]\nvocab = \"vocab.txt\"\n",
        )
        .unwrap();
        let p = read_pipeline(&spec).unwrap();
        assert_eq!(
            p.inputs[0].text.as_ref().unwrap().tokens,
            ["[CLS]", "[SEP]", "hi"]
        );
        std::fs::write(&spec, "[[input]]\nname = \"t\"\nbogus = 1\n").unwrap();
        let err = read_pipeline(&spec).unwrap_err().to_string();
        assert!(err.contains("unknown field `bogus`"), "{err}");
    }
}
