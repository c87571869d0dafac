//! The capsule manifest: what a capsule is, what it accepts and what it promises.
//!
//! Stored bincode-encoded in the `capsule.manifest` custom section behind an 8-byte header
//! (`CAPM` + little-endian format version), so a reader can refuse a newer format before it
//! tries to decode it.

use serde::{Deserialize, Serialize};

use crate::{DType, Error, NamedTensor, Result, wire};

/// Version of the manifest encoding written by this build.
pub const FORMAT_VERSION: u32 = 5;

/// The oldest manifest encoding still read, so nodes keep serving the capsules they have
/// across an upgrade. Each older version lacks only fields at the end: version 4 lacks
/// [`CapsuleManifest::host_kernels`] (read as [`HostKernels::None`]), version 3 also
/// [`CapsuleManifest::numerics`] (read as [`Numerics::Deterministic`]), which is what every
/// capsule of those formats is.
pub const OLDEST_FORMAT_VERSION: u32 = 3;

/// Largest manifest section a reader accepts.
pub const MAX_MANIFEST_BYTES: usize = 16 << 20;

/// Most a manifest may claim while it is decoded (every string and sequence counts its length
/// times its element's size): four times [`MAX_MANIFEST_BYTES`]. With the general message
/// limit (1 GiB), a 16 MiB manifest of empty strings would decode into 384 MiB of `String`s.
pub const MAX_MANIFEST_DECODED: usize = 4 * MAX_MANIFEST_BYTES;

const MAGIC: &[u8; 4] = b"CAPM";

/// One dimension of a declared tensor shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    /// A dimension whose size is fixed by the model.
    Fixed(u64),
    /// A named symbolic dimension (e.g. a batch size `N`): any size, the same everywhere
    /// the name appears in one request.
    Symbolic(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Fixed(n) => write!(f, "{n}"),
            Dim::Symbolic(s) => f.write_str(s),
        }
    }
}

/// Name, datatype and shape of a model input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    /// The input or output name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Declared shape.
    pub shape: Vec<Dim>,
}

impl std::fmt::Display for TensorSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let dims: Vec<String> = self.shape.iter().map(ToString::to_string).collect();
        write!(f, "{}: {}[{}]", self.name, self.dtype, dims.join(", "))
    }
}

/// The model a capsule was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceModel {
    /// Source format (`"onnx"`).
    pub format: String,
    /// SHA-256 of the source model file, lowercase hex.
    pub sha256: String,
    /// Size of the source model file.
    pub size_bytes: u64,
}

/// A measured quality metric of the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    /// Metric name (`accuracy`, `f1`, ...).
    pub name: String,
    /// Its value.
    pub value: f64,
    /// The evaluation set it was measured on.
    #[serde(default)]
    pub dataset: String,
}

/// The model card: what the model is for and how good it is. Authored as TOML.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    /// What the model does.
    #[serde(default)]
    pub description: String,
    /// What it is meant to be used for.
    #[serde(default)]
    pub intended_use: String,
    /// Known limitations.
    #[serde(default)]
    pub limitations: String,
    /// Summary of the training data.
    #[serde(default)]
    pub training_data: String,
    /// SHA-256 of the training data set, when known.
    #[serde(default)]
    pub training_data_sha256: String,
    /// Who owns the model.
    #[serde(default)]
    pub owner: String,
    /// Measured metrics.
    #[serde(default)]
    pub metrics: Vec<Metric>,
}

/// An input with its expected outputs, checked on every node before a version goes live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GoldenSample {
    /// Sample name (its file name).
    pub name: String,
    /// Inputs.
    pub inputs: Vec<NamedTensor>,
    /// Expected outputs (a subset of the model's outputs).
    pub outputs: Vec<NamedTensor>,
    /// Allowed absolute difference per element (relative to 1 for large magnitudes:
    /// `|a - b| <= tolerance * max(1, |b|)`).
    pub tolerance: f64,
}

