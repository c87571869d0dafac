//! Images: decode (PNG, JPEG), convert, resize, center crop, normalize, lay out.
//!
//! The arithmetic follows what training code usually does with Pillow and NumPy:
//! - gray is Pillow's `convert("L")`, ITU-R 601-2 in 16-bit fixed point;
//! - resizing is Pillow's `Image.resize` on 8-bit images, reimplemented step for step
//!   (`Resample.c`): the filter's support widened by the scale when shrinking, fixed-point
//!   weights with 22 fractional bits, two passes each rounded to 8 bits, horizontal first
//!   unless the height loses more than twice as many pixels as the width (Pillow 13's
//!   order), and `NEAREST` as Pillow's affine sampling; so a PNG resized here matches Pillow
//!   13 bit for bit (tested, every size from 1x1 to 128x128 to 28x28 among others);
//! - the center crop offset is `round((size - crop) / 2)` with ties to even (torchvision);
//! - each value becomes `(level * scale - mean[c]) / std[c]` in f32.

use capsule_format::pipeline::{ColorMode, Filter, ImageSpec, Layout};
use capsule_format::{NamedTensor, TensorSpec};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

use crate::{Result, bad_input, element_error};

pub(crate) struct ImageStep {
    spec: ImageSpec,
    target: String,
}

/// One decoded image as channel planes of 0..=255 levels (f32), `width * height` each.
#[derive(Debug, Clone, PartialEq)]
pub struct Planes {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
    /// One plane per channel, row-major.
    pub planes: Vec<Vec<f32>>,
}

impl ImageStep {
    pub(crate) fn new(spec: &ImageSpec, target: TensorSpec) -> ImageStep {
        ImageStep {
            spec: spec.clone(),
            target: target.name,
        }
    }

    pub(crate) fn run(&self, input: &str, items: &[&[u8]]) -> Result<NamedTensor> {
        let mut data: Vec<f32> = Vec::new();
        let mut size = None;
        for (i, bytes) in items.iter().enumerate() {
            let at = |reason: String| element_error(input, "image", i, items.len(), reason);
            let planes = prepare(&self.spec, bytes).map_err(at)?;
            match size {
                None => size = Some((planes.width, planes.height)),
                Some(s) if s != (planes.width, planes.height) => {
                    return Err(at(format!(
                        "is {}x{}, but the first image is {}x{} (add a resize to the spec)",
                        planes.width, planes.height, s.0, s.1
                    )));
                }
                Some(_) => {}
            }
            append_normalized(&self.spec, &planes, &mut data);
        }
        let (w, h) = size.unwrap_or((0, 0));
        let c = self.spec.color.channels();
        let n = items.len() as u64;
        let shape = match self.spec.layout {
            Layout::Nchw => vec![n, c, u64::from(h), u64::from(w)],
            Layout::Nhwc => vec![n, u64::from(h), u64::from(w), c],
        };
        let tensor = crate::f32_tensor(shape, &data).map_err(|e| bad_input(input, e))?;
        Ok(NamedTensor {
            name: self.target.clone(),
            tensor,
        })
    }
}

/// Decodes one encoded image under the spec's limits, converts its colors, resizes and
/// crops it: every step but the normalization, as 0..=255 levels.
pub fn prepare(spec: &ImageSpec, bytes: &[u8]) -> Result<Planes, String> {
    if bytes.len() as u64 > spec.max_bytes {
        return Err(format!(
            "the encoded image is {} bytes, over the limit of {}",
            bytes.len(),
            spec.max_bytes
        ));
    }
    let decoded = decode(bytes, spec.max_pixels)?;
    let mut planes = to_planes(&decoded, spec.color);
    if let Some(r) = &spec.resize {
        let (w, h) = match (r.width, r.height, r.shorter_side) {
            (Some(w), Some(h), _) => (w, h),
            (_, _, Some(s)) => shorter_side(planes.width, planes.height, s),
            _ => (planes.width, planes.height),
        };
        planes = resize(&planes, w, h, r.filter);
    }
    if let Some(c) = &spec.center_crop {
        planes = center_crop(&planes, c.width, c.height)?;
    }
    Ok(planes)
}

fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, String> {
    let reader = ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read the image: {e}"))?;
    match reader.format() {
        Some(ImageFormat::Png | ImageFormat::Jpeg) => {}
        Some(other) => {
            return Err(format!(
                "{other:?} images are not accepted (PNG and JPEG are)"
            ));
        }
        None => return Err("not a PNG or JPEG image".into()),
    }
    // The size from the header first, so a bomb is refused by name before a decoder runs;
    // then the pixels under an allocation limit (16-bit RGBA is the widest pixel, the
    // decoder's own buffers come on top).
    let check = |w: u32, h: u32| {
        let pixels = u64::from(w) * u64::from(h);
        if pixels > max_pixels {
            Err(format!(
                "the image is {w}x{h} = {pixels} pixels, over the limit of {max_pixels}"
            ))
        } else if pixels == 0 {
            Err("the image is empty".to_owned())
        } else {
            Ok(())
        }
    };
    if let Some((w, h)) = header_size(bytes) {
        check(w, h)?;
    }
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).saturating_add(1 << 20));
    let mut reader = reader;
    reader.limits(limits);
    let decoder = reader
        .into_decoder()
        .map_err(|e| format!("cannot decode the image: {e}"))?;
    let (w, h) = decoder.dimensions();
    check(w, h)?;
    DynamicImage::from_decoder(decoder).map_err(|e| format!("cannot decode the image: {e}"))
}

/// Width and height from a PNG `IHDR` or a JPEG start-of-frame header, when the bytes hold
/// one where it should be.
fn header_size(bytes: &[u8]) -> Option<(u32, u32)> {
    let be16 = |b: &[u8], at: usize| {
        Some(u32::from(u16::from_be_bytes([
            *b.get(at)?,
            *b.get(at + 1)?,
        ])))
    };
    let be32 = |b: &[u8], at: usize| Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?));
    if bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.get(12..16) == Some(b"IHDR") {
        return Some((be32(bytes, 16)?, be32(bytes, 20)?));
    }
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    // Walk the JPEG segments up to the first SOFn (C0..CF but DHT C4, JPG C8, DAC CC).
    let mut at = 2;
    while at + 4 <= bytes.len() {
        if bytes[at] != 0xFF {
            return None;
        }
        let marker = bytes[at + 1];
        if marker == 0xFF {
            at += 1;
            continue;
        }
        let len = be16(bytes, at + 2)? as usize;
        if (0xC0..=0xCF).contains(&marker) && !matches!(marker, 0xC4 | 0xC8 | 0xCC) {
            return Some((be16(bytes, at + 7)?, be16(bytes, at + 5)?));
        }
        if marker == 0xDA {
            return None;
        }
        at = at.checked_add(2)?.checked_add(len)?;
    }
    None
}

/// Pillow's `L24`: `(r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16`.
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16) as u8
}

fn to_planes(img: &DynamicImage, color: ColorMode) -> Planes {
    let (width, height) = (img.width(), img.height());
    let has_color = img.color().has_color();
    let planes = match color {
        ColorMode::Gray if !has_color => {
            vec![
                img.to_luma8()
                    .into_raw()
                    .into_iter()
                    .map(f32::from)
                    .collect(),
            ]
        }
        ColorMode::Gray => {
            let rgb = img.to_rgb8();
            vec![
                rgb.pixels()
                    .map(|p| f32::from(luma(p[0], p[1], p[2])))
                    .collect(),
            ]
        }
        ColorMode::Rgb | ColorMode::Bgr => {
            let rgb = img.to_rgb8();
            let plane = |c: usize| rgb.pixels().map(|p| f32::from(p[c])).collect::<Vec<_>>();
            if color == ColorMode::Rgb {
                vec![plane(0), plane(1), plane(2)]
            } else {
                vec![plane(2), plane(1), plane(0)]
            }
        }
    };
    Planes {
        width,
        height,
        planes,
    }
}

