//! The edge node on loopback: REST (JSON and binary tensors) and gRPC against in-process
//! inference, real clients (tritonclient, promtool), every failure mode, overload, hot swap
//! and graceful shutdown.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use capsule_format::v2::{self, INFERENCE_HEADER_CONTENT_LENGTH, InferenceRequest};
use capsule_format::{NamedTensor, Tensor};
use capsule_node::proto::grpc_inference_service_client::GrpcInferenceServiceClient;
use capsule_node::proto::{ModelInferRequest, model_infer_request};
use capsule_node::{Node, NodeConfig, VersionPolicy};
use capsule_tests::{WatCapsule, fixture_capsule, golden, test_cache_dir, wat_capsule};
use serde_json::{Value, json};

struct TestNode {
    node: Node,
    dir: tempfile::TempDir,
    base: String,
    http: reqwest::Client,
}

fn config(dir: &Path) -> NodeConfig {
    NodeConfig {
        models: dir.to_path_buf(),
        http: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
        grpc: Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0))),
        instances: 2,
        queue: 8,
        poll_interval_ms: 0,
        cache_dir: Some(test_cache_dir()),
        // As the shared engine: answers are compared with in-process ones bit for bit.
        host_kernels: false,
        ..NodeConfig::default()
    }
}

fn put(dir: &Path, model: &str, version: &str, bytes: &[u8]) -> Result<()> {
    let d = dir.join(model).join(version);
    std::fs::create_dir_all(&d)?;
    // Written under a hidden name and renamed, as the repository docs ask.
    let tmp = d.join(".incoming.capsule.wasm");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, d.join(format!("{model}.capsule.wasm")))?;
    Ok(())
}

/// A fixture model's capsule as version 1.
fn put_fixture(dir: &Path, model: &str) -> Result<()> {
    put(dir, model, "1", &fixture_capsule(model)?.bytes)
}

fn wat(y: f32, golden_y: Option<f32>) -> Result<Vec<u8>> {
    wat_capsule(&WatCapsule {
        name: "wat".into(),
        y,
        golden_y,
        ..WatCapsule::default()
    })
}

impl TestNode {
    async fn start(
        setup: impl FnOnce(&Path) -> Result<()>,
        tweak: impl FnOnce(&mut NodeConfig),
    ) -> Result<TestNode> {
        let dir = tempfile::tempdir()?;
        setup(dir.path())?;
        let mut c = config(dir.path());
        tweak(&mut c);
        let node = Node::start(c).await?;
        node.wait_ready().await;
        let base = format!("http://{}", node.http_addr());
        Ok(TestNode {
            node,
            dir,
            base,
            http: reqwest::Client::new(),
        })
    }

    async fn get(&self, path: &str) -> Result<(u16, Value)> {
        let r = self.http.get(format!("{}{path}", self.base)).send().await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await?))
    }

    async fn post(&self, path: &str, body: Vec<u8>) -> Result<(u16, Value)> {
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .body(body)
            .send()
            .await?;
        let status = r.status().as_u16();
        Ok((status, r.json().await?))
    }

    async fn infer_x(&self, model: &str, x: f32) -> Result<(u16, Value)> {
        let body =
            json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [x]}]});
        self.post(
            &format!("/v2/models/{model}/infer"),
            serde_json::to_vec(&body)?,
        )
        .await
    }
}

