//! A faster im2col for the guest's convolutions: panels copied as vectors where tract gathers
//! them value by value.
//!
//! tract computes a convolution as a matrix product whose right operand is the im2col of the
//! input, packed lazily, one panel of 8 output pixels at a time (`LazyIm2col`). For each of the
//! `k` rows of a panel (an input channel and a kernel tap) it loads the 8 pixels' values one
//! by one through a table of byte offsets. When the 8 pixels lie side by side in one output row
//! of a stride-1 convolution, those 8 values are contiguous in the input: one copy of 32 bytes.
//! In a capsule tract's gather took 11-16% of an inference (MNIST CNN, textdir;
//! docs/benchmarks.md). In one output row of a stride-2 convolution (the first layer of
//! SqueezeNet and of ResNet-50) they are every other value of 16: four vector loads and two
//! shuffles.
//!
//! The op's geometry (its offset tables) is private to tract. [`substitute`] learns it by
//! running the op once on a probe input whose values are their own indices: every packed
//! value then says which input element it was read from. The probe gives the offset of each
//! row (`k`) and each pixel (`n`), and the op is replaced only if those offsets reproduce every
//! value tract packed. [`Im2colPanels`] then packs the same panels from the same offsets, so
//! the products see the same bytes, and outputs are the same bits: `learn` packs every panel
//! of the probe with the guest's own copies and compares them with tract's, bit for bit,
//! before it replaces the op (in the guest, where the model loads).
//!
//! Only the guest substitutes (lib.rs): native tract, the baseline a capsule is measured
//! against, keeps its own packing.

use std::alloc::Layout;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::tract_linalg::mmm::{
    MMMInputFormat, MMMInputValue, PackedMatrixStorage,
};

/// The name tract gives its lazy im2col op.
const TRACT_OP: &str = "LazyIm2col";
/// The guest kernel's panel width, which gets the vector copy.
const R8: usize = 8;
/// The probe's values are its indices as f32, exact below 2^24.
const MAX_PROBE_LEN: usize = 1 << 24;

/// What an im2col op reads: for row `k` of the product and pixel `n`, input element
/// `group + k_offsets[k] + n_offsets[n]`.
struct Geometry {
    input_shape: TVec<usize>,
    /// Its elements (`learn` bounds every read by it).
    input_len: usize,
    /// Pixels per panel (the packing's width).
    r: usize,
    k_offsets: Vec<u32>,
    n_offsets: Vec<u32>,
    group_offsets: Vec<u32>,
    /// Per panel: how its pixels lie in the input.
    runs: Vec<Run>,
    panel_layout: Layout,
    /// tract's packing format and fact, which the product checks its operand against.
    format: Box<dyn MMMInputFormat>,
    exotic: Box<dyn ExoticFact>,
}

impl fmt::Debug for Geometry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Geometry")
            .field("input_shape", &self.input_shape)
            .field("k", &self.k_offsets.len())
            .field("n", &self.n_offsets.len())
            .field("groups", &self.group_offsets.len())
            .finish()
    }
}

/// How the 8 pixels of a panel lie in the input, which decides how a row of it is copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    /// Side by side (a stride-1 convolution's pixels in one output row): one copy of 8.
    Contiguous,
    /// Every other value of 16 that all lie in the input (a stride-2 convolution's pixels
    /// in one output row, like SqueezeNet's and ResNet-50's first): 16 values read as
    /// vectors, their even lanes kept.
    Stride2,
    /// In two runs side by side: the first `s` pixels at the end of one output row of a
    /// stride-1 convolution and the others at the start of the next (a panel that wraps;
    /// most of them when output rows are narrower than 16, like the MNIST CNN's 11). 8
    /// values read at each run's start, 8 stored with the lanes below `s` from the first:
    /// every read lies in the input.
    Split(u8),
    /// Anywhere else: 8 values read one by one.
    Gather,
}

/// tract's lazy im2col, with panels packed by [`Panels`].
#[derive(Debug, Clone)]
pub struct Im2colPanels {
    geometry: Arc<Geometry>,
    output: TypedFact,
}

