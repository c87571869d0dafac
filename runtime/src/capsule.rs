//! Reading a `.capsule.wasm`: structural checks, the manifest, and the split into the
//! guest's code (compiled once per guest build) and the capsule's memory image.
//!
//! Every capsule of one guest build has the same code; only its memory image (the snapshot),
//! memory size and manifest differ. [`CapsuleImage::parse`] cuts those out, so the engine
//! compiles the code once and installs further capsules of that build without compiling.

use std::ops::Range;

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
    /// The file, or only its memory image once installed ([`Self::shed_code`]).
    bytes: Vec<u8>,
    /// Size of the capsule file.
    file_size: usize,
    /// SHA-256 of the whole file: the capsule's identity.
    pub sha256: String,
    /// The decoded manifest.
    pub manifest: CapsuleManifest,
    /// The guest code module (no data, no custom sections, a zero-size memory).
    pub code: Vec<u8>,
    /// SHA-256 of [`Self::code`]: identifies the guest build.
    pub code_sha256: String,
    /// Initial memory size in pages.
    pub memory_pages: u64,
    /// Active data segments: offset in memory and byte range in the file.
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
        // validated then. Everything this function keeps for itself is checked below.
        let mut manifest_range = None;
        let mut memory_pages = None;
        let mut segments = Vec::new();
        let mut exports = Vec::new();
        let mut imports = Vec::new();
        let mut sections = Vec::new();
        for payload in Parser::new(0).parse_all(&bytes) {
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
                sections.push((name, range.len()));
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
                        if !crate::host_kernels::importable(import.module, import.name, &import.ty)
                        {
                            return Err(invalid(format!(
                                "it imports {:?}::{:?}; a capsule imports nothing but the \
                                 host kernels ({}::{:?})",
                                import.module,
                                import.name,
                                capsule_format::HOST_KERNELS_MODULE,
                                capsule_format::HOST_KERNELS_IMPORTS,
                            )));
                        }
                        imports.push(format!("{}::{}", import.module, import.name));
                    }
                }
                Payload::ExportSection(reader) => {
                    for export in reader {
                        exports.push(export.map_err(|e| invalid(e.to_string()))?.name.to_owned());
                    }
                }
                Payload::MemorySection(reader) => {
                    for memory in reader {
                        let memory = memory.map_err(|e| invalid(e.to_string()))?;
                        if memory.memory64 || memory.shared || memory_pages.is_some() {
                            return Err(invalid(
                                "a capsule has exactly one unshared 32-bit memory",
                            ));
                        }
                        memory_pages = Some(memory.initial);
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
                        let mut ops = offset_expr.get_operators_reader();
                        let offset = match ops.read().map_err(|e| invalid(e.to_string()))? {
                            Operator::I32Const { value } => value as u32,
                            _ => return Err(invalid("data segment offsets must be constants")),
                        };
                        segments.push((offset, data.range.end - data.data.len()..data.range.end));
                    }
                }
                Payload::CustomSection(reader) if reader.name() == MANIFEST_SECTION => {
                    if manifest_range.is_some() {
                        return Err(invalid("more than one capsule.manifest section"));
                    }
                    manifest_range =
                        Some(reader.data_offset()..reader.data_offset() + reader.data().len());
                }
                _ => {}
            }
        }
        for required in REQUIRED_EXPORTS {
            if !exports.iter().any(|e| e == required) {
                return Err(invalid(format!("missing export {required:?}")));
            }
        }
        let memory_pages = memory_pages.ok_or_else(|| invalid("no memory"))?;
        let manifest_range = manifest_range.ok_or_else(|| {
            invalid("no capsule.manifest section (not built by `capsule build`?)")
        })?;
        let manifest = CapsuleManifest::from_section_bytes(&bytes[manifest_range])?;
        if manifest.abi_version != capsule_format::ABI_VERSION {
            return Err(invalid(format!(
                "manifest declares guest ABI version {}, this runtime implements version {}",
                manifest.abi_version,
                capsule_format::ABI_VERSION
            )));
        }
        match (manifest.host_kernels, imports.is_empty()) {
            (capsule_format::HostKernels::None, false) => {
                return Err(invalid(format!(
                    "it imports {imports:?} but its manifest declares no host kernels"
                )));
            }
            (capsule_format::HostKernels::V1, true) => {
                return Err(invalid(
                    "its manifest declares host kernels but the code imports none",
                ));
            }
            _ => {}
        }
        for (offset, range) in &segments {
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
        let image_len = segments.iter().map(|(_, r)| r.len()).sum();
        Ok(CapsuleImage {
            file_size: bytes.len(),
            bytes,
            sha256,
            manifest,
            code,
            code_sha256,
            memory_pages,
            segments,
            image_len,
            exports,
            imports,
            sections,
        })
    }

    /// Parses the split form: a model image and the code module it names
    /// (`capsule_format::split`). The code is checked against the image (length and SHA-256)
    /// before anything is decompressed; the capsule they join into then passes every check of
    /// [`Self::parse`], and is the byte-identical single file the image was cut from.
    pub fn parse_split(code: &[u8], image: &[u8]) -> Result<CapsuleImage> {
        let joined = capsule_format::split::join(code, image)?;
        let code_sha256 = capsule_format::split::image_header(image)?.code_sha256;
        Self::parse_with(joined, Some((code.to_vec(), code_sha256)))
    }

    /// [`Self::parse_split`] with a code module hashed already (a node joining many images
    /// with one guest build's code).
    pub fn parse_image(code: &capsule_format::split::Code, image: &[u8]) -> Result<CapsuleImage> {
        let joined = capsule_format::split::join_code(code, image)?;
        Self::parse_with(
            joined,
            Some((code.bytes().to_vec(), code.sha256().to_owned())),
        )
    }

    /// Size of the capsule file.
    pub fn size(&self) -> usize {
        self.file_size
    }

    /// The capsule file (only the memory image after [`Self::shed_code`]).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Drops the code module and everything of the file but the memory image. An installed
    /// capsule runs from the engine's compiled code, so keeping a copy of the guest code per
    /// capsule (megabytes each) would only cost memory on a node with many capsules.
    pub fn shed_code(&mut self) {
        let mut image = Vec::with_capacity(self.image_bytes());
        for (_, range) in &mut self.segments {
            let start = image.len();
            image.extend_from_slice(&self.bytes[range.clone()]);
            *range = start..image.len();
        }
        self.bytes = image;
        self.code = Vec::new();
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
