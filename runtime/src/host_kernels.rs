//! Host kernels: the node's side of the `capsule_kernels` import (ARCHITECTURE.md, "Host
//! kernels"; docs/security.md states the trust boundary).
//!
//! A capsule's graph, preprocessing and bookkeeping stay in the sandbox. Only one thing
//! crosses: the dense product of a packed 8-row panel of A by a packed 8-column panel of B,
//! `k` steps deep, which the guest's matrix kernel asks for once per 8x8 output tile. The host
//! reads both panels straight from the instance's linear memory, runs tract's native x86-64
//! FMA kernel on them and writes the 8x8 tile back. Every range is checked against the
//! memory's current size with checked arithmetic before anything is read, and the panel of A
//! must be 32-byte aligned (the native kernel loads it with aligned moves): a capsule that
//! passes anything else traps, which discards its instance and nothing more.
//!
//! The guest asks `abi_version()` at every inference; the answer is 0 (stay in wasm) unless
//! the store was made with host kernels on and this machine can run the native kernel.

use wasmtime::{Caller, Linker};

use crate::instance::StoreData;
use crate::{Error, Result};

/// Bytes of one k step of a packed 8-wide f32 panel.
const STEP_BYTES: usize = 8 * 4;
/// Bytes of the 8x8 f32 output tile.
const TILE_BYTES: usize = 64 * 4;
/// Alignment the native kernel needs for A's panel.
const A_ALIGN: usize = 32;

/// Whether this machine can run the native kernel the import delegates to.
pub fn supported_here() -> bool {
    native::supported()
}

/// Whether a capsule's code may import `module::name` of kind `ty`: only the host kernels'
/// functions. The one rule for the builder (reading a guest build) and `CapsuleImage::parse`.
pub(crate) fn importable(module: &str, name: &str, ty: &wasmparser::TypeRef) -> bool {
    module == capsule_format::HOST_KERNELS_MODULE
        && capsule_format::HOST_KERNELS_IMPORTS.contains(&name)
        && matches!(ty, wasmparser::TypeRef::Func(_))
}

/// Why the host refused a guest's call: the instance traps with
/// [`crate::TrapKind::HostKernel`] and is discarded.
#[derive(Debug, thiserror::Error)]
#[error("capsule_kernels.f32_mmm_8x8: {0}")]
pub struct Refused(String);

/// Byte ranges of one product's operands, checked against a memory of `memory_len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Operands {
    pub k: usize,
    pub a: std::ops::Range<usize>,
    pub b: std::ops::Range<usize>,
    pub out: std::ops::Range<usize>,
}

/// Checks the guest's arguments: `k` at most [`capsule_format::HOST_KERNELS_MAX_K`], every
/// range inside memory, A aligned. The arguments are the raw `i32`s of the call, read as
/// unsigned addresses.
pub(crate) fn operands(
    memory_len: usize,
    k: u32,
    a: u32,
    b: u32,
    out: u32,
) -> std::result::Result<Operands, String> {
    if k > capsule_format::HOST_KERNELS_MAX_K {
        return Err(format!(
            "k = {k} is over the limit of {}",
            capsule_format::HOST_KERNELS_MAX_K
        ));
    }
    let k = k as usize;
    let panel = k
        .checked_mul(STEP_BYTES)
        .ok_or_else(|| format!("k = {k} overflows"))?;
    let range = |what: &str, start: u32, len: usize| {
        let start = start as usize;
        match start.checked_add(len) {
            Some(end) if end <= memory_len => Ok(start..end),
            _ => Err(format!(
                "{what} at {start} + {len} bytes is outside the {memory_len}-byte memory"
            )),
        }
    };
    let a = range("A", a, panel)?;
    if a.start % A_ALIGN != 0 {
        return Err(format!("A at {} is not {A_ALIGN}-byte aligned", a.start));
    }
    Ok(Operands {
        k,
        a,
        b: range("B", b, panel)?,
        out: range("the output tile", out, TILE_BYTES)?,
    })
}

