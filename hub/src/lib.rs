//! The Capsule hub (design section 6): model registry and experiment tracking, signed update
//! metadata, staged rollouts to a fleet of edge nodes, the nodes' long-polled desired state.
//!
//! The hub stores and serves; it does not sign. Publishers sign targets metadata offline
//! (`capsule sign`), and nodes verify it against their pinned root keys, so a compromised hub
//! cannot make a node run a capsule no publisher approved (`capsule_format::tuf`).
//!
//! Storage is `sqlx` over SQLite (the embedded default) or PostgreSQL with one set of
//! migrations; capsule blobs are files named by their SHA-256. Several hub processes can share
//! one PostgreSQL: every process polls the shared state generation, so a long-poll wakes
//! within a poll interval of a change made by any of them.

pub mod alert;
mod api;
mod blobs;
mod dashboard;
pub mod db;
mod limits;
mod metrics;
pub mod monitor;
pub mod rollout;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use blobs::BlobStore;
pub use db::Db;

/// Errors of the hub; every API error is JSON `{"error": message}` with the status below.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Missing or unknown token (401).
    #[error("{0}")]
    Unauthorized(String),
    /// A token without the right (403).
    #[error("{0}")]
    Forbidden(String),
    /// Unknown model, version, node, rollout or blob (404).
    #[error("{0}")]
    NotFound(String),
    /// A malformed request (400).
    #[error("{0}")]
    BadRequest(String),
    /// A request that contradicts the state (409).
    #[error("{0}")]
    Conflict(String),
    /// A body over its limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// Too many requests for this caller now (429).
    #[error("{0}")]
    TooManyRequests(String),
    /// The database failed (500).
    #[error("database: {0}")]
    Database(String),
    /// Blob storage failed (500).
    #[error("blob storage: {0}")]
    Io(String),
    /// Anything else (500).
    #[error("internal: {0}")]
    Internal(String),
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Error {
        Error::Database(e.to_string())
    }
}

impl Error {
    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        match self {
            Error::Unauthorized(_) => 401,
            Error::Forbidden(_) => 403,
            Error::NotFound(_) => 404,
            Error::BadRequest(_) => 400,
            Error::Conflict(_) => 409,
            Error::TooLarge(_) => 413,
            Error::TooManyRequests(_) => 429,
            Error::Database(_) | Error::Io(_) | Error::Internal(_) => 500,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How a hub runs.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// `sqlite://hub.db` (default) or `postgres://user@host/db`.
    pub database: String,
    /// Directory of capsule blobs.
    pub blobs: PathBuf,
    /// HTTP listen address.
    pub http: SocketAddr,
    /// An admin token to accept (stored hashed); when no admin token exists and none is
    /// given, one is generated and written to `admin_token_file`.
    pub admin_token: Option<String>,
    /// Where a generated admin token is written.
    pub admin_token_file: PathBuf,
    /// How often the shared state generation is polled (other replicas' changes).
    pub poll_interval: Duration,
    /// Longest long-poll.
    pub max_wait: Duration,
    /// Largest capsule accepted.
    pub max_blob_bytes: u64,
    /// TLS certificate chain (PEM); with `tls_key`, the hub serves HTTPS only.
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    pub tls_key: Option<PathBuf>,
    /// Monitoring: windows, alert rules, webhooks, retraining.
    pub monitor: monitor::MonitorConfig,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            database: "sqlite://hub.db".into(),
            blobs: PathBuf::from("hub-blobs"),
            http: SocketAddr::from(([127, 0, 0, 1], 8400)),
            admin_token: None,
            admin_token_file: PathBuf::from("hub-admin.token"),
            poll_interval: Duration::from_millis(200),
            max_wait: Duration::from_secs(30),
            max_blob_bytes: 2 << 30,
            tls_cert: None,
            tls_key: None,
            monitor: monitor::MonitorConfig::default(),
        }
    }
}

