//! What monitoring reads (accuracy, version health, summaries, window rows, late windows)
//! and the alerts and notifications it writes.

use std::collections::{BTreeMap, BTreeSet};

use capsule_format::hub::{
    Accuracy, Alert, AlertEvent, EventKind, NodeTotals, Summary, VersionTotals,
};
use capsule_format::telemetry::ModelWindow;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::{Store, named, u};
use crate::Result;
use crate::rollout::Health;

fn alert_row(r: &AnyRow) -> Result<Alert> {
    Ok(Alert {
        key: r.try_get("key")?,
        rule: named(r, "rule")?,
        model: r.try_get("model")?,
        version: r.try_get("version")?,
        group: r.try_get("grp")?,
        feature: r.try_get("feature")?,
        state: named(r, "state")?,
        value: r.try_get("value")?,
        threshold: r.try_get("threshold")?,
        window_start_ms: r.try_get("window_start")?,
        window_end_ms: r.try_get("window_end")?,
        started_at_ms: r.try_get("started_at")?,
        updated_at_ms: r.try_get("updated_at")?,
    })
}

fn accuracy_row(r: &AnyRow) -> Result<Accuracy> {
    Ok(Accuracy::new(
        u(r.try_get("labeled")?),
        u(r.try_get("correct")?),
    ))
}

