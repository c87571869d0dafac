//! Preprocessing and postprocessing inside the capsule, against the reference libraries
//! (fixtures from tests/fixtures/pipeline/generate.py) and end to end against onnxruntime.
//!
//! Preprocessing is checked through capsules built from Identity models: the capsule's output
//! is the model input its guest computed, so these tests compare the guest's arithmetic (and,
//! beside it, the same `capsule-pipeline` code run natively).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use capsule_format::pipeline::{ImageSpec, Pipeline};
use capsule_format::wire::{GuestError, GuestErrorKind};
use capsule_format::{NamedTensor, Tensor};
use capsule_pipeline::CompiledPipeline;
use capsule_runtime::{BuiltCapsule, Error};
use capsule_tests::{example_capsule, pipeline_capsule, repo_dir};
use serde_json::Value;

fn fixtures() -> PathBuf {
    repo_dir().join("tests/fixtures/pipeline")
}

fn examples() -> PathBuf {
    repo_dir().join("examples")
}

fn read_json(path: &Path) -> Result<Value> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

fn npy_f64(path: &Path) -> Result<(Vec<u64>, Vec<f64>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = npyz::NpyFile::new(&bytes[..])?;
    let shape = file.shape().to_vec();
    let values = match file.dtype() {
        npyz::DType::Plain(t) if t.size_field() == 4 => {
            file.into_vec::<f32>()?.into_iter().map(f64::from).collect()
        }
        _ => file.into_vec::<f64>()?,
    };
    Ok((shape, values))
}

fn build(
    name: &str,
    model: &Path,
    pipeline: Pipeline,
    labels: Vec<String>,
) -> Result<BuiltCapsule> {
    pipeline_capsule(name, model, pipeline, labels)
}

fn bytes_input(name: &str, items: &[&[u8]]) -> capsule_format::Result<NamedTensor> {
    Ok(NamedTensor {
        name: name.into(),
        tensor: Tensor::from_byte_strings(vec![items.len() as u64], items)?,
    })
}

fn output<'a>(outputs: &'a [NamedTensor], name: &str) -> Result<&'a Tensor> {
    outputs
        .iter()
        .find(|o| o.name == name)
        .map(|o| &o.tensor)
        .ok_or_else(|| anyhow!("no output {name:?}"))
}

fn labels(path: &Path) -> Result<Vec<String>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(str::to_owned)
        .collect())
}

fn image_pipeline(spec: &Value) -> Result<Pipeline> {
    let image: ImageSpec = serde_json::from_value(spec.clone())?;
    Ok(Pipeline {
        inputs: vec![capsule_format::pipeline::RawInput {
            name: "image".into(),
            feeds: Some("x".into()),
            image: Some(image),
            tabular: None,
            text: None,
        }],
        outputs: Vec::new(),
    })
}

