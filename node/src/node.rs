//! A running node: listeners, the repository watcher, graceful shutdown.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capsule_runtime::{CapsuleEngine, EngineConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::grpc::GrpcService;
use crate::http::{App, router};
use crate::loader::Loader;
use crate::metrics::Metrics;
use crate::models::ModelRegistry;
use crate::proto::grpc_inference_service_server::GrpcInferenceServiceServer;
use crate::{Error, NodeConfig, Result};

/// How often the gRPC server pings an idle HTTP/2 connection (and TCP keepalive's idle time).
const GRPC_KEEPALIVE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(30);
/// How long it waits for the answer to a ping before closing the connection.
const GRPC_KEEPALIVE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// A running edge node.
pub struct Node {
    http_addr: SocketAddr,
    grpc_addr: Option<SocketAddr>,
    registry: Arc<ModelRegistry>,
    loader: Arc<Mutex<Loader>>,
    config: Arc<NodeConfig>,
    shutdown: watch::Sender<bool>,
    bodies: Arc<crate::http::BodyBudget>,
    servers: Vec<JoinHandle<()>>,
    watcher: JoinHandle<()>,
    agent: Option<JoinHandle<()>>,
    /// The telemetry task and its stop signal (sent once the servers have drained).
    telemetry: Option<(JoinHandle<()>, watch::Sender<bool>)>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("http", &self.http_addr)
            .field("grpc", &self.grpc_addr)
            .finish()
    }
}

async fn run_sync(loader: &Arc<Mutex<Loader>>) {
    let loader = Arc::clone(loader);
    let done = tokio::task::spawn_blocking(move || {
        let mut l = loader.lock().unwrap_or_else(|p| p.into_inner());
        l.sync();
    })
    .await;
    if let Err(e) = done {
        tracing::error!(error = %e, "repository sync failed");
    }
}

impl Node {
    /// Binds the listeners, starts serving (health answers at once; `/v2/health/ready`
    /// turns ready once the repository's first scan has loaded), and starts watching the
    /// repository.
    pub async fn start(config: NodeConfig) -> Result<Node> {
        config.validate()?;
        let started = Instant::now();
        let mut engine_config = EngineConfig::default();
        if let Some(dir) = &config.cache_dir {
            engine_config.cache_dir = Some(dir.clone());
        }
        if !config.disk_cache {
            engine_config.cache_dir = None;
        }
        engine_config.host_kernels = config.host_kernels;
        // Where copy-on-write images are unavailable (not Linux), instances are allocated on
        // demand too, never from wasmtime's pool: its slot count is fixed when the engine
        // starts, and a node's instance count (models x --instances, twice during a swap) is
        // not known then (two models at --instances 40 ran out of its 64 slots).
        engine_config.pooling = false;
        let engine = CapsuleEngine::new(engine_config).map_err(Error::Engine)?;
        let metrics = Metrics::new()?;
        let telemetry = match &config.hub {
            Some(sync) => Some(crate::telemetry::Telemetry::open(
                &config.models.join(".capsule-agent").join("telemetry"),
                &sync.node_id,
                config.telemetry_window_ms,
                config.telemetry_buffer_bytes,
                metrics.clone(),
                config.clock.clone(),
            )?),
            None => None,
        };
        let registry = Arc::new(ModelRegistry::new(metrics, telemetry.clone()));
        let config = Arc::new(config);
        let loader = Arc::new(Mutex::new(Loader::new(
            engine,
            (*config).clone(),
            Arc::clone(&registry),
        )));
        let (shutdown, _) = watch::channel(false);

        let http_listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(Error::io(format!("cannot listen on {}", config.http)))?;
        let http_addr = http_listener
            .local_addr()
            .map_err(Error::io("listener address"))?;
        let mut servers = Vec::new();
        let bodies = Arc::new(crate::http::BodyBudget::new(config.max_body_bytes));
        let app = router(App {
            registry: Arc::clone(&registry),
            config: Arc::clone(&config),
            bodies: Arc::clone(&bodies),
        });
        let mut rx = shutdown.subscribe();
        // With a header-read timeout, which `axum::serve` does not set (`capsule_serve`).
        servers.push(tokio::spawn(capsule_serve::serve(
            http_listener,
            app,
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        )));

        let mut grpc_addr = None;
        if let Some(addr) = config.grpc {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(Error::io(format!("cannot listen on {addr}")))?;
            grpc_addr = Some(
                listener
                    .local_addr()
                    .map_err(Error::io("listener address"))?,
            );
            let limit = usize::try_from(config.max_body_bytes).unwrap_or(usize::MAX);
            let service = crate::grpc_budget::Budgeted::new(
                GrpcInferenceServiceServer::new(GrpcService {
                    registry: Arc::clone(&registry),
                    config: Arc::clone(&config),
                })
                .max_decoding_message_size(limit)
                .max_encoding_message_size(usize::MAX),
                Arc::clone(&bodies),
            );
            let mut rx = shutdown.subscribe();
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            // A request that has not been answered within twice the deadline (its message
            // stalled mid-upload, say) is cancelled, and connections whose peer stopped
            // answering HTTP/2 pings are closed: tonic sets no timer of its own.
            let stalled_after = config.deadline().saturating_mul(2);
            servers.push(tokio::spawn(async move {
                let served = tonic::transport::Server::builder()
                    .timeout(stalled_after)
                    .http2_keepalive_interval(Some(GRPC_KEEPALIVE_INTERVAL))
                    .http2_keepalive_timeout(Some(GRPC_KEEPALIVE_TIMEOUT))
                    .tcp_keepalive(Some(GRPC_KEEPALIVE_INTERVAL))
                    .add_service(service)
                    .serve_with_incoming_shutdown(incoming, async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "gRPC server failed");
                }
            }));
        }
        tracing::info!(http = %http_addr, grpc = ?grpc_addr, models = %config.models.display(), "node listening");

