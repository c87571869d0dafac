//! Keeps the registry in line with the repository on disk: new capsules are staged,
//! installed (no compilation for a known guest build), probed with their golden samples and
//! switched in atomically; removed ones are dropped; a capsule that fails is refused and the
//! versions already served keep serving.

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use capsule_format::hub::ModelState;
use capsule_format::split::Code;
use capsule_runtime::GuestCode;
use capsule_runtime::{CapsuleEngine, CapsuleImage, LoadedCapsule, RunConfig, golden};

use crate::models::{ModelEntry, ModelRegistry, ServedModel, sort_versions};
use crate::repository::{CapsuleFile, Stamp, compare_versions, scan};
use crate::{NodeConfig, VersionPolicy};

/// Why a capsule was refused.
#[derive(Debug, Clone)]
enum Refusal {
    Load(String),
    Probe(String),
}

impl Refusal {
    fn outcome(&self) -> ModelState {
        match self {
            Refusal::Load(_) => ModelState::LoadFailed,
            Refusal::Probe(_) => ModelState::ProbeFailed,
        }
    }

    fn message(&self) -> String {
        match self {
            Refusal::Load(m) => format!("load failed: {m}"),
            Refusal::Probe(m) => format!("probe failed: {m}"),
        }
    }
}

#[derive(Debug, Clone)]
enum Known {
    Loaded(Arc<ServedModel>),
    Refused(Refusal),
}

#[derive(Debug)]
struct KnownFile {
    stamp: Stamp,
    name: String,
    version: String,
    state: Known,
}

struct Candidate {
    file: CapsuleFile,
    name: String,
    version: String,
    /// The parsed capsule, when naming it needed its manifest (flat files).
    image: Option<CapsuleImage>,
}

/// The repository loader (one per node; syncs are serialized by its owner).
pub(crate) struct Loader {
    engine: Arc<CapsuleEngine>,
    config: NodeConfig,
    registry: Arc<ModelRegistry>,
    known: HashMap<PathBuf, KnownFile>,
    codes: CodeCache,
}

/// Code modules of the repository's code store, read, hashed and checked once while their
/// file's size and modification time stay the same (at most [`CODE_CACHE`] of them: one per guest build
/// the repository's images use, in practice one or two).
#[derive(Default)]
struct CodeCache(Mutex<Vec<CachedCode>>);

/// A code file: its path, its size and modification time when read, the module.
type CachedCode = (PathBuf, (u64, Option<SystemTime>), Arc<GuestCode>);

/// Code modules kept by a [`CodeCache`].
const CODE_CACHE: usize = 4;

impl CodeCache {
    fn get(&self, path: &Path, limit: u64) -> Result<Arc<GuestCode>, String> {
        let meta =
            std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let stamp = (meta.len(), meta.modified().ok());
        let mut entries = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, _, code)) = entries.iter().find(|(p, s, _)| p == path && *s == stamp) {
            return Ok(Arc::clone(code));
        }
        let code = GuestCode::check(Code::new(read_bounded(path, limit)?))
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let code = Arc::new(code);
        entries.retain(|(p, _, _)| p != path);
        if entries.len() >= CODE_CACHE {
            entries.remove(0);
        }
        entries.push((path.to_path_buf(), stamp, Arc::clone(&code)));
        Ok(code)
    }
}

/// Reads a capsule in either form: a single file, or a model image whose code module is in
/// the repository's code store ([`crate::repository::CODE_DIR`]); both bounded by `limit`.
fn read_capsule(
    codes: &CodeCache,
    repo: &Path,
    path: &Path,
    limit: u64,
) -> Result<CapsuleImage, String> {
    let bytes = read_bounded(path, limit)?;
    if !capsule_format::split::is_image(&bytes) {
        return CapsuleImage::parse(bytes).map_err(|e| crate::error::chain(&e));
    }
    let header = capsule_format::split::image_header(&bytes).map_err(|e| e.to_string())?;
    let code_path = crate::repository::code_path(repo, &header.code_sha256)
        .ok_or_else(|| "malformed code hash".to_owned())?;
    if !code_path.exists() {
        return Err(format!(
            "the model image needs guest code {}, and {} does not exist",
            header.code_sha256,
            code_path.display()
        ));
    }
    let code = codes.get(&code_path, header.code_len.min(limit))?;
    CapsuleImage::parse_image(&code, &bytes).map_err(|e| crate::error::chain(&e))
}

fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot open: {e}"))?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() as u64 > limit {
        return Err(format!("larger than the limit of {limit} bytes"));
    }
    Ok(bytes)
}

impl Loader {
    pub(crate) fn new(
        engine: Arc<CapsuleEngine>,
        config: NodeConfig,
        registry: Arc<ModelRegistry>,
    ) -> Loader {
        Loader {
            engine,
            config,
            registry,
            known: HashMap::new(),
            codes: CodeCache::default(),
        }
    }

