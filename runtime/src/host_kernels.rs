//! Host kernels: the node's side of the `capsule_kernels` import (ARCHITECTURE.md, "Host
//! kernels"; docs/security.md states the trust boundary).
//!
//! A capsule's graph, preprocessing and bookkeeping stay in the sandbox. Only dense products
//! cross, in two forms:
//!
//! - `f32_mmm_8x8(k, a, b, out)` (version 1): the product of a packed 8-row panel of A by a
//!   packed 8-column panel of B, `k` steps deep, written as an 8x8 tile;
//! - `f32_mmm_block(call)` (version 2): a block of such tiles with the usual epilogue of a
//!   convolution or a dense layer (a bias, a residual, a clamp) fused in and the outputs
//!   stored where the guest's plan keeps them ([`capsule_format::kernels::BlockCall`]).
//!
//! The host reads the panels straight from the instance's linear memory, runs native x86-64
//! kernels on them (tract's FMA kernel for a single tile, our wide AVX-512 or AVX2 kernels
//! for blocks: `native::wide`) and writes the results back. Every range is checked against
//! the memory's current size with checked arithmetic before anything is read, panels of A
//! must be 32-byte aligned (tract's kernel loads them with aligned moves), and one call's
//! work is bounded ([`capsule_format::HOST_KERNELS_MAX_STEPS`]): a capsule that passes
//! anything else traps, which discards its instance and nothing more.
//!
//! The guest asks `abi_version()` at every inference; the answer is the version its manifest
//! declares, or 0 (stay in wasm) unless the store was made with host kernels on and this
//! machine can run the native kernel.

use wasmtime::{Caller, Linker};

use capsule_format::HostKernels;
use capsule_format::kernels::{BLOCK_CALL_BYTES, BlockCall, BlockOps, PANEL_STEP_BYTES};

use crate::instance::StoreData;
use crate::{Error, Result};

/// Bytes of one k step of a packed 8-wide f32 panel.
const STEP_BYTES: usize = PANEL_STEP_BYTES;
/// Bytes of the 8x8 f32 output tile.
const TILE_BYTES: usize = 64 * 4;
/// Alignment the native kernel needs for A's panel.
const A_ALIGN: usize = 32;

/// Whether this machine can run the native kernel the import delegates to.
pub fn supported_here() -> bool {
    native::supported()
}

/// Whether a capsule's code may import `module::name` of kind `ty`: only the host kernels'
/// functions. The one rule for the builder (reading a guest build) and `CapsuleImage::parse`.
pub(crate) fn importable(module: &str, name: &str, ty: &wasmparser::TypeRef) -> bool {
    module == capsule_format::HOST_KERNELS_MODULE
        && capsule_format::HOST_KERNELS_IMPORTS.contains(&name)
        && matches!(ty, wasmparser::TypeRef::Func(_))
}

/// Why the host refused a guest's call: the instance traps with
/// [`crate::TrapKind::HostKernel`] and is discarded.
#[derive(Debug, thiserror::Error)]
#[error("capsule_kernels.{function}: {why}")]
pub struct Refused {
    function: &'static str,
    why: String,
}

/// Byte ranges of one product's operands, checked against a memory of `memory_len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Operands {
    pub k: usize,
    pub a: std::ops::Range<usize>,
    pub b: std::ops::Range<usize>,
    pub out: std::ops::Range<usize>,
}

/// Checks the guest's arguments: `k` at most [`capsule_format::HOST_KERNELS_MAX_K`], every
/// range inside memory, A aligned. The arguments are the raw `i32`s of the call, read as
/// unsigned addresses.
pub(crate) fn operands(
    memory_len: usize,
    k: u32,
    a: u32,
    b: u32,
    out: u32,
) -> std::result::Result<Operands, String> {
    if k > capsule_format::HOST_KERNELS_MAX_K {
        return Err(format!(
            "k = {k} is over the limit of {}",
            capsule_format::HOST_KERNELS_MAX_K
        ));
    }
    let k = k as usize;
    let panel = k
        .checked_mul(STEP_BYTES)
        .ok_or_else(|| format!("k = {k} overflows"))?;
    let range = |what: &str, start: u32, len: usize| {
        let start = start as usize;
        match start.checked_add(len) {
            Some(end) if end <= memory_len => Ok(start..end),
            _ => Err(format!(
                "{what} at {start} + {len} bytes is outside the {memory_len}-byte memory"
            )),
        }
    };
    let a = range("A", a, panel)?;
    if a.start % A_ALIGN != 0 {
        return Err(format!("A at {} is not {A_ALIGN}-byte aligned", a.start));
    }
    Ok(Operands {
        k,
        a,
        b: range("B", b, panel)?,
        out: range("the output tile", out, TILE_BYTES)?,
    })
}

/// The instance's memory, if the call may be served: host kernels on for this store, at
/// `version` or above.
fn served_memory(
    caller: &Caller<'_, StoreData>,
    function: &'static str,
    version: HostKernels,
) -> wasmtime::Result<wasmtime::Memory> {
    let refused = |why: &str| {
        wasmtime::Error::new(Refused {
            function,
            why: why.to_owned(),
        })
    };
    if caller.data().host_kernels.abi() < version.abi() {
        // The guest was told a lower version (0: none) and must not call: a capsule that does
        // anyway gets no service.
        return Err(refused(&format!(
            "host kernels {} are off for this instance",
            version
        )));
    }
    caller
        .data()
        .memory
        .ok_or_else(|| refused("called before the instance exported its memory"))
}

/// `f32_mmm_8x8(k, a, b, out)`: the checked product, written to `out` row-major.
fn f32_mmm_8x8(
    mut caller: Caller<'_, StoreData>,
    k: u32,
    a: u32,
    b: u32,
    out: u32,
) -> wasmtime::Result<()> {
    const NAME: &str = "f32_mmm_8x8";
    let memory = served_memory(&caller, NAME, HostKernels::V1)?;
    let data = memory.data(&caller);
    let ops = operands(data.len(), k, a, b, out).map_err(|why| {
        wasmtime::Error::new(Refused {
            function: NAME,
            why,
        })
    })?;
    let tile = native::product(&data[ops.a.clone()], &data[ops.b.clone()], ops.k);
    let dst = &mut memory.data_mut(&mut caller)[ops.out];
    for (dst, v) in dst.chunks_exact_mut(4).zip(tile) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    caller.data_mut().host_kernel_calls += 1;
    Ok(())
}

/// Checks a block call against a memory of `memory_len` bytes: known epilogue steps, the work
/// bounded, every panel, the bias, the residual and the output inside memory, A aligned.
pub(crate) fn block(memory_len: usize, call: &BlockCall) -> std::result::Result<BlockOps, String> {
    let ops = BlockOps(call.ops);
    if !ops.valid() {
        return Err(format!("unknown epilogue steps {:#x}", call.ops));
    }
    if call.rows == 0 || call.cols == 0 {
        return Err(format!("an empty block ({} x {})", call.rows, call.cols));
    }
    if call.k > capsule_format::HOST_KERNELS_MAX_K {
        return Err(format!(
            "k = {} is over the limit of {}",
            call.k,
            capsule_format::HOST_KERNELS_MAX_K
        ));
    }
    match call.steps() {
        Some(steps) if steps <= capsule_format::HOST_KERNELS_MAX_STEPS => {}
        _ => {
            return Err(format!(
                "{} x {} outputs {} deep is over the limit of {} tile steps per call",
                call.rows,
                call.cols,
                call.k,
                capsule_format::HOST_KERNELS_MAX_STEPS
            ));
        }
    }
    let len = memory_len as u128;
    let inside = |what: &str, start: u128, end: u128| {
        if end <= len {
            Ok(())
        } else {
            Err(format!(
                "{what} at {start}..{end} is outside the {memory_len}-byte memory"
            ))
        }
    };
    let panel = u128::from(call.k) * STEP_BYTES as u128;
    let panels = |what: &str, start: u32, stride: u32, count: u32| {
        let last = u128::from(start) + u128::from(stride) * u128::from(count - 1);
        inside(what, u128::from(start), last + panel)
    };
    panels("A's panels", call.a, call.a_stride, call.row_tiles())?;
    if !(call.a as usize).is_multiple_of(A_ALIGN)
        || !(call.a_stride as usize).is_multiple_of(A_ALIGN)
    {
        return Err(format!(
            "A's panels at {} + i * {} are not {A_ALIGN}-byte aligned",
            call.a, call.a_stride
        ));
    }
    panels("B's panels", call.b, call.b_stride, call.col_tiles())?;
    // A bias holds a value per row, or per column.
    let biases = if ops.has(BlockOps::ROW_BIAS) {
        Some(call.rows)
    } else if ops.has(BlockOps::COL_BIAS) {
        Some(call.cols)
    } else {
        None
    };
    if let Some(n) = biases {
        let start = u128::from(call.bias);
        inside("the bias", start, start + u128::from(n) * 4)?;
    }
    // The extreme corners of a grid of `rows x cols` f32 at `base` with byte strides.
    let grid = |what: &str, base: u32, row_stride: i32, col_stride: i32| {
        let down = i128::from(call.rows - 1) * i128::from(row_stride);
        let right = i128::from(call.cols - 1) * i128::from(col_stride);
        let base = i128::from(base);
        let low = base + down.min(0) + right.min(0);
        let high = base + down.max(0) + right.max(0) + 4;
        if low < 0 || high > len as i128 {
            return Err(format!(
                "{what} at {base} with strides {row_stride}, {col_stride} spans {low}..{high}, \
                 outside the {memory_len}-byte memory"
            ));
        }
        Ok(())
    };
    if ops.has(BlockOps::RESIDUAL) {
        grid(
            "the residual",
            call.residual,
            call.residual_row_stride,
            call.residual_col_stride,
        )?;
    }
    grid(
        "the output",
        call.store,
        call.store_row_stride,
        call.store_col_stride,
    )?;
    Ok(ops)
}

