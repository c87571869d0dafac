//! Open Inference Protocol V2 over HTTP/REST (with the binary tensor data extension),
//! health endpoints and `/metrics`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use capsule_format::v2::{self, INFERENCE_HEADER_CONTENT_LENGTH};
use serde_json::{Value, json};

use crate::models::{ModelRegistry, ServedModel};
use crate::{Error, NodeConfig, Result};

/// Header carrying the request id (taken from the client or generated).
pub const REQUEST_ID: &str = "x-request-id";

/// State shared by the handlers.
#[derive(Debug, Clone)]
pub(crate) struct App {
    pub registry: Arc<ModelRegistry>,
    pub config: Arc<NodeConfig>,
    pub bodies: Arc<BodyBudget>,
}

/// Request bodies the node holds at once, as a multiple of the largest body
/// (`max_body_bytes`).
const BODY_BUDGET_BODIES: u64 = 4;

/// The bytes of request bodies the node holds at once: bodies being read, and read bodies
/// until their request is decoded. Each body is charged as its bytes arrive, so a client
/// that stalls mid-body holds only what it sent; a body that would pass the budget is
/// refused at once (429), as a full queue is. Without it, every connection could hold a
/// body of `max_body_bytes` (64 MiB by default) at the same time.
#[derive(Debug)]
pub(crate) struct BodyBudget {
    held: std::sync::atomic::AtomicU64,
    limit: u64,
}

impl BodyBudget {
    pub(crate) fn new(max_body_bytes: u64) -> BodyBudget {
        BodyBudget {
            held: std::sync::atomic::AtomicU64::new(0),
            limit: max_body_bytes.saturating_mul(BODY_BUDGET_BODIES),
        }
    }

    /// The bytes held now.
    pub(crate) fn held(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::Acquire)
    }

    /// An empty charge on this budget.
    pub(crate) fn charge(self: &Arc<Self>) -> BodyCharge {
        BodyCharge {
            budget: Arc::clone(self),
            bytes: 0,
        }
    }
}

/// What one body holds of the [`BodyBudget`]; given back when dropped.
pub(crate) struct BodyCharge {
    budget: Arc<BodyBudget>,
    bytes: u64,
}

impl BodyCharge {
    /// Charges `n` more bytes; past the budget nothing is charged and the body is refused.
    pub(crate) fn add(&mut self, n: u64) -> Result<()> {
        use std::sync::atomic::Ordering;
        let limit = self.budget.limit;
        self.budget
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(n).filter(|total| *total <= limit)
            })
            .map_err(|_| Error::BodyBudget { limit })?;
        self.bytes += n;
        Ok(())
    }
}

impl Drop for BodyCharge {
    fn drop(&mut self) {
        self.budget
            .held
            .fetch_sub(self.bytes, std::sync::atomic::Ordering::AcqRel);
    }
}

/// The request id of the current request (set by the middleware).
#[derive(Debug, Clone)]
struct RequestId(String);

/// Cross-origin isolation (COOP/COEP, so pages may use SharedArrayBuffer and threads) and
/// CORP (so isolated pages of other origins may load capsules) on every answer.
fn isolation<S: Clone + Send + Sync + 'static>(router: Router<S>) -> Router<S> {
    use tower_http::set_header::SetResponseHeaderLayer;
    router
        .layer(SetResponseHeaderLayer::if_not_present(
            header::HeaderName::from_static("cross-origin-opener-policy"),
            HeaderValue::from_static("same-origin"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::HeaderName::from_static("cross-origin-embedder-policy"),
            HeaderValue::from_static("require-corp"),
        ))
        .layer(SetResponseHeaderLayer::if_not_present(
            header::HeaderName::from_static("cross-origin-resource-policy"),
            HeaderValue::from_static("cross-origin"),
        ))
}

/// `GET /capsules/{model}/{version}.capsule.wasm`: the installed capsule of a served version
/// (the path of its signed target), for the browser SDK. Streamed from the file in 64 KiB
/// chunks with its length, `Range` and conditional requests (tower-http's `ServeFile`): a
/// GET used to read the whole capsule (10 MB and more) into memory, so a hundred concurrent
/// GETs held a gigabyte.
async fn capsule_file(
    State(app): State<App>,
    Path((model, file)): Path<(String, String)>,
    request: Request,
) -> Result<Response> {
    let version = file
        .strip_suffix(".capsule.wasm")
        .ok_or_else(|| Error::ModelNotFound(format!("{model}/{file}")))?;
    let served = app.registry.resolve(&model, Some(version))?;
    let mut response = tower_http::services::ServeFile::new(&served.path)
        .try_call(request)
        .await
        .map_err(|e| Error::Internal(format!("cannot read {}: {e}", served.path.display())))?
        .map(Body::new);
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/wasm"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Ok(response)
}

