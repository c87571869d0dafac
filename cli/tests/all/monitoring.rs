//! Telemetry, drift, feedback and alerts end to end: `capsule hub` and `capsule serve`
//! processes on loopback, a webhook receiver, headless Chromium on the dashboard, and
//! promtool on the alert rules.
//!
//! - `drift_alerts_feedback_accuracy_and_the_dashboard`: traffic drawn from the wine
//!   classifier's training set raises no alert; the same traffic with two features shifted
//!   fires the drift alert on exactly those features in the window of the shift, with one
//!   webhook per alert and one retraining trigger; back to normal traffic, the alerts resolve;
//!   feedback labels give the exact accuracy; the dashboard shows the drifting feature.
//! - `telemetry_survives_hub_outage_node_kill_and_buffer_overflow`: the hub is killed while
//!   nodes serve, a node is killed with SIGKILL and restarted, a node's small buffer
//!   overflows; afterwards the hub's totals equal what the nodes served, exactly.
//! - `the_hub_promotes_or_aborts_a_canary_on_its_health`: rollouts with `auto_promote`,
//!   judged by the hub on the canary's telemetry and feedback (SQLite and PostgreSQL).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use capsule_tests::{WatCapsule, wat_capsule};
use serde_json::{Value, json};

use crate::common::*;

/// The nodes' `--feedback-token`.
const FEEDBACK_TOKEN: &str = "test-feedback-token";

/// Webhook calls received: (path, JSON body).
type Calls = Arc<Mutex<Vec<(String, Value)>>>;

/// A minimal HTTP server that records every POST and answers 200.
fn webhook_receiver() -> Result<(String, Calls)> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let url = format!("http://{}", listener.local_addr()?);
    let calls: Calls = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&calls);
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            let mut stream = stream;
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let (head, body_start) = loop {
                let Ok(n) = stream.read(&mut chunk) else {
                    break (String::new(), 0);
                };
                if n == 0 {
                    break (String::new(), 0);
                }
                buf.extend_from_slice(&chunk[..n]);
                if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break (String::from_utf8_lossy(&buf[..at]).into_owned(), at + 4);
                }
            };
            let length = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            while buf.len() < body_start + length {
                let Ok(n) = stream.read(&mut chunk) else {
                    break;
                };
                if n == 0 {
                    break;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let path = head
                .lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .unwrap_or("")
                .to_owned();
            let body = buf
                .get(body_start..body_start + length)
                .and_then(|b| serde_json::from_slice(b).ok())
                .unwrap_or(Value::Null);
            if let Ok(mut c) = sink.lock() {
                c.push((path, body));
            }
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
        }
    });
    Ok((url, calls))
}

fn start_monitoring_hub(dir: &Path, database: &str, port: u16, monitor: &Path) -> Result<Proc> {
    start_hub(
        dir,
        database,
        port,
        &["--monitor", &monitor.to_string_lossy()],
    )
}