fn json_request(inputs: &[NamedTensor]) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&InferenceRequest::from_tensors(
        inputs,
    )?)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_grpc_answer_exactly_like_in_process_inference() -> Result<()> {
    let models = ["digits_mlp", "mnist_cnn"];
    let t = TestNode::start(
        |dir| {
            for m in models {
                put_fixture(dir, m)?;
            }
            Ok(())
        },
        |_| {},
    )
    .await?;
    assert_eq!(
        t.get("/v2/health/live").await?,
        (200, json!({"live": true}))
    );
    assert_eq!(
        t.get("/v2/health/ready").await?,
        (200, json!({"ready": true}))
    );
    let (status, meta) = t.get("/v2").await?;
    assert_eq!(
        (status, &meta["name"], &meta["extensions"]),
        (200, &json!("capsule"), &json!(["binary_tensor_data"]))
    );
    let (status, meta) = t.get("/v2/models/digits_mlp").await?;
    assert_eq!(status, 200);
    assert_eq!(meta["versions"], json!(["1"]));
    assert_eq!(
        meta["inputs"],
        json!([{"name": "input", "datatype": "FP32", "shape": [-1, 64]}])
    );
    assert_eq!(
        t.get("/v2/models/digits_mlp/versions/1/ready").await?,
        (200, json!({"name": "digits_mlp", "ready": true}))
    );

    let grpc_addr = t.node.grpc_addr().context("grpc")?;
    let mut grpc = GrpcInferenceServiceClient::connect(format!("http://{grpc_addr}")).await?;
    for m in models {
        let capsule = fixture_capsule(m)?;
        let loaded = t.node.registry().resolve(m, None)?;
        for sample in golden(m)? {
            let expected = capsule.capsule.infer(&sample.inputs)?;
            // JSON in, JSON out.
            let (status, body) = t
                .post(
                    &format!("/v2/models/{m}/versions/1/infer"),
                    json_request(&sample.inputs)?,
                )
                .await?;
            assert_eq!(status, 200, "{body}");
            assert_eq!(body["model_version"], json!("1"));
            let response: v2::InferenceResponse = serde_json::from_value(body)?;
            assert_eq!(
                response.to_tensors()?,
                expected,
                "{m} {} over JSON",
                sample.name
            );
            // Binary in, binary out.
            let names: Vec<&str> = expected.iter().map(|o| o.name.as_str()).collect();
            let (body, json_len) = v2::encode_binary_request(&sample.inputs, &names)?;
            let r = t
                .http
                .post(format!("{}/v2/models/{m}/infer", t.base))
                .header(INFERENCE_HEADER_CONTENT_LENGTH, json_len)
                .header("x-request-id", "abc-123")
                .body(body)
                .send()
                .await?;
            assert_eq!(r.status().as_u16(), 200);
            assert_eq!(r.headers()["x-request-id"], "abc-123");
            let header_len: usize = r.headers()[INFERENCE_HEADER_CONTENT_LENGTH]
                .to_str()?
                .parse()?;
            let bytes = r.bytes().await?;
            let (response, tensors) = v2::decode_response(&bytes, Some(header_len))?;
            assert_eq!(response.id.as_deref(), Some("abc-123"));
            assert_eq!(tensors, expected, "{m} {} over binary", sample.name);
            // gRPC.
            let request = ModelInferRequest {
                model_name: m.into(),
                inputs: sample
                    .inputs
                    .iter()
                    .map(|t| model_infer_request::InferInputTensor {
                        name: t.name.clone(),
                        datatype: t.tensor.dtype.v2_name().into(),
                        shape: t.tensor.shape.iter().map(|&d| d as i64).collect(),
                        ..Default::default()
                    })
                    .collect(),
                raw_input_contents: sample
                    .inputs
                    .iter()
                    .map(|t| t.tensor.data.clone())
                    .collect(),
                ..Default::default()
            };
            let response = grpc.model_infer(request).await?.into_inner();
            assert_eq!(response.model_version, "1");
            let got: Vec<NamedTensor> = response
                .outputs
                .iter()
                .zip(&response.raw_output_contents)
                .map(|(o, raw)| {
                    Ok(NamedTensor {
                        name: o.name.clone(),
                        tensor: Tensor::new(
                            capsule_format::DType::from_v2_name(&o.datatype)?,
                            o.shape.iter().map(|&d| d as u64).collect(),
                            raw.clone(),
                        )?,
                    })
                })
                .collect::<Result<_>>()?;
            assert_eq!(got, expected, "{m} {} over gRPC", sample.name);
        }
        assert!(
            loaded
                .capsule()
                .stats()
                .inferences
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 3
        );
    }
    let e = grpc
        .model_infer(ModelInferRequest {
            model_name: "nope".into(),
            ..Default::default()
        })
        .await
        .expect_err("unknown model");
    assert_eq!(
        (e.code(), e.message()),
        (tonic::Code::NotFound, "unknown model \"nope\"")
    );
    t.node.shutdown().await;
    Ok(())
}

