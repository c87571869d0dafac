//! 3x3 convolutions of stride 1 with Winograd's F(2x2, 3x3): 16 products where the direct
//! convolution has one, together 2.25x fewer multiplications.
//!
//! The portable path's product loop runs at the floating-point pipes' limit (eight
//! multiply-adds per cycle on four-lane vectors; docs/benchmarks.md), so the only way left
//! to make a compute-bound convolution faster in wasm is to multiply less. F(2x2, 3x3)
//! (Lavin and Gray, "Fast Algorithms for Convolutional Neural Networks", 2016) computes each
//! 2x2 tile of an output channel from the 4x4 patch of input under it: with `d` the patch,
//! `g` a 3x3 filter and
//!
//! ```text
//! Bᵀ = [1  0 -1  0]    G = [ 1    0    0 ]    Aᵀ = [1  1  1  0]
//!      [0  1  1  0]        [1/2  1/2  1/2]         [0  1 -1 -1]
//!      [0 -1  1  0]        [1/2 -1/2  1/2]
//!      [0  1  0 -1]        [ 0    0    1 ]
//! ```
//!
//! the tile is `Aᵀ [Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B)] A`. Each of the 16 positions ξ of the 4x4
//! transforms is a product: `M_ξ (output channels x tiles) = U_ξ (output channels x input
//! channels) · V_ξ (input channels x tiles)`. The filters' transforms `U_ξ` are computed
//! once, when the model loads, and packed as the 8x8 kernel's A; each inference transforms
//! its input into the `V_ξ`, written straight into the kernel's B panels, runs the 16
//! products on the kernel as tract's plans hold it (so on the host's native kernel where the
//! node offers one, in the guest's block loop otherwise), and transforms the `M_ξ` back,
//! adding the bias.
//!
//! The results round differently from a direct convolution's (the transforms add and
//! subtract before and after the products): they are not tract's bits, and the builder's
//! golden samples hold them to their tolerance. A node and a browser still compute the same
//! bits, running the same wasm. [`check`] compares the op with a direct convolution in f64
//! at every build. Only the guest substitutes it (`lib.rs`): native tract, the baseline a
//! capsule is measured against, keeps its direct convolution.

use std::arch::wasm32::*;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tract_linalg::mmm::{
    AsInputValue, FusedSpec, MMMInputFormat, MMMInputValue, MatMatMul, PackedExoticFact,
};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec};
use tract_onnx::tract_core::ops::math::Max;
use tract_onnx::tract_core::ops::nn::DataFormat;
use tract_onnx::tract_core::tract_linalg;

/// Fewest input and output channels a substituted convolution has. The input channels are
/// the 16 products' depth; with 16 (textdir's first layers, SqueezeNet's first expand
/// layers) neither model measured faster than with this bound (docs/benchmarks.md).
const MIN_CHANNELS: usize = 32;
/// Fewest output pixels per channel. Smaller outputs waste more of their tiles (a 7x7
/// output is 16 tiles, 64 values for 49, and still multiplies 1.7x less than the direct
/// convolution). ResNet-50's 7x7 layers measured 2-4% faster with this bound than with 144,
/// which left them direct, for 14 MiB more image: their filters, the largest, grow by 7/9.
const MIN_OUTPUTS: usize = 49;
/// The 4x4 transforms' positions.
const XI: usize = 16;
/// Values between two V_ξ (64 bytes).
const V_PAD: usize = 16;

/// A 3x3 convolution of stride 1 (any padding, one group, f32 NCHW, a batch of any size)
/// computed with F(2x2, 3x3).
#[derive(Clone)]
pub struct Winograd {
    geometry: Arc<Geometry>,
    /// The ReLU that followed the convolution, applied as the output transform stores
    /// (see [`substitute`]).
    relu: bool,
}

struct Geometry {
    cin: usize,
    cout: usize,
    /// Input height and width.
    h: usize,
    w: usize,
    /// Padding above and to the left (below and to the right follow from the output size).
    top: usize,
    left: usize,
    /// Output height and width.
    oh: usize,
    ow: usize,
    /// Rows of 2x2 tiles, and tiles per row rounded up to 4 (the transforms' vectors).
    th: usize,
    tw: usize,
    /// Columns of the products: `th * tw` rounded up to the kernel's 8.
    tiles: usize,
    /// `U_ξ`, packed as the kernel's A.
    u: Vec<Box<dyn MMMInputValue>>,
    bias: Vec<f32>,
    kernel: Box<dyn MatMatMul>,
    /// The kernel's B packing, which the input transform writes.
    b_format: Box<dyn MMMInputFormat>,
}