/// Signs `capsule` into `DIR/targets.json` and pushes it as `production`.
fn publish(dir: &Path, hub: &str, capsule: &Path) -> Result<()> {
    sign_and_push(
        dir,
        hub,
        capsule,
        &dir.join("targets.json"),
        &["--alias", "production"],
    )
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> Result<bool>) -> Result<()> {
    let started = Instant::now();
    let mut last = None;
    while started.elapsed() < timeout {
        match ok() {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out waiting for {what} (last error: {last:?})")
}

/// Sum of every series of a metric in a Prometheus text exposition.
fn metric(url: &str, name: &str) -> Result<f64> {
    let text = http().get(format!("{url}/metrics")).send()?.text()?;
    Ok(text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// Metric names in a Prometheus text exposition.
fn metric_names(url: &str) -> Result<BTreeSet<String>> {
    let text = http().get(format!("{url}/metrics")).send()?.text()?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .map(str::to_owned)
        .collect())
}

fn summary(hub: &str) -> Result<Value> {
    let (status, v) = api(hub, "GET", "/api/v1/telemetry/summary", ADMIN, None)?;
    if status != 200 {
        bail!("summary: {status} {v}");
    }
    Ok(v)
}

fn alerts(hub: &str) -> Result<Value> {
    let (status, v) = api(hub, "GET", "/api/v1/alerts", ADMIN, None)?;
    if status != 200 {
        bail!("alerts: {status} {v}");
    }
    Ok(v)
}

/// Waits until the hub has evaluated every window up to the one holding `t_ms`.
fn wait_evaluated(hub: &str, t_ms: i64, window_ms: i64) -> Result<()> {
    let end = (t_ms / window_ms + 1) * window_ms;
    wait_for(
        &format!("windows up to {end} evaluated"),
        Duration::from_secs(30),
        || Ok(alerts(hub)?["evaluated_until_ms"].as_i64().unwrap_or(0) >= end),
    )
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Sleeps until just after the next window starts, so the traffic sent next falls in one
/// window (a window with fewer values than the rule's minimum gives no verdict).
fn align_to_window(window_ms: i64) {
    let into = now_ms().rem_euclid(window_ms);
    std::thread::sleep(Duration::from_millis((window_ms - into + 50) as u64));
}

/// The wine training set: (record without its missing fields, true class label).
fn wine_rows() -> Result<Vec<(serde_json::Map<String, Value>, String)>> {
    let text = std::fs::read_to_string(repo().join("examples/wine-tabular/train.csv"))?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().context("empty CSV")?.split(',').collect();
    let mut rows = Vec::new();
    for line in lines {
        let mut record = serde_json::Map::new();
        let mut class = String::new();
        for (name, cell) in header.iter().zip(line.split(',')) {
            if *name == "class" {
                class = format!("class_{cell}");
            } else if !cell.is_empty() {
                record.insert((*name).to_owned(), json!(cell.parse::<f64>()?));
            }
        }
        rows.push((record, class));
    }
    Ok(rows)
}

/// A deterministic pseudo-random sequence (64-bit LCG).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as usize
    }
}

/// One prediction the test made: request id, row, predicted and true class.
struct Made {
    id: String,
    index: usize,
    predicted: String,
    truth: String,
}

/// Sends `requests` requests of `rows` records drawn from the training set, with
/// `shift` added to the named features; returns the predictions.
fn send_wine(
    node: &str,
    tag: &str,
    rng: &mut Lcg,
    data: &[(serde_json::Map<String, Value>, String)],
    requests: usize,
    rows: usize,
    shift: &[(&str, f64)],
) -> Result<Vec<Made>> {
    let mut made = Vec::new();
    for r in 0..requests {
        let id = format!("{tag}-{r}");
        let mut records = Vec::new();
        let mut truths = Vec::new();
        for _ in 0..rows {
            let (record, truth) = &data[rng.below(data.len())];
            let mut record = record.clone();
            for (field, delta) in shift {
                if let Some(v) = record.get(*field).and_then(Value::as_f64) {
                    record.insert((*field).to_owned(), json!(v + delta));
                }
            }
            records.push(Value::Object(record));
            truths.push(truth.clone());
        }
        let body = json!({"id": id, "inputs": [{"name": "record", "shape": [rows], "datatype": "BYTES", "data": records}]});
        let resp = http()
            .post(format!("{node}/v2/models/wine/infer"))
            .json(&body)
            .send()?;
        let status = resp.status().as_u16();
        let v: Value = resp.json()?;
        if status != 200 {
            bail!("infer: {status} {v}");
        }
        assert_eq!(v["id"], json!(id));
        let labels = v["outputs"]
            .as_array()
            .and_then(|o| o.iter().find(|o| o["name"] == "label"))
            .and_then(|o| o["data"].as_array())
            .context("no label output")?;
        for (index, (label, truth)) in labels.iter().zip(truths).enumerate() {
            made.push(Made {
                id: id.clone(),
                index,
                predicted: label.as_str().unwrap_or_default().to_owned(),
                truth,
            });
        }
    }
    Ok(made)
}

/// Firing alerts as (rule, group, feature).
fn firing(hub: &str) -> Result<BTreeSet<(String, String, String)>> {
    Ok(alerts(hub)?["alerts"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|a| a["state"] == "firing")
                .map(|a| {
                    (
                        a["rule"].as_str().unwrap_or_default().to_owned(),
                        a["group"].as_str().unwrap_or_default().to_owned(),
                        a["feature"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Metric names used in PromQL expressions (histogram suffixes removed).
fn promql_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &text[i..];
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && (rest.starts_with("capsule_") || rest.starts_with("process_")) {
            let len = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            let name = &rest[..len];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(base.to_owned());
            i += len;
        } else {
            i += 1;
        }
    }
    out
}

/// Every `expr` of a Grafana dashboard (panels and templating queries).
fn grafana_exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                match (k.as_str(), v) {
                    ("expr" | "query", Value::String(s)) => out.push(s.clone()),
                    ("query", Value::Object(q)) => {
                        if let Some(Value::String(s)) = q.get("query") {
                            out.push(s.clone());
                        }
                    }
                    _ => grafana_exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| grafana_exprs(v, out)),
        _ => {}
    }
}

/// The dashboards and alert rules in deploy/ name only metrics the node and the hub export.
fn check_deploy_metric_names(node: &str, hub: &str) -> Result<()> {
    // The hub's exposition is valid for Prometheus' own checker.
    if let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        let text = http().get(format!("{hub}/metrics")).send()?.text()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(text.as_bytes())?;
        let out = child.wait_with_output()?;
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else if in_ci() {
        bail!("CI must provide promtool");
    }
    let mut exported = metric_names(node)?;
    exported.extend(metric_names(hub)?);
    let deploy = repo().join("deploy");
    let mut sources = Vec::new();
    for dashboard in ["grafana/capsule-node.json", "grafana/capsule-hub.json"] {
        let v: Value = serde_json::from_str(&std::fs::read_to_string(deploy.join(dashboard))?)
            .with_context(|| format!("{dashboard} is not JSON"))?;
        let mut exprs = Vec::new();
        grafana_exprs(&v, &mut exprs);
        assert!(
            exprs.len() > 10,
            "{dashboard}: only {} expressions",
            exprs.len()
        );
        sources.push((dashboard.to_owned(), exprs.join("\n")));
    }
    sources.push((
        "prometheus/capsule-alerts.yml".into(),
        std::fs::read_to_string(deploy.join("prometheus/capsule-alerts.yml"))?,
    ));
    for (file, text) in &sources {
        let names = promql_names(text);
        assert!(!names.is_empty(), "{file} names no metric");
        let unknown: Vec<&String> = names.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics nobody exports: {unknown:?}"
        );
    }
    Ok(())
}

/// The dashboard in headless Chromium: logs in, finds the drift chart of `feature` marked
/// drifting, saves a screenshot.
fn check_dashboard_in_chromium(hub: &str, feature: &str) -> Result<()> {
    let script = repo().join("tests/browser/dashboard.mjs");
    let has_modules = repo()
        .join("tests/browser/node_modules/playwright-core")
        .exists();
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    if !has_modules || !Path::new(&chromium).exists() {
        if in_ci() {
            bail!("CI must provide chromium and tests/browser/node_modules (npm ci)");
        }
        eprintln!(
            "skipping the Chromium check: run `npm ci --prefix tests/browser` and install chromium"
        );
        return Ok(());
    }
    let shot = repo().join("target/screenshots/dashboard-drift.png");
    let out = Command::new("node")
        .arg(&script)
        .args([hub, ADMIN, "wine", feature])
        .arg(&shot)
        .env("CHROMIUM", &chromium)
        .output()?;
    let result = script_result("dashboard.mjs", &out)?;
    assert!(out.status.success(), "dashboard check failed: {result}");
    assert_eq!(result["ok"], json!(true), "{result}");
    assert_eq!(result["drifting"], json!(true), "{result}");
    assert_eq!(result["console_errors"], json!([]), "{result}");
    assert!(
        std::fs::metadata(&shot)?.len() > 10_000,
        "screenshot too small"
    );
    eprintln!("dashboard screenshot: {}", shot.display());
    Ok(())
}

#[test]
fn drift_alerts_feedback_accuracy_and_the_dashboard_on_sqlite() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let database = format!("sqlite://{}", dir.path().join("hub.db").display());
    drift_scenario(dir.path(), &database, true)
}

#[test]
fn drift_alerts_feedback_accuracy_on_postgres() -> Result<()> {
    let dir = tempfile::tempdir()?;
    with_postgres("drift", |database| {
        drift_scenario(dir.path(), database, false)
    })
}

/// The drift scenario; `browser`: also check the dashboard in Chromium and the deploy/
/// files (once is enough).
fn drift_scenario(d: &Path, database: &str, browser: bool) -> Result<()> {
    publisher_keys(d, &[])?;
    let wine = repo().join("examples/wine-tabular");
    let capsule = d.join("wine.capsule.wasm");
    let p = |f: &str| wine.join(f).to_string_lossy().into_owned();
    let built = run(&[
        "build",
        &p("model.onnx"),
        "--name",
        "wine",
        "--version",
        "1.0.0",
        "--pipeline",
        &p("pipeline.json"),
        "--labels",
        &p("labels.txt"),
        "--reference",
        &p("train.csv"),
        "-o",
        &capsule.to_string_lossy(),
    ])?;
    assert!(
        built.contains("reference 13 features from 124 training rows"),
        "{built}"
    );
    let inspected = run(&["inspect", &capsule.to_string_lossy()])?;
    assert!(
        inspected.contains("reference     13 drift features: alcohol (numeric, 10 bins)"),
        "{inspected}"
    );

    let (hooks, calls) = webhook_receiver()?;
    let window_ms = 2000i64;
    let monitor = d.join("monitor.toml");
    std::fs::write(
        &monitor,
        format!(
            r#"window_ms = {window_ms}
grace_ms = 1000
webhooks = ["{hooks}/alerts"]
reports_dir = "{reports}"

[drift]
psi = 0.2
ks = 0.3
min_count = 150

[errors]
rate = 0.5

[retrain]
on = ["drift"]
webhook = "{hooks}/retrain"
command = ["sh", "-c", "cp \"$1\" \"{out}/retrain-$CAPSULE_MODEL-$CAPSULE_VERSION.json\"", "sh"]
"#,
            reports = d.join("reports").display(),
            out = d.display(),
        ),
    )?;
    let port = free_port()?;
    let _hub = start_monitoring_hub(d, database, port, &monitor)?;
    let hub = format!("http://127.0.0.1:{port}");
    publish(d, &hub, &capsule)?;
    let mut nodes = Vec::new();
    let mut procs = Vec::new();
    for (id, group) in [("node-eu", "eu"), ("node-us", "us")] {
        let token = node_token(&hub, id)?;
        let label = format!("group={group}");
        let (proc_, url) = start_synced_node(
            d,
            &hub,
            id,
            &token,
            &[
                "--label",
                &label,
                "--telemetry-window-ms",
                "500",
                "--feedback-token",
                FEEDBACK_TOKEN,
            ],
        )?;
        procs.push(proc_);
        nodes.push((id, url, token));
    }
    wait_for("both nodes serving wine", Duration::from_secs(60), || {
        Ok(nodes.iter().all(|(_, url, _)| {
            http()
                .get(format!("{url}/v2/models/wine/ready"))
                .send()
                .is_ok_and(|r| r.status().is_success())
        }))
    })?;
    let data = wine_rows()?;
    let mut rng = Lcg(42);

    // 1. Traffic from the training distribution: no alert.
    let mut made: Vec<(usize, Made)> = Vec::new();
    align_to_window(window_ms);
    for (n, (id, url, _)) in nodes.iter().enumerate() {
        for m in send_wine(url, &format!("{id}-train"), &mut rng, &data, 4, 100, &[])? {
            made.push((n, m));
        }
    }
    wait_evaluated(&hub, now_ms(), window_ms)?;
    assert_eq!(firing(&hub)?, BTreeSet::new(), "alerts on training traffic");
    assert!(
        calls.lock().map(|c| c.is_empty()).unwrap_or(false),
        "webhook called on training traffic"
    );

    // 2. The same traffic with two features shifted: the drift alert fires on exactly those
    // features, in each group, in the window that holds the shifted traffic.
    let shifted = [("alcohol", 3.0), ("color_intensity", 6.0)];
    align_to_window(window_ms);
    let t_start = now_ms();
    for (id, url, _) in &nodes {
        send_wine(
            url,
            &format!("{id}-shift"),
            &mut rng,
            &data,
            4,
            100,
            &shifted,
        )?;
    }
    let t_end = now_ms();
    wait_evaluated(&hub, t_end, window_ms)?;
    let expected: BTreeSet<(String, String, String)> = ["eu", "us"]
        .iter()
        .flat_map(|g| {
            shifted
                .iter()
                .map(move |(f, _)| ("drift".to_owned(), (*g).to_owned(), (*f).to_owned()))
        })
        .collect();
    // Batches that reach the hub after their window was evaluated get it re-evaluated.
    let _ = wait_for("the drift alerts", Duration::from_secs(10), || {
        Ok(firing(&hub)? == expected)
    });
    assert_eq!(firing(&hub)?, expected);
    for a in alerts(&hub)?["alerts"].as_array().context("alerts")? {
        let (ws, we) = (
            a["window_start_ms"].as_i64().unwrap_or(0),
            a["window_end_ms"].as_i64().unwrap_or(0),
        );
        assert!(
            we - ws == window_ms && ws <= t_end && we > t_start,
            "alert outside the shift: {a}"
        );
        assert!(a["value"].as_f64().unwrap_or(0.0) >= 0.2, "{a}");
    }
    wait_for(
        "webhooks and the retraining trigger",
        Duration::from_secs(20),
        || {
            let c = calls.lock().map(|c| c.clone()).unwrap_or_default();
            Ok(c.len() >= 5 && d.join("retrain-wine-1.0.0.json").exists())
        },
    )?;
    std::thread::sleep(Duration::from_millis(2500)); // one more evaluation: no repeat
    let c = calls.lock().map(|c| c.clone()).unwrap_or_default();
    let fired: BTreeSet<(String, String, String)> = c
        .iter()
        .filter(|(path, b)| path == "/alerts" && b["status"] == "firing")
        .map(|(_, b)| {
            (
                b["rule"].as_str().unwrap_or_default().to_owned(),
                b["group"].as_str().unwrap_or_default().to_owned(),
                b["feature"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(fired, expected);
    assert_eq!(
        c.iter().filter(|(p, _)| p == "/alerts").count(),
        4,
        "deduplicated: {c:?}"
    );
    let retrain: Vec<&Value> = c
        .iter()
        .filter(|(p, _)| p == "/retrain")
        .map(|(_, b)| b)
        .collect();
    assert_eq!(retrain.len(), 1, "one retraining trigger: {c:?}");
    assert_eq!(retrain[0]["model"], "wine");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("retrain-wine-1.0.0.json"))?)?;
    assert_eq!(report["version"], "1.0.0");
    let drifting: BTreeSet<&str> = report["drift"]
        .as_array()
        .context("drift")?
        .iter()
        .filter(|f| f["psi"].as_f64().unwrap_or(0.0) >= 0.2)
        .filter_map(|f| f["feature"].as_str())
        .collect();
    assert_eq!(drifting, BTreeSet::from(["alcohol", "color_intensity"]));

    // The dashboard shows the drifting feature (headless Chromium).
    if browser {
        check_dashboard_in_chromium(&hub, "alcohol")?;
    }

    // 3. Back to the training distribution: the alerts resolve (one notification each).
    align_to_window(window_ms);
    for (id, url, _) in &nodes {
        send_wine(url, &format!("{id}-back"), &mut rng, &data, 4, 100, &[])?;
    }
    wait_evaluated(&hub, now_ms(), window_ms)?;
    let _ = wait_for("the alerts to resolve", Duration::from_secs(10), || {
        Ok(firing(&hub)?.is_empty())
    });
    let still = firing(&hub)?;
    if !still.is_empty() {
        let (_, windows) = api(
            &hub,
            "GET",
            "/api/v1/telemetry/windows?model=wine&count=8",
            ADMIN,
            None,
        )?;
        let brief: Vec<Value> = windows["versions"]["1.0.0"]
            .as_array()
            .map(|w| {
                w.iter()
                    .map(|p| json!({"start": p["start_ms"], "rows": p["rows"], "alcohol": p["drift"][0]}))
                    .collect()
            })
            .unwrap_or_default();
        panic!(
            "still firing: {still:?}\nalerts {}\nwindows {brief:?}",
            alerts(&hub)?
        );
    }
    wait_for("resolution webhooks", Duration::from_secs(10), || {
        let c = calls.lock().map(|c| c.clone()).unwrap_or_default();
        Ok(c.iter().filter(|(_, b)| b["status"] == "resolved").count() == 4)
    })?;

    // 4. Feedback: node-eu's labels through the node, node-us's straight to the hub (the
    // browser path); the hub's accuracy is the exact fraction.
    let mut by_node: BTreeMap<usize, Vec<Value>> = BTreeMap::new();
    let (mut labeled, mut correct) = (0u64, 0u64);
    for (k, (n, m)) in made.iter().filter(|(_, m)| m.index % 3 != 2).enumerate() {
        // Every seventh label says the model was wrong.
        let label = if k % 7 == 0 {
            if m.predicted == "class_0" {
                "class_1".to_owned()
            } else {
                "class_0".to_owned()
            }
        } else {
            m.truth.clone()
        };
        labeled += 1;
        correct += u64::from(m.predicted == label);
        by_node
            .entry(*n)
            .or_default()
            .push(json!({"id": m.id, "index": m.index, "label": label}));
    }
    assert!(
        correct < labeled && correct > labeled / 2,
        "{correct}/{labeled}"
    );
    // Feedback drives accuracy alerts and retraining: only with the node's feedback token
    // (issue 16: anyone who reached the node could send labels).
    for token in [None, Some("wrong")] {
        let mut forged = http()
            .post(format!("{}/v2/models/wine/feedback", nodes[0].1))
            .json(&json!({"feedback": by_node[&0]}));
        if let Some(t) = token {
            forged = forged.bearer_auth(t);
        }
        assert_eq!(forged.send()?.status().as_u16(), 401, "{token:?}");
    }
    let resp = http()
        .post(format!("{}/v2/models/wine/feedback", nodes[0].1))
        .bearer_auth(FEEDBACK_TOKEN)
        .json(&json!({"feedback": by_node[&0]}))
        .send()?;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.json::<Value>()?["accepted"], json!(by_node[&0].len()));
    let (status, v) = api(
        &hub,
        "POST",
        "/api/v1/feedback",
        &nodes[1].2,
        Some(json!({"model": "wine", "feedback": by_node[&1]})),
    )?;
    assert_eq!(status, 200, "{v}");
    let unknown = http()
        .post(format!("{}/v2/models/nope/feedback", nodes[0].1))
        .bearer_auth(FEEDBACK_TOKEN)
        .json(&json!({"id": "x", "label": "class_0"}))
        .send()?;
    assert_eq!(unknown.status().as_u16(), 404);
    assert_eq!(unknown.json::<Value>()?["error"], "unknown model \"nope\"");
    let mut acc = Value::Null;
    wait_for("accuracy from every label", Duration::from_secs(20), || {
        let s = summary(&hub)?;
        acc = s["versions"][0]["accuracy"].clone();
        Ok(acc["labeled"].as_u64() == Some(labeled))
    })?;
    assert_eq!(
        acc,
        json!({"labeled": labeled, "correct": correct, "value": correct as f64 / labeled as f64})
    );

    // 5. The hub's request totals equal what each node served.
    let s = summary(&hub)?;
    for (id, url, _) in &nodes {
        let served = metric(url, "capsule_requests_total")?;
        assert_eq!(served, 12.0);
        assert_eq!(s["nodes"][id]["requests"], json!(12), "{s}");
    }
    assert_eq!(s["versions"][0]["rows"], json!(2 * 3 * 400));

    // The deploy/ dashboards and alert rules name only metrics the node and hub export.
    if browser {
        check_deploy_metric_names(&nodes[0].1, &hub)?;
    }
    Ok(())
}

fn infer_wat(node: &str) -> Result<()> {
    let body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0.0]}]});
    let resp = http()
        .post(format!("{node}/v2/models/wat/infer"))
        .json(&body)
        .send()?;
    if resp.status().as_u16() != 200 {
        bail!("infer: {}", resp.status());
    }
    Ok(())
}