impl Store {
    /// Creates or updates an alert.
    pub(crate) async fn upsert_alert(&self, a: &Alert) -> Result<()> {
        sqlx::query(
            "INSERT INTO alerts (key, rule, model, version, grp, feature, state, value, threshold, window_start, window_end, started_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) \
             ON CONFLICT (key) DO UPDATE SET state = excluded.state, value = excluded.value, threshold = excluded.threshold, \
             window_start = excluded.window_start, window_end = excluded.window_end, started_at = excluded.started_at, updated_at = excluded.updated_at",
        )
        .bind(&a.key)
        .bind(a.rule.as_str())
        .bind(&a.model)
        .bind(&a.version)
        .bind(&a.group)
        .bind(&a.feature)
        .bind(a.state.as_str())
        .bind(a.value)
        .bind(a.threshold)
        .bind(a.window_start_ms)
        .bind(a.window_end_ms)
        .bind(a.started_at_ms)
        .bind(a.updated_at_ms)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records a notification.
    pub(crate) async fn add_alert_event(
        &self,
        id: &str,
        key: &str,
        kind: EventKind,
        body: &str,
        delivery: &str,
    ) -> Result<()> {
        sqlx::query("INSERT INTO alert_events (id, at_us, alert_key, kind, body, delivery) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(id)
            .bind(self.clock.now_us())
            .bind(key)
            .bind(kind.as_str())
            .bind(body)
            .bind(delivery)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records how a notification's delivery went.
    pub(crate) async fn set_alert_delivery(&self, id: &str, delivery: &str) -> Result<()> {
        sqlx::query("UPDATE alert_events SET delivery = $1 WHERE id = $2")
            .bind(delivery)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Every alert, firing first, newest first.
    pub(crate) async fn alerts(&self) -> Result<Vec<Alert>> {
        let rows = sqlx::query(
            "SELECT key, rule, model, version, grp, feature, state, value, threshold, window_start, window_end, started_at, updated_at \
             FROM alerts ORDER BY CASE WHEN state = 'firing' THEN 0 ELSE 1 END, updated_at DESC, key",
        )
        .fetch_all(&self.reads)
        .await?;
        rows.iter().map(alert_row).collect()
    }

    /// Notifications sent (alerts and retraining), newest first, at most `limit`.
    pub(crate) async fn events(&self, limit: i64) -> Result<Vec<AlertEvent>> {
        let rows = sqlx::query(
            "SELECT at_us, alert_key, kind, body, delivery FROM alert_events ORDER BY at_us DESC, id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(AlertEvent {
                    at_us: r.try_get("at_us")?,
                    alert: r.try_get("alert_key")?,
                    kind: named(r, "kind")?,
                    body: serde_json::from_str(&r.try_get::<String, _>("body")?).ok(),
                    delivery: r.try_get("delivery")?,
                })
            })
            .collect()
    }

    /// Accuracy per version of `model` (running totals kept as labels and predictions arrive).
    pub(crate) async fn accuracy(&self, model: &str) -> Result<BTreeMap<String, Accuracy>> {
        let rows =
            sqlx::query("SELECT version, labeled, correct FROM accuracy_totals WHERE model = $1")
                .bind(model)
                .fetch_all(&self.reads)
                .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("version")?, accuracy_row(r)?)))
            .collect()
    }

    /// Accuracy of every model version that has labels, from the running totals.
    pub(crate) async fn accuracies(&self) -> Result<Vec<(String, String, Accuracy)>> {
        let rows = sqlx::query("SELECT model, version, labeled, correct FROM accuracy_totals")
            .fetch_all(&self.reads)
            .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("model")?, r.try_get("version")?, accuracy_row(r)?)))
            .collect()
    }

    /// Batches the nodes report they dropped from their full buffers, all nodes together.
    pub(crate) async fn dropped_batches(&self) -> Result<u64> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(dropped_batches), 0) AS BIGINT) AS n FROM telemetry_node_totals",
        )
        .fetch_one(&self.reads)
        .await?;
        Ok(u(row.try_get("n")?))
    }

    /// What one model version has served on every node, with its feedback accuracy: a
    /// self-promoting rollout's evidence.
    pub(crate) async fn version_health(&self, model: &str, version: &str) -> Result<Health> {
        let row = sqlx::query(
            "SELECT CAST(COALESCE(SUM(requests), 0) AS BIGINT) AS requests, \
             CAST(COALESCE(SUM(errors), 0) AS BIGINT) AS errors \
             FROM telemetry_totals WHERE model = $1 AND version = $2",
        )
        .bind(model)
        .bind(version)
        .fetch_one(&self.reads)
        .await?;
        let accuracy = self
            .accuracy(model)
            .await?
            .remove(version)
            .unwrap_or_default();
        Ok(Health {
            requests: u(row.try_get("requests")?),
            errors: u(row.try_get("errors")?),
            labeled: accuracy.labeled,
            correct: accuracy.correct,
        })
    }

    /// Exact totals (from the per-batch running totals): per version (of `model` only, when
    /// given) and per node.
    pub(crate) async fn summary(&self, model: Option<&str>) -> Result<Summary> {
        let rows = sqlx::query(
            "SELECT node_id, model, version, requests, errors, rows_seen FROM telemetry_totals ORDER BY model, version, node_id",
        )
        .fetch_all(&self.reads)
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
        .fetch_all(&self.reads)
        .await?;
        for r in rows {
            let n = nodes.entry(r.try_get("node_id")?).or_default();
            n.batches = u(r.try_get("batches")?);
            n.dropped_batches = u(r.try_get("dropped_batches")?);
            n.dropped_requests = u(r.try_get("dropped_requests")?);
        }
        let models: BTreeSet<String> = versions.keys().map(|(m, _)| m.clone()).collect();
        for m in models {
            for (v, a) in self.accuracy(&m).await? {
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

    /// The aggregate rows whose window starts in `[from, to)`, oldest first: (group, window
    /// start, what the group's nodes saw of one model version in it). A row in a shape this
    /// release does not read is left out.
    pub(crate) async fn load_windows(
        &self,
        from: i64,
        to: i64,
    ) -> Result<Vec<(String, i64, ModelWindow)>> {
        let rows = sqlx::query(
            "SELECT grp, window_start, body FROM telemetry_windows WHERE window_start >= $1 AND window_start < $2 ORDER BY window_start",
        )
        .bind(from)
        .bind(to)
        .fetch_all(&self.reads)
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

    /// The window starts (as the nodes named them) in `[from, to)` of the batches received
    /// in `(after, until]` (milliseconds), each once.
    pub(crate) async fn late_windows(
        &self,
        after: i64,
        until: i64,
        from: i64,
        to: i64,
    ) -> Result<Vec<i64>> {
        let rows = sqlx::query(
            "SELECT DISTINCT window_start FROM telemetry_batches WHERE received_at > $1 AND received_at <= $2 AND window_start < $3 AND window_start >= $4",
        )
        .bind(after)
        .bind(until)
        .bind(to)
        .bind(from)
        .fetch_all(&self.reads)
        .await?;
        rows.iter()
            .map(|r| Ok(r.try_get("window_start")?))
            .collect()
    }
}
