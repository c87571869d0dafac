//! `capsule serve`: run an edge node.

use std::path::PathBuf;

use anyhow::{Context, Result};
use capsule_node::{Node, NodeConfig, NodeSettings};

use crate::Cli;

/// Settings come from (highest precedence first) these flags, their `CAPSULE_*` environment
/// variables, the TOML file given by `--config`, and built-in defaults.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML file with any of the settings below: the keys are the flags' names with `_`
    /// (`static_dir` for --static, `labels` a list of "key=value"), and `cache_dir`,
    /// `disk_cache`, `host_kernels` for capsule's --cache-dir, --no-cache, --host-kernels.
    #[arg(long, env = "CAPSULE_CONFIG")]
    config: Option<PathBuf>,
    #[command(flatten)]
    settings: NodeSettings,
}

impl Args {
    /// The node's settings: defaults, then the file, then environment and flags.
    pub fn node_config(&self, cli: &Cli) -> Result<NodeConfig> {
        let file = match &self.config {
            Some(path) => NodeSettings::from_toml_file(path)?,
            None => NodeSettings::default(),
        };
        let mut s = self.settings.over(&file)?;
        if let Some(dir) = &cli.cache_dir {
            s.cache_dir = Some(dir.clone());
        }
        if cli.no_cache {
            s.disk_cache = Some(false);
        }
        if let Some(on) = cli.host_kernels {
            s.host_kernels = Some(on);
        }
        Ok(s.resolve()?)
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
