//! The hub's HTTP API (JSON; errors `{"error": message}`).
//!
//! Admin endpoints take an admin token, node endpoints a node token scoped to one node id;
//! a node token is refused for admin calls (403) and for other nodes' ids (403).

use std::collections::BTreeMap;
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
    DesiredState, IssuedToken, NewRollout, NewToken, NodeTokensRevoked, Registration, Report, Role,
    RolloutAction, RolloutState, TokenList, TokenRevoked,
};
use capsule_format::split;
use capsule_format::tuf::{self, Root, Targets};
use capsule_format::{CapsuleManifest, MANIFEST_SECTION};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::db::{Rollout, SplitBlobs, VersionRow, new_id, now};
use crate::extract::{Path, Query, RawBody};
use crate::rollout::{self, Event, Health};
use crate::{Error, Result, Shared, monitor, token_hash};

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
async fn count_requests(
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

/// `?access_token=` on the two endpoints browsers reach with `navigator.sendBeacon`, which
/// cannot set headers (telemetry and feedback).
fn beacon_token(parts: &Parts) -> Option<String> {
    if parts.method != axum::http::Method::POST
        || !matches!(parts.uri.path(), "/api/v1/telemetry" | "/api/v1/feedback")
    {
        return None;
    }
    parts.uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "access_token").then(|| v.to_owned())
    })
}

/// Who is calling (any valid token), from `Authorization: Bearer ...` (or, for the
/// dashboard, its session cookie; for beacons, `?access_token=`).
pub(crate) struct Caller {
    kind: Role,
    name: String,
    node: String,
    remote: String,
}

/// A caller with an admin token.
pub(crate) struct Admin(pub(crate) Caller);

impl FromRequestParts<AppState> for Caller {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Caller> {
        let remote = parts
            .extensions
            .get::<ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.to_string())
            .unwrap_or_default();
        let bearer = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        let session = bearer
            .is_none()
            .then(|| crate::dashboard::session_token(&parts.headers))
            .flatten();
        // The dashboard's session cookie only reads. A browser attaches it to any request
        // to the hub, including a form or `fetch` that another page (another port of the same
        // host is the same site, so `SameSite=Strict` does not stop it) aims at a write route:
        // writes take `Authorization: Bearer`, which no other page can make a browser send.
        if session.is_some() && !matches!(parts.method, Method::GET | Method::HEAD) {
            return Err(Error::Forbidden(
                "the dashboard's session cookie is read-only; write with Authorization: Bearer"
                    .into(),
            ));
        }
        let token = bearer
            .or(session)
            .or_else(|| beacon_token(parts))
            .ok_or_else(|| {
                Error::Unauthorized("missing bearer token (Authorization: Bearer ...)".into())
            })?;
        let crate::db::Token { role, name, node } =
            s.db.token(&token_hash(token.trim()))
                .await?
                .ok_or_else(|| Error::Unauthorized("unknown token".into()))?;
        if role == Role::Node
            && !matches!(parts.method, Method::GET | Method::HEAD)
            && !s.limits.allow(&node, std::time::Instant::now())
        {
            return Err(Error::TooManyRequests(format!(
                "node {node:?} writes faster than {} per second (bursts of {})",
                crate::limits::PER_SECOND,
                crate::limits::BURST
            )));
        }
        Ok(Caller {
            kind: role,
            name,
            node,
            remote,
        })
    }
}

impl FromRequestParts<AppState> for Admin {
    type Rejection = Error;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Admin> {
        let c = Caller::from_request_parts(parts, s).await?;
        if c.kind != Role::Admin {
            return Err(Error::Forbidden(format!(
                "a {} token cannot make admin calls",
                c.kind
            )));
        }
        Ok(Admin(c))
    }
}

impl Caller {
    /// Refuses a node token of another node.
    fn for_node(self, id: &str) -> Result<Caller> {
        if self.kind == Role::Node && self.node != id {
            return Err(Error::Forbidden(format!(
                "this node token belongs to node {:?}, not {id:?}",
                self.node
            )));
        }
        Ok(self)
    }
}

async fn audit(s: &Shared, c: &Caller, action: &str, detail: Value) -> Result<()> {
    s.db.audit(&c.name, action, &detail.to_string(), &c.remote)
        .await
}

