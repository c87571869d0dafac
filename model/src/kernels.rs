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
//!   program goes to tract's `wasm_f32_8x8` unchanged, so outputs are bit for bit those of
//!   tract's wasm kernel;
//! - host kernels on: each `AddMatMul` of the program (the dense product of one packed 8-row
//!   panel of A by one packed 8-column panel of B) is computed by the host into an 8x8 tile,
//!   and the program runs on tract's wasm kernel with that step replaced by adding the tile.
//!   Everything else (bias, activations, the store) stays in wasm.
//!
//! The packing is the one both sides read: 8 f32 per k step, A aligned to 256 bytes (what
//! tract's x86-64 FMA 8x8 kernel requires and loads with aligned moves), B to 8 bytes.
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
        let wasm = tract_linalg::wasm::wasm_f32_8x8.kernel;
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
            return unsafe { wasm(program) };
        }
        let mut tiles = [[0f32; 64]; MAX_PRODUCTS];
        let mut ops = [FusedKerSpec::Done; MAX_OPS];
        let mut tile = tiles.iter_mut();
        for (slot, op) in ops.iter_mut().zip(program) {
            *slot = match *op {
                FusedKerSpec::AddMatMul { k, pa, pb, .. } => {
                    let Some(out) = tile.next() else {
                        // Counted above: unreachable, and harmless (the wasm kernel).
                        return unsafe { wasm(program) };
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
        unsafe { wasm(&ops[..program.len()]) }
    }

    fn make() -> DynKernel<8, 8, f32> {
        // tract's kernel with our entry point and the packing both kernels can read.
        let mut k = tract_linalg::wasm::wasm_f32_8x8.clone();
        k.name = NAME.to_owned();
        k.kernel = kernel;
        k.packings.clear();
        k.with_packing(f32::packing(8).align(256), f32::packing(8).align(8))
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
