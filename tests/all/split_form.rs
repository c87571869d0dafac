//! The split form of a capsule (`capsule_format::split`): the code module every capsule of one
//! guest build shares, and a model image per capsule. `tests/all/malformed_capsules.rs` runs
//! every malformed case through both forms.

use capsule_format::split;
use capsule_runtime::{CapsuleImage, GuestCode, LoadedCapsule, RunConfig, golden as compare};
use capsule_tests::{FIXTURE_MODELS, engine, fixture_capsule, golden};

/// Every fixture: `join(split(x))` is `x` byte for byte; the code module is the one the
/// runtime compiles (same hash) and the same for every fixture; the image is a small part of
/// the file; the split form installs and answers its golden samples.
#[test]
fn every_fixture_splits_and_joins_byte_for_byte() -> anyhow::Result<()> {
    let engine = engine();
    let mut code_hashes = Vec::new();
    for name in FIXTURE_MODELS {
        let built = fixture_capsule(name)?;
        let parts = split::split(&built.bytes)?;
        assert_eq!(
            split::join(&parts.code, &parts.image)?,
            built.bytes,
            "{name}"
        );
        let whole = CapsuleImage::parse(built.bytes.clone())?;
        assert_eq!(parts.code.as_slice(), &*whole.code, "{name}");
        assert_eq!(parts.code_sha256, whole.code_sha256, "{name}");
        let header = split::image_header(&parts.image)?;
        assert_eq!(header.code_sha256, whole.code_sha256, "{name}");
        assert!(
            parts.image.len() * 5 < built.bytes.len(),
            "{name}: image {} of {} bytes",
            parts.image.len(),
            built.bytes.len()
        );
        let image = CapsuleImage::parse_split(&parts.code, &parts.image)?;
        assert_eq!(image.sha256, whole.sha256, "{name}");
        // A node's path: the code checked once, the image read without joining; its identity
        // is the image file's hash (what the image's signed target names).
        let code = GuestCode::check(split::Code::new(parts.code.clone()))?;
        let unjoined = CapsuleImage::parse_image(&code, &parts.image)?;
        assert_eq!(unjoined.sha256, split::sha256_hex(&parts.image), "{name}");
        assert_eq!(unjoined.size(), parts.image.len(), "{name}");
        assert!(
            unjoined.segments().eq(whole.segments()),
            "{name}: the memory image"
        );
        assert_eq!(unjoined.manifest, whole.manifest, "{name}");
        let mut names: Vec<_> = unjoined.sections.iter().map(|(n, _)| n.clone()).collect();
        let mut whole_names: Vec<_> = whole.sections.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        whole_names.sort();
        // The code module's own (empty) memory section is the one more.
        whole_names.push("memory".to_owned());
        whole_names.sort();
        assert_eq!(names, whole_names, "{name}");
        // Without the code, the image gives what the runtime puts into a fresh instance.
        let memory = split::image_memory(&parts.image)?;
        assert_eq!(memory.pages, whole.memory_pages, "{name}");
        let segments: Vec<(u32, &[u8])> = whole.segments().collect();
        assert_eq!(memory.segments().collect::<Vec<_>>(), segments, "{name}");
        assert_eq!(
            capsule_format::CapsuleManifest::from_section_bytes(&memory.manifest)?,
            whole.manifest,
            "{name}"
        );
        let capsule = LoadedCapsule::install(&engine, image, RunConfig::default())?;
        for sample in golden(name)? {
            let outputs = capsule.infer(&sample.inputs)?;
            compare::compare(&sample.outputs, &outputs, sample.tolerance)
                .map_err(|e| anyhow::anyhow!("{name}/{}: {e}", sample.name))?;
        }
        code_hashes.push(parts.code_sha256);
    }
    code_hashes.dedup();
    assert_eq!(code_hashes.len(), 1, "one guest build, one code module");
    Ok(())
}

/// An image joined with another capsule's code of another build is refused before anything
/// is decompressed; with a code module of the same build it joins (that is the point).
#[test]
fn an_image_joins_only_the_code_it_names() -> anyhow::Result<()> {
    let a = split::split(&fixture_capsule("digits_mlp")?.bytes)?;
    let b = split::split(&fixture_capsule("mnist_cnn")?.bytes)?;
    assert_eq!(a.code, b.code);
    assert_eq!(
        split::join(&b.code, &a.image)?,
        fixture_capsule("digits_mlp")?.bytes
    );
    let mut other = a.code.clone();
    let last = other.len() - 1;
    other[last] ^= 0x01;
    match CapsuleImage::parse_split(&other, &a.image) {
        Err(capsule_runtime::Error::Manifest(capsule_format::Error::CodeMismatch {
            expected,
            found,
        })) => {
            assert_eq!(expected, a.code_sha256);
            assert_eq!(found, split::sha256_hex(&other));
        }
        other => panic!("expected CodeMismatch, got {other:?}"),
    }
    // The same refusal without joining.
    let other = GuestCode::check(split::Code::new(other))?;
    match CapsuleImage::parse_image(&other, &a.image) {
        Err(capsule_runtime::Error::Manifest(capsule_format::Error::CodeMismatch {
            expected,
            ..
        })) => assert_eq!(expected, a.code_sha256),
        other => panic!("expected CodeMismatch, got {other:?}"),
    }
    Ok(())
}
