//! The split form of a capsule: its guest code as an artifact of its own, named by its
//! SHA-256, and a small compressed *model image* that names the code it needs.
//!
//! Every capsule of one guest build carries the same code (about 10 MB); only its memory
//! image, memory size and manifest differ. [`split`] cuts a capsule (the single-file form,
//! `.capsule.wasm`) into:
//!
//! - the **code module**: the capsule's sections but the memory image and the custom sections,
//!   with an empty memory (exactly what a node compiles; [`code_module`] builds it the same
//!   way for every reader, so one guest build has one hash everywhere);
//! - the **model image**: a fixed header (magic, format version, the code's SHA-256 and length,
//!   the payload's length) followed by the gzip-compressed payload, which lists every section of
//!   the capsule in file order, each either held whole (memory, data, data count, the manifest
//!   and other custom sections) or named as "the next section of the code module", with the
//!   header bytes the capsule file had for it.
//!
//! [`join`] puts them back together, and `join(split(x))` is byte-identical to `x`: the image
//! keeps each section header as the file encoded it, so even a non-minimal size encoding
//! survives. [`join`] checks the code against the image's header (length and SHA-256) before it
//! decompresses anything, and bounds what it decompresses by the header's length, which is
//! itself bounded by [`MAX_CAPSULE_BYTES`].

use std::io::{Read, Write};
use std::ops::Range;

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{Error, Result};

/// Largest capsule (single-file form, or joined) any reader accepts.
pub const MAX_CAPSULE_BYTES: usize = 1 << 30;

/// First bytes of a model image file.
pub const IMAGE_MAGIC: [u8; 8] = *b"CAPSIMG\0";

/// Version of the model image layout written by this build (the header's second field).
pub const IMAGE_FORMAT_VERSION: u32 = 1;

/// Bytes of the image header: magic, version, code SHA-256, code length, payload length.
pub const IMAGE_HEADER_BYTES: usize = 8 + 4 + 32 + 8 + 8;

/// File name suffix of a model image.
pub const IMAGE_SUFFIX: &str = ".capsule.img";

/// The WebAssembly preamble every capsule starts with (core module, version 1).
const PREAMBLE: &[u8; 8] = b"\0asm\x01\0\0\0";

/// The memory section of the code module: one memory, no maximum, zero initial pages (the
/// runtime grows it to the image's size when it instantiates).
const EMPTY_MEMORY_SECTION: [u8; 3] = [1, 0, 0];

/// A capsule cut in two ([`split`]).
#[derive(Debug, Clone)]
pub struct Split {
    /// The code module.
    pub code: Vec<u8>,
    /// SHA-256 of [`Self::code`], lowercase hex: the guest build's identity.
    pub code_sha256: String,
    /// The model image file.
    pub image: Vec<u8>,
}

/// What a model image's fixed header says, readable without decompressing anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    /// SHA-256 of the code module the image needs, lowercase hex.
    pub code_sha256: String,
    /// Length of that code module in bytes.
    pub code_len: u64,
    /// Length of the decompressed payload in bytes.
    pub payload_len: u64,
}

impl ImageHeader {
    /// Length of the capsule [`join`] makes from this image (checked arithmetic; the preamble
    /// included), which is at most [`MAX_CAPSULE_BYTES`] for any header [`image_header`]
    /// accepts.
    pub fn joined_len_bound(&self) -> u64 {
        // The payload holds every section's header and the image's own sections; the code
        // module's sections are at most its length. Its own preamble and memory section are
        // not in the joined file, so this is an upper bound.
        self.code_len
            .saturating_add(self.payload_len)
            .saturating_add(PREAMBLE.len() as u64)
    }
}

