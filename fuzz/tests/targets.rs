//! One fuzz target per decoder of untrusted bytes (see `capsule_fuzz`). Each test runs its
//! target on mutations of real inputs and fails on a panic; errors are the expected answers.

use std::sync::OnceLock;
use std::time::Instant;

use capsule_format::tuf::{self, Root, Signed, SigningKey, Targets};
use capsule_format::{CapsuleManifest, NamedTensor, split, telemetry, v2};
use capsule_fuzz::{config, mutated};
use capsule_runtime::{CapsuleImage, GuestCode};
use capsule_tests::{FIXTURE_MODELS, WatCapsule, golden, wat_capsule};
use proptest::test_runner::TestRunner;

/// Runs `target` on `seeds`' mutations, and prints what it ran.
fn fuzz(name: &str, default_cases: u32, seeds: Vec<Vec<u8>>, target: impl Fn(&[u8])) {
    let mut runner = TestRunner::new(config(default_cases));
    let started = Instant::now();
    let result = runner.run(&mutated(seeds), |bytes| {
        target(&bytes);
        Ok(())
    });
    eprintln!(
        "fuzz {name}: {} cases in {:.2} s",
        config(default_cases).cases,
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("fuzz {name}: {e}");
    }
}

/// Every fixture's golden inputs.
fn golden_inputs() -> &'static Vec<Vec<NamedTensor>> {
    static INPUTS: OnceLock<Vec<Vec<NamedTensor>>> = OnceLock::new();
    INPUTS.get_or_init(|| {
        FIXTURE_MODELS
            .iter()
            .flat_map(|m| golden(m).unwrap_or_default())
            .map(|s| s.inputs)
            .collect()
    })
}

#[test]
fn v2_json_requests() {
    let mut seeds: Vec<Vec<u8>> = golden_inputs()
        .iter()
        .filter_map(|inputs| v2::InferenceRequest::from_tensors(inputs).ok())
        .filter_map(|r| serde_json::to_vec(&r).ok())
        .collect();
    seeds.push(
        br#"{"id":"r","parameters":{"binary_data_output":true},"inputs":[{"name":"x","shape":[2,2],"datatype":"BYTES","data":["a","b","c","d"]}],"outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#
            .to_vec(),
    );
    fuzz("v2_json_requests", 20_000, seeds, |bytes| {
        if let Ok(request) = v2::decode_request(bytes, None) {
            let _ = request
                .request
                .select_outputs(&["y", "label", "probabilities"]);
        }
    });
}

#[test]
fn v2_binary_requests() {
    let seeds: Vec<Vec<u8>> = golden_inputs()
        .iter()
        .filter_map(|inputs| v2::encode_binary_request(inputs, &["label"]).ok())
        .map(|(mut body, json_len)| {
            // The header's length travels first in the seed, so edits reach it too.
            let mut seed = u32::try_from(json_len).unwrap_or(0).to_le_bytes().to_vec();
            seed.append(&mut body);
            seed
        })
        .collect();
    fuzz("v2_binary_requests", 20_000, seeds, |bytes| {
        let Some((len, body)) = bytes.split_first_chunk::<4>() else {
            return;
        };
        let json_len = u32::from_le_bytes(*len) as usize;
        let _ = v2::decode_request(body, Some(json_len));
    });
}

#[test]
fn grpc_model_infer() {
    use capsule_node::proto::{ModelInferRequest, model_infer_request::InferInputTensor};
    use prost::Message;
    let seeds: Vec<Vec<u8>> = golden_inputs()
        .iter()
        .map(|inputs| ModelInferRequest {
            model_name: "m".into(),
            inputs: inputs
                .iter()
                .map(|t| InferInputTensor {
                    name: t.name.clone(),
                    datatype: t.tensor.dtype.to_string(),
                    shape: t.tensor.shape.iter().map(|&d| d as i64).collect(),
                    ..InferInputTensor::default()
                })
                .collect(),
            raw_input_contents: inputs.iter().map(|t| t.tensor.data.clone()).collect(),
            ..ModelInferRequest::default()
        })
        .map(|r| r.encode_to_vec())
        .collect();
    fuzz(
        "grpc_model_infer",
        20_000,
        seeds,
        capsule_node::fuzzing::grpc_model_infer,
    );
}

/// The fixtures' code module and two of their model images.
fn fixture_images() -> anyhow::Result<(Vec<u8>, Vec<Vec<u8>>)> {
    let mut code = Vec::new();
    let mut images = Vec::new();
    for model in ["digits_logreg", "digits_mlp"] {
        let parts = split::split(&capsule_tests::fixture_capsule(model)?.bytes)?;
        code = parts.code;
        images.push(parts.image);
    }
    Ok((code, images))
}

