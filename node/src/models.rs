//! Served model versions, their execution queue, and the registry the protocol handlers
//! read from.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use capsule_format::{CapsuleManifest, NamedTensor};
use capsule_runtime::LoadedCapsule;
use tokio::sync::{Semaphore, TryAcquireError};

use crate::metrics::Metrics;
use crate::repository::compare_versions;
use crate::telemetry::Telemetry;
use crate::{Error, Result};

/// One model version being served: an installed capsule, its warm instances and its wait
/// queue.
pub struct ServedModel {
    /// Model name.
    pub name: String,
    /// Version (directory name, or the manifest's version for a flat file).
    pub version: String,
    /// The capsule file.
    pub path: PathBuf,
    /// SHA-256 of the capsule file.
    pub sha256: String,
    capsule: Arc<LoadedCapsule>,
    slots: Arc<Semaphore>,
    waiting: AtomicUsize,
    instances: usize,
    queue: usize,
    metrics: Metrics,
    /// Moving average of the guest call time in microseconds (starts high, so the first
    /// calls go to the blocking pool).
    compute_avg_us: AtomicU64,
}

/// Requests whose guest calls average less than this run on the I/O thread that received
/// them (saving two thread handoffs, a large share of a sub-millisecond request); longer
/// ones run on tokio's blocking pool so they never stall other connections.
const INLINE_COMPUTE_US: u64 = 500;

/// Requests larger than this run on the blocking pool whatever the model's average: the
/// average is of the requests so far, and one large batch to a fast model can take far longer
/// than they did (64 KiB: a 128x128 RGB image in FP32 is 192 KiB).
const INLINE_MAX_BYTES: usize = 64 << 10;

/// Whether a request runs on the I/O thread that received it: the model's guest calls are
/// short on average, and this request is small.
fn runs_inline(average_us: u64, request_bytes: usize) -> bool {
    average_us < INLINE_COMPUTE_US && request_bytes <= INLINE_MAX_BYTES
}

impl std::fmt::Debug for ServedModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServedModel")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("sha256", &self.sha256)
            .finish()
    }
}

/// The result of one inference, with where its time went.
#[derive(Debug)]
pub struct InferOutcome {
    /// Output tensors, in the manifest's order.
    pub outputs: Vec<NamedTensor>,
    /// Time spent waiting for an instance.
    pub queue: Duration,
    /// Time spent in the guest call.
    pub compute: Duration,
}

