//! Reading a `.capsule.wasm`: structural checks, the manifest, and the split into the
//! guest's code (compiled once per guest build) and the capsule's memory image.
//!
//! Every capsule of one guest build has the same code; only its memory image (the snapshot),
//! memory size and manifest differ. [`CapsuleImage::parse`] cuts those out, so the engine
//! compiles the code once and installs further capsules of that build without compiling.

use std::ops::Range;
use std::sync::Arc;

use capsule_format::{CapsuleManifest, MANIFEST_SECTION};
use sha2::{Digest, Sha256};
use wasmparser::{DataKind, Operator, Parser, Payload};

use crate::{Error, Result};

/// Largest capsule file accepted (single-file form, or the split form once joined).
pub use capsule_format::split::MAX_CAPSULE_BYTES;

/// Exports every capsule must have (design section 3, ABI version 1).
pub const REQUIRED_EXPORTS: [&str; 6] = [
    "memory",
    "capsule_abi_version",
    "capsule_alloc",
    "capsule_free",
    "capsule_init",
    "capsule_infer",
];

/// One wasm page.
pub const PAGE: u64 = 65536;

/// A parsed, structurally checked capsule.
#[derive(Debug)]
pub struct CapsuleImage {
    /// The file; or only its memory image, the segments one after the other, once installed
    /// ([`Self::shed_code`]) or when read from the split form ([`Self::parse_image`]).
    bytes: Vec<u8>,
    /// Size of the capsule file.
    file_size: usize,
    /// SHA-256 of the file it was read from: the capsule file's (also when joined from the
    /// split form by [`Self::parse_split`]), or the model image's ([`Self::parse_image`]).
    pub sha256: String,
    /// The decoded manifest.
    pub manifest: CapsuleManifest,
    /// The guest code module (no data, no custom sections, a zero-size memory), shared with
    /// every capsule read with the same [`GuestCode`].
    pub code: Arc<[u8]>,
    /// SHA-256 of [`Self::code`]: identifies the guest build.
    pub code_sha256: String,
    /// Initial memory size in pages.
    pub memory_pages: u64,
    /// Active data segments: offset in memory and byte range in `bytes`.
    segments: Vec<(u32, Range<usize>)>,
    /// Total bytes of the segments (kept when they are shed).
    image_len: usize,
    /// Export names.
    pub exports: Vec<String>,
    /// Import names (`module::name`); always empty for a valid capsule, kept for `inspect`.
    pub imports: Vec<String>,
    /// Sections as (name, size in bytes), in file order.
    pub sections: Vec<(String, usize)>,
}

fn invalid(msg: impl Into<String>) -> Error {
    Error::InvalidCapsule(msg.into())
}

fn section_name(id: u8) -> &'static str {
    match id {
        0 => "custom",
        1 => "type",
        2 => "import",
        3 => "function",
        4 => "table",
        5 => "memory",
        6 => "global",
        7 => "export",
        8 => "start",
        9 => "element",
        10 => "code",
        11 => "data",
        12 => "datacount",
        13 => "tag",
        _ => "unknown",
    }
}

/// What one pass over a module finds: the parts of a capsule the runtime keeps, checked as
/// it goes (no imports but the host kernels, one unshared 32-bit memory, only active data
/// segments of memory 0 at constant offsets, at most one manifest section).
struct Walked {
    manifest_range: Option<Range<usize>>,
    memory_pages: Option<u64>,
    segments: Vec<(u32, Range<usize>)>,
    exports: Vec<String>,
    imports: Vec<String>,
    sections: Vec<(String, usize)>,
}