/// Image preprocessing vs Pillow + NumPy, every filter, layout and color mode. PNG: equal to
/// Pillow up to f32 rounding of the normalization (tolerance 0.001 of an 8-bit level; the
/// resampling is Pillow's own integer arithmetic). JPEG: within 4 levels (measured: 1 level
/// for 4:4:4 and gray, 3 for 4:2:0 chroma), the difference of two decoders' IDCT and
/// chroma upsampling (zune-jpeg vs libjpeg-turbo).
#[test]
fn image_preprocessing_matches_pillow() -> Result<()> {
    let cases = read_json(&fixtures().join("image/cases.json"))?;
    let cases = cases["cases"].as_array().context("cases")?;
    let mut built: Vec<(String, BuiltCapsule, CompiledPipeline)> = Vec::new();
    let mut checked = 0;
    for case in cases {
        let name = case["case"].as_str().context("case")?;
        if !built.iter().any(|(n, _, _)| n == name) {
            let pipeline = image_pipeline(&case["spec"])?;
            let model = fixtures().join(case["model"].as_str().context("model")?);
            let capsule = build(name, &model, pipeline.clone(), Vec::new())?;
            let native = CompiledPipeline::new(
                &pipeline,
                &capsule.manifest.model_inputs,
                &capsule.manifest.model_outputs,
                &[],
            )?;
            built.push((name.to_owned(), capsule, native));
        }
        let Some((_, capsule, native)) = built.iter().find(|(n, _, _)| n == name) else {
            bail!("no capsule for {name}");
        };
        let image_path = fixtures()
            .join("image")
            .join(case["image"].as_str().context("image")?);
        let image = std::fs::read(&image_path)?;
        let (shape, expected) = npy_f64(
            &fixtures()
                .join("image")
                .join(case["expected"].as_str().context("expected")?),
        )?;
        let input = bytes_input("image", &[&image])?;
        let outputs = capsule.capsule.infer(std::slice::from_ref(&input))?;
        let got = output(&outputs, "x_out")?;
        let mut want_shape = vec![1];
        want_shape.extend(&shape);
        assert_eq!(got.shape, want_shape, "{name} {image_path:?}");
        let got = got.to_f64_vec()?;
        // The same code natively gives the same bits.
        let native_out = native.preprocess(&capsule_format::wire::views(&[input]))?;
        assert_eq!(
            native_out[0].tensor.to_f64_vec()?,
            got,
            "{name}: native vs guest"
        );

        let spec = &case["spec"];
        let scale = spec["scale"].as_f64().unwrap_or(1.0 / 255.0);
        let std = spec["std"]
            .as_array()
            .map(|s| s.iter().filter_map(Value::as_f64).fold(f64::MAX, f64::min))
            .unwrap_or(1.0);
        let level = scale / std;
        let mut max_levels: f64 = 0.0;
        let mut exact = 0;
        for (g, w) in got.iter().zip(&expected) {
            let levels = (g - w).abs() / level;
            max_levels = max_levels.max(levels);
            if levels < 1e-3 {
                exact += 1;
            }
        }
        let is_jpeg = image_path.extension().is_some_and(|e| e == "jpg");
        let tolerance = if is_jpeg { 4.0 } else { 1e-3 };
        println!(
            "{name} {}: max |diff| {max_levels:.3} levels, {exact}/{} values within 0.001 level",
            image_path.display(),
            got.len()
        );
        assert!(
            max_levels <= tolerance,
            "{name} {}: {max_levels} levels off (tolerance {tolerance})",
            image_path.display()
        );
        checked += 1;
    }
    assert_eq!(checked, cases.len());
    Ok(())
}

fn tabular_capsule() -> Result<BuiltCapsule> {
    let spec: Pipeline = serde_json::from_value(read_json(&fixtures().join("tabular/spec.json"))?)?;
    build(
        "tabular",
        &fixtures().join("identity/tabular.onnx"),
        spec,
        Vec::new(),
    )
}

/// Tabular imputation, clipping, scaling and one-hot vs scikit-learn, at float32 precision
/// (the model input is FP32; scikit-learn computes in float64).
#[test]
fn tabular_preprocessing_matches_scikit_learn() -> Result<()> {
    let capsule = tabular_capsule()?;
    let records = read_json(&fixtures().join("tabular/records.json"))?;
    let records = records.as_array().context("records")?;
    let (shape, expected) = npy_f64(&fixtures().join("tabular/expected.npy"))?;
    assert_eq!(shape[0] as usize, records.len());
    // One record per element, and all records as one JSON array in a single element.
    let texts: Vec<Vec<u8>> = records
        .iter()
        .map(serde_json::to_vec)
        .collect::<Result<_, _>>()?;
    let items: Vec<&[u8]> = texts.iter().map(Vec::as_slice).collect();
    let all = serde_json::to_vec(records)?;
    for input in [
        bytes_input("record", &items)?,
        bytes_input("record", &[&all])?,
    ] {
        let outputs = capsule.capsule.infer(&[input])?;
        let got = output(&outputs, "x_out")?;
        assert_eq!(got.shape, shape);
        for (i, (g, w)) in got.to_f64_vec()?.iter().zip(&expected).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "feature {i}: capsule {g}, scikit-learn {w}"
            );
        }
    }
    Ok(())
}

fn text_pipeline(padding: &str) -> Result<Pipeline> {
    let spec = format!(
        r#"
        [[input]]
        name = "text"
        [input.text]
        vocab = "vocab.txt"
        max_length = 128
        padding = "{padding}"
        input_ids = "input_ids"
        attention_mask = "attention_mask"
        token_type_ids = "token_type_ids"
        "#
    );
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("pipeline.toml");
    std::fs::write(&path, spec)?;
    std::fs::copy(
        examples().join("sentence-embedding/vocab.txt"),
        dir.path().join("vocab.txt"),
    )?;
    Ok(capsule_runtime::spec::read_pipeline(&path)?)
}

