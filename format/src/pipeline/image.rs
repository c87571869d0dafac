//! Image inputs: decoding, color, resizing, layout and scaling settings, and their checks
//! against the model input.

use super::*;

/// Channel order of the model's image input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColorMode {
    /// One channel, ITU-R 601-2 luma as Pillow's `convert("L")` computes it.
    Gray,
    /// Red, green, blue.
    #[default]
    Rgb,
    /// Blue, green, red (OpenCV's order).
    Bgr,
}

impl ColorMode {
    /// Number of channels.
    pub fn channels(self) -> u64 {
        match self {
            ColorMode::Gray => 1,
            ColorMode::Rgb | ColorMode::Bgr => 3,
        }
    }
}

/// Memory layout of the model's image input.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layout {
    /// `[N, C, H, W]` (PyTorch).
    #[default]
    Nchw,
    /// `[N, H, W, C]` (TensorFlow).
    Nhwc,
}

/// Resampling filter, named after Pillow's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// Nearest neighbour.
    Nearest,
    /// Triangle filter, antialiased when shrinking (Pillow `BILINEAR`).
    #[default]
    Bilinear,
    /// Cubic convolution with a = -0.5 (Pillow `BICUBIC`).
    Bicubic,
    /// Lanczos with a = 3 (Pillow `LANCZOS`).
    Lanczos3,
}

/// A resize: either to an exact size, or so that the shorter side has a length (aspect
/// ratio kept, then usually a center crop).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    /// Output width (with `height`).
    #[serde(default)]
    pub width: Option<u32>,
    /// Output height (with `width`).
    #[serde(default)]
    pub height: Option<u32>,
    /// Length of the shorter side (instead of `width`/`height`).
    #[serde(default)]
    pub shorter_side: Option<u32>,
    /// Filter.
    #[serde(default)]
    pub filter: Filter,
}

/// A width and height.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Size {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

pub(super) fn default_scale() -> f32 {
    1.0 / 255.0
}
pub(super) fn default_image_max_bytes() -> u64 {
    16 << 20
}
pub(super) fn default_max_pixels() -> u64 {
    1 << 24
}

/// Decode, resize, crop, convert and normalize encoded images (PNG, JPEG). The V2 input is
/// `BYTES [N]`, one encoded image per element; the model input gets `N` images.
///
/// Per pixel and channel: `(value * scale - mean[c]) / std[c]`, `value` in 0..=255.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Channel order.
    #[serde(default)]
    pub color: ColorMode,
    /// Layout of the model input.
    #[serde(default)]
    pub layout: Layout,
    /// Resize (none: every image must already have the model's size).
    #[serde(default)]
    pub resize: Option<Resize>,
    /// Center crop after the resize.
    #[serde(default)]
    pub center_crop: Option<Size>,
    /// Multiplier applied to 0..=255 values (default 1/255).
    #[serde(default = "default_scale")]
    pub scale: f32,
    /// Per-channel mean subtracted after scaling (one value, or one per channel).
    #[serde(default)]
    pub mean: Vec<f32>,
    /// Per-channel standard deviation divided by (one value, or one per channel).
    #[serde(default)]
    pub std: Vec<f32>,
    /// Largest encoded image accepted, in bytes (default 16 MiB).
    #[serde(default = "default_image_max_bytes")]
    pub max_bytes: u64,
    /// Largest decoded image accepted, in pixels (default 16 Mi): a decompression bomb is
    /// refused from its header, before any pixel is decoded.
    #[serde(default = "default_max_pixels")]
    pub max_pixels: u64,
}

pub(super) fn check_image(at: &str, image: &ImageSpec, spec: &TensorSpec) -> Result<()> {
    if !matches!(spec.dtype, DType::F32) {
        return Err(invalid(
            at,
            format!(
                "the model input {:?} is {}, images need FP32",
                spec.name, spec.dtype
            ),
        ));
    }
    if spec.shape.len() != 4 {
        return Err(invalid(
            at,
            format!(
                "the model input {:?} has rank {}, images need rank 4",
                spec.name,
                spec.shape.len()
            ),
        ));
    }
    let channels = image.color.channels();
    for (field, values) in [("mean", &image.mean), ("std", &image.std)] {
        if !(values.is_empty() || values.len() == 1 || values.len() as u64 == channels) {
            return Err(invalid(
                at,
                format!(
                    "`{field}` has {} values; give 1 or {channels}",
                    values.len()
                ),
            ));
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(invalid(
                at,
                format!("`{field}` has a value that is not finite"),
            ));
        }
    }
    if image.std.contains(&0.0) {
        return Err(invalid(at, "`std` has a zero"));
    }
    if !image.scale.is_finite() {
        return Err(invalid(at, "`scale` is not finite"));
    }
    if image.max_bytes == 0 || image.max_pixels == 0 {
        return Err(invalid(at, "`max_bytes` and `max_pixels` must be positive"));
    }
    let side = |field: &str, v: u32| {
        if v == 0 || v > MAX_IMAGE_SIDE {
            Err(invalid(
                at,
                format!("`{field}` must be in 1..={MAX_IMAGE_SIDE}, not {v}"),
            ))
        } else {
            Ok(u64::from(v))
        }
    };
    let mut size = None;
    if let Some(r) = &image.resize {
        size = match (r.width, r.height, r.shorter_side) {
            (Some(w), Some(h), None) => Some((side("resize.width", w)?, side("resize.height", h)?)),
            (None, None, Some(s)) => {
                side("resize.shorter_side", s)?;
                None
            }
            _ => {
                return Err(invalid(
                    at,
                    "`resize`: give `width` and `height`, or `shorter_side` alone",
                ));
            }
        };
    }
    if let Some(c) = &image.center_crop {
        size = Some((
            side("center_crop.width", c.width)?,
            side("center_crop.height", c.height)?,
        ));
    } else if image
        .resize
        .as_ref()
        .is_some_and(|r| r.shorter_side.is_some())
    {
        return Err(invalid(
            at,
            "`resize.shorter_side` keeps the aspect ratio: add a `center_crop` so every image gets one size",
        ));
    }
    let (c_axis, h_axis, w_axis) = match image.layout {
        Layout::Nchw => (1, 2, 3),
        Layout::Nhwc => (3, 1, 2),
    };
    check_fixed(at, "`color`", spec.shape.get(c_axis), channels)?;
    if let Some((w, h)) = size {
        check_fixed(at, "the height", spec.shape.get(h_axis), h)?;
        check_fixed(at, "the width", spec.shape.get(w_axis), w)?;
    } else if !matches!(spec.shape.get(h_axis), Some(Dim::Fixed(_)))
        || !matches!(spec.shape.get(w_axis), Some(Dim::Fixed(_)))
    {
        return Err(invalid(
            at,
            "the model input's height and width are not fixed: add a `resize` (or `center_crop`)",
        ));
    }
    Ok(())
}
