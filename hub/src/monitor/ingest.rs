//! Ingestion: a node's batches stored once, folded into window rows and running totals;
//! predictions and feedback labels with their accuracy totals.

use super::*;

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

pub(super) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Rows one transaction writes while a batch is stored: a batch holds up to tens of thousands
/// of predictions and feedback labels, and one transaction for all of them held the
/// database's write lock (SQLite has one) long enough to stall every report and register.
pub(super) const ROWS_PER_TRANSACTION: usize = 1000;

/// Predictions one statement inserts (6 parameters each).
pub(super) const PREDICTIONS_PER_STATEMENT: usize = 100;

/// Inserts predictions (one statement; a prediction the hub has is left as it is) and counts
/// those whose label came first into their version's accuracy (one more statement).
pub(super) async fn insert_predictions(
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
pub(super) async fn node_group(db: &Db, group_label: &str, node: &str) -> Result<String> {
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
pub(super) async fn fold_window(
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
        let now = db.clock().now_ms();
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
pub(super) async fn store_batch(db: &Db, b: &TelemetryBatch, group: &str) -> Result<bool> {
    let known =
        sqlx::query("SELECT 1 AS one FROM telemetry_batches WHERE node_id = $1 AND seq = $2")
            .bind(&b.node_id)
            .bind(to_i64(b.seq))
            .fetch_optional(db.pool())
            .await?;
    if known.is_some() {
        return Ok(false);
    }
    let now = db.clock().now_ms();
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
pub(super) async fn insert_feedback(
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

pub(super) async fn add_accuracy(
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
    let now = db.clock().now_ms();
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
