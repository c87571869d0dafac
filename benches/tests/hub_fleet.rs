//! The fleet benchmark's short variant: 30 nodes, 3 batches each, against the workspace's
//! debug `capsule` (the full run, 1,000 nodes and 60 batches, is docs/benchmarks.md's "Hub
//! fleet"). It keeps the benchmark from rotting and checks that every node picks up every
//! update.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

#[test]
fn a_small_fleet_run_completes_and_every_node_follows_every_update() -> Result<()> {
    let capsule = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/capsule");
    if !capsule.exists() {
        bail!(
            "{} is missing: build it first (cargo build -p capsule; cargo test --workspace does)",
            capsule.display()
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_hub_fleet"))
        .args(["--nodes", "30", "--batches", "3", "--flip-every-s", "2"])
        .env("CAPSULE", &capsule)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("hub_fleet failed: {stdout}\n{stderr}");
    }
    for row in [
        "| telemetry: 90 batches in |",
        "| hub CPU per batch |",
        "| database growth |",
        "| `/metrics` |",
    ] {
        assert!(stdout.contains(row), "no {row:?} in:\n{stdout}");
    }
    let updates: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("every node downloaded and reported serving"))
        .collect();
    assert_eq!(updates.len(), 2, "{stdout}");
    assert!(
        updates
            .iter()
            .all(|l| l.contains("(0 node-flips missed)") && !l.contains("NaN")),
        "{stdout}"
    );
    Ok(())
}