/// One section of the capsule file, as the image records it.
#[derive(Debug, Serialize, Deserialize)]
enum Part<'a> {
    /// The next section of the code module (its memory section skipped), under this section
    /// header (id and size, as the capsule file encoded them).
    Code(#[serde(borrow, with = "serde_bytes")] &'a [u8]),
    /// A section the image holds whole, header included.
    Own(#[serde(borrow, with = "serde_bytes")] &'a [u8]),
}

/// One section of a module: its id, its header's and its content's byte ranges, and whether
/// the code module keeps it.
#[derive(Debug)]
struct Section {
    id: u8,
    header: Range<usize>,
    content: Range<usize>,
}

impl Section {
    /// Memory, data, data count and custom sections are the model's; everything else is the
    /// guest build's. The one custom section the code keeps is `name`, the guest's function
    /// names, which only profiling builds have and profilers read from the compiled code.
    fn in_code(&self, bytes: &[u8]) -> bool {
        match self.id {
            5 | 11 | 12 => false,
            0 => custom_name(&bytes[self.content.clone()]) == Some(b"name".as_slice()),
            _ => true,
        }
    }
}

fn invalid(what: impl Into<String>) -> Error {
    Error::InvalidImage { what: what.into() }
}

/// Reads an unsigned LEB128 of at most 32 bits at `*at`, advancing it.
fn read_u32(bytes: &[u8], at: &mut usize) -> Option<u32> {
    let mut value: u32 = 0;
    for shift in [0u32, 7, 14, 21, 28] {
        let byte = *bytes.get(*at)?;
        *at += 1;
        let bits = u32::from(byte & 0x7f);
        if shift == 28 && bits > 0x0f {
            return None;
        }
        value |= bits << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// The name of a custom section, from its content.
fn custom_name(content: &[u8]) -> Option<&[u8]> {
    let mut at = 0;
    let len = usize::try_from(read_u32(content, &mut at)?).ok()?;
    content.get(at..at.checked_add(len)?)
}

/// The sections of a core module, in order, after checking the preamble. Only the section
/// framing is read; what is inside is the readers' business (the runtime parses a capsule in
/// full before it runs it).
fn sections(bytes: &[u8]) -> Result<Vec<Section>> {
    if bytes.len() > MAX_CAPSULE_BYTES {
        return Err(Error::TooLarge {
            what: "capsule",
            size: bytes.len() as u64,
            limit: MAX_CAPSULE_BYTES as u64,
        });
    }
    if !bytes.starts_with(PREAMBLE) {
        return Err(invalid(
            "not a WebAssembly core module (version 1): bad preamble",
        ));
    }
    sections_from(bytes, PREAMBLE.len())
}

/// The sections of `bytes` from `at` on (a module's after its preamble, or an image part's).
fn sections_from(bytes: &[u8], mut at: usize) -> Result<Vec<Section>> {
    let mut out = Vec::new();
    while at < bytes.len() {
        let start = at;
        let id = bytes[at];
        at += 1;
        let size = read_u32(bytes, &mut at)
            .ok_or_else(|| invalid(format!("section at byte {start}: bad size")))?;
        let end = usize::try_from(size)
            .ok()
            .and_then(|size| at.checked_add(size))
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| invalid(format!("section at byte {start} runs past the end")))?;
        out.push(Section {
            id,
            header: start..at,
            content: at..end,
        });
        at = end;
    }
    Ok(out)
}

fn push_section(out: &mut Vec<u8>, id: u8, content: &[u8]) {
    out.push(id);
    let mut v = content.len() as u64;
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            break;
        }
        out.push(byte | 0x80);
    }
    out.extend_from_slice(content);
}

fn build_code(bytes: &[u8], sections: &[Section]) -> Vec<u8> {
    let mut code = PREAMBLE.to_vec();
    let mut memory_written = false;
    for s in sections.iter().filter(|s| s.in_code(bytes)) {
        // The empty memory goes where the memory section belongs: after the type, import,
        // function and table sections, before everything else.
        if !memory_written && !matches!(s.id, 1..=4) {
            push_section(&mut code, 5, &EMPTY_MEMORY_SECTION);
            memory_written = true;
        }
        push_section(&mut code, s.id, &bytes[s.content.clone()]);
    }
    if !memory_written {
        push_section(&mut code, 5, &EMPTY_MEMORY_SECTION);
    }
    code
}

/// The code module of a capsule: what a node compiles, and what [`split`] writes.
pub fn code_module(capsule: &[u8]) -> Result<Vec<u8>> {
    Ok(build_code(capsule, &sections(capsule)?))
}

/// SHA-256 of `bytes`, lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| [DIGITS[usize::from(b >> 4)], DIGITS[usize::from(b & 15)]])
        .map(char::from)
        .collect()
}

