//! Runs the ONNX backend node tests through capsules and native tract in one run and writes
//! `docs/conformance.md`.
//!
//! `cargo run --release -p capsule-tests --bin conformance -- [--filter SUBSTRING] [--out docs/conformance.md]`

use std::io::Write;
use std::time::Instant;

use anyhow::{Context, Result};
use capsule_tests::conformance::{load_case, node_tests_dir, run_capsule, run_native};

fn main() -> Result<()> {
    let mut filter = String::new();
    let mut out = std::path::PathBuf::from("docs/conformance.md");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--filter" => filter = args.next().context("--filter needs a value")?,
            "--out" => out = args.next().context("--out needs a value")?.into(),
            other => anyhow::bail!("unknown argument {other:?} (expected --filter S, --out FILE)"),
        }
    }
    let dir = node_tests_dir()?;
    let mut dirs: Vec<_> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir() && p.to_string_lossy().contains(&filter))
        .collect();
    dirs.sort();
    let builder = capsule_tests::builder();
    let started = Instant::now();
    let (mut native_pass, mut capsule_pass, mut unreadable) = (0, 0, Vec::new());
    let mut differences = Vec::new();
    let total = dirs.len();
    for (i, d) in dirs.iter().enumerate() {
        let case = match load_case(d) {
            Ok(c) => c,
            Err(e) => {
                unreadable.push((
                    d.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    format!("{e:#}"),
                ));
                continue;
            }
        };
        let native = run_native(&case);
        let capsule = run_capsule(builder, &case);
        native_pass += usize::from(native.is_ok());
        capsule_pass += usize::from(capsule.is_ok());
        if native.is_ok() != capsule.is_ok() {
            differences.push((case.name.clone(), native.clone(), capsule.clone()));
        }
        if (i + 1) % 100 == 0 {
            eprintln!(
                "{}/{total} tests, {:.0} s",
                i + 1,
                started.elapsed().as_secs_f64()
            );
        }
    }
    let runnable = total - unreadable.len();
    let mut md = String::new();
    md.push_str("# ONNX conformance: capsule vs native tract\n\n");
    md.push_str("The ONNX backend node tests shipped by the `onnx==1.22.0` wheel, each run through a capsule\n");
    md.push_str("(built, snapshotted and run under wasmtime) and through native tract (the same `capsule-model`\n");
    md.push_str("code on the host) in the same run. Comparison: numpy `allclose(rtol=1e-3, atol=1e-7)` on\n");
    md.push_str("floats, exact on everything else, on `test_data_set_0`.\n\n");
    md.push_str(&format!(
        "Reproduce: `cargo run --release -p capsule-tests --bin conformance` ({:.0} s here).\n\n",
        started.elapsed().as_secs_f64()
    ));
    md.push_str("| | count |\n|---|---|\n");
    md.push_str(&format!(
        "| node tests | {total} |\n| with tensor inputs and outputs (runnable) | {runnable} |\n"
    ));
    md.push_str(&format!(
        "| pass on native tract | {native_pass} |\n| pass as a capsule | {capsule_pass} |\n"
    ));
    md.push_str(&format!("| differences | {} |\n\n", differences.len()));
    md.push_str("## Differences\n\n");
    if differences.is_empty() {
        md.push_str("None: the capsule passes exactly the tests native tract passes.\n");
    } else {
        md.push_str("| test | native tract | capsule |\n|---|---|---|\n");
        for (name, n, c) in &differences {
            let show = |r: &Result<(), String>| match r {
                Ok(()) => "pass".to_owned(),
                Err(e) => e.replace('|', "\\|"),
            };
            md.push_str(&format!("| {name} | {} | {} |\n", show(n), show(c)));
        }
    }
    md.push_str(&format!("\n## Not runnable ({})\n\nTests whose data are not plain tensors (sequences, optionals, maps):\n\n", unreadable.len()));
    for (name, _) in &unreadable {
        md.push_str(&format!("- {name}\n"));
    }
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::File::create(&out)?.write_all(md.as_bytes())?;
    println!(
        "{total} tests, {runnable} runnable: native tract {native_pass} pass, capsule {capsule_pass} pass, {} differences; wrote {}",
        differences.len(),
        out.display()
    );
    Ok(())
}
