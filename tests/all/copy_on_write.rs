//! Copy-on-write memory images: instances that map the capsule's image answer exactly like
//! instances that copy it, never see each other's writes, and every fresh instance starts
//! from the pristine snapshot.

use std::sync::atomic::Ordering;

use capsule_runtime::{CapsuleEngine, CapsuleImage, EngineConfig, LoadedCapsule, RunConfig};
use capsule_tests::{engine, fixture_capsule, golden, test_cache_dir};

#[test]
fn mapped_and_copied_images_answer_alike() -> anyhow::Result<()> {
    let mapped = engine();
    assert_eq!(
        mapped.copy_on_write(),
        cfg!(target_os = "linux"),
        "Linux engines map images copy-on-write by default"
    );
    let copied = CapsuleEngine::new(EngineConfig {
        cache_dir: Some(test_cache_dir()),
        copy_on_write: false,
        // As the shared engine: both compute every product in wasm, so they agree exactly.
        host_kernels: false,
        ..EngineConfig::default()
    })?;
    assert!(!copied.copy_on_write());
    for name in ["digits_mlp", "mnist_cnn", "silero_vad"] {
        let built = fixture_capsule(name)?;
        let config = RunConfig {
            max_idle_instances: 2,
            ..RunConfig::default()
        };
        let a = LoadedCapsule::install(
            &mapped,
            CapsuleImage::parse(built.bytes.clone())?,
            config.clone(),
        )?;
        let b = LoadedCapsule::install(&copied, CapsuleImage::parse(built.bytes.clone())?, config)?;
        // The mapped capsule keeps its image only in the sealed file, not a second time in
        // process memory; its size is still known.
        assert_eq!(a.image().image_bytes(), b.image().image_bytes());
        assert!(b.image().segments().next().is_some());
        assert_eq!(
            a.image().segments().next().is_none(),
            cfg!(target_os = "linux"),
            "{name}: the image's bytes are shed once mapped"
        );
        for sample in golden(name)? {
            // The same instance twice (its writes from the first call stay its own), then a
            // cold start (a fresh mapping of the pristine image).
            let first = a.infer(&sample.inputs)?;
            assert_eq!(first, a.infer(&sample.inputs)?, "{name}/{}", sample.name);
            assert_eq!(first, b.infer(&sample.inputs)?, "{name}/{}", sample.name);
            a.cold_start(&sample.inputs)?;
        }
        assert_eq!(
            a.stats().memory_bytes.load(Ordering::Relaxed),
            b.stats().memory_bytes.load(Ordering::Relaxed),
            "{name}: both account the same linear memory"
        );
    }
    Ok(())
}

/// Many live instances of one capsule: each is a private mapping, so a write through one
/// (every inference writes its activations into the image's heap) never shows in another.
#[test]
fn live_instances_are_isolated() -> anyhow::Result<()> {
    let built = fixture_capsule("mnist_cnn")?;
    let capsule = LoadedCapsule::install(
        &engine(),
        CapsuleImage::parse(built.bytes.clone())?,
        RunConfig {
            max_idle_instances: 8,
            ..RunConfig::default()
        },
    )?;
    capsule.prewarm(8)?;
    let samples = golden("mnist_cnn")?;
    let want: Vec<_> = samples
        .iter()
        .map(|s| capsule.infer(&s.inputs))
        .collect::<Result<_, _>>()?;
    std::thread::scope(|scope| {
        for t in 0..4 {
            let (capsule, samples, want) = (&capsule, &samples, &want);
            scope.spawn(move || {
                for i in 0..20 {
                    let k = (i + t) % samples.len();
                    match capsule.infer(&samples[k].inputs) {
                        Ok(got) => assert_eq!(got, want[k], "thread {t}, call {i}"),
                        Err(e) => panic!("thread {t}, call {i}: {e}"),
                    }
                }
            });
        }
    });
    Ok(())
}