impl PartialEq for Im2colPanels {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.geometry, &other.geometry)
    }
}

impl Eq for Im2colPanels {}

impl Op for Im2colPanels {
    fn name(&self) -> StaticName {
        "Im2colPanels".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Im2colPanels {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let tensor = args_1!(inputs);
        let g = &self.geometry;
        if tensor.datum_type() != f32::datum_type() || tensor.shape() != &*g.input_shape {
            bail!(
                "Im2colPanels expects f32 {:?}, got {:?} {:?}",
                g.input_shape,
                tensor.datum_type(),
                tensor.shape()
            );
        }
        let values: TVec<Box<dyn MMMInputValue>> = (0..g.group_offsets.len())
            .map(|group| {
                Box::new(Panels {
                    tensor: tensor.clone(),
                    geometry: Arc::clone(g),
                    group,
                }) as Box<dyn MMMInputValue>
            })
            .collect();
        let groups = values.len();
        let output =
            PackedMatrixStorage::new_batched(&[1, groups], values).into_tensor(f32::datum_type());
        Ok(tvec!(output.into_tvalue()))
    }
}

impl TypedOp for Im2colPanels {
    fn output_facts(&self, _inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.output.clone()))
    }

    as_op!();
}

/// One group's im2col of one input, as the product reads it.
#[derive(Clone, Debug)]
struct Panels {
    tensor: TValue,
    geometry: Arc<Geometry>,
    group: usize,
}

impl PartialEq for Panels {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.geometry, &other.geometry)
            && self.group == other.group
            && self.tensor == other.tensor
    }
}

impl Eq for Panels {}

impl Hash for Panels {
    fn hash<H: Hasher>(&self, state: &mut H) {
        (Arc::as_ptr(&self.geometry) as usize, self.group).hash(state);
        self.tensor.as_bytes().hash(state);
    }
}

impl fmt::Display for Panels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Im2colPanels {:?} group {}", self.geometry, self.group)
    }
}

