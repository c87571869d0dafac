//! Telemetry ingestion: a node's batches stored once, folded into window rows and running
//! totals; predictions and feedback labels with their accuracy totals; batches stored whole by
//! earlier releases folded in; the retention sweep.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use capsule_format::telemetry::{self, ModelWindow, TelemetryBatch};
use sqlx::Row;

use super::{Store, to_i64};
use crate::Result;

/// Rows one transaction writes while a batch is stored: a batch holds up to tens of thousands
/// of predictions and feedback labels, and one transaction for all of them held the
/// database's write lock (SQLite has one) long enough to stall every report and register.
const ROWS_PER_TRANSACTION: usize = 1000;

/// Predictions one statement inserts (6 parameters each).
const PREDICTIONS_PER_STATEMENT: usize = 100;

/// Rows one delete statement removes at most (each statement is its own transaction).
const SWEEP_CHUNK: i64 = 5_000;

/// A transaction of the store's pool.
type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

impl Store {
    /// Stores a batch once, its windows counted in node group `group`: `false` when it was
    /// stored already (a retry).
    ///
    /// Its predictions and feedback go first, in transactions of [`ROWS_PER_TRANSACTION`]:
    /// their inserts are idempotent, so a crash between two of them only means a retry writes
    /// the same rows again. The batch row and the totals it adds go last, in one transaction:
    /// the row is what makes the totals count exactly once.
    pub(crate) async fn store_batch(&self, b: &TelemetryBatch, group: &str) -> Result<bool> {
        let known =
            sqlx::query("SELECT 1 AS one FROM telemetry_batches WHERE node_id = $1 AND seq = $2")
                .bind(&b.node_id)
                .bind(to_i64(b.seq))
                .fetch_optional(&self.reads)
                .await?;
        if known.is_some() {
            return Ok(false);
        }
        let now = self.clock.now_ms();
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
            let mut tx = self.pool.begin().await?;
            let mut rows = 0;
            while rows < ROWS_PER_TRANSACTION {
                let Some(unit) = units.next() else { break };
                match unit {
                    Unit::Predictions(part) => {
                        insert_predictions(&mut tx, &b.node_id, now, part).await?;
                        rows += part.len();
                    }
                    Unit::Feedback(f) => {
                        insert_feedback(&mut tx, &f.model, &f.id, &f.label, &b.node_id, now)
                            .await?;
                        rows += 1;
                    }
                }
            }
            tx.commit().await?;
        }
        let mut tx = self.pool.begin().await?;
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

