//! Prometheus metrics of the node (text exposition format at `/metrics`).

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::{Error, Result};

/// Latency buckets in seconds: 50 us to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Every metric the node exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests by model, version, protocol and outcome.
    pub requests: IntCounterVec,
    /// Time spent waiting for an instance.
    pub queue_seconds: HistogramVec,
    /// Time spent running in the guest.
    pub compute_seconds: HistogramVec,
    /// Whole request time as the protocol handler saw it.
    pub request_seconds: HistogramVec,
    /// Requests waiting for an instance now.
    pub queue_depth: IntGaugeVec,
    /// Requests running now.
    pub in_flight: IntGaugeVec,
    /// Live guest instances (idle and busy).
    pub instances: IntGaugeVec,
    /// Idle warm instances.
    pub idle_instances: IntGaugeVec,
    /// Inferences that returned outputs.
    pub inferences: IntCounterVec,
    /// Guest linear memory held by live instances.
    pub guest_memory: IntGaugeVec,
    /// Calls that trapped (each discarded its instance).
    pub traps: IntCounterVec,
    /// Repository changes applied or refused, by outcome.
    pub swaps: IntCounterVec,
    /// Model versions being served.
    pub versions_loaded: IntGauge,
    /// Telemetry batches waiting in the buffer.
    pub telemetry_buffered_batches: IntGauge,
    /// Bytes of telemetry waiting in the buffer.
    pub telemetry_buffered_bytes: IntGauge,
    /// Telemetry batches dropped from the full buffer (oldest first), since the buffer began.
    pub telemetry_dropped_batches: IntCounter,
    /// Requests in those batches.
    pub telemetry_dropped_requests: IntCounter,
    /// Telemetry batches the hub acknowledged.
    pub telemetry_shipped_batches: IntCounter,
    /// Failed shipments (the batches stay buffered).
    pub telemetry_ship_failures: IntCounter,
    /// Batches the hub refused as malformed or too large, set aside instead of retried.
    pub telemetry_quarantined_batches: IntCounter,
    /// Feedback labels accepted, by model.
    pub feedback: IntCounterVec,
}

fn single_counter(registry: &Registry, name: &str, help: &str) -> Result<IntCounter> {
    let c = IntCounter::new(name, help).map_err(metrics_error)?;
    registry
        .register(Box::new(c.clone()))
        .map_err(metrics_error)?;
    Ok(c)
}

