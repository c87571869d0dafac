//! The builder: clear errors for models tract cannot load, shape overrides, golden checks.

use capsule_format::manifest::Dim;
use capsule_format::wire::InputShape;
use capsule_runtime::Error;
use capsule_tests::{builder, model_bytes, options};

#[test]
fn unsupported_operator_is_a_clear_error() -> anyhow::Result<()> {
    let mut opts = options("digits_rf")?;
    opts.model = model_bytes("digits_rf_zipmap")?;
    opts.golden.clear();
    match builder().build(opts) {
        Err(Error::Build(message)) => assert!(message.contains("ZipMap"), "{message}"),
        other => panic!("expected a build error naming ZipMap, got {other:?}"),
    }
    Ok(())
}

#[test]
fn garbage_model_is_a_clear_error() -> anyhow::Result<()> {
    let mut opts = options("digits_logreg")?;
    opts.model = b"this is not an onnx model".to_vec();
    opts.golden.clear();
    match builder().build(opts) {
        Err(Error::Build(message)) => {
            assert!(message.starts_with("cannot load model: "), "{message}")
        }
        other => panic!("expected a build error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn input_shape_override_fixes_dimensions() -> anyhow::Result<()> {
    let mut opts = options("digits_logreg")?;
    opts.input_shapes = vec![InputShape {
        name: "input".into(),
        shape: vec![Dim::Fixed(1), Dim::Fixed(64)],
    }];
    opts.golden.retain(|g| g.inputs[0].tensor.shape[0] == 1);
    let built = builder().build(opts)?;
    assert_eq!(
        built.manifest.inputs[0].shape,
        vec![Dim::Fixed(1), Dim::Fixed(64)]
    );

    let mut opts = options("digits_logreg")?;
    opts.input_shapes = vec![InputShape {
        name: "nope".into(),
        shape: vec![Dim::Fixed(1)],
    }];
    match builder().build(opts) {
        Err(Error::Build(m)) => assert_eq!(
            m,
            "cannot load model: --input-shape names input \"nope\", but the model's inputs are [\"input\"]"
        ),
        other => panic!("expected a build error, got {other:?}"),
    }
    Ok(())
}

#[test]
fn golden_mismatch_fails_the_build() -> anyhow::Result<()> {
    let mut opts = options("digits_mlp")?;
    let sample = &mut opts.golden[0];
    let probs = sample
        .outputs
        .iter_mut()
        .find(|o| o.name == "probabilities")
        .ok_or_else(|| anyhow::anyhow!("no output"))?;
    probs.tensor.data[0..4].copy_from_slice(&0.5f32.to_le_bytes());
    match builder().build(opts) {
        Err(Error::GoldenMismatch { sample, reason }) => {
            assert_eq!(sample, "000");
            assert!(
                reason.starts_with("output \"probabilities\" element 0 is "),
                "{reason}"
            );
        }
        other => panic!("expected a golden mismatch, got {other:?}"),
    }
    Ok(())
}

#[test]
fn snapshot_builds_are_deterministic_in_content() -> anyhow::Result<()> {
    let a = builder().build(options("digits_mlp")?)?;
    let b = builder().build(options("digits_mlp")?)?;
    // Same model, same guest: the same code and memory image (only created_at may differ).
    let (ia, ib) = (
        capsule_runtime::CapsuleImage::parse(a.bytes)?,
        capsule_runtime::CapsuleImage::parse(b.bytes)?,
    );
    assert_eq!(ia.code_sha256, ib.code_sha256);
    assert_eq!(
        ia.segments().collect::<Vec<_>>(),
        ib.segments().collect::<Vec<_>>()
    );
    Ok(())
}