/// Cuts a capsule file into its code module and its model image.
pub fn split(capsule: &[u8]) -> Result<Split> {
    let sections = sections(capsule)?;
    let code = build_code(capsule, &sections);
    let parts: Vec<Part<'_>> = sections
        .iter()
        .map(|s| {
            if s.in_code(capsule) {
                Part::Code(&capsule[s.header.clone()])
            } else {
                Part::Own(&capsule[s.header.start..s.content.end])
            }
        })
        .collect();
    let payload = crate::wire::encode(&parts, "model image")?;
    let digest = Sha256::digest(&code);
    let mut image = Vec::with_capacity(IMAGE_HEADER_BYTES + payload.len() / 2);
    image.extend_from_slice(&IMAGE_MAGIC);
    image.extend_from_slice(&IMAGE_FORMAT_VERSION.to_le_bytes());
    image.extend_from_slice(&digest);
    image.extend_from_slice(&(code.len() as u64).to_le_bytes());
    image.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    let mut gz = GzEncoder::new(image, Compression::default());
    gz.write_all(&payload).map_err(Error::Compress)?;
    let image = gz.finish().map_err(Error::Compress)?;
    Ok(Split {
        code_sha256: hex(&digest),
        code,
        image,
    })
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut le = [0u8; 8];
    le.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(le)
}

/// Whether these bytes start like a model image (and not like a capsule file).
pub fn is_image(bytes: &[u8]) -> bool {
    bytes.starts_with(&IMAGE_MAGIC)
}

/// Reads a model image's fixed header, refusing an unknown version and lengths past
/// [`MAX_CAPSULE_BYTES`].
pub fn image_header(image: &[u8]) -> Result<ImageHeader> {
    if !is_image(image) {
        return Err(invalid("not a model image: bad magic"));
    }
    if image.len() < IMAGE_HEADER_BYTES {
        return Err(invalid(format!(
            "{} bytes, shorter than the {IMAGE_HEADER_BYTES}-byte header",
            image.len()
        )));
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&image[8..12]);
    let version = u32::from_le_bytes(version);
    if version != IMAGE_FORMAT_VERSION {
        return Err(invalid(format!(
            "model image format version {version}; this build reads version {IMAGE_FORMAT_VERSION}"
        )));
    }
    let header = ImageHeader {
        code_sha256: hex(&image[12..44]),
        code_len: u64_at(image, 44),
        payload_len: u64_at(image, 52),
    };
    if header.joined_len_bound() > MAX_CAPSULE_BYTES as u64 {
        return Err(Error::TooLarge {
            what: "the capsule this model image joins into",
            size: header.joined_len_bound(),
            limit: MAX_CAPSULE_BYTES as u64,
        });
    }
    Ok(header)
}

/// The decompressed payload of a model image: exactly the length its header declares, and
/// never more than that plus one byte decompressed.
fn payload(header: &ImageHeader, image: &[u8]) -> Result<Vec<u8>> {
    // Within MAX_CAPSULE_BYTES (checked by `image_header`), so this fits a usize.
    let payload_len = usize::try_from(header.payload_len)
        .map_err(|_| invalid("payload length does not fit this machine"))?;
    let mut payload = Vec::with_capacity(payload_len.min(64 << 20));
    GzDecoder::new(image.get(IMAGE_HEADER_BYTES..).unwrap_or_default())
        .take(header.payload_len.saturating_add(1))
        .read_to_end(&mut payload)
        .map_err(Error::Decompress)?;
    if payload.len() != payload_len {
        return Err(invalid(format!(
            "the payload decompresses to {}{} bytes; the header says {payload_len}",
            if payload.len() > payload_len {
                "more than "
            } else {
                ""
            },
            payload.len().min(payload_len),
        )));
    }
    Ok(payload)
}

/// What a model image puts into a fresh instance of its code module: the memory's initial
/// size and the active data segments, plus the manifest section. A runtime that keeps the
/// guest code compiled (a browser's `WebAssembly.Module`) instantiates the code, grows its
/// empty memory to [`Self::pages`] and writes the segments before any guest call, which is
/// what instantiating the joined capsule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageMemory {
    /// Initial memory size in 64 KiB pages.
    pub pages: u64,
    /// Active data segments: offset in memory and byte range in [`Self::data`]; each within
    /// `pages`.
    pub segments: Vec<(u32, Range<usize>)>,
    /// The segments' bytes, one after the other (one allocation for a snapshot's thousands
    /// of segments).
    pub data: Vec<u8>,
    /// The content of the `capsule.manifest` custom section.
    pub manifest: Vec<u8>,
    /// How many sections of the code module the image places (every one but its memory
    /// section, for an image cut from a capsule of that code).
    pub code_sections: usize,
    /// The sections the image holds itself, in file order.
    pub own_sections: Vec<OwnSection>,
}

