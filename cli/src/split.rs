//! `capsule split` and `capsule join`: the split form of a capsule (its guest code, named by
//! SHA-256, and a small model image that names it), and reading either form.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use capsule_format::split::{self, IMAGE_SUFFIX, MAX_CAPSULE_BYTES};
use capsule_runtime::CapsuleImage;

use crate::{bytes, read_limited};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The capsule (single-file form, `.capsule.wasm`).
    capsule: PathBuf,
    /// Where to write the code module (`<sha256>.wasm`, kept if already there) and the model
    /// image (`<name>.capsule.img`) [default: the capsule's directory]
    #[arg(long, value_name = "DIR")]
    out_dir: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct JoinArgs {
    /// The model image (`.capsule.img`).
    image: PathBuf,
    /// The code module, or a directory holding it as `<sha256>.wasm` [default: the image's
    /// directory]
    #[arg(long, value_name = "PATH")]
    code: Option<PathBuf>,
    /// Output file [default: the image's name with `.capsule.wasm`]
    #[arg(short, long)]
    output: Option<PathBuf>,
}

/// The file name of a code module in a directory of them.
pub fn code_file_name(code_sha256: &str) -> String {
    format!("{code_sha256}.wasm")
}

/// `name.capsule.wasm` -> `name`, else the file stem.
fn capsule_stem(path: &Path) -> String {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    for suffix in [".capsule.wasm", IMAGE_SUFFIX, ".wasm"] {
        if let Some(stem) = name.strip_suffix(suffix) {
            return stem.to_owned();
        }
    }
    name
}