impl Panels {
    /// Packs panel `i` into `out` (`k` rows of `r` values; lanes past the last pixel 0).
    fn pack(&self, i: usize, out: &mut [f32]) -> TractResult<()> {
        let g = &*self.geometry;
        let view = self.tensor.try_as_plain_ram()?;
        let input = view.as_slice::<f32>()?;
        let r = g.r;
        let base = g.group_offsets[self.group] as usize;
        let n = g.n_offsets.len();
        let pixels = &g.n_offsets[(i * r).min(n)..((i + 1) * r).min(n)];
        let rows = g.k_offsets.len();
        if r == R8 && pixels.len() == R8 && input.len() == g.input_len && out.len() >= rows * R8 {
            // The guest's panels, 8 values per row, read without bounds checks: `learn`
            // checked every group, row and pixel offset sum against the input's length,
            // which is `input.len()`, and `out` holds `rows` rows of 8.
            // Rows `t` of the panel, 32 per loop iteration ([`steps!`]): as a loop of one row
            // per iteration, its counters went through the stack at every row (wasmtime's
            // epoch check at the loop's header), a stall in each row's chain that was half
            // of what packing the MNIST CNN's panels cost.
            let (src, dst, ks) = (input.as_ptr(), out.as_mut_ptr(), g.k_offsets.as_ptr());
            let first = base + pixels[0] as usize;
            // SAFETY (of every row below): `t = i0 + j < rows`, the length of `k_offsets`.
            macro_rules! offset {
                ($i0:expr, $j:expr) => {
                    unsafe { *ks.add($i0).add($j) as usize }
                };
            }
            macro_rules! out {
                ($i0:expr, $j:expr) => {
                    unsafe { dst.add(R8 * $i0).add(R8 * $j) }
                };
            }
            match g.runs[i] {
                Run::Stride2 => {
                    macro_rules! row {
                        ($i0:expr, $j:expr) => {
                            let (k, d) = (offset!($i0, $j), out!($i0, $j));
                            // SAFETY: as above; `learn` made the panel `Stride2` only if the
                            // value after its last pixel, `first + 15`, is in the input too.
                            unsafe { evens(src.add(first + k), d) }
                        };
                    }
                    steps!(rows, row);
                }
                Run::Contiguous => {
                    macro_rules! row {
                        ($i0:expr, $j:expr) => {
                            let (k, d) = (offset!($i0, $j), out!($i0, $j));
                            // SAFETY: as above; the panel's last pixel is `first + 7`.
                            unsafe {
                                let v = src.add(first + k).cast::<[f32; R8]>().read_unaligned();
                                d.cast::<[f32; R8]>().write_unaligned(v);
                            }
                        };
                    }
                    steps!(rows, row);
                }
                Run::Split(split) => {
                    let split = usize::from(split);
                    // The second run's start, less `split`: lane `split` of 8 read from here
                    // is its first pixel.
                    let second = base + pixels[split] as usize - split;
                    macro_rules! row {
                        ($i0:expr, $j:expr) => {
                            let (k, d) = (offset!($i0, $j), out!($i0, $j));
                            // SAFETY: as above; `learn` made the panel `Split` only if both
                            // reads of 8 lie in the input (`first + 7` and `second` at any
                            // row).
                            unsafe { two_runs(src.add(first + k), src.add(second + k), split, d) };
                        };
                    }
                    steps!(rows, row);
                }
                Run::Gather => {
                    // Rare (pixels apart in the input), and a gather of 8 written out 32
                    // times would cost the guest's size: one row per iteration.
                    let o: [usize; R8] = std::array::from_fn(|j| base + pixels[j] as usize);
                    for (t, &k) in g.k_offsets.iter().enumerate() {
                        let k = k as usize;
                        // Each value goes straight into the panel (an array built first
                        // went through the stack and was reloaded as vectors, which
                        // stalled).
                        macro_rules! gather {
                            ($($j:literal)*) => {$(
                                // SAFETY: as above, for each pixel.
                                unsafe { *dst.add(t * R8 + $j) = *src.add(k + o[$j]) };
                            )*};
                        }
                        gather!(0 1 2 3 4 5 6 7);
                    }
                }
            }
            return Ok(());
        }
        for (row, &k) in out.chunks_exact_mut(r).zip(&g.k_offsets) {
            let at = base + k as usize;
            for (j, v) in row.iter_mut().enumerate() {
                *v = pixels.get(j).map_or(0.0, |&n| input[at + n as usize]);
            }
        }
        Ok(())
    }
}

impl MMMInputValue for Panels {
    fn format(&self) -> &dyn MMMInputFormat {
        &*self.geometry.format
    }

    fn scratch_panel_buffer_layout(&self) -> Option<Layout> {
        Some(self.geometry.panel_layout)
    }

    fn panel_bytes(&self, i: usize, buffer: Option<*mut u8>) -> TractResult<*const u8> {
        let g = &*self.geometry;
        let Some(buffer) = buffer else {
            bail!("Im2colPanels packs into a scratch buffer");
        };
        if i >= g.runs.len() {
            bail!("Im2colPanels: panel {i} of {}", g.runs.len());
        }
        let len = g.k_offsets.len() * g.r;
        // SAFETY: the caller passes a buffer of `scratch_panel_buffer_layout` (at least `k`
        // rows of `r` f32, checked against the layout when the geometry was made), aligned for
        // f32, which nothing else reads or writes during this call.
        let out = unsafe { std::slice::from_raw_parts_mut(buffer.cast::<f32>(), len) };
        self.pack(i, out)?;
        Ok(buffer)
    }

    fn mn(&self) -> usize {
        self.geometry.n_offsets.len()
    }

    fn k(&self) -> usize {
        self.geometry.k_offsets.len()
    }

    fn exotic_fact(&self) -> &dyn ExoticFact {
        &*self.geometry.exotic
    }

    fn extract_at_mn_f16(&self, _mn: usize, _slice: &mut [f16]) -> TractResult<()> {
        bail!("Im2colPanels extracts no f16")
    }

