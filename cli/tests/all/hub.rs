//! The hub and a fleet of `capsule serve` processes on loopback, end to end: signed
//! publishing, a 34% canary reaching exactly the hashed subset, promotion, a version that
//! fails its golden probe (refused by the nodes, the rollout aborts itself), rollback, the hub
//! killed and restarted mid-rollout, a node offline during a rollout catching up; on SQLite
//! and on PostgreSQL. The attacks on the update path are in `update_attacks.rs`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsule_tests::{WatCapsule, wat_capsule};
use serde_json::{Value, json};

use crate::common::*;

/// What each node serves in a rollout at `percent`: `new` where its bucket is below it.
fn canary(nodes: &[(String, String)], rollout: &str, percent: u32, new: f64, old: f64) -> Vec<f64> {
    nodes
        .iter()
        .map(|(n, _)| {
            if capsule_format::hub::bucket(rollout, n) < percent {
                new
            } else {
                old
            }
        })
        .collect()
}

fn wait_serving(nodes: &[(String, String)], want: &[f64]) -> Result<()> {
    wait_until(&format!("nodes serving {want:?}"), || {
        nodes
            .iter()
            .zip(want)
            .all(|((_, url), y)| served_y(url) == Some(*y))
    })
}

struct Fleet {
    dir: tempfile::TempDir,
    hub_url: String,
    hub_port: u16,
    database: String,
    hub: Option<Proc>,
    nodes: Vec<(String, String)>,
    node_procs: Vec<Proc>,
}

impl Fleet {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    fn start_hub(dir: &Path, database: &str, port: u16) -> Result<Proc> {
        start_hub(dir, database, port, &[])
    }

    fn start_node(&self, id: &str, token: &str) -> Result<(Proc, String)> {
        start_synced_node(
            self.dir.path(),
            &self.hub_url,
            id,
            token,
            &["--label", "site=lab"],
        )
    }

    fn start(database: &str) -> Result<Fleet> {
        let dir = tempfile::tempdir()?;
        publisher_keys(dir.path(), &[])?;
        for (v, y, golden) in [
            ("1.0.0", 1.0, None),
            ("2.0.0", 2.0, None),
            ("3.0.0", 3.0, Some(4.0)),
        ] {
            let bytes = wat_capsule(&WatCapsule {
                name: "wat".into(),
                version: semver::Version::parse(v)?,
                y,
                golden_y: golden,
            })?;
            std::fs::write(dir.path().join(format!("wat-{v}.capsule.wasm")), bytes)?;
        }
        let hub_port = free_port()?;
        let hub = Fleet::start_hub(dir.path(), database, hub_port)?;
        let hub_url = format!("http://127.0.0.1:{hub_port}");
        let mut fleet = Fleet {
            dir,
            hub_url,
            hub_port,
            database: database.to_owned(),
            hub: Some(hub),
            nodes: Vec::new(),
            node_procs: Vec::new(),
        };
        for id in ["node-a", "node-b", "node-c"] {
            let token = fleet.node_token(id)?;
            let (proc_, url) = fleet.start_node(id, &token)?;
            fleet.nodes.push((id.to_owned(), url));
            fleet.node_procs.push(proc_);
        }
        Ok(fleet)
    }

    fn node_token(&self, id: &str) -> Result<String> {
        node_token(&self.hub_url, id)
    }

