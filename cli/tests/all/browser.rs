//! The browser SDK (`sdk-js`) in real headless Chromium, against the edge runtime:
//! every fixture model (and the image and tabular examples, from raw inputs) runs in the
//! browser, in the SDK's worker and on the page's thread (`worker: false`), from a signed
//! static repository served by `capsule serve --static`, and its
//! outputs are compared with wasmtime's for the same capsule and inputs; a tampered capsule
//! and a repository signed by another key are refused; a reload takes the capsule from Cache
//! Storage (no download in the network log); a browser connected to a hub follows a new
//! version published there, and its telemetry reaches the hub.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use base64::Engine as _;
use capsule_format::{DType, NamedTensor};
use capsule_tests::{WatCapsule, wat_capsule};
use serde_json::{Value, json};

use crate::common::*;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}

/// A plan input: raw little-endian bytes, or BYTES elements.
fn plan_input(t: &NamedTensor) -> Result<Value> {
    Ok(if t.tensor.dtype == DType::Bytes {
        let items: Vec<String> = capsule_format::byte_elements(&t.tensor.data)?
            .into_iter()
            .map(b64)
            .collect();
        json!({"name": t.name, "datatype": "BYTES", "shape": t.tensor.shape, "items": items})
    } else {
        json!({"name": t.name, "datatype": t.tensor.dtype.v2_name(), "shape": t.tensor.shape, "data": b64(&t.tensor.data)})
    })
}

/// What the browser must answer: wasmtime's outputs of the same capsule.
fn expected_output(t: &NamedTensor) -> Result<Value> {
    Ok(if t.tensor.dtype == DType::Bytes {
        let items: Vec<String> = capsule_format::byte_elements(&t.tensor.data)?
            .into_iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect();
        json!({"datatype": "BYTES", "shape": t.tensor.shape, "items": items})
    } else {
        json!({"datatype": t.tensor.dtype.v2_name(), "shape": t.tensor.shape, "data": b64(&t.tensor.data)})
    })
}

struct Case {
    model: String,
    capsule: std::sync::Arc<capsule_runtime::BuiltCapsule>,
    inputs: Vec<NamedTensor>,
}

fn cases() -> Result<Vec<Case>> {
    let mut out = Vec::new();
    for name in [
        "digits_logreg",
        "digits_mlp",
        "digits_rf",
        "mnist_cnn",
        "silero_vad",
    ] {
        let capsule = capsule_tests::fixture_capsule(name)?;
        let inputs = capsule
            .manifest
            .golden
            .first()
            .with_context(|| format!("{name} has no golden sample"))?
            .inputs
            .clone();
        out.push(Case {
            model: capsule.manifest.name.clone(),
            capsule,
            inputs,
        });
    }
    // Raw inputs through the pipelines: a PNG, and JSON records.
    let png = std::fs::read(repo().join("examples/mnist-png/samples/digit1_0.png"))?;
    let records: Vec<Value> = serde_json::from_slice(&std::fs::read(
        repo().join("examples/wine-tabular/records.json"),
    )?)?;
    let records: Vec<Vec<u8>> = records
        .iter()
        .take(5)
        .map(serde_json::to_vec)
        .collect::<std::result::Result<_, _>>()?;
    for (example, input, items) in [
        ("mnist-png", "image", vec![png]),
        ("wine-tabular", "record", records),
    ] {
        let capsule = std::sync::Arc::new(capsule_tests::example_capsule(example)?);
        let tensor = capsule_format::Tensor::from_byte_strings(vec![items.len() as u64], &items)?;
        out.push(Case {
            model: capsule.manifest.name.clone(),
            capsule,
            inputs: vec![NamedTensor {
                name: input.into(),
                tensor,
            }],
        });
    }
    Ok(out)
}