/// torchvision's `Resize(int)`: the shorter side becomes `size`, the longer one
/// `int(size * long / short)`.
fn shorter_side(w: u32, h: u32, size: u32) -> (u32, u32) {
    let scaled = |long: u32, short: u32| {
        ((u64::from(size) * u64::from(long)) / u64::from(short).max(1))
            .clamp(1, u64::from(u32::MAX)) as u32
    };
    if w <= h {
        (size, scaled(h, w))
    } else {
        (scaled(w, h), size)
    }
}

/// A resampling filter as Pillow defines it (`Resample.c`): the kernel and its support.
fn kernel(f: Filter) -> (fn(f64) -> f64, f64) {
    fn bilinear(x: f64) -> f64 {
        let x = x.abs();
        if x < 1.0 { 1.0 - x } else { 0.0 }
    }
    fn bicubic(x: f64) -> f64 {
        const A: f64 = -0.5;
        let x = x.abs();
        if x < 1.0 {
            ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
        } else if x < 2.0 {
            (((x - 5.0) * x + 8.0) * x - 4.0) * A
        } else {
            0.0
        }
    }
    fn sinc(x: f64) -> f64 {
        if x == 0.0 {
            1.0
        } else {
            let x = x * std::f64::consts::PI;
            x.sin() / x
        }
    }
    fn lanczos(x: f64) -> f64 {
        if (-3.0..3.0).contains(&x) {
            sinc(x) * sinc(x / 3.0)
        } else {
            0.0
        }
    }
    match f {
        Filter::Bilinear | Filter::Nearest => (bilinear, 1.0),
        Filter::Bicubic => (bicubic, 2.0),
        Filter::Lanczos3 => (lanczos, 3.0),
    }
}

