//! The alert rules and an alert's life: pure functions of what a window measured, the
//! rule's settings and the alert as it was, with the time passed in. `monitor` measures the
//! windows and stores what these decide.
//!
//! An alert is keyed by rule, model, version, node group and feature. A breach makes it
//! `firing` (notified once, when it starts); a window that holds again makes a firing alert
//! `resolved` (notified); a window that holds for an alert that is not firing records
//! nothing. A window evaluated late never overrides the verdict of a later window.

use capsule_format::hub::{Alert, AlertRule, AlertState};
use capsule_format::telemetry::FeatureDrift;
use serde::{Deserialize, Serialize};

/// The drift rule: a feature drifts in a window when its PSI or its KS statistic reaches
/// the threshold, over at least `min_count` values.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DriftRule {
    /// Evaluate drift.
    pub enabled: bool,
    /// PSI threshold (0.1: moderate shift, 0.2: significant, by the usual convention).
    pub psi: f64,
    /// KS statistic threshold (binned; numeric features).
    pub ks: f64,
    /// Fewest live values in a window for a verdict.
    pub min_count: u64,
}

impl Default for DriftRule {
    fn default() -> Self {
        DriftRule {
            enabled: true,
            psi: 0.2,
            ks: 0.3,
            min_count: 100,
        }
    }
}

/// The error-rate SLO.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ErrorRule {
    /// Evaluate it.
    pub enabled: bool,
    /// Failed / all requests in a window at or above which it fires.
    pub rate: f64,
    /// Fewest requests in a window for a verdict.
    pub min_requests: u64,
}

impl Default for ErrorRule {
    fn default() -> Self {
        ErrorRule {
            enabled: true,
            rate: 0.05,
            min_requests: 20,
        }
    }
}

/// The latency SLO (off unless `p99_ms` is set).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LatencyRule {
    /// 99th percentile request latency (ms) at or above which it fires.
    pub p99_ms: Option<f64>,
    /// Fewest requests in a window for a verdict.
    pub min_requests: u64,
}

impl Default for LatencyRule {
    fn default() -> Self {
        LatencyRule {
            p99_ms: None,
            min_requests: 20,
        }
    }
}

/// The accuracy rule (off unless `below` is set): live accuracy of a version from all its
/// feedback labels so far.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccuracyRule {
    /// Accuracy below which it fires.
    pub below: Option<f64>,
    /// Fewest labeled predictions for a verdict.
    pub min_labels: u64,
}

impl Default for AccuracyRule {
    fn default() -> Self {
        AccuracyRule {
            below: None,
            min_labels: 20,
        }
    }
}

/// One rule's verdict in one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// The rule.
    pub rule: AlertRule,
    /// Model.
    pub model: String,
    /// Version.
    pub version: String,
    /// Node group.
    pub group: String,
    /// Feature (drift only).
    pub feature: String,
    /// What was measured.
    pub value: f64,
    /// What it was compared with.
    pub threshold: f64,
    /// Whether the rule is breached.
    pub breach: bool,
}

impl Finding {
    /// The key of its alert: `rule|model|version|group|feature`.
    pub fn key(&self) -> String {
        format!(
            "{}|{}|{}|{}|{}",
            self.rule, self.model, self.version, self.group, self.feature
        )
    }
}

/// A rule's measurement: (value, threshold, breached).
pub type Measure = (f64, f64, bool);

/// The error-rate SLO over a window's requests and failures; none when off or with too
/// few requests.
pub fn errors(rule: &ErrorRule, requests: u64, failed: u64) -> Option<Measure> {
    if !rule.enabled || requests == 0 || requests < rule.min_requests {
        return None;
    }
    let rate = failed as f64 / requests as f64;
    Some((rate, rule.rate, rate >= rule.rate))
}

/// The latency SLO over a window's p99; none when off, without a p99 or with too few
/// requests.
pub fn latency(rule: &LatencyRule, requests: u64, p99_ms: Option<f64>) -> Option<Measure> {
    let (limit, p99) = (rule.p99_ms?, p99_ms?);
    (requests >= rule.min_requests).then_some((p99, limit, p99 >= limit))
}

