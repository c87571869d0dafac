//! The call of the host kernels' block product, `capsule_kernels.f32_mmm_block` (version 2 of
//! the import, ARCHITECTURE.md "Host kernels"): the guest writes a [`BlockCall`] into its
//! memory and passes its address; the node reads it back with [`BlockCall::from_bytes`] and
//! checks every range it names before it computes anything.
//!
//! One call is a whole block of a matrix product, many 8x8 tiles, with the usual epilogue of
//! a convolution or a dense layer fused in: `C = [max|min](A·B [+ bias] [+ residual])`,
//! stored with any strides. Version 1's `f32_mmm_8x8` took one tile's product per call and
//! left the epilogue and the tile loop to the guest.
//!
//! ```
//! use capsule_format::kernels::{BlockCall, BlockOps};
//! let call = BlockCall { k: 64, rows: 16, cols: 8, ops: BlockOps::ROW_BIAS.0, ..Default::default() };
//! assert_eq!(BlockCall::from_bytes(&call.to_bytes()), call);
//! assert_eq!(call.tiles(), Some(2));
//! ```

/// Bytes of an encoded [`BlockCall`]: seventeen little-endian 32-bit fields.
pub const BLOCK_CALL_BYTES: usize = 17 * 4;

/// Bytes of one k step of a packed panel: 8 f32, one per row of A or column of B.
pub const PANEL_STEP_BYTES: usize = 8 * 4;

/// What a tile costs beyond its product, in product steps (8 multiply-adds of a row of 8):
/// the kernel's entry, the epilogue's loads and the 64 stores. Without it a call of
/// `k = 0` or `1` could ask for 2^20 tiles, about a thousand times the work
/// [`crate::HOST_KERNELS_MAX_STEPS`] is meant to bound.
pub const TILE_OVERHEAD_STEPS: u64 = 64;

/// Which optional steps of the epilogue a [`BlockCall`] runs, in this order after the
/// product: a bias per row or per column, a residual (or the residual, then the bias), a
/// lower then an upper clamp.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BlockOps(pub u32);

impl BlockOps {
    /// `bias[row] + v`; `bias` holds `rows` f32.
    pub const ROW_BIAS: BlockOps = BlockOps(1);
    /// `bias[col] + v`; `bias` holds `cols` f32.
    pub const COL_BIAS: BlockOps = BlockOps(2);
    /// `v + residual[row, col]`, read with the residual's strides.
    pub const RESIDUAL: BlockOps = BlockOps(4);
    /// `max(max, v)` (a ReLU when `max` is 0).
    pub const MAX: BlockOps = BlockOps(8);
    /// `min(min, v)`.
    pub const MIN: BlockOps = BlockOps(16);
    /// With [`BlockOps::RESIDUAL`]: the residual is added before the bias, not after (the
    /// order of the plan, which decides how the sums round).
    pub const RESIDUAL_FIRST: BlockOps = BlockOps(32);
    const ALL: u32 = 63;

    /// Whether every bit of `other` is set.
    pub fn has(self, other: BlockOps) -> bool {
        self.0 & other.0 == other.0
    }

    /// Whether the bits name steps that exist, at most one bias, and an order only with a
    /// residual.
    pub fn valid(self) -> bool {
        self.0 & !Self::ALL == 0
            && !self.has(BlockOps(Self::ROW_BIAS.0 | Self::COL_BIAS.0))
            && (!self.has(Self::RESIDUAL_FIRST) || self.has(Self::RESIDUAL))
    }
}

impl std::ops::BitOr for BlockOps {
    type Output = BlockOps;
    fn bitor(self, other: BlockOps) -> BlockOps {
        BlockOps(self.0 | other.0)
    }
}