impl fmt::Debug for Winograd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let g = &*self.geometry;
        let relu = if self.relu { " + ReLU" } else { "" };
        write!(f, "Winograd {}x{}x{} to {}{relu}", g.cin, g.h, g.w, g.cout)
    }
}

impl PartialEq for Winograd {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.geometry, &other.geometry) && self.relu == other.relu
    }
}

impl Eq for Winograd {}

impl Hash for Winograd {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let g = &*self.geometry;
        (g.cin, g.cout, g.h, g.w, self.relu).hash(state);
    }
}

impl Winograd {
    /// The op for filters `weights` (`[cout, cin, 3, 3]`, row-major) and `bias` (`cout`
    /// values) over `[n, cin, h, w]` inputs with `top` and `left` rows and columns of zero
    /// padding, making `[n, cout, oh, ow]`.
    fn new(
        [cin, cout, h, w]: [usize; 4],
        [top, left]: [usize; 2],
        [oh, ow]: [usize; 2],
        weights: &[f32],
        bias: Vec<f32>,
    ) -> TractResult<Winograd> {
        ensure!(cin > 0 && cout > 0 && oh > 0 && ow > 0);
        ensure!(weights.len() == cout * cin * 9 && bias.len() == cout);
        // Padding beyond 2 would make whole rows or columns of zeros: not a convolution
        // this op is for. Below and to the right, the input's padded copy is zeros up to
        // every tile's last tap, whatever padding the output size implies.
        ensure!(top <= 2 && left <= 2);
        let th = oh.div_ceil(2);
        let tw = ow.div_ceil(2).next_multiple_of(4);
        let tiles = (th * tw).next_multiple_of(8);
        let kernel: Box<dyn MatMatMul> = Box::new(super::blocks::Blocks(super::wasm::make().mmm()));
        let Some((pack_a, pack_b)) = kernel.packings().first() else {
            bail!("the kernel has no packing");
        };
        let b_format = pack_b.clone();
        // U_ξ = G g Gᵀ for every filter, in f64, as 16 matrices of cout x cin.
        let mut u = vec![0f32; XI * cout * cin];
        const G: [[f64; 3]; 4] = [
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0.0, 0.0, 1.0],
        ];
        for (f, g) in weights.chunks_exact(9).enumerate() {
            let (co, ci) = (f / cin, f % cin);
            let mut gg = [[0f64; 3]; 4];
            for (i, row) in gg.iter_mut().enumerate() {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = (0..3).map(|t| G[i][t] * g[3 * t + j] as f64).sum();
                }
            }
            for i in 0..4 {
                for j in 0..4 {
                    let v: f64 = (0..3).map(|t| gg[i][t] * G[j][t]).sum();
                    u[((4 * i + j) * cout + co) * cin + ci] = v as f32;
                }
            }
        }
        let u = u
            .chunks_exact(cout * cin)
            .map(|m| {
                let t = Tensor::from_shape(&[cout, cin], m)?;
                pack_a.prepare_one(&t, 1, 0)
            })
            .collect::<TractResult<Vec<_>>>()?;
        Ok(Winograd {
            relu: false,
            geometry: Arc::new(Geometry {
                cin,
                cout,
                h,
                w,
                top,
                left,
                oh,
                ow,
                th,
                tw,
                tiles,
                u,
                bias,
                kernel,
                b_format,
            }),
        })
    }

    /// The op for convolution `conv` of a model, if it is one of those it computes (and worth
    /// it): `input` and `output` its facts, `weights` and `bias` its constant operands.
    fn of(
        conv: &Conv,
        input: &TypedFact,
        output: &TypedFact,
        weights: &Tensor,
        bias: &Tensor,
    ) -> TractResult<Option<Winograd>> {
        let spec = &conv.pool_spec;
        let ones = |v: &Option<TVec<usize>>| v.as_ref().is_none_or(|v| v.iter().all(|&s| s == 1));
        if conv.group != 1
            || conv.q_params.is_some()
            || conv.kernel_fmt != KernelFormat::OIHW
            || spec.data_format != DataFormat::NCHW
            || *spec.kernel_shape != [3, 3]
            || !ones(&spec.strides)
            || !ones(&spec.dilations)
            || input.datum_type != f32::datum_type()
            || output.datum_type != f32::datum_type()
            || weights.datum_type() != f32::datum_type()
            || bias.datum_type() != f32::datum_type()
        {
            return Ok(None);
        }
        let (top, left) = match &spec.padding {
            PaddingSpec::Valid => (0, 0),
            PaddingSpec::SameUpper | PaddingSpec::SameLower => (1, 1),
            PaddingSpec::Explicit(before, _) | PaddingSpec::ExplicitOnnxPool(before, _, _) => {
                let [top, left] = before[..] else {
                    return Ok(None);
                };
                (top, left)
            }
        };
        let concrete = |f: &TypedFact| -> Option<[usize; 3]> {
            let [_, c, h, w] = f.shape.dims() else {
                return None;
            };
            Some([c.to_usize().ok()?, h.to_usize().ok()?, w.to_usize().ok()?])
        };
        let (Some([cin, h, w]), Some([cout, oh, ow])) = (concrete(input), concrete(output)) else {
            return Ok(None);
        };
        if cin < MIN_CHANNELS || cout < MIN_CHANNELS || oh * ow < MIN_OUTPUTS || top > 2 || left > 2
        {
            return Ok(None);
        }
        if weights.shape() != [cout, cin, 3, 3] {
            return Ok(None);
        }
        let bias = {
            let plain = bias.try_as_plain_ram()?;
            match plain.as_slice::<f32>()? {
                [one] => vec![*one; cout],
                all if all.len() == cout => all.to_vec(),
                _ => return Ok(None),
            }
        };
        let weights = weights.try_as_plain_ram()?;
        Winograd::new(
            [cin, cout, h, w],
            [top, left],
            [oh, ow],
            weights.as_slice::<f32>()?,
            bias,
        )
        .map(Some)
    }

    /// The convolution of one image, `input` (`cin` planes of `h x w`) into `output`
    /// (`cout` planes of `oh x ow`), with `padded`, `v` and `m` as scratch.
    fn image(&self, input: &[f32], output: &mut [f32], scratch: &mut Scratch) -> TractResult<()> {
        let g = &*self.geometry;
        let (hp, wp) = (2 * g.th + 2, 2 * g.tw + 2);
        // The input with its padding, and zeros up to every tile's last tap: each value
        // written once (a zero-filled buffer cost a second pass over it).
        let padded = &mut scratch.padded;
        let padded_len = g.cin * hp * wp;
        padded.clear();
        padded
            .try_reserve_exact(padded_len)
            .map_err(|e| format_err!("Winograd: {padded_len} values of padded input: {e}"))?;
        let (rows, len) = (g.h.min(hp - g.top), g.w.min(wp - g.left));
        let pp = padded.as_mut_ptr();
        for c in 0..g.cin {
            for y in 0..hp {
                // SAFETY: the row is within the `padded_len` values reserved; the input row
                // `y - top` of channel `c` holds `w >= len` values.
                unsafe {
                    let row = pp.add((c * hp + y) * wp);
                    if (g.top..g.top + rows).contains(&y) {
                        let from = input[(c * g.h + y - g.top) * g.w..][..g.w].as_ptr();
                        std::ptr::write_bytes(row, 0, g.left);
                        std::ptr::copy_nonoverlapping(from, row.add(g.left), len);
                        std::ptr::write_bytes(row.add(g.left + len), 0, wp - g.left - len);
                    } else {
                        std::ptr::write_bytes(row, 0, wp);
                    }
                }
            }
        }
        // SAFETY: every one of the `padded_len` values was written above.
        unsafe { padded.set_len(padded_len) };
        // V_ξ, each as the kernel's B: panels of 8 tiles, `cin` steps of 8 values each.
        // The transform writes every real tile's values; the tiles that round the count up
        // to 8 (four or none) are zeros.
        // Each V_ξ is followed by `V_PAD` unused values (zeros), so that the transform's 16
        // streams do not lie a multiple of 4 KiB apart (`tiles * cin` values mostly are),
        // where they all fell in the same few sets of the L1 cache.
        let v_len = g.tiles * g.cin + V_PAD;
        let v = &mut scratch.v;
        v.clear();
        v.try_reserve_exact(XI * v_len / 4)
            .map_err(|e| format_err!("Winograd: {} values of V: {e}", XI * v_len))?;
        let vp = v.as_mut_ptr().cast::<f32>();
        let pp = padded.as_ptr();
        // Channels innermost: each V_ξ is then written in order, 32 bytes a channel (with
        // the channels outermost, each of the 16 streams wrote half a cache line at a time
        // and came back to its other half a channel later).
        for ty in 0..g.th {
            for group in 0..g.tw / 4 {
                let x0 = 8 * group;
                let tile = ty * g.tw + 4 * group;
                let first = (tile / 8) * g.cin * 8 + tile % 8;
                for c in 0..g.cin {
                    // SAFETY (of the four rows): rows `2 * ty` to `2 * ty + 3 < hp` of channel
                    // `c`, values `x0` to `x0 + 9 < 2 * tw + 2 = wp`: within `padded`.
                    let row =
                        |i: usize| unsafe { patch_row(pp.add((c * hp + 2 * ty + i) * wp + x0)) };
                    let (d0, d1, d2, d3) = (row(0), row(1), row(2), row(3));
                    let at = first + c * 8;
                    // Bᵀ d, each row then times B and stored.
                    // SAFETY: `tile + 3 < th * tw <= tiles`, so `at + 3` is within each
                    // V_ξ's `tiles * cin` values.
                    unsafe {
                        store_row(vp.add(at), v_len, 0, sub4(d0, d2));
                        store_row(vp.add(at), v_len, 1, add4(d1, d2));
                        store_row(vp.add(at), v_len, 2, sub4(d2, d1));
                        store_row(vp.add(at), v_len, 3, sub4(d1, d3));
                    }
                }
            }
        }
        for xi in 0..XI {
            // SAFETY: the padding after V_ξ, within its `v_len` values.
            unsafe { std::ptr::write_bytes(vp.add(xi * v_len + g.tiles * g.cin), 0, V_PAD) };
        }
        if g.tiles > g.th * g.tw {
            let first = g.th * g.tw;
            for xi in 0..XI {
                for c in 0..g.cin {
                    let at = xi * v_len + (first / 8) * g.cin * 8 + c * 8 + first % 8;
                    // SAFETY: the padding tiles `first..tiles` of step `c` are within V_ξ.
                    unsafe { std::ptr::write_bytes(vp.add(at), 0, g.tiles - first) };
                }
            }
        }
        // SAFETY: every value of the 16 V_ξ was written above.
        unsafe { v.set_len(XI * v_len / 4) };
        // M_ξ = U_ξ · V_ξ, on the kernel as tract's plans hold it.
        let m = &mut scratch.m;
        for (xi, u) in g.u.iter().enumerate() {
            let b = VPanels {
                format: g.b_format.clone(),
                fact: PackedExoticFact {
                    format: g.b_format.clone(),
                    mn: g.tiles.to_dim(),
                    k: g.cin,
                },
                // Panels of V_ξ: `tiles / 8` of `cin * 8` f32 each, in `v`.
                base: vp.wrapping_add(xi * v_len) as usize,
                k: g.cin,
                mn: g.tiles,
            };
            let view = m.view_at_prefix_mut(&[xi])?;
            // SAFETY: `view` is M_ξ and its spare row, `(cout + 1) x tiles` f32, of which
            // the product stores `cout` rows; A and B hold `cin` steps of
            // `cout` and `tiles` values (padded to the kernel's 8), alive for the call.
            unsafe {
                let store = g.kernel.c_view(Some(0), Some(1)).wrap(&view);
                g.kernel.run(
                    g.cout,
                    g.tiles,
                    &[
                        FusedSpec::AddMatMul {
                            a: AsInputValue::Borrowed(&**u),
                            b: AsInputValue::Borrowed(&b),
                            packing: 0,
                        },
                        FusedSpec::Store(store),
                    ],
                )?;
            }
        }
        let m = m.try_as_plain_ram()?;
        let m = m.as_slice::<f32>()?;
        // The output transform, instantiated with and without the ReLU (a test per vector
        // slowed it by a quarter).
        if self.relu {
            g.output::<true>(m, output);
        } else {
            g.output::<false>(m, output);
        }
        Ok(())
    }
}