fn walk(bytes: &[u8]) -> Result<Walked> {
    if bytes.len() > MAX_CAPSULE_BYTES {
        return Err(invalid(format!(
            "{} bytes, over the limit of {MAX_CAPSULE_BYTES}",
            bytes.len()
        )));
    }
    if !bytes.starts_with(b"\0asm") {
        return Err(invalid("not a valid WebAssembly module: bad magic number"));
    }
    // Function bodies are not validated here: they go into the code module, which wasmtime
    // validates when it compiles it, and a code module already compiled (same SHA-256) was
    // validated then. Everything the runtime keeps for itself is checked below.
    let mut w = Walked {
        manifest_range: None,
        memory_pages: None,
        segments: Vec::new(),
        exports: Vec::new(),
        imports: Vec::new(),
        sections: Vec::new(),
    };
    for payload in Parser::new(0).parse_all(bytes) {
        let payload = payload.map_err(|e| {
            // wasmparser's messages may span lines; one line reads better in logs and
            // error bodies.
            let message = e
                .to_string()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            invalid(format!("not a valid WebAssembly module: {message}"))
        })?;
        if let Some((id, range)) = payload.as_section() {
            let name = match &payload {
                Payload::CustomSection(c) => format!("custom:{}", c.name()),
                _ => section_name(id).to_owned(),
            };
            w.sections.push((name, range.len()));
        }
        match payload {
            Payload::Version {
                encoding: wasmparser::Encoding::Component,
                ..
            } => {
                return Err(invalid("a component, not a core module"));
            }
            Payload::ImportSection(reader) => {
                for import in reader.into_imports() {
                    let import = import.map_err(|e| invalid(e.to_string()))?;
                    if !crate::host_kernels::importable(import.module, import.name, &import.ty) {
                        return Err(invalid(format!(
                            "it imports {:?}::{:?}; a capsule imports nothing but the \
                             host kernels ({}::{:?})",
                            import.module,
                            import.name,
                            capsule_format::HOST_KERNELS_MODULE,
                            capsule_format::HOST_KERNELS_IMPORTS,
                        )));
                    }
                    w.imports
                        .push(format!("{}::{}", import.module, import.name));
                }
            }
            Payload::ExportSection(reader) => {
                for export in reader {
                    w.exports
                        .push(export.map_err(|e| invalid(e.to_string()))?.name.to_owned());
                }
            }
            Payload::MemorySection(reader) => {
                for memory in reader {
                    let memory = memory.map_err(|e| invalid(e.to_string()))?;
                    if memory.memory64 || memory.shared || w.memory_pages.is_some() {
                        return Err(invalid("a capsule has exactly one unshared 32-bit memory"));
                    }
                    w.memory_pages = Some(memory.initial);
                }
            }
            Payload::DataSection(reader) => {
                for data in reader {
                    let data = data.map_err(|e| invalid(e.to_string()))?;
                    let offset_expr = match data.kind {
                        DataKind::Active {
                            memory_index: 0,
                            offset_expr,
                        } => offset_expr,
                        // The snapshot turns the guest's original (already applied)
                        // segments into empty passive ones, keeping segment indices.
                        DataKind::Passive if data.data.is_empty() => continue,
                        _ => {
                            return Err(invalid(
                                "only active data segments of memory 0 are allowed in a capsule",
                            ));
                        }
                    };
                    // Exactly `i32.const <offset>; end`, as the split form's reader
                    // (`capsule_format::split`) requires: a longer expression is refused by
                    // both.
                    let mut ops = offset_expr.get_operators_reader();
                    let first = ops.read().map_err(|e| invalid(e.to_string()))?;
                    let second = ops.read().map_err(|e| invalid(e.to_string()))?;
                    let offset = match (first, second) {
                        (Operator::I32Const { value }, Operator::End) if ops.eof() => value as u32,
                        _ => return Err(invalid("data segment offsets must be constants")),
                    };
                    w.segments
                        .push((offset, data.range.end - data.data.len()..data.range.end));
                }
            }
            Payload::CustomSection(reader) if reader.name() == MANIFEST_SECTION => {
                if w.manifest_range.is_some() {
                    return Err(invalid("more than one capsule.manifest section"));
                }
                w.manifest_range =
                    Some(reader.data_offset()..reader.data_offset() + reader.data().len());
            }
            _ => {}
        }
    }
    Ok(w)
}

fn require_exports(exports: &[String]) -> Result<()> {
    for required in REQUIRED_EXPORTS {
        if !exports.iter().any(|e| e == required) {
            return Err(invalid(format!("missing export {required:?}")));
        }
    }
    Ok(())
}

