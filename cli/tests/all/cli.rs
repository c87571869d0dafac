//! The `capsule` binary end to end: build, inspect, run (V2 JSON and .npy), bench, demo.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models")
}

fn capsule(args: &[&str]) -> Output {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/capsule-test-cache");
    match Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(args)
        .env("CAPSULE_CACHE_DIR", cache)
        .output()
    {
        Ok(o) => o,
        Err(e) => panic!("cannot run capsule: {e}"),
    }
}

fn ok(args: &[&str]) -> String {
    let out = capsule(args);
    assert!(
        out.status.success(),
        "capsule {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn build_inspect_run_bench() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mlp = fixtures().join("digits_mlp");
    let out = dir.path().join("digits.capsule.wasm");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let printed = ok(&[
        "build",
        &s(&mlp.join("model.onnx")),
        "-o",
        &s(&out),
        "--name",
        "digits",
        "--version",
        "1.2.3",
        "--card",
        &s(&mlp.join("card.toml")),
        "--golden",
        &s(&mlp.join("golden")),
    ]);
    assert!(printed.contains("capsule   digits 1.2.3"), "{printed}");
    assert!(
        printed.contains("input     input: FP32[N, 64]"),
        "{printed}"
    );
    assert!(printed.contains("(4 golden samples passed)"), "{printed}");

    let inspect: serde_json::Value = serde_json::from_str(&ok(&["inspect", &s(&out), "--json"]))?;
    // The host kernels, and nothing else.
    let mut imports: Vec<String> = serde_json::from_value(inspect["imports"].clone())?;
    imports.sort();
    assert_eq!(
        imports,
        [
            "capsule_kernels::abi_version",
            "capsule_kernels::f32_mmm_8x8",
            "capsule_kernels::f32_mmm_block"
        ]
    );
    assert_eq!(inspect["host_kernels"], "V2");
    assert_eq!(inspect["name"], "digits");
    assert_eq!(inspect["version"], "1.2.3");
    assert_eq!(inspect["card"]["metrics"][0]["name"], "accuracy");
    let printed = ok(&["inspect", &s(&out)]);
    // The same three, in the code's order.
    let line = printed
        .lines()
        .find(|l| l.starts_with("  imports "))
        .unwrap_or_default();
    for import in &imports {
        assert!(line.contains(import.as_str()), "{printed}");
    }
    assert!(
        printed.contains("host kernels capsule_kernels v2"),
        "{printed}"
    );

    // V2 request in, V2 response out, equal to onnxruntime's golden output.
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mlp.join("golden/000.json"))?)?;
    let request = dir.path().join("req.json");
    std::fs::write(
        &request,
        serde_json::json!({"id": "r1", "inputs": golden["inputs"]}).to_string(),
    )?;
    let response: serde_json::Value =
        serde_json::from_str(&ok(&["run", &s(&out), "--request", &s(&request)]))?;
    assert_eq!(response["model_name"], "digits");
    assert_eq!(response["model_version"], "1.2.3");
    assert_eq!(response["id"], "r1");
    assert_eq!(response["outputs"][0]["name"], "label");
    assert_eq!(response["outputs"][0]["data"], golden["outputs"][0]["data"]);

    // The same input as a .npy file (version 1.0 header, little-endian float32).
    let values: Vec<f32> = golden["inputs"][0]["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_f64())
                .map(|v| v as f32)
                .collect()
        })
        .unwrap_or_default();
    let npy = dir.path().join("x.npy");
    std::fs::write(&npy, npy_f32(&[1, 64], &values))?;
    let response: serde_json::Value = serde_json::from_str(&ok(&[
        "run",
        &s(&out),
        "--input",
        &format!("input={}", s(&npy)),
    ]))?;
    assert_eq!(response["outputs"][0]["data"], golden["outputs"][0]["data"]);

    let bad = capsule(&["run", &s(&out), "--input", &format!("nope={}", s(&npy))]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown input \"nope\""));

    let bench: serde_json::Value = serde_json::from_str(&ok(&[
        "bench",
        &s(&out),
        "--model",
        &s(&mlp.join("model.onnx")),
        "--iterations",
        "20",
        "--warmup",
        "2",
        "--cold-starts",
        "3",
        "--json",
    ]))?;
    assert_eq!(bench["capsule_latency"]["samples"], 20);
    assert_eq!(bench["native_latency"]["samples"], 20);
    // The MLP's batch is symbolic: native tract, like the capsule, has a plan for one row.
    assert_eq!(bench["native_one_row_plan"], true);
    assert!(bench["ratio_p50"].as_f64().is_some_and(|r| r > 0.0));
    // Without cold starts the table says so rather than printing NaN.
    let table = ok(&[
        "bench",
        &s(&out),
        "--iterations",
        "2",
        "--warmup",
        "0",
        "--cold-starts",
        "0",
    ]);
    assert!(!table.contains("NaN"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains("cold start: first output")
                && l.ends_with("not measured (no samples)")),
        "{table}"
    );
    Ok(())
}

