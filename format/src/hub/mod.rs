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

/// Defines a string-valued enum: serde's snake_case names, `as_str`, `Display`, `FromStr`
/// (the database stores the same names) and `ALL`.
macro_rules! named_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vmeta])* #[serde(rename = $text)] $variant,)+
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// Its name on the wire and in the database.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<$name, UnknownName> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownName {
                        what: stringify!($name),
                        name: s.chars().take(64).collect(),
                        expected: &[$($text),+],
                    }),
                }
            }
        }
    };
}

mod monitoring;
mod registry;

pub use monitoring::*;
pub use registry::*;

/// A name that is none of an enum's values.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {name:?} (expected one of {expected:?})")]
pub struct UnknownName {
    /// The enum.
    pub what: &'static str,
    /// The name given (at most 64 characters of it).
    pub name: String,
    /// The names it knows.
    pub expected: &'static [&'static str],
}

named_enum! {
    /// What a token may do.
    Role {
        /// Everything: publish, roll out, read the fleet, issue and revoke tokens.
        Admin = "admin",
        /// One node's calls: register, long-poll, report, ship telemetry and feedback.
        Node = "node",
    }
}

named_enum! {
    /// Where a rollout is.
    RolloutState {
        /// Its version reaches `percent` of the matching nodes.
        Active = "active",
        /// Its version is production.
        Promoted = "promoted",
        /// Stopped; its nodes went back to the production version.
        Aborted = "aborted",
        /// Production went back to the version before it.
        RolledBack = "rolled_back",
    }
}

named_enum! {
    /// What an admin asks of a rollout (`POST /api/v1/rollouts/{id}/{action}`).
    RolloutAction {
        /// To the next percentage.
        Step = "step",
        /// Make its version production.
        Promote = "promote",
        /// Stop it; its nodes go back to the production version.
        Abort = "abort",
        /// Production back to the version before it.
        Rollback = "rollback",
    }
}

named_enum! {
    /// How one model version fares on a node.
    ModelState {
        /// Installed, probed and answering.
        Serving = "serving",
        /// Being downloaded or installed.
        Installing = "installing",
        /// Its bytes or signatures did not verify.
        VerifyFailed = "verify_failed",
        /// It could not be downloaded.
        DownloadFailed = "download_failed",
        /// It could not be written to the node's disk.
        InstallFailed = "install_failed",
        /// The runtime refused to load it.
        LoadFailed = "load_failed",
        /// Its golden samples did not reproduce.
        ProbeFailed = "probe_failed",
        /// A state this release does not know (from a node of a newer release).
        #[serde(other)]
        Other = "other",
    }
}

impl ModelState {
    /// Whether the failure may pass by itself (the network, the hub's blob store, a full or
    /// failing disk on the node), so the same state is worth applying again later. The others
    /// are decided by the bytes and the signatures, and change only with a new state.
    pub fn transient(self) -> bool {
        matches!(self, ModelState::DownloadFailed | ModelState::InstallFailed)
    }

    /// Whether the state is a failure that counts against a rollout.
    pub fn failed(self) -> bool {
        matches!(
            self,
            ModelState::VerifyFailed
                | ModelState::DownloadFailed
                | ModelState::LoadFailed
                | ModelState::ProbeFailed
        )
    }
}

/// A token the hub accepts, as `GET /api/v1/tokens` lists it: never the token, nor its
/// whole hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenInfo {
    /// What it may do.
    pub kind: Role,
    /// Its name (`node:ID` for node tokens).
    pub name: String,
    /// The node it belongs to (empty for admin tokens).
    pub node_id: String,
    /// When it was issued (seconds since the epoch).
    pub created_at: i64,
    /// The first 8 hex digits of its SHA-256, to tell tokens of one node apart.
    pub hash_prefix: String,
}

/// `GET /api/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenList {
    /// Every token, oldest first.
    pub tokens: Vec<TokenInfo>,
}