fn text_capsule() -> Result<BuiltCapsule> {
    build(
        "text",
        &fixtures().join("identity/text.onnx"),
        text_pipeline("longest")?,
        Vec::new(),
    )
}

/// WordPiece token ids vs Hugging Face `tokenizers` on 522 sentences: unicode, accents,
/// CJK, emoji, control characters, punctuation, over-long words and over-length text.
#[test]
fn tokenization_matches_hugging_face() -> Result<()> {
    let corpus = read_json(&fixtures().join("text/corpus.json"))?;
    let corpus: Vec<&str> = corpus
        .as_array()
        .context("corpus")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let ids = read_json(&fixtures().join("text/ids.json"))?;
    let ids: Vec<Vec<i64>> = serde_json::from_value(ids)?;
    assert!(corpus.len() >= 500);
    assert_eq!(corpus.len(), ids.len());

    let capsule = text_capsule()?;
    let items: Vec<&[u8]> = corpus.iter().map(|s| s.as_bytes()).collect();
    let outputs = capsule.capsule.infer(&[bytes_input("text", &items)?])?;
    let got_ids = output(&outputs, "input_ids_out")?;
    let mask = output(&outputs, "attention_mask_out")?.to_f64_vec()?;
    let types = output(&outputs, "token_type_ids_out")?.to_f64_vec()?;
    let width = got_ids.shape[1] as usize;
    assert_eq!(width, 128, "padded to the longest sequence");
    assert!(types.iter().all(|&t| t == 0.0));
    let got_ids = got_ids.to_f64_vec()?;
    let mut mismatches = Vec::new();
    for (i, want) in ids.iter().enumerate() {
        let row = &got_ids[i * width..(i + 1) * width];
        let len = mask[i * width..(i + 1) * width]
            .iter()
            .filter(|&&m| m == 1.0)
            .count();
        let got: Vec<i64> = row[..len].iter().map(|&v| v as i64).collect();
        if &got != want {
            mismatches.push(format!(
                "{:?}: capsule {got:?}, tokenizers {want:?}",
                corpus[i]
            ));
        }
        assert!(row[len..].iter().all(|&p| p == 0.0), "padding is [PAD]");
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    Ok(())
}

/// The MNIST example: PNG bytes in, probabilities and top-3 labels out, against Pillow +
/// onnxruntime.
#[test]
fn mnist_png_example_matches_onnxruntime() -> Result<()> {
    let dir = examples().join("mnist-png");
    let capsule = example_capsule("mnist-png")?;
    let expected = read_json(&dir.join("expected.json"))?;
    let samples = expected["samples"].as_array().context("samples")?;
    let images: Vec<Vec<u8>> = samples
        .iter()
        .map(|s| std::fs::read(dir.join(s["image"].as_str().unwrap_or_default())))
        .collect::<Result<_, _>>()?;
    let items: Vec<&[u8]> = images.iter().map(Vec::as_slice).collect();
    // A batch of mixed 28x28 gray and 56x56 RGB images.
    let outputs = capsule.capsule.infer(&[bytes_input("image", &items)?])?;
    let probs = output(&outputs, "probabilities")?.to_f64_vec()?;
    let top3 = capsule_pipeline::strings(output(&outputs, "top3")?);
    let scores = output(&outputs, "top3_scores")?.to_f64_vec()?;
    let mut correct = 0;
    for (i, s) in samples.iter().enumerate() {
        let want: Vec<f64> = serde_json::from_value(s["probabilities"].clone())?;
        for (g, w) in probs[i * 10..(i + 1) * 10].iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4, "sample {i}: {g} vs {w}");
        }
        let want_top: Vec<String> = serde_json::from_value(s["top3"].clone())?;
        assert_eq!(top3[i * 3..(i + 1) * 3], want_top[..], "sample {i}");
        let want_scores: Vec<f64> = serde_json::from_value(s["top3_scores"].clone())?;
        for (g, w) in scores[i * 3..(i + 1) * 3].iter().zip(&want_scores) {
            assert!((g - w).abs() <= 1e-4);
        }
        if s["true_label"].as_u64().map(|l| l.to_string()).as_ref() == Some(&top3[i * 3]) {
            correct += 1;
        }
    }
    assert!(
        correct >= samples.len() - 1,
        "{correct}/{} correct",
        samples.len()
    );
    Ok(())
}

