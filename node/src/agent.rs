//! The sync agent (`capsule serve --hub URL`): registers with the hub, long-polls its desired
//! state, verifies the signed targets metadata against the pinned root (TUF client workflow,
//! `capsule_format::tuf`), downloads blobs with resume and size limits, installs them through
//! the repository's hot-swap path (golden probe before switching), and reports what it runs.
//!
//! The agent only writes into the model repository: a capsule becomes a file
//! `MODELS/NAME/VERSION/NAME.capsule.wasm` (written under a hidden name, then renamed), and the
//! loader does the rest. A new version is written beside the one serving; the older one is
//! removed only once the new one serves, so a capsule that fails its probe never replaces a
//! good one. While the hub is away the node keeps serving its files and retries.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsule_format::hub::{
    DesiredModel, DesiredState, ModelState, Registration, Report, ReportedModel,
};
use capsule_format::split::IMAGE_SUFFIX;
use capsule_format::tuf::{self, Root, Signed, Targets};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::durable::{move_aside, now_ms, read_json, write_durably};
use crate::hub_client::{HubClient, HubError, chain, read_bounded};
use crate::loader::Loader;
use crate::models::ModelRegistry;
use crate::repository::{CAPSULE_SUFFIX, compare_versions};
use crate::{Error, Result};
use capsule_format::clock::SharedClock;

/// How the node syncs with a hub.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubSync {
    /// The hub's base URL (`http://hub:8400`).
    pub url: String,
    /// This node's token (issued by `POST /api/v1/nodes/{id}/token`).
    pub token: String,
    /// This node's id.
    pub node_id: String,
    /// Labels rollouts select on.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The pinned root metadata (signed JSON) whose keys decide what the node installs.
    pub trusted_root: PathBuf,
    /// Longest long-poll, in milliseconds.
    #[serde(default = "default_wait_ms")]
    pub wait_ms: u64,
    /// A CA certificate (PEM) to trust for an `https://` hub, besides the public roots.
    #[serde(default)]
    pub ca: Option<PathBuf>,
}

fn default_wait_ms() -> u64 {
    25_000
}

/// What the agent remembers across restarts (`MODELS/.capsule-agent/state.json`).
#[derive(Debug, Default, Serialize, Deserialize)]
struct AgentState {
    /// Highest targets version accepted (rollback protection, TUF 5.6.4).
    targets_version: Option<u64>,
    /// The model versions the agent wrote: model -> version -> sha256.
    managed: BTreeMap<String, BTreeMap<String, String>>,
}

pub(crate) struct Agent {
    sync: HubSync,
    models: PathBuf,
    root: Root,
    hub: HubClient,
    loader: Arc<Mutex<Loader>>,
    registry: Arc<ModelRegistry>,
    state: AgentState,
    /// Code modules in the code store whose hash this process checked.
    verified_code: std::collections::HashSet<String>,
    /// What signed metadata's expiry is checked against.
    clock: SharedClock,
}

/// Writes a file the loader may read at any moment: under a hidden name in the same
/// directory (the scan skips it), flushed to disk, then renamed into place.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), (ModelState, String)> {
    let io = |e: std::io::Error| {
        (
            ModelState::InstallFailed,
            format!("writing {}: {e}", path.display()),
        )
    };
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir).map_err(io)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    write_durably(&dir.join(format!(".incoming.{name}")), path, bytes).map_err(io)
}

/// The agent's state file and the copy of it written after every save: a state file that
/// does not parse falls back to the copy, so the rollback floor survives one corrupt file.
const STATE_FILE: &str = "state.json";
const STATE_COPY: &str = "state.copy.json";

/// Largest state file read.
const MAX_STATE_FILE_BYTES: u64 = 16 << 20;

