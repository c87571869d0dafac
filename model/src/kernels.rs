//! The guest's f32 matrix kernel: tract's own wasm 8x8 kernel, or the node's native kernel
//! through the `capsule_kernels` import when the node offers it (ARCHITECTURE.md, "Host
//! kernels").
//!
//! tract picks a plan's kernels when the model is optimized, which happens before the
//! snapshot, on the builder, where no node is around. So the plan always names this kernel
//! (`capsule_f32_8x8`, registered above tract's wasm tier), and the choice between the two
//! implementations is made per call:
//!
//! - host kernels off or unavailable (browsers, nodes that disable them, the builder): the
//!   product is computed by our own wasm loop (`product_8x8`), then the rest of the
//!   program (bias, activations, the store) runs on tract's `wasm_f32_8x8`; outputs are bit
//!   for bit those of tract's wasm kernel (same sums in the same order), faster where
//!   products are deep (see `portable`);
//! - host kernels on: each `AddMatMul` of the program (the dense product of one packed 8-row
//!   panel of A by one packed 8-column panel of B) is computed by the host into an 8x8 tile,
//!   and the program runs on tract's wasm kernel with that step replaced by adding the tile.
//!   Everything else (bias, activations, the store) stays in wasm.
//!
//! The packing is the one both sides read: 8 f32 per k step, A aligned to 256 bytes (what
//! tract's x86-64 FMA 8x8 kernel requires and loads with aligned moves). B is packed the same
//! way: a one-row plan sometimes swaps a convolution's operands (the weights become B), and
//! with one packing for both the weights pack to the same bytes either way, so the general
//! plan and the one-row plan hold them once (`share_constants`).
//!
//! tract reaches a kernel two ways. Where the product's column count is known when the model
//! is optimized (convolutions), it asks the tiers, and ours names this kernel. Where it is
//! symbolic (the batch: 1x1 convolutions and dense layers become products of
//! `n = pixels * batch` or `n = batch` columns), it keeps the suitable kernels of the highest
//! preference and picks by shape among them: a GEMV for one column, the widest tile for more.
//! So this kernel has a companion, `capsule_f32_8x1` (tract's `wasm_f32_8x1` with this
//! kernel's A packing, the matrix-vector products of a batch of one), and both are boosted
//! above tract's wasm kernels. Without the boost tract's own 8x8 won those products by name
//! order, and a ResNet-50's 1x1 convolutions (80% of its products) never reached the host.
//!
//! [`refresh`] asks the host at every inference whether it serves the kernel: a snapshot
//! taken on the builder must not carry the builder's answer to a node.
//!
//! On other targets this module registers nothing.

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm {
    use std::arch::wasm32::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    use tract_linalg::isa::{Arch, IsaSet};
    use tract_linalg::mmm::{DynKernel, FusedKerSpec, OutputStoreKer, Query, Suitable};
    use tract_linalg::mmm_routines::MmmRoutine;
    use tract_linalg::mmm_tiers::MmmTier;
    use tract_linalg::pack::Packing;
    use tract_onnx::prelude::DatumType;
    use tract_onnx::tract_core::tract_linalg;

    /// The kernel's name, as tract's dispatch knows it.
    pub const NAME: &str = "capsule_f32_8x8";
    /// Its matrix-vector companion (see the module's documentation).
    pub const GEMV_NAME: &str = "capsule_f32_8x1";
    /// Above tract's wasm kernels (0, or `NEVER_PREFERRED`), so that tract's shape rules
    /// choose between these two only.
    fn boost() -> isize {
        1
    }

    /// Longest program handled on the host path (tract's are a handful of ops); longer ones
    /// run on the wasm kernel.
    const MAX_OPS: usize = 32;
    /// Products (`AddMatMul` steps) per program on the host path.
    const MAX_PRODUCTS: usize = 4;
    /// Shallowest product sent to the host: below it the call costs more than the wasm
    /// kernel's work (the MNIST CNN's first convolution, k = 9, ran 10% slower on the host).
    const MIN_HOST_K: usize = 64;

    #[link(wasm_import_module = "capsule_kernels")]
    unsafe extern "C" {
        /// [`capsule_format::HOST_KERNELS_ABI`] when the host computes products, 0 otherwise.
        #[link_name = "abi_version"]
        safe fn host_abi_version() -> i32;
        /// `out[8x8, row-major] = A[k x 8 packed] * B[k x 8 packed]` (A's 8 values of one k
        /// step are 8 rows, B's 8 columns). The host traps on any range outside memory or an
        /// A not aligned to 32 bytes.
        #[link_name = "f32_mmm_8x8"]
        fn host_f32_mmm_8x8(k: usize, pa: *const u8, pb: *const u8, out: *mut f32);
    }

    static HOST: AtomicBool = AtomicBool::new(false);

    pub fn refresh() {
        HOST.store(
            host_abi_version() == capsule_format::HOST_KERNELS_ABI,
            Ordering::Relaxed,
        );
    }

    /// tract's calling convention.
    ///
    /// # Safety
    /// `program` is one tract built for this kernel's geometry and packings: every pointer in
    /// it covers the bytes its op reads or writes.
    unsafe fn kernel(program: &[FusedKerSpec<f32>]) -> isize {
        let (mut products, mut shallow, mut misaligned) = (0, false, false);
        for op in program {
            if let FusedKerSpec::AddMatMul { k, pa, .. } = op {
                products += 1;
                // Too shallow to pay for the call, or deeper than the host takes.
                shallow |= *k < MIN_HOST_K || *k > capsule_format::HOST_KERNELS_MAX_K as usize;
                // The host refuses (traps on) an A it cannot load with aligned moves; the
                // packing guarantees it, and a packing tract merged differently falls back
                // here rather than trapping.
                misaligned |= !(*pa as usize).is_multiple_of(32);
            }
        }
        if !HOST.load(Ordering::Relaxed)
            || products == 0
            || misaligned
            || shallow
            || products > MAX_PRODUCTS
            || program.len() > MAX_OPS
        {
            // SAFETY: the caller's contract, and the same geometry and packings.
            return unsafe { portable(program) };
        }
        let mut tiles = [[0f32; 64]; MAX_PRODUCTS];
        let mut ops = [FusedKerSpec::Done; MAX_OPS];
        let mut tile = tiles.iter_mut();
        for (slot, op) in ops.iter_mut().zip(program) {
            *slot = match *op {
                FusedKerSpec::AddMatMul { k, pa, pb, .. } => {
                    let Some(out) = tile.next() else {
                        // Counted above: unreachable, and harmless (the wasm kernel).
                        return unsafe { portable(program) };
                    };
                    // SAFETY: `pa` and `pb` are packed panels of `k` steps (the caller's
                    // contract) and `out` holds 64 f32; the host bounds-checks them anyway.
                    unsafe { host_f32_mmm_8x8(k, pa, pb, out.as_mut_ptr()) };
                    FusedKerSpec::AddUnicast(OutputStoreKer {
                        ptr: out.as_mut_ptr().cast(),
                        row_byte_stride: 32,
                        col_byte_stride: 4,
                        item_size: 4,
                    })
                }
                other => other,
            };
        }
        // SAFETY: the program with each product replaced by adding a local 8x8 row-major
        // tile, which lives until the call returns.
        unsafe { (tract_linalg::wasm::wasm_f32_8x8.kernel)(&ops[..program.len()]) }
    }

    /// The portable path: tract's wasm 8x8 kernel, but with the first product of a program
    /// (the one right after `Clear`, which every product of a plan is) computed by
    /// [`product_8x8`] into a row-major tile that the program then loads (`LoadTile`)
    /// instead of accumulating it. Bit for bit tract's result: each of the 64 sums is
    /// accumulated from zero in the same order, with the same multiply and add.
    ///
    /// Why: tract's kernel keeps sixteen `v128` accumulators live across its product loop,
    /// more than the sixteen vector registers of x86-64 leave once the operands are loaded,
    /// so Cranelift spills them and every multiply-add is a stack load and a stack store.
    /// [`product_8x8`] runs the tile as two passes of four rows, eight accumulators each,
    /// which stay in registers. With a multiply and an add per step (the deterministic
    /// guest) the loop is then bound by the CPU's two vector arithmetic ports, as tract's
    /// was by its spills, so it gains 0-10%; with `relaxed_madd` (one fused multiply-add)
    /// it does half the arithmetic (docs/benchmarks.md).
    ///
    /// # Safety
    /// As [`kernel`].
    unsafe fn portable(program: &[FusedKerSpec<f32>]) -> isize {
        let wasm = tract_linalg::wasm::wasm_f32_8x8.kernel;
        let (Some(FusedKerSpec::Clear), Some(&FusedKerSpec::AddMatMul { k, pa, pb, .. })) =
            (program.first(), program.get(1))
        else {
            // SAFETY: the caller's contract.
            return unsafe { wasm(program) };
        };
        if k < MIN_PORTABLE_K || program.len() > MAX_OPS + 1 {
            // SAFETY: the caller's contract.
            return unsafe { wasm(program) };
        }
        let mut tile = Tile([f32x4_splat(0.0); 16]);
        // SAFETY: `pa` and `pb` are packed panels of `k` steps of 8 f32 (the caller's
        // contract: this kernel's packings), A 16-byte aligned (to 256 bytes; B too, but B is
        // read with unaligned loads, so its alignment is not relied on).
        unsafe { product_8x8(k, pa.cast(), pb.cast(), &mut tile) };
        let mut ops = [FusedKerSpec::Done; MAX_OPS];
        ops[0] = FusedKerSpec::LoadTile(std::ptr::null(), tile.0.as_ptr().cast());
        let rest = &program[2..];
        ops[1..=rest.len()].copy_from_slice(rest);
        // SAFETY: the program with its first two ops replaced by loading the tile they
        // compute, which lives until the call returns.
        unsafe { wasm(&ops[..=rest.len()]) }
    }

    /// Shallowest product the portable path computes with [`product_8x8`]; shallower ones
    /// run tract's loop, where writing and loading the tile would be most of the work. (The
    /// MNIST CNN, whose first convolution has k = 9, measured the same either way.)
    const MIN_PORTABLE_K: usize = 8;

    #[repr(C, align(16))]
    struct Tile([v128; 16]);

    /// `tile = A * B` for one 8x8 tile: `pa` holds `k` steps of 8 rows, `pb` `k` steps of 8
    /// columns. Rows 0-3, then rows 4-7, each pass keeping its eight accumulators (four
    /// rows, two `v128` of four columns each) in registers. The multiply-add is tract's
    /// (`f32x4_relaxed_madd` in a relaxed-simd guest, a multiply then an add otherwise).
    ///
    /// # Safety
    /// `pa` and `pb` point to `2 * k` readable `v128` each.
    #[inline(never)]
    unsafe fn product_8x8(k: usize, pa: *const v128, pb: *const v128, tile: &mut Tile) {
        // SAFETY: the caller's contract, passed on.
        unsafe {
            half(k, pa, pb, &mut tile.0[..8]);
            half(k, pa.add(1), pb, &mut tile.0[8..]);
        }
    }

    /// Four rows of [`product_8x8`] (`pa` points to their four values of the first k step;
    /// each step's are 32 bytes further), stored row by row (low four columns, then high
    /// four) into `out`. One function for both halves: the guest's size counts.
    ///
    /// The loop runs eight k steps per iteration. wasmtime checks the epoch (the inference
    /// deadline) at every loop header, and the check's slow path is a call that clobbers
    /// every vector register, so Cranelift keeps loop-carried vectors in stack slots and
    /// loads and stores them once per iteration: per eight steps rather than per step.
    ///
    /// # Safety
    /// `pa.add(2 * i)` and `pb.add(2 * i)`, `pb.add(2 * i + 1)` are readable for `i < k`.
    #[inline(never)]
    unsafe fn half(k: usize, pa: *const v128, pb: *const v128, out: &mut [v128]) {
        let zero = f32x4_splat(0.0);
        let (mut c0l, mut c0h, mut c1l, mut c1h) = (zero, zero, zero, zero);
        let (mut c2l, mut c2h, mut c3l, mut c3h) = (zero, zero, zero, zero);
        macro_rules! step {
            ($i:expr) => {{
                let i = $i;
                // SAFETY: `i < k`, and the caller's contract.
                let (a, bl, bh) = unsafe {
                    (
                        v128_load(pa.add(2 * i)),
                        v128_load(pb.add(2 * i)),
                        v128_load(pb.add(2 * i + 1)),
                    )
                };
                let s = i32x4_shuffle::<0, 0, 0, 0>(a, a);
                c0l = madd(c0l, s, bl);
                c0h = madd(c0h, s, bh);
                let s = i32x4_shuffle::<1, 1, 1, 1>(a, a);
                c1l = madd(c1l, s, bl);
                c1h = madd(c1h, s, bh);
                let s = i32x4_shuffle::<2, 2, 2, 2>(a, a);
                c2l = madd(c2l, s, bl);
                c2h = madd(c2h, s, bh);
                let s = i32x4_shuffle::<3, 3, 3, 3>(a, a);
                c3l = madd(c3l, s, bl);
                c3h = madd(c3h, s, bh);
            }};
        }
        // Eight steps per iteration, each followed by its own exit test: the exits are
        // where Cranelift must have every accumulator computed, so it computes them step by
        // step, in registers (with one test per iteration it would load all 24 operands
        // first and compute each accumulator's whole chain in turn).
        let mut i = 0;
        if k > 0 {
            'steps: loop {
                // Written out, not a `for` loop: a loop LLVM does not unroll at the guest's
                // size-optimized level would be a wasm loop, with an epoch check per step.
                macro_rules! then_test {
                    () => {
                        step!(i);
                        i += 1;
                        if i == k {
                            break 'steps;
                        }
                    };
                }
                then_test!();
                then_test!();
                then_test!();
                then_test!();
                then_test!();
                then_test!();
                then_test!();
                then_test!();
            }
        }
        for (slot, v) in out.iter_mut().zip([c0l, c0h, c1l, c1h, c2l, c2h, c3l, c3h]) {
            *slot = v;
        }
    }

    /// `acc + a * b`, as tract's `madd_f32x4!` computes it in this build.
    #[inline(always)]
    fn madd(acc: v128, a: v128, b: v128) -> v128 {
        #[cfg(target_feature = "relaxed-simd")]
        return f32x4_relaxed_madd(a, b, acc);
        #[cfg(not(target_feature = "relaxed-simd"))]
        f32x4_add(acc, f32x4_mul(a, b))
    }

    fn make() -> DynKernel<8, 8, f32> {
        // tract's kernel with our entry point and the packing both kernels can read.
        let mut k = tract_linalg::wasm::wasm_f32_8x8.clone();
        k.name = NAME.to_owned();
        k.kernel = kernel;
        k.packings.clear();
        k.with_packing(f32::packing(8).align(256), f32::packing(8).align(256))
            .with_boost(boost)
    }

    /// tract's 8x1 GEMV, unchanged but for its name, its boost and an A packed as
    /// [`make`]'s, so that one packed weight serves both kernels.
    fn make_gemv() -> DynKernel<8, 1, f32> {
        let mut k = tract_linalg::wasm::wasm_f32_8x1.clone();
        k.name = GEMV_NAME.to_owned();
        let b = k.packings.drain(..).next().map(|(_, b)| b);
        let b = b.unwrap_or_else(|| Box::new(f32::packing(1)));
        k.packings.push((Box::new(f32::packing(8).align(256)), b));
        k.with_boost(boost)
    }

    inventory::submit! {
        MmmRoutine { make: || make().mmm() }
    }

    inventory::submit! {
        MmmRoutine { make: || make_gemv().mmm() }
    }

    /// Every f32 product with more than one column (GEMM) runs on this kernel, as tract's
    /// wasm tier sends all of them to its 8x8; matrix-vector products stay with tract's GEMV
    /// kernels.
    fn preferred(
        _isa: &IsaSet,
        dt: DatumType,
        query: &Query,
        _suitable: &[Suitable],
    ) -> Option<&'static str> {
        match (dt, query.n) {
            (DatumType::F32, Some(1)) => None,
            (DatumType::F32, _) => Some(NAME),
            _ => None,
        }
    }

    inventory::submit! {
        MmmTier {
            arch: Some(Arch::Wasm32Simd128),
            // Above tract's own wasm tier (1): asked first.
            precedence: 2,
            name: "capsule",
            applies: |_| true,
            preferred,
        }
    }

    /// Keeps this object (and its registrations) in the link: wasm-ld drops objects nothing
    /// references, inventory entries included.
    pub fn keep() {
        std::hint::black_box(kernel as *const ());
    }
}

/// Asks the host whether it computes products for this inference (a no-op outside the wasm
/// guest). Called at the start of every inference.
pub fn refresh() {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    wasm::refresh();
}

/// Makes sure the kernel's registrations are linked in (called when a model loads; a no-op
/// outside the wasm guest).
pub(crate) fn keep() {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    wasm::keep();
}