/// `f32_mmm_block(call)`: the checked block, computed and stored in place.
fn f32_mmm_block(mut caller: Caller<'_, StoreData>, call: u32) -> wasmtime::Result<()> {
    const NAME: &str = "f32_mmm_block";
    let refused = |why: String| {
        wasmtime::Error::new(Refused {
            function: NAME,
            why,
        })
    };
    let memory = served_memory(&caller, NAME, HostKernels::V2)?;
    let data = memory.data_mut(&mut caller);
    let at = call as usize;
    let bytes = at
        .checked_add(BLOCK_CALL_BYTES)
        .and_then(|end| data.get(at..end))
        .ok_or_else(|| {
            refused(format!(
                "the call at {at} is outside the {}-byte memory",
                data.len()
            ))
        })?;
    let mut encoded = [0u8; BLOCK_CALL_BYTES];
    encoded.copy_from_slice(bytes);
    let call = BlockCall::from_bytes(&encoded);
    let ops = block(data.len(), &call).map_err(refused)?;
    // SAFETY: `block` checked every range the call reads or writes against this memory, and
    // no other reference to it is alive while the block runs.
    unsafe { native::block(data.as_mut_ptr(), &call, ops) };
    caller.data_mut().host_kernel_calls += u64::from(call.tiles().unwrap_or(0));
    Ok(())
}

/// The linker every capsule instance is made with: the `capsule_kernels` functions and
/// nothing else.
pub(crate) fn linker(engine: &wasmtime::Engine) -> Result<Linker<StoreData>> {
    let module = capsule_format::HOST_KERNELS_MODULE;
    let mut linker = Linker::new(engine);
    linker
        .func_wrap(module, "abi_version", |caller: Caller<'_, StoreData>| {
            caller.data().host_kernels.abi()
        })
        .map_err(Error::wasmtime)?;
    linker
        .func_wrap(module, "f32_mmm_8x8", f32_mmm_8x8)
        .map_err(Error::wasmtime)?;
    linker
        .func_wrap(module, "f32_mmm_block", f32_mmm_block)
        .map_err(Error::wasmtime)?;
    Ok(linker)
}

#[cfg(target_arch = "x86_64")]
mod native {
    use tract_linalg::mmm::{FusedKerSpec, MatMatMulKer, OutputStoreKer};
    use tract_linalg::x86_64::mmm::fma_mmm_f32_8x8;

    pub fn supported() -> bool {
        fma_mmm_f32_8x8.runnable()
    }

    /// The output tile, aligned as the kernel's stores like it.
    #[repr(C, align(32))]
    struct Tile([f32; 64]);

    /// `A (k x 8 packed) * B (k x 8 packed)` as an 8x8 row-major tile. `a` and `b` hold at
    /// least `k` steps each and `a` is 32-byte aligned (checked by the caller).
    pub fn product(a: &[u8], b: &[u8], k: usize) -> [f32; 64] {
        debug_assert!(a.len() >= k * super::STEP_BYTES && b.len() >= k * super::STEP_BYTES);
        debug_assert_eq!(a.as_ptr() as usize % super::A_ALIGN, 0);
        if !supported() {
            // Never reached: `abi_version` answers 0 on such machines, and the guest falls
            // back to its own kernel. A zero tile would be silently wrong, so compute it.
            return super::portable_product(a, b, k);
        }
        let mut tile = Tile([0.0; 64]);
        let program = [
            FusedKerSpec::Clear,
            FusedKerSpec::AddMatMul {
                k,
                pa: a.as_ptr(),
                pb: b.as_ptr(),
                packing: 0,
            },
            FusedKerSpec::Store(OutputStoreKer {
                ptr: tile.0.as_mut_ptr().cast(),
                row_byte_stride: 32,
                col_byte_stride: 4,
                item_size: 4,
            }),
            FusedKerSpec::Done,
        ];
        fma_mmm_f32_8x8.kernel(&program);
        // SAFETY: the kernel ran, so the machine has AVX.
        unsafe { clear_upper() };
        tile.0
    }

    /// Runs a block [`super::block`] accepted: on the [`wide`] kernels when the machine
    /// and the block's layout allow, else each whole tile as one program of tract's native
    /// 8x8 kernel (the product, the epilogue and the store, as tract's own plan would run
    /// them) and each tile cut by the block's edge through [`super::edge_tile`].
    ///
    /// # Safety
    /// `base` is the start of the memory `super::block` checked `call` against.
    pub unsafe fn block(base: *mut u8, call: &super::BlockCall, ops: super::BlockOps) {
        // SAFETY: the caller's contract.
        unsafe { block_with(base, call, ops, wide::Isa::here()) }
    }

    /// [`block`] with the wide kernels of `isa` (none: tract's kernel for every tile).
    ///
    /// # Safety
    /// As [`block`], and the machine runs `isa`.
    pub unsafe fn block_with(
        base: *mut u8,
        call: &super::BlockCall,
        ops: super::BlockOps,
        isa: Option<wide::Isa>,
    ) {
        use super::BlockOps as O;
        if !supported() {
            // Never reached (see `product`).
            // SAFETY: the caller's contract.
            return unsafe { super::portable_block(base, call, ops) };
        }
        let k = call.k as usize;
        // SAFETY: every tile's pointers lie inside the checked ranges (the caller's contract).
        unsafe {
            // The wide kernels take every block whose output has a contiguous side (the
            // guest's convolutions and dense layers); tract's kernel the others.
            if let Some(isa) = isa
                && let Some(form) = wide::Form::of(call, ops)
            {
                return wide::block(isa, form, base, call, ops);
            }
            let residual_fits = !ops.has(O::RESIDUAL) || super::gather_fits(call);
            super::each_tile(base, call, ops, |t| {
                if t.rows < 8 || t.cols < 8 || !residual_fits {
                    let a = std::slice::from_raw_parts(t.pa, k * super::STEP_BYTES);
                    let b = std::slice::from_raw_parts(t.pb, k * super::STEP_BYTES);
                    super::edge_tile(&product(a, b, k), &t, call, ops);
                    return;
                }
                let mut program = [FusedKerSpec::Done; 8];
                let mut n = 0;
                let mut push = |op| {
                    program[n] = op;
                    n += 1;
                };
                push(FusedKerSpec::Clear);
                push(FusedKerSpec::AddMatMul {
                    k,
                    pa: t.pa,
                    pb: t.pb,
                    packing: 0,
                });
                let residual = FusedKerSpec::AddUnicast(OutputStoreKer {
                    ptr: t.residual.cast_mut(),
                    row_byte_stride: call.residual_row_stride as isize,
                    col_byte_stride: call.residual_col_stride as isize,
                    item_size: 4,
                });
                if ops.has(O::RESIDUAL_FIRST) {
                    push(residual);
                }
                if ops.has(O::ROW_BIAS) {
                    push(FusedKerSpec::PerRowAdd(t.bias));
                } else if ops.has(O::COL_BIAS) {
                    push(FusedKerSpec::PerColAdd(t.bias));
                }
                if ops.has(O::RESIDUAL) && !ops.has(O::RESIDUAL_FIRST) {
                    push(residual);
                }
                if ops.has(O::MAX) {
                    push(FusedKerSpec::ScalarMax(call.max));
                }
                if ops.has(O::MIN) {
                    push(FusedKerSpec::ScalarMin(call.min));
                }
                push(FusedKerSpec::Store(OutputStoreKer {
                    ptr: t.store,
                    row_byte_stride: call.store_row_stride as isize,
                    col_byte_stride: call.store_col_stride as isize,
                    item_size: 4,
                }));
                fma_mmm_f32_8x8.kernel(&program);
                // Before the next tile's Rust (SSE) code: measured, without it every
                // instruction after the kernel paid the transition (the loop took a fifth
                // of a SqueezeNet's inference).
                clear_upper();
            });
        }
    }