/// Decodes the manifest and checks it against the runtime and the code's imports.
fn checked_manifest(section: &[u8], imports: &[String]) -> Result<CapsuleManifest> {
    let manifest = CapsuleManifest::from_section_bytes(section)?;
    if manifest.abi_version != capsule_format::ABI_VERSION {
        return Err(invalid(format!(
            "manifest declares guest ABI version {}, this runtime implements version {}",
            manifest.abi_version,
            capsule_format::ABI_VERSION
        )));
    }
    let declared = manifest.host_kernels;
    let module = capsule_format::HOST_KERNELS_MODULE;
    if let Some(beyond) = imports.iter().find(|i| {
        !i.strip_prefix(module)
            .and_then(|name| name.strip_prefix("::"))
            .is_some_and(|name| declared.imports().contains(&name))
    }) {
        return Err(invalid(if declared == capsule_format::HostKernels::None {
            format!("it imports {beyond:?} but its manifest declares no host kernels")
        } else {
            format!("it imports {beyond:?}, which its manifest's host kernels ({declared}) lack")
        }));
    }
    if declared != capsule_format::HostKernels::None && imports.is_empty() {
        return Err(invalid(
            "its manifest declares host kernels but the code imports none",
        ));
    }
    Ok(manifest)
}

/// A guest code module checked once: what [`CapsuleImage::parse_image`] needs of it (its
/// exports, imports and sections), shared rather than copied by every image installed with
/// it.
#[derive(Debug)]
pub struct GuestCode {
    bytes: Arc<[u8]>,
    sha256: String,
    exports: Vec<String>,
    imports: Vec<String>,
    sections: Vec<(String, usize)>,
    /// Its sections but the memory section: what an image of this code places.
    placed: usize,
}

impl GuestCode {
    /// Checks a code module (hashed by [`capsule_format::split::Code`]) as a capsule's code:
    /// the ABI exports, no imports but the host kernels, the zero-size memory the split form
    /// gives it, no data and no manifest of its own.
    pub fn check(code: capsule_format::split::Code) -> Result<GuestCode> {
        let (bytes, sha256) = code.into_parts();
        let walked = walk(&bytes)?;
        require_exports(&walked.exports)?;
        if walked.memory_pages != Some(0) {
            return Err(invalid("a code module has one memory of zero pages"));
        }
        if !walked.segments.is_empty() || walked.manifest_range.is_some() {
            return Err(invalid(
                "a code module has no data segments and no manifest: they are the image's",
            ));
        }
        let placed = walked
            .sections
            .iter()
            .filter(|(n, _)| n != "memory")
            .count();
        Ok(GuestCode {
            bytes: bytes.into(),
            sha256,
            exports: walked.exports,
            imports: walked.imports,
            sections: walked.sections,
            placed,
        })
    }

    /// The module's SHA-256, lowercase hex: the guest build's identity.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }

    /// The module.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }
}

impl CapsuleImage {
    /// Parses and checks a capsule file: a wasm core module with no imports, one 32-bit
    /// memory, only active data segments at constant offsets, the ABI exports, and exactly
    /// one decodable manifest section.
    pub fn parse(bytes: Vec<u8>) -> Result<CapsuleImage> {
        Self::parse_with(bytes, None)
    }

    /// [`Self::parse`], given the code module and its SHA-256 when the caller already has
    /// them checked against this file (the split form: [`capsule_format::split::join`] checked
    /// the code's hash, and the code module of the joined file is that code by construction),
    /// so they are not built and hashed again.
    fn parse_with(bytes: Vec<u8>, known_code: Option<(Vec<u8>, String)>) -> Result<CapsuleImage> {
        let walked = walk(&bytes)?;
        require_exports(&walked.exports)?;
        let memory_pages = walked.memory_pages.ok_or_else(|| invalid("no memory"))?;
        let manifest_range = walked.manifest_range.clone().ok_or_else(|| {
            invalid("no capsule.manifest section (not built by `capsule build`?)")
        })?;
        let manifest = checked_manifest(&bytes[manifest_range], &walked.imports)?;
        for (offset, range) in &walked.segments {
            let end = u64::from(*offset) + range.len() as u64;
            if end > memory_pages.saturating_mul(PAGE) {
                return Err(invalid("a data segment lies outside the initial memory"));
            }
        }

        // The guest build's sections with an empty memory: one rule for every reader
        // (`capsule_format::split`), so a code module has one hash on nodes, hubs and browsers.
        let (code, code_sha256) = match known_code {
            Some(known) => known,
            None => {
                let code = capsule_format::split::code_module(&bytes)?;
                let sha = hex::encode(Sha256::digest(&code));
                (code, sha)
            }
        };
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let image_len = walked.segments.iter().map(|(_, r)| r.len()).sum();
        Ok(CapsuleImage {
            file_size: bytes.len(),
            bytes,
            sha256,
            manifest,
            code: code.into(),
            code_sha256,
            memory_pages,
            segments: walked.segments,
            image_len,
            exports: walked.exports,
            imports: walked.imports,
            sections: walked.sections,
        })
    }

