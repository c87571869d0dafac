//! Every `sh` block of the repository's Markdown runs as written: each as its own bash script
//! (`set -euo pipefail`), in order, in one fresh directory per document that holds the
//! repository's `tests/`, `deploy/`, `tools/` (linked) and `examples/` (small examples copied,
//! so a block that writes into one leaves the repository alone), with the `capsule` under
//! test first on `PATH` and as `target/release/capsule`. Background servers a block starts are
//! stopped when it ends. Three cargo commands are mapped: `cargo run -p capsule -- ARGS` runs
//! this `capsule ARGS`; `cargo build --release -p capsule` and `cargo test --workspace` (the
//! command running this test) are not run again, which the output says. A block that is a
//! synopsis or a template (placeholders, hosts, a long benchmark) is written as ```text.
//! `every_sh_block_is_run` fails when a Markdown file with `sh` blocks is not in [`DOCS`].

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::common;

/// Every Markdown file with `sh` blocks, run whole, in this order.
const DOCS: &[&str] = &[
    "README.md",
    "docs/hub.md",
    "deploy/README.md",
    "docs/model-card.md",
    "examples/mnist-png/README.md",
    "examples/wine-tabular/README.md",
    "examples/sentence-embedding/README.md",
    "examples/lifecycle/README.md",
];

/// Examples with a file this large are linked, not copied, into a document's directory.
const COPY_LIMIT: u64 = 4 << 20;

/// How long one block may run.
const BLOCK_LIMIT: Duration = Duration::from_secs(300);

/// Runs before each block.
const PRELUDE: &str = r#"set -euo pipefail
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true' EXIT
cargo() {
  case "$*" in
    "run -p capsule -- "*) shift 4; capsule "$@" ;;
    "test --workspace") echo "snippet test: not running 'cargo test --workspace' inside itself" >&2 ;;
    "build --release -p capsule") echo "snippet test: not building; target/release/capsule is the capsule under test" >&2 ;;
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

/// Runs the `sh` blocks of `doc` (a path in the repository).
fn run_blocks(doc: &str) -> Result<()> {
    for tool in ["bash", "curl", "kill", "python3", "promtool"] {
        let found = Command::new(tool).arg("--version").output().is_ok();
        if !found {
            bail!("the snippets of {doc} need {tool}, which is not installed");
        }
    }
    let repo = common::repo();
    let text = std::fs::read_to_string(repo.join(doc))?;
    let blocks = sh_blocks(&text);
    assert!(!blocks.is_empty(), "no sh blocks in {doc}");
    let dir = tempfile::tempdir()?;
    for linked in ["tests", "deploy", "tools"] {
        std::os::unix::fs::symlink(repo.join(linked), dir.path().join(linked))?;
    }
    let examples = dir.path().join("examples");
    std::fs::create_dir(&examples)?;
    for entry in std::fs::read_dir(repo.join("examples"))? {
        let path = entry?.path();
        let target = examples.join(path.file_name().context("an example's name")?);
        if largest_file(&path)? > COPY_LIMIT {
            std::os::unix::fs::symlink(&path, &target)?;
        } else {
            copy_tree(&path, &target)?;
        }
    }
    std::fs::create_dir_all(dir.path().join("target/release"))?;
    std::os::unix::fs::symlink(common::bin(), dir.path().join("target/release/capsule"))?;
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
        let mapped: Vec<&str> = stderr
            .lines()
            .filter_map(|l| l.strip_prefix("snippet test: "))
            .collect();
        eprintln!(
            "{doc} line {line}: ran in {:.1} s{}",
            started.elapsed().as_secs_f64(),
            if mapped.is_empty() {
                String::new()
            } else {
                format!(" ({})", mapped.join("; "))
            }
        );
    }
    Ok(())
}

/// The size of the largest file under `path`.
fn largest_file(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path)?;
    if !meta.is_dir() {
        return Ok(meta.len());
    }
    let mut largest = 0;
    for entry in std::fs::read_dir(path)? {
        largest = largest.max(largest_file(&entry?.path())?);
    }
    Ok(largest)
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    if !std::fs::metadata(from)?.is_dir() {
        std::fs::copy(from, to)?;
        return Ok(());
    }
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        copy_tree(&entry.path(), &to.join(entry.file_name()))?;
    }
    Ok(())
}

/// The Markdown files of the repository (not of dependencies or build output).
fn markdown_files(dir: &Path, found: &mut Vec<std::path::PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if path.is_dir() {
            if !name.starts_with('.') && !matches!(name.as_str(), "target" | "node_modules") {
                markdown_files(&path, found)?;
            }
        } else if name.ends_with(".md") {
            found.push(path);
        }
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

/// Every document of [`DOCS`], one after the other (one test, so that no two hold the same
/// ports at once).
#[test]
fn the_docs_shell_blocks_run_as_written() -> Result<()> {
    for doc in DOCS {
        run_blocks(doc)?;
    }
    Ok(())
}

#[test]
fn every_sh_block_is_run() -> Result<()> {
    let repo = common::repo();
    let mut files = Vec::new();
    markdown_files(&repo, &mut files)?;
    let mut with_blocks: Vec<String> = Vec::new();
    for file in files {
        if !sh_blocks(&std::fs::read_to_string(&file)?).is_empty() {
            let relative = file.strip_prefix(&repo).unwrap_or(&file);
            with_blocks.push(relative.to_string_lossy().into_owned());
        }
    }
    with_blocks.sort();
    let mut docs: Vec<String> = DOCS.iter().map(|d| d.to_string()).collect();
    docs.sort();
    assert_eq!(
        with_blocks, docs,
        "Markdown files with sh blocks must be run by this test (or their blocks be ```text)"
    );
    Ok(())
}

#[test]
fn sh_blocks_are_found_with_their_lines() {
    let md = "text\n```sh\na\nb\n```\n```text\nc\n```\n```sh\nd\n```\n";
    assert_eq!(
        sh_blocks(md),
        vec![(2, "a\nb\n".to_owned()), (9, "d\n".to_owned())]
    );
}
