//! The hub and a fleet of `capsule serve` processes on loopback, end to end: signed
//! publishing, a 34% canary reaching exactly the hashed subset, promotion, a version that
//! fails its golden probe (refused by the nodes, the rollout aborts itself), rollback, the hub
//! killed and restarted mid-rollout, a node offline during a rollout catching up; on SQLite
//! and on PostgreSQL. Then one test per attack on the update path.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsule_tests::{WatCapsule, wat_capsule};
use serde_json::{Value, json};

const ADMIN: &str = "test-admin-token";

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_capsule")
}

fn cache() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/capsule-test-cache")
}

fn run(args: &[&str]) -> Result<String> {
    let out = Command::new(bin())
        .args(args)
        .env("CAPSULE_CACHE_DIR", cache())
        .output()?;
    if !out.status.success() {
        bail!(
            "capsule {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A child process whose stderr is collected, killed on drop.
struct Proc {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    fn spawn(args: &[String]) -> Result<Proc> {
        let mut child = Command::new(bin())
            .args(args)
            .env("CAPSULE_CACHE_DIR", cache())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Ok(mut l) = sink.lock() {
                    l.push(line);
                }
            }
        });
        Ok(Proc { child, log })
    }

    /// Waits for a stderr line containing `marker`, returns the `http://ADDR` after it.
    fn address(&self, marker: &str) -> Result<String> {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Ok(lines) = self.log.lock()
                && let Some(line) = lines.iter().find(|l| l.contains(marker))
                && let Some(at) = line.find("http://")
            {
                let rest = &line[at..];
                let end = rest.find([';', ' ', ',']).unwrap_or(rest.len());
                return Ok(rest[..end].to_owned());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "no {marker:?} line; stderr: {:?}",
            self.log.lock().map(|l| l.clone())
        )
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::new()
}

fn api(
    hub: &str,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> Result<(u16, Value)> {
    let c = http();
    let mut req = match method {
        "GET" => c.get(format!("{hub}{path}")),
        "PUT" => c.put(format!("{hub}{path}")),
        _ => c.post(format!("{hub}{path}")),
    }
    .bearer_auth(token);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send()?;
    let status = resp.status().as_u16();
    Ok((status, resp.json().unwrap_or(Value::Null)))
}

/// The `y` a node answers for model `wat`, or None when it does not serve it.
fn served_y(node: &str) -> Option<f64> {
    let body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.0]}]});
    let resp = http()
        .post(format!("{node}/v2/models/wat/infer"))
        .json(&body)
        .send()
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json::<Value>().ok()?["outputs"][0]["data"][0].as_f64()
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) -> Result<()> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(30) {
        if ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out waiting for {what}")
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
    hub: Proc,
    nodes: Vec<(String, String)>,
    node_procs: Vec<Proc>,
}