/// NVIDIA's own client (`pip install tritonclient[http,grpc]`) over both protocols, and
/// Prometheus' `promtool check metrics` on what the node exports afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tritonclient_and_promtool_accept_the_node() -> Result<()> {
    let t = TestNode::start(|dir| put_fixture(dir, "digits_mlp"), |_| {}).await?;
    let sample = golden("digits_mlp")?.remove(0);
    let capsule = fixture_capsule("digits_mlp")?;
    let expected = capsule.capsule.infer(&sample.inputs)?;
    let mut request: Value = serde_json::to_value(InferenceRequest::from_tensors(&sample.inputs)?)?;
    request["model"] = json!("digits_mlp");
    let request_path = t.dir.path().join("request.json");
    std::fs::write(&request_path, serde_json::to_vec(&request)?)?;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/tritonclient_check.py");
    let http_addr = t.node.http_addr().to_string();
    let grpc_addr = t.node.grpc_addr().context("grpc")?.to_string();
    let output = tokio::process::Command::new("python3")
        .arg(&script)
        .args([&http_addr, &grpc_addr])
        .arg(&request_path)
        .output()
        .await
        .context(
            "running python3 (the tests need `pip install tritonclient[http,grpc]`; see .ci/run)",
        )?;
    assert!(
        output.status.success(),
        "tritonclient check failed (install it with `pip install tritonclient[http,grpc]`):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Value = serde_json::from_slice(&output.stdout)?;
    for mode in ["http_binary", "http_json", "grpc"] {
        for e in &expected {
            let got = &results[mode][&e.name];
            assert_eq!(got["shape"], json!(e.tensor.shape), "{mode} {}", e.name);
            // Compared at the tensor's precision: the JSON text goes through Python's and
            // serde_json's float formatting.
            let values: Vec<f32> = got["data"]
                .as_array()
                .context("data")?
                .iter()
                .filter_map(Value::as_f64)
                .map(|v| v as f32)
                .collect();
            let want: Vec<f32> = e
                .tensor
                .to_f64_vec()?
                .into_iter()
                .map(|v| v as f32)
                .collect();
            assert_eq!(values, want, "{mode} {}", e.name);
        }
    }
    let metrics = t
        .http
        .get(format!("{}/metrics", t.base))
        .send()
        .await?
        .text()
        .await?;
    assert!(metrics.contains("capsule_requests_total{model=\"digits_mlp\",outcome=\"success\",protocol=\"grpc\",version=\"1\"} 1"), "{metrics}");
    assert!(metrics.contains("capsule_requests_total{model=\"digits_mlp\",outcome=\"success\",protocol=\"http\",version=\"1\"} 2"), "{metrics}");
    for series in [
        "capsule_queue_seconds_bucket",
        "capsule_compute_seconds_bucket",
        "capsule_queue_depth",
        "capsule_instances",
        "capsule_inferences_total",
        "capsule_guest_memory_bytes",
        "capsule_swaps_total",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(series), "{series} missing");
    }
    let metrics_path = t.dir.path().join("metrics.txt");
    std::fs::write(&metrics_path, &metrics)?;
    let check = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&metrics_path)?)
        .output()
        .context("running promtool (Debian package `prometheus`; see .ci/run)")?;
    assert!(
        check.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    t.node.shutdown().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_failure_mode_has_its_status_and_exact_error() -> Result<()> {
    let t = TestNode::start(
        |dir| {
            put_fixture(dir, "digits_mlp")?;
            put(dir, "wat", "1", &wat(42.0, None)?)?;
            put(dir, "broken", "1", b"not a capsule")
        },
        |c| {
            c.max_body_bytes = 4096;
            c.deadline_ms = 300;
        },
    )
    .await?;
    let infer = "/v2/models/digits_mlp/infer";
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            infer,
            b"{not json".to_vec(),
            400,
            "invalid inference request: key must be a string at line 1 column 2",
        ),
        // What the inputs declare is checked against the signature before any element is
        // decoded: the datatype first, then the elements.
        (
            infer,
            br#"{"inputs":[{"name":"input","shape":[1,64],"datatype":"INT32","data":[0]}]}"#
                .to_vec(),
            400,
            "input \"input\" has datatype INT32, the capsule expects FP32",
        ),
        (
            infer,
            br#"{"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":[0]}]}"#
                .to_vec(),
            400,
            "tensor \"input\": shape [1, 64] has 64 elements but data has 1",
        ),
        (
            infer,
            serde_json::to_vec(
                &json!({"inputs":[{"name":"input","shape":[1,64],"datatype":"INT32","data":vec![0;64]}]}),
            )?,
            400,
            "input \"input\" has datatype INT32, the capsule expects FP32",
        ),
        (
            infer,
            serde_json::to_vec(
                &json!({"inputs":[{"name":"input","shape":[1,63],"datatype":"FP32","data":vec![0.0;63]}]}),
            )?,
            400,
            "input \"input\" has shape [1, 63], the capsule expects [N, 64]",
        ),
        (
            infer,
            br#"{"inputs":[]}"#.to_vec(),
            400,
            "missing input \"input\"",
        ),
        (
            infer,
            serde_json::to_vec(
                &json!({"inputs":[{"name":"input","shape":[1,64],"datatype":"FP32","data":vec![0.0;64]}],"outputs":[{"name":"nope"}]}),
            )?,
            400,
            "invalid inference request: unknown output \"nope\" (the model has [\"label\", \"probabilities\"])",
        ),
        (
            infer,
            vec![b' '; 5000],
            413,
            "request body is 5000 bytes, over the limit of 4096 bytes",
        ),
        (
            "/v2/models/nope/infer",
            b"{}".to_vec(),
            404,
            "unknown model \"nope\"",
        ),
        (
            "/v2/models/digits_mlp/versions/7/infer",
            b"{}".to_vec(),
            404,
            "unknown version \"7\" of model \"digits_mlp\"",
        ),
        (
            "/v2/models/broken/infer",
            b"{}".to_vec(),
            503,
            "model \"broken\" is not ready: version 1: load failed: invalid capsule: not a valid WebAssembly module: bad magic number",
        ),
        (
            "/v2/models/wat/infer",
            br#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#.to_vec(),
            504,
            "deadline of 300 ms exceeded during inference",
        ),
        (
            "/v2/nothing",
            b"{}".to_vec(),
            404,
            "no route for POST /v2/nothing",
        ),
    ];
    let mut mismatches = Vec::new();
    for (path, body, status, error) in cases {
        let got = t.post(path, body).await?;
        if got != (status, json!({"error": error})) {
            mismatches.push(format!(
                "POST {path}: got {got:?}, expected {status} {error:?}"
            ));
        }
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    // The instance that hit the deadline was discarded; the next call succeeds.
    assert_eq!(t.infer_x("wat", 0.0).await?.0, 200);
    let (status, ready) = t.get("/v2/models/broken/ready").await?;
    assert_eq!((status, &ready["ready"]), (503, &json!(false)));
    let metrics = t
        .http
        .get(format!("{}/metrics", t.base))
        .send()
        .await?
        .text()
        .await?;
    for line in [
        "capsule_traps_total{model=\"wat\",version=\"1\"} 1",
        "capsule_requests_total{model=\"wat\",outcome=\"timeout\",protocol=\"http\",version=\"1\"} 1",
        "capsule_requests_total{model=\"digits_mlp\",outcome=\"bad_request\",protocol=\"http\",version=\"1\"} 7",
        "capsule_requests_total{model=\"digits_mlp\",outcome=\"too_large\",protocol=\"http\",version=\"1\"} 1",
        "capsule_swaps_total{model=\"broken\",outcome=\"load_failed\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    t.node.shutdown().await;
    Ok(())
}

/// One instance and a queue of two: of ten slow requests sent at once, exactly three are
/// accepted (one running, two waiting) and seven are refused with 429 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_past_the_queue_is_refused_with_exact_counts() -> Result<()> {
    let t = Arc::new(
        TestNode::start(
            |dir| put(dir, "wat", "1", &wat(42.0, None)?),
            |c| {
                c.instances = 1;
                c.queue = 2;
            },
        )
        .await?,
    );
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let t = Arc::clone(&t);
        // x = 1000000 spins 1e9 iterations: long enough that all ten arrive while the first
        // one runs.
        tasks.push(tokio::spawn(
            async move { t.infer_x("wat", 1_000_000.0).await },
        ));
    }
    let mut statuses = Vec::new();
    for task in tasks {
        statuses.push(task.await??);
    }
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    let rejected: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    assert_eq!((ok, rejected.len()), (3, 7), "{statuses:?}");
    assert_eq!(
        rejected[0].1,
        json!({"error": "model \"wat\" version \"1\" is overloaded: 3 requests in flight and queued"})
    );
    let metrics = t
        .http
        .get(format!("{}/metrics", t.base))
        .send()
        .await?
        .text()
        .await?;
    assert!(metrics.contains("capsule_requests_total{model=\"wat\",outcome=\"rejected\",protocol=\"http\",version=\"1\"} 7"), "{metrics}");
    Ok(())
}

