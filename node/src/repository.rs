//! The model repository on disk: what files are there, and how to order versions.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use capsule_format::split::IMAGE_SUFFIX;

use crate::{Error, Result};

/// File name suffix of a capsule.
pub const CAPSULE_SUFFIX: &str = ".capsule.wasm";

/// The repository's store of guest code modules, for the model images in it (split form,
/// `capsule_format::split`): `DIR/.capsule-code/<sha256>.wasm`. Hidden, so never scanned as a
/// model.
pub const CODE_DIR: &str = ".capsule-code";

/// Where a code module lives in the repository `dir`; `None` for a malformed hash (never a
/// path outside the store).
pub fn code_path(dir: &Path, code_sha256: &str) -> Option<PathBuf> {
    let valid = code_sha256.len() == 64
        && code_sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    valid.then(|| dir.join(CODE_DIR).join(format!("{code_sha256}.wasm")))
}

/// A capsule file found in the repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapsuleFile {
    /// Its path.
    pub path: PathBuf,
    /// `NAME` and `VERSION` from `DIR/NAME/VERSION/`; `None` for a flat file (named from its
    /// manifest).
    pub layout: Option<(String, String)>,
    /// Size and modification time: a file whose stamp changed is read again.
    pub stamp: Stamp,
}

/// What identifies one state of a file without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// Size in bytes.
    pub len: u64,
    /// Modification time.
    pub modified: Option<SystemTime>,
    /// For a model image, the size and modification time of the code module it names (`None`
    /// while it is missing): a refused image is retried when its code arrives or changes.
    pub code: Option<(u64, Option<SystemTime>)>,
}

fn is_capsule(path: &Path) -> bool {
    path.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
        (n.ends_with(CAPSULE_SUFFIX) || n.ends_with(IMAGE_SUFFIX)) && !n.starts_with('.')
    })
}

/// The stamp of the code module a model image names, read from the image's fixed header
/// (60 bytes; nothing is decompressed).
fn code_stamp(repo: &Path, path: &Path) -> Option<(u64, Option<SystemTime>)> {
    if !path.to_str().is_some_and(|p| p.ends_with(IMAGE_SUFFIX)) {
        return None;
    }
    let mut header = [0u8; capsule_format::split::IMAGE_HEADER_BYTES];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut header))
        .ok()?;
    let header = capsule_format::split::image_header(&header).ok()?;
    let meta = std::fs::metadata(code_path(repo, &header.code_sha256)?).ok()?;
    Some((meta.len(), meta.modified().ok()))
}

fn hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_none_or(|n| n.starts_with('.'))
}