/// Resource limits the capsule declares for itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Largest linear memory the guest may grow to.
    pub max_memory_bytes: u64,
    /// Time budget of one inference call, in milliseconds.
    pub time_budget_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory_bytes: 1 << 30,
            time_budget_ms: 10_000,
        }
    }
}

/// How the capsule's floating-point arithmetic may round.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Numerics {
    /// `simd128` only: every engine on every machine computes the same bits (nodes and
    /// browsers agree exactly). The default build.
    #[default]
    Deterministic,
    /// `relaxed-simd` as well: matrix products use `f32x4.relaxed_madd`, a fused
    /// multiply-add where the machine has one. Faster, and its results may differ between
    /// machines and engines within the golden samples' tolerance.
    RelaxedSimd,
}

impl std::fmt::Display for Numerics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Numerics::Deterministic => "deterministic",
            Numerics::RelaxedSimd => "relaxed-simd",
        })
    }
}

/// Whether the capsule's code can hand dense products to the node's native kernels (the
/// `capsule_kernels` import, ARCHITECTURE.md "Host kernels"). A capsule that can still
/// carries its own wasm kernels and uses them wherever the import answers "unavailable".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HostKernels {
    /// No import: everything runs in wasm.
    #[default]
    None,
    /// Version 1 of the import: `abi_version() -> i32` and
    /// `f32_mmm_8x8(k, a, b, out)`.
    V1,
    /// Version 2: version 1's functions and `f32_mmm_block(call)`, a block of tiles with its
    /// epilogue in one call ([`crate::kernels::BlockCall`]).
    V2,
}

impl HostKernels {
    /// The version the node answers the guest's `abi_version()` with (0: none).
    pub fn abi(self) -> i32 {
        match self {
            HostKernels::None => 0,
            HostKernels::V1 => 1,
            HostKernels::V2 => 2,
        }
    }

    /// The functions of [`crate::HOST_KERNELS_MODULE`] a capsule of this version may import.
    pub fn imports(self) -> &'static [&'static str] {
        let all = &crate::HOST_KERNELS_IMPORTS;
        match self {
            HostKernels::None => &[],
            HostKernels::V1 => &all[..2],
            HostKernels::V2 => all,
        }
    }
}

impl std::fmt::Display for HostKernels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostKernels::None => "none",
            HostKernels::V1 => "capsule_kernels v1",
            HostKernels::V2 => "capsule_kernels v2",
        })
    }
}

/// Everything a capsule says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapsuleManifest {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: semver::Version,
    /// Guest ABI version the capsule's code implements.
    pub abi_version: u32,
    /// Seconds since the Unix epoch when the capsule was built.
    pub created_at_unix: u64,
    /// Version of the `capsule` builder.
    pub builder_version: String,
    /// SHA-256 of the guest build the capsule was made from (its code, before the snapshot).
    pub guest_sha256: String,
    /// The source model.
    pub source: SourceModel,
    /// What requests carry, in order: the model's inputs, or with a pipeline, its raw
    /// inputs and the model inputs it does not feed.
    pub inputs: Vec<TensorSpec>,
    /// What responses carry, in order: the model's outputs, or the pipeline's.
    pub outputs: Vec<TensorSpec>,
    /// The model's own inputs (as `inputs` without a pipeline).
    pub model_inputs: Vec<TensorSpec>,
    /// The model's own outputs (as `outputs` without a pipeline).
    pub model_outputs: Vec<TensorSpec>,
    /// Preprocessing and postprocessing run inside the guest around the model.
    pub pipeline: Option<crate::Pipeline>,
    /// Class labels, index order.
    pub labels: Vec<String>,
    /// The model card.
    pub card: ModelCard,
    /// Golden samples.
    pub golden: Vec<GoldenSample>,
    /// Limits.
    pub limits: Limits,
    /// Training-set statistics of the input features, for drift detection.
    pub reference: Option<crate::telemetry::ReferenceStats>,
    /// How the guest's arithmetic rounds (format version 4).
    pub numerics: Numerics,
    /// Whether the code can use the node's native kernels (format version 5; the last field,
    /// so that a version 4 payload is a version 5 one without it).
    pub host_kernels: HostKernels,
}

