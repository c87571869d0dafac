//! Every inference is independent of the ones before it on the same instance: recurrent and
//! stateful ops (Silero VAD's) start from their initial state each time, as on a fresh
//! instance in a browser. (Found by the browser SDK test: a warm edge instance answered
//! differently from Chromium's fresh one.)

use capsule_runtime::{LoadedCapsule, RunConfig};

#[test]
fn repeated_requests_give_the_same_outputs() -> anyhow::Result<()> {
    for name in ["silero_vad", "mnist_cnn", "digits_mlp"] {
        let built = capsule_tests::fixture_capsule(name)?;
        let inputs = built.manifest.golden[0].inputs.clone();
        let capsule = LoadedCapsule::load(
            &capsule_tests::engine(),
            built.bytes.clone(),
            RunConfig::default(),
        )?;
        let first = capsule.infer(&inputs)?;
        for _ in 0..3 {
            assert_eq!(capsule.infer(&inputs)?, first, "{name}");
        }
    }
    Ok(())
}