    /// Signs the version into the targets metadata (two publisher keys) and pushes it.
    fn publish(&self, version: &str, alias: Option<&str>) -> Result<()> {
        let provenance = self.path("provenance.json");
        std::fs::write(
            &provenance,
            r#"{"dataset_sha256": "d1", "params": {"lr": 0.01}, "code_revision": "abc123"}"#,
        )?;
        let metrics = self.path(&format!("metrics-{version}.json"));
        let accuracy = 0.9 + 0.01 * version[..1].parse::<f64>().unwrap_or(0.0);
        std::fs::write(&metrics, format!(r#"{{"accuracy": {accuracy}}}"#))?;
        let mut extra = vec![
            "--provenance",
            provenance.as_str(),
            "--metrics",
            metrics.as_str(),
        ];
        if let Some(a) = alias {
            extra.extend(["--alias", a]);
        }
        sign_and_push(
            self.dir.path(),
            &self.hub_url,
            Path::new(&self.path(&format!("wat-{version}.capsule.wasm"))),
            Path::new(&self.path("targets.json")),
            &extra,
        )
    }

    fn rollout(&self, version: &str, steps: &str, threshold: f64) -> Result<Value> {
        let (status, v) = api(
            &self.hub_url,
            "POST",
            "/api/v1/rollouts",
            ADMIN,
            Some(json!({
                "model": "wat", "version": version, "selector": {"site": "lab"},
                "steps": steps.split(',').filter_map(|s| s.parse::<u32>().ok()).collect::<Vec<_>>(),
                "failure_threshold": threshold,
            })),
        )?;
        if status != 200 {
            bail!("rollout: {status} {v}");
        }
        Ok(v)
    }

    fn action(&self, id: &str, action: &str) -> Result<Value> {
        let (status, v) = api(
            &self.hub_url,
            "POST",
            &format!("/api/v1/rollouts/{id}/{action}"),
            ADMIN,
            None,
        )?;
        if status != 200 {
            bail!("{action}: {status} {v}");
        }
        Ok(v)
    }
}

fn scenario(database: &str) -> Result<()> {
    let mut fleet = Fleet::start(database)?;

    // Publish v1 as production: every node serves it, having fetched the guest code and
    // v1's model image once each (split form; the wat capsules of every version share their
    // code).
    fleet.publish("1.0.0", Some("production"))?;
    wait_serving(&fleet.nodes, &[1.0, 1.0, 1.0])?;
    assert_eq!(
        blob_downloads(&fleet.hub_url)?,
        (0, 3, 3),
        "capsule, image, code"
    );
    // The single file, which the hub has only in split form: joined once, byte for byte, and
    // stored (a second download streams the stored file).
    let v1 = std::fs::read(fleet.path("wat-1.0.0.capsule.wasm"))?;
    let v1_sha = capsule_format::split::sha256_hex(&v1);
    let blob = fleet
        .dir
        .path()
        .join("blobs")
        .join(&v1_sha[..2])
        .join(format!("{v1_sha}.capsule.wasm"));
    assert!(!blob.exists(), "push uploads the split form only");
    for _ in 0..2 {
        let got = http()
            .get(format!("{}/api/v1/blobs/{v1_sha}", fleet.hub_url))
            .bearer_auth(ADMIN)
            .send()?
            .bytes()?;
        assert!(
            got.as_ref() == v1.as_slice(),
            "the joined capsule is the signed file"
        );
    }
    assert!(blob.exists(), "joined once and stored");
    assert_eq!(
        blob_downloads(&fleet.hub_url)?,
        (2, 3, 3),
        "capsule, image, code"
    );

    // Canary v2 at 34%: exactly the nodes whose bucket is below 34.
    fleet.publish("2.0.0", None)?;
    // Experiment tracking through the CLI: provenance and metrics as pushed, compare, and
    // versions are immutable.
    let hub_args = ["--hub", fleet.hub_url.as_str(), "--token", ADMIN];
    let models_cli = |args: &[&str]| -> Result<Value> {
        let mut all = vec!["models"];
        all.extend(hub_args);
        all.extend(args);
        Ok(serde_json::from_str(&run(&all)?)?)
    };
    let shown = models_cli(&["show", "wat"])?;
    let versions = shown["versions"].as_array().context("versions")?;
    assert_eq!(versions.len(), 2, "{shown}");
    let v2_row = &versions[1];
    assert_eq!(v2_row["version"], "2.0.0");
    assert_eq!(v2_row["provenance"]["dataset_sha256"], "d1", "{v2_row}");
    assert_eq!(v2_row["provenance"]["code_revision"], "abc123", "{v2_row}");
    assert_eq!(v2_row["provenance"]["params"]["lr"], 0.01, "{v2_row}");
    assert!(
        v2_row["provenance"]["source_sha256"]
            .as_str()
            .is_some_and(|h| h.len() == 64)
    );
    assert_eq!(v2_row["metrics"]["accuracy"], 0.92, "{v2_row}");
    assert_eq!(shown["aliases"]["production"], "1.0.0");
    let compared = models_cli(&["compare", "wat", "1.0.0", "2.0.0"])?;
    let diff = compared["metrics_diff"]["accuracy"]
        .as_f64()
        .context("diff")?;
    assert!((diff - 0.01).abs() < 1e-9, "{compared}");
    let capsule = fleet.path("wat-1.0.0.capsule.wasm");
    let mut again = vec!["push", capsule.as_str()];
    again.extend(hub_args);
    let err = run(&again).err().context("pushed twice")?.to_string();
    assert!(
        err.contains("hub answered 409: wat 1.0.0 is already registered (versions are immutable)"),
        "{err}"
    );
    let r = fleet.rollout("2.0.0", "34,100", 0.5)?;
    let id = r["id"].as_str().context("id")?.to_owned();
    let want = canary(&fleet.nodes, &id, 34, 2.0, 1.0);
    wait_serving(&fleet.nodes, &want)?;
    std::thread::sleep(Duration::from_millis(500));
    for ((n, url), y) in fleet.nodes.iter().zip(&want) {
        assert_eq!(served_y(url), Some(*y), "{n} at 34%");
    }

    // Promote: everyone. v2 moved as three images and no code.
    fleet.action(&id, "promote")?;
    wait_serving(&fleet.nodes, &[2.0, 2.0, 2.0])?;
    assert_eq!(
        blob_downloads(&fleet.hub_url)?,
        (2, 6, 3),
        "capsule, image, code"
    );

    // v3 fails its golden probe: refused by the nodes, which keep serving v2; the rollout
    // aborts itself.
    fleet.publish("3.0.0", None)?;
    let bad = fleet.rollout("3.0.0", "100", 0.2)?;
    let bad_id = bad["id"].as_str().context("id")?.to_owned();
    wait_until("the v3 rollout to abort", || {
        api(
            &fleet.hub_url,
            "GET",
            &format!("/api/v1/rollouts/{bad_id}"),
            ADMIN,
            None,
        )
        .map(|(_, v)| v["state"] == "aborted")
        .unwrap_or(false)
    })?;
    let (_, v) = api(
        &fleet.hub_url,
        "GET",
        &format!("/api/v1/rollouts/{bad_id}"),
        ADMIN,
        None,
    )?;
    assert!(
        v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("over the threshold"),
        "{v}"
    );
    for (n, url) in &fleet.nodes {
        assert_eq!(served_y(url), Some(2.0), "{n} keeps v2");
    }
    // The nodes that had reported by then refused it for its probe (any one of three is
    // over the 0.2 threshold), and nothing else failed.
    let reason = v["reason"].as_str().unwrap_or("");
    let listed = reason
        .split_once(" nodes: ")
        .and_then(|(_, rest)| rest.split_once(") over the threshold 0.20"))
        .map(|(nodes, _)| nodes)
        .context("reason format")?;
    assert!(reason.contains(" of 3 nodes: "), "{reason}");
    assert!(
        listed.split(", ").all(|n| n.ends_with(" probe_failed")),
        "{reason}"
    );

    // Roll back the v2 rollout: production is v1 again.
    fleet.action(&id, "rollback")?;
    wait_serving(&fleet.nodes, &[1.0, 1.0, 1.0])?;

    // Hub killed mid-rollout: nodes keep serving; after the restart the rollout continues.
    let r = fleet.rollout("2.0.0", "34,100", 0.5)?;
    let id = r["id"].as_str().context("id")?.to_owned();
    let want = canary(&fleet.nodes, &id, 34, 2.0, 1.0);
    wait_serving(&fleet.nodes, &want)?;
    if let Some(h) = fleet.hub.as_mut() {
        h.kill();
    }
    std::thread::sleep(Duration::from_millis(500));
    for ((n, url), y) in fleet.nodes.iter().zip(&want) {
        assert_eq!(served_y(url), Some(*y), "{n} serves while the hub is down");
    }
    fleet.hub = Some(Fleet::start_hub(
        fleet.dir.path(),
        &fleet.database.clone(),
        fleet.hub_port,
    )?);

    // A node offline during the rest of the rollout catches up when it returns.
    fleet.node_procs[2].kill();
    fleet.action(&id, "step")?;
    wait_serving(&fleet.nodes[..2], &[2.0, 2.0])?;
    let token = fleet.node_token("node-c")?;
    let (p, url) = fleet.start_node("node-c", &token)?;
    fleet.node_procs[2] = p;
    fleet.nodes[2].1 = url;
    wait_serving(&fleet.nodes, &[2.0, 2.0, 2.0])?;

    // Every admin action is in the audit log, with who and from where.
    let (_, audit) = api(&fleet.hub_url, "GET", "/api/v1/audit", ADMIN, None)?;
    let actions: Vec<&str> = audit["audit"]
        .as_array()
        .context("audit")?
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    for want in [
        "version.register",
        "metadata.upload",
        "alias.set",
        "rollout.create",
        "rollout.promote",
        "rollout.abort",
        "rollout.rollback",
        "rollout.step",
    ] {
        assert!(actions.contains(&want), "{want} missing from {actions:?}");
    }
    let first = &audit["audit"][0];
    assert_eq!(first["actor"], "admin");
    assert!(
        first["remote"]
            .as_str()
            .unwrap_or("")
            .starts_with("127.0.0.1:"),
        "{first}"
    );
    // Steps on a timer: a rollout (back to v1) in steps 34 then 100, one second apart,
    // reaches every node without a manual step.
    fleet.action(&id, "promote")?;
    let (s, v) = api(
        &fleet.hub_url,
        "POST",
        "/api/v1/rollouts",
        ADMIN,
        Some(json!({
            "model": "wat", "version": "1.0.0", "steps": [34, 100], "step_interval_s": 1,
        })),
    )?;
    assert_eq!(s, 200, "{v}");
    let timed = v["id"].as_str().context("id")?.to_owned();
    // The timer takes the second step by itself (at 34% every node may already be in the
    // canary, so serving v1 alone does not show the step).
    wait_until("the timer to take step 2", || {
        api(
            &fleet.hub_url,
            "GET",
            &format!("/api/v1/rollouts/{timed}"),
            ADMIN,
            None,
        )
        .map(|(_, v)| (v["step"].as_i64(), v["percent"].as_i64()) == (Some(1), Some(100)))
        .unwrap_or(false)
    })?;
    wait_serving(&fleet.nodes, &[1.0, 1.0, 1.0])?;
    fleet.action(&timed, "promote")?;

    // A second hub on the same database (PostgreSQL): an action through it reaches the nodes
    // long-polling the first one.
    if fleet.database.starts_with("postgres") {
        let port = free_port()?;
        let _replica = Fleet::start_hub(fleet.dir.path(), &fleet.database.clone(), port)?;
        let replica = format!("http://127.0.0.1:{port}");
        let (s, v) = api(
            &replica,
            "PUT",
            "/api/v1/models/wat/aliases/production",
            ADMIN,
            Some(json!({"version": "2.0.0"})),
        )?;
        assert_eq!(s, 200, "{v}");
        wait_serving(&fleet.nodes, &[2.0, 2.0, 2.0])?;
    }
    Ok(())
}

#[test]
fn fleet_on_sqlite() -> Result<()> {
    let dir = tempfile::tempdir()?;
    scenario(&format!("sqlite://{}", dir.path().join("hub.db").display()))
}

/// PostgreSQL from `CAPSULE_TEST_POSTGRES_URL` (`.ci/run` installs and starts Debian's
/// server and sets it); each run gets a fresh database.
#[test]
fn fleet_on_postgres() -> Result<()> {
    with_postgres("fleet", scenario)
}

/// The last report of a node, once it covers generation `after` or later.
/// The hub's blob download counters: (capsule, image, code).
fn blob_downloads(hub: &str) -> Result<(u64, u64, u64)> {
    let text = http()
        .get(format!("{hub}/metrics"))
        .bearer_auth(ADMIN)
        .send()?
        .text()?;
    Ok(capsule_tests::blob_downloads(&text))
}

/// A hub on SQLite in `dir`, and its base URL.
fn sqlite_hub(dir: &Path) -> Result<(Proc, String)> {
    let database = format!("sqlite://{}", dir.join("hub.db").display());
    let port = free_port()?;
    let hub = start_hub(dir, &database, port, &[])?;
    Ok((hub, format!("http://127.0.0.1:{port}")))
}

/// `POST /api/v1/nodes/{id}/register` with `labels` and `token`: the status.
fn register(hub: &str, id: &str, token: &str, labels: Value) -> Result<u16> {
    let (status, _) = api(
        hub,
        "POST",
        &format!("/api/v1/nodes/{id}/register"),
        token,
        Some(json!({ "labels": labels })),
    )?;
    Ok(status)
}

/// Issue 16's probe: 50 `register` calls with unchanged labels bumped the state generation 50
/// times, waking every long-poll of the fleet each time. Now only a new node or new labels do.
#[test]
fn registering_unchanged_labels_wakes_no_one() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_hub, hub) = sqlite_hub(dir.path())?;
    let register = |labels: Value| -> Result<()> {
        let status = register(&hub, "n1", ADMIN, labels)?;
        anyhow::ensure!(status == 200, "register: {status}");
        Ok(())
    };
    let before = generation(&hub)?;
    register(json!({"site": "a"}))?;
    let registered = generation(&hub)?;
    assert_eq!(registered, before + 1, "a new node is a change");
    for _ in 0..50 {
        register(json!({"site": "a"}))?;
    }
    assert_eq!(
        generation(&hub)?,
        registered,
        "the same labels again change nothing"
    );
    register(json!({"site": "b"}))?;
    assert_eq!(generation(&hub)?, registered + 1, "new labels are a change");
    Ok(())
}

