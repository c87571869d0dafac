//! `capsule`: build, inspect, run and benchmark WebAssembly inference capsules.

#[cfg(feature = "bench")]
mod bench;
#[cfg(feature = "build")]
mod build;
#[cfg(all(feature = "build", feature = "bench", feature = "hub"))]
mod demo;
#[cfg(feature = "build")]
mod golden;
mod hub;
#[cfg(feature = "hub")]
mod hub_server;
mod inspect;
mod npy;
mod run;
mod serve;
mod split;

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use capsule_runtime::{CapsuleEngine, EngineConfig};
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

/// Capsule: one sandboxed WebAssembly module per model, with its preprocessing, that runs the
/// same on edge nodes, in browsers and here.
#[derive(Debug, Parser)]
#[command(name = "capsule", version, about)]
struct Cli {
    /// Directory of the compiled-code cache (default: $XDG_CACHE_HOME/capsule or ~/.cache/capsule).
    #[arg(long, global = true, env = "CAPSULE_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Keep compiled code in memory only.
    #[arg(long, global = true)]
    no_cache: bool,
    /// Let capsules hand dense matrix products to this machine's native kernels (x86-64 with
    /// AVX2 and FMA). `false` keeps everything in wasm: outputs then match a browser's bit for
    /// bit. [default: true]
    #[arg(long, global = true, env = "CAPSULE_HOST_KERNELS", value_name = "BOOL")]
    host_kernels: Option<bool>,
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "CAPSULE_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Compile an ONNX model into a pre-initialized capsule.
    #[cfg(feature = "build")]
    Build(build::Args),
    /// Show a capsule's manifest, imports, exports, sections and hashes.
    Inspect(inspect::Args),
    /// Cut a capsule into its guest code (`<sha256>.wasm`, shared by every model of one guest
    /// build) and its model image (`NAME.capsule.img`: the manifest and memory image, gzipped).
    Split(split::Args),
    /// Put a model image and its guest code back together into the single-file capsule.
    Join(split::JoinArgs),
    /// Run one inference (Open Inference Protocol V2 JSON in and out).
    Run(run::Args),
    /// Measure latency percentiles, cold start and the same model on native tract.
    #[cfg(feature = "bench")]
    Bench(bench::Args),
    /// The one-command tour: build the bundled sample model, run and bench it, then a hub and
    /// a node: signed pushes, an update, telemetry.
    #[cfg(all(feature = "build", feature = "bench", feature = "hub"))]
    Demo(demo::Args),
    /// Serve a model repository over the Open Inference Protocol V2 (REST and gRPC), with
    /// metrics, warm instance pools, overload control and hot swap.
    Serve(Box<serve::Args>),
    /// Run the hub: model registry, signed update metadata, staged rollouts to the fleet.
    #[cfg(feature = "hub")]
    Hub(hub_server::HubArgs),
    /// Generate publisher keys and root metadata (offline).
    #[command(subcommand)]
    Keys(hub::KeysCommand),
    /// Add capsules to signed targets metadata, or add a signature to it (offline).
    Sign(hub::SignArgs),
    /// Upload a capsule to the hub, register the version, publish signed metadata.
    Push(hub::PushArgs),
    /// Staged rollouts on the hub: start, step, promote, abort, rollback, list.
    Rollout(hub::RolloutArgs),
    /// The hub's registry: list, show, compare.
    Models(hub::ModelsArgs),
    /// The hub's tokens: list, issue (admin, node), revoke.
    Tokens(hub::TokensArgs),
}

impl Cli {
    fn engine(&self) -> Result<Arc<CapsuleEngine>> {
        let mut config = EngineConfig::default();
        if let Some(dir) = &self.cache_dir {
            config.cache_dir = Some(dir.clone());
        }
        if self.no_cache {
            config.cache_dir = None;
        }
        if let Some(on) = self.host_kernels {
            config.host_kernels = on;
        }
        Ok(CapsuleEngine::new(config)?)
    }
}

fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("CAPSULE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    // Colour codes only for a terminal: a log file or a collector gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> std::process::ExitCode {
    // `capsule --version` also names the guest build the binary carries (what its capsules
    // run): guest-release ships, guest-dev is the fast-to-build one of debug builds.
    // A fast guest (CAPSULE_GUEST_SIMD=relaxed) says so.
    let relaxed = match capsule_runtime::GUEST_SIMD {
        "relaxed-simd" => ", relaxed-simd",
        _ => "",
    };
    let version: &'static str = Box::leak(
        format!(
            "{} (guest {}{relaxed})",
            env!("CARGO_PKG_VERSION"),
            capsule_runtime::GUEST_PROFILE
        )
        .into_boxed_str(),
    );
    let cli = match Cli::from_arg_matches(&Cli::command().version(version).get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let level = match cli.command {
        Command::Serve(_) => "info",
        #[cfg(feature = "hub")]
        Command::Hub(_) => "info",
        // The tour says what happens; the hub and the node it runs log only their errors.
        #[cfg(all(feature = "build", feature = "bench", feature = "hub"))]
        Command::Demo(_) => "error",
        _ => "warn",
    };
    init_logging(cli.log_format, level);
    let result = dispatch(&cli);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs the subcommand `cli` names.
fn dispatch(cli: &Cli) -> Result<()> {
    match &cli.command {
        #[cfg(feature = "build")]
        Command::Build(args) => build::run(cli, args),
        Command::Inspect(args) => inspect::run(args),
        Command::Split(args) => split::run_split(args),
        Command::Join(args) => split::run_join(args),
        Command::Run(args) => run::run(cli, args),
        #[cfg(feature = "bench")]
        Command::Bench(args) => bench::run(cli, args),
        #[cfg(all(feature = "build", feature = "bench", feature = "hub"))]
        Command::Demo(args) => demo::run(cli, args),
        Command::Serve(args) => serve::run(cli, args),
        #[cfg(feature = "hub")]
        Command::Hub(args) => hub_server::run_hub(args),
        Command::Keys(cmd) => hub::run_keys(cmd),
        Command::Sign(args) => hub::run_sign(args),
        Command::Push(args) => hub::run_push(args),
        Command::Rollout(args) => hub::run_rollout(args),
        Command::Models(args) => hub::run_models(args),
        Command::Tokens(args) => hub::run_tokens(args),
    }
}

/// Reads a file after checking its size against `limit` (every file the CLI reads is
/// untrusted input).
fn read_limited(path: &std::path::Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    use anyhow::Context;
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {what} {}", path.display()))?
        .len();
    if size > limit {
        anyhow::bail!(
            "{what} {} is {size} bytes, over the limit of {limit}",
            path.display()
        );
    }
    std::fs::read(path).with_context(|| format!("reading {what} {}", path.display()))
}

/// Human-readable byte size.
fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / f64::from(1 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Gzip size at the default level (what a server would send).
fn gzip_size(data: &[u8]) -> Result<u64> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data)?;
    Ok(enc.finish()?.len() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