/// Version 2 arrives and version 1 leaves while clients keep sending: no request fails, and
/// every answer comes from a whole version (its `y` matches its `model_version`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_swap_under_load_fails_no_request() -> Result<()> {
    let t =
        Arc::new(TestNode::start(|dir| put(dir, "wat", "1", &wat(1.0, Some(1.0))?), |_| {}).await?);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (t, stop) = (Arc::clone(&t), Arc::clone(&stop));
        clients.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seen.push(t.infer_x("wat", 0.0).await?);
            }
            anyhow::Ok(seen)
        }));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    put(t.dir.path(), "wat", "2", &wat(2.0, Some(2.0))?)?;
    t.node.sync_now().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    std::fs::remove_dir_all(t.dir.path().join("wat/1"))?;
    t.node.sync_now().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut by_version = std::collections::BTreeMap::new();
    for c in clients {
        for (status, body) in c.await?? {
            assert_eq!(status, 200, "{body}");
            let version = body["model_version"]
                .as_str()
                .context("version")?
                .to_owned();
            let y = body["outputs"][0]["data"][0].as_f64().context("y")?;
            assert_eq!(
                y.to_string(),
                version,
                "answer from a mixed version: {body}"
            );
            *by_version.entry(version).or_insert(0) += 1;
        }
    }
    assert!(
        by_version.get("1").is_some_and(|n| *n > 0) && by_version.get("2").is_some_and(|n| *n > 0),
        "{by_version:?}"
    );
    let (_, meta) = t.get("/v2/models/wat").await?;
    assert_eq!(meta["versions"], json!(["2"]));
    Ok(())
}

/// A new version whose golden probe fails is refused; the old one keeps serving; a fixed
/// file dropped in its place is picked up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_probe_keeps_the_old_version() -> Result<()> {
    let t = TestNode::start(
        |dir| put(dir, "wat", "1", &wat(1.0, Some(1.0))?),
        |c| {
            c.poll_interval_ms = 50;
        },
    )
    .await?;
    // Version 2 answers 2 but its golden sample expects 3.
    put(t.dir.path(), "wat", "2", &wat(2.0, Some(3.0))?)?;
    t.node.sync_now().await;
    let (status, body) = t.infer_x("wat", 0.0).await?;
    assert_eq!((status, &body["model_version"]), (200, &json!("1")));
    let metrics = t
        .http
        .get(format!("{}/metrics", t.base))
        .send()
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("capsule_swaps_total{model=\"wat\",outcome=\"probe_failed\"} 1"),
        "{metrics}"
    );
    // The watcher (50 ms) picks up a corrected version 2 without being asked.
    put(t.dir.path(), "wat", "2", &wat(2.0, Some(2.0))?)?;
    let mut version = String::new();
    for _ in 0..200 {
        let (_, body) = t.infer_x("wat", 0.0).await?;
        version = body["model_version"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if version == "2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(version, "2");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_policy_and_flat_files() -> Result<()> {
    let t = TestNode::start(
        |dir| {
            for v in ["1", "2", "10"] {
                put(dir, "wat", v, &wat(v.parse()?, None)?)?;
            }
            // A flat file is named from its manifest.
            let flat = wat_capsule(&WatCapsule {
                name: "flat".into(),
                version: semver::Version::new(0, 3, 0),
                y: 7.0,
                golden_y: None,
            })?;
            std::fs::write(dir.join("flat.capsule.wasm"), flat)?;
            Ok(())
        },
        |c| c.version_policy = VersionPolicy::Latest(2),
    )
    .await?;
    let (_, meta) = t.get("/v2/models/wat").await?;
    assert_eq!(meta["versions"], json!(["2", "10"]));
    let (_, body) = t.infer_x("wat", 0.0).await?;
    assert_eq!(
        (&body["model_version"], &body["outputs"][0]["data"][0]),
        (&json!("10"), &json!(10.0))
    );
    let (status, body) = t
        .post(
            "/v2/models/wat/versions/2/infer",
            serde_json::to_vec(
                &json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}]}),
            )?,
        )
        .await?;
    assert_eq!((status, &body["outputs"][0]["data"][0]), (200, &json!(2.0)));
    assert_eq!(t.get("/v2/models/wat/versions/1/ready").await?.0, 404);
    let (_, body) = t.infer_x("flat", 0.0).await?;
    assert_eq!(
        (&body["model_version"], &body["outputs"][0]["data"][0]),
        (&json!("0.3.0"), &json!(7.0))
    );
    // Removing version 10 brings version 1 back under latest:2.
    std::fs::remove_dir_all(t.dir.path().join("wat/10"))?;
    t.node.sync_now().await;
    let (_, meta) = t.get("/v2/models/wat").await?;
    assert_eq!(meta["versions"], json!(["1", "2"]));
    // Removing every version removes the model.
    std::fs::remove_dir_all(t.dir.path().join("wat"))?;
    t.node.sync_now().await;
    assert_eq!(
        t.get("/v2/models/wat").await?,
        (404, json!({"error": "unknown model \"wat\""}))
    );
    Ok(())
}