impl Fleet {
    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).to_string_lossy().into_owned()
    }

    fn start_hub(dir: &Path, database: &str, port: u16) -> Result<Proc> {
        let args: Vec<String> = vec![
            "hub".into(),
            "--database".into(),
            database.into(),
            "--blobs".into(),
            dir.join("blobs").to_string_lossy().into_owned(),
            "--http".into(),
            format!("127.0.0.1:{port}"),
            "--admin-token".into(),
            ADMIN.into(),
        ];
        let p = Proc::spawn(&args)?;
        p.address("capsule hub:")?;
        Ok(p)
    }

    fn start_node(&self, id: &str, token: &str) -> Result<(Proc, String)> {
        let models = self.dir.path().join(format!("models-{id}"));
        std::fs::create_dir_all(&models)?;
        let args: Vec<String> = [
            "serve",
            "--models",
            &models.to_string_lossy(),
            "--http",
            "127.0.0.1:0",
            "--no-grpc",
            "--instances",
            "1",
            "--poll-interval-ms",
            "0",
            "--hub",
            &self.hub_url,
            "--hub-token",
            token,
            "--node-id",
            id,
            "--label",
            "site=lab",
            "--trusted-root",
            &self.path("root.json"),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let p = Proc::spawn(&args)?;
        let url = p.address("REST on")?;
        Ok((p, url))
    }

    fn start(database: &str) -> Result<Fleet> {
        let dir = tempfile::tempdir()?;
        let p = |n: &str| dir.path().join(n).to_string_lossy().into_owned();
        for k in ["root", "pub1", "pub2"] {
            run(&["keys", "generate", &p(k)])?;
        }
        run(&[
            "keys",
            "root",
            "--root-key",
            &p("root.pub"),
            "--targets-key",
            &p("pub1.pub"),
            "--targets-key",
            &p("pub2.pub"),
            "--targets-threshold",
            "2",
            "--sign",
            &p("root.key"),
            "-o",
            &p("root.json"),
        ])?;
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
            hub,
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
        let (status, v) = api(
            &self.hub_url,
            "POST",
            &format!("/api/v1/nodes/{id}/token"),
            ADMIN,
            None,
        )?;
        if status != 200 {
            bail!("token for {id}: {status} {v}");
        }
        Ok(v["token"].as_str().unwrap_or_default().to_owned())
    }

    /// Signs the version into the targets metadata (two publisher keys) and pushes it.
    fn publish(&self, version: &str, alias: Option<&str>) -> Result<()> {
        let capsule = self.path(&format!("wat-{version}.capsule.wasm"));
        let targets = self.path("targets.json");
        run(&[
            "sign",
            "--targets",
            &targets,
            "--add",
            &capsule,
            "--key",
            &self.path("pub1.key"),
            "--key",
            &self.path("pub2.key"),
        ])?;
        let mut args = vec![
            "push",
            capsule.as_str(),
            "--hub",
            self.hub_url.as_str(),
            "--token",
            ADMIN,
            "--targets",
            targets.as_str(),
        ];
        if let Some(a) = alias {
            args.extend(["--alias", a]);
        }
        run(&args)?;
        Ok(())
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

    // Publish v1 as production: every node serves it.
    fleet.publish("1.0.0", Some("production"))?;
    wait_serving(&fleet.nodes, &[1.0, 1.0, 1.0])?;

    // Canary v2 at 34%: exactly the nodes whose bucket is below 34.
    fleet.publish("2.0.0", None)?;
    let r = fleet.rollout("2.0.0", "34,100", 0.5)?;
    let id = r["id"].as_str().context("id")?.to_owned();
    let want: Vec<f64> = fleet
        .nodes
        .iter()
        .map(|(n, _)| {
            if capsule_format::hub::bucket(&id, n) < 34 {
                2.0
            } else {
                1.0
            }
        })
        .collect();
    wait_serving(&fleet.nodes, &want)?;
    std::thread::sleep(Duration::from_millis(500));
    for ((n, url), y) in fleet.nodes.iter().zip(&want) {
        assert_eq!(served_y(url), Some(*y), "{n} at 34%");
    }

    // Promote: everyone.
    fleet.action(&id, "promote")?;
    wait_serving(&fleet.nodes, &[2.0, 2.0, 2.0])?;

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
    let want: Vec<f64> = fleet
        .nodes
        .iter()
        .map(|(n, _)| {
            if capsule_format::hub::bucket(&id, n) < 34 {
                2.0
            } else {
                1.0
            }
        })
        .collect();
    wait_serving(&fleet.nodes, &want)?;
    fleet.hub.kill();
    std::thread::sleep(Duration::from_millis(500));
    for ((n, url), y) in fleet.nodes.iter().zip(&want) {
        assert_eq!(served_y(url), Some(*y), "{n} serves while the hub is down");
    }
    fleet.hub = Fleet::start_hub(fleet.dir.path(), &fleet.database.clone(), fleet.hub_port)?;

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
    let Ok(url) = std::env::var("CAPSULE_TEST_POSTGRES_URL") else {
        if std::env::var_os("CI").is_some() {
            bail!("CAPSULE_TEST_POSTGRES_URL is not set in CI");
        }
        eprintln!("skipped: set CAPSULE_TEST_POSTGRES_URL=postgres://... (as .ci/run does)");
        return Ok(());
    };
    let db = format!("capsule_test_{}", std::process::id());
    let admin_url = url.clone();
    let status = Command::new("psql")
        .args([&admin_url, "-q", "-c", &format!("CREATE DATABASE {db}")])
        .status()?;
    if !status.success() {
        bail!("cannot create database {db} with psql at {admin_url}");
    }
    let base = url.rsplit_once('/').map(|(b, _)| b).unwrap_or(&url);
    let result = scenario(&format!("{base}/{db}"));
    let _ = Command::new("psql")
        .args([
            &admin_url,
            "-q",
            "-c",
            &format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"),
        ])
        .status();
    result
}
