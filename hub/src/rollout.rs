//! The rollout state machine: pure rules over a rollout, what happened to it and the time,
//! passed in. The HTTP handlers and the hub's ticker load a rollout, ask [`apply`] what the
//! event does to it, and store the [`Change`] (`Store::save_rollout`); nothing here reads a
//! clock or a database.
//!
//! ```text
//!            step (command or timer)
//!              +----+
//!              v    |
//! start --> active -+-- promote (command, or the canary held) --> promoted --+
//!              |                                                             |
//!              +-- abort (command, failure rate, canary worse) --> aborted --+-- rollback
//!              |                                                             |   --> rolled_back
//!              +-------------------------------------------------------------+
//! ```

use std::collections::BTreeMap;

use capsule_format::hub::{
    AutoPromote, NewRollout, ReportedModel, Rollout, RolloutAction, RolloutState, bucket,
};

pub use capsule_format::hub::Health;

use crate::store::NodeRow;
use crate::{Error, Result};

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

/// Something that happens to a rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// An admin's command; `by` names the admin's token.
    Command {
        /// What is asked.
        action: RolloutAction,
        /// Who asks.
        by: String,
    },
    /// The hub's clock ticked: a timed rollout steps once its interval has passed.
    Tick,
    /// Its assigned nodes' reports (see [`failures`]).
    Reports(Failures),
    /// What its version served since it started (rollouts that promote themselves).
    Health(Health),
}

/// How a rollout's assigned nodes fare with its version.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Failures {
    /// Nodes the rollout assigns its version to.
    pub assigned: usize,
    /// Those that report a failure of it: `node state`.
    pub failed: Vec<String>,
}

/// What an event changes.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The rollout after it.
    pub rollout: Rollout,
    /// The version `production` now points at, when that changes.
    pub production: Option<String>,
    /// The audit log's action (`rollout.step`, `rollout.promote`, ...).
    pub action: &'static str,
}

/// Validates a new rollout and makes it: `id`, the model's production version before it
/// (`previous`, empty if none), what its version had served so far (`baseline`) and `now`
/// (seconds). `rollouts` are the hub's rollouts: one model has one active rollout at a time.
pub fn start(
    req: NewRollout,
    rollouts: &[Rollout],
    id: String,
    previous: String,
    baseline: Health,
    now: i64,
) -> Result<Rollout> {
    if req.steps.is_empty()
        || req.steps.iter().any(|p| *p == 0 || *p > 100)
        || req.steps.windows(2).any(|w| w[0] >= w[1])
    {
        return Err(Error::BadRequest(
            "steps: increasing percentages in 1..=100".into(),
        ));
    }
    if !(0.0..=1.0).contains(&req.failure_threshold) {
        return Err(Error::BadRequest(
            "failure_threshold: a rate in 0..=1".into(),
        ));
    }
    if let Some(problem) = req.auto_promote.as_ref().and_then(AutoPromote::problem) {
        return Err(Error::BadRequest(problem.into()));
    }
    if let Some(r) = rollouts
        .iter()
        .find(|r| r.model == req.model && r.state == RolloutState::Active)
    {
        return Err(Error::Conflict(format!(
            "rollout {} of {} {} is active: promote, abort or roll it back first",
            r.id, r.model, r.version
        )));
    }
    Ok(Rollout {
        id,
        model: req.model,
        version: req.version,
        previous,
        selector: req.selector,
        percent: i64::from(req.steps[0]),
        steps: req.steps,
        step: 0,
        state: RolloutState::Active,
        failure_threshold: req.failure_threshold,
        step_interval_s: req.step_interval_s.max(0),
        reason: String::new(),
        created_at: now,
        updated_at: now,
        auto_promote: req.auto_promote,
        baseline: req.auto_promote.map(|_| baseline).unwrap_or_default(),
    })
}

