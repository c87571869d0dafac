//! Telemetry of a node synced with a hub: per model version, request and error counts, a
//! latency histogram, input feature histograms in the bins of the capsule's reference
//! statistics, the predicted classes and the predictions kept for feedback, aggregated in
//! windows aligned on the wall clock.
//!
//! Each closed window becomes one batch in a local buffer (`MODELS/.capsule-agent/telemetry`):
//! one file per batch, written to a temporary file, fsync'd and renamed, so a batch is either
//! whole on disk or absent after a crash. The buffer is bounded in bytes; when a new batch
//! does not fit, the oldest are deleted and counted (the counts travel in every later batch
//! and survive restarts). A shipper posts the buffered batches to the hub in order and deletes
//! them once the hub acknowledges them. The hub keys batches by `(node, seq)`, so a retry after
//! a lost acknowledgement is stored once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsule_format::telemetry::{
    self, FeatureHistogram, Feedback, MAX_FEEDBACK, MAX_PREDICTIONS, ModelWindow, Prediction,
    TelemetryBatch,
};
use capsule_format::{CapsuleManifest, NamedTensor};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use crate::durable::{move_aside, now_ms, read_json, write_durably};
use crate::metrics::Metrics;
use crate::{Error, Result};
use capsule_format::clock::SharedClock;

/// Most batches one shipment carries.
const SHIP_BATCHES: usize = 64;
/// Most bytes one shipment carries.
const SHIP_BYTES: usize = 4 << 20;
/// Quarantined batches kept on disk (the newest).
const QUARANTINE_KEPT: usize = 16;

/// Counters that survive restarts (`state.json` in the buffer directory).
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize)]
struct BufferState {
    last_seq: u64,
    dropped_batches: u64,
    dropped_requests: u64,
}

/// The on-disk batch buffer.
#[derive(Debug)]
struct Buffer {
    dir: PathBuf,
    max_bytes: u64,
    state: BufferState,
    /// seq -> (file size, requests in the batch).
    files: BTreeMap<u64, (u64, u64)>,
}

fn batch_path(dir: &Path, seq: u64, requests: u64) -> PathBuf {
    dir.join(format!("{seq:020}-{requests}.batch"))
}

/// Largest `state.json` read (it holds three counters).
const MAX_STATE_BYTES: u64 = 64 << 10;

/// The buffer's counters from `state.json`: none yet if it does not exist. A file that cannot
/// be read or parsed no longer stops the node: it is moved aside (`state.json.corrupt-<ms>`)
/// with a warning, the dropped counters start again from zero, and the batch sequence starts
/// from the current time in milliseconds, above any sequence counted one by one before, so
/// the hub (which keeps the first batch of each node and sequence) drops none of the new ones.
fn read_state(dir: &Path) -> BufferState {
    let path = dir.join("state.json");
    let problem = match read_json(&path, MAX_STATE_BYTES) {
        Ok(state) => return state.unwrap_or_default(),
        Err(problem) => problem,
    };
    let now = now_ms();
    let (aside, moved) = move_aside(&path, now);
    tracing::warn!(
        path = %path.display(),
        error = %problem,
        moved_to = %aside.display(),
        moved,
        "the telemetry buffer's state file is unreadable; starting its counters again (batch sequence from the clock)"
    );
    BufferState {
        last_seq: now,
        ..BufferState::default()
    }
}

/// [`write_durably`] with a `.tmp` temporary (which [`Buffer::open`] removes).
fn write_buffer_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_durably(&path.with_extension("tmp"), path, bytes)
}

