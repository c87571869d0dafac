//! Malformed capsules are refused with typed errors, and the process goes on.

use capsule_format::CapsuleManifest;
use capsule_runtime::{CapsuleImage, Error, GuestCode, LoadedCapsule, RunConfig};
use capsule_tests::{engine, fixture_capsule};

/// Loads a capsule from its single file, and checks that its split form (code module and
/// model image, `capsule_format::split`) is refused or accepted alike: with the same error, or
/// by the split itself when the file's section framing is broken.
fn load(bytes: Vec<u8>) -> Result<LoadedCapsule, Error> {
    both_forms_agree(&bytes);
    LoadedCapsule::load(&engine(), bytes, RunConfig::default())
}

///
/// A node reads the split form without joining (`CapsuleImage::parse_image`, the code checked
/// once as a `GuestCode`): that path refuses what the single file's refuses (its messages may
/// name the image's part instead) and reads the same memory, manifest and exports from what
/// it accepts.
fn both_forms_agree(bytes: &[u8]) {
    if let Ok(split) = capsule_format::split::split(bytes) {
        let whole = CapsuleImage::parse(bytes.to_vec());
        match (&whole, CapsuleImage::parse_split(&split.code, &split.image)) {
            (Ok(whole), Ok(parts)) => assert_eq!(parts.bytes(), whole.bytes()),
            (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
            (a, b) => panic!(
                "the two forms disagree: single file {:?}, split {:?}",
                a.as_ref().err(),
                b.err()
            ),
        }
        let image = GuestCode::check(capsule_format::split::Code::new(split.code.clone()))
            .and_then(|code| CapsuleImage::parse_image(&code, &split.image));
        match (whole, image) {
            (Ok(whole), Ok(image)) => {
                assert!(
                    image.segments().eq(whole.segments()),
                    "the same memory image"
                );
                assert_eq!(image.memory_pages, whole.memory_pages);
                assert_eq!(image.manifest, whole.manifest);
                assert_eq!(image.exports, whole.exports);
                assert_eq!(image.imports, whole.imports);
                assert!(*image.code == *whole.code, "the same code module");
            }
            (Err(_), Err(_)) => {}
            (a, b) => panic!(
                "the single file and the unjoined image disagree: single file {:?}, image {:?}",
                a.err(),
                b.err()
            ),
        }
    }
}

fn message(e: Error) -> String {
    e.to_string()
}

#[test]
fn truncated_capsules_are_invalid() -> anyhow::Result<()> {
    let good = fixture_capsule("digits_logreg")?.bytes.clone();
    for cut in [0, 4, 8, 9, 100, good.len() / 2, good.len() - 1] {
        match load(good[..cut].to_vec()) {
            // Just the 8-byte header is a valid, empty module.
            Err(Error::InvalidCapsule(m)) if cut == 8 => assert_eq!(m, "missing export \"memory\""),
            Err(Error::InvalidCapsule(m)) => {
                assert!(
                    m.starts_with("not a valid WebAssembly module"),
                    "cut {cut}: {m}"
                )
            }
            other => panic!("cut at {cut}: expected InvalidCapsule, got {other:?}"),
        }
    }
    Ok(())
}

/// Byte ranges of the sections with this id.
fn section_ranges(bytes: &[u8], id: u8) -> Vec<std::ops::Range<usize>> {
    wasmparser_payloads(bytes)
        .into_iter()
        .filter(|(i, _, _)| *i == id)
        .map(|(_, r, _)| r)
        .collect()
}

#[test]
fn flipped_bytes_never_crash_the_host() -> anyhow::Result<()> {
    let good = fixture_capsule("digits_logreg")?.bytes.clone();
    // About 300 bytes spread over each of the header, the data segments (the memory image)
    // and the manifest.
    // A change anywhere else (types, exports, code, ...) is a different guest build, which
    // wasmtime validates when it compiles it (a full Cranelift compile each): the
    // truncation test covers those sections.
    let mut positions: Vec<usize> = (0..8).collect();
    for range in section_ranges(&good, 11)
        .into_iter()
        .chain(section_ranges(&good, 0))
    {
        let step = (range.len() / 300).max(1);
        positions.extend(range.step_by(step));
    }
    let sample = capsule_tests::golden("digits_logreg")?.remove(0);
    let mut refused = 0;
    for i in positions {
        let mut bad = good.clone();
        bad[i] ^= 0xff;
        // The split form of every tenth case too (each costs a split, a gzip and three
        // hashes of the 10 MB code).
        if i % 10 == 0 {
            both_forms_agree(&bad);
        }
        // Any outcome but a crash is acceptable: a flip inside a data segment may still load
        // (and compute garbage); a flip in a structure must give a typed error.
        match LoadedCapsule::load(&engine(), bad, RunConfig::default()) {
            Ok(c) => match c.infer(&sample.inputs) {
                Ok(_) | Err(Error::Guest(_) | Error::Trap { .. } | Error::Abi(_)) => {}
                Err(other) => panic!("byte {i}: unexpected inference error {other:?}"),
            },
            Err(
                Error::InvalidCapsule(_)
                | Error::Manifest(_)
                | Error::Trap { .. }
                | Error::Wasmtime(_),
            ) => refused += 1,
            Err(other) => panic!("byte {i}: unexpected error kind {other:?}"),
        }
    }
    assert!(refused > 0);
    Ok(())
}

fn replace_manifest(
    bytes: &[u8],
    edit: impl FnOnce(&mut CapsuleManifest),
) -> anyhow::Result<Vec<u8>> {
    let image = CapsuleImage::parse(bytes.to_vec())?;
    let mut manifest = image.manifest.clone();
    edit(&mut manifest);
    let stripped = strip_manifest(bytes);
    let mut out = stripped;
    wasm_encoder::Section::append_to(
        &wasm_encoder::CustomSection {
            name: "capsule.manifest".into(),
            data: manifest.to_section_bytes()?.into(),
        },
        &mut out,
    );
    Ok(out)
}

/// The capsule without its manifest section (it is the last section the builder writes).
fn strip_manifest(bytes: &[u8]) -> Vec<u8> {
    let mut out = b"\0asm\x01\0\0\0".to_vec();
    for payload in wasmparser_payloads(bytes) {
        let (id, range, is_manifest) = payload;
        if is_manifest {
            continue;
        }
        let mut header = vec![id];
        let mut len = range.len() as u64;
        loop {
            let b = (len & 0x7f) as u8;
            len >>= 7;
            header.push(if len == 0 { b } else { b | 0x80 });
            if len == 0 {
                break;
            }
        }
        out.extend_from_slice(&header);
        out.extend_from_slice(&bytes[range]);
    }
    out
}

fn wasmparser_payloads(bytes: &[u8]) -> Vec<(u8, std::ops::Range<usize>, bool)> {
    let mut out = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes).flatten() {
        if let Some((id, range)) = payload.as_section() {
            let is_manifest = matches!(&payload, wasmparser::Payload::CustomSection(c) if c.name() == "capsule.manifest");
            out.push((id, range, is_manifest));
        }
    }
    out
}

