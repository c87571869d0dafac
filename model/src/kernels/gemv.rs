//! The guest's matrix-vector kernels: tract's wasm GEMV kernels of 8, 16 and 32 rows with
//! their product loop replaced.
//!
//! tract's loop (`tract-linalg/src/wasm/mmm_f32_gemv.rs`) runs one k step per iteration.
//! wasmtime checks the epoch (the inference deadline) at every loop header, and the check's
//! slow path is a call that clobbers every vector register, so Cranelift keeps the loop's
//! accumulators in stack slots: every step loads and stores each of them, which is most of
//! what the loop costs (`perf annotate` of the 32-row kernel in a dense layer;
//! docs/benchmarks.md, "Matrix-vector products"). `product!` runs 32 steps per
//! iteration, each followed by its exit test, as [`super::wasm`]'s 8x8 loop does, so the
//! accumulators go through the stack once per 32 steps.
//!
//! Each sum is accumulated from zero in tract's order with tract's operation (a multiply
//! then an add, or `relaxed_madd` where tract's kernel uses it), then the rest of the
//! program (bias, activation, store) runs on tract's own kernel from the tile (`LoadTile`).
//! So the outputs are tract's bits, which [`check`] tests at every build.

use std::arch::wasm32::*;
use std::mem::MaybeUninit;

use tract_linalg::mmm::{DynKernel, FusedKerSpec};
use tract_linalg::mmm_routines::MmmRoutine;
use tract_onnx::tract_core::tract_linalg;

/// The 16-row kernel's name, as tract's dispatch knows it.
pub const NAME_16: &str = "capsule_f32_16x1";
/// The 32-row kernel's name.
pub const NAME_32: &str = "capsule_f32_32x1";

/// Longest program run through a local copy (tract's are a handful of ops); longer ones
/// run on tract's kernel as they are.
const MAX_OPS: usize = 32;

/// How a kernel of `Q` accumulators (`4 * Q` rows) multiplies and adds: as tract's kernel of
/// that size does.
#[derive(Clone, Copy)]
enum Madd {
    /// A multiply then an add (tract's `madd_f32x4_nofma!`: its 8- and 16-row kernels).
    Separate,
    /// `relaxed_madd` in a relaxed-simd guest, a multiply then an add otherwise (tract's
    /// `madd_f32x4!`: its 32-row kernel).
    Fused,
}

/// `acc + a * b` the way `how` says.
#[inline(always)]
fn madd(how: Madd, acc: v128, a: v128, b: v128) -> v128 {
    match how {
        #[cfg(target_feature = "relaxed-simd")]
        Madd::Fused => f32x4_relaxed_madd(a, b, acc),
        _ => f32x4_add(acc, f32x4_mul(a, b)),
    }
}

/// One k step of `product!`'s loop on the accumulators `$acc` (vector `$q` of each step's
/// `$n`), step `$i0 + $j` ([`steps!`]'s arguments last: its operands at constant offsets
/// from one address per 32 steps).
macro_rules! step {
    ($how:expr, $n:literal, $pa:ident, $pb:ident, [$($acc:ident $q:literal),+], $i0:expr, $j:expr) => {{
        // SAFETY (of every read of the step): `i0 + j < k`, and the caller's contract.
        let (a, b) = unsafe { ($pa.add($n * $i0).add($n * $j), $pb.add($i0).add($j)) };
        // SAFETY: as above.
        let b = f32x4_splat(unsafe { *b });
        $(
            // SAFETY: as above.
            $acc = madd($how, $acc, unsafe { v128_load(a.add($q)) }, b);
        )+
    }};
}

/// Defines `$name(k, pa, pb, out)`: `out[q] = Σ_i A[i][q] * b[i]` for the `$n` vectors of
/// rows of one panel (`pa` holds `k` steps of `$n` vectors, `pb` `k` values), 32 steps per
/// loop iteration ([`steps!`]).
macro_rules! product {
    ($name:ident, $how:expr, $n:literal, [$($acc:ident $q:literal),+]) => {
        /// # Safety
        /// `pa` is readable for `k` steps of that many `v128`, `pb` for `k` f32.
        #[inline(never)]
        unsafe fn $name(k: usize, pa: *const v128, pb: *const f32, out: &mut [v128]) {
            $(let mut $acc = f32x4_splat(0.0);)+
            steps!(k, step, [$how, $n, pa, pb, [$($acc $q),+],]);
            for (slot, v) in out.iter_mut().zip([$($acc),+]) {
                *slot = v;
            }
        }
    };
}