fn json_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T> {
    serde_json::from_slice(body).map_err(|e| Error::BadRequest(format!("invalid JSON body: {e}")))
}

async fn health(State(s): State<AppState>) -> Result<axum::Json<Value>> {
    Ok(axum::Json(
        json!({"status": "ok", "generation": s.db.generation().await?}),
    ))
}

/// The manifest of a capsule, read from its custom section (the hub never runs capsules).
fn manifest_of(bytes: &[u8]) -> Result<CapsuleManifest> {
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| Error::BadRequest(format!("not a capsule: {e}")))?;
        if let wasmparser::Payload::CustomSection(c) = payload
            && c.name() == MANIFEST_SECTION
        {
            return CapsuleManifest::from_section_bytes(c.data())
                .map_err(|e| Error::BadRequest(format!("capsule manifest: {e}")));
        }
    }
    Err(Error::BadRequest(
        "not a capsule: no capsule.manifest section".into(),
    ))
}

/// What an uploaded blob is: a single-file capsule (it has a manifest), a model image (its
/// header reads) or a guest code module (a core module without a manifest).
fn blob_kind(bytes: &[u8]) -> Result<&'static str> {
    if split::is_image(bytes) {
        split::image_header(bytes).map_err(Error::Invalid)?;
        return Ok("image");
    }
    if manifest_of(bytes).is_ok() {
        return Ok("capsule");
    }
    // No manifest: a code module is still a well-framed core module.
    split::code_module(bytes).map_err(|e| {
        Error::BadRequest(format!("not a capsule, model image or code module: {e}"))
    })?;
    Ok("code")
}

async fn put_blob(
    State(s): State<AppState>,
    Admin(c): Admin,
    RawBody(body): RawBody,
) -> Result<axum::Json<Value>> {
    let kind = blob_kind(&body)?;
    let store = s.blobs.clone();
    let bytes = body.clone();
    let sha256 = tokio::task::spawn_blocking(move || store.put(&bytes)).await??;
    audit(
        &s,
        &c,
        "blob.upload",
        json!({"sha256": sha256, "length": body.len(), "kind": kind}),
    )
    .await?;
    Ok(axum::Json(
        json!({"sha256": sha256, "length": body.len(), "kind": kind}),
    ))
}

/// Reads a stored blob; 404 naming it when it is not there.
async fn read_blob(s: &Shared, sha256: &str, what: &str) -> Result<Vec<u8>> {
    let path = s
        .blobs
        .path(sha256)
        .ok_or_else(|| Error::BadRequest(format!("{sha256:?} is not a SHA-256")))?;
    tokio::fs::read(&path)
        .await
        .map_err(|_| Error::NotFound(format!("no {what} {sha256} (upload it first)")))
}

/// Joins a version's split form into its single-file capsule (the hub stores only the split
/// form of versions pushed as images).
async fn join_version(s: &Shared, split: &SplitBlobs) -> Result<Vec<u8>> {
    let image = read_blob(s, &split.image_sha256, "model image").await?;
    let code = read_blob(s, &split.code_sha256, "code module").await?;
    Ok(tokio::task::spawn_blocking(move || split::join(&code, &image)).await??)
}

