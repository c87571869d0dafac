//! Checks a request against the manifest signature before the guest runs (design section 3:
//! the host validates every request; the guest then only sees well-formed tensors).

use capsule_format::{CapsuleManifest, NamedTensor};

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

pub use capsule_format::request::Declared;

/// The signature check of [`capsule_format::request::check_signature`], as this crate's
/// `BadRequest`.
pub fn check_signature(manifest: &CapsuleManifest, inputs: &[Declared<'_>]) -> Result<()> {
    capsule_format::request::check_signature(manifest, inputs)
        .map_err(|e| Error::BadRequest(e.to_string()))
}