#[test]
fn missing_manifest_is_refused() -> anyhow::Result<()> {
    let good = fixture_capsule("digits_logreg")?.bytes.clone();
    let bad = strip_manifest(&good);
    assert_eq!(
        message(load(bad).unwrap_err()),
        "invalid capsule: no capsule.manifest section (not built by `capsule build`?)"
    );
    Ok(())
}

#[test]
fn wrong_abi_version_is_refused() -> anyhow::Result<()> {
    let good = fixture_capsule("digits_logreg")?.bytes.clone();
    let bad = replace_manifest(&good, |m| m.abi_version = 2)?;
    assert_eq!(
        message(load(bad).unwrap_err()),
        "invalid capsule: manifest declares guest ABI version 2, this runtime implements version 1"
    );
    Ok(())
}

#[test]
fn garbage_manifest_is_refused() -> anyhow::Result<()> {
    let good = fixture_capsule("digits_logreg")?.bytes.clone();
    let mut bad = strip_manifest(&good);
    wasm_encoder::Section::append_to(
        &wasm_encoder::CustomSection {
            name: "capsule.manifest".into(),
            data: b"CAPM\x03\0\0\0\xff\xff\xff".as_slice().into(),
        },
        &mut bad,
    );
    assert!(matches!(
        load(bad),
        Err(Error::Manifest(capsule_format::Error::Decode {
            what: "manifest",
            ..
        }))
    ));
    Ok(())
}

