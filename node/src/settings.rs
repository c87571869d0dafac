//! The node's settings as an operator gives them, defined once: every field optional, one
//! struct for `capsule serve`'s flags (with their `CAPSULE_*` variables) and for the
//! `--config` TOML file (the same names, `_` for the flags' `-`; unknown keys are refused).
//! [`NodeSettings::over`] lays flags over a file, [`NodeSettings::resolve`] fills the rest
//! with the defaults and checks the result into a [`NodeConfig`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::agent::HubSync;
use crate::config::{NodeConfig, VersionPolicy};
use crate::{Error, Result};

/// Longest long-poll of the hub, in milliseconds, unless `hub_wait_ms` says otherwise.
const DEFAULT_HUB_WAIT_MS: u64 = 25_000;

/// Largest settings file read.
const MAX_SETTINGS_BYTES: u64 = 1 << 20;

/// Settings of `capsule serve`: flags, `CAPSULE_*` variables and `--config` TOML keys.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct NodeSettings {
    /// Model repository: DIR/NAME/VERSION/*.capsule.wasm, or flat *.capsule.wasm files
    /// named from their manifest. [default: models]
    #[arg(long, env = "CAPSULE_MODELS")]
    pub models: Option<PathBuf>,
    /// REST (Open Inference Protocol V2) address. [default: 0.0.0.0:8000]
    #[arg(long, env = "CAPSULE_HTTP")]
    pub http: Option<SocketAddr>,
    /// gRPC (inference.GRPCInferenceService) address. [default: 0.0.0.0:8001]
    #[arg(long, env = "CAPSULE_GRPC")]
    pub grpc: Option<SocketAddr>,
    /// Do not serve gRPC.
    #[arg(long, env = "CAPSULE_NO_GRPC")]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_grpc: bool,
    /// Requests run at once per model version, each on its own warm instance.
    /// [default: number of CPUs]
    #[arg(long, env = "CAPSULE_INSTANCES")]
    pub instances: Option<usize>,
    /// Requests that may wait per model version when every instance is busy; past that the
    /// node answers 429 at once. [default: 64]
    #[arg(long, env = "CAPSULE_QUEUE")]
    pub queue: Option<usize>,
    /// Deadline of one request in milliseconds, queueing included (504 past it; a request may
    /// shorten it with a `timeout` parameter in microseconds). [default: 10000]
    #[arg(long, env = "CAPSULE_DEADLINE_MS")]
    pub deadline_ms: Option<u64>,
    /// Largest request body in bytes (413 past it). [default: 67108864]
    #[arg(long, env = "CAPSULE_MAX_BODY_BYTES")]
    pub max_body_bytes: Option<u64>,
    /// Largest capsule file the repository may hold, in bytes. [default: 1073741824]
    #[arg(long, env = "CAPSULE_MAX_CAPSULE_BYTES")]
    pub max_capsule_bytes: Option<u64>,
    /// How often the repository is rescanned for new, changed or removed capsules, in
    /// milliseconds (0: never). [default: 2000]
    #[arg(long, env = "CAPSULE_POLL_INTERVAL_MS")]
    pub poll_interval_ms: Option<u64>,
    /// Versions served per model: `latest:N`, `all` or `specific:V1,V2`. [default: latest:1]
    #[arg(long, env = "CAPSULE_VERSION_POLICY")]
    pub version_policy: Option<VersionPolicy>,
    /// Memory cap of one guest instance in bytes. [default: each capsule's manifest limit]
    #[arg(long, env = "CAPSULE_MAX_MEMORY_BYTES")]
    pub max_memory_bytes: Option<u64>,
    /// How long a graceful shutdown (SIGTERM, Ctrl-C) waits for in-flight requests, in
    /// milliseconds. [default: 30000]
    #[arg(long, env = "CAPSULE_DRAIN_TIMEOUT_MS")]
    pub drain_timeout_ms: Option<u64>,
    /// Directory of the compiled-code cache (the flag is `capsule --cache-dir`, for every
    /// command). [default: the user's cache directory]
    #[arg(skip)]
    pub cache_dir: Option<PathBuf>,
    /// Keep compiled code on disk (the flag is `capsule --no-cache`). [default: true]
    #[arg(skip)]
    pub disk_cache: Option<bool>,
    /// Let capsules hand dense products to this machine's native kernels (the flag is
    /// `capsule --host-kernels`). [default: true]
    #[arg(skip)]
    pub host_kernels: Option<bool>,
    /// Sync with this hub: register, long-poll the desired state, install verified capsules
    /// (with hub_token, node_id and trusted_root).
    #[arg(long, env = "CAPSULE_HUB")]
    pub hub: Option<String>,
    /// This node's hub token.
    #[arg(long, env = "CAPSULE_HUB_TOKEN", hide_env_values = true)]
    pub hub_token: Option<String>,
    /// This node's id at the hub.
    #[arg(long, env = "CAPSULE_NODE_ID")]
    pub node_id: Option<String>,
    /// A node label for rollouts (repeat the flag; a list in the file): key=value.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Option<Vec<String>>,
    /// The pinned root metadata (from `capsule keys root`): only capsules in targets
    /// metadata signed by its keys are installed.
    #[arg(long, env = "CAPSULE_TRUSTED_ROOT")]
    pub trusted_root: Option<PathBuf>,
    /// A CA certificate (PEM) to trust for an https:// hub.
    #[arg(long, env = "CAPSULE_HUB_CA")]
    pub hub_ca: Option<PathBuf>,
    /// Longest long-poll of the hub, in milliseconds. [default: 25000]
    #[arg(long, env = "CAPSULE_HUB_WAIT_MS")]
    pub hub_wait_ms: Option<u64>,
    /// Length of a telemetry window in milliseconds (with a hub: one batch per window with
    /// traffic). [default: 60000]
    #[arg(long, env = "CAPSULE_TELEMETRY_WINDOW_MS")]
    pub telemetry_window_ms: Option<u64>,
    /// Bound of the local telemetry buffer in bytes; past it the oldest batches are dropped
    /// and counted. [default: 67108864]
    #[arg(long, env = "CAPSULE_TELEMETRY_BUFFER_BYTES")]
    pub telemetry_buffer_bytes: Option<u64>,
    /// Serve this directory to browsers at / (the SDK from sdk-js/dist, pages, signed
    /// metadata), with cross-origin isolation headers. Installed capsules are always at
    /// /capsules/MODEL/VERSION.capsule.wasm.
    #[arg(long = "static", env = "CAPSULE_STATIC", value_name = "DIR")]
    pub static_dir: Option<PathBuf>,
    /// The bearer token `POST /v2/models/{m}/feedback` requires. Without it feedback is off
    /// (403): labels drive the hub's accuracy alerts and retraining trigger.
    #[arg(long, env = "CAPSULE_FEEDBACK_TOKEN", hide_env_values = true)]
    pub feedback_token: Option<String>,
}

