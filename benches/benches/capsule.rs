//! Capsule benches, each side by side with its baseline in the same run (the machine is
//! shared and noisy: only same-run ratios mean anything).
//!
//! `cargo bench -p capsule-benches` (release host, `guest-release` fat-LTO guest).
//!
//! - `infer/<model>/{capsule,native}`: warm inference, capsule under wasmtime vs the same
//!   `capsule-model` code natively.
//! - `cold_start/<model>/{snapshot,no_snapshot}`: fresh instance to first output, with the
//!   pre-initialized snapshot vs loading the model in a fresh guest first.
//! - `engine/{compile,cached_load}`: Cranelift compile of the guest code vs loading it from
//!   the disk cache.
//! - `install/second_capsule_cnn[_image]`: installing a capsule of an already compiled guest
//!   build, from the single file or from a model image joined with its code (hashed once).
//! - `preprocess/<kind>/{capsule,native,capsule_call}`: the pipeline's preprocessing inside
//!   a capsule (an Identity model, so the output is the preprocessed input) vs the same
//!   `capsule-pipeline` code natively; `capsule_call` is the same capsule called with the
//!   already preprocessed tensor and no pipeline: the cost of the call itself.

use std::hint::black_box;
use std::time::Duration;

use capsule_model::LoadedModel;
use capsule_runtime::{CapsuleEngine, CapsuleImage, EngineConfig, LoadedCapsule, RunConfig};
use capsule_tests::{FIXTURE_MODELS, builder, fixture_capsule, model_bytes};
use criterion::{Criterion, criterion_main};

fn or_die<T, E: std::fmt::Display>(r: Result<T, E>, what: &str) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

fn infer(c: &mut Criterion) {
    for name in FIXTURE_MODELS {
        let built = or_die(fixture_capsule(name), name);
        let capsule = &built.capsule;
        let inputs = built.manifest.golden[0].inputs.clone();
        let shapes = built.manifest.input_shapes();
        let mut native = or_die(
            LoadedModel::load(&or_die(model_bytes(name), name), &shapes),
            name,
        );
        let views = capsule_format::wire::views(&inputs);
        let mut group = c.benchmark_group(format!("infer/{name}"));
        group.bench_function("capsule", |b| {
            b.iter(|| black_box(or_die(capsule.infer(black_box(&inputs)), name)))
        });
        group.bench_function("native", |b| {
            b.iter(|| black_box(or_die(native.run(black_box(&views)), name)))
        });
        group.finish();
    }
}

fn cold_start(c: &mut Criterion) {
    for name in ["digits_mlp", "mnist_cnn"] {
        let built = or_die(fixture_capsule(name), name);
        let inputs = built.manifest.golden[0].inputs.clone();
        let model = or_die(model_bytes(name), name);
        let mut group = c.benchmark_group(format!("cold_start/{name}"));
        group.bench_function("snapshot", |b| {
            b.iter(|| black_box(or_die(built.capsule.cold_start(&inputs), name)))
        });
        group.bench_function("no_snapshot", |b| {
            b.iter(|| {
                black_box(or_die(
                    builder().cold_start_without_snapshot(&model, &[], &inputs),
                    name,
                ))
            })
        });
        group.finish();
    }
}

