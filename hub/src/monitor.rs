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

use capsule_format::telemetry::{
    self, FeatureDrift, FeatureHistogram, ModelWindow, ReferenceStats, TelemetryBatch,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sqlx::Row;

pub use capsule_format::hub::Alert;
use capsule_format::hub::{AlertRule, AlertState};

use crate::alert::{self, Finding, Measure};
pub use crate::alert::{AccuracyRule, DriftRule, ErrorRule, LatencyRule};
use crate::db::{Db, new_id};
use crate::{Error, Result, Shared};

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

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

// ---------------------------------------------------------------------------------------
// Ingestion

/// Stores batches from `node`; returns the sequence numbers stored now or before (a
/// retried batch is acknowledged without being counted twice).
pub(crate) async fn ingest(
    s: &Shared,
    node: &str,
    batches: Vec<TelemetryBatch>,
) -> Result<Vec<u64>> {
    let mut acked = Vec::with_capacity(batches.len());
    let registered = s.db.registered_versions().await?;
    let group = node_group(&s.db, &s.config.monitor.group_label, node).await?;
    for b in batches {
        b.validate()?;
        if b.node_id != node {
            return Err(Error::Forbidden(format!(
                "batch {} is from node {:?}, not {node:?}",
                b.seq, b.node_id
            )));
        }
        let stored = store_batch(&s.db, &b, &group).await?;
        s.metrics
            .telemetry_batches
            .with_label_values(&[if stored { "stored" } else { "duplicate" }])
            .inc();
        if stored {
            for m in &b.models {
                let labels = crate::metrics::version_labels(&registered, &m.model, &m.version);
                s.metrics
                    .fleet_requests
                    .with_label_values(&labels)
                    .inc_by(m.requests);
                s.metrics
                    .fleet_errors
                    .with_label_values(&labels)
                    .inc_by(m.error_count());
            }
        }
        acked.push(b.seq);
    }
    Ok(acked)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Rows one transaction writes while a batch is stored: a batch holds up to tens of thousands
/// of predictions and feedback labels, and one transaction for all of them held the
/// database's write lock (SQLite has one) long enough to stall every report and register.
const ROWS_PER_TRANSACTION: usize = 1000;

/// Predictions one statement inserts (6 parameters each).
const PREDICTIONS_PER_STATEMENT: usize = 100;

/// Inserts predictions (one statement; a prediction the hub has is left as it is) and counts
/// those whose label came first into their version's accuracy (one more statement).
async fn insert_predictions(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    node: &str,
    now: i64,
    part: &[(&str, &str, &telemetry::Prediction)],
) -> Result<()> {
    use std::fmt::Write as _;
    if part.is_empty() {
        return Ok(());
    }
    let mut sql =
        String::from("INSERT INTO predictions (model, id, version, class, node_id, at) VALUES ");
    for i in 0..part.len() {
        let n = i * 6;
        let sep = if i == 0 { "" } else { ", " };
        let _ = write!(
            sql,
            "{sep}(${}, ${}, ${}, ${}, ${}, ${})",
            n + 1,
            n + 2,
            n + 3,
            n + 4,
            n + 5,
            n + 6
        );
    }
    sql.push_str(" ON CONFLICT (model, id) DO NOTHING RETURNING model, id");
    let mut q = sqlx::query(&sql);
    for (model, version, p) in part {
        q = q
            .bind(*model)
            .bind(&p.id)
            .bind(*version)
            .bind(&p.class)
            .bind(node)
            .bind(now);
    }
    let mut added: BTreeSet<(String, String)> = BTreeSet::new();
    for r in q.fetch_all(&mut **tx).await? {
        added.insert((r.try_get("model")?, r.try_get("id")?));
    }
    if added.is_empty() {
        return Ok(());
    }
    // Labels that came before their predictions count now.
    let mut sql = String::from("SELECT model, id, label FROM feedback WHERE ");
    for i in 0..added.len() {
        let sep = if i == 0 { "" } else { " OR " };
        let _ = write!(sql, "{sep}(model = ${} AND id = ${})", 2 * i + 1, 2 * i + 2);
    }
    let mut q = sqlx::query(&sql);
    for (model, id) in &added {
        q = q.bind(model).bind(id);
    }
    let mut labels: BTreeMap<(String, String), String> = BTreeMap::new();
    for r in q.fetch_all(&mut **tx).await? {
        labels.insert((r.try_get("model")?, r.try_get("id")?), r.try_get("label")?);
    }
    let mut deltas: BTreeMap<(&str, &str), (i64, i64)> = BTreeMap::new();
    for (model, version, p) in part {
        // Once per stored prediction (a part may name one id twice; only one was stored).
        if let Some(label) = labels.remove(&((*model).to_owned(), p.id.clone())) {
            let d = deltas.entry((model, version)).or_default();
            d.0 += 1;
            d.1 += i64::from(label == p.class);
        }
    }
    for ((model, version), (labeled, correct)) in deltas {
        add_accuracy(tx, model, version, labeled, correct).await?;
    }
    Ok(())
}

/// The node group a node's telemetry counts in: the value of its `group_label` label, else
/// `default`.
async fn node_group(db: &Db, group_label: &str, node: &str) -> Result<String> {
    Ok(db
        .node(node)
        .await?
        .and_then(|n| n.labels.get(group_label).cloned())
        .unwrap_or_else(|| "default".into()))
}

/// Adds one batch's window of a model version to its aggregate row (model, version, group,
/// window start), creating it when it is the first. The first statement either creates the
/// row or, when it exists, does nothing; an existing row is then locked (PostgreSQL: the
/// no-op update; SQLite: the transaction's write lock), read, merged and written, so two
/// hubs folding into one row at once add up instead of overwriting each other.
async fn fold_window(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    group: &str,
    window_start: i64,
    window_end: i64,
    m: &ModelWindow,
    now: i64,
) -> Result<()> {
    let mut mine = m.clone();
    mine.predictions.clear();
    let created = sqlx::query(
        "INSERT INTO telemetry_windows (model, version, grp, window_start, window_end, updated_at, body) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (model, version, grp, window_start) DO NOTHING",
    )
    .bind(&m.model)
    .bind(&m.version)
    .bind(group)
    .bind(window_start)
    .bind(window_end)
    .bind(now)
    .bind(serde_json::to_string(&mine)?)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if created == 1 {
        return Ok(());
    }
    let key = "model = $1 AND version = $2 AND grp = $3 AND window_start = $4";
    sqlx::query(&format!(
        "UPDATE telemetry_windows SET updated_at = $5 WHERE {key}"
    ))
    .bind(&m.model)
    .bind(&m.version)
    .bind(group)
    .bind(window_start)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let body: String = sqlx::query(&format!("SELECT body FROM telemetry_windows WHERE {key}"))
        .bind(&m.model)
        .bind(&m.version)
        .bind(group)
        .bind(window_start)
        .fetch_one(&mut **tx)
        .await?
        .try_get("body")?;
    let merged = match serde_json::from_str::<ModelWindow>(&body) {
        Ok(stored) => {
            let mut merged = stored.clone();
            if merged.merge(&mine).is_ok() {
                merged
            } else {
                tracing::warn!(model = %m.model, version = %m.version, "telemetry with mismatched features: counted without its features");
                let mut merged = stored;
                mine.features.clear();
                let _ = merged.merge(&mine);
                merged
            }
        }
        // Not this release's shape: the window starts again from this batch.
        Err(_) => mine,
    };
    sqlx::query(&format!(
        "UPDATE telemetry_windows SET body = $5, window_end = CASE WHEN window_end > $6 THEN window_end ELSE $6 END WHERE {key}"
    ))
    .bind(&m.model)
    .bind(&m.version)
    .bind(group)
    .bind(window_start)
    .bind(serde_json::to_string(&merged)?)
    .bind(window_end)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Folds batches stored whole by earlier releases into the window rows, 500 at a time
/// (each chunk one transaction, its batches' bodies emptied in it), with each node's current
/// group. Returns how many it folded.
pub(crate) async fn fold_stored_batches(db: &Db, group_label: &str) -> Result<u64> {
    let groups: BTreeMap<String, String> = db
        .nodes()
        .await?
        .into_iter()
        .map(|n| {
            let g = n.labels.get(group_label).cloned();
            (n.id, g.unwrap_or_else(|| "default".into()))
        })
        .collect();
    let mut folded = 0;
    loop {
        let rows = sqlx::query(
            "SELECT node_id, seq, body FROM telemetry_batches WHERE body <> '' ORDER BY node_id, seq LIMIT 500",
        )
        .fetch_all(db.pool())
        .await?;
        if rows.is_empty() {
            return Ok(folded);
        }
        let now = now_ms();
        let mut tx = db.pool().begin().await?;
        for r in &rows {
            let node: String = r.try_get("node_id")?;
            let seq: i64 = r.try_get("seq")?;
            let body: String = r.try_get("body")?;
            if let Ok(b) = serde_json::from_str::<TelemetryBatch>(&body) {
                let group = groups.get(&node).map_or("default", String::as_str);
                for m in &b.models {
                    let (ws, we) = (to_i64(b.window_start_ms), to_i64(b.window_end_ms));
                    fold_window(&mut tx, group, ws, we, m, now).await?;
                }
            }
            sqlx::query("UPDATE telemetry_batches SET body = '' WHERE node_id = $1 AND seq = $2")
                .bind(&node)
                .bind(seq)
                .execute(&mut *tx)
                .await?;
            folded += 1;
        }
        tx.commit().await?;
    }
}

/// Stores a batch once: `false` when it was stored already (a retry).
///
/// Its predictions and feedback go first, in transactions of [`ROWS_PER_TRANSACTION`]: their
/// inserts are idempotent, so a crash between two of them only means a retry writes the same
/// rows again. The batch row and the totals it adds go last, in one transaction: the row is
/// what makes the totals count exactly once.
async fn store_batch(db: &Db, b: &TelemetryBatch, group: &str) -> Result<bool> {
    let known =
        sqlx::query("SELECT 1 AS one FROM telemetry_batches WHERE node_id = $1 AND seq = $2")
            .bind(&b.node_id)
            .bind(to_i64(b.seq))
            .fetch_optional(db.pool())
            .await?;
    if known.is_some() {
        return Ok(false);
    }
    let now = now_ms();
    enum Unit<'a> {
        Predictions(&'a [(&'a str, &'a str, &'a telemetry::Prediction)]),
        Feedback(&'a telemetry::Feedback),
    }
    let predictions: Vec<(&str, &str, &telemetry::Prediction)> = b
        .models
        .iter()
        .flat_map(|m| {
            m.predictions
                .iter()
                .map(move |p| (m.model.as_str(), m.version.as_str(), p))
        })
        .collect();
    let units: Vec<Unit<'_>> = predictions
        .chunks(PREDICTIONS_PER_STATEMENT)
        .map(Unit::Predictions)
        .chain(b.feedback.iter().map(Unit::Feedback))
        .collect();
    let mut units = units.iter().peekable();
    while units.peek().is_some() {
        let mut tx = db.pool().begin().await?;
        let mut rows = 0;
        while rows < ROWS_PER_TRANSACTION {
            let Some(unit) = units.next() else { break };
            match unit {
                Unit::Predictions(part) => {
                    insert_predictions(&mut tx, &b.node_id, now, part).await?;
                    rows += part.len();
                }
                Unit::Feedback(f) => {
                    insert_feedback(&mut tx, &f.model, &f.id, &f.label, &b.node_id, now).await?;
                    rows += 1;
                }
            }
        }
        tx.commit().await?;
    }
    let mut tx = db.pool().begin().await?;
    let done = sqlx::query(
        "INSERT INTO telemetry_batches (node_id, seq, window_start, window_end, received_at, requests, dropped_batches, dropped_requests, body) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (node_id, seq) DO NOTHING",
    )
    .bind(&b.node_id)
    .bind(to_i64(b.seq))
    .bind(to_i64(b.window_start_ms))
    .bind(to_i64(b.window_end_ms))
    .bind(now)
    .bind(to_i64(b.requests()))
    .bind(to_i64(b.dropped_batches))
    .bind(to_i64(b.dropped_requests))
    .bind("")
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO telemetry_node_totals (node_id, batches, dropped_batches, dropped_requests) VALUES ($1, 1, $2, $3) \
         ON CONFLICT (node_id) DO UPDATE SET batches = telemetry_node_totals.batches + 1, \
         dropped_batches = CASE WHEN excluded.dropped_batches > telemetry_node_totals.dropped_batches THEN excluded.dropped_batches ELSE telemetry_node_totals.dropped_batches END, \
         dropped_requests = CASE WHEN excluded.dropped_requests > telemetry_node_totals.dropped_requests THEN excluded.dropped_requests ELSE telemetry_node_totals.dropped_requests END",
    )
    .bind(&b.node_id)
    .bind(to_i64(b.dropped_batches))
    .bind(to_i64(b.dropped_requests))
    .execute(&mut *tx)
    .await?;
    for m in &b.models {
        let (ws, we) = (to_i64(b.window_start_ms), to_i64(b.window_end_ms));
        fold_window(&mut tx, group, ws, we, m, now).await?;
        sqlx::query(
            "INSERT INTO telemetry_totals (node_id, model, version, requests, errors, rows_seen) VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (node_id, model, version) DO UPDATE SET requests = telemetry_totals.requests + excluded.requests, \
             errors = telemetry_totals.errors + excluded.errors, rows_seen = telemetry_totals.rows_seen + excluded.rows_seen",
        )
        .bind(&b.node_id)
        .bind(&m.model)
        .bind(&m.version)
        .bind(to_i64(m.requests))
        .bind(to_i64(m.error_count()))
        .bind(to_i64(m.rows))
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Stores a label (a later label of the same prediction replaces it) and keeps its model
/// version's accuracy totals: a label of a prediction the hub has counts once, a changed label
/// moves `correct` by what changed; a label that comes first counts when its prediction does.
///
/// The first statement locks an existing label's row (PostgreSQL) or the database (SQLite)
/// for the transaction, so two changes of one label are counted one after the other. On
/// PostgreSQL, two *first* labels of one prediction committed at the same instant by two
/// hubs may both count it (`labeled` one too high); SQLite serializes them.
async fn insert_feedback(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    model: &str,
    id: &str,
    label: &str,
    source: &str,
    now: i64,
) -> Result<()> {
    sqlx::query("UPDATE feedback SET at = at WHERE model = $1 AND id = $2")
        .bind(model)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    let before: Option<String> =
        sqlx::query("SELECT label FROM feedback WHERE model = $1 AND id = $2")
            .bind(model)
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?
            .map(|r| r.try_get("label"))
            .transpose()?;
    sqlx::query(
        "INSERT INTO feedback (model, id, label, source, at) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (model, id) DO UPDATE SET label = excluded.label, source = excluded.source, at = excluded.at",
    )
    .bind(model)
    .bind(id)
    .bind(label)
    .bind(source)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    let prediction =
        sqlx::query("SELECT version, class FROM predictions WHERE model = $1 AND id = $2")
            .bind(model)
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    let Some(p) = prediction else {
        return Ok(());
    };
    let (version, class): (String, String) = (p.try_get("version")?, p.try_get("class")?);
    let right = |l: &str| i64::from(l == class);
    let (labeled, correct) = match &before {
        None => (1, right(label)),
        Some(old) => (0, right(label) - right(old)),
    };
    if (labeled, correct) != (0, 0) {
        add_accuracy(tx, model, &version, labeled, correct).await?;
    }
    Ok(())
}

async fn add_accuracy(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    model: &str,
    version: &str,
    labeled: i64,
    correct: i64,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO accuracy_totals (model, version, labeled, correct) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (model, version) DO UPDATE SET labeled = accuracy_totals.labeled + excluded.labeled, \
         correct = accuracy_totals.correct + excluded.correct",
    )
    .bind(model)
    .bind(version)
    .bind(labeled)
    .bind(correct)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Stores feedback sent straight to the hub (browsers).
pub(crate) async fn store_feedback(
    db: &Db,
    source: &str,
    model: &str,
    items: &[(String, String)],
) -> Result<()> {
    let now = now_ms();
    let mut tx = db.pool().begin().await?;
    for (id, label) in items {
        insert_feedback(
            &mut tx,
            model,
            &telemetry::cut(id),
            &telemetry::cut(label),
            source,
            now,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Retention

/// How long raw telemetry is kept unless `--retention` says otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often the hub sweeps expired rows.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Rows one delete statement removes at most (each statement is its own transaction).
const SWEEP_CHUNK: i64 = 5_000;

/// Deletes the raw history received more than `keep` before `now_ms`: telemetry batches,
/// predictions and labels, notification records. What the hub reports from stays: the
/// running totals (requests, errors, accuracy), alerts, rollouts, the audit log. Each
/// statement deletes at most [`SWEEP_CHUNK`] rows, so the first sweep of a long history does
/// not hold SQLite's write lock for long. Returns the rows deleted.
pub(crate) async fn sweep(db: &Db, keep: Duration, now_ms: i64) -> Result<u64> {
    let cutoff_ms = now_ms.saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
    let statements = [
        (
            "DELETE FROM telemetry_batches WHERE (node_id, seq) IN (SELECT node_id, seq FROM telemetry_batches WHERE received_at < $1 LIMIT $2)",
            cutoff_ms,
        ),
        (
            "DELETE FROM predictions WHERE (model, id) IN (SELECT model, id FROM predictions WHERE at < $1 LIMIT $2)",
            cutoff_ms,
        ),
        (
            "DELETE FROM feedback WHERE (model, id) IN (SELECT model, id FROM feedback WHERE at < $1 LIMIT $2)",
            cutoff_ms,
        ),
        (
            "DELETE FROM alert_events WHERE id IN (SELECT id FROM alert_events WHERE at_us < $1 LIMIT $2)",
            cutoff_ms.saturating_mul(1000),
        ),
    ];
    let mut deleted = 0;
    for (sql, cutoff) in statements {
        loop {
            let n = sqlx::query(sql)
                .bind(cutoff)
                .bind(SWEEP_CHUNK)
                .execute(db.pool())
                .await?
                .rows_affected();
            deleted += n;
            if n < SWEEP_CHUNK as u64 {
                break;
            }
        }
    }
    Ok(deleted)
}

// ---------------------------------------------------------------------------------------
// Queries

/// Live accuracy of one model version from its labeled predictions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Predictions with a label.
    pub labeled: u64,
    /// Of which the model got right.
    pub correct: u64,
}

impl Accuracy {
    /// `correct / labeled`.
    pub fn value(&self) -> Option<f64> {
        (self.labeled > 0).then(|| self.correct as f64 / self.labeled as f64)
    }
}

/// Accuracy per version of `model` (running totals kept as labels and predictions arrive).
pub(crate) async fn accuracy(db: &Db, model: &str) -> Result<BTreeMap<String, Accuracy>> {
    let rows =
        sqlx::query("SELECT version, labeled, correct FROM accuracy_totals WHERE model = $1")
            .bind(model)
            .fetch_all(db.pool())
            .await?;
    let mut out = BTreeMap::new();
    for r in rows {
        out.insert(
            r.try_get::<String, _>("version")?,
            Accuracy {
                labeled: u(r.try_get("labeled")?),
                correct: u(r.try_get("correct")?),
            },
        );
    }
    Ok(out)
}

/// What one model version has served on every node, with its feedback accuracy: a
/// self-promoting rollout's evidence.
pub(crate) async fn version_health(
    db: &Db,
    model: &str,
    version: &str,
) -> Result<crate::rollout::Health> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) AS requests, \
         CAST(COALESCE(SUM(errors), 0) AS BIGINT) AS errors \
         FROM telemetry_totals WHERE model = $1 AND version = $2",
    )
    .bind(model)
    .bind(version)
    .fetch_one(db.pool())
    .await?;
    let accuracy = accuracy(db, model)
        .await?
        .remove(version)
        .unwrap_or_default();
    Ok(crate::rollout::Health {
        requests: u(row.try_get("requests")?),
        errors: u(row.try_get("errors")?),
        labeled: accuracy.labeled,
        correct: accuracy.correct,
    })
}

/// Totals of one model version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionTotals {
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Rows.
    pub rows: u64,
    /// Feedback accuracy.
    pub accuracy: Accuracy,
}

