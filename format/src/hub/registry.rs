//! The registry's messages: blobs, signed metadata, models, versions, comparisons, aliases.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::UnknownName;

use crate::telemetry::ReferenceStats;

named_enum! {
    /// What a blob of the hub is.
    BlobKind {
        /// A single-file capsule.
        Capsule = "capsule",
        /// A model image of the split form.
        Image = "image",
        /// A guest code module of the split form.
        Code = "code",
    }
}

/// `POST /api/v1/blobs`: the blob stored (content-addressed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobStored {
    /// Its SHA-256 (hex), its address.
    pub sha256: String,
    /// Its length.
    pub length: u64,
    /// What it is.
    pub kind: BlobKind,
}

/// `POST /api/v1/models/{model}/versions`: a version from an uploaded capsule or model image
/// (the version is its manifest's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewVersion {
    /// The uploaded blob.
    pub sha256: String,
    /// Where it came from (dataset hash, parameters, code revision, ...): the publisher's JSON.
    #[serde(default)]
    pub provenance: serde_json::Value,
    /// Its metrics (name to value): the publisher's JSON.
    #[serde(default)]
    pub metrics: serde_json::Value,
}

/// `PUT /api/v1/models/{model}/aliases/{alias}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetAlias {
    /// The version the alias points at.
    pub version: String,
}

/// `POST /api/v1/metadata/{role}`: what was stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataStored {
    /// `root` or `targets`.
    pub role: String,
    /// Its version.
    pub version: i64,
}

/// The blobs of a version's split form (`capsule_format::split`): the model image and the
/// code module it needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitBlobs {
    /// SHA-256 of the model image.
    pub image_sha256: String,
    /// Its size.
    pub image_length: i64,
    /// SHA-256 of the code module.
    pub code_sha256: String,
    /// Its size.
    pub code_length: i64,
}

/// What the registry keeps of a version's manifest (the capsule itself holds all of it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ManifestSummary {
    /// Its inputs (`name: dtype[shape]`).
    pub inputs: Vec<String>,
    /// Its outputs.
    pub outputs: Vec<String>,
    /// Class labels.
    pub labels: Vec<String>,
    /// The model card's description.
    pub description: String,
    /// How many golden samples it carries.
    pub golden_samples: usize,
    /// The training data's statistics that drift is measured against.
    pub reference: Option<ReferenceStats>,
    /// When it was built (Unix seconds).
    pub created_at_unix: u64,
}

/// A registered model version (`POST /api/v1/models/{model}/versions`,
/// `GET /api/v1/models/{model}/versions/{version}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// SHA-256 of the capsule (its single-file form).
    pub sha256: String,
    /// Its size.
    pub length: i64,
    /// What the registry keeps of its manifest.
    pub manifest: ManifestSummary,
    /// Provenance: the publisher's JSON (dataset hash, training parameters, code revision),
    /// with the source model's and the guest's hashes added.
    pub provenance: serde_json::Value,
    /// Metrics (experiment tracking): the publisher's JSON, or the model card's metrics.
    pub metrics: serde_json::Value,
    /// Registered at (Unix seconds).
    pub created_at: i64,
    /// Who registered it.
    pub created_by: String,
    /// The split form (versions registered before it existed have none).
    pub split: Option<SplitBlobs>,
}

/// One model in `GET /api/v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSummary {
    /// Its name.
    pub name: String,
    /// Its versions, oldest first.
    pub versions: Vec<String>,
    /// Alias to version (`production`, ...).
    pub aliases: BTreeMap<String, String>,
}

/// `GET /api/v1/models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelList {
    /// Every model, by name.
    pub models: Vec<ModelSummary>,
}

/// `GET /api/v1/models/{model}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDetail {
    /// Its name.
    pub name: String,
    /// Its versions, oldest first.
    pub versions: Vec<VersionInfo>,
    /// Alias to version.
    pub aliases: BTreeMap<String, String>,
}

/// `GET /api/v1/models/{model}/compare?a=A&b=B`: two versions side by side.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// Version A.
    pub a: VersionInfo,
    /// Version B.
    pub b: VersionInfo,
    /// B's metric minus A's, for every numeric metric both have.
    pub metrics_diff: BTreeMap<String, f64>,
}

impl Comparison {
    /// Compares two versions.
    pub fn new(a: VersionInfo, b: VersionInfo) -> Comparison {
        let mut metrics_diff = BTreeMap::new();
        if let (Some(ma), Some(mb)) = (a.metrics.as_object(), b.metrics.as_object()) {
            for (k, vb) in mb {
                if let (Some(x), Some(y)) =
                    (ma.get(k).and_then(serde_json::Value::as_f64), vb.as_f64())
                {
                    metrics_diff.insert(k.clone(), y - x);
                }
            }
        }
        Comparison { a, b, metrics_diff }
    }
}

/// `PUT /api/v1/models/{model}/aliases/{alias}`: the alias as set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AliasSet {
    /// Model.
    pub model: String,
    /// Alias.
    pub alias: String,
    /// The version it points at now.
    pub version: String,
}
