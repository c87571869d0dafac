//! A faster kernel for the most common pooling of CNNs: 2×2 max pooling with stride 2 over
//! f32 NCHW images, without padding.
//!
//! tract evaluates it with a scalar walk that calls `f32::max` per tap. On wasm32 that is a
//! call to `fmaxf` (wasm's `f32.max` propagates NaN, Rust's `max` must not), so in a capsule
//! the two max pools of the MNIST CNN took a third of the inference (measured with a V8 CPU
//! profile of the guest). [`substitute`] replaces each such `MaxPool` or `OptMaxPool` of an
//! optimized model with [`MaxPool2x2`], which folds the four taps with a comparison that
//! compiles to `f32x4.pmax` when vectorized. (With a symbolic batch dimension tract keeps
//! `MaxPool`, which also rebuilds its geometry on every call.)
//!
//! Every other f32 NCHW max pool without dilation or index outputs (any kernel, strides,
//! explicit padding, ceil mode: SqueezeNet's and ResNet's 3x3 stride-2 pools) becomes
//! [`MaxPoolNchw`], the same fold over each window's taps inside the image. tract calls
//! `fmaxf` per tap there too: in a SqueezeNet capsule its pools took 11% of the inference
//! (docs/benchmarks.md, "Profiles").
//!
//! The fold is tract's: the taps in row-major order from `f32::MIN`, keeping the running
//! maximum unless a tap is greater. That is what `fmaxf` computes whenever the running
//! maximum is not NaN (it never is: it starts at `f32::MIN` and only takes non-NaN taps), so
//! the outputs are the same, NaN taps included (they are skipped), and so is the sign of a
//! zero maximum (the first of equal taps is kept).
//!
//! [`MaxPoolNchw`] runs that fold on four outputs at once, one per SIMD lane, for the
//! columns whose windows lie inside the image at horizontal strides 1 and 2 (SqueezeNet's
//! and ResNet's pools): each lane still takes its own window's taps in row-major order. On
//! SqueezeNet's one-row plan the scalar fold had become 15-18% of an inference.

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{MaxPool, OptMaxPool, PaddingSpec, PoolSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

/// 2×2, stride-2 max pooling of an `[n, c, h, w]` f32 tensor into `[n, c, h / 2, w / 2]`
/// (`n` may be symbolic).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaxPool2x2 {
    chw: [usize; 3],
}

impl MaxPool2x2 {
    /// The replacement of a max pool (its spec, whether it has index outputs) reading
    /// `input`, when it is such a pool.
    fn of(spec: &PoolSpec, with_index_outputs: bool, input: &TypedFact) -> Option<MaxPool2x2> {
        let ones = |v: &Option<TVec<usize>>, default: bool| {
            v.as_ref().map_or(default, |v| v.iter().all(|&x| x == 1))
        };
        let twos = |v: &Option<TVec<usize>>| v.as_ref().is_some_and(|v| v[..] == [2, 2]);
        let unpadded = match &spec.padding {
            PaddingSpec::Valid => true,
            PaddingSpec::Explicit(before, after) => before.iter().chain(after).all(|&p| p == 0),
            PaddingSpec::ExplicitOnnxPool(before, after, _) => {
                before.iter().chain(after).all(|&p| p == 0)
            }
            _ => false,
        };
        if with_index_outputs
            || input.datum_type != f32::datum_type()
            || spec.data_format != DataFormat::NCHW
            || spec.kernel_shape[..] != [2, 2]
            || !twos(&spec.strides)
            || !ones(&spec.dilations, true)
            || !unpadded
        {
            return None;
        }
        if input.rank() != 4 {
            return None;
        }
        let dim = |i: usize| input.shape[i].to_usize().ok();
        let chw = [dim(1)?, dim(2)?, dim(3)?];
        // Ceil mode would add a partial last row or column; without padding an odd size
        // only drops them, as floor mode does.
        if let PaddingSpec::ExplicitOnnxPool(_, _, true) = spec.padding
            && (chw[1] % 2 == 1 || chw[2] % 2 == 1)
        {
            return None;
        }
        (chw[1] >= 2 && chw[2] >= 2).then_some(MaxPool2x2 { chw })
    }
}

/// tract's max-pool fold over a window's taps in row-major order: from `f32::MIN`, keep the
/// running maximum unless a tap is greater (NaN taps are skipped; of equal taps, such as
/// `-0.0` and `0.0`, the first is kept).
#[inline(always)]
fn fold_max(taps: impl IntoIterator<Item = f32>) -> f32 {
    taps.into_iter()
        .fold(f32::MIN, |m, v| if m < v { v } else { m })
}