#[test]
fn version_names_the_guest_build() {
    let printed = ok(&["--version"]);
    assert_eq!(
        printed.trim(),
        format!(
            "capsule {} (guest {}{})",
            env!("CARGO_PKG_VERSION"),
            std::env::var("CAPSULE_GUEST_PROFILE").unwrap_or_else(|_| "guest-dev".into()),
            match std::env::var("CAPSULE_GUEST_SIMD").as_deref() {
                Ok("relaxed") => ", relaxed-simd",
                _ => "",
            }
        )
    );
}

#[test]
fn build_errors_are_clear() {
    let zipmap = fixtures().join("digits_rf_zipmap/model.onnx");
    let out = capsule(&["build", &zipmap.to_string_lossy(), "-o", "/dev/null"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: cannot build capsule: cannot load model: "),
        "{stderr}"
    );
    assert!(stderr.contains("ZipMap"), "{stderr}");
    let out = capsule(&["build", "/nonexistent.onnx"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).lines().next(),
        Some("error: reading model /nonexistent.onnx: No such file or directory (os error 2)")
    );
}

#[test]
fn demo_runs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let printed = ok(&["demo", "--dir", &dir.path().to_string_lossy()]);
    assert!(printed.contains("predicted digit: "), "{printed}");
    let line = printed
        .lines()
        .find(|l| l.contains("imports: "))
        .unwrap_or_default();
    assert!(
        line.ends_with("(the host's matrix kernel, on its own memory only; nothing else)"),
        "{printed}"
    );
    for import in capsule_format::HOST_KERNELS_IMPORTS {
        assert!(
            line.contains(&format!("capsule_kernels::{import}")),
            "{printed}"
        );
    }
    assert!(
        printed.contains("capsule / native tract (p50):"),
        "{printed}"
    );
    // The fleet part of the tour: a signed push served by the node, an update it picks up,
    // and the hub's telemetry totals of both versions.
    for line in [
        "$ capsule push digits.capsule.wasm --targets targets.json --alias production",
        "   answers now come from model_version 2.0.0",
        "   hub: digits 1.0.0: 20 requests",
        "   hub: digits 2.0.0: 10 requests",
    ] {
        assert!(printed.contains(line), "no {line:?} in:\n{printed}");
    }
    assert!(
        printed.contains("serves 1.0.0, ") && printed.contains("the node serves 2.0.0 "),
        "{printed}"
    );
    for file in [
        "digits.capsule.wasm",
        "digits-2.0.0.capsule.wasm",
        "root.json",
        "hub.db",
    ] {
        assert!(dir.path().join(file).exists(), "no {file}");
    }
    Ok(())
}

#[test]
fn demo_without_dir_removes_its_temporary_directory() -> anyhow::Result<()> {
    let printed = ok(&["demo"]);
    let dir = printed
        .lines()
        .find_map(|l| l.strip_prefix("== 5. publisher keys and the root metadata nodes pin (in "))
        .and_then(|rest| rest.strip_suffix(')'))
        .ok_or_else(|| anyhow::anyhow!("no demo directory in:\n{printed}"))?;
    assert!(Path::new(dir).starts_with(std::env::temp_dir()), "{dir}");
    assert!(!Path::new(dir).exists(), "{dir} is still there");
    Ok(())
}