/// Shutdown lets a request that is running finish, and refuses new connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() -> Result<()> {
    let t = TestNode::start(|dir| put(dir, "wat", "1", &wat(42.0, None)?), |_| {}).await?;
    let base = t.base.clone();
    let client = t.http.clone();
    let slow = tokio::spawn(async move {
        let body = json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [300_000.0]}]});
        let r = client
            .post(format!("{base}/v2/models/wat/infer"))
            .json(&body)
            .send()
            .await?;
        anyhow::Ok((r.status().as_u16(), r.json::<Value>().await?))
    });
    // Let the request reach the guest.
    let registry = Arc::clone(t.node.registry());
    for _ in 0..2000 {
        let busy = registry.resolve("wat", None)?.capsule().idle_instances() < 2;
        if busy {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let base = t.base.clone();
    t.node.shutdown().await;
    let (status, body) = slow.await??;
    assert_eq!(
        (status, &body["outputs"][0]["data"][0]),
        (200, &json!(42.0))
    );
    assert!(
        reqwest::get(format!("{base}/v2/health/live"))
            .await
            .is_err(),
        "still accepting after shutdown"
    );
    Ok(())
}

/// Raw inputs through the node: PNG bytes as `{"b64": ...}` and tabular records as JSON
/// objects in V2 JSON, PNG bytes as a binary BYTES tensor; outputs as onnxruntime's, and a
/// corrupt image as a 400 naming the input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_inputs_reach_the_pipeline_over_rest() -> Result<()> {
    use base64::Engine as _;
    let examples = capsule_tests::repo_dir().join("examples");
    let mnist = capsule_tests::example_capsule("mnist-png")?;
    let wine = capsule_tests::example_capsule("wine-tabular")?;
    let node = TestNode::start(
        |dir| {
            put(dir, "mnist", "1", &mnist.bytes)?;
            put(dir, "wine", "1", &wine.bytes)
        },
        |_| {},
    )
    .await?;

    let expected: Value =
        serde_json::from_slice(&std::fs::read(examples.join("mnist-png/expected.json"))?)?;
    let samples = expected["samples"].as_array().context("samples")?;
    let pngs: Vec<Vec<u8>> = samples
        .iter()
        .map(|s| {
            std::fs::read(
                examples
                    .join("mnist-png")
                    .join(s["image"].as_str().unwrap_or("")),
            )
        })
        .collect::<Result<_, _>>()?;
    let b64: Vec<Value> = pngs
        .iter()
        .map(|p| json!({"b64": base64::engine::general_purpose::STANDARD.encode(p)}))
        .collect();
    let body = json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [b64.len()], "data": b64}],
                      "outputs": [{"name": "top3"}]});
    let (status, out) = node
        .post("/v2/models/mnist/infer", serde_json::to_vec(&body)?)
        .await?;
    assert_eq!(status, 200, "{out}");
    let want: Vec<Value> = samples
        .iter()
        .flat_map(|s| s["top3"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(out["outputs"][0]["name"], "top3");
    assert_eq!(out["outputs"][0]["datatype"], "BYTES");
    assert_eq!(out["outputs"][0]["shape"], json!([samples.len(), 3]));
    assert_eq!(out["outputs"][0]["data"], Value::Array(want.clone()));

    // The same images as a binary BYTES tensor (Triton's binary extension).
    let items: Vec<&[u8]> = pngs.iter().map(Vec::as_slice).collect();
    let tensor = NamedTensor {
        name: "image".into(),
        tensor: Tensor::from_byte_strings(vec![items.len() as u64], &items)?,
    };
    let (body, json_len) = v2::encode_binary_request(&[tensor], &["top3"])?;
    let r = node
        .http
        .post(format!("{}/v2/models/mnist/infer", node.base))
        .header(INFERENCE_HEADER_CONTENT_LENGTH, json_len)
        .body(body)
        .send()
        .await?;
    assert_eq!(r.status().as_u16(), 200);
    let header = r
        .headers()
        .get(INFERENCE_HEADER_CONTENT_LENGTH)
        .map(|v| v.to_str().map(str::to_owned))
        .transpose()?;
    let bytes = r.bytes().await?;
    let (_, outputs) = v2::decode_response(&bytes, header.as_deref().map(str::parse).transpose()?)?;
    assert_eq!(
        capsule_pipeline::strings(&outputs[0].tensor),
        want.iter().filter_map(Value::as_str).collect::<Vec<_>>()
    );

    // A corrupt image: 400, the input named, the node still serving.
    let body = json!({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not a png"]}]});
    let (status, out) = node
        .post("/v2/models/mnist/infer", serde_json::to_vec(&body)?)
        .await?;
    assert_eq!(status, 400);
    assert_eq!(
        out,
        json!({"error": "inference failed: guest error: BadInput: input \"image\": not a PNG or JPEG image"})
    );

    // Tabular records as JSON objects, one with a null and missing fields.
    let records: Value =
        serde_json::from_slice(&std::fs::read(examples.join("wine-tabular/records.json"))?)?;
    let records = records.as_array().context("records")?;
    let wine_expected: Value =
        serde_json::from_slice(&std::fs::read(examples.join("wine-tabular/expected.json"))?)?;
    let body = json!({"inputs": [{"name": "record", "datatype": "BYTES", "shape": [records.len()], "data": records}],
                      "outputs": [{"name": "label"}]});
    let (status, out) = node
        .post("/v2/models/wine/infer", serde_json::to_vec(&body)?)
        .await?;
    assert_eq!(status, 200, "{out}");
    let want: Vec<Value> = wine_expected["samples"]
        .as_array()
        .context("samples")?
        .iter()
        .map(|s| s["label"].clone())
        .collect();
    assert_eq!(out["outputs"][0]["data"], Value::Array(want));
    node.node.shutdown().await;
    Ok(())
}

/// Model images (split form) in the repository: an image whose code is not in the
/// repository's code store yet is refused and retried when the code arrives (the scan stamps
/// the code file too); a second model of the same guest build needs no second code file; a
/// flat image is named from its manifest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_images_serve_once_their_code_is_there() -> Result<()> {
    let mlp = capsule_format::split::split(&fixture_capsule("digits_mlp")?.bytes)?;
    let cnn = capsule_format::split::split(&fixture_capsule("mnist_cnn")?.bytes)?;
    assert_eq!(mlp.code_sha256, cnn.code_sha256);
    let t = TestNode::start(
        |dir| {
            let d = dir.join("digits").join("1");
            std::fs::create_dir_all(&d)?;
            std::fs::write(d.join("digits.capsule.img"), &mlp.image)?;
            Ok(())
        },
        |_| {},
    )
    .await?;
    let (status, body) = t.get("/v2/models/digits").await?;
    assert_eq!(status, 503, "{body}");
    let needs = format!("needs guest code {}", mlp.code_sha256);
    assert!(
        body["error"].as_str().is_some_and(|e| e.contains(&needs)),
        "{body}"
    );
    let code = capsule_node::code_path(t.dir.path(), &mlp.code_sha256).context("code path")?;
    std::fs::create_dir_all(code.parent().context("code dir")?)?;
    std::fs::write(&code, &mlp.code)?;
    std::fs::write(t.dir.path().join("cnn.capsule.img"), &cnn.image)?;
    t.node.sync_now().await;
    let flat_name = fixture_capsule("mnist_cnn")?.manifest.name.clone();
    for (model, fixture) in [("digits", "digits_mlp"), (flat_name.as_str(), "mnist_cnn")] {
        let sample = golden(fixture)?.remove(0);
        let (status, body) = t
            .post(
                &format!("/v2/models/{model}/infer"),
                json_request(&sample.inputs)?,
            )
            .await?;
        assert_eq!(status, 200, "{model}: {body}");
        let response: v2::InferenceResponse = serde_json::from_value(body)?;
        capsule_runtime::golden::compare(
            &sample.outputs,
            &response.to_tensors()?,
            sample.tolerance,
        )
        .map_err(|e| anyhow::anyhow!("{model}: {e}"))?;
    }
    Ok(())
}

/// Made-up model and version names add no metric series (issue 16's probe: 3,000 requests to
/// unknown models made 3,000 series, kept forever): they count under `model=""` and
/// `version=""`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_names_add_no_metric_series() -> Result<()> {
    let t = TestNode::start(|dir| put(dir, "wat", "1", &wat(1.0, None)?), |_| {}).await?;
    let body = serde_json::to_vec(
        &json!({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}]}),
    )?;
    for i in 0..20 {
        let (status, _) = t
            .post(&format!("/v2/models/nope-{i}/infer"), body.clone())
            .await?;
        assert_eq!(status, 404);
        let (status, _) = t
            .post(&format!("/v2/models/wat/versions/v{i}/infer"), body.clone())
            .await?;
        assert_eq!(status, 404);
    }
    assert_eq!(t.infer_x("wat", 0.0).await?.0, 200);
    let metrics = t
        .http
        .get(format!("{}/metrics", t.base))
        .send()
        .await?
        .text()
        .await?;
    assert!(!metrics.contains("nope-"), "{metrics}");
    assert!(!metrics.contains("version=\"v1"), "{metrics}");
    for line in [
        "capsule_requests_total{model=\"\",outcome=\"not_found\",protocol=\"http\",version=\"\"} 20",
        "capsule_requests_total{model=\"wat\",outcome=\"not_found\",protocol=\"http\",version=\"\"} 20",
        "capsule_requests_total{model=\"wat\",outcome=\"success\",protocol=\"http\",version=\"1\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
    Ok(())
}