/// The pooling itself, on contiguous planes of `h * w` values.
fn pool(input: &[f32], output: &mut [f32], h: usize, w: usize) {
    let (oh, ow) = (h / 2, w / 2);
    if oh == 0 || ow == 0 {
        return;
    }
    for (plane, out) in input
        .chunks_exact(h * w)
        .zip(output.chunks_exact_mut(oh * ow))
    {
        for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
            let r0 = &plane[2 * oy * w..][..2 * ow];
            let r1 = &plane[(2 * oy + 1) * w..][..2 * ow];
            // Four outputs at a time, one per lane, each folding its taps in row-major
            // order (as `MaxPoolNchw`'s inner columns); `x + 8 <= 2 * ow` holds.
            // Each row's 8 values read once, split into the windows' left and right taps.
            let quad = |ox: usize, out_row: &mut [f32]| {
                let x = 2 * ox;
                let row = |r: &[f32]| r.get(x..).and_then(<[f32]>::first_chunk::<8>).copied();
                if let (Some(a), Some(b)) = (row(r0), row(r1)) {
                    let ([a0, a1], [b0, b1]) = (F4::even_odd(&a), F4::even_odd(&b));
                    let m = F4::splat(f32::MIN).pmax(a0).pmax(a1).pmax(b0).pmax(b1);
                    m.store(&mut out_row[ox..ox + 4]);
                }
            };
            let quads = ow / 4 * 4;
            for ox in (0..quads).step_by(4) {
                quad(ox, out_row);
            }
            if quads == ow {
                continue;
            }
            if ow >= 4 {
                // The last four outputs, overlapping the quads before: those it computes
                // again come out the same (MNIST's 14- and 7-wide pools have 2 and 3 left).
                quad(ow - 4, out_row);
                continue;
            }
            for ((o, a), b) in out_row[quads..]
                .iter_mut()
                .zip(r0[2 * quads..].chunks_exact(2))
                .zip(r1[2 * quads..].chunks_exact(2))
            {
                // `fold_max` written out: as a loop it keeps the running maximum in memory.
                let max = |m: f32, v: f32| if m < v { v } else { m };
                *o = max(max(max(max(f32::MIN, a[0]), a[1]), b[0]), b[1]);
            }
        }
    }
}

impl Op for MaxPool2x2 {
    fn name(&self) -> StaticName {
        "MaxPool2x2".into()
    }

    op_as_typed_op!();
}

impl EvalOp for MaxPool2x2 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let [_, h, w] = self.chw;
        eval_planes("MaxPool2x2", self.chw, [h / 2, w / 2], inputs, |i, o| {
            pool(i, o, h, w)
        })
    }
}

impl TypedOp for MaxPool2x2 {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let [c, h, w] = self.chw;
        output_fact("MaxPool2x2", c, [h / 2, w / 2], inputs)
    }

    as_op!();
}

/// Max pooling of an `[n, c, h, w]` f32 tensor (`n` may be symbolic) with any kernel and
/// strides and explicit or `SAME` padding: each output is the fold of its window's taps that lie in
/// the image (padding taps do not count, as in tract and ONNX). The output size is the
/// replaced op's own (tract computed it, ceil mode included).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MaxPoolNchw {
    /// Input channels, height, width.
    chw: [usize; 3],
    /// Output height and width.
    out: [usize; 2],
    kernel: [usize; 2],
    strides: [usize; 2],
    /// Padding before (top, left).
    pad: [usize; 2],
}

impl MaxPoolNchw {
    /// The replacement of a max pool reading `input` and writing `output`, when it is an f32
    /// NCHW pool without dilation or index outputs.
    fn of(
        spec: &PoolSpec,
        with_index_outputs: bool,
        input: &TypedFact,
        output: &TypedFact,
    ) -> Option<MaxPoolNchw> {
        if with_index_outputs
            || input.datum_type != f32::datum_type()
            || spec.data_format != DataFormat::NCHW
            || input.rank() != 4
            || output.rank() != 4
            || spec.kernel_shape.len() != 2
            || spec
                .dilations
                .as_ref()
                .is_some_and(|d| d.iter().any(|&x| x != 1))
        {
            return None;
        }
        let strides = match &spec.strides {
            None => [1, 1],
            Some(s) => [*s.first()?, *s.get(1)?],
        };
        let dim = |f: &TypedFact, i: usize| f.shape[i].to_usize().ok();
        let chw = [dim(input, 1)?, dim(input, 2)?, dim(input, 3)?];
        let out = [dim(output, 2)?, dim(output, 3)?];
        let kernel = [spec.kernel_shape[0], spec.kernel_shape[1]];
        // SAME padding (tract's optimizer writes it for explicit padding that amounts to
        // it): the total is what the output size needs; the odd pixel goes after (upper)
        // or before (lower).
        let same = |axis: usize, lower: bool| {
            let needed = (out[axis].checked_sub(1)? * strides[axis] + kernel[axis])
                .saturating_sub(chw[axis + 1]);
            Some(if lower {
                needed - needed / 2
            } else {
                needed / 2
            })
        };
        let pad = match &spec.padding {
            PaddingSpec::Valid => [0, 0],
            PaddingSpec::Explicit(before, _) | PaddingSpec::ExplicitOnnxPool(before, _, _) => {
                [*before.first()?, *before.get(1)?]
            }
            PaddingSpec::SameUpper => [same(0, false)?, same(1, false)?],
            PaddingSpec::SameLower => [same(0, true)?, same(1, true)?],
        };
        let positive = |v: [usize; 2]| v.iter().all(|&x| x > 0);
        (dim(output, 1)? == chw[0]
            && positive(kernel)
            && positive(strides)
            && positive(out)
            && positive([chw[1], chw[2]]))
        .then_some(MaxPoolNchw {
            chw,
            out,
            kernel,
            strides,
            pad,
        })
    }

