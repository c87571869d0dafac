use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::{Error, Result};

/// Which versions of each model the node serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The N highest versions that load and pass their probe.
    Latest(usize),
    /// Every version that loads and passes its probe.
    All,
    /// Only these versions.
    Specific(Vec<String>),
}

impl FromStr for VersionPolicy {
    type Err = Error;

    fn from_str(s: &str) -> Result<VersionPolicy> {
        let bad = || {
            Error::Config(format!(
                "version policy {s:?}: expected `latest:N` (N >= 1), `all` or `specific:V1,V2,...`"
            ))
        };
        if s == "all" {
            return Ok(VersionPolicy::All);
        }
        if let Some(n) = s.strip_prefix("latest:") {
            let n: usize = n.parse().map_err(|_| bad())?;
            return if n == 0 {
                Err(bad())
            } else {
                Ok(VersionPolicy::Latest(n))
            };
        }
        if let Some(list) = s.strip_prefix("specific:") {
            let versions: Vec<String> = list
                .split(',')
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
                .collect();
            return if versions.is_empty() {
                Err(bad())
            } else {
                Ok(VersionPolicy::Specific(versions))
            };
        }
        Err(bad())
    }
}

impl std::fmt::Display for VersionPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VersionPolicy::Latest(n) => write!(f, "latest:{n}"),
            VersionPolicy::All => f.write_str("all"),
            VersionPolicy::Specific(v) => write!(f, "specific:{}", v.join(",")),
        }
    }
}

impl Serialize for VersionPolicy {
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for VersionPolicy {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Settings of an edge node, resolved: what an operator gives is a
/// [`NodeSettings`](crate::NodeSettings) (flags, environment, TOML file), laid over these
/// defaults.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// The model repository: `DIR/NAME/VERSION/*.capsule.wasm`, or flat `*.capsule.wasm`
    /// files named from their manifest.
    pub models: PathBuf,
    /// Address of the REST endpoint.
    pub http: SocketAddr,
    /// Address of the gRPC endpoint (`None`: no gRPC).
    pub grpc: Option<SocketAddr>,
    /// Requests run at once per model version (each on its own warm instance).
    pub instances: usize,
    /// Requests that may wait per model version when every instance is busy; past that the
    /// node answers 429 at once.
    pub queue: usize,
    /// Deadline of one request, queueing included (504 when exceeded).
    pub deadline_ms: u64,
    /// Largest request body (413 past it).
    pub max_body_bytes: u64,
    /// Largest capsule file the repository may hold.
    pub max_capsule_bytes: u64,
    /// How often the repository is rescanned for new, changed or removed capsules (0: never).
    pub poll_interval_ms: u64,
    /// Which versions of each model are served.
    pub version_policy: VersionPolicy,
    /// Directory of the compiled-code cache (`None`: the default cache directory).
    pub cache_dir: Option<PathBuf>,
    /// Keep compiled code on disk (false: in memory only).
    pub disk_cache: bool,
    /// Memory cap of one guest instance (`None`: each capsule's manifest limit).
    pub max_memory_bytes: Option<u64>,
    /// Let capsules hand dense matrix products to this machine's native kernels (x86-64
    /// with AVX2 and FMA; elsewhere, or when false, everything runs in wasm and outputs match
    /// a browser's bit for bit).
    pub host_kernels: bool,
    /// How long a graceful shutdown waits for in-flight requests.
    pub drain_timeout_ms: u64,
    /// Sync with a hub (`None`: the repository is managed by hand).
    pub hub: Option<crate::agent::HubSync>,
    /// Length of a telemetry window (one batch to the hub per window with traffic), in
    /// milliseconds. Windows are aligned on the wall clock.
    pub telemetry_window_ms: u64,
    /// Bound of the local telemetry buffer, in bytes; past it the oldest batches are dropped
    /// (and counted).
    pub telemetry_buffer_bytes: u64,
    /// Serve this directory's files to browsers (the SDK, pages, signed metadata) at `/`.
    pub static_dir: Option<PathBuf>,
    /// The bearer token `POST /v2/models/{m}/feedback` requires (`None`: feedback is off,
    /// 403). Labels drive the hub's accuracy alerts and its retraining trigger, so whoever can
    /// reach the node must not be able to send them.
    pub feedback_token: Option<String>,
    /// The wall clock: telemetry windows and the expiry of signed metadata read it (tests
    /// set and advance one).
    pub clock: capsule_format::clock::SharedClock,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            models: PathBuf::from("models"),
            http: SocketAddr::from(([0, 0, 0, 0], 8000)),
            grpc: Some(SocketAddr::from(([0, 0, 0, 0], 8001))),
            instances: std::thread::available_parallelism().map_or(2, |n| n.get()),
            queue: 64,
            deadline_ms: 10_000,
            max_body_bytes: 64 << 20,
            max_capsule_bytes: 1 << 30,
            poll_interval_ms: 2_000,
            version_policy: VersionPolicy::Latest(1),
            cache_dir: None,
            disk_cache: true,
            max_memory_bytes: None,
            host_kernels: true,
            drain_timeout_ms: 30_000,
            hub: None,
            telemetry_window_ms: 60_000,
            telemetry_buffer_bytes: 64 << 20,
            static_dir: None,
            feedback_token: None,
            clock: capsule_format::clock::system(),
        }
    }
}

impl NodeConfig {
    /// Checks that the settings make sense.
    pub fn validate(&self) -> Result<()> {
        if self.instances == 0 {
            return Err(Error::Config("instances must be at least 1".into()));
        }
        if self.deadline_ms == 0 {
            return Err(Error::Config("deadline_ms must be at least 1".into()));
        }
        if self.max_body_bytes == 0 {
            return Err(Error::Config("max_body_bytes must be at least 1".into()));
        }
        if self.telemetry_window_ms < 100 {
            return Err(Error::Config(
                "telemetry_window_ms must be at least 100".into(),
            ));
        }
        Ok(())
    }

    /// The request deadline.
    pub fn deadline(&self) -> Duration {
        Duration::from_millis(self.deadline_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_policies_parse() {
        assert_eq!(
            "latest:2".parse::<VersionPolicy>().unwrap(),
            VersionPolicy::Latest(2)
        );
        assert_eq!("all".parse::<VersionPolicy>().unwrap(), VersionPolicy::All);
        assert_eq!(
            "specific:1, 3".parse::<VersionPolicy>().unwrap(),
            VersionPolicy::Specific(vec!["1".into(), "3".into()])
        );
        for bad in ["latest:0", "latest:x", "specific:", "newest"] {
            assert_eq!(
                bad.parse::<VersionPolicy>().unwrap_err().to_string(),
                format!(
                    "configuration: version policy {bad:?}: expected `latest:N` (N >= 1), `all` or `specific:V1,V2,...`"
                )
            );
        }
    }
}