/// Leaves the wait queue when dropped (also when the client goes away while waiting).
struct Waiting<'a> {
    count: &'a AtomicUsize,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl ServedModel {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        name: String,
        version: String,
        path: PathBuf,
        sha256: String,
        capsule: LoadedCapsule,
        instances: usize,
        queue: usize,
        metrics: Metrics,
    ) -> ServedModel {
        ServedModel {
            name,
            version,
            path,
            sha256,
            capsule: Arc::new(capsule),
            slots: Arc::new(Semaphore::new(instances)),
            waiting: AtomicUsize::new(0),
            instances,
            queue,
            metrics,
            compute_avg_us: AtomicU64::new(u64::MAX),
        }
    }

    /// The capsule's manifest.
    pub fn manifest(&self) -> &CapsuleManifest {
        self.capsule.manifest()
    }

    /// The installed capsule.
    pub fn capsule(&self) -> &Arc<LoadedCapsule> {
        &self.capsule
    }

    /// Names of the model's outputs, in manifest order.
    pub fn output_names(&self) -> Vec<&str> {
        self.manifest()
            .outputs
            .iter()
            .map(|o| o.name.as_str())
            .collect()
    }

    /// Requests waiting for an instance now.
    pub fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }

    /// Requests running in a guest now.
    pub fn in_flight(&self) -> usize {
        self.instances
            .saturating_sub(self.slots.available_permits())
    }

    /// Runs one inference on a warm instance. When every instance is busy the request waits
    /// in a bounded queue; when the queue is full it is refused at once
    /// ([`Error::QueueFull`]). The deadline covers the wait and the guest call; past it the
    /// request fails with [`Error::DeadlineExceeded`] (a running guest is interrupted and its
    /// instance discarded).
    pub async fn infer(
        self: &Arc<Self>,
        inputs: Vec<NamedTensor>,
        deadline: Duration,
    ) -> Result<InferOutcome> {
        let started = Instant::now();
        let labels = [self.name.as_str(), self.version.as_str()];
        let deadline_ms = u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX);
        let permit = match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(permit) => permit,
            Err(TryAcquireError::Closed) => return Err(Error::ShuttingDown),
            Err(TryAcquireError::NoPermits) => {
                let joined = self
                    .waiting
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                        (w < self.queue).then_some(w + 1)
                    });
                if joined.is_err() {
                    return Err(Error::QueueFull {
                        model: self.name.clone(),
                        version: self.version.clone(),
                        capacity: self.instances + self.queue,
                    });
                }
                let _waiting = Waiting {
                    count: &self.waiting,
                };
                match tokio::time::timeout(deadline, Arc::clone(&self.slots).acquire_owned()).await
                {
                    Ok(Ok(permit)) => permit,
                    Ok(Err(_)) => return Err(Error::ShuttingDown),
                    Err(_) => {
                        return Err(Error::DeadlineExceeded {
                            deadline_ms,
                            during: "in the queue",
                        });
                    }
                }
            }
        };
        let queue = started.elapsed();
        self.metrics
            .queue_seconds
            .with_label_values(&labels)
            .observe(queue.as_secs_f64());
        let Some(remaining) = deadline.checked_sub(queue).filter(|r| !r.is_zero()) else {
            return Err(Error::DeadlineExceeded {
                deadline_ms,
                during: "in the queue",
            });
        };
        let average = self.compute_avg_us.load(Ordering::Relaxed);
        let request_bytes = inputs.iter().map(|t| t.tensor.data.len()).sum();
        let (result, compute) = if runs_inline(average, request_bytes) {
            let _permit = permit;
            let t = Instant::now();
            let result = self.capsule.infer_with_deadline(&inputs, Some(remaining));
            (result, t.elapsed())
        } else {
            let capsule = Arc::clone(&self.capsule);
            // The permit travels with the blocking call: if the client goes away, the
            // instance stays taken until the guest returns.
            let task = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                let t = Instant::now();
                let result = capsule.infer_with_deadline(&inputs, Some(remaining));
                (result, t.elapsed())
            });
            task.await
                .map_err(|e| Error::Internal(format!("inference worker failed: {e}")))?
        };
        let us = u64::try_from(compute.as_micros()).unwrap_or(u64::MAX);
        let updated = if average == u64::MAX {
            us
        } else {
            (average.saturating_mul(7).saturating_add(us)) / 8
        };
        self.compute_avg_us.store(updated, Ordering::Relaxed);
        self.metrics
            .compute_seconds
            .with_label_values(&labels)
            .observe(compute.as_secs_f64());
        match result {
            Ok(outputs) => {
                self.metrics.inferences.with_label_values(&labels).inc();
                Ok(InferOutcome {
                    outputs,
                    queue,
                    compute,
                })
            }
            Err(e) => {
                if matches!(
                    e,
                    capsule_runtime::Error::Trap { .. } | capsule_runtime::Error::Abi(_)
                ) {
                    self.metrics.traps.with_label_values(&labels).inc();
                }
                Err(Error::from_inference(e, deadline_ms))
            }
        }
    }

    /// Closes the queue: waiting and future requests fail with [`Error::ShuttingDown`].
    pub(crate) fn close(&self) {
        self.slots.close();
    }
}

/// What the registry knows of one model.
#[derive(Debug, Clone, Default)]
pub(crate) struct ModelEntry {
    /// Served versions, lowest first.
    pub versions: Vec<Arc<ServedModel>>,
    /// Loading for the first time.
    pub loading: bool,
    /// Why no version is served, when none is.
    pub problem: Option<String>,
}

/// The models being served. Protocol handlers resolve requests here; the repository loader
/// swaps whole version sets in at once, so a request sees either the old set or the new one.
#[derive(Debug)]
pub struct ModelRegistry {
    models: RwLock<BTreeMap<String, ModelEntry>>,
    ready: AtomicBool,
    pub(crate) metrics: Metrics,
    telemetry: Option<Arc<Telemetry>>,
}

impl ModelRegistry {
    pub(crate) fn new(metrics: Metrics, telemetry: Option<Arc<Telemetry>>) -> ModelRegistry {
        ModelRegistry {
            models: RwLock::new(BTreeMap::new()),
            ready: AtomicBool::new(false),
            metrics,
            telemetry,
        }
    }

    /// Runs one inference on `served` ([`ServedModel::infer`]) and records it in the node's
    /// telemetry (when it has a hub): latency, outcome, input features, predicted classes,
    /// and the prediction under `request_id` for later feedback.
    pub async fn infer_recorded(
        &self,
        served: &Arc<ServedModel>,
        inputs: Vec<NamedTensor>,
        deadline: Duration,
        request_id: &str,
    ) -> Result<InferOutcome> {
        let Some(telemetry) = &self.telemetry else {
            return served.infer(inputs, deadline).await;
        };
        let started = Instant::now();
        let observed = telemetry.observe(served.manifest(), &inputs);
        let result = served.infer(inputs, deadline).await;
        let outputs = match &result {
            Ok(o) => Ok(o.outputs.as_slice()),
            Err(e) => Err(e.outcome()),
        };
        telemetry.record(
            &served.name,
            &served.version,
            &served.manifest().labels,
            observed,
            outputs,
            started.elapsed(),
            request_id,
        );
        result
    }

