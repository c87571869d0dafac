//! Tabular records: fields, imputation, scaling, categories, and their checks against the
//! model input.

use super::*;

/// The kind of a tabular field.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldKind {
    /// A JSON number.
    #[default]
    Number,
    /// A JSON boolean (or 0/1), as 0.0/1.0.
    Boolean,
    /// A JSON string from `categories`, one-hot encoded.
    Category,
}

/// How a missing value (absent, `null`, `NaN`) is filled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Impute {
    /// A missing value is an error naming the field.
    #[default]
    None,
    /// The training mean (fitted into `fill`).
    Mean,
    /// The training median (fitted into `fill`).
    Median,
    /// The constant in `fill`.
    Constant,
    /// The most frequent training category (fitted into `fill_category`).
    MostFrequent,
}

/// Scaling of a numeric field, after imputation and clipping.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scaling {
    /// Unchanged.
    #[default]
    None,
    /// `(x - mean) / std` (scikit-learn `StandardScaler`, population std; 1 when 0).
    Standard,
    /// `(x - min) / (max - min)` (scikit-learn `MinMaxScaler`; range 1 when 0).
    MinMax,
}

/// What a category outside `categories` becomes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Unknown {
    /// An extra one-hot column after the known categories.
    #[default]
    Bucket,
    /// An error naming the field and the value.
    Error,
}

/// One named field of a tabular record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Field {
    /// The record key.
    pub name: String,
    /// Its kind.
    #[serde(default, rename = "type")]
    pub kind: FieldKind,
    /// Missing-value policy.
    #[serde(default)]
    pub impute: Impute,
    /// The value a missing number becomes (fitted for `mean`/`median`).
    #[serde(default)]
    pub fill: Option<f64>,
    /// The value a missing category becomes (fitted for `most_frequent`, or a constant).
    #[serde(default)]
    pub fill_category: Option<String>,
    /// `[low, high]` bounds applied after imputation.
    #[serde(default)]
    pub clip: Option<[f64; 2]>,
    /// Scaling.
    #[serde(default)]
    pub scale: Scaling,
    /// Fitted mean (standard scaling).
    #[serde(default)]
    pub mean: Option<f64>,
    /// Fitted standard deviation (standard scaling).
    #[serde(default)]
    pub std: Option<f64>,
    /// Fitted minimum (min-max scaling).
    #[serde(default)]
    pub min: Option<f64>,
    /// Fitted maximum (min-max scaling).
    #[serde(default)]
    pub max: Option<f64>,
    /// Known categories, in one-hot column order.
    #[serde(default)]
    pub categories: Vec<String>,
    /// What an unknown category becomes.
    #[serde(default)]
    pub unknown: Unknown,
}

impl Field {
    /// Number of model features this field produces.
    pub fn width(&self) -> usize {
        match self.kind {
            FieldKind::Category => {
                self.categories.len() + usize::from(self.unknown == Unknown::Bucket)
            }
            FieldKind::Number | FieldKind::Boolean => 1,
        }
    }
}

pub(super) fn default_record_max_bytes() -> u64 {
    1 << 20
}

/// JSON records to a feature matrix `[N, F]`, features in field order. The V2 input is
/// `BYTES [N]`, each element a JSON object (one record) or a JSON array of objects. Keys
/// that are not fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TabularSpec {
    /// The fields, in feature order.
    pub fields: Vec<Field>,
    /// Largest JSON element accepted, in bytes (default 1 MiB).
    #[serde(default = "default_record_max_bytes")]
    pub max_bytes: u64,
}

impl TabularSpec {
    /// Number of features of one record.
    pub fn width(&self) -> usize {
        self.fields.iter().map(Field::width).sum()
    }
}

