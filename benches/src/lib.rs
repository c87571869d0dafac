//! Criterion benches live in `benches/capsule.rs`; see `docs/benchmarks.md`.
