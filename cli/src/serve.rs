//! `capsule serve`: run an edge node.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use capsule_node::{Node, NodeConfig, VersionPolicy};

use crate::Cli;

/// Settings come from (highest precedence first) these flags, their `CAPSULE_*` environment
/// variables, the TOML file given by `--config`, and built-in defaults.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Model repository: DIR/NAME/VERSION/*.capsule.wasm, or flat *.capsule.wasm files
    /// named from their manifest. [default: models]
    #[arg(long, env = "CAPSULE_MODELS")]
    models: Option<PathBuf>,
    /// TOML file with any of the settings below (keys as in `NodeConfig`: models, http, grpc,
    /// instances, queue, deadline_ms, max_body_bytes, max_capsule_bytes, poll_interval_ms,
    /// version_policy, cache_dir, disk_cache, max_memory_bytes, host_kernels, drain_timeout_ms,
    /// feedback_token).
    #[arg(long, env = "CAPSULE_CONFIG")]
    config: Option<PathBuf>,
    /// REST (Open Inference Protocol V2) address. [default: 0.0.0.0:8000]
    #[arg(long, env = "CAPSULE_HTTP")]
    http: Option<SocketAddr>,
    /// gRPC (inference.GRPCInferenceService) address. [default: 0.0.0.0:8001]
    #[arg(long, env = "CAPSULE_GRPC")]
    grpc: Option<SocketAddr>,
    /// Do not serve gRPC.
    #[arg(long, env = "CAPSULE_NO_GRPC")]
    no_grpc: bool,
    /// Requests run at once per model version, each on its own warm instance.
    /// [default: number of CPUs]
    #[arg(long, env = "CAPSULE_INSTANCES")]
    instances: Option<usize>,
    /// Requests that may wait per model version when every instance is busy; past that the
    /// node answers 429 at once. [default: 64]
    #[arg(long, env = "CAPSULE_QUEUE")]
    queue: Option<usize>,
    /// Deadline of one request in milliseconds, queueing included (504 past it; a request may
    /// shorten it with a `timeout` parameter in microseconds). [default: 10000]
    #[arg(long, env = "CAPSULE_DEADLINE_MS")]
    deadline_ms: Option<u64>,
    /// Largest request body in bytes (413 past it). [default: 67108864]
    #[arg(long, env = "CAPSULE_MAX_BODY_BYTES")]
    max_body_bytes: Option<u64>,
    /// Largest capsule file the repository may hold, in bytes. [default: 1073741824]
    #[arg(long, env = "CAPSULE_MAX_CAPSULE_BYTES")]
    max_capsule_bytes: Option<u64>,
    /// How often the repository is rescanned for new, changed or removed capsules, in
    /// milliseconds (0: never). [default: 2000]
    #[arg(long, env = "CAPSULE_POLL_INTERVAL_MS")]
    poll_interval_ms: Option<u64>,
    /// Versions served per model: `latest:N`, `all` or `specific:V1,V2`. [default: latest:1]
    #[arg(long, env = "CAPSULE_VERSION_POLICY")]
    version_policy: Option<VersionPolicy>,
    /// Memory cap of one guest instance in bytes. [default: each capsule's manifest limit]
    #[arg(long, env = "CAPSULE_MAX_MEMORY_BYTES")]
    max_memory_bytes: Option<u64>,
    /// How long a graceful shutdown (SIGTERM, Ctrl-C) waits for in-flight requests, in
    /// milliseconds. [default: 30000]
    #[arg(long, env = "CAPSULE_DRAIN_TIMEOUT_MS")]
    drain_timeout_ms: Option<u64>,
    /// Sync with this hub: register, long-poll the desired state, install verified capsules.
    #[arg(long, env = "CAPSULE_HUB", requires_all = ["hub_token", "node_id", "trusted_root"])]
    hub: Option<String>,
    /// This node's hub token.
    #[arg(long, env = "CAPSULE_HUB_TOKEN", hide_env_values = true)]
    hub_token: Option<String>,
    /// This node's id at the hub.
    #[arg(long, env = "CAPSULE_NODE_ID")]
    node_id: Option<String>,
    /// A node label for rollouts (repeat): key=value.
    #[arg(long = "label")]
    labels: Vec<String>,
    /// The pinned root metadata (from `capsule keys root`): only capsules in targets
    /// metadata signed by its keys are installed.
    #[arg(long, env = "CAPSULE_TRUSTED_ROOT")]
    trusted_root: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for an https:// hub.
    #[arg(long, env = "CAPSULE_HUB_CA")]
    hub_ca: Option<PathBuf>,
    /// Length of a telemetry window in milliseconds (with a hub: one batch per window with
    /// traffic). [default: 60000]
    #[arg(long, env = "CAPSULE_TELEMETRY_WINDOW_MS")]
    telemetry_window_ms: Option<u64>,
    /// Bound of the local telemetry buffer in bytes; past it the oldest batches are dropped
    /// and counted. [default: 67108864]
    #[arg(long, env = "CAPSULE_TELEMETRY_BUFFER_BYTES")]
    telemetry_buffer_bytes: Option<u64>,
    /// Serve this directory to browsers at / (the SDK from sdk-js/dist, pages, signed
    /// metadata), with cross-origin isolation headers. Installed capsules are always at
    /// /capsules/MODEL/VERSION.capsule.wasm.
    #[arg(long = "static", env = "CAPSULE_STATIC", value_name = "DIR")]
    static_dir: Option<PathBuf>,
    /// The bearer token `POST /v2/models/{m}/feedback` requires. Without it feedback is off
    /// (403): labels drive the hub's accuracy alerts and retraining trigger.
    #[arg(long, env = "CAPSULE_FEEDBACK_TOKEN", hide_env_values = true)]
    feedback_token: Option<String>,
}