product!(product_2, Madd::Separate, 2, [c0 0, c1 1]);
product!(product_4, Madd::Separate, 4, [c0 0, c1 1, c2 2, c3 3]);
// Four of a step's eight vectors: the 32-row kernel runs two passes of 16 rows. In one
// pass of eight accumulators, LLVM loads a step's eight vectors of A ahead of its
// arithmetic, and with the broadcast of B that is more than x86-64's sixteen vector
// registers: an accumulator went through the stack at every step. Each row's sum is the
// same either way.
product!(product_4_of_8, Madd::Fused, 8, [c0 0, c1 1, c2 2, c3 3]);

/// The kernel of `Q` accumulators in tract's calling convention: a program that starts
/// with `Clear` and a product has the product computed by `product` (in one pass per
/// offset of `passes`, each on an equal share of a step's vectors), then the rest run
/// by `tract` (tract's kernel of the same size) from the tile; any other program runs on
/// `tract` as it is.
///
/// # Safety
/// `program` is one tract built for this kernel's geometry and packing: every pointer in it
/// covers the bytes its op reads or writes.
#[inline(always)]
unsafe fn kernel<const Q: usize>(
    product: Product,
    passes: &[usize],
    tract: unsafe fn(&[FusedKerSpec<f32>]) -> isize,
    program: &[FusedKerSpec<f32>],
) -> isize {
    let (Some(FusedKerSpec::Clear), Some(&FusedKerSpec::AddMatMul { k, pa, pb, .. })) =
        (program.first(), program.get(1))
    else {
        // SAFETY: the caller's contract.
        return unsafe { tract(program) };
    };
    if program.len() > MAX_OPS + 1 {
        // SAFETY: the caller's contract.
        return unsafe { tract(program) };
    }
    let mut tile = Tile([f32x4_splat(0.0); Q]);
    let pa = pa.cast::<v128>();
    // SAFETY: `pa` is a packed panel of `k` steps of `Q` vectors (read with `v128_load`,
    // which takes any alignment), `pb` one of `k` f32 (the caller's contract). Each pass covers
    // `Q / passes.len()` of a step's vectors, from its offset in `passes`.
    unsafe {
        let per_pass = Q / passes.len();
        for (&first, out) in passes.iter().zip(tile.0.chunks_exact_mut(per_pass)) {
            product(k, pa.add(first), pb.cast(), out);
        }
    }
    let rest = &program[2..];
    // Only the ops the program uses are written (the array is most of a kernel call's
    // own time when initialized whole).
    let mut ops = [const { MaybeUninit::<FusedKerSpec<f32>>::uninit() }; MAX_OPS];
    ops[0].write(FusedKerSpec::LoadTile(
        std::ptr::null(),
        tile.0.as_ptr().cast(),
    ));
    for (slot, op) in ops[1..].iter_mut().zip(rest) {
        slot.write(*op);
    }
    // SAFETY: the first `rest.len() + 1 <= MAX_OPS` ops are written above (`rest` has at
    // most `MAX_OPS - 1`, checked on entry). They are the program with its first two ops
    // replaced by loading the tile they compute (`Q` vectors, which `tract`'s `LoadTile`
    // reads), which lives until the call returns.
    unsafe {
        let ops =
            std::slice::from_raw_parts(ops.as_ptr().cast::<FusedKerSpec<f32>>(), rest.len() + 1);
        tract(ops)
    }
}

/// The product's sums, aligned for tract's `LoadTile`, which dereferences `*const v128`.
#[repr(C, align(16))]
struct Tile<const Q: usize>([v128; Q]);

/// One of [`product_2`], [`product_4`], [`product_4_of_8`].
type Product = unsafe fn(usize, *const v128, *const f32, &mut [v128]);

/// The 8-row kernel (tract's `wasm_f32_8x1`'s product).
///
/// # Safety
/// As [`kernel`].
pub unsafe fn kernel_8(program: &[FusedKerSpec<f32>]) -> isize {
    // SAFETY: the caller's contract.
    unsafe {
        kernel::<2>(
            product_2,
            &[0],
            tract_linalg::wasm::wasm_f32_8x1.kernel,
            program,
        )
    }
}

