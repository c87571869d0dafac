//! What a client can make `capsule serve` write into its log: a model name is data, never a
//! line of its own, and a log that is not a terminal gets no colour codes.

use std::time::{Duration, Instant};

use crate::common::{http, serve_empty};
use anyhow::{Result, bail};

/// Issue 16's probe: a model name with a newline and a fake timestamp used to start a forged
/// `ERROR` line of the node's log.
#[test]
fn request_fields_cannot_forge_log_lines() -> Result<()> {
    let models = tempfile::tempdir()?;
    let node = serve_empty(models.path(), &["--no-grpc"])?;
    let url = node.address("REST on")?;
    let resp = http()
        .post(format!(
            "{url}/v2/models/x%0A2030-01-01T00:00:00Z%20ERROR%20forged/infer"
        ))
        .body("{}")
        .send()?;
    assert_eq!(resp.status().as_u16(), 404);
    let started = Instant::now();
    let lines = loop {
        let lines = node.log.lock().map(|l| l.clone()).unwrap_or_default();
        if lines.iter().any(|l| l.contains("inference refused")) {
            break lines;
        }
        if started.elapsed() > Duration::from_secs(30) {
            bail!("no \"inference refused\" line: {lines:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        !lines.iter().any(|l| l.starts_with("2030-01-01T00:00:00Z")),
        "a forged line: {lines:?}"
    );
    let refused = lines
        .iter()
        .find(|l| l.contains("inference refused"))
        .map(String::as_str)
        .unwrap_or_default();
    assert!(
        refused.contains(r#"model="x\n2030-01-01T00:00:00Z ERROR forged""#),
        "{refused}"
    );
    assert!(
        !lines.iter().any(|l| l.contains('\u{1b}')),
        "colour codes in a log that is not a terminal: {lines:?}"
    );
    Ok(())
}
