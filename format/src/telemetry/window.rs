//! What a node aggregates per window and ships: histograms, latencies, classes, kept
//! predictions, feedback, batches.

use super::*;

/// Live counts of one feature in one window, in the reference's bins.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureHistogram {
    /// Feature name.
    pub name: String,
    /// Values per bin.
    pub counts: Vec<u64>,
    /// Missing values.
    pub missing: u64,
    /// Moments of the numeric values.
    pub moments: Moments,
}

impl FeatureHistogram {
    /// Counts one value.
    pub fn add(&mut self, binning: &Binning, value: Value) {
        match binning.bin(&value) {
            Some(b) => {
                if let Some(c) = self.counts.get_mut(b) {
                    *c = c.saturating_add(1);
                }
                let numeric = match &value {
                    Value::Number(n) => n.as_f64(),
                    Value::Bool(b) => Some(f64::from(u8::from(*b))),
                    _ => None,
                };
                if let Some(v) = numeric.filter(|v| v.is_finite()) {
                    self.moments.add(v);
                }
            }
            None => self.missing = self.missing.saturating_add(1),
        }
    }

    pub(super) fn count(&mut self, bin: Option<usize>, numeric: Option<f64>) {
        match bin {
            Some(b) => {
                if let Some(c) = self.counts.get_mut(b) {
                    *c = c.saturating_add(1);
                }
                if let Some(v) = numeric {
                    self.moments.add(v);
                }
            }
            None => self.missing = self.missing.saturating_add(1),
        }
    }

    /// Counts one number (NaN is missing).
    pub fn add_f64(&mut self, binning: &Binning, v: f64) {
        self.count(binning.bin_f64(v), Some(v));
    }

    pub(super) fn add_scalar(&mut self, binning: &Binning, value: &Scalar) {
        match (binning, value) {
            (_, Scalar::Missing) => self.count(None, None),
            (Binning::Numeric { .. }, Scalar::Number(v)) => self.add_f64(binning, *v),
            (Binning::Numeric { .. }, Scalar::Text(t)) if t.eq_ignore_ascii_case("nan") => {
                self.count(None, None)
            }
            (Binning::Numeric { edges }, _) => self.count(Some(edges.len()), None),
            (Binning::Categorical { categories }, Scalar::Text(t)) => self.count(
                Some(
                    categories
                        .iter()
                        .position(|c| c == t)
                        .unwrap_or(categories.len()),
                ),
                None,
            ),
            (Binning::Categorical { categories }, _) => self.count(Some(categories.len()), None),
        }
    }

    /// Adds another window's counts of the same feature (same bins).
    pub fn merge(&mut self, other: &FeatureHistogram) -> Result<()> {
        if other.counts.len() != self.counts.len() {
            return Err(invalid(format!(
                "feature {:?}: {} bins, expected {}",
                self.name,
                other.counts.len(),
                self.counts.len()
            )));
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
        self.missing = self.missing.saturating_add(other.missing);
        self.moments.merge(&other.moments);
        Ok(())
    }

    /// Values counted in bins (missing ones excluded).
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// Request latencies in fixed bins ([`LATENCY_BOUNDS_MS`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencyHistogram {
    /// Requests per bin.
    pub counts: Vec<u64>,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: vec![0; LATENCY_BOUNDS_MS.len() + 1],
        }
    }
}

impl LatencyHistogram {
    /// Counts one latency.
    pub fn observe(&mut self, ms: f64) {
        let b = LATENCY_BOUNDS_MS.partition_point(|bound| *bound < ms);
        if let Some(c) = self.counts.get_mut(b) {
            *c = c.saturating_add(1);
        }
    }

    /// Adds another histogram.
    pub fn merge(&mut self, other: &LatencyHistogram) {
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (a, b) in self.counts.iter_mut().zip(&other.counts) {
            *a = a.saturating_add(*b);
        }
    }

    /// The `q` quantile in milliseconds, interpolated linearly inside its bin (Prometheus'
    /// `histogram_quantile`); `None` when empty. The overflow bin answers its lower bound.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0u64;
        for (i, &c) in self.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            if (seen + c) as f64 >= rank {
                let lo = if i == 0 {
                    0.0
                } else {
                    LATENCY_BOUNDS_MS.get(i - 1).copied().unwrap_or(0.0)
                };
                let Some(&hi) = LATENCY_BOUNDS_MS.get(i) else {
                    return Some(lo);
                };
                return Some(lo + (hi - lo) * ((rank - seen as f64) / c as f64).clamp(0.0, 1.0));
            }
            seen += c;
        }
        LATENCY_BOUNDS_MS.last().copied()
    }
}