/// Reads the agent's state from `dir`: the state file, else (with an error in the log: the
/// file is moved aside as `state.json.corrupt-<ms>`) its copy. No state at all is a first
/// start. Neither readable is an error in the log too, and the agent starts without a
/// rollback floor: loud, never silent.
fn load_state(dir: &Path) -> AgentState {
    let read = |name: &str| read_json::<AgentState>(&dir.join(name), MAX_STATE_FILE_BYTES);
    let problem = match read(STATE_FILE) {
        Ok(Some(state)) => return state,
        Ok(None) => None,
        Err(e) => Some(e),
    };
    if let Some(problem) = &problem {
        let (aside, _) = move_aside(&dir.join(STATE_FILE), now_ms());
        tracing::error!(path = %dir.join(STATE_FILE).display(), error = %problem, moved_to = %aside.display(), "the agent's state file is unreadable; reading its copy");
    }
    match read(STATE_COPY) {
        Ok(Some(state)) => {
            if problem.is_some() {
                tracing::error!(targets_version = ?state.targets_version, "the agent's state was recovered from its copy: the rollback floor holds");
            }
            state
        }
        Ok(None) if problem.is_none() => AgentState::default(),
        outcome => {
            tracing::error!(error = ?outcome.err(), "neither the agent's state file nor its copy is readable: the rollback floor is lost, and the agent accepts the hub's current targets version");
            AgentState::default()
        }
    }
}

/// Writes `dir/name` durably, through a hidden temporary file.
fn write_state_file(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    write_durably(&dir.join(format!(".{name}.tmp")), &dir.join(name), bytes)
}

/// Checks every file the agent installed against the hash its signed target had, and
/// removes those that differ (a disk error, a hand edit) from the repository and from
/// `managed`, so the next sync fetches them again. Returns what was removed.
fn reverify(
    models: &Path,
    managed: &mut BTreeMap<String, BTreeMap<String, String>>,
) -> Vec<PathBuf> {
    let mut removed = Vec::new();
    for (model, versions) in managed.iter_mut() {
        versions.retain(|version, sha256| {
            let dir = models.join(model).join(version);
            for suffix in [CAPSULE_SUFFIX, IMAGE_SUFFIX] {
                let path = dir.join(format!("{model}{suffix}"));
                let Ok(bytes) = std::fs::read(&path) else {
                    continue;
                };
                if capsule_format::split::sha256_hex(&bytes) == *sha256 {
                    return true;
                }
                tracing::error!(path = %path.display(), signed = %sha256, "an installed file no longer matches its signed hash; removing it to fetch it again");
                if std::fs::remove_file(&path).is_ok() {
                    removed.push(path);
                }
                return false;
            }
            // Gone: nothing to check; the next sync installs it again.
            false
        });
    }
    managed.retain(|_, versions| !versions.is_empty());
    removed
}

/// Seconds since the epoch by `clock` (0 before 1970).
fn unix_s(clock: &SharedClock) -> u64 {
    u64::try_from(clock.now_s()).unwrap_or(0)
}

fn state_dir(models: &Path) -> PathBuf {
    models.join(".capsule-agent")
}

/// Largest response the agent reads besides blobs (desired state, metadata inside it).
const MAX_STATE_BYTES: usize = 4 << 20;
/// The first retry of a state that failed for a transient cause, and the longest wait
/// between retries (the delay doubles).
const FIRST_RETRY: Duration = Duration::from_secs(1);
const MAX_RETRY: Duration = Duration::from_secs(60);

impl Agent {
    /// Reads and checks the pinned root (an unusable root is a configuration error).
    pub(crate) fn new(
        sync: HubSync,
        models: PathBuf,
        loader: Arc<Mutex<Loader>>,
        registry: Arc<ModelRegistry>,
        clock: SharedClock,
    ) -> Result<Agent> {
        let bytes = std::fs::read(&sync.trusted_root).map_err(Error::io(format!(
            "cannot read {}",
            sync.trusted_root.display()
        )))?;
        let pinned: Signed<Root> = tuf::parse(&bytes, "root")
            .map_err(|e| Error::Config(format!("{}: {e}", sync.trusted_root.display())))?;
        let now = unix_s(&clock);
        let mut root = tuf::trust_root(&pinned, now)
            .map_err(|e| Error::Config(format!("{}: {e}", sync.trusted_root.display())))?;
        let dir = state_dir(&models);
        // A root rotated since (accepted through the chain, kept in the agent's state).
        if let Some(rotated) = std::fs::read(dir.join("root.json"))
            .ok()
            .and_then(|b| tuf::parse::<Root>(&b, "root").ok())
            .filter(|r| r.signed.version > root.version)
            .and_then(|r| tuf::trust_root(&r, now).ok())
        {
            root = rotated;
        }
        std::fs::create_dir_all(dir.join("downloads"))
            .map_err(Error::io(format!("cannot create {}", dir.display())))?;
        let mut state = load_state(&dir);
        reverify(&models, &mut state.managed);
        let hub = HubClient::new(&sync.url, &sync.token, sync.ca.as_deref())?;
        Ok(Agent {
            sync,
            models,
            root,
            hub,
            loader,
            registry,
            state,
            verified_code: Default::default(),
            clock,
        })
    }