fn single_gauge(registry: &Registry, name: &str, help: &str) -> Result<IntGauge> {
    let g = IntGauge::new(name, help).map_err(metrics_error)?;
    registry
        .register(Box::new(g.clone()))
        .map_err(metrics_error)?;
    Ok(g)
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec> {
    let c = IntCounterVec::new(Opts::new(name, help), labels).map_err(metrics_error)?;
    registry
        .register(Box::new(c.clone()))
        .map_err(metrics_error)?;
    Ok(c)
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntGaugeVec> {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).map_err(metrics_error)?;
    registry
        .register(Box::new(g.clone()))
        .map_err(metrics_error)?;
    Ok(g)
}

fn histogram(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<HistogramVec> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .map_err(metrics_error)?;
    registry
        .register(Box::new(h.clone()))
        .map_err(metrics_error)?;
    Ok(h)
}

fn metrics_error(e: prometheus::Error) -> Error {
    Error::Config(format!("metrics: {e}"))
}

const MV: &[&str] = &["model", "version"];

impl Metrics {
    /// Creates and registers every metric (and the process collector on Linux).
    pub fn new() -> Result<Metrics> {
        let registry = Registry::new();
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .map_err(metrics_error)?;
        let r = &registry;
        let versions_loaded = single_gauge(
            r,
            "capsule_model_versions_loaded",
            "Model versions being served.",
        )?;
        Ok(Metrics {
            requests: counter(
                r,
                "capsule_requests_total",
                "Inference requests by model, version, protocol and outcome.",
                &["model", "version", "protocol", "outcome"],
            )?,
            queue_seconds: histogram(
                r,
                "capsule_queue_seconds",
                "Time a request waited for a free instance.",
                MV,
            )?,
            compute_seconds: histogram(
                r,
                "capsule_compute_seconds",
                "Time a request ran in the guest (validation, copy in, inference, copy out).",
                MV,
            )?,
            request_seconds: histogram(
                r,
                "capsule_request_seconds",
                "Whole inference request time in the protocol handler (decode to encode).",
                &["protocol"],
            )?,
            queue_depth: gauge(
                r,
                "capsule_queue_depth",
                "Requests waiting for an instance.",
                MV,
            )?,
            in_flight: gauge(
                r,
                "capsule_in_flight",
                "Requests running in a guest now.",
                MV,
            )?,
            instances: gauge(
                r,
                "capsule_instances",
                "Live guest instances (idle and busy).",
                MV,
            )?,
            idle_instances: gauge(
                r,
                "capsule_idle_instances",
                "Idle warm guest instances.",
                MV,
            )?,
            inferences: counter(
                r,
                "capsule_inferences_total",
                "Inferences that returned outputs.",
                MV,
            )?,
            guest_memory: gauge(
                r,
                "capsule_guest_memory_bytes",
                "Guest linear memory held by live instances.",
                MV,
            )?,
            traps: counter(
                r,
                "capsule_traps_total",
                "Guest calls that trapped (each discarded its instance).",
                MV,
            )?,
            swaps: counter(
                r,
                "capsule_swaps_total",
                "Repository changes by outcome: loaded, unloaded, load_failed, probe_failed.",
                &["model", "outcome"],
            )?,
            versions_loaded,
            telemetry_buffered_batches: single_gauge(
                r,
                "capsule_telemetry_buffered_batches",
                "Telemetry batches waiting in the local buffer for the hub.",
            )?,
            telemetry_buffered_bytes: single_gauge(
                r,
                "capsule_telemetry_buffered_bytes",
                "Bytes of telemetry waiting in the local buffer.",
            )?,
            telemetry_dropped_batches: single_counter(
                r,
                "capsule_telemetry_dropped_batches_total",
                "Telemetry batches dropped from the full buffer (oldest first).",
            )?,
            telemetry_dropped_requests: single_counter(
                r,
                "capsule_telemetry_dropped_requests_total",
                "Requests in the dropped telemetry batches.",
            )?,
            telemetry_shipped_batches: single_counter(
                r,
                "capsule_telemetry_shipped_batches_total",
                "Telemetry batches acknowledged by the hub.",
            )?,
            telemetry_ship_failures: single_counter(
                r,
                "capsule_telemetry_ship_failures_total",
                "Telemetry shipments that failed (the batches stay buffered).",
            )?,
            telemetry_quarantined_batches: single_counter(
                r,
                "capsule_telemetry_quarantined_batches_total",
                "Telemetry batches the hub refused on their own (malformed or too large): moved to the buffer's quarantine directory, not retried.",
            )?,
            feedback: counter(
                r,
                "capsule_feedback_total",
                "Ground-truth labels accepted by POST /v2/models/{m}/feedback.",
                &["model"],
            )?,
            registry,
        })
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Result<String> {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .map_err(metrics_error)?;
        String::from_utf8(out).map_err(|e| Error::Config(format!("metrics: {e}")))
    }

    /// Counts one inference request and its whole time, by outcome. `labels` is the model
    /// and the version that served it (or was asked for).
    pub fn observe_request<T>(
        &self,
        labels: &(String, String),
        protocol: &str,
        result: &Result<T>,
        started: std::time::Instant,
    ) {
        let outcome = match result {
            Ok(_) => "success",
            Err(e) => e.outcome(),
        };
        // Names a client made up get no series of their own: a request for an unknown model
        // counts under model "", one for a version the node does not serve under version "".
        // Otherwise every made-up name would be a new series, kept forever.
        let (model, version) = match result {
            Err(Error::ModelNotFound(_)) => ("", ""),
            Err(Error::VersionNotFound { .. } | Error::NotReady { .. }) => (labels.0.as_str(), ""),
            _ => (labels.0.as_str(), labels.1.as_str()),
        };
        self.requests
            .with_label_values(&[model, version, protocol, outcome])
            .inc();
        self.request_seconds
            .with_label_values(&[protocol])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Drops the per-version gauges of an unloaded version (counters stay).
    pub fn forget_version(&self, model: &str, version: &str) {
        for g in [
            &self.queue_depth,
            &self.in_flight,
            &self.instances,
            &self.idle_instances,
            &self.guest_memory,
        ] {
            let _ = g.remove_label_values(&[model, version]);
        }
    }
}