/// `capsule demo` without `--dir` works in a temporary directory and removes it; `--keep`
/// leaves the hub (its dashboard) and the node serving until Ctrl-C.
#[test]
fn demo_keep_leaves_the_hub_and_the_node_running() -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader};
    let cwd = tempfile::tempdir()?;
    let mut child = Command::new(env!("CARGO_BIN_EXE_capsule"))
        .args(["demo", "--keep"])
        .current_dir(cwd.path())
        .env(
            "CAPSULE_CACHE_DIR",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/capsule-test-cache"),
        )
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = BufReader::new(stdout).lines();
    let (hub, node, files) = loop {
        let Some(line) = lines.next() else {
            let _ = child.kill();
            anyhow::bail!("the demo ended before --keep");
        };
        let line = line?;
        // "--keep: the hub (URL) and the node (URL) run until Ctrl-C; files in DIR"
        if let Some(rest) = line.strip_prefix("--keep: the hub (") {
            let (hub, rest) = rest.split_once(") and the node (").unwrap_or_default();
            let (node, rest) = rest
                .split_once(") run until Ctrl-C; files in ")
                .unwrap_or_default();
            break (hub.to_owned(), node.to_owned(), PathBuf::from(rest));
        }
    };
    let http = reqwest::blocking::Client::new();
    let login = http.get(format!("{hub}/dashboard/login")).send()?;
    assert_eq!(login.status().as_u16(), 200);
    assert!(login.text()?.contains("Sign in with an admin token"));
    let ready = http.get(format!("{node}/v2/models/digits/ready")).send()?;
    assert_eq!(ready.status().as_u16(), 200);
    assert!(files.join("hub-admin.token").exists());
    assert!(
        files.starts_with(std::env::temp_dir()),
        "{}",
        files.display()
    );
    let pid = child.id().to_string();
    Command::new("kill").args(["-INT", &pid]).status()?;
    let status = child.wait()?;
    assert!(status.success(), "{status}");
    assert!(
        http.get(format!("{node}/v2/health/live")).send().is_err(),
        "the node still runs"
    );
    // --keep keeps the files; a demo without it removes its temporary directory.
    assert!(files.exists());
    std::fs::remove_dir_all(&files)?;
    Ok(())
}