/// `POST /api/v1/tokens`: a new admin token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Its name, the actor of its calls in the audit log: 1 to 64 letters, digits, `-`, `_`,
    /// `.`, `@`, `:`; not `hub`, not `node:...`.
    pub name: String,
}

impl NewToken {
    /// Why the name cannot be used, if it cannot.
    pub fn problem(&self) -> Option<String> {
        let n = &self.name;
        if n.is_empty()
            || n.len() > 64
            || !n
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@' | ':'))
        {
            return Some(format!(
                "token name {:?}: 1 to 64 letters, digits, - _ . @ :",
                n.chars().take(64).collect::<String>()
            ));
        }
        if n == "hub" || n.starts_with("node:") {
            return Some(format!(
                "token name {n:?}: `hub` and `node:...` name the hub's own actors"
            ));
        }
        None
    }
}

/// A token as issued (`POST /api/v1/tokens`, `POST /api/v1/nodes/{id}/token`): the only time
/// the hub shows it; it keeps only its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuedToken {
    /// What it may do.
    pub kind: Role,
    /// Its name.
    pub name: String,
    /// The node it belongs to (empty for admin tokens).
    pub node: String,
    /// The token.
    pub token: String,
    /// The first 8 hex digits of its SHA-256, as the token list shows it.
    pub hash_prefix: String,
}

/// `DELETE /api/v1/tokens/{hash_prefix}`: the token revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRevoked {
    /// It, as the list showed it.
    pub revoked: TokenInfo,
}

/// `DELETE /api/v1/nodes/{id}/token`: every token of a node revoked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTokensRevoked {
    /// The node.
    pub node: String,
    /// How many tokens it had.
    pub revoked: u64,
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
    /// How it fares.
    pub state: ModelState,
    /// Why, when it failed.
    #[serde(default)]
    pub detail: String,
}

/// Most model versions one report may name: the hub keeps a row per node and version, so
/// the count bounds what one report makes it write (a node serves a handful).
pub const MAX_REPORTED_MODELS: usize = 1024;

/// A node's report after it applied a desired state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// The generation it applied.
    pub generation: i64,
    /// Per model version.
    pub models: Vec<ReportedModel>,
}

impl ReportedModel {
    /// Whether the failure may pass by itself (see [`ModelState::transient`]).
    pub fn transient(&self) -> bool {
        self.state.transient()
    }

    /// Whether the state is a failure that counts against a rollout.
    pub fn failed(&self) -> bool {
        self.state.failed()
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

/// What one model version has served, as the hub's telemetry and feedback count it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Predictions with a feedback label.
    pub labeled: u64,
    /// Of which the model got right.
    pub correct: u64,
}

impl Health {
    /// What was served after `baseline` was taken (counts only grow; a smaller count, as
    /// after a restored database, counts from zero).
    pub fn since(&self, baseline: &Health) -> Health {
        Health {
            requests: self.requests.saturating_sub(baseline.requests),
            errors: self.errors.saturating_sub(baseline.errors),
            labeled: self.labeled.saturating_sub(baseline.labeled),
            correct: self.correct.saturating_sub(baseline.correct),
        }
    }

    /// Failed / all requests (0 without requests).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    /// Correct / labeled predictions, when any is labeled.
    pub fn accuracy(&self) -> Option<f64> {
        (self.labeled > 0).then(|| self.correct as f64 / self.labeled as f64)
    }
}

/// A staged rollout, as the hub stores and answers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// Id.
    pub id: String,
    /// Model.
    pub model: String,
    /// The version rolled out.
    pub version: String,
    /// The production version before it (what rollback restores; empty if none).
    pub previous: String,
    /// Node labels a node must all have.
    pub selector: BTreeMap<String, String>,
    /// Percentages of the matching nodes, step by step (the last is usually 100).
    pub steps: Vec<u32>,
    /// Index of the current step.
    pub step: i64,
    /// Current percentage.
    pub percent: i64,
    /// Where it is.
    pub state: RolloutState,
    /// Failure rate (failed / assigned nodes) above which the rollout aborts itself.
    pub failure_threshold: f64,
    /// Seconds between automatic steps (0: manual).
    pub step_interval_s: i64,
    /// Why it ended.
    pub reason: String,
    /// Created at (seconds since the epoch).
    pub created_at: i64,
    /// Last change (seconds since the epoch).
    pub updated_at: i64,
    /// Promote or abort by itself on the canary's health.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_promote: Option<AutoPromote>,
    /// What the version had served when the rollout started.
    #[serde(default)]
    pub baseline: Health,
}