#[test]
fn telemetry_survives_hub_outage_node_kill_and_buffer_overflow() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    publisher_keys(d, &[])?;
    let capsule = d.join("wat.capsule.wasm");
    std::fs::write(
        &capsule,
        wat_capsule(&WatCapsule {
            name: "wat".into(),
            version: semver::Version::new(1, 0, 0),
            y: 1.0,
            golden_y: None,
        })?,
    )?;
    let monitor = d.join("monitor.toml");
    std::fs::write(&monitor, "window_ms = 2000\ngrace_ms = 500\n")?;
    let port = free_port()?;
    let database = format!("sqlite://{}", d.join("hub.db").display());
    let mut hub_proc = start_monitoring_hub(d, &database, port, &monitor)?;
    let hub = format!("http://127.0.0.1:{port}");
    publish(d, &hub, &capsule)?;
    let mut tokens = BTreeMap::new();
    for id in ["node-a", "node-b", "node-c"] {
        tokens.insert(id, node_token(&hub, id)?);
    }
    let window = ["--telemetry-window-ms", "300"];
    let (mut a_proc, a) = start_synced_node(d, &hub, "node-a", &tokens["node-a"], &window)?;
    let (_b_proc, b) = start_synced_node(d, &hub, "node-b", &tokens["node-b"], &window)?;
    // node-c's buffer holds about four batches.
    let (_c_proc, c) = start_synced_node(
        d,
        &hub,
        "node-c",
        &tokens["node-c"],
        &[
            "--telemetry-window-ms",
            "300",
            "--telemetry-buffer-bytes",
            "1500",
        ],
    )?;
    wait_for("nodes serving wat", Duration::from_secs(60), || {
        Ok([&a, &b, &c].iter().all(|n| infer_wat(n).is_ok()))
    })?;
    let mut sent: BTreeMap<&str, u64> = BTreeMap::new();
    let hub_requests = |id: &str| -> Result<u64> {
        Ok(summary(&hub)?["nodes"][id]["requests"]
            .as_u64()
            .unwrap_or(0))
    };
    for (id, url) in [("node-a", &a), ("node-b", &b), ("node-c", &c)] {
        for _ in 0..10 {
            infer_wat(url)?;
        }
        // Successful inferences: what telemetry records here (requests refused before the
        // capsule was installed never reached a model version).
        let served = metric(url, "capsule_inferences_total")? as u64;
        sent.insert(id, served);
    }
    wait_for("the hub has every request", Duration::from_secs(20), || {
        Ok(sent.iter().all(|(id, n)| hub_requests(id).ok() == Some(*n)))
    })?;

    // The hub goes away (SIGKILL); the nodes keep serving and buffering.
    hub_proc.kill();
    for (id, url) in [("node-a", &a), ("node-b", &b)] {
        for _ in 0..40 {
            infer_wat(url)?;
        }
        *sent.entry(id).or_default() += 40;
    }
    // node-c: one request per window, twelve windows, into a buffer of about four batches.
    for _ in 0..12 {
        infer_wat(&c)?;
        *sent.entry("node-c").or_default() += 1;
        std::thread::sleep(Duration::from_millis(350));
    }
    // node-a's windows are on disk (fsync'd), then it is killed and restarted.
    wait_for(
        "node-a buffered its windows",
        Duration::from_secs(10),
        || Ok(metric(&a, "capsule_telemetry_buffered_batches")? >= 1.0),
    )?;
    std::thread::sleep(Duration::from_millis(400)); // the last window closes too
    a_proc.kill();
    let (_a_proc2, a2) = start_synced_node(d, &hub, "node-a", &tokens["node-a"], &window)?;
    wait_for(
        "node-a serving again (from its local repository)",
        Duration::from_secs(30),
        || Ok(infer_wat(&a2).is_ok()),
    )?;
    *sent.entry("node-a").or_default() += 1;
    for _ in 0..9 {
        infer_wat(&a2)?;
    }
    *sent.entry("node-a").or_default() += 9;
    let dropped_batches = metric(&c, "capsule_telemetry_dropped_batches_total")? as u64;
    let dropped_requests = metric(&c, "capsule_telemetry_dropped_requests_total")? as u64;
    assert!(
        dropped_batches >= 4,
        "node-c dropped only {dropped_batches} batches"
    );

    // The hub returns on the same database: every total is exact.
    let _hub2 = start_monitoring_hub(d, &database, port, &monitor)?;
    wait_for(
        "the hub has every buffered batch",
        Duration::from_secs(40),
        || {
            let s = summary(&hub)?;
            Ok(["node-a", "node-b"]
                .iter()
                .all(|id| s["nodes"][id]["requests"].as_u64() == Some(sent[id]))
                && s["nodes"]["node-c"]["dropped_batches"].as_u64() == Some(dropped_batches)
                && s["nodes"]["node-c"]["requests"].as_u64()
                    == Some(sent["node-c"] - dropped_requests))
        },
    )?;
    assert!((4..12).contains(&dropped_requests), "{dropped_requests}");
    assert_eq!(
        summary(&hub)?["nodes"]["node-c"]["dropped_requests"],
        json!(dropped_requests)
    );
    // node-b never restarted: its own counter agrees with the hub.
    assert_eq!(
        metric(&b, "capsule_inferences_total")? as u64,
        sent["node-b"]
    );
    // Nothing left buffered, and a retried batch is not counted twice (the hub saw
    // duplicates only if a shipment's answer was lost; totals above are exact either way).
    for url in [&a2, &b, &c] {
        wait_for("empty buffers", Duration::from_secs(20), || {
            Ok(metric(url, "capsule_telemetry_buffered_batches")? == 0.0)
        })?;
    }
    Ok(())
}