impl Geometry {
    /// `Aᵀ M A` plus the bias, then with `RELU` the ReLU, into `output`, four tiles at a
    /// time. The ReLU is tract's own max by a scalar in wasm, `pmax(0, x)`: the same bits as
    /// the op it replaced (a NaN gives 0).
    fn output<const RELU: bool>(&self, m: &[f32], output: &mut [f32]) {
        let g = self;
        let zero = f32x4_splat(0.0);
        let relu = |v: v128| if RELU { f32x4_pmax(zero, v) } else { v };
        // M_ξ and its spare row (`Scratch::m`).
        let m_len = (g.cout + 1) * g.tiles;
        for co in 0..g.cout {
            let bias = f32x4_splat(g.bias[co]);
            let plane = &mut output[co * g.oh * g.ow..][..g.oh * g.ow];
            for ty in 0..g.th {
                for group in 0..g.tw / 4 {
                    let tile = ty * g.tw + 4 * group;
                    let at = m.as_ptr().wrapping_add(co * g.tiles + tile);
                    // Row i of M's 4x4 (positions 4 * i to 4 * i + 3).
                    // SAFETY: `tile + 3 < tiles`: the four values of each position are M_ξ's,
                    // in `m`.
                    let row = |i: usize| unsafe {
                        let at = at.add(4 * i * m_len);
                        [
                            v128_load(at.cast()),
                            v128_load(at.add(m_len).cast()),
                            v128_load(at.add(2 * m_len).cast()),
                            v128_load(at.add(3 * m_len).cast()),
                        ]
                    };
                    let (m0, m1, m2, m3) = (row(0), row(1), row(2), row(3));
                    // Aᵀ M.
                    let s0 = add4(add4(m0, m1), m2);
                    let s1 = sub4(sub4(m1, m2), m3);
                    let y = |s: &[v128; 4]| {
                        (
                            relu(f32x4_add(f32x4_add(f32x4_add(s[0], s[1]), s[2]), bias)),
                            relu(f32x4_add(f32x4_sub(f32x4_sub(s[1], s[2]), s[3]), bias)),
                        )
                    };
                    for (dy, (even, odd)) in [y(&s0), y(&s1)].into_iter().enumerate() {
                        let row = 2 * ty + dy;
                        if row >= g.oh {
                            continue;
                        }
                        let values = [
                            i32x4_shuffle::<0, 4, 1, 5>(even, odd),
                            i32x4_shuffle::<2, 6, 3, 7>(even, odd),
                        ];
                        let x0 = 8 * group;
                        let out = &mut plane[row * g.ow..][..g.ow];
                        if x0 + 8 <= g.ow {
                            let at = out[x0..x0 + 8].as_mut_ptr();
                            // SAFETY: the 8 values are the row's, checked by the slice.
                            unsafe {
                                v128_store(at.cast(), values[0]);
                                v128_store(at.add(4).cast(), values[1]);
                            }
                        } else {
                            let mut lanes = [0f32; 8];
                            // SAFETY: `lanes` holds 8 values.
                            unsafe {
                                v128_store(lanes.as_mut_ptr().cast(), values[0]);
                                v128_store(lanes.as_mut_ptr().add(4).cast(), values[1]);
                            }
                            for (x, value) in lanes.iter().enumerate() {
                                if let Some(o) = out.get_mut(x0 + x) {
                                    *o = *value;
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Row `d_i` of four side-by-side tiles' 4x4 patches: columns `j = 0..4` of tiles
/// `0..4`, whose patches start 2 values apart at `r`.
///
/// # Safety
/// `r` to `r + 9` are readable.
#[inline(always)]
unsafe fn patch_row(r: *const f32) -> [v128; 4] {
    // SAFETY: the caller's contract.
    let (a, b, a2, b2) = unsafe {
        (
            v128_load(r.cast()),
            v128_load(r.add(4).cast()),
            v128_load(r.add(2).cast()),
            v128_load(r.add(6).cast()),
        )
    };
    [
        i32x4_shuffle::<0, 2, 4, 6>(a, b),
        i32x4_shuffle::<1, 3, 5, 7>(a, b),
        i32x4_shuffle::<0, 2, 4, 6>(a2, b2),
        i32x4_shuffle::<1, 3, 5, 7>(a2, b2),
    ]
}

#[inline(always)]
fn add4(a: [v128; 4], b: [v128; 4]) -> [v128; 4] {
    [
        f32x4_add(a[0], b[0]),
        f32x4_add(a[1], b[1]),
        f32x4_add(a[2], b[2]),
        f32x4_add(a[3], b[3]),
    ]
}

#[inline(always)]
fn sub4(a: [v128; 4], b: [v128; 4]) -> [v128; 4] {
    [
        f32x4_sub(a[0], b[0]),
        f32x4_sub(a[1], b[1]),
        f32x4_sub(a[2], b[2]),
        f32x4_sub(a[3], b[3]),
    ]
}

/// Stores row `i` of `(Bᵀ d) B`, from row `t` of `Bᵀ d`: position `4 * i + j` into V_ξ at
/// `v`, `ξ * v_len` values further.
///
/// # Safety
/// `v.add(ξ * v_len)` is writable for four values, for `ξ` in `4 * i .. 4 * i + 4`.
#[inline(always)]
unsafe fn store_row(v: *mut f32, v_len: usize, i: usize, t: [v128; 4]) {
    // SAFETY: the caller's contract.
    unsafe {
        v128_store(v.add(4 * i * v_len).cast(), f32x4_sub(t[0], t[2]));
        v128_store(v.add((4 * i + 1) * v_len).cast(), f32x4_add(t[1], t[2]));
        v128_store(v.add((4 * i + 2) * v_len).cast(), f32x4_sub(t[2], t[1]));
        v128_store(v.add((4 * i + 3) * v_len).cast(), f32x4_sub(t[1], t[3]));
    }
}

/// One inference's buffers, reused from image to image of a batch.
struct Scratch {
    padded: Vec<f32>,
    v: Vec<v128>,
    m: Tensor,
}

impl Op for Winograd {
    fn name(&self) -> StaticName {
        "Winograd".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Winograd {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let g = &*self.geometry;
        let (&[n, c, h, w], true) = (input.shape(), input.datum_type() == f32::datum_type()) else {
            bail!(
                "Winograd: an input {:?} of {:?}",
                input.datum_type(),
                input.shape()
            );
        };
        ensure!(
            [c, h, w] == [g.cin, g.h, g.w],
            "Winograd: an input of {:?}",
            input.shape()
        );
        let len = [g.cout, g.oh, g.ow]
            .into_iter()
            .try_fold(n, usize::checked_mul)
            .with_context(|| format!("Winograd: output of {n} images is too large"))?;
        // SAFETY: `uninitialized` allocates `len` f32 and sets none; `write_bytes` zeroes
        // them (all-zero bytes are 0.0) before anything reads them. An empty tensor has no
        // storage to set. The output transform then writes every value.
        let mut output = unsafe {
            let mut t = Tensor::uninitialized::<f32>(&[n, g.cout, g.oh, g.ow])?;
            if len > 0 {
                std::ptr::write_bytes(t.as_ptr_mut_unchecked::<f32>(), 0, len);
            }
            t
        };
        let mut scratch = Scratch {
            padded: Vec::new(),
            v: Vec::new(),
            // Each M_ξ has a spare row (zeros, never read), for the reason each V_ξ is
            // padded (`Winograd::image`).
            // SAFETY: the products store every other value of M before the output
            // transform reads it; the spare rows are zeroed here.
            m: unsafe {
                let mut m = Tensor::uninitialized::<f32>(&[XI, g.cout + 1, g.tiles])?;
                let p = m.as_ptr_mut_unchecked::<f32>();
                for xi in 0..XI {
                    std::ptr::write_bytes(
                        p.add((xi * (g.cout + 1) + g.cout) * g.tiles),
                        0,
                        g.tiles,
                    );
                }
                m
            },
        };
        {
            let input = input.try_as_plain_ram()?;
            let input = input.as_slice::<f32>()?;
            let mut plain = output.try_as_plain_ram_mut()?;
            let out = plain.as_slice_mut::<f32>()?;
            let (image_in, image_out) = (g.cin * g.h * g.w, g.cout * g.oh * g.ow);
            for i in 0..n {
                self.image(
                    &input[i * image_in..][..image_in],
                    &mut out[i * image_out..][..image_out],
                    &mut scratch,
                )?;
            }
        }
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for Winograd {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let g = &*self.geometry;
        crate::pool::output_fact("Winograd", g.cout, [g.oh, g.ow], inputs)
    }

    as_op!();
}

/// V_ξ as the kernel's B: panels of 8 tiles in a buffer of the op's.
#[derive(Clone)]
struct VPanels {
    format: Box<dyn MMMInputFormat>,
    fact: PackedExoticFact,
    /// The first panel's address.
    base: usize,
    k: usize,
    mn: usize,
}

impl PartialEq for VPanels {
    fn eq(&self, other: &Self) -> bool {
        (self.base, self.k, self.mn) == (other.base, other.k, other.mn)
    }
}

impl Eq for VPanels {}

impl Hash for VPanels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (self.base, self.k, self.mn).hash(state);
    }
}

impl fmt::Debug for VPanels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for VPanels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Winograd V")
    }
}

impl MMMInputValue for VPanels {
    fn format(&self) -> &dyn MMMInputFormat {
        &*self.format
    }
    fn scratch_panel_buffer_layout(&self) -> Option<std::alloc::Layout> {
        None
    }
    fn panel_bytes(&self, i: usize, _buffer: Option<*mut u8>) -> TractResult<*const u8> {
        ensure!(i < self.mn.div_ceil(8), "panel {i} of {} tiles", self.mn);
        Ok((self.base + i * self.k * 32) as *const u8)
    }
    fn mn(&self) -> usize {
        self.mn
    }
    fn k(&self) -> usize {
        self.k
    }
    fn exotic_fact(&self) -> &dyn ExoticFact {
        &self.fact
    }
    fn extract_at_mn_f16(&self, _mn: usize, _slice: &mut [f16]) -> TractResult<()> {
        // The op's products are f32 throughout: nothing converts its V to f16.
        bail!("Winograd's V is f32")
    }
    fn extract_at_mn_f32(&self, mn: usize, slice: &mut [f32]) -> TractResult<()> {
        ensure!(mn < self.mn && slice.len() == self.k);
        let panel = self.panel_bytes(mn / 8, None)?.cast::<f32>();
        for (k, value) in slice.iter_mut().enumerate() {
            // SAFETY: panel `mn / 8` holds `k` steps of 8 values.
            *value = unsafe { *panel.add(8 * k + mn % 8) };
        }
        Ok(())
    }
}

/// Replaces every convolution of a decluttered model that [`Winograd::of`] takes; returns
/// how many. The filters' old constants go with the convolutions. A ReLU that alone reads
/// the convolution's output goes into the op too: tract fuses the ReLU after a convolution
/// it computes itself into its product's epilogue, but not after an op of ours, where it
/// cost a pass over the output (2% of SqueezeNet's inference with host kernels).
pub(super) fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        let node = model.node(id);
        let Some(conv) = node.op_as::<Conv>() else {
            continue;
        };
        let [input, weights, bias] = node.inputs[..] else {
            continue;
        };
        let (Some(weights), Some(bias)) = (
            model.outlet_fact(weights)?.konst.clone(),
            model.outlet_fact(bias)?.konst.clone(),
        ) else {
            continue;
        };
        let output = model.outlet_fact(OutletId::new(id, 0))?;
        let Some(mut op) = Winograd::of(conv, model.outlet_fact(input)?, output, &weights, &bias)?
        else {
            continue;
        };
        let after = op.output_facts(&[model.outlet_fact(input)?])?;
        if after.len() != 1 || after[0].shape != output.shape {
            continue;
        }
        let replaced_outlet = match relu_after(model, id)? {
            Some(relu) => {
                op.relu = true;
                OutletId::new(relu, 0)
            }
            None => OutletId::new(id, 0),
        };
        let name = node.name.clone();
        TypedModelPatch::rewire(model, &[input], &[replaced_outlet], &|patch, taps| {
            patch.wire_node(&name, op.clone(), taps)
        })?
        .apply(model)?;
        replaced += 1;
    }
    if replaced > 0 {
        model.compact()?;
    }
    Ok(replaced)
}

/// The ReLU that alone reads node `id`'s output, if there is one: ONNX's `Relu` as tract
/// declutters it, a `Max` with a uniform 0.0 of no larger shape, whose output has the
/// shape and type of its other input. A model output is left to be one.
fn relu_after(model: &TypedModel, id: usize) -> TractResult<Option<usize>> {
    let output = OutletId::new(id, 0);
    let [only] = model.node(id).outputs[0].successors[..] else {
        return Ok(None);
    };
    let relu = model.node(only.node);
    let Some(max) = relu.op_as::<TypedBinOp>() else {
        return Ok(None);
    };
    if !max.0.is::<Max>() || model.outputs.contains(&output) || relu.inputs.len() != 2 {
        return Ok(None);
    }
    let other = relu.inputs[1 - only.slot];
    let (fact, bound) = (model.outlet_fact(output)?, model.outlet_fact(other)?);
    let zero = bound.uniform.as_ref().is_some_and(|u| {
        u.datum_type() == f32::datum_type()
            && u.cast_to_scalar::<f32>().is_ok_and(|v| v.to_bits() == 0)
    });
    let fits = bound.shape.len() <= fact.shape.len() && bound.shape.iter().all(|d| d.is_one());
    let result = model.outlet_fact(OutletId::new(relu.id, 0))?;
    if !zero || !fits || result.datum_type != fact.datum_type || result.shape != fact.shape {
        return Ok(None);
    }
    Ok(Some(relu.id))
}

/// Checks the op against a direct convolution computed in f64, on shapes that cut tiles at
/// the bottom and right edges, with and without padding, a batch of two, products of one
/// panel and of several: every output within `1e-5` of the sum of its terms' magnitudes
/// (the transforms' rounding; an error in the transforms or the panels is of the order of
/// the values). Runs with the builder's kernel check, before a model loads.
pub(super) fn check() -> Result<(), String> {
    let describe = |what: &str, e: TractError| format!("the Winograd check, {what}: {e:#}");
    let mut next = super::wasm::check_values(0x2545_f491);
    // The kernel checks' values include NaN and infinities; these are finite, with zeros.
    let mut value = move || {
        let v = next();
        if v.is_finite() { v } else { 0.5 }
    };
    for (cin, cout, h, w, pad, relu) in [
        (16, 16, 10, 10, 1, false),
        (17, 24, 9, 13, 1, true),
        (16, 16, 12, 11, 0, false),
        (20, 40, 15, 7, 1, true),
    ] {
        let what = format!("{cin}x{h}x{w} -> {cout} channels, padding {pad}, ReLU {relu}");
        let (oh, ow) = (h + 2 * pad - 2, w + 2 * pad - 2);
        let weights: Vec<f32> = (0..cout * cin * 9).map(|_| value()).collect();
        let bias: Vec<f32> = (0..cout).map(|_| value()).collect();
        let n = 2;
        let input: Vec<f32> = (0..n * cin * h * w).map(|_| value()).collect();
        let mut op = Winograd::new(
            [cin, cout, h, w],
            [pad, pad],
            [oh, ow],
            &weights,
            bias.clone(),
        )
        .map_err(|e| describe(&what, e))?;
        op.relu = relu;
        let tensor = Tensor::from_shape(&[n, cin, h, w], &input).map_err(|e| describe(&what, e))?;
        let out = op
            .eval_out_of_plan(tvec!(tensor.into_tvalue()))
            .map_err(|e| describe(&what, e))?;
        let out = out
            .and_then(|out| out.into_iter().next())
            .ok_or_else(|| format!("the Winograd check, {what}: no output"))?;
        let out = out
            .try_as_plain_ram()
            .and_then(|p| Ok(p.as_slice::<f32>()?.to_vec()))
            .map_err(|e| describe(&what, e))?;
        for i in 0..n {
            for co in 0..cout {
                for y in 0..oh {
                    for x in 0..ow {
                        let (mut sum, mut magnitude) = (bias[co] as f64, bias[co].abs() as f64);
                        for ci in 0..cin {
                            for dy in 0..3 {
                                for dx in 0..3 {
                                    let (iy, ix) =
                                        ((y + dy).wrapping_sub(pad), (x + dx).wrapping_sub(pad));
                                    if iy >= h || ix >= w {
                                        continue;
                                    }
                                    let term = weights[((co * cin + ci) * 3 + dy) * 3 + dx] as f64
                                        * input[((i * cin + ci) * h + iy) * w + ix] as f64;
                                    sum += term;
                                    magnitude += term.abs();
                                }
                            }
                        }
                        if relu {
                            sum = sum.max(0.0);
                        }
                        let ours = out[((i * cout + co) * oh + y) * ow + x] as f64;
                        if (ours - sum).abs() > 1e-5 * magnitude.max(1e-30)
                            || !ours.is_finite()
                            || (relu && ours < 0.0)
                        {
                            return Err(format!(
                                "the Winograd check, {what}: image {i}, channel {co}, ({y}, {x}): {ours} where the direct convolution is {sum}"
                            ));
                        }
                    }
                }
            }
        }
    }
    Ok(())
}
