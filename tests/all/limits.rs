//! A guest that loops forever is stopped by the deadline; one that grows memory past the cap
//! fails cleanly; in both cases the instance is discarded and the next call succeeds.

use std::time::{Duration, Instant};

use capsule_format::{NamedTensor, Tensor};
use capsule_runtime::{Error, LoadedCapsule, RunConfig, TrapKind};
use capsule_tests::{WatCapsule, engine, fixture_capsule};

fn wat_capsule() -> anyhow::Result<Vec<u8>> {
    capsule_tests::wat_capsule(&WatCapsule::default())
}

fn x(v: f32) -> anyhow::Result<Vec<NamedTensor>> {
    Ok(vec![NamedTensor {
        name: "x".into(),
        tensor: Tensor::from_f32(vec![1], &[v])?,
    }])
}

#[test]
fn infinite_loop_is_stopped_by_the_deadline() -> anyhow::Result<()> {
    let config = RunConfig {
        deadline: Some(Duration::from_millis(50)),
        ..RunConfig::default()
    };
    let capsule = LoadedCapsule::load(&engine(), wat_capsule()?, config)?;
    assert_eq!(capsule.infer(&x(0.0)?)?[0].tensor.to_f64_vec()?, vec![42.0]);
    let started = Instant::now();
    match capsule.infer(&x(1.0)?) {
        Err(Error::Trap {
            kind: TrapKind::Deadline,
            message,
        }) => {
            assert_eq!(message, "wasm trap: interrupt");
        }
        other => panic!("expected a deadline trap, got {other:?}"),
    }
    // Generous bound: only checks that the loop was stopped, not how fast.
    assert!(started.elapsed() < Duration::from_secs(30));
    assert_eq!(
        capsule
            .stats()
            .traps
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(capsule.infer(&x(0.0)?)?[0].tensor.to_f64_vec()?, vec![42.0]);
    Ok(())
}

#[test]
fn memory_growth_past_the_cap_fails_cleanly() -> anyhow::Result<()> {
    let config = RunConfig {
        max_memory_bytes: Some(8 << 20),
        ..RunConfig::default()
    };
    let capsule = LoadedCapsule::load(&engine(), wat_capsule()?, config)?;
    match capsule.infer(&x(2.0)?) {
        Err(Error::Trap {
            kind: TrapKind::Unreachable,
            ..
        }) => {}
        other => panic!("expected an unreachable trap, got {other:?}"),
    }
    assert_eq!(capsule.infer(&x(0.0)?)?[0].tensor.to_f64_vec()?, vec![42.0]);
    Ok(())
}

#[test]
fn real_guest_over_its_memory_cap_traps_and_recovers() -> anyhow::Result<()> {
    let built = fixture_capsule("digits_mlp")?;
    let image_pages = capsule_runtime::CapsuleImage::parse(built.bytes.clone())?.memory_pages;
    // The cap leaves 4 MiB above the snapshot; a batch of 20000 needs ~5 MiB for the
    // request alone and ~10 MiB for the hidden layer.
    let cap = image_pages * 65536 + (4 << 20);
    let config = RunConfig {
        max_memory_bytes: Some(cap),
        ..RunConfig::default()
    };
    let capsule = LoadedCapsule::load(&engine(), built.bytes.clone(), config)?;
    let big = Tensor::from_f32(vec![20_000, 64], &vec![1.0; 20_000 * 64])?;
    match capsule.infer(&[NamedTensor {
        name: "input".into(),
        tensor: big,
    }]) {
        Err(Error::Trap {
            kind: TrapKind::Unreachable,
            ..
        }) => {}
        other => panic!("expected an unreachable trap from the allocator, got {other:?}"),
    }
    let small = Tensor::from_f32(vec![1, 64], &[1.0; 64])?;
    let out = capsule.infer(&[NamedTensor {
        name: "input".into(),
        tensor: small,
    }])?;
    assert_eq!(out[1].tensor.shape, vec![1, 10]);
    Ok(())
}
