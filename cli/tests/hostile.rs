//! What one hostile request can make `capsule serve` allocate, measured on a real process:
//! its peak resident set (`VmHWM`) before and after the request.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use common::{Proc, serve_empty};

/// The node's peak resident set so far, in bytes (Linux).
fn peak_rss(node: &Proc) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.child.id()))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("no VmHWM line")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

/// The `gRPC on ADDR` of the node's start-up line.
fn grpc_address(node: &Proc) -> Result<String> {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        let lines = node.log.lock().map(|l| l.clone()).unwrap_or_default();
        if let Some(rest) = lines.iter().find_map(|l| l.split_once("gRPC on ")) {
            return Ok(rest
                .1
                .split([' ', ';', ','])
                .next()
                .unwrap_or_default()
                .to_owned());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("no \"gRPC on\" line")
}

/// Issue 16's probe: a `ModelInfer` of 16 MiB made of 8 Mi empty `inputs` entries (two bytes
/// each on the wire, a struct of a few hundred bytes each once decoded) took a node from
/// 42 MiB to 2.8 GiB before it answered INVALID_ARGUMENT. Now the codec refuses it from its
/// wire bytes with RESOURCE_EXHAUSTED, and the node's peak stays within 64 MiB of idle.
#[test]
fn millions_of_empty_grpc_inputs_do_not_grow_the_node() -> Result<()> {
    let models = tempfile::tempdir()?;
    let node = serve_empty(models.path(), &["--grpc", "127.0.0.1:0"])?;
    let grpc = grpc_address(&node)?;
    let client = reqwest::blocking::Client::builder()
        .http2_prior_knowledge()
        .timeout(Duration::from_secs(120))
        .build()?;
    let call = |message: &[u8]| -> Result<String> {
        // gRPC framing: not compressed, the message's length (big-endian), the message.
        let mut body = vec![0u8];
        body.extend_from_slice(&u32::try_from(message.len())?.to_be_bytes());
        body.extend_from_slice(message);
        let resp = client
            .post(format!(
                "http://{grpc}/inference.GRPCInferenceService/ModelInfer"
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(body)
            .send()?;
        // An error before any message is a trailers-only response: the status is a header.
        Ok(resp
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_owned())
    };
    // A small request of the same kind first, so the idle figure includes HTTP/2 and the
    // codec's warm-up: refused by the handler (no such model), NOT_FOUND (5).
    assert_eq!(call(&[1 << 3 | 2, 1, b'x', 5 << 3 | 2, 0])?, "5");
    let idle = peak_rss(&node)?;
    let probe: Vec<u8> = std::iter::repeat_n([5 << 3 | 2, 0], 8 << 20)
        .flatten()
        .collect();
    // RESOURCE_EXHAUSTED (8).
    assert_eq!(call(&probe)?, "8");
    let peak = peak_rss(&node)?;
    assert!(
        peak < idle + (64 << 20),
        "peak RSS {} MiB after the probe, {} MiB idle",
        peak >> 20,
        idle >> 20
    );
    eprintln!(
        "node peak RSS: {} MiB idle, {} MiB after 8 Mi empty gRPC inputs",
        idle >> 20,
        peak >> 20
    );
    Ok(())
}