    /// The taps of output index `o` along one axis: `start..end` in the image.
    fn window(&self, axis: usize, o: usize) -> std::ops::Range<usize> {
        let size = self.chw[axis + 1];
        let first = (o * self.strides[axis]) as isize - self.pad[axis] as isize;
        let start = first.clamp(0, size as isize) as usize;
        let end = (first + self.kernel[axis] as isize).clamp(0, size as isize) as usize;
        start..end
    }

    /// The output columns whose windows lie whole in the row (no padding taps), with
    /// horizontal stride 1 or 2: [`Self::pool`] computes four of them at once.
    fn inner_columns(&self) -> std::ops::Range<usize> {
        let [_, _, w] = self.chw;
        let [_, ow] = self.out;
        let ([_, kw], [_, sx], [_, px]) = (self.kernel, self.strides, self.pad);
        if sx > 2 || kw > w {
            return 0..0;
        }
        // First: ox * sx >= px. Last: ox * sx - px + kw <= w.
        let start = px.div_ceil(sx);
        let end = ((w + px - kw) / sx + 1).min(ow);
        start..end.max(start)
    }

    /// The pooling itself, on contiguous planes of `h * w` values.
    ///
    /// Each output folds its taps in row-major order ([`fold_max`]). For the inner columns
    /// that fold runs on four outputs at once, one per lane ([`F4`]): every lane still sees
    /// its own window's taps in row-major order, so the results are the same bits. When the
    /// inner columns are not a multiple of four, the last group of four overlaps the one
    /// before it: the outputs it computes again come out the same.
    ///
    /// 3-wide windows at strides 1 and 2 (SqueezeNet's and ResNet's pools) take their taps
    /// from whole vectors ([`F4::taps3_stride1`], [`F4::taps3_stride2`]), and a row of
    /// outputs whose windows have all three rows folds each group in straight-line code. As
    /// a loop over the window's rows and columns, every tap was a wasm loop iteration whose
    /// epoch check sent the running maximum through the stack, and the pools took 12-15% of
    /// SqueezeNet's inference with host kernels (docs/benchmarks.md, "Max pools in
    /// straight-line code").
    fn pool(&self, input: &[f32], output: &mut [f32]) {
        let [_, h, w] = self.chw;
        let [oh, ow] = self.out;
        let ([_, kw], [_, sx], [_, px]) = (self.kernel, self.strides, self.pad);
        let cols: Vec<std::ops::Range<usize>> = (0..ow).map(|ox| self.window(1, ox)).collect();
        let inner = self.inner_columns();
        // The first output of each group of four inner columns, and the columns left to the
        // scalar fold.
        let (starts, scalar): (Vec<usize>, Vec<usize>) = if inner.len() >= 4 {
            let mut starts: Vec<usize> = (inner.start..inner.end - 3).step_by(4).collect();
            if !inner.len().is_multiple_of(4) {
                starts.push(inner.end - 4);
            }
            (starts, (0..inner.start).chain(inner.end..ow).collect())
        } else {
            (Vec::new(), (0..ow).collect())
        };
        for (plane, out) in input
            .chunks_exact(h * w)
            .zip(output.chunks_exact_mut(oh * ow))
        {
            for (oy, out_row) in out.chunks_exact_mut(ow).enumerate() {
                let rows = self.window(0, oy);
                for &ox in &scalar {
                    out_row[ox] = fold_max(
                        rows.clone()
                            .flat_map(|y| plane[y * w..][cols[ox].clone()].iter().copied()),
                    );
                }
                // A group's fold over the window's rows and columns, for any kernel.
                let group = |ox: usize| {
                    // The first tap of lane 0; groups are inner columns, so ox * sx >= px.
                    let x0 = ox * sx - px;
                    let mut m = F4::splat(f32::MIN);
                    for y in rows.clone() {
                        let row = &plane[y * w..(y + 1) * w];
                        for kx in 0..kw {
                            let x = x0 + kx;
                            let taps = if sx == 1 {
                                F4::load(&row[x..x + 4])
                            } else {
                                F4::load_even(&row[x..x + 7])
                            };
                            m = m.pmax(taps);
                        }
                    }
                    m
                };
                let three = (rows.len() == 3).then(|| {
                    let row = |y: usize| &plane[y * w..(y + 1) * w];
                    [row(rows.start), row(rows.start + 1), row(rows.start + 2)]
                });
                match (kw, sx, three) {
                    (3, 2, Some(rows)) => groups_3x3(
                        rows,
                        out_row,
                        &starts,
                        |ox| 2 * ox - px,
                        F4::taps3_stride2,
                        group,
                    ),
                    (3, 1, Some(rows)) => groups_3x3(
                        rows,
                        out_row,
                        &starts,
                        |ox| ox - px,
                        F4::taps3_stride1,
                        group,
                    ),
                    _ => {
                        for &ox in &starts {
                            group(ox).store(&mut out_row[ox..ox + 4]);
                        }
                    }
                }
            }
        }
    }
}