pub(crate) fn router(app: App) -> Router {
    let static_dir = app.config.static_dir.clone();
    let router = base_router(app);
    let router = match static_dir {
        // Files for browsers; mime types from their extensions (.wasm: application/wasm,
        // .js/.mjs: text/javascript). Paths outside the directory are refused.
        Some(dir) => router.fallback_service(tower_http::services::ServeDir::new(dir)),
        None => router,
    };
    isolation(router)
}

fn base_router(app: App) -> Router {
    Router::new()
        .route("/capsules/{model}/{file}", get(capsule_file))
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{model}", get(model_metadata))
        .route("/v2/models/{model}/ready", get(model_ready))
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/feedback", post(feedback))
        .route("/v2/models/{model}/versions/{version}", get(model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready),
        )
        .route("/v2/models/{model}/versions/{version}/infer", post(infer))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .layer(middleware::from_fn(request_id))
        .with_state(app)
}

fn error_response(status: u16, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, axum::Json(json!({ "error": message }))).into_response()
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        error_response(self.http_status(), &self.to_string())
    }
}

/// The client's request id (from the `x-request-id` header or gRPC metadata) when it is a
/// non-empty string of at most 128 bytes, else a new UUID.
pub(crate) fn request_id_or_new(header: Option<&[u8]>) -> String {
    header
        .and_then(|v| std::str::from_utf8(v).ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string())
}

async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request_id_or_new(request.headers().get(REQUEST_ID).map(|v| v.as_bytes()));
    request.extensions_mut().insert(RequestId(id.clone()));
    let span = tracing::info_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path());
    let started = Instant::now();
    let mut response = tracing::Instrument::instrument(next.run(request), span.clone()).await;
    let status = response.status().as_u16();
    span.in_scope(|| {
        // 503 (not ready), 504 and 429 are states the handlers already log; only an
        // internal error is a warning.
        let ms = started.elapsed().as_secs_f64() * 1e3;
        if status == 500 {
            tracing::warn!(status, ms, "request failed");
        } else {
            tracing::debug!(status, ms, "request done");
        }
    });
    if let Ok(v) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(REQUEST_ID, v);
    }
    response
}

async fn not_found(request: Request) -> Response {
    error_response(
        404,
        &format!("no route for {} {}", request.method(), request.uri().path()),
    )
}

async fn server_metadata() -> Response {
    axum::Json(json!({
        "name": "capsule",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
    .into_response()
}

async fn live() -> Response {
    axum::Json(json!({ "live": true })).into_response()
}

async fn ready(State(app): State<App>) -> Response {
    let ready = app.registry.is_ready();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(json!({ "ready": ready }))).into_response()
}

/// `{model}` and optional `{version}` path parameters.
fn model_and_version(params: Vec<(String, String)>) -> (String, Option<String>) {
    let mut model = String::new();
    let mut version = None;
    for (k, v) in params {
        match k.as_str() {
            "model" => model = v,
            "version" => version = Some(v),
            _ => {}
        }
    }
    (model, version)
}

/// Shape with symbolic dimensions as -1, as the protocol's metadata has it.
pub(crate) fn spec_shape(spec: &capsule_format::TensorSpec) -> Vec<i64> {
    spec.shape
        .iter()
        .map(|d| match d {
            capsule_format::Dim::Fixed(n) => i64::try_from(*n).unwrap_or(-1),
            capsule_format::Dim::Symbolic(_) => -1,
        })
        .collect()
}

fn tensor_metadata(specs: &[capsule_format::TensorSpec]) -> Value {
    Value::Array(
        specs
            .iter()
            .map(|s| json!({ "name": s.name, "datatype": s.dtype.v2_name(), "shape": spec_shape(s) }))
            .collect(),
    )
}

async fn model_metadata(
    State(app): State<App>,
    Path(params): Path<Vec<(String, String)>>,
) -> Result<Response> {
    let (model, version) = model_and_version(params);
    let served = app.registry.resolve(&model, version.as_deref())?;
    let versions: Vec<String> = app
        .registry
        .versions(&model)?
        .iter()
        .map(|m| m.version.clone())
        .collect();
    let manifest = served.manifest();
    Ok(axum::Json(json!({
        "name": model,
        "versions": versions,
        "platform": "capsule",
        "inputs": tensor_metadata(&manifest.inputs),
        "outputs": tensor_metadata(&manifest.outputs),
    }))
    .into_response())
}

async fn model_ready(
    State(app): State<App>,
    Path(params): Path<Vec<(String, String)>>,
) -> Result<Response> {
    let (model, version) = model_and_version(params);
    match app.registry.resolve(&model, version.as_deref()) {
        Ok(_) => Ok(axum::Json(json!({ "name": model, "ready": true })).into_response()),
        Err(e @ Error::NotReady { .. }) => Ok((
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "name": model, "ready": false, "error": e.to_string() })),
        )
            .into_response()),
        Err(e) => Err(e),
    }
}