    fn extract_at_mn_f32(&self, mn: usize, slice: &mut [f32]) -> TractResult<()> {
        let g = &*self.geometry;
        let view = self.tensor.try_as_plain_ram()?;
        let input = view.as_slice::<f32>()?;
        let Some(&n) = g.n_offsets.get(mn) else {
            bail!("Im2colPanels: pixel {mn} of {}", g.n_offsets.len());
        };
        let base = g.group_offsets[self.group] as usize + n as usize;
        for (v, &k) in slice.iter_mut().zip(&g.k_offsets) {
            *v = input[base + k as usize];
        }
        Ok(())
    }
}

/// Values 0, 2, .., 14 of the 16 at `src`, to the 8 at `dst`.
///
/// # Safety
/// The 16 values at `src` are readable and the 8 at `dst` writable.
#[inline(always)]
unsafe fn evens(src: *const f32, dst: *mut f32) {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    // SAFETY: the caller's contract; wasm's vector loads and stores need no alignment.
    unsafe {
        use std::arch::wasm32::*;
        let v = |i: usize| v128_load(src.add(4 * i).cast());
        let (a, b, c, d) = (v(0), v(1), v(2), v(3));
        v128_store(dst.cast(), i32x4_shuffle::<0, 2, 4, 6>(a, b));
        v128_store(dst.add(4).cast(), i32x4_shuffle::<0, 2, 4, 6>(c, d));
    }
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    for j in 0..R8 {
        // SAFETY: the caller's contract.
        unsafe { *dst.add(j) = *src.add(2 * j) };
    }
}

/// The first `split` of the 8 values at `a`, then the last `8 - split` of the 8 at `b`, to
/// the 8 at `dst`.
///
/// # Safety
/// The 8 values at `a` and at `b` are readable, the 8 at `dst` writable, `split <= 8`.
#[inline(always)]
unsafe fn two_runs(a: *const f32, b: *const f32, split: usize, dst: *mut f32) {
    #[cfg(all(target_arch = "wasm32", target_feature = "simd128"))]
    // SAFETY: the caller's contract; wasm's vector loads and stores need no alignment.
    unsafe {
        use std::arch::wasm32::*;
        let s = i32x4_splat(split as i32);
        let (low, high) = (
            i32x4_gt(s, i32x4(0, 1, 2, 3)),
            i32x4_gt(s, i32x4(4, 5, 6, 7)),
        );
        let v = |p: *const f32, i: usize| v128_load(p.add(4 * i).cast());
        v128_store(dst.cast(), v128_bitselect(v(a, 0), v(b, 0), low));
        v128_store(dst.add(4).cast(), v128_bitselect(v(a, 1), v(b, 1), high));
    }
    #[cfg(not(all(target_arch = "wasm32", target_feature = "simd128")))]
    for j in 0..R8 {
        // SAFETY: the caller's contract.
        unsafe { *dst.add(j) = if j < split { *a.add(j) } else { *b.add(j) } };
    }
}

/// A buffer of `layout` (tract's scratch panels ask for alignment beyond f32's).
struct Scratch {
    bytes: Vec<u8>,
    offset: usize,
}

impl Scratch {
    fn new(layout: Layout) -> Scratch {
        let bytes = vec![0u8; layout.size() + layout.align()];
        let offset = bytes.as_ptr().align_offset(layout.align());
        Scratch { bytes, offset }
    }

    fn ptr(&mut self) -> *mut u8 {
        self.bytes[self.offset..].as_mut_ptr()
    }
}