impl NodeSettings {
    /// Reads a TOML file of these settings (unknown keys are errors).
    pub fn from_toml_file(path: &Path) -> Result<NodeSettings> {
        let what = format!("cannot read {}", path.display());
        let size = std::fs::metadata(path).map_err(Error::io(&what))?.len();
        if size > MAX_SETTINGS_BYTES {
            return Err(Error::Config(format!(
                "{}: {size} bytes, over {MAX_SETTINGS_BYTES} for a settings file",
                path.display()
            )));
        }
        let text = std::fs::read_to_string(path).map_err(Error::io(what))?;
        toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))
    }

    /// These settings laid over `below` (a file's): each one given here wins.
    pub fn over(&self, below: &NodeSettings) -> Result<NodeSettings> {
        let json = |s: &NodeSettings| {
            serde_json::to_value(s).map_err(|e| Error::Config(format!("settings: {e}")))
        };
        let (serde_json::Value::Object(mut merged), serde_json::Value::Object(top)) =
            (json(below)?, json(self)?)
        else {
            return Err(Error::Config("settings are not a table".into()));
        };
        for (key, value) in top {
            if !value.is_null() {
                merged.insert(key, value);
            }
        }
        serde_json::from_value(serde_json::Value::Object(merged))
            .map_err(|e| Error::Config(format!("settings: {e}")))
    }

    /// The node's configuration: these settings, the defaults for the rest, checked.
    pub fn resolve(&self) -> Result<NodeConfig> {
        let d = NodeConfig::default();
        let s = self.clone();
        let hub = match (s.hub, s.hub_token, s.node_id, s.trusted_root) {
            (None, None, None, None) => None,
            (Some(url), Some(token), Some(node_id), Some(trusted_root)) => {
                let mut labels = BTreeMap::new();
                for l in s.labels.unwrap_or_default() {
                    let (k, v) = l
                        .split_once('=')
                        .ok_or_else(|| Error::Config(format!("label {l:?}: expected key=value")))?;
                    labels.insert(k.to_owned(), v.to_owned());
                }
                Some(HubSync {
                    url,
                    token,
                    node_id,
                    labels,
                    trusted_root,
                    wait_ms: s.hub_wait_ms.unwrap_or(DEFAULT_HUB_WAIT_MS),
                    ca: s.hub_ca,
                })
            }
            (url, token, id, root) => {
                let missing: Vec<&str> = [
                    ("hub", url.is_none()),
                    ("hub_token", token.is_none()),
                    ("node_id", id.is_none()),
                    ("trusted_root", root.is_none()),
                ]
                .into_iter()
                .filter_map(|(name, missing)| missing.then_some(name))
                .collect();
                return Err(Error::Config(format!(
                    "syncing with a hub needs hub, hub_token, node_id and trusted_root; missing: {}",
                    missing.join(", ")
                )));
            }
        };
        let c = NodeConfig {
            models: s.models.unwrap_or(d.models),
            http: s.http.unwrap_or(d.http),
            grpc: if s.no_grpc { None } else { s.grpc.or(d.grpc) },
            instances: s.instances.unwrap_or(d.instances),
            queue: s.queue.unwrap_or(d.queue),
            deadline_ms: s.deadline_ms.unwrap_or(d.deadline_ms),
            max_body_bytes: s.max_body_bytes.unwrap_or(d.max_body_bytes),
            max_capsule_bytes: s.max_capsule_bytes.unwrap_or(d.max_capsule_bytes),
            poll_interval_ms: s.poll_interval_ms.unwrap_or(d.poll_interval_ms),
            version_policy: s.version_policy.unwrap_or(d.version_policy),
            cache_dir: s.cache_dir.or(d.cache_dir),
            disk_cache: s.disk_cache.unwrap_or(d.disk_cache),
            max_memory_bytes: s.max_memory_bytes.or(d.max_memory_bytes),
            host_kernels: s.host_kernels.unwrap_or(d.host_kernels),
            drain_timeout_ms: s.drain_timeout_ms.unwrap_or(d.drain_timeout_ms),
            hub,
            telemetry_window_ms: s.telemetry_window_ms.unwrap_or(d.telemetry_window_ms),
            telemetry_buffer_bytes: s.telemetry_buffer_bytes.unwrap_or(d.telemetry_buffer_bytes),
            static_dir: s.static_dir.or(d.static_dir),
            feedback_token: s.feedback_token.or(d.feedback_token),
            clock: d.clock,
        };
        c.validate()?;
        Ok(c)
    }

    /// Every key, as the TOML file spells it (the flags are the same with `-`).
    pub fn keys() -> Vec<String> {
        use clap::Args as _;
        let mut keys: Vec<String> = NodeSettings::augment_args(clap::Command::new("serve"))
            .get_arguments()
            .map(|a| a.get_id().as_str().to_owned())
            .collect();
        // Flags of every command (`capsule --cache-dir`, `--no-cache`, `--host-kernels`).
        keys.extend(["cache_dir", "disk_cache", "host_kernels"].map(String::from));
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NodeSettings> {
        toml::from_str(text).map_err(|e| Error::Config(e.to_string()))
    }

    #[test]
    fn a_file_flags_over_it_and_defaults_under_both() {
        let file = parse(
            "models = \"/srv/models\"\nqueue = 3\nversion_policy = \"latest:2\"\ngrpc = \"127.0.0.1:9001\"\nno_grpc = true\ndisk_cache = false\n",
        )
        .unwrap();
        let flags = NodeSettings {
            queue: Some(5),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 9000))),
            ..NodeSettings::default()
        };
        let c = flags.over(&file).unwrap().resolve().unwrap();
        assert_eq!(c.models, PathBuf::from("/srv/models"));
        assert_eq!(c.queue, 5, "the flag wins");
        assert_eq!(c.http, SocketAddr::from(([127, 0, 0, 1], 9000)));
        assert_eq!(c.version_policy, VersionPolicy::Latest(2));
        assert_eq!(
            c.grpc, None,
            "no_grpc from the file holds: a flag left false does not undo it"
        );
        assert!(!c.disk_cache);
        assert_eq!(c.deadline_ms, 10_000, "a default");
    }

    #[test]
    fn unknown_keys_and_half_a_hub_are_refused() {
        let e = parse("queue_size = 3\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `queue_size`"), "{e}");
        let half = NodeSettings {
            hub: Some("http://hub:8400".into()),
            node_id: Some("n1".into()),
            ..NodeSettings::default()
        };
        assert_eq!(
            half.resolve().unwrap_err().to_string(),
            "configuration: syncing with a hub needs hub, hub_token, node_id and trusted_root; missing: hub_token, trusted_root"
        );
        let whole = parse(
            "hub = \"http://hub:8400\"\nhub_token = \"t\"\nnode_id = \"n1\"\ntrusted_root = \"root.json\"\nlabels = [\"ring=canary\"]\n",
        )
        .unwrap()
        .resolve()
        .unwrap();
        let hub = whole.hub.unwrap();
        assert_eq!((hub.node_id.as_str(), hub.wait_ms), ("n1", 25_000));
        assert_eq!(hub.labels["ring"], "canary");
        let bad_label = NodeSettings {
            labels: Some(vec!["ring".into()]),
            ..parse("hub = \"h\"\nhub_token = \"t\"\nnode_id = \"n\"\ntrusted_root = \"r\"\n")
                .unwrap()
        };
        assert!(bad_label.resolve().is_err());
    }

    /// docs/node.md names every key, and no key that does not exist.
    #[test]
    fn the_operators_guide_lists_every_key() {
        let guide =
            std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/node.md"))
                .unwrap();
        let start = guide
            .find("TOML keys:")
            .expect("docs/node.md lists the TOML keys");
        let end = start
            + guide[start..]
                .find("(unknown keys are refused)")
                .expect("end of the list");
        let mut listed: Vec<String> = guide[start..end]
            .split('`')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        listed.sort();
        let mut keys = NodeSettings::keys();
        keys.sort();
        assert_eq!(listed, keys);
    }
}
