//! What one hostile request can make `capsule serve` allocate, measured on a real process:
//! its peak resident set (`VmHWM`) before and after the request.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::common::{self, Proc, serve_empty};

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

/// Asserts that the node's peak resident set stayed within `bound` bytes of `idle` through
/// `probe`, and prints both.
fn peak_within(node: &Proc, idle: u64, bound: u64, probe: &str) -> Result<()> {
    let peak = peak_rss(node)?;
    assert!(
        peak < idle + bound,
        "peak RSS {} MiB after {probe}, {} MiB idle",
        peak >> 20,
        idle >> 20
    );
    eprintln!(
        "node peak RSS: {} MiB idle, {} MiB after {probe}",
        idle >> 20,
        peak >> 20
    );
    Ok(())
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
    peak_within(&node, idle, 64 << 20, "8 Mi empty gRPC inputs")
}

/// Issue 16's REST probe: a 16 MiB JSON body whose `data` is 8 Mi zeros (`0,`: two bytes per
/// element). Decoded into JSON values, 32 bytes each plus their arrays, it took the node from
/// 70 MiB to 589 MiB before the shape check refused it. Now the elements stay the body's text,
/// the declared shape is checked against the signature before any element is decoded, and the
/// node's peak stays within 48 MiB of idle: the body and one copy of its text (measured: 71 to
/// 100 MiB), not the 32 MiB tensor as well.
#[test]
fn a_json_body_of_zeros_costs_its_tensor_not_json_values() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models)?;
    let fixture = common::repo().join("tests/fixtures/models/digits_mlp/model.onnx");
    common::run(&[
        "build",
        &fixture.to_string_lossy(),
        "--name",
        "digits",
        "-o",
        &models.join("digits.capsule.wasm").to_string_lossy(),
    ])?;
    let node = serve_empty(&models, &["--no-grpc"])?;
    let http = node.address("REST on ")?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()?;
    common::wait_until("the node is ready", || {
        client
            .get(format!("{http}/v2/health/ready"))
            .send()
            .is_ok_and(|r| r.status().is_success())
    })?;
    let infer = |body: Vec<u8>| -> Result<(u16, String)> {
        let resp = client
            .post(format!("{http}/v2/models/digits/infer"))
            .header("content-type", "application/json")
            .body(body)
            .send()?;
        Ok((resp.status().as_u16(), resp.text()?))
    };
    let request = |n: usize| -> Vec<u8> {
        let mut body =
            format!(r#"{{"inputs":[{{"name":"input","shape":[1,{n}],"datatype":"FP32","data":["#)
                .into_bytes();
        body.extend(std::iter::repeat_n(*b"0,", n).flatten());
        body.pop();
        body.extend_from_slice(b"]}]}");
        body
    };
    // A valid request first, so the idle figure includes a warm instance and one decode.
    let (status, text) = infer(request(64))?;
    assert_eq!(status, 200, "{text}");
    let idle = peak_rss(&node)?;
    let n = 8 << 20;
    let (status, text) = infer(request(n))?;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("has shape [1, 8388608]"), "{text}");
    peak_within(&node, idle, 48 << 20, "a 16 MiB JSON body of zeros")
}
