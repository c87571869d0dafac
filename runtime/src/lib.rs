//! The Capsule host runtime: runs capsules under wasmtime and builds them.
//!
//! - [`CapsuleEngine`] owns the wasmtime policy (Cranelift, SIMD, copy-on-write memory images
//!   on Linux, else the pooling allocator with fallback, epoch deadlines) and the
//!   compiled-code caches: each guest build is compiled once, and further capsules of that
//!   build install without compiling.
//! - [`LoadedCapsule`] is an installed capsule with a pool of warm instances; every request is
//!   validated against the manifest before the guest runs, and any trap discards the instance.
//! - [`CapsuleBuilder`] turns an ONNX model into a pre-initialized `.capsule.wasm`.
//!
//! ```no_run
//! use capsule_runtime::{CapsuleEngine, EngineConfig, LoadedCapsule, RunConfig};
//! # fn main() -> Result<(), capsule_runtime::Error> {
//! let engine = CapsuleEngine::new(EngineConfig::default())?;
//! let bytes = std::fs::read("digits.capsule.wasm").unwrap();
//! let capsule = LoadedCapsule::load(&engine, bytes, RunConfig::default())?;
//! let input = capsule_format::Tensor::from_f32(vec![1, 64], &[0.0; 64])?;
//! let outputs = capsule.infer(&[capsule_format::NamedTensor { name: "input".into(), tensor: input }])?;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

#[cfg(feature = "builder")]
mod builder;
pub mod capsule;
#[cfg(target_os = "linux")]
mod cow;
mod engine;
mod error;
pub mod golden;
pub mod host_kernels;
mod instance;
pub mod reference;
pub mod spec;
mod validate;

#[cfg(feature = "builder")]
pub use builder::{BuildOptions, BuiltCapsule, CapsuleBuilder};
pub use capsule::{CapsuleImage, GuestCode};
pub use engine::{CapsuleEngine, EngineConfig, EngineStats, default_cache_dir};
pub use error::{Error, Result, TrapKind};
pub use instance::{CapsuleStats, ColdStart, LoadedCapsule, RunConfig};
pub use validate::{Declared, check_signature, validate_request};

/// The guest build this runtime carries (built by `build.rs` for `wasm32-unknown-unknown`).
#[cfg(feature = "builder")]
pub const GUEST_WASM: &[u8] = include_bytes!(env!("CAPSULE_GUEST_WASM"));

/// The cargo profile the carried guest was built with (`guest-dev` or `guest-release`;
/// `none` without the `builder` feature, which carries no guest).
pub const GUEST_PROFILE: &str = env!("CAPSULE_GUEST_PROFILE");

/// The carried guest's SIMD: `deterministic` (simd128, the default) or `relaxed-simd`
/// (`CAPSULE_GUEST_SIMD=relaxed` at build time; see `capsule_format::manifest::Numerics`).
pub const GUEST_SIMD: &str = env!("CAPSULE_GUEST_NUMERICS");
