//! The hub's web dashboard: server-rendered HTML with inline SVG charts (no JavaScript, no
//! third-party assets), behind the admin token (a login form sets an HttpOnly session
//! cookie; `Authorization: Bearer` works too).
//!
//! - `/dashboard`: the fleet (nodes, versions, health), rollouts, models, alerts;
//! - `/dashboard/models/{model}`: per version, traffic, errors and latency per window, drift
//!   per feature over time (PSI, with the threshold) and the reference distribution beside
//!   the live one, feedback accuracy and the predicted classes.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use capsule_format::hub::{AlertRule, AlertState, ModelState, RolloutState};
use capsule_format::telemetry::{Binning, FeatureDrift, ReferenceStats};
use serde::Deserialize;

use crate::api::Admin;
use crate::extract::{Form, Path, Query};
use crate::monitor::{self, WindowPoint};
use crate::{Result, Shared, token_hash};

type AppState = Arc<Shared>;

const COOKIE: &str = "capsule_session";

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/dashboard", get(overview))
        .route("/dashboard/", get(overview))
        .route("/dashboard/login", get(login_page).post(login))
        .route("/dashboard/logout", get(logout))
        .route("/dashboard/models/{model}", get(model_page))
}

/// The session token from the dashboard's cookie.
pub(crate) fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// HTML-escapes text.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a path segment.
fn url_segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