    /// Names a file: from its directory, or (flat files) from its manifest, which needs its
    /// bytes (kept for loading).
    fn candidate(&mut self, file: CapsuleFile) -> Option<Candidate> {
        if let Some((name, version)) = file.layout.clone() {
            return Some(Candidate {
                file,
                name,
                version,
                image: None,
            });
        }
        if let Some(k) = self.known.get(&file.path).filter(|k| k.stamp == file.stamp) {
            let (name, version) = (k.name.clone(), k.version.clone());
            return Some(Candidate {
                file,
                name,
                version,
                image: None,
            });
        }
        let named = read_capsule(
            &self.codes,
            &self.config.models,
            &file.path,
            self.config.max_capsule_bytes,
        );
        match named {
            Ok(image) => Some(Candidate {
                file,
                name: image.manifest.name.clone(),
                version: image.manifest.version.to_string(),
                image: Some(image),
            }),
            Err(e) => {
                let refusal = Refusal::Load(e);
                tracing::error!(path = %file.path.display(), error = %refusal.message(), "capsule refused");
                self.registry
                    .metrics
                    .swaps
                    .with_label_values(&["", refusal.outcome().as_str()])
                    .inc();
                self.known.insert(
                    file.path.clone(),
                    KnownFile {
                        stamp: file.stamp,
                        name: String::new(),
                        version: String::new(),
                        state: Known::Refused(refusal),
                    },
                );
                None
            }
        }
    }

    /// Installs and probes one capsule.
    fn load(&self, c: &mut Candidate) -> Result<Arc<ServedModel>, Refusal> {
        let started = Instant::now();
        let image = match c.image.take() {
            Some(image) => image,
            None => read_capsule(
                &self.codes,
                &self.config.models,
                &c.file.path,
                self.config.max_capsule_bytes,
            )
            .map_err(Refusal::Load)?,
        };
        let sha256 = image.sha256.clone();
        if image.manifest.name != c.name {
            tracing::warn!(
                path = %c.file.path.display(),
                manifest_name = %image.manifest.name,
                served_as = %c.name,
                "the capsule's manifest names another model; serving it under its directory name"
            );
        }
        let run = RunConfig {
            deadline: Some(self.config.deadline()),
            max_memory_bytes: self.config.max_memory_bytes,
            max_request_bytes: self.config.max_body_bytes,
            max_idle_instances: self.config.instances,
            // The engine already follows the node's `host_kernels` setting.
            host_kernels: true,
        };
        let capsule = LoadedCapsule::install(&self.engine, image, run)
            .map_err(|e| Refusal::Load(e.to_string()))?;
        let samples = &capsule.manifest().golden;
        if samples.is_empty() {
            tracing::warn!(path = %c.file.path.display(), "capsule has no golden samples: probed by instantiation only");
        }
        for sample in samples {
            golden::check(&capsule, sample).map_err(|e| Refusal::Probe(e.to_string()))?;
        }
        capsule
            .prewarm(self.config.instances)
            .map_err(|e| Refusal::Load(e.to_string()))?;
        tracing::info!(
            model = %c.name,
            version = %c.version,
            sha256 = %sha256,
            golden_samples = samples.len(),
            ms = started.elapsed().as_secs_f64() * 1e3,
            "capsule loaded and probed"
        );
        Ok(Arc::new(ServedModel::new(
            c.name.clone(),
            c.version.clone(),
            c.file.path.clone(),
            sha256,
            capsule,
            self.config.instances,
            self.config.queue,
            self.registry.metrics.clone(),
        )))
    }

    fn wanted(&self, version: &str) -> bool {
        match &self.config.version_policy {
            VersionPolicy::Specific(list) => list.iter().any(|v| v == version),
            _ => true,
        }
    }

    /// The state of every capsule file the loader knows: installing when it is loaded (it
    /// serves once the registry has it), or the refusal's outcome and message.
    pub(crate) fn file_states(&self) -> Vec<(PathBuf, ModelState, String)> {
        self.known
            .iter()
            .map(|(path, k)| match &k.state {
                Known::Loaded(_) => (path.clone(), ModelState::Installing, String::new()),
                Known::Refused(r) => (path.clone(), r.outcome(), r.message()),
            })
            .collect()
    }