/// Issue 16's probe: a cross-origin `text/plain` POST carrying the dashboard's session cookie
/// minted a node token (CSRF). The cookie now only reads; writes need a bearer token.
#[test]
fn the_dashboard_session_cannot_write() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_hub, hub) = sqlite_hub(dir.path())?;
    let cookie = format!("capsule_session={ADMIN}");
    let forged = http()
        .post(format!("{hub}/api/v1/nodes/x/token"))
        .header("cookie", &cookie)
        .header("origin", "http://127.0.0.1:1")
        .header("content-type", "text/plain")
        .body("")
        .send()?;
    assert_eq!(forged.status().as_u16(), 403);
    let reads = http()
        .get(format!("{hub}/api/v1/nodes"))
        .header("cookie", &cookie)
        .send()?;
    assert_eq!(reads.status().as_u16(), 200, "the session still reads");
    let (status, body) = api(&hub, "POST", "/api/v1/nodes/x/token", ADMIN, None)?;
    assert_eq!(status, 200, "a bearer token writes: {body}");
    Ok(())
}

/// Issue 16's probe at the hub: model names a node chooses (in its telemetry and its report)
/// became label values of the hub's metrics, a series per made-up name, kept forever. Only
/// registered model versions label series now; the rest count under `model=""`.
#[test]
fn made_up_model_names_add_no_hub_series() -> Result<()> {
    use capsule_format::telemetry::{ModelWindow, TelemetryBatch};
    let dir = tempfile::tempdir()?;
    let (_hub, hub) = sqlite_hub(dir.path())?;
    let token = node_token(&hub, "n1")?;
    assert_eq!(register(&hub, "n1", &token, json!({}))?, 200);
    let batches: Vec<TelemetryBatch> = (1..=20)
        .map(|seq| TelemetryBatch {
            node_id: "n1".into(),
            seq,
            window_start_ms: 1,
            window_end_ms: 2,
            models: (0..10)
                .map(|i| ModelWindow {
                    model: format!("made-up-{seq}-{i}"),
                    version: "1".into(),
                    requests: 1,
                    ..ModelWindow::default()
                })
                .collect(),
            ..TelemetryBatch::default()
        })
        .collect();
    let (status, body) = api(
        &hub,
        "POST",
        "/api/v1/telemetry",
        &token,
        Some(json!({ "batches": batches })),
    )?;
    anyhow::ensure!(status == 200, "telemetry: {status} {body}");
    let (status, body) = api(
        &hub,
        "POST",
        "/api/v1/nodes/n1/report",
        &token,
        Some(json!({ "generation": 0, "models": (0..50).map(|i| json!({
            "model": format!("reported-{i}"), "version": "1", "state": format!("state-{i}")
        })).collect::<Vec<_>>() })),
    )?;
    anyhow::ensure!(status == 200, "report: {status} {body}");
    let metrics = http()
        .get(format!("{hub}/metrics"))
        .bearer_auth(ADMIN)
        .send()?
        .text()?;
    assert!(!metrics.contains("made-up-"), "{metrics}");
    assert!(!metrics.contains("reported-"), "{metrics}");
    assert!(
        metrics.contains("capsule_hub_fleet_requests_total{model=\"\",version=\"\"} 200"),
        "{metrics}"
    );
    assert!(
        metrics.contains("capsule_hub_node_models{model=\"\",state=\"other\",version=\"\"} 50"),
        "{metrics}"
    );
    // A report naming more model versions than a node serves is refused whole: the hub keeps
    // a row per node and version.
    let (status, body) = api(
        &hub,
        "POST",
        "/api/v1/nodes/n1/report",
        &token,
        Some(
            json!({ "generation": 0, "models": (0..=capsule_format::hub::MAX_REPORTED_MODELS).map(|i| json!({
            "model": format!("many-{i}"), "version": "1", "state": "serving"
        })).collect::<Vec<_>>() }),
        ),
    )?;
    assert_eq!(
        (status, body),
        (
            413,
            json!({"error": "a report of 1025 model versions (at most 1024)"})
        )
    );
    let metrics = http()
        .get(format!("{hub}/metrics"))
        .bearer_auth(ADMIN)
        .send()?
        .text()?;
    assert!(
        metrics.contains("capsule_hub_node_models{model=\"\",state=\"other\",version=\"\"} 50"),
        "the refused report changed nothing: {metrics}"
    );
    Ok(())
}