/// One prediction kept for feedback: the request (with `/i` for row `i` of a batch of more
/// than one row) and the class the model gave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Prediction {
    /// Request id (see [`prediction_id`]).
    pub id: String,
    /// Predicted class.
    pub class: String,
}

/// A ground-truth label for an earlier prediction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    /// Model name.
    pub model: String,
    /// Request id (see [`prediction_id`]).
    pub id: String,
    /// The true class.
    pub label: String,
}

/// One ground-truth label as clients send it: `{"id": "...", "label": ..., "index": i}`
/// (`index` names row `i` of a request of several rows).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackItem {
    /// Request id.
    pub id: String,
    /// The true class: a string, or a number taken as its decimal text.
    pub label: Value,
    /// The row, for a request of several rows.
    #[serde(default)]
    pub index: Option<usize>,
}

impl FeedbackItem {
    /// The prediction id ([`prediction_id`]'s form) and the label text.
    pub fn resolve(self) -> Result<(String, String)> {
        let label = match self.label {
            Value::String(s) => s,
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            other => {
                return Err(invalid(format!(
                    "feedback for {:?}: the label must be a string or a number, not {other}",
                    self.id
                )));
            }
        };
        let id = match self.index {
            Some(i) => format!("{}/{i}", self.id),
            None => self.id,
        };
        Ok((cut(&id), cut(&label)))
    }
}

/// `POST /api/v1/feedback`: labels for predictions of one model (browsers; nodes send theirs
/// in telemetry).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedbackRequest {
    /// The model.
    pub model: String,
    /// The labels (at most [`MAX_FEEDBACK`]).
    pub feedback: Vec<FeedbackItem>,
}

/// `POST /api/v1/telemetry`: batches from one node (the node writes this shape around the
/// batch files of its buffer, as they are, without decoding them).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shipment {
    /// The batches, oldest first.
    pub batches: Vec<TelemetryBatch>,
}

/// What one model version saw in one window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelWindow {
    /// Model name.
    pub model: String,
    /// Version.
    pub version: String,
    /// Inference requests.
    pub requests: u64,
    /// Requests that failed, by outcome.
    pub errors: BTreeMap<String, u64>,
    /// Rows (records, tensor rows) in the requests.
    pub rows: u64,
    /// Whole request latency.
    pub latency: LatencyHistogram,
    /// Input features, in the reference's order (empty without reference statistics).
    pub features: Vec<FeatureHistogram>,
    /// Predicted classes.
    pub classes: BTreeMap<String, u64>,
    /// Predictions kept for feedback.
    pub predictions: Vec<Prediction>,
    /// Predictions not kept (past [`MAX_PREDICTIONS`]).
    pub predictions_dropped: u64,
}

impl ModelWindow {
    /// Failed requests.
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Counts one predicted class, folding classes past [`MAX_CLASSES`] into one.
    pub fn count_class(&mut self, class: &str) {
        let key = if self.classes.contains_key(class) || self.classes.len() < MAX_CLASSES {
            cut(class)
        } else {
            OTHER_CLASS.to_owned()
        };
        let c = self.classes.entry(key).or_default();
        *c = c.saturating_add(1);
    }

    /// Adds another window of the same model version.
    pub fn merge(&mut self, other: &ModelWindow) -> Result<()> {
        self.requests = self.requests.saturating_add(other.requests);
        self.rows = self.rows.saturating_add(other.rows);
        for (k, v) in &other.errors {
            let e = self.errors.entry(k.clone()).or_default();
            *e = e.saturating_add(*v);
        }
        self.latency.merge(&other.latency);
        if self.features.is_empty() {
            self.features = other.features.clone();
        } else if !other.features.is_empty() {
            if self.features.len() != other.features.len() {
                return Err(invalid(format!(
                    "{} {}: {} features, expected {}",
                    self.model,
                    self.version,
                    other.features.len(),
                    self.features.len()
                )));
            }
            for (a, b) in self.features.iter_mut().zip(&other.features) {
                a.merge(b)?;
            }
        }
        for (k, v) in &other.classes {
            let c = self.classes.entry(k.clone()).or_default();
            *c = c.saturating_add(*v);
        }
        self.predictions_dropped = self
            .predictions_dropped
            .saturating_add(other.predictions_dropped);
        Ok(())
    }
}