/// Drift of one feature (PSI, or KS when the feature has it); none when off or over too
/// few values.
pub fn drift(rule: &DriftRule, d: &FeatureDrift) -> Option<Measure> {
    if !rule.enabled || d.count < rule.min_count {
        return None;
    }
    let breach = d.psi >= rule.psi || d.ks.is_some_and(|k| k >= rule.ks);
    Some((d.psi, rule.psi, breach))
}

/// Live accuracy of a version from `labeled` predictions of which `correct` were right;
/// none when off or with too few labels.
pub fn accuracy(rule: &AccuracyRule, labeled: u64, correct: u64) -> Option<Measure> {
    let below = rule.below?;
    if labeled == 0 || labeled < rule.min_labels {
        return None;
    }
    let value = correct as f64 / labeled as f64;
    Some((value, below, value < below))
}

/// What a finding does to its alert.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    /// The alert to store.
    pub alert: Alert,
    /// Whether it changed state (fired or resolved): notify, and maybe retrain.
    pub changed: bool,
}

/// What finding `f` of window `[window_start, window_end)` does to its alert, as it was
/// (`before`), at `now` (ms): none when a later window already decided it or when nothing
/// fires or resolves.
pub fn transition(
    before: Option<&Alert>,
    f: &Finding,
    window_start: i64,
    window_end: i64,
    now: i64,
) -> Option<Transition> {
    if before.is_some_and(|a| a.window_start_ms > window_start) {
        return None; // a later window already decided (this one was re-evaluated late)
    }
    let firing = before.filter(|a| a.state == AlertState::Firing);
    let state = match (firing.is_some(), f.breach) {
        (_, true) => AlertState::Firing,
        (true, false) => AlertState::Resolved,
        (false, false) => return None,
    };
    Some(Transition {
        alert: Alert {
            key: f.key(),
            rule: f.rule,
            model: f.model.clone(),
            version: f.version.clone(),
            group: f.group.clone(),
            feature: f.feature.clone(),
            state,
            value: f.value,
            threshold: f.threshold,
            window_start_ms: window_start,
            window_end_ms: window_end,
            started_at_ms: firing.map_or(now, |a| a.started_at_ms),
            updated_at_ms: now,
        },
        changed: firing.is_some() != f.breach,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_rule() {
        let on = ErrorRule::default(); // 5%, 20 requests
        let cases = [
            (0, 0, None),
            (19, 19, None),
            (20, 0, Some((0.0, 0.05, false))),
            (100, 4, Some((0.04, 0.05, false))),
            (100, 5, Some((0.05, 0.05, true))),
        ];
        for (requests, failed, want) in cases {
            assert_eq!(errors(&on, requests, failed), want, "{requests} {failed}");
        }
        let off = ErrorRule {
            enabled: false,
            ..on
        };
        assert_eq!(errors(&off, 100, 100), None);
        let any = ErrorRule {
            min_requests: 0,
            ..ErrorRule::default()
        };
        assert_eq!(errors(&any, 0, 0), None, "no requests, no rate");
    }

    #[test]
    fn latency_rule() {
        let on = LatencyRule {
            p99_ms: Some(50.0),
            min_requests: 20,
        };
        let cases = [
            (100, None, None),
            (19, Some(80.0), None),
            (20, Some(49.9), Some((49.9, 50.0, false))),
            (20, Some(50.0), Some((50.0, 50.0, true))),
        ];
        for (requests, p99, want) in cases {
            assert_eq!(latency(&on, requests, p99), want, "{requests} {p99:?}");
        }
        assert_eq!(
            latency(&LatencyRule::default(), 1_000, Some(1e9)),
            None,
            "off by default"
        );
    }

    #[test]
    fn drift_rule() {
        let d = |psi, ks, count| FeatureDrift {
            feature: "f".into(),
            psi,
            ks,
            count,
            missing: 0,
            mean: None,
            reference_mean: None,
        };
        let on = DriftRule::default(); // psi 0.2, ks 0.3, 100 values
        let cases = [
            (d(0.9, None, 99), None),
            (d(0.1, None, 100), Some((0.1, 0.2, false))),
            (d(0.2, None, 100), Some((0.2, 0.2, true))),
            (d(0.1, Some(0.29), 100), Some((0.1, 0.2, false))),
            (d(0.1, Some(0.3), 100), Some((0.1, 0.2, true))),
        ];
        for (live, want) in cases {
            assert_eq!(drift(&on, &live), want, "{live:?}");
        }
        let off = DriftRule {
            enabled: false,
            ..on
        };
        assert_eq!(drift(&off, &d(5.0, None, 1_000)), None);
    }

    #[test]
    fn accuracy_rule() {
        let on = AccuracyRule {
            below: Some(0.8),
            min_labels: 20,
        };
        let cases = [
            (19, 0, None),
            (20, 16, Some((0.8, 0.8, false))),
            (20, 15, Some((0.75, 0.8, true))),
        ];
        for (labeled, correct, want) in cases {
            assert_eq!(accuracy(&on, labeled, correct), want, "{labeled} {correct}");
        }
        assert_eq!(
            accuracy(&AccuracyRule::default(), 100, 0),
            None,
            "off by default"
        );
        let any = AccuracyRule {
            below: Some(0.5),
            min_labels: 0,
        };
        assert_eq!(accuracy(&any, 0, 0), None, "no labels, no accuracy");
    }

    fn finding(breach: bool) -> Finding {
        Finding {
            rule: AlertRule::Drift,
            model: "wine".into(),
            version: "1.0.0".into(),
            group: "eu".into(),
            feature: "alcohol".into(),
            value: 0.5,
            threshold: 0.2,
            breach,
        }
    }

    fn alert(state: AlertState, window_start_ms: i64, started_at_ms: i64) -> Alert {
        Alert {
            key: finding(true).key(),
            rule: AlertRule::Drift,
            model: "wine".into(),
            version: "1.0.0".into(),
            group: "eu".into(),
            feature: "alcohol".into(),
            state,
            value: 0.4,
            threshold: 0.2,
            window_start_ms,
            window_end_ms: window_start_ms + 60,
            started_at_ms,
            updated_at_ms: started_at_ms,
        }
    }

    #[test]
    fn an_alerts_life() {
        use AlertState::*;
        // (before, breach, window start) -> (state, started at, changed), or nothing
        type Case = (Option<Alert>, bool, i64, Option<(AlertState, i64, bool)>);
        let cases: &[Case] = &[
            (None, false, 120, None),
            (None, true, 120, Some((Firing, 9_000, true))),
            (
                Some(alert(Firing, 60, 5_000)),
                true,
                120,
                Some((Firing, 5_000, false)),
            ),
            (
                Some(alert(Firing, 60, 5_000)),
                false,
                120,
                Some((Resolved, 5_000, true)),
            ),
            (Some(alert(Resolved, 60, 5_000)), false, 120, None),
            (
                Some(alert(Resolved, 60, 5_000)),
                true,
                120,
                Some((Firing, 9_000, true)),
            ),
            // a late re-evaluation of an older window changes nothing
            (Some(alert(Firing, 180, 5_000)), false, 120, None),
            (Some(alert(Resolved, 180, 5_000)), true, 120, None),
            // the same window evaluated again (late batches) may change its verdict
            (
                Some(alert(Firing, 120, 5_000)),
                false,
                120,
                Some((Resolved, 5_000, true)),
            ),
        ];
        for (before, breach, ws, want) in cases {
            let got = transition(before.as_ref(), &finding(*breach), *ws, ws + 60, 9_000)
                .map(|t| (t.alert.state, t.alert.started_at_ms, t.changed));
            assert_eq!(got, *want, "{before:?} breach {breach} window {ws}");
        }
        let t = transition(None, &finding(true), 120, 180, 9_000).unwrap();
        assert_eq!(t.alert.key, "drift|wine|1.0.0|eu|alcohol");
        assert_eq!(
            (
                t.alert.window_start_ms,
                t.alert.window_end_ms,
                t.alert.updated_at_ms,
                t.alert.value
            ),
            (120, 180, 9_000, 0.5)
        );
    }
}