#[test]
fn the_sdk_runs_signed_capsules_in_chromium_like_the_edge() -> Result<()> {
    if !browser_available()? {
        return Ok(());
    }
    let dist = sdk_dist()?;
    let dir = tempfile::tempdir()?;
    let d = dir.path();
    let site = d.join("site");
    copy_dir(&dist, &site.join("sdk"))?;
    std::fs::write(
        site.join("test.html"),
        "<!doctype html><meta charset=\"utf-8\"><title>capsule sdk test</title>\
         <script type=\"module\">import Capsule from \"/sdk/capsule.js\"; window.Capsule = Capsule;</script>",
    )?;
    publisher_keys(d, &["other"])?;
    let p = |n: &str| d.join(n).to_string_lossy().into_owned();

    // The signed static repository (and a copy with one capsule tampered with).
    let cases = cases()?;
    let targets = site.join("repo/targets.json");
    std::fs::create_dir_all(site.join("repo"))?;
    let mut plan_cases = Vec::new();
    for c in &cases {
        let version = c.capsule.manifest.version.to_string();
        let file = site
            .join("repo")
            .join(&c.model)
            .join(format!("{version}.capsule.wasm"));
        std::fs::create_dir_all(file.parent().context("parent")?)?;
        std::fs::write(&file, &c.capsule.bytes)?;
        // The split form beside it (`capsule sign` signs both): the SDK loads the image and
        // the guest code, which every case shares.
        let parts = capsule_format::split::split(&c.capsule.bytes)?;
        std::fs::write(file.with_extension("img"), &parts.image)?;
        std::fs::create_dir_all(site.join("repo/code"))?;
        std::fs::write(
            site.join("repo/code")
                .join(format!("{}.wasm", parts.code_sha256)),
            &parts.code,
        )?;
        run(&[
            "sign",
            "--targets",
            &targets.to_string_lossy(),
            "--add",
            &file.to_string_lossy(),
            "--key",
            &p("pub1.key"),
            "--key",
            &p("pub2.key"),
        ])?;
        plan_cases.push(json!({
            "model": c.model,
            "inputs": c.inputs.iter().map(plan_input).collect::<Result<Vec<_>>>()?,
        }));
    }
    let tampered_model = cases[0].model.clone();
    let mut bad = cases[0].capsule.bytes.clone();
    let at = bad.len() / 2;
    bad[at] ^= 0x5a;
    let bad_file = site
        .join("tampered")
        .join(&tampered_model)
        .join("1.0.0.capsule.wasm");
    std::fs::create_dir_all(bad_file.parent().context("parent")?)?;
    std::fs::write(&bad_file, bad)?;
    std::fs::copy(&targets, site.join("tampered/targets.json"))?;
    // Its split form tampered with too: the image, beside intact code.
    let parts = capsule_format::split::split(&cases[0].capsule.bytes)?;
    let mut bad_image = parts.image.clone();
    let at = bad_image.len() / 2;
    bad_image[at] ^= 0x5a;
    std::fs::write(bad_file.with_extension("img"), bad_image)?;
    copy_dir(&site.join("repo/code"), &site.join("tampered/code"))?;

    // The hub, with a wat capsule for the browser to follow.
    let hub_port = free_port()?;
    let hub_proc = start_hub(
        d,
        &format!("sqlite://{}", d.join("hub.db").display()),
        hub_port,
        &[],
    )?;
    let hub = format!("http://127.0.0.1:{hub_port}");
    for (v, y) in [("1.0.0", 1.0), ("2.0.0", 2.0)] {
        std::fs::write(
            d.join(format!("wat-{v}.capsule.wasm")),
            wat_capsule(&WatCapsule {
                name: "wat".into(),
                version: semver::Version::parse(v)?,
                y,
                golden_y: None,
            })?,
        )?;
    }
    let publish = |v: &str| -> Result<()> {
        sign_and_push(
            d,
            &hub,
            &d.join(format!("wat-{v}.capsule.wasm")),
            &d.join("hub-targets.json"),
            &["--alias", "production"],
        )
    };
    publish("1.0.0")?;
    let (status, token) = api(
        &hub,
        "POST",
        "/api/v1/nodes/browser-test/token",
        ADMIN,
        None,
    )?;
    assert_eq!(status, 200, "{token}");

    // The node serves the site (SDK, page, repositories) with COOP/COEP.
    let models = d.join("models");
    std::fs::create_dir_all(&models)?;
    let node = Proc::spawn(&[
        "serve",
        "--models",
        &models.to_string_lossy(),
        "--http",
        "127.0.0.1:0",
        "--no-grpc",
        "--static",
        &site.to_string_lossy(),
    ])?;
    let node_url = node.address("REST on")?;
    let head = http()
        .get(format!("{node_url}/sdk/core/capsule_sdk_core_bg.wasm"))
        .send()?;
    assert_eq!(head.headers()["content-type"], "application/wasm");
    assert_eq!(
        head.headers()["cross-origin-embedder-policy"],
        "require-corp"
    );
    assert_eq!(head.headers()["cross-origin-opener-policy"], "same-origin");
    let js = http().get(format!("{node_url}/sdk/capsule.js")).send()?;
    assert!(
        js.headers()["content-type"]
            .to_str()?
            .contains("javascript"),
        "{:?}",
        js.headers()
    );

    let plan = json!({
        "page": format!("{node_url}/test.html"),
        "repo": format!("{node_url}/repo/"),
        "tamperedRepo": format!("{node_url}/tampered/"),
        "tamperedModel": tampered_model,
        "publicKeys": [public_hex(&d.join("pub1.pub"))?, public_hex(&d.join("pub2.pub"))?],
        "otherKey": public_hex(&d.join("other.pub"))?,
        "cases": plan_cases,
        "hub": {
            "url": hub,
            "token": token["token"],
            "root": std::fs::read_to_string(d.join("root.json"))?,
            "nodeId": "browser-test",
            "model": "wat",
            "ready": p("ready"),
            "published": p("published"),
        },
    });
    let plan_path = d.join("plan.json");
    std::fs::write(&plan_path, serde_json::to_vec(&plan)?)?;
    let script = repo().join("tests/browser/sdk.mjs");
    let child = Command::new("node")
        .arg(&script)
        .arg(&plan_path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    // When the browser has loaded version 1, publish version 2.
    let ready = d.join("ready");
    let started = std::time::Instant::now();
    while !ready.exists() && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(100));
    }
    if ready.exists() {
        publish("2.0.0")?;
        std::fs::write(d.join("published"), "yes")?;
    }
    let out = child.wait_with_output()?;
    let result = script_result("sdk.mjs", &out)?;
    assert_eq!(
        result["ok"],
        json!(true),
        "{result}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // 1. Every case, in the SDK's worker and on the page's thread: the browser's outputs
    // are wasmtime's, bit for bit. The second runtime found every capsule in the cache.
    let mut in_worker = result["cases"].as_array().context("cases")?.clone();
    let mut on_page = result["casesOnPage"]
        .as_array()
        .context("casesOnPage")?
        .clone();
    // Last: what a second runtime, alive meanwhile and trusting another key, got.
    for runs in [&mut in_worker, &mut on_page] {
        assert_eq!(
            runs.pop(),
            Some(json!({"rogue": "VerificationError"})),
            "{result}"
        );
    }
    assert_eq!(in_worker.len(), cases.len());
    assert_eq!(on_page.len(), cases.len());
    for got in &on_page {
        assert_eq!(got["fromCache"], json!(true), "{got}");
    }
    for (c, got) in cases
        .iter()
        .zip(&in_worker)
        .chain(cases.iter().zip(&on_page))
    {
        let native = c.capsule.capsule.infer(&c.inputs)?;
        assert_eq!(got["model"], json!(c.model));
        assert_eq!(got["sha256"], json!(c.capsule.sha256));
        for t in &native {
            assert_eq!(
                got["outputs"][&t.name],
                expected_output(t)?,
                "{} output {}",
                c.model,
                t.name
            );
        }
        eprintln!(
            "{}: identical outputs in Chromium ({:.2} ms)",
            c.model,
            got["ms"].as_f64().unwrap_or(0.0)
        );
    }

    // 1b. Raw inputs as pages have them give the same answers as their bytes.
    let raw = &result["raw"];
    let png_case = &result["cases"][5]["outputs"]["top3"]["items"];
    let wine_case = &result["cases"][6]["outputs"]["label"]["items"];
    assert_eq!(&raw["blob"], png_case, "{raw}");
    assert_eq!(raw["imageData"][0], png_case[0], "{raw}");
    assert_eq!(raw["list"].as_array().map(Vec::len), Some(6), "{raw}");
    assert_eq!(&raw["records"], wine_case, "{raw}");
    assert_eq!(raw["record"][0], wine_case[0], "{raw}");

    // 2. Refusals, by name and cause.
    let r = &result["refusals"];
    assert_eq!(r["tampered"]["name"], "VerificationError", "{r}");
    assert!(
        r["tampered"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("5.7.3"),
        "{r}"
    );
    assert_eq!(r["wrongKey"]["name"], "VerificationError", "{r}");
    assert!(
        r["wrongKey"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("5.6.3"),
        "{r}"
    );
    assert_eq!(r["missing"]["name"], "ModelNotFoundError", "{r}");
    assert_eq!(
        r["missing"]["message"],
        "model \"no-such-model\" is not in the signed targets"
    );
    assert_eq!(r["badInput"]["name"], "RequestError", "{r}");
    assert_eq!(r["unsupported"]["name"], "UnsupportedBrowserError", "{r}");
    assert_eq!(
        r["unsupported"]["message"],
        "Cache Storage is unavailable (it needs a secure context: https or localhost)"
    );

    // 3. The reload took the capsule from Cache Storage: no download.
    let reload = &result["reload"];
    assert_eq!(reload["fromCache"], json!(true), "{reload}");
    assert_eq!(reload["downloads"], json!([]), "{reload}");
    assert_eq!(reload["targetsFetched"], json!(true), "{reload}");

    // 4. The hub: version 1, then the newly published version 2 (whose image replaced 1's in
    // the cache, beside the guest code both share); the browser's telemetry reached the hub.
    let h = &result["hub"];
    assert_eq!(h["first"]["version"], "1.0.0", "{h}");
    assert_eq!(h["first"]["y"].as_f64(), Some(1.0), "{h}");
    assert_eq!(h["second"]["version"], "2.0.0", "{h}");
    assert_eq!(h["second"]["y"].as_f64(), Some(2.0), "{h}");
    let cached: Vec<&str> = h["cached"]
        .as_array()
        .context("cached")?
        .iter()
        .filter_map(Value::as_str)
        .collect();
    // The cache keys hold the artifacts' hashes.
    let v2 = capsule_format::split::split(&std::fs::read(d.join("wat-2.0.0.capsule.wasm"))?)?;
    let image_sha = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&v2.image))
    };
    assert_eq!(cached.len(), 2, "{h}");
    assert!(
        cached
            .iter()
            .any(|k| k.contains("/code/") && k.ends_with(&v2.code_sha256)),
        "{h}"
    );
    assert!(
        cached
            .iter()
            .any(|k| k.contains("/wat/2.0.0.capsule.img/") && k.ends_with(&image_sha)),
        "{h}"
    );
    assert!(h["beacons"].as_u64().unwrap_or(0) >= 1, "{h}");
    wait_until("the browser's telemetry at the hub", || {
        api(&hub, "GET", "/api/v1/telemetry/summary", ADMIN, None)
            .ok()
            .and_then(|(_, s)| s["nodes"]["browser-test"]["requests"].as_u64())
            .is_some_and(|n| n >= 2)
    })?;
    assert_eq!(result["console_errors"], json!([]), "{result}");
    // Every case is a model image of one guest build: the code came over the network once
    // (the page-thread runtime found it in Cache Storage), and every answer above matched
    // wasmtime's bit for bit.
    assert_eq!(result["code_downloads"], json!(1), "{result}");
    drop(hub_proc);
    Ok(())
}