async fn metrics(State(app): State<App>) -> Result<Response> {
    app.registry.refresh_gauges();
    let text = app.registry.metrics.encode()?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

/// Reads a request body of at most `limit` bytes (413 past it, from the declared length when
/// there is one), charging its bytes to the node's [`BodyBudget`] as they arrive (429 past
/// it); a body that stalls for the node's deadline is 408. The charge is returned with the
/// bytes and held until it is dropped (after the body is decoded).
async fn read_body(
    app: &App,
    headers: &HeaderMap,
    body: Body,
    limit: u64,
) -> Result<(Bytes, BodyCharge)> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if let Some(declared) = declared
        && declared > limit
    {
        return Err(Error::PayloadTooLarge {
            size: declared,
            limit,
        });
    }
    let mut charge = app.bodies.charge();
    // A body may take as long as it needs while it progresses (a large upload over a slow
    // link), but not stall: no bytes for the node's deadline is 408.
    let idle = app.config.deadline();
    let stalled = || Error::BodyTimeout {
        deadline_ms: app.config.deadline_ms,
    };
    let mut body = std::pin::pin!(body);
    // The declared length is only charged as it arrives: a client may declare 64 MiB and
    // send nothing.
    let mut out = Vec::new();
    loop {
        let next = std::future::poll_fn(|cx| {
            use axum::body::HttpBody as _;
            body.as_mut().poll_frame(cx)
        });
        let Some(frame) = tokio::time::timeout(idle, next)
            .await
            .map_err(|_| stalled())?
        else {
            break;
        };
        let frame =
            frame.map_err(|e| Error::BadRequest(format!("cannot read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let size = (out.len() as u64).saturating_add(data.len() as u64);
        if size > limit {
            return Err(Error::PayloadTooLarge { size, limit });
        }
        charge.add(data.len() as u64)?;
        out.extend_from_slice(&data);
    }
    let bytes = Bytes::from(out);
    Ok((bytes, charge))
}

/// The deadline of one request: the node's, shortened by a `timeout` request parameter in
/// microseconds (Triton's convention) when one is given.
fn request_deadline(config: &NodeConfig, request: &v2::InferenceRequest) -> Duration {
    let node = config.deadline();
    request
        .parameters
        .as_ref()
        .and_then(|p| p.get("timeout"))
        .and_then(Value::as_u64)
        .filter(|us| *us > 0)
        .map_or(node, |us| node.min(Duration::from_micros(us)))
}

async fn infer(
    State(app): State<App>,
    Path(params): Path<Vec<(String, String)>>,
    axum::Extension(RequestId(request_id)): axum::Extension<RequestId>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let (model, version) = model_and_version(params);
    let mut labels = (model.clone(), version.clone().unwrap_or_default());
    let result = run_infer(
        &app,
        &model,
        version.as_deref(),
        &headers,
        body,
        &request_id,
        &mut labels,
    )
    .await;
    app.registry
        .metrics
        .observe_request(&labels, "http", &result, started);
    match result {
        Ok(r) => r,
        Err(e) => {
            tracing::info!(model = ?model, error = %e, status = e.http_status(), "inference refused");
            e.into_response()
        }
    }
}

/// Checks `Authorization: Bearer` against a route's token (compared in constant time):
/// 401 without it or with another, 403 when the route has no token (it is off).
fn check_bearer(headers: &HeaderMap, token: Option<&str>, route: &str) -> Result<()> {
    let Some(token) = token else {
        return Err(Error::Unauthorized {
            off: true,
            message: format!("{route} is off on this node: start it with --feedback-token"),
        });
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let same = given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    if same {
        Ok(())
    } else {
        Err(Error::Unauthorized {
            off: false,
            message: format!("{route} needs Authorization: Bearer <the node's --feedback-token>"),
        })
    }
}

/// Largest feedback body.
const MAX_FEEDBACK_BYTES: u64 = 4 << 20;

/// `POST /v2/models/{model}/feedback`: one label, or `{"feedback": [...]}` for several.
async fn feedback(
    State(app): State<App>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response> {
    use capsule_format::telemetry::FeedbackItem;
    check_bearer(&headers, app.config.feedback_token.as_deref(), "feedback")?;
    #[derive(serde::Deserialize)]
    #[serde(untagged)]
    enum Body_ {
        Many { feedback: Vec<FeedbackItem> },
        One(FeedbackItem),
    }
    let (bytes, _charge) = read_body(&app, &headers, body, MAX_FEEDBACK_BYTES).await?;
    let parsed: Body_ = serde_json::from_slice(&bytes).map_err(|e| {
        Error::BadRequest(format!(
            "feedback must be {{\"id\": ..., \"label\": ..., \"index\": optional}} or {{\"feedback\": [...]}}: {e}"
        ))
    })?;
    let items = match parsed {
        Body_::Many { feedback } => feedback,
        Body_::One(item) => vec![item],
    };
    let items = items
        .into_iter()
        .map(|f| f.resolve().map_err(|e| Error::BadRequest(e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    let offered = items.len();
    let accepted = app.registry.feedback(&model, items)?;
    Ok(axum::Json(json!({ "accepted": accepted, "dropped": offered - accepted })).into_response())
}

/// Decodes a request body, checking what its inputs declare (names, datatypes, shapes)
/// against the model's signature before any element is decoded: a request of the wrong
/// shape costs no tensor.
fn decode_checked(
    served: &ServedModel,
    body: &[u8],
    json_len: Option<usize>,
) -> Result<v2::DecodedRequest> {
    let bad = |e: capsule_format::Error| Error::BadRequest(e.to_string());
    let (mut request, binary) = v2::parse_request(body, json_len).map_err(bad)?;
    let declared = request
        .inputs
        .iter()
        .map(|i| {
            Ok(capsule_runtime::Declared {
                name: &i.name,
                dtype: capsule_format::DType::from_v2_name(&i.datatype).map_err(bad)?,
                shape: &i.shape,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    capsule_runtime::check_signature(served.manifest(), &declared).map_err(|e| match e {
        capsule_runtime::Error::BadRequest(m) => Error::BadRequest(m),
        other => Error::Inference(other),
    })?;
    let inputs = v2::decode_inputs(&request, binary).map_err(bad)?;
    // The elements' text is decoded; only the declarations are read from here on.
    for input in &mut request.inputs {
        input.data = v2::TensorData::default();
    }
    Ok(v2::DecodedRequest { request, inputs })
}

async fn run_infer(
    app: &App,
    model: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Body,
    request_id: &str,
    labels: &mut (String, String),
) -> Result<Response> {
    let served: Arc<ServedModel> = app.registry.resolve(model, version)?;
    labels.1.clone_from(&served.version);
    let (bytes, charge) = read_body(app, headers, body, app.config.max_body_bytes).await?;
    let json_len = match headers.get(INFERENCE_HEADER_CONTENT_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    Error::BadRequest(format!("{INFERENCE_HEADER_CONTENT_LENGTH} is not a length"))
                })?,
        ),
    };
    let decoded = decode_checked(&served, &bytes, json_len)?;
    // The body and its decoding's copy of the text are gone past this point; the tensors
    // are bounded by the model's queue.
    drop(bytes);
    drop(charge);
    let output_names = served.output_names();
    decoded
        .request
        .select_outputs(&output_names)
        .map_err(|e| Error::BadRequest(e.to_string()))?;
    let deadline = request_deadline(&app.config, &decoded.request);
    let id = decoded
        .request
        .id
        .clone()
        .or_else(|| Some(request_id.to_owned()));
    let id_str = id.clone().unwrap_or_default();
    let outcome = app
        .registry
        .infer_recorded(&served, decoded.inputs, deadline, &id_str)
        .await?;
    let actual: Vec<&str> = outcome.outputs.iter().map(|t| t.name.as_str()).collect();
    let selection = decoded
        .request
        .select_outputs(&actual)
        .map_err(|e| Error::BadRequest(e.to_string()))?;
    let encoded = v2::encode_response(
        &served.name,
        Some(served.version.clone()),
        id,
        &outcome.outputs,
        &selection,
    )
    .map_err(|e| Error::Internal(format!("cannot encode the response: {e}")))?;
    let mut response = Response::new(Body::from(encoded.body));
    let h = response.headers_mut();
    match encoded.json_len {
        Some(n) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(INFERENCE_HEADER_CONTENT_LENGTH, HeaderValue::from(n));
        }
        None => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    Ok(response)
}
