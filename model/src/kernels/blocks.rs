//! Whole products on the host (`capsule_kernels.f32_mmm_block`, version 2 of the import).
//!
//! tract runs a product tile by tile: for each 8x8 tile it translates the plan's ops into a
//! program and calls the kernel, which for host kernels of version 1 meant one host call per
//! tile for the product alone, then the bias, activation and store in wasm. Those per-tile
//! steps were half of what a convolution cost with host kernels on (docs/benchmarks.md).
//!
//! [`Blocks`] is the 8x8 kernel as tract's plans hold it. It runs a product of the usual
//! form (`A·B [+ bias per row or column] [+ residual] [max] [min]`, stored f32) as a few
//! block calls: the operand tract packs lazily (a convolution's im2col) is packed here a
//! few panels at a time (up to 32 KiB of them), in wasm, and each batch goes to the host
//! with every panel of the other operand, as many tiles as one call may take. The host
//! fuses the epilogue into its native kernel and stores straight into the plan's output.
//! Without host kernels, the same products run tile by tile in the guest from one loop of
//! ours ([`Plan::run_portable`]), each tile on the program tract's loop would build,
//! without tract's per-tile machinery.
//! Any other product, or any product when the host offers only tile calls (version 1),
//! runs on tract's tile loop ([`super::wasm`]'s per-tile kernel).

use std::alloc::Layout;
use std::arch::wasm32::v128;
use std::borrow::Cow;
use std::sync::OnceLock;

use capsule_format::kernels::{BlockCall, BlockOps};

use super::wasm::{Bias, Usual};
use tract_linalg::mmm::{
    AsInputValue, EagerPackedInput, FusedSpec, MMMInputFormat, MMMInputValue, MatMatMul,
    OutputStore, OutputStoreKer, OutputStoreSpec, ScratchSpace,
};
use tract_linalg::pack::PackedFormat;
use tract_linalg::{BinOp, WeightType};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{ExoticFact, TensorView};
use tract_onnx::tract_core::tract_linalg;

#[link(wasm_import_module = "capsule_kernels")]
unsafe extern "C" {
    /// Computes and stores the block `call` describes ([`BlockCall`]); the host traps on any
    /// range outside memory, an A not aligned to 32 bytes or more work than one call may do.
    #[link_name = "f32_mmm_block"]
    fn host_f32_mmm_block(call: *const BlockCall);
}

/// The 8x8 kernel as plans hold it: blocks on the host where it can, tract's tile loop
/// (with [`super::wasm`]'s kernel) everywhere else.
#[derive(Clone, Debug)]
pub(super) struct Blocks(pub(super) Box<dyn MatMatMul>);

impl MatMatMul for Blocks {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn mr(&self) -> usize {
        self.0.mr()
    }
    fn nr(&self) -> usize {
        self.0.nr()
    }
    fn arch(&self) -> Option<tract_linalg::isa::Arch> {
        self.0.arch()
    }
    fn emulated(&self) -> bool {
        self.0.emulated()
    }
    fn boost(&self) -> isize {
        self.0.boost()
    }
    fn preference(&self) -> isize {
        self.0.preference()
    }
    fn runnable_on(&self, isa: &tract_linalg::isa::IsaSet) -> bool {
        self.0.runnable_on(isa)
    }
    fn runnable(&self) -> bool {
        self.0.runnable()
    }
    fn built(&self) -> bool {
        self.0.built()
    }
    fn isa(&self) -> tract_linalg::isa::IsaReq {
        self.0.isa()
    }
    fn packings(&self) -> &[(Box<dyn MMMInputFormat>, Box<dyn MMMInputFormat>)] {
        self.0.packings()
    }
    fn internal_type(&self) -> DatumType {
        self.0.internal_type()
    }
    unsafe fn c_view(
        &self,
        m_axis: Option<usize>,
        n_axis: Option<usize>,
    ) -> tract_linalg::mmm::OutputStoreSpec {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.c_view(m_axis, n_axis) }
    }
    unsafe fn c_from_data_and_strides(
        &self,
        item_size: usize,
        row_stride: isize,
        col_stride: isize,
    ) -> tract_linalg::mmm::OutputStoreSpec {
        // SAFETY: the caller's contract, passed on.
        unsafe {
            self.0
                .c_from_data_and_strides(item_size, row_stride, col_stride)
        }
    }
    fn can_fuse(&self, spec: &FusedSpec) -> bool {
        self.0.can_fuse(spec)
    }
    fn stores(&self) -> Cow<'_, [DatumType]> {
        self.0.stores()
    }
    unsafe fn allocate_scratch_space(&self) -> Box<dyn ScratchSpace> {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.allocate_scratch_space() }
    }
    unsafe fn can_use_scratch_space(&self, scratch: &dyn ScratchSpace) -> bool {
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.can_use_scratch_space(scratch) }
    }
    unsafe fn run_with_scratch_space(
        &self,
        m: usize,
        n: usize,
        scratch: &mut dyn ScratchSpace,
        non_linear: &[FusedSpec],
    ) -> TractResult<()> {
        let host = super::wasm::host_abi();
        // Version 1 (tile calls) keeps tract's loop, whose kernel calls the host per tile.
        if host != 1
            && let Some(plan) = Plan::of(m, n, non_linear)
        {
            // SAFETY: the specs are tract's for this product (the caller's contract).
            return unsafe {
                if host >= 2 {
                    plan.run()
                } else {
                    plan.run_portable()
                }
            };
        }
        // SAFETY: the caller's contract, passed on.
        unsafe { self.0.run_with_scratch_space(m, n, scratch, non_linear) }
    }
}