/// A blob, with `Range: bytes=N-` for resumed downloads, streamed from its file. A single-file
/// capsule the hub has only in split form is joined once (one join at a time) and stored, so
/// no request makes the hub hold more than one joined capsule. Downloads (not `HEAD`, which
/// answers "have") are counted by kind: capsule, image, code.
async fn get_blob(
    State(s): State<AppState>,
    _caller: Caller,
    method: axum::http::Method,
    headers: HeaderMap,
    Path(sha256): Path<String>,
) -> Result<Response> {
    use tokio::io::AsyncSeekExt;
    let path = s
        .blobs
        .path(&sha256)
        .ok_or_else(|| Error::BadRequest(format!("{sha256:?} is not a SHA-256")))?;
    if !path.exists() {
        let split =
            s.db.version_by_capsule(&sha256)
                .await?
                .and_then(|v| v.split)
                .ok_or_else(|| Error::NotFound(format!("no blob {sha256}")))?;
        let _one = s.joins.lock().await;
        // Another request may have stored it while this one waited.
        if !path.exists() {
            let joined = join_version(&s, &split).await?;
            if split::sha256_hex(&joined) != sha256 {
                return Err(Error::Internal(format!(
                    "the split form of {sha256} joins into another capsule"
                )));
            }
            let store = s.blobs.clone();
            tokio::task::spawn_blocking(move || store.put(&joined)).await??;
        }
    }
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|_| Error::NotFound(format!("no blob {sha256}")))?;
    let total = file
        .metadata()
        .await
        .map_err(Error::io(format!("reading blob {sha256}")))?
        .len();
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<u64>().ok());
    if method == axum::http::Method::GET {
        s.metrics
            .blob_downloads
            .with_label_values(&[s.db.blob_kind(&sha256).await?])
            .inc();
    }
    // Streamed from the file: a large capsule never sits whole in the hub's memory.
    let stream = |file| Body::from_stream(tokio_util::io::ReaderStream::new(file));
    match start {
        Some(start) if start <= total => {
            file.seek(std::io::SeekFrom::Start(start))
                .await
                .map_err(Error::io(format!("reading blob {sha256}")))?;
            Ok((
                StatusCode::PARTIAL_CONTENT,
                [
                    (header::CONTENT_TYPE, "application/wasm".to_owned()),
                    (header::CONTENT_LENGTH, (total - start).to_string()),
                    (
                        header::CONTENT_RANGE,
                        format!("bytes {start}-{}/{total}", total.saturating_sub(1)),
                    ),
                ],
                stream(file),
            )
                .into_response())
        }
        Some(_) => Err(Error::BadRequest("range past the end of the blob".into())),
        None => Ok((
            [
                (header::CONTENT_TYPE, "application/wasm".to_owned()),
                (header::CONTENT_LENGTH, total.to_string()),
            ],
            stream(file),
        )
            .into_response()),
    }
}