/// The geometry of tract's im2col node `id`, learnt from a probe (see the module's
/// documentation), when it is one [`Im2colPanels`] reproduces exactly.
fn learn(model: &TypedModel, id: usize) -> TractResult<Option<Arc<Geometry>>> {
    let node = model.node(id);
    let [input] = node.inputs[..] else {
        return Ok(None);
    };
    let fact = model.outlet_fact(input)?;
    let Some(shape) = fact.shape.as_concrete() else {
        return Ok(None);
    };
    let len: usize = shape.iter().product();
    if fact.datum_type != f32::datum_type() || len == 0 || len >= MAX_PROBE_LEN {
        return Ok(None);
    }
    let probe =
        Tensor::from_shape(shape, &(0..len).map(|i| i as f32).collect::<Vec<_>>())?.into_tvalue();
    let Some(outputs) = node.op.eval_out_of_plan(tvec!(probe.clone()))? else {
        return Ok(None);
    };
    let [output] = &outputs[..] else {
        return Ok(None);
    };
    let storage = output.try_storage_as::<PackedMatrixStorage>()?;
    let values = storage.values();
    let Some(first) = values.first() else {
        return Ok(None);
    };
    let (k, n) = (first.k(), first.mn());
    let Some(layout) = first.scratch_panel_buffer_layout() else {
        return Ok(None);
    };
    let r = first.format().r();
    if r == 0
        || k == 0
        || n == 0
        || k.checked_mul(r)
            .and_then(|e| e.checked_mul(size_of::<f32>()))
            .is_none_or(|b| layout.size() < b)
        || layout.align() < align_of::<f32>()
        || values
            .iter()
            .any(|v| v.k() != k || v.mn() != n || v.format().r() != r)
    {
        return Ok(None);
    }
    let mut scratch = Scratch::new(layout);
    let panels = n.div_ceil(r);
    // tract's panels, one at a time (a whole im2col can be megabytes): value (row, lane) is
    // the input index tract read for that row and the panel's pixel.
    let mut read = |v: &dyn MMMInputValue, i: usize| -> TractResult<Vec<f32>> {
        let p = v.panel_bytes(i, Some(scratch.ptr()))?;
        // SAFETY: tract's panel holds `k` rows of `r` f32 (its layout, checked above).
        Ok(unsafe { std::slice::from_raw_parts(p.cast::<f32>(), k * r) }.to_vec())
    };
    let panel0 = read(&**first, 0)?;
    let origin = panel0[0];
    let k_offsets: Vec<f32> = (0..k).map(|row| panel0[row * r] - origin).collect();
    let mut n_offsets: Vec<f32> = Vec::with_capacity(n);
    let mut group_offsets: Vec<f32> = Vec::with_capacity(values.len());
    for (g, v) in values.iter().enumerate() {
        let mut go = 0.0;
        for i in 0..panels {
            let panel = read(&**v, i)?;
            if i == 0 {
                go = panel[0] - origin;
                group_offsets.push(go);
            }
            for lane in 0..(n - i * r).min(r) {
                // The first group's first row gives each pixel's offset; every value of
                // every group must be the sum of its group's, row's and pixel's.
                if g == 0 {
                    n_offsets.push(panel[lane]);
                }
                let no = n_offsets[i * r + lane];
                if (0..k).any(|row| panel[row * r + lane] != go + k_offsets[row] + no) {
                    return Ok(None);
                }
            }
        }
    }
    let to_u32 = |v: &[f32]| -> Option<Vec<u32>> {
        v.iter()
            .map(|&x| (x >= 0.0 && x < len as f32 && x.fract() == 0.0).then_some(x as u32))
            .collect()
    };
    let (Some(k_offsets), Some(n_offsets), Some(group_offsets)) = (
        to_u32(&k_offsets),
        to_u32(&n_offsets),
        to_u32(&group_offsets),
    ) else {
        return Ok(None);
    };
    // Every read stays inside the input (the sums were checked equal to values read from it).
    let reach = |v: &[u32]| v.iter().copied().max().unwrap_or(0) as u64;
    // The farthest row of any group starts here.
    let last_row = reach(&k_offsets) + reach(&group_offsets);
    if last_row + reach(&n_offsets) >= len as u64 {
        return Ok(None);
    }
    let runs = n_offsets
        .chunks(r)
        .map(|p| {
            let apart = |d: u32| p.len() == R8 && p.windows(2).all(|w| w[1] == w[0] + d);
            if apart(1) {
                Run::Contiguous
            } else if apart(2) && last_row + u64::from(p[0]) + 15 < len as u64 {
                Run::Stride2
            } else if let Some(split) = split(p) {
                // The first run is read 8 values from its start (the second's reads end at
                // the panel's last pixel, and start `split` values before its first, which
                // `split` checked is no lower than 0).
                if last_row + u64::from(p[0]) + 7 < len as u64 {
                    Run::Split(split)
                } else {
                    Run::Gather
                }
            } else {
                Run::Gather
            }
        })
        .collect();
    let geometry = Geometry {
        input_shape: shape.into(),
        input_len: len,
        r,
        k_offsets,
        n_offsets,
        group_offsets,
        runs,
        panel_layout: layout,
        format: tract_onnx::tract_core::dyn_clone::clone_box(first.format()),
        exotic: tract_onnx::tract_core::dyn_clone::clone_box(first.exotic_fact()),
    };
    // The offsets reproduce tract's values; now the copies that pack them must too, every
    // panel of every group packed from the probe as an inference will (this runs the wasm
    // vector copies on the builder, where the model loads).
    let geometry = Arc::new(geometry);
    let mut ours = vec![0f32; k * r];
    for (group, v) in values.iter().enumerate() {
        let panels_of = Panels {
            tensor: probe.clone(),
            geometry: Arc::clone(&geometry),
            group,
        };
        for i in 0..panels {
            panels_of.pack(i, &mut ours)?;
            let theirs = read(&**v, i)?;
            let lanes = (n - i * r).min(r);
            let differ = (0..k).any(|row| {
                (0..lanes)
                    .any(|lane| ours[row * r + lane].to_bits() != theirs[row * r + lane].to_bits())
            });
            if differ {
                return Ok(None);
            }
        }
    }
    Ok(Some(geometry))
}