/// Rows of A from which the portable block loop spreads B's panels: a spread panel costs
/// about what two tiles save on it.
const SPREAD_MIN_ROWS: usize = 32;

/// Most vectors B's panels spread all at once may take (1 MiB; 8 per panel and step), when
/// B is the portable block loop's inner operand.
const SPREAD_INNER_MAX_VECTORS: usize = 1 << 16;

/// Most bytes of the lazy operand's panels one host call takes (a batch of them, see
/// [`Plan::run`]): within the L1 and L2 caches beside a group of the other's.
const OUTER_BYTES: usize = 32 << 10;
/// Most of the lazy operand's panels one host call takes.
const OUTER_PANELS: usize = 16;

/// A product of the form the host runs as blocks, read off tract's specs.
struct Plan<'s> {
    m: usize,
    n: usize,
    k: usize,
    a: &'s dyn MMMInputValue,
    b: &'s dyn MMMInputValue,
    /// Column strips (one panel of B against all of A's) unless A is the lazy operand.
    by_columns: bool,
    /// The eager operand's first panel and the bytes from one to the next.
    inner0: usize,
    inner_stride: usize,
    ops: BlockOps,
    bias: *const f32,
    residual: Option<Store>,
    max: f32,
    min: f32,
    store: Store,
}

impl<'s> Plan<'s> {
    fn of(m: usize, n: usize, specs: &'s [FusedSpec<'s>]) -> Option<Plan<'s>> {
        let mut specs = specs.iter().peekable();
        let Some(FusedSpec::AddMatMul { a, b, packing: 0 }) = specs.next() else {
            return None;
        };
        let (a, b): (&dyn MMMInputValue, &dyn MMMInputValue) = (&**a, &**b);
        // An eager operand is packed as this kernel's packing 0 (f32, 8 a step); a lazy one
        // (a convolution's im2col) packs its panels for the packing the plan chose, the
        // same, and says only its width.
        let packed = |v: &dyn MMMInputValue| match v.format().downcast_ref::<PackedFormat>() {
            Some(f) => f.r == 8 && f.dt == DatumType::F32,
            None => {
                !v.is::<EagerPackedInput>()
                    && v.format().r() == 8
                    && matches!(v.format().precursor(), WeightType::Plain(DatumType::F32))
            }
        };
        let k = a.k();
        if !packed(a)
            || !packed(b)
            || b.k() != k
            || a.mn() < m
            || b.mn() < n
            // Any depth: a block call's cost is shared by its tiles (a tile call's was not,
            // hence `MIN_HOST_K` for those).
            || !(1..=capsule_format::HOST_KERNELS_MAX_K as usize).contains(&k)
            || u32::try_from(m.max(n)).is_err()
            // One operand is read panel by panel from where tract keeps it: it must be eager.
            || !(a.is::<EagerPackedInput>() || b.is::<EagerPackedInput>())
        {
            return None;
        }
        let mut ops = BlockOps::default();
        let mut residual = None;
        // A residual before the bias (the order of products whose operands the one-row plan
        // swapped).
        if let Some(FusedSpec::AddUnicast(store)) = specs.peek() {
            residual = Some(Store::of(store)?);
            ops = BlockOps::RESIDUAL | BlockOps::RESIDUAL_FIRST;
            specs.next();
        }
        let mut bias = std::ptr::null();
        let f32s = |v: &TensorView, len: usize| {
            (v.datum_type() == DatumType::F32 && v.len() >= len)
                .then(|| v.as_ptr::<f32>().ok())
                .flatten()
        };
        match specs.peek() {
            Some(FusedSpec::BinPerRow(v, BinOp::Add)) => {
                (bias, ops) = (f32s(v, m)?, ops | BlockOps::ROW_BIAS);
                specs.next();
            }
            Some(FusedSpec::BinPerCol(v, BinOp::Add)) => {
                (bias, ops) = (f32s(v, n)?, ops | BlockOps::COL_BIAS);
                specs.next();
            }
            _ => {}
        }
        if residual.is_none()
            && let Some(FusedSpec::AddUnicast(store)) = specs.peek()
        {
            residual = Some(Store::of(store)?);
            ops = ops | BlockOps::RESIDUAL;
            specs.next();
        }
        if ops.has(BlockOps::RESIDUAL_FIRST)
            && !ops.has(BlockOps::ROW_BIAS)
            && !ops.has(BlockOps::COL_BIAS)
        {
            // Without a bias the order says nothing.
            ops = BlockOps(ops.0 & !BlockOps::RESIDUAL_FIRST.0);
        }
        let scalar = |t: &Tensor| {
            (t.datum_type() == DatumType::F32)
                .then(|| t.as_plain_ram()?.to_scalar::<f32>().ok().copied())
                .flatten()
        };
        let (mut max, mut min) = (0.0, 0.0);
        if let Some(FusedSpec::BinScalar(t, BinOp::Max)) = specs.peek() {
            (max, ops) = (scalar(t)?, ops | BlockOps::MAX);
            specs.next();
        }
        if let Some(FusedSpec::BinScalar(t, BinOp::Min)) = specs.peek() {
            (min, ops) = (scalar(t)?, ops | BlockOps::MIN);
            specs.next();
        }
        let Some(FusedSpec::Store(store)) = specs.next() else {
            return None;
        };
        let store = Store::of(store)?;
        if specs.next().is_some() {
            return None;
        }
        let by_columns = a.is::<EagerPackedInput>();
        let (inner, inner_len) = if by_columns { (a, m) } else { (b, n) };
        let inner0 = inner.panel_bytes(0, None).ok()? as usize;
        let inner_stride = if inner_len > 8 {
            (inner.panel_bytes(1, None).ok()? as usize).checked_sub(inner0)?
        } else {
            0
        };
        if by_columns && !(inner0.is_multiple_of(32) && inner_stride.is_multiple_of(32)) {
            // The host loads A with aligned moves and traps on anything else: leave such a
            // packing (never seen; ours aligns to 256) to the tile loop, as tile calls do.
            return None;
        }
        Some(Plan {
            m,
            n,
            k,
            a,
            b,
            by_columns,
            inner0,
            inner_stride,
            ops,
            bias,
            residual,
            max,
            min,
            store,
        })
    }

    /// Sends the product to the host: the lazy operand (or B, when both are eager) a few
    /// panels at a time ([`OUTER_BYTES`]), each batch with as many panels of the other as
    /// one call may take. The host runs each group of the longer side against every panel
    /// of the shorter one, so a call of several panels of each reads its groups once where
    /// a call per panel read them once per panel (ResNet-50's Winograd `U_ξ` are 1 MiB), and
    /// writes each output row a run of columns at a time.
    ///
    /// # Safety
    /// The plan's operands, bias, residual and store are tract's for an `m x n` product.
    unsafe fn run(&self) -> TractResult<()> {
        let (by_columns, inner0, inner_stride) = (self.by_columns, self.inner0, self.inner_stride);
        let (outer, outer_len, inner_len) = self.outer();
        let outer_panels = outer_len.div_ceil(8);
        let batch = (OUTER_BYTES / self.panel_bytes()).clamp(1, OUTER_PANELS);
        let mut buffer = self.buffer(outer, batch)?;
        let max_tiles = BlockCall::max_tiles(self.k as u32).max(1) as usize;
        let f = |v: usize| v as u32;
        for o in (0..outer_panels).step_by(batch) {
            let count = (outer_panels - o).min(batch);
            // A panel of A is loaded with aligned moves.
            let (panels, panel_stride) = buffer.panels(outer, o, count, !by_columns)?;
            let outer_count = (outer_len - 8 * o).min(8 * count);
            // Rows (or columns) of the inner operand per call: the most the host takes.
            let per_call = 8 * (max_tiles / count).max(1);
            for first in (0..inner_len).step_by(per_call) {
                let inner_count = (inner_len - first).min(per_call);
                let (row, col, rows, cols) = if by_columns {
                    (first, 8 * o, inner_count, outer_count)
                } else {
                    (8 * o, first, outer_count, inner_count)
                };
                let inner_at = inner0 + first / 8 * inner_stride;
                let (a, a_stride, b, b_stride) = if by_columns {
                    (inner_at, inner_stride, panels, panel_stride)
                } else {
                    (panels, panel_stride, inner_at, inner_stride)
                };
                let bias = if self.ops.has(BlockOps::ROW_BIAS) {
                    self.bias.wrapping_add(row)
                } else {
                    self.bias.wrapping_add(col)
                };
                let residual = self.residual.unwrap_or(self.store);
                let call = BlockCall {
                    k: f(self.k),
                    rows: f(rows),
                    cols: f(cols),
                    a: f(a),
                    a_stride: f(a_stride),
                    b: f(b),
                    b_stride: f(b_stride),
                    ops: self.ops.0,
                    bias: bias as usize as u32,
                    residual: f(residual.at(row, col)),
                    residual_row_stride: residual.row_stride,
                    residual_col_stride: residual.col_stride,
                    store: f(self.store.at(row, col)),
                    store_row_stride: self.store.row_stride,
                    store_col_stride: self.store.col_stride,
                    max: self.max,
                    min: self.min,
                };
                // SAFETY: every address names what tract gave this product (the caller's
                // contract) or this function's own buffers; the host checks them anyway.
                unsafe { host_f32_mmm_block(&call) };
            }
        }
        Ok(())
    }
}