fn entries(dir: &Path) -> Result<Vec<(PathBuf, std::fs::Metadata)>> {
    let mut out = Vec::new();
    for entry in
        std::fs::read_dir(dir).map_err(Error::io(format!("cannot list {}", dir.display())))?
    {
        let entry = entry.map_err(Error::io(format!("cannot list {}", dir.display())))?;
        let path = entry.path();
        if hidden(&path) {
            continue;
        }
        // Follows symlinks, so a version directory may link to a capsule elsewhere.
        match std::fs::metadata(&path) {
            Ok(meta) => out.push((path, meta)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "skipping unreadable entry")
            }
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn stamp(repo: &Path, path: &Path, meta: &std::fs::Metadata) -> Stamp {
    Stamp {
        len: meta.len(),
        modified: meta.modified().ok(),
        code: code_stamp(repo, path),
    }
}

/// What a scan of the repository found.
#[derive(Debug, Default)]
pub struct Scan {
    /// The capsule files.
    pub files: Vec<CapsuleFile>,
    /// Models whose directory, or one of whose version directories, could not be listed
    /// (removed while the scan ran, permissions, I/O errors), with the error: their files
    /// are not all in [`Self::files`], so a loader keeps serving what it loaded of them.
    pub unreadable: Vec<(String, String)>,
}

/// Lists the capsules of a repository: flat `DIR/*.capsule.wasm` files and
/// `DIR/NAME/VERSION/*.capsule.wasm` (one capsule per version directory; a version directory
/// holding several is skipped with a warning). Model images (`*.capsule.img`, their code in
/// [`CODE_DIR`]) count as capsules. Hidden files (starting with `.`) are ignored,
/// so a capsule can be written under a hidden name and renamed into place atomically.
///
/// Only an unreadable repository is an error: a model directory that cannot be listed is
/// reported in [`Scan::unreadable`] and the scan goes on with the others.
pub fn scan(dir: &Path) -> Result<Scan> {
    scan_with(dir, entries)
}

type Listing = Result<Vec<(PathBuf, std::fs::Metadata)>>;

fn scan_with(dir: &Path, list: impl Fn(&Path) -> Listing) -> Result<Scan> {
    let mut found = Scan::default();
    for (path, meta) in list(dir)? {
        if meta.is_file() && is_capsule(&path) {
            found.files.push(CapsuleFile {
                stamp: stamp(dir, &path, &meta),
                path,
                layout: None,
            });
            continue;
        }
        if !meta.is_dir() {
            continue;
        }
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        let versions = match list(&path) {
            Ok(versions) => versions,
            Err(e) => {
                found.unreadable.push((name, e.to_string()));
                continue;
            }
        };
        for (version_dir, vmeta) in versions {
            if !vmeta.is_dir() {
                continue;
            }
            let Some(version) = version_dir
                .file_name()
                .and_then(|n| n.to_str())
                .map(str::to_owned)
            else {
                continue;
            };
            let capsules: Vec<_> = match list(&version_dir) {
                Ok(entries) => entries
                    .into_iter()
                    .filter(|(p, m)| m.is_file() && is_capsule(p))
                    .collect(),
                Err(e) => {
                    found.unreadable.push((name.clone(), e.to_string()));
                    continue;
                }
            };
            match capsules.as_slice() {
                [] => {}
                [(p, m)] => found.files.push(CapsuleFile {
                    path: p.clone(),
                    layout: Some((name.clone(), version.clone())),
                    stamp: stamp(dir, p, m),
                }),
                many => tracing::warn!(
                    dir = %version_dir.display(),
                    count = many.len(),
                    "skipping a version directory with more than one capsule"
                ),
            }
        }
    }
    Ok(found)
}

/// Orders versions: integers numerically, then semantic versions, then other strings
/// lexically (an integer version is lower than any semantic version).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    fn rank(v: &str) -> (u8, Option<u64>, Option<semver::Version>) {
        if let Ok(n) = v.parse::<u64>() {
            (0, Some(n), None)
        } else if let Ok(s) = semver::Version::parse(v) {
            (1, None, Some(s))
        } else {
            (2, None, None)
        }
    }
    let (ra, rb) = (rank(a), rank(b));
    ra.0.cmp(&rb.0)
        .then_with(|| ra.1.cmp(&rb.1))
        .then_with(|| ra.2.cmp(&rb.2))
        .then_with(|| a.cmp(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order() {
        let mut v = vec!["10", "2", "1.0.0", "b", "0.9.1", "a", "1"];
        v.sort_by(|a, b| compare_versions(a, b));
        assert_eq!(v, vec!["1", "2", "10", "0.9.1", "1.0.0", "a", "b"]);
    }

    #[test]
    fn scan_finds_both_layouts() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::write(root.join("flat.capsule.wasm"), b"x").unwrap();
        std::fs::write(root.join(".partial.capsule.wasm"), b"x").unwrap();
        std::fs::write(root.join("notes.txt"), b"x").unwrap();
        std::fs::create_dir_all(root.join("mlp/1")).unwrap();
        std::fs::create_dir_all(root.join("mlp/2")).unwrap();
        std::fs::create_dir_all(root.join("cnn/1")).unwrap();
        std::fs::write(root.join("mlp/1/a.capsule.wasm"), b"xy").unwrap();
        std::fs::write(root.join("mlp/2/b.capsule.wasm"), b"xyz").unwrap();
        std::fs::write(root.join("cnn/1/a.capsule.wasm"), b"x").unwrap();
        std::fs::write(root.join("cnn/1/b.capsule.wasm"), b"x").unwrap();
        let found = scan(root).unwrap().files;
        let summary: Vec<_> = found
            .iter()
            .map(|f| {
                (
                    f.path.strip_prefix(root).unwrap().to_path_buf(),
                    f.layout.clone(),
                    f.stamp.len,
                )
            })
            .collect();
        assert_eq!(
            summary,
            vec![
                (PathBuf::from("flat.capsule.wasm"), None, 1),
                (
                    PathBuf::from("mlp/1/a.capsule.wasm"),
                    Some(("mlp".into(), "1".into())),
                    2
                ),
                (
                    PathBuf::from("mlp/2/b.capsule.wasm"),
                    Some(("mlp".into(), "2".into())),
                    3
                ),
            ]
        );
        let e = scan(&root.join("missing")).unwrap_err().to_string();
        assert!(e.starts_with("cannot list "), "{e}");
    }

    /// A model directory or a version directory that cannot be listed (removed while the
    /// scan runs; unreadable) is reported and skipped; the other models are still found. It
    /// used to abort the whole scan, so no model's change was seen.
    #[test]
    fn an_unreadable_directory_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for model in ["a", "b", "c"] {
            std::fs::create_dir_all(root.join(model).join("1")).unwrap();
            std::fs::write(root.join(model).join("1/m.capsule.wasm"), b"x").unwrap();
        }
        let failing = |path: &Path| -> Listing {
            if path.ends_with("a") || path.ends_with("c/1") {
                return Err(Error::io(format!("cannot list {}", path.display()))(
                    std::io::Error::from(std::io::ErrorKind::PermissionDenied),
                ));
            }
            entries(path)
        };
        let found = scan_with(root, failing).unwrap();
        let names: Vec<_> = found
            .files
            .iter()
            .filter_map(|f| f.layout.as_ref().map(|(n, _)| n.as_str()))
            .collect();
        assert_eq!(names, ["b"]);
        let unreadable: Vec<_> = found.unreadable.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(unreadable, ["a", "c"]);
        assert!(
            found.unreadable[0].1.starts_with("cannot list "),
            "{:?}",
            found.unreadable
        );
    }
}
