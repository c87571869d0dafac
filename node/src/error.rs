use thiserror::Error;

/// Errors of the edge node. Each maps to one HTTP status and one gRPC code.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// No model of that name is served.
    #[error("unknown model {0:?}")]
    ModelNotFound(String),
    /// The model exists but not that version.
    #[error("unknown version {version:?} of model {model:?}")]
    VersionNotFound {
        /// The model.
        model: String,
        /// The version asked for.
        version: String,
    },
    /// The model is known but has no version ready to serve.
    #[error("model {model:?} is not ready: {reason}")]
    NotReady {
        /// The model.
        model: String,
        /// Why.
        reason: String,
    },
    /// The request does not follow the protocol or the model's signature.
    #[error("{0}")]
    BadRequest(String),
    /// The request body is larger than the configured limit.
    #[error("request body is {size} bytes, over the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Body size (or declared size).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Every instance is busy and the wait queue is full.
    #[error(
        "model {model:?} version {version:?} is overloaded: {capacity} requests in flight and queued"
    )]
    QueueFull {
        /// The model.
        model: String,
        /// The version.
        version: String,
        /// Running plus queued requests that were accepted.
        capacity: usize,
    },
    /// The request's deadline passed (in the queue or while running; a running instance is
    /// discarded).
    #[error("deadline of {deadline_ms} ms exceeded {during}")]
    DeadlineExceeded {
        /// The deadline.
        deadline_ms: u64,
        /// `in the queue` or `during inference`.
        during: &'static str,
    },
    /// The node is shutting down.
    #[error("the node is shutting down")]
    ShuttingDown,
    /// The request bodies the node holds at once (being read or decoded) would pass their
    /// budget with this one's bytes (429).
    #[error("the node holds {limit} bytes of request bodies at once, its limit; retry later")]
    BodyBudget {
        /// The budget in bytes.
        limit: u64,
    },
    /// The request body stalled: no bytes for the node's deadline (408).
    #[error("the request body stalled: no bytes for {deadline_ms} ms")]
    BodyTimeout {
        /// The deadline.
        deadline_ms: u64,
    },
    /// The node is not set up for this request.
    #[error("{0}")]
    Unsupported(String),
    /// A request to a route behind a token without that token (401), or to a route that
    /// has no token configured and is therefore off (403).
    #[error("{message}")]
    Unauthorized {
        /// Whether the route is off altogether (no token configured).
        off: bool,
        /// What to do about it.
        message: String,
    },
    /// The capsule failed while running the request (trap, guest error).
    #[error("inference failed: {0}")]
    Inference(#[source] capsule_runtime::Error),
    /// A capsule could not be loaded.
    #[error("cannot load {path}: {reason}")]
    Load {
        /// The capsule file.
        path: String,
        /// Why.
        reason: String,
    },
    /// Bad configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// An I/O failure.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A failure of the node itself (a worker thread died).
    #[error("internal error: {0}")]
    Internal(String),
    /// The engine could not be created.
    #[error("engine: {0}")]
    Engine(#[source] capsule_runtime::Error),
    /// The hub could not be reached, or answered with an error (hub sync).
    #[error(transparent)]
    Hub(#[from] crate::hub_client::HubError),
    /// The hub's desired state does not parse.
    #[error("malformed desired state: {0}")]
    DesiredState(#[source] serde_json::Error),
    /// The hub's signed metadata is refused (TUF: signatures, thresholds, versions, expiry,
    /// target paths), or does not parse.
    #[error(transparent)]
    Metadata(capsule_format::Error),
    /// The hub published models but no targets metadata signs them.
    #[error("the hub has no targets metadata")]
    NoTargets,
    /// The hub acknowledged fewer telemetry batches than it was sent (the rest stay
    /// buffered and are sent again).
    #[error("hub acknowledged {acked} of {sent} batches")]
    Unacknowledged {
        /// Acknowledged.
        acked: usize,
        /// Sent.
        sent: usize,
    },
    /// The trusted root expired (TUF 5.3.10): nothing is installed until a new root comes.
    #[error("refused (5.3.10): root version {version} expired")]
    RootExpired {
        /// The root's version.
        version: u64,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }

    /// Maps a runtime error of an inference call.
    pub(crate) fn from_inference(e: capsule_runtime::Error, deadline_ms: u64) -> Error {
        use capsule_runtime::{Error as R, TrapKind};
        match e {
            R::BadRequest(m) => Error::BadRequest(m),
            R::Manifest(m) => Error::BadRequest(m.to_string()),
            R::RequestTooLarge { size, limit } => Error::PayloadTooLarge { size, limit },
            R::Trap {
                kind: TrapKind::Deadline,
                ..
            } => Error::DeadlineExceeded {
                deadline_ms,
                during: "during inference",
            },
            other => Error::Inference(other),
        }
    }

    /// The HTTP status of this error.
    pub fn http_status(&self) -> u16 {
        match self {
            Error::ModelNotFound(_) | Error::VersionNotFound { .. } => 404,
            Error::BadRequest(_) => 400,
            Error::PayloadTooLarge { .. } => 413,
            Error::QueueFull { .. } | Error::BodyBudget { .. } => 429,
            Error::BodyTimeout { .. } => 408,
            Error::NotReady { .. } | Error::ShuttingDown => 503,
            Error::DeadlineExceeded { .. } => 504,
            Error::Unsupported(_) => 501,
            Error::Unauthorized { off: true, .. } => 403,
            Error::Unauthorized { off: false, .. } => 401,
            Error::Inference(capsule_runtime::Error::Guest(_)) => 400,
            _ => 500,
        }
    }

    /// The gRPC status code of this error.
    pub fn grpc_code(&self) -> tonic::Code {
        match self.http_status() {
            404 => tonic::Code::NotFound,
            400 => tonic::Code::InvalidArgument,
            413 => tonic::Code::ResourceExhausted,
            429 => tonic::Code::ResourceExhausted,
            408 => tonic::Code::DeadlineExceeded,
            503 => tonic::Code::Unavailable,
            504 => tonic::Code::DeadlineExceeded,
            _ => tonic::Code::Internal,
        }
    }

    /// The outcome label of this error in metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Error::ModelNotFound(_) | Error::VersionNotFound { .. } => "not_found",
            Error::BadRequest(_) | Error::Inference(capsule_runtime::Error::Guest(_)) => {
                "bad_request"
            }
            Error::PayloadTooLarge { .. } => "too_large",
            Error::QueueFull { .. } | Error::BodyBudget { .. } => "rejected",
            Error::BodyTimeout { .. } => "timeout",
            Error::NotReady { .. } | Error::ShuttingDown => "unavailable",
            Error::DeadlineExceeded { .. } => "timeout",
            Error::Inference(capsule_runtime::Error::Trap { .. }) => "trap",
            _ => "error",
        }
    }
}

/// An error with its causes, one line.
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
