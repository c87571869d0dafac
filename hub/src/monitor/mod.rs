//! Monitoring: telemetry ingestion (idempotent batches), drift per feature (PSI and KS
//! against the capsule's reference statistics) per model version, node group and window,
//! latency and error SLOs, live accuracy from feedback labels, alert rules that fire
//! webhooks (deduplicated, with resolution), and the retraining trigger.
//!
//! The hub evaluates each window once it is complete (its end plus a grace period for
//! late batches). With several replicas on one database, a conditional update of the
//! evaluated-until mark lets exactly one of them evaluate a window.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use capsule_format::telemetry::{self, FeatureDrift, ModelWindow, ReferenceStats, TelemetryBatch};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sqlx::Row;

pub use capsule_format::hub::{Accuracy, Alert, NodeTotals, Summary, VersionTotals, WindowPoint};
use capsule_format::hub::{
    AlertEvent, AlertRule, AlertState, EventKind, GroupDrift, Notification, NotificationBody,
    RetrainCommand, RetrainReport,
};

use crate::alert::{self, Finding, Measure};
pub use crate::alert::{AccuracyRule, DriftRule, ErrorRule, LatencyRule};
use crate::db::{Db, new_id};
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

mod evaluate;
mod ingest;
mod queries;
mod retention;

pub(crate) use evaluate::*;
pub(crate) use ingest::*;
pub(crate) use queries::*;
pub(crate) use retention::*;

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

    fn batch(seq: u64, predictions: &[(&str, &str)], dropped: u64) -> TelemetryBatch {
        TelemetryBatch {
            node_id: "n1".into(),
            seq,
            window_start_ms: 0,
            window_end_ms: 1_000,
            dropped_batches: dropped,
            dropped_requests: dropped * 10,
            models: vec![ModelWindow {
                model: "m".into(),
                version: "1".into(),
                requests: predictions.len() as u64,
                predictions: predictions
                    .iter()
                    .map(|(id, class)| telemetry::Prediction {
                        id: (*id).into(),
                        class: (*class).into(),
                    })
                    .collect(),
                ..ModelWindow::default()
            }],
            feedback: Vec::new(),
        }
    }

    async fn count(db: &Db, table: &str) -> i64 {
        sqlx::query(&format!("SELECT COUNT(*) AS n FROM {table}"))
            .fetch_one(db.pool())
            .await
            .and_then(|r| r.try_get("n"))
            .unwrap_or(-1)
    }

    /// The totals as a recount from the stored rows gives them.
    async fn recount(db: &Db) -> Accuracy {
        let r = sqlx::query(
            "SELECT COUNT(*) AS labeled, CAST(COALESCE(SUM(CASE WHEN p.class = f.label THEN 1 ELSE 0 END), 0) AS BIGINT) AS correct \
             FROM predictions p JOIN feedback f ON p.model = f.model AND p.id = f.id",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        Accuracy::new(
            u(r.try_get("labeled").unwrap()),
            u(r.try_get("correct").unwrap()),
        )
    }

    #[tokio::test]
    async fn running_totals_match_a_recount_and_retention_keeps_them() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("temp dir"))?;
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("hub.db").display())).await?;
        let labels = |items: &[(&str, &str)]| -> Vec<(String, String)> {
            items
                .iter()
                .map(|(i, l)| ((*i).into(), (*l).into()))
                .collect()
        };
        let now = || async {
            accuracy(&db, "m")
                .await
                .map(|a| a.get("1").copied().unwrap_or_default())
        };
        // (step, accuracy after it) — each checked against a recount of the rows
        assert!(store_batch(&db, &batch(1, &[("p1", "a"), ("p2", "b")], 0), "g").await?);
        assert_eq!(now().await?, Accuracy::new(0, 0));
        store_feedback(&db, "x", "m", &labels(&[("p1", "a"), ("p3", "a")])).await?;
        assert_eq!(
            now().await?,
            Accuracy::new(1, 1),
            "p3 has no prediction yet"
        );
        assert!(store_batch(&db, &batch(2, &[("p3", "b")], 4), "g").await?);
        assert_eq!(
            now().await?,
            Accuracy::new(2, 1),
            "p3's label counts when it comes"
        );
        store_feedback(&db, "x", "m", &labels(&[("p1", "b")])).await?;
        assert_eq!(
            now().await?,
            Accuracy::new(2, 0),
            "a changed label moves correct"
        );
        store_feedback(&db, "x", "m", &labels(&[("p1", "b"), ("p3", "b")])).await?;
        assert_eq!(now().await?, Accuracy::new(2, 1));
        assert!(
            !store_batch(&db, &batch(1, &[("p1", "a"), ("p2", "b")], 0), "g").await?,
            "a retry"
        );
        assert_eq!(now().await?, recount(&db).await);
        let s = summary(&db, None).await?;
        let n = &s.nodes["n1"];
        assert_eq!(
            (n.batches, n.dropped_batches, n.dropped_requests, n.requests),
            (2, 4, 40, 3)
        );

        assert_eq!(
            sweep(&db, Duration::from_secs(3600), db.clock().now_ms()).await?,
            0,
            "nothing expired"
        );
        // A hostile node's window dated in the year 3000 is swept like any other.
        let mut future = batch(3, &[], 0);
        (future.window_start_ms, future.window_end_ms) = (32_503_680_000_000, 32_503_680_010_000);
        assert!(store_batch(&db, &future, "g").await?);
        let later = db.clock().now_ms() + 2 * 3600 * 1000;
        // 3 batch rows, 3 predictions, 2 labels, 2 window rows
        assert_eq!(
            sweep(&db, Duration::from_secs(3600), later).await?,
            3 + 3 + 2 + 2
        );
        for table in [
            "telemetry_batches",
            "predictions",
            "feedback",
            "telemetry_windows",
        ] {
            assert_eq!(count(&db, table).await, 0, "{table}");
        }
        assert_eq!(now().await?, Accuracy::new(2, 1), "totals stay");
        let after = &summary(&db, None).await?.nodes["n1"];
        assert_eq!(
            (after.batches, after.dropped_batches, after.requests),
            (n.batches + 1, n.dropped_batches, n.requests),
            "the node's totals stay (and count the year-3000 batch)"
        );
        Ok(())
    }

    #[tokio::test]
    async fn windows_are_aggregated_at_ingest_and_old_batches_folded_in() -> Result<()> {
        let dir = tempfile::tempdir().map_err(Error::io("temp dir"))?;
        let db = Db::connect(&format!("sqlite://{}", dir.path().join("hub.db").display())).await?;
        let mut other_node = batch(1, &[("q1", "a")], 0);
        other_node.node_id = "n2".into();
        store_batch(&db, &batch(1, &[("p1", "a"), ("p2", "b")], 0), "eu").await?;
        store_batch(&db, &other_node, "eu").await?;
        store_batch(&db, &batch(2, &[("p3", "a")], 0), "us").await?;
        // A batch stored whole by an earlier release, in the same window and group.
        let mut old = batch(1, &[("r1", "a"), ("r2", "a"), ("r3", "a")], 0);
        old.node_id = "n3".into();
        sqlx::query(
            "INSERT INTO telemetry_batches (node_id, seq, window_start, window_end, received_at, requests, dropped_batches, dropped_requests, body) \
             VALUES ('n3', 1, 0, 1000, 0, 3, 0, 0, $1)",
        )
        .bind(serde_json::to_string(&old)?)
        .execute(db.pool())
        .await?;
        assert_eq!(fold_stored_batches(&db, "group").await?, 1);
        assert_eq!(fold_stored_batches(&db, "group").await?, 0, "folded once");
        let mut rows: Vec<(String, i64, u64, usize)> = load_windows(&db, 0, 1)
            .await?
            .into_iter()
            .map(|(g, ws, m)| (g, ws, m.requests, m.predictions.len()))
            .collect();
        rows.sort();
        assert_eq!(
            rows,
            [
                ("default".into(), 0, 3, 0),
                ("eu".into(), 0, 3, 0),
                ("us".into(), 0, 1, 0),
            ],
            "one row per group and window; predictions are not kept in windows"
        );
        let bodies: i64 =
            sqlx::query("SELECT COUNT(*) AS n FROM telemetry_batches WHERE body <> ''")
                .fetch_one(db.pool())
                .await?
                .try_get("n")?;
        assert_eq!(bodies, 0, "batch rows keep no body");
        Ok(())
    }
}