    /// A client of the same hub, for the telemetry shipper.
    pub(crate) fn hub_client(&self) -> HubClient {
        self.hub.clone()
    }

    fn url(&self, path: &str) -> String {
        self.hub.url(path)
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        Ok(self.hub.send(req).await?)
    }

    async fn register(&self) -> Result<()> {
        let body = Registration {
            labels: self.sync.labels.clone(),
        };
        self.send(
            self.hub
                .http
                .post(self.url(&format!("/api/v1/nodes/{}/register", self.sync.node_id)))
                .json(&body),
        )
        .await
        .map(|_| ())
    }

    /// The desired state; with `after`, long-polls for a change up to `wait_ms`, or up to
    /// `retry` when a retry is due sooner.
    async fn desired(&self, after: Option<i64>, retry: Option<Duration>) -> Result<DesiredState> {
        let mut url = self.url(&format!("/api/v1/nodes/{}/desired", self.sync.node_id));
        if let Some(g) = after {
            let wait = retry.map_or(self.sync.wait_ms, |r| {
                self.sync
                    .wait_ms
                    .min(u64::try_from(r.as_millis()).unwrap_or(u64::MAX))
            });
            url.push_str(&format!("?after={g}&wait_ms={wait}"));
        }
        let resp = self
            .send(
                self.hub
                    .http
                    .get(url)
                    .timeout(Duration::from_millis(self.sync.wait_ms + 10_000)),
            )
            .await?;
        let bytes = read_bounded(resp, MAX_STATE_BYTES, "the desired state")
            .await
            .map_err(|c| HubError::TooLarge(c.message))?;
        serde_json::from_slice(&bytes).map_err(Error::DesiredState)
    }