pub(super) fn check_tabular(at: &str, tab: &TabularSpec, spec: &TensorSpec) -> Result<()> {
    if !matches!(spec.dtype, DType::F32 | DType::F64) {
        return Err(invalid(
            at,
            format!(
                "the model input {:?} is {}, records need FP32 or FP64",
                spec.name, spec.dtype
            ),
        ));
    }
    if spec.shape.len() != 2 {
        return Err(invalid(
            at,
            format!(
                "the model input {:?} has rank {}, records need rank 2",
                spec.name,
                spec.shape.len()
            ),
        ));
    }
    if tab.fields.is_empty() {
        return Err(invalid(at, "`fields` is empty"));
    }
    if tab.max_bytes == 0 {
        return Err(invalid(at, "`max_bytes` must be positive"));
    }
    for f in &tab.fields {
        let at = format!("{at} field {:?}", f.name);
        if tab.fields.iter().filter(|g| g.name == f.name).count() > 1 {
            return Err(invalid(at, "the field is declared twice"));
        }
        let finite = |name: &str, v: Option<f64>| match v {
            Some(x) if !x.is_finite() => Err(invalid(&at, format!("`{name}` is not finite"))),
            _ => Ok(()),
        };
        for (name, v) in [
            ("fill", f.fill),
            ("mean", f.mean),
            ("std", f.std),
            ("min", f.min),
            ("max", f.max),
        ] {
            finite(name, v)?;
        }
        match f.kind {
            FieldKind::Category => {
                if f.categories.is_empty() {
                    return Err(invalid(at, "`categories` is empty"));
                }
                if f.scale != Scaling::None || f.clip.is_some() {
                    return Err(invalid(at, "`scale` and `clip` do not apply to a category"));
                }
                match f.impute {
                    Impute::None => {}
                    Impute::MostFrequent | Impute::Constant => match &f.fill_category {
                        Some(c) if f.categories.contains(c) => {}
                        Some(c) => {
                            return Err(invalid(
                                at,
                                format!("`fill_category` {c:?} is not one of `categories`"),
                            ));
                        }
                        None => {
                            return Err(invalid(
                                at,
                                "`fill_category` is missing (fit the spec, or set it)",
                            ));
                        }
                    },
                    Impute::Mean | Impute::Median => {
                        return Err(invalid(
                            at,
                            "`impute`: a category takes `most_frequent` or `constant`",
                        ));
                    }
                }
            }
            FieldKind::Number | FieldKind::Boolean => {
                if !f.categories.is_empty() || f.fill_category.is_some() {
                    return Err(invalid(
                        at,
                        "`categories` and `fill_category` apply to categories only",
                    ));
                }
                match f.impute {
                    Impute::None => {}
                    Impute::MostFrequent => {
                        return Err(invalid(
                            at,
                            "`impute`: `most_frequent` applies to categories",
                        ));
                    }
                    Impute::Mean | Impute::Median | Impute::Constant => {
                        if f.fill.is_none() {
                            return Err(invalid(at, "`fill` is missing (fit the spec, or set it)"));
                        }
                    }
                }
                if let Some([lo, hi]) = f.clip
                    && !(lo.is_finite() && hi.is_finite() && lo <= hi)
                {
                    return Err(invalid(at, "`clip` must be [low, high] with low <= high"));
                }
                match f.scale {
                    Scaling::None => {}
                    Scaling::Standard => match (f.mean, f.std) {
                        (Some(_), Some(s)) if s > 0.0 => {}
                        (Some(_), Some(_)) => return Err(invalid(at, "`std` must be positive")),
                        _ => {
                            return Err(invalid(at, "`mean` and `std` are missing (fit the spec)"));
                        }
                    },
                    Scaling::MinMax => match (f.min, f.max) {
                        (Some(lo), Some(hi)) if lo <= hi => {}
                        (Some(_), Some(_)) => return Err(invalid(at, "`min` is above `max`")),
                        _ => return Err(invalid(at, "`min` and `max` are missing (fit the spec)")),
                    },
                }
            }
        }
    }
    check_fixed(
        at,
        "the fields' width",
        spec.shape.get(1),
        tab.width() as u64,
    )
}