    /// The wide kernels: a block's tiles computed several at a time, the outputs kept as
    /// vectors along the block's contiguous side (tract's 8x8 kernel keeps columns, so it
    /// stores a row-major output one value at a time and gathers a residual).
    ///
    /// A group is `P` panels of A by `W` panels of B (`8P x 8W` outputs). With AVX-512 (32
    /// vector registers) a group is up to 24 accumulators, `3 x 1` down a column of panels
    /// or `1 x 3` along a row of them; with AVX2 (16) it is one tile. Tiles cut by the
    /// block's edge are computed whole (their panels are padded) and stored through masks.
    ///
    /// Every output is the same chain of fused multiply-adds as in tract's kernel
    /// (`acc = a * b + acc`, from zero, `k` in order) followed by the same epilogue
    /// operations in the same order, so the bits are tract's (tested).
    pub(super) mod wide {
        use super::super::{BlockCall, BlockOps};

        /// The instruction sets the wide kernels are built for.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Isa {
            Avx2,
            Avx512,
        }

        impl Isa {
            /// The widest this machine runs, if any.
            pub fn here() -> Option<Isa> {
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    Some(Isa::Avx512)
                } else if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    Some(Isa::Avx2)
                } else {
                    None
                }
            }
        }

        /// Which side of a block's output is contiguous, so that 8 outputs are one vector.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Form {
            /// Columns are 4 bytes apart (and the residual's): a convolution's channels by
            /// its pixels.
            Rows,
            /// Rows are: the same product transposed.
            Columns,
        }

        impl Form {
            /// The form of the block's output (and residual), if either side is contiguous.
            pub fn of(call: &BlockCall, ops: BlockOps) -> Option<Form> {
                let residual = ops.has(BlockOps::RESIDUAL);
                if call.store_col_stride == 4 && (!residual || call.residual_col_stride == 4) {
                    Some(Form::Rows)
                } else if call.store_row_stride == 4 && (!residual || call.residual_row_stride == 4)
                {
                    Some(Form::Columns)
                } else {
                    None
                }
            }
        }

        /// Computes and stores every output of the block.
        ///
        /// # Safety
        /// `super::super::block` accepted `call` for the memory at `base`, `form` is
        /// [`Form::of`] the call and the machine runs `isa`.
        pub unsafe fn block(isa: Isa, form: Form, base: *mut u8, call: &BlockCall, ops: BlockOps) {
            let (call, ops) = match form {
                Form::Rows => (*call, ops),
                Form::Columns => transposed(call, ops),
            };
            // SAFETY: the caller's contract; the transposed call reads and writes the same
            // values.
            unsafe {
                match isa {
                    Isa::Avx512 => avx512::block(base, &call, ops),
                    Isa::Avx2 => avx2::block(base, &call, ops),
                }
            }
        }

        /// The same block as the transposed product, `Cᵀ = Bᵀ Aᵀ`: the panels of B as A's
        /// and the other way round (both are packed alike, 8 values a step), rows and
        /// columns, strides and biases swapped. Every output is the same chain (`b * a`
        /// is `a * b`), stored at the same address.
        fn transposed(call: &BlockCall, ops: BlockOps) -> (BlockCall, BlockOps) {
            let bias = if ops.has(BlockOps::ROW_BIAS) {
                BlockOps::COL_BIAS
            } else if ops.has(BlockOps::COL_BIAS) {
                BlockOps::ROW_BIAS
            } else {
                BlockOps(0)
            };
            let others = ops.0 & !(BlockOps::ROW_BIAS.0 | BlockOps::COL_BIAS.0);
            let call = BlockCall {
                rows: call.cols,
                cols: call.rows,
                a: call.b,
                a_stride: call.b_stride,
                b: call.a,
                b_stride: call.a_stride,
                residual_row_stride: call.residual_col_stride,
                residual_col_stride: call.residual_row_stride,
                store_row_stride: call.store_col_stride,
                store_col_stride: call.store_row_stride,
                ..*call
            };
            (call, BlockOps(others | bias.0))
        }

        /// Groups between the one running and the one whose outputs it prefetches. 1, 2 and
        /// 3 measured alike on SqueezeNet with host kernels, within the noise
        /// (docs/benchmarks.md, "Host blocks in chunks down the rows, outputs prefetched").
        const PREFETCH_AHEAD: usize = 2;

        /// Bytes of B's panels a run of groups along a block's columns keeps in the L1
        /// cache while it goes down every row panel (half of a 32 KiB L1; 8 and 32 KiB
        /// measured alike).
        pub const L1_PANELS_BYTES: usize = 16 * 1024;

        /// A group of a block: `tiles` panels of A from row tile `r` (`down`), or `tiles`
        /// panels of B from column tile `c`, by one panel of the other operand.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct Group {
            pub r: usize,
            pub c: usize,
            pub tiles: usize,
            pub down: bool,
        }

        /// The order a block's groups run in.
        ///
        /// A block with at least as many row tiles as column tiles (the guest's blocks are
        /// many panels of one operand by a few of the other) runs groups of up to `widest`
        /// row tiles, each meeting every column tile before the next: its panels of A stay
        /// in the L1 cache and its rows are stored a run of columns at a time.
        ///
        /// A wider block runs in chunks of column tiles whose panels of B fit in
        /// [`L1_PANELS_BYTES`]; a chunk goes down every row tile, one row tile at a time, in
        /// groups of up to `widest` column tiles. So at any time the stores go to 8 rows, a
        /// whole chunk of columns each, and not to every row of the block a few columns at
        /// a time (measured: that order waited on its stores, SqueezeNet's first
        /// convolution at 14 G multiply-adds/s where the same products without stores ran
        /// at 41).
        #[derive(Debug, Clone)]
        pub struct Order {
            rows: usize,
            cols: usize,
            widest: usize,
            down: bool,
            chunk: usize,
            /// The next group: its chunk's first column tile (across), its row tile
            /// (across) or first row tile (down), and its column tile.
            band: usize,
            r: usize,
            c: usize,
        }

        impl Order {
            /// The order of `call`'s groups of up to `widest` (1 to 3) tiles.
            pub fn of(call: &BlockCall, widest: usize) -> Order {
                let (rows, cols) = (call.row_tiles() as usize, call.col_tiles() as usize);
                let panel = (call.k as usize)
                    .saturating_mul(super::super::STEP_BYTES)
                    .max(1);
                let widest = widest.clamp(1, 3);
                let fit = (L1_PANELS_BYTES / panel) / widest * widest;
                Order {
                    rows,
                    cols,
                    widest,
                    down: rows >= cols,
                    chunk: fit.max(widest),
                    band: 0,
                    r: 0,
                    c: 0,
                }
            }

            /// Whether the groups run down the block (else across it, in chunks).
            pub fn down(&self) -> bool {
                self.down
            }

            /// Tiles of a group that may take up to `left` tiles.
            fn tiles(&self, left: usize) -> usize {
                left.min(self.widest)
            }
        }

        impl Iterator for Order {
            type Item = Group;

            fn next(&mut self) -> Option<Group> {
                if self.down {
                    if self.r >= self.rows {
                        return None;
                    }
                    let tiles = self.tiles(self.rows - self.r);
                    let g = Group {
                        r: self.r,
                        c: self.c,
                        tiles,
                        down: true,
                    };
                    self.c += 1;
                    if self.c == self.cols {
                        self.c = 0;
                        self.r += tiles;
                    }
                    Some(g)
                } else {
                    if self.band >= self.cols {
                        return None;
                    }
                    let end = self.cols.min(self.band + self.chunk);
                    let tiles = self.tiles(end - self.c);
                    let g = Group {
                        r: self.r,
                        c: self.c,
                        tiles,
                        down: false,
                    };
                    self.c += tiles;
                    if self.c == end {
                        self.r += 1;
                        self.c = self.band;
                        if self.r == self.rows {
                            self.r = 0;
                            self.band = end;
                            self.c = end;
                        }
                    }
                    Some(g)
                }
            }
        }

        /// Fetches the cache lines the group `g` across a block (one row tile by `g.tiles`
        /// column tiles) will store, and with a residual read, into the cache. Rows past
        /// the block's edge are left alone. A prefetch does not fault, and the addresses
        /// are computed with wrapping arithmetic and never dereferenced, so nothing here
        /// needs the block's checks.
        #[target_feature(enable = "sse")]
        fn prefetch_outputs(base: *mut u8, call: &BlockCall, ops: BlockOps, g: Group) {
            use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
            let first = 8 * g.r;
            let last = (8 * (g.r + 1)).min(call.rows as usize);
            let span = 32 * g.tiles;
            let lines = |at: u32, row_stride: i32| {
                let mut start = base
                    .wrapping_add(at as usize)
                    .wrapping_offset(first as isize * row_stride as isize + 32 * g.c as isize);
                for _ in first..last {
                    // Each cache line of the row's span once: one or two for a tile's
                    // 32 bytes, two or three for a group's 96.
                    let end = start.wrapping_add(span - 1).addr() & !63;
                    let mut line = start.addr() & !63;
                    while line <= end {
                        _mm_prefetch::<_MM_HINT_T0>(start.with_addr(line).cast_const().cast());
                        line += 64;
                    }
                    start = start.wrapping_offset(row_stride as isize);
                }
            };
            lines(call.store, call.store_row_stride);
            if ops.has(BlockOps::RESIDUAL) {
                lines(call.residual, call.residual_row_stride);
            }
        }

        /// One module per instruction set, of the same code: the target features are the
        /// functions', so that the intrinsics inline and (with AVX-512VL) the compiler has
        /// 32 vector registers.
        macro_rules! kernels {
            ($isa:ident, $features:literal, $group:literal) => {
                mod $isa {
                    use std::arch::x86_64::*;

                    use super::super::super::{BlockCall, BlockOps};

                    /// See [`super::block`]; the call in [`super::Form::Rows`].
                    #[target_feature(enable = $features)]
                    pub(super) unsafe fn block(base: *mut u8, call: &BlockCall, ops: BlockOps) {
                        let order = super::Order::of(call, $group);
                        // Across a block, the group that runs `PREFETCH_AHEAD` groups
                        // later has its outputs' cache lines fetched now: shallow products
                        // (a first convolution, k = 27) otherwise wait on every line they
                        // store. Down a block the prefetches cost more than they saved
                        // (SqueezeNet with host kernels, medians of 8 alternated runs:
                        // 10.61 ms prefetching across only, 11.00 both ways).
                        let mut ahead =
                            (!order.down()).then(|| order.clone().skip(super::PREFETCH_AHEAD));
                        for g in order {
                            if let Some(next) = ahead.as_mut().and_then(Iterator::next) {
                                super::prefetch_outputs(base, call, ops, next);
                            }
                            let (r, c) = (g.r, g.c);
                            // SAFETY: the group's tiles are the block's (the caller's
                            // contract, and `Order` yields only those).
                            unsafe {
                                match (g.tiles, g.down) {
                                    (3, true) => group_at::<3, 1>(base, call, ops, r, c),
                                    (3, false) => group_at::<1, 3>(base, call, ops, r, c),
                                    (2, true) => group_at::<2, 1>(base, call, ops, r, c),
                                    (2, false) => group_at::<1, 2>(base, call, ops, r, c),
                                    _ => group_at::<1, 1>(base, call, ops, r, c),
                                }
                            }
                        }
                    }

                    /// The group from row tile `r0` and column tile `c0`. Whole groups (no
                    /// row or column past the block's edge) have an epilogue without tests,
                    /// which the compiler unrolls with the accumulators in registers.
                    ///
                    /// # Safety
                    /// As [`block`], and the group's tiles are the block's.
                    #[target_feature(enable = $features)]
                    unsafe fn group_at<const P: usize, const W: usize>(
                        base: *mut u8,
                        call: &BlockCall,
                        ops: BlockOps,
                        r0: usize,
                        c0: usize,
                    ) {
                        let whole = 8 * (r0 + P) <= call.rows as usize
                            && 8 * (c0 + W) <= call.cols as usize;
                        // SAFETY: the caller's contract.
                        unsafe {
                            if whole {
                                group::<P, W, true>(base, call, ops, r0, c0)
                            } else {
                                group::<P, W, false>(base, call, ops, r0, c0)
                            }
                        }
                    }

                    /// The panels of the group from row tile `r0` and column tile `c0`.
                    ///
                    /// # Safety
                    /// As [`block`], and the group's tiles are the block's.
                    #[target_feature(enable = $features)]
                    unsafe fn panels<const P: usize, const W: usize>(
                        base: *mut u8,
                        call: &BlockCall,
                        r0: usize,
                        c0: usize,
                    ) -> ([*const f32; P], [*const f32; W]) {
                        let mut a = [base.cast_const().cast::<f32>(); P];
                        let mut b = [base.cast_const().cast::<f32>(); W];
                        // SAFETY: the panels are inside the memory (the caller's contract).
                        unsafe {
                            for (p, a) in a.iter_mut().enumerate() {
                                *a = base
                                    .add(call.a as usize + (r0 + p) * call.a_stride as usize)
                                    .cast();
                            }
                            for (w, b) in b.iter_mut().enumerate() {
                                *b = base
                                    .add(call.b as usize + (c0 + w) * call.b_stride as usize)
                                    .cast();
                            }
                        }
                        (a, b)
                    }

                    /// Lanes below `n` (at most 8) set.
                    #[target_feature(enable = $features)]
                    fn lanes(n: usize) -> __m256i {
                        _mm256_cmpgt_epi32(
                            _mm256_set1_epi32(n as i32),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
                        )
                    }

                    /// 8 contiguous values, the first `n` of them read when `n < 8` (the
                    /// others are zeros and their memory is not touched).
                    ///
                    /// # Safety
                    /// The first `min(n, 8)` values are readable.
                    #[target_feature(enable = $features)]
                    unsafe fn load(at: *const f32, n: usize) -> __m256 {
                        // SAFETY: the caller's contract; masked lanes do not fault.
                        unsafe {
                            if n >= 8 {
                                _mm256_loadu_ps(at)
                            } else {
                                _mm256_maskload_ps(at, lanes(n))
                            }
                        }
                    }

                    /// Stores the first `n` values of `v` (at most 8) at `at`.
                    ///
                    /// # Safety
                    /// The first `min(n, 8)` values are writable.
                    #[target_feature(enable = $features)]
                    unsafe fn store(at: *mut f32, n: usize, v: __m256) {
                        // SAFETY: the caller's contract; masked lanes do not fault.
                        unsafe {
                            if n >= 8 {
                                _mm256_storeu_ps(at, v)
                            } else {
                                _mm256_maskstore_ps(at, lanes(n), v)
                            }
                        }
                    }

                    /// The epilogue of 8 outputs, in tract's order: a residual read first
                    /// or after the bias, the bias, the bound first in `max`/`min` (a NaN
                    /// output stays NaN).
                    #[target_feature(enable = $features)]
                    fn epilogue(
                        ops: BlockOps,
                        mut v: __m256,
                        residual: __m256,
                        bias: __m256,
                        call: &BlockCall,
                    ) -> __m256 {
                        if ops.has(BlockOps::RESIDUAL_FIRST) {
                            v = _mm256_add_ps(v, residual);
                        }
                        if ops.has(BlockOps::ROW_BIAS) || ops.has(BlockOps::COL_BIAS) {
                            v = _mm256_add_ps(v, bias);
                        }
                        if ops.has(BlockOps::RESIDUAL) && !ops.has(BlockOps::RESIDUAL_FIRST) {
                            v = _mm256_add_ps(v, residual);
                        }
                        if ops.has(BlockOps::MAX) {
                            v = _mm256_max_ps(_mm256_set1_ps(call.max), v);
                        }
                        if ops.has(BlockOps::MIN) {
                            v = _mm256_min_ps(_mm256_set1_ps(call.min), v);
                        }
                        v
                    }

                    /// A group: accumulator `(p, j, w)` is row `8p + j`'s 8 columns of panel
                    /// `w`. Each step loads B's vectors and broadcasts A's values.
                    ///
                    /// # Safety
                    /// As [`panels`], and the call is in [`super::Form::Rows`].
                    #[target_feature(enable = $features)]
                    unsafe fn group<const P: usize, const W: usize, const WHOLE: bool>(
                        base: *mut u8,
                        call: &BlockCall,
                        ops: BlockOps,
                        r0: usize,
                        c0: usize,
                    ) {
                        // SAFETY: what is read and written below is the group's part of
                        // the block (the caller's contract): rows and columns past the
                        // block's edge are skipped or masked.
                        unsafe {
                            let (a, b) = panels::<P, W>(base, call, r0, c0);
                            let mut acc = [[[_mm256_setzero_ps(); W]; 8]; P];
                            for step in 0..call.k as usize {
                                let mut bv = [_mm256_setzero_ps(); W];
                                for w in 0..W {
                                    bv[w] = _mm256_loadu_ps(b[w].add(8 * step));
                                }
                                for p in 0..P {
                                    for j in 0..8 {
                                        let av = _mm256_set1_ps(*a[p].add(8 * step + j));
                                        for w in 0..W {
                                            acc[p][j][w] = _mm256_fmadd_ps(av, bv[w], acc[p][j][w]);
                                        }
                                    }
                                }
                            }
                            let bias = base.wrapping_add(call.bias as usize).cast::<f32>();
                            let zero = _mm256_setzero_ps();
                            for p in 0..P {
                                for j in 0..8 {
                                    let r = 8 * (r0 + p) + j;
                                    if !WHOLE && r >= call.rows as usize {
                                        break;
                                    }
                                    for w in 0..W {
                                        let c = 8 * (c0 + w);
                                        let n = if WHOLE { 8 } else { call.cols as usize - c };
                                        let residual = if ops.has(BlockOps::RESIDUAL) {
                                            let at = base.add(call.residual as usize).offset(
                                                r as isize * call.residual_row_stride as isize
                                                    + 4 * c as isize,
                                            );
                                            load(at.cast(), n)
                                        } else {
                                            zero
                                        };
                                        let bias = if ops.has(BlockOps::ROW_BIAS) {
                                            _mm256_set1_ps(*bias.add(r))
                                        } else if ops.has(BlockOps::COL_BIAS) {
                                            load(bias.add(c), n)
                                        } else {
                                            zero
                                        };
                                        let v = epilogue(ops, acc[p][j][w], residual, bias, call);
                                        let at = base.add(call.store as usize).offset(
                                            r as isize * call.store_row_stride as isize
                                                + 4 * c as isize,
                                        );
                                        store(at.cast(), n, v);
                                    }
                                }
                            }
                        }
                    }
                }
            };
        }

        kernels!(avx512, "avx512f,avx512vl,avx2,fma", 3);
        kernels!(avx2, "avx2,fma", 1);
    }

    /// The kernel returns with dirty upper halves of the AVX registers; back in Cranelift's
    /// SSE code every SIMD instruction would then pay the AVX-SSE transition penalty (measured:
    /// a capsule 20x slower). `vzeroupper` clears them.
    #[target_feature(enable = "avx")]
    unsafe fn clear_upper() {
        std::arch::x86_64::_mm256_zeroupper();
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod native {
    pub fn supported() -> bool {
        false
    }

    pub fn product(a: &[u8], b: &[u8], k: usize) -> [f32; 64] {
        super::portable_product(a, b, k)
    }

    /// # Safety
    /// As [`super::portable_block`].
    pub unsafe fn block(base: *mut u8, call: &super::BlockCall, ops: super::BlockOps) {
        // SAFETY: the caller's contract.
        unsafe { super::portable_block(base, call, ops) }
    }
}

/// Whether the native kernel can add the call's residual: it gathers each column of the
/// tile with 32-bit signed offsets `row * residual_row_stride`, which `block` does not
/// limit (it checks the exact 64-bit range). A capsule with a memory over 2 GiB could
/// otherwise make the offsets of rows 1-7 wrap and read up to 4 GiB outside its memory;
/// such tiles take the plain-Rust epilogue, which computes every address in 64 bits.
fn gather_fits(call: &BlockCall) -> bool {
    i64::from(call.residual_row_stride).abs() * 7 <= i64::from(i32::MAX)
}

/// One tile of a checked block: where its operands are and how much of it is inside the
/// block.
struct TileAt {
    pa: *const u8,
    pb: *const u8,
    /// The bias of the tile's first row or column (dangling without a bias).
    bias: *const f32,
    /// The residual's and the output's value at the tile's first row and column.
    residual: *const u8,
    store: *mut u8,
    /// Rows and columns inside the block (8 but at its last row or column group).
    rows: usize,
    cols: usize,
}

/// Calls `f` on every tile of `call`, column group by column group.
///
/// # Safety
/// `block` accepted `call` for the memory at `base`; then every pointer of every tile, and
/// everything its tile reads or writes, lies inside that memory.
unsafe fn each_tile(base: *mut u8, call: &BlockCall, ops: BlockOps, mut f: impl FnMut(TileAt)) {
    let grid = |at: u32, row_stride: i32, col_stride: i32, i: usize, j: usize| {
        at as isize
            + (8 * i) as isize * row_stride as isize
            + (8 * j) as isize * col_stride as isize
    };
    for j in 0..call.col_tiles() as usize {
        for i in 0..call.row_tiles() as usize {
            let bias = if ops.has(BlockOps::COL_BIAS) {
                8 * j
            } else {
                8 * i
            };
            // SAFETY (of the offsets): inside the checked ranges (the caller's contract); a
            // residual or bias the ops do not name is never dereferenced, so its wrapping
            // offset is harmless.
            unsafe {
                f(TileAt {
                    pa: base.add(call.a as usize + i * call.a_stride as usize),
                    pb: base.add(call.b as usize + j * call.b_stride as usize),
                    bias: base
                        .wrapping_add(call.bias as usize)
                        .cast::<f32>()
                        .wrapping_add(bias),
                    residual: base.wrapping_offset(grid(
                        call.residual,
                        call.residual_row_stride,
                        call.residual_col_stride,
                        i,
                        j,
                    )),
                    store: base.offset(grid(
                        call.store,
                        call.store_row_stride,
                        call.store_col_stride,
                        i,
                        j,
                    )),
                    rows: (call.rows as usize - 8 * i).min(8),
                    cols: (call.cols as usize - 8 * j).min(8),
                })
            }
        }
    }
}

/// The epilogue and the store of a tile, in plain Rust, on its outputs inside the block
/// only: for tiles cut by the block's edge, whose bias, residual and output end mid-tile.
/// The clamps keep a NaN as the native kernel's `max`/`min` and wasm's do (`f32::max` would
/// not).
///
/// # Safety
/// As [`each_tile`], for `t`.
unsafe fn edge_tile(product: &[f32; 64], t: &TileAt, call: &BlockCall, ops: BlockOps) {
    for r in 0..t.rows {
        for c in 0..t.cols {
            let at = |row_stride: i32, col_stride: i32| {
                r as isize * row_stride as isize + c as isize * col_stride as isize
            };
            let mut v = product[r * 8 + c];
            // SAFETY: row r and column c are inside the block (the caller's contract).
            unsafe {
                let residual = || {
                    let at = at(call.residual_row_stride, call.residual_col_stride);
                    t.residual.offset(at).cast::<f32>().read_unaligned()
                };
                if ops.has(BlockOps::RESIDUAL_FIRST) {
                    v += residual();
                }
                if ops.has(BlockOps::ROW_BIAS) {
                    v += t.bias.add(r).read_unaligned();
                } else if ops.has(BlockOps::COL_BIAS) {
                    v += t.bias.add(c).read_unaligned();
                }
                if ops.has(BlockOps::RESIDUAL) && !ops.has(BlockOps::RESIDUAL_FIRST) {
                    v += residual();
                }
                if ops.has(BlockOps::MAX) && call.max > v {
                    v = call.max;
                }
                if ops.has(BlockOps::MIN) && call.min < v {
                    v = call.min;
                }
                let at = at(call.store_row_stride, call.store_col_stride);
                t.store.offset(at).cast::<f32>().write_unaligned(v);
            }
        }
    }
}

/// A block in plain Rust: the reference of the tests, and what a machine without the native
/// kernel would compute if a guest called anyway.
///
/// # Safety
/// As [`each_tile`].
unsafe fn portable_block(base: *mut u8, call: &BlockCall, ops: BlockOps) {
    let k = call.k as usize;
    // SAFETY: the caller's contract.
    unsafe {
        each_tile(base, call, ops, |t| {
            let a = std::slice::from_raw_parts(t.pa, k * STEP_BYTES);
            let b = std::slice::from_raw_parts(t.pb, k * STEP_BYTES);
            edge_tile(&portable_product(a, b, k), &t, call, ops);
        })
    }
}

/// The product in plain Rust: the reference of the tests, and what a machine without the
/// native kernel would compute if a guest called anyway.
fn portable_product(a: &[u8], b: &[u8], k: usize) -> [f32; 64] {
    let f = |bytes: &[u8], i: usize| {
        let at = i * 4;
        f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
    };
    let mut tile = [0f32; 64];
    for step in 0..k {
        for row in 0..8 {
            let x = f(a, step * 8 + row);
            for col in 0..8 {
                tile[row * 8 + col] += x * f(b, step * 8 + col);
            }
        }
    }
    tile
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_inside_memory_are_accepted() {
        let ops = operands(4096, 4, 64, 1000, 2048).unwrap();
        assert_eq!(ops.a, 64..192);
        assert_eq!(ops.b, 1000..1128);
        assert_eq!(ops.out, 2048..2304);
        // Ranges ending exactly at the end of memory are inside it.
        assert!(operands(4096, 4, 4096 - 128, 4096 - 128, 4096 - 256).is_ok());
        // k = 0 reads nothing.
        assert!(operands(4096, 0, 4096, 4096, 0).is_ok());
        // The deepest product the host takes, in a memory that holds it.
        let max = capsule_format::HOST_KERNELS_MAX_K;
        assert!(operands(80 << 20, max, 0, 40 << 20, 0).is_ok());
        assert!(operands(80 << 20, max + 1, 0, 40 << 20, 0).is_err());
    }

    #[test]
    fn hostile_operands_are_refused() {
        let len = 1 << 16;
        for (k, a, b, out) in [
            (1, len as u32, 0, 0),       // A starts at the end of memory
            (4, 0, len as u32 - 64, 0),  // B runs off the end
            (1, 0, 0, len as u32 - 255), // tile runs off the end
            (u32::MAX, 0, 0, 0),         // a huge k
            (1, !31, 0, 0),              // a pointer near 4 GiB
            (1, 0, u32::MAX, 0),         // wrapping is not a way in
            (1, 0, 0, u32::MAX),
            (1, 16, 0, 0),      // A not 32-byte aligned
            (1 << 27, 0, 0, 0), // k * 32 = 4 GiB
        ] {
            assert!(
                operands(len, k, a, b, out).is_err(),
                "accepted k={k} a={a} b={b} out={out}"
            );
        }
    }

    /// A fixed-seed xorshift generator: the fuzz tests' arguments, the same on every run.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// Random arguments, biased toward the edges (0, the end of memory, 4 GiB, overflowing
    /// k): whatever `operands` accepts lies inside memory with A aligned.
    #[test]
    fn accepted_operands_always_lie_inside_memory() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        let mut accepted = 0;
        for _ in 0..200_000 {
            let len = [0, 256, 65_536, 1 << 20][(next() % 4) as usize];
            let mut arg = |scale: u32| match next() % 5 {
                0 => 0,
                1 => u32::MAX - (next() % 64) as u32,
                2 => (len as u32).wrapping_sub((next() % 512) as u32),
                3 => (next() % u64::from(scale)) as u32,
                _ => next() as u32,
            };
            let (k, a, b, out) = (
                arg(64),
                arg(len.max(1) as u32),
                arg(len.max(1) as u32),
                arg(len.max(1) as u32),
            );
            if let Ok(ops) = operands(len, k, a, b, out) {
                accepted += 1;
                for r in [&ops.a, &ops.b, &ops.out] {
                    assert!(r.start <= r.end && r.end <= len, "{k} {a} {b} {out}: {r:?}");
                }
                assert_eq!(ops.a.start % A_ALIGN, 0);
                assert_eq!(ops.a.len(), k as usize * STEP_BYTES);
                assert_eq!(ops.b.len(), k as usize * STEP_BYTES);
                assert_eq!(ops.out.len(), TILE_BYTES);
            }
        }
        assert!(
            accepted > 100,
            "the generator reaches valid operands too ({accepted})"
        );
    }

    #[test]
    fn the_native_kernel_matches_the_portable_product() {
        if !supported_here() {
            eprintln!("SKIP the_native_kernel_matches_the_portable_product: no AVX2+FMA here");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI machines must run the native kernel"
            );
            return;
        }
        #[repr(C, align(32))]
        struct Panels([u8; 2 * 37 * STEP_BYTES]);
        let mut panels = Panels([0; 2 * 37 * STEP_BYTES]);
        // Small integers: every sum is exact in f32, so FMA and two roundings agree.
        for (i, chunk) in panels.0.chunks_exact_mut(4).enumerate() {
            let v = ((i * 7 + 3) % 11) as f32 - 5.0;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        let (a, b) = panels.0.split_at(37 * STEP_BYTES);
        for k in [0, 1, 2, 8, 37] {
            assert_eq!(
                native::product(a, b, k),
                portable_product(a, b, k),
                "k = {k}"
            );
        }
    }

    /// A memory of `len` bytes holding small integers (every sum of products exact in f32,
    /// so FMA and two roundings agree), aligned for A.
    fn integer_memory(len: usize) -> Vec<Aligned32> {
        let mut memory = vec![Aligned32([0; 32]); len / 32];
        for (i, chunk) in bytes_of(&mut memory).chunks_exact_mut(4).enumerate() {
            let v = ((i * 7 + 3) % 11) as f32 - 5.0;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        memory
    }

    #[derive(Clone, Copy)]
    #[repr(C, align(32))]
    struct Aligned32([u8; 32]);

    fn bytes_of(memory: &mut [Aligned32]) -> &mut [u8] {
        // SAFETY: plain bytes, the same length.
        unsafe { std::slice::from_raw_parts_mut(memory.as_mut_ptr().cast(), memory.len() * 32) }
    }

    fn f32_at(memory: &[u8], at: isize) -> f32 {
        let at = at as usize;
        f32::from_le_bytes(memory[at..at + 4].try_into().unwrap())
    }

    /// A block call over a 64 KiB memory: A's panels at 0, B's at 16384, the bias at 32768,
    /// the residual at 36864, the output at 49152 (row-major, 64 floats a row).
    fn block_call(k: u32, rows: u32, cols: u32, ops: BlockOps) -> BlockCall {
        BlockCall {
            k,
            rows,
            cols,
            a: 0,
            a_stride: k * 32,
            b: 16384,
            b_stride: k * 32,
            ops: ops.0,
            bias: 32768,
            residual: 36864,
            residual_row_stride: 4 * 24,
            residual_col_stride: 4,
            store: 49152,
            store_row_stride: 4 * 64,
            store_col_stride: 4,
            max: -3.0,
            min: 40.0,
        }
    }

    /// The block's outputs as the definition says, from the packed panels.
    fn expected(memory: &[u8], call: &BlockCall, ops: BlockOps) -> Vec<f32> {
        let mut out = Vec::new();
        for r in 0..call.rows as isize {
            for c in 0..call.cols as isize {
                let mut v = 0f32;
                for step in 0..call.k as isize {
                    let a = call.a as isize
                        + (r / 8) * call.a_stride as isize
                        + step * 32
                        + (r % 8) * 4;
                    let b = call.b as isize
                        + (c / 8) * call.b_stride as isize
                        + step * 32
                        + (c % 8) * 4;
                    v += f32_at(memory, a) * f32_at(memory, b);
                }
                let residual = f32_at(
                    memory,
                    call.residual as isize
                        + r * call.residual_row_stride as isize
                        + c * call.residual_col_stride as isize,
                );
                if ops.has(BlockOps::RESIDUAL_FIRST) {
                    v += residual;
                }
                if ops.has(BlockOps::ROW_BIAS) {
                    v += f32_at(memory, call.bias as isize + 4 * r);
                }
                if ops.has(BlockOps::COL_BIAS) {
                    v += f32_at(memory, call.bias as isize + 4 * c);
                }
                if ops.has(BlockOps::RESIDUAL) && !ops.has(BlockOps::RESIDUAL_FIRST) {
                    v += residual;
                }
                if ops.has(BlockOps::MAX) {
                    v = v.max(call.max);
                }
                if ops.has(BlockOps::MIN) {
                    v = v.min(call.min);
                }
                out.push(v);
            }
        }
        out
    }

    fn stored(memory: &[u8], call: &BlockCall) -> Vec<f32> {
        let mut out = Vec::new();
        for r in 0..call.rows as isize {
            for c in 0..call.cols as isize {
                let at = call.store as isize
                    + r * call.store_row_stride as isize
                    + c * call.store_col_stride as isize;
                out.push(f32_at(memory, at));
            }
        }
        out
    }

    /// Blocks of whole and cut tiles, with each epilogue, stored row-major, transposed,
    /// backwards and with rows far apart: the plain-Rust block and (where the machine has
    /// it) the native one store exactly the definition's values, and nothing outside the
    /// output changes.
    #[test]
    fn blocks_compute_the_product_and_its_epilogue() {
        use BlockOps as O;
        let epilogues = [
            O(0),
            O::ROW_BIAS,
            O::COL_BIAS | O::MAX,
            O::ROW_BIAS | O::RESIDUAL | O::MAX,
            O::ROW_BIAS | O::RESIDUAL | O::MAX | O::MIN,
            O::RESIDUAL | O::MIN,
            O::RESIDUAL_FIRST | O::RESIDUAL | O::COL_BIAS | O::MAX,
        ];
        let runs = runs();
        // Single tiles, cut tiles, and the wide kernels' groups down a column of panels
        // (3, 2 and 1 at the end) and along a row of them.
        let shapes = [
            (8, 8),
            (24, 8),
            (21, 8),
            (8, 5),
            (19, 16),
            (3, 20),
            (1, 1),
            (48, 8),
            (44, 8),
            (8, 40),
            (5, 56),
            (16, 16),
            // Several panels of each: groups down (or along) the longer side, each against
            // every panel of the other.
            (24, 24),
            (23, 17),
            (16, 40),
        ];
        for (rows, cols) in shapes {
            for k in [1, 9, 64] {
                for ops in epilogues {
                    for layout in 0..5 {
                        let mut call = block_call(k, rows, cols, ops);
                        let mut len = 1 << 16;
                        match layout {
                            // The output transposed.
                            1 => (call.store_row_stride, call.store_col_stride) = (4, 4 * 64),
                            // Both strides negative (the output read backwards from its
                            // last value), the residual transposed.
                            2 => {
                                (call.store_row_stride, call.store_col_stride) = (-256, -4);
                                call.store += 23 * 256 + 63 * 4;
                                (call.residual_row_stride, call.residual_col_stride) = (4, 96);
                            }
                            // The output and the residual transposed.
                            4 => {
                                (call.store_row_stride, call.store_col_stride) = (4, 4 * 64);
                                (call.residual_row_stride, call.residual_col_stride) = (4, 96);
                            }
                            // Rows far apart, the residual's backwards.
                            3 => {
                                len = 1 << 19;
                                (call.store, call.store_row_stride) = (1 << 16, 4096);
                                (call.residual, call.residual_row_stride) = (0x7f000, -4096);
                            }
                            _ => {}
                        }
                        let mut memory = integer_memory(len);
                        let bytes = bytes_of(&mut memory);
                        assert_eq!(block(bytes.len(), &call), Ok(ops), "{call:?}");
                        let want = expected(bytes, &call, ops);
                        let before = bytes.to_vec();
                        for run in &runs {
                            bytes.copy_from_slice(&before);
                            // SAFETY: `block` accepted the call for this memory; `runs`
                            // holds only what this machine runs.
                            unsafe { run.run(bytes.as_mut_ptr(), &call, ops) };
                            assert_eq!(stored(bytes, &call), want, "{call:?}");
                            // Only the outputs changed.
                            let mut outputs = std::collections::HashSet::new();
                            for r in 0..rows as isize {
                                for c in 0..cols as isize {
                                    let at = call.store as isize
                                        + r * call.store_row_stride as isize
                                        + c * call.store_col_stride as isize;
                                    outputs.extend(at as usize..at as usize + 4);
                                }
                            }
                            for (i, (now, then)) in bytes.iter().zip(&before).enumerate() {
                                assert!(
                                    now == then || outputs.contains(&i),
                                    "byte {i} changed: {call:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// One way to run a checked block.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Run {
        Portable,
        /// Tract's native kernel for every tile.
        Tract,
        #[cfg(target_arch = "x86_64")]
        Wide(native::wide::Isa),
    }

    impl Run {
        /// # Safety
        /// As [`portable_block`], and the machine runs `self`.
        unsafe fn run(self, base: *mut u8, call: &BlockCall, ops: BlockOps) {
            // SAFETY: the caller's contract.
            unsafe {
                match self {
                    Run::Portable => portable_block(base, call, ops),
                    #[cfg(target_arch = "x86_64")]
                    Run::Tract => native::block_with(base, call, ops, None),
                    #[cfg(not(target_arch = "x86_64"))]
                    Run::Tract => native::block(base, call, ops),
                    #[cfg(target_arch = "x86_64")]
                    Run::Wide(isa) => native::block_with(base, call, ops, Some(isa)),
                }
            }
        }
    }

    /// Every way this machine runs a block, each one it cannot named on stderr (AVX2+FMA
    /// is required under `CI=true`, as the node's host kernels need it).
    fn runs() -> Vec<Run> {
        let mut runs = vec![Run::Portable];
        if !supported_here() {
            eprintln!("SKIP the native kernels' blocks: no AVX2+FMA here");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI machines must run the native kernel"
            );
            return runs;
        }
        runs.push(Run::Tract);
        #[cfg(target_arch = "x86_64")]
        {
            use native::wide::Isa;
            runs.push(Run::Wide(Isa::Avx2));
            if Isa::here() == Some(Isa::Avx512) {
                runs.push(Run::Wide(Isa::Avx512));
            } else {
                eprintln!("SKIP the AVX-512 wide kernels' blocks: no AVX-512F+VL here");
            }
        }
        runs
    }

    /// The wide kernels store tract's kernel's bits on values whose sums round (unlike
    /// [`blocks_compute_the_product_and_its_epilogue`]'s integers): same fused chain, same
    /// epilogue, same order.
    #[test]
    fn wide_kernels_store_the_bits_of_tracts_kernel() {
        use BlockOps as O;
        let runs = runs();
        let Some(&reference) = runs.iter().find(|r| **r == Run::Tract) else {
            return;
        };
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let mut memory = vec![Aligned32([0; 32]); (1 << 16) / 32];
        for chunk in bytes_of(&mut memory).chunks_exact_mut(4) {
            // Uniform in [-1, 1) with a full mantissa.
            let v = (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        let bytes = bytes_of(&mut memory);
        let before = bytes.to_vec();
        for (rows, cols) in [
            (48, 8),
            (8, 48),
            (40, 8),
            (8, 16),
            (24, 24),
            (35, 8),
            (8, 13),
            // Across in chunks of column tiles (k = 64: 6 + 2; k = 100: 3 + 2, each chunk
            // down every row tile).
            (16, 64),
            (24, 40),
        ] {
            for k in [1, 7, 64, 100] {
                for ops in [
                    O(0),
                    O::ROW_BIAS | O::RESIDUAL | O::MAX,
                    O::RESIDUAL_FIRST | O::RESIDUAL | O::COL_BIAS | O::MAX | O::MIN,
                ] {
                    for transposed in [false, true] {
                        let mut call = block_call(k, rows, cols, ops);
                        (call.max, call.min) = (-0.25, 0.5);
                        if transposed {
                            (call.store_row_stride, call.store_col_stride) = (4, 4 * 64);
                            (call.residual_row_stride, call.residual_col_stride) = (4, 96);
                        }
                        assert_eq!(block(bytes.len(), &call), Ok(ops), "{call:?}");
                        bytes.copy_from_slice(&before);
                        // SAFETY: accepted above; the machine runs tract's kernel.
                        unsafe { reference.run(bytes.as_mut_ptr(), &call, ops) };
                        let want = bytes.to_vec();
                        for run in runs.iter().filter(|r| matches!(r, Run::Wide(_))) {
                            bytes.copy_from_slice(&before);
                            // SAFETY: as above, for `run`.
                            unsafe { run.run(bytes.as_mut_ptr(), &call, ops) };
                            assert!(bytes == want.as_slice(), "{run:?}: {call:?}");
                        }
                    }
                }
            }
        }
    }

    /// Every tile of a block is in exactly one group of its order, a group is 1 to `widest`
    /// tiles along the block's longer side, and across a wide block each row tile of a
    /// chunk of columns follows the one above it, the chunk's panels of B within the L1
    /// budget (or one group's).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn a_blocks_order_runs_every_tile_once() {
        use native::wide::{L1_PANELS_BYTES, Order};
        for rows in 1..=7usize {
            for cols in 1..=13usize {
                for k in [1, 27, 100, 600, 5000] {
                    for widest in 1..=3 {
                        let call = block_call(k, 8 * rows as u32, 8 * cols as u32 - 3, BlockOps(0));
                        let panel = k as usize * STEP_BYTES;
                        let mut seen = vec![vec![0u32; cols]; rows];
                        // The columns of the chunk going down the row tiles.
                        let mut chunk: Vec<usize> = Vec::new();
                        for g in Order::of(&call, widest) {
                            assert!((1..=widest).contains(&g.tiles), "{g:?}");
                            assert_eq!(g.down, rows >= cols, "{g:?}");
                            let (r, c) = if g.down {
                                (g.r..g.r + g.tiles, g.c..g.c + 1)
                            } else {
                                (g.r..g.r + 1, g.c..g.c + g.tiles)
                            };
                            for r in r {
                                for c in c.clone() {
                                    seen[r][c] += 1;
                                    if !g.down && r > 0 {
                                        assert_eq!(seen[r - 1][c], 1, "{g:?} before the row above");
                                    }
                                }
                            }
                            if !g.down && rows > 1 {
                                if g.r == 0 && chunk.iter().any(|&c| seen[rows - 1][c] == 1) {
                                    chunk.clear();
                                }
                                for c in c.clone() {
                                    if !chunk.contains(&c) {
                                        chunk.push(c);
                                    }
                                }
                                assert!(
                                    chunk.len() * panel <= L1_PANELS_BYTES.max(widest * panel),
                                    "{rows} x {cols} tiles, k = {k}: a chunk of {chunk:?}"
                                );
                            }
                        }
                        assert!(
                            seen.iter().flatten().all(|&n| n == 1),
                            "{rows} x {cols} tiles, k = {k}, widest {widest}: {seen:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn hostile_blocks_are_refused() {
        use BlockOps as O;
        let len = 1 << 16;
        let good = block_call(4, 16, 8, O::ROW_BIAS | O::RESIDUAL | O::MAX | O::MIN);
        assert!(block(len, &good).is_ok());
        let max_k = capsule_format::HOST_KERNELS_MAX_K;
        for (what, call) in [
            ("unknown step", BlockCall { ops: 64, ..good }),
            (
                "an order without a residual",
                BlockCall {
                    ops: O::RESIDUAL_FIRST.0,
                    ..good
                },
            ),
            (
                "two biases",
                BlockCall {
                    ops: (O::ROW_BIAS | O::COL_BIAS).0,
                    ..good
                },
            ),
            ("no rows", BlockCall { rows: 0, ..good }),
            ("no columns", BlockCall { cols: 0, ..good }),
            (
                "huge k",
                BlockCall {
                    k: max_k + 1,
                    ..good
                },
            ),
            (
                "too much work",
                BlockCall {
                    k: max_k,
                    a_stride: 0,
                    ..good
                },
            ),
            (
                "tiles without end",
                BlockCall {
                    k: 0,
                    rows: u32::MAX,
                    cols: u32::MAX,
                    ..good
                },
            ),
            (
                "A off the end",
                BlockCall {
                    a: len as u32 - 64,
                    ..good
                },
            ),
            (
                "A's stride off the end",
                BlockCall {
                    a_stride: 1 << 16,
                    ..good
                },
            ),
            (
                "A's stride past 4 GiB",
                BlockCall {
                    a_stride: u32::MAX - 31,
                    ..good
                },
            ),
            ("A misaligned", BlockCall { a: 16, ..good }),
            (
                "A's stride misaligned",
                BlockCall {
                    a_stride: 4 * 32 + 4,
                    ..good
                },
            ),
            (
                "B off the end",
                BlockCall {
                    b: len as u32 - 64,
                    ..good
                },
            ),
            (
                "B's stride",
                BlockCall {
                    cols: 9,
                    b_stride: u32::MAX,
                    ..good
                },
            ),
            (
                "bias off the end",
                BlockCall {
                    bias: len as u32 - 60,
                    ..good
                },
            ),
            (
                "column bias off the end",
                BlockCall {
                    ops: O::COL_BIAS.0,
                    bias: len as u32 - 28,
                    ..good
                },
            ),
            (
                "residual below 0",
                BlockCall {
                    residual: 64,
                    residual_row_stride: -8,
                    ..good
                },
            ),
            (
                "residual's column stride",
                BlockCall {
                    residual_col_stride: i32::MIN,
                    ..good
                },
            ),
            (
                "residual off the end",
                BlockCall {
                    residual: len as u32 - 4,
                    ..good
                },
            ),
            (
                "output off the end",
                BlockCall {
                    store: len as u32 - 4,
                    ..good
                },
            ),
            (
                "output past 4 GiB",
                BlockCall {
                    store: u32::MAX,
                    ..good
                },
            ),
            (
                "output's stride",
                BlockCall {
                    store_row_stride: i32::MAX,
                    ..good
                },
            ),
        ] {
            assert!(block(len, &call).is_err(), "accepted {what}: {call:?}");
        }
        // The depth and work limits on their own, in a memory that holds everything (1 TiB):
        // the deepest product in one tile passes, deeper or more tiles do not.
        let huge = 1 << 40;
        let deep = BlockCall {
            k: max_k,
            rows: 8,
            cols: 8,
            a_stride: 0,
            ..good
        };
        assert!(block(huge, &deep).is_ok());
        assert!(
            block(
                huge,
                &BlockCall {
                    k: max_k + 1,
                    ..deep
                }
            )
            .unwrap_err()
            .contains("over the limit")
        );
        assert!(
            block(huge, &BlockCall { rows: 16, ..deep })
                .unwrap_err()
                .contains("tile steps")
        );
        let shallow = BlockCall {
            k: 0,
            rows: 8 * BlockCall::max_tiles(0) as u32,
            a_stride: 0,
            ..deep
        };
        assert!(block(huge, &shallow).is_ok());
        let more = BlockCall {
            rows: shallow.rows + 8,
            ..shallow
        };
        assert!(block(huge, &more).unwrap_err().contains("tile steps"));
        // A residual row stride the native gather cannot take is accepted (the range is
        // checked exactly) and left to the plain-Rust epilogue.
        let far = BlockCall {
            residual: 0,
            residual_row_stride: i32::MAX / 7 + 1,
            ..good
        };
        assert!(block(huge, &far).is_ok());
        assert!(!gather_fits(&far));
        assert!(gather_fits(&BlockCall {
            residual_row_stride: i32::MAX / 7,
            ..good
        }));
        assert!(gather_fits(&BlockCall {
            residual_row_stride: -(i32::MAX / 7),
            ..good
        }));
        assert!(!gather_fits(&BlockCall {
            residual_row_stride: i32::MIN,
            ..good
        }));
        // Steps the call does not name are not checked: their addresses are never read.
        let plain = BlockCall {
            ops: 0,
            bias: u32::MAX,
            residual: u32::MAX,
            ..good
        };
        assert!(block(len, &plain).is_ok());
    }

    /// Random calls, biased toward the edges: whatever `block` accepts reads and writes only
    /// inside memory, A aligned, the work bounded.
    #[test]
    fn accepted_blocks_always_lie_inside_memory() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let mut accepted = 0;
        for _ in 0..100_000 {
            let len = [0usize, 4096, 65_536][(next() % 3) as usize];
            // Mostly small values (a call must get every field right to be accepted), one in
            // six at an edge or random.
            let mut arg = |scale: u32| match next() % 36 {
                0 => 0,
                1 => u32::MAX - (next() % 64) as u32,
                2 => (len as u32).wrapping_sub((next() % 512) as u32),
                3..=5 => next() as u32,
                _ => (next() % u64::from(scale)) as u32,
            };
            let l = len.max(1) as u32;
            let call = BlockCall {
                k: arg(8),
                rows: arg(24),
                cols: arg(24),
                a: arg(l) & !31,
                a_stride: arg(2048) & !31,
                b: arg(l),
                b_stride: arg(2048),
                ops: arg(64),
                bias: arg(l),
                residual: arg(l),
                residual_row_stride: arg(512) as i32 - 64,
                residual_col_stride: arg(64) as i32 - 8,
                store: arg(l),
                store_row_stride: arg(512) as i32 - 64,
                store_col_stride: arg(64) as i32 - 8,
                max: 0.0,
                min: 0.0,
            };
            let Ok(ops) = block(len, &call) else { continue };
            accepted += 1;
            let inside = |start: i128, bytes: i128| {
                assert!(
                    start >= 0 && start + bytes <= len as i128,
                    "{call:?}: {start} + {bytes}"
                )
            };
            let panel = i128::from(call.k) * 32;
            for i in 0..call.row_tiles() {
                let at = i128::from(call.a) + i128::from(i) * i128::from(call.a_stride);
                inside(at, panel);
                assert_eq!(at % 32, 0);
            }
            for j in 0..call.col_tiles() {
                inside(
                    i128::from(call.b) + i128::from(j) * i128::from(call.b_stride),
                    panel,
                );
            }
            if ops.has(BlockOps::ROW_BIAS) {
                inside(call.bias.into(), 4 * i128::from(call.rows));
            }
            if ops.has(BlockOps::COL_BIAS) {
                inside(call.bias.into(), 4 * i128::from(call.cols));
            }
            for r in 0..i128::from(call.rows) {
                for c in 0..i128::from(call.cols) {
                    let at = |base: u32, rs: i32, cs: i32| {
                        i128::from(base) + r * i128::from(rs) + c * i128::from(cs)
                    };
                    inside(
                        at(call.store, call.store_row_stride, call.store_col_stride),
                        4,
                    );
                    if ops.has(BlockOps::RESIDUAL) {
                        inside(
                            at(
                                call.residual,
                                call.residual_row_stride,
                                call.residual_col_stride,
                            ),
                            4,
                        );
                    }
                }
            }
        }
        assert!(
            accepted > 1000,
            "the generator reaches valid calls too ({accepted})"
        );
    }
}