    /// Runs until shutdown: register, then long-poll and apply, forever; on hub errors keep
    /// serving and retry with backoff.
    pub(crate) async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(200);
        let mut registered = false;
        let mut generation: Option<i64> = None;
        // After a transient failure (download, disk), the same state is applied again after
        // this delay (doubling up to a minute) even when the hub's state has not changed.
        let mut retry: Option<Duration> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let step = async {
                if !registered {
                    self.register().await?;
                    registered = true;
                    tracing::info!(hub = %self.sync.url, node = %self.sync.node_id, "registered with the hub");
                }
                let state = self.desired(generation, retry).await?;
                let changed = Some(state.generation) != generation;
                if changed || retry.is_some() {
                    let report = self.apply(&state).await;
                    retry =
                        report
                            .models
                            .iter()
                            .any(ReportedModel::transient)
                            .then(|| match retry {
                                Some(r) if !changed => (r * 2).min(MAX_RETRY),
                                _ => FIRST_RETRY,
                            });
                    if let Some(r) = retry {
                        tracing::warn!(
                            retry_ms = r.as_millis() as u64,
                            "a transient failure: the state will be applied again"
                        );
                    }
                    self.send(
                        self.hub
                            .http
                            .post(self.url(&format!("/api/v1/nodes/{}/report", self.sync.node_id)))
                            .json(&report),
                    )
                    .await?;
                }
                generation = Some(state.generation);
                Ok::<(), Error>(())
            };
            let outcome = tokio::select! {
                r = step => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match outcome {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(error = %chain(&e), retry_ms = backoff.as_millis() as u64, "hub sync failed; serving the last good state");
                    // The hub does not know this node (a restored backup, a new database):
                    // register again.
                    if matches!(e, Error::Hub(HubError::Status { status: 404, .. })) {
                        registered = false;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Saves the state durably, then its copy ([`load_state`] reads the copy when the state
    /// file does not parse).
    fn save_state(&self) {
        let dir = state_dir(&self.models);
        let write = serde_json::to_vec_pretty(&self.state)
            .map_err(std::io::Error::other)
            .and_then(|b| {
                write_state_file(&dir, STATE_FILE, &b)?;
                write_state_file(&dir, STATE_COPY, &b)
            });
        if let Err(e) = write {
            tracing::error!(error = %e, "cannot save the agent state");
        }
    }

    /// TUF 5.3: walks the hub's root chain from the trusted version (N+1, N+2, ...), each
    /// signed by a threshold of the previous root's keys and of its own; keeps the last.
    async fn update_root(&mut self) -> Result<()> {
        for _ in 0..64 {
            let next = self.root.version + 1;
            let resp = match self
                .send(
                    self.hub
                        .http
                        .get(self.url(&format!("/api/v1/metadata/root.{next}"))),
                )
                .await
            {
                Ok(resp) => resp,
                // No newer root.
                Err(Error::Hub(HubError::Status { status: 404, .. })) => return Ok(()),
                Err(e) => return Err(e),
            };
            let bytes = read_bounded(resp, tuf::MAX_METADATA_BYTES, "root metadata")
                .await
                .map_err(|c| HubError::TooLarge(c.message))?;
            let signed: Signed<Root> = tuf::parse(&bytes, "root").map_err(Error::Metadata)?;
            let rotated = tuf::rotate_root(&self.root, &signed).map_err(Error::Metadata)?;
            let dir = state_dir(&self.models);
            write_state_file(&dir, "root.json", &bytes)
                .map_err(Error::io("saving the rotated root"))?;
            tracing::info!(version = rotated.version, "root metadata rotated");
            self.root = rotated;
        }
        Ok(())
    }

    /// Verifies the targets metadata (TUF 5.6) and returns it, or why not.
    fn verify(&self, state: &DesiredState) -> Result<Targets> {
        let text = state.targets.as_deref().ok_or(Error::NoTargets)?;
        let signed: Signed<Targets> =
            tuf::parse(text.as_bytes(), "targets").map_err(Error::Metadata)?;
        tuf::verify_targets(
            &self.root,
            self.state.targets_version,
            &signed,
            unix_s(&self.clock),
        )
        .map_err(Error::Metadata)
    }

    /// The hub's targets, once the root is up to date (5.3), unexpired (5.3.10) and the
    /// targets verify against it (5.6).
    async fn trusted_targets(&mut self, state: &DesiredState) -> Result<Targets> {
        self.update_root().await?;
        if self.root.expires <= unix_s(&self.clock) {
            return Err(Error::RootExpired {
                version: self.root.version,
            });
        }
        self.verify(state)
    }

    async fn apply(&mut self, state: &DesiredState) -> Report {
        let failed = |d: &DesiredModel, state: ModelState, detail: String| ReportedModel {
            model: d.model.clone(),
            version: d.version.clone(),
            state,
            detail,
        };
        if state.targets.is_none() && state.models.is_empty() {
            // A fresh hub: nothing to verify and nothing to run (the models this node runs,
            // if any, stay: an unsigned state never removes them).
            tracing::info!("the hub has published nothing yet");
            return Report {
                generation: state.generation,
                models: Vec::new(),
            };
        }
        let targets = match self.trusted_targets(state).await {
            Ok(t) => t,
            Err(e) => {
                let why = chain(&e);
                tracing::error!(error = %why, "refusing the hub's state: nothing installed");
                return Report {
                    generation: state.generation,
                    models: state
                        .models
                        .iter()
                        .map(|d| failed(d, ModelState::VerifyFailed, why.clone()))
                        .collect(),
                };
            }
        };
        self.state.targets_version = Some(targets.version);
        let mut results = Vec::new();
        let mut ready = Vec::new();
        for d in &state.models {
            match self.install(&targets, d).await {
                Ok(path) => ready.push((d.clone(), path)),
                Err((kind, e)) => {
                    tracing::error!(model = %d.model, version = %d.version, error = %e, "not installed");
                    results.push(failed(d, kind, e));
                }
            }
        }
        // Models the hub no longer wants.
        let wanted: Vec<&str> = state.models.iter().map(|d| d.model.as_str()).collect();
        let gone: Vec<String> = self
            .state
            .managed
            .keys()
            .filter(|m| !wanted.contains(&m.as_str()))
            .cloned()
            .collect();
        for m in gone {
            let _ = std::fs::remove_dir_all(self.models.join(&m));
            self.state.managed.remove(&m);
        }
        self.resync().await;
        // A version that serves retires the others; one that failed leaves them serving.
        let states = self.file_states().await;
        let mut retired = false;
        for (d, path) in &ready {
            let serving = self
                .registry
                .versions(&d.model)
                .map(|vs| vs.iter().any(|v| v.version == d.version))
                .unwrap_or(false);
            if serving {
                retired |= self.retire(&d.model, &d.version, |_| true);
                results.push(failed(d, ModelState::Serving, String::new()));
            } else {
                let (kind, detail) = states
                    .iter()
                    .find(|(p, _, _)| p == path)
                    .map(|(_, k, m)| (*k, m.clone()))
                    .unwrap_or((ModelState::Installing, String::new()));
                results.push(failed(d, kind, detail));
            }
        }
        if retired {
            self.resync().await;
        }
        self.save_state();
        Report {
            generation: state.generation,
            models: results,
        }
    }

    /// Removes the managed versions of `model` other than `keep` that `which` selects.
    fn retire(&mut self, model: &str, keep: &str, which: impl Fn(&str) -> bool) -> bool {
        let Some(versions) = self.state.managed.get_mut(model) else {
            return false;
        };
        let old: Vec<String> = versions
            .keys()
            .filter(|v| v.as_str() != keep && which(v))
            .cloned()
            .collect();
        for v in &old {
            let _ = std::fs::remove_dir_all(self.models.join(model).join(v));
            versions.remove(v);
        }
        !old.is_empty()
    }

    async fn resync(&self) {
        let loader = Arc::clone(&self.loader);
        let _ = tokio::task::spawn_blocking(move || {
            loader.lock().unwrap_or_else(|p| p.into_inner()).sync();
        })
        .await;
    }

    async fn file_states(&self) -> Vec<(PathBuf, ModelState, String)> {
        let loader = Arc::clone(&self.loader);
        tokio::task::spawn_blocking(move || {
            loader
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .file_states()
        })
        .await
        .unwrap_or_default()
    }

    /// Checks a desired model against the signed targets (mix-and-match), downloads and
    /// verifies its blob (TUF 5.7.3) and writes it into the repository. Returns its path.
    async fn install(
        &mut self,
        targets: &Targets,
        d: &DesiredModel,
    ) -> Result<PathBuf, (ModelState, String)> {
        let verify = |e: String| (ModelState::VerifyFailed, e);
        tuf::check_target_path(&d.path).map_err(|e| verify(e.to_string()))?;
        let Some(t) = targets.targets.get(&d.path) else {
            return Err(verify(format!(
                "{} is not in the signed targets (version {})",
                d.path, targets.version
            )));
        };
        if t.sha256 != d.sha256
            || t.length != d.length
            || t.model != d.model
            || t.version != d.version
        {
            return Err(verify(format!(
                "the hub's {} {} (sha256 {}, {} bytes) does not match the signed target (sha256 {}, {} bytes, {} {})",
                d.model, d.version, d.sha256, d.length, t.sha256, t.length, t.model, t.version
            )));
        }
        if [&d.model, &d.version]
            .iter()
            .any(|s| tuf::check_target_path(s).is_err() || s.contains('/'))
        {
            return Err(verify(format!(
                "unsafe model name or version {:?} {:?}",
                d.model, d.version
            )));
        }
        // The split form when the hub offers it and the publisher signed it: the image, and
        // the code only if this node does not have it.
        if let Some(image_path) = d
            .image_path
            .as_deref()
            .filter(|p| targets.targets.contains_key(*p))
        {
            return self.install_image(targets, d, image_path).await;
        }
        let (dir, path, have) = self.version_file(d, CAPSULE_SUFFIX, &t.sha256);
        if have {
            return Ok(path);
        }
        let bytes = self.download(&d.path, t).await?;
        write_file(&path, &bytes)?;
        // One capsule per version directory: a model image of this version goes.
        let _ = std::fs::remove_file(dir.join(format!("{}{IMAGE_SUFFIX}", d.model)));
        self.installed(d, &t.sha256);
        Ok(path)
    }

    /// Records an installed version, retires newer ones, drops its partial download.
    fn installed(&mut self, d: &DesiredModel, sha256: &str) {
        self.state
            .managed
            .entry(d.model.clone())
            .or_default()
            .insert(d.version.clone(), sha256.to_owned());
        // A newer managed version would win the version policy: retire it now (rollback).
        let version = d.version.clone();
        self.retire(&d.model, &d.version, |v| {
            compare_versions(v, &version) == std::cmp::Ordering::Greater
        });
        self.drop_partial(sha256);
    }

    /// Where a version's file goes (`MODELS/NAME/VERSION/NAME<suffix>`), and whether it is
    /// already there as the agent wrote it (with this signed hash).
    fn version_file(
        &self,
        d: &DesiredModel,
        suffix: &str,
        sha256: &str,
    ) -> (PathBuf, PathBuf, bool) {
        let dir = self.models.join(&d.model).join(&d.version);
        let path = dir.join(format!("{}{suffix}", d.model));
        let have = self
            .state
            .managed
            .get(&d.model)
            .and_then(|v| v.get(&d.version))
            .is_some_and(|h| h == sha256)
            && path.exists();
        (dir, path, have)
    }

    /// Removes what is left of a download once its blob is installed.
    fn drop_partial(&self, sha256: &str) {
        let _ = std::fs::remove_file(
            state_dir(&self.models)
                .join("downloads")
                .join(format!("{sha256}.part")),
        );
    }

    /// Installs a model image: checks that its signed target names a code module that is
    /// signed too (never another code this node happens to have), downloads that code into
    /// the repository's code store unless it is there already with the signed hash, downloads
    /// and verifies the image, checks that the image names the same code, and writes it into
    /// the version directory. The loader joins the two (checking the code's hash again).
    async fn install_image(
        &mut self,
        targets: &Targets,
        d: &DesiredModel,
        image_path: &str,
    ) -> Result<PathBuf, (ModelState, String)> {
        let verify = |e: String| (ModelState::VerifyFailed, e);
        tuf::check_target_path(image_path).map_err(|e| verify(e.to_string()))?;
        let (image, code) =
            tuf::image_and_code(targets, image_path).map_err(|e| verify(e.to_string()))?;
        if image.model != d.model || image.version != d.version {
            return Err(verify(format!(
                "{image_path} is signed as {} {}, the hub offers it as {} {}",
                image.model, image.version, d.model, d.version
            )));
        }
        let (dir, path, have) = self.version_file(d, IMAGE_SUFFIX, &image.sha256);
        if have {
            return Ok(path);
        }
        let code_path = tuf::code_target_path(&code.sha256);
        let code_file = crate::repository::code_path(&self.models, &code.sha256)
            .ok_or_else(|| verify(format!("{code_path}: malformed hash")))?;
        // Hashed once per process (a code module is megabytes, and every install of every
        // model of this guest build names it); the loader's join checks it again anyway.
        let have_code = std::fs::metadata(&code_file).is_ok_and(|m| m.len() == code.length)
            && (self.verified_code.contains(&code.sha256)
                || std::fs::read(&code_file)
                    .is_ok_and(|b| tuf::verify_target(&code_path, code, &b).is_ok()));
        if have_code {
            tracing::info!(model = %d.model, version = %d.version, code = %code.sha256, "guest code already here: downloading the model image only");
        } else {
            let bytes = self.download(&code_path, code).await?;
            write_file(&code_file, &bytes)?;
            self.drop_partial(&code.sha256);
        }
        self.verified_code.insert(code.sha256.clone());
        let bytes = self.download(image_path, image).await?;
        let header = capsule_format::split::image_header(&bytes)
            .map_err(|e| verify(format!("{image_path}: {e}")))?;
        tuf::verify_image_code(image_path, image, &header).map_err(|e| verify(e.to_string()))?;
        write_file(&path, &bytes)?;
        // One capsule per version directory: a single file of this version goes.
        let _ = std::fs::remove_file(dir.join(format!("{}{CAPSULE_SUFFIX}", d.model)));
        self.installed(d, &image.sha256);
        Ok(path)
    }

    /// Downloads a blob, resuming a partial download, reading at most the signed length.
    async fn download(
        &self,
        path: &str,
        t: &capsule_format::tuf::Target,
    ) -> Result<Vec<u8>, (ModelState, String)> {
        let fail = |e: String| (ModelState::DownloadFailed, e);
        let part = state_dir(&self.models)
            .join("downloads")
            .join(format!("{}.part", t.sha256));
        let mut bytes = std::fs::read(&part).unwrap_or_default();
        if bytes.len() as u64 > t.length {
            bytes.clear();
        }
        let mut req = self
            .hub
            .http
            .get(self.url(&format!("/api/v1/blobs/{}", t.sha256)))
            .timeout(Duration::from_secs(600));
        if !bytes.is_empty() && (bytes.len() as u64) < t.length {
            req = req.header("range", format!("bytes={}-", bytes.len()));
        }
        if (bytes.len() as u64) < t.length {
            let mut resp = self.send(req).await.map_err(|e| fail(chain(&e)))?;
            if resp.status().as_u16() != 206 {
                bytes.clear();
            }
            // What arrives is appended to the partial file, so a broken connection resumes
            // where it stopped (a failure to keep it only costs the resume).
            let mut keep = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(&part)
                .and_then(|mut f| {
                    use std::io::Seek;
                    f.set_len(bytes.len() as u64)?;
                    f.seek(std::io::SeekFrom::End(0))?;
                    Ok(f)
                })
                .ok();
            while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
                if (bytes.len() + chunk.len()) as u64 > t.length {
                    return Err((
                        ModelState::VerifyFailed,
                        format!(
                            "{path}: the hub sent more than the signed length of {} bytes",
                            t.length
                        ),
                    ));
                }
                bytes.extend_from_slice(&chunk);
                if let Some(f) = keep.as_mut()
                    && std::io::Write::write_all(f, &chunk).is_err()
                {
                    keep = None;
                }
            }
        }
        tuf::verify_target(path, t, &bytes).map_err(|e| {
            let _ = std::fs::remove_file(&part);
            (ModelState::VerifyFailed, e.to_string())
        })?;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(version: u64) -> AgentState {
        AgentState {
            targets_version: Some(version),
            managed: BTreeMap::new(),
        }
    }

    fn save(dir: &Path, s: &AgentState) {
        let b = serde_json::to_vec(s).unwrap();
        write_state_file(dir, STATE_FILE, &b).unwrap();
        write_state_file(dir, STATE_COPY, &b).unwrap();
    }

    /// Issue 16: a corrupt state file silently reset the rollback floor (any targets version
    /// was accepted again). The copy keeps it, and the corrupt file is kept aside.
    #[test]
    fn a_corrupt_state_file_keeps_the_rollback_floor() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            load_state(dir.path()).targets_version,
            None,
            "a first start"
        );
        save(dir.path(), &state(7));
        assert_eq!(load_state(dir.path()).targets_version, Some(7));
        std::fs::write(dir.path().join(STATE_FILE), b"{\"targets_version\": 9").unwrap();
        assert_eq!(load_state(dir.path()).targets_version, Some(7));
        let aside = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with("state.json.corrupt-")
            })
            .count();
        assert_eq!(aside, 1);
        // Both unreadable: no floor (and an error in the log), never a panic.
        std::fs::write(dir.path().join(STATE_FILE), b"x").unwrap();
        std::fs::write(dir.path().join(STATE_COPY), b"x").unwrap();
        assert_eq!(load_state(dir.path()).targets_version, None);
    }

