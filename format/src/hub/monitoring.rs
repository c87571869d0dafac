//! The monitoring's messages: telemetry totals and windows, alerts, notifications and the
//! retraining report.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::UnknownName;

use crate::telemetry::{FeatureDrift, FeatureHistogram};

named_enum! {
    /// An alert rule of the hub's monitoring.
    AlertRule {
        /// A feature's live distribution moved away from training (PSI or KS).
        Drift = "drift",
        /// The error-rate SLO.
        Errors = "errors",
        /// The p99 latency SLO.
        Latency = "latency",
        /// Live accuracy from feedback labels.
        Accuracy = "accuracy",
    }
}

named_enum! {
    /// Where an alert is.
    AlertState {
        /// Its rule is breached in the last window evaluated.
        Firing = "firing",
        /// It fired, and its rule holds again.
        Resolved = "resolved",
    }
}

/// An alert and its state (`GET /api/v1/alerts`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// `rule|model|version|group|feature`.
    pub key: String,
    /// Its rule.
    pub rule: AlertRule,
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// Node group (`all` for accuracy).
    pub group: String,
    /// Feature (drift only).
    pub feature: String,
    /// Where it is.
    pub state: AlertState,
    /// The measured value (PSI, error rate, p99 ms, accuracy).
    pub value: f64,
    /// The threshold it was compared with.
    pub threshold: f64,
    /// The window evaluated (ms).
    pub window_start_ms: i64,
    /// Its end.
    pub window_end_ms: i64,
    /// When it started firing (ms).
    pub started_at_ms: i64,
    /// Last change (ms).
    pub updated_at_ms: i64,
}

/// Live accuracy of one model version from its labeled predictions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    /// Predictions with a label.
    pub labeled: u64,
    /// Of which the model got right.
    pub correct: u64,
    /// `correct / labeled` (none before the first label).
    #[serde(default)]
    pub value: Option<f64>,
}

impl Accuracy {
    /// The accuracy of `correct` right answers among `labeled`.
    pub fn new(labeled: u64, correct: u64) -> Accuracy {
        Accuracy {
            labeled,
            correct,
            value: (labeled > 0).then(|| correct as f64 / labeled as f64),
        }
    }
}

/// Totals of one model version.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VersionTotals {
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Rows.
    pub rows: u64,
    /// Feedback accuracy.
    pub accuracy: Accuracy,
}

/// What the hub has received from one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeTotals {
    /// Requests.
    pub requests: u64,
    /// Batches stored.
    pub batches: u64,
    /// Batches the node reported dropped from its full buffer.
    pub dropped_batches: u64,
    /// Requests in them.
    pub dropped_requests: u64,
}

/// `GET /api/v1/telemetry/summary`: totals per model version and per node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Per model version.
    pub versions: Vec<VersionTotals>,
    /// Per node.
    pub nodes: BTreeMap<String, NodeTotals>,
}

/// One model version in one window (all groups, or one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowPoint {
    /// Window start (ms).
    pub start_ms: i64,
    /// Window end (ms).
    pub end_ms: i64,
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Rows.
    pub rows: u64,
    /// Median latency (ms).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency (ms).
    pub p99_ms: Option<f64>,
    /// Drift per feature.
    pub drift: Vec<FeatureDrift>,
    /// Live histograms per feature.
    pub features: Vec<FeatureHistogram>,
    /// Predicted classes.
    pub classes: BTreeMap<String, u64>,
}

/// `GET /api/v1/telemetry/windows?model=M`: the last windows of a model, per version.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Windows {
    /// Model.
    pub model: String,
    /// Window length (ms).
    pub window_ms: u64,
    /// Version to its windows, oldest first.
    pub versions: BTreeMap<String, Vec<WindowPoint>>,
}

named_enum! {
    /// What a notification says.
    EventKind {
        /// An alert started firing.
        Firing = "firing",
        /// An alert resolved.
        Resolved = "resolved",
        /// Retraining was triggered (the body is the report).
        Retrain = "retrain",
        /// The retraining command finished (the delivery is its exit status).
        RetrainCommand = "retrain.command",
    }
}

/// The drift of one feature in one node group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupDrift {
    /// The node group.
    pub group: String,
    /// The feature's drift there.
    #[serde(flatten)]
    pub drift: FeatureDrift,
}