impl ImageMemory {
    /// The segments: offset in memory, bytes.
    pub fn segments(&self) -> impl Iterator<Item = (u32, &[u8])> {
        self.segments
            .iter()
            .map(|(offset, range)| (*offset, &self.data[range.clone()]))
    }
}

/// A section a model image holds itself (memory, data, data count, custom sections).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnSection {
    /// The section id.
    pub id: u8,
    /// A custom section's name.
    pub custom_name: Option<String>,
    /// Length of its content in bytes.
    pub len: usize,
}

/// Reads a model image's memory and manifest without its code, with the checks the runtime
/// applies to a capsule's: exactly one unshared 32-bit memory, active data segments of memory
/// 0 at constant offsets (empty passive ones, which a snapshot leaves, are skipped) that lie
/// inside the initial memory, and exactly one manifest section. The image's bytes must have
/// passed their signed target first, and the code its header names must be the one used.
pub fn image_memory(image: &[u8]) -> Result<ImageMemory> {
    let header = image_header(image)?;
    let payload = payload(&header, image)?;
    let parts: Vec<Part<'_>> = crate::wire::decode_borrowed(&payload, "model image")?;
    let (mut pages, mut segments, mut manifest) = (None, Vec::new(), None);
    let mut data = Vec::new();
    let (mut code_sections, mut own_sections) = (0, Vec::new());
    for part in parts {
        let raw = match part {
            Part::Own(raw) => raw,
            Part::Code(_) => {
                code_sections += 1;
                continue;
            }
        };
        let [section] = sections_from(raw, 0)?
            .try_into()
            .map_err(|_| invalid("an image part that is not exactly one section"))?;
        let body = &raw[section.content.clone()];
        own_sections.push(OwnSection {
            id: section.id,
            custom_name: (section.id == 0)
                .then(|| custom_name(body).map(|n| String::from_utf8_lossy(n).into_owned()))
                .flatten(),
            len: body.len(),
        });
        let mut at = 0;
        let bad = |what: &str| invalid(format!("{what} in section {}", section.id));
        match section.id {
            5 => {
                let count = read_u32(body, &mut at).ok_or_else(|| bad("bad memory count"))?;
                let flags = body
                    .get(at)
                    .copied()
                    .ok_or_else(|| bad("no memory limits"))?;
                at += 1;
                // 0: a minimum; 1: a minimum and a maximum. Shared (2, 3) and 64-bit (4..)
                // memories are refused, as by the runtime.
                if count != 1 || flags > 1 || pages.is_some() {
                    return Err(invalid("a capsule has exactly one unshared 32-bit memory"));
                }
                pages = Some(u64::from(
                    read_u32(body, &mut at).ok_or_else(|| bad("bad memory size"))?,
                ));
            }
            11 => {
                let count = read_u32(body, &mut at).ok_or_else(|| bad("bad segment count"))?;
                for _ in 0..count {
                    let kind = read_u32(body, &mut at).ok_or_else(|| bad("bad segment"))?;
                    let offset = match kind {
                        0 => {
                            // i32.const <sleb128> end
                            if body.get(at) != Some(&0x41) {
                                return Err(invalid("data segment offsets must be constants"));
                            }
                            at += 1;
                            let value =
                                read_i32(body, &mut at).ok_or_else(|| bad("bad segment offset"))?;
                            if body.get(at) != Some(&0x0b) {
                                return Err(invalid("data segment offsets must be constants"));
                            }
                            at += 1;
                            Some(value as u32)
                        }
                        1 => None,
                        _ => {
                            return Err(invalid(
                                "only active data segments of memory 0 are allowed in a capsule",
                            ));
                        }
                    };
                    let len = read_u32(body, &mut at)
                        .and_then(|n| usize::try_from(n).ok())
                        .ok_or_else(|| bad("bad segment size"))?;
                    let end = at
                        .checked_add(len)
                        .filter(|end| *end <= body.len())
                        .ok_or_else(|| bad("a segment runs past the end"))?;
                    match offset {
                        Some(offset) => {
                            let start = data.len();
                            data.extend_from_slice(&body[at..end]);
                            segments.push((offset, start..data.len()));
                        }
                        None if len == 0 => {}
                        None => {
                            return Err(invalid(
                                "only active data segments of memory 0 are allowed in a capsule",
                            ));
                        }
                    }
                    at = end;
                }
            }
            0 if custom_name(body) == Some(crate::MANIFEST_SECTION.as_bytes()) => {
                if manifest.is_some() {
                    return Err(invalid("more than one capsule.manifest section"));
                }
                let name_len = crate::MANIFEST_SECTION.len();
                // The name's length prefix is one byte for this name.
                manifest = Some(body[1 + name_len..].to_vec());
            }
            _ => {}
        }
    }
    let pages = pages.ok_or_else(|| invalid("no memory"))?;
    let limit = pages.saturating_mul(65536);
    if segments
        .iter()
        .any(|(offset, range)| u64::from(*offset) + range.len() as u64 > limit)
    {
        return Err(invalid("a data segment lies outside the initial memory"));
    }
    let manifest = manifest.ok_or_else(|| invalid("no capsule.manifest section"))?;
    Ok(ImageMemory {
        pages,
        segments,
        data,
        manifest,
        code_sections,
        own_sections,
    })
}