/// The groups of four outputs at `starts` in a row of outputs of a 3x3 window with all three
/// rows in the image: lane 0 of the group at `ox` takes its taps from `first(ox)` in each of
/// `rows`, and `taps` makes the three tap vectors of a row from the `N` values there.
/// `general` is the fold of any window, for a group whose values would not lie in its rows
/// (groups are inner columns, so none does).
#[inline(always)]
fn groups_3x3<const N: usize>(
    rows: [&[f32]; 3],
    out_row: &mut [f32],
    starts: &[usize],
    first: impl Fn(usize) -> usize,
    taps: impl Fn(&[f32; N]) -> [F4; 3],
    general: impl Fn(usize) -> F4,
) {
    let values =
        |row: &[f32], x0: usize| row.get(x0..).and_then(|s| s.first_chunk::<N>()).map(&taps);
    for &ox in starts {
        let x0 = first(ox);
        let (Some([a0, b0, c0]), Some([a1, b1, c1]), Some([a2, b2, c2])) = (
            values(rows[0], x0),
            values(rows[1], x0),
            values(rows[2], x0),
        ) else {
            general(ox).store(&mut out_row[ox..ox + 4]);
            continue;
        };
        let m = F4::splat(f32::MIN);
        let m = m.pmax(a0).pmax(b0).pmax(c0);
        let m = m.pmax(a1).pmax(b1).pmax(c1);
        let m = m.pmax(a2).pmax(b2).pmax(c2);
        m.store(&mut out_row[ox..ox + 4]);
    }
}

/// Four f32 lanes for the max pool's fold: wasm's `v128` in the guest, an array elsewhere
/// (so that the native tests run the same indexing as the guest).
#[derive(Clone, Copy)]
struct F4(
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))] std::arch::wasm32::v128,
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))] [f32; 4],
);

#[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
impl F4 {
    #[inline(always)]
    fn splat(v: f32) -> F4 {
        F4(std::arch::wasm32::f32x4_splat(v))
    }

    /// `s[0..4]`.
    #[inline(always)]
    fn load(s: &[f32]) -> F4 {
        let s: &[f32; 4] = s.first_chunk().unwrap_or(&[f32::NAN; 4]);
        // SAFETY: `s` is 16 readable bytes; v128_load has no alignment requirement.
        F4(unsafe { std::arch::wasm32::v128_load(s.as_ptr().cast()) })
    }

    /// `s[0]`, `s[2]`, `s[4]`, `s[6]`.
    #[inline(always)]
    fn load_even(s: &[f32]) -> F4 {
        use std::arch::wasm32::i32x4_shuffle;
        let (a, b) = (F4::load(s), F4::load(s.get(3..).unwrap_or(&[])));
        F4(i32x4_shuffle::<0, 2, 5, 7>(a.0, b.0))
    }

    /// `s[0, 2, 4, 6]` and `s[1, 3, 5, 7]`: two loads, two shuffles.
    #[inline(always)]
    fn even_odd(s: &[f32; 8]) -> [F4; 2] {
        use std::arch::wasm32::{i32x4_shuffle, v128_load};
        // SAFETY: `s` is 32 readable bytes; v128_load has no alignment requirement.
        let (a, b) = unsafe {
            (
                v128_load(s.as_ptr().cast()),
                v128_load(s.as_ptr().add(4).cast()),
            )
        };
        [
            F4(i32x4_shuffle::<0, 2, 4, 6>(a, b)),
            F4(i32x4_shuffle::<1, 3, 5, 7>(a, b)),
        ]
    }