/// Where a panel's 8 pixel offsets `p` break into two runs of consecutive offsets: the
/// length of the first (1 to 7), when the second starts at least that far into the input.
fn split(p: &[u32]) -> Option<u8> {
    if p.len() != R8 {
        return None;
    }
    let mut breaks = p
        .windows(2)
        .enumerate()
        .filter(|(_, w)| w[1] != w[0].wrapping_add(1));
    let (at, _) = breaks.next()?;
    let s = at + 1;
    (breaks.next().is_none() && p[s] as usize >= s).then_some(s as u8)
}

/// Replaces every f32 lazy im2col of an optimized model whose geometry [`learn`] reproduces
/// with [`Im2colPanels`]; returns how many.
pub fn substitute(model: &mut TypedModel) -> TractResult<usize> {
    let mut replaced = 0;
    for id in 0..model.nodes().len() {
        if model.node(id).op.name() != TRACT_OP {
            continue;
        }
        let Some(geometry) = learn(model, id)? else {
            continue;
        };
        let output = model.outlet_fact(OutletId::new(id, 0))?.clone();
        model.node_mut(id).op = Box::new(Im2colPanels { geometry, output });
        replaced += 1;
    }
    Ok(replaced)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mnist() -> TypedModel {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/models/mnist_cnn/model.onnx"
        );
        let model = tract_onnx::onnx()
            .model_for_path(path)
            .unwrap()
            .with_input_fact(0, f32::fact([1, 1, 28, 28]).into())
            .unwrap();
        model.into_optimized().unwrap()
    }

    fn run(model: TypedModel, input: &Tensor) -> Vec<f32> {
        let plan = model.into_runnable().unwrap();
        let out = plan.run(tvec![input.clone().into_tvalue()]).unwrap();
        out[0]
            .try_as_plain_ram()
            .unwrap()
            .as_slice::<f32>()
            .unwrap()
            .to_vec()
    }

    #[test]
    fn the_mnist_cnn_packs_the_same_bits() {
        let model = mnist();
        let input = Tensor::from_shape(
            &[1, 1, 28, 28],
            &(0..784)
                .map(|i| ((i * 37) % 101) as f32 / 101.0)
                .collect::<Vec<_>>(),
        )
        .unwrap();
        let expected = run(model.clone(), &input);
        let mut ours = model;
        assert_eq!(substitute(&mut ours).unwrap(), 2);
        assert!(ours.nodes().iter().all(|n| n.op.name() != TRACT_OP));
        // The guest's width (8) is among them, with copied and gathered panels: both paths
        // of `pack` ran.
        let eights = eights(&ours);
        assert!(eights.iter().any(|g| g.runs.contains(&Run::Contiguous)));
        assert!(eights.iter().any(|g| g.runs.contains(&Run::Gather)));
        assert!(
            eights
                .iter()
                .any(|g| g.runs.iter().any(|r| matches!(r, Run::Split(_))))
        );
        assert_eq!(run(ours, &input), expected);
    }

    /// The geometries of `model`'s replaced im2cols that pack 8 values a panel (the guest's
    /// width).
    fn eights(model: &TypedModel) -> Vec<&Geometry> {
        model
            .nodes()
            .iter()
            .filter_map(|n| n.op_as::<Im2colPanels>())
            .map(|op| &*op.geometry)
            .filter(|g| g.r == R8)
            .collect()
    }

    /// One convolution `[1, c, h, w]` -> `[1, k, ..]` of the given kernel, strides, padding
    /// and groups, optimized, and an input.
    fn conv(
        c: usize,
        k: usize,
        hw: [usize; 2],
        kernel: usize,
        stride: usize,
        pad: usize,
        group: usize,
    ) -> (TypedModel, Tensor) {
        use tract_onnx::tract_core::ops::cnn::{Conv, KernelFormat, PaddingSpec, PoolSpec};
        use tract_onnx::tract_core::ops::nn::DataFormat;
        let values = |len: usize, salt: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7919 + salt) % 211) as f32 / 211.0 - 0.5)
                .collect()
        };
        let mut model = TypedModel::default();
        let x = model
            .add_source("x", f32::fact([1, c, hw[0], hw[1]]))
            .unwrap();
        let w = Tensor::from_shape(
            &[k, c / group, kernel, kernel],
            &values(k * c / group * kernel * kernel, 1),
        )
        .unwrap();
        let b = Tensor::from_shape(&[k], &values(k, 2)).unwrap();
        let w = model.add_const("w", w).unwrap();
        let b = model.add_const("b", b).unwrap();
        let spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec![kernel, kernel],
            padding: PaddingSpec::Explicit(tvec![pad, pad], tvec![pad, pad]),
            dilations: None,
            strides: Some(tvec![stride, stride]),
            input_channels: c,
            output_channels: k,
        };
        let op = Conv {
            pool_spec: spec,
            kernel_fmt: KernelFormat::OIHW,
            group,
            q_params: None,
        };
        let y = model.wire_node("conv", op, &[x, w, b]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let input =
            Tensor::from_shape(&[1, c, hw[0], hw[1]], &values(c * hw[0] * hw[1], 3)).unwrap();
        (model.into_optimized().unwrap(), input)
    }

    #[test]
    fn padded_strided_and_grouped_convolutions_pack_the_same_bits() {
        for (c, k, hw, kernel, stride, pad, group) in [
            (3, 16, [20, 37], 3, 1, 1, 1),
            (8, 8, [17, 19], 3, 2, 1, 1),
            (8, 12, [15, 24], 3, 1, 1, 2),
            (4, 8, [23, 23], 5, 1, 2, 1),
            // Rows of 22 outputs: stride-2 runs, and the input's last values read by the
            // last row's panels.
            (3, 8, [40, 45], 3, 2, 0, 1),
            (3, 8, [39, 44], 7, 2, 3, 1),
        ] {
            let (model, input) = conv(c, k, hw, kernel, stride, pad, group);
            let expected = run(model.clone(), &input);
            let mut ours = model;
            let replaced = substitute(&mut ours).unwrap();
            // Natively, tract packs 8 pixels a panel for 8 output channels (the guest always).
            let eights = eights(&ours);
            if stride == 2 && !eights.is_empty() {
                assert!(
                    eights.iter().any(|g| g.runs.contains(&Run::Stride2)),
                    "{hw:?} k{kernel}"
                );
            }
            let left = ours
                .nodes()
                .iter()
                .filter(|n| n.op.name() == TRACT_OP)
                .count();
            assert_eq!(
                left, 0,
                "{c} {k} {hw:?} k{kernel} s{stride} p{pad} g{group}: {replaced} replaced"
            );
            assert_eq!(
                run(ours, &input),
                expected,
                "{c} {k} {hw:?} k{kernel} s{stride} p{pad} g{group}"
            );
        }
    }
}