impl Buffer {
    fn open(dir: &Path, max_bytes: u64) -> Result<Buffer> {
        std::fs::create_dir_all(dir)
            .map_err(Error::io(format!("cannot create {}", dir.display())))?;
        let mut state = read_state(dir);
        let mut files = BTreeMap::new();
        let entries =
            std::fs::read_dir(dir).map_err(Error::io(format!("cannot read {}", dir.display())))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp") {
                // A write cut short by a crash: never renamed, so never counted.
                let _ = std::fs::remove_file(&path);
                continue;
            }
            let Some(stem) = name.strip_suffix(".batch") else {
                continue;
            };
            let parsed = stem
                .split_once('-')
                .and_then(|(s, r)| Some((s.parse::<u64>().ok()?, r.parse::<u64>().ok()?)));
            let (Some((seq, requests)), Ok(meta)) = (parsed, entry.metadata()) else {
                continue;
            };
            state.last_seq = state.last_seq.max(seq);
            files.insert(seq, (meta.len(), requests));
        }
        Ok(Buffer {
            dir: dir.to_owned(),
            max_bytes,
            state,
            files,
        })
    }

    fn bytes(&self) -> u64 {
        self.files.values().map(|(size, _)| size).sum()
    }

    /// Numbers and stores one batch, evicting the oldest batches when it does not fit.
    /// Returns the batches evicted and their requests.
    fn push(&mut self, mut batch: TelemetryBatch) -> Result<(u64, u64)> {
        let seq = self.state.last_seq + 1;
        batch.seq = seq;
        let requests = batch.requests();
        // The counters a batch carries include its own eviction, so encode it last.
        let mut evicted = (0u64, 0u64);
        let mut encoded;
        loop {
            batch.dropped_batches = self.state.dropped_batches + evicted.0;
            batch.dropped_requests = self.state.dropped_requests + evicted.1;
            encoded = serde_json::to_vec(&batch)
                .map_err(|e| Error::Internal(format!("telemetry batch: {e}")))?;
            let kept: u64 = self
                .files
                .iter()
                .skip(usize::try_from(evicted.0).unwrap_or(usize::MAX))
                .map(|(_, (size, _))| size)
                .sum();
            if kept + encoded.len() as u64 <= self.max_bytes
                || evicted.0 as usize >= self.files.len()
            {
                break;
            }
            let Some((_, (_, r))) = self.files.iter().nth(evicted.0 as usize) else {
                break;
            };
            evicted = (evicted.0 + 1, evicted.1 + r);
        }
        self.state.last_seq = seq;
        if encoded.len() as u64 > self.max_bytes {
            // Larger than the whole buffer: the batch itself is dropped (and counted).
            evicted = (evicted.0 + 1, evicted.1 + requests);
        }
        for _ in 0..evicted.0.min(self.files.len() as u64) {
            if let Some((old, (_, r))) = self.files.pop_first() {
                let _ = std::fs::remove_file(batch_path(&self.dir, old, r));
            }
        }
        self.state.dropped_batches += evicted.0;
        self.state.dropped_requests += evicted.1;
        let state = serde_json::to_vec(&self.state)
            .map_err(|e| Error::Internal(format!("telemetry state: {e}")))?;
        let fits = encoded.len() as u64 <= self.max_bytes;
        let path = batch_path(&self.dir, seq, requests);
        let state_path = self.dir.join("state.json");
        let stored = write_buffer_file(&state_path, &state).and_then(|()| {
            if fits {
                write_buffer_file(&path, &encoded)?;
            }
            Ok(())
        });
        match stored {
            Ok(()) if fits => {
                self.files.insert(seq, (encoded.len() as u64, requests));
            }
            Ok(()) => {}
            // The disk refused (full, read-only, failing): the batch is lost, and counted
            // like an eviction, so the next batch stored carries it to the hub and the
            // hub's totals still add up (shipped + dropped = served).
            Err(e) => {
                // What the failed writes left behind (write_buffer_file writes `.tmp` first).
                for leftover in [
                    path.with_extension("tmp"),
                    state_path.with_extension("tmp"),
                    path.clone(),
                ] {
                    let _ = std::fs::remove_file(leftover);
                }
                if fits {
                    self.state.dropped_batches += 1;
                    self.state.dropped_requests += requests;
                    evicted = (evicted.0 + 1, evicted.1 + requests);
                }
                tracing::error!(
                    error = %e,
                    seq,
                    requests,
                    "telemetry: cannot store a batch (disk full?); counted as dropped"
                );
            }
        }
        Ok(evicted)
    }

    /// The oldest batches, up to `max` and the shipment's byte limit.
    fn pending(&self, max: usize) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        let mut size = 0usize;
        for (&seq, &(_, requests)) in self.files.iter().take(max.min(SHIP_BATCHES)) {
            let Ok(bytes) = std::fs::read(batch_path(&self.dir, seq, requests)) else {
                continue;
            };
            if !out.is_empty() && size + bytes.len() > SHIP_BYTES {
                break;
            }
            size += bytes.len();
            out.push((seq, bytes));
        }
        out
    }

    /// Moves a batch the hub refused on its own into `quarantine/` (for an operator to read;
    /// the newest [`QUARANTINE_KEPT`] are kept) and out of the buffer.
    fn quarantine(&mut self, seq: u64) {
        let Some((_, requests)) = self.files.remove(&seq) else {
            return;
        };
        let from = batch_path(&self.dir, seq, requests);
        let dir = self.dir.join("quarantine");
        let moved = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::rename(&from, dir.join(from.file_name().unwrap_or_default())));
        if moved.is_err() {
            let _ = std::fs::remove_file(&from);
        }
        let mut kept: Vec<PathBuf> = std::fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        kept.sort();
        for old in kept.iter().rev().skip(QUARANTINE_KEPT) {
            let _ = std::fs::remove_file(old);
        }
    }

    fn ack(&mut self, seqs: &[u64]) {
        for seq in seqs {
            if let Some((_, requests)) = self.files.remove(seq) {
                let _ = std::fs::remove_file(batch_path(&self.dir, *seq, requests));
            }
        }
    }
}

