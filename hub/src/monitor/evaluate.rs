//! Evaluation: windows judged by the alert rules, alerts stored and notified, webhooks,
//! retraining.

use super::*;

/// Evaluates every complete window not evaluated yet (at most the last ten), then again
/// any of the last ten that received batches after it was evaluated (a node that was
/// offline, a slow network).
pub(crate) async fn evaluate(s: &Shared) -> Result<()> {
    let cfg = &s.config.monitor;
    let w = i64::try_from(cfg.window_ms).unwrap_or(60_000);
    let grace = i64::try_from(cfg.grace_ms).unwrap_or(0);
    let now = s.db.clock().now_ms();
    let until = (now - grace) / w * w;
    let done = s.db.state("telemetry_evaluated_until").await?;
    if until > done
        && s.db
            .claim_state("telemetry_evaluated_until", done, until)
            .await?
    {
        let from = if done == 0 {
            until - w
        } else {
            done.max(until - 10 * w)
        };
        let mut ws = from;
        while ws < until {
            evaluate_window(s, ws, ws + w).await?;
            ws += w;
        }
    }
    // Late batches: received since the last look, for windows evaluated before this call.
    let mark = s.db.state("telemetry_late_mark").await?;
    let upto = now - 500; // a batch received before this has committed
    if upto <= mark || done == 0 {
        if done == 0 && upto > mark {
            s.db.claim_state("telemetry_late_mark", mark, upto).await?;
        }
        return Ok(());
    }
    if !s.db.claim_state("telemetry_late_mark", mark, upto).await? {
        return Ok(());
    }
    let late: BTreeSet<i64> =
        s.db.late_windows(mark, upto, done - 10 * w, done)
            .await?
            .into_iter()
            .map(|ws| ws / w * w)
            .collect();
    for ws in late {
        tracing::info!(
            window_start_ms = ws,
            "re-evaluating a window that received late telemetry"
        );
        evaluate_window(s, ws, ws + w).await?;
    }
    Ok(())
}

pub(super) async fn evaluate_window(s: &Shared, ws: i64, we: i64) -> Result<()> {
    let cfg = &s.config.monitor;
    let mut agg: BTreeMap<(String, String, String), ModelWindow> = BTreeMap::new();
    for (g, _, m) in &s.db.load_windows(ws, we).await? {
        merge_into(&mut agg, g, m);
    }
    let mut references: BTreeMap<(String, String), Option<ReferenceStats>> = BTreeMap::new();
    let mut findings = Vec::new();
    let mut reports: BTreeMap<(String, String), Vec<(String, FeatureDrift)>> = BTreeMap::new();
    for ((model, version, group), m) in &agg {
        let base = |rule: AlertRule, feature: &str, (value, threshold, breach): Measure| Finding {
            rule,
            model: model.clone(),
            version: version.clone(),
            group: group.clone(),
            feature: feature.to_owned(),
            value,
            threshold,
            breach,
        };
        if let Some(m) = alert::errors(&cfg.errors, m.requests, m.error_count()) {
            findings.push(base(AlertRule::Errors, "", m));
        }
        if let Some(m) = alert::latency(&cfg.latency, m.requests, m.latency.quantile(0.99)) {
            findings.push(base(AlertRule::Latency, "", m));
        }
        if !cfg.drift.enabled || m.features.is_empty() {
            continue;
        }
        let rkey = (model.clone(), version.clone());
        if !references.contains_key(&rkey) {
            let r = reference(&s.db, model, version).await?;
            references.insert(rkey.clone(), r);
        }
        let Some(Some(r)) = references.get(&rkey) else {
            continue;
        };
        for d in telemetry::drift(r, &m.features) {
            s.metrics
                .drift_psi
                .with_label_values(&[model, version, group, &d.feature])
                .set(d.psi);
            if let Some(ks) = d.ks {
                s.metrics
                    .drift_ks
                    .with_label_values(&[model, version, group, &d.feature])
                    .set(ks);
            }
            let Some(measure) = alert::drift(&cfg.drift, &d) else {
                continue;
            };
            findings.push(base(AlertRule::Drift, &d.feature, measure));
            reports
                .entry(rkey.clone())
                .or_default()
                .push((group.clone(), d));
        }
    }
    let models: BTreeSet<String> = agg.keys().map(|(m, _, _)| m.clone()).collect();
    for model in models {
        for (version, a) in s.db.accuracy(&model).await? {
            let Some(value) = a.value else { continue };
            s.metrics
                .accuracy
                .with_label_values(&[&model, &version])
                .set(value);
            let Some((value, threshold, breach)) =
                alert::accuracy(&cfg.accuracy, a.labeled, a.correct)
            else {
                continue;
            };
            findings.push(Finding {
                rule: AlertRule::Accuracy,
                model: model.clone(),
                version,
                group: "all".into(),
                feature: String::new(),
                value,
                threshold,
                breach,
            });
        }
    }
    apply(s, ws, we, findings, &reports).await
}

