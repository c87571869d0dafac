//! Tabular records: JSON objects to a feature matrix, field by field in spec order.
//!
//! Per numeric field: missing (absent, `null`, `"NaN"`) -> impute -> clip -> scale, in f64
//! (scikit-learn's precision), stored as the model input's float type.

use capsule_format::pipeline::{Field, FieldKind, Impute, Scaling, TabularSpec, Unknown};
use capsule_format::{DType, NamedTensor, Tensor, TensorSpec};
use serde_json::{Map, Value};

use crate::{Result, bad_input, element_error};

pub(crate) struct TabularStep {
    spec: TabularSpec,
    target: String,
    dtype: DType,
}

impl TabularStep {
    pub(crate) fn new(spec: &TabularSpec, target: TensorSpec) -> TabularStep {
        TabularStep {
            spec: spec.clone(),
            target: target.name,
            dtype: target.dtype,
        }
    }

    pub(crate) fn run(&self, input: &str, items: &[&[u8]]) -> Result<NamedTensor> {
        let mut features = Vec::new();
        let mut rows = 0u64;
        for (i, bytes) in items.iter().enumerate() {
            let element = |reason: String| element_error(input, "element", i, items.len(), reason);
            if bytes.len() as u64 > self.spec.max_bytes {
                return Err(element(format!(
                    "the JSON is {} bytes, over the limit of {}",
                    bytes.len(),
                    self.spec.max_bytes
                )));
            }
            let value: Value = serde_json::from_slice(bytes)
                .map_err(|e| element(format!("not valid JSON: {e}")))?;
            match value {
                Value::Object(record) => {
                    encode_record(&self.spec, &record, &mut features).map_err(element)?;
                    rows += 1;
                }
                Value::Array(records) => {
                    for (j, r) in records.iter().enumerate() {
                        let Value::Object(record) = r else {
                            return Err(element(format!("record {j} is not a JSON object")));
                        };
                        encode_record(&self.spec, record, &mut features)
                            .map_err(|e| element(format!("record {j}: {e}")))?;
                        rows += 1;
                    }
                }
                _ => {
                    return Err(element(
                        "expected a JSON object or an array of objects".into(),
                    ));
                }
            }
        }
        let shape = vec![rows, self.spec.width() as u64];
        let tensor = if self.dtype == DType::F64 {
            Tensor::new(
                DType::F64,
                shape,
                features.iter().flat_map(|v| v.to_le_bytes()).collect(),
            )
        } else {
            Tensor::new(
                DType::F32,
                shape,
                features
                    .iter()
                    .flat_map(|v| (*v as f32).to_le_bytes())
                    .collect(),
            )
        }
        .map_err(|e| bad_input(input, e.to_string()))?;
        Ok(NamedTensor {
            name: self.target.clone(),
            tensor,
        })
    }
}

/// Appends one record's features, in field order.
pub fn encode_record(
    spec: &TabularSpec,
    record: &Map<String, Value>,
    out: &mut Vec<f64>,
) -> Result<(), String> {
    for field in &spec.fields {
        let value = record.get(&field.name).unwrap_or(&Value::Null);
        match field.kind {
            FieldKind::Category => one_hot(field, value, out)?,
            FieldKind::Number | FieldKind::Boolean => out.push(number(field, value)?),
        }
    }
    Ok(())
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn number(field: &Field, value: &Value) -> Result<f64, String> {
    let name = &field.name;
    let raw = match (field.kind, value) {
        (_, Value::Null) => None,
        (FieldKind::Boolean, Value::Bool(b)) => Some(f64::from(u8::from(*b))),
        (FieldKind::Boolean, Value::Number(n)) if n.as_f64() == Some(0.0) => Some(0.0),
        (FieldKind::Boolean, Value::Number(n)) if n.as_f64() == Some(1.0) => Some(1.0),
        (FieldKind::Number, Value::Number(n)) => n.as_f64(),
        (FieldKind::Number, Value::String(s)) if s.eq_ignore_ascii_case("nan") => None,
        (FieldKind::Boolean, v) => {
            return Err(format!(
                "field {name:?}: expected a boolean, got {}",
                type_name(v)
            ));
        }
        (_, v) => {
            return Err(format!(
                "field {name:?}: expected a number, got {}",
                type_name(v)
            ));
        }
    };
    let mut x = match raw.filter(|x| !x.is_nan()) {
        Some(x) if x.is_infinite() => {
            return Err(format!("field {name:?}: the value is infinite"));
        }
        Some(x) => x,
        None => match (field.impute, field.fill) {
            (Impute::Mean | Impute::Median | Impute::Constant, Some(fill)) => fill,
            _ => return Err(format!("field {name:?}: the value is missing")),
        },
    };
    if let Some([lo, hi]) = field.clip {
        x = x.clamp(lo, hi);
    }
    Ok(match field.scale {
        Scaling::None => x,
        Scaling::Standard => {
            let (mean, std) = (field.mean.unwrap_or(0.0), field.std.unwrap_or(1.0));
            (x - mean) / if std == 0.0 { 1.0 } else { std }
        }
        Scaling::MinMax => {
            let (min, max) = (field.min.unwrap_or(0.0), field.max.unwrap_or(1.0));
            let range = max - min;
            (x - min) / if range == 0.0 { 1.0 } else { range }
        }
    })
}

fn one_hot(field: &Field, value: &Value, out: &mut Vec<f64>) -> Result<(), String> {
    let name = &field.name;
    let category = match value {
        Value::String(s) => Some(s.as_str()),
        Value::Null => None,
        v => {
            return Err(format!(
                "field {name:?}: expected a category (a string), got {}",
                type_name(v)
            ));
        }
    };
    let category = match (category, field.impute) {
        (Some(c), _) => Some(c),
        (None, Impute::MostFrequent | Impute::Constant) => field.fill_category.as_deref(),
        (None, _) if field.unknown == Unknown::Bucket => None,
        (None, _) => return Err(format!("field {name:?}: the value is missing")),
    };
    let index = category.and_then(|c| field.categories.iter().position(|k| k == c));
    if index.is_none() && field.unknown == Unknown::Error {
        return Err(format!(
            "field {name:?}: unknown category {:?} (known: {:?})",
            category.unwrap_or_default(),
            field.categories
        ));
    }
    let start = out.len();
    out.resize(start + field.width(), 0.0);
    let hot = index.unwrap_or(field.categories.len());
    out[start + hot] = 1.0;
    Ok(())
}