/// A node as the hub knows it (`GET /api/v1/nodes`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Id.
    pub id: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Registered at (seconds since the epoch).
    pub registered_at: i64,
    /// Its last call (seconds since the epoch).
    pub last_seen: i64,
    /// Its last report.
    pub report: Option<Report>,
}

/// `GET /api/v1/nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeList {
    /// Every node, by id.
    pub nodes: Vec<NodeInfo>,
}

/// `POST /api/v1/nodes/{id}/register`: the node as registered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registered {
    /// Its id.
    pub node: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
}

/// `POST /api/v1/nodes/{id}/report`: stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportStored {
    /// Always true.
    pub ok: bool,
}

/// `POST /api/v1/telemetry`: the sequence numbers stored now or before (a retried batch is
/// acknowledged without being counted twice).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryAck {
    /// The batches' `seq`.
    pub acked: Vec<u64>,
}

/// `POST /api/v1/feedback`: how many labels were stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedbackAccepted {
    /// Labels stored.
    pub accepted: usize,
}

named_enum! {
    /// Whether the hub answers.
    HealthStatus {
        /// It does, and its database too.
        Ok = "ok",
    }
}

/// `GET /api/v1/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HubHealth {
    /// `ok`.
    pub status: HealthStatus,
    /// The generation of the desired state (it grows with every change nodes see).
    pub generation: i64,
}

/// `GET /api/v1/rollouts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutList {
    /// Every rollout, newest first.
    pub rollouts: Vec<Rollout>,
}

/// An audit log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// When, microseconds since the Unix epoch.
    pub at_us: i64,
    /// Who (the token's name, or `hub`).
    pub actor: String,
    /// What (`rollout.promote`, `token.revoke`, ...).
    pub action: String,
    /// Details (JSON text).
    pub detail: String,
    /// From where (remote address).
    pub remote: String,
}

/// `GET /api/v1/audit`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditLog {
    /// Oldest first.
    pub audit: Vec<AuditEntry>,
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

    #[test]
    fn names_round_trip_on_the_wire_and_in_text() {
        for state in RolloutState::ALL {
            let wire = serde_json::to_string(state).unwrap();
            assert_eq!(wire, format!("\"{state}\""));
            assert_eq!(serde_json::from_str::<RolloutState>(&wire).unwrap(), *state);
            assert_eq!(state.as_str().parse::<RolloutState>().unwrap(), *state);
        }
        assert_eq!(RolloutState::RolledBack.as_str(), "rolled_back");
        let e = "Active".parse::<RolloutState>().unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown RolloutState \"Active\" (expected one of [\"active\", \"promoted\", \"aborted\", \"rolled_back\"])"
        );
        assert!(serde_json::from_str::<Role>("\"root\"").is_err());
        let long = "x".repeat(10_000);
        assert_eq!(long.parse::<Role>().unwrap_err().name.len(), 64);
    }

    #[test]
    fn a_newer_nodes_unknown_model_state_is_kept_as_other() {
        let m: ReportedModel = serde_json::from_str(
            r#"{"model":"m","version":"1","state":"defragmenting","detail":""}"#,
        )
        .unwrap();
        assert_eq!(m.state, ModelState::Other);
        assert!(!m.failed() && !m.transient());
        let failed: Vec<_> = ModelState::ALL.iter().filter(|s| s.failed()).collect();
        assert_eq!(
            failed,
            [
                &ModelState::VerifyFailed,
                &ModelState::DownloadFailed,
                &ModelState::LoadFailed,
                &ModelState::ProbeFailed
            ]
        );
    }
}
