//! Host kernels: a capsule hands its dense products to the node's native kernel when the
//! engine allows it, computes them in wasm otherwise, and answers within its golden tolerance
//! either way; a capsule that passes hostile pointers only traps its own instance.

use std::sync::atomic::Ordering;

use capsule_format::{HostKernels, NamedTensor, Tensor};
use capsule_runtime::{
    CapsuleEngine, CapsuleImage, EngineConfig, Error, LoadedCapsule, RunConfig, golden as compare,
};
use capsule_tests::{
    FIXTURE_MODELS, WatCapsule, append_manifest, engine, fixture_capsule, golden, test_cache_dir,
    wat_capsule,
};

fn host_engine() -> anyhow::Result<std::sync::Arc<CapsuleEngine>> {
    let engine = CapsuleEngine::new(EngineConfig {
        cache_dir: Some(test_cache_dir()),
        host_kernels: true,
        ..EngineConfig::default()
    })?;
    if !engine.host_kernels() {
        eprintln!("SKIP host kernels: this machine has no AVX2+FMA");
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "CI machines must run the host kernels (x86-64 with AVX2 and FMA)"
        );
    }
    Ok(engine)
}

/// Every fixture: the manifest says the code can use host kernels; with them on, the
/// products of convolutions and batched matrices run natively (counted), the outputs stay
/// within each golden sample's tolerance of onnxruntime's, and they are close to (not
/// necessarily bit-identical with) the wasm kernels' outputs, which the deterministic engine
/// reproduces exactly on every call.
#[test]
fn native_products_stay_within_the_golden_tolerance() -> anyhow::Result<()> {
    let host = host_engine()?;
    let wasm = engine();
    assert!(
        !wasm.host_kernels(),
        "the shared test engine is deterministic"
    );
    for name in FIXTURE_MODELS {
        let built = fixture_capsule(name)?;
        assert_eq!(built.manifest.host_kernels, HostKernels::V2, "{name}");
        let on = LoadedCapsule::install(
            &host,
            CapsuleImage::parse(built.bytes.clone())?,
            RunConfig::default(),
        )?;
        let off = LoadedCapsule::install(
            &wasm,
            CapsuleImage::parse(built.bytes.clone())?,
            RunConfig::default(),
        )?;
        for sample in golden(name)? {
            let native = on.infer(&sample.inputs)?;
            compare::compare(&sample.outputs, &native, sample.tolerance)
                .map_err(|e| anyhow::anyhow!("{name}/{} with host kernels: {e}", sample.name))?;
            let portable = off.infer(&sample.inputs)?;
            compare::compare(&portable, &native, sample.tolerance).map_err(|e| {
                anyhow::anyhow!("{name}/{}: host vs wasm kernels: {e}", sample.name)
            })?;
            assert_eq!(
                portable,
                off.infer(&sample.inputs)?,
                "{name}/{}",
                sample.name
            );
        }
        assert_eq!(
            off.stats().host_kernel_calls.load(Ordering::Relaxed),
            0,
            "{name}: host kernels off means none are called"
        );
        let calls = on.stats().host_kernel_calls.load(Ordering::Relaxed);
        // The MNIST CNN's convolutions are matrix products with many columns (GEMM); the
        // other fixtures at batch 1 are matrix-vector products, which stay in wasm.
        if name == "mnist_cnn" && host.host_kernels() {
            assert!(calls > 0, "{name}: its convolutions ran on the host");
        }
        if !host.host_kernels() {
            assert_eq!(calls, 0, "{name}: unsupported machines call nothing");
        }
    }
    Ok(())
}