/// A NumPy `.npy` (format 1.0) of little-endian float32.
fn npy_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(ToString::to_string).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in values {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// `capsule build --pipeline` and `capsule run --input image=file.png`: PNG files in, labels
/// out; a spec error names the step and field.
#[test]
fn pipeline_build_and_raw_file_inputs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let example = root.join("examples/mnist-png");
    let out = dir.path().join("mnist.capsule.wasm");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let model = fixtures().join("mnist_cnn/model.onnx");
    let printed = ok(&[
        "build",
        &s(&model),
        "-o",
        &s(&out),
        "--name",
        "mnist",
        "--pipeline",
        &s(&example.join("pipeline.toml")),
        "--labels",
        &s(&example.join("labels.txt")),
    ]);
    assert!(printed.contains("input     image: BYTES[N]"), "{printed}");
    assert!(
        printed.contains("pipeline  top3 <- probabilities: top_k(3), labels"),
        "{printed}"
    );
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(example.join("expected.json"))?)?;
    let samples = expected["samples"].as_array().cloned().unwrap_or_default();
    let mut args = vec!["run".to_owned(), s(&out)];
    for sample in &samples[..2] {
        args.push("--input".into());
        args.push(format!(
            "image={}",
            s(&example.join(sample["image"].as_str().unwrap_or_default()))
        ));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let response: serde_json::Value = serde_json::from_str(&ok(&args))?;
    let top3 = response["outputs"]
        .as_array()
        .and_then(|o| o.iter().find(|o| o["name"] == "top3"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(top3["shape"], serde_json::json!([2, 3]));
    let want: Vec<serde_json::Value> = samples[..2]
        .iter()
        .flat_map(|s| s["top3"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(top3["data"], serde_json::Value::Array(want));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        std::fs::read_to_string(example.join("pipeline.toml"))?.replace("width = 28", "width = 0"),
    )?;
    let failed = capsule(&["build", &s(&model), "--pipeline", &s(&bad), "-o", &s(&out)]);
    assert!(!failed.status.success());
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        stderr.contains(
            "invalid pipeline: input \"image\": `resize.width` must be in 1..=16384, not 0"
        ),
        "{stderr}"
    );
    Ok(())
}

/// The split form from the command line: `build --split` writes a model image and the code
/// beside it; `split` of the single file writes the same two files (the code kept, not
/// rewritten); `join` makes the single file again byte for byte; `run` and `inspect` take the
/// image (code found beside it, or given with `--code`), and an image with code it does not
/// name is refused.
#[test]
fn split_join_and_run_the_image() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let mlp = fixtures().join("digits_mlp");
    let fat = dir.path().join("digits.capsule.wasm");
    ok(&[
        "build",
        &s(&mlp.join("model.onnx")),
        "-o",
        &s(&fat),
        "--name",
        "digits",
    ]);
    let split_dir = dir.path().join("split");
    let printed = ok(&["split", &s(&fat), "--out-dir", &s(&split_dir)]);
    let image = split_dir.join("digits.capsule.img");
    assert!(printed.contains(&s(&image)), "{printed}");
    let inspect: serde_json::Value = serde_json::from_str(&ok(&["inspect", &s(&fat), "--json"]))?;
    let code_sha = inspect["guest_code_sha256"].as_str().unwrap_or_default();
    let code = split_dir.join(format!("{code_sha}.wasm"));
    assert!(code.exists(), "{printed}");
    let image_len = std::fs::metadata(&image)?.len();
    assert!(image_len * 10 < std::fs::metadata(&fat)?.len());

    // Joined: the same bytes.
    let joined = dir.path().join("joined.capsule.wasm");
    ok(&["join", &s(&image), "-o", &s(&joined)]);
    assert_eq!(std::fs::read(&joined)?, std::fs::read(&fat)?);

    // The image runs and inspects like the single file.
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mlp.join("golden/000.json"))?)?;
    let request = dir.path().join("req.json");
    std::fs::write(
        &request,
        serde_json::json!({"inputs": golden["inputs"]}).to_string(),
    )?;
    let response: serde_json::Value =
        serde_json::from_str(&ok(&["run", &s(&image), "--request", &s(&request)]))?;
    assert_eq!(response["outputs"][0]["data"], golden["outputs"][0]["data"]);
    let inspect_image: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", &s(&image), "--json"]))?;
    assert_eq!(inspect_image["sha256"], inspect["sha256"]);
    assert_eq!(inspect_image["model_image_size"], image_len);
    let elsewhere = dir.path().join("elsewhere.capsule.img");
    std::fs::copy(&image, &elsewhere)?;
    let missing = capsule(&["run", &s(&elsewhere), "--request", &s(&request)]);
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains(&format!("needs guest code {code_sha}")),
        "{err}"
    );
    ok(&[
        "run",
        &s(&elsewhere),
        "--code",
        &s(&split_dir),
        "--request",
        &s(&request),
    ]);

    // `build --split` writes the same image (but for its build time) next to the code that
    // is already there.
    let printed = ok(&[
        "build",
        &s(&mlp.join("model.onnx")),
        "--split",
        "-o",
        &s(&split_dir.join("again.capsule.img")),
        "--name",
        "digits",
    ]);
    assert!(printed.contains("already there"), "{printed}");
    ok(&[
        "run",
        &s(&split_dir.join("again.capsule.img")),
        "--request",
        &s(&request),
    ]);

    // Code other than the one the image names: refused, naming both.
    let other = dir.path().join("other.wasm");
    let mut bytes = std::fs::read(&code)?;
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&other, bytes)?;
    let bad = capsule(&["inspect", &s(&image), "--code", &s(&other)]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains(&format!("needs guest code {code_sha}")),
        "{err}"
    );
    Ok(())
}