/// What the hub has received from one node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeTotals {
    /// Requests.
    pub requests: u64,
    /// Batches stored.
    pub batches: u64,
    /// Batches the node reported dropped from its full buffer.
    pub dropped_batches: u64,
    /// Requests in them.
    pub dropped_requests: u64,
}

/// Totals per model version and per node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Per model version.
    pub versions: Vec<VersionTotals>,
    /// Per node.
    pub nodes: BTreeMap<String, NodeTotals>,
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// Exact totals (from the per-batch running totals).
pub(crate) async fn summary(db: &Db, model: Option<&str>) -> Result<Summary> {
    let rows = sqlx::query(
        "SELECT node_id, model, version, requests, errors, rows_seen FROM telemetry_totals ORDER BY model, version, node_id",
    )
    .fetch_all(db.pool())
    .await?;
    let mut versions: BTreeMap<(String, String), VersionTotals> = BTreeMap::new();
    let mut nodes: BTreeMap<String, NodeTotals> = BTreeMap::new();
    for r in rows {
        let m: String = r.try_get("model")?;
        let node: String = r.try_get("node_id")?;
        let requests = u(r.try_get("requests")?);
        nodes.entry(node).or_default().requests += requests;
        if model.is_some_and(|want| want != m) {
            continue;
        }
        let v: String = r.try_get("version")?;
        let t = versions
            .entry((m.clone(), v.clone()))
            .or_insert_with(|| VersionTotals {
                model: m,
                version: v,
                ..VersionTotals::default()
            });
        t.requests += requests;
        t.errors += u(r.try_get("errors")?);
        t.rows += u(r.try_get("rows_seen")?);
    }
    let rows = sqlx::query(
        "SELECT node_id, batches, dropped_batches, dropped_requests FROM telemetry_node_totals",
    )
    .fetch_all(db.pool())
    .await?;
    for r in rows {
        let n = nodes.entry(r.try_get("node_id")?).or_default();
        n.batches = u(r.try_get("batches")?);
        n.dropped_batches = u(r.try_get("dropped_batches")?);
        n.dropped_requests = u(r.try_get("dropped_requests")?);
    }
    let models: BTreeSet<String> = versions.keys().map(|(m, _)| m.clone()).collect();
    for m in models {
        for (v, a) in accuracy(db, &m).await? {
            if let Some(t) = versions.get_mut(&(m.clone(), v)) {
                t.accuracy = a;
            }
        }
    }
    Ok(Summary {
        versions: versions.into_values().collect(),
        nodes,
    })
}