/// The 16-row kernel (tract's `wasm_f32_16x1`'s product).
///
/// # Safety
/// As [`kernel`].
unsafe fn kernel_16(program: &[FusedKerSpec<f32>]) -> isize {
    // SAFETY: the caller's contract.
    unsafe {
        kernel::<4>(
            product_4,
            &[0],
            tract_linalg::wasm::wasm_f32_16x1.kernel,
            program,
        )
    }
}

/// The 32-row kernel (tract's `wasm_f32_32x1`'s product).
///
/// # Safety
/// As [`kernel`].
unsafe fn kernel_32(program: &[FusedKerSpec<f32>]) -> isize {
    // SAFETY: the caller's contract.
    unsafe {
        kernel::<8>(
            product_4_of_8,
            &[0, 4],
            tract_linalg::wasm::wasm_f32_32x1.kernel,
            program,
        )
    }
}

/// tract's kernel `base` under `name` with `kernel` as its entry point; its packings and
/// its preference (below the guest's 8x8 and 8x1, which are boosted: these two are reached
/// by name only, from the tier's choice for one column) unchanged.
fn renamed<const MR: usize>(
    base: &DynKernel<MR, 1, f32>,
    name: &str,
    kernel: unsafe fn(&[FusedKerSpec<f32>]) -> isize,
) -> DynKernel<MR, 1, f32> {
    let mut k = base.clone();
    k.name = name.to_owned();
    k.kernel = kernel;
    k
}

inventory::submit! {
    MmmRoutine {
        make: || renamed(&tract_linalg::wasm::wasm_f32_16x1, NAME_16, kernel_16).mmm()
    }
}

inventory::submit! {
    MmmRoutine {
        make: || renamed(&tract_linalg::wasm::wasm_f32_32x1, NAME_32, kernel_32).mmm()
    }
}

/// Runs a product with epilogues through each kernel and through tract's kernel of the same
/// size, and compares the outputs bit for bit (NaN against NaN). An error names the first
/// kernel, depth and value that differ.
pub fn check() -> Result<(), String> {
    use FusedKerSpec as F;
    use tract_linalg::mmm::OutputStoreKer;
    let mut next = super::wasm::check_values(0x2545_f491);
    type Kernel = unsafe fn(&[FusedKerSpec<f32>]) -> isize;
    let kernels: [(&str, usize, Kernel, Kernel); 3] = [
        ("8x1", 8, kernel_8, tract_linalg::wasm::wasm_f32_8x1.kernel),
        (
            "16x1",
            16,
            kernel_16,
            tract_linalg::wasm::wasm_f32_16x1.kernel,
        ),
        (
            "32x1",
            32,
            kernel_32,
            tract_linalg::wasm::wasm_f32_32x1.kernel,
        ),
    ];
    for (name, mr, ours, tracts) in kernels {
        for k in [1, 7, 8, 9, 27, 31, 32, 33, 64, 75] {
            let pa: Vec<f32> = (0..mr * k).map(|_| next()).collect();
            let pb: Vec<f32> = (0..k).map(|_| next()).collect();
            let bias: Vec<f32> = (0..mr).map(|_| next()).collect();
            let run = |kernel: Kernel| {
                let mut out = vec![f32::NAN; 2 * mr];
                let program = [
                    F::Clear,
                    F::AddMatMul {
                        k,
                        pa: pa.as_ptr().cast(),
                        pb: pb.as_ptr().cast(),
                        packing: 0,
                    },
                    F::PerRowAdd(bias.as_ptr()),
                    F::ScalarMax(0.0),
                    F::Store(OutputStoreKer {
                        ptr: out.as_mut_ptr().cast(),
                        row_byte_stride: 8,
                        col_byte_stride: 4,
                        item_size: 4,
                    }),
                    F::Done,
                ];
                // SAFETY: `pa` holds `k` steps of `mr` rows, `pb` `k` values, `bias` `mr`,
                // and `out` `mr` rows of 8 bytes.
                unsafe { kernel(&program) };
                out
            };
            let (ours, tracts) = (run(ours), run(tracts));
            if let Some(i) = (0..ours.len()).find(|&i| !super::wasm::same_bits(ours[i], tracts[i]))
            {
                return Err(format!(
                    "GEMV {name}, k {k}, value {i}: {} where tract computes {}",
                    ours[i], tracts[i]
                ));
            }
        }
    }
    Ok(())
}
