//! The messages between the hub and its nodes (JSON over HTTP), and the canary bucket both
//! sides compute.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// A node's registration: who it is and its labels (rollouts target labels).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    /// Labels, e.g. `site = "berlin"`, `tier = "gpu-less"`.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A token the hub accepts, as `GET /api/v1/tokens` lists it: never the token, nor its
/// whole hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenInfo {
    /// `admin` or `node`.
    pub kind: String,
    /// Its name (`node:ID` for node tokens).
    pub name: String,
    /// The node it belongs to (empty for admin tokens).
    pub node_id: String,
    /// When it was issued (seconds since the epoch).
    pub created_at: i64,
    /// The first 8 hex digits of its SHA-256, to tell tokens of one node apart.
    pub hash_prefix: String,
}

/// One model version a node should run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredModel {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
    /// Its path in the targets metadata.
    pub path: String,
    /// The path of its model image in the targets metadata, when the hub has the split form:
    /// a node that has the guest code the image's signed target names downloads only the
    /// image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_path: Option<String>,
    /// SHA-256 of the capsule (the blob's address).
    pub sha256: String,
    /// Its size.
    pub length: u64,
}

/// What a node should run, as of a generation of the hub's state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesiredState {
    /// Increases with every change of the hub's state.
    pub generation: i64,
    /// The signed targets metadata (JSON text), which the node verifies against its pinned
    /// root before it trusts any entry of `models`.
    pub targets: Option<String>,
    /// The models and versions to run.
    pub models: Vec<DesiredModel>,
}

/// How one model version fared on a node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportedModel {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
    /// `serving`, `installing`, `verify_failed`, `download_failed`, `install_failed`,
    /// `load_failed`, `probe_failed`.
    pub state: String,
    /// Why, when it failed.
    #[serde(default)]
    pub detail: String,
}

/// A node's report after it applied a desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The generation it applied.
    pub generation: i64,
    /// Per model version.
    pub models: Vec<ReportedModel>,
}

impl ReportedModel {
    /// Whether the failure may pass by itself (the network, the hub's blob store, a full or
    /// failing disk on the node), so the same state is worth applying again later. The others
    /// are decided by the bytes and the signatures, and change only with a new state.
    pub fn transient(&self) -> bool {
        matches!(self.state.as_str(), "download_failed" | "install_failed")
    }

    /// Whether the state is a failure that counts against a rollout.
    pub fn failed(&self) -> bool {
        matches!(
            self.state.as_str(),
            "verify_failed" | "download_failed" | "load_failed" | "probe_failed"
        )
    }
}

/// `POST /api/v1/rollouts`: a staged rollout to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewRollout {
    /// Model.
    pub model: String,
    /// The version to roll out.
    pub version: String,
    /// Node labels a node must all have.
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// Percentages of the matching nodes, step by step (increasing, in 1..=100).
    #[serde(default = "default_steps")]
    pub steps: Vec<u32>,
    /// Failure rate (failed / assigned nodes) above which the rollout aborts itself.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: f64,
    /// Seconds between automatic steps (0: manual).
    #[serde(default)]
    pub step_interval_s: i64,
    /// Promote (or abort) by itself on the canary's health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_promote: Option<AutoPromote>,
}

fn default_steps() -> Vec<u32> {
    vec![10, 50, 100]
}

fn default_failure_threshold() -> f64 {
    0.2
}

/// When the hub promotes a rollout by itself, judged on what its version's nodes reported
/// since the rollout started: enough requests with an error rate at or below
/// `max_error_rate` and, when `min_accuracy` is set, enough feedback labels with an accuracy
/// at or above it, for at least `hold_s` seconds. With enough evidence that either is worse,
/// the hub aborts the rollout instead (its nodes go back to the production version).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AutoPromote {
    /// Fewest requests served by the version before any verdict.
    pub min_requests: u64,
    /// Highest failed / all requests that still promotes.
    pub max_error_rate: f64,
    /// Lowest live accuracy (from feedback labels) that still promotes; none: not judged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_accuracy: Option<f64>,
    /// Fewest labeled predictions before accuracy is judged.
    pub min_labels: u64,
    /// Seconds the rollout runs before it may be promoted.
    pub hold_s: i64,
}

impl Default for AutoPromote {
    fn default() -> Self {
        AutoPromote {
            min_requests: 100,
            max_error_rate: 0.01,
            min_accuracy: None,
            min_labels: 20,
            hold_s: 60,
        }
    }
}

impl AutoPromote {
    /// Why the policy cannot be used, if it cannot.
    pub fn problem(&self) -> Option<&'static str> {
        if self.min_requests == 0 {
            return Some("auto_promote.min_requests: at least 1");
        }
        if !(0.0..=1.0).contains(&self.max_error_rate) {
            return Some("auto_promote.max_error_rate: a rate in 0..=1");
        }
        if self.min_accuracy.is_some_and(|a| !(0.0..=1.0).contains(&a)) {
            return Some("auto_promote.min_accuracy: a rate in 0..=1");
        }
        if self.min_accuracy.is_some() && self.min_labels == 0 {
            return Some("auto_promote.min_labels: at least 1 when min_accuracy is set");
        }
        if self.hold_s < 0 {
            return Some("auto_promote.hold_s: not negative");
        }
        None
    }
}

/// The canary bucket of a node in a rollout, 0..100: a stable hash of the rollout and the
/// node id, so a rollout at P% reaches the nodes whose bucket is below P, and growing P only
/// adds nodes.
pub fn bucket(rollout: &str, node: &str) -> u32 {
    let digest = Sha256::digest(format!("{rollout}/{node}").as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    (u64::from_be_bytes(first) % 100) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        assert_eq!(bucket("r1", "node-a"), bucket("r1", "node-a"));
        let mut counts = [0u32; 10];
        for i in 0..1000 {
            counts[(bucket("r1", &format!("node-{i}")) / 10) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (60..=140).contains(&c)),
            "{counts:?}"
        );
    }
}