    /// One pass: scan, load what changed, apply the version policy, swap.
    pub(crate) fn sync(&mut self) {
        let (files, held) = match scan(&self.config.models) {
            Ok(scan) => {
                // A model whose directory could not be listed in full keeps what it serves:
                // its files are not all in the scan, and missing is not removed.
                let mut held = std::collections::HashSet::new();
                for (name, error) in scan.unreadable {
                    tracing::warn!(model = %name, error = %error, "cannot list the model's directory; it keeps serving what is loaded");
                    held.insert(name);
                }
                (scan.files, held)
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot scan the model repository; serving what is loaded");
                return;
            }
        };
        let mut by_model: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
        let present: std::collections::HashSet<PathBuf> =
            files.iter().map(|f| f.path.clone()).collect();
        for file in files {
            if let Some(c) = self.candidate(file) {
                let versions = by_model.entry(c.name.clone()).or_default();
                if versions.iter().any(|o| o.version == c.version) {
                    tracing::warn!(model = %c.name, version = %c.version, path = %c.file.path.display(), "duplicate model version; ignoring this file");
                    continue;
                }
                versions.push(c);
            }
        }
        self.known
            .retain(|path, k| present.contains(path) || held.contains(&k.name));
        // Models seen for the first time answer 503 (not 404) while they load.
        {
            let mut models = self.registry.write();
            for name in by_model.keys() {
                models.entry(name.clone()).or_insert_with(|| ModelEntry {
                    loading: true,
                    ..ModelEntry::default()
                });
            }
        }
        let names: Vec<String> = {
            let mut n: Vec<String> = self.registry.model_names();
            n.extend(by_model.keys().cloned());
            n.sort();
            n.dedup();
            n
        };
        for name in names {
            if held.contains(&name) {
                continue;
            }
            let candidates = by_model.remove(&name).unwrap_or_default();
            self.sync_model(&name, candidates);
        }
    }

    fn sync_model(&mut self, name: &str, mut candidates: Vec<Candidate>) {
        candidates.sort_by(|a, b| compare_versions(&b.version, &a.version));
        let limit = match self.config.version_policy {
            VersionPolicy::Latest(n) => n,
            _ => usize::MAX,
        };
        let mut chosen: Vec<Arc<ServedModel>> = Vec::new();
        let mut problem = None;
        let mut chosen_paths = Vec::new();
        for mut c in candidates {
            if chosen.len() >= limit {
                break;
            }
            if !self.wanted(&c.version) {
                continue;
            }
            let current = self
                .known
                .get(&c.file.path)
                .filter(|k| k.stamp == c.file.stamp && k.name == c.name && k.version == c.version)
                .map(|k| k.state.clone());
            let state = match current {
                Some(state) => state,
                None => {
                    let state = match self.load(&mut c) {
                        Ok(m) => Known::Loaded(m),
                        Err(refusal) => {
                            tracing::error!(model = %name, version = %c.version, path = %c.file.path.display(), error = %refusal.message(), "capsule refused; the versions already served keep serving");
                            self.registry
                                .metrics
                                .swaps
                                .with_label_values(&[name, refusal.outcome().as_str()])
                                .inc();
                            Known::Refused(refusal)
                        }
                    };
                    self.known.insert(
                        c.file.path.clone(),
                        KnownFile {
                            stamp: c.file.stamp,
                            name: c.name.clone(),
                            version: c.version.clone(),
                            state: state.clone(),
                        },
                    );
                    state
                }
            };
            match state {
                Known::Loaded(m) => {
                    chosen_paths.push(c.file.path.clone());
                    chosen.push(m);
                }
                Known::Refused(r) => {
                    problem
                        .get_or_insert_with(|| format!("version {}: {}", c.version, r.message()));
                }
            }
        }
        // Loaded versions the policy no longer serves are forgotten (and freed once their
        // last request finishes); they load again if the policy wants them back.
        self.known.retain(|path, k| {
            k.name != name || matches!(k.state, Known::Refused(_)) || chosen_paths.contains(path)
        });
        sort_versions(&mut chosen);
        let metrics = &self.registry.metrics;
        let mut models = self.registry.write();
        let previous = models
            .get(name)
            .map(|e| e.versions.clone())
            .unwrap_or_default();
        for m in &chosen {
            if !previous.iter().any(|p| Arc::ptr_eq(p, m)) {
                metrics.swaps.with_label_values(&[name, "loaded"]).inc();
                // Counters start at 0 (present before the first event, for rate() and
                // dashboards).
                let labels = [m.name.as_str(), m.version.as_str()];
                let _ = metrics.traps.with_label_values(&labels);
                let _ = metrics.inferences.with_label_values(&labels);
                let _ = metrics.feedback.with_label_values(&[m.name.as_str()]);
                tracing::info!(model = %name, version = %m.version, "version now serving");
            }
        }
        for p in &previous {
            if !chosen.iter().any(|m| Arc::ptr_eq(p, m)) {
                metrics.swaps.with_label_values(&[name, "unloaded"]).inc();
                metrics.forget_version(&p.name, &p.version);
                tracing::info!(model = %name, version = %p.version, "version no longer served");
            }
        }
        let known_anywhere = self.known.values().any(|k| k.name == name) || !chosen.is_empty();
        if !known_anywhere && problem.is_none() {
            models.remove(name);
            return;
        }
        models.insert(
            name.to_owned(),
            ModelEntry {
                versions: chosen,
                loading: false,
                problem,
            },
        );
    }
}
