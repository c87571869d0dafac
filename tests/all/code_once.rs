//! Code once, models many: a second capsule of the same guest build installs without any
//! Cranelift compilation, and a new engine finds the compiled code in the disk cache.

use std::sync::Arc;

use capsule_runtime::{CapsuleEngine, CapsuleImage, EngineConfig, LoadedCapsule, RunConfig};
use capsule_tests::{fixture_capsule, golden};

#[test]
fn capsules_of_one_guest_build_share_compiled_code() -> anyhow::Result<()> {
    let a = fixture_capsule("digits_mlp")?;
    let b = fixture_capsule("mnist_cnn")?;
    let (ia, ib) = (
        CapsuleImage::parse(a.bytes.clone())?,
        CapsuleImage::parse(b.bytes.clone())?,
    );
    assert_ne!(ia.sha256, ib.sha256);
    assert_eq!(
        ia.code_sha256, ib.code_sha256,
        "same guest build, same code"
    );

    let cache = tempfile::tempdir()?;
    let config = EngineConfig {
        cache_dir: Some(cache.path().to_owned()),
        ..EngineConfig::default()
    };
    let engine: Arc<CapsuleEngine> = CapsuleEngine::new(config.clone())?;
    LoadedCapsule::install(&engine, ia, RunConfig::default())?;
    assert_eq!(
        engine.compilations(),
        1,
        "the first capsule compiles the guest code once"
    );
    let cnn = LoadedCapsule::install(&engine, ib, RunConfig::default())?;
    assert_eq!(
        engine.compilations(),
        1,
        "the second capsule compiles nothing"
    );
    let sample = &golden("mnist_cnn")?[0];
    assert_eq!(cnn.infer(&sample.inputs)?.len(), 1);

    // A new engine (a restarted node) loads the compiled code from the disk cache.
    let restarted = CapsuleEngine::new(config)?;
    LoadedCapsule::load(&restarted, b.bytes.clone(), RunConfig::default())?;
    assert_eq!(restarted.compilations(), 0);
    assert_eq!(
        restarted
            .stats()
            .disk_cache_hits
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    Ok(())
}
