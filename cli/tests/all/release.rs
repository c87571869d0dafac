//! Release artifacts: `deploy/release.sh --package` splits a binary into a stripped binary
//! that runs and a `.debug` file beside it that still maps its code to source lines (found
//! through the binary's `.gnu_debuglink`). The build half of the script (`--profile dist`,
//! the full and the node build) is measured in docs/benchmarks.md, not run here: it takes
//! about 25 minutes.

use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::common;

fn tool(name: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(name)
        .args(args)
        .output()
        .with_context(|| format!("running {name} (binutils)"))?;
    if !out.status.success() {
        bail!("{name} {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_release_binary_ships_stripped_with_its_debug_info_beside_it() -> Result<()> {
    for t in ["objcopy", "nm", "addr2line", "readelf"] {
        if Command::new(t).arg("--version").output().is_err() {
            if common::in_ci() {
                bail!("CI must provide {t} (binutils)");
            }
            eprintln!("skipped: {t} (binutils) is not installed");
            return Ok(());
        }
    }
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("dist");
    let status = Command::new("bash")
        .arg(common::repo().join("deploy/release.sh"))
        .args(["--package", common::bin(), "capsule"])
        .arg(&out)
        .status()?;
    assert!(status.success(), "deploy/release.sh --package: {status}");
    let binary = out.join("capsule");
    let debug = out.join("capsule.debug");
    let p = |p: &std::path::Path| p.to_string_lossy().into_owned();

    let sections = tool("readelf", &["-S", "-W", &p(&binary)])?;
    for gone in [".debug_info", ".debug_line", ".symtab"] {
        assert!(
            !sections.contains(gone),
            "{gone} left in the binary:\n{sections}"
        );
    }
    assert!(sections.contains(".gnu_debuglink"), "{sections}");
    let version = Command::new(&binary).arg("--version").output()?;
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("capsule "));
    let shipped = std::fs::metadata(&binary)?.len();
    let original = std::fs::metadata(common::bin())?.len();
    assert!(shipped < original, "{shipped} of {original} bytes");

    // The debug file maps the binary's code to our source lines.
    let symbols = tool("nm", &["-C", &p(&debug)])?;
    let address = symbols
        .lines()
        .find(|l| l.ends_with(" capsule::dispatch"))
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| "no capsule::dispatch in the debug file's symbols")?;
    let line = tool("addr2line", &["-e", &p(&debug), &format!("0x{address}")])?;
    assert!(line.contains("cli/src/main.rs:"), "{line}");
    Ok(())
}
