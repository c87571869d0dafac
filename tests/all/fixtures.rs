//! Every fixture model through a capsule equals onnxruntime's outputs (within the golden
//! tolerance) and native tract's (the same `capsule-model` code on the host).

use capsule_format::NamedTensor;
use capsule_format::wire;
use capsule_model::LoadedModel;
use capsule_runtime::{LoadedCapsule, RunConfig, golden};
use capsule_tests::{
    FIXTURE_MODELS, diverges_from_ort, engine, fixture_capsule, golden, model_bytes,
};

/// Capsule (wasm SIMD128 kernels) vs native tract (x86 kernels): the same graph with
/// different kernels, so sums are ordered differently; 1e-5 relative is far tighter than the
/// onnxruntime tolerance and catches any real divergence.
const NATIVE_TOLERANCE: f64 = 1e-5;

#[test]
fn fixture_outputs_match_onnxruntime_and_native_tract() -> anyhow::Result<()> {
    let engine = engine();
    for name in FIXTURE_MODELS {
        let built = fixture_capsule(name)?;
        let capsule = LoadedCapsule::load(&engine, built.bytes.clone(), RunConfig::default())?;
        assert!(
            capsule
                .image()
                .imports
                .iter()
                .all(|i| i.starts_with("capsule_kernels::")),
            "{name}: capsule imports {:?}",
            capsule.image().imports
        );
        assert!(
            !built.manifest.golden.is_empty(),
            "{name}: no golden samples"
        );
        let mut native =
            LoadedModel::load(&model_bytes(name)?, &capsule.manifest().input_shapes())?;
        for sample in &golden(name)? {
            let from_capsule = capsule.infer(&sample.inputs)?;
            let from_native = native.run(&wire::views(&sample.inputs))?;
            golden::compare(&from_native, &from_capsule, NATIVE_TOLERANCE).map_err(|e| {
                anyhow::anyhow!("{name}/{}: capsule vs native tract: {e}", sample.name)
            })?;
            let vs_ort = golden::compare(&sample.outputs, &from_capsule, sample.tolerance);
            if diverges_from_ort(name, &sample.name) {
                assert!(
                    vs_ort.is_err(),
                    "{name}/{}: now matches onnxruntime: drop it from KNOWN_ORT_DIVERGENCE",
                    sample.name
                );
            } else {
                vs_ort.map_err(|e| {
                    anyhow::anyhow!("{name}/{}: capsule vs onnxruntime: {e}", sample.name)
                })?;
            }
            assert_eq!(
                from_capsule.len(),
                capsule.manifest().outputs.len(),
                "{name}: all outputs returned"
            );
        }
    }
    Ok(())
}

#[test]
fn manifest_records_the_model_signature() -> anyhow::Result<()> {
    let built = fixture_capsule("digits_mlp")?;
    let m = &built.manifest;
    let inputs: Vec<String> = m.inputs.iter().map(ToString::to_string).collect();
    let outputs: Vec<String> = m.outputs.iter().map(ToString::to_string).collect();
    assert_eq!(inputs, ["input: FP32[N, 64]"]);
    assert_eq!(outputs, ["label: INT64[N]", "probabilities: FP32[N, 10]"]);
    assert_eq!(m.abi_version, 1);
    assert_eq!(m.source.format, "onnx");
    assert_eq!(m.golden.len(), 4);
    Ok(())
}

#[test]
fn symbolic_batch_dimension_accepts_any_batch() -> anyhow::Result<()> {
    let built = fixture_capsule("digits_logreg")?;
    let capsule = LoadedCapsule::load(&engine(), built.bytes.clone(), RunConfig::default())?;
    for batch in [1u64, 7, 64] {
        let input =
            capsule_format::Tensor::from_f32(vec![batch, 64], &vec![3.0; batch as usize * 64])?;
        let out = capsule.infer(&[NamedTensor {
            name: "input".into(),
            tensor: input,
        }])?;
        assert_eq!(out[0].tensor.shape, vec![batch]);
        assert_eq!(out[1].tensor.shape, vec![batch, 10]);
    }
    Ok(())
}