    /// Parses the split form: a model image and the code module it names
    /// (`capsule_format::split`). The code is checked against the image (length and SHA-256)
    /// before anything is decompressed; the capsule they join into then passes every check of
    /// [`Self::parse`], and is the byte-identical single file the image was cut from (its
    /// [`Self::sha256`] is that file's).
    pub fn parse_split(code: &[u8], image: &[u8]) -> Result<CapsuleImage> {
        let joined = capsule_format::split::join(code, image)?;
        let code_sha256 = capsule_format::split::image_header(image)?.code_sha256;
        Self::parse_with(joined, Some((code.to_vec(), code_sha256)))
    }

    /// The split form without joining: a model image and a code module checked once
    /// ([`GuestCode`]), for a node that installs every model of a guest build with the same
    /// code. The image must name this code (length and SHA-256) and place exactly its
    /// sections; its memory, segments and manifest pass the checks of [`Self::parse`]
    /// (`capsule_format::split::image_memory`), and the code passed the rest when it was
    /// checked. Nothing of the code is copied or hashed again. [`Self::sha256`] is the image
    /// file's (what its signed target names), and [`Self::size`] its length.
    pub fn parse_image(code: &GuestCode, image: &[u8]) -> Result<CapsuleImage> {
        let header = capsule_format::split::image_header(image)?;
        if header.code_sha256 != code.sha256 || header.code_len != code.bytes.len() as u64 {
            return Err(capsule_format::Error::CodeMismatch {
                expected: header.code_sha256,
                found: code.sha256.clone(),
            }
            .into());
        }
        let memory = capsule_format::split::image_memory(image)?;
        if memory.code_sections != code.placed {
            return Err(invalid(format!(
                "the model image places {} sections of its code module, which has {}",
                memory.code_sections, code.placed
            )));
        }
        let manifest = checked_manifest(&memory.manifest, &code.imports)?;
        let image_len = memory.data.len();
        let mut sections = code.sections.clone();
        sections.extend(memory.own_sections.iter().map(|s| {
            let name = match &s.custom_name {
                Some(name) => format!("custom:{name}"),
                None => section_name(s.id).to_owned(),
            };
            (name, s.len)
        }));
        Ok(CapsuleImage {
            file_size: image.len(),
            bytes: memory.data,
            sha256: hex::encode(Sha256::digest(image)),
            manifest,
            code: Arc::clone(&code.bytes),
            code_sha256: code.sha256.clone(),
            memory_pages: memory.pages,
            segments: memory.segments,
            image_len,
            exports: code.exports.clone(),
            imports: code.imports.clone(),
            sections,
        })
    }

    /// Size of the capsule file.
    pub fn size(&self) -> usize {
        self.file_size
    }

    /// The capsule file; only the memory image after [`Self::shed_code`] or when read with
    /// [`Self::parse_image`].
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Drops the code module and everything of the file but the memory image. An installed
    /// capsule runs from the engine's compiled code, so keeping a copy of the guest code per
    /// capsule (megabytes each) would only cost memory on a node with many capsules.
    pub fn shed_code(&mut self) {
        self.code = Arc::from(Vec::new());
        if self.bytes.len() == self.image_len {
            // Already only the segments, one after the other (the split form's image).
            return;
        }
        let mut image = Vec::with_capacity(self.image_bytes());
        for (_, range) in &mut self.segments {
            let start = image.len();
            image.extend_from_slice(&self.bytes[range.clone()]);
            *range = start..image.len();
        }
        self.bytes = image;
    }

    /// The memory image: (offset, bytes) of every data segment.
    pub fn segments(&self) -> impl Iterator<Item = (u32, &[u8])> {
        self.segments
            .iter()
            .map(|(o, r)| (*o, &self.bytes[r.clone()]))
    }

    /// Total bytes of the memory image.
    pub fn image_bytes(&self) -> usize {
        self.image_len
    }

    /// Drops the memory image itself (after [`Self::shed_code`], the last of the file): an
    /// installed capsule whose image lives in a copy-on-write file needs no second copy in
    /// process memory. [`Self::segments`] is empty afterwards.
    pub(crate) fn shed_image(&mut self) {
        self.bytes = Vec::new();
        self.segments = Vec::new();
    }
}