/// One window of a node's telemetry, as shipped to the hub. `(node_id, seq)` identifies it,
/// so the hub stores a retried batch once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    /// The node (or browser) that recorded it.
    pub node_id: String,
    /// Its sequence number on that node, from 1, never reused.
    pub seq: u64,
    /// Window start, milliseconds since the Unix epoch.
    pub window_start_ms: u64,
    /// Window end.
    pub window_end_ms: u64,
    /// Batches the node has dropped from its full buffer so far (cumulative).
    pub dropped_batches: u64,
    /// Requests in those batches (cumulative).
    pub dropped_requests: u64,
    /// Per model version.
    pub models: Vec<ModelWindow>,
    /// Feedback labels received in the window.
    pub feedback: Vec<Feedback>,
}

pub(super) fn json_len<T: Serialize>(value: &T) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |v| v.len())
}

impl TelemetryBatch {
    /// Splits the batch into batches of the same node and window whose JSON encoding is at
    /// most `limit` bytes each (a hub refuses larger ones, [`MAX_BATCH_BYTES`], and a batch
    /// refused for its size would be retried forever). A model version's window that does
    /// not fit on its own is cut between its predictions: the first part keeps its counts,
    /// histograms and classes, the others carry only predictions (zero requests). Feedback
    /// is cut the same way. The parts' `seq` is left to the caller. Nothing is dropped unless
    /// one prediction or feedback item is alone over the limit (impossible for the limits
    /// of this module: ids and labels are cut to [`MAX_LABEL_CHARS`]).
    pub fn split_to_fit(self, limit: usize) -> Vec<TelemetryBatch> {
        if json_len(&self) <= limit {
            return vec![self];
        }
        let empty = TelemetryBatch {
            models: Vec::new(),
            feedback: Vec::new(),
            ..self.clone()
        };
        let base = json_len(&empty);
        // Pieces no larger than the room one batch has, each a model window or feedback.
        let room = limit.saturating_sub(base + 2);
        let mut models = Vec::new();
        for mut m in self.models {
            if json_len(&m) <= room {
                models.push(m);
                continue;
            }
            let predictions = std::mem::take(&mut m.predictions);
            let mut part = m;
            let mut used = json_len(&part);
            for p in predictions {
                let n = json_len(&p) + 1;
                if !part.predictions.is_empty() && used + n > room {
                    let next = ModelWindow {
                        model: part.model.clone(),
                        version: part.version.clone(),
                        ..ModelWindow::default()
                    };
                    models.push(std::mem::replace(&mut part, next));
                    used = json_len(&part);
                }
                used += n;
                part.predictions.push(p);
            }
            models.push(part);
        }
        let mut feedback_parts: Vec<Vec<Feedback>> = vec![Vec::new()];
        let mut used = 2;
        for f in self.feedback {
            let n = json_len(&f) + 1;
            if used + n > room
                && let Some(last) = feedback_parts.last()
                && !last.is_empty()
            {
                feedback_parts.push(Vec::new());
                used = 2;
            }
            used += n;
            if let Some(last) = feedback_parts.last_mut() {
                last.push(f);
            }
        }
        // Greedy packing, in order.
        let mut out: Vec<TelemetryBatch> = Vec::new();
        let mut current = empty.clone();
        let mut used = base;
        for m in models {
            let n = json_len(&m) + 1;
            if !current.models.is_empty() && used + n > limit {
                out.push(std::mem::replace(&mut current, empty.clone()));
                used = base;
            }
            used += n;
            current.models.push(m);
        }
        for f in feedback_parts.into_iter().filter(|f| !f.is_empty()) {
            let n = json_len(&f);
            if !(current.models.is_empty() && current.feedback.is_empty()) && used + n > limit {
                out.push(std::mem::replace(&mut current, empty.clone()));
                used = base;
            }
            used += n;
            current.feedback.extend(f);
        }
        if !(current.models.is_empty() && current.feedback.is_empty()) {
            out.push(current);
        }
        out
    }

