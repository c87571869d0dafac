//! The hub's HTTP API (JSON; errors `{"error": message}`).
//!
//! Admin endpoints take an admin token, node endpoints a node token scoped to one node id;
//! a node token is refused for admin calls (403) and for other nodes' ids (403).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use capsule_format::hub::{
    AlertList, AliasSet, AuditLog, BlobKind, BlobStored, Comparison, DesiredState,
    FeedbackAccepted, HealthStatus, HubHealth, IssuedToken, ManifestSummary, MetadataStored,
    ModelDetail, ModelList, ModelSummary, NewRollout, NewToken, NewVersion, NodeList,
    NodeTokensRevoked, Registered, Registration, Report, ReportStored, Role, RolloutAction,
    RolloutList, RolloutState, SetAlias, Summary, TelemetryAck, TokenList, TokenRevoked, Windows,
};
use capsule_format::split;
use capsule_format::tuf::{self, Root, Targets};
use capsule_format::{CapsuleManifest, MANIFEST_SECTION};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::extract::{Path, Query, RawBody};
use crate::rollout::{self, Event, Health};
use crate::store::{Rollout, SplitBlobs, VersionInfo, new_id};
use crate::{Error, Result, Shared, token_hash};

mod auth;
mod fleet;
mod registry;
mod rollouts;
mod telemetry;

use auth::*;
pub(crate) use auth::{Admin, Caller};
use fleet::*;
use registry::*;
pub(crate) use rollouts::tick_rollouts;
use rollouts::*;
use telemetry::*;

type AppState = Arc<Shared>;

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(error = %self.chain(), "request failed");
        }
        let message = if status.is_server_error() {
            self.chain()
        } else {
            self.to_string()
        };
        (status, axum::Json(json!({"error": message}))).into_response()
    }
}

pub(crate) fn router(state: AppState) -> Router {
    let blob_limit = usize::try_from(state.config.max_blob_bytes).unwrap_or(usize::MAX);
    Router::new()
        .route("/api/v1/health", get(health))
        .route(
            "/api/v1/blobs",
            post(put_blob).layer(DefaultBodyLimit::max(blob_limit)),
        )
        .route("/api/v1/blobs/{sha256}", get(get_blob))
        .route(
            "/api/v1/metadata/{role}",
            get(get_metadata).post(post_metadata),
        )
        .route("/api/v1/models", get(list_models))
        .route("/api/v1/models/{model}", get(show_model))
        .route("/api/v1/models/{model}/versions", post(add_version))
        .route(
            "/api/v1/models/{model}/versions/{version}",
            get(show_version),
        )
        .route("/api/v1/models/{model}/compare", get(compare))
        .route("/api/v1/models/{model}/aliases/{alias}", put(set_alias))
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/tokens", get(list_tokens).post(admin_token))
        .route("/api/v1/tokens/{hash_prefix}", delete(revoke_token))
        .route(
            "/api/v1/nodes/{id}/token",
            post(node_token).delete(revoke_node_tokens),
        )
        .route("/api/v1/nodes/{id}/register", post(register))
        .route("/api/v1/nodes/{id}/desired", get(desired))
        .route("/api/v1/nodes/{id}/report", post(report))
        .route("/api/v1/rollouts", get(list_rollouts).post(create_rollout))
        .route("/api/v1/rollouts/{id}", get(show_rollout))
        .route("/api/v1/rollouts/{id}/{action}", post(rollout_action))
        .route("/api/v1/audit", get(audit_log))
        .route(
            "/api/v1/telemetry",
            post(post_telemetry).layer(DefaultBodyLimit::max(16 << 20)),
        )
        .route("/api/v1/telemetry/summary", get(telemetry_summary))
        .route("/api/v1/telemetry/windows", get(telemetry_windows))
        .route("/api/v1/feedback", post(post_feedback))
        .route("/api/v1/alerts", get(list_alerts))
        .route("/metrics", get(metrics))
        .merge(crate::dashboard::router())
        .fallback(|| async { Error::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async {
            Error::MethodNotAllowed("this endpoint does not take that method".into())
        })
        .layer(DefaultBodyLimit::max(4 << 20))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            count_requests,
        ))
        // Cross-origin-isolated pages (COEP require-corp) may read the hub's answers, beacons
        // included (no-cors requests get no CORS headers).
        .layer(
            tower_http::set_header::SetResponseHeaderLayer::if_not_present(
                header::HeaderName::from_static("cross-origin-resource-policy"),
                header::HeaderValue::from_static("cross-origin"),
            ),
        )
        // Browsers (the SDK) call the hub from their pages' origins with bearer tokens; no
        // cookies cross origins, so the dashboard's session stays same-origin.
        .layer(
            tower_http::cors::CorsLayer::new()
                .allow_origin(tower_http::cors::Any)
                .allow_methods([axum::http::Method::GET, axum::http::Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE, header::RANGE]),
        )
        .with_state(state)
}

/// Counts every request by route template, method and status.
pub(super) async fn count_requests(
    State(s): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = std::time::Instant::now();
    let resp = next.run(request).await;
    s.metrics
        .http_requests
        .with_label_values(&[&route, &method, resp.status().as_str()])
        .inc();
    s.metrics
        .http_seconds
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    resp
}