/// A batch of 8 rows of `name`'s first golden sample: the host products the row alone
/// asked for, those the batch asked for, and the batch's outputs checked row by row against
/// the row alone (within the golden tolerance, or bit for bit when `exact`).
fn batch_of_eight(
    host: &std::sync::Arc<CapsuleEngine>,
    name: &str,
    exact: bool,
) -> anyhow::Result<(u64, u64)> {
    let built = fixture_capsule(name)?;
    let capsule = LoadedCapsule::install(
        host,
        CapsuleImage::parse(built.bytes.clone())?,
        RunConfig::default(),
    )?;
    let sample = golden(name)?.remove(0);
    let calls = || capsule.stats().host_kernel_calls.load(Ordering::Relaxed);
    let one_row = capsule.infer(&sample.inputs)?;
    let per_row = calls();
    const ROWS: u64 = 8;
    let batch: Vec<NamedTensor> = sample
        .inputs
        .iter()
        .map(|input| {
            let t = &input.tensor;
            anyhow::ensure!(t.shape.first() == Some(&1), "one row: {:?}", t.shape);
            let mut shape = t.shape.clone();
            shape[0] = ROWS;
            Ok(NamedTensor {
                name: input.name.clone(),
                tensor: Tensor::new(t.dtype, shape, t.data.repeat(ROWS as usize))?,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let outputs = capsule.infer(&batch)?;
    let batch_calls = calls() - per_row;
    for (batch_output, row_output) in outputs.iter().zip(&one_row) {
        let values = batch_output.tensor.to_f64_vec()?;
        let row = row_output.tensor.to_f64_vec()?;
        assert_eq!(values.len(), row.len() * ROWS as usize);
        for (i, chunk) in values.chunks(row.len()).enumerate() {
            for (a, b) in chunk.iter().zip(&row) {
                let within = if exact {
                    a == b
                } else {
                    (a - b).abs() <= sample.tolerance * b.abs().max(1.0)
                };
                assert!(within, "{name}: row {i} of the batch: {a} vs {b} alone");
            }
        }
    }
    Ok((per_row, batch_calls))
}

/// A batch's products reach the host too. tract picks kernels for a batch whose size is
/// only known at run time (dense layers, 1x1 convolutions) by its own shape rules rather
/// than by the tiers that route convolutions; the guest's kernels are boosted so that those
/// rules choose between them (`model/src/kernels.rs`). Measured: a ResNet-50's 1x1
/// convolutions, 80% of its products, stayed in wasm before that. Here the digits MLP's
/// dense layers (k = 64 and more; a dense model keeps batches on its general plan) run on
/// the host for a batch of 8, where its row alone is a matrix-vector product that stays in
/// wasm, and every row of the batch answers as the row alone does, within the golden
/// tolerance.
#[test]
fn a_batchs_dense_layer_runs_on_the_host() -> anyhow::Result<()> {
    let host = host_engine()?;
    if !host.host_kernels() {
        return Ok(());
    }
    let (per_row, batch_calls) = batch_of_eight(&host, "digits_mlp", false)?;
    assert!(
        batch_calls > per_row,
        "digits_mlp: {batch_calls} host products for 8 rows, {per_row} for one: the dense layers stayed in wasm"
    );
    Ok(())
}

/// A convolutional model with a one-row plan runs a batch row by row on it
/// (`LoadedModel::splits_rows`): the MNIST CNN's batch of 8 asks the host for exactly 8 times
/// the products of its row alone, and each row of the batch answers bit for bit as the row
/// alone does.
#[test]
fn a_convolutional_batch_runs_row_by_row() -> anyhow::Result<()> {
    let host = host_engine()?;
    if !host.host_kernels() {
        return Ok(());
    }
    let (per_row, batch_calls) = batch_of_eight(&host, "mnist_cnn", true)?;
    assert!(per_row > 0, "mnist_cnn: its convolutions ran on the host");
    assert_eq!(batch_calls, 8 * per_row, "mnist_cnn: row by row");
    Ok(())
}

/// A hand-written capsule of host kernels `version`: `imports`, then one page of memory with
/// `data`, the guest ABI's exports, and `capsule_infer(p, n)` whose body is `infer` (the
/// request's one f32 is at `p + 7`). Its manifest is `wat_capsule`'s with `version`.
fn kernel_capsule(
    version: HostKernels,
    imports: &str,
    data: &str,
    infer: &str,
) -> anyhow::Result<Vec<u8>> {
    let mut wasm = wat::parse_str(format!(
        r#"(module
          {imports}
          (memory (export "memory") 1)
          {data}
          (func (export "capsule_abi_version") (result i32) i32.const 1)
          (func (export "capsule_init") (result i32) i32.const 0)
          (func (export "capsule_alloc") (param i32 i32) (result i32) i32.const 1024)
          (func (export "capsule_free") (param i32 i32 i32))
          (func (export "capsule_infer") (param $p i32) (param $n i32) (result i64)
            {infer}))"#
    ))?;
    let mut manifest = CapsuleImage::parse(wat_capsule(&WatCapsule::default())?)?
        .manifest
        .clone();
    manifest.host_kernels = version;
    append_manifest(&mut wasm, &manifest)?;
    Ok(wasm)
}

/// The request `x = case` of a `kernel_capsule`.
fn x(case: f32) -> anyhow::Result<Vec<NamedTensor>> {
    Ok(vec![NamedTensor {
        name: "x".into(),
        tensor: Tensor::from_f32(vec![1], &[case])?,
    }])
}

/// A hand-written capsule that imports the host kernels and asks for products with hostile
/// operands: every call outside memory, misaligned or overflowing traps its instance (the
/// node stays up and the capsule keeps serving), and an in-bounds call computes the product.
#[test]
fn hostile_operands_trap_only_their_instance() -> anyhow::Result<()> {
    let host = host_engine()?;
    if !host.host_kernels() {
        return Ok(());
    }
    // x is the case number: the arguments of `f32_mmm_8x8(k, a, b, out)` are read from a
    // table at 8192 + 16 * x.
    let cases: [(u32, u32, u32, u32); 9] = [
        (1, 65536, 0, 1024),                // A starts at the end of memory
        (4, 0, 65536 - 64, 1024),           // B runs off the end
        (1, 0, 0, 65536 - 255),             // the tile runs off the end
        (u32::MAX, 0, 0, 1024),             // a huge k
        (1, !31, 0, 1024),                  // a pointer near 4 GiB
        (1, 0, u32::MAX, 1024),             // wrapping is not a way in
        (1, 16, 0, 1024),                   // A not 32-byte aligned
        (1 << 27, 0, 0, 1024),              // k * 32 = 4 GiB
        (2, 8192 + 512, 8192 + 768, 32768), // in bounds (zeros): computed
    ];
    let table: String = cases
        .iter()
        .flat_map(|(k, a, b, out)| [k, a, b, out])
        .flat_map(|v| v.to_le_bytes())
        .map(|b| format!("\\{b:02x}"))
        .collect();
    let wasm = kernel_capsule(
        HostKernels::V1,
        r#"(import "capsule_kernels" "f32_mmm_8x8" (func $mmm (param i32 i32 i32 i32)))
          (import "capsule_kernels" "abi_version" (func $abi (result i32)))"#,
        &format!(r#"(data (i32.const 8192) "{table}")"#),
        r#"(local $row i32)
            (if (i32.ne (call $abi) (i32.const 1)) (then unreachable))
            (local.set $row (i32.add (i32.const 8192)
              (i32.mul (i32.trunc_f32_u (f32.load (i32.add (local.get $p) (i32.const 7))))
                       (i32.const 16))))
            (call $mmm
              (i32.load (local.get $row))
              (i32.load (i32.add (local.get $row) (i32.const 4)))
              (i32.load (i32.add (local.get $row) (i32.const 8)))
              (i32.load (i32.add (local.get $row) (i32.const 12))))
            ;; no response (a null pointer): only the product matters here
            (i64.const 0)"#,
    )?;
    let capsule = LoadedCapsule::install(&host, CapsuleImage::parse(wasm)?, RunConfig::default())?;
    for (case, args) in cases.iter().enumerate().take(cases.len() - 1) {
        match capsule.infer(&x(case as f32)?) {
            Err(Error::Trap { message, .. }) => assert!(
                message.contains("capsule_kernels.f32_mmm_8x8"),
                "case {case} {args:?}: {message}"
            ),
            other => panic!("case {case} {args:?}: expected a trap, got {other:?}"),
        }
    }
    assert_eq!(
        capsule.stats().traps.load(Ordering::Relaxed),
        cases.len() as u64 - 1
    );
    // The in-bounds product ran (its response, a null pointer, is then refused as a bad
    // response: what matters is that the host computed the tile and the node stays up).
    let _ = capsule.infer(&x((cases.len() - 1) as f32)?);
    assert_eq!(capsule.stats().host_kernel_calls.load(Ordering::Relaxed), 1);
    Ok(())
}

/// A hand-written capsule of version 2 that asks for blocks (`f32_mmm_block`) described by
/// hostile calls: unknown epilogue steps, too much work, every operand, bias, residual and
/// output range outside memory or misaligned, and the call itself outside memory. Each traps
/// its instance only; an in-bounds block is computed and stored; and an engine without host
/// kernels answers 0 and refuses the call.
#[test]
fn hostile_block_calls_trap_only_their_instance() -> anyhow::Result<()> {
    use capsule_format::kernels::{BLOCK_CALL_BYTES, BlockCall, BlockOps};
    let host = host_engine()?;
    if !host.host_kernels() {
        return Ok(());
    }
    const TABLE: u32 = 8192;
    // Two panels of A (k = 2) at 16384, one of B after them, the output at 32768.
    let good = BlockCall {
        k: 2,
        rows: 8,
        cols: 8,
        a: 16384,
        a_stride: 64,
        b: 16384 + 128,
        b_stride: 0,
        ops: (BlockOps::ROW_BIAS | BlockOps::RESIDUAL | BlockOps::MAX).0,
        bias: 20480,
        residual: 24576,
        residual_row_stride: 32,
        residual_col_stride: 4,
        store: 32768,
        store_row_stride: 32,
        store_col_stride: 4,
        max: 0.0,
        min: 0.0,
    };
    let max_k = capsule_format::HOST_KERNELS_MAX_K;
    let cases: Vec<(&str, BlockCall)> = vec![
        ("an unknown step", BlockCall { ops: 64, ..good }),
        (
            "two biases",
            BlockCall {
                ops: (BlockOps::ROW_BIAS | BlockOps::COL_BIAS).0,
                ..good
            },
        ),
        ("an empty block", BlockCall { rows: 0, ..good }),
        (
            "a huge k",
            BlockCall {
                k: max_k + 1,
                ..good
            },
        ),
        (
            "too many tiles",
            BlockCall {
                k: 1,
                rows: u32::MAX,
                a_stride: 0,
                ..good
            },
        ),
        (
            "too much work",
            BlockCall {
                k: max_k,
                rows: 16,
                a_stride: 0,
                ..good
            },
        ),
        (
            "A off the end",
            BlockCall {
                a: 65536 - 32,
                ..good
            },
        ),
        (
            "A misaligned",
            BlockCall {
                a: 16384 + 16,
                ..good
            },
        ),
        (
            "A's stride misaligned",
            BlockCall {
                rows: 16,
                a_stride: 48,
                ..good
            },
        ),
        (
            "A's stride past 4 GiB",
            BlockCall {
                rows: 16,
                a_stride: u32::MAX - 31,
                ..good
            },
        ),
        (
            "B off the end",
            BlockCall {
                b: 65536 - 32,
                ..good
            },
        ),
        (
            "B's stride off the end",
            BlockCall {
                cols: 16,
                b_stride: 65536,
                store_row_stride: 64,
                residual_row_stride: 64,
                ..good
            },
        ),
        (
            "the bias off the end",
            BlockCall {
                bias: 65536 - 16,
                ..good
            },
        ),
        (
            "the column bias off the end",
            BlockCall {
                ops: BlockOps::COL_BIAS.0,
                bias: 65536 - 4,
                ..good
            },
        ),
        (
            "the residual below 0",
            BlockCall {
                residual: 1024,
                residual_row_stride: -4096,
                ..good
            },
        ),
        (
            "the residual past 4 GiB",
            BlockCall {
                residual: u32::MAX - 3,
                ..good
            },
        ),
        (
            "the output off the end",
            BlockCall {
                store: 65536 - 4,
                ..good
            },
        ),
        (
            "the output's stride",
            BlockCall {
                store_row_stride: i32::MAX,
                ..good
            },
        ),
        (
            "the output's negative stride",
            BlockCall {
                store_col_stride: i32::MIN,
                ..good
            },
        ),
    ];
    let table: String = cases
        .iter()
        .map(|(_, call)| call)
        .chain([&good])
        .flat_map(|call| call.to_bytes())
        .map(|b| format!("\\{b:02x}"))
        .collect();
    // x = case number; x = -1: the call itself at the end of memory; x = -2: the version.
    let wasm = kernel_capsule(
        HostKernels::V2,
        r#"(import "capsule_kernels" "f32_mmm_block" (func $block (param i32)))
          (import "capsule_kernels" "abi_version" (func $abi (result i32)))"#,
        &format!(r#"(data (i32.const {TABLE}) "{table}")"#),
        &format!(
            r#"(local $x f32)
            (local.set $x (f32.load (i32.add (local.get $p) (i32.const 7))))
            ;; x = -2: only ask for the version (2, or a trap)
            (if (f32.eq (local.get $x) (f32.const -2))
              (then (if (i32.ne (call $abi) (i32.const 2)) (then unreachable))
                    (return (i64.const 0))))
            (if (f32.lt (local.get $x) (f32.const 0))
              (then (call $block (i32.const {end})))
              (else (call $block (i32.add (i32.const {TABLE})
                (i32.mul (i32.trunc_f32_u (local.get $x)) (i32.const {BLOCK_CALL_BYTES}))))))
            (i64.const 0)"#,
            end = 65536 - BLOCK_CALL_BYTES + 4,
        ),
    )?;
    let capsule = LoadedCapsule::install(
        &host,
        CapsuleImage::parse(wasm.clone())?,
        RunConfig::default(),
    )?;
    let expect_trap = |capsule: &LoadedCapsule, case: f32, what: &str, says: &str| {
        match capsule.infer(&x(case)?) {
            Err(Error::Trap { message, .. }) => assert!(
                message.contains("capsule_kernels.f32_mmm_block") && message.contains(says),
                "{what}: {message}"
            ),
            other => panic!("{what}: expected a trap, got {other:?}"),
        }
        anyhow::Ok(())
    };
    // What the node says for each (its check runs in this order, so each case meets its own).
    let reason = |what: &str| match what {
        "an unknown step" | "two biases" => "unknown epilogue steps",
        "an empty block" => "an empty block",
        "a huge k" => "k = ",
        "too many tiles" | "too much work" => "tile steps per call",
        "A misaligned" | "A's stride misaligned" => "aligned",
        w if w.starts_with("A's") || w.starts_with("A ") => "A's panels",
        w if w.starts_with("B") => "B's panels",
        w if w.contains("bias") => "the bias",
        w if w.contains("residual") => "the residual",
        _ => "the output",
    };
    for (case, (what, _)) in cases.iter().enumerate() {
        expect_trap(&capsule, case as f32, what, reason(what))?;
    }
    expect_trap(&capsule, -1.0, "the call at the end of memory", "outside")?;
    assert_eq!(
        capsule.stats().traps.load(Ordering::Relaxed),
        cases.len() as u64 + 1
    );
    // The in-bounds block ran: 1 tile (its response, a null pointer, is then refused as a
    // bad response: what matters is that the host computed it and the node stays up).
    let _ = capsule.infer(&x(cases.len() as f32)?);
    assert_eq!(capsule.stats().host_kernel_calls.load(Ordering::Relaxed), 1);
    // The node answers version 2 (the null response is refused, but it is not a trap).
    assert!(!matches!(capsule.infer(&x(-2.0)?), Err(Error::Trap { .. })));
    // Without host kernels the guest is told 0, and a call anyway is refused.
    let off = LoadedCapsule::install(&engine(), CapsuleImage::parse(wasm)?, RunConfig::default())?;
    assert!(
        matches!(off.infer(&x(-2.0)?), Err(Error::Trap { .. })),
        "told 0"
    );
    expect_trap(
        &off,
        cases.len() as f32,
        "host kernels off",
        "off for this instance",
    )?;
    Ok(())
}
