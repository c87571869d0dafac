//! Queries: accuracy, version health, summaries, windows, reference statistics.

use super::*;

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
            Accuracy::new(u(r.try_get("labeled")?), u(r.try_get("correct")?)),
        );
    }
    Ok(out)
}

/// Accuracy of every model version that has labels, from the running totals.
pub(crate) async fn accuracies(db: &Db) -> Result<Vec<(String, String, Accuracy)>> {
    let rows = sqlx::query("SELECT model, version, labeled, correct FROM accuracy_totals")
        .fetch_all(db.pool())
        .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("model")?,
                r.try_get("version")?,
                Accuracy::new(u(r.try_get("labeled")?), u(r.try_get("correct")?)),
            ))
        })
        .collect()
}

/// Batches the nodes report they dropped from their full buffers, all nodes together.
pub(crate) async fn dropped_batches(db: &Db) -> Result<u64> {
    let row = sqlx::query(
        "SELECT CAST(COALESCE(SUM(dropped_batches), 0) AS BIGINT) AS n FROM telemetry_node_totals",
    )
    .fetch_one(db.pool())
    .await?;
    Ok(u(row.try_get("n")?))
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

pub(super) fn u(v: i64) -> u64 {
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

/// The aggregate rows whose window starts in `[from, to)`: (group, window start, what the
/// group's nodes saw of one model version in it).
pub(super) async fn load_windows(
    db: &Db,
    from: i64,
    to: i64,
) -> Result<Vec<(String, i64, ModelWindow)>> {
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
        .and_then(|v| v.manifest.reference))
}

pub(super) fn merge_into(
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
    let end = (s.db.clock().now_ms() / w + 1) * w;
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
