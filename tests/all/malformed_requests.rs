//! Malformed requests are refused before the guest runs (typed errors), and malformed bytes
//! that reach the guest anyway get a typed guest error, never a trap.

use capsule_format::wire::GuestErrorKind;
use capsule_format::{DType, NamedTensor, Tensor};
use capsule_runtime::{Error, LoadedCapsule, RunConfig};
use capsule_tests::{engine, fixture_capsule};

fn capsule(config: RunConfig) -> anyhow::Result<LoadedCapsule> {
    Ok(LoadedCapsule::load(
        &engine(),
        fixture_capsule("digits_mlp")?.bytes.clone(),
        config,
    )?)
}

fn input(tensor: Tensor) -> Vec<NamedTensor> {
    vec![NamedTensor {
        name: "input".into(),
        tensor,
    }]
}

fn bad_request(c: &LoadedCapsule, inputs: &[NamedTensor]) -> String {
    match c.infer(inputs) {
        Err(Error::BadRequest(m)) => m,
        other => panic!("expected BadRequest, got {other:?}"),
    }
}

#[test]
fn requests_are_checked_against_the_signature() -> anyhow::Result<()> {
    let c = capsule(RunConfig::default())?;
    let ok = Tensor::from_f32(vec![1, 64], &[1.0; 64])?;
    assert_eq!(
        bad_request(&c, &input(Tensor::from_i64(vec![1, 64], &[1; 64])?)),
        "input \"input\" has datatype INT64, the capsule expects FP32"
    );
    assert_eq!(
        bad_request(&c, &input(Tensor::from_f32(vec![1, 63], &[1.0; 63])?)),
        "input \"input\" has shape [1, 63], the capsule expects [N, 64]"
    );
    assert_eq!(
        bad_request(&c, &input(Tensor::from_f32(vec![64], &[1.0; 64])?)),
        "input \"input\" has shape [64], the capsule expects [N, 64]"
    );
    // Issue 16: a zero-sized symbolic dimension reached tract and panicked the guest.
    assert_eq!(
        bad_request(&c, &input(Tensor::from_f32(vec![0, 64], &[])?)),
        "input \"input\": dimension N is 0; a symbolic dimension must be at least 1"
    );
    // Data shorter than the shape says (built without the checking constructor).
    let short = Tensor {
        dtype: DType::F32,
        shape: vec![2, 64],
        data: vec![0; 4 * 64],
    };
    assert_eq!(
        bad_request(&c, &input(short)),
        "input \"input\": tensor \"\": shape [2, 64] of FP32 needs 512 bytes, got 256"
    );
    assert_eq!(bad_request(&c, &[]), "missing input \"input\"");
    let mut two = input(ok.clone());
    two.push(NamedTensor {
        name: "extra".into(),
        tensor: ok.clone(),
    });
    assert_eq!(
        bad_request(&c, &two),
        "unknown input \"extra\"; the capsule's inputs are [\"input\"]"
    );
    let mut twice = input(ok.clone());
    twice.push(twice[0].clone());
    assert_eq!(bad_request(&c, &twice), "input \"input\" is given twice");
    // The capsule still works after all of that.
    assert_eq!(c.infer(&input(ok))?.len(), 2);
    Ok(())
}

#[test]
fn oversized_requests_are_refused() -> anyhow::Result<()> {
    let c = capsule(RunConfig {
        max_request_bytes: 1 << 20,
        ..RunConfig::default()
    })?;
    let rows = (1 << 20) / (64 * 4) + 1;
    let big = Tensor::from_f32(vec![rows as u64, 64], &vec![0.0; rows * 64])?;
    match c.infer(&input(big)) {
        Err(Error::RequestTooLarge { size, limit }) => {
            assert_eq!(size, rows as u64 * 256);
            assert_eq!(limit, 1 << 20);
        }
        other => panic!("expected RequestTooLarge, got {other:?}"),
    }
    Ok(())
}

#[test]
fn garbage_bytes_reaching_the_guest_get_a_typed_error() -> anyhow::Result<()> {
    let c = capsule(RunConfig::default())?;
    for garbage in [
        &b""[..],
        b"\x01",
        b"\xff\xff\xff\xff\xff",
        b"\x01\x05input\x0a\x02\x01\x40\xfd\xff\xff\xff\xff\xff\xff\xff\x7f",
    ] {
        match c.infer_encoded(garbage) {
            Err(Error::Guest(e)) => {
                assert_eq!(e.kind, GuestErrorKind::BadInput, "{garbage:?}: {e}")
            }
            other => panic!("{garbage:?}: expected a guest BadInput error, got {other:?}"),
        }
    }
    assert_eq!(
        c.stats().traps.load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // A well-encoded request whose data does not fit its shape (the host check bypassed).
    let bad = capsule_format::wire::encode(
        &capsule_format::wire::InferRequest {
            inputs: vec![NamedTensor {
                name: "input".into(),
                tensor: Tensor {
                    dtype: DType::F32,
                    shape: vec![1, 64],
                    data: vec![0; 8],
                },
            }],
        },
        "request",
    )?;
    match c.infer_encoded(&bad) {
        Err(Error::Guest(e)) => {
            assert_eq!(e.kind, GuestErrorKind::BadInput);
            assert_eq!(
                e.message,
                "input \"input\": tensor \"\": shape [1, 64] of FP32 needs 256 bytes, got 8"
            );
        }
        other => panic!("expected a guest BadInput error, got {other:?}"),
    }
    Ok(())
}