/// Feedback labels drive the hub's accuracy alerts and retraining trigger, so a node takes
/// them only with its `feedback_token`: without one configured the route is off (403),
/// without the token or with another it is 401 (issue 16: anyone reaching the node could send
/// labels).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_needs_the_nodes_token() -> Result<()> {
    let label = serde_json::to_vec(&json!({"id": "r1", "label": "a"}))?;
    let off = TestNode::start(|dir| put(dir, "wat", "1", &wat(1.0, None)?), |_| {}).await?;
    let (status, body) = off.post("/v2/models/wat/feedback", label.clone()).await?;
    assert_eq!(status, 403, "{body}");
    let t = TestNode::start(
        |dir| put(dir, "wat", "1", &wat(1.0, None)?),
        |c| c.feedback_token = Some("s3cret".into()),
    )
    .await?;
    for token in [None, Some("s3cre"), Some("s3cret!")] {
        let mut req = t
            .http
            .post(format!("{}/v2/models/wat/feedback", t.base))
            .body(label.clone());
        if let Some(token) = token {
            req = req.bearer_auth(token);
        }
        assert_eq!(req.send().await?.status().as_u16(), 401, "{token:?}");
    }
    // With the token, the request gets past the check (this node has no hub, so no window
    // keeps labels: whatever it answers, it is not 401 or 403).
    let status = t
        .http
        .post(format!("{}/v2/models/wat/feedback", t.base))
        .bearer_auth("s3cret")
        .body(label)
        .send()
        .await?
        .status()
        .as_u16();
    assert!(status != 401 && status != 403, "{status}");
    Ok(())
}