        let watcher = {
            let loader = Arc::clone(&loader);
            let registry = Arc::clone(&registry);
            let interval = Duration::from_millis(config.poll_interval_ms);
            let mut rx = shutdown.subscribe();
            tokio::spawn(async move {
                run_sync(&loader).await;
                registry.set_ready();
                tracing::info!(
                    ms = started.elapsed().as_secs_f64() * 1e3,
                    versions = registry.all_versions().len(),
                    "node ready"
                );
                if interval.is_zero() {
                    return;
                }
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(interval) => run_sync(&loader).await,
                        _ = rx.changed() => return,
                    }
                }
            })
        };
        let mut telemetry_task = None;
        let agent = match &config.hub {
            Some(sync) => {
                let agent = crate::agent::Agent::new(
                    sync.clone(),
                    config.models.clone(),
                    Arc::clone(&loader),
                    Arc::clone(&registry),
                    config.clock.clone(),
                )?;
                if let Some(t) = telemetry {
                    let hub = agent.hub_client();
                    let (stop, rx) = watch::channel(false);
                    telemetry_task = Some((tokio::spawn(t.run(hub, rx)), stop));
                }
                Some(tokio::spawn(agent.run(shutdown.subscribe())))
            }
            None => None,
        };
        Ok(Node {
            http_addr,
            grpc_addr,
            registry,
            loader,
            config,
            shutdown,
            bodies,
            servers,
            watcher,
            agent,
            telemetry: telemetry_task,
        })
    }

    /// Where REST listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// Where gRPC listens.
    pub fn grpc_addr(&self) -> Option<SocketAddr> {
        self.grpc_addr
    }

    /// The models being served.
    pub fn registry(&self) -> &Arc<ModelRegistry> {
        &self.registry
    }

    /// Bytes of request bodies (REST bodies and gRPC messages) the node holds now (being read, or read and not yet
    /// decoded), out of its budget of four times `max_body_bytes`.
    pub fn request_body_bytes(&self) -> u64 {
        self.bodies.held()
    }

    /// Waits until the first repository scan has loaded.
    pub async fn wait_ready(&self) {
        while !self.registry.is_ready() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Rescans the repository now and applies what changed (the watcher does this every
    /// poll interval).
    pub async fn sync_now(&self) {
        run_sync(&self.loader).await;
    }

    /// Waits for Ctrl-C or SIGTERM.
    pub async fn wait_for_shutdown_signal(&self) {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = tokio::signal::ctrl_c() => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }

    /// Graceful shutdown: stops accepting connections, lets in-flight requests finish (up
    /// to the drain timeout), then closes every queue.
    pub async fn shutdown(self) {
        tracing::info!("shutting down: finishing in-flight requests");
        let _ = self.shutdown.send(true);
        self.watcher.abort();
        if let Some(agent) = self.agent {
            let _ = agent.await;
        }
        let drain = Duration::from_millis(self.config.drain_timeout_ms);
        let servers = futures_join(self.servers);
        if tokio::time::timeout(drain, servers).await.is_err() {
            tracing::warn!(
                timeout_ms = self.config.drain_timeout_ms,
                "drain timeout: closing with requests still in flight"
            );
        }
        // After the servers: the last window has every request they answered.
        if let Some((task, stop)) = self.telemetry {
            let _ = stop.send(true);
            let _ = task.await;
        }
        self.registry.close_all();
        tracing::info!("node stopped");
    }
}

async fn futures_join(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}