impl Plan<'_> {
    /// The operand packed panel by panel (the lazy one, or B when both are eager), its
    /// length (rows of A or columns of B) and the other operand's.
    fn outer(&self) -> (&dyn MMMInputValue, usize, usize) {
        if self.by_columns {
            (self.b, self.n, self.m)
        } else {
            (self.a, self.m, self.n)
        }
    }

    /// Bytes of one packed panel of either operand.
    fn panel_bytes(&self) -> usize {
        self.k * capsule_format::kernels::PANEL_STEP_BYTES
    }

    /// A buffer for `slots` panels of `outer` (see [`Plan::outer`]).
    fn buffer(&self, outer: &dyn MMMInputValue, slots: usize) -> TractResult<Buffer> {
        Buffer::new(
            outer.scratch_panel_buffer_layout(),
            self.panel_bytes(),
            slots,
        )
    }

    /// Runs the product in the guest, without host kernels: per tile, the operations of the
    /// program tract's tile loop would build (`Clear`, the product, the plan's ops in its
    /// order, `Store`), on the guest's product loop, which runs the ops on its accumulators
    /// as it ends ([`super::wasm::usual_tile`]). One loop over the lazy operand's panels
    /// and the eager one's, without tract's per-tile machinery (its loop, program building
    /// and panel reads were 11% of SqueezeNet's portable inference, each function entry and
    /// loop header with its epoch check; building and interpreting our own programs was
    /// another 4%). A border tile computes into an 8x8 scratch tile, with its bias and
    /// residual copied into zero-padded scratch, and only its valid values are copied out,
    /// as tract's border tiles do. So every value goes through tract's operations in
    /// tract's order: the same bits.
    ///
    /// # Safety
    /// As [`Plan::run`].
    unsafe fn run_portable(&self) -> TractResult<()> {
        let (by_columns, inner0, inner_stride) = (self.by_columns, self.inner0, self.inner_stride);
        let (outer, outer_len, inner_len) = self.outer();
        let buffer = self.buffer(outer, 1)?;
        let kernel_store = |ptr: usize, row_stride: isize, col_stride: isize| OutputStoreKer {
            ptr: ptr as *mut u8,
            row_byte_stride: row_stride,
            col_byte_stride: col_stride,
            item_size: 4,
        };
        let of_store = |s: &Store, row: usize, col: usize| {
            kernel_store(s.at(row, col), s.row_stride as isize, s.col_stride as isize)
        };
        // A border tile's bias, residual and output, 8 rows of 8 contiguous values.
        let mut bias_tile = [0f32; 8];
        let mut residual_tile = [0f32; 64];
        let mut out_tile = [0f32; 64];
        let row_bias = self.ops.has(BlockOps::ROW_BIAS);
        let col_bias = self.ops.has(BlockOps::COL_BIAS);
        // `Plan::of` sets a residual with its `RESIDUAL` step.
        let residual = self.residual;
        // B's panels spread ([`super::wasm::spread_tile`]) where enough of A's panels read
        // each one to pay for spreading it: each of B's panels as the loop comes to it when
        // B is the outer operand, or, when it is the inner one (a one-row plan swaps a
        // convolution's operands: A its lazy im2col, B its weights), all of them once,
        // before the loop, within `SPREAD_INNER_MAX_VECTORS`.
        let spread = by_columns && inner_len >= SPREAD_MIN_ROWS;
        let b_panels = inner_len.div_ceil(8);
        let spread_inner = !by_columns
            && outer_len >= SPREAD_MIN_ROWS
            && b_panels.saturating_mul(8 * self.k) <= SPREAD_INNER_MAX_VECTORS;
        let mut spread_b: Vec<v128> = Vec::new();
        if spread || spread_inner {
            let panels = if spread { 1 } else { b_panels };
            spread_b
                .try_reserve_exact(panels * 8 * self.k)
                .map_err(|e| {
                    TractError::msg(format!(
                        "spreading {panels} panels of {} steps: {e}",
                        self.k
                    ))
                })?;
        }
        if spread_inner {
            let mut one = Vec::new();
            for i in 0..b_panels {
                // SAFETY: B's panel holds `k` steps of 8 f32 (the plan's packing).
                unsafe {
                    super::wasm::spread(
                        self.k,
                        (inner0 + i * inner_stride) as *const v128,
                        &mut one,
                    )
                };
                spread_b.extend_from_slice(&one);
            }
        }
        for o in 0..outer_len.div_ceil(8) {
            let panel = outer.panel_bytes(o, buffer.scratch())? as usize;
            if spread {
                // SAFETY: B's panel holds `k` steps of 8 f32 (the plan's packing).
                unsafe { super::wasm::spread(self.k, panel as *const v128, &mut spread_b) };
            }
            for i in 0..inner_len.div_ceil(8) {
                let inner_panel = inner0 + i * inner_stride;
                let ((down, right), (pa, pb)) = if by_columns {
                    ((i, o), (inner_panel, panel))
                } else {
                    ((o, i), (panel, inner_panel))
                };
                let (row, col) = (8 * down, 8 * right);
                let (rows, cols) = ((self.m - row).min(8), (self.n - col).min(8));
                let border = rows < 8 || cols < 8;
                let bias = if row_bias || col_bias {
                    let (first, len) = if row_bias { (row, rows) } else { (col, cols) };
                    let at = self.bias.wrapping_add(first);
                    let at = if len < 8 {
                        bias_tile.fill(0.0);
                        // SAFETY: the bias holds a value per row (or column) of the product
                        // (the caller's contract); `first + len` is within it.
                        unsafe { std::ptr::copy_nonoverlapping(at, bias_tile.as_mut_ptr(), len) };
                        bias_tile.as_ptr()
                    } else {
                        at
                    };
                    if row_bias {
                        Bias::Row(at)
                    } else {
                        Bias::Col(at)
                    }
                } else {
                    Bias::None
                };
                let unicast = residual.map(|r| {
                    if border {
                        residual_tile.fill(0.0);
                        for (y, out) in residual_tile.chunks_exact_mut(8).take(rows).enumerate() {
                            for (x, v) in out.iter_mut().take(cols).enumerate() {
                                // SAFETY: `(row + y, col + x)` is an output of the product,
                                // and the residual covers every output (the caller's contract).
                                *v = unsafe { *(r.at(row + y, col + x) as *const f32) };
                            }
                        }
                        kernel_store(residual_tile.as_ptr() as usize, 32, 4)
                    } else {
                        of_store(&r, row, col)
                    }
                });
                let store = if border {
                    kernel_store(out_tile.as_mut_ptr() as usize, 32, 4)
                } else {
                    of_store(&self.store, row, col)
                };
                let usual = Usual {
                    bias,
                    residual: unicast,
                    residual_first: self.ops.has(BlockOps::RESIDUAL_FIRST),
                    max: self.ops.has(BlockOps::MAX).then_some(self.max),
                    min: self.ops.has(BlockOps::MIN).then_some(self.min),
                    store,
                };
                // SAFETY: the panels are the plan's operands' (the caller's contract; the
                // lazy one packed into this function's buffer), the bias, residual and store
                // cover the tile or are this function's scratch tiles.
                unsafe {
                    if spread {
                        super::wasm::spread_tile(self.k, pa as _, spread_b.as_ptr(), &usual, cols);
                    } else if spread_inner {
                        // `i < b_panels`: B's panel `i` spread, `8 * k` vectors from its start.
                        let spread = spread_b.as_ptr().add(i * 8 * self.k);
                        super::wasm::spread_tile(self.k, pa as _, spread, &usual, cols);
                    } else {
                        super::wasm::usual_tile(self.k, pa as _, pb as _, &usual);
                    }
                }
                if border {
                    for (y, values) in out_tile.chunks_exact(8).take(rows).enumerate() {
                        for (x, v) in values.iter().take(cols).enumerate() {
                            // SAFETY: `(row + y, col + x)` is an output of the product.
                            unsafe { *(self.store.at(row + y, col + x) as *mut f32) = *v };
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// An f32 output (or residual) of a product: its first value and its byte strides.
#[derive(Debug, Clone, Copy)]
struct Store {
    ptr: usize,
    row_stride: i32,
    col_stride: i32,
}

impl Store {
    fn of(store: &OutputStore) -> Option<Store> {
        let fields = StoreLayout::get()?.read(store);
        (fields.item_size == 4).then_some(())?;
        Some(Store {
            ptr: fields.ptr,
            row_stride: i32::try_from(fields.row_stride).ok()?,
            col_stride: i32::try_from(fields.col_stride).ok()?,
        })
    }

    /// Where value `(row, col)` is.
    fn at(&self, row: usize, col: usize) -> usize {
        (self.ptr as isize
            + row as isize * self.row_stride as isize
            + col as isize * self.col_stride as isize) as usize
    }
}

/// What [`StoreLayout::read`] reads of tract's `OutputStore`.
struct StoreFields {
    ptr: usize,
    row_stride: isize,
    col_stride: isize,
    item_size: usize,
}

/// Where the fields of tract's `OutputStore` are. They are private to tract-linalg and the
/// struct is not `repr(C)`, but it is seven pointer-sized integers: [`StoreLayout::get`]
/// builds one through tract's public constructor with seven distinct values and finds each
/// field's word. If that fails (another tract, another layout), no product goes to the host
/// as a block.
#[derive(Debug, Clone, Copy)]
struct StoreLayout {
    ptr: usize,
    row_stride: usize,
    col_stride: usize,
    item_size: usize,
}

const STORE_WORDS: usize = 7;

impl StoreLayout {
    fn get() -> Option<StoreLayout> {
        static LAYOUT: OnceLock<Option<StoreLayout>> = OnceLock::new();
        *LAYOUT.get_or_init(StoreLayout::probe)
    }

    fn words(store: &OutputStore) -> Option<[usize; STORE_WORDS]> {
        if std::mem::size_of::<OutputStore>() != std::mem::size_of::<[usize; STORE_WORDS]>() {
            return None;
        }
        // SAFETY: same size (checked), and every field of `OutputStore` is a pointer-sized
        // integer or pointer, so every word is initialized and any bits are a valid usize.
        Some(unsafe { std::mem::transmute_copy::<OutputStore, [usize; STORE_WORDS]>(store) })
    }

    fn probe() -> Option<StoreLayout> {
        let tensor = Tensor::zero::<f32>(&[3]).ok()?;
        let spec = OutputStoreSpec::Strides {
            row_byte_stride: 36,
            col_byte_stride: 52,
            mr: 5,
            nr: 7,
        };
        // SAFETY: the store is only read, never written through.
        let store = unsafe { spec.wrap(&tensor.view()) };
        let words = Self::words(&store)?;
        let ptr = tensor.as_ptr::<f32>().ok()? as usize;
        // ptr, row and column strides, panel strides (36 * 5, 52 * 7), item size, count.
        let find = |value: usize| {
            let mut at = words.iter().enumerate().filter(|(_, w)| **w == value);
            match (at.next(), at.next()) {
                (Some((i, _)), None) => Some(i),
                _ => None,
            }
        };
        for other in [180, 364, 3] {
            find(other)?;
        }
        Some(StoreLayout {
            ptr: find(ptr)?,
            row_stride: find(36)?,
            col_stride: find(52)?,
            item_size: find(4)?,
        })
    }

    fn read(&self, store: &OutputStore) -> StoreFields {
        let words = Self::words(store).unwrap_or([0; STORE_WORDS]);
        StoreFields {
            ptr: words[self.ptr],
            row_stride: words[self.row_stride] as isize,
            col_stride: words[self.col_stride] as isize,
            item_size: words[self.item_size],
        }
    }
}

/// The buffers of one product: room for a batch of the lazy operand's panels (where
/// tract's packer writes them, a slot each) and, for panels that do not lie at one stride
/// from each other or an A not aligned to 32 bytes, contiguous copies (made on first use:
/// neither is expected).
struct Buffer {
    /// The slots, and the bytes from one to the next.
    scratch: Option<(*mut u8, Layout, usize)>,
    panel_bytes: usize,
    /// Panels per batch.
    slots: usize,
    copies: Vec<Aligned>,
}

/// 32 bytes, aligned as the host's loads of A need.
#[derive(Clone, Copy)]
#[repr(C, align(32))]
struct Aligned([u8; 32]);

impl Buffer {
    /// `slots` slots (1 to [`OUTER_PANELS`]) of `layout` (the lazy operand's scratch, if it
    /// has one) for panels of `panel_bytes`.
    fn new(layout: Option<Layout>, panel_bytes: usize, slots: usize) -> TractResult<Buffer> {
        if !(1..=OUTER_PANELS).contains(&slots) {
            return Err(TractError::msg(format!(
                "{slots} panel slots (1 to {OUTER_PANELS})"
            )));
        }
        let scratch = match layout {
            Some(layout) if layout.size() > 0 => {
                let slot = layout.align_to(32)?.pad_to_align();
                let size = slot.size().checked_mul(slots).ok_or_else(|| {
                    TractError::msg(format!("{slots} panel buffers of {} bytes", slot.size()))
                })?;
                let all = Layout::from_size_align(size, slot.align())?;
                // SAFETY: a layout of non-zero size.
                let ptr = unsafe { std::alloc::alloc(all) };
                if ptr.is_null() {
                    std::alloc::handle_alloc_error(all);
                }
                Some((ptr, all, slot.size()))
            }
            _ => None,
        };
        Ok(Buffer {
            scratch,
            panel_bytes,
            slots,
            copies: Vec::new(),
        })
    }

    /// The first slot.
    fn scratch(&self) -> Option<*mut u8> {
        self.scratch.map(|(ptr, _, _)| ptr)
    }

    /// Panels `first..first + count` of `outer` (`count` at most the buffer's slots) as the
    /// host reads them: the first one's address and the bytes from one to the next. Where
    /// the packer wrote them (each in its own slot) or keeps them, if they lie at one
    /// stride (`aligned`: 32-byte aligned); copied one after the other otherwise.
    fn panels(
        &mut self,
        outer: &dyn MMMInputValue,
        first: usize,
        count: usize,
        aligned: bool,
    ) -> TractResult<(usize, usize)> {
        debug_assert!((1..=self.slots).contains(&count));
        let slot = |i: usize| {
            self.scratch
                .map(|(ptr, _, size)| ptr.wrapping_add(i * size))
        };
        let mut at = [0usize; OUTER_PANELS];
        for (i, at) in at.iter_mut().enumerate().take(count) {
            *at = outer.panel_bytes(first + i, slot(i))? as usize;
        }
        let at = &at[..count];
        let stride = if count > 1 {
            at[1].wrapping_sub(at[0])
        } else {
            0
        };
        let strided = at
            .iter()
            .enumerate()
            .all(|(i, &p)| Some(p) == stride.checked_mul(i).and_then(|d| at[0].checked_add(d)))
            && (!aligned || (at[0].is_multiple_of(32) && stride.is_multiple_of(32)));
        if strided {
            return Ok((at[0], stride));
        }
        let steps = self.panel_bytes.div_ceil(32);
        if self.copies.is_empty() {
            self.copies = vec![Aligned([0; 32]); steps * self.slots];
        }
        let copies = self.copies.as_mut_ptr().cast::<u8>();
        for (i, &p) in at.iter().enumerate() {
            // SAFETY: each panel holds `panel_bytes` (tract's packer wrote them), each copy
            // as many (a panel is `k` steps of 32 bytes, `count <= slots` of them), and they
            // do not overlap (the copies are ours).
            unsafe {
                std::ptr::copy_nonoverlapping(
                    p as *const u8,
                    copies.add(i * steps * 32),
                    self.panel_bytes,
                )
            };
        }
        Ok((copies as usize, steps * 32))
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some((ptr, layout, _)) = self.scratch {
            // SAFETY: allocated in `new` with this layout.
            unsafe { std::alloc::dealloc(ptr, layout) };
        }
    }
}

/// An eager operand that [`check`] hands over as a lazy one: A as a convolution's im2col
/// would be in a product whose operands the one-row plan swapped, so that the block loop
/// runs over A's panels (`by_columns` false).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Lazy(Box<dyn MMMInputValue>);

impl std::fmt::Display for Lazy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "lazy {}", self.0)
    }
}

impl MMMInputValue for Lazy {
    fn format(&self) -> &dyn MMMInputFormat {
        self.0.format()
    }
    fn scratch_panel_buffer_layout(&self) -> Option<Layout> {
        self.0.scratch_panel_buffer_layout()
    }
    fn panel_bytes(&self, i: usize, buffer: Option<*mut u8>) -> TractResult<*const u8> {
        self.0.panel_bytes(i, buffer)
    }
    fn mn(&self) -> usize {
        self.0.mn()
    }
    fn k(&self) -> usize {
        self.0.k()
    }
    fn exotic_fact(&self) -> &dyn ExoticFact {
        self.0.exotic_fact()
    }
    fn extract_at_mn_f16(&self, mn: usize, slice: &mut [f16]) -> TractResult<()> {
        self.0.extract_at_mn_f16(mn, slice)
    }
    fn extract_at_mn_f32(&self, mn: usize, slice: &mut [f32]) -> TractResult<()> {
        self.0.extract_at_mn_f32(mn, slice)
    }
}

/// Which loop [`check`] runs a product on.
#[derive(Clone, Copy, Debug)]
enum Path {
    /// The portable block loop ([`Plan::run_portable`]).
    Blocks,
    /// tract's tile loop, every tile on the guest's kernel.
    Tract,
}

/// Runs products of the usual form through the portable block loop ([`Plan::run_portable`])
/// and through tract's tile loop on the guest's kernel, and compares the outputs bit for bit
/// (NaN against NaN). The shapes cut tiles at the edges of both operands and make B's panels
/// spread (32 rows of A or more) and not. Each product runs twice: with A eager (the loop
/// over B's panels, as in a convolution) and with A handed over as lazy ([`Lazy`]: the loop
/// over A's panels, as in a product whose operands the one-row plan swapped). The epilogues
/// have a bias per row and per column, a residual before and after it, clamps, and stores
/// by rows and by columns. What it
/// checks is the loop's own work (panels, borders, the bias and residual of each tile, the
/// strides): the tile kernels against tract's are `kernels::check`'s. An error names the
/// first product and value that differ. Runs with the builder's kernel check; neither loop
/// asks the host for anything.
pub(super) fn check() -> Result<(), String> {
    let describe = |e: TractError| format!("the block loop's check: {e:#}");
    let kernel = super::wasm::make_portable().mmm();
    let Some((pack_a, pack_b)) = kernel.packings().first() else {
        return Err("the block loop's check: the kernel has no packing".into());
    };
    let mut next = super::wasm::check_values(0x85eb_ca6b);
    let mut tensor = |shape: &[usize]| {
        let values: Vec<f32> = (0..shape.iter().product()).map(|_| next()).collect();
        Tensor::from_shape(shape, &values)
    };
    let (zero, clip) = (tensor0(0f32), tensor0(0.5f32));
    for (m, n, k) in [
        (8, 8, 1),
        (13, 11, 7),
        (32, 24, 33),
        (40, 19, 5),
        (33, 3, 9),
        (70, 9, 64),
        (8, 40, 9),
        (19, 70, 33),
    ] {
        let (a, b) = (
            tensor(&[m, k]).map_err(describe)?,
            tensor(&[k, n]).map_err(describe)?,
        );
        let (rows, cols) = (
            tensor(&[m]).map_err(describe)?,
            tensor(&[n]).map_err(describe)?,
        );
        let residual = tensor(&[m, n]).map_err(describe)?;
        let pa = pack_a.prepare_one(&a, 1, 0).map_err(describe)?;
        let pb = pack_b.prepare_one(&b, 0, 1).map_err(describe)?;
        let lazy_a = Lazy(pa.clone());
        for form in 0..5 {
            for (transposed, lazy) in [(false, false), (true, false), (false, true), (true, true)] {
                let run = |path: Path| -> TractResult<Vec<f32>> {
                    let shape = if transposed { [n, m] } else { [m, n] };
                    let mut out = Tensor::zero::<f32>(&shape)?;
                    // SAFETY: the views cover `m x n` values (`out` transposed when
                    // `transposed`), and live until the product has run.
                    let (store, unicast) = unsafe {
                        let axes = if transposed { (1, 0) } else { (0, 1) };
                        (
                            kernel
                                .c_view(Some(axes.0), Some(axes.1))
                                .wrap(&out.view_mut()),
                            kernel.c_view(Some(0), Some(1)).wrap(&residual.view()),
                        )
                    };
                    let a: &dyn MMMInputValue = if lazy { &lazy_a } else { &*pa };
                    let mut specs = vec![FusedSpec::AddMatMul {
                        a: AsInputValue::Borrowed(a),
                        b: AsInputValue::Borrowed(&*pb),
                        packing: 0,
                    }];
                    specs.extend(match form {
                        0 => vec![],
                        1 => vec![
                            FusedSpec::BinPerRow(rows.view(), BinOp::Add),
                            FusedSpec::BinScalar(&zero, BinOp::Max),
                        ],
                        2 => vec![
                            FusedSpec::BinPerCol(cols.view(), BinOp::Add),
                            FusedSpec::AddUnicast(unicast),
                            FusedSpec::BinScalar(&zero, BinOp::Max),
                            FusedSpec::BinScalar(&clip, BinOp::Min),
                        ],
                        3 => vec![
                            FusedSpec::AddUnicast(unicast),
                            FusedSpec::BinPerRow(rows.view(), BinOp::Add),
                        ],
                        _ => vec![
                            FusedSpec::AddUnicast(unicast),
                            FusedSpec::BinPerCol(cols.view(), BinOp::Add),
                            FusedSpec::BinScalar(&clip, BinOp::Min),
                        ],
                    });
                    specs.push(FusedSpec::Store(store));
                    // SAFETY: the specs are a product of `m x n` over the packed `a`, `b`.
                    unsafe {
                        match path {
                            Path::Blocks => Plan::of(m, n, &specs)
                                .ok_or_else(|| {
                                    TractError::msg("the product did not take the block loop")
                                })?
                                .run_portable()?,
                            Path::Tract => kernel.run(m, n, &specs)?,
                        }
                    }
                    Ok(out.try_as_plain_ram()?.as_slice::<f32>()?.to_vec())
                };
                let what = format!(
                    "{m}x{n}x{k}, epilogue {form}, transposed store {transposed}, lazy A {lazy}"
                );
                let ours = run(Path::Blocks).map_err(|e| format!("{what}: {}", describe(e)))?;
                let tracts = run(Path::Tract).map_err(|e| format!("{what}: {}", describe(e)))?;
                let same = super::wasm::same_bits;
                if let Some(i) = (0..ours.len()).find(|&i| !same(ours[i], tracts[i])) {
                    return Err(format!(
                        "the block loop's check: {what}, value {i}: {} where tract's loop computes {}",
                        ours[i], tracts[i]
                    ));
                }
            }
        }
    }
    check_panels(&**pack_a)
}

/// How [`Moved`] hands its panels over.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
enum Handover {
    /// In reverse order: no one stride between them.
    Reversed,
    /// Each copied into the scratch buffer it is given, as a lazy packer writes them.
    IntoScratch,
}

/// An eager operand whose panels [`check_panels`] reads another way ([`Handover`]).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
struct Moved {
    inner: Box<dyn MMMInputValue>,
    how: Handover,
}

impl std::fmt::Display for Moved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} {}", self.how, self.inner)
    }
}

