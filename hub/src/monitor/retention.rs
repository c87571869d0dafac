//! Retention: raw rows swept after `--retention`.

use super::*;

/// How long raw telemetry is kept unless `--retention` says otherwise.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);

/// How often the hub sweeps expired rows.
pub(crate) const SWEEP_EVERY: Duration = Duration::from_secs(600);

/// Rows one delete statement removes at most (each statement is its own transaction).
pub(super) const SWEEP_CHUNK: i64 = 5_000;

/// Deletes the raw history received more than `keep` before `now_ms`: telemetry batches,
/// predictions and labels, window aggregates, notification records. What the hub reports from stays: the
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