/// A batch of 2,500 predictions and 1,500 labels is stored in bounded transactions (issue 16:
/// one transaction per batch of any size held SQLite's write lock), and a batch sent twice
/// still counts once.
#[test]
fn a_large_batch_is_stored_once_in_bounded_transactions() -> Result<()> {
    use capsule_format::telemetry::{Feedback, ModelWindow, Prediction, TelemetryBatch};
    let dir = tempfile::tempdir()?;
    let (_hub, hub) = sqlite_hub(dir.path())?;
    let token = node_token(&hub, "n1")?;
    let batch = TelemetryBatch {
        node_id: "n1".into(),
        seq: 1,
        window_start_ms: 1,
        window_end_ms: 2,
        models: vec![ModelWindow {
            model: "m".into(),
            version: "1".into(),
            requests: 7,
            predictions: (0..2500)
                .map(|i| Prediction {
                    id: format!("r{i}"),
                    class: "a".into(),
                })
                .collect(),
            ..ModelWindow::default()
        }],
        feedback: (0..1500)
            .map(|i| Feedback {
                model: "m".into(),
                id: format!("r{i}"),
                label: "a".into(),
            })
            .collect(),
        ..TelemetryBatch::default()
    };
    for _ in 0..2 {
        let (status, body) = api(
            &hub,
            "POST",
            "/api/v1/telemetry",
            &token,
            Some(json!({ "batches": [&batch] })),
        )?;
        assert_eq!((status, &body["acked"]), (200, &json!([1])), "{body}");
    }
    let metrics = http()
        .get(format!("{hub}/metrics"))
        .bearer_auth(ADMIN)
        .send()?
        .text()?;
    for line in [
        "capsule_hub_telemetry_batches_total{result=\"stored\"} 1",
        "capsule_hub_telemetry_batches_total{result=\"duplicate\"} 1",
        "capsule_hub_fleet_requests_total{model=\"\",version=\"\"} 7",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    Ok(())
}

/// Issue 16: a node token could write as fast as the hub answered. Writes are limited per
/// node (a burst of 120, then 5 per second): 200 registrations at once get 429 past the
/// burst, other nodes and admins are not held back.
#[test]
fn a_node_writing_too_fast_gets_429() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_hub, hub) = sqlite_hub(dir.path())?;
    let (n1, n2) = (node_token(&hub, "n1")?, node_token(&hub, "n2")?);
    let statuses: Vec<u16> = (0..200)
        .map(|_| register(&hub, "n1", &n1, json!({})))
        .collect::<Result<_>>()?;
    // The burst passes whole; past it, refusals (the bucket regains 5 a second, so the 80
    // calls after the burst are refused unless they take 16 s).
    assert!(statuses[..120].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert!(limited > 0, "none of 200 refused: {statuses:?}");
    assert_eq!(
        register(&hub, "n2", &n2, json!({}))?,
        200,
        "another node has its own bucket"
    );
    assert_eq!(
        register(&hub, "n1", ADMIN, json!({}))?,
        200,
        "admins are not limited"
    );
    Ok(())
}