/// `f32_mmm_8x8(k, a, b, out)`: the checked product, written to `out` row-major.
fn f32_mmm_8x8(
    mut caller: Caller<'_, StoreData>,
    k: u32,
    a: u32,
    b: u32,
    out: u32,
) -> wasmtime::Result<()> {
    let refused = |why: String| wasmtime::Error::new(Refused(why));
    if !caller.data().host_kernels {
        // The guest was told 0 and must not call: a capsule that does anyway gets no service.
        return Err(refused("host kernels are off for this instance".into()));
    }
    let memory = caller
        .data()
        .memory
        .ok_or_else(|| refused("called before the instance exported its memory".into()))?;
    let data = memory.data(&caller);
    let ops = operands(data.len(), k, a, b, out).map_err(refused)?;
    let tile = native::product(&data[ops.a.clone()], &data[ops.b.clone()], ops.k);
    let dst = &mut memory.data_mut(&mut caller)[ops.out];
    for (dst, v) in dst.chunks_exact_mut(4).zip(tile) {
        dst.copy_from_slice(&v.to_le_bytes());
    }
    caller.data_mut().host_kernel_calls += 1;
    Ok(())
}

/// The linker every capsule instance is made with: the `capsule_kernels` functions and
/// nothing else.
pub(crate) fn linker(engine: &wasmtime::Engine) -> Result<Linker<StoreData>> {
    let module = capsule_format::HOST_KERNELS_MODULE;
    let mut linker = Linker::new(engine);
    linker
        .func_wrap(module, "abi_version", |caller: Caller<'_, StoreData>| {
            if caller.data().host_kernels {
                capsule_format::HOST_KERNELS_ABI
            } else {
                0
            }
        })
        .map_err(Error::wasmtime)?;
    linker
        .func_wrap(module, "f32_mmm_8x8", f32_mmm_8x8)
        .map_err(Error::wasmtime)?;
    Ok(linker)
}

#[cfg(target_arch = "x86_64")]
mod native {
    use tract_linalg::mmm::{FusedKerSpec, MatMatMulKer, OutputStoreKer};
    use tract_linalg::x86_64::mmm::fma_mmm_f32_8x8;

    pub fn supported() -> bool {
        fma_mmm_f32_8x8.runnable()
    }

    /// The output tile, aligned as the kernel's stores like it.
    #[repr(C, align(32))]
    struct Tile([f32; 64]);

    /// `A (k x 8 packed) * B (k x 8 packed)` as an 8x8 row-major tile. `a` and `b` hold at
    /// least `k` steps each and `a` is 32-byte aligned (checked by the caller).
    pub fn product(a: &[u8], b: &[u8], k: usize) -> [f32; 64] {
        debug_assert!(a.len() >= k * super::STEP_BYTES && b.len() >= k * super::STEP_BYTES);
        debug_assert_eq!(a.as_ptr() as usize % super::A_ALIGN, 0);
        if !supported() {
            // Never reached: `abi_version` answers 0 on such machines, and the guest falls
            // back to its own kernel. A zero tile would be silently wrong, so compute it.
            return super::portable_product(a, b, k);
        }
        let mut tile = Tile([0.0; 64]);
        let program = [
            FusedKerSpec::Clear,
            FusedKerSpec::AddMatMul {
                k,
                pa: a.as_ptr(),
                pb: b.as_ptr(),
                packing: 0,
            },
            FusedKerSpec::Store(OutputStoreKer {
                ptr: tile.0.as_mut_ptr().cast(),
                row_byte_stride: 32,
                col_byte_stride: 4,
                item_size: 4,
            }),
            FusedKerSpec::Done,
        ];
        fma_mmm_f32_8x8.kernel(&program);
        // SAFETY: the kernel ran, so the machine has AVX.
        unsafe { clear_upper() };
        tile.0
    }