/// The window being filled.
#[derive(Debug)]
struct Window {
    start_ms: u64,
    models: BTreeMap<(String, String), ModelWindow>,
    feedback: Vec<Feedback>,
}

/// Input features of one request, counted before it runs.
#[derive(Debug, Default)]
pub(crate) struct Observed {
    features: Vec<FeatureHistogram>,
    rows: u64,
}

/// A node's telemetry recorder, buffer and shipper.
#[derive(Debug)]
pub(crate) struct Telemetry {
    node_id: String,
    window_ms: u64,
    current: Mutex<Window>,
    buffer: Mutex<Buffer>,
    metrics: Metrics,
    wake: Notify,
    clock: SharedClock,
}

/// Milliseconds since the epoch by `clock` (0 before 1970).
fn clock_ms(clock: &SharedClock) -> u64 {
    u64::try_from(clock.now_ms()).unwrap_or(0)
}

fn window_start(now: u64, window_ms: u64) -> u64 {
    now - now % window_ms.max(1)
}

impl Telemetry {
    /// Opens the buffer in `dir` (batches left by an earlier run are shipped too).
    pub(crate) fn open(
        dir: &Path,
        node_id: &str,
        window_ms: u64,
        max_bytes: u64,
        metrics: Metrics,
        clock: SharedClock,
    ) -> Result<Arc<Telemetry>> {
        let buffer = Buffer::open(dir, max_bytes)?;
        metrics
            .telemetry_dropped_batches
            .inc_by(buffer.state.dropped_batches);
        metrics
            .telemetry_dropped_requests
            .inc_by(buffer.state.dropped_requests);
        let telemetry = Telemetry {
            node_id: node_id.to_owned(),
            window_ms: window_ms.max(1),
            current: Mutex::new(Window {
                start_ms: window_start(clock_ms(&clock), window_ms),
                models: BTreeMap::new(),
                feedback: Vec::new(),
            }),
            buffer: Mutex::new(buffer),
            metrics,
            wake: Notify::new(),
            clock,
        };
        telemetry.refresh_gauges();
        Ok(Arc::new(telemetry))
    }

    fn refresh_gauges(&self) {
        let b = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        self.metrics
            .telemetry_buffered_batches
            .set(i64::try_from(b.files.len()).unwrap_or(i64::MAX));
        self.metrics
            .telemetry_buffered_bytes
            .set(i64::try_from(b.bytes()).unwrap_or(i64::MAX));
    }