/// The wine example: JSON records with missing values in, label out, against
/// tools/capsule_tabular.py + onnxruntime.
#[test]
fn wine_tabular_example_matches_onnxruntime() -> Result<()> {
    let dir = examples().join("wine-tabular");
    let capsule = example_capsule("wine-tabular")?;
    let records = read_json(&dir.join("records.json"))?;
    let expected = read_json(&dir.join("expected.json"))?;
    let samples = expected["samples"].as_array().context("samples")?;
    let text = serde_json::to_vec(&records)?;
    let outputs = capsule.capsule.infer(&[bytes_input("record", &[&text])?])?;
    let probs = output(&outputs, "probabilities")?.to_f64_vec()?;
    let labels = capsule_pipeline::strings(output(&outputs, "label")?);
    assert_eq!(labels.len(), samples.len());
    for (i, s) in samples.iter().enumerate() {
        let want: Vec<f64> = serde_json::from_value(s["probabilities"].clone())?;
        for (g, w) in probs[i * 3..(i + 1) * 3].iter().zip(&want) {
            assert!((g - w).abs() <= 1e-5, "record {i}: {g} vs {w}");
        }
        assert_eq!(
            labels[i],
            s["label"].as_str().unwrap_or_default(),
            "record {i}"
        );
    }
    Ok(())
}

/// The sentence-embedding example: raw text in, normalized MiniLM embedding out, against
/// tokenizers + onnxruntime + sentence-transformers pooling. The model is fetched on demand
/// (`python3 examples/sentence-embedding/fetch_model.py`; `.ci/run` does it).
#[test]
fn sentence_embedding_example_matches_onnxruntime() -> Result<()> {
    let dir = examples().join("sentence-embedding");
    let capsule = example_capsule("sentence-embedding")?;
    let sentences: Vec<String> = serde_json::from_value(read_json(&dir.join("sentences.json"))?)?;
    let expected = read_json(&dir.join("expected.json"))?;
    let want: Vec<Vec<f64>> = serde_json::from_value(expected["embeddings"].clone())?;
    let items: Vec<&[u8]> = sentences.iter().map(|s| s.as_bytes()).collect();
    let outputs = capsule.capsule.infer(&[bytes_input("text", &items)?])?;
    let emb = output(&outputs, "embedding")?;
    assert_eq!(emb.shape, vec![sentences.len() as u64, 384]);
    let emb = emb.to_f64_vec()?;
    for (i, w) in want.iter().enumerate() {
        let g = &emb[i * 384..(i + 1) * 384];
        let max = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let cosine: f64 = g.iter().zip(w).map(|(a, b)| a * b).sum();
        println!("sentence {i}: max |diff| {max:.2e}, cosine {cosine:.7}");
        assert!(
            max <= 1e-3 && cosine >= 0.9999,
            "sentence {i}: max diff {max}, cosine {cosine}"
        );
    }
    Ok(())
}

fn bad_input(result: capsule_runtime::Result<Vec<NamedTensor>>) -> String {
    match result {
        Err(Error::Guest(GuestError {
            kind: GuestErrorKind::BadInput,
            message,
        })) => message,
        other => format!("not a bad-input error: {other:?}"),
    }
}

fn png_chunk(png: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) -> Result<()> {
    png.extend(u32::try_from(data.len())?.to_be_bytes());
    let mut body = kind.to_vec();
    body.extend(data);
    png.extend(&body);
    png.extend(crc32(&body).to_be_bytes());
    Ok(())
}

