//! The Capsule hub (design section 6): model registry and experiment tracking, signed update
//! metadata, staged rollouts to a fleet of edge nodes, the nodes' long-polled desired state.
//!
//! The hub stores and serves; it does not sign. Publishers sign targets metadata offline
//! (`capsule sign`), and nodes verify it against their pinned root keys, so a compromised hub
//! cannot make a node run a capsule no publisher approved (`capsule_format::tuf`).
//!
//! Storage is one [`Store`], which holds every query of the hub, over SQLite (the embedded
//! default) or PostgreSQL with one set of migrations; capsule blobs are files named by their
//! SHA-256. Several hub processes can share one PostgreSQL: every process polls the shared
//! state generation, so a long-poll wakes within a poll interval of a change made by any of
//! them.

pub mod alert;
mod api;
mod blobs;
mod dashboard;
mod extract;
mod fleet;
mod limits;
mod metrics;
pub mod monitor;
pub mod rollout;
pub mod store;
mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use blobs::BlobStore;
pub use store::Store;

/// Errors of the hub; every API error is JSON `{"error": message}` with the status below
/// (the message of a server error is its whole chain of causes, [`Error::chain`]).
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
    /// A capsule, metadata or telemetry the format refuses (400).
    #[error(transparent)]
    Invalid(#[from] capsule_format::Error),
    /// A method the endpoint does not take (405).
    #[error("{0}")]
    MethodNotAllowed(String),
    /// A request that contradicts the state (409).
    #[error("{0}")]
    Conflict(String),
    /// A body over its limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// Too many requests for this caller now (429).
    #[error("{0}")]
    TooManyRequests(String),
    /// A setting the hub cannot start with (a start-up error).
    #[error("{0}")]
    Settings(String),
    /// The monitoring settings file does not parse.
    #[error("monitoring settings {}", path.display())]
    SettingsFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: toml::de::Error,
    },
    /// The database could not be reached.
    #[error("connecting to the database {url}")]
    Connect {
        /// Its URL, password redacted.
        url: String,
        /// Why.
        #[source]
        source: store::QueryError,
    },
    /// The database's migrations failed.
    #[error("migrating the database")]
    Migrate(#[from] store::MigrateError),
    /// A query failed (500).
    #[error("database")]
    Database(#[from] store::QueryError),
    /// The database holds a name this release does not know (500).
    #[error("stored {column}")]
    Stored {
        /// The column.
        column: &'static str,
        /// The name.
        #[source]
        source: capsule_format::hub::UnknownName,
    },
    /// A file or socket failed (500).
    #[error("{what}")]
    Io {
        /// What the hub was doing (`writing PATH`).
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The TLS certificate or key cannot be used.
    #[error("TLS: {what}")]
    Tls {
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// JSON that the hub writes could not be encoded (500).
    #[error("encoding JSON")]
    Json(#[from] serde_json::Error),
    /// The hub's metrics registry refused a metric (500).
    #[error("metrics")]
    Metrics(#[from] prometheus::Error),
    /// The HTTP client for webhooks could not be built.
    #[error("HTTP client")]
    HttpClient(#[source] reqwest::Error),
    /// A response header the hub made is not a valid header value (500).
    #[error("response header")]
    Header(#[from] axum::http::header::InvalidHeaderValue),
    /// A blocking task panicked or was cancelled (500).
    #[error("a blocking task failed")]
    Task(#[from] tokio::task::JoinError),
    /// A broken invariant of the hub's own (500).
    #[error("internal: {0}")]
    Internal(String),
}

impl Error {
    /// The HTTP status of this error.
    pub fn status(&self) -> u16 {
        match self {
            Error::Unauthorized(_) => 401,
            Error::Forbidden(_) => 403,
            Error::NotFound(_) => 404,
            Error::MethodNotAllowed(_) => 405,
            Error::BadRequest(_) | Error::Invalid(_) => 400,
            Error::Conflict(_) => 409,
            Error::TooLarge(_) => 413,
            Error::TooManyRequests(_) => 429,
            _ => 500,
        }
    }

    /// The message and every cause under it, `: `-separated.
    pub fn chain(&self) -> String {
        let mut out = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            let text = c.to_string();
            if !out.ends_with(&text) {
                out.push_str(": ");
                out.push_str(&text);
            }
            cause = c.source();
        }
        out
    }

    /// An I/O error while `what`.
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
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
    /// How long raw telemetry (batches, predictions, labels) and notification records are
    /// kept; none: forever. Running totals, alerts, rollouts and the audit log are kept.
    pub retention: Option<Duration>,
    /// The wall clock: windows, timers, retention and every stored time read it (tests
    /// set and advance one).
    pub clock: capsule_format::clock::SharedClock,
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
            retention: Some(monitor::DEFAULT_RETENTION),
            clock: capsule_format::clock::system(),
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
    pub(crate) db: Store,
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
    /// What desired states are computed from, per generation.
    pub(crate) snapshots: fleet::Snapshots,
    /// Nodes' last calls, written once per tick.
    pub(crate) seen: fleet::Seen,
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
        let db = Store::connect(&config.database)
            .await?
            .with_clock(config.clock.clone());
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
        // The per-node model states of reports stored before they were kept apart.
        let nodes = db.build_model_states().await?;
        if nodes > 0 {
            tracing::info!(nodes, "node model states built from stored reports");
        }
        // Past any generation an earlier life of this database handed out (a restored backup).
        let (notify, generation) =
            watch::channel(db.advance_generation(db.clock().now_ms()).await?);
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(Error::io(format!("binding {}", config.http)))?;
        let addr = listener
            .local_addr()
            .map_err(Error::io("reading the listening address"))?;
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
            (None, None) => None,
            _ => {
                return Err(Error::Settings(
                    "TLS needs both a certificate and a key".into(),
                ));
            }
        };
        config.monitor.validate()?;
        let http = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .map_err(Error::HttpClient)?;
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
            snapshots: fleet::Snapshots::default(),
            seen: fleet::Seen::default(),
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
                if let Err(e) = background.seen.flush(&background.db).await {
                    tracing::error!(error = %e.chain(), "recording nodes' last calls failed");
                }
                if let Err(e) = api::tick_rollouts(&background).await {
                    tracing::error!(error = %e.chain(), "rollout timer or canary judging failed");
                }
            }
            // Nothing noted is lost on a clean stop.
            if let Err(e) = background.seen.flush(&background.db).await {
                tracing::error!(error = %e.chain(), "recording nodes' last calls failed");
            }
        });
        let monitor = Arc::clone(&shared);
        let mut stop_monitor = shutdown.subscribe();
        let evaluator = tokio::spawn(async move {
            let every =
                Duration::from_millis((monitor.config.monitor.window_ms / 4).clamp(100, 5_000));
            // Batches an earlier release stored whole become window rows.
            match monitor::fold_stored_batches(&monitor.db, &monitor.config.monitor.group_label)
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::info!(batches = n, "stored telemetry folded into windows"),
                Err(e) => tracing::error!(error = %e.chain(), "folding stored telemetry failed"),
            }
            let mut tick = tokio::time::interval(every);
            let mut swept: Option<tokio::time::Instant> = None;
            loop {
                tokio::select! {
                    _ = stop_monitor.wait_for(|s| *s) => break,
                    _ = tick.tick() => {}
                }
                if let Err(e) = monitor::evaluate(&monitor).await {
                    tracing::error!(error = %e.chain(), "telemetry evaluation failed");
                }
                let due = swept.is_none_or(|at| at.elapsed() >= monitor::SWEEP_EVERY);
                if let (Some(keep), true) = (monitor.config.retention, due) {
                    swept = Some(tokio::time::Instant::now());
                    match monitor.db.sweep(keep, monitor.db.clock().now_ms()).await {
                        Ok(0) => {}
                        Ok(n) => tracing::info!(rows = n, "retention: old telemetry deleted"),
                        Err(e) => tracing::error!(error = %e.chain(), "retention sweep failed"),
                    }
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
    let what = format!("writing {}", path.display());
    let mut f = options.open(path).map_err(Error::io(&what))?;
    writeln!(f, "{secret}").map_err(Error::io(what))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_errors_keep_their_causes_and_requests_their_words() {
        let io = Error::io("writing /blobs/ab/x")(std::io::Error::other("disk full"));
        assert_eq!(io.status(), 500);
        assert_eq!(io.to_string(), "writing /blobs/ab/x");
        assert_eq!(io.chain(), "writing /blobs/ab/x: disk full");
        let stored = Error::Stored {
            column: "state",
            source: "paused"
                .parse::<capsule_format::hub::RolloutState>()
                .unwrap_err(),
        };
        assert!(
            stored
                .chain()
                .starts_with("stored state: unknown RolloutState \"paused\"")
        );
        let bad = Error::BadRequest("steps: increasing percentages in 1..=100".into());
        assert_eq!((bad.status(), bad.chain()), (400, bad.to_string()));
        let settings = toml::from_str::<monitor::MonitorConfig>("window_ms = \"x\"")
            .map_err(|source| Error::SettingsFile {
                path: "monitor.toml".into(),
                source,
            })
            .unwrap_err();
        assert_eq!(
            settings.status(),
            500,
            "a start-up error, never a client's fault"
        );
        assert!(
            settings
                .chain()
                .starts_with("monitoring settings monitor.toml: "),
            "{}",
            settings.chain()
        );
    }
}