/// Issue 16: node tokens could not be revoked (a stolen device kept its access). An admin's
/// `DELETE /api/v1/nodes/{id}/token` removes them all; the next request with one is 401.
#[test]
fn a_revoked_node_token_is_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_hub, hub) = sqlite_hub(dir.path())?;
    let (n1, n2) = (node_token(&hub, "n1")?, node_token(&hub, "n2")?);
    let register = |id: &str, token: &str| register(&hub, id, token, json!({}));
    assert_eq!(register("n1", &n1)?, 200);
    let revoke = |token: &str| api(&hub, "DELETE", "/api/v1/nodes/n1/token", token, None);
    assert_eq!(revoke(&n2)?.0, 403, "a node cannot revoke tokens");
    let tokens = |token: &str| api(&hub, "GET", "/api/v1/tokens", token, None);
    assert_eq!(tokens(&n1)?.0, 403, "a node cannot list tokens");
    let (status, listed) = tokens(ADMIN)?;
    assert_eq!(status, 200, "{listed}");
    let listed: Vec<capsule_format::hub::TokenInfo> =
        serde_json::from_value(listed["tokens"].clone())?;
    let mut nodes: Vec<&str> = listed
        .iter()
        .filter(|t| t.kind == capsule_format::hub::Role::Node)
        .map(|t| t.node_id.as_str())
        .collect();
    nodes.sort_unstable();
    assert_eq!(nodes, ["n1", "n2"], "{listed:?}");
    assert!(
        listed
            .iter()
            .any(|t| t.kind == capsule_format::hub::Role::Admin),
        "{listed:?}"
    );
    assert!(
        listed.iter().all(|t| t.hash_prefix.len() == 8),
        "{listed:?}"
    );
    let text = serde_json::to_string(&listed)?;
    assert!(
        !text.contains(&n1) && !text.contains(&n2),
        "tokens are never listed"
    );
    let (status, body) = revoke(ADMIN)?;
    assert_eq!((status, body["revoked"].as_u64()), (200, Some(1)), "{body}");
    assert_eq!(register("n1", &n1)?, 401);
    assert_eq!(register("n2", &n2)?, 200, "other nodes keep their tokens");
    let (_, listed) = tokens(ADMIN)?;
    let left: Vec<&str> = listed["tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t["node_id"].as_str())
                .filter(|n| !n.is_empty())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(left, ["n2"], "{listed}");
    Ok(())
}

