//! Ingestion: a node's batches checked, stored once in its node group (the store folds them
//! into window rows and running totals) and counted in the metrics; feedback labels.

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
        let stored = s.db.store_batch(&b, &group).await?;
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

/// The node group a node's telemetry counts in: the value of its `group_label` label, else
/// `default`.
pub(super) async fn node_group(db: &Store, group_label: &str, node: &str) -> Result<String> {
    Ok(db
        .node(node)
        .await?
        .and_then(|n| n.labels.get(group_label).cloned())
        .unwrap_or_else(|| "default".into()))
}

/// Folds batches stored whole by earlier releases into the window rows, each in its node's
/// current group. Returns how many it folded.
pub(crate) async fn fold_stored_batches(db: &Store, group_label: &str) -> Result<u64> {
    let groups: BTreeMap<String, String> = db
        .nodes()
        .await?
        .into_iter()
        .map(|n| {
            let g = n.labels.get(group_label).cloned();
            (n.id, g.unwrap_or_else(|| "default".into()))
        })
        .collect();
    db.fold_stored_batches(&groups).await
}

/// Stores feedback sent straight to the hub (browsers), ids and labels cut to the length
/// telemetry keeps.
pub(crate) async fn store_feedback(
    db: &Store,
    source: &str,
    model: &str,
    items: &[(String, String)],
) -> Result<()> {
    let items: Vec<(String, String)> = items
        .iter()
        .map(|(id, label)| (telemetry::cut(id), telemetry::cut(label)))
        .collect();
    db.store_feedback(source, model, &items).await
}