/// Moves alerts between firing and resolved, notifies on every change, and triggers
/// retraining once per model version when one of its retraining rules starts firing.
pub(super) async fn apply(
    s: &Shared,
    ws: i64,
    we: i64,
    findings: Vec<Finding>,
    reports: &BTreeMap<(String, String), Vec<(String, FeatureDrift)>>,
) -> Result<()> {
    let cfg = &s.config.monitor;
    let existing: BTreeMap<String, Alert> =
        s.db.alerts()
            .await?
            .into_iter()
            .map(|a| (a.key.clone(), a))
            .collect();
    let retrain_firing = |model: &str, version: &str| {
        existing.values().any(|a| {
            a.state == AlertState::Firing
                && a.model == model
                && a.version == version
                && cfg.retrain.on.contains(&a.rule)
        })
    };
    let mut retrain: BTreeMap<(String, String), Vec<Alert>> = BTreeMap::new();
    let now = s.db.clock().now_ms();
    for f in findings {
        let Some(t) = alert::transition(existing.get(&f.key()), &f, ws, we, now) else {
            continue;
        };
        s.db.upsert_alert(&t.alert).await?;
        if !t.changed {
            continue; // no change: no notification (deduplicated)
        }
        let (key, state) = (&t.alert.key, t.alert.state);
        tracing::warn!(alert = %key, %state, value = f.value, threshold = f.threshold, "alert {state}");
        let status = match state {
            AlertState::Firing => EventKind::Firing,
            AlertState::Resolved => EventKind::Resolved,
        };
        let body = NotificationBody::Alert(t.alert.clone());
        notify(s, key, Notification { status, body }, &cfg.webhooks).await?;
        if state == AlertState::Firing
            && cfg.retrain.on.contains(&f.rule)
            && !retrain_firing(&f.model, &f.version)
        {
            retrain
                .entry((f.model.clone(), f.version.clone()))
                .or_default()
                .push(t.alert);
        }
    }
    let all = s.db.alerts().await?;
    let mut firing: BTreeMap<AlertRule, i64> = BTreeMap::new();
    for a in all.iter().filter(|a| a.state == AlertState::Firing) {
        *firing.entry(a.rule).or_default() += 1;
    }
    for rule in AlertRule::ALL {
        s.metrics
            .alerts_firing
            .with_label_values(&[rule.as_str()])
            .set(firing.get(rule).copied().unwrap_or(0));
    }
    for ((model, version), reasons) in retrain {
        let drift: Vec<GroupDrift> = reports
            .get(&(model.clone(), version.clone()))
            .map(|v| {
                v.iter()
                    .map(|(group, drift)| GroupDrift {
                        group: group.clone(),
                        drift: drift.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let accuracy =
            s.db.accuracy(&model)
                .await?
                .get(&version)
                .copied()
                .unwrap_or_default();
        let report = RetrainReport {
            model,
            version,
            window_start_ms: ws,
            window_end_ms: we,
            reasons,
            drift,
            accuracy,
        };
        trigger_retraining(s, report).await?;
    }
    Ok(())
}

/// POSTs the notification to every webhook (three attempts each) in the background, and
/// records it and how its delivery went.
pub(super) async fn notify(
    s: &Shared,
    key: &str,
    notification: Notification,
    hooks: &[String],
) -> Result<()> {
    let id = new_id();
    let text = serde_json::to_string(&notification)?;
    s.db.add_alert_event(
        &id,
        key,
        notification.status,
        &text,
        if hooks.is_empty() {
            "no webhook"
        } else {
            "pending"
        },
    )
    .await?;
    if hooks.is_empty() {
        return Ok(());
    }
    let db = s.db.clone();
    let http = s.http.clone();
    let metrics = s.metrics.clone();
    let hooks = hooks.to_vec();
    tokio::spawn(async move {
        let mut results = Vec::new();
        for hook in &hooks {
            let outcome = deliver(&http, hook, &text).await;
            metrics
                .webhook_deliveries
                .with_label_values(&[if outcome.is_ok() {
                    "delivered"
                } else {
                    "failed"
                }])
                .inc();
            results.push(match outcome {
                Ok(()) => format!("{hook}: delivered"),
                Err(e) => {
                    tracing::error!(webhook = %hook, error = %e, "webhook delivery failed");
                    format!("{hook}: failed: {e}")
                }
            });
        }
        if let Err(e) = db.set_alert_delivery(&id, &results.join("; ")).await {
            tracing::error!(error = %e.chain(), "cannot record a webhook delivery");
        }
    });
    Ok(())
}

pub(super) async fn deliver(
    http: &reqwest::Client,
    url: &str,
    body: &str,
) -> std::result::Result<(), String> {
    let mut last = String::new();
    for attempt in 0..3u32 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(
                250 * u64::from(attempt) * u64::from(attempt),
            ))
            .await;
        }
        match http
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_owned())
            .timeout(Duration::from_secs(10))
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => return Ok(()),
            Ok(r) => last = format!("answered {}", r.status()),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Writes the report, POSTs it to the retraining webhook and runs the retraining command.
pub(super) async fn trigger_retraining(s: &Shared, report: RetrainReport) -> Result<()> {
    let cfg = &s.config.monitor.retrain;
    let (model, version) = (report.model.clone(), report.version.clone());
    let (model, version) = (model.as_str(), version.as_str());
    s.metrics.retrain_triggers.with_label_values(&[model]).inc();
    let dir = &s.config.monitor.reports_dir;
    let id = new_id();
    let path = dir.join(format!("retrain-{model}-{version}-{id}.json").replace(['/', '\\'], "_"));
    let text = serde_json::to_string_pretty(&report)?;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(Error::io(format!("creating {}", dir.display())))?;
    tokio::fs::write(&path, &text)
        .await
        .map_err(Error::io(format!("writing {}", path.display())))?;
    tracing::warn!(model, version, report = %path.display(), "retraining triggered");
    s.db.audit(
        "hub",
        "retrain.trigger",
        &json!({"model": model, "version": version, "report": path.display().to_string()})
            .to_string(),
        "",
    )
    .await?;
    let key = format!("retrain|{model}|{version}");
    let hooks: Vec<String> = cfg.webhook.iter().cloned().collect();
    let notification = Notification {
        status: EventKind::Retrain,
        body: NotificationBody::Retrain(report),
    };
    notify(s, &key, notification, &hooks).await?;
    if let Some((program, args)) = cfg.command.split_first() {
        let mut command = tokio::process::Command::new(program);
        command
            .args(args)
            .arg(&path)
            .env("CAPSULE_RETRAIN_REPORT", &path)
            .env("CAPSULE_MODEL", model)
            .env("CAPSULE_VERSION", version)
            .kill_on_drop(false);
        let db = s.db.clone();
        let program = program.clone();
        tokio::spawn(async move {
            let status = match command.status().await {
                Ok(st) => st.to_string(),
                Err(e) => format!("could not start {program}: {e}"),
            };
            tracing::info!(%status, "retraining command finished");
            let _ = db
                .add_alert_event(
                    &new_id(),
                    &key,
                    EventKind::RetrainCommand,
                    &serde_json::to_string(&Notification {
                        status: EventKind::RetrainCommand,
                        body: NotificationBody::Command(RetrainCommand { command: program }),
                    })
                    .unwrap_or_default(),
                    &status,
                )
                .await;
        });
    }
    Ok(())
}
