//! Prometheus metrics of the hub (`GET /metrics`, text exposition format).

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::Result;

/// Every metric the hub exports.
#[derive(Debug, Clone)]
pub(crate) struct HubMetrics {
    registry: Registry,
    pub(crate) http_requests: IntCounterVec,
    pub(crate) http_seconds: HistogramVec,
    pub(crate) nodes: IntGaugeVec,
    pub(crate) node_models: IntGaugeVec,
    pub(crate) long_polls: IntGauge,
    pub(crate) telemetry_batches: IntCounterVec,
    pub(crate) telemetry_dropped: IntGauge,
    pub(crate) fleet_requests: IntCounterVec,
    pub(crate) fleet_errors: IntCounterVec,
    pub(crate) drift_psi: GaugeVec,
    pub(crate) drift_ks: GaugeVec,
    pub(crate) accuracy: GaugeVec,
    pub(crate) alerts_firing: IntGaugeVec,
    pub(crate) webhook_deliveries: IntCounterVec,
    pub(crate) retrain_triggers: IntCounterVec,
    pub(crate) rollouts: IntGaugeVec,
    pub(crate) blob_downloads: IntCounterVec,
}

fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> Result<C> {
    r.register(Box::new(c.clone()))?;
    Ok(c)
}

impl HubMetrics {
    pub(crate) fn new() -> Result<HubMetrics> {
        let r = Registry::new();
        #[cfg(target_os = "linux")]
        r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntCounterVec::new(Opts::new(name, help), labels)?)
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, IntGaugeVec::new(Opts::new(name, help), labels)?)
        };
        let fgauge = |name: &str, help: &str, labels: &[&str]| {
            reg(&r, GaugeVec::new(Opts::new(name, help), labels)?)
        };
        let drift_labels = &["model", "version", "group", "feature"];
        Ok(HubMetrics {
            http_requests: counter(
                "capsule_hub_http_requests_total",
                "API requests by route, method and status.",
                &["route", "method", "status"],
            )?,
            blob_downloads: counter(
                "capsule_hub_blob_downloads_total",
                "Blob downloads (GET, resumed ones included) by kind: capsule (single file), image (model image), code (guest code module).",
                &["kind"],
            )?,
            http_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "capsule_hub_http_request_seconds",
                        "API request time by route (long polls wait on purpose).",
                    )
                    .buckets(vec![
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0,
                    ]),
                    &["route"],
                )
                ?,
            )?,
            nodes: gauge("capsule_hub_nodes", "Registered nodes by state (online, offline).", &["state"])?,
            node_models: gauge(
                "capsule_hub_node_models",
                "Nodes per model version and reported state (serving, failed, ...).",
                &["model", "version", "state"],
            )?,
            long_polls: reg(
                &r,
                IntGauge::new("capsule_hub_long_polls", "Node long-polls waiting now.")?,
            )?,
            telemetry_batches: counter(
                "capsule_hub_telemetry_batches_total",
                "Telemetry batches received: stored, or duplicate (a retry, acknowledged again).",
                &["result"],
            )?,
            telemetry_dropped: reg(
                &r,
                IntGauge::new(
                    "capsule_hub_telemetry_dropped_batches",
                    "Telemetry batches the nodes dropped from their full buffers (sum of their reports).",
                )
                ?,
            )?,
            fleet_requests: counter(
                "capsule_hub_fleet_requests_total",
                "Inference requests reported by the fleet's telemetry.",
                &["model", "version"],
            )?,
            fleet_errors: counter(
                "capsule_hub_fleet_errors_total",
                "Failed inference requests reported by the fleet's telemetry.",
                &["model", "version"],
            )?,
            drift_psi: fgauge(
                "capsule_hub_drift_psi",
                "Population stability index of a feature in the last evaluated window.",
                drift_labels,
            )?,
            drift_ks: fgauge(
                "capsule_hub_drift_ks",
                "Kolmogorov-Smirnov statistic (binned) of a feature in the last evaluated window.",
                drift_labels,
            )?,
            accuracy: fgauge(
                "capsule_hub_accuracy",
                "Live accuracy of a model version from feedback labels.",
                &["model", "version"],
            )?,
            alerts_firing: gauge("capsule_hub_alerts_firing", "Alerts firing now, by rule.", &["rule"])?,
            webhook_deliveries: counter(
                "capsule_hub_webhook_deliveries_total",
                "Webhook deliveries by outcome (delivered, failed).",
                &["outcome"],
            )?,
            retrain_triggers: counter(
                "capsule_hub_retrain_triggers_total",
                "Retraining triggers by model.",
                &["model"],
            )?,
            rollouts: gauge("capsule_hub_rollouts", "Rollouts by state.", &["state"])?,
            registry: r,
        }
        .init())
    }

    /// Creates the counters' label sets known in advance, so they read 0 before their first
    /// event.
    fn init(self) -> HubMetrics {
        for r in ["stored", "duplicate"] {
            let _ = self.telemetry_batches.with_label_values(&[r]);
        }
        for o in ["delivered", "failed"] {
            let _ = self.webhook_deliveries.with_label_values(&[o]);
        }
        for rule in capsule_format::hub::AlertRule::ALL {
            let _ = self.alerts_firing.with_label_values(&[rule.as_str()]);
        }
        self
    }

    /// The text exposition.
    pub(crate) fn encode(&self) -> Result<String> {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out)?;
        // The text format is UTF-8 by construction.
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// The labels of a model version reported by a node: its own when the hub has it registered,
/// else `("", "")`. Nodes name models and versions in reports and telemetry, and a series per
/// made-up name would be kept forever; the node's own metrics use the same rule.
pub(crate) fn version_labels<'a>(
    registered: &std::collections::HashSet<(String, String)>,
    model: &'a str,
    version: &'a str,
) -> [&'a str; 2] {
    if registered.contains(&(model.to_owned(), version.to_owned())) {
        [model, version]
    } else {
        ["", ""]
    }
}
