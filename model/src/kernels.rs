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
//!   product is computed by our own wasm loop (`usual_tile`), which runs the usual rest of
//!   the program (a bias, a residual, a ReLU or a clip, the store: `Usual`) on its
//!   accumulators as it ends; any other rest runs on our `epilogue`. Both compute what
//!   tract's `wasm_f32_8x8` does, with vector loads and stores; outputs are bit for bit
//!   those of tract's wasm kernel (same sums in the same order, the same operations after;
//!   `check` tests it at every build), faster where products are deep (see `portable`);
//! - host kernels on: each `AddMatMul` of the program (the dense product of one packed 8-row
//!   panel of A by one packed 8-column panel of B) is computed by the host into an 8x8 tile,
//!   which is added to the accumulators as tract adds a tile; everything else (bias,
//!   activations, the store) runs on the same `epilogue`, in wasm.
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
//! So this kernel has a companion, `capsule_f32_8x1` (the 8-row GEMV of `gemv`, with this
//! kernel's A packing, the matrix-vector products of a batch of one), and both are boosted
//! above tract's wasm kernels. Without the boost tract's own 8x8 won those products by name
//! order, and a ResNet-50's 1x1 convolutions (80% of its products) never reached the host.
//! Products known to have one column when the model is optimized go to the GEMV kernels by
//! row count (`preferred`).
//!
//! [`refresh`] asks the host at every inference whether it serves the kernel: a snapshot
//! taken on the builder must not carry the builder's answer to a node.
//!
//! On other targets this module registers nothing.

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod blocks;

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod winograd;

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod gemv;

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
mod wasm {
    use std::arch::wasm32::*;
    use std::sync::atomic::{AtomicI32, Ordering};

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
        /// The version of the import the host serves this capsule (1: tiles, 2: tiles and
        /// blocks, [`super::blocks`]), 0 when it computes no products.
        #[link_name = "abi_version"]
        safe fn host_abi_version() -> i32;
        /// `out[8x8, row-major] = A[k x 8 packed] * B[k x 8 packed]` (A's 8 values of one k
        /// step are 8 rows, B's 8 columns). The host traps on any range outside memory or an
        /// A not aligned to 32 bytes.
        #[link_name = "f32_mmm_8x8"]
        fn host_f32_mmm_8x8(k: usize, pa: *const u8, pb: *const u8, out: *mut f32);
    }

    static HOST: AtomicI32 = AtomicI32::new(0);

    pub fn refresh() {
        HOST.store(host_abi_version(), Ordering::Relaxed);
    }

    /// The version of the host kernels for this inference (0: none).
    pub(super) fn host_abi() -> i32 {
        HOST.load(Ordering::Relaxed)
    }

    /// tract's calling convention.
    ///
    /// # Safety
    /// `program` is one tract built for this kernel's geometry and packings: every pointer in
    /// it covers the bytes its op reads or writes.
    unsafe fn kernel(program: &[FusedKerSpec<f32>]) -> isize {
        if host_abi() < 1 {
            // SAFETY: the caller's contract, and the same geometry and packings.
            return unsafe { portable(program) };
        }
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
        if products == 0
            || misaligned
            || shallow
            || products > MAX_PRODUCTS
            || program.len() > MAX_OPS
        {
            // SAFETY: the caller's contract, and the same geometry and packings.
            return unsafe { portable(program) };
        }
        if program
            .iter()
            .all(|op| matches!(op, FusedKerSpec::AddMatMul { .. }) || in_epilogue(op))
        {
            // Each product from the host into `product`, added to the accumulators as
            // tract adds a tile (`AddUnicast`); every other op on [`epilogue`].
            let mut acc = Tile([f32x4_splat(0.0); 16]);
            let mut product = Tile([f32x4_splat(0.0); 16]);
            for (i, op) in program.iter().enumerate() {
                match *op {
                    FusedKerSpec::Done => break,
                    FusedKerSpec::AddMatMul { k, pa, pb, .. } => {
                        // SAFETY: `pa` and `pb` are packed panels of `k` steps (the caller's
                        // contract) and `product` holds 64 f32, row-major (row r's columns
                        // 0-3, then 4-7: the accumulators' layout); the host bounds-checks
                        // them anyway.
                        unsafe { host_f32_mmm_8x8(k, pa, pb, product.0.as_mut_ptr().cast()) };
                        for (a, p) in acc.0.iter_mut().zip(&product.0) {
                            *a = f32x4_add(*a, *p);
                        }
                        // After the last product, the rest in one call (where the usual
                        // epilogues take their one-pass form).
                        let rest = &program[i + 1..];
                        if !rest
                            .iter()
                            .any(|op| matches!(op, FusedKerSpec::AddMatMul { .. }))
                        {
                            // SAFETY: the caller's contract; `in_epilogue` holds for them.
                            unsafe { epilogue(rest, &mut acc) };
                            return 0;
                        }
                    }
                    // SAFETY: the caller's contract; `in_epilogue` holds for the op.
                    _ => unsafe {
                        epilogue(std::slice::from_ref(op), &mut acc);
                    },
                }
            }
            return 0;
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

    /// The portable path: the first product of a program (the one right after `Clear`,
    /// which every product of a plan is) and, when the rest is the usual epilogue
    /// ([`Usual`]), the rest on [`usual_tile`], which runs it on the accumulators as its loop
    /// ends; otherwise the product into a row-major tile ([`product_8x8`]), then the rest
    /// on [`epilogue`] (or, for ops it does not run, on tract's wasm 8x8 kernel, which loads
    /// the tile with `LoadTile`). Bit for bit tract's result: each of the 64 sums is
    /// accumulated from zero in the same order, with the same multiply and add, and goes
    /// through the same operations after.
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
        let rest = &program[2..];
        if let Some(usual) = Usual::of(rest) {
            // SAFETY: `pa` and `pb` are packed panels of `k` steps of 8 f32 (the caller's
            // contract: this kernel's packings), and the epilogue's pointers cover the tile.
            unsafe { usual_tile(k, pa.cast(), pb.cast(), &usual) };
            return 0;
        }
        if k < MIN_PORTABLE_K || program.len() > MAX_OPS + 1 {
            // SAFETY: the caller's contract.
            return unsafe { wasm(program) };
        }
        let mut tile = Tile([f32x4_splat(0.0); 16]);
        // SAFETY: `pa` and `pb` are packed panels of `k` steps of 8 f32 (the caller's
        // contract: this kernel's packings; `v128.load` needs no alignment).
        unsafe { product_8x8(k, pa.cast(), pb.cast(), &mut tile) };
        // SAFETY: the caller's contract covers the rest of the program.
        if unsafe { epilogue(rest, &mut tile) } {
            return 0;
        }
        let mut ops = [FusedKerSpec::Done; MAX_OPS];
        ops[0] = FusedKerSpec::LoadTile(std::ptr::null(), tile.0.as_ptr().cast());
        ops[1..=rest.len()].copy_from_slice(rest);
        // SAFETY: the program with its first two ops replaced by loading the tile they
        // compute, which lives until the call returns.
        unsafe { wasm(&ops[..=rest.len()]) }
    }

    /// Runs `ops` on the accumulators `tile` (row r's columns 0-3 in `tile.0[2 * r]`, 4-7 in
    /// `tile.0[2 * r + 1]`) as tract's `wasm_f32_8x8` runs them: op by op, with the same
    /// SIMD operation in the same operand order, so the results are the same bits. Rows laid
    /// out contiguously (a column stride of 4 bytes, which is how a plan's outputs and our
    /// own tiles are) are loaded and stored as two vectors, where tract moves the 64 values
    /// one by one: with the product on our loop or on the host, tract's stores and its
    /// spilled accumulators were most of what was left of a tile's cost (docs/benchmarks.md).
    ///
    /// Returns false, having done nothing, when `ops` holds an op it does not run (a
    /// product, integer requantization): the caller then runs tract's kernel.
    ///
    /// # Safety
    /// As [`kernel`]: every pointer in `ops` covers what its op reads or writes.
    unsafe fn epilogue(ops: &[FusedKerSpec<f32>], tile: &mut Tile) -> bool {
        use FusedKerSpec as F;
        if !ops.iter().all(in_epilogue) {
            return false;
        }
        // SAFETY: the caller's contract.
        if unsafe { usual_epilogue(ops, tile) } {
            return true;
        }
        let t = &mut tile.0;
        // SAFETY (of every block below): the caller's contract; each op reads or writes the
        // 8 rows, 8 columns or 8x8 values its pointer covers.
        unsafe {
            for op in ops {
                match *op {
                    F::Done => break,
                    F::Clear => *t = [f32x4_splat(0.0); 16],
                    F::LoadTile(_, rows) => {
                        for (i, v) in t.iter_mut().enumerate() {
                            *v = v128_load(rows.cast::<v128>().add(i));
                        }
                    }
                    F::ScalarMin(a) => each(t, scalar_min(a)),
                    F::ScalarMax(a) => each(t, scalar_max(a)),
                    F::ScalarAdd(a) => each(t, |v| f32x4_add(f32x4_splat(a), v)),
                    F::ScalarMul(a) => each(t, |v| f32x4_mul(f32x4_splat(a), v)),
                    F::ScalarSub(a) => each(t, |v| f32x4_sub(f32x4_splat(a), v)),
                    F::ScalarSubF(a) => each(t, |v| f32x4_sub(v, f32x4_splat(a))),
                    F::LeakyRelu(a) => each(t, |v| {
                        let positive = f32x4_gt(v, f32x4_splat(0.0));
                        v128_bitselect(v, f32x4_mul(f32x4_splat(a), v), positive)
                    }),
                    F::PerRowMin(row) => per_row(t, row, |s, v| f32x4_min(s, v)),
                    F::PerRowMax(row) => per_row(t, row, |s, v| f32x4_max(s, v)),
                    F::PerRowAdd(row) => per_row(t, row, |s, v| f32x4_add(s, v)),
                    F::PerRowMul(row) => per_row(t, row, |s, v| f32x4_mul(s, v)),
                    F::PerRowSub(row) => per_row(t, row, |s, v| f32x4_sub(s, v)),
                    F::PerRowSubF(row) => per_row(t, row, |s, v| f32x4_sub(v, s)),
                    F::PerColMin(cols) => per_col(t, cols, |c, v| f32x4_min(c, v)),
                    F::PerColMax(cols) => per_col(t, cols, |c, v| f32x4_max(c, v)),
                    F::PerColAdd(cols) => per_col(t, cols, |c, v| f32x4_add(c, v)),
                    F::PerColMul(cols) => per_col(t, cols, |c, v| f32x4_mul(c, v)),
                    F::PerColSub(cols) => per_col(t, cols, |c, v| f32x4_sub(c, v)),
                    F::PerColSubF(cols) => per_col(t, cols, |c, v| f32x4_sub(v, c)),
                    F::AddUnicast(tile) => {
                        for (r, pair) in t.chunks_exact_mut(2).enumerate() {
                            let row = tile.ptr.offset(r as isize * tile.row_byte_stride);
                            let (lo, hi) = load_row(row, tile.col_byte_stride);
                            pair[0] = f32x4_add(pair[0], lo);
                            pair[1] = f32x4_add(pair[1], hi);
                        }
                    }
                    F::Store(tile) => {
                        for (r, pair) in t.chunks_exact(2).enumerate() {
                            let row = tile.ptr.offset(r as isize * tile.row_byte_stride);
                            store_row(row, tile.col_byte_stride, pair[0], pair[1]);
                        }
                    }
                    // Not reached: checked above.
                    _ => return false,
                }
            }
        }
        true
    }

    /// [`Usual`]'s epilogue on vectors of row `$r`, `$v` holding columns `$c0 + $c` to
    /// `$c0 + $c + 3`: op after op, each op on every vector, then the stores. Each op is
    /// tract's SIMD operation with tract's operand order: the same bits. A macro, not a
    /// function over a slice: the guest's size-optimized code would keep the vectors in
    /// memory, and a row of two vectors taken as two rows of one (each stored before the
    /// next is computed) made the MNIST CNN 3% slower. Unsafe: the pointers of `$self`
    /// cover the values.
    macro_rules! usual_ops {
        ($self:expr, $r:expr, $c0:expr, $($v:ident @ $c:expr),+) => {{
            let (this, r, c0): (&Usual, usize, usize) = ($self, $r, $c0);
            let at = |t: OutputStoreKer, c: usize| {
                t.ptr.wrapping_offset(
                    r as isize * t.row_byte_stride + (c0 + c) as isize * t.col_byte_stride,
                )
            };
            let residual_first = this.residual_first;
            if let Some(t) = this.residual && residual_first {
                $( $v = f32x4_add($v, load_quad(at(t, $c), t.col_byte_stride)); )+
            }
            match this.bias {
                Bias::None => {}
                Bias::Row(row) => {
                    let s = f32x4_splat(*row.add(r));
                    $( $v = f32x4_add(s, $v); )+
                }
                Bias::Col(cols) => {
                    $( $v = f32x4_add(v128_load(cols.add(c0 + $c).cast()), $v); )+
                }
            }
            if let Some(t) = this.residual && !residual_first {
                $( $v = f32x4_add($v, load_quad(at(t, $c), t.col_byte_stride)); )+
            }
            if let Some(a) = this.max {
                let max = scalar_max(a);
                $( $v = max($v); )+
            }
            if let Some(a) = this.min {
                let min = scalar_min(a);
                $( $v = min($v); )+
            }
            $( store_quad(at(this.store, $c), this.store.col_byte_stride, $v); )+
        }};
    }

    /// The epilogue of most products, `[AddUnicast]? [PerRowAdd | PerColAdd]? [AddUnicast]?
    /// [ScalarMax]? [ScalarMin]? Store Done?` with at most one `AddUnicast` (a
    /// convolution's or a dense layer's bias, a residual, a ReLU or a clip, the store), read
    /// off a program. [`Usual::row`] runs it on one row's two vectors.
    ///
    /// Two uses: [`usual_epilogue`] runs it on a tile in one pass over its rows, and the
    /// product loop ([`half`]) runs it on its accumulators as the loop leaves them in
    /// registers, so that a tile of the portable path is never written to memory and read
    /// back before its store ([`usual_tile`]).
    #[derive(Clone, Copy)]
    pub(super) struct Usual {
        pub bias: Bias,
        pub residual: Option<OutputStoreKer>,
        /// The residual is added before the bias (the order of products whose operands the
        /// one-row plan swapped), not after it.
        pub residual_first: bool,
        /// `f32x4.max(splat(max), v)`, then `f32x4.min(splat(min), v)`.
        pub max: Option<f32>,
        pub min: Option<f32>,
        pub store: OutputStoreKer,
    }

    /// A [`Usual`] epilogue's bias.
    #[derive(Clone, Copy)]
    pub(super) enum Bias {
        None,
        /// One value per row (`PerRowAdd`).
        Row(*const f32),
        /// One value per column, 8 (`PerColAdd`).
        Col(*const f32),
    }

    impl Usual {
        /// The usual epilogue `ops` are, if they are one.
        fn of(ops: &[FusedKerSpec<f32>]) -> Option<Usual> {
            use FusedKerSpec as F;
            let mut ops = ops.iter().peekable();
            let mut usual = Usual::store(OutputStoreKer {
                ptr: std::ptr::null_mut(),
                row_byte_stride: 0,
                col_byte_stride: 0,
                item_size: 4,
            });
            let unicast = |op: &&F<f32>| matches!(op, F::AddUnicast(_));
            if let Some(F::AddUnicast(tile)) = ops.next_if(unicast) {
                (usual.residual, usual.residual_first) = (Some(*tile), true);
            }
            match ops.next_if(|op| matches!(op, F::PerRowAdd(_) | F::PerColAdd(_))) {
                Some(F::PerRowAdd(row)) => usual.bias = Bias::Row(*row),
                Some(F::PerColAdd(cols)) => usual.bias = Bias::Col(*cols),
                _ => {}
            }
            if usual.residual.is_none()
                && let Some(F::AddUnicast(tile)) = ops.next_if(unicast)
            {
                usual.residual = Some(*tile);
            }
            if let Some(F::ScalarMax(a)) = ops.next_if(|op| matches!(op, F::ScalarMax(_))) {
                usual.max = Some(*a);
            }
            if let Some(F::ScalarMin(a)) = ops.next_if(|op| matches!(op, F::ScalarMin(_))) {
                usual.min = Some(*a);
            }
            let Some(F::Store(store)) = ops.next() else {
                return None;
            };
            usual.store = *store;
            matches!(ops.next(), None | Some(F::Done)).then_some(usual)
        }

        /// The store alone.
        fn store(store: OutputStoreKer) -> Usual {
            Usual {
                bias: Bias::None,
                residual: None,
                residual_first: false,
                max: None,
                min: None,
                store,
            }
        }

        /// The same epilogue for the rows `rows` further down.
        fn below(&self, rows: usize) -> Usual {
            let down = |t: OutputStoreKer| OutputStoreKer {
                ptr: t.ptr.wrapping_offset(rows as isize * t.row_byte_stride),
                ..t
            };
            Usual {
                bias: match self.bias {
                    Bias::Row(row) => Bias::Row(row.wrapping_add(rows)),
                    other => other,
                },
                residual: self.residual.map(down),
                store: down(self.store),
                ..*self
            }
        }

        /// Runs the epilogue on row `r`'s two vectors (columns 0-3, 4-7) and stores them.
        ///
        /// # Safety
        /// A row bias holds a value for row `r`, a column bias 8 values; the residual and
        /// the store cover row `r`'s eight values.
        #[inline(always)]
        unsafe fn row(&self, r: usize, mut lo: v128, mut hi: v128) {
            // SAFETY: the caller's contract.
            unsafe { usual_ops!(self, r, 0, lo @ 0, hi @ 4) }
        }

        /// Runs the epilogue on four values of row `r`, columns `c0` to `c0 + 3`, and stores
        /// them.
        ///
        /// # Safety
        /// A row bias holds a value for row `r`, a column bias values for the four columns;
        /// the residual and the store cover the four values.
        #[inline(always)]
        unsafe fn quad(&self, r: usize, c0: usize, mut v: v128) {
            // SAFETY: the caller's contract.
            unsafe { usual_ops!(self, r, c0, v @ 0) }
        }
    }

    /// [`Usual`]'s epilogue on a tile, in one pass over the rows with each row's two vectors
    /// in registers. [`epilogue`]'s loop over ops keeps the sixteen accumulators in memory
    /// (the epoch check at its loop header clobbers the vector registers), so it loads and
    /// stores the tile once per op. (A version that took any four such ops, each a tagged
    /// value matched per row, measured 15-25% slower on SqueezeNet than this fixed form.)
    /// Returns false, having done nothing, for any other program.
    ///
    /// # Safety
    /// As [`epilogue`].
    unsafe fn usual_epilogue(ops: &[FusedKerSpec<f32>], tile: &Tile) -> bool {
        let Some(usual) = Usual::of(ops) else {
            return false;
        };
        // Row by row, written out: as a loop (which LLVM does not unroll at the guest's
        // size-optimized level) the loop header's epoch check moves every live vector
        // through the stack at each row.
        macro_rules! row {
            ($r:expr) => {
                // SAFETY: the bias, residual and store cover 8 rows (the caller's
                // contract), and `$r < 8`.
                unsafe { usual.row($r, tile.0[2 * $r], tile.0[2 * $r + 1]) }
            };
        }
        row!(0);
        row!(1);
        row!(2);
        row!(3);
        row!(4);
        row!(5);
        row!(6);
        row!(7);
        true
    }

    /// Whether [`epilogue`] runs `op`.
    fn in_epilogue(op: &FusedKerSpec<f32>) -> bool {
        use FusedKerSpec as F;
        matches!(
            op,
            F::Done
                | F::Clear
                | F::LoadTile(..)
                | F::ScalarMin(_)
                | F::ScalarMax(_)
                | F::ScalarAdd(_)
                | F::ScalarMul(_)
                | F::ScalarSub(_)
                | F::ScalarSubF(_)
                | F::LeakyRelu(_)
                | F::PerRowMin(_)
                | F::PerRowMax(_)
                | F::PerRowAdd(_)
                | F::PerRowMul(_)
                | F::PerRowSub(_)
                | F::PerRowSubF(_)
                | F::PerColMin(_)
                | F::PerColMax(_)
                | F::PerColAdd(_)
                | F::PerColMul(_)
                | F::PerColSub(_)
                | F::PerColSubF(_)
                | F::AddUnicast(_)
                | F::Store(_)
        )
    }

    /// `v -> f32x4.max(splat(a), v)`, with the bits wasm defines: a NaN where either side is
    /// NaN, and +0 above -0. Cranelift lowers `f32x4.max` to about ten instructions to get
    /// those cases right, and a ReLU runs it on every value a convolution stores. Where `a`
    /// is neither NaN nor -0 (a ReLU's 0, a clip's bound), `pmax` (`a < v ? v : a`, one
    /// `maxps`) already agrees for every `v` but a NaN, and a select gives those back.
    #[inline(always)]
    fn scalar_max(a: f32) -> impl Fn(v128) -> v128 {
        let s = f32x4_splat(a);
        let exact = a.is_nan() || a.to_bits() == (-0.0f32).to_bits();
        move |v| {
            if exact {
                f32x4_max(s, v)
            } else {
                v128_bitselect(v, f32x4_pmax(s, v), f32x4_ne(v, v))
            }
        }
    }

    /// `v -> f32x4.min(splat(a), v)`, as [`scalar_max`] (`pmin` is `v < a ? v : a`, right
    /// for every `v` but a NaN where `a` is neither NaN nor +0).
    #[inline(always)]
    fn scalar_min(a: f32) -> impl Fn(v128) -> v128 {
        let s = f32x4_splat(a);
        let exact = a.is_nan() || a.to_bits() == 0.0f32.to_bits();
        move |v| {
            if exact {
                f32x4_min(s, v)
            } else {
                v128_bitselect(v, f32x4_pmin(s, v), f32x4_ne(v, v))
            }
        }
    }

    /// `acc = f(acc)` for each accumulator of a tile.
    #[inline(always)]
    fn each(t: &mut [v128; 16], f: impl Fn(v128) -> v128) {
        t.iter_mut().for_each(|v| *v = f(*v));
    }

    /// `acc = f(splat(row[r]), acc)` for both halves of each row r of a tile.
    ///
    /// # Safety
    /// `row` points to 8 readable f32.
    #[inline(always)]
    unsafe fn per_row(t: &mut [v128; 16], row: *const f32, f: impl Fn(v128, v128) -> v128) {
        for (r, pair) in t.chunks_exact_mut(2).enumerate() {
            // SAFETY: the caller's contract, `r < 8`.
            let s = f32x4_splat(unsafe { *row.add(r) });
            pair[0] = f(s, pair[0]);
            pair[1] = f(s, pair[1]);
        }
    }

    /// `acc = f(cols[0..4], acc)` for the low half of each row of a tile, `f(cols[4..8],
    /// acc)` for the high half.
    ///
    /// # Safety
    /// `cols` points to 8 readable f32.
    #[inline(always)]
    unsafe fn per_col(t: &mut [v128; 16], cols: *const f32, f: impl Fn(v128, v128) -> v128) {
        // SAFETY: the caller's contract.
        let (lo, hi) = unsafe { (v128_load(cols.cast()), v128_load(cols.add(4).cast())) };
        for pair in t.chunks_exact_mut(2) {
            pair[0] = f(lo, pair[0]);
            pair[1] = f(hi, pair[1]);
        }
    }

    /// Eight f32 of a row whose columns are `stride` bytes apart, as two vectors.
    ///
    /// # Safety
    /// The eight values are readable.
    #[inline(always)]
    unsafe fn load_row(row: *const u8, stride: isize) -> (v128, v128) {
        // SAFETY: the caller's contract.
        unsafe {
            (
                load_quad(row, stride),
                load_quad(row.offset(4 * stride), stride),
            )
        }
    }

    /// Four f32 of a row whose columns are `stride` bytes apart, as a vector.
    ///
    /// # Safety
    /// The four values are readable.
    #[inline(always)]
    unsafe fn load_quad(row: *const u8, stride: isize) -> v128 {
        // SAFETY: the caller's contract.
        unsafe {
            if stride == 4 {
                return v128_load(row.cast());
            }
            let at = |c: isize| *row.offset(c * stride).cast::<f32>();
            f32x4(at(0), at(1), at(2), at(3))
        }
    }

    /// Stores `lo` and `hi` as eight f32 of a row whose columns are `stride` bytes apart.
    ///
    /// # Safety
    /// The eight values are writable.
    #[inline(always)]
    unsafe fn store_row(row: *mut u8, stride: isize, lo: v128, hi: v128) {
        // SAFETY: the caller's contract.
        unsafe {
            store_quad(row, stride, lo);
            store_quad(row.offset(4 * stride), stride, hi);
        }
    }

    /// Stores `v` as four f32 of a row whose columns are `stride` bytes apart.
    ///
    /// # Safety
    /// The four values are writable.
    #[inline(always)]
    unsafe fn store_quad(row: *mut u8, stride: isize, v: v128) {
        // SAFETY: the caller's contract.
        unsafe {
            if stride == 4 {
                v128_store(row.cast(), v);
                return;
            }
            let at = |c: isize| row.offset(c * stride).cast::<f32>();
            *at(0) = f32x4_extract_lane::<0>(v);
            *at(1) = f32x4_extract_lane::<1>(v);
            *at(2) = f32x4_extract_lane::<2>(v);
            *at(3) = f32x4_extract_lane::<3>(v);
        }
    }

    /// Runs programs of every op [`portable`] and [`epilogue`] run through them and through
    /// tract's `wasm_f32_8x8`, and compares the outputs bit for bit (NaN against NaN). The
    /// values tell orders and operand orders apart: signed zeros, NaN and infinities among
    /// the inputs, ties. An error names the first program and value that differ.
    pub fn check() -> Result<(), String> {
        use FusedKerSpec as F;
        let mut next = check_values(0x9e37_79b9);
        let fill =
            |n: usize, next: &mut dyn FnMut() -> f32| (0..n).map(|_| next()).collect::<Vec<f32>>();
        // (row stride, column stride) in bytes: contiguous, padded, transposed, every other.
        let layouts: [(isize, isize); 4] = [(32, 4), (48, 4), (4, 32), (64, 8)];
        for k in [1, 5, 8, 9, 27, 31, 32, 33, 64, 75] {
            let (pa, pb) = (fill(8 * k, &mut next), fill(8 * k, &mut next));
            let (rows, cols) = (fill(8, &mut next), fill(8, &mut next));
            let addend = fill(128, &mut next);
            for (case, &(rs, cs)) in layouts.iter().enumerate() {
                let unicast = F::AddUnicast(OutputStoreKer {
                    ptr: addend.as_ptr() as *mut u8,
                    row_byte_stride: layouts[(case + 1) % 4].0,
                    col_byte_stride: layouts[(case + 1) % 4].1,
                    item_size: 4,
                });
                let epilogues: [&[F<f32>]; 18] = [
                    &[F::PerRowAdd(rows.as_ptr()), F::ScalarMax(0.0)],
                    &[
                        F::PerColMul(cols.as_ptr()),
                        F::ScalarMin(0.5),
                        F::ScalarAdd(-0.0),
                        F::ScalarMul(-1.5),
                        F::ScalarSub(0.25),
                        F::ScalarSubF(0.0),
                    ],
                    &[
                        F::LeakyRelu(0.125),
                        F::PerRowMin(rows.as_ptr()),
                        F::PerRowMax(cols.as_ptr()),
                        F::PerRowMul(rows.as_ptr()),
                        F::PerRowSub(cols.as_ptr()),
                        F::PerRowSubF(rows.as_ptr()),
                    ],
                    &[
                        F::PerColMin(rows.as_ptr()),
                        F::PerColMax(cols.as_ptr()),
                        F::PerColAdd(rows.as_ptr()),
                        F::PerColSub(cols.as_ptr()),
                        F::PerColSubF(rows.as_ptr()),
                        unicast,
                    ],
                    &[unicast, F::ScalarAdd(0.0)],
                    // The usual forms of products whose operands the one-row plan swapped:
                    // a bias per column, a residual before the bias.
                    &[
                        F::PerColAdd(cols.as_ptr()),
                        F::ScalarMax(0.0),
                        F::ScalarMin(6.0),
                    ],
                    &[unicast, F::PerRowAdd(rows.as_ptr()), F::ScalarMax(0.0)],
                    &[unicast, F::PerColAdd(cols.as_ptr()), F::ScalarMin(-0.0)],
                    &[F::PerColAdd(rows.as_ptr()), unicast],
                    // The one-pass forms: a clip, and the store alone.
                    &[
                        F::PerRowAdd(cols.as_ptr()),
                        F::ScalarMax(0.0),
                        F::ScalarMin(0.5),
                    ],
                    &[],
                    // A residual block's end (one pass); a batch norm's scale and shift
                    // and a longer program (the loop over ops).
                    &[F::PerRowAdd(rows.as_ptr()), unicast, F::ScalarMax(0.0)],
                    &[
                        F::PerRowMul(cols.as_ptr()),
                        F::ScalarMul(0.75),
                        F::ScalarAdd(-0.5),
                    ],
                    &[
                        F::ScalarAdd(0.25),
                        unicast,
                        F::PerRowAdd(rows.as_ptr()),
                        F::ScalarMax(-0.0),
                        F::ScalarMin(1.0),
                    ],
                    // Bounds where `pmax`/`pmin` would differ (NaN, the signed zeros) and
                    // where they do not, in one pass and in the loop over ops.
                    &[F::ScalarMax(f32::NAN), F::ScalarMin(-0.0)],
                    &[
                        F::PerRowAdd(rows.as_ptr()),
                        F::ScalarMax(-1.0),
                        F::ScalarMin(0.0),
                    ],
                    &[F::ScalarMin(0.0), F::ScalarMax(f32::NAN)],
                    &[
                        F::ScalarMin(-0.0),
                        F::ScalarMax(0.25),
                        F::ScalarMin(f32::NAN),
                    ],
                ];
                let product = F::AddMatMul {
                    k,
                    pa: pa.as_ptr().cast(),
                    pb: pb.as_ptr().cast(),
                    packing: 0,
                };
                for (e, epilogue_ops) in epilogues.iter().enumerate() {
                    // The product then the epilogue; then the epilogue alone, on a tile the
                    // host computed (the product replaced by adding `addend`, as `kernel`
                    // does). `run_one` says whether the kernel ran the program.
                    let run = |run_one: &dyn Fn(&[F<f32>]) -> bool| {
                        let mut outputs = Vec::new();
                        for first in [product, unicast] {
                            let mut out = vec![f32::NAN; 128];
                            let mut program = vec![F::Clear, first];
                            program.extend_from_slice(epilogue_ops);
                            program.push(F::Store(OutputStoreKer {
                                ptr: out.as_mut_ptr().cast(),
                                row_byte_stride: rs,
                                col_byte_stride: cs,
                                item_size: 4,
                            }));
                            program.push(F::Done);
                            if !run_one(&program) {
                                return None;
                            }
                            outputs.extend(out);
                        }
                        Some(outputs)
                    };
                    // SAFETY (both closures): every pointer covers its op: `pa` and `pb`
                    // hold `k` steps of 8, `rows` and `cols` 8 values, `addend` and `out`
                    // 128, which every layout's 8x8 tile fits in.
                    let ours_one = |program: &[F<f32>]| unsafe {
                        if matches!(program[1], F::AddMatMul { .. }) {
                            portable(program);
                            true
                        } else {
                            epilogue(program, &mut Tile([f32x4_splat(0.0); 16]))
                        }
                    };
                    let ours = run(&ours_one);
                    // The product from B spread ([`spread_tile`]) where the epilogue is usual.
                    // Of `cols` columns (8: all; 4: columns 0-3 only).
                    let spread_ours = |cols| {
                        run(&|program| unsafe {
                            match (program[1], Usual::of(&program[2..])) {
                                (F::AddMatMul { k, pa, pb, .. }, Some(usual)) => {
                                    let mut spread_b = Vec::new();
                                    spread(k, pb.cast(), &mut spread_b);
                                    spread_tile(k, pa.cast(), spread_b.as_ptr(), &usual, cols);
                                    true
                                }
                                _ => ours_one(program),
                            }
                        })
                    };
                    let (narrow_ours, spread_ours) = (spread_ours(4), spread_ours(8));
                    let tracts = run(&|program| unsafe {
                        (tract_linalg::wasm::wasm_f32_8x8.kernel)(program);
                        true
                    });
                    let (Some(ours), Some(spread_ours), Some(narrow_ours), Some(tracts)) =
                        (ours, spread_ours, narrow_ours, tracts)
                    else {
                        return Err(format!(
                            "k {k}, layout {case}, epilogue {e}: not run by ours"
                        ));
                    };
                    // The narrow tile's columns 0-3 of the product's program (the first
                    // 128 values), and the whole of the epilogue-only one.
                    let narrow: Vec<usize> = (0..8)
                        .flat_map(|r| (0..4).map(move |c| (r * rs + c * cs) as usize / 4))
                        .chain(128..256)
                        .collect();
                    let all: Vec<usize> = (0..tracts.len()).collect();
                    for (path, ours, at) in [
                        ("", ours, &all),
                        (" (B spread)", spread_ours, &all),
                        (" (B spread, 4 columns)", narrow_ours, &narrow),
                    ] {
                        if let Some(&i) = at.iter().find(|&&i| !same_bits(ours[i], tracts[i])) {
                            return Err(format!(
                                "k {k}, layout {case}, epilogue {e}, value {i}{path}: {} where tract computes {}",
                                ours[i], tracts[i]
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The kernel checks' inputs, from `seed`: signed zeros, NaN, infinities, ones and
    /// values whose sums round differently in another order.
    pub(super) fn check_values(mut seed: u32) -> impl FnMut() -> f32 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            match seed % 23 {
                0 => -0.0,
                1 => 0.0,
                2 => f32::NAN,
                3 => f32::INFINITY,
                4 => 1.0,
                // Not dyadic: sums in another order round differently.
                v => (v as f32 - 12.0) * 0.137,
            }
        }
    }

    /// The kernel checks' equality: the same bits, or both NaN.
    pub(super) fn same_bits(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// Shallowest product the portable path computes with [`product_8x8`]; shallower ones
    /// run tract's loop, where writing and loading the tile would be most of the work. (The
    /// MNIST CNN, whose first convolution has k = 9, measured the same either way.)
    const MIN_PORTABLE_K: usize = 8;

    #[repr(C, align(16))]
    struct Tile([v128; 16]);

    /// `tile = A * B` for one 8x8 tile ([`usual_tile`] with the store alone, into `tile`).
    ///
    /// # Safety
    /// `pa` and `pb` point to `2 * k` readable `v128` each.
    unsafe fn product_8x8(k: usize, pa: *const v128, pb: *const v128, tile: &mut Tile) {
        let store = OutputStoreKer {
            ptr: tile.0.as_mut_ptr().cast(),
            row_byte_stride: 32,
            col_byte_stride: 4,
            item_size: 4,
        };
        // SAFETY: the caller's contract; `tile` holds 8 rows of 8 values, 32 bytes apart.
        unsafe { usual_tile(k, pa, pb, &Usual::store(store)) }
    }

    /// `A * B` for one 8x8 tile, then `usual`'s epilogue and store: `pa` holds `k` steps of
    /// 8 rows, `pb` `k` steps of 8 columns. Rows 0-3, then rows 4-7, each pass keeping its
    /// eight accumulators (four rows, two `v128` of four columns each) in registers, and
    /// running the epilogue on them as its loop ends. The multiply-add is tract's
    /// (`f32x4_relaxed_madd` in a relaxed-simd guest, a multiply then an add otherwise).
    ///
    /// # Safety
    /// `pa` and `pb` point to `2 * k` readable `v128` each; `usual`'s pointers cover 8 rows
    /// of 8 values (its bias 8 values).
    pub(super) unsafe fn usual_tile(k: usize, pa: *const v128, pb: *const v128, usual: &Usual) {
        // SAFETY: the caller's contract, passed on: rows 4-7 are 4 rows below.
        unsafe {
            half(k, pa, pb, usual);
            half(k, pa.add(1), pb, &usual.below(4));
        }
    }

    /// B's packed panel of `k` steps (8 columns each, `2 * k` vectors) with every value
    /// made a vector of four copies, as [`spread_tile`] reads it: columns 0-3 of each step,
    /// step after step, then columns 4-7. Four times the panel's bytes, made once per panel
    /// and read by every tile of A's panels.
    ///
    /// # Safety
    /// `panel` points to `2 * k` readable `v128`.
    pub(super) unsafe fn spread(k: usize, panel: *const v128, out: &mut Vec<v128>) {
        out.clear();
        for half in 0..2 {
            out.extend((0..k).flat_map(|i| {
                // SAFETY: `2 * i + half < 2 * k` (the caller's contract).
                let v = unsafe { v128_load(panel.add(2 * i + half)) };
                [
                    i32x4_shuffle::<0, 0, 0, 0>(v, v),
                    i32x4_shuffle::<1, 1, 1, 1>(v, v),
                    i32x4_shuffle::<2, 2, 2, 2>(v, v),
                    i32x4_shuffle::<3, 3, 3, 3>(v, v),
                ]
            }));
        }
    }

    /// [`usual_tile`] with B [`spread`]: the same sums and epilogue, bit for bit, without a
    /// shuffle in the product loop. The accumulators run along A's rows: per k step, A's
    /// two vectors (rows 0-3, 4-7) times each of four columns' spread values. The four
    /// shuffles per step that broadcast A in [`half`] take the floating-point pipes its
    /// multiplies and adds need; here every vector comes from a load, and each half tile
    /// ends with two 4x4 transposes (16 shuffles) before its epilogue. Worth it where B's
    /// spread panel serves several tiles (the portable block loop uses it from 4 panels of
    /// A up).
    ///
    /// Columns 4-7 are computed (and stored) only when `cols`, the tile's columns the
    /// caller reads, is above 4: a product of 4 columns or fewer (Silero VAD's convolutions
    /// of 4 and 2 frames) does half the work.
    ///
    /// # Safety
    /// `pa` points to `2 * k` readable `v128`, `spread` to `8 * k` ([`spread`]'s output for
    /// this `k`); `usual`'s pointers cover 8 rows of 8 values (its bias 8 values).
    pub(super) unsafe fn spread_tile(
        k: usize,
        pa: *const v128,
        spread: *const v128,
        usual: &Usual,
        cols: usize,
    ) {
        // SAFETY: the caller's contract, passed on: columns 4-7 are `4 * k` vectors further.
        unsafe {
            half_spread(k, pa, spread, usual, 0);
            if cols > 4 {
                half_spread(k, pa, spread.add(4 * k), usual, 4);
            }
        }
    }

    /// Four columns (`c0` to `c0 + 3`) of [`spread_tile`], all eight rows: eight
    /// accumulators, column c's rows 0-3 and 4-7.
    ///
    /// # Safety
    /// `pa.add(2 * i)`, `pa.add(2 * i + 1)` and `ps.add(4 * i)` to `ps.add(4 * i + 3)` are
    /// readable for `i < k`; `usual`'s pointers cover 8 rows of columns `c0` to `c0 + 3`.
    #[inline(never)]
    unsafe fn half_spread(k: usize, pa: *const v128, ps: *const v128, usual: &Usual, c0: usize) {
        let zero = f32x4_splat(0.0);
        let (mut c0l, mut c0h, mut c1l, mut c1h) = (zero, zero, zero, zero);
        let (mut c2l, mut c2h, mut c3l, mut c3h) = (zero, zero, zero, zero);
        macro_rules! step {
            ($i0:expr, $j:expr) => {{
                // SAFETY (of every read of the step): `i0 + j < k`, and the caller's contract.
                let (a, s) = unsafe { (pa.add(2 * $i0).add(2 * $j), ps.add(4 * $i0).add(4 * $j)) };
                // SAFETY: as above.
                let (lo, hi) = unsafe { (v128_load(a), v128_load(a.add(1))) };
                // A first, B second, as [`half`] multiplies: the same bits.
                macro_rules! column {
                    ($c:expr, $l:ident, $h:ident) => {
                        // SAFETY: as above.
                        let b = unsafe { v128_load(s.add($c)) };
                        $l = madd($l, lo, b);
                        $h = madd($h, hi, b);
                    };
                }
                column!(0, c0l, c0h);
                column!(1, c1l, c1h);
                column!(2, c2l, c2h);
                column!(3, c3l, c3h);
            }};
        }
        steps!(k, step);
        let [r0, r1, r2, r3] = transpose(c0l, c1l, c2l, c3l);
        let [r4, r5, r6, r7] = transpose(c0h, c1h, c2h, c3h);
        // SAFETY: the caller's contract.
        unsafe {
            usual.quad(0, c0, r0);
            usual.quad(1, c0, r1);
            usual.quad(2, c0, r2);
            usual.quad(3, c0, r3);
            usual.quad(4, c0, r4);
            usual.quad(5, c0, r5);
            usual.quad(6, c0, r6);
            usual.quad(7, c0, r7);
        }
    }

    /// The rows of the 4x4 block whose columns are `a0` to `a3`.
    #[inline(always)]
    fn transpose(a0: v128, a1: v128, a2: v128, a3: v128) -> [v128; 4] {
        let t0 = i32x4_shuffle::<0, 4, 1, 5>(a0, a1);
        let t1 = i32x4_shuffle::<2, 6, 3, 7>(a0, a1);
        let t2 = i32x4_shuffle::<0, 4, 1, 5>(a2, a3);
        let t3 = i32x4_shuffle::<2, 6, 3, 7>(a2, a3);
        [
            i64x2_shuffle::<0, 2>(t0, t2),
            i64x2_shuffle::<1, 3>(t0, t2),
            i64x2_shuffle::<0, 2>(t1, t3),
            i64x2_shuffle::<1, 3>(t1, t3),
        ]
    }

    /// Four rows of [`usual_tile`] (`pa` points to their four values of the first k step;
    /// each step's are 32 bytes further), through `usual`'s epilogue (rows 0-3 of it) into
    /// its store. One function for both halves: the guest's size counts.
    ///
    /// The loop runs 32 k steps per iteration. wasmtime checks the epoch (the inference
    /// deadline) at every loop header, and the check's slow path is a call that clobbers
    /// every vector register, so Cranelift keeps loop-carried vectors in stack slots and
    /// loads and stores them once per iteration: per 32 steps rather than per step. At eight
    /// steps per iteration, that round trip was still 13% of this function's samples on
    /// SqueezeNet (a profile with wasmtime's epoch checks on and off); at 32, SqueezeNet's
    /// portable inference is 3.5% faster and ResNet-50's 5% (docs/benchmarks.md, "The
    /// epoch checks' cost").
    ///
    /// # Safety
    /// `pa.add(2 * i)` and `pb.add(2 * i)`, `pb.add(2 * i + 1)` are readable for `i < k`;
    /// `usual`'s pointers cover 4 rows of 8 values (its bias 4 values).
    #[inline(never)]
    unsafe fn half(k: usize, pa: *const v128, pb: *const v128, usual: &Usual) {
        let zero = f32x4_splat(0.0);
        let (mut c0l, mut c0h, mut c1l, mut c1h) = (zero, zero, zero, zero);
        let (mut c2l, mut c2h, mut c3l, mut c3h) = (zero, zero, zero, zero);
        macro_rules! step {
            ($i0:expr, $j:expr) => {{
                // SAFETY (of every read of the step): `i0 + j < k`, and the caller's contract.
                let (a, b) = unsafe { (pa.add(2 * $i0).add(2 * $j), pb.add(2 * $i0).add(2 * $j)) };
                // SAFETY: as above.
                let (a, bl, bh) = unsafe { (v128_load(a), BVec::at(b), BVec::at(b.add(1))) };
                // B's vector where a multiply-add uses it ([`BVec`]).
                macro_rules! b {
                    ($v:ident) => {
                        // SAFETY: made from this step's B, readable (the caller's contract).
                        unsafe { $v.get() }
                    };
                }
                let s = i32x4_shuffle::<0, 0, 0, 0>(a, a);
                c0l = madd(c0l, s, b!(bl));
                c0h = madd(c0h, s, b!(bh));
                let s = i32x4_shuffle::<1, 1, 1, 1>(a, a);
                c1l = madd(c1l, s, b!(bl));
                c1h = madd(c1h, s, b!(bh));
                let s = i32x4_shuffle::<2, 2, 2, 2>(a, a);
                c2l = madd(c2l, s, b!(bl));
                c2h = madd(c2h, s, b!(bh));
                let s = i32x4_shuffle::<3, 3, 3, 3>(a, a);
                c3l = madd(c3l, s, b!(bl));
                c3h = madd(c3h, s, b!(bh));
            }};
        }
        steps!(k, step);
        // Written out, as the loop: the accumulators go from registers to the epilogue.
        // SAFETY: the caller's contract.
        unsafe {
            usual.row(0, c0l, c0h);
            usual.row(1, c1l, c1h);
            usual.row(2, c2l, c2h);
            usual.row(3, c3l, c3h);
        }
    }

    /// One of B's two vectors of a k step in [`half`]'s loop.
    ///
    /// A deterministic guest loads it once, at the top of the step. A relaxed-simd guest
    /// reads it at each use, with a volatile read so that LLVM keeps the reads where they
    /// are (wasm has no volatile: wasmtime's Cranelift then merges the repeated reads into
    /// one, at the first use). Why it matters: Cranelift lowers `relaxed_madd` to
    /// `vfmadd213ps`, which overwrites a multiplicand, never to `vfmadd231ps`, which would
    /// overwrite the accumulator, so each multiply-add first copies its broadcast A. With
    /// both B vectors live from the top of the step, that copy was one register too many:
    /// the register allocator kept an accumulator on the stack, a store and a reload in its
    /// chain at every step, and the loop ran 40% slower than the deterministic one on an AMD
    /// EPYC. With the reads at their uses it keeps all eight accumulators in registers
    /// (`perf annotate` of the loop; docs/benchmarks.md, "The relaxed guest's product
    /// loop"). That is a register allocator's outcome, not a guarantee: the benchmark there
    /// is the check.
    #[derive(Clone, Copy)]
    enum BVec {
        /// Loaded once (a deterministic guest).
        Loaded(v128),
        /// Read at each use (a relaxed-simd guest).
        At(*const v128),
    }

    /// A `v128` at any address (`v128_load` needs no alignment; `read_volatile` needs its
    /// type's).
    #[repr(C, packed)]
    #[derive(Clone, Copy)]
    struct Unaligned(v128);

    impl BVec {
        /// # Safety
        /// `p` is readable for one `v128` (and stays so for [`BVec::get`]).
        #[inline(always)]
        unsafe fn at(p: *const v128) -> Self {
            if cfg!(target_feature = "relaxed-simd") {
                Self::At(p)
            } else {
                // SAFETY: the caller's contract.
                Self::Loaded(unsafe { v128_load(p) })
            }
        }

        /// # Safety
        /// The pointer given to [`BVec::at`] is still readable.
        #[inline(always)]
        unsafe fn get(self) -> v128 {
            match self {
                Self::Loaded(v) => v,
                // SAFETY: the caller's contract.
                Self::At(p) => unsafe { std::ptr::read_volatile(p.cast::<Unaligned>()).0 },
            }
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

    pub(super) fn make() -> DynKernel<8, 8, f32> {
        // tract's kernel with our entry point and the packing both kernels can read.
        let mut k = tract_linalg::wasm::wasm_f32_8x8.clone();
        k.name = NAME.to_owned();
        k.kernel = kernel;
        k.packings.clear();
        k.with_packing(f32::packing(8).align(256), f32::packing(8).align(256))
            .with_boost(boost)
    }

    /// [`make`]'s kernel with every tile computed in the guest ([`portable`]), whatever the
    /// host offers: the reference of the block loop's check (`blocks::check`).
    pub(super) fn make_portable() -> DynKernel<8, 8, f32> {
        let mut k = make();
        k.kernel = portable;
        k
    }

    /// tract's 8x1 GEMV with the guest's product loop ([`super::gemv`]), its boost and an A
    /// packed as [`make`]'s, so that one packed weight serves both kernels.
    fn make_gemv() -> DynKernel<8, 1, f32> {
        let mut k = tract_linalg::wasm::wasm_f32_8x1.clone();
        k.name = GEMV_NAME.to_owned();
        k.kernel = super::gemv::kernel_8;
        let b = k.packings.drain(..).next().map(|(_, b)| b);
        let b = b.unwrap_or_else(|| Box::new(f32::packing(1)));
        k.packings.push((Box::new(f32::packing(8).align(256)), b));
        k.with_boost(boost)
    }

    inventory::submit! {
        MmmRoutine { make: || Box::new(super::blocks::Blocks(make().mmm())) }
    }

    inventory::submit! {
        MmmRoutine { make: || make_gemv().mmm() }
    }

    /// Every f32 product with more than one column (GEMM) runs on this kernel, as tract's
    /// wasm tier sends all of them to its 8x8. Matrix-vector products go by rows as tract's
    /// tier sends them (its bands, `tract-linalg/src/wasm/mod.rs`), to the guest's GEMV
    /// kernels of 8, 16 and 32 rows ([`super::gemv`]); four rows or fewer stay with tract's.
    fn preferred(
        _isa: &IsaSet,
        dt: DatumType,
        query: &Query,
        _suitable: &[Suitable],
    ) -> Option<&'static str> {
        match (dt, query.n) {
            (DatumType::F32, Some(1)) => match query.m.unwrap_or(0) {
                0..=4 => None,
                5..=8 => Some(GEMV_NAME),
                9..=16 => Some(super::gemv::NAME_16),
                _ => Some(super::gemv::NAME_32),
            },
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
        std::hint::black_box((kernel as *const (), super::gemv::kernel_8 as *const ()));
    }
}

/// Asks the host whether it computes products for this inference (a no-op outside the wasm
/// guest). Called at the start of every inference.
pub fn refresh() {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    wasm::refresh();
}

/// Checks that the guest's f32 kernels compute what tract's wasm kernels compute, bit for
/// bit, on programs of every op it runs itself (`Ok` outside the wasm guest). The builder
/// runs it before it loads a model.
pub fn check() -> Result<(), String> {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return wasm::check()
        .and_then(|()| gemv::check())
        .and_then(|()| blocks::check())
        .and_then(|()| winograd::check());
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    Ok(())
}

/// Replaces the 3x3 stride-1 convolutions of a decluttered model that Winograd's
/// F(2x2, 3x3) computes with fewer multiplications (`winograd`), in the wasm guest; returns
/// how many. Elsewhere (native tract, the baseline) it replaces none.
pub(crate) fn substitute_winograd(
    model: &mut tract_onnx::prelude::TypedModel,
) -> tract_onnx::prelude::TractResult<usize> {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return winograd::substitute(model);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    {
        let _ = model;
        Ok(0)
    }
}

/// Whether the kernel named `name` is one of the guest's matrix-vector kernels, whose
/// product loop reads exactly `k` values of B (`gemv`'s `product!`), none of the padding
/// record their packing declares. False outside the wasm guest.
pub(crate) fn gemv_reads_exactly_k(name: &str) -> bool {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    return [wasm::GEMV_NAME, gemv::NAME_16, gemv::NAME_32].contains(&name);
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    {
        let _ = name;
        false
    }
}

/// Makes sure the kernel's registrations are linked in (called when a model loads; a no-op
/// outside the wasm guest).
pub(crate) fn keep() {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    wasm::keep();
}