const STYLE: &str = r#"
:root { --ink:#1f2933; --muted:#6b7785; --line:#e3e8ee; --bg:#f5f7fa; --card:#fff;
  --blue:#2f6fde; --teal:#13a89e; --red:#d64545; --amber:#e0a030; --gray:#aab4c0; }
* { box-sizing: border-box; }
body { margin:0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--ink); background: var(--bg); }
header { background:#14213d; color:#fff; padding: 12px 28px; display:flex; align-items:center; gap:24px; }
header a { color:#cfd8e3; text-decoration:none; } header a:hover { color:#fff; }
header .brand { font-weight:700; font-size:16px; color:#fff; letter-spacing:.3px; }
header .spacer { flex:1; }
main { padding: 20px 28px 48px; max-width: 1320px; margin: 0 auto; }
h1 { font-size: 22px; margin: 4px 0 16px; } h2 { font-size: 17px; margin: 28px 0 10px; }
h3 { font-size: 14px; margin: 0 0 6px; }
.cards { display:grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: 12px; }
.card { background: var(--card); border:1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.card .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .4px; }
.card .v { font-size: 22px; font-weight: 650; margin-top: 2px; }
.card .v.bad { color: var(--red); } .card .v.good { color: var(--teal); }
table { width:100%; border-collapse: collapse; background: var(--card); border:1px solid var(--line);
  border-radius: 10px; overflow:hidden; }
th, td { text-align:left; padding: 8px 10px; border-bottom: 1px solid var(--line); vertical-align: top; }
th { background:#eef2f6; font-size:12px; color: var(--muted); text-transform: uppercase; letter-spacing: .4px; }
tr:last-child td { border-bottom: none; }
.pill { display:inline-block; padding: 1px 8px; border-radius: 999px; font-size: 12px; background:#e8edf3; margin: 1px 2px 1px 0; }
.pill.ok { background:#d9f3ef; color:#0b6e66; } .pill.bad { background:#fbe1e1; color:#a12f2f; }
.pill.warn { background:#fbefd5; color:#8a5a00; }
.grid2 { display:grid; grid-template-columns: repeat(auto-fill, minmax(600px, 1fr)); gap: 14px; }
.feature { background: var(--card); border:1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
.feature.drifting { border-color: var(--red); box-shadow: 0 0 0 2px #fbe1e1; }
.feature .charts { display:flex; gap: 10px; flex-wrap: wrap; }
.muted { color: var(--muted); }
.version { margin-top: 22px; padding-top: 6px; border-top: 2px solid var(--line); }
svg text { font: 11px system-ui, sans-serif; fill: #52606d; }
form.login { max-width: 380px; margin: 80px auto; background: var(--card); border:1px solid var(--line);
  border-radius: 12px; padding: 24px; }
form.login input { width:100%; padding: 9px 10px; border:1px solid #c5ced8; border-radius: 8px; margin: 8px 0 14px; font: inherit; }
form.login button { background: var(--blue); color:#fff; border:0; border-radius: 8px; padding: 9px 16px; font: inherit; cursor: pointer; }
.error { color: var(--red); }
a { color: var(--blue); }
"#;

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"30\"><title>{}</title><style>{STYLE}</style></head><body>\
         <header><span class=\"brand\">Capsule hub</span><a href=\"/dashboard\">Fleet</a><span class=\"spacer\"></span>\
         <a href=\"/dashboard/logout\">Sign out</a></header><main>{body}</main></body></html>",
        esc(title)
    ))
}

#[derive(Deserialize)]
struct LoginQuery {
    error: Option<String>,
}

async fn login_page(Query(q): Query<LoginQuery>) -> Html<String> {
    let error = if q.error.is_some() {
        "<p class=\"error\">That is not an admin token.</p>"
    } else {
        ""
    };
    Html(format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Capsule hub: sign in</title><style>{STYLE}</style></head><body>\
         <form class=\"login\" method=\"post\" action=\"/dashboard/login\"><h1>Capsule hub</h1>\
         <p class=\"muted\">Sign in with an admin token (<code>hub-admin.token</code>, or <code>--admin-token</code>).</p>{error}\
         <label for=\"token\">Admin token</label><input id=\"token\" name=\"token\" type=\"password\" autocomplete=\"current-password\" required>\
         <button type=\"submit\">Sign in</button></form></body></html>"
    ))
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(s): State<AppState>, Form(form): Form<LoginForm>) -> Result<Response> {
    let token = form.token.trim().to_owned();
    let admin = matches!(s.db.token(&token_hash(&token)).await?, Some(t) if t.role == capsule_format::hub::Role::Admin);
    if !admin || token.contains([';', ',', ' ']) {
        return Ok(Redirect::to("/dashboard/login?error=1").into_response());
    }
    let secure = if s.config.tls_cert.is_some() {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/{secure}");
    let mut resp = Redirect::to("/dashboard").into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, HeaderValue::from_str(&cookie)?);
    Ok(resp)
}

async fn logout() -> Response {
    let mut resp = Redirect::to("/dashboard/login").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("capsule_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"),
    );
    resp
}

fn ago(now_s: i64, then_s: i64) -> String {
    let d = (now_s - then_s).max(0);
    match d {
        0..=59 => format!("{d} s ago"),
        60..=3599 => format!("{} min ago", d / 60),
        3600..=86399 => format!("{} h ago", d / 3600),
        _ => format!("{} d ago", d / 86400),
    }
}

fn clock(ms: i64) -> String {
    let s = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn pct(v: f64) -> String {
    format!("{:.1}%", v * 100.0)
}

async fn overview(State(s): State<AppState>, admin: Result<Admin>) -> Result<Response> {
    if admin.is_err() {
        return Ok(Redirect::to("/dashboard/login").into_response());
    }
    let now = s.db.now();
    let offline_after = i64::try_from(s.config.monitor.offline_after_s).unwrap_or(i64::MAX);
    let nodes = s.db.nodes().await?;
    let rollouts = s.db.rollouts().await?;
    let models = s.db.models().await?;
    let alerts = s.db.alerts().await?;
    let summary = s.db.summary(None).await?;
    let online = nodes
        .iter()
        .filter(|n| now - n.last_seen <= offline_after)
        .count();
    let firing = alerts
        .iter()
        .filter(|a| a.state == AlertState::Firing)
        .count();
    let active = rollouts
        .iter()
        .filter(|r| r.state == RolloutState::Active)
        .count();
    let mut b = String::new();
    b.push_str("<h1>Fleet</h1><div class=\"cards\">");
    let _ = write!(
        b,
        "<div class=\"card\"><div class=\"k\">Nodes online</div><div class=\"v {}\">{online} / {}</div></div>\
         <div class=\"card\"><div class=\"k\">Models</div><div class=\"v\">{}</div></div>\
         <div class=\"card\"><div class=\"k\">Active rollouts</div><div class=\"v\">{active}</div></div>\
         <div class=\"card\"><div class=\"k\">Alerts firing</div><div class=\"v {}\">{firing}</div></div>\
         <div class=\"card\"><div class=\"k\">Requests seen</div><div class=\"v\">{}</div></div></div>",
        if online == nodes.len() { "good" } else { "bad" },
        nodes.len(),
        models.len(),
        if firing > 0 { "bad" } else { "good" },
        summary.versions.iter().map(|v| v.requests).sum::<u64>(),
    );
    b.push_str("<h2>Nodes</h2><table id=\"nodes\"><thead><tr><th>Node</th><th>Labels</th><th>Status</th><th>Last seen</th><th>Models</th><th>Telemetry</th></tr></thead><tbody>");
    for n in &nodes {
        let up = now - n.last_seen <= offline_after;
        let labels: String = n
            .labels
            .iter()
            .map(|(k, v)| format!("<span class=\"pill\">{}={}</span>", esc(k), esc(v)))
            .collect();
        let models: String = n
            .report
            .iter()
            .flat_map(|r| &r.models)
            .map(|m| {
                let class = match m.state {
                    ModelState::Serving => "ok",
                    ModelState::Installing | ModelState::Other => "",
                    _ => "bad",
                };
                format!(
                    "<span class=\"pill {class}\" title=\"{}\">{} {} · {}</span>",
                    esc(&m.detail),
                    esc(&m.model),
                    esc(&m.version),
                    m.state
                )
            })
            .collect();
        let t = summary.nodes.get(&n.id).cloned().unwrap_or_default();
        let dropped = if t.dropped_batches > 0 {
            format!(
                " · <span class=\"pill warn\">{} batches dropped</span>",
                t.dropped_batches
            )
        } else {
            String::new()
        };
        let _ = write!(
            b,
            "<tr><td><b>{}</b></td><td>{labels}</td><td><span class=\"pill {}\">{}</span></td><td>{}</td><td>{models}</td><td>{} requests in {} batches{dropped}</td></tr>",
            esc(&n.id),
            if up { "ok" } else { "bad" },
            if up { "online" } else { "offline" },
            ago(now, n.last_seen),
            t.requests,
            t.batches,
        );
    }
    if nodes.is_empty() {
        b.push_str("<tr><td colspan=\"6\" class=\"muted\">No node has registered yet.</td></tr>");
    }
    b.push_str("</tbody></table>");

    b.push_str("<h2>Models</h2><table id=\"models\"><thead><tr><th>Model</th><th>Version</th><th>Aliases</th><th>Requests</th><th>Error rate</th><th>Accuracy (labels)</th></tr></thead><tbody>");
    for m in &models {
        let aliases = s.db.aliases(m).await?;
        let versions = s.db.versions(m).await?;
        for v in &versions {
            let t = summary
                .versions
                .iter()
                .find(|t| &t.model == m && t.version == v.version)
                .cloned()
                .unwrap_or_default();
            let tags: String = aliases
                .iter()
                .filter(|(_, ver)| **ver == v.version)
                .map(|(a, _)| format!("<span class=\"pill ok\">{}</span>", esc(a)))
                .collect();
            let err = if t.requests > 0 {
                pct(t.errors as f64 / t.requests as f64)
            } else {
                "–".into()
            };
            let acc = t.accuracy.value.map_or("–".into(), |a| {
                format!("{} ({})", pct(a), t.accuracy.labeled)
            });
            let _ = write!(
                b,
                "<tr><td><a href=\"/dashboard/models/{}\">{}</a></td><td>{}</td><td>{tags}</td><td>{}</td><td>{err}</td><td>{acc}</td></tr>",
                url_segment(m),
                esc(m),
                esc(&v.version),
                t.requests
            );
        }
    }
    b.push_str("</tbody></table>");

    b.push_str("<h2>Rollouts</h2><table id=\"rollouts\"><thead><tr><th>Rollout</th><th>Model</th><th>Version</th><th>Nodes</th><th>State</th><th>Reason</th></tr></thead><tbody>");
    for r in rollouts.iter().take(20) {
        let class = match r.state {
            RolloutState::Active => "warn",
            RolloutState::Promoted => "ok",
            RolloutState::Aborted | RolloutState::RolledBack => "bad",
        };
        let _ = write!(
            b,
            "<tr><td><code>{}</code></td><td>{}</td><td>{} (from {})</td><td>{}%</td><td><span class=\"pill {class}\">{}</span></td><td>{}</td></tr>",
            esc(r.id.get(..8).unwrap_or(&r.id)),
            esc(&r.model),
            esc(&r.version),
            esc(&r.previous),
            r.percent,
            r.state,
            esc(&r.reason)
        );
    }
    if rollouts.is_empty() {
        b.push_str("<tr><td colspan=\"6\" class=\"muted\">No rollout yet.</td></tr>");
    }
    b.push_str("</tbody></table>");
    b.push_str(&alerts_table(&alerts));
    Ok(page("Capsule hub: fleet", &b).into_response())
}

fn alerts_table(alerts: &[monitor::Alert]) -> String {
    let mut b = String::from(
        "<h2>Alerts</h2><table id=\"alerts\"><thead><tr><th>State</th><th>Rule</th><th>Model</th><th>Group</th><th>Feature</th><th>Value</th><th>Threshold</th><th>Window</th></tr></thead><tbody>",
    );
    for a in alerts.iter().take(50) {
        let _ = write!(
            b,
            "<tr><td><span class=\"pill {}\">{}</span></td><td>{}</td><td>{} {}</td><td>{}</td><td>{}</td><td>{:.3}</td><td>{:.3}</td><td>{}–{} UTC</td></tr>",
            if a.state == AlertState::Firing {
                "bad"
            } else {
                "ok"
            },
            a.state,
            a.rule,
            esc(&a.model),
            esc(&a.version),
            esc(&a.group),
            esc(&a.feature),
            a.value,
            a.threshold,
            clock(a.window_start_ms),
            clock(a.window_end_ms)
        );
    }
    if alerts.is_empty() {
        b.push_str("<tr><td colspan=\"8\" class=\"muted\">No alert has fired.</td></tr>");
    }
    b.push_str("</tbody></table>");
    b
}

// ---------------------------------------------------------------------------------------
// Charts

const W: f64 = 560.0;
const H: f64 = 190.0;
const PAD_L: f64 = 46.0;
const PAD_R: f64 = 12.0;
const PAD_T: f64 = 14.0;
const PAD_B: f64 = 34.0;

struct Series<'a> {
    name: &'a str,
    color: &'a str,
    points: Vec<(i64, Option<f64>)>,
}

fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 1000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The vertical pixel of value `y` on an axis from 0 to `ymax`.
fn y_pixel(ymax: f64, y: f64) -> f64 {
    PAD_T + (1.0 - y / ymax) * (H - PAD_T - PAD_B)
}

/// An open `<svg>` with `ticks + 1` horizontal grid lines from 0 to `ymax`, labelled.
fn chart_start(attrs: &str, ymax: f64, ticks: u32, label: impl Fn(f64) -> String) -> String {
    let mut o =
        format!("<svg {attrs} viewBox=\"0 0 {W} {H}\" width=\"{W}\" height=\"{H}\" role=\"img\">");
    for i in 0..=ticks {
        let y = ymax * f64::from(i) / f64::from(ticks);
        let _ = write!(
            o,
            "<line x1=\"{PAD_L}\" x2=\"{}\" y1=\"{py:.1}\" y2=\"{py:.1}\" stroke=\"#e3e8ee\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            W - PAD_R,
            PAD_L - 6.0,
            y_pixel(ymax, y) + 4.0,
            label(y),
            py = y_pixel(ymax, y)
        );
    }
    o
}

/// A line chart over windows, with an optional dashed threshold line.
fn line_chart(attrs: &str, series: &[Series<'_>], threshold: Option<f64>, unit: &str) -> String {
    let xs: Vec<i64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let (x0, x1) = (
        xs.iter().copied().min().unwrap_or(0),
        xs.iter().copied().max().unwrap_or(1),
    );
    let span = (x1 - x0).max(1) as f64;
    let ymax = series
        .iter()
        .flat_map(|s| s.points.iter().filter_map(|p| p.1))
        .chain(threshold)
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.15;
    let px = |x: i64| PAD_L + (x - x0) as f64 / span * (W - PAD_L - PAD_R);
    let py = |y: f64| y_pixel(ymax, y);
    let mut o = chart_start(attrs, ymax, 4, |y| format!("{}{unit}", fmt_num(y)));
    if xs.is_empty() {
        let _ = write!(
            o,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data yet</text>",
            W / 2.0,
            H / 2.0
        );
    } else {
        for (i, x) in [x0, x0 + (x1 - x0) / 2, x1].iter().enumerate() {
            if i == 1 && x1 == x0 {
                continue;
            }
            let _ = write!(
                o,
                "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"{}\">{}</text>",
                px(*x),
                H - PAD_B + 16.0,
                ["start", "middle", "end"][i],
                clock(*x)
            );
        }
    }
    if let Some(t) = threshold {
        let _ = write!(
            o,
            "<line class=\"threshold\" x1=\"{PAD_L}\" x2=\"{}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#d64545\" stroke-dasharray=\"5 4\"/><text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" style=\"fill:#d64545\">threshold {}</text>",
            W - PAD_R,
            W - PAD_R,
            py(t) - 4.0,
            fmt_num(t),
            y = py(t)
        );
    }
    let mut legend_x = PAD_L;
    for s in series {
        let pts: Vec<String> = s
            .points
            .iter()
            .filter_map(|(x, y)| y.map(|y| format!("{:.1},{:.1}", px(*x), py(y))))
            .collect();
        if pts.len() > 1 {
            let _ = write!(
                o,
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{}\"/>",
                s.color,
                pts.join(" ")
            );
        }
        for p in &pts {
            if let Some((x, y)) = p.split_once(',') {
                let _ = write!(
                    o,
                    "<circle cx=\"{x}\" cy=\"{y}\" r=\"2.6\" fill=\"{}\"/>",
                    s.color
                );
            }
        }
        let _ = write!(
            o,
            "<rect x=\"{legend_x:.1}\" y=\"{}\" width=\"10\" height=\"10\" rx=\"2\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\">{}</text>",
            H - 12.0,
            s.color,
            legend_x + 14.0,
            H - 3.0,
            esc(s.name)
        );
        legend_x += 24.0 + 7.0 * s.name.chars().count() as f64;
    }
    o.push_str("</svg>");
    o
}

/// Reference and live proportions per bin, side by side.
fn compare_bars(attrs: &str, labels: &[String], reference: &[f64], live: &[f64]) -> String {
    let n = labels.len().max(1);
    let ymax = reference
        .iter()
        .chain(live)
        .copied()
        .fold(0.0f64, f64::max)
        .max(1e-9)
        * 1.1;
    let slot = (W - PAD_L - PAD_R) / n as f64;
    let bar = (slot * 0.38).min(26.0);
    let py = |y: f64| y_pixel(ymax, y);
    let mut o = chart_start(attrs, ymax, 3, pct);
    for (i, label) in labels.iter().enumerate() {
        let cx = PAD_L + slot * (i as f64 + 0.5);
        let r = reference.get(i).copied().unwrap_or(0.0);
        let l = live.get(i).copied().unwrap_or(0.0);
        let _ = write!(
            o,
            "<rect class=\"ref\" x=\"{:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{:.1}\" fill=\"#aab4c0\"><title>reference {}: {}</title></rect>\
             <rect class=\"live\" x=\"{:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{:.1}\" fill=\"#2f6fde\"><title>live {}: {}</title></rect>",
            cx - bar,
            py(r),
            (H - PAD_B - py(r)).max(0.0),
            esc(label),
            pct(r),
            cx,
            py(l),
            (H - PAD_B - py(l)).max(0.0),
            esc(label),
            pct(l),
        );
        if n <= 6 || i % 2 == 0 {
            let short: String = label.chars().take(12).collect();
            let _ = write!(
                o,
                "<text x=\"{cx:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                H - PAD_B + 14.0,
                esc(&short)
            );
        }
    }
    let _ = write!(
        o,
        "<rect x=\"{PAD_L}\" y=\"{}\" width=\"10\" height=\"10\" rx=\"2\" fill=\"#aab4c0\"/><text x=\"{}\" y=\"{}\">reference (training)</text>\
         <rect x=\"{}\" y=\"{}\" width=\"10\" height=\"10\" rx=\"2\" fill=\"#2f6fde\"/><text x=\"{}\" y=\"{}\">live (latest window)</text></svg>",
        H - 12.0,
        PAD_L + 14.0,
        H - 3.0,
        PAD_L + 150.0,
        H - 12.0,
        PAD_L + 164.0,
        H - 3.0
    );
    o
}

fn proportions(counts: &[u64]) -> Vec<f64> {
    let total: u64 = counts.iter().sum();
    counts
        .iter()
        .map(|&c| {
            if total == 0 {
                0.0
            } else {
                c as f64 / total as f64
            }
        })
        .collect()
}

#[derive(Deserialize)]
struct ModelQuery {
    group: Option<String>,
}

async fn model_page(
    State(s): State<AppState>,
    admin: Result<Admin>,
    Path(model): Path<String>,
    Query(q): Query<ModelQuery>,
) -> Result<Response> {
    if admin.is_err() {
        return Ok(Redirect::to("/dashboard/login").into_response());
    }
    let cfg = &s.config.monitor;
    let group = q.group.filter(|g| !g.is_empty());
    let windows = monitor::windows(&s, &model, group.as_deref(), 60).await?;
    let alerts: Vec<monitor::Alert> =
        s.db.alerts()
            .await?
            .into_iter()
            .filter(|a| a.model == model)
            .collect();
    let accuracy = s.db.accuracy(&model).await?;
    let summary = s.db.summary(Some(&model)).await?;
    let mut groups: Vec<String> =
        s.db.nodes()
            .await?
            .iter()
            .map(|n| {
                n.labels
                    .get(&cfg.group_label)
                    .cloned()
                    .unwrap_or_else(|| "default".into())
            })
            .collect();
    groups.sort();
    groups.dedup();
    let mut b = format!("<h1>{}</h1>", esc(&model));
    let _ = write!(
        b,
        "<p class=\"muted\">Windows of {} s, the last 60. Node group: ",
        cfg.window_ms as f64 / 1000.0
    );
    let base = format!("/dashboard/models/{}", url_segment(&model));
    let _ = write!(
        b,
        "<a href=\"{base}\">{}</a>",
        if group.is_none() { "<b>all</b>" } else { "all" }
    );
    for g in &groups {
        let label = if group.as_deref() == Some(g.as_str()) {
            format!("<b>{}</b>", esc(g))
        } else {
            esc(g)
        };
        let _ = write!(
            b,
            " · <a href=\"{base}?group={}\">{label}</a>",
            url_segment(g)
        );
    }
    b.push_str("</p>");
    let mut versions: Vec<&String> = windows.keys().collect();
    versions.sort_by(
        |a, b| match (semver::Version::parse(a), semver::Version::parse(b)) {
            (Ok(x), Ok(y)) => y.cmp(&x),
            _ => b.cmp(a),
        },
    );
    if versions.is_empty() {
        b.push_str("<p class=\"muted\">No telemetry for this model in the last 60 windows.</p>");
    }
    for version in versions {
        let points = &windows[version];
        let reference = monitor::reference(&s.db, &model, version).await?;
        let totals = summary
            .versions
            .iter()
            .find(|t| &t.version == version)
            .cloned()
            .unwrap_or_default();
        b.push_str(&version_section(
            cfg,
            version,
            points,
            reference.as_ref(),
            &alerts,
            accuracy.get(version).copied().unwrap_or_default(),
            &totals,
        ));
    }
    b.push_str(&alerts_table(&alerts));
    Ok(page(&format!("Capsule hub: {model}"), &b).into_response())
}

fn version_section(
    cfg: &monitor::MonitorConfig,
    version: &str,
    points: &[WindowPoint],
    reference: Option<&ReferenceStats>,
    alerts: &[monitor::Alert],
    accuracy: monitor::Accuracy,
    totals: &monitor::VersionTotals,
) -> String {
    let firing: Vec<&monitor::Alert> = alerts
        .iter()
        .filter(|a| a.version == version && a.state == AlertState::Firing)
        .collect();
    let mut b = format!(
        "<section class=\"version\" data-version=\"{}\"><h2>Version {}</h2><div class=\"cards\">",
        esc(version),
        esc(version)
    );
    let last = points.iter().rev().find(|p| p.requests > 0);
    let err = if totals.requests > 0 {
        totals.errors as f64 / totals.requests as f64
    } else {
        0.0
    };
    let _ = write!(
        b,
        "<div class=\"card\"><div class=\"k\">Requests (all time)</div><div class=\"v\">{}</div></div>\
         <div class=\"card\"><div class=\"k\">Error rate</div><div class=\"v {}\">{}</div></div>\
         <div class=\"card\"><div class=\"k\">p99 latency (last window)</div><div class=\"v\">{}</div></div>\
         <div class=\"card\"><div class=\"k\">Accuracy (feedback)</div><div class=\"v accuracy\" data-labeled=\"{}\" data-correct=\"{}\">{}</div><div class=\"muted\">{} labeled</div></div>\
         <div class=\"card\"><div class=\"k\">Alerts firing</div><div class=\"v {}\">{}</div></div></div>",
        totals.requests,
        if err >= cfg.errors.rate {
            "bad"
        } else {
            "good"
        },
        pct(err),
        last.and_then(|p| p.p99_ms)
            .map_or("–".into(), |v| format!("{} ms", fmt_num(v))),
        accuracy.labeled,
        accuracy.correct,
        accuracy.value.map_or("–".into(), pct),
        accuracy.labeled,
        if firing.is_empty() { "good" } else { "bad" },
        firing.len()
    );
    let traffic = line_chart(
        "class=\"traffic-chart\"",
        &[
            Series {
                name: "requests",
                color: "#2f6fde",
                points: points
                    .iter()
                    .map(|p| (p.start_ms, Some(p.requests as f64)))
                    .collect(),
            },
            Series {
                name: "errors",
                color: "#d64545",
                points: points
                    .iter()
                    .map(|p| (p.start_ms, Some(p.errors as f64)))
                    .collect(),
            },
        ],
        None,
        "",
    );
    let latency = line_chart(
        "class=\"latency-chart\"",
        &[
            Series {
                name: "p50",
                color: "#13a89e",
                points: points.iter().map(|p| (p.start_ms, p.p50_ms)).collect(),
            },
            Series {
                name: "p99",
                color: "#e0a030",
                points: points.iter().map(|p| (p.start_ms, p.p99_ms)).collect(),
            },
        ],
        cfg.latency.p99_ms,
        "",
    );
    let _ = write!(
        b,
        "<div class=\"grid2\"><div class=\"feature\"><h3>Traffic per window</h3>{traffic}</div><div class=\"feature\"><h3>Latency per window (ms)</h3>{latency}</div></div>"
    );
    let Some(reference) = reference else {
        b.push_str("<p class=\"muted\">This version carries no reference statistics (build it with <code>capsule build --reference</code>), so its drift is not measured.</p></section>");
        return b;
    };
    // Drift per feature: the drifting ones first.
    let drift_of = |name: &str| -> Vec<(i64, Option<&FeatureDrift>)> {
        points
            .iter()
            .map(|p| (p.start_ms, p.drift.iter().find(|d| d.feature == name)))
            .collect()
    };
    let mut features: Vec<(bool, usize)> = reference
        .features
        .iter()
        .enumerate()
        .map(|(i, f)| {
            let drifting = firing
                .iter()
                .any(|a| a.rule == AlertRule::Drift && a.feature == f.name);
            (drifting, i)
        })
        .collect();
    features.sort_by_key(|(d, i)| (!*d, *i));
    b.push_str("<h2>Input drift per feature</h2><div class=\"grid2\">");
    for (drifting, i) in features {
        let f = &reference.features[i];
        let series = drift_of(&f.name);
        let chart = line_chart(
            &format!(
                "class=\"drift-chart\" data-feature=\"{}\" data-drifting=\"{drifting}\"",
                esc(&f.name)
            ),
            &[
                Series {
                    name: "PSI",
                    color: "#2f6fde",
                    points: series.iter().map(|(x, d)| (*x, d.map(|d| d.psi))).collect(),
                },
                Series {
                    name: "KS",
                    color: "#13a89e",
                    points: series
                        .iter()
                        .map(|(x, d)| (*x, d.and_then(|d| d.ks)))
                        .collect(),
                },
            ],
            Some(cfg.drift.psi),
            "",
        );
        let latest = points
            .iter()
            .rev()
            .filter_map(|p| p.features.get(i).filter(|h| h.total() > 0).map(|h| (p, h)))
            .next();
        let labels: Vec<String> = (0..f.binning.bins()).map(|b| f.binning.label(b)).collect();
        let live = latest
            .map(|(_, h)| proportions(&h.counts))
            .unwrap_or_default();
        let bars = compare_bars(
            &format!(
                "class=\"reference-chart\" data-feature=\"{}\"",
                esc(&f.name)
            ),
            &labels,
            &proportions(&f.counts),
            &live,
        );
        let last = series.iter().rev().find_map(|(_, d)| *d);
        let kind = match f.binning {
            Binning::Numeric { .. } => "numeric",
            Binning::Categorical { .. } => "categorical",
        };
        let stats = match last {
            Some(d) => format!(
                "PSI {:.3} · KS {} · live mean {} vs training {} · {} values, {} missing",
                d.psi,
                d.ks.map_or("–".into(), |k| format!("{k:.3}")),
                d.mean.map_or("–".into(), fmt_num),
                d.reference_mean.map_or("–".into(), fmt_num),
                d.count,
                d.missing
            ),
            None => "no live values yet".into(),
        };
        let _ = write!(
            b,
            "<div class=\"feature{}\"><h3>{} <span class=\"pill\">{kind}</span>{}</h3><p class=\"muted\">{stats}</p><div class=\"charts\">{chart}{bars}</div></div>",
            if drifting { " drifting" } else { "" },
            esc(&f.name),
            if drifting {
                " <span class=\"pill bad\">drifting</span>"
            } else {
                ""
            },
        );
    }
    b.push_str("</div>");
    let mut classes: BTreeMap<String, u64> = BTreeMap::new();
    for p in points {
        for (c, n) in &p.classes {
            *classes.entry(c.clone()).or_default() += n;
        }
    }
    if !classes.is_empty() {
        let labels: Vec<String> = classes.keys().cloned().collect();
        let counts: Vec<u64> = classes.values().copied().collect();
        let _ = write!(
            b,
            "<h2>Predicted classes (last 60 windows)</h2><div class=\"feature\">{}</div>",
            compare_bars("class=\"class-chart\"", &labels, &[], &proportions(&counts))
        );
    }
    b.push_str("</section>");
    b
}
