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
//! - `install/second_capsule`: installing a capsule of an already compiled guest build.

use std::hint::black_box;
use std::time::Duration;

use capsule_model::LoadedModel;
use capsule_runtime::{CapsuleEngine, CapsuleImage, EngineConfig, LoadedCapsule, RunConfig};
use capsule_tests::{FIXTURE_MODELS, builder, fixture_capsule, model_bytes};
use criterion::{Criterion, criterion_group, criterion_main};

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
    group.finish();
    assert_eq!(
        engine.compilations(),
        compiled,
        "installing a capsule of a compiled guest build compiled code"
    );
}

criterion_group!(benches, infer, cold_start, engine_costs);
criterion_main!(benches);