    /// Records ground-truth labels (request id, label) for earlier predictions of `model`.
    /// Returns how many were kept.
    pub fn feedback(&self, model: &str, items: Vec<(String, String)>) -> Result<usize> {
        let Some(telemetry) = &self.telemetry else {
            return Err(Error::Unsupported(
                "feedback needs telemetry: start the node with --hub".into(),
            ));
        };
        if !self.read().contains_key(model) {
            return Err(Error::ModelNotFound(model.to_owned()));
        }
        Ok(telemetry.feedback(model, items))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, ModelEntry>> {
        self.models.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, ModelEntry>> {
        self.models.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the first scan of the repository has finished.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub(crate) fn set_ready(&self) {
        self.ready.store(true, Ordering::Release);
    }

    /// Runs `f` on the served versions of a model (lowest first, never empty); an error
    /// when the model is unknown or has no version ready.
    fn with_versions<R>(
        &self,
        model: &str,
        f: impl FnOnce(&[Arc<ServedModel>]) -> Result<R>,
    ) -> Result<R> {
        let models = self.read();
        let entry = models
            .get(model)
            .ok_or_else(|| Error::ModelNotFound(model.to_owned()))?;
        if entry.versions.is_empty() {
            return Err(not_ready(model, entry));
        }
        f(&entry.versions)
    }

    /// The version to run a request on: the given one, or the highest served one.
    pub fn resolve(&self, model: &str, version: Option<&str>) -> Result<Arc<ServedModel>> {
        self.with_versions(model, |versions| {
            let found = match version {
                None | Some("") => versions.last(),
                Some(v) => versions.iter().find(|m| m.version == v),
            };
            found.cloned().ok_or_else(|| Error::VersionNotFound {
                model: model.to_owned(),
                version: version.unwrap_or_default().to_owned(),
            })
        })
    }

    /// The served versions of a model, lowest first (an error when the model is unknown or
    /// has none ready).
    pub fn versions(&self, model: &str) -> Result<Vec<Arc<ServedModel>>> {
        self.with_versions(model, |versions| Ok(versions.to_vec()))
    }

    /// Every served model version.
    pub fn all_versions(&self) -> Vec<Arc<ServedModel>> {
        self.read()
            .values()
            .flat_map(|e| e.versions.iter().cloned())
            .collect()
    }

    /// Names of every model the repository holds, served or not.
    pub fn model_names(&self) -> Vec<String> {
        self.read().keys().cloned().collect()
    }

    /// Brings the per-version gauges up to date (called before each scrape).
    pub(crate) fn refresh_gauges(&self) {
        let m = &self.metrics;
        let all = self.all_versions();
        m.versions_loaded
            .set(i64::try_from(all.len()).unwrap_or(i64::MAX));
        for v in all {
            let labels = [v.name.as_str(), v.version.as_str()];
            let stats = v.capsule.stats();
            let gauge = |g: &prometheus::IntGaugeVec, n: u64| {
                g.with_label_values(&labels)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            };
            gauge(&m.queue_depth, v.queue_depth() as u64);
            gauge(&m.in_flight, v.in_flight() as u64);
            gauge(&m.instances, stats.live_instances.load(Ordering::Relaxed));
            gauge(&m.idle_instances, v.capsule.idle_instances() as u64);
            gauge(&m.guest_memory, stats.memory_bytes.load(Ordering::Relaxed));
        }
    }

    /// Closes every queue (shutdown).
    pub(crate) fn close_all(&self) {
        for v in self.all_versions() {
            v.close();
        }
    }
}

fn not_ready(model: &str, entry: &ModelEntry) -> Error {
    let reason = if entry.loading {
        "loading".to_owned()
    } else {
        entry
            .problem
            .clone()
            .unwrap_or_else(|| "no version is loaded".to_owned())
    };
    Error::NotReady {
        model: model.to_owned(),
        reason,
    }
}

/// Sorts versions lowest first.
pub(crate) fn sort_versions(versions: &mut [Arc<ServedModel>]) {
    versions.sort_by(|a, b| compare_versions(&a.version, &b.version));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 16: a huge batch to a model whose requests averaged under 0.5 ms ran on an I/O
    /// thread, stalling every connection of that thread for its whole duration.
    #[test]
    fn only_small_requests_to_fast_models_run_inline() {
        assert!(runs_inline(100, 256));
        assert!(runs_inline(100, INLINE_MAX_BYTES));
        assert!(
            !runs_inline(100, INLINE_MAX_BYTES + 1),
            "a large request to a fast model"
        );
        assert!(!runs_inline(INLINE_COMPUTE_US, 256), "a slow model");
        assert!(!runs_inline(u64::MAX, 256), "a model with no calls yet");
    }
}