/// Why the hub triggers retraining of a model version: written to a file handed to the
/// retraining command, and POSTed to the retraining webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrainReport {
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// The window evaluated (ms).
    pub window_start_ms: i64,
    /// Its end.
    pub window_end_ms: i64,
    /// The alerts that started firing.
    pub reasons: Vec<Alert>,
    /// The drifting features, per group.
    pub drift: Vec<GroupDrift>,
    /// The version's live accuracy.
    pub accuracy: Accuracy,
}

/// The retraining command the hub ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetrainCommand {
    /// Its program.
    pub command: String,
}

/// What a notification carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NotificationBody {
    /// An alert that changed state.
    Alert(Alert),
    /// Retraining triggered.
    Retrain(RetrainReport),
    /// The retraining command started.
    Command(RetrainCommand),
}

/// A notification: the body POSTed to webhooks, and kept in the hub's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    /// What it says.
    pub status: EventKind,
    /// What it is about.
    #[serde(flatten)]
    pub body: NotificationBody,
}

/// A notification the hub sent, and how its delivery went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// When (microseconds since the Unix epoch).
    pub at_us: i64,
    /// The alert's key (`retrain|model|version` for retraining).
    pub alert: String,
    /// What it says.
    pub kind: EventKind,
    /// The notification (none if an older hub stored one this one cannot read).
    pub body: Option<Notification>,
    /// `no webhook`, `pending`, each webhook's outcome, or the command's exit status.
    pub delivery: String,
}

/// `GET /api/v1/alerts`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertList {
    /// Firing alerts first, then by last change.
    pub alerts: Vec<Alert>,
    /// The last notifications, newest first.
    pub events: Vec<AlertEvent>,
    /// Windows ending at or before this (ms) are evaluated.
    pub evaluated_until_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_is_none_before_the_first_label() {
        assert_eq!(Accuracy::default().value, None);
        assert_eq!(Accuracy::new(8, 6).value, Some(0.75));
    }

    #[test]
    fn notifications_read_back_as_what_was_sent() {
        let alert = Alert {
            key: "drift|m|1|eu|x".into(),
            rule: AlertRule::Drift,
            model: "m".into(),
            version: "1".into(),
            group: "eu".into(),
            feature: "x".into(),
            state: AlertState::Firing,
            value: 0.4,
            threshold: 0.2,
            window_start_ms: 0,
            window_end_ms: 60_000,
            started_at_ms: 60_100,
            updated_at_ms: 60_100,
        };
        let drift = FeatureDrift {
            feature: "x".into(),
            psi: 0.4,
            ks: Some(0.3),
            count: 100,
            missing: 0,
            mean: Some(2.0),
            reference_mean: Some(1.0),
        };
        let sent = [
            Notification {
                status: EventKind::Firing,
                body: NotificationBody::Alert(alert.clone()),
            },
            Notification {
                status: EventKind::Retrain,
                body: NotificationBody::Retrain(RetrainReport {
                    model: "m".into(),
                    version: "1".into(),
                    window_start_ms: 0,
                    window_end_ms: 60_000,
                    reasons: vec![alert],
                    drift: vec![GroupDrift {
                        group: "eu".into(),
                        drift,
                    }],
                    accuracy: Accuracy::new(4, 3),
                }),
            },
            Notification {
                status: EventKind::RetrainCommand,
                body: NotificationBody::Command(RetrainCommand {
                    command: "retrain.sh".into(),
                }),
            },
        ];
        for n in sent {
            let text = serde_json::to_string(&n).unwrap();
            assert!(
                text.contains(&format!("\"status\":\"{}\"", n.status)),
                "{text}"
            );
            assert_eq!(serde_json::from_str::<Notification>(&text).unwrap(), n);
        }
        // The drift of a group is flat, as retraining scripts read it.
        let g: serde_json::Value = serde_json::to_value(GroupDrift {
            group: "eu".into(),
            drift: FeatureDrift {
                feature: "x".into(),
                psi: 0.1,
                ks: None,
                count: 1,
                missing: 0,
                mean: None,
                reference_mean: None,
            },
        })
        .unwrap();
        assert_eq!(g["group"], "eu");
        assert_eq!(g["feature"], "x");
    }
}