/// One model version in one window (all groups, or one).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WindowPoint {
    /// Window start (ms).
    pub start_ms: i64,
    /// Window end (ms).
    pub end_ms: i64,
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Rows.
    pub rows: u64,
    /// Median latency (ms).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency (ms).
    pub p99_ms: Option<f64>,
    /// Drift per feature.
    pub drift: Vec<FeatureDrift>,
    /// Live histograms per feature.
    pub features: Vec<FeatureHistogram>,
    /// Predicted classes.
    pub classes: BTreeMap<String, u64>,
}

/// The aggregate rows whose window starts in `[from, to)`: (group, window start, what the
/// group's nodes saw of one model version in it).
async fn load_windows(db: &Db, from: i64, to: i64) -> Result<Vec<(String, i64, ModelWindow)>> {
    let rows = sqlx::query(
        "SELECT grp, window_start, body FROM telemetry_windows WHERE window_start >= $1 AND window_start < $2 ORDER BY window_start",
    )
    .bind(from)
    .bind(to)
    .fetch_all(db.pool())
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let body: String = r.try_get("body")?;
        let Ok(m) = serde_json::from_str::<ModelWindow>(&body) else {
            continue;
        };
        out.push((r.try_get("grp")?, r.try_get("window_start")?, m));
    }
    Ok(out)
}