/// One block product: `rows` x `cols` outputs, `k` steps deep. Addresses are the guest's
/// (offsets into its linear memory), strides are in bytes.
///
/// Row group `i` (rows `8i..8i+8`) reads A's packed panel at `a + i * a_stride`, column group
/// `j` reads B's at `b + j * b_stride`; each panel is `k` steps of 8 f32 (zero-padded past
/// the last row or column). Output `(r, c)` is written at `store + r * store_row_stride +
/// c * store_col_stride`, and the residual read the same way from its own address.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct BlockCall {
    /// Depth of the product.
    pub k: u32,
    /// Rows of the block (of A, and of the output).
    pub rows: u32,
    /// Columns of the block (of B, and of the output).
    pub cols: u32,
    /// A's first panel (32-byte aligned).
    pub a: u32,
    /// Bytes from one panel of A to the next (a multiple of 32).
    pub a_stride: u32,
    /// B's first panel.
    pub b: u32,
    /// Bytes from one panel of B to the next.
    pub b_stride: u32,
    /// The epilogue's steps ([`BlockOps`] bits).
    pub ops: u32,
    /// The bias, when [`BlockOps::ROW_BIAS`] or [`BlockOps::COL_BIAS`] is set.
    pub bias: u32,
    /// The residual's first value, when [`BlockOps::RESIDUAL`] is set.
    pub residual: u32,
    /// Bytes between the residual's rows.
    pub residual_row_stride: i32,
    /// Bytes between the residual's columns.
    pub residual_col_stride: i32,
    /// Where output `(0, 0)` goes.
    pub store: u32,
    /// Bytes between the output's rows.
    pub store_row_stride: i32,
    /// Bytes between the output's columns.
    pub store_col_stride: i32,
    /// The lower clamp, when [`BlockOps::MAX`] is set.
    pub max: f32,
    /// The upper clamp, when [`BlockOps::MIN`] is set.
    pub min: f32,
}

impl BlockCall {
    /// The call as the guest lays it out in memory (`repr(C)`, little-endian).
    pub fn to_bytes(&self) -> [u8; BLOCK_CALL_BYTES] {
        let words = [
            self.k,
            self.rows,
            self.cols,
            self.a,
            self.a_stride,
            self.b,
            self.b_stride,
            self.ops,
            self.bias,
            self.residual,
            self.residual_row_stride as u32,
            self.residual_col_stride as u32,
            self.store,
            self.store_row_stride as u32,
            self.store_col_stride as u32,
            self.max.to_bits(),
            self.min.to_bits(),
        ];
        let mut out = [0u8; BLOCK_CALL_BYTES];
        for (chunk, word) in out.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        out
    }

