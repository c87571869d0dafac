//! Windows as points (from the stored window rows), reference statistics.

use super::*;

/// The reference statistics of a registered version (from its manifest summary).
pub(crate) async fn reference(
    db: &Store,
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
    for (g, start, m) in s.db.load_windows(start, end).await? {
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