    /// A hub (here a socket on loopback) that answers 200 and then never stops sending.
    async fn endless_hub(declared: Option<u64>) -> String {
        use tokio::io::AsyncWriteExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            let mut request = [0u8; 4096];
            let _ = tokio::io::AsyncReadExt::read(&mut socket, &mut request).await;
            let head = match declared {
                Some(len) => format!("HTTP/1.1 200 OK\r\ncontent-length: {len}\r\n\r\n"),
                None => "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_owned(),
            };
            if socket.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 << 10];
            loop {
                let framed = match declared {
                    Some(_) => socket.write_all(&chunk).await,
                    None => {
                        let mut c = format!("{:x}\r\n", chunk.len()).into_bytes();
                        c.extend_from_slice(&chunk);
                        c.extend_from_slice(b"\r\n");
                        socket.write_all(&c).await
                    }
                };
                if framed.is_err() {
                    return;
                }
            }
        });
        format!("http://{addr}/")
    }

    /// Issue 16's fault: a malicious hub that sends an endless body. The agent reads at most
    /// its limit, whether the hub declares a length or streams without one.
    #[tokio::test]
    async fn an_endless_hub_response_is_cut_at_its_limit() {
        let client = reqwest::Client::new();
        let url = endless_hub(None).await;
        let resp = client.get(&url).send().await.unwrap();
        let cut = read_bounded(resp, 1 << 20, "the desired state")
            .await
            .expect_err("an endless body is refused");
        assert_eq!(cut.message, "the desired state is over 1048576 bytes");
        assert_eq!(cut.partial.len(), 1 << 20);
        let url = endless_hub(Some(1 << 40)).await;
        let resp = client.get(&url).send().await.unwrap();
        let cut = read_bounded(resp, 1 << 20, "root metadata")
            .await
            .expect_err("a declared length over the limit is refused");
        assert_eq!(
            cut.message,
            "root metadata is 1099511627776 bytes, over 1048576"
        );
        assert!(cut.partial.is_empty());
    }

    /// Issue 16: an installed file was never checked again. At start-up every file the agent
    /// installed is hashed against its signed target; one that differs is removed (and
    /// forgotten, so the next sync fetches it again), one that matches stays.
    #[test]
    fn installed_files_are_checked_at_start_up() {
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path();
        let mut managed = BTreeMap::new();
        for (version, body) in [("1", b"good".as_slice()), ("2", b"was good")] {
            let path = models.join("m").join(version);
            std::fs::create_dir_all(&path).unwrap();
            std::fs::write(path.join(format!("m{CAPSULE_SUFFIX}")), body).unwrap();
            managed
                .entry("m".to_owned())
                .or_insert_with(BTreeMap::new)
                .insert(version.to_owned(), capsule_format::split::sha256_hex(body));
        }
        std::fs::write(models.join(format!("m/2/m{CAPSULE_SUFFIX}")), b"flipped").unwrap();
        let image = models.join("n/1");
        std::fs::create_dir_all(&image).unwrap();
        std::fs::write(image.join(format!("n{IMAGE_SUFFIX}")), b"image").unwrap();
        managed
            .entry("n".to_owned())
            .or_default()
            .insert("1".to_owned(), capsule_format::split::sha256_hex(b"image"));
        let removed = reverify(models, &mut managed);
        assert_eq!(removed, [models.join(format!("m/2/m{CAPSULE_SUFFIX}"))]);
        assert!(!removed[0].exists());
        assert!(models.join(format!("m/1/m{CAPSULE_SUFFIX}")).exists());
        assert_eq!(
            managed
                .iter()
                .map(|(m, v)| (m.as_str(), v.keys().cloned().collect::<Vec<_>>()))
                .collect::<Vec<_>>(),
            [("m", vec!["1".to_owned()]), ("n", vec!["1".to_owned()])]
        );
    }
}