    /// Reads a call back; any bytes decode (the node checks the values).
    pub fn from_bytes(bytes: &[u8; BLOCK_CALL_BYTES]) -> BlockCall {
        let mut words = [0u32; BLOCK_CALL_BYTES / 4];
        for (word, chunk) in words.iter_mut().zip(bytes.chunks_exact(4)) {
            *word = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        let [
            k,
            rows,
            cols,
            a,
            a_stride,
            b,
            b_stride,
            ops,
            bias,
            residual,
            residual_row_stride,
            residual_col_stride,
            store,
            store_row_stride,
            store_col_stride,
            max,
            min,
        ] = words;
        BlockCall {
            k,
            rows,
            cols,
            a,
            a_stride,
            b,
            b_stride,
            ops,
            bias,
            residual,
            residual_row_stride: residual_row_stride as i32,
            residual_col_stride: residual_col_stride as i32,
            store,
            store_row_stride: store_row_stride as i32,
            store_col_stride: store_col_stride as i32,
            max: f32::from_bits(max),
            min: f32::from_bits(min),
        }
    }

    /// Row groups of the block (panels of A it reads).
    pub fn row_tiles(&self) -> u32 {
        self.rows.div_ceil(8)
    }

    /// Column groups of the block (panels of B it reads).
    pub fn col_tiles(&self) -> u32 {
        self.cols.div_ceil(8)
    }

    /// 8x8 tiles the block computes, `None` past `u32`.
    pub fn tiles(&self) -> Option<u32> {
        self.row_tiles().checked_mul(self.col_tiles())
    }

    /// The call's work in tile steps (`tiles * (k + TILE_OVERHEAD_STEPS)`: a tile's entry,
    /// epilogue and 64 stores count as that many steps of its product), which
    /// [`crate::HOST_KERNELS_MAX_STEPS`] bounds per call; `None` past `u64`.
    pub fn steps(&self) -> Option<u64> {
        u64::from(self.tiles()?).checked_mul(u64::from(self.k) + TILE_OVERHEAD_STEPS)
    }

    /// The most tiles one call `k` deep may hold: at least one up to the deepest `k` the
    /// host takes ([`crate::HOST_KERNELS_MAX_K`]).
    pub fn max_tiles(k: u32) -> u64 {
        crate::HOST_KERNELS_MAX_STEPS / (u64::from(k) + TILE_OVERHEAD_STEPS)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_round_trips_through_its_own_bytes() {
        let call = BlockCall {
            k: 1,
            rows: 2,
            cols: 3,
            a: 4,
            a_stride: 5,
            b: 6,
            b_stride: 7,
            ops: 8,
            bias: 9,
            residual: 10,
            residual_row_stride: -11,
            residual_col_stride: 12,
            store: 13,
            store_row_stride: 14,
            store_col_stride: -15,
            max: -0.0,
            min: f32::INFINITY,
        };
        let bytes = call.to_bytes();
        // Field order is the struct's: the guest passes the struct itself.
        assert_eq!(&bytes[..4], &1u32.to_le_bytes());
        assert_eq!(&bytes[40..44], &(-11i32).to_le_bytes());
        assert_eq!(&bytes[64..], &f32::INFINITY.to_bits().to_le_bytes());
        let back = BlockCall::from_bytes(&bytes);
        assert_eq!(back.max.to_bits(), (-0.0f32).to_bits());
        assert_eq!(back, call);
        assert_eq!(std::mem::size_of::<BlockCall>(), BLOCK_CALL_BYTES);
    }

    #[test]
    fn ops_name_one_bias_at_most_and_no_unknown_step() {
        assert!(BlockOps(0).valid());
        assert!((BlockOps::ROW_BIAS | BlockOps::RESIDUAL | BlockOps::MAX | BlockOps::MIN).valid());
        assert!((BlockOps::COL_BIAS | BlockOps::MIN).valid());
        assert!(!(BlockOps::ROW_BIAS | BlockOps::COL_BIAS).valid());
        assert!((BlockOps::RESIDUAL_FIRST | BlockOps::RESIDUAL | BlockOps::COL_BIAS).valid());
        assert!(!BlockOps::RESIDUAL_FIRST.valid());
        assert!(!BlockOps(64).valid());
        assert!(!BlockOps(u32::MAX).valid());
    }

    #[test]
    fn tiles_and_steps_count_partial_groups_and_do_not_overflow() {
        let call = BlockCall {
            k: 3,
            rows: 17,
            cols: 8,
            ..Default::default()
        };
        assert_eq!((call.row_tiles(), call.col_tiles()), (3, 1));
        assert_eq!(call.steps(), Some(3 * (3 + TILE_OVERHEAD_STEPS)));
        let huge = BlockCall {
            k: u32::MAX,
            rows: u32::MAX,
            cols: u32::MAX,
            ..Default::default()
        };
        assert_eq!(huge.tiles(), None);
        assert_eq!(huge.steps(), None);
        // An epilogue-only block still costs its tiles' overhead.
        let shallow = BlockCall {
            k: 0,
            rows: 64,
            cols: 64,
            ..Default::default()
        };
        assert_eq!(shallow.steps(), Some(64 * TILE_OVERHEAD_STEPS));
        let wide = BlockCall {
            k: u32::MAX,
            rows: u32::MAX,
            cols: 1,
            ..Default::default()
        };
        assert_eq!(
            wide.steps(),
            Some(u64::from(u32::MAX.div_ceil(8)) * (u64::from(u32::MAX) + TILE_OVERHEAD_STEPS))
        );
        // A call of `max_tiles(k)` row tiles is within the bound, one more tile is not; one
        // tile of the deepest k fits.
        for k in [0, 1, 27, 576, 1 << 14, crate::HOST_KERNELS_MAX_K] {
            let tiles = BlockCall::max_tiles(k);
            let call = |tiles: u64| BlockCall {
                k,
                rows: (8 * tiles) as u32,
                cols: 8,
                ..Default::default()
            };
            let max = crate::HOST_KERNELS_MAX_STEPS;
            assert!(tiles >= 1 && call(tiles).steps().unwrap() <= max, "k = {k}");
            assert!(call(tiles + 1).steps().unwrap() > max, "k = {k}");
        }
    }
}