    /// The taps of a 3-wide window at stride 2 for four outputs, by column of the window:
    /// `s[0, 2, 4, 6]`, `s[1, 3, 5, 7]`, `s[2, 4, 6, 8]` (four loads, three shuffles).
    #[inline(always)]
    fn taps3_stride2(s: &[f32; 9]) -> [F4; 3] {
        use std::arch::wasm32::i32x4_shuffle;
        let (a, b) = (F4::load(&s[0..4]), F4::load(&s[4..8]));
        let (c, d) = (F4::load(&s[2..6]), F4::load(&s[5..9]));
        [
            F4(i32x4_shuffle::<0, 2, 4, 6>(a.0, b.0)),
            F4(i32x4_shuffle::<1, 3, 5, 7>(a.0, b.0)),
            F4(i32x4_shuffle::<0, 2, 5, 7>(c.0, d.0)),
        ]
    }

    /// The taps of a 3-wide window at stride 1 for four outputs: `s[0..4]`, `s[1..5]`,
    /// `s[2..6]`.
    #[inline(always)]
    fn taps3_stride1(s: &[f32; 6]) -> [F4; 3] {
        [F4::load(&s[0..4]), F4::load(&s[1..5]), F4::load(&s[2..6])]
    }

    /// Lane-wise `if self < v { v } else { self }` ([`fold_max`]'s step): `f32x4.pmax`.
    #[inline(always)]
    fn pmax(self, v: F4) -> F4 {
        F4(std::arch::wasm32::f32x4_pmax(self.0, v.0))
    }

    #[inline(always)]
    fn store(self, out: &mut [f32]) {
        if let Some(out) = out.first_chunk_mut::<4>() {
            // SAFETY: `out` is 16 writable bytes; v128_store has no alignment requirement.
            unsafe { std::arch::wasm32::v128_store(out.as_mut_ptr().cast(), self.0) }
        }
    }
}

#[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
impl F4 {
    fn splat(v: f32) -> F4 {
        F4([v; 4])
    }

    fn load(s: &[f32]) -> F4 {
        F4([s[0], s[1], s[2], s[3]])
    }

    fn load_even(s: &[f32]) -> F4 {
        F4([s[0], s[2], s[4], s[6]])
    }

    fn even_odd(s: &[f32; 8]) -> [F4; 2] {
        std::array::from_fn(|odd| F4(std::array::from_fn(|lane| s[2 * lane + odd])))
    }

    fn taps3_stride2(s: &[f32; 9]) -> [F4; 3] {
        std::array::from_fn(|kx| F4(std::array::from_fn(|lane| s[2 * lane + kx])))
    }

    fn taps3_stride1(s: &[f32; 6]) -> [F4; 3] {
        std::array::from_fn(|kx| F4(std::array::from_fn(|lane| s[lane + kx])))
    }

    fn pmax(self, v: F4) -> F4 {
        F4(std::array::from_fn(|i| {
            if self.0[i] < v.0[i] {
                v.0[i]
            } else {
                self.0[i]
            }
        }))
    }

    fn store(self, out: &mut [f32]) {
        out[..4].copy_from_slice(&self.0);
    }
}

impl Op for MaxPoolNchw {
    fn name(&self) -> StaticName {
        "MaxPoolNchw".into()
    }

    op_as_typed_op!();
}

impl EvalOp for MaxPoolNchw {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_planes("MaxPoolNchw", self.chw, self.out, inputs, |i, o| {
            self.pool(i, o)
        })
    }
}

impl TypedOp for MaxPoolNchw {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        output_fact("MaxPoolNchw", self.chw[0], self.out, inputs)
    }

    as_op!();
}

