//! The code inside every capsule: the guest ABI (design section 3) over `capsule-model`.
//!
//! Built for `wasm32-unknown-unknown` with `simd128` by `runtime/build.rs`. Its only imports
//! are the host kernels (`capsule_kernels`, see `capsule_model::kernels`), which compute
//! dense products inside its own memory when the host offers them: everything it does is
//! compute on bytes the host hands it. Exports:
//!
//! | export | purpose |
//! |---|---|
//! | `memory` | linear memory |
//! | `capsule_abi_version() -> u32` | [`capsule_format::ABI_VERSION`] |
//! | `capsule_alloc(size, align) -> ptr` | allocate a buffer for the host (0 on failure) |
//! | `capsule_free(ptr, size, align)` | free a buffer the guest returned |
//! | `capsule_init() -> u32` | 0 when a model is loaded (the snapshot holds one), 1 otherwise |
//! | `capsule_infer(ptr, len) -> u64` | run; consumes the request buffer, returns `ptr << 32 \| len` of an encoded `InferResponse` |
//! | `capsule_build(ptr, len) -> u64` | builder only: load a model from an encoded `BuildRequest`, before the snapshot |
//! | `capsule_last_panic() -> u64` | `ptr << 32 \| len` of the last panic message, for diagnostics after a trap |
//! | `_initialize()` | runs the module's constructors (tract's kernel registry); the builder calls it once before the snapshot and the snapshot drops the export |
//!
//! Every failure that input can cause is a typed `GuestError`; a trap means a bug or a
//! resource limit, and the host then discards the instance.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::{Cell, RefCell};

use capsule_format::wire::{
    self, BuildRequest, BuildResponse, GuestError, GuestErrorKind, InferRequestView, InferResponse,
    InferResponseView, NamedTensorView,
};
use capsule_format::{ABI_VERSION, NamedTensor};
use capsule_model::LoadedModel;
use capsule_pipeline::CompiledPipeline;

mod bins;

/// The model and the pipeline around it.
struct Loaded {
    model: LoadedModel,
    pipeline: Option<CompiledPipeline>,
}

/// The system allocator behind [`bins`] (small blocks kept for reuse), which can zero every
/// freed block while a model is being built, so the garbage of parsing never lands in the
/// snapshot (zeroed memory costs nothing there).
struct SnapshotAllocator;