/// What `event` does to `r` at `now` (seconds): `Ok(None)` when nothing changes (a timer not
/// due, failures under the threshold, a canary still being judged, an automatic event for a
/// rollout that ended), a conflict when an admin's command does not apply.
pub fn apply(r: &Rollout, event: &Event, now: i64) -> Result<Option<Change>> {
    let active = r.state == RolloutState::Active;
    let mut next = r.clone();
    next.updated_at = now;
    let change = |rollout: Rollout, production: Option<String>, action| {
        Ok(Some(Change {
            rollout,
            production,
            action,
        }))
    };
    match event {
        Event::Command { action, by } => match action {
            RolloutAction::Step if active => {
                if !advance(&mut next) {
                    return Err(Error::Conflict(format!(
                        "rollout {} is at its last step ({}%): promote it",
                        r.id, r.percent
                    )));
                }
                change(next, None, "rollout.step")
            }
            RolloutAction::Promote if active => {
                end(
                    &mut next,
                    RolloutState::Promoted,
                    format!("promoted by {by}"),
                );
                let version = next.version.clone();
                change(next, Some(version), "rollout.promote")
            }
            RolloutAction::Abort if active => {
                end(&mut next, RolloutState::Aborted, format!("aborted by {by}"));
                change(next, None, "rollout.abort")
            }
            RolloutAction::Rollback if r.state != RolloutState::RolledBack => {
                if r.previous.is_empty() {
                    return Err(Error::Conflict(format!(
                        "{} had no production version before rollout {}",
                        r.model, r.id
                    )));
                }
                end(
                    &mut next,
                    RolloutState::RolledBack,
                    format!("rolled back by {by}"),
                );
                let previous = next.previous.clone();
                change(next, Some(previous), "rollout.rollback")
            }
            _ => Err(Error::Conflict(format!(
                "rollout {} is {}: cannot {action}",
                r.id, r.state
            ))),
        },
        _ if !active => Ok(None),
        Event::Tick => {
            let due =
                r.step_interval_s > 0 && now.saturating_sub(r.updated_at) >= r.step_interval_s;
            if due && advance(&mut next) {
                change(next, None, "rollout.step")
            } else {
                Ok(None)
            }
        }
        Event::Reports(f) => {
            if f.assigned == 0 {
                return Ok(None);
            }
            let rate = f.failed.len() as f64 / f.assigned as f64;
            if rate <= r.failure_threshold {
                return Ok(None);
            }
            let reason = format!(
                "failure rate {:.2} ({} of {} nodes: {}) over the threshold {:.2}",
                rate,
                f.failed.len(),
                f.assigned,
                f.failed.join(", "),
                r.failure_threshold
            );
            end(&mut next, RolloutState::Aborted, reason);
            change(next, None, "rollout.abort")
        }
        Event::Health(served) => {
            let Some(policy) = r.auto_promote else {
                return Ok(None);
            };
            match judge(&policy, served, r.created_at, now) {
                Verdict::Wait => Ok(None),
                Verdict::Promote(reason) => {
                    end(&mut next, RolloutState::Promoted, reason);
                    let version = next.version.clone();
                    change(next, Some(version), "rollout.promote")
                }
                Verdict::Abort(reason) => {
                    end(&mut next, RolloutState::Aborted, reason);
                    change(next, None, "rollout.abort")
                }
            }
        }
    }
}

fn end(r: &mut Rollout, state: RolloutState, reason: String) {
    if state == RolloutState::Promoted {
        r.percent = 100;
    }
    r.state = state;
    r.reason = reason;
}

/// Moves to the next step; false at the last one.
fn advance(r: &mut Rollout) -> bool {
    let next = usize::try_from(r.step.saturating_add(1)).unwrap_or(usize::MAX);
    match r.steps.get(next) {
        Some(p) => {
            r.step += 1;
            r.percent = i64::from(*p);
            true
        }
        None => false,
    }
}

/// Whether a rollout assigns its version to this node: the node has every label of the
/// selector and its canary bucket is under the rollout's percentage.
pub fn assigned(r: &Rollout, node: &str, labels: &BTreeMap<String, String>) -> bool {
    r.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
        && i64::from(bucket(&r.id, node)) < r.percent
}