#[test]
fn prometheus_rules_and_config_pass_promtool() -> Result<()> {
    if Command::new("promtool").arg("--version").output().is_err() {
        if in_ci() {
            bail!("CI must provide promtool (Debian's prometheus)");
        }
        eprintln!("skipped: promtool is not installed");
        return Ok(());
    }
    let deploy = repo().join("deploy/prometheus");
    for args in [
        vec!["check", "rules", "capsule-alerts.yml"],
        vec!["check", "config", "prometheus.yml"],
    ] {
        let out = Command::new("promtool")
            .args(&args)
            .current_dir(&deploy)
            .output()?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool {args:?}: {text}");
        assert!(text.contains("SUCCESS"), "promtool {args:?}: {text}");
    }
    Ok(())
}

/// The version a node serves `wine` at.
fn served_wine_version(node: &str) -> Option<String> {
    let v: Value = http()
        .get(format!("{node}/v2/models/wine"))
        .send()
        .ok()?
        .json()
        .ok()?;
    v["versions"]
        .as_array()?
        .first()?
        .as_str()
        .map(str::to_owned)
}

/// Sends `made`'s labels back through the node: the truth, or a wrong class for every one.
fn send_feedback(node: &str, made: &[Made], wrong: bool) -> Result<()> {
    let feedback: Vec<Value> = made
        .iter()
        .map(|m| {
            let label = match (wrong, m.predicted.as_str()) {
                (false, _) => m.truth.clone(),
                (true, "class_0") => "class_1".to_owned(),
                (true, _) => "class_0".to_owned(),
            };
            json!({"id": m.id, "index": m.index, "label": label})
        })
        .collect();
    let resp = http()
        .post(format!("{node}/v2/models/wine/feedback"))
        .bearer_auth(FEEDBACK_TOKEN)
        .json(&json!({ "feedback": feedback }))
        .send()?;
    assert_eq!(resp.status().as_u16(), 200);
    Ok(())
}