/// A well-formed PNG whose header claims `width x height` gray pixels, with a small valid
/// zlib stream of zero rows as its data: a decompression bomb.
fn png_bomb(width: u32, height: u32) -> Result<Vec<u8>> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = width.to_be_bytes().to_vec();
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    png_chunk(&mut png, b"IHDR", &ihdr)?;
    // zlib: header, one stored block of 1024 zero bytes, Adler-32 of zeros (1024 << 16 | 1).
    let mut idat = vec![0x78, 0x01, 0x01, 0x00, 0x04, 0xFF, 0xFB];
    idat.extend([0u8; 1024]);
    idat.extend(((1024u32 << 16) | 1).to_be_bytes());
    png_chunk(&mut png, b"IDAT", &idat)?;
    png_chunk(&mut png, b"IEND", &[])?;
    Ok(png)
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A JPEG whose frame header (SOF0) is rewritten to claim `width x height`: a
/// decompression bomb.
fn jpeg_bomb(jpeg: &[u8], width: u16, height: u16) -> Result<Vec<u8>> {
    let mut out = jpeg.to_vec();
    let sof = out
        .windows(2)
        .position(|w| w == [0xFF, 0xC0])
        .context("no SOF0 marker")?;
    out[sof + 5..sof + 7].copy_from_slice(&height.to_be_bytes());
    out[sof + 7..sof + 9].copy_from_slice(&width.to_be_bytes());
    Ok(out)
}