impl MMMInputValue for Moved {
    fn format(&self) -> &dyn MMMInputFormat {
        self.inner.format()
    }
    fn scratch_panel_buffer_layout(&self) -> Option<Layout> {
        match self.how {
            Handover::Reversed => None,
            Handover::IntoScratch => Layout::from_size_align(self.k() * 32, 32).ok(),
        }
    }
    fn panel_bytes(&self, i: usize, buffer: Option<*mut u8>) -> TractResult<*const u8> {
        let panels = self.mn().div_ceil(8);
        if i >= panels {
            return Err(TractError::msg(format!("panel {i} of {panels}")));
        }
        match self.how {
            Handover::Reversed => self.inner.panel_bytes(panels - 1 - i, None),
            Handover::IntoScratch => {
                let Some(buffer) = buffer else {
                    return Err(TractError::msg(format!(
                        "{self} packs into a scratch buffer"
                    )));
                };
                let panel = self.inner.panel_bytes(i, None)?;
                // SAFETY: a panel is `k` steps of 32 bytes, and so is the scratch buffer
                // (`scratch_panel_buffer_layout`).
                unsafe { std::ptr::copy_nonoverlapping(panel, buffer, self.k() * 32) };
                Ok(buffer)
            }
        }
    }
    fn mn(&self) -> usize {
        self.inner.mn()
    }
    fn k(&self) -> usize {
        self.inner.k()
    }
    fn exotic_fact(&self) -> &dyn ExoticFact {
        self.inner.exotic_fact()
    }
    fn extract_at_mn_f16(&self, mn: usize, slice: &mut [f16]) -> TractResult<()> {
        self.inner.extract_at_mn_f16(mn, slice)
    }
    fn extract_at_mn_f32(&self, mn: usize, slice: &mut [f32]) -> TractResult<()> {
        self.inner.extract_at_mn_f32(mn, slice)
    }
}