/// Reads a signed LEB128 of at most 32 bits at `*at`, advancing it.
fn read_i32(bytes: &[u8], at: &mut usize) -> Option<i32> {
    let mut value: i64 = 0;
    let mut shift = 0;
    loop {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= i64::from(byte & 0x7f) << shift;
        shift += 7;
        if byte & 0x80 == 0 {
            if shift < 64 && byte & 0x40 != 0 {
                value |= -1i64 << shift;
            }
            return i32::try_from(value).ok();
        }
        if shift >= 35 {
            return None;
        }
    }
}

/// A code module and its SHA-256, hashed once: a node that installs every model of a guest
/// build joins each image with the same code, and hashing megabytes per install is most of an
/// install's cost.
#[derive(Debug, Clone)]
pub struct Code {
    bytes: Vec<u8>,
    sha256: String,
}

impl Code {
    /// Hashes the module.
    pub fn new(bytes: Vec<u8>) -> Code {
        let sha256 = sha256_hex(&bytes);
        Code { bytes, sha256 }
    }

    /// The module.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The module and its SHA-256 (lowercase hex), without copying the module.
    pub fn into_parts(self) -> (Vec<u8>, String) {
        (self.bytes, self.sha256)
    }

    /// Its SHA-256, lowercase hex.
    pub fn sha256(&self) -> &str {
        &self.sha256
    }
}

/// Puts a model image and its code module back together into the capsule file [`split`] cut.
///
/// The code must be the one the image names (length, then SHA-256), checked before anything is
/// decompressed; the payload must decompress to exactly the length the header declares; every
/// section the image names in the code must be there, under a header that frames it, and the
/// code must have no section the image does not place.
pub fn join(code: &[u8], image: &[u8]) -> Result<Vec<u8>> {
    let header = image_header(image)?;
    if code.len() as u64 != header.code_len {
        return Err(Error::CodeMismatch {
            expected: header.code_sha256,
            found: format!(
                "a code module of {} bytes, not {}",
                code.len(),
                header.code_len
            ),
        });
    }
    join_checked(code, &sha256_hex(code), header, image)
}

/// [`join`] with a code module hashed already.
pub fn join_code(code: &Code, image: &[u8]) -> Result<Vec<u8>> {
    join_checked(&code.bytes, &code.sha256, image_header(image)?, image)
}

