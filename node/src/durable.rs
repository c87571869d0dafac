//! The node's small files on disk: written durably, read bounded, and moved aside when they
//! no longer parse (the agent's state, the telemetry buffer's state, installed capsules).

use std::path::{Path, PathBuf};

/// Milliseconds since the Unix epoch (0 before it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Writes `bytes` to `path` durably: into `tmp` (beside it, under a name the readers of the
/// directory skip), fsync, rename over `path`, fsync of the directory.
pub(crate) fn write_durably(tmp: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(tmp, path)?;
    std::fs::File::open(path.parent().unwrap_or_else(|| Path::new(".")))?.sync_all()
}

/// Reads a JSON file of at most `limit` bytes: `None` when it does not exist, an error (what
/// is wrong, one line) when it cannot be read, is larger, or does not parse.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
    limit: u64,
) -> Result<Option<T>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    match std::fs::File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
        Ok(f) => f
            .take(limit.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| e.to_string())?,
    };
    if bytes.len() as u64 > limit {
        return Err(format!("larger than {limit} bytes"));
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| e.to_string())
}

/// Renames `path` to `<path>.corrupt-<ms>` (kept for an operator to read); returns the new
/// name and whether the rename worked.
pub(crate) fn move_aside(path: &Path, now_ms: u64) -> (PathBuf, bool) {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".corrupt-{now_ms}"));
    let aside = PathBuf::from(name);
    let moved = std::fs::rename(path, &aside).is_ok();
    (aside, moved)
}