/// Bad raw inputs: each a typed error with the documented message, never a trap; the capsule
/// keeps serving afterwards.
#[test]
fn bad_raw_inputs_are_typed_errors() -> Result<()> {
    let mnist = example_capsule("mnist-png")?;
    let png = std::fs::read(fixtures().join("image/inputs/gray_28x28.png"))?;
    let jpeg = std::fs::read(fixtures().join("image/inputs/gray_40x40.jpg"))?;
    let image = |bytes: &[u8]| mnist.capsule.infer(&[bytes_input("image", &[bytes])?]);
    let big = vec![0u8; (1 << 20) + 1];
    for (what, bytes, want) in [
        (
            "truncated PNG",
            png[..png.len() / 2].to_vec(),
            "input \"image\": cannot decode the image: ",
        ),
        (
            "PNG bomb",
            png_bomb(50_000, 50_000)?,
            "input \"image\": the image is 50000x50000 = 2500000000 pixels, over the limit of 4194304",
        ),
        (
            "JPEG bomb",
            jpeg_bomb(&jpeg, 60_000, 60_000)?,
            "input \"image\": the image is 60000x60000 = 3600000000 pixels, over the limit of 4194304",
        ),
        (
            "over max_bytes",
            big,
            "input \"image\": the encoded image is 1048577 bytes, over the limit of 1048576",
        ),
        (
            "not an image",
            b"hello".to_vec(),
            "input \"image\": not a PNG or JPEG image",
        ),
        (
            "empty",
            Vec::new(),
            "input \"image\": not a PNG or JPEG image",
        ),
    ] {
        let message = bad_input(image(&bytes));
        assert!(message.starts_with(want), "{what}: {message}");
    }
    // A batch names the image at fault.
    let message = bad_input(mnist.capsule.infer(&[bytes_input("image", &[&png, b"x"])?]));
    assert_eq!(message, "input \"image\": image 1: not a PNG or JPEG image");

    let tabular = tabular_capsule()?;
    let record = |json: &str| {
        tabular
            .capsule
            .infer(&[bytes_input("record", &[json.as_bytes()])?])
    };
    for (json, want) in [
        (
            r#"{"alcohol": "strong"}"#,
            "input \"record\": field \"alcohol\": expected a number, got a string",
        ),
        (
            r#"{"organic": "yes"}"#,
            "input \"record\": field \"organic\": expected a boolean, got a string",
        ),
        (
            r#"{"region": 3}"#,
            "input \"record\": field \"region\": expected a category (a string), got a number",
        ),
        (
            r#"{"alcohol": [1]}"#,
            "input \"record\": field \"alcohol\": expected a number, got an array",
        ),
        (
            "42",
            "input \"record\": expected a JSON object or an array of objects",
        ),
        ("[{}, 1]", "input \"record\": record 1 is not a JSON object"),
    ] {
        assert_eq!(bad_input(record(json)), want, "{json}");
    }
    assert!(bad_input(record("{not json")).starts_with("input \"record\": not valid JSON: "));

    // Unknown categories: the bucket column by default, an error when the spec says so.
    let mut spec: Pipeline =
        serde_json::from_value(read_json(&fixtures().join("tabular/spec.json"))?)?;
    let fields = &mut spec.inputs[0].tabular.as_mut().context("tabular")?.fields;
    let cask = fields
        .iter_mut()
        .find(|f| f.name == "cask")
        .context("cask")?;
    cask.unknown = capsule_format::pipeline::Unknown::Error;
    // One column fewer (the cask field lost its bucket): a model of any width.
    let strict = build(
        "strict",
        &fixtures().join("identity/tabular_any_width.onnx"),
        spec,
        Vec::new(),
    )?;
    let message = bad_input(
        strict
            .capsule
            .infer(&[bytes_input("record", &[br#"{"cask": "clay"}"#])?]),
    );
    assert_eq!(
        message,
        "input \"record\": field \"cask\": unknown category \"clay\" (known: [\"oak\", \"steel\"])"
    );
    let out = tabular.capsule.infer(&[bytes_input(
        "record",
        &[br#"{"cask": "clay", "region": "west"}"#],
    )?])?;
    let row = output(&out, "x_out")?.to_f64_vec()?;
    assert_eq!(
        &row[row.len() - 3..],
        &[0.0, 0.0, 1.0],
        "cask: the unknown bucket"
    );

    let text = text_capsule()?;
    let say = |t: &[u8]| text.capsule.infer(&[bytes_input("text", &[t])?]);
    // Empty text: [CLS] [SEP], as Hugging Face tokenizers gives.
    let out = say(b"")?;
    assert_eq!(
        output(&out, "input_ids_out")?,
        &Tensor::from_i64(vec![1, 2], &[101, 102])?
    );
    // 1 MB of text: truncated to 128 tokens.
    let megabyte = "lorem ipsum dolor sit amet ".repeat(1_000_000 / 27 + 1);
    let out = say(&megabyte.as_bytes()[..1_000_000])?;
    assert_eq!(output(&out, "input_ids_out")?.shape, vec![1, 128]);
    // Over the spec's max_bytes (4 MiB) and not UTF-8: errors.
    let huge = vec![b'a'; (4 << 20) + 1];
    assert_eq!(
        bad_input(say(&huge)),
        "input \"text\": the text is 4194305 bytes, over the limit of 4194304"
    );
    assert_eq!(
        bad_input(say(&[0x66, 0xff, 0x6f])),
        "input \"text\": the text is not UTF-8: invalid utf-8 sequence of 1 bytes from index 1"
    );
    // The wrong datatype for a raw input is refused by the host before the guest runs.
    let wrong = NamedTensor {
        name: "text".into(),
        tensor: Tensor::from_f32(vec![1], &[1.0])?,
    };
    match text.capsule.infer(&[wrong]) {
        Err(Error::BadRequest(m)) => {
            assert_eq!(
                m,
                "input \"text\" has datatype FP32, the capsule expects BYTES"
            )
        }
        other => bail!("{other:?}"),
    }

    // Nothing trapped: every capsule still answers and no instance was discarded.
    for capsule in [&mnist, &tabular, &text] {
        assert_eq!(
            capsule
                .capsule
                .stats()
                .traps
                .load(std::sync::atomic::Ordering::Relaxed),
            0,
            "{}",
            capsule.manifest.name
        );
    }
    mnist.capsule.infer(&[bytes_input("image", &[&png])?])?;
    Ok(())
}

/// A spec that does not fit the model is refused at build time, naming the step and field.
#[test]
fn spec_errors_name_the_step_and_field() -> Result<()> {
    let dir = examples().join("mnist-png");
    let mut spec = capsule_runtime::spec::read_pipeline(&dir.join("pipeline.toml"))?;
    spec.inputs[0]
        .image
        .as_mut()
        .context("image")?
        .resize
        .as_mut()
        .context("resize")?
        .width = Some(32);
    let err = build(
        "bad",
        &repo_dir().join("tests/fixtures/models/mnist_cnn/model.onnx"),
        spec,
        labels(&dir.join("labels.txt"))?,
    )
    .err()
    .context("built")?;
    assert_eq!(
        err.to_string(),
        "cannot build capsule: invalid pipeline: input \"image\": the width gives 32, but the model input has 28 there"
    );
    let spec = capsule_runtime::spec::read_pipeline(&dir.join("pipeline.toml"))?;
    let err = build(
        "bad",
        &repo_dir().join("tests/fixtures/models/mnist_cnn/model.onnx"),
        spec,
        Vec::new(),
    )
    .err()
    .context("built")?;
    assert_eq!(
        err.to_string(),
        "cannot build capsule: invalid pipeline: output \"top3\" step 2 (labels): the capsule has no labels (build with --labels)"
    );
    Ok(())
}