/// Every refusal is the hub's JSON error, axum's own rejections included (a body over the
/// route's limit, a query that does not parse, a method the route does not take, a path no
/// route has), typed by the hub's extractors rather than read back from their bodies.
#[test]
fn every_refusal_is_a_json_error() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (_hub, hub) = sqlite_hub(dir.path())?;
    // Each case on its own connection: the hub closes one whose body it refused unread
    // (413), and a pooled client could write the next request into it (broken pipe).
    let c = reqwest::blocking::Client::builder()
        .pool_max_idle_per_host(0)
        .build()?;
    let cases: Vec<(&str, reqwest::blocking::RequestBuilder, u16)> = vec![
        (
            "a body over the 4 MiB default limit",
            c.post(format!("{hub}/api/v1/rollouts"))
                .body(vec![b' '; 5 << 20]),
            413,
        ),
        (
            "a generation that is not a number",
            c.get(format!("{hub}/api/v1/nodes/n1/desired?after=soon")),
            400,
        ),
        (
            "a method the route does not take",
            c.delete(format!("{hub}/api/v1/models")),
            405,
        ),
        ("no such route", c.get(format!("{hub}/api/v2/models")), 404),
        (
            "a comparison without versions",
            c.get(format!("{hub}/api/v1/models/m/compare")),
            400,
        ),
    ];
    for (what, req, want) in cases {
        let resp = req.bearer_auth(ADMIN).send()?;
        let status = resp.status().as_u16();
        let kind = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let body: Value = resp.json().unwrap_or(Value::Null);
        assert_eq!(status, want, "{what}: {body}");
        assert!(kind.starts_with("application/json"), "{what}: {kind}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{what}: {body}"
        );
    }
    Ok(())
}

