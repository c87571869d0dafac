//! Output steps (softmax, top-k, labels) and the signature they give the outputs.

use super::*;

/// One postprocessing step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PostOp {
    /// Softmax over the last axis.
    Softmax,
    /// Index of the largest value of the last axis (the first one on ties): `INT64`,
    /// last axis removed.
    Argmax,
    /// Indices of the `k` largest values of the last axis, largest first (lower index
    /// first on ties): `INT64`, last axis `k`.
    TopK {
        /// How many.
        k: u32,
    },
    /// The `k` largest values of the last axis, largest first.
    TopKScores {
        /// How many.
        k: u32,
    },
    /// Class indices to the capsule's labels: `BYTES`.
    Labels,
    /// `value >= threshold`: `BOOL`.
    Threshold {
        /// The threshold.
        value: f32,
    },
    /// Mean over the sequence axis of `[N, T, D]`, weighted by a `[N, T]` attention mask
    /// (a model input): `[N, D]`.
    MeanPool {
        /// The model input holding the mask.
        mask: String,
    },
    /// Divides the last axis by its L2 norm (kept when the norm is below 1e-12).
    L2Normalize,
}

impl PostOp {
    /// The step's name in the spec.
    pub fn name(&self) -> &'static str {
        match self {
            PostOp::Softmax => "softmax",
            PostOp::Argmax => "argmax",
            PostOp::TopK { .. } => "top_k",
            PostOp::TopKScores { .. } => "top_k_scores",
            PostOp::Labels => "labels",
            PostOp::Threshold { .. } => "threshold",
            PostOp::MeanPool { .. } => "mean_pool",
            PostOp::L2Normalize => "l2_normalize",
        }
    }
}

/// One output of the capsule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// The V2 output name.
    pub name: String,
    /// The model output it is computed from (default: `name`).
    #[serde(default)]
    pub from: Option<String>,
    /// Steps, in order.
    #[serde(default)]
    pub steps: Vec<PostOp>,
}

impl OutputSpec {
    /// The model output this output is computed from.
    pub fn source(&self) -> &str {
        self.from.as_deref().unwrap_or(&self.name)
    }
}

pub(super) fn post_signature(
    at: &str,
    step: &PostOp,
    mut spec: TensorSpec,
    model_inputs: &[TensorSpec],
    labels: &[String],
) -> Result<TensorSpec> {
    let numeric = !matches!(spec.dtype, DType::Bytes | DType::Bool);
    let float = matches!(spec.dtype, DType::F32 | DType::F64 | DType::F16);
    let need = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(invalid(at, format!("needs {what}, got {}", spec.dtype)))
        }
    };
    let last_axis = |spec: &TensorSpec| {
        if spec.shape.is_empty() {
            Err(invalid(at, "needs a tensor of rank 1 or more"))
        } else {
            Ok(spec.shape.len() - 1)
        }
    };
    match step {
        PostOp::Softmax | PostOp::L2Normalize => {
            need(float, "a floating-point tensor")?;
            last_axis(&spec)?;
            spec.dtype = DType::F32;
        }
        PostOp::Argmax => {
            need(numeric, "a numeric tensor")?;
            let axis = last_axis(&spec)?;
            spec.shape.truncate(axis);
            spec.dtype = DType::I64;
        }
        PostOp::TopK { k } | PostOp::TopKScores { k } => {
            need(numeric, "a numeric tensor")?;
            let axis = last_axis(&spec)?;
            if *k == 0 || *k > MAX_TOP_K {
                return Err(invalid(at, format!("`k` must be in 1..={MAX_TOP_K}")));
            }
            if let Dim::Fixed(n) = spec.shape[axis]
                && u64::from(*k) > n
            {
                return Err(invalid(
                    at,
                    format!("`k` is {k}, but the last axis has {n} values"),
                ));
            }
            spec.shape[axis] = Dim::Fixed(u64::from(*k));
            spec.dtype = if matches!(step, PostOp::TopK { .. }) {
                DType::I64
            } else {
                DType::F32
            };
        }
        PostOp::Labels => {
            need(
                matches!(
                    spec.dtype,
                    DType::I64
                        | DType::I32
                        | DType::U8
                        | DType::U16
                        | DType::U32
                        | DType::U64
                        | DType::I8
                        | DType::I16
                ),
                "an integer tensor (class indices)",
            )?;
            if labels.is_empty() {
                return Err(invalid(
                    at,
                    "the capsule has no labels (build with --labels)",
                ));
            }
            spec.dtype = DType::Bytes;
        }
        PostOp::Threshold { value } => {
            need(numeric, "a numeric tensor")?;
            if !value.is_finite() {
                return Err(invalid(at, "`value` is not finite"));
            }
            spec.dtype = DType::Bool;
        }
        PostOp::MeanPool { mask } => {
            need(float, "a floating-point tensor")?;
            if spec.shape.len() != 3 {
                return Err(invalid(
                    at,
                    format!("needs [N, T, D], got rank {}", spec.shape.len()),
                ));
            }
            let Some(m) = model_inputs.iter().find(|m| &m.name == mask) else {
                return Err(invalid(
                    at,
                    format!("`mask`: model input {mask:?} does not exist"),
                ));
            };
            if m.shape.len() != 2 {
                return Err(invalid(
                    at,
                    format!("`mask`: model input {mask:?} is not [N, T]"),
                ));
            }
            spec.shape.remove(1);
            spec.dtype = DType::F32;
        }
    }
    Ok(spec)
}