/// Writes `data` to `path` through a temporary file in the same directory and a rename, so a
/// crash leaves the old file or the new one, never half of one.
fn write_atomically(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    let dir = dir.unwrap_or_else(|| Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    std::io::Write::write_all(&mut tmp, data)
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    // Published artifacts, readable like any file the user writes (a temporary file is 0600).
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    tmp.persist(path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// What [`write_split`] wrote.
#[derive(Debug)]
pub struct Written {
    pub code: PathBuf,
    /// Whether the code module was already there (same hash, same length).
    pub code_existed: bool,
    pub code_len: usize,
    pub image: PathBuf,
    pub image_len: usize,
}

/// Splits a capsule file and writes its model image to `image` and its code module beside
/// it (unless already there).
pub fn write_split(capsule: &[u8], image: &Path) -> Result<Written> {
    let split = split::split(capsule)?;
    let dir = image.parent().unwrap_or_else(|| Path::new(""));
    if !dir.as_os_str().is_empty() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let code = dir.join(code_file_name(&split.code_sha256));
    // Content-addressed: a file of this name and length is this code (a corrupted one is
    // refused when an image is joined with it, by its hash).
    let code_existed = std::fs::metadata(&code).is_ok_and(|m| m.len() == split.code.len() as u64);
    if !code_existed {
        write_atomically(&code, &split.code)?;
    }
    write_atomically(image, &split.image)?;
    Ok(Written {
        code,
        code_existed,
        code_len: split.code.len(),
        image: image.to_path_buf(),
        image_len: split.image.len(),
    })
}

/// Reads a capsule in either form: a single file, or a model image whose code module is
/// `code` (a file, or a directory holding `<sha256>.wasm`; by default the image's directory).
pub fn read_capsule(path: &Path, code: Option<&Path>) -> Result<CapsuleImage> {
    Ok(read_either(path, code)?.0)
}

/// [`read_capsule`], and the model image's size when the file is one.
pub fn read_either(path: &Path, code: Option<&Path>) -> Result<(CapsuleImage, Option<usize>)> {
    let data = read_limited(path, MAX_CAPSULE_BYTES as u64, "capsule")?;
    if !split::is_image(&data) {
        if code.is_some() {
            bail!(
                "{} is a single-file capsule: --code is for model images",
                path.display()
            );
        }
        let image = CapsuleImage::parse(data).with_context(|| format!("{}", path.display()))?;
        return Ok((image, None));
    }
    let header = split::image_header(&data).with_context(|| format!("{}", path.display()))?;
    let code_path = match code {
        Some(p) if p.is_dir() => p.join(code_file_name(&header.code_sha256)),
        Some(p) => p.to_path_buf(),
        None => path
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join(code_file_name(&header.code_sha256)),
    };
    if !code_path.exists() {
        bail!(
            "{} needs guest code {}: {} does not exist (give it with --code FILE|DIR)",
            path.display(),
            header.code_sha256,
            code_path.display()
        );
    }
    let code_bytes = read_limited(&code_path, header.code_len, "code module")?;
    let image = CapsuleImage::parse_split(&code_bytes, &data)
        .with_context(|| format!("{} with code {}", path.display(), code_path.display()))?;
    Ok((image, Some(data.len())))
}

pub fn run_split(args: &Args) -> Result<()> {
    let data = read_limited(&args.capsule, MAX_CAPSULE_BYTES as u64, "capsule")?;
    if split::is_image(&data) {
        bail!("{} is already a model image", args.capsule.display());
    }
    // Only capsules that load are split: the image form promises the same checks.
    CapsuleImage::parse(data.clone()).with_context(|| format!("{}", args.capsule.display()))?;
    let dir = match &args.out_dir {
        Some(d) => d.clone(),
        None => args
            .capsule
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let image = dir.join(format!("{}{IMAGE_SUFFIX}", capsule_stem(&args.capsule)));
    let w = write_split(&data, &image)?;
    print_written(&w, data.len());
    Ok(())
}

/// Prints what a split wrote, against the single file's size.
pub fn print_written(w: &Written, fat_len: usize) {
    println!(
        "code   {} ({}{})",
        w.code.display(),
        bytes(w.code_len as u64),
        if w.code_existed {
            ", already there"
        } else {
            ""
        }
    );
    println!(
        "image  {} ({}; the single file is {}: {:.1}x)",
        w.image.display(),
        bytes(w.image_len as u64),
        bytes(fat_len as u64),
        fat_len as f64 / w.image_len.max(1) as f64
    );
}

pub fn run_join(args: &JoinArgs) -> Result<()> {
    let image = read_capsule(&args.image, args.code.as_deref())?;
    let output = match &args.output {
        Some(o) => o.clone(),
        None => args
            .image
            .with_file_name(format!("{}.capsule.wasm", capsule_stem(&args.image))),
    };
    write_atomically(&output, image.bytes())?;
    println!(
        "{} ({}, sha256 {})",
        output.display(),
        bytes(image.size() as u64),
        image.sha256
    );
    Ok(())
}

/// A capsule in both forms, from a file in either: what `capsule sign` signs and `capsule
/// push` uploads.
#[derive(Debug)]
pub struct BothForms {
    /// The single file, parsed.
    pub capsule: CapsuleImage,
    /// The model image: the file itself when given one, else the split of the single file.
    pub image: Vec<u8>,
    /// The code module.
    pub code: Vec<u8>,
    /// Its SHA-256.
    pub code_sha256: String,
}

impl BothForms {
    /// Reads `path` (a single file, or a model image with its code beside it).
    pub fn read(path: &Path) -> Result<BothForms> {
        let data = read_limited(path, MAX_CAPSULE_BYTES as u64, "capsule")?;
        if split::is_image(&data) {
            let capsule = read_capsule(path, None)?;
            let code = capsule.code.to_vec();
            return Ok(BothForms {
                code_sha256: capsule.code_sha256.clone(),
                capsule,
                image: data,
                code,
            });
        }
        let parts = split::split(&data)?;
        let capsule = CapsuleImage::parse(data).with_context(|| format!("{}", path.display()))?;
        Ok(BothForms {
            capsule,
            image: parts.image,
            code: parts.code,
            code_sha256: parts.code_sha256,
        })
    }
}