/// The reference statistics of a registered version (from its manifest summary).
pub(crate) async fn reference(
    db: &Db,
    model: &str,
    version: &str,
) -> Result<Option<ReferenceStats>> {
    Ok(db
        .version(model, version)
        .await?
        .and_then(|v| v.manifest.get("reference").cloned())
        .and_then(|r| serde_json::from_value::<ReferenceStats>(r).ok()))
}

fn merge_into(
    map: &mut BTreeMap<(String, String, String), ModelWindow>,
    group: &str,
    m: &ModelWindow,
) {
    let key = (m.model.clone(), m.version.clone(), group.to_owned());
    match map.get_mut(&key) {
        Some(w) => {
            if w.merge(m).is_err() {
                tracing::warn!(model = %m.model, version = %m.version, "telemetry with mismatched features ignored");
            }
        }
        None => {
            let mut w = m.clone();
            w.predictions.clear();
            map.insert(key, w);
        }
    }
}

/// The windows of the last `count` evaluation windows of `model`, per version; `group`
/// selects one node group (all groups merged otherwise).
pub(crate) async fn windows(
    s: &Shared,
    model: &str,
    group: Option<&str>,
    count: u32,
) -> Result<BTreeMap<String, Vec<WindowPoint>>> {
    let cfg = &s.config.monitor;
    let w = i64::try_from(cfg.window_ms).unwrap_or(60_000);
    let end = (now_ms() / w + 1) * w;
    let start = end - w * i64::from(count.clamp(1, 500));
    let mut per: BTreeMap<(String, i64), ModelWindow> = BTreeMap::new();
    for (g, start, m) in load_windows(&s.db, start, end).await? {
        if group.is_some_and(|want| want != g) || m.model != model {
            continue;
        }
        match per.entry((m.version.clone(), start / w * w)) {
            std::collections::btree_map::Entry::Occupied(mut acc) => {
                let _ = acc.get_mut().merge(&m);
            }
            std::collections::btree_map::Entry::Vacant(v) => {
                v.insert(m);
            }
        }
    }
    let mut references: BTreeMap<String, Option<ReferenceStats>> = BTreeMap::new();
    let mut out: BTreeMap<String, Vec<WindowPoint>> = BTreeMap::new();
    for ((version, ws), m) in per {
        if !references.contains_key(&version) {
            let r = reference(&s.db, model, &version).await?;
            references.insert(version.clone(), r);
        }
        let drift = match references.get(&version) {
            Some(Some(r)) => telemetry::drift(r, &m.features),
            _ => Vec::new(),
        };
        out.entry(version).or_default().push(WindowPoint {
            start_ms: ws,
            end_ms: ws + w,
            requests: m.requests,
            errors: m.error_count(),
            rows: m.rows,
            p50_ms: m.latency.quantile(0.5),
            p99_ms: m.latency.quantile(0.99),
            drift,
            features: m.features,
            classes: m.classes,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// Alerts

fn alert_row(r: &sqlx::any::AnyRow) -> Result<Alert> {
    Ok(Alert {
        key: r.try_get("key")?,
        rule: crate::db::named(r, "rule")?,
        model: r.try_get("model")?,
        version: r.try_get("version")?,
        group: r.try_get("grp")?,
        feature: r.try_get("feature")?,
        state: crate::db::named(r, "state")?,
        value: r.try_get("value")?,
        threshold: r.try_get("threshold")?,
        window_start_ms: r.try_get("window_start")?,
        window_end_ms: r.try_get("window_end")?,
        started_at_ms: r.try_get("started_at")?,
        updated_at_ms: r.try_get("updated_at")?,
    })
}

/// Every alert, firing first, newest first.
pub(crate) async fn alerts(db: &Db) -> Result<Vec<Alert>> {
    let rows = sqlx::query(
        "SELECT key, rule, model, version, grp, feature, state, value, threshold, window_start, window_end, started_at, updated_at \
         FROM alerts ORDER BY CASE WHEN state = 'firing' THEN 0 ELSE 1 END, updated_at DESC, key",
    )
    .fetch_all(db.pool())
    .await?;
    rows.iter().map(alert_row).collect()
}

/// Notifications sent (alerts and retraining), newest first.
pub(crate) async fn events(db: &Db, limit: i64) -> Result<Vec<Value>> {
    let rows = sqlx::query(
        "SELECT at_us, alert_key, kind, body, delivery FROM alert_events ORDER BY at_us DESC, id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db.pool())
    .await?;
    rows.iter()
        .map(|r| {
            Ok(json!({
                "at_us": r.try_get::<i64, _>("at_us")?,
                "alert": r.try_get::<String, _>("alert_key")?,
                "kind": r.try_get::<String, _>("kind")?,
                "body": serde_json::from_str::<Value>(&r.try_get::<String, _>("body")?).unwrap_or(Value::Null),
                "delivery": r.try_get::<String, _>("delivery")?,
            }))
        })
        .collect()
}

/// Evaluates every complete window not evaluated yet (at most the last ten), then again
/// any of the last ten that received batches after it was evaluated (a node that was
/// offline, a slow network).
pub(crate) async fn evaluate(s: &Shared) -> Result<()> {
    let cfg = &s.config.monitor;
    let w = i64::try_from(cfg.window_ms).unwrap_or(60_000);
    let grace = i64::try_from(cfg.grace_ms).unwrap_or(0);
    let now = now_ms();
    let until = (now - grace) / w * w;
    let done = s.db.state("telemetry_evaluated_until").await?;
    if until > done
        && s.db
            .claim_state("telemetry_evaluated_until", done, until)
            .await?
    {
        let from = if done == 0 {
            until - w
        } else {
            done.max(until - 10 * w)
        };
        let mut ws = from;
        while ws < until {
            evaluate_window(s, ws, ws + w).await?;
            ws += w;
        }
    }
    // Late batches: received since the last look, for windows evaluated before this call.
    let mark = s.db.state("telemetry_late_mark").await?;
    let upto = now - 500; // a batch received before this has committed
    if upto <= mark || done == 0 {
        if done == 0 && upto > mark {
            s.db.claim_state("telemetry_late_mark", mark, upto).await?;
        }
        return Ok(());
    }
    if !s.db.claim_state("telemetry_late_mark", mark, upto).await? {
        return Ok(());
    }
    let rows = sqlx::query(
        "SELECT DISTINCT window_start FROM telemetry_batches WHERE received_at > $1 AND received_at <= $2 AND window_start < $3 AND window_start >= $4",
    )
    .bind(mark)
    .bind(upto)
    .bind(done)
    .bind(done - 10 * w)
    .fetch_all(s.db.pool())
    .await?;
    let mut late = BTreeSet::new();
    for r in rows {
        late.insert(r.try_get::<i64, _>("window_start")? / w * w);
    }
    for ws in late {
        tracing::info!(
            window_start_ms = ws,
            "re-evaluating a window that received late telemetry"
        );
        evaluate_window(s, ws, ws + w).await?;
    }
    Ok(())
}

async fn evaluate_window(s: &Shared, ws: i64, we: i64) -> Result<()> {
    let cfg = &s.config.monitor;
    let mut agg: BTreeMap<(String, String, String), ModelWindow> = BTreeMap::new();
    for (g, _, m) in &load_windows(&s.db, ws, we).await? {
        merge_into(&mut agg, g, m);
    }
    let mut references: BTreeMap<(String, String), Option<ReferenceStats>> = BTreeMap::new();
    let mut findings = Vec::new();
    let mut reports: BTreeMap<(String, String), Vec<(String, FeatureDrift)>> = BTreeMap::new();
    for ((model, version, group), m) in &agg {
        let base = |rule: AlertRule, feature: &str, (value, threshold, breach): Measure| Finding {
            rule,
            model: model.clone(),
            version: version.clone(),
            group: group.clone(),
            feature: feature.to_owned(),
            value,
            threshold,
            breach,
        };
        if let Some(m) = alert::errors(&cfg.errors, m.requests, m.error_count()) {
            findings.push(base(AlertRule::Errors, "", m));
        }
        if let Some(m) = alert::latency(&cfg.latency, m.requests, m.latency.quantile(0.99)) {
            findings.push(base(AlertRule::Latency, "", m));
        }
        if !cfg.drift.enabled || m.features.is_empty() {
            continue;
        }
        let rkey = (model.clone(), version.clone());
        if !references.contains_key(&rkey) {
            let r = reference(&s.db, model, version).await?;
            references.insert(rkey.clone(), r);
        }
        let Some(Some(r)) = references.get(&rkey) else {
            continue;
        };
        for d in telemetry::drift(r, &m.features) {
            s.metrics
                .drift_psi
                .with_label_values(&[model, version, group, &d.feature])
                .set(d.psi);
            if let Some(ks) = d.ks {
                s.metrics
                    .drift_ks
                    .with_label_values(&[model, version, group, &d.feature])
                    .set(ks);
            }
            let Some(measure) = alert::drift(&cfg.drift, &d) else {
                continue;
            };
            findings.push(base(AlertRule::Drift, &d.feature, measure));
            reports
                .entry(rkey.clone())
                .or_default()
                .push((group.clone(), d));
        }
    }
    let models: BTreeSet<String> = agg.keys().map(|(m, _, _)| m.clone()).collect();
    for model in models {
        for (version, a) in accuracy(&s.db, &model).await? {
            let Some(value) = a.value() else { continue };
            s.metrics
                .accuracy
                .with_label_values(&[&model, &version])
                .set(value);
            let Some((value, threshold, breach)) =
                alert::accuracy(&cfg.accuracy, a.labeled, a.correct)
            else {
                continue;
            };
            findings.push(Finding {
                rule: AlertRule::Accuracy,
                model: model.clone(),
                version,
                group: "all".into(),
                feature: String::new(),
                value,
                threshold,
                breach,
            });
        }
    }
    apply(s, ws, we, findings, &reports).await
}

/// Moves alerts between firing and resolved, notifies on every change, and triggers
/// retraining once per model version when one of its retraining rules starts firing.
async fn apply(
    s: &Shared,
    ws: i64,
    we: i64,
    findings: Vec<Finding>,
    reports: &BTreeMap<(String, String), Vec<(String, FeatureDrift)>>,
) -> Result<()> {
    let cfg = &s.config.monitor;
    let existing: BTreeMap<String, Alert> = alerts(&s.db)
        .await?
        .into_iter()
        .map(|a| (a.key.clone(), a))
        .collect();
    let retrain_firing = |model: &str, version: &str| {
        existing.values().any(|a| {
            a.state == AlertState::Firing
                && a.model == model
                && a.version == version
                && cfg.retrain.on.contains(&a.rule)
        })
    };
    let mut retrain: BTreeMap<(String, String), Vec<Alert>> = BTreeMap::new();
    let now = now_ms();
    for f in findings {
        let Some(t) = alert::transition(existing.get(&f.key()), &f, ws, we, now) else {
            continue;
        };
        s.db.upsert_alert(&t.alert).await?;
        if !t.changed {
            continue; // no change: no notification (deduplicated)
        }
        let (key, state) = (&t.alert.key, t.alert.state);
        tracing::warn!(alert = %key, %state, value = f.value, threshold = f.threshold, "alert {state}");
        notify(
            s,
            key,
            state.as_str(),
            serde_json::to_value(&t.alert).unwrap_or(Value::Null),
            &cfg.webhooks,
        )
        .await?;
        if state == AlertState::Firing
            && cfg.retrain.on.contains(&f.rule)
            && !retrain_firing(&f.model, &f.version)
        {
            retrain
                .entry((f.model.clone(), f.version.clone()))
                .or_default()
                .push(t.alert);
        }
    }
    let all = alerts(&s.db).await?;
    let mut firing: BTreeMap<AlertRule, i64> = BTreeMap::new();
    for a in all.iter().filter(|a| a.state == AlertState::Firing) {
        *firing.entry(a.rule).or_default() += 1;
    }
    for rule in AlertRule::ALL {
        s.metrics
            .alerts_firing
            .with_label_values(&[rule.as_str()])
            .set(firing.get(rule).copied().unwrap_or(0));
    }
    for ((model, version), reasons) in retrain {
        let drift: Vec<Value> = reports
            .get(&(model.clone(), version.clone()))
            .map(|v| {
                v.iter()
                    .map(|(g, d)| {
                        let mut d = serde_json::to_value(d).unwrap_or(Value::Null);
                        if let Some(o) = d.as_object_mut() {
                            o.insert("group".into(), json!(g));
                        }
                        d
                    })
                    .collect()
            })
            .unwrap_or_default();
        let accuracy = accuracy(&s.db, &model)
            .await?
            .get(&version)
            .copied()
            .unwrap_or_default();
        let report = json!({
            "model": model,
            "version": version,
            "window_start_ms": ws,
            "window_end_ms": we,
            "reasons": reasons,
            "drift": drift,
            "accuracy": {"labeled": accuracy.labeled, "correct": accuracy.correct, "value": accuracy.value()},
        });
        trigger_retraining(s, &model, &version, report).await?;
    }
    Ok(())
}

/// POSTs `body` (with `"status"`) to every webhook (three attempts each) in the background,
/// and records the notification and how its delivery went.
async fn notify(s: &Shared, key: &str, kind: &str, body: Value, hooks: &[String]) -> Result<()> {
    let id = new_id();
    let mut body = body;
    if let Some(o) = body.as_object_mut() {
        o.insert("status".into(), json!(kind));
    }
    let text = body.to_string();
    s.db.add_alert_event(
        &id,
        key,
        kind,
        &text,
        if hooks.is_empty() {
            "no webhook"
        } else {
            "pending"
        },
    )
    .await?;
    if hooks.is_empty() {
        return Ok(());
    }
    let db = s.db.clone();
    let http = s.http.clone();
    let metrics = s.metrics.clone();
    let hooks = hooks.to_vec();
    tokio::spawn(async move {
        let mut results = Vec::new();
        for hook in &hooks {
            let outcome = deliver(&http, hook, &text).await;
            metrics
                .webhook_deliveries
                .with_label_values(&[if outcome.is_ok() {
                    "delivered"
                } else {
                    "failed"
                }])
                .inc();
            results.push(match outcome {
                Ok(()) => format!("{hook}: delivered"),
                Err(e) => {
                    tracing::error!(webhook = %hook, error = %e, "webhook delivery failed");
                    format!("{hook}: failed: {e}")
                }
            });
        }
        if let Err(e) = db.set_alert_delivery(&id, &results.join("; ")).await {
            tracing::error!(error = %e.chain(), "cannot record a webhook delivery");
        }
    });
    Ok(())
}

async fn deliver(http: &reqwest::Client, url: &str, body: &str) -> std::result::Result<(), String> {
    let mut last = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(
                250 * u64::from(attempt) * u64::from(attempt),
            ))
            .await;
        }
        match http
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("answered {}", r.status()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Writes the report, POSTs it to the retraining webhook and runs the retraining command.
async fn trigger_retraining(s: &Shared, model: &str, version: &str, report: Value) -> Result<()> {
    let cfg = &s.config.monitor.retrain;
    s.metrics.retrain_triggers.with_label_values(&[model]).inc();
    let dir = &s.config.monitor.reports_dir;
    let id = new_id();
    let path = dir.join(format!("retrain-{model}-{version}-{id}.json").replace(['/', '\\'], "_"));
    let text = serde_json::to_string_pretty(&report)?;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(Error::io(format!("creating {}", dir.display())))?;
    tokio::fs::write(&path, &text)
        .await
        .map_err(Error::io(format!("writing {}", path.display())))?;
    tracing::warn!(model, version, report = %path.display(), "retraining triggered");
    s.db.audit(
        "hub",
        "retrain.trigger",
        &json!({"model": model, "version": version, "report": path.display().to_string()})
            .to_string(),
        "",
    )
    .await?;
    let key = format!("retrain|{model}|{version}");
    let hooks: Vec<String> = cfg.webhook.iter().cloned().collect();
    notify(s, &key, "retrain", report, &hooks).await?;
    if let Some((program, args)) = cfg.command.split_first() {
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .arg(&path)
            .env("CAPSULE_RETRAIN_REPORT", &path)
            .env("CAPSULE_MODEL", model)
            .env("CAPSULE_VERSION", version)
            .kill_on_drop(false);
        let db = s.db.clone();
        let program = program.clone();
        tokio::spawn(async move {
            let status = match command.status().await {
                Ok(st) => st.to_string(),
                Err(e) => format!("could not start {program}: {e}"),
            };
            tracing::info!(%status, "retraining command finished");
            let _ = db
                .add_alert_event(
                    &new_id(),
                    &key,
                    "retrain.command",
                    &json!({"command": program}).to_string(),
                    &status,
                )
                .await;
        });
    }
    Ok(())
}

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

    #[test]
    fn accuracy_values() {
        assert_eq!(Accuracy::default().value(), None);
        assert_eq!(
            Accuracy {
                labeled: 8,
                correct: 6
            }
            .value(),
            Some(0.75)
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
        Accuracy {
            labeled: u(r.try_get("labeled").unwrap()),
            correct: u(r.try_get("correct").unwrap()),
        }
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
        assert_eq!(
            now().await?,
            Accuracy {
                labeled: 0,
                correct: 0
            }
        );
        store_feedback(&db, "x", "m", &labels(&[("p1", "a"), ("p3", "a")])).await?;
        assert_eq!(
            now().await?,
            Accuracy {
                labeled: 1,
                correct: 1
            },
            "p3 has no prediction yet"
        );
        assert!(store_batch(&db, &batch(2, &[("p3", "b")], 4), "g").await?);
        assert_eq!(
            now().await?,
            Accuracy {
                labeled: 2,
                correct: 1
            },
            "p3's label counts when it comes"
        );
        store_feedback(&db, "x", "m", &labels(&[("p1", "b")])).await?;
        assert_eq!(
            now().await?,
            Accuracy {
                labeled: 2,
                correct: 0
            },
            "a changed label moves correct"
        );
        store_feedback(&db, "x", "m", &labels(&[("p1", "b"), ("p3", "b")])).await?;
        assert_eq!(
            now().await?,
            Accuracy {
                labeled: 2,
                correct: 1
            }
        );
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
            sweep(&db, Duration::from_secs(3600), now_ms()).await?,
            0,
            "nothing expired"
        );
        let later = now_ms() + 2 * 3600 * 1000;
        assert_eq!(
            sweep(&db, Duration::from_secs(3600), later).await?,
            2 + 3 + 2
        );
        for table in ["telemetry_batches", "predictions", "feedback"] {
            assert_eq!(count(&db, table).await, 0, "{table}");
        }
        assert_eq!(
            now().await?,
            Accuracy {
                labeled: 2,
                correct: 1
            },
            "totals stay"
        );
        assert_eq!(summary(&db, None).await?.nodes["n1"], *n);
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