#[test]
fn a_module_with_imports_is_refused() -> anyhow::Result<()> {
    let mut wasm = wat::parse_str(
        r#"(module (import "env" "clock" (func)) (memory (export "memory") 1)
            (func (export "capsule_abi_version") (result i32) i32.const 1))"#,
    )?;
    let manifest = fixture_capsule("digits_logreg")?
        .manifest
        .to_section_bytes()?;
    wasm_encoder::Section::append_to(
        &wasm_encoder::CustomSection {
            name: "capsule.manifest".into(),
            data: manifest.into(),
        },
        &mut wasm,
    );
    assert_eq!(
        message(load(wasm).unwrap_err()),
        "invalid capsule: it imports \"env\"::\"clock\"; a capsule imports nothing but the host \
         kernels (capsule_kernels::[\"abi_version\", \"f32_mmm_8x8\", \"f32_mmm_block\"])"
    );
    Ok(())
}

/// The host kernels are the only import, and the manifest must say which version the code
/// uses: a capsule whose code imports them under a manifest that declares none (or the
/// reverse), or imports a function its version lacks, is refused, and so is any other
/// function of that module.
#[test]
fn host_kernel_imports_must_match_the_manifest() -> anyhow::Result<()> {
    let module = |import: &str| {
        let signature = if import == "f32_mmm_block" {
            "(param i32)"
        } else {
            "(result i32)"
        };
        wat::parse_str(format!(
            r#"(module (import "capsule_kernels" "{import}" (func {signature}))
                (memory (export "memory") 1)
                (func (export "capsule_abi_version") (result i32) i32.const 1)
                (func (export "capsule_init") (result i32) i32.const 0)
                (func (export "capsule_alloc") (param i32 i32) (result i32) i32.const 0)
                (func (export "capsule_free") (param i32 i32 i32))
                (func (export "capsule_infer") (param i32 i32) (result i64) i64.const 0))"#
        ))
    };
    let with_manifest = |mut wasm: Vec<u8>, host_kernels| -> anyhow::Result<Vec<u8>> {
        let mut manifest = fixture_capsule("digits_logreg")?.manifest.clone();
        manifest.host_kernels = host_kernels;
        wasm_encoder::Section::append_to(
            &wasm_encoder::CustomSection {
                name: "capsule.manifest".into(),
                data: manifest.to_section_bytes()?.into(),
            },
            &mut wasm,
        );
        Ok(wasm)
    };
    use capsule_format::HostKernels;
    assert!(load(with_manifest(module("abi_version")?, HostKernels::V1)?).is_ok());
    assert_eq!(
        message(load(with_manifest(module("abi_version")?, HostKernels::None)?).unwrap_err()),
        "invalid capsule: it imports \"capsule_kernels::abi_version\" but its manifest declares \
         no host kernels"
    );
    // Version 2's block product under a manifest of version 1, which lacks it.
    assert!(load(with_manifest(module("f32_mmm_block")?, HostKernels::V2)?).is_ok());
    assert_eq!(
        message(load(with_manifest(module("f32_mmm_block")?, HostKernels::V1)?).unwrap_err()),
        "invalid capsule: it imports \"capsule_kernels::f32_mmm_block\", which its manifest's \
         host kernels (capsule_kernels v1) lack"
    );
    let no_imports = wat::parse_str(
        r#"(module (memory (export "memory") 1)
            (func (export "capsule_abi_version") (result i32) i32.const 1)
            (func (export "capsule_init") (result i32) i32.const 0)
            (func (export "capsule_alloc") (param i32 i32) (result i32) i32.const 0)
            (func (export "capsule_free") (param i32 i32 i32))
            (func (export "capsule_infer") (param i32 i32) (result i64) i64.const 0))"#,
    )?;
    assert_eq!(
        message(load(with_manifest(no_imports, HostKernels::V1)?).unwrap_err()),
        "invalid capsule: its manifest declares host kernels but the code imports none"
    );
    assert!(
        message(load(with_manifest(module("read_host_memory")?, HostKernels::V1)?).unwrap_err())
            .contains("a capsule imports nothing but the host kernels")
    );
    Ok(())
}
