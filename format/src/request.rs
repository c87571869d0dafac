//! A request's inputs checked against a capsule's signature: the one check the edge node
//! (before decoding elements), the runtime (before the guest runs) and the browser SDK's core
//! all run, so a request one of them accepts is one all of them accept.

use std::collections::HashMap;

use crate::{CapsuleManifest, DType, Dim, Error, Result};

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

/// Checks what a request declares of its inputs against the capsule's signature: names (each
/// once, none unknown, none missing), datatypes, ranks, fixed dimensions, and symbolic
/// dimensions at least 1 and equal wherever one symbol appears. It needs no element, so a
/// server runs it before decoding them and a request for the wrong shape costs no tensor.
pub fn check_signature(manifest: &CapsuleManifest, inputs: &[Declared<'_>]) -> Result<()> {
    let declared: Vec<&str> = manifest.inputs.iter().map(|i| i.name.as_str()).collect();
    for (i, t) in inputs.iter().enumerate() {
        if manifest.input(t.name).is_none() {
            return Err(Error::Signature(format!(
                "unknown input {:?}; the capsule's inputs are {declared:?}",
                t.name
            )));
        }
        if inputs[..i].iter().any(|o| o.name == t.name) {
            return Err(Error::Signature(format!(
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
            .ok_or_else(|| Error::Signature(format!("missing input {:?}", spec.name)))?;
        if t.dtype != spec.dtype {
            return Err(Error::Signature(format!(
                "input {:?} has datatype {}, the capsule expects {}",
                spec.name, t.dtype, spec.dtype
            )));
        }
        let expected: Vec<String> = spec.shape.iter().map(ToString::to_string).collect();
        let mismatch = || {
            Error::Signature(format!(
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
                    return Err(Error::Signature(format!(
                        "input {:?}: dimension {s} is 0; a symbolic dimension must be at least 1",
                        spec.name
                    )));
                }
                Dim::Symbolic(s) if s.chars().all(|c| c.is_alphanumeric() || c == '_') => {
                    if let Some(&bound) = symbols.get(s.as_str()) {
                        if bound != actual {
                            return Err(Error::Signature(format!(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TensorSpec;

    /// Every rule, as the node, the runtime and the browser SDK apply it.
    #[test]
    fn requests_are_checked_against_the_signature() {
        let mut manifest = crate::manifest::tests::sample(); // x: [N, 64] FP32
        manifest.inputs.push(TensorSpec {
            name: "mask".into(),
            dtype: DType::U8,
            shape: vec![Dim::Symbolic("N".into())],
        });
        let x = |n: u64| Declared {
            name: "x",
            dtype: DType::F32,
            shape: Box::leak(vec![n, 64].into_boxed_slice()),
        };
        let mask = |n: u64| Declared {
            name: "mask",
            dtype: DType::U8,
            shape: Box::leak(vec![n].into_boxed_slice()),
        };
        assert!(check_signature(&manifest, &[x(3), mask(3)]).is_ok());
        assert!(
            check_signature(&manifest, &[mask(2), x(2)]).is_ok(),
            "any order"
        );
        let f64_x = Declared {
            dtype: DType::F64,
            ..x(1)
        };
        let wide = Declared {
            shape: &[1, 63],
            ..x(1)
        };
        let flat = Declared {
            shape: &[64],
            ..x(1)
        };
        let cases: Vec<(Vec<Declared<'_>>, &str)> = vec![
            (
                vec![x(3), mask(4)],
                "input \"mask\": dimension N is 4 here but 3 in another input",
            ),
            (vec![x(3), x(3), mask(3)], "input \"x\" is given twice"),
            (
                vec![x(0), mask(0)],
                "input \"x\": dimension N is 0; a symbolic dimension must be at least 1",
            ),
            (vec![x(3)], "missing input \"mask\""),
            (
                vec![f64_x, mask(1)],
                "input \"x\" has datatype FP64, the capsule expects FP32",
            ),
            (
                vec![wide, mask(1)],
                "input \"x\" has shape [1, 63], the capsule expects [N, 64]",
            ),
            (
                vec![flat, mask(1)],
                "input \"x\" has shape [64], the capsule expects [N, 64]",
            ),
            (
                vec![
                    x(1),
                    mask(1),
                    Declared {
                        name: "extra",
                        ..x(1)
                    },
                ],
                "unknown input \"extra\"; the capsule's inputs are [\"x\", \"mask\"]",
            ),
        ];
        for (inputs, want) in cases {
            let e = check_signature(&manifest, &inputs).unwrap_err();
            assert!(matches!(e, Error::Signature(_)), "{e:?}");
            assert_eq!(e.to_string(), want);
        }
    }
}
