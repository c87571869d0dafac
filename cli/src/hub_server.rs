//! `capsule hub`: the hub server (the `hub` feature).

use std::path::PathBuf;

use anyhow::Result;
use capsule_hub::{Hub, HubConfig};

use crate::hub::runtime;

/// `capsule hub`.
#[derive(Debug, clap::Args)]
pub struct HubArgs {
    /// Database: sqlite://FILE (created when missing) or postgres://USER@HOST/DB.
    #[arg(long, env = "CAPSULE_HUB_DATABASE", default_value = "sqlite://hub.db")]
    database: String,
    /// Directory of capsule blobs (content-addressed by SHA-256).
    #[arg(long, env = "CAPSULE_HUB_BLOBS", default_value = "hub-blobs")]
    blobs: PathBuf,
    /// HTTP address.
    #[arg(long, env = "CAPSULE_HUB_HTTP", default_value = "127.0.0.1:8400")]
    http: std::net::SocketAddr,
    /// An admin token to accept (stored hashed). Without one, and with no admin token in the
    /// database, the hub generates one into --admin-token-file.
    #[arg(long, env = "CAPSULE_HUB_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Where a generated admin token is written (mode 0600).
    #[arg(long, default_value = "hub-admin.token")]
    admin_token_file: PathBuf,
    /// TLS certificate chain (PEM): with --tls-key, serve HTTPS only (rustls).
    #[arg(long, env = "CAPSULE_HUB_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, env = "CAPSULE_HUB_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Monitoring settings (TOML: window_ms, grace_ms, group_label, webhooks, [drift],
    /// [errors], [latency], [accuracy], [retrain]; docs/monitoring.md). [default: drift and
    /// error-rate alerts over 60 s windows, no webhook]
    #[arg(long, env = "CAPSULE_HUB_MONITOR")]
    monitor: Option<PathBuf>,
    /// Days raw telemetry (batches, predictions, feedback labels) and notification records
    /// are kept; 0 keeps them forever. Running totals, alerts, rollouts and the audit log
    /// are always kept.
    #[arg(
        long,
        value_name = "DAYS",
        env = "CAPSULE_HUB_RETENTION",
        default_value_t = 30
    )]
    retention: u32,
}

impl HubArgs {
    /// The hub's settings from these flags.
    pub fn config(&self) -> Result<HubConfig> {
        let args = self;
        Ok(HubConfig {
            database: args.database.clone(),
            blobs: args.blobs.clone(),
            http: args.http,
            admin_token: args.admin_token.clone(),
            admin_token_file: args.admin_token_file.clone(),
            tls_cert: args.tls_cert.clone(),
            tls_key: args.tls_key.clone(),
            monitor: match &args.monitor {
                Some(path) => capsule_hub::monitor::MonitorConfig::from_toml_file(path)?,
                None => capsule_hub::monitor::MonitorConfig::default(),
            },
            retention: (args.retention > 0)
                .then(|| std::time::Duration::from_secs(u64::from(args.retention) * 24 * 3600)),
            ..HubConfig::default()
        })
    }
}

pub fn run_hub(args: &HubArgs) -> Result<()> {
    let config = args.config()?;
    runtime()?.block_on(async {
        let hub = Hub::start(config).await?;
        let scheme = if args.tls_cert.is_some() {
            "https"
        } else {
            "http"
        };
        eprintln!("capsule hub: {scheme}://{}", hub.addr());
        if hub.generated_admin_token().is_some() {
            eprintln!(
                "generated an admin token in {} (no admin token existed)",
                args.admin_token_file.display()
            );
        }
        wait_for_signal().await;
        hub.shutdown().await;
        Ok(())
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
