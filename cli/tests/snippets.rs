//! Every `sh` block of README.md and of the hub guide's quickstart (docs/hub.md) runs as
//! written: each as its own bash script (`set -euo pipefail`), in order, in one fresh
//! directory per document that links the repository's `tests/` and `examples/`, with the
//! `capsule` under test first on `PATH`. Background servers a block
//! starts are stopped when it ends. Two commands of "The two commands" block are mapped:
//! `cargo run -p capsule -- ARGS` runs this `capsule ARGS`, and `cargo test --workspace` (the
//! command running this test) is not run again, which the output says.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// How long one block may run.
const BLOCK_LIMIT: Duration = Duration::from_secs(300);

/// Runs before each block.
const PRELUDE: &str = r#"set -euo pipefail
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT
cargo() {
  case "$*" in
    "run -p capsule -- "*) shift 4; capsule "$@" ;;
    "test --workspace") echo "snippet test: not running 'cargo test --workspace' inside itself" >&2 ;;
    *) echo "snippet test: no rule for 'cargo $*'" >&2; return 1 ;;
  esac
}
"#;

/// The `sh` blocks of a Markdown text, each with the line its fence opens on.
fn sh_blocks(markdown: &str) -> Vec<(usize, String)> {
    let mut blocks = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, line) in markdown.lines().enumerate() {
        match current.take() {
            None if line.trim_end() == "```sh" => current = Some((i + 1, String::new())),
            None => {}
            Some(block) if line.trim_end() == "```" => blocks.push(block),
            Some((at, mut text)) => {
                text.push_str(line);
                text.push('\n');
                current = Some((at, text));
            }
        }
    }
    blocks
}

/// Runs the `sh` blocks of `doc` (a path in the repository), at most `only` of them when
/// given (a guide's first blocks can be its runnable quickstart).
fn run_blocks(doc: &str, only: Option<usize>) -> Result<()> {
    for tool in ["bash", "curl", "kill", "python3"] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        if !found {
            bail!("the snippets of {doc} need {tool}, which is not installed");
        }
    }
    let repo = common::repo();
    let text = std::fs::read_to_string(repo.join(doc))?;
    let mut blocks = sh_blocks(&text);
    blocks.truncate(only.unwrap_or(blocks.len()));
    assert!(!blocks.is_empty(), "no sh blocks in {doc}");
    let dir = tempfile::tempdir()?;
    for linked in ["tests", "examples"] {
        std::os::unix::fs::symlink(repo.join(linked), dir.path().join(linked))?;
    }
    let bin_dir = Path::new(common::bin())
        .parent()
        .context("the capsule binary's directory")?;
    let path = std::env::join_paths(std::iter::once(bin_dir.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    for (line, block) in &blocks {
        let started = Instant::now();
        let (status, stdout, stderr) = run_block(dir.path(), &path, block)?;
        assert!(
            status.success(),
            "{doc} line {line}: the block failed ({status}):\n{block}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        );
        eprintln!(
            "{doc} line {line}: ran in {:.1} s{}",
            started.elapsed().as_secs_f64(),
            if stderr.contains("snippet test: not running") {
                " (cargo test --workspace not run inside itself)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

/// Runs one block in its own process group with its output in files (a server the block
/// leaves behind cannot hold a pipe open), stops after [`BLOCK_LIMIT`], and then stops every
/// process of the group, including servers started as part of a list (`mkdir x && serve &`
/// forks a subshell whose child the prelude's `kill $(jobs -p)` does not reach).
fn run_block(
    dir: &Path,
    path: &std::ffi::OsStr,
    block: &str,
) -> Result<(ExitStatus, String, String)> {
    let logs = tempfile::tempdir()?;
    let (out_path, err_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = Command::new("bash")
        .args(["-c", &format!("{PRELUDE}\n{block}")])
        .current_dir(dir)
        .env("PATH", path)
        .env("CAPSULE_CACHE_DIR", common::cache())
        .env_remove("CAPSULE_HUB_TOKEN")
        .env_remove("CAPSULE_HUB")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .process_group(0)
        .spawn()?;
    let group = format!("-{}", child.id());
    let deadline = Instant::now() + BLOCK_LIMIT;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if Instant::now() >= deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Whatever is left of the group: TERM, a moment to shut down, then KILL.
    let signal = |name: &str| {
        Command::new("kill")
            .args([name, "--", &group])
            .stderr(Stdio::null())
            .status()
    };
    if signal("-TERM")?.success() {
        std::thread::sleep(Duration::from_secs(2));
        signal("-KILL")?;
    }
    let status = match status {
        Some(status) => status,
        None => child.wait()?,
    };
    let read = |p: &Path| std::fs::read(p).map(|b| String::from_utf8_lossy(&b).into_owned());
    let (stdout, mut stderr) = (read(&out_path)?, read(&err_path)?);
    if Instant::now() >= deadline {
        stderr.push_str(&format!("\nsnippet test: stopped after {BLOCK_LIMIT:?}"));
    }
    Ok((status, stdout, stderr))
}

/// README.md whole, then the hub guide's quickstart (keys, a hub, a node token, a synced node,
/// a capsule published to it and served; the guide's later blocks are command references
/// with placeholders). One test, so that the two never hold the same ports at once.
#[test]
fn readme_and_hub_quickstart_run_as_written() -> Result<()> {
    run_blocks("README.md", None)?;
    run_blocks("docs/hub.md", Some(1))
}

#[test]
fn sh_blocks_are_found_with_their_lines() {
    let md = "text\n```sh\na\nb\n```\n```text\nc\n```\n```sh\nd\n```\n";
    assert_eq!(
        sh_blocks(md),
        vec![(2, "a\nb\n".to_owned()), (9, "d\n".to_owned())]
    );
}