/// SHA-256 of a token, the form tokens are stored in.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token.
pub fn new_token(prefix: &str) -> String {
    format!(
        "{prefix}_{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

pub(crate) struct Shared {
    pub(crate) db: Db,
    pub(crate) blobs: BlobStore,
    pub(crate) config: HubConfig,
    pub(crate) generation: watch::Receiver<i64>,
    pub(crate) notify: watch::Sender<i64>,
    pub(crate) metrics: metrics::HubMetrics,
    /// Client for webhooks.
    pub(crate) http: reqwest::Client,
    /// One join at a time of a single-file capsule the hub has only in split form (it is
    /// then stored, so each is joined once): a burst of downloads cannot make the hub hold
    /// one joined capsule per request.
    pub(crate) joins: tokio::sync::Mutex<()>,
    /// Write rate limits per node.
    pub(crate) limits: limits::RateLimits,
    /// True once the hub is stopping: long-polls answer at once instead of holding the
    /// graceful shutdown for their whole wait.
    pub(crate) stopping: watch::Receiver<bool>,
}

impl Shared {
    /// Bumps the state generation and wakes this process's long-polls.
    pub(crate) async fn changed(&self) -> Result<()> {
        let g = self.db.bump().await?;
        self.notify.send_replace(g);
        Ok(())
    }
}

/// A running hub.
pub struct Hub {
    addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    admin_token: Option<String>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("addr", &self.addr).finish()
    }
}

impl Hub {
    /// Connects the database (migrating it), binds the listener and starts serving.
    pub async fn start(config: HubConfig) -> Result<Hub> {
        let db = Db::connect(&config.database).await?;
        let blobs = BlobStore::open(&config.blobs)?;
        let mut generated = None;
        if let Some(t) = &config.admin_token {
            db.add_token(
                &token_hash(t),
                capsule_format::hub::Role::Admin,
                "admin",
                "",
            )
            .await?;
        } else if !db.has_admin().await? {
            let t = new_token("hubadm");
            write_secret(&config.admin_token_file, &t)?;
            db.add_token(
                &token_hash(&t),
                capsule_format::hub::Role::Admin,
                "admin",
                "",
            )
            .await?;
            tracing::warn!(file = %config.admin_token_file.display(), "no admin token existed: generated one");
            generated = Some(t);
        }
        // Past any generation an earlier life of this database handed out (a restored backup).
        let (notify, generation) = watch::channel(db.advance_generation(monitor::now_ms()).await?);
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|e| Error::Io(format!("binding {}: {e}", config.http)))?;
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Io(e.to_string()))?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
            (None, None) => None,
            _ => {
                return Err(Error::BadRequest(
                    "TLS needs both a certificate and a key".into(),
                ));
            }
        };
        config.monitor.validate()?;
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(|e| Error::Internal(format!("HTTP client: {e}")))?;
        let (shutdown, mut stop) = watch::channel(false);
        let shared = Arc::new(Shared {
            db,
            blobs,
            config,
            generation,
            notify,
            metrics: metrics::HubMetrics::new()?,
            http,
            joins: tokio::sync::Mutex::new(()),
            limits: limits::RateLimits::default(),
            stopping: shutdown.subscribe(),
        });
        let app = api::router(Arc::clone(&shared));
        let mut stop_server = stop.clone();
        let graceful = async move {
            let _ = stop_server.wait_for(|s| *s).await;
        };
        let server = match tls {
            Some(config) => tokio::spawn(serve(
                tls::TlsListener::new(listener, config)?,
                app,
                graceful,
            )),
            None => tokio::spawn(serve(listener, app, graceful)),
        };
        let background = Arc::clone(&shared);
        let ticker = tokio::spawn(async move {
            let mut tick = tokio::time::interval(background.config.poll_interval);
            loop {
                tokio::select! {
                    _ = stop.wait_for(|s| *s) => break,
                    _ = tick.tick() => {}
                }
                // Changes by other replicas sharing the database.
                if let Ok(g) = background.db.generation().await
                    && g != *background.notify.borrow()
                {
                    background.notify.send_replace(g);
                }
                if let Err(e) = api::timed_steps(&background).await {
                    tracing::error!(error = %e, "rollout timer failed");
                }
                if let Err(e) = api::judge_canaries(&background).await {
                    tracing::error!(error = %e, "judging canaries failed");
                }
            }
        });
        let monitor = Arc::clone(&shared);
        let mut stop_monitor = shutdown.subscribe();
        let evaluator = tokio::spawn(async move {
            let every =
                Duration::from_millis((monitor.config.monitor.window_ms / 4).clamp(100, 5_000));
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop_monitor.wait_for(|s| *s) => break,
                    _ = tick.tick() => {}
                }
                if let Err(e) = monitor::evaluate(&monitor).await {
                    tracing::error!(error = %e, "telemetry evaluation failed");
                }
            }
        });
        tracing::info!(%addr, "hub listening");
        Ok(Hub {
            addr,
            shutdown,
            tasks: vec![server, ticker, evaluator],
            admin_token: generated,
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin token generated at this start, if one was.
    pub fn generated_admin_token(&self) -> Option<&str> {
        self.admin_token.as_deref()
    }

    /// Stops serving (in-flight long-polls end) and waits for the tasks.
    pub async fn shutdown(self) {
        self.shutdown.send_replace(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

/// Serves the API on a listener (plain TCP or TLS) until `stop` resolves, with a header-read
/// timeout and the remote address for handlers (`capsule_serve`).
async fn serve<L>(
    listener: L,
    app: axum::Router,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) where
    L: axum::serve::Listener<Addr = std::net::SocketAddr>,
{
    capsule_serve::serve(listener, app, stop).await;
}

/// Writes a secret file readable by its owner only.
fn write_secret(path: &std::path::Path, secret: &str) -> Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options
        .open(path)
        .map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))?;
    writeln!(f, "{secret}").map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))
}
