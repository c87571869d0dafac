//! Monitoring: telemetry ingestion (idempotent batches), drift per feature (PSI and KS
//! against the capsule's reference statistics) per model version, node group and window,
//! latency and error SLOs, live accuracy from feedback labels, alert rules that fire
//! webhooks (deduplicated, with resolution), and the retraining trigger.
//!
//! The hub evaluates each window once it is complete (its end plus a grace period for
//! late batches). With several replicas on one database, a conditional update of the
//! evaluated-until mark lets exactly one of them evaluate a window.
//!
//! Every row monitoring reads or writes goes through the [`Store`]
//! (`store::telemetry`, `store::monitoring`); nothing here runs SQL.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use capsule_format::telemetry::{self, FeatureDrift, ModelWindow, ReferenceStats, TelemetryBatch};
use serde::{Deserialize, Serialize};
use serde_json::json;

pub use capsule_format::hub::{Accuracy, Alert, NodeTotals, Summary, VersionTotals, WindowPoint};
use capsule_format::hub::{
    AlertRule, AlertState, EventKind, GroupDrift, Notification, NotificationBody, RetrainCommand,
    RetrainReport,
};

use crate::alert::{self, Finding, Measure};
pub use crate::alert::{AccuracyRule, DriftRule, ErrorRule, LatencyRule};
use crate::store::{Store, new_id};
use crate::{Error, Result, Shared};

/// What happens when drift or accuracy alerts fire for a model version.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetrainConfig {
    /// Rules that trigger retraining.
    pub on: Vec<AlertRule>,
    /// POST the drift report (JSON) here.
    pub webhook: Option<String>,
    /// Run this command with the report file's path as its last argument (also in
    /// `CAPSULE_RETRAIN_REPORT`).
    pub command: Vec<String>,
}

impl Default for RetrainConfig {
    fn default() -> Self {
        RetrainConfig {
            on: vec![AlertRule::Drift, AlertRule::Accuracy],
            webhook: None,
            command: Vec::new(),
        }
    }
}

/// Monitoring settings (`capsule hub --monitor FILE`, TOML).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MonitorConfig {
    /// Length of an evaluation window in milliseconds (a multiple of the nodes' telemetry
    /// window keeps batches whole).
    pub window_ms: u64,
    /// How long after a window's end the hub waits for late batches before evaluating it.
    pub grace_ms: u64,
    /// The node label whose value groups nodes (nodes without it are group `default`).
    pub group_label: String,
    /// A node is offline when it has not called for this long, in seconds.
    pub offline_after_s: u64,
    /// Alert webhooks: each firing and each resolution is POSTed to every one of them.
    pub webhooks: Vec<String>,
    /// Where retraining reports are written.
    pub reports_dir: PathBuf,
    /// Drift rule.
    pub drift: DriftRule,
    /// Error-rate rule.
    pub errors: ErrorRule,
    /// Latency rule.
    pub latency: LatencyRule,
    /// Accuracy rule.
    pub accuracy: AccuracyRule,
    /// Retraining trigger.
    pub retrain: RetrainConfig,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            window_ms: 60_000,
            grace_ms: 15_000,
            group_label: "group".into(),
            offline_after_s: 120,
            webhooks: Vec::new(),
            reports_dir: PathBuf::from("hub-reports"),
            drift: DriftRule::default(),
            errors: ErrorRule::default(),
            latency: LatencyRule::default(),
            accuracy: AccuracyRule::default(),
            retrain: RetrainConfig::default(),
        }
    }
}

impl MonitorConfig {
    /// Reads a TOML file (unknown keys are errors).
    pub fn from_toml_file(path: &std::path::Path) -> Result<MonitorConfig> {
        let text = std::fs::read_to_string(path)
            .map_err(Error::io(format!("reading {}", path.display())))?;
        let c: MonitorConfig = toml::from_str(&text).map_err(|source| Error::SettingsFile {
            path: path.to_path_buf(),
            source,
        })?;
        c.validate()?;
        Ok(c)
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<()> {
        if self.window_ms < 100 {
            return Err(Error::Settings(
                "monitor window_ms must be at least 100".into(),
            ));
        }
        Ok(())
    }
}

/// How long raw telemetry is kept unless `--retention` says otherwise.
pub(crate) const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often the hub sweeps expired rows (`Store::sweep`).
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(600);

mod evaluate;
mod ingest;
mod queries;

pub(crate) use evaluate::*;
pub(crate) use ingest::*;
pub(crate) use queries::*;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<MonitorConfig> {
        let c: MonitorConfig =
            toml::from_str(text).map_err(|e| Error::BadRequest(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn settings_default_and_refuse_mistakes() {
        let c = parse("window_ms = 5000\n[drift]\npsi = 0.25\n").unwrap();
        assert_eq!((c.window_ms, c.drift.psi, c.drift.ks), (5000, 0.25, 0.3));
        assert_eq!(c.retrain.on, [AlertRule::Drift, AlertRule::Accuracy]);
        assert!(c.latency.p99_ms.is_none() && c.accuracy.below.is_none());
        let unknown = parse("[drift]\npsi_threshold = 0.2\n").unwrap_err();
        assert!(
            unknown
                .to_string()
                .contains("unknown field `psi_threshold`"),
            "{unknown}"
        );
        let typo = parse("[retrain]\non = [\"drfit\"]\n")
            .unwrap_err()
            .to_string();
        assert!(typo.contains("unknown variant `drfit`"), "{typo}");
        assert_eq!(
            parse("window_ms = 10\n").unwrap_err().to_string(),
            "monitor window_ms must be at least 100"
        );
    }
}