fn engine_costs(c: &mut Criterion) {
    let built = or_die(fixture_capsule("mnist_cnn"), "cnn");
    let image = or_die(CapsuleImage::parse(built.bytes.clone()), "parse");
    let cache = or_die(tempfile::tempdir(), "tempdir");
    let config = EngineConfig {
        cache_dir: Some(cache.path().to_owned()),
        ..EngineConfig::default()
    };
    let mut group = c.benchmark_group("engine");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(60));
    group.bench_function("compile", |b| {
        b.iter(|| {
            let engine = or_die(
                CapsuleEngine::new(EngineConfig {
                    cache_dir: None,
                    ..config.clone()
                }),
                "engine",
            );
            black_box(or_die(engine.module(&image.code), "compile"))
        })
    });
    let warm = or_die(CapsuleEngine::new(config.clone()), "engine");
    or_die(warm.module(&image.code), "compile");
    group.bench_function("cached_load", |b| {
        b.iter(|| {
            let engine = or_die(CapsuleEngine::new(config.clone()), "engine");
            black_box(or_die(engine.module(&image.code), "load"))
        })
    });
    group.finish();

    let mlp = or_die(fixture_capsule("digits_mlp"), "mlp");
    let engine = or_die(CapsuleEngine::new(config), "engine");
    or_die(
        LoadedCapsule::load(&engine, mlp.bytes.clone(), RunConfig::default()),
        "first capsule",
    );
    let compiled = engine.compilations();
    let mut group = c.benchmark_group("install");
    group.bench_function("second_capsule_cnn", |b| {
        b.iter(|| {
            black_box(or_die(
                LoadedCapsule::load(&engine, built.bytes.clone(), RunConfig::default()),
                "install",
            ))
        })
    });
    // The same capsule as a model image with its code module checked already (a node's
    // loader keeps a guest build's code so): what a node does per model update.
    let parts = or_die(capsule_format::split::split(&built.bytes), "split");
    let code = or_die(
        capsule_runtime::GuestCode::check(capsule_format::split::Code::new(parts.code.clone())),
        "check code",
    );
    group.bench_function("second_capsule_cnn_image", |b| {
        b.iter(|| {
            let image = or_die(
                CapsuleImage::parse_image(&code, &parts.image),
                "parse image",
            );
            black_box(or_die(
                LoadedCapsule::install(&engine, image, RunConfig::default()),
                "install",
            ))
        })
    });
    group.finish();
    assert_eq!(
        engine.compilations(),
        compiled,
        "installing a capsule of a compiled guest build compiled code"
    );
}

/// One preprocessing case: the identity model, its spec, the raw request.
fn preprocess_case(
    c: &mut Criterion,
    kind: &str,
    model: &std::path::Path,
    pipeline: capsule_format::Pipeline,
    raw: Vec<capsule_format::NamedTensor>,
) {
    let built = or_die(
        capsule_tests::pipeline_capsule(kind, model, pipeline.clone(), Vec::new()),
        kind,
    );
    let plain = or_die(
        builder().build(capsule_runtime::BuildOptions {
            name: format!("{kind}-plain"),
            pipeline: None,
            reference: None,
            one_row_plan: Default::default(),
            golden: Vec::new(),
            model: or_die(std::fs::read(model), kind),
            ..or_die(capsule_tests::options("digits_mlp"), kind)
        }),
        kind,
    );
    let native = or_die(
        capsule_pipeline::CompiledPipeline::new(
            &pipeline,
            &built.manifest.model_inputs,
            &built.manifest.model_outputs,
            &[],
        ),
        kind,
    );
    let views = capsule_format::wire::views(&raw);
    let prepared = or_die(native.preprocess(&views), kind);
    let mut group = c.benchmark_group(format!("preprocess/{kind}"));
    group.bench_function("capsule", |b| {
        b.iter(|| black_box(or_die(built.capsule.infer(black_box(&raw)), kind)))
    });
    group.bench_function("native", |b| {
        b.iter(|| black_box(or_die(native.preprocess(black_box(&views)), kind)))
    });
    group.bench_function("capsule_call", |b| {
        b.iter(|| black_box(or_die(plain.capsule.infer(black_box(&prepared)), kind)))
    });
    group.finish();
}

fn bytes(name: &str, items: &[&[u8]]) -> Vec<capsule_format::NamedTensor> {
    vec![capsule_format::NamedTensor {
        name: name.into(),
        tensor: or_die(
            capsule_format::Tensor::from_byte_strings(vec![items.len() as u64], items),
            name,
        ),
    }]
}

