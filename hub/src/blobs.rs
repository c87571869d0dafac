//! Capsule blobs, content-addressed: `DIR/ab/abcdef....capsule.wasm`, written through a
//! temporary file and renamed, so a crash never leaves a partial blob under its name.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// The blob directory.
#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

fn valid_hash(sha256: &str) -> bool {
    sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

impl BlobStore {
    /// Opens (creating) the directory.
    pub fn open(dir: &Path) -> Result<BlobStore> {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        Ok(BlobStore {
            dir: dir.to_path_buf(),
        })
    }

    /// Where a blob lives; `None` for a malformed hash (never a path outside the store).
    pub fn path(&self, sha256: &str) -> Option<PathBuf> {
        valid_hash(sha256).then(|| {
            self.dir
                .join(&sha256[..2])
                .join(format!("{sha256}.capsule.wasm"))
        })
    }

    /// Stores bytes; returns their SHA-256.
    pub fn put(&self, bytes: &[u8]) -> Result<String> {
        let sha256 = hex::encode(Sha256::digest(bytes));
        let Some(path) = self.path(&sha256) else {
            return Err(Error::Internal("hash".into()));
        };
        if path.exists() {
            return Ok(sha256);
        }
        let what = format!("writing {}", path.display());
        let io = |e| Error::io(what.clone())(e);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let tmp = path.with_extension(format!("{}.part", crate::store::new_id()));
        std::fs::write(&tmp, bytes).map_err(io)?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        Ok(sha256)
    }
}