#[test]
fn manifests() -> anyhow::Result<()> {
    let seeds: Vec<Vec<u8>> = fixture_images()?
        .1
        .iter()
        .filter_map(|image| split::image_memory(image).ok())
        .map(|m| m.manifest)
        .collect();
    fuzz("manifests", 20_000, seeds, |bytes| {
        let _ = CapsuleManifest::from_section_bytes(bytes);
    });
    Ok(())
}

#[test]
fn model_images() -> anyhow::Result<()> {
    let (code, images) = fixture_images()?;
    let code = GuestCode::check(split::Code::new(code))?;
    fuzz("model_images", 2_000, images, |bytes| {
        let _ = split::image_memory(bytes);
        let _ = CapsuleImage::parse_image(&code, bytes);
    });
    Ok(())
}

#[test]
fn capsule_files() {
    let seeds: Vec<Vec<u8>> = [1.0, 2.0]
        .iter()
        .map(|&y| {
            wat_capsule(&WatCapsule {
                y,
                golden_y: Some(y),
                ..WatCapsule::default()
            })
            .expect("test capsule")
        })
        .collect();
    fuzz("capsule_files", 20_000, seeds, |bytes| {
        let _ = CapsuleImage::parse(bytes.to_vec());
        let _ = split::split(bytes);
    });
}

#[test]
fn signed_targets_metadata() {
    let key = SigningKey::from_secret([7; 32]);
    let mut root = Signed {
        signed: Root::new(&[key.public()], 1, &[key.public()], 1, 4_000_000_000),
        signatures: vec![],
    };
    key.sign(&mut root).expect("sign root");
    let trusted = tuf::trust_root(&root, 1).expect("root");
    let mut targets = Signed {
        signed: Targets {
            kind: "targets".into(),
            version: 3,
            expires: 4_000_000_000,
            targets: tuf::capsule_targets(
                "m",
                "1.0.0",
                (10, &"a".repeat(64)),
                (5, &"b".repeat(64)),
                (7, &"c".repeat(64)),
            )
            .into_iter()
            .collect(),
        },
        signatures: vec![],
    };
    key.sign(&mut targets).expect("sign targets");
    let seeds = vec![
        serde_json::to_vec(&targets).expect("json"),
        serde_json::to_vec(&root).expect("json"),
    ];
    fuzz("signed_targets_metadata", 20_000, seeds, |bytes| {
        if let Ok(t) = tuf::parse::<Targets>(bytes, "targets")
            && let Ok(t) = tuf::verify_targets(&trusted, Some(2), &t, 1)
        {
            for path in t.targets.keys() {
                let _ = tuf::image_and_code(&t, path);
            }
        }
        if let Ok(r) = tuf::parse::<Root>(bytes, "root") {
            let _ = tuf::rotate_root(&trusted, &r);
        }
    });
}

#[test]
fn telemetry_batches() {
    let batch = telemetry::TelemetryBatch {
        node_id: "n".into(),
        seq: 1,
        window_start_ms: 1,
        window_end_ms: 2,
        models: vec![telemetry::ModelWindow {
            model: "m".into(),
            version: "1".into(),
            requests: 3,
            predictions: vec![telemetry::Prediction {
                id: "r".into(),
                class: "a".into(),
            }],
            ..telemetry::ModelWindow::default()
        }],
        feedback: vec![telemetry::Feedback {
            model: "m".into(),
            id: "r".into(),
            label: "a".into(),
        }],
        ..telemetry::TelemetryBatch::default()
    };
    let seeds = vec![serde_json::to_vec(&batch).expect("json")];
    fuzz("telemetry_batches", 20_000, seeds, |bytes| {
        if let Ok(b) = serde_json::from_slice::<telemetry::TelemetryBatch>(bytes)
            && b.validate().is_ok()
        {
            let _ = b.split_to_fit(telemetry::MAX_BATCH_BYTES);
        }
    });
}

#[test]
fn images_for_the_pipeline() {
    let dir = capsule_tests::repo_dir().join("tests/fixtures/pipeline/image/inputs");
    let seeds: Vec<Vec<u8>> = ["gray_28x28.png", "gray_40x40.jpg", "palette_37x29.png"]
        .iter()
        .map(|f| std::fs::read(dir.join(f)).expect("fixture image"))
        .collect();
    let spec: capsule_format::pipeline::ImageSpec =
        serde_json::from_value(serde_json::json!({"resize": {"width": 28, "height": 28}}))
            .expect("image spec");
    fuzz("images_for_the_pipeline", 5_000, seeds, |bytes| {
        let _ = capsule_pipeline::prepare_image(&spec, bytes);
    });
}