/// `/capsules/` streams the installed file with its length and honours `Range` (it used to
/// read the whole capsule into memory per GET).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_capsules_are_streamed_with_ranges() -> Result<()> {
    let capsule = wat(1.0, None)?;
    let expected = capsule.clone();
    let t = TestNode::start(move |dir| put(dir, "wat", "1", &capsule), |_| {}).await?;
    let url = format!("{}/capsules/wat/1.capsule.wasm", t.base);
    let whole = t.http.get(&url).send().await?;
    assert_eq!(whole.status().as_u16(), 200);
    assert_eq!(whole.headers()["content-type"], "application/wasm");
    assert_eq!(whole.content_length(), Some(expected.len() as u64));
    assert_eq!(whole.bytes().await?.as_ref(), expected.as_slice());
    let head = t.http.get(&url).header("range", "bytes=0-3").send().await?;
    assert_eq!(head.status().as_u16(), 206);
    assert_eq!(head.bytes().await?.as_ref(), b"\0asm");
    let missing = t
        .http
        .get(format!("{}/capsules/wat/9.capsule.wasm", t.base))
        .send()
        .await?;
    assert_eq!(missing.status().as_u16(), 404);
    Ok(())
}

/// An output named more than once is refused (issue 16's probe: 200,000 copies of one output
/// made a 53.6 MB response and left the node 290 MiB larger). gRPC checks its requested
/// outputs with the same function (`v2::requested_outputs`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_requested_twice_is_refused() -> Result<()> {
    let t = TestNode::start(|dir| put(dir, "wat", "1", &wat(1.0, None)?), |_| {}).await?;
    let body = json!({
        "inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [0]}],
        "outputs": [{"name": "y"}, {"name": "y"}],
    });
    assert_eq!(
        t.post("/v2/models/wat/infer", serde_json::to_vec(&body)?)
            .await?,
        (
            400,
            json!({"error": "invalid inference request: output \"y\" is requested more than once"})
        )
    );
    Ok(())
}

/// The node answers a valid digits MLP request with 200 (it still serves after an attack).
async fn assert_serves_digits(t: &TestNode) -> Result<()> {
    let zeros = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![0.0; 64]}]});
    let (status, body) = t
        .post("/v2/models/digits_mlp/infer", serde_json::to_vec(&zeros)?)
        .await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

/// A node serving the digits MLP with 64 KiB bodies at most (a body budget of 256 KiB) and a
/// deadline long enough that stalled bodies still hold their bytes while the node, busy with
/// other tests on a 2-core machine, gets to read them.
async fn budget_node() -> Result<TestNode> {
    TestNode::start(
        |dir| put_fixture(dir, "digits_mlp"),
        |c| {
            c.max_body_bytes = 64 << 10;
            c.deadline_ms = 8_000;
        },
    )
    .await
}