/// Runs a pooling of `[n, c, h, w]` planes into `[n, c, oh, ow]`, checking the input's
/// shape against the one the op was made for.
fn eval_planes(
    name: &str,
    chw: [usize; 3],
    [oh, ow]: [usize; 2],
    inputs: TVec<TValue>,
    pool: impl FnOnce(&[f32], &mut [f32]),
) -> TractResult<TVec<TValue>> {
    let input = args_1!(inputs);
    let [c, h, w] = chw;
    let &[n, ic, ih, iw] = input.shape() else {
        bail!("{name} expects [n, {c}, {h}, {w}], got {:?}", input.shape());
    };
    if [ic, ih, iw] != chw {
        bail!("{name} expects [n, {c}, {h}, {w}], got {:?}", input.shape());
    }
    // Zeroed as bytes (one `memory.fill` in the guest): tract's `Tensor::zero` stores one
    // f32 at a time, which in the size-optimized guest cost as much as a third of MNIST's
    // 2x2 pools. `pool` writes every output anyway; the zeros only make sure nothing
    // unset can be read.
    let len = n
        .checked_mul(c)
        .and_then(|v| v.checked_mul(oh))
        .and_then(|v| v.checked_mul(ow))
        .with_context(|| format!("{name}: output [{n}, {c}, {oh}, {ow}] is too large"))?;
    // SAFETY: `uninitialized` allocates `len` f32 in plain memory and sets none;
    // `write_bytes` sets all of their bytes (all-zero bytes are 0.0) before anything reads
    // them, through the storage's own mutable pointer. An empty tensor has no storage (its
    // pointer would not be an f32's), and nothing to set.
    let mut output = unsafe {
        let mut t = Tensor::uninitialized::<f32>(&[n, c, oh, ow])?;
        if len > 0 {
            std::ptr::write_bytes(t.as_ptr_mut_unchecked::<f32>(), 0, len);
        }
        t
    };
    {
        let input = input.try_as_plain_ram()?;
        let mut plain = output.try_as_plain_ram_mut()?;
        pool(input.as_slice::<f32>()?, plain.as_slice_mut::<f32>()?);
    }
    Ok(tvec!(output.into_tvalue()))
}

/// The `[n, c, oh, ow]` f32 fact of a pooling (or of `kernels::winograd`'s convolution)
/// whose input's `n` may be symbolic.
pub(crate) fn output_fact(
    name: &str,
    c: usize,
    [oh, ow]: [usize; 2],
    inputs: &[&TypedFact],
) -> TractResult<TVec<TypedFact>> {
    let Some(n) = inputs.first().and_then(|f| f.shape.iter().next()) else {
        bail!("{name} has one input");
    };
    let shape: TVec<TDim> = tvec![n.clone(), c.into(), oh.into(), ow.into()];
    Ok(tvec!(f32::fact(shape)))
}

/// Replaces every 2×2 stride-2 f32 NCHW max pool of an optimized model by [`MaxPool2x2`],
/// and every other f32 NCHW max pool it can by [`MaxPoolNchw`]; returns how many.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    /// Replaces the max pools of op type `O`, whose spec and index outputs `spec_of` reads.
    fn pools<O: Op>(
        model: &mut TypedModel,
        spec_of: impl Fn(&O) -> (&PoolSpec, bool),
    ) -> TractResult<usize> {
        crate::replace_unary::<O>(model, |op, input, output| {
            let (spec, indices) = spec_of(op);
            match MaxPool2x2::of(spec, indices, input) {
                Some(op) => Some(Box::new(op)),
                None => MaxPoolNchw::of(spec, indices, input, output)
                    .map(|op| Box::new(op) as Box<dyn TypedOp>),
            }
        })
    }
    let optimized =
        pools::<OptMaxPool>(model, |op| (&op.pool_spec, op.with_index_outputs.is_some()))?;
    let plain = pools::<MaxPool>(model, |op| (&op.pool_spec, op.with_index_outputs.is_some()))?;
    Ok(optimized + plain)
}