/// Fixed-point precision of Pillow's 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output position: the first input index and the fixed-point weights (Pillow's
/// `precompute_coeffs` + `normalize_coeffs_8bpc`).
fn coefficients(in_size: u32, out_size: u32, filter: Filter) -> Vec<(usize, Vec<i32>)> {
    let (kernel, support) = kernel(filter);
    let scale = f64::from(in_size) / f64::from(out_size);
    let filter_scale = scale.max(1.0);
    let support = support * filter_scale;
    let ss = 1.0 / filter_scale;
    (0..out_size)
        .map(|xx| {
            let center = (f64::from(xx) + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0);
            let xmax = ((center + support + 0.5) as i64).min(i64::from(in_size));
            let weights: Vec<f64> = (xmin..xmax)
                .map(|x| kernel((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = weights.iter().sum();
            let fixed = weights
                .iter()
                .map(|w| {
                    let w = if total != 0.0 { w / total } else { *w };
                    let v = w * f64::from(1u32 << PRECISION_BITS);
                    (if v < 0.0 { v - 0.5 } else { v + 0.5 }) as i32
                })
                .collect();
            (xmin.max(0) as usize, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Pillow's `Image.resize` on one 8-bit plane: two passes (horizontal then vertical, or the
/// other way round as Pillow 13 chooses), each rounded to 8 bits; `NEAREST` samples
/// `floor((x + 0.5) * in / out)`.
fn resample(plane: &[u8], w: u32, h: u32, nw: u32, nh: u32, filter: Filter) -> Vec<u8> {
    let (w_, nw_, nh_) = (w as usize, nw as usize, nh as usize);
    if filter == Filter::Nearest {
        // Pillow resizes with NEAREST through an affine transform (`affine_transform` in
        // Geometry.c): the source coordinate starts at scale / 2 and grows by adding the
        // scale, in f64, so its rounding is reproduced by accumulating the same way.
        let positions = |size: u32, out: u32| {
            let scale = f64::from(size) / f64::from(out);
            let mut v = scale * 0.5;
            (0..out)
                .map(|_| {
                    let i = (v as usize).min(size as usize - 1);
                    v += scale;
                    i
                })
                .collect::<Vec<usize>>()
        };
        let cols = positions(w, nw);
        let rows = positions(h, nh);
        let mut out = Vec::with_capacity(nw_ * nh_);
        for &y in &rows {
            let row = y * w_;
            out.extend(cols.iter().map(|&x| plane[row + x]));
        }
        return out;
    }
    // Pillow 13 runs the vertical pass first when the height loses more than twice as many
    // pixels as the width (`ImagingResampleInner`, python-pillow/Pillow#9549). The order
    // changes the 8-bit intermediate's rounding, so it is followed.
    let vertical_first = nh < h && i64::from(h - nh) > 2 * (i64::from(w) - i64::from(nw));
    if vertical_first {
        let vertical = vertical_pass(plane, w, h, nh, filter);
        return horizontal_pass(&vertical, w, nh, nw, filter);
    }
    let horizontal = horizontal_pass(plane, w, h, nw, filter);
    vertical_pass(&horizontal, nw, h, nh, filter)
}

/// One 8-bit plane of `w` x `h` resampled to width `nw` (Pillow's
/// `ImagingResampleHorizontal_8bpc`), rounded to 8 bits.
fn horizontal_pass(plane: &[u8], w: u32, h: u32, nw: u32, filter: Filter) -> Vec<u8> {
    if nw == w {
        return plane.to_vec();
    }
    let (w_, h_, nw_) = (w as usize, h as usize, nw as usize);
    let coeffs = coefficients(w, nw, filter);
    let mut out = Vec::with_capacity(nw_ * h_);
    for y in 0..h_ {
        let row = &plane[y * w_..(y + 1) * w_];
        out.extend(coeffs.iter().map(|(start, k)| {
            let acc = k
                .iter()
                .zip(&row[*start..])
                .fold(1i64 << (PRECISION_BITS - 1), |acc, (k, &v)| {
                    acc + i64::from(*k) * i64::from(v)
                });
            clip8(acc)
        }));
    }
    out
}

/// One 8-bit plane of `w` x `h` resampled to height `nh` (Pillow's
/// `ImagingResampleVertical_8bpc`), rounded to 8 bits.
fn vertical_pass(plane: &[u8], w: u32, h: u32, nh: u32, filter: Filter) -> Vec<u8> {
    if nh == h {
        return plane.to_vec();
    }
    let (w_, nh_) = (w as usize, nh as usize);
    let coeffs = coefficients(h, nh, filter);
    let mut out = Vec::with_capacity(w_ * nh_);
    for (start, k) in &coeffs {
        for x in 0..w_ {
            let acc = k
                .iter()
                .enumerate()
                .fold(1i64 << (PRECISION_BITS - 1), |acc, (i, k)| {
                    acc + i64::from(*k) * i64::from(plane[(start + i) * w_ + x])
                });
            out.push(clip8(acc));
        }
    }
    out
}

fn resize(p: &Planes, width: u32, height: u32, filter: Filter) -> Planes {
    if (width, height) == (p.width, p.height) {
        return p.clone();
    }
    let planes = p
        .planes
        .iter()
        .map(|plane| {
            let bytes: Vec<u8> = plane.iter().map(|&v| v as u8).collect();
            resample(&bytes, p.width, p.height, width, height, filter)
                .into_iter()
                .map(f32::from)
                .collect()
        })
        .collect();
    Planes {
        width,
        height,
        planes,
    }
}

fn center_crop(p: &Planes, width: u32, height: u32) -> Result<Planes, String> {
    if width > p.width || height > p.height {
        return Err(format!(
            "the image is {}x{}, smaller than the {width}x{height} center crop",
            p.width, p.height
        ));
    }
    let offset = |size: u32, crop: u32| (f64::from(size - crop) / 2.0).round_ties_even() as u32;
    let (left, top) = (offset(p.width, width), offset(p.height, height));
    let planes = p
        .planes
        .iter()
        .map(|plane| {
            let mut out = Vec::with_capacity((width * height) as usize);
            for y in top..top + height {
                let row = y as usize * p.width as usize + left as usize;
                out.extend_from_slice(&plane[row..row + width as usize]);
            }
            out
        })
        .collect();
    Ok(Planes {
        width,
        height,
        planes,
    })
}

fn append_normalized(spec: &ImageSpec, p: &Planes, out: &mut Vec<f32>) {
    let c = p.planes.len();
    let pick = |values: &[f32], ch: usize, default: f32| match values.len() {
        0 => default,
        1 => values[0],
        _ => values.get(ch).copied().unwrap_or(default),
    };
    let norm: Vec<(f32, f32)> = (0..c)
        .map(|ch| (pick(&spec.mean, ch, 0.0), pick(&spec.std, ch, 1.0)))
        .collect();
    let value = |ch: usize, v: f32| (v * spec.scale - norm[ch].0) / norm[ch].1;
    match spec.layout {
        Layout::Nchw => {
            for (ch, plane) in p.planes.iter().enumerate() {
                out.extend(plane.iter().map(|&v| value(ch, v)));
            }
        }
        Layout::Nhwc => {
            let pixels = p.planes.first().map_or(0, Vec::len);
            out.reserve(pixels * c);
            for i in 0..pixels {
                for (ch, plane) in p.planes.iter().enumerate() {
                    out.push(value(ch, plane[i]));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every gray image from 1x1 to 128x128 resized to 28x28 (BILINEAR), against Pillow
    /// 13's output hashes (`tests/fixtures/pipeline/generate.py pillow-sweep`). Pillow picks
    /// the order of its two passes per pair of sizes, and the order changes the rounding of
    /// the 8-bit intermediate: with the horizontal pass always first, 33x41 differed in 10
    /// pixels of a real image (and 1,174 of 4,000 random size pairs in some pixel).
    #[test]
    fn every_size_up_to_128_resizes_as_pillow_does() {
        fn xorshift_bytes(w: u32, h: u32) -> Vec<u8> {
            let mut x = ((w << 16) | h) ^ 0x9E37_79B9;
            (0..w * h)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 17;
                    x ^= x << 5;
                    x as u8
                })
                .collect()
        }
        fn fnv1a32(data: &[u8]) -> u32 {
            data.iter().fold(0x811C_9DC5, |h, &b| {
                (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
            })
        }
        let sweep = include_str!("../../tests/fixtures/pipeline/image/pillow_sweep.txt");
        let mut differ = Vec::new();
        let mut checked = 0;
        for line in sweep.lines().filter(|l| !l.starts_with('#')) {
            let mut fields = line.split(' ');
            let w: u32 = fields.next().unwrap().parse().unwrap();
            for (h, want) in (1..).zip(fields) {
                let got = resample(&xorshift_bytes(w, h), w, h, 28, 28, Filter::Bilinear);
                if format!("{:08x}", fnv1a32(&got)) != want {
                    differ.push((w, h));
                }
                checked += 1;
            }
        }
        assert_eq!(checked, 128 * 128);
        assert!(
            differ.is_empty(),
            "{} sizes differ from Pillow: {:?}",
            differ.len(),
            &differ[..differ.len().min(20)]
        );
    }

    #[test]
    fn pillow_luma_and_torchvision_offsets() {
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(255, 0, 0), 76);
        assert_eq!(luma(0, 255, 0), 150);
        assert_eq!(luma(0, 0, 255), 29);
        assert_eq!(shorter_side(640, 480, 256), (341, 256));
        assert_eq!(shorter_side(480, 640, 256), (256, 341));
        let p = Planes {
            width: 5,
            height: 1,
            planes: vec![vec![0.0, 1.0, 2.0, 3.0, 4.0]],
        };
        // (5 - 2) / 2 = 1.5 rounds to 2 (ties to even), as Python's round().
        assert_eq!(center_crop(&p, 2, 1).unwrap().planes[0], vec![2.0, 3.0]);
        assert_eq!(
            center_crop(&p, 6, 1).unwrap_err(),
            "the image is 5x1, smaller than the 6x1 center crop"
        );
    }
}
