//! The fleet: nodes, tokens, registration, desired state (long-polls) and reports.

use super::*;

pub(super) async fn list_nodes(
    State(s): State<AppState>,
    Admin(_): Admin,
) -> Result<axum::Json<NodeList>> {
    Ok(axum::Json(NodeList {
        nodes: s.db.nodes().await?,
    }))
}

/// Every token the hub accepts (admin only): kind, name, node, issue time and the first 8
/// hex digits of its hash; never a token.
pub(super) async fn list_tokens(
    State(s): State<AppState>,
    Admin(_): Admin,
) -> Result<axum::Json<TokenList>> {
    Ok(axum::Json(TokenList {
        tokens: s.db.tokens().await?,
    }))
}

/// Issues a token: stored hashed, shown once.
pub(super) async fn issue(
    s: &Shared,
    c: &Caller,
    kind: Role,
    name: String,
    node: String,
) -> Result<IssuedToken> {
    let token = crate::new_token(match kind {
        Role::Admin => "hubadmin",
        Role::Node => "hubnode",
    });
    let hash = token_hash(&token);
    s.db.add_token(&hash, kind, &name, &node).await?;
    let hash_prefix: String = hash.chars().take(8).collect();
    let action = match kind {
        Role::Admin => "token.issue",
        Role::Node => "node.token",
    };
    audit(
        s,
        c,
        action,
        json!({"kind": kind, "name": name, "node": node, "hash_prefix": hash_prefix}),
    )
    .await?;
    tracing::info!(%kind, name = ?name, by = %c.token.name, "token issued");
    Ok(IssuedToken {
        kind,
        name,
        node,
        token,
        hash_prefix,
    })
}

/// Issues an admin token (a rotation: issue the new one, move to it, revoke the old one).
pub(super) async fn admin_token(
    State(s): State<AppState>,
    Admin(c): Admin,
    RawBody(body): RawBody,
) -> Result<axum::Json<IssuedToken>> {
    let req: NewToken = json_body(&body)?;
    if let Some(problem) = req.problem() {
        return Err(Error::BadRequest(problem));
    }
    Ok(axum::Json(
        issue(&s, &c, Role::Admin, req.name, String::new()).await?,
    ))
}

/// Revokes one token, named by the first digits of its hash (`GET /api/v1/tokens`).
pub(super) async fn revoke_token(
    State(s): State<AppState>,
    Admin(c): Admin,
    Path(prefix): Path<String>,
) -> Result<axum::Json<TokenRevoked>> {
    let revoked = s.db.revoke_token(&prefix).await?;
    audit(&s, &c, "token.revoke", json!(revoked)).await?;
    tracing::info!(kind = %revoked.kind, name = ?revoked.name, by = %c.token.name, "token revoked");
    Ok(axum::Json(TokenRevoked { revoked }))
}

/// Revokes every token of one node (a lost or stolen device): its next request is 401.
pub(super) async fn revoke_node_tokens(
    State(s): State<AppState>,
    Admin(c): Admin,
    Path(id): Path<String>,
) -> Result<axum::Json<NodeTokensRevoked>> {
    let revoked = s.db.revoke_node_tokens(&id).await?;
    audit(
        &s,
        &c,
        "node.token.revoke",
        json!({"node": id, "revoked": revoked}),
    )
    .await?;
    tracing::info!(node = ?id, revoked, by = %c.token.name, "node tokens revoked");
    Ok(axum::Json(NodeTokensRevoked { node: id, revoked }))
}

/// Issues a token for one node (shown once; stored hashed).
pub(super) async fn node_token(
    State(s): State<AppState>,
    Admin(c): Admin,
    Path(id): Path<String>,
) -> Result<axum::Json<IssuedToken>> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(Error::BadRequest(format!(
            "node id {id:?}: 1 to 128 letters, digits, - _ ."
        )));
    }
    Ok(axum::Json(
        issue(&s, &c, Role::Node, format!("node:{id}"), id).await?,
    ))
}

pub(super) async fn register(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> Result<axum::Json<Registered>> {
    let c = caller.for_node(&id)?;
    let reg: Registration = json_body(&body)?;
    let changed = s.db.register_node(&id, &reg.labels).await?;
    tracing::info!(node = %id, by = %c.token.name, changed, "node registered");
    // Labels decide rollouts: wake long-polls so the node gets its state at once. The same
    // labels again change nothing, and wake no one (every long-poll of the fleet would).
    if changed {
        s.changed().await?;
    }
    Ok(axum::Json(Registered {
        node: id,
        labels: reg.labels,
    }))
}

#[derive(Deserialize)]
pub(super) struct DesiredQuery {
    #[serde(default)]
    after: Option<i64>,
    #[serde(default)]
    wait_ms: Option<u64>,
}

/// The node's desired state; with `after=G`, waits (up to `wait_ms`) until the state's
/// generation differs from G.
pub(super) async fn desired(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(q): Query<DesiredQuery>,
) -> Result<axum::Json<DesiredState>> {
    caller.for_node(&id)?;
    if let Some(after) = q.after {
        let wait = Duration::from_millis(q.wait_ms.unwrap_or(0)).min(s.config.max_wait);
        let mut rx = s.generation.clone();
        s.metrics.long_polls.inc();
        // A node that saw a generation this hub has not reached (its database was restored
        // from a backup, or replaced) gets the state at once: waiting for the generation to
        // pass G would stall it for the whole long-poll.
        let mut stopping = s.stopping.clone();
        tokio::select! {
            _ = tokio::time::timeout(wait, rx.wait_for(|g| *g != after)) => {}
            // A stopping hub answers now; the node polls again (another replica, or this
            // hub once it is back).
            _ = stopping.wait_for(|s| *s) => {}
        }
        s.metrics.long_polls.dec();
    }
    let generation = *s.generation.borrow();
    let snapshot = s.snapshots.get(&s.db, generation).await?;
    let labels = match snapshot.labels(&id) {
        Some(labels) => labels.clone(),
        // Registered after the snapshot was read (its registration's generation is not
        // this process's yet: another replica's, within a poll interval).
        None => {
            s.db.node(&id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("node {id:?} is not registered")))?
                .labels
        }
    };
    s.seen.note(&id, s.db.now());
    Ok(axum::Json(DesiredState {
        generation,
        targets: snapshot.targets.clone(),
        models: snapshot.desired(&id, &labels),
    }))
}

pub(super) async fn report(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> Result<axum::Json<ReportStored>> {
    caller.for_node(&id)?;
    let report: Report = json_body(&body)?;
    if report.models.len() > capsule_format::hub::MAX_REPORTED_MODELS {
        return Err(Error::TooLarge(format!(
            "a report of {} model versions (at most {})",
            report.models.len(),
            capsule_format::hub::MAX_REPORTED_MODELS
        )));
    }
    s.db.set_report(&id, &report).await?;
    // Only a failure can push a rollout's failure rate up.
    if report.models.iter().any(|m| m.failed()) {
        check_failures(&s).await?;
    }
    Ok(axum::Json(ReportStored { ok: true }))
}