/// Waits (6 s at most) until the node holds `bytes` of request bodies: it has read what the
/// stalled clients sent.
async fn wait_until_held(t: &TestNode, bytes: u64) {
    let polling = std::time::Instant::now();
    while t.node.request_body_bytes() < bytes {
        assert!(
            polling.elapsed() < Duration::from_secs(6),
            "the node holds {} bytes of the stalled bodies, not {bytes}",
            t.node.request_body_bytes()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Request bodies share one node-wide budget (four of the largest body), charged as their
/// bytes arrive: clients that stall mid-body hold only what they sent, a body that would
/// pass the budget is refused at once (429), and a body that stalls for the node's deadline
/// is answered 408 and gives its bytes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_share_one_budget() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let t = budget_node().await?;
    let infer = "/v2/models/digits_mlp/infer";
    // Four clients declare the largest body and stall after 60 KiB: 240 of the 256 KiB.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = tokio::net::TcpStream::connect(t.node.http_addr()).await?;
        let head = format!(
            "POST {infer} HTTP/1.1\r\nhost: node\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            64 << 10
        );
        s.write_all(head.as_bytes()).await?;
        s.write_all(&[b' '; 60 << 10]).await?;
        stalled.push(s);
    }
    // Once the node has read what they sent, they hold 240 KiB of the budget.
    wait_until_held(&t, 4 * (60 << 10)).await;
    // A 20 KiB body no longer fits: 429 at once.
    let (status, refused) = t.post(infer, vec![b' '; 20 << 10]).await?;
    assert_eq!(status, 429, "{refused}");
    assert_eq!(
        refused["error"],
        "the node holds 262144 bytes of request bodies at once, its limit; retry later"
    );
    // A small request still fits (and is refused as the bad JSON it is).
    let (status, _) = t.post(infer, vec![b' '; 1 << 10]).await?;
    assert_eq!(status, 400);
    // The stalled bodies are given up after the deadline without a byte.
    for mut s in stalled {
        let mut head = vec![0u8; 12];
        s.read_exact(&mut head).await?;
        assert_eq!(&head, b"HTTP/1.1 408");
    }
    assert_eq!(t.node.request_body_bytes(), 0, "every charge is given back");
    assert_serves_digits(&t).await?;
    t.node.shutdown().await;
    Ok(())
}

/// A gRPC `ModelInfer` whose message stalls mid-upload is cancelled after twice the node's
/// deadline (tonic sets no timer of its own), and the node keeps answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_grpc_request_is_cancelled() -> Result<()> {
    let t = TestNode::start(
        |dir| put_fixture(dir, "digits_mlp"),
        |c| c.deadline_ms = 500,
    )
    .await?;
    let addr = t.node.grpc_addr().context("gRPC is on")?;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (client, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(connection);
    let mut client = client.ready().await?;
    let request = grpc_request_head(&format!(
        "http://{addr}/inference.GRPCInferenceService/ModelInfer"
    ))?;
    let (response, mut body) = client.send_request(request, false)?;
    // gRPC framing of a 1 KiB message, and only 16 bytes of it.
    let mut frame = vec![0u8];
    frame.extend_from_slice(&1024u32.to_be_bytes());
    frame.extend_from_slice(&[0u8; 16]);
    body.send_data(bytes::Bytes::from(frame), false)?;
    let started = std::time::Instant::now();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .context("the stalled request was never answered")??;
    let elapsed = started.elapsed();
    let status = response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("none")
        .to_owned();
    assert_ne!(status, "0", "{response:?}");
    assert_ne!(status, "none", "{response:?}");
    assert!(
        elapsed >= Duration::from_millis(900),
        "answered after {elapsed:?}, before twice the deadline"
    );
    // The node still serves.
    assert_serves_digits(&t).await?;
    t.node.shutdown().await;
    Ok(())
}

/// gRPC messages are charged to the same budget as REST bodies, as their bytes arrive:
/// while stalled gRPC uploads hold most of it, a REST body that no longer fits is 429 and a
/// gRPC message that no longer fits is `RESOURCE_EXHAUSTED` at once; when the stalled calls
/// go, their bytes are given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_messages_share_the_body_budget() -> Result<()> {
    let t = budget_node().await?;
    let addr = t.node.grpc_addr().context("gRPC is on")?;
    let uri = format!("http://{addr}/inference.GRPCInferenceService/ModelInfer");
    // A gRPC frame header announcing `declared` bytes, then `sent` bytes of the message.
    let message = |declared: u32, sent: usize| {
        let mut frame = vec![0u8];
        frame.extend_from_slice(&declared.to_be_bytes());
        frame.extend(std::iter::repeat_n(0u8, sent));
        bytes::Bytes::from(frame)
    };
    let call = |end: bool, data: bytes::Bytes| {
        let uri = uri.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            let (client, connection) = h2::client::handshake(tcp).await?;
            tokio::spawn(connection);
            let mut client = client.ready().await?;
            let (response, mut body) = client.send_request(grpc_request_head(&uri)?, false)?;
            body.send_data(data, end)?;
            anyhow::Ok((response, body))
        }
    };
    // Four calls announce a 64 KiB message and stall after 60 KiB of it.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        stalled.push(call(false, message(64 << 10, 60 << 10)).await?);
    }
    wait_until_held(&t, 4 * (60 << 10)).await;
    // A REST body that no longer fits: 429.
    let (status, refused) = t
        .post("/v2/models/digits_mlp/infer", vec![b' '; 20 << 10])
        .await?;
    assert_eq!(status, 429, "{refused}");
    // A whole 20 KiB gRPC message that no longer fits: RESOURCE_EXHAUSTED (8), at once.
    let (response, _body) = call(true, message(20 << 10, 20 << 10)).await?;
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .context("the refused message was not answered at once")??;
    let mut status = response.headers().get("grpc-status").cloned();
    let mut message_text = response.headers().get("grpc-message").cloned();
    if status.is_none() {
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            chunk?;
        }
        let trailers = body.trailers().await?.unwrap_or_default();
        status = trailers.get("grpc-status").cloned();
        message_text = trailers.get("grpc-message").cloned();
    }
    assert_eq!(
        status.as_ref().and_then(|v| v.to_str().ok()),
        Some("8"),
        "{message_text:?}"
    );
    // The stalled calls go: every charge is given back, and requests fit again.
    drop(stalled);
    let polling = std::time::Instant::now();
    while t.node.request_body_bytes() > 0 {
        assert!(
            polling.elapsed() < Duration::from_secs(10),
            "the node still holds {} bytes",
            t.node.request_body_bytes()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_serves_digits(&t).await?;
    t.node.shutdown().await;
    Ok(())
}

/// The request head of a gRPC call.
fn grpc_request_head(uri: &str) -> Result<http::Request<()>> {
    Ok(http::Request::builder()
        .method("POST")
        .uri(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?)
}