    /// The kernel returns with dirty upper halves of the AVX registers; back in Cranelift's
    /// SSE code every SIMD instruction would then pay the AVX-SSE transition penalty (measured:
    /// a capsule 20x slower). `vzeroupper` clears them.
    #[target_feature(enable = "avx")]
    unsafe fn clear_upper() {
        std::arch::x86_64::_mm256_zeroupper();
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod native {
    pub fn supported() -> bool {
        false
    }

    pub fn product(a: &[u8], b: &[u8], k: usize) -> [f32; 64] {
        super::portable_product(a, b, k)
    }
}

/// The product in plain Rust: the reference of the tests, and what a machine without the
/// native kernel would compute if a guest called anyway.
fn portable_product(a: &[u8], b: &[u8], k: usize) -> [f32; 64] {
    let f = |bytes: &[u8], i: usize| {
        let at = i * 4;
        f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
    };
    let mut tile = [0f32; 64];
    for step in 0..k {
        for row in 0..8 {
            let x = f(a, step * 8 + row);
            for col in 0..8 {
                tile[row * 8 + col] += x * f(b, step * 8 + col);
            }
        }
    }
    tile
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands_inside_memory_are_accepted() {
        let ops = operands(4096, 4, 64, 1000, 2048).unwrap();
        assert_eq!(ops.a, 64..192);
        assert_eq!(ops.b, 1000..1128);
        assert_eq!(ops.out, 2048..2304);
        // Ranges ending exactly at the end of memory are inside it.
        assert!(operands(4096, 4, 4096 - 128, 4096 - 128, 4096 - 256).is_ok());
        // k = 0 reads nothing.
        assert!(operands(4096, 0, 4096, 4096, 0).is_ok());
        // The deepest product the host takes, in a memory that holds it.
        let max = capsule_format::HOST_KERNELS_MAX_K;
        assert!(operands(80 << 20, max, 0, 40 << 20, 0).is_ok());
        assert!(operands(80 << 20, max + 1, 0, 40 << 20, 0).is_err());
    }

    #[test]
    fn hostile_operands_are_refused() {
        let len = 1 << 16;
        for (k, a, b, out) in [
            (1, len as u32, 0, 0),       // A starts at the end of memory
            (4, 0, len as u32 - 64, 0),  // B runs off the end
            (1, 0, 0, len as u32 - 255), // tile runs off the end
            (u32::MAX, 0, 0, 0),         // a huge k
            (1, !31, 0, 0),              // a pointer near 4 GiB
            (1, 0, u32::MAX, 0),         // wrapping is not a way in
            (1, 0, 0, u32::MAX),
            (1, 16, 0, 0),      // A not 32-byte aligned
            (1 << 27, 0, 0, 0), // k * 32 = 4 GiB
        ] {
            assert!(
                operands(len, k, a, b, out).is_err(),
                "accepted k={k} a={a} b={b} out={out}"
            );
        }
    }

    /// Random arguments, biased toward the edges (0, the end of memory, 4 GiB, overflowing
    /// k): whatever `operands` accepts lies inside memory with A aligned.
    #[test]
    fn accepted_operands_always_lie_inside_memory() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut accepted = 0;
        for _ in 0..200_000 {
            let len = [0, 256, 65_536, 1 << 20][(next() % 4) as usize];
            let mut arg = |scale: u32| match next() % 5 {
                0 => 0,
                1 => u32::MAX - (next() % 64) as u32,
                2 => (len as u32).wrapping_sub((next() % 512) as u32),
                3 => (next() % u64::from(scale)) as u32,
                _ => next() as u32,
            };
            let (k, a, b, out) = (
                arg(64),
                arg(len.max(1) as u32),
                arg(len.max(1) as u32),
                arg(len.max(1) as u32),
            );
            if let Ok(ops) = operands(len, k, a, b, out) {
                accepted += 1;
                for r in [&ops.a, &ops.b, &ops.out] {
                    assert!(r.start <= r.end && r.end <= len, "{k} {a} {b} {out}: {r:?}");
                }
                assert_eq!(ops.a.start % A_ALIGN, 0);
                assert_eq!(ops.a.len(), k as usize * STEP_BYTES);
                assert_eq!(ops.b.len(), k as usize * STEP_BYTES);
                assert_eq!(ops.out.len(), TILE_BYTES);
            }
        }
        assert!(
            accepted > 100,
            "the generator reaches valid operands too ({accepted})"
        );
    }

    #[test]
    fn the_native_kernel_matches_the_portable_product() {
        if !supported_here() {
            eprintln!("SKIP the_native_kernel_matches_the_portable_product: no AVX2+FMA here");
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI machines must run the native kernel"
            );
            return;
        }
        #[repr(C, align(32))]
        struct Panels([u8; 2 * 37 * STEP_BYTES]);
        let mut panels = Panels([0; 2 * 37 * STEP_BYTES]);
        // Small integers: every sum is exact in f32, so FMA and two roundings agree.
        for (i, chunk) in panels.0.chunks_exact_mut(4).enumerate() {
            let v = ((i * 7 + 3) % 11) as f32 - 5.0;
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        let (a, b) = panels.0.split_at(37 * STEP_BYTES);
        for k in [0, 1, 2, 8, 37] {
            assert_eq!(
                native::product(a, b, k),
                portable_product(a, b, k),
                "k = {k}"
            );
        }
    }
}
