//! Rollouts: the adapters between HTTP, the ticker and `crate::rollout`'s rules; the audit log.

use super::*;

/// Applies `event` to rollout `r` (see [`rollout::apply`]) and stores what it changed, with
/// the audit entry by `actor`; the rollout after it, or `None` when nothing changed or
/// another hub (or admin) changed it first.
pub(super) async fn change_rollout(
    s: &Shared,
    r: &Rollout,
    event: &Event,
    actor: &str,
    remote: &str,
) -> Result<Option<Rollout>> {
    let Some(change) = rollout::apply(r, event, s.db.now())? else {
        return Ok(None);
    };
    let after = &change.rollout;
    let mut detail = json!({
        "rollout": after.id,
        "state": after.state,
        "percent": after.percent,
        "reason": after.reason,
    });
    match event {
        Event::Tick => detail["timer"] = json!(true),
        Event::Health(served) => detail["served"] = json!(served),
        _ => {}
    }
    if !s
        .db
        .save_rollout(r, &change, actor, remote, &detail.to_string())
        .await?
    {
        return Ok(None);
    }
    tracing::info!(rollout = %after.id, state = %after.state, percent = after.percent,
        reason = %after.reason, by = %actor, "{}", change.action);
    s.changed().await?;
    Ok(Some(change.rollout))
}

/// Aborts every active rollout whose failure rate (assigned nodes that report a failure of
/// its version / assigned nodes) is above its threshold.
pub(super) async fn check_failures(s: &Shared) -> Result<()> {
    let active = s.db.active_rollouts().await?;
    if active.is_empty() {
        return Ok(());
    }
    let nodes = s.db.nodes().await?;
    for r in active {
        let event = Event::Reports(rollout::failures(&r, &nodes));
        change_rollout(s, &r, &event, "hub", "hub").await?;
    }
    Ok(())
}

/// The ticker's work on the active rollouts, read once per tick: a timed rollout steps when
/// its interval has passed, and a rollout that promotes itself is judged on its canary's
/// health (promoted when it held, aborted when it did not; see [`rollout::judge`]).
pub(crate) async fn tick_rollouts(s: &Shared) -> Result<()> {
    for r in s.db.active_rollouts().await? {
        let r = change_rollout(s, &r, &Event::Tick, "hub", "hub")
            .await?
            .unwrap_or(r);
        if r.auto_promote.is_none() {
            continue;
        }
        let served =
            s.db.version_health(&r.model, &r.version)
                .await?
                .since(&r.baseline);
        change_rollout(s, &r, &Event::Health(served), "hub", "hub").await?;
    }
    Ok(())
}

pub(super) async fn create_rollout(
    State(s): State<AppState>,
    Admin(c): Admin,
    RawBody(body): RawBody,
) -> Result<axum::Json<Rollout>> {
    let req: NewRollout = json_body(&body)?;
    if s.db.version(&req.model, &req.version).await?.is_none() {
        return Err(Error::NotFound(format!(
            "no version {} of {:?}",
            req.version, req.model
        )));
    }
    let previous =
        s.db.aliases(&req.model)
            .await?
            .get("production")
            .cloned()
            .unwrap_or_default();
    let baseline = match req.auto_promote {
        Some(_) => s.db.version_health(&req.model, &req.version).await?,
        None => Health::default(),
    };
    let active = s.db.active_rollouts().await?;
    let r = rollout::start(req, &active, new_id(), previous, baseline, s.db.now())?;
    s.db.add_rollout(&r).await?;
    audit(
        &s,
        &c,
        "rollout.create",
        serde_json::to_value(&r).unwrap_or(Value::Null),
    )
    .await?;
    s.changed().await?;
    Ok(axum::Json(r))
}

pub(super) async fn list_rollouts(
    State(s): State<AppState>,
    Admin(_): Admin,
) -> Result<axum::Json<RolloutList>> {
    Ok(axum::Json(RolloutList {
        rollouts: s.db.rollouts().await?,
    }))
}

pub(super) async fn show_rollout(
    State(s): State<AppState>,
    Admin(_): Admin,
    Path(id): Path<String>,
) -> Result<axum::Json<Rollout>> {
    s.db.rollout(&id)
        .await?
        .map(axum::Json)
        .ok_or_else(|| Error::NotFound(format!("no rollout {id:?}")))
}

/// `step` (next percentage), `promote` (production = the version), `abort` (back to the
/// production version), `rollback` (production = the version before the rollout).
pub(super) async fn rollout_action(
    State(s): State<AppState>,
    Admin(c): Admin,
    Path((id, action)): Path<(String, String)>,
) -> Result<axum::Json<Rollout>> {
    let action: RolloutAction = action
        .parse()
        .map_err(|e: capsule_format::hub::UnknownName| {
            Error::NotFound(format!("no rollout action: {e}"))
        })?;
    let r =
        s.db.rollout(&id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no rollout {id:?}")))?;
    let event = Event::Command {
        action,
        by: c.token.name.clone(),
    };
    match change_rollout(&s, &r, &event, &c.token.name, &c.remote).await? {
        Some(after) => Ok(axum::Json(after)),
        None => Err(Error::Conflict(format!(
            "rollout {id} changed while this {action} was applied: read it and try again"
        ))),
    }
}

pub(super) async fn audit_log(
    State(s): State<AppState>,
    Admin(_): Admin,
) -> Result<axum::Json<AuditLog>> {
    Ok(axum::Json(AuditLog {
        audit: s.db.audit_log().await?,
    }))
}
