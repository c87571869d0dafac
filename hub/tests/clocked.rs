//! The hub's time-driven behaviour with a clock the test moves: window evaluation, alert
//! firing, deduplication and resolution, the retraining report, late telemetry, and nodes
//! going offline. A real hub (HTTP on loopback, SQLite) with `HubConfig::clock` set to a
//! `ManualClock`: the test advances time instead of waiting for window edges.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use capsule_format::clock::ManualClock;
use capsule_format::hub::{
    AlertList, AlertRule, AlertState, EventKind, IssuedToken, NotificationBody, RetrainReport,
};
use capsule_format::telemetry::{ModelWindow, Shipment, TelemetryBatch};
use capsule_hub::monitor::{ErrorRule, MonitorConfig, RetrainConfig};
use capsule_hub::{Hub, HubConfig};

const ADMIN: &str = "clocked-admin";
const WINDOW_MS: i64 = 1_000;
/// A window edge: 2023-11-14T22:13:20Z.
const T0: i64 = 1_700_000_000_000;

struct Setup {
    _dir: tempfile::TempDir,
    reports: std::path::PathBuf,
    clock: Arc<ManualClock>,
    hub: Option<Hub>,
    url: String,
    http: reqwest::Client,
    seqs: BTreeMap<String, u64>,
    tokens: BTreeMap<String, String>,
}

impl Setup {
    async fn start() -> Result<Setup> {
        let dir = tempfile::tempdir()?;
        let clock = ManualClock::at_ms(T0 + 10);
        let reports = dir.path().join("reports");
        let config = HubConfig {
            database: format!("sqlite://{}", dir.path().join("hub.db").display()),
            blobs: dir.path().join("blobs"),
            http: "127.0.0.1:0".parse()?,
            admin_token: Some(ADMIN.into()),
            poll_interval: Duration::from_millis(50),
            monitor: MonitorConfig {
                window_ms: WINDOW_MS as u64,
                grace_ms: 200,
                offline_after_s: 60,
                reports_dir: reports.clone(),
                errors: ErrorRule {
                    enabled: true,
                    rate: 0.5,
                    min_requests: 10,
                },
                retrain: RetrainConfig {
                    on: vec![AlertRule::Errors],
                    ..RetrainConfig::default()
                },
                ..MonitorConfig::default()
            },
            clock: clock.clone(),
            ..HubConfig::default()
        };
        let hub = Hub::start(config).await?;
        let url = format!("http://{}", hub.addr());
        Ok(Setup {
            _dir: dir,
            reports,
            clock,
            hub: Some(hub),
            url,
            http: reqwest::Client::new(),
            seqs: BTreeMap::new(),
            tokens: BTreeMap::new(),
        })
    }

    /// Issues a token for `node` and registers it in `group`.
    async fn node(&mut self, node: &str, group: &str) -> Result<()> {
        let issued: IssuedToken = self
            .http
            .post(format!("{}/api/v1/nodes/{node}/token", self.url))
            .bearer_auth(ADMIN)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        self.http
            .post(format!("{}/api/v1/nodes/{node}/register", self.url))
            .bearer_auth(&issued.token)
            .json(&serde_json::json!({"labels": {"group": group}}))
            .send()
            .await?
            .error_for_status()?;
        self.tokens.insert(node.to_owned(), issued.token);
        Ok(())
    }