fn join_checked(
    code: &[u8],
    code_sha256: &str,
    header: ImageHeader,
    image: &[u8],
) -> Result<Vec<u8>> {
    if code.len() as u64 != header.code_len || code_sha256 != header.code_sha256 {
        return Err(Error::CodeMismatch {
            expected: header.code_sha256,
            found: code_sha256.to_owned(),
        });
    }
    let payload = payload(&header, image)?;
    let parts: Vec<Part<'_>> = crate::wire::decode_borrowed(&payload, "model image")?;
    let code_sections = sections(code)?;
    let mut code_sections = code_sections.iter().filter(|s| s.id != 5);
    let mut out = Vec::with_capacity(usize::try_from(header.joined_len_bound()).unwrap_or(0));
    out.extend_from_slice(PREAMBLE);
    for part in parts {
        match part {
            Part::Own(section) => out.extend_from_slice(section),
            Part::Code(section_header) => {
                let Some(s) = code_sections.next() else {
                    return Err(invalid("it places more code sections than the code has"));
                };
                let mut at = 1;
                let framed = section_header.first() == Some(&s.id)
                    && read_u32(section_header, &mut at).and_then(|n| usize::try_from(n).ok())
                        == Some(s.content.len())
                    && at == section_header.len();
                if !framed {
                    return Err(invalid(format!(
                        "a section header that does not frame code section {} ({} bytes)",
                        s.id,
                        s.content.len()
                    )));
                }
                out.extend_from_slice(section_header);
                out.extend_from_slice(&code[s.content.clone()]);
            }
        }
    }
    if code_sections.next().is_some() {
        return Err(invalid("the code has sections the image does not place"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small module: type, function, memory, export, code, data and two custom sections
    /// (one written with a padded size, as some encoders do).
    fn module() -> Vec<u8> {
        let mut m = PREAMBLE.to_vec();
        push_section(&mut m, 1, &[1, 0x60, 0, 0]); // type: () -> ()
        push_section(&mut m, 3, &[1, 0]); // function 0: type 0
        push_section(&mut m, 5, &[1, 0, 2]); // memory: 2 pages
        push_section(&mut m, 7, &[1, 1, b'f', 0, 0]); // export "f" = func 0
        push_section(&mut m, 10, &[1, 2, 0, 0x0b]); // code: one empty body
        push_section(&mut m, 11, &[1, 0, 0x41, 8, 0x0b, 3, 7, 8, 9]); // data at 8: 7 8 9
        // A custom section "x" with a padded (non-minimal) size: 0x83 0x80 0x80 0x80 0x00 = 3.
        m.extend_from_slice(&[0, 0x83, 0x80, 0x80, 0x80, 0x00, 1, b'x', 42]);
        let mut name = vec![4];
        name.extend_from_slice(b"name");
        push_section(&mut m, 0, &name);
        let mut manifest = vec![crate::MANIFEST_SECTION.len() as u8];
        manifest.extend_from_slice(crate::MANIFEST_SECTION.as_bytes());
        manifest.extend_from_slice(b"CAPM...");
        push_section(&mut m, 0, &manifest);
        m
    }

    /// What a runtime that keeps the code compiled needs from an image: the memory size, the
    /// segments and the manifest, read without the code.
    #[test]
    fn an_image_gives_its_memory_without_the_code() {
        let s = split(&module()).unwrap();
        let memory = image_memory(&s.image).unwrap();
        assert_eq!(
            memory,
            ImageMemory {
                pages: 2,
                segments: vec![(8, 0..3)],
                data: vec![7, 8, 9],
                manifest: b"CAPM...".to_vec(),
                // type, function, export, code, name
                code_sections: 5,
                own_sections: vec![
                    OwnSection {
                        id: 5,
                        custom_name: None,
                        len: 3
                    },
                    OwnSection {
                        id: 11,
                        custom_name: None,
                        len: 9
                    },
                    OwnSection {
                        id: 0,
                        custom_name: Some("x".into()),
                        len: 3
                    },
                    OwnSection {
                        id: 0,
                        custom_name: Some(crate::MANIFEST_SECTION.into()),
                        len: 1 + crate::MANIFEST_SECTION.len() + 7
                    },
                ],
            }
        );
        assert_eq!(memory.segments().collect::<Vec<_>>(), [(8, &[7, 8, 9][..])]);
        // A segment past the initial memory, a shared memory, a segment offset that is not a
        // constant: refused as the runtime refuses them.
        let with_section = |id: u8, content: &[u8]| {
            let mut m = module();
            let old = sections(&m)
                .unwrap()
                .into_iter()
                .find(|x| x.id == id)
                .unwrap();
            let mut replaced = m[..old.header.start].to_vec();
            push_section(&mut replaced, id, content);
            replaced.extend_from_slice(&m[old.content.end..]);
            m = replaced;
            split(&m).unwrap().image
        };
        for (id, content) in [
            (11u8, vec![1, 0, 0x41, 0x80, 0x80, 0x08, 0x0b, 1, 9]), // at 131072: past 2 pages
            (5, vec![1, 3, 1, 1]),                                  // shared
            (11, vec![1, 0, 0x23, 0, 0x0b, 1, 9]),                  // global.get offset
            (11, vec![1, 2, 0, 0x41, 0, 0x0b, 1, 9]),               // another memory
        ] {
            assert!(
                matches!(
                    image_memory(&with_section(id, &content)),
                    Err(Error::InvalidImage { .. })
                ),
                "{id} {content:?}"
            );
        }
    }

    #[test]
    fn join_of_split_is_the_capsule_byte_for_byte() {
        let capsule = module();
        let split = split(&capsule).unwrap();
        assert_eq!(split.code, code_module(&capsule).unwrap());
        assert_eq!(split.code_sha256, sha256_hex(&split.code));
        assert_eq!(join(&split.code, &split.image).unwrap(), capsule);
        // Deterministic: what `capsule sign` hashes is what `capsule push` uploads.
        assert_eq!(super::split(&capsule).unwrap().image, split.image);
        // The code keeps the guest's sections and `name`, with an empty memory; no data.
        let ids: Vec<u8> = sections(&split.code)
            .unwrap()
            .iter()
            .map(|s| s.id)
            .collect();
        assert_eq!(ids, [1, 3, 5, 7, 10, 0]);
        let header = image_header(&split.image).unwrap();
        assert_eq!(header.code_sha256, split.code_sha256);
        assert_eq!(header.code_len, split.code.len() as u64);
    }

    #[test]
    fn a_code_hashed_once_joins_like_its_bytes() {
        let capsule = module();
        let s = split(&capsule).unwrap();
        let code = Code::new(s.code.clone());
        assert_eq!(code.sha256(), s.code_sha256);
        assert_eq!(join_code(&code, &s.image).unwrap(), capsule);
        let mut other = s.code.clone();
        *other.last_mut().unwrap() ^= 1;
        assert!(matches!(
            join_code(&Code::new(other), &s.image),
            Err(Error::CodeMismatch { .. })
        ));
    }

    #[test]
    fn two_capsules_of_one_build_share_their_code() {
        let a = module();
        let mut b = module();
        // Another model: other data bytes, same code.
        let data = sections(&b)
            .unwrap()
            .into_iter()
            .find(|s| s.id == 11)
            .unwrap();
        b[data.content.end - 1] = 99;
        let (sa, sb) = (split(&a).unwrap(), split(&b).unwrap());
        assert_eq!(sa.code_sha256, sb.code_sha256);
        assert_ne!(sa.image, sb.image);
        assert_eq!(join(&sa.code, &sb.image).unwrap(), b);
    }

    #[test]
    fn other_code_is_refused_before_decompressing() {
        let s = split(&module()).unwrap();
        let mut other = s.code.clone();
        *other.last_mut().unwrap() ^= 1;
        assert!(matches!(
            join(&other, &s.image),
            Err(Error::CodeMismatch { .. })
        ));
        assert!(matches!(
            join(&s.code[1..], &s.image),
            Err(Error::CodeMismatch { .. })
        ));
        // The same refusal with a payload that is not even gzip: nothing was decompressed.
        let mut garbage = s.image[..IMAGE_HEADER_BYTES].to_vec();
        garbage.extend_from_slice(b"not gzip");
        assert!(matches!(
            join(&other, &garbage),
            Err(Error::CodeMismatch { .. })
        ));
        assert!(matches!(join(&s.code, &garbage), Err(Error::Decompress(_))));
    }

    #[test]
    fn headers_past_the_bounds_are_refused() {
        let s = split(&module()).unwrap();
        let with = |at: usize, bytes: &[u8]| {
            let mut image = s.image.clone();
            image[at..at + bytes.len()].copy_from_slice(bytes);
            image
        };
        // Lengths that would join into more than MAX_CAPSULE_BYTES, or overflow.
        for (at, value) in [
            (44, 1u64 << 30),
            (52, 1 << 30),
            (52, u64::MAX),
            (44, u64::MAX),
        ] {
            assert!(
                matches!(
                    image_header(&with(at, &value.to_le_bytes())),
                    Err(Error::TooLarge { .. })
                ),
                "{at} {value}"
            );
        }
        assert!(image_header(&with(8, &2u32.to_le_bytes())).is_err());
        assert!(image_header(&with(0, b"CAPSIMX")).is_err());
        assert!(image_header(&s.image[..IMAGE_HEADER_BYTES - 1]).is_err());
        assert!(!is_image(&module()));
    }

    /// A payload that decompresses to more (a bomb) or less than its header declares.
    #[test]
    fn payload_lengths_must_match_the_header() {
        let s = split(&module()).unwrap();
        let declared = image_header(&s.image).unwrap().payload_len;
        for wrong in [declared - 1, declared + 1, 0] {
            let mut image = s.image.clone();
            image[52..60].copy_from_slice(&wrong.to_le_bytes());
            assert!(
                matches!(join(&s.code, &image), Err(Error::InvalidImage { .. })),
                "{wrong}"
            );
        }
        // 64 MiB of zeros behind a header that declares 1 KiB: refused after 1 KiB + 1.
        let mut bomb = s.image[..IMAGE_HEADER_BYTES].to_vec();
        bomb[52..60].copy_from_slice(&1024u64.to_le_bytes());
        let mut gz = GzEncoder::new(bomb, Compression::best());
        gz.write_all(&vec![0u8; 64 << 20]).unwrap();
        let bomb = gz.finish().unwrap();
        assert!(bomb.len() < 1 << 20);
        assert!(matches!(
            join(&s.code, &bomb),
            Err(Error::InvalidImage { .. })
        ));
    }

    fn image_with(code: &[u8], parts: &[Part<'_>]) -> Vec<u8> {
        let payload = crate::wire::encode(parts, "model image").unwrap();
        let mut image = IMAGE_MAGIC.to_vec();
        image.extend_from_slice(&IMAGE_FORMAT_VERSION.to_le_bytes());
        image.extend_from_slice(&Sha256::digest(code));
        image.extend_from_slice(&(code.len() as u64).to_le_bytes());
        image.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let mut gz = GzEncoder::new(image, Compression::fast());
        gz.write_all(&payload).unwrap();
        gz.finish().unwrap()
    }

    /// Images whose parts do not fit the code: more code sections than there are, fewer, a
    /// header with the wrong id or size.
    #[test]
    fn parts_that_do_not_fit_the_code_are_refused() {
        let s = split(&module()).unwrap();
        let code = &s.code;
        let code_headers: Vec<&[u8]> = sections(code)
            .unwrap()
            .iter()
            .filter(|s| s.id != 5)
            .map(|s| &code[s.header.clone()])
            .collect();
        let all: Vec<Part<'_>> = code_headers.iter().map(|h| Part::Code(h)).collect();
        assert!(join(code, &image_with(code, &all)).is_ok());
        let too_many: Vec<Part<'_>> = code_headers
            .iter()
            .chain(code_headers.iter())
            .map(|h| Part::Code(h))
            .collect();
        let too_few: Vec<Part<'_>> = code_headers[1..].iter().map(|h| Part::Code(h)).collect();
        let wrong_id = [0x02u8, 4];
        let mut wrong: Vec<Part<'_>> = vec![Part::Code(&wrong_id)];
        wrong.extend(code_headers[1..].iter().map(|h| Part::Code(h)));
        let long = [1u8, 4, 0];
        let mut trailing: Vec<Part<'_>> = vec![Part::Code(&long)];
        trailing.extend(code_headers[1..].iter().map(|h| Part::Code(h)));
        for parts in [too_many, too_few, wrong, trailing] {
            assert!(
                matches!(
                    join(code, &image_with(code, &parts)),
                    Err(Error::InvalidImage { .. })
                ),
                "{parts:?}"
            );
        }
    }

    #[test]
    fn malformed_framing_is_refused() {
        let capsule = module();
        assert!(split(&capsule[..capsule.len() - 1]).is_err());
        assert!(split(&capsule[1..]).is_err());
        let mut bad_size = PREAMBLE.to_vec();
        bad_size.extend_from_slice(&[1, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert!(split(&bad_size).is_err());
        // Only a preamble: a module with no sections splits and joins.
        let s = split(PREAMBLE).unwrap();
        assert_eq!(join(&s.code, &s.image).unwrap(), PREAMBLE);
    }
}
