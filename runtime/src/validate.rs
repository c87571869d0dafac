//! Checks a request against the manifest signature before the guest runs (design section 3:
//! the host validates every request; the guest then only sees well-formed tensors).

use std::collections::HashMap;

use capsule_format::{CapsuleManifest, DType, Dim, NamedTensor};

use crate::{Error, Result};

/// Checks names, datatypes, ranks, fixed dims, consistent and non-zero symbolic dims, data
/// lengths and the total size of a request.
pub fn validate_request(
    manifest: &CapsuleManifest,
    inputs: &[NamedTensor],
    max_bytes: u64,
) -> Result<()> {
    let total = inputs.iter().fold(0u64, |acc, t| {
        acc.saturating_add(t.tensor.data.len() as u64)
    });
    if total > max_bytes {
        return Err(Error::RequestTooLarge {
            size: total,
            limit: max_bytes,
        });
    }
    let declared: Vec<Declared<'_>> = inputs
        .iter()
        .map(|t| Declared {
            name: &t.name,
            dtype: t.tensor.dtype,
            shape: &t.tensor.shape,
        })
        .collect();
    check_signature(manifest, &declared)?;
    for t in inputs {
        t.tensor
            .validate()
            .map_err(|e| Error::BadRequest(format!("input {:?}: {e}", t.name)))?;
    }
    Ok(())
}

/// What a request says of one input before its elements are decoded.
#[derive(Debug, Clone, Copy)]
pub struct Declared<'a> {
    /// The input's name.
    pub name: &'a str,
    /// Its datatype.
    pub dtype: DType,
    /// Its shape.
    pub shape: &'a [u64],
}

/// The part of [`validate_request`] that needs no element: names, datatypes, ranks, fixed
/// dims, consistent and non-zero symbolic dims. A server runs it on what a request declares
/// before decoding its elements, so a request for the wrong shape costs no tensor.
pub fn check_signature(manifest: &CapsuleManifest, inputs: &[Declared<'_>]) -> Result<()> {
    let declared: Vec<&str> = manifest.inputs.iter().map(|i| i.name.as_str()).collect();
    for (i, t) in inputs.iter().enumerate() {
        if manifest.input(t.name).is_none() {
            return Err(Error::BadRequest(format!(
                "unknown input {:?}; the capsule's inputs are {declared:?}",
                t.name
            )));
        }
        if inputs[..i].iter().any(|o| o.name == t.name) {
            return Err(Error::BadRequest(format!(
                "input {:?} is given twice",
                t.name
            )));
        }
    }
    let mut symbols: HashMap<&str, u64> = HashMap::new();
    for spec in &manifest.inputs {
        let t = inputs
            .iter()
            .find(|t| t.name == spec.name)
            .ok_or_else(|| Error::BadRequest(format!("missing input {:?}", spec.name)))?;
        if t.dtype != spec.dtype {
            return Err(Error::BadRequest(format!(
                "input {:?} has datatype {}, the capsule expects {}",
                spec.name, t.dtype, spec.dtype
            )));
        }
        let expected: Vec<String> = spec.shape.iter().map(ToString::to_string).collect();
        let mismatch = || {
            Error::BadRequest(format!(
                "input {:?} has shape {:?}, the capsule expects [{}]",
                spec.name,
                t.shape,
                expected.join(", ")
            ))
        };
        if t.shape.len() != spec.shape.len() {
            return Err(mismatch());
        }
        for (dim, &actual) in spec.shape.iter().zip(t.shape) {
            match dim {
                Dim::Fixed(n) if *n != actual => return Err(mismatch()),
                Dim::Fixed(_) => {}
                // A zero-sized tensor reaches tract's kernels with empty arrays, which some of
                // them do not survive (a broadcast of [1, 0] panicked the guest). Only a
                // signature that fixes a dimension to 0 allows it.
                Dim::Symbolic(s) if actual == 0 => {
                    return Err(Error::BadRequest(format!(
                        "input {:?}: dimension {s} is 0; a symbolic dimension must be at least 1",
                        spec.name
                    )));
                }
                Dim::Symbolic(s) if s.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                    if let Some(&bound) = symbols.get(s.as_str()) {
                        if bound != actual {
                            return Err(Error::BadRequest(format!(
                                "input {:?}: dimension {s} is {actual} here but {bound} in another input",
                                spec.name
                            )));
                        }
                    } else {
                        symbols.insert(s, actual);
                    }
                }
                Dim::Symbolic(_) => {}
            }
        }
    }
    Ok(())
}