    /// Ships one batch from `node` for the window starting at `start`: `requests` requests
    /// of `m` 1.0.0, `errors` of them failed.
    async fn ship(&mut self, node: &str, start: i64, requests: u64, errors: u64) -> Result<()> {
        let seq = self.seqs.entry(node.to_owned()).or_default();
        *seq += 1;
        let mut window = ModelWindow {
            model: "m".into(),
            version: "1.0.0".into(),
            requests,
            ..ModelWindow::default()
        };
        if errors > 0 {
            window.errors.insert("guest_trap".into(), errors);
        }
        let shipment = Shipment {
            batches: vec![TelemetryBatch {
                node_id: node.to_owned(),
                seq: *seq,
                window_start_ms: u64::try_from(start)?,
                window_end_ms: u64::try_from(start + WINDOW_MS)?,
                models: vec![window],
                ..TelemetryBatch::default()
            }],
        };
        self.http
            .post(format!("{}/api/v1/telemetry", self.url))
            .bearer_auth(&self.tokens[node])
            .json(&shipment)
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    async fn alerts(&self) -> Result<AlertList> {
        Ok(self
            .http
            .get(format!("{}/api/v1/alerts", self.url))
            .bearer_auth(ADMIN)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    /// Sets the clock to `at` and waits (real time, at most 10 s) until the hub's
    /// evaluation reaches `evaluated_until` and `ok` holds.
    async fn at(
        &self,
        at: i64,
        evaluated_until: i64,
        ok: impl Fn(&AlertList) -> bool,
    ) -> Result<AlertList> {
        self.clock.set_ms(at);
        let started = std::time::Instant::now();
        loop {
            let a = self.alerts().await?;
            if a.evaluated_until_ms >= evaluated_until && ok(&a) {
                return Ok(a);
            }
            if started.elapsed() > Duration::from_secs(10) {
                bail!("at {at}: not evaluated until {evaluated_until}: {a:#?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metrics(&self) -> Result<String> {
        Ok(self
            .http
            .get(format!("{}/metrics", self.url))
            .bearer_auth(ADMIN)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    }
}

fn errors_alert(a: &AlertList) -> Option<&capsule_format::hub::Alert> {
    a.alerts.iter().find(|a| a.rule == AlertRule::Errors)
}

fn notifications(a: &AlertList, kind: EventKind) -> usize {
    a.events.iter().filter(|e| e.kind == kind).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_fire_once_resolve_and_follow_late_telemetry_on_a_moved_clock() -> Result<()> {
    let mut s = Setup::start().await?;
    s.node("n1", "eu").await?;
    s.node("n2", "eu").await?;

    // Window 0 fails three requests in four: once its end plus the grace has passed on the
    // clock, the error alert fires for that window, and retraining is triggered.
    s.ship("n1", T0, 40, 30).await?;
    let before = s.at(T0 + 900, 0, |_| true).await?;
    assert!(before.alerts.is_empty(), "nothing before the window ends");
    let a = s
        .at(T0 + WINDOW_MS + 250, T0 + WINDOW_MS, |a| {
            errors_alert(a).is_some() && notifications(a, EventKind::Retrain) == 1
        })
        .await?;
    let alert = errors_alert(&a).context("errors alert")?;
    assert_eq!(
        (
            alert.state,
            alert.group.as_str(),
            alert.window_start_ms,
            alert.value
        ),
        (AlertState::Firing, "eu", T0, 0.75)
    );
    assert_eq!(
        alert.started_at_ms,
        T0 + WINDOW_MS + 250,
        "stamped by the clock"
    );
    assert_eq!(notifications(&a, EventKind::Firing), 1);
    let report = a
        .events
        .iter()
        .find_map(|e| match e.body.as_ref().map(|n| &n.body) {
            Some(NotificationBody::Retrain(r)) => Some(r.clone()),
            _ => None,
        })
        .context("retraining notification")?;
    assert_eq!(
        (report.model.as_str(), report.version.as_str()),
        ("m", "1.0.0")
    );
    assert_eq!(report.reasons[0].rule, AlertRule::Errors);
    let files: Vec<_> = std::fs::read_dir(&s.reports)?.flatten().collect();
    assert_eq!(files.len(), 1, "one report file");
    let written: RetrainReport = serde_json::from_slice(&std::fs::read(files[0].path())?)?;
    assert_eq!(written, report);

    // Window 1 is healthy: the alert resolves, notified once; the firing is not repeated.
    s.ship("n1", T0 + WINDOW_MS, 40, 0).await?;
    let a = s
        .at(T0 + 2 * WINDOW_MS + 250, T0 + 2 * WINDOW_MS, |a| {
            // An evaluation stores the alert before it records the notification: wait
            // for both, so the counts below are not read between the two.
            errors_alert(a).is_some_and(|a| a.state == AlertState::Resolved)
                && notifications(a, EventKind::Resolved) >= 1
        })
        .await?;
    assert_eq!(notifications(&a, EventKind::Firing), 1, "deduplicated");
    assert_eq!(notifications(&a, EventKind::Resolved), 1);

    // Window 2 looks healthy when evaluated; then a late batch from another node of the
    // group makes it fail: the hub evaluates it again and the alert fires for it.
    s.ship("n1", T0 + 2 * WINDOW_MS, 40, 0).await?;
    let a = s
        .at(T0 + 3 * WINDOW_MS + 250, T0 + 3 * WINDOW_MS, |_| true)
        .await?;
    assert_eq!(
        errors_alert(&a).map(|a| a.state),
        Some(AlertState::Resolved)
    );
    s.ship("n2", T0 + 2 * WINDOW_MS, 200, 190).await?;
    let a = s
        .at(T0 + 3 * WINDOW_MS + 900, T0 + 3 * WINDOW_MS, |a| {
            errors_alert(a).is_some_and(|a| a.state == AlertState::Firing)
                && notifications(a, EventKind::Firing) >= 2
                && notifications(a, EventKind::Retrain) >= 2
        })
        .await?;
    let alert = errors_alert(&a).context("errors alert")?;
    assert_eq!(alert.window_start_ms, T0 + 2 * WINDOW_MS);
    assert_eq!(alert.value, 190.0 / 240.0);
    assert_eq!(notifications(&a, EventKind::Firing), 2);
    assert_eq!(
        notifications(&a, EventKind::Retrain),
        2,
        "retraining again: the alert had resolved"
    );

    // The nodes last called at T0 + 3.25 s; 60 s later by the clock they are offline.
    let online = s.metrics().await?;
    assert!(
        online.contains("capsule_hub_nodes{state=\"online\"} 2"),
        "{online}"
    );
    s.clock.advance(Duration::from_secs(61));
    let offline = s.metrics().await?;
    assert!(
        offline.contains("capsule_hub_nodes{state=\"offline\"} 2"),
        "{offline}"
    );

    if let Some(hub) = s.hub.take() {
        hub.shutdown().await;
    }
    Ok(())
}