/// Admin tokens rotate through the API and the CLI: issue a new one, move to it, revoke the
/// old one by its hash prefix; the last admin token cannot be revoked; node tokens can be
/// revoked one by one too.
#[test]
fn admin_tokens_rotate_through_the_api() -> Result<()> {
    use capsule_format::hub::{IssuedToken, Role, TokenList, TokenRevoked};
    let dir = tempfile::tempdir()?;
    let (_hub, hub) = sqlite_hub(dir.path())?;
    let cli = |token: &str, args: &[&str]| -> Result<String> {
        let mut all = vec!["tokens", "--hub", &hub, "--token", token];
        all.extend_from_slice(args);
        run(&all)
    };
    let ops: IssuedToken = serde_json::from_str(&cli(ADMIN, &["admin", "ops@example"])?)?;
    assert_eq!(
        (ops.kind, ops.name.as_str(), ops.node.as_str()),
        (Role::Admin, "ops@example", "")
    );
    assert!(
        ops.token.starts_with("hubadmin_") && ops.hash_prefix.len() == 8,
        "{ops:?}"
    );
    assert_eq!(api(&hub, "GET", "/api/v1/models", &ops.token, None)?.0, 200);
    for bad in ["hub", "node:n1", "", "two words", &"x".repeat(65)] {
        let (status, body) = api(
            &hub,
            "POST",
            "/api/v1/tokens",
            ADMIN,
            Some(json!({"name": bad})),
        )?;
        assert_eq!(status, 400, "{bad:?}: {body}");
    }
    let (status, _) = api(
        &hub,
        "POST",
        "/api/v1/tokens",
        &node_token(&hub, "n0")?,
        Some(json!({"name": "x"})),
    )?;
    assert_eq!(status, 403, "a node cannot issue tokens");

    let listed: TokenList = serde_json::from_str(&cli(&ops.token, &["list"])?)?;
    let first = listed
        .tokens
        .iter()
        .find(|t| t.kind == Role::Admin && t.name == "admin")
        .context("the start-up admin token is listed")?;
    let revoked: TokenRevoked =
        serde_json::from_str(&cli(&ops.token, &["revoke", &first.hash_prefix])?)?;
    assert_eq!(&revoked.revoked, first);
    assert_eq!(
        api(&hub, "GET", "/api/v1/models", ADMIN, None)?.0,
        401,
        "revoked"
    );

    let last = cli(&ops.token, &["revoke", &ops.hash_prefix]).unwrap_err();
    assert!(
        format!("{last:#}").contains("409") && format!("{last:#}").contains("last admin token"),
        "{last:#}"
    );
    for (prefix, want) in [("abc", 400), ("ABCDEF12", 400), ("00000000", 404)] {
        let (status, body) = api(
            &hub,
            "DELETE",
            &format!("/api/v1/tokens/{prefix}"),
            &ops.token,
            None,
        )?;
        assert_eq!(status, want, "{prefix}: {body}");
    }

    let n1: IssuedToken = serde_json::from_str(&cli(&ops.token, &["node", "n1"])?)?;
    assert_eq!(
        (n1.kind, n1.node.as_str(), n1.name.as_str()),
        (Role::Node, "n1", "node:n1")
    );
    assert_eq!(register(&hub, "n1", &n1.token, json!({}))?, 200);
    cli(&ops.token, &["revoke", &n1.hash_prefix])?;
    assert_eq!(register(&hub, "n1", &n1.token, json!({}))?, 401);

    let (_, audit) = api(&hub, "GET", "/api/v1/audit", &ops.token, None)?;
    let actions: Vec<(String, String)> = audit["audit"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["actor"].as_str().unwrap_or("").to_owned(),
                        e["action"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .filter(|(_, action)| action.starts_with("token."))
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        actions,
        [
            ("admin".to_owned(), "token.issue".to_owned()),
            ("ops@example".to_owned(), "token.revoke".to_owned()),
            ("ops@example".to_owned(), "token.revoke".to_owned()),
        ],
        "{audit}"
    );
    Ok(())
}

/// The hub over TLS (rustls): a node trusting the hub's CA syncs and serves; the publisher's
/// commands take the CA too; a client that does not trust it is refused.
#[test]
fn hub_over_tls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let root_dir = dir.path().to_path_buf();
    let p = |n: &str| root_dir.join(n).to_string_lossy().into_owned();
    // A test CA and a server certificate for 127.0.0.1 signed by it.
    std::fs::write(
        p("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )?;
    for args in [
        vec![
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=capsule-test-ca",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
        vec![
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "hub.key.pem",
            "-out",
            "hub.csr",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            "hub.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "hub.cert.pem",
            "-extfile",
            "ext.cnf",
        ],
    ] {
        let status = Command::new("openssl")
            .args(&args)
            .current_dir(&root_dir)
            .stderr(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("openssl {args:?} failed");
        }
    }
    publisher_keys(&root_dir, &[])?;
    let bytes = wat_capsule(&WatCapsule {
        name: "wat".into(),
        version: semver::Version::new(1, 0, 0),
        y: 1.0,
        golden_y: None,
    })?;
    std::fs::write(p("wat-1.0.0.capsule.wasm"), bytes)?;
    let port = free_port()?;
    let hub = Proc::spawn(&[
        "hub".into(),
        "--database".into(),
        format!("sqlite://{}", p("hub.db")),
        "--blobs".into(),
        p("blobs"),
        "--http".into(),
        format!("127.0.0.1:{port}"),
        "--admin-token".into(),
        ADMIN.into(),
        "--tls-cert".into(),
        p("hub.cert.pem"),
        "--tls-key".into(),
        p("hub.key.pem"),
    ])?;
    let url = hub
        .address("capsule hub:")
        .map(|a| a.replace("http://", "https://"))?;
    assert_eq!(url, format!("https://127.0.0.1:{port}"));

    // A client without the CA cannot talk to it; plain HTTP gets no answer.
    assert!(
        reqwest::blocking::Client::new()
            .get(format!("{url}/api/v1/health"))
            .send()
            .is_err()
    );
    assert!(
        http()
            .get(format!("http://127.0.0.1:{port}/api/v1/health"))
            .send()
            .is_err()
    );
    let pem = std::fs::read(p("ca.pem"))?;
    let client = reqwest::blocking::Client::builder()
        .use_rustls_tls()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem)?)
        .build()?;
    let token: Value = client
        .post(format!("{url}/api/v1/nodes/node-a/token"))
        .bearer_auth(ADMIN)
        .send()?
        .json()?;
    let token = token["token"].as_str().context("token")?.to_owned();

    let models = root_dir.join("models");
    std::fs::create_dir_all(&models)?;
    let node = Proc::spawn(&[
        "serve".into(),
        "--models".into(),
        models.to_string_lossy().into_owned(),
        "--http".into(),
        "127.0.0.1:0".into(),
        "--no-grpc".into(),
        "--instances".into(),
        "1".into(),
        "--poll-interval-ms".into(),
        "0".into(),
        "--hub".into(),
        url.clone(),
        "--hub-token".into(),
        token,
        "--node-id".into(),
        "node-a".into(),
        "--trusted-root".into(),
        p("root.json"),
        "--hub-ca".into(),
        p("ca.pem"),
    ])?;
    let node_url = node.address("REST on")?;
    run(&[
        "sign",
        "--targets",
        &p("targets.json"),
        "--add",
        &p("wat-1.0.0.capsule.wasm"),
        "--key",
        &p("pub1.key"),
        "--key",
        &p("pub2.key"),
    ])?;
    run(&[
        "push",
        &p("wat-1.0.0.capsule.wasm"),
        "--hub",
        &url,
        "--token",
        ADMIN,
        "--ca",
        &p("ca.pem"),
        "--targets",
        &p("targets.json"),
        "--alias",
        "production",
    ])?;
    wait_until("the node to serve v1 over TLS", || {
        served_y(&node_url) == Some(1.0)
    })
    .with_context(|| format!("node log: {:?}", node.log.lock().map(|l| l.join("\n"))))?;
    Ok(())
}

/// docs/runbooks/hub-backup-restore.md on SQLite, as an operator would follow it: an online
/// backup (SQLite's backup API, the runbook's command, while the hub serves) and a copy of
/// the blobs; a version published after the backup; the hub's database and blobs lost and
/// restored from the backup. The node, whose rollback floor is the newer targets metadata,
/// refuses the restored older state and keeps serving what it has; it learns of the
/// restored hub at once (its long-poll asks for a generation the restored database has not
/// reached, which the hub answers without waiting). Pushing again what was published after
/// the backup, with the latest targets metadata, brings the fleet back in sync.
#[test]
fn a_hub_restored_from_a_backup_takes_its_fleet_back() -> Result<()> {
    const BACKUP: &str = r#"python3 -c 'import sqlite3; sqlite3.connect("hub.db").backup(sqlite3.connect("backup/hub.db"))'"#;
    const BLOBS: &str = "cp -a hub-blobs/. backup/hub-blobs/";
    let runbook = std::fs::read_to_string(repo().join("docs/runbooks/hub-backup-restore.md"))?;
    assert!(
        runbook.contains(BACKUP) && runbook.contains(BLOBS),
        "the runbook's commands changed"
    );
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    publisher_keys(d, &[])?;
    for (v, y) in [("1.0.0", 1.0), ("2.0.0", 2.0)] {
        let bytes = wat_capsule(&WatCapsule {
            name: "wat".into(),
            version: semver::Version::parse(v)?,
            y,
            golden_y: None,
        })?;
        std::fs::write(d.join(format!("wat-{v}.capsule.wasm")), bytes)?;
    }
    let port = free_port()?;
    let hub = format!("http://127.0.0.1:{port}");
    let database = format!("sqlite://{}", d.join("hub.db").display());
    let blobs = d.join("hub-blobs").to_string_lossy().into_owned();
    let start = || -> Result<Proc> {
        let p = Proc::spawn(&[
            "hub",
            "--database",
            &database,
            "--blobs",
            &blobs,
            "--http",
            &format!("127.0.0.1:{port}"),
            "--admin-token",
            ADMIN,
        ])?;
        p.address("capsule hub:")?;
        Ok(p)
    };
    let mut hub_proc = start()?;
    let publish = |v: &str| {
        sign_and_push(
            d,
            &hub,
            &d.join(format!("wat-{v}.capsule.wasm")),
            &d.join("targets.json"),
            &["--alias", "production"],
        )
    };
    publish("1.0.0")?;
    let token = node_token(&hub, "edge")?;
    let (_node, node) = start_synced_node(d, &hub, "edge", &token, &[])?;
    wait_until("the node to serve 1.0.0", || served_y(&node) == Some(1.0))?;

    // The backup, while the hub serves.
    std::fs::create_dir_all(d.join("backup/hub-blobs"))?;
    for command in [BACKUP, BLOBS] {
        let status = Command::new("bash")
            .args(["-c", command])
            .current_dir(d)
            .status()?;
        assert!(status.success(), "{command}");
    }
    publish("2.0.0")?;
    wait_until("the node to serve 2.0.0", || served_y(&node) == Some(2.0))?;

    // The hub's database and blobs are lost; restore them (the runbook's restore step).
    hub_proc.kill();
    for f in ["hub.db", "hub.db-wal", "hub.db-shm"] {
        let _ = std::fs::remove_file(d.join(f));
    }
    std::fs::remove_dir_all(d.join("hub-blobs"))?;
    std::fs::copy(d.join("backup/hub.db"), d.join("hub.db"))?;
    let status = Command::new("cp")
        .args(["-a", "backup/hub-blobs", "hub-blobs"])
        .current_dir(d)
        .status()?;
    assert!(status.success());
    let restored_at = Instant::now();
    let _hub_proc = start()?;
    // The restored database holds the node's report from the backup's time (serving 1.0.0):
    // wait for the node's own report on the restored state.
    let mut report = Value::Null;
    wait_until("the node's report on the restored hub", || {
        let Ok((_, v)) = api(&hub, "GET", "/api/v1/nodes", ADMIN, None) else {
            return false;
        };
        report = v["nodes"][0]["report"].clone();
        report["models"][0]["state"] == "verify_failed"
    })
    .with_context(|| format!("last report: {report}"))?;
    let learned = restored_at.elapsed();
    assert!(
        learned < Duration::from_secs(20),
        "the node took {learned:?} to learn of the restored hub (a long-poll waited out)"
    );
    let m = &report["models"][0];
    assert!(
        m["detail"].as_str().unwrap_or("").contains("5.6.4"),
        "{report}"
    );
    assert_eq!(
        served_y(&node),
        Some(2.0),
        "the node keeps serving what it has"
    );

    // Push again what was published after the backup, with the latest targets metadata.
    publish("2.0.0")?;
    let after = generation(&hub)?;
    let report = wait_report(&hub, "edge", after)?;
    assert_eq!(report["models"][0]["state"], "serving", "{report}");
    assert_eq!(served_y(&node), Some(2.0));
    Ok(())
}

/// A hub told to stop (SIGTERM, as Kubernetes and systemd send) answers the long-polls its
/// nodes hold at once instead of letting them run out (25 s), so it exits within its grace
/// period; the node polls again and keeps serving.
#[test]
fn a_stopping_hub_does_not_wait_for_long_polls() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    publisher_keys(d, &[])?;
    let (mut hub_proc, hub) = sqlite_hub(d)?;
    let token = node_token(&hub, "edge")?;
    let (_node, _) = start_synced_node(d, &hub, "edge", &token, &[])?;
    // The node has registered, fetched its state and holds a long-poll.
    let after = generation(&hub)?;
    wait_report(&hub, "edge", after)?;
    std::thread::sleep(Duration::from_millis(300));
    let stopping = Instant::now();
    let status = Command::new("kill")
        .args(["-TERM", &hub_proc.child.id().to_string()])
        .status()?;
    assert!(status.success());
    let exit = loop {
        if let Some(exit) = hub_proc.child.try_wait()? {
            break exit;
        }
        if stopping.elapsed() > Duration::from_secs(20) {
            bail!("the hub did not stop within 20 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit}");
    eprintln!("the hub stopped {:?} after SIGTERM", stopping.elapsed());
    Ok(())
}