async fn get_metadata(
    State(s): State<AppState>,
    _caller: Caller,
    Path(role): Path<String>,
) -> Result<Response> {
    let (_, body) =
        s.db.metadata(&role)
            .await?
            .ok_or_else(|| Error::NotFound(format!("no {role} metadata")))?;
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// Stores signed metadata. The hub parses it and keeps versions monotonic to catch
/// mistakes; the security checks are the nodes' (they verify signatures against pinned keys).
async fn post_metadata(
    State(s): State<AppState>,
    Admin(c): Admin,
    Path(role): Path<String>,
    RawBody(body): RawBody,
) -> Result<axum::Json<Value>> {
    let version = match role.as_str() {
        "root" => {
            tuf::parse::<Root>(&body, "root")
                .map_err(Error::Invalid)?
                .signed
                .version
        }
        "targets" => {
            tuf::parse::<Targets>(&body, "targets")
                .map_err(Error::Invalid)?
                .signed
                .version
        }
        other => {
            return Err(Error::NotFound(format!(
                "no metadata role {other:?} (root, targets)"
            )));
        }
    };
    let version =
        i64::try_from(version).map_err(|_| Error::BadRequest("version too large".into()))?;
    if let Some((current, _)) = s.db.metadata(&role).await?
        && version < current
    {
        return Err(Error::Conflict(format!(
            "{role} version {version} is older than the stored version {current}"
        )));
    }
    let text =
        String::from_utf8(body.to_vec()).map_err(|_| Error::BadRequest("not UTF-8".into()))?;
    s.db.set_metadata(&role, version, &text).await?;
    if role == "root" {
        // Every root version stays fetchable: a node walks the chain N+1, N+2, ... (TUF 5.3.3).
        s.db.set_metadata(&format!("root.{version}"), version, &text)
            .await?;
    }
    audit(
        &s,
        &c,
        "metadata.upload",
        json!({"role": role, "version": version}),
    )
    .await?;
    s.changed().await?;
    Ok(axum::Json(json!({"role": role, "version": version})))
}

async fn list_models(State(s): State<AppState>, Admin(_): Admin) -> Result<axum::Json<Value>> {
    let mut out = Vec::new();
    for m in s.db.models().await? {
        let versions: Vec<String> =
            s.db.versions(&m)
                .await?
                .into_iter()
                .map(|v| v.version)
                .collect();
        out.push(json!({"name": m, "versions": versions, "aliases": s.db.aliases(&m).await?}));
    }
    Ok(axum::Json(json!({"models": out})))
}

async fn show_model(
    State(s): State<AppState>,
    Admin(_): Admin,
    Path(model): Path<String>,
) -> Result<axum::Json<Value>> {
    let versions = s.db.versions(&model).await?;
    if versions.is_empty() {
        return Err(Error::NotFound(format!("no model {model:?}")));
    }
    Ok(axum::Json(
        json!({"name": model, "versions": versions, "aliases": s.db.aliases(&model).await?}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVersion {
    sha256: String,
    #[serde(default)]
    provenance: Value,
    #[serde(default)]
    metrics: Value,
}

/// Registers a version from an uploaded blob; its manifest must name this model, and the
/// version is the manifest's.
async fn add_version(
    State(s): State<AppState>,
    Admin(c): Admin,
    Path(model): Path<String>,
    RawBody(body): RawBody,
) -> Result<axum::Json<VersionRow>> {
    let req: NewVersion = json_body(&body)?;
    let uploaded = read_blob(&s, &req.sha256, "blob").await?;
    // Either form registers both: a model image is joined with its code (which must be
    // uploaded already) to read its manifest; a single file is split and its image and code
    // stored (once: blobs are content-addressed).
    let (bytes, split_blobs) = if split::is_image(&uploaded) {
        let header = split::image_header(&uploaded).map_err(Error::Invalid)?;
        // The joined capsule is bounded like an uploaded one.
        if header.joined_len_bound() > s.config.max_blob_bytes {
            return Err(Error::TooLarge(format!(
                "the model image joins into up to {} bytes, over the limit of {}",
                header.joined_len_bound(),
                s.config.max_blob_bytes
            )));
        }
        let blobs = SplitBlobs {
            image_sha256: req.sha256.clone(),
            image_length: uploaded.len() as i64,
            code_sha256: header.code_sha256,
            code_length: header.code_len as i64,
        };
        (join_version(&s, &blobs).await?, blobs)
    } else {
        manifest_of(&uploaded)?;
        let store = s.blobs.clone();
        tokio::task::spawn_blocking(move || -> Result<(Vec<u8>, SplitBlobs)> {
            let parts = split::split(&uploaded).map_err(Error::Invalid)?;
            let blobs = SplitBlobs {
                image_sha256: store.put(&parts.image)?,
                image_length: parts.image.len() as i64,
                code_sha256: store.put(&parts.code)?,
                code_length: parts.code.len() as i64,
            };
            Ok((uploaded, blobs))
        })
        .await??
    };
    let m = manifest_of(&bytes)?;
    if m.name != model {
        return Err(Error::BadRequest(format!(
            "the capsule is model {:?}, not {model:?}",
            m.name
        )));
    }
    let provenance = if req.provenance.is_null() {
        json!({"source_sha256": m.source.sha256, "guest_sha256": m.guest_sha256})
    } else {
        let mut p = req.provenance.clone();
        if let Some(o) = p.as_object_mut() {
            o.entry("source_sha256").or_insert(json!(m.source.sha256));
            o.entry("guest_sha256").or_insert(json!(m.guest_sha256));
        }
        p
    };
    let metrics = if req.metrics.is_null() {
        Value::Object(
            m.card
                .metrics
                .iter()
                .map(|x| (x.name.clone(), json!(x.value)))
                .collect(),
        )
    } else {
        req.metrics
    };
    let row = VersionRow {
        model: model.clone(),
        version: m.version.to_string(),
        sha256: split::sha256_hex(&bytes),
        length: bytes.len() as i64,
        split: Some(split_blobs),
        manifest: json!({
            "inputs": m.inputs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "outputs": m.outputs.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "labels": m.labels,
            "description": m.card.description,
            "golden_samples": m.golden.len(),
            "reference": m.reference,
            "created_at_unix": m.created_at_unix,
        }),
        provenance,
        metrics,
        created_at: now(),
        created_by: c.name.clone(),
    };
    s.db.add_version(&row).await?;
    audit(
        &s,
        &c,
        "version.register",
        json!({"model": model, "version": row.version, "sha256": row.sha256}),
    )
    .await?;
    Ok(axum::Json(row))
}

async fn show_version(
    State(s): State<AppState>,
    Admin(_): Admin,
    Path((model, version)): Path<(String, String)>,
) -> Result<axum::Json<VersionRow>> {
    s.db.version(&model, &version)
        .await?
        .map(axum::Json)
        .ok_or_else(|| Error::NotFound(format!("no version {version} of {model:?}")))
}

#[derive(Deserialize)]
struct CompareQuery {
    a: String,
    b: String,
}

/// Two versions side by side, with the metric differences (b - a).
async fn compare(
    State(s): State<AppState>,
    Admin(_): Admin,
    Path(model): Path<String>,
    Query(q): Query<CompareQuery>,
) -> Result<axum::Json<Value>> {
    let get = |v: String| {
        let s = Arc::clone(&s);
        let model = model.clone();
        async move {
            s.db.version(&model, &v)
                .await?
                .ok_or_else(|| Error::NotFound(format!("no version {v} of {model:?}")))
        }
    };
    let (a, b) = (get(q.a).await?, get(q.b).await?);
    let mut diff = BTreeMap::new();
    if let (Some(ma), Some(mb)) = (a.metrics.as_object(), b.metrics.as_object()) {
        for (k, vb) in mb {
            if let (Some(x), Some(y)) = (ma.get(k).and_then(Value::as_f64), vb.as_f64()) {
                diff.insert(k.clone(), y - x);
            }
        }
    }
    Ok(axum::Json(json!({"a": a, "b": b, "metrics_diff": diff})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AliasBody {
    version: String,
}

async fn set_alias(
    State(s): State<AppState>,
    Admin(c): Admin,
    Path((model, alias)): Path<(String, String)>,
    RawBody(body): RawBody,
) -> Result<axum::Json<Value>> {
    let req: AliasBody = json_body(&body)?;
    if s.db.version(&model, &req.version).await?.is_none() {
        return Err(Error::NotFound(format!(
            "no version {} of {model:?}",
            req.version
        )));
    }
    if alias.is_empty()
        || !alias
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Error::BadRequest(format!(
            "alias {alias:?}: letters, digits, - and _ only"
        )));
    }
    s.db.set_alias(&model, &alias, &req.version).await?;
    audit(
        &s,
        &c,
        "alias.set",
        json!({"model": model, "alias": alias, "version": req.version}),
    )
    .await?;
    s.changed().await?;
    Ok(axum::Json(
        json!({"model": model, "alias": alias, "version": req.version}),
    ))
}

async fn list_nodes(State(s): State<AppState>, Admin(_): Admin) -> Result<axum::Json<Value>> {
    Ok(axum::Json(json!({"nodes": s.db.nodes().await?})))
}

/// Every token the hub accepts (admin only): kind, name, node, issue time and the first 8
/// hex digits of its hash; never a token.
async fn list_tokens(State(s): State<AppState>, Admin(_): Admin) -> Result<axum::Json<TokenList>> {
    Ok(axum::Json(TokenList {
        tokens: s.db.tokens().await?,
    }))
}

/// Issues a token: stored hashed, shown once.
async fn issue(
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
    tracing::info!(%kind, name = ?name, by = %c.name, "token issued");
    Ok(IssuedToken {
        kind,
        name,
        node,
        token,
        hash_prefix,
    })
}

/// Issues an admin token (a rotation: issue the new one, move to it, revoke the old one).
async fn admin_token(
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
async fn revoke_token(
    State(s): State<AppState>,
    Admin(c): Admin,
    Path(prefix): Path<String>,
) -> Result<axum::Json<TokenRevoked>> {
    let revoked = s.db.revoke_token(&prefix).await?;
    audit(&s, &c, "token.revoke", json!(revoked)).await?;
    tracing::info!(kind = %revoked.kind, name = ?revoked.name, by = %c.name, "token revoked");
    Ok(axum::Json(TokenRevoked { revoked }))
}

/// Revokes every token of one node (a lost or stolen device): its next request is 401.
async fn revoke_node_tokens(
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
    tracing::info!(node = ?id, revoked, by = %c.name, "node tokens revoked");
    Ok(axum::Json(NodeTokensRevoked { node: id, revoked }))
}

/// Issues a token for one node (shown once; stored hashed).
async fn node_token(
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

async fn register(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> Result<axum::Json<Value>> {
    let c = caller.for_node(&id)?;
    let reg: Registration = json_body(&body)?;
    let changed = s.db.register_node(&id, &reg.labels).await?;
    tracing::info!(node = %id, by = %c.name, changed, "node registered");
    // Labels decide rollouts: wake long-polls so the node gets its state at once. The same
    // labels again change nothing, and wake no one (every long-poll of the fleet would).
    if changed {
        s.changed().await?;
    }
    Ok(axum::Json(json!({"node": id, "labels": reg.labels})))
}

#[derive(Deserialize)]
struct DesiredQuery {
    #[serde(default)]
    after: Option<i64>,
    #[serde(default)]
    wait_ms: Option<u64>,
}

/// The node's desired state; with `after=G`, waits (up to `wait_ms`) until the state's
/// generation differs from G.
async fn desired(
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
    s.seen.note(&id, now());
    Ok(axum::Json(DesiredState {
        generation,
        targets: snapshot.targets.clone(),
        models: snapshot.desired(&id, &labels),
    }))
}

async fn report(
    State(s): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    RawBody(body): RawBody,
) -> Result<axum::Json<Value>> {
    caller.for_node(&id)?;
    let report: Report = json_body(&body)?;
    s.db.set_report(&id, &report).await?;
    // Only a failure can push a rollout's failure rate up.
    if report.models.iter().any(|m| m.failed()) {
        check_failures(&s).await?;
    }
    Ok(axum::Json(json!({"ok": true})))
}

/// Applies `event` to rollout `r` (see [`rollout::apply`]) and stores what it changed, with
/// the audit entry by `actor`; the rollout after it, or `None` when nothing changed or
/// another hub (or admin) changed it first.
async fn change_rollout(
    s: &Shared,
    r: &Rollout,
    event: &Event,
    actor: &str,
    remote: &str,
) -> Result<Option<Rollout>> {
    let Some(change) = rollout::apply(r, event, now())? else {
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
async fn check_failures(s: &Shared) -> Result<()> {
    let nodes = s.db.nodes().await?;
    for r in s.db.active_rollouts().await? {
        let event = Event::Reports(rollout::failures(&r, &nodes));
        change_rollout(s, &r, &event, "hub", "hub").await?;
    }
    Ok(())
}

/// Advances the active rollouts whose step interval has passed.
pub(crate) async fn timed_steps(s: &Shared) -> Result<()> {
    for r in s.db.active_rollouts().await? {
        change_rollout(s, &r, &Event::Tick, "hub", "hub").await?;
    }
    Ok(())
}

/// Judges the active rollouts that promote themselves on their canary's health: promotes
/// those that held, aborts those that did not (see [`rollout::judge`]).
pub(crate) async fn judge_canaries(s: &Shared) -> Result<()> {
    for r in s.db.active_rollouts().await? {
        if r.auto_promote.is_none() {
            continue;
        }
        let served = monitor::version_health(&s.db, &r.model, &r.version)
            .await?
            .since(&r.baseline);
        change_rollout(s, &r, &Event::Health(served), "hub", "hub").await?;
    }
    Ok(())
}

async fn create_rollout(
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
        Some(_) => monitor::version_health(&s.db, &req.model, &req.version).await?,
        None => Health::default(),
    };
    let active = s.db.active_rollouts().await?;
    let r = rollout::start(req, &active, new_id(), previous, baseline, now())?;
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

async fn list_rollouts(State(s): State<AppState>, Admin(_): Admin) -> Result<axum::Json<Value>> {
    Ok(axum::Json(json!({"rollouts": s.db.rollouts().await?})))
}

async fn show_rollout(
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
async fn rollout_action(
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
        by: c.name.clone(),
    };
    match change_rollout(&s, &r, &event, &c.name, &c.remote).await? {
        Some(after) => Ok(axum::Json(after)),
        None => Err(Error::Conflict(format!(
            "rollout {id} changed while this {action} was applied: read it and try again"
        ))),
    }
}

async fn audit_log(State(s): State<AppState>, Admin(_): Admin) -> Result<axum::Json<Value>> {
    Ok(axum::Json(json!({"audit": s.db.audit_log().await?})))
}

// ---------------------------------------------------------------------------------------
// Telemetry, feedback, alerts, metrics

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Shipment {
    batches: Vec<capsule_format::telemetry::TelemetryBatch>,
}

/// Telemetry batches from a node (its own token): stored once each, acknowledged always.
async fn post_telemetry(
    State(s): State<AppState>,
    caller: Caller,
    RawBody(body): RawBody,
) -> Result<axum::Json<Value>> {
    if caller.kind != Role::Node {
        return Err(Error::Forbidden(
            "telemetry is sent with a node token (the batches name their node)".into(),
        ));
    }
    let shipment: Shipment = json_body(&body)?;
    let acked = crate::monitor::ingest(&s, &caller.node, shipment.batches).await?;
    s.seen.note(&caller.node, now());
    Ok(axum::Json(json!({ "acked": acked })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackBody {
    model: String,
    feedback: Vec<capsule_format::telemetry::FeedbackItem>,
}

/// Ground-truth labels sent straight to the hub (browsers; nodes send theirs in telemetry).
async fn post_feedback(
    State(s): State<AppState>,
    caller: Caller,
    RawBody(body): RawBody,
) -> Result<axum::Json<Value>> {
    let b: FeedbackBody = json_body(&body)?;
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
    let source = if caller.kind == Role::Node {
        caller.node.clone()
    } else {
        caller.name.clone()
    };
    crate::monitor::store_feedback(&s.db, &source, &b.model, &items).await?;
    Ok(axum::Json(json!({ "accepted": items.len() })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TelemetryQuery {
    model: Option<String>,
    group: Option<String>,
    count: Option<u32>,
}

async fn telemetry_summary(
    State(s): State<AppState>,
    _admin: Admin,
    Query(q): Query<TelemetryQuery>,
) -> Result<axum::Json<crate::monitor::Summary>> {
    Ok(axum::Json(
        crate::monitor::summary(&s.db, q.model.as_deref()).await?,
    ))
}

async fn telemetry_windows(
    State(s): State<AppState>,
    _admin: Admin,
    Query(q): Query<TelemetryQuery>,
) -> Result<axum::Json<Value>> {
    let model = q
        .model
        .ok_or_else(|| Error::BadRequest("model=NAME is required".into()))?;
    let windows =
        crate::monitor::windows(&s, &model, q.group.as_deref(), q.count.unwrap_or(60)).await?;
    Ok(axum::Json(json!({
        "model": model,
        "window_ms": s.config.monitor.window_ms,
        "versions": windows,
    })))
}

async fn list_alerts(State(s): State<AppState>, _admin: Admin) -> Result<axum::Json<Value>> {
    Ok(axum::Json(json!({
        "alerts": crate::monitor::alerts(&s.db).await?,
        "events": crate::monitor::events(&s.db, 200).await?,
        "evaluated_until_ms": s.db.state("telemetry_evaluated_until").await?,
    })))
}

/// Refreshes the gauges read from the database (nodes, their models, rollouts, dropped
/// telemetry) and answers the text exposition.
async fn metrics(State(s): State<AppState>) -> Result<Response> {
    let nodes = s.db.nodes().await?;
    let offline_after = i64::try_from(s.config.monitor.offline_after_s).unwrap_or(i64::MAX);
    let now = crate::db::now();
    let online = nodes
        .iter()
        .filter(|n| now - n.last_seen <= offline_after)
        .count();
    let m = &s.metrics;
    m.nodes
        .with_label_values(&["online"])
        .set(i64::try_from(online).unwrap_or(i64::MAX));
    m.nodes
        .with_label_values(&["offline"])
        .set(i64::try_from(nodes.len() - online).unwrap_or(i64::MAX));
    m.node_models.reset();
    let registered = s.db.registered_versions().await?;
    for n in &nodes {
        for r in n.report.iter().flat_map(|r| &r.models) {
            let [model, version] =
                crate::metrics::version_labels(&registered, &r.model, &r.version);
            m.node_models
                .with_label_values(&[model, version, r.state.as_str()])
                .inc();
        }
    }
    let counts = s.db.rollout_counts().await?;
    for state in RolloutState::ALL {
        m.rollouts
            .with_label_values(&[state.as_str()])
            .set(counts.get(state).copied().unwrap_or(0));
    }
    let summary = crate::monitor::summary(&s.db, None).await?;
    for v in &summary.versions {
        if let Some(a) = v.accuracy.value() {
            m.accuracy.with_label_values(&[&v.model, &v.version]).set(a);
        }
    }
    m.telemetry_dropped.set(
        i64::try_from(
            summary
                .nodes
                .values()
                .map(|n| n.dropped_batches)
                .sum::<u64>(),
        )
        .unwrap_or(i64::MAX),
    );
    Ok((
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        m.encode()?,
    )
        .into_response())
}