    /// Requests in the batch.
    pub fn requests(&self) -> u64 {
        self.models.iter().map(|m| m.requests).sum()
    }

    /// Checks the bounds a decoder cannot.
    pub fn validate(&self) -> Result<()> {
        let long = |s: &str| s.chars().count() > MAX_LABEL_CHARS;
        if self.seq == 0 || self.window_end_ms < self.window_start_ms {
            return Err(invalid(format!(
                "batch {}: bad sequence or window",
                self.seq
            )));
        }
        if self.feedback.len() > MAX_FEEDBACK
            || self.feedback.iter().any(|f| long(&f.id) || long(&f.label))
        {
            return Err(invalid(format!("batch {}: too much feedback", self.seq)));
        }
        if self.models.len() > MAX_MODELS {
            return Err(invalid(format!(
                "batch {}: {} model versions, over {MAX_MODELS}",
                self.seq,
                self.models.len()
            )));
        }
        for m in &self.models {
            if m.predictions.len() > MAX_PREDICTIONS
                || m.classes.len() > MAX_CLASSES + 1
                || m.features.len() > MAX_FEATURES
                || m.features
                    .iter()
                    .any(|f| f.counts.len() > MAX_CATEGORIES.max(MAX_BINS) + 1)
                || m.latency.counts.len() != LATENCY_BOUNDS_MS.len() + 1
            {
                return Err(invalid(format!(
                    "batch {}: model {} {} is out of bounds",
                    self.seq, m.model, m.version
                )));
            }
        }
        Ok(())
    }
}

/// Cuts a request id, class or label to [`MAX_LABEL_CHARS`].
pub fn cut(s: &str) -> String {
    s.chars().take(MAX_LABEL_CHARS).collect()
}

/// The id a prediction is kept under: the request id for a one-row request, `id/i` for
/// row `i` of a larger one. Feedback names predictions the same way.
pub fn prediction_id(request_id: &str, row: usize, rows: usize) -> String {
    if rows <= 1 {
        cut(request_id)
    } else {
        cut(&format!("{request_id}/{row}"))
    }
}

/// The predicted class of each row, from the first output: a `BYTES` output is the class
/// itself (a label), an integer output a class index (named by `labels` when it has one),
/// and a floating-point output of rank 2 or more a score per class (its argmax). Other
/// outputs (a regression, an embedding of rank 1) give no class.
pub fn classes(outputs: &[NamedTensor], labels: &[String]) -> Vec<String> {
    let Some(first) = outputs.first() else {
        return Vec::new();
    };
    let t = &first.tensor;
    let name = |i: i64| -> String {
        usize::try_from(i)
            .ok()
            .and_then(|i| labels.get(i))
            .cloned()
            .unwrap_or_else(|| i.to_string())
    };
    // Values per row: the last dimension of a rank-2+ output, else one.
    let width = if t.shape.len() >= 2 {
        t.shape
            .last()
            .and_then(|w| usize::try_from(*w).ok())
            .unwrap_or(1)
            .max(1)
    } else {
        1
    };
    match t.dtype {
        DType::Bytes => {
            let Ok(elements) = byte_elements(&t.data) else {
                return Vec::new();
            };
            // A [N, k] label output (top-k) gives each row its first label.
            elements
                .chunks(width)
                .filter_map(|row| row.first())
                .map(|e| cut(&String::from_utf8_lossy(e)))
                .collect()
        }
        DType::F16 | DType::F32 | DType::F64 => {
            let Ok(values) = t.to_f64_vec() else {
                return Vec::new();
            };
            // Scores need a row of at least two classes.
            if t.shape.len() < 2 || width < 2 {
                return Vec::new();
            }
            values
                .chunks(width)
                .map(|row| {
                    let best = row
                        .iter()
                        .enumerate()
                        .fold((0usize, f64::NEG_INFINITY), |best, (i, &v)| {
                            if v > best.1 { (i, v) } else { best }
                        })
                        .0;
                    name(i64::try_from(best).unwrap_or(0))
                })
                .collect()
        }
        _ => {
            let Ok(values) = t.to_f64_vec() else {
                return Vec::new();
            };
            values
                .chunks(width)
                .filter_map(|row| row.first())
                .map(|v| name(*v as i64))
                .collect()
        }
    }
}