fn preprocess(c: &mut Criterion) {
    let root = capsule_tests::repo_dir();
    let fixtures = root.join("tests/fixtures/pipeline");
    let read = |p: std::path::PathBuf| or_die(std::fs::read(&p), &p.display().to_string());

    // One 56x56 RGB PNG to 28x28 gray (decode, luma, bilinear resize, normalize).
    let mnist = or_die(
        capsule_runtime::spec::read_pipeline(&root.join("examples/mnist-png/pipeline.toml")),
        "spec",
    );
    let image_spec = capsule_format::Pipeline {
        inputs: vec![capsule_format::pipeline::RawInput {
            feeds: Some("x".into()),
            ..mnist.inputs[0].clone()
        }],
        outputs: Vec::new(),
    };
    let png = read(root.join("examples/mnist-png/samples/digit1_0.png"));
    preprocess_case(
        c,
        "image_png_56_to_28",
        &fixtures.join("identity/image_mnist_gray_bilinear.onnx"),
        image_spec,
        bytes("image", &[&png]),
    );

    // 60 JSON records, 8 fields (impute, clip, standardize, min-max, one-hot).
    let tabular: capsule_format::Pipeline = or_die(
        serde_json::from_slice(&read(fixtures.join("tabular/spec.json"))),
        "spec",
    );
    let records: Vec<serde_json::Value> = or_die(
        serde_json::from_slice(&read(fixtures.join("tabular/records.json"))),
        "records",
    );
    let texts: Vec<Vec<u8>> = records
        .iter()
        .map(|r| or_die(serde_json::to_vec(r), "record"))
        .collect();
    let items: Vec<&[u8]> = texts.iter().map(Vec::as_slice).collect();
    preprocess_case(
        c,
        "tabular_60_records",
        &fixtures.join("identity/tabular.onnx"),
        tabular,
        bytes("record", &items),
    );

    // The ten sentences of the embedding example (WordPiece, 30522-token vocabulary).
    let text = or_die(
        capsule_runtime::spec::read_pipeline(
            &root.join("examples/sentence-embedding/pipeline.toml"),
        ),
        "spec",
    );
    let sentences: Vec<String> = or_die(
        serde_json::from_slice(&read(
            root.join("examples/sentence-embedding/sentences.json"),
        )),
        "sentences",
    );
    let items: Vec<&[u8]> = sentences.iter().map(|s| s.as_bytes()).collect();
    preprocess_case(
        c,
        "text_10_sentences",
        &fixtures.join("identity/text.onnx"),
        capsule_format::Pipeline {
            outputs: Vec::new(),
            ..text
        },
        bytes("text", &items),
    );
}

/// What telemetry adds to a request on a node: counting the input features of 20 wine
/// records in the reference bins and finding the predicted classes, beside the capsule call
/// itself (preprocessing, model, postprocessing).
fn telemetry(c: &mut Criterion) {
    let root = capsule_tests::repo_dir();
    let built = or_die(capsule_tests::example_capsule("wine-tabular"), "wine");
    let csv = or_die(
        std::fs::read_to_string(root.join("examples/wine-tabular/train.csv")),
        "train.csv",
    );
    let mut lines = csv.lines();
    let columns: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split(',')
        .map(str::to_owned)
        .collect();
    let rows: Vec<Vec<String>> = lines
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect();
    let records: Vec<Vec<u8>> = rows
        .iter()
        .take(20)
        .map(|r| {
            let record: serde_json::Map<String, serde_json::Value> = columns
                .iter()
                .zip(r)
                .filter(|(name, cell)| *name != "class" && !cell.is_empty())
                .map(|(name, cell)| {
                    (
                        name.clone(),
                        serde_json::json!(cell.parse::<f64>().unwrap_or(0.0)),
                    )
                })
                .collect();
            or_die(serde_json::to_vec(&record), "record")
        })
        .collect();
    let reference = or_die(
        capsule_runtime::reference::ReferenceData::Table { columns, rows }.statistics(
            &built.manifest.inputs,
            built.manifest.pipeline.as_ref(),
            &Default::default(),
        ),
        "reference",
    );
    let items: Vec<&[u8]> = records.iter().map(Vec::as_slice).collect();
    let raw = bytes("record", &items);
    let outputs = or_die(built.capsule.infer(&raw), "wine");
    let mut group = c.benchmark_group("telemetry/wine_20_records");
    group.bench_function("capsule", |b| {
        b.iter(|| black_box(or_die(built.capsule.infer(black_box(&raw)), "wine")))
    });
    group.bench_function("observe", |b| {
        b.iter(|| {
            let mut live = reference.empty_live();
            let rows = reference.observe(black_box(&raw), &mut live);
            let classes = capsule_format::telemetry::classes(&outputs, &built.manifest.labels);
            black_box((rows, live, classes))
        })
    });
    group.finish();
}

/// The groups (criterion's macro makes an undocumented `pub fn`).
mod groups {
    #![allow(missing_docs)]
    use super::{cold_start, engine_costs, infer, preprocess, telemetry};
    use criterion::criterion_group;

    criterion_group!(
        benches,
        infer,
        cold_start,
        engine_costs,
        preprocess,
        telemetry
    );
}
criterion_main!(groups::benches);