    /// Stores feedback labels of `model`, (prediction id, label) each, from `source` in one
    /// transaction (see [`insert_feedback`]).
    pub(crate) async fn store_feedback(
        &self,
        source: &str,
        model: &str,
        items: &[(String, String)],
    ) -> Result<()> {
        let now = self.clock.now_ms();
        let mut tx = self.pool.begin().await?;
        for (id, label) in items {
            insert_feedback(&mut tx, model, id, label, source, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Folds batches stored whole by earlier releases into the window rows, 500 at a time
    /// (each chunk one transaction, its batches' bodies emptied in it), each batch in its
    /// node's group in `groups` (`default` for a node not in it). Returns how many it folded.
    pub(crate) async fn fold_stored_batches(
        &self,
        groups: &BTreeMap<String, String>,
    ) -> Result<u64> {
        let mut folded = 0;
        loop {
            let rows = sqlx::query(
                "SELECT node_id, seq, body FROM telemetry_batches WHERE body <> '' ORDER BY node_id, seq LIMIT 500",
            )
            .fetch_all(&self.reads)
            .await?;
            if rows.is_empty() {
                return Ok(folded);
            }
            let now = self.clock.now_ms();
            let mut tx = self.pool.begin().await?;
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
                sqlx::query(
                    "UPDATE telemetry_batches SET body = '' WHERE node_id = $1 AND seq = $2",
                )
                .bind(&node)
                .bind(seq)
                .execute(&mut *tx)
                .await?;
                folded += 1;
            }
            tx.commit().await?;
        }
    }

    /// Deletes the raw history received more than `keep` before `now_ms`: telemetry batches,
    /// predictions and labels, window aggregates, notification records. What the hub reports
    /// from stays: the running totals (requests, errors, accuracy), alerts, rollouts, the
    /// audit log. Each statement deletes at most [`SWEEP_CHUNK`] rows, so the first sweep of a
    /// long history does not hold SQLite's write lock for long. Returns the rows deleted.
    pub(crate) async fn sweep(&self, keep: Duration, now_ms: i64) -> Result<u64> {
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
            // By when the hub last folded a batch into the row, never by the window's end: a
            // node names its windows, and a window dated in the future must not outlive the
            // retention.
            (
                "DELETE FROM telemetry_windows WHERE (model, version, grp, window_start) IN (SELECT model, version, grp, window_start FROM telemetry_windows WHERE updated_at < $1 LIMIT $2)",
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
                    .execute(&self.pool)
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
}

/// Inserts predictions (one statement; a prediction the hub has is left as it is) and counts
/// those whose label came first into their version's accuracy (one more statement).
async fn insert_predictions(
    tx: &mut Tx<'_>,
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

/// Adds one batch's window of a model version to its aggregate row (model, version, group,
/// window start), creating it when it is the first. The first statement either creates the
/// row or, when it exists, does nothing; an existing row is then locked (PostgreSQL: the
/// no-op update; SQLite: the transaction's write lock), read, merged and written, so two
/// hubs folding into one row at once add up instead of overwriting each other.
async fn fold_window(
    tx: &mut Tx<'_>,
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

/// Stores a label (a later label of the same prediction replaces it) and keeps its model
/// version's accuracy totals: a label of a prediction the hub has counts once, a changed label
/// moves `correct` by what changed; a label that comes first counts when its prediction does.
///
/// The first statement locks an existing label's row (PostgreSQL) or the database (SQLite)
/// for the transaction, so two changes of one label are counted one after the other. On
/// PostgreSQL, two *first* labels of one prediction committed at the same instant by two
/// hubs may both count it (`labeled` one too high); SQLite serializes them.
async fn insert_feedback(
    tx: &mut Tx<'_>,
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

/// Adds to a model version's running accuracy totals.
async fn add_accuracy(
    tx: &mut Tx<'_>,
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use capsule_format::hub::Accuracy;
    use capsule_format::telemetry::{self, ModelWindow, TelemetryBatch};
    use sqlx::Row;

    use crate::store::{Store, u};
    use crate::{Error, Result};

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

    async fn count(db: &Store, table: &str) -> i64 {
        sqlx::query(&format!("SELECT COUNT(*) AS n FROM {table}"))
            .fetch_one(&db.pool)
            .await
            .and_then(|r| r.try_get("n"))
            .unwrap_or(-1)
    }

    /// The totals as a recount from the stored rows gives them.
    async fn recount(db: &Store) -> Accuracy {
        let r = sqlx::query(
            "SELECT COUNT(*) AS labeled, CAST(COALESCE(SUM(CASE WHEN p.class = f.label THEN 1 ELSE 0 END), 0) AS BIGINT) AS correct \
             FROM predictions p JOIN feedback f ON p.model = f.model AND p.id = f.id",
        )
        .fetch_one(&db.pool)
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
        let db =
            Store::connect(&format!("sqlite://{}", dir.path().join("hub.db").display())).await?;
        let labels = |items: &[(&str, &str)]| -> Vec<(String, String)> {
            items
                .iter()
                .map(|(i, l)| ((*i).into(), (*l).into()))
                .collect()
        };
        let now = || async {
            db.accuracy("m")
                .await
                .map(|a| a.get("1").copied().unwrap_or_default())
        };
        // (step, accuracy after it) — each checked against a recount of the rows
        assert!(
            db.store_batch(&batch(1, &[("p1", "a"), ("p2", "b")], 0), "g")
                .await?
        );
        assert_eq!(now().await?, Accuracy::new(0, 0));
        db.store_feedback("x", "m", &labels(&[("p1", "a"), ("p3", "a")]))
            .await?;
        assert_eq!(
            now().await?,
            Accuracy::new(1, 1),
            "p3 has no prediction yet"
        );
        assert!(db.store_batch(&batch(2, &[("p3", "b")], 4), "g").await?);
        assert_eq!(
            now().await?,
            Accuracy::new(2, 1),
            "p3's label counts when it comes"
        );
        db.store_feedback("x", "m", &labels(&[("p1", "b")])).await?;
        assert_eq!(
            now().await?,
            Accuracy::new(2, 0),
            "a changed label moves correct"
        );
        db.store_feedback("x", "m", &labels(&[("p1", "b"), ("p3", "b")]))
            .await?;
        assert_eq!(now().await?, Accuracy::new(2, 1));
        assert!(
            !db.store_batch(&batch(1, &[("p1", "a"), ("p2", "b")], 0), "g")
                .await?,
            "a retry"
        );
        assert_eq!(now().await?, recount(&db).await);
        let s = db.summary(None).await?;
        let n = &s.nodes["n1"];
        assert_eq!(
            (n.batches, n.dropped_batches, n.dropped_requests, n.requests),
            (2, 4, 40, 3)
        );

        assert_eq!(
            db.sweep(Duration::from_secs(3600), db.clock().now_ms())
                .await?,
            0,
            "nothing expired"
        );
        // A hostile node's window dated in the year 3000 is swept like any other.
        let mut future = batch(3, &[], 0);
        (future.window_start_ms, future.window_end_ms) = (32_503_680_000_000, 32_503_680_010_000);
        assert!(db.store_batch(&future, "g").await?);
        let later = db.clock().now_ms() + 2 * 3600 * 1000;
        // 3 batch rows, 3 predictions, 2 labels, 2 window rows
        assert_eq!(
            db.sweep(Duration::from_secs(3600), later).await?,
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
        let after = &db.summary(None).await?.nodes["n1"];
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
        let db =
            Store::connect(&format!("sqlite://{}", dir.path().join("hub.db").display())).await?;
        let mut other_node = batch(1, &[("q1", "a")], 0);
        other_node.node_id = "n2".into();
        db.store_batch(&batch(1, &[("p1", "a"), ("p2", "b")], 0), "eu")
            .await?;
        db.store_batch(&other_node, "eu").await?;
        db.store_batch(&batch(2, &[("p3", "a")], 0), "us").await?;
        // A batch stored whole by an earlier release, in the same window and group.
        let mut old = batch(1, &[("r1", "a"), ("r2", "a"), ("r3", "a")], 0);
        old.node_id = "n3".into();
        sqlx::query(
            "INSERT INTO telemetry_batches (node_id, seq, window_start, window_end, received_at, requests, dropped_batches, dropped_requests, body) \
             VALUES ('n3', 1, 0, 1000, 0, 3, 0, 0, $1)",
        )
        .bind(serde_json::to_string(&old)?)
        .execute(&db.pool)
        .await?;
        assert_eq!(db.fold_stored_batches(&BTreeMap::new()).await?, 1);
        assert_eq!(
            db.fold_stored_batches(&BTreeMap::new()).await?,
            0,
            "folded once"
        );
        let mut rows: Vec<(String, i64, u64, usize)> = db
            .load_windows(0, 1)
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
                .fetch_one(&db.pool)
                .await?
                .try_get("n")?;
        assert_eq!(bodies, 0, "batch rows keep no body");
        Ok(())
    }
}