thread_local! {
    static ZERO_ON_FREE: Cell<bool> = const { Cell::new(false) };
    static MODEL: RefCell<Option<Loaded>> = const { RefCell::new(None) };
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

fn zero_on_free() -> bool {
    ZERO_ON_FREE.try_with(Cell::get).unwrap_or(false)
}

/// Zeroes freed blocks from now on (`on`), after zeroing and releasing every block the bins
/// keep; or stops.
fn set_zero_on_free(on: bool) {
    if on {
        // SAFETY: each block is a whole free class block, about to be released.
        bins::flush(|block, size| unsafe { block.write_bytes(0, size) });
    }
    ZERO_ON_FREE.with(|z| z.set(on));
}

// SAFETY: a layout the bins serve is always allocated and freed through them (with its
// class's size and alignment, at least the layout's), any other through `System` with the
// same layout contract; zeroing writes only inside the block being freed.
unsafe impl GlobalAlloc for SnapshotAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match bins::class_of(layout.size(), layout.align()) {
            // SAFETY: the caller's contract.
            Some(class) => unsafe { bins::alloc(class) },
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let Some(class) = bins::class_of(layout.size(), layout.align()) else {
            return unsafe { System.alloc_zeroed(layout) };
        };
        // SAFETY: the caller's contract; the block holds at least `layout.size()` bytes.
        unsafe {
            let block = bins::alloc(class);
            if !block.is_null() {
                block.write_bytes(0, layout.size());
            }
            block
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let class = bins::class_of(layout.size(), layout.align());
        if zero_on_free() {
            // Zeroed and released: a block in the bins would carry their link.
            let size = class.map_or(layout.size(), bins::class_size);
            unsafe { ptr.write_bytes(0, size) };
            return match class {
                Some(class) => unsafe { bins::release(ptr, class) },
                None => unsafe { System.dealloc(ptr, layout) },
            };
        }
        match class {
            Some(class) => unsafe { bins::dealloc(ptr, class) },
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = bins::class_of(layout.size(), layout.align());
        let new = bins::class_of(new_size, layout.align());
        if old.is_some() && old == new {
            // The block already has the class's size. While freed memory is zeroed, so is
            // what a shrink gives up.
            if zero_on_free() && new_size < layout.size() {
                unsafe { ptr.add(new_size).write_bytes(0, layout.size() - new_size) };
            }
            return ptr;
        }
        if old.is_none() && new.is_none() && !zero_on_free() {
            return unsafe { System.realloc(ptr, layout, new_size) };
        }
        let Ok(new_layout) = Layout::from_size_align(new_size, layout.align()) else {
            return std::ptr::null_mut();
        };
        let new = unsafe { self.alloc(new_layout) };
        if !new.is_null() {
            unsafe {
                std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                self.dealloc(ptr, layout);
            }
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: SnapshotAllocator = SnapshotAllocator;

fn pack(bytes: Vec<u8>) -> u64 {
    let leaked: &'static mut [u8] = Box::leak(bytes.into_boxed_slice());
    ((leaked.as_mut_ptr() as usize as u64) << 32) | leaked.len() as u64
}

fn encode_or_trap<T: serde::Serialize>(value: &T) -> u64 {
    match wire::encode(value, "response") {
        Ok(bytes) => pack(bytes),
        // Encoding our own response types cannot fail below the 1 GiB message limit; if it
        // does, a trap (instance discarded) is the honest outcome.
        Err(e) => panic!("{e}"),
    }
}

/// Takes ownership of a request buffer allocated by `capsule_alloc(len, 1)`.
///
/// # Safety
/// `ptr..ptr+len` must be a live allocation of exactly `len` bytes with alignment 1.
unsafe fn take_request(ptr: u32, len: u32) -> Box<[u8]> {
    let slice = std::ptr::slice_from_raw_parts_mut(ptr as usize as *mut u8, len as usize);
    unsafe { Box::from_raw(slice) }
}

/// Returns the guest ABI version.
#[unsafe(no_mangle)]
pub extern "C" fn capsule_abi_version() -> u32 {
    ABI_VERSION
}

/// Allocates `size` bytes aligned to `align` for the host; 0 when impossible.
#[unsafe(no_mangle)]
pub extern "C" fn capsule_alloc(size: u32, align: u32) -> u32 {
    let Ok(layout) = Layout::from_size_align(size.max(1) as usize, align.max(1) as usize) else {
        return 0;
    };
    // SAFETY: the layout has a non-zero size.
    unsafe { std::alloc::alloc(layout) as usize as u32 }
}

/// Frees a buffer obtained from `capsule_alloc` or returned by the guest.
///
/// # Safety
/// The host must pass a pointer the guest handed out with the same size and alignment.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn capsule_free(ptr: u32, size: u32, align: u32) {
    if ptr == 0 {
        return;
    }
    if let Ok(layout) = Layout::from_size_align(size.max(1) as usize, align.max(1) as usize) {
        // SAFETY: the host contract above.
        unsafe { std::alloc::dealloc(ptr as usize as *mut u8, layout) }
    }
}

/// 0 when a model is loaded and ready, 1 otherwise.
#[unsafe(no_mangle)]
pub extern "C" fn capsule_init() -> u32 {
    MODEL.with(|m| if m.borrow().is_some() { 0 } else { 1 })
}

/// Loads the model of an encoded `BuildRequest` (consumed) and keeps it for the snapshot.
///
/// # Safety
/// `ptr`/`len` must come from `capsule_alloc(len, 1)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn capsule_build(ptr: u32, len: u32) -> u64 {
    set_zero_on_free(true);
    // SAFETY: the host contract above.
    let bytes = unsafe { take_request(ptr, len) };
    let response = match wire::decode::<BuildRequest>(&bytes, "build request") {
        Err(e) => BuildResponse::Error(GuestError {
            kind: GuestErrorKind::BadInput,
            message: e.to_string(),
        }),
        Ok(request) => {
            drop(bytes);
            match load(&request) {
                Ok(loaded) => {
                    let report = loaded.model.report();
                    MODEL.with(|m| *m.borrow_mut() = Some(loaded));
                    BuildResponse::Ready(report)
                }
                Err(e) => BuildResponse::Error(e),
            }
        }
    };
    let packed = encode_or_trap(&response);
    set_zero_on_free(false);
    packed
}

/// Loads the model, then compiles the pipeline against its signature (the vocabulary's
/// lookup table is built here, so it lands in the snapshot).
fn load(request: &BuildRequest) -> Result<Loaded, GuestError> {
    let model = LoadedModel::load_with(&request.model, &request.input_shapes, request.one_row_plan)
        .map_err(|e| GuestError {
            kind: GuestErrorKind::ModelLoad,
            message: e.to_string(),
        })?;
    let pipeline = match &request.pipeline {
        Some(spec) if !spec.is_empty() => Some(
            CompiledPipeline::new(spec, model.inputs(), model.outputs(), &request.labels).map_err(
                |e| GuestError {
                    kind: GuestErrorKind::ModelLoad,
                    message: e.to_string(),
                },
            )?,
        ),
        _ => None,
    };
    Ok(Loaded { model, pipeline })
}

fn pipeline_error(e: capsule_pipeline::Error) -> GuestError {
    let kind = match &e {
        capsule_pipeline::Error::BadInput { .. } => GuestErrorKind::BadInput,
        _ => GuestErrorKind::Internal,
    };
    GuestError {
        kind,
        message: e.to_string(),
    }
}

/// The encoded response to `inputs`. A model without a pipeline has its outputs encoded
/// straight from the runtime's tensors.
fn respond(loaded: &mut Loaded, inputs: &[NamedTensorView<'_>]) -> u64 {
    let Some(pipeline) = &loaded.pipeline else {
        return match loaded.model.run_with(inputs, |outputs| {
            encode_or_trap(&InferResponseView::Outputs(outputs))
        }) {
            Ok(packed) => packed,
            Err(e) => encode_or_trap(&InferResponseView::Error(&model_error(e))),
        };
    };
    match infer(pipeline, &mut loaded.model, inputs) {
        Ok(outputs) => encode_or_trap(&InferResponse::Outputs(outputs)),
        Err(e) => encode_or_trap(&InferResponseView::Error(&e)),
    }
}

/// Preprocessing, the model, postprocessing.
fn infer(
    pipeline: &CompiledPipeline,
    model: &mut LoadedModel,
    inputs: &[NamedTensorView<'_>],
) -> Result<Vec<NamedTensor>, GuestError> {
    let prepared = pipeline.preprocess(inputs).map_err(pipeline_error)?;
    let mut model_inputs = wire::views(&prepared);
    model_inputs.extend(
        inputs
            .iter()
            .filter(|t| model.inputs().iter().any(|m| m.name == t.name))
            .filter(|t| !prepared.iter().any(|p| p.name == t.name))
            .cloned(),
    );
    let outputs = model.run(&model_inputs).map_err(model_error)?;
    pipeline
        .postprocess(&model_inputs, outputs)
        .map_err(pipeline_error)
}

fn model_error(e: capsule_model::Error) -> GuestError {
    let kind = match &e {
        capsule_model::Error::BadInput(_) => GuestErrorKind::BadInput,
        capsule_model::Error::Shape(_) => GuestErrorKind::ShapeMismatch,
        capsule_model::Error::Load(_) => GuestErrorKind::ModelLoad,
        _ => GuestErrorKind::Internal,
    };
    GuestError {
        kind,
        message: e.to_string(),
    }
}

/// Runs the model on an encoded `InferRequest` (consumed).
///
/// # Safety
/// `ptr`/`len` must come from `capsule_alloc(len, 1)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn capsule_infer(ptr: u32, len: u32) -> u64 {
    // SAFETY: the host contract above.
    let bytes = unsafe { take_request(ptr, len) };
    capsule_model::kernels::refresh();
    match wire::decode_borrowed::<InferRequestView<'_>>(&bytes, "inference request") {
        Err(e) => encode_or_trap(&InferResponseView::Error(&GuestError {
            kind: GuestErrorKind::BadInput,
            message: e.to_string(),
        })),
        Ok(request) => MODEL.with(|m| match m.borrow_mut().as_mut() {
            None => encode_or_trap(&InferResponseView::Error(&GuestError {
                kind: GuestErrorKind::NotInitialized,
                message: "no model is loaded in this capsule".into(),
            })),
            Some(loaded) => respond(loaded, &request.inputs),
        }),
    }
}

/// `ptr << 32 | len` of the last panic message (empty when none).
#[unsafe(no_mangle)]
pub extern "C" fn capsule_last_panic() -> u64 {
    LAST_PANIC
        .try_with(|p| match p.try_borrow() {
            Ok(s) => ((s.as_ptr() as usize as u64) << 32) | s.len() as u64,
            Err(_) => 0,
        })
        .unwrap_or(0)
}

#[cfg(target_arch = "wasm32")]
unsafe extern "C" {
    /// Synthesized by wasm-ld: runs the `.init_array` constructors (tract's kernel registry).
    fn __wasm_call_ctors();
}

/// Runs constructors once and installs the panic hook; the builder calls this before the
/// snapshot, so a capsule never runs it again.
#[unsafe(no_mangle)]
pub extern "C" fn _initialize() {
    #[cfg(target_arch = "wasm32")]
    // SAFETY: called once, before any other export, as wasm-ld's reactor model expects.
    unsafe {
        __wasm_call_ctors()
    };
    std::panic::set_hook(Box::new(|info| {
        let _ = LAST_PANIC.try_with(|p| {
            if let Ok(mut p) = p.try_borrow_mut() {
                p.clear();
                p.push_str(&info.to_string());
            }
        });
    }));
}
