//! The canary's verdict for rollouts that promote themselves: pure rules over what the
//! rollout's version served since it started, with the time passed in.

use capsule_format::hub::AutoPromote;
use serde::{Deserialize, Serialize};

/// What one model version has served, as the hub's telemetry and feedback count it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Requests.
    pub requests: u64,
    /// Failed requests.
    pub errors: u64,
    /// Predictions with a feedback label.
    pub labeled: u64,
    /// Of which the model got right.
    pub correct: u64,
}

impl Health {
    /// What was served after `baseline` was taken (counts only grow; a smaller count, as
    /// after a restored database, counts from zero).
    pub fn since(&self, baseline: &Health) -> Health {
        Health {
            requests: self.requests.saturating_sub(baseline.requests),
            errors: self.errors.saturating_sub(baseline.errors),
            labeled: self.labeled.saturating_sub(baseline.labeled),
            correct: self.correct.saturating_sub(baseline.correct),
        }
    }

    fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.errors as f64 / self.requests as f64
        }
    }

    fn accuracy(&self) -> Option<f64> {
        (self.labeled > 0).then(|| self.correct as f64 / self.labeled as f64)
    }
}

/// What the hub does with a self-promoting rollout now.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Not enough evidence or time yet.
    Wait,
    /// The canary held: make its version production. The reason says why.
    Promote(String),
    /// The canary is worse than the policy allows: back to the production version.
    Abort(String),
}

/// Judges a canary that started at `started_at` (seconds) at `now` (seconds) by `policy`,
/// from what it served since it started.
pub fn judge(policy: &AutoPromote, served: &Health, started_at: i64, now: i64) -> Verdict {
    let enough_requests = served.requests >= policy.min_requests.max(1);
    let rate = served.error_rate();
    if enough_requests && rate > policy.max_error_rate {
        return Verdict::Abort(format!(
            "canary error rate {rate:.4} ({} of {} requests) over {:.4}",
            served.errors, served.requests, policy.max_error_rate
        ));
    }
    let accuracy = match policy.min_accuracy {
        None => None,
        Some(_) if served.labeled < policy.min_labels.max(1) => return Verdict::Wait,
        Some(min) => {
            let a = served.accuracy().unwrap_or(0.0);
            if a < min {
                return Verdict::Abort(format!(
                    "canary accuracy {a:.4} ({} of {} labeled predictions) under {min:.4}",
                    served.correct, served.labeled
                ));
            }
            Some(a)
        }
    };
    let ran = now.saturating_sub(started_at);
    if !enough_requests || ran < policy.hold_s {
        return Verdict::Wait;
    }
    let accuracy = accuracy
        .map(|a| format!(", accuracy {a:.4} over {} labels", served.labeled))
        .unwrap_or_default();
    Verdict::Promote(format!(
        "canary held for {ran} s: error rate {rate:.4} over {} requests{accuracy}",
        served.requests
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health(requests: u64, errors: u64, labeled: u64, correct: u64) -> Health {
        Health {
            requests,
            errors,
            labeled,
            correct,
        }
    }

    fn policy(min_accuracy: Option<f64>) -> AutoPromote {
        AutoPromote {
            min_requests: 100,
            max_error_rate: 0.02,
            min_accuracy,
            min_labels: 20,
            hold_s: 60,
        }
    }

    fn kind(v: &Verdict) -> &'static str {
        match v {
            Verdict::Wait => "wait",
            Verdict::Promote(_) => "promote",
            Verdict::Abort(_) => "abort",
        }
    }

    #[test]
    fn verdicts() {
        // (policy's min accuracy, served, seconds since the start, verdict)
        let cases = [
            (None, health(0, 0, 0, 0), 1_000, "wait"),
            (None, health(99, 0, 0, 0), 1_000, "wait"),
            (None, health(99, 99, 0, 0), 1_000, "wait"),
            (None, health(100, 2, 0, 0), 59, "wait"),
            (None, health(100, 2, 0, 0), 60, "promote"),
            (None, health(100, 3, 0, 0), 60, "abort"),
            (None, health(100, 3, 0, 0), 0, "abort"),
            (Some(0.9), health(500, 0, 19, 0), 1_000, "wait"),
            (Some(0.9), health(500, 0, 20, 18), 1_000, "promote"),
            (Some(0.9), health(500, 0, 20, 17), 1_000, "abort"),
            (Some(0.9), health(50, 0, 20, 17), 0, "abort"),
            (Some(0.9), health(50, 0, 20, 20), 1_000, "wait"),
            (Some(0.9), health(500, 50, 20, 20), 1_000, "abort"),
        ];
        for (min_accuracy, served, ran, want) in cases {
            let v = judge(&policy(min_accuracy), &served, 10_000, 10_000 + ran);
            assert_eq!(kind(&v), want, "{min_accuracy:?} {served:?} {ran} s: {v:?}");
        }
    }

    #[test]
    fn reasons_name_the_evidence() {
        let v = judge(&policy(Some(0.9)), &health(200, 1, 40, 38), 0, 120);
        assert_eq!(
            v,
            Verdict::Promote(
                "canary held for 120 s: error rate 0.0050 over 200 requests, accuracy 0.9500 over 40 labels"
                    .into()
            )
        );
        let v = judge(&policy(None), &health(100, 5, 0, 0), 0, 0);
        assert_eq!(
            v,
            Verdict::Abort("canary error rate 0.0500 (5 of 100 requests) over 0.0200".into())
        );
    }

    #[test]
    fn counts_since_the_baseline() {
        let now = health(150, 4, 30, 25);
        assert_eq!(now.since(&health(50, 1, 10, 10)), health(100, 3, 20, 15));
        assert_eq!(now.since(&health(500, 9, 90, 90)), health(0, 0, 0, 0));
    }

    #[test]
    fn policies_are_checked() {
        assert!(AutoPromote::default().problem().is_none());
        for bad in [
            AutoPromote {
                min_requests: 0,
                ..AutoPromote::default()
            },
            AutoPromote {
                max_error_rate: 1.5,
                ..AutoPromote::default()
            },
            AutoPromote {
                min_accuracy: Some(-0.1),
                ..AutoPromote::default()
            },
            AutoPromote {
                min_accuracy: Some(0.5),
                min_labels: 0,
                ..AutoPromote::default()
            },
            AutoPromote {
                hold_s: -1,
                ..AutoPromote::default()
            },
        ] {
            assert!(bad.problem().is_some(), "{bad:?}");
        }
    }
}