/// How the nodes `r` assigns its version to fare with it, from their last reports.
pub fn failures(r: &Rollout, nodes: &[NodeRow]) -> Failures {
    let mut out = Failures::default();
    for n in nodes.iter().filter(|n| assigned(r, &n.id, &n.labels)) {
        out.assigned += 1;
        let failed = n
            .report
            .iter()
            .flat_map(|rep| &rep.models)
            .find(|m: &&ReportedModel| m.model == r.model && m.version == r.version && m.failed());
        if let Some(m) = failed {
            out.failed.push(format!("{} {}", n.id, m.state));
        }
    }
    out
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

    fn rollout(state: RolloutState, step: i64) -> Rollout {
        let steps = vec![10, 50, 100];
        Rollout {
            id: "r1".into(),
            model: "m".into(),
            version: "2.0.0".into(),
            previous: "1.0.0".into(),
            selector: Default::default(),
            percent: i64::from(steps[step as usize]),
            steps,
            step,
            state,
            failure_threshold: 0.2,
            step_interval_s: 0,
            reason: String::new(),
            created_at: 1_000,
            updated_at: 1_000,
            auto_promote: None,
            baseline: Health::default(),
        }
    }

    fn command(action: RolloutAction) -> Event {
        Event::Command {
            action,
            by: "admin".into(),
        }
    }

    /// (state after, percent after, production after or "-", audit action), or the refusal's
    /// status.
    fn outcome(r: &Rollout, event: &Event, now: i64) -> String {
        match apply(r, event, now) {
            Ok(None) => "none".into(),
            Ok(Some(c)) => {
                assert_eq!(c.rollout.updated_at, now);
                assert_eq!(c.rollout.id, r.id);
                format!(
                    "{} {}% {} {}",
                    c.rollout.state,
                    c.rollout.percent,
                    c.production.as_deref().unwrap_or("-"),
                    c.action
                )
            }
            Err(e) => format!("{} {e}", e.status()),
        }
    }

    #[test]
    fn commands() {
        use RolloutAction::*;
        use RolloutState::*;
        let cases: &[(RolloutState, i64, RolloutAction, &str)] = &[
            (Active, 0, Step, "active 50% - rollout.step"),
            (Active, 1, Step, "active 100% - rollout.step"),
            (
                Active,
                2,
                Step,
                "409 rollout r1 is at its last step (100%): promote it",
            ),
            (Active, 0, Promote, "promoted 100% 2.0.0 rollout.promote"),
            (Active, 1, Abort, "aborted 50% - rollout.abort"),
            (
                Active,
                1,
                Rollback,
                "rolled_back 50% 1.0.0 rollout.rollback",
            ),
            (
                Promoted,
                2,
                Rollback,
                "rolled_back 100% 1.0.0 rollout.rollback",
            ),
            (
                Aborted,
                1,
                Rollback,
                "rolled_back 50% 1.0.0 rollout.rollback",
            ),
            (Promoted, 2, Step, "409 rollout r1 is promoted: cannot step"),
            (
                Promoted,
                2,
                Promote,
                "409 rollout r1 is promoted: cannot promote",
            ),
            (
                Aborted,
                1,
                Promote,
                "409 rollout r1 is aborted: cannot promote",
            ),
            (Aborted, 1, Abort, "409 rollout r1 is aborted: cannot abort"),
            (
                RolledBack,
                1,
                Rollback,
                "409 rollout r1 is rolled_back: cannot rollback",
            ),
            (
                RolledBack,
                1,
                Step,
                "409 rollout r1 is rolled_back: cannot step",
            ),
        ];
        for (state, step, action, want) in cases {
            let r = rollout(*state, *step);
            assert_eq!(
                outcome(&r, &command(*action), 2_000),
                *want,
                "{state} {step} {action}"
            );
        }
    }

    #[test]
    fn commands_name_who_gave_them() {
        let r = rollout(RolloutState::Active, 0);
        let c = apply(&r, &command(RolloutAction::Abort), 5)
            .unwrap()
            .unwrap();
        assert_eq!(c.rollout.reason, "aborted by admin");
    }

    #[test]
    fn rollback_needs_a_version_to_go_back_to() {
        let mut r = rollout(RolloutState::Promoted, 2);
        r.previous.clear();
        assert_eq!(
            outcome(&r, &command(RolloutAction::Rollback), 5),
            "409 m had no production version before rollout r1"
        );
    }

    #[test]
    fn timer() {
        // (interval, step, seconds since the last change, outcome)
        let cases = [
            (0, 0, 1_000_000, "none"),
            (60, 0, 59, "none"),
            (60, 0, 60, "active 50% - rollout.step"),
            (60, 1, 600, "active 100% - rollout.step"),
            (60, 2, 600, "none"),
        ];
        for (interval, step, since, want) in cases {
            let mut r = rollout(RolloutState::Active, step);
            r.step_interval_s = interval;
            assert_eq!(
                outcome(&r, &Event::Tick, 1_000 + since),
                want,
                "{interval} {step} {since}"
            );
        }
        let mut ended = rollout(RolloutState::Aborted, 0);
        ended.step_interval_s = 1;
        assert_eq!(outcome(&ended, &Event::Tick, 1_000_000), "none");
    }

    #[test]
    fn failure_threshold() {
        let failures = |assigned, failed: usize| {
            Event::Reports(Failures {
                assigned,
                failed: (0..failed).map(|i| format!("n{i} probe_failed")).collect(),
            })
        };
        // threshold 0.2: (assigned, failed, outcome)
        let cases = [
            (0, 0, "none"),
            (10, 0, "none"),
            (10, 2, "none"),
            (10, 3, "aborted 10% - rollout.abort"),
            (1, 1, "aborted 10% - rollout.abort"),
        ];
        for (assigned, failed, want) in cases {
            let r = rollout(RolloutState::Active, 0);
            assert_eq!(
                outcome(&r, &failures(assigned, failed), 5),
                want,
                "{assigned} {failed}"
            );
        }
        let r = rollout(RolloutState::Active, 0);
        let c = apply(&r, &failures(4, 1), 5).unwrap().unwrap();
        assert_eq!(
            c.rollout.reason,
            "failure rate 0.25 (1 of 4 nodes: n0 probe_failed) over the threshold 0.20"
        );
        let ended = rollout(RolloutState::Promoted, 2);
        assert_eq!(outcome(&ended, &failures(1, 1), 5), "none");
    }

    #[test]
    fn canary_health() {
        let mut r = rollout(RolloutState::Active, 0);
        assert_eq!(
            outcome(&r, &Event::Health(health(1_000, 0, 0, 0)), 5_000),
            "none",
            "not self-promoting"
        );
        r.auto_promote = Some(policy(None));
        let cases = [
            (health(10, 0, 0, 0), 5_000, "none"),
            (health(100, 0, 0, 0), 1_059, "none"),
            (
                health(100, 0, 0, 0),
                1_060,
                "promoted 100% 2.0.0 rollout.promote",
            ),
            (health(100, 50, 0, 0), 1_001, "aborted 10% - rollout.abort"),
        ];
        for (served, now, want) in cases {
            assert_eq!(
                outcome(&r, &Event::Health(served), now),
                want,
                "{served:?} {now}"
            );
        }
        r.state = RolloutState::RolledBack;
        assert_eq!(
            outcome(&r, &Event::Health(health(100, 0, 0, 0)), 9_000),
            "none"
        );
    }

    fn new_rollout(steps: Vec<u32>) -> NewRollout {
        NewRollout {
            model: "m".into(),
            version: "3.0.0".into(),
            selector: Default::default(),
            steps,
            failure_threshold: 0.2,
            step_interval_s: -5,
            auto_promote: None,
        }
    }

    #[test]
    fn starts() {
        let none: &[Rollout] = &[];
        let ok = start(
            new_rollout(vec![5, 100]),
            none,
            "r9".into(),
            "1.0.0".into(),
            health(7, 0, 0, 0),
            42,
        )
        .unwrap();
        assert_eq!(
            (
                ok.state,
                ok.step,
                ok.percent,
                ok.created_at,
                ok.updated_at,
                ok.step_interval_s
            ),
            (RolloutState::Active, 0, 5, 42, 42, 0)
        );
        assert_eq!(
            ok.baseline,
            Health::default(),
            "the baseline only matters when judged"
        );
        let mut judged = new_rollout(vec![100]);
        judged.auto_promote = Some(policy(None));
        let j = start(
            judged,
            none,
            "r9".into(),
            String::new(),
            health(7, 0, 0, 0),
            42,
        )
        .unwrap();
        assert_eq!(j.baseline, health(7, 0, 0, 0));

        let bad_steps = [
            vec![],
            vec![0, 50],
            vec![50, 50],
            vec![50, 10],
            vec![10, 101],
        ];
        for steps in bad_steps {
            let e = start(
                new_rollout(steps.clone()),
                none,
                "r".into(),
                String::new(),
                Health::default(),
                0,
            )
            .unwrap_err();
            assert_eq!(e.status(), 400, "{steps:?}");
        }
        let mut bad = new_rollout(vec![100]);
        bad.failure_threshold = 1.5;
        assert_eq!(
            start(bad, none, "r".into(), String::new(), Health::default(), 0)
                .unwrap_err()
                .status(),
            400
        );
        let mut bad = new_rollout(vec![100]);
        bad.auto_promote = Some(AutoPromote {
            min_requests: 0,
            ..AutoPromote::default()
        });
        assert_eq!(
            start(bad, none, "r".into(), String::new(), Health::default(), 0)
                .unwrap_err()
                .status(),
            400
        );

        let busy = [rollout(RolloutState::Active, 0)];
        let e = start(
            new_rollout(vec![100]),
            &busy,
            "r".into(),
            String::new(),
            Health::default(),
            0,
        )
        .unwrap_err();
        assert_eq!(e.status(), 409);
        let mut other_model = new_rollout(vec![100]);
        other_model.model = "other".into();
        assert!(
            start(
                other_model,
                &busy,
                "r".into(),
                String::new(),
                Health::default(),
                0
            )
            .is_ok()
        );
        let ended = [rollout(RolloutState::Promoted, 2)];
        assert!(
            start(
                new_rollout(vec![100]),
                &ended,
                "r".into(),
                String::new(),
                Health::default(),
                0
            )
            .is_ok()
        );
    }

    #[test]
    fn failures_count_the_assigned_nodes_reports() {
        use capsule_format::hub::{ModelState, Report};
        let node = |id: &str, ring: &str, state: Option<ModelState>| NodeRow {
            id: id.into(),
            labels: [("ring".to_owned(), ring.to_owned())].into(),
            registered_at: 0,
            last_seen: 0,
            report: state.map(|state| Report {
                generation: 1,
                models: vec![ReportedModel {
                    model: "m".into(),
                    version: "2.0.0".into(),
                    state,
                    detail: String::new(),
                }],
            }),
        };
        let mut r = rollout(RolloutState::Active, 2);
        r.selector = [("ring".to_owned(), "canary".to_owned())].into();
        let nodes = [
            node("a", "canary", Some(ModelState::ProbeFailed)),
            node("b", "canary", Some(ModelState::Serving)),
            node("c", "canary", Some(ModelState::InstallFailed)),
            node("d", "canary", None),
            node("e", "main", Some(ModelState::VerifyFailed)),
        ];
        assert_eq!(
            failures(&r, &nodes),
            Failures {
                assigned: 4,
                failed: vec!["a probe_failed".into()],
            }
        );
    }
}
