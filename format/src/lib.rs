//! Shared, I/O-free types of Capsule.
//!
//! This crate owns everything that crosses a boundary between Capsule's parts: the
//! [`CapsuleManifest`] stored in every capsule's `capsule.manifest` custom section, the
//! [`Tensor`] and [`DType`] model of data, the guest ABI messages ([`wire`]) and the Open
//! Inference Protocol V2 JSON shapes ([`v2`]). It builds for the host and for
//! `wasm32-unknown-unknown` (the guest and the browser SDK), so it never does I/O.
//!
//! Every decoder here treats its input as untrusted: sizes are bounded, lengths are checked
//! with checked arithmetic, and failures are typed [`Error`]s, never panics.
//!
//! ```
//! use capsule_format::{DType, Tensor};
//! let t = Tensor::from_f32(vec![2, 2], &[1.0, 2.0, 3.0, 4.0]).unwrap();
//! assert_eq!(t.dtype, DType::F32);
//! assert_eq!(t.element_count().unwrap(), 4);
//! ```
#![deny(missing_docs)]

pub mod clock;
mod dtype;
mod error;
pub mod hub;
pub mod kernels;
pub mod manifest;
pub mod pipeline;
pub mod request;
pub mod split;
pub mod telemetry;
mod tensor;
pub mod tuf;
pub mod v2;
pub mod wire;

pub use dtype::DType;
pub use error::{Error, Result};
pub use manifest::{CapsuleManifest, Dim, HostKernels, TensorSpec};
pub use pipeline::Pipeline;
pub use tensor::{NamedTensor, Tensor, TensorView, byte_elements};

/// Version of the guest ABI described in the design (section 3). A capsule whose
/// `capsule_abi_version()` returns anything else is refused.
pub const ABI_VERSION: u32 = 1;

/// Newest version of the `capsule_kernels` import ([`manifest::HostKernels`]). The node
/// answers a guest's `abi_version()` with the version the capsule's manifest declares (so a
/// capsule built for version 1 keeps its host kernels on a newer node), or 0 to leave every
/// product in wasm.
pub const HOST_KERNELS_ABI: i32 = 2;

/// The wasm import module of the host kernels, and the functions a capsule may import from it
/// (a capsule imports nothing else).
pub const HOST_KERNELS_MODULE: &str = "capsule_kernels";
/// See [`HOST_KERNELS_MODULE`].
pub const HOST_KERNELS_IMPORTS: [&str; 3] = ["abi_version", "f32_mmm_8x8", "f32_mmm_block"];

/// Deepest product (`k`) the host computes in one call: 32 MiB per panel, 5-6 ms of native
/// work here (2.6 GHz Xeon). A host call cannot be interrupted by the epoch deadline, so this bounds how
/// far one call can overrun it. Deeper products stay in the guest's wasm kernel.
pub const HOST_KERNELS_MAX_K: u32 = 1 << 20;

/// Most work one `f32_mmm_block` call may ask for, in tile steps (8x8 tiles times `k` plus a
/// tile's fixed cost, [`kernels::BlockCall::steps`]): the work of one tile at
/// [`HOST_KERNELS_MAX_K`], and for the same reason. The guest splits bigger blocks into
/// several calls.
pub const HOST_KERNELS_MAX_STEPS: u64 = HOST_KERNELS_MAX_K as u64 + kernels::TILE_OVERHEAD_STEPS;

/// Name of the wasm custom section that holds the encoded manifest.
pub const MANIFEST_SECTION: &str = "capsule.manifest";