    /// Counts the input features of a request (before it runs: the inputs move into the
    /// guest call).
    pub(crate) fn observe(&self, manifest: &CapsuleManifest, inputs: &[NamedTensor]) -> Observed {
        let Some(reference) = &manifest.reference else {
            return Observed::default();
        };
        let mut features = reference.empty_live();
        let rows = reference.observe(inputs, &mut features);
        Observed { features, rows }
    }

    /// Records one request: its latency, its outcome, its features and its predictions.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record(
        &self,
        model: &str,
        version: &str,
        labels: &[String],
        observed: Observed,
        outputs: std::result::Result<&[NamedTensor], &'static str>,
        elapsed: Duration,
        request_id: &str,
    ) {
        let classes = match outputs {
            Ok(outputs) => telemetry::classes(outputs, labels),
            Err(_) => Vec::new(),
        };
        let n = classes.len();
        let mut w = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let entry = w
            .models
            .entry((model.to_owned(), version.to_owned()))
            .or_insert_with(|| ModelWindow {
                model: model.to_owned(),
                version: version.to_owned(),
                ..ModelWindow::default()
            });
        entry.requests = entry.requests.saturating_add(1);
        entry.rows = entry.rows.saturating_add(observed.rows);
        entry.latency.observe(elapsed.as_secs_f64() * 1e3);
        if let Err(outcome) = outputs {
            let e = entry.errors.entry(outcome.to_owned()).or_default();
            *e = e.saturating_add(1);
        }
        if entry.features.is_empty() {
            entry.features = observed.features;
        } else if entry.features.len() == observed.features.len() {
            for (a, b) in entry.features.iter_mut().zip(&observed.features) {
                let _ = a.merge(b);
            }
        }
        for (i, class) in classes.into_iter().enumerate() {
            entry.count_class(&class);
            if entry.predictions.len() < MAX_PREDICTIONS {
                entry.predictions.push(Prediction {
                    id: telemetry::prediction_id(request_id, i, n),
                    class,
                });
            } else {
                entry.predictions_dropped = entry.predictions_dropped.saturating_add(1);
            }
        }
    }

    /// Records ground-truth labels for earlier predictions of `model`. Returns how many were
    /// kept (the window keeps at most [`MAX_FEEDBACK`]).
    pub(crate) fn feedback(&self, model: &str, items: Vec<(String, String)>) -> usize {
        let mut w = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let room = MAX_FEEDBACK.saturating_sub(w.feedback.len());
        let kept = items.len().min(room);
        w.feedback
            .extend(items.into_iter().take(kept).map(|(id, label)| Feedback {
                model: model.to_owned(),
                id: telemetry::cut(&id),
                label: telemetry::cut(&label),
            }));
        self.metrics
            .feedback
            .with_label_values(&[model])
            .inc_by(kept as u64);
        kept
    }

    /// Closes the current window and writes it to the buffer (nothing when it saw nothing).
    pub(crate) fn flush(&self) -> Result<()> {
        let now = clock_ms(&self.clock);
        let window = {
            let mut w = self.current.lock().unwrap_or_else(|p| p.into_inner());
            let next = Window {
                start_ms: window_start(now, self.window_ms).max(w.start_ms),
                models: BTreeMap::new(),
                feedback: Vec::new(),
            };
            std::mem::replace(&mut *w, next)
        };
        if window.models.is_empty() && window.feedback.is_empty() {
            return Ok(());
        }
        let batch = TelemetryBatch {
            node_id: self.node_id.clone(),
            seq: 0,
            window_start_ms: window.start_ms,
            window_end_ms: now.max(window.start_ms),
            dropped_batches: 0,
            dropped_requests: 0,
            models: window.models.into_values().collect(),
            feedback: window.feedback,
        };
        // A hub refuses batches over MAX_BATCH_BYTES; a refused batch would be retried forever.
        let mut evicted = (0, 0);
        {
            let mut buffer = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
            for part in batch.split_to_fit(capsule_format::telemetry::MAX_BATCH_BYTES) {
                let e = buffer.push(part)?;
                evicted = (evicted.0 + e.0, evicted.1 + e.1);
            }
        }
        if evicted.0 > 0 {
            tracing::warn!(
                batches = evicted.0,
                requests = evicted.1,
                "telemetry buffer full: dropped the oldest batches"
            );
        }
        self.metrics.telemetry_dropped_batches.inc_by(evicted.0);
        self.metrics.telemetry_dropped_requests.inc_by(evicted.1);
        self.refresh_gauges();
        self.wake.notify_one();
        Ok(())
    }

    /// Ships buffered batches until the buffer is empty or the hub fails. Returns whether
    /// everything buffered was acknowledged.
    async fn ship(&self, hub: &crate::hub_client::HubClient) -> Result<()> {
        // After the hub refuses a shipment as malformed, batches go one at a time to find the
        // one it refuses.
        let mut one_at_a_time = false;
        loop {
            let pending = self
                .buffer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pending(if one_at_a_time { 1 } else { SHIP_BATCHES });
            if pending.is_empty() {
                return Ok(());
            }
            let mut body =
                Vec::with_capacity(pending.iter().map(|(_, b)| b.len() + 1).sum::<usize>() + 16);
            body.extend_from_slice(b"{\"batches\":[");
            for (i, (_, bytes)) in pending.iter().enumerate() {
                if i > 0 {
                    body.push(b',');
                }
                body.extend_from_slice(bytes);
            }
            body.extend_from_slice(b"]}");
            // The acknowledgement lists at most the sequence numbers sent.
            let answer = hub
                .json::<capsule_format::hub::TelemetryAck>(
                    hub.post("/api/v1/telemetry")
                        .header("content-type", "application/json")
                        .body(body),
                    1 << 20,
                )
                .await;
            let acked = match answer {
                Ok(acked) => acked,
                // Refused for what it holds (malformed, too large): never better on a retry.
                Err(crate::hub_client::HubError::Status {
                    status: status @ (400 | 413 | 422),
                    text,
                }) => {
                    if let [(seq, _)] = pending.as_slice() {
                        tracing::warn!(seq, status, answer = %text, "the hub refused a telemetry batch on its own; moved to the buffer's quarantine directory");
                        self.buffer
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .quarantine(*seq);
                        self.metrics.telemetry_quarantined_batches.inc();
                        self.refresh_gauges();
                    } else {
                        one_at_a_time = true;
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let sent: Vec<u64> = pending.iter().map(|(s, _)| *s).collect();
            let acked: Vec<u64> = acked
                .acked
                .into_iter()
                .filter(|s| sent.contains(s))
                .collect();
            self.buffer
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .ack(&acked);
            self.metrics
                .telemetry_shipped_batches
                .inc_by(acked.len() as u64);
            self.refresh_gauges();
            if acked.len() < sent.len() {
                return Err(Error::Unacknowledged {
                    acked: acked.len(),
                    sent: sent.len(),
                });
            }
        }
    }

    /// Closes windows on time and ships batches until shutdown; the last window is
    /// flushed (and shipped, when the hub answers) on the way out.
    pub(crate) async fn run(
        self: Arc<Self>,
        hub: crate::hub_client::HubClient,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let flusher = {
            let me = Arc::clone(&self);
            let mut shutdown = shutdown.clone();
            tokio::spawn(async move {
                loop {
                    let now = clock_ms(&me.clock);
                    let next = window_start(now, me.window_ms) + me.window_ms;
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(next.saturating_sub(now))) => {}
                        _ = shutdown.wait_for(|s| *s) => return,
                    }
                    let me2 = Arc::clone(&me);
                    match tokio::task::spawn_blocking(move || me2.flush()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::error!(error = %e, "telemetry: cannot buffer the window")
                        }
                        Err(e) => tracing::error!(error = %e, "telemetry: flush failed"),
                    }
                }
            })
        };
        let mut backoff = Duration::from_millis(500);
        loop {
            match self.ship(&hub).await {
                Ok(()) => backoff = Duration::from_millis(500),
                Err(e) => {
                    self.metrics.telemetry_ship_failures.inc();
                    tracing::warn!(error = %crate::hub_client::chain(&e), retry_ms = backoff.as_millis() as u64, "telemetry: shipping failed; batches stay buffered");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|s| *s) => break,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            }
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        let _ = flusher.await;
        let me = Arc::clone(&self);
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || me.flush()).await {
            tracing::error!(error = %e, "telemetry: cannot buffer the last window");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.ship(&hub)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(requests: u64) -> TelemetryBatch {
        TelemetryBatch {
            node_id: "n".into(),
            window_start_ms: 1,
            window_end_ms: 2,
            models: vec![ModelWindow {
                model: "m".into(),
                version: "1".into(),
                requests,
                ..ModelWindow::default()
            }],
            ..TelemetryBatch::default()
        }
    }

    /// Issue 16: a batch the hub refuses (here, one naming another node: 400) used to be
    /// retried forever, and every batch after it waited. The shipper narrows the refusal down
    /// to that batch, quarantines it, counts it, and ships the rest.
    #[tokio::test]
    async fn a_batch_the_hub_refuses_is_quarantined_and_the_rest_ship() {
        use axum::http::StatusCode;
        use axum::routing::post;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/api/v1/telemetry",
            post(|body: axum::body::Bytes| async move {
                let shipment: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                let batches = shipment["batches"].as_array().cloned().unwrap_or_default();
                if batches.iter().any(|b| b["node_id"] == "poison") {
                    return (
                        StatusCode::BAD_REQUEST,
                        "batch is from node \"poison\"".to_owned(),
                    );
                }
                let acked: Vec<_> = batches.iter().map(|b| b["seq"].clone()).collect();
                (
                    StatusCode::OK,
                    serde_json::json!({ "acked": acked }).to_string(),
                )
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        let hub = crate::hub_client::HubClient::new(&url, "t", None).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let metrics = Metrics::new().unwrap();
        let t = Telemetry::open(
            dir.path(),
            "n",
            60_000,
            1 << 20,
            metrics.clone(),
            capsule_format::clock::system(),
        )
        .unwrap();
        {
            let mut buffer = t.buffer.lock().unwrap();
            buffer.push(batch(1)).unwrap();
            buffer
                .push(TelemetryBatch {
                    node_id: "poison".into(),
                    ..batch(2)
                })
                .unwrap();
            buffer.push(batch(3)).unwrap();
        }
        t.ship(&hub).await.unwrap();
        assert!(t.buffer.lock().unwrap().files.is_empty());
        assert_eq!(metrics.telemetry_quarantined_batches.get(), 1);
        assert_eq!(metrics.telemetry_shipped_batches.get(), 2);
        let quarantined: Vec<_> = std::fs::read_dir(dir.path().join("quarantine"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(quarantined, ["00000000000000000002-2.batch"]);
    }

    /// Windows are aligned on the node's clock: a request recorded at 10.25 s with 1 s
    /// windows lands in the window starting at 10 s, which the flush at 11.5 s closes at
    /// 11.5 s; the next window starts at 11 s; a window that saw nothing writes nothing.
    #[test]
    fn windows_follow_the_clock() {
        use capsule_format::clock::ManualClock;
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::at_ms(10_250);
        let t = Telemetry::open(
            dir.path(),
            "n",
            1_000,
            1 << 20,
            Metrics::new().unwrap(),
            clock.clone(),
        )
        .unwrap();
        let ok: &[NamedTensor] = &[];
        t.record(
            "m",
            "1",
            &[],
            Observed::default(),
            Ok(ok),
            Duration::from_millis(3),
            "r1",
        );
        clock.set_ms(11_500);
        t.flush().unwrap();
        t.flush().unwrap(); // nothing recorded since: no batch
        clock.set_ms(12_100);
        t.record(
            "m",
            "1",
            &[],
            Observed::default(),
            Err("guest_trap"),
            Duration::from_millis(3),
            "r2",
        );
        t.flush().unwrap();
        let batches: Vec<TelemetryBatch> = t
            .buffer
            .lock()
            .unwrap()
            .pending(10)
            .iter()
            .map(|(_, b)| serde_json::from_slice(b).unwrap())
            .collect();
        let spans: Vec<_> = batches
            .iter()
            .map(|b| (b.window_start_ms, b.window_end_ms, b.models[0].requests))
            .collect();
        assert_eq!(spans, [(10_000, 11_500, 1), (11_000, 12_100, 1)]);
        assert_eq!(batches[1].models[0].error_count(), 1);
    }

    /// Issue 16: a corrupt `state.json` stopped the node from starting. It is moved aside,
    /// and the next batch's sequence is above every earlier one (the hub keeps the first batch
    /// of each sequence, so a restart from 1 would have lost batches silently).
    #[test]
    fn a_corrupt_state_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Buffer::open(dir.path(), 1 << 20).unwrap();
        b.push(batch(10)).unwrap();
        let before = b.state.last_seq;
        drop(b);
        std::fs::write(dir.path().join("state.json"), b"{\"last_seq\": ").unwrap();
        let mut b = Buffer::open(dir.path(), 1 << 20).unwrap();
        b.push(batch(20)).unwrap();
        assert!(
            b.state.last_seq > before.max(1_000_000_000_000),
            "{}",
            b.state.last_seq
        );
        let aside: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("state.json.corrupt-"))
            .collect();
        assert_eq!(aside.len(), 1, "{aside:?}");
        // The new state file is good again.
        drop(b);
        assert!(Buffer::open(dir.path(), 1 << 20).is_ok());
        assert_eq!(
            std::fs::read_dir(dir.path())
                .unwrap()
                .flatten()
                .filter(|e| e
                    .file_name()
                    .to_string_lossy()
                    .starts_with("state.json.corrupt-"))
                .count(),
            1
        );
    }

    #[test]
    fn the_buffer_evicts_the_oldest_and_counts_them_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let size = serde_json::to_vec(&TelemetryBatch {
            seq: 1,
            ..batch(10)
        })
        .unwrap()
        .len() as u64;
        let mut b = Buffer::open(dir.path(), size * 3 + size / 2).unwrap();
        for r in [10, 20, 30] {
            assert_eq!(b.push(batch(r)).unwrap(), (0, 0));
        }
        assert_eq!(b.push(batch(40)).unwrap(), (1, 10));
        assert_eq!(b.push(batch(50)).unwrap(), (1, 20));
        assert_eq!(b.files.keys().copied().collect::<Vec<_>>(), vec![3, 4, 5]);
        // A crash mid-write leaves a temporary file, which is not a batch.
        std::fs::write(dir.path().join("00000000000000000006-1.tmp"), b"{").unwrap();
        drop(b);
        let mut b = Buffer::open(dir.path(), size * 3 + size / 2).unwrap();
        assert_eq!(
            (
                b.state.last_seq,
                b.state.dropped_batches,
                b.state.dropped_requests
            ),
            (5, 2, 30)
        );
        assert_eq!(b.files.len(), 3);
        let pending = b.pending(SHIP_BATCHES);
        let first: TelemetryBatch = serde_json::from_slice(&pending[0].1).unwrap();
        assert_eq!(
            (first.seq, first.dropped_batches, first.dropped_requests),
            (3, 0, 0)
        );
        let last: TelemetryBatch = serde_json::from_slice(&pending[2].1).unwrap();
        assert_eq!(
            (last.seq, last.dropped_batches, last.dropped_requests),
            (5, 2, 30)
        );
        b.ack(&[3, 4]);
        assert_eq!(b.push(batch(60)).unwrap(), (0, 0));
        assert_eq!(b.files.keys().copied().collect::<Vec<_>>(), vec![5, 6]);
        assert!(!dir.path().join("00000000000000000006-1.tmp").exists());
    }
}