/// [`Buffer::panels`], which hands batches of panels to the host: panels kept at one
/// stride (an eager operand's) are handed over where they are, panels packed into the
/// buffer's slots from the first slot, and panels at no one stride are copied one after the
/// other. Every batch is 32-byte aligned and holds the panels it was asked for, in order.
fn check_panels(pack: &dyn MMMInputFormat) -> Result<(), String> {
    let describe = |e: TractError| format!("the block loop's panel check: {e:#}");
    let (m, k) = (40, 9);
    let mut next = super::wasm::check_values(0x27d4_eb2f);
    let values: Vec<f32> = (0..m * k).map(|_| next()).collect();
    let a = Tensor::from_shape(&[m, k], &values).map_err(describe)?;
    let eager = pack.prepare_one(&a, 1, 0).map_err(describe)?;
    let panel_bytes = k * 32;
    let panels = m.div_ceil(8);
    let panel = |i: usize| -> TractResult<&[u8]> {
        let at = eager.panel_bytes(i, None)?;
        // SAFETY: an eager panel holds `k` steps of 32 bytes, alive with `eager`.
        Ok(unsafe { std::slice::from_raw_parts(at, panel_bytes) })
    };
    let moved = |how| -> Box<dyn MMMInputValue> {
        Box::new(Moved {
            inner: eager.clone(),
            how,
        })
    };
    for (how, value) in [
        (None, eager.clone()),
        (Some(Handover::Reversed), moved(Handover::Reversed)),
        (Some(Handover::IntoScratch), moved(Handover::IntoScratch)),
    ] {
        let name = how.map_or("eager".to_owned(), |how| format!("{how:?}"));
        let mut buffer =
            Buffer::new(value.scratch_panel_buffer_layout(), panel_bytes, 3).map_err(describe)?;
        for (first, count) in [(0, 3), (3, 2), (4, 1)] {
            let what = format!("{name} panels {first}..{}", first + count);
            let (at, stride) = buffer
                .panels(&*value, first, count, true)
                .map_err(|e| format!("{what}: {}", describe(e)))?;
            if !at.is_multiple_of(32) || !stride.is_multiple_of(32) {
                return Err(format!(
                    "the block loop's panel check: {what} at {at} + i * {stride}, not aligned"
                ));
            }
            let kept = panel(first).map_err(describe)?.as_ptr() as usize;
            if how.is_none() && at != kept {
                return Err(format!(
                    "the block loop's panel check: {what} were moved from {kept} to {at}"
                ));
            }
            for i in 0..count {
                let j = if how == Some(Handover::Reversed) {
                    panels - 1 - (first + i)
                } else {
                    first + i
                };
                // SAFETY: `panels` hands over `count` panels of `panel_bytes` at `stride`.
                let got = unsafe {
                    std::slice::from_raw_parts((at + i * stride) as *const u8, panel_bytes)
                };
                if got != panel(j).map_err(describe)? {
                    return Err(format!(
                        "the block loop's panel check: {what}: panel {i} of the batch is not panel {j}"
                    ));
                }
            }
        }
    }
    Ok(())
}