impl CapsuleManifest {
    /// Encodes the manifest as the content of the `capsule.manifest` section.
    pub fn to_section_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&wire::encode(self, "manifest")?);
        if out.len() > MAX_MANIFEST_BYTES {
            return Err(Error::TooLarge {
                what: "manifest",
                size: out.len() as u64,
                limit: MAX_MANIFEST_BYTES as u64,
            });
        }
        Ok(out)
    }

    /// Decodes the content of a `capsule.manifest` section.
    pub fn from_section_bytes(bytes: &[u8]) -> Result<CapsuleManifest> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(Error::TooLarge {
                what: "manifest",
                size: bytes.len() as u64,
                limit: MAX_MANIFEST_BYTES as u64,
            });
        }
        let Some((header, payload)) = bytes.split_first_chunk::<8>() else {
            return Err(Error::Decode {
                what: "manifest",
                reason: "shorter than its header".into(),
            });
        };
        if &header[..4] != MAGIC {
            return Err(Error::Decode {
                what: "manifest",
                reason: "bad magic (not a capsule manifest)".into(),
            });
        }
        let version = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        match version {
            FORMAT_VERSION => wire::decode_limited::<MAX_MANIFEST_DECODED, _>(payload, "manifest"),
            // Older versions lack only their last fields: append their encodings (variant 0,
            // `Deterministic` and `None`, is one byte each) and decode as the current version.
            OLDEST_FORMAT_VERSION..FORMAT_VERSION => {
                let missing = (FORMAT_VERSION - version) as usize;
                let mut upgraded = Vec::with_capacity(payload.len() + missing);
                upgraded.extend_from_slice(payload);
                upgraded.resize(payload.len() + missing, 0);
                wire::decode_limited::<MAX_MANIFEST_DECODED, _>(&upgraded, "manifest")
            }
            _ => Err(Error::UnsupportedFormatVersion {
                found: version,
                supported: FORMAT_VERSION,
            }),
        }
    }

    /// The declared input shapes, as the builder's `--input-shape` overrides: loading the
    /// source model with them reproduces the capsule's signature (the native baseline).
    pub fn input_shapes(&self) -> Vec<crate::wire::InputShape> {
        self.model_inputs
            .iter()
            .map(|i| crate::wire::InputShape {
                name: i.name.clone(),
                shape: i.shape.clone(),
            })
            .collect()
    }

    /// The declared input with this name.
    pub fn input(&self, name: &str) -> Option<&TensorSpec> {
        self.inputs.iter().find(|i| i.name == name)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::Tensor;

    /// A manifest section of a few bytes whose first string claims 900 MB is refused by the
    /// manifest's decode limit ([`MAX_MANIFEST_DECODED`]) before anything is allocated; under
    /// the general message limit (1 GiB) the claim was accepted, and only the missing bytes
    /// stopped it.
    #[test]
    fn a_manifest_cannot_claim_past_its_decoded_limit() {
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        // bincode's varint: 252, then a little-endian u32 (the name's length).
        bytes.push(252);
        bytes.extend_from_slice(&900_000_000u32.to_le_bytes());
        bytes.extend_from_slice(b"abc");
        match CapsuleManifest::from_section_bytes(&bytes) {
            Err(Error::Decode { reason, .. }) => assert_eq!(reason, "LimitExceeded"),
            other => panic!("expected a decode error, got {other:?}"),
        }
        let under_the_message_limit =
            wire::decode::<CapsuleManifest>(&bytes[8..], "manifest").unwrap_err();
        assert!(
            !under_the_message_limit
                .to_string()
                .contains("LimitExceeded"),
            "{under_the_message_limit}"
        );
    }

    pub(crate) fn sample() -> CapsuleManifest {
        CapsuleManifest {
            name: "digits".into(),
            version: semver::Version::new(1, 2, 3),
            abi_version: 1,
            created_at_unix: 1_700_000_000,
            builder_version: "0.1.0".into(),
            guest_sha256: "ab".repeat(32),
            source: SourceModel {
                format: "onnx".into(),
                sha256: "cd".repeat(32),
                size_bytes: 42,
            },
            inputs: vec![TensorSpec {
                name: "x".into(),
                dtype: DType::F32,
                shape: vec![Dim::Symbolic("N".into()), Dim::Fixed(64)],
            }],
            outputs: vec![TensorSpec {
                name: "y".into(),
                dtype: DType::I64,
                shape: vec![Dim::Symbolic("N".into())],
            }],
            model_inputs: vec![],
            model_outputs: vec![],
            pipeline: None,
            labels: vec!["zero".into(), "one".into()],
            card: ModelCard {
                owner: "ml-team".into(),
                ..ModelCard::default()
            },
            golden: vec![GoldenSample {
                name: "s0".into(),
                inputs: vec![NamedTensor {
                    name: "x".into(),
                    tensor: Tensor::from_f32(vec![1, 1], &[0.5]).unwrap(),
                }],
                outputs: vec![],
                tolerance: 1e-4,
            }],
            limits: Limits::default(),
            reference: None,
            numerics: Numerics::Deterministic,
            host_kernels: HostKernels::None,
        }
    }

    #[test]
    fn section_round_trip() {
        for numerics in [Numerics::Deterministic, Numerics::RelaxedSimd] {
            for host_kernels in [HostKernels::None, HostKernels::V1, HostKernels::V2] {
                let m = CapsuleManifest {
                    numerics,
                    host_kernels,
                    ..sample()
                };
                let bytes = m.to_section_bytes().unwrap();
                assert_eq!(&bytes[..8], b"CAPM\x05\x00\x00\x00");
                assert_eq!(CapsuleManifest::from_section_bytes(&bytes).unwrap(), m);
            }
        }
    }

    /// A version 4 manifest (before `host_kernels`) is the version 5 encoding without its
    /// last byte, a version 3 one (before `numerics`) without its last two: both read as a
    /// deterministic capsule without host kernels.
    #[test]
    fn older_manifests_still_read() {
        let m = sample();
        let v5 = m.to_section_bytes().unwrap();
        assert_eq!(
            &v5[v5.len() - 2..],
            &[0, 0],
            "Deterministic and None are encoded as one zero byte each"
        );
        for (version, cut) in [(4u8, 1), (3, 2)] {
            let mut old = v5[..v5.len() - cut].to_vec();
            old[4] = version;
            assert_eq!(CapsuleManifest::from_section_bytes(&old).unwrap(), m);
            // The whole current payload under an older header has bytes too many.
            let mut mislabelled = v5.clone();
            mislabelled[4] = version;
            assert!(CapsuleManifest::from_section_bytes(&mislabelled).is_err());
        }
    }

    #[test]
    fn refuses_bad_headers_and_truncation() {
        let bytes = sample().to_section_bytes().unwrap();
        for version in [2, 6] {
            let mut other = bytes.clone();
            other[4] = version;
            assert!(matches!(
                CapsuleManifest::from_section_bytes(&other),
                Err(Error::UnsupportedFormatVersion {
                    found,
                    supported: 5
                }) if found == u32::from(version)
            ));
        }
        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(
            CapsuleManifest::from_section_bytes(&bad),
            Err(Error::Decode { .. })
        ));
        for cut in [0, 7, 8, 20, bytes.len() - 1] {
            assert!(
                CapsuleManifest::from_section_bytes(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
    }
}
