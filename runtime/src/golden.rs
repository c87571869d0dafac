//! Golden samples: inputs with expected outputs that a capsule must reproduce before it
//! goes live (at build time and on every node before a switch).

use capsule_format::manifest::GoldenSample;
use capsule_format::{DType, NamedTensor};

use crate::{Error, LoadedCapsule, Result};

/// Compares `actual` outputs with `expected` ones: same names, datatypes and shapes; floats
/// within `|a - e| <= tolerance * max(1, |e|)`, everything else exactly. Returns the first
/// difference.
pub fn compare(
    expected: &[NamedTensor],
    actual: &[NamedTensor],
    tolerance: f64,
) -> std::result::Result<(), String> {
    for e in expected {
        let a = actual
            .iter()
            .find(|a| a.name == e.name)
            .ok_or_else(|| format!("output {:?} is missing", e.name))?;
        if a.tensor.dtype != e.tensor.dtype {
            return Err(format!(
                "output {:?} is {} instead of {}",
                e.name, a.tensor.dtype, e.tensor.dtype
            ));
        }
        if a.tensor.shape != e.tensor.shape {
            return Err(format!(
                "output {:?} has shape {:?} instead of {:?}",
                e.name, a.tensor.shape, e.tensor.shape
            ));
        }
        if e.tensor.dtype == DType::Bytes {
            if a.tensor.data != e.tensor.data {
                return Err(format!("output {:?} differs", e.name));
            }
            continue;
        }
        let (av, ev) = (
            a.tensor.to_f64_vec().map_err(|x| x.to_string())?,
            e.tensor.to_f64_vec().map_err(|x| x.to_string())?,
        );
        let float = matches!(e.tensor.dtype, DType::F16 | DType::F32 | DType::F64);
        for (i, (x, y)) in av.iter().zip(&ev).enumerate() {
            let ok = if float {
                (x.is_nan() && y.is_nan())
                    || x == y
                    || (x - y).abs() <= tolerance * y.abs().max(1.0)
            } else {
                x == y
            };
            if !ok {
                return Err(format!(
                    "output {:?} element {i} is {x}, expected {y} (tolerance {tolerance})",
                    e.name
                ));
            }
        }
    }
    Ok(())
}

/// Runs one golden sample through a capsule.
pub fn check(capsule: &LoadedCapsule, sample: &GoldenSample) -> Result<()> {
    let mismatch = |reason: String| Error::GoldenMismatch {
        sample: sample.name.clone(),
        reason,
    };
    let outputs = capsule
        .infer(&sample.inputs)
        .map_err(|e| mismatch(e.to_string()))?;
    compare(&sample.outputs, &outputs, sample.tolerance).map_err(mismatch)
}