/// `--one-row-plan`: the MNIST CNN's weights are small, so `auto` gives it the plan for
/// batches of one; `never` leaves it out (a smaller image), `always` keeps it; every build
/// reproduces the golden samples.
#[test]
fn the_one_row_plan_is_the_builders_choice() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let cnn = fixtures().join("mnist_cnn");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let build = |when: &str| -> (String, u64) {
        let out = dir.path().join(format!("{when}.capsule.wasm"));
        let printed = ok(&[
            "build",
            &s(&cnn.join("model.onnx")),
            "--name",
            "cnn",
            "--golden",
            &s(&cnn.join("golden")),
            "--one-row-plan",
            when,
            "-o",
            &s(&out),
        ]);
        let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        (printed, size)
    };
    let one_row = "(and a one-row plan for batches of one, with ";
    let (auto, auto_size) = build("auto");
    let (never, never_size) = build("never");
    let (always, _) = build("always");
    assert!(auto.contains(one_row), "{auto}");
    assert!(always.contains(one_row), "{always}");
    assert!(!never.contains(one_row), "{never}");
    assert!(never_size < auto_size, "{never_size} >= {auto_size}");
    for printed in [&auto, &never, &always] {
        assert!(printed.contains("golden samples passed"), "{printed}");
    }
    let refused = capsule(&[
        "build",
        &s(&cnn.join("model.onnx")),
        "--one-row-plan",
        "sometimes",
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("auto, always or never"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    Ok(())
}

/// `--reference-privacy` bounds what the manifest (which browsers download) reveals of the
/// training data: fewer bins, edges and extremes that are not training values.
#[test]
fn reference_privacy_coarsens_what_the_manifest_reveals() -> anyhow::Result<()> {
    use capsule_format::telemetry::Binning;
    let dir = tempfile::tempdir()?;
    let wine = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/wine-tabular");
    let w = |f: &str| wine.join(f).to_string_lossy().into_owned();
    let build = |name: &str,
                 privacy: Option<&str>|
     -> anyhow::Result<(String, capsule_format::telemetry::ReferenceStats)> {
        let out = dir.path().join(format!("{name}.capsule.wasm"));
        let mut args = vec![
            "build".to_owned(),
            w("model.onnx"),
            "--name".into(),
            "wine".into(),
            "--pipeline".into(),
            w("pipeline.json"),
            "--labels".into(),
            w("labels.txt"),
            "--reference".into(),
            w("train.csv"),
            "-o".into(),
            out.to_string_lossy().into_owned(),
        ];
        if let Some(p) = privacy {
            args.extend(["--reference-privacy".into(), p.to_owned()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let printed = ok(&args);
        let image = capsule_runtime::CapsuleImage::parse(std::fs::read(&out)?)?;
        let reference = image
            .manifest
            .reference
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no reference"))?;
        Ok((printed, reference))
    };
    let (_, exact) = build("exact", None)?;
    let (printed, private) = build("private", Some("bins=4,round=2"))?;
    assert!(
        printed.contains("privacy   reference statistics: 4 bins, edges and extremes rounded to 2 significant digits"),
        "{printed}"
    );
    let training: Vec<f64> = std::fs::read_to_string(wine.join("train.csv"))?
        .lines()
        .skip(1)
        .map(|l| {
            l.split(',')
                .next()
                .unwrap_or_default()
                .parse::<f64>()
                .unwrap_or(f64::NAN)
        })
        .collect();
    let alcohol = |r: &capsule_format::telemetry::ReferenceStats| {
        let f = &r.features[0];
        assert_eq!(f.name, "alcohol");
        match &f.binning {
            Binning::Numeric { edges } => (edges.clone(), f.moments.min, f.moments.max),
            other => panic!("{other:?}"),
        }
    };
    let (edges, min, max) = alcohol(&exact);
    assert_eq!(edges.len(), 9);
    assert!(
        edges
            .iter()
            .chain([&min, &max])
            .all(|e| training.contains(e))
    );
    let (edges, min, max) = alcohol(&private);
    assert!(edges.len() <= 3, "{edges:?}");
    for v in edges.iter().chain([&min, &max]) {
        assert_eq!(
            *v,
            format!("{v:.1e}").parse::<f64>()?,
            "{v} has more than 2 digits"
        );
    }
    let out = capsule(&[
        "build",
        "m.onnx",
        "--reference",
        "r.csv",
        "--reference-privacy",
        "coarse",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(
            "unknown option \"coarse\" (bins=N, round=DIGITS, min-count=K, no-categories)"
        ),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}