/// A rollout with `auto_promote` is judged by the hub on its canary's telemetry and feedback:
/// a canary whose live accuracy is under the policy is aborted (the node goes back to
/// production), one that holds is promoted (production = its version), each with a reason and
/// an audit entry by `hub`; a policy that cannot be met is refused.
#[test]
fn the_hub_promotes_or_aborts_a_canary_on_its_health_on_sqlite() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let database = format!("sqlite://{}", dir.path().join("hub.db").display());
    judged_canaries(dir.path(), &database)
}

#[test]
fn the_hub_promotes_or_aborts_a_canary_on_its_health_on_postgres() -> Result<()> {
    with_postgres("canary", |url| {
        let dir = tempfile::tempdir()?;
        judged_canaries(dir.path(), url)
    })
}

fn judged_canaries(d: &Path, database: &str) -> Result<()> {
    publisher_keys(d, &[])?;
    let wine = repo().join("examples/wine-tabular");
    let p = |f: &str| wine.join(f).to_string_lossy().into_owned();
    let build = |version: &str| -> Result<std::path::PathBuf> {
        let out = d.join(format!("wine-{version}.capsule.wasm"));
        run(&[
            "build",
            &p("model.onnx"),
            "--name",
            "wine",
            "--version",
            version,
            "--pipeline",
            &p("pipeline.json"),
            "--labels",
            &p("labels.txt"),
            "-o",
            &out.to_string_lossy(),
        ])?;
        Ok(out)
    };
    let port = free_port()?;
    let _hub = start_hub(d, database, port, &[])?;
    let hub = format!("http://127.0.0.1:{port}");
    publish(d, &hub, &build("1.0.0")?)?;
    let token = node_token(&hub, "canary-1")?;
    let (_node, node) = start_synced_node(
        d,
        &hub,
        "canary-1",
        &token,
        &[
            "--label",
            "ring=canary",
            "--telemetry-window-ms",
            "300",
            "--feedback-token",
            FEEDBACK_TOKEN,
        ],
    )?;
    wait_for("the node serving 1.0.0", Duration::from_secs(60), || {
        Ok(served_wine_version(&node).as_deref() == Some("1.0.0"))
    })?;
    let data = wine_rows()?;
    let mut rng = Lcg(7);
    let policy = json!({"min_requests": 5, "max_error_rate": 0.01, "min_accuracy": 0.9,
                        "min_labels": 20, "hold_s": 0});

    // A policy that cannot be met is refused before anything changes.
    for bad in [
        json!({"min_requests": 0}),
        json!({"max_error_rate": 2.0}),
        json!({"min_accuracy": 0.9, "min_labels": 0}),
        json!({"hold": 5}),
    ] {
        let (status, v) = api(
            &hub,
            "POST",
            "/api/v1/rollouts",
            ADMIN,
            Some(json!({"model": "wine", "version": "1.0.0", "auto_promote": bad})),
        )?;
        assert!(status == 400 || status == 422, "{bad}: {status} {v}");
    }

    let mut judged = |version: &str, wrong: bool| -> Result<Value> {
        sign_and_push(d, &hub, &build(version)?, &d.join("targets.json"), &[])?;
        let (status, r) = api(
            &hub,
            "POST",
            "/api/v1/rollouts",
            ADMIN,
            Some(
                json!({"model": "wine", "version": version, "selector": {"ring": "canary"},
                        "steps": [100], "auto_promote": policy}),
            ),
        )?;
        assert_eq!(status, 200, "{r}");
        assert_eq!(r["auto_promote"], policy);
        let id = r["id"].as_str().context("rollout id")?.to_owned();
        wait_for("the canary serving", Duration::from_secs(60), || {
            Ok(served_wine_version(&node).as_deref() == Some(version))
        })?;
        let made = send_wine(&node, version, &mut rng, &data, 6, 10, &[])?;
        // Not judged yet: the labels have not come back, and accuracy is part of the policy.
        std::thread::sleep(Duration::from_millis(800));
        let (_, r) = api(&hub, "GET", &format!("/api/v1/rollouts/{id}"), ADMIN, None)?;
        assert_eq!(r["state"], "active", "judged without labels: {r}");
        send_feedback(&node, &made, wrong)?;
        let mut r = Value::Null;
        wait_for("the hub's verdict", Duration::from_secs(30), || {
            r = api(&hub, "GET", &format!("/api/v1/rollouts/{id}"), ADMIN, None)?.1;
            Ok(r["state"] != "active")
        })?;
        Ok(r)
    };

    // Every label says the canary was wrong: aborted, and the node is back on production.
    let r = judged("1.1.0", true)?;
    assert_eq!(r["state"], "aborted", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.starts_with("canary accuracy 0.0000 (0 of 60 labeled predictions) under 0.9000"),
        "{reason}"
    );
    wait_for("the node back on 1.0.0", Duration::from_secs(30), || {
        Ok(served_wine_version(&node).as_deref() == Some("1.0.0"))
    })?;

    // The labels agree with the model: promoted, production is the new version.
    let r = judged("1.2.0", false)?;
    assert_eq!(r["state"], "promoted", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("error rate 0.0000 over 6 requests, accuracy"),
        "{reason}"
    );
    let (_, m) = api(&hub, "GET", "/api/v1/models/wine", ADMIN, None)?;
    assert_eq!(m["aliases"]["production"], "1.2.0");
    let (_, audit) = api(&hub, "GET", "/api/v1/audit", ADMIN, None)?;
    let by_hub: Vec<&str> = audit["audit"]
        .as_array()
        .context("audit")?
        .iter()
        .filter(|e| {
            e["actor"] == "hub"
                && e["action"]
                    .as_str()
                    .is_some_and(|a| a.starts_with("rollout."))
        })
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert_eq!(by_hub, ["rollout.abort", "rollout.promote"]);
    Ok(())
}
