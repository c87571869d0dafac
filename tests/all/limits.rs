//! A guest that loops forever is stopped by the deadline; one that grows memory past the cap
//! fails cleanly; in both cases the instance is discarded and the next call succeeds.

use std::time::{Duration, Instant};

use capsule_format::wire::{InferResponse, encode};
use capsule_format::{NamedTensor, Tensor};
use capsule_runtime::{Error, LoadedCapsule, RunConfig, TrapKind};
use capsule_tests::{engine, fixture_capsule};

/// A hand-written capsule: input `x` (FP32 [1]); x = 1 loops forever, x = 2 grows memory
/// until refused and then hits `unreachable` (what Rust's allocator does), anything else
/// returns `y = 42`.
fn wat_capsule() -> anyhow::Result<Vec<u8>> {
    let response = encode(
        &InferResponse::Outputs(vec![NamedTensor {
            name: "y".into(),
            tensor: Tensor::from_f32(vec![1], &[42.0])?,
        }]),
        "response",
    )?;
    let escaped: String = response.iter().map(|b| format!("\\{b:02x}")).collect();
    // The request lands at 1024: [count=1][len=1]['x'][dtype][rank=1][1][len=4][f32] puts the
    // value at byte 7.
    let wat = format!(
        r#"(module
          (memory (export "memory") 1)
          (data (i32.const 4096) "{escaped}")
          (func (export "capsule_abi_version") (result i32) i32.const 1)
          (func (export "capsule_init") (result i32) i32.const 0)
          (func (export "capsule_alloc") (param i32 i32) (result i32) i32.const 1024)
          (func (export "capsule_free") (param i32 i32 i32))
          (func (export "capsule_infer") (param $p i32) (param $n i32) (result i64)
            (local $x f32)
            (local.set $x (f32.load (i32.add (local.get $p) (i32.const 7))))
            (if (f32.eq (local.get $x) (f32.const 1)) (then (loop $forever (br $forever))))
            (if (f32.eq (local.get $x) (f32.const 2))
              (then
                (loop $grow
                  (br_if $grow (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
                unreachable))
            (i64.or (i64.shl (i64.const 4096) (i64.const 32)) (i64.const {len}))))"#,
        len = response.len()
    );
    let mut wasm = wat::parse_str(&wat)?;
    let mut manifest = fixture_capsule("digits_logreg")?.manifest.clone();
    manifest.name = "wat-guest".into();
    manifest.inputs = vec![capsule_format::TensorSpec {
        name: "x".into(),
        dtype: capsule_format::DType::F32,
        shape: vec![capsule_format::Dim::Fixed(1)],
    }];
    manifest.golden.clear();
    wasm_encoder::Section::append_to(
        &wasm_encoder::CustomSection {
            name: "capsule.manifest".into(),
            data: manifest.to_section_bytes()?.into(),
        },
        &mut wasm,
    );
    Ok(wasm)
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