impl Args {
    /// The node's settings: defaults, then the file, then environment and flags.
    pub fn node_config(&self, cli: &Cli) -> Result<NodeConfig> {
        let mut c = match &self.config {
            Some(path) => NodeConfig::from_toml_file(path)?,
            None => NodeConfig::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => {$(
                if let Some(v) = &self.$field { c.$field = v.clone(); }
            )*};
        }
        set!(
            models,
            http,
            instances,
            queue,
            deadline_ms,
            max_body_bytes,
            max_capsule_bytes,
            poll_interval_ms,
            version_policy,
            drain_timeout_ms,
            telemetry_window_ms,
            telemetry_buffer_bytes
        );
        if let Some(grpc) = self.grpc {
            c.grpc = Some(grpc);
        }
        if self.no_grpc {
            c.grpc = None;
        }
        if let Some(dir) = &self.static_dir {
            c.static_dir = Some(dir.clone());
        }
        if let Some(token) = &self.feedback_token {
            c.feedback_token = Some(token.clone());
        }
        if self.max_memory_bytes.is_some() {
            c.max_memory_bytes = self.max_memory_bytes;
        }
        if let Some(dir) = &cli.cache_dir {
            c.cache_dir = Some(dir.clone());
        }
        if cli.no_cache {
            c.disk_cache = false;
        }
        if let Some(on) = cli.host_kernels {
            c.host_kernels = on;
        }
        if let (Some(url), Some(token), Some(node_id), Some(root)) = (
            &self.hub,
            &self.hub_token,
            &self.node_id,
            &self.trusted_root,
        ) {
            let mut labels = std::collections::BTreeMap::new();
            for l in &self.labels {
                let (k, v) = l
                    .split_once('=')
                    .with_context(|| format!("--label {l:?}: expected key=value"))?;
                labels.insert(k.to_owned(), v.to_owned());
            }
            c.hub = Some(capsule_node::HubSync {
                url: url.clone(),
                token: token.clone(),
                node_id: node_id.clone(),
                labels,
                trusted_root: root.clone(),
                wait_ms: 25_000,
                ca: self.hub_ca.clone(),
            });
        }
        c.validate()?;
        Ok(c)
    }
}

pub fn run(cli: &Cli, args: &Args) -> Result<()> {
    let config = args.node_config(cli)?;
    if !config.models.is_dir() {
        anyhow::bail!(
            "model repository {} is not a directory (create it, or pass --models DIR)",
            config.models.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("capsule-node")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let node = Node::start(config).await?;
        eprintln!(
            "capsule node: REST on http://{}{}; ready once the repository has loaded (GET /v2/health/ready)",
            node.http_addr(),
            node.grpc_addr()
                .map(|a| format!(", gRPC on {a}"))
                .unwrap_or_default()
        );
        node.wait_for_shutdown_signal().await;
        node.shutdown().await;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("node.toml");
        std::fs::write(&file, "queue = 3\ninstances = 5\npoll_interval_ms = 10\n").unwrap();
        let cli = crate::Cli::try_parse_from([
            "capsule",
            "serve",
            "--config",
            file.to_str().unwrap(),
            "--queue",
            "7",
            "--no-grpc",
            "--version-policy",
            "all",
        ])
        .unwrap();
        let crate::Command::Serve(args) = &cli.command else {
            panic!("not serve")
        };
        let c = args.node_config(&cli).unwrap();
        assert_eq!((c.queue, c.instances, c.poll_interval_ms), (7, 5, 10));
        assert_eq!(c.grpc, None);
        assert_eq!(c.version_policy, capsule_node::VersionPolicy::All);
        let e = crate::Cli::try_parse_from(["capsule", "serve", "--version-policy", "newest"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected `latest:N`"), "{e}");
    }
}
