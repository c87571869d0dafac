//! Telemetry, feedback, alerts and `/metrics`.

use capsule_format::telemetry::{FeedbackRequest, Shipment};

use super::*;

/// Telemetry batches from a node (its own token): stored once each, acknowledged always.
pub(super) async fn post_telemetry(
    State(s): State<AppState>,
    caller: Caller,
    RawBody(body): RawBody,
) -> Result<axum::Json<TelemetryAck>> {
    if caller.token.role != Role::Node {
        return Err(Error::Forbidden(
            "telemetry is sent with a node token (the batches name their node)".into(),
        ));
    }
    let shipment: Shipment = json_body(&body)?;
    let acked = crate::monitor::ingest(&s, &caller.token.node, shipment.batches).await?;
    s.seen.note(&caller.token.node, s.db.now());
    Ok(axum::Json(TelemetryAck { acked }))
}

/// Ground-truth labels sent straight to the hub (browsers; nodes send theirs in telemetry).
pub(super) async fn post_feedback(
    State(s): State<AppState>,
    caller: Caller,
    RawBody(body): RawBody,
) -> Result<axum::Json<FeedbackAccepted>> {
    let b: FeedbackRequest = json_body(&body)?;
    if b.feedback.len() > capsule_format::telemetry::MAX_FEEDBACK {
        return Err(Error::TooLarge(format!(
            "{} labels in one request (at most {})",
            b.feedback.len(),
            capsule_format::telemetry::MAX_FEEDBACK
        )));
    }
    let items = b
        .feedback
        .into_iter()
        .map(|f| f.resolve().map_err(Error::Invalid))
        .collect::<Result<Vec<_>>>()?;
    let source = if caller.token.role == Role::Node {
        caller.token.node.clone()
    } else {
        caller.token.name.clone()
    };
    crate::monitor::store_feedback(&s.db, &source, &b.model, &items).await?;
    Ok(axum::Json(FeedbackAccepted {
        accepted: items.len(),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TelemetryQuery {
    model: Option<String>,
    group: Option<String>,
    count: Option<u32>,
}

pub(super) async fn telemetry_summary(
    State(s): State<AppState>,
    _admin: Admin,
    Query(q): Query<TelemetryQuery>,
) -> Result<axum::Json<Summary>> {
    Ok(axum::Json(s.db.summary(q.model.as_deref()).await?))
}

pub(super) async fn telemetry_windows(
    State(s): State<AppState>,
    _admin: Admin,
    Query(q): Query<TelemetryQuery>,
) -> Result<axum::Json<Windows>> {
    let model = q
        .model
        .ok_or_else(|| Error::BadRequest("model=NAME is required".into()))?;
    let windows =
        crate::monitor::windows(&s, &model, q.group.as_deref(), q.count.unwrap_or(60)).await?;
    Ok(axum::Json(Windows {
        model,
        window_ms: s.config.monitor.window_ms,
        versions: windows,
    }))
}

pub(super) async fn list_alerts(
    State(s): State<AppState>,
    _admin: Admin,
) -> Result<axum::Json<AlertList>> {
    Ok(axum::Json(AlertList {
        alerts: s.db.alerts().await?,
        events: s.db.events(200).await?,
        evaluated_until_ms: s.db.state("telemetry_evaluated_until").await?,
    }))
}

/// Refreshes the gauges read from the database (nodes, their models, rollouts, dropped
/// telemetry) and answers the text exposition.
pub(super) async fn metrics(State(s): State<AppState>) -> Result<Response> {
    let offline_after = i64::try_from(s.config.monitor.offline_after_s).unwrap_or(i64::MAX);
    let (total, online) =
        s.db.node_counts(s.db.now().saturating_sub(offline_after))
            .await?;
    let m = &s.metrics;
    m.nodes.with_label_values(&["online"]).set(online);
    m.nodes.with_label_values(&["offline"]).set(total - online);
    m.node_models.reset();
    let registered = s.db.registered_versions().await?;
    for (model, version, state, n) in s.db.model_state_counts().await? {
        let [model, version] = crate::metrics::version_labels(&registered, &model, &version);
        m.node_models
            .with_label_values(&[model, version, state.as_str()])
            .add(n);
    }
    let counts = s.db.rollout_counts().await?;
    for state in RolloutState::ALL {
        m.rollouts
            .with_label_values(&[state.as_str()])
            .set(counts.get(state).copied().unwrap_or(0));
    }
    for (model, version, a) in s.db.accuracies().await? {
        if let Some(value) = a.value {
            m.accuracy.with_label_values(&[&model, &version]).set(value);
        }
    }
    m.telemetry_dropped
        .set(i64::try_from(s.db.dropped_batches().await?).unwrap_or(i64::MAX));
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.encode()?,
    )
        .into_response())
}