/// Checks that the max pools compute tract's fold, bit for bit, in whatever build this is:
/// the guest's SIMD lanes included, which the native tests do not run. The builder runs it
/// with the kernel check, before it loads a model.
///
/// The geometries are SqueezeNet's and ResNet's 3x3 stride-2 pools, a 3x3 stride-1 pool and
/// the 2x2 stride-2 one, at widths with groups of four, an overlapping last group and
/// padding columns. Most windows' maximum is a zero of either sign, some taps are NaN and
/// some windows have no zero: there a fold in another order keeps the other zero, and one
/// with another comparison keeps NaN. The reference is [`fold_max`] over each window's taps
/// in the image.
pub fn check() -> Result<(), String> {
    let pool_of = |chw, kernel, strides, pad, out| MaxPoolNchw {
        chw,
        out,
        kernel,
        strides,
        pad,
    };
    let cases = [
        pool_of([2, 11, 23], [3, 3], [2, 2], [0, 0], [5, 11]),
        pool_of([2, 9, 22], [3, 3], [2, 2], [0, 0], [4, 11]),
        pool_of([2, 10, 22], [3, 3], [2, 2], [1, 1], [5, 11]),
        pool_of([2, 7, 13], [3, 3], [1, 1], [1, 1], [7, 13]),
        pool_of([2, 6, 18], [2, 2], [2, 2], [0, 0], [3, 9]),
    ];
    for op in cases {
        let ([planes, h, w], [oh, ow]) = (op.chw, op.out);
        let (kernel, strides, pad) = (op.kernel, op.strides, op.pad);
        let input: Vec<f32> = (0..planes * h * w)
            .map(|i| match (i * 7919) % 11 {
                0 => f32::NAN,
                1..=3 => -0.0,
                4..=6 => 0.0,
                v => 7.0 - v as f32,
            })
            .collect();
        let mut got = vec![0.0; planes * oh * ow];
        op.pool(&input, &mut got);
        if kernel == [2, 2] && strides == [2, 2] {
            let mut two = vec![0.0; planes * oh * ow];
            pool(&input, &mut two, h, w);
            if let Some(i) = (0..two.len()).find(|&i| two[i].to_bits() != got[i].to_bits()) {
                return Err(format!(
                    "2x2 max pool of {h}x{w}: output {i} is {}, the general pool's {}",
                    two[i], got[i]
                ));
            }
        }
        for (i, &value) in got.iter().enumerate() {
            let (plane, oy, ox) = (i / (oh * ow), i / ow % oh, i % ow);
            let at = &input[plane * h * w..][..h * w];
            let want = fold_max(
                op.window(0, oy)
                    .flat_map(|y| at[y * w..][op.window(1, ox)].iter().copied()),
            );
            if want.to_bits() != value.to_bits() {
                return Err(format!(
                    "max pool {:?} stride {:?} padding {:?} of {h}x{w}: output {i} is {value}, \
                     tract's fold gives {want}",
                    kernel, strides, pad
                ));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tract's own fold, as `maxpool_2x2_f32` does it (`f32::max` from `f32::MIN`).
    fn reference(input: &[f32], h: usize, w: usize) -> Vec<f32> {
        let (oh, ow) = (h / 2, w / 2);
        let mut out = Vec::new();
        for plane in input.chunks_exact(h * w) {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut m = f32::MIN;
                    for ky in 0..2 {
                        for kx in 0..2 {
                            m = m.max(plane[(2 * oy + ky) * w + 2 * ox + kx]);
                        }
                    }
                    out.push(m);
                }
            }
        }
        out
    }

    #[test]
    fn the_mnist_cnn_pools_are_replaced_and_answer_as_before() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/models/mnist_cnn/model.onnx"
        );
        let optimized = tract_onnx::onnx()
            .model_for_path(path)
            .unwrap()
            .into_optimized()
            .unwrap();
        let mut model = optimized.clone();
        assert_eq!(substitute(&mut model).unwrap(), 2);
        let input: Tensor = tract_ndarray::Array4::from_shape_fn((1, 1, 28, 28), |(_, _, y, x)| {
            ((y * 28 + x) % 13) as f32 / 13.0
        })
        .into();
        let run = |m: TypedModel| {
            m.into_runnable()
                .unwrap()
                .run(tvec!(input.clone().into_tvalue()))
                .unwrap()
                .remove(0)
        };
        assert_eq!(run(model), run(optimized));
    }

    #[test]
    fn pools_like_tract_odd_sizes_and_nan_included() {
        for (planes, h, w) in [
            (3, 4, 4),
            (2, 5, 7),
            (1, 2, 2),
            (4, 11, 11),
            (1, 3, 2),
            // Groups of four outputs and a remainder (the MNIST CNN's 28 and 14 too).
            (2, 6, 21),
            (1, 4, 16),
            (2, 28, 28),
            (2, 14, 14),
        ] {
            let mut x: Vec<f32> = (0..planes * h * w)
                .map(|i| ((i * 7919) % 23) as f32 - 11.5)
                .collect();
            x[1] = f32::NAN;
            let mut got = vec![0.0; planes * (h / 2) * (w / 2)];
            pool(&x, &mut got, h, w);
            let want = reference(&x, h, w);
            assert_eq!(
                got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{planes}x{h}x{w}"
            );
        }
    }

    /// One max pool through tract, and the same model after [`substitute`]: the outputs
    /// must be the same bits.
    fn same_as_tract(
        planes: usize,
        hw: [usize; 2],
        k: [usize; 2],
        st: [usize; 2],
        pads: [usize; 4],
        ceil: bool,
    ) {
        let [h, w] = hw;
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([2, planes, h, w])).unwrap();
        let pool_spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![k[0], k[1]],
            padding: PaddingSpec::ExplicitOnnxPool(
                tvec![pads[0], pads[1]],
                tvec![pads[2], pads[3]],
                ceil,
            ),
            dilations: None,
            strides: Some(tvec![st[0], st[1]]),
            input_channels: planes,
            output_channels: planes,
        };
        let y = model
            .wire_node(
                "pool",
                MaxPool {
                    pool_spec,
                    with_index_outputs: None,
                },
                &[x],
            )
            .unwrap();
        model.select_output_outlets(&y).unwrap();
        // Values with repeats, signed zeros and NaNs: equal taps and NaN taps are where a
        // fold in another order or with another comparison would differ.
        let values: Vec<f32> = (0..2 * planes * h * w)
            .map(|i| match (i * 7919) % 29 {
                0 => f32::NAN,
                1 => -0.0,
                2 => 0.0,
                v => (v % 13) as f32 - 6.0,
            })
            .collect();
        let input: Tensor = tract_ndarray::Array4::from_shape_vec((2, planes, h, w), values)
            .unwrap()
            .into();
        let run = |m: TypedModel| {
            m.into_runnable()
                .unwrap()
                .run(tvec!(input.clone().into_tvalue()))
                .unwrap()
                .remove(0)
        };
        let bits = |t: TValue| {
            t.to_plain_array_view::<f32>()
                .unwrap()
                .iter()
                .map(|v| v.to_bits())
                .collect::<Vec<_>>()
        };
        let want = run(model.clone());
        let mut ours = model.clone();
        assert_eq!(
            substitute(&mut ours).unwrap(),
            1,
            "{hw:?} k{k:?} s{st:?} p{pads:?} ceil {ceil}"
        );
        assert_eq!(
            bits(run(ours)),
            bits(want.clone()),
            "{hw:?} k{k:?} s{st:?} p{pads:?} ceil {ceil}"
        );
        // And after tract's optimizer (OptMaxPool).
        let mut optimized = model.into_optimized().unwrap();
        assert_eq!(substitute(&mut optimized).unwrap(), 1);
        assert_eq!(
            bits(run(optimized)),
            bits(want),
            "optimized {hw:?} k{k:?} s{st:?}"
        );
    }

    #[test]
    fn the_builders_check_passes() {
        assert_eq!(check(), Ok(()));
    }

    #[test]
    fn an_empty_batch_pools_to_an_empty_output() {
        let input = Tensor::zero::<f32>(&[0, 2, 4, 4]).unwrap().into_tvalue();
        let out = eval_planes("MaxPool2x2", [2, 4, 4], [2, 2], tvec![input], |i, o| {
            pool(i, o, 4, 4)
        })
        .unwrap();
        assert_eq!(out[0].shape(), &[0, 2, 2, 2]);
    }

    #[test]
    fn general_pools_answer_like_tract() {
        // SqueezeNet (3x3 stride 2, ceil mode) and ResNet (3x3 stride 2, padding 1) at their
        // sizes, then odd sizes, asymmetric kernels, strides and padding.
        same_as_tract(2, [111, 111], [3, 3], [2, 2], [0, 0, 0, 0], true);
        same_as_tract(2, [27, 27], [3, 3], [2, 2], [0, 0, 0, 0], true);
        same_as_tract(2, [112, 112], [3, 3], [2, 2], [1, 1, 1, 1], false);
        for (hw, k, st, pads, ceil) in [
            ([7, 9], [3, 3], [2, 2], [0, 0, 0, 0], true),
            ([7, 9], [3, 3], [2, 2], [0, 0, 0, 0], false),
            ([5, 6], [3, 3], [2, 2], [1, 1, 1, 1], false),
            ([5, 6], [3, 3], [1, 1], [1, 1, 1, 1], false),
            ([6, 5], [2, 3], [1, 2], [0, 1, 1, 0], true),
            ([4, 4], [5, 5], [3, 3], [2, 2, 2, 2], true),
            ([8, 3], [1, 1], [2, 2], [0, 0, 0, 0], false),
            ([3, 3], [3, 3], [1, 1], [2, 2, 2, 2], false),
            // Rows with several groups of four inner columns and a remainder, at strides 1
            // and 2, with and without padding.
            ([5, 23], [3, 3], [1, 1], [1, 1, 1, 1], false),
            ([5, 22], [3, 2], [1, 1], [0, 0, 0, 0], false),
            ([6, 31], [3, 3], [2, 2], [1, 1, 1, 1], true),
            ([6, 30], [2, 4], [2, 2], [0, 3, 0, 2], false),
            // 2x2 stride 2 (MaxPool2x2), with ties and NaN among the taps; odd in ceil mode
            // (MaxPoolNchw).
            ([28, 28], [2, 2], [2, 2], [0, 0, 0, 0], false),
            ([14, 21], [2, 2], [2, 2], [0, 0, 0, 0], false),
            // Rows of 3 (no group of four), 4 (one, nothing left) and 7 outputs (one group
            // and the last four overlapping it).
            ([6, 6], [2, 2], [2, 2], [0, 0, 0, 0], false),
            ([8, 8], [2, 2], [2, 2], [0, 0, 0, 0], false),
            ([4, 14], [2, 2], [2, 2], [0, 0, 0, 0], false),
            ([9, 19], [2, 2], [2, 2], [0, 0, 0, 0], true),
        ] {
            same_as_tract(3, hw, k, st, pads, ceil);
        }
    }
}
