//! Running a capsule: instantiation from the shared compiled code plus the capsule's memory
//! image, a pool of warm instances, and the guarded call path (validation, deadline, memory
//! cap, discard on trap).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capsule_format::wire::{self, InferResponse};
use capsule_format::{CapsuleManifest, NamedTensor};
use wasmtime::{Instance, Memory, Module, Store, StoreLimits, StoreLimitsBuilder, TypedFunc};

use crate::capsule::{CapsuleImage, PAGE};
use crate::engine::{CapsuleEngine, EPOCH_TICK};
use crate::validate::validate_request;
use crate::{Error, Result, TrapKind};

/// Largest panic message read back from a trapped guest.
const MAX_PANIC_MESSAGE: u64 = 4096;

/// Per-capsule execution settings.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Deadline of one inference call; `None` uses the manifest's time budget.
    pub deadline: Option<Duration>,
    /// Memory cap; `None` uses the manifest's limit (capped by the engine's).
    pub max_memory_bytes: Option<u64>,
    /// Largest total of input tensor bytes in one request.
    pub max_request_bytes: u64,
    /// Warm instances kept idle for reuse.
    pub max_idle_instances: usize,
    /// Let this capsule's instances use the host kernels when the engine has them (false:
    /// every product in wasm, outputs bit for bit a browser's).
    pub host_kernels: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            deadline: None,
            max_memory_bytes: None,
            max_request_bytes: 256 << 20,
            max_idle_instances: 4,
            host_kernels: true,
        }
    }
}

pub(crate) struct StoreData {
    limits: StoreLimits,
    /// The instance's memory, for the host kernels (set once the instance exists).
    pub(crate) memory: Option<Memory>,
    /// The host kernels this instance may call ([`crate::host_kernels`]): the capsule's
    /// version when the engine and the run allow them, `None` otherwise.
    pub(crate) host_kernels: capsule_format::HostKernels,
    /// Products the host computed for this instance since the last look.
    pub(crate) host_kernel_calls: u64,
}

/// A store with a memory cap and an armed epoch deadline; its instance uses the host kernels
/// `host_kernels` names (the capsule's version, or `None`) when the engine has them (the
/// builder's snapshot runs never do).
pub(crate) fn new_store(
    engine: &CapsuleEngine,
    memory_cap: u64,
    deadline_ticks: u64,
    host_kernels: capsule_format::HostKernels,
) -> Store<StoreData> {
    let limits = StoreLimitsBuilder::new()
        .memory_size(usize::try_from(memory_cap).unwrap_or(usize::MAX))
        .instances(1)
        .build();
    let data = StoreData {
        limits,
        memory: None,
        host_kernels: if engine.host_kernels() {
            host_kernels
        } else {
            capsule_format::HostKernels::None
        },
        host_kernel_calls: 0,
    };
    let mut store = Store::new(engine.engine(), data);
    store.limiter(|d| &mut d.limits);
    store.set_epoch_deadline(deadline_ticks);
    store.epoch_deadline_trap();
    store
}

/// One live guest instance with its store and ABI entry points.
pub(crate) struct GuestInstance {
    store: Store<StoreData>,
    instance: Instance,
    memory: Memory,
    alloc: TypedFunc<(u32, u32), u32>,
    free: TypedFunc<(u32, u32, u32), ()>,
    infer: TypedFunc<(u32, u32), u64>,
    last_panic: Option<TypedFunc<(), u64>>,
    /// Memory size last added to [`CapsuleStats::memory_bytes`] for this instance.
    accounted_memory: u64,
}

/// Counters of one loaded capsule.
#[derive(Debug, Default)]
pub struct CapsuleStats {
    /// Instances created (each one a fresh copy of the snapshot).
    pub instances_created: AtomicU64,
    /// Inference calls that returned outputs.
    pub inferences: AtomicU64,
    /// Calls that trapped (each discarded its instance).
    pub traps: AtomicU64,
    /// Linear memory held by live instances (idle and busy), in bytes.
    pub memory_bytes: AtomicU64,
    /// Live instances (idle and busy).
    pub live_instances: AtomicU64,
    /// 8x8 product tiles computed by the node's native kernels (zero unless the engine has
    /// host kernels on and the capsule can use them).
    pub host_kernel_calls: AtomicU64,
}

/// A capsule installed on an engine, ready to run, with its pool of warm instances.
pub struct LoadedCapsule {
    engine: Arc<CapsuleEngine>,
    image: CapsuleImage,
    /// The memory image as a sealed memfd that instances map copy-on-write (when the engine
    /// does; otherwise every instance copies the segments).
    #[cfg(target_os = "linux")]
    image_file: Option<Arc<crate::cow::ImageFile>>,
    module: Module,
    config: RunConfig,
    deadline_ticks: u64,
    memory_cap: u64,
    idle: Mutex<Vec<GuestInstance>>,
    stats: CapsuleStats,
}

impl std::fmt::Debug for LoadedCapsule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedCapsule")
            .field("name", &self.image.manifest.name)
            .field("version", &self.image.manifest.version.to_string())
            .field("sha256", &self.image.sha256)
            .finish()
    }
}

/// Epoch ticks that cover `deadline` (at least one full tick).
fn deadline_ticks(deadline: Duration) -> u64 {
    u64::try_from(deadline.as_micros() / EPOCH_TICK.as_micros())
        .unwrap_or(u64::MAX - 1)
        .max(1)
        + 1
}

fn abi(msg: impl Into<String>) -> Error {
    Error::Abi(msg.into())
}

impl LoadedCapsule {
    /// Parses, checks and installs a capsule. The guest code comes from the engine's caches
    /// (compiled at most once per guest build); one instance is created and probed (ABI
    /// version, model present) before this returns.
    pub fn load(
        engine: &Arc<CapsuleEngine>,
        bytes: Vec<u8>,
        config: RunConfig,
    ) -> Result<LoadedCapsule> {
        Self::install(engine, CapsuleImage::parse(bytes)?, config)
    }

    /// Installs an already parsed capsule.
    pub fn install(
        engine: &Arc<CapsuleEngine>,
        image: CapsuleImage,
        config: RunConfig,
    ) -> Result<LoadedCapsule> {
        let mut image = image;
        let module = engine.module_with_sha256(&image.code, image.code_sha256.clone())?;
        image.shed_code();
        let limits = image.manifest.limits;
        let deadline = config
            .deadline
            .unwrap_or(Duration::from_millis(limits.time_budget_ms));
        let deadline_ticks = deadline_ticks(deadline);
        let memory_cap = config
            .max_memory_bytes
            .unwrap_or(limits.max_memory_bytes)
            .min(engine.config().max_memory_bytes);
        #[cfg(target_os = "linux")]
        let image_file = if engine.copy_on_write() {
            let len = image
                .memory_pages
                .checked_mul(PAGE)
                .filter(|len| *len <= memory_cap)
                .and_then(|len| usize::try_from(len).ok())
                .ok_or_else(|| {
                    Error::InvalidCapsule(format!(
                        "its memory image needs {} pages, over the memory cap of {memory_cap} bytes",
                        image.memory_pages
                    ))
                })?;
            let file = Arc::new(crate::cow::ImageFile::new(len, image.segments())?);
            // The file is the image from now on: no second copy in process memory.
            image.shed_image();
            Some(file)
        } else {
            None
        };
        let capsule = LoadedCapsule {
            engine: Arc::clone(engine),
            image,
            #[cfg(target_os = "linux")]
            image_file,
            module,
            config,
            deadline_ticks,
            memory_cap,
            idle: Mutex::new(Vec::new()),
            stats: CapsuleStats::default(),
        };
        let probe = capsule.instantiate()?;
        capsule.release(probe);
        Ok(capsule)
    }

    /// The manifest.
    pub fn manifest(&self) -> &CapsuleManifest {
        &self.image.manifest
    }

    /// The parsed capsule.
    pub fn image(&self) -> &CapsuleImage {
        &self.image
    }

    /// Counters.
    pub fn stats(&self) -> &CapsuleStats {
        &self.stats
    }

    /// Idle warm instances right now.
    pub fn idle_instances(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Creates a fresh instance: shared compiled code, memory grown to the capsule's size and
    /// holding its image (mapped copy-on-write, or copied), then probed.
    fn instantiate(&self) -> Result<GuestInstance> {
        let mut store = new_store(
            &self.engine,
            self.memory_cap,
            self.deadline_ticks,
            if self.config.host_kernels {
                self.image.manifest.host_kernels
            } else {
                capsule_format::HostKernels::None
            },
        );
        let linker = self.engine.linker();
        #[cfg(target_os = "linux")]
        let (instance, mapped) = match &self.image_file {
            Some(file) => {
                let (instance, taken) =
                    crate::cow::with_image(file, || linker.instantiate(&mut store, &self.module));
                let instance = instance.map_err(Error::wasmtime)?;
                if !taken {
                    // The segments were shed at install: without the mapping the instance
                    // would start from zeros.
                    return Err(Error::ImageNotMapped);
                }
                (instance, true)
            }
            None => (
                linker
                    .instantiate(&mut store, &self.module)
                    .map_err(Error::wasmtime)?,
                false,
            ),
        };
        #[cfg(not(target_os = "linux"))]
        let (instance, mapped) = (
            linker
                .instantiate(&mut store, &self.module)
                .map_err(Error::wasmtime)?,
            false,
        );
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| Error::InvalidCapsule("no exported memory".into()))?;
        let pages = self.image.memory_pages;
        if pages.saturating_mul(PAGE) > self.memory_cap {
            return Err(Error::InvalidCapsule(format!(
                "its memory image needs {} bytes, over the memory cap of {} bytes",
                pages.saturating_mul(PAGE),
                self.memory_cap
            )));
        }
        // The first growth, before any guest code runs: with a mapped image it uncovers the
        // image (see `cow`), otherwise zero pages that the segments are copied into.
        memory.grow(&mut store, pages).map_err(Error::wasmtime)?;
        if !mapped {
            for (offset, data) in self.image.segments() {
                memory
                    .write(&mut store, offset as usize, data)
                    .map_err(|e| Error::InvalidCapsule(e.to_string()))?;
            }
        }
        let mut guest = GuestInstance::new(store, instance)?;
        let version: TypedFunc<(), u32> = guest.typed("capsule_abi_version")?;
        let init: TypedFunc<(), u32> = guest.typed("capsule_init")?;
        let found = guest.call(|s| version.call(s, ()), self.deadline_ticks)?;
        if found != capsule_format::ABI_VERSION {
            return Err(Error::InvalidCapsule(format!(
                "guest ABI version {found}, this runtime implements version {}",
                capsule_format::ABI_VERSION
            )));
        }
        if guest.call(|s| init.call(s, ()), self.deadline_ticks)? != 0 {
            return Err(Error::InvalidCapsule(
                "capsule_init reports that no model is loaded".into(),
            ));
        }
        self.stats.instances_created.fetch_add(1, Ordering::Relaxed);
        self.stats.live_instances.fetch_add(1, Ordering::Relaxed);
        self.account_memory(&mut guest);
        Ok(guest)
    }

    /// Brings [`CapsuleStats::memory_bytes`] up to date with this instance's memory size.
    fn account_memory(&self, guest: &mut GuestInstance) {
        let now = guest.memory.data_size(&guest.store) as u64;
        if now >= guest.accounted_memory {
            let grown = now - guest.accounted_memory;
            self.stats.memory_bytes.fetch_add(grown, Ordering::Relaxed);
        } else {
            let shrunk = guest.accounted_memory - now;
            self.stats.memory_bytes.fetch_sub(shrunk, Ordering::Relaxed);
        }
        guest.accounted_memory = now;
    }

    /// Drops an instance, taking it out of the counters.
    fn discard(&self, guest: GuestInstance) {
        self.stats
            .memory_bytes
            .fetch_sub(guest.accounted_memory, Ordering::Relaxed);
        self.stats.live_instances.fetch_sub(1, Ordering::Relaxed);
        drop(guest);
    }

    /// Creates instances until `count` are idle (or the pool's bound is reached), so that the
    /// first requests do not pay for instantiation.
    pub fn prewarm(&self, count: usize) -> Result<()> {
        let target = count.min(self.config.max_idle_instances);
        while self.idle_instances() < target {
            let instance = self.instantiate()?;
            self.release(instance);
        }
        Ok(())
    }

    fn acquire(&self) -> Result<GuestInstance> {
        let idle = self.idle.lock().ok().and_then(|mut v| v.pop());
        match idle {
            Some(i) => Ok(i),
            None => self.instantiate(),
        }
    }

    fn release(&self, mut instance: GuestInstance) {
        self.account_memory(&mut instance);
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < self.config.max_idle_instances
        {
            idle.push(instance);
            return;
        }
        self.discard(instance);
    }

    /// Runs one inference: validates the request against the manifest, then runs it in a
    /// warm instance under the deadline and memory cap. A trap discards the instance; the
    /// next call gets a fresh one.
    pub fn infer(&self, inputs: &[NamedTensor]) -> Result<Vec<NamedTensor>> {
        self.infer_with_deadline(inputs, None)
    }

    /// [`Self::infer`] with a deadline for this call only (capped by the capsule's own).
    pub fn infer_with_deadline(
        &self,
        inputs: &[NamedTensor],
        deadline: Option<Duration>,
    ) -> Result<Vec<NamedTensor>> {
        validate_request(&self.image.manifest, inputs, self.config.max_request_bytes)?;
        let request = wire::encode_request(inputs)?;
        let ticks = deadline.map_or(self.deadline_ticks, |d| {
            deadline_ticks(d).min(self.deadline_ticks)
        });
        self.run_encoded(&request, ticks)
    }

    /// Runs an already encoded request (no validation: callers use [`Self::infer`]; this is
    /// the guest's own defense-in-depth path, used by tests of malformed bytes).
    pub fn infer_encoded(&self, request: &[u8]) -> Result<Vec<NamedTensor>> {
        self.run_encoded(request, self.deadline_ticks)
    }

    fn run_encoded(&self, request: &[u8], ticks: u64) -> Result<Vec<NamedTensor>> {
        let mut instance = self.acquire()?;
        let result = instance.run(request, ticks);
        let calls = std::mem::take(&mut instance.store.data_mut().host_kernel_calls);
        self.stats
            .host_kernel_calls
            .fetch_add(calls, Ordering::Relaxed);
        match result {
            Ok(response) => {
                self.release(instance);
                match response {
                    InferResponse::Outputs(outputs) => {
                        self.stats.inferences.fetch_add(1, Ordering::Relaxed);
                        Ok(outputs)
                    }
                    InferResponse::Error(e) => Err(Error::Guest(e)),
                }
            }
            Err(e) => {
                if matches!(e, Error::Trap { .. } | Error::Abi(_)) {
                    self.stats.traps.fetch_add(1, Ordering::Relaxed);
                    // After a trap the instance's state may be poisoned.
                    self.discard(instance);
                } else {
                    self.release(instance);
                }
                Err(e)
            }
        }
    }
}

/// Timing of one cold start.
#[derive(Debug, Clone, Copy)]
pub struct ColdStart {
    /// Fresh instance created from the shared code and the capsule's memory image.
    pub instantiate: Duration,
    /// Instantiation plus the first inference.
    pub first_output: Duration,
}

impl LoadedCapsule {
    /// Measures a cold start: a fresh instance (never taken from or returned to the pool),
    /// then its first inference.
    pub fn cold_start(&self, inputs: &[NamedTensor]) -> Result<ColdStart> {
        validate_request(&self.image.manifest, inputs, self.config.max_request_bytes)?;
        let request = wire::encode_request(inputs)?;
        let started = std::time::Instant::now();
        let mut instance = self.instantiate()?;
        let instantiate = started.elapsed();
        let response = instance.run(&request, self.deadline_ticks);
        // The output is there: tearing the instance down (unmapping its memory, a few
        // milliseconds for a large model) is not part of the wait for it.
        let first_output = started.elapsed();
        self.discard(instance);
        match response? {
            InferResponse::Outputs(_) => Ok(ColdStart {
                instantiate,
                first_output,
            }),
            InferResponse::Error(e) => Err(Error::Guest(e)),
        }
    }
}

impl GuestInstance {
    /// Wraps an instantiated guest, looking up its ABI exports.
    pub(crate) fn new(mut store: Store<StoreData>, instance: Instance) -> Result<GuestInstance> {
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| Error::InvalidCapsule("no exported memory".into()))?;
        store.data_mut().memory = Some(memory);
        fn typed<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
            store: &mut Store<StoreData>,
            instance: &Instance,
            name: &str,
        ) -> Result<TypedFunc<P, R>> {
            instance
                .get_typed_func(&mut *store, name)
                .map_err(|e| Error::InvalidCapsule(format!("export {name:?}: {e:#}")))
        }
        Ok(GuestInstance {
            alloc: typed(&mut store, &instance, "capsule_alloc")?,
            free: typed(&mut store, &instance, "capsule_free")?,
            infer: typed(&mut store, &instance, "capsule_infer")?,
            last_panic: instance
                .get_typed_func(&mut store, "capsule_last_panic")
                .ok(),
            memory,
            instance,
            store,
            accounted_memory: 0,
        })
    }

    /// A typed export.
    pub(crate) fn typed<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
        &mut self,
        name: &str,
    ) -> Result<TypedFunc<P, R>> {
        self.instance
            .get_typed_func(&mut self.store, name)
            .map_err(|e| Error::InvalidCapsule(format!("export {name:?}: {e:#}")))
    }

    /// The store and instance, for the builder's snapshot.
    #[cfg(feature = "builder")]
    pub(crate) fn parts(&mut self) -> (&mut Store<StoreData>, Instance) {
        (&mut self.store, self.instance)
    }

    pub(crate) fn call<R>(
        &mut self,
        f: impl FnOnce(&mut Store<StoreData>) -> wasmtime::Result<R>,
        deadline_ticks: u64,
    ) -> Result<R> {
        self.store.set_epoch_deadline(deadline_ticks);
        match f(&mut self.store) {
            Ok(r) => Ok(r),
            Err(e) => {
                let panic = self.panic_message();
                Err(Error::from_call(e, panic))
            }
        }
    }

    /// The guest's last panic message, read after a trap (the instance is discarded anyway).
    fn panic_message(&mut self) -> Option<String> {
        let f = self.last_panic.clone()?;
        self.store.set_epoch_deadline(2);
        let packed = f.call(&mut self.store, ()).ok()?;
        let (ptr, len) = (packed >> 32, (packed & 0xffff_ffff).min(MAX_PANIC_MESSAGE));
        let bytes = self
            .memory
            .data(&self.store)
            .get(ptr as usize..(ptr + len) as usize)?;
        Some(String::from_utf8_lossy(bytes).into_owned())
    }

    /// Hands `request` to a `(ptr, len) -> packed` export that consumes it, and returns the
    /// response bytes (then frees them in the guest; `zero` first clears them, so that a
    /// builder's snapshot never carries them).
    pub(crate) fn call_export(
        &mut self,
        export: TypedFunc<(u32, u32), u64>,
        request: &[u8],
        deadline_ticks: u64,
        zero: bool,
    ) -> Result<Vec<u8>> {
        let len = u32::try_from(request.len()).map_err(|_| Error::RequestTooLarge {
            size: request.len() as u64,
            limit: u64::from(u32::MAX),
        })?;
        let alloc = self.alloc.clone();
        let ptr = self.call(|s| alloc.call(s, (len, 1)), deadline_ticks)?;
        if ptr == 0 {
            return Err(Error::Trap {
                kind: TrapKind::Unreachable,
                message: format!("guest could not allocate {len} bytes"),
            });
        }
        self.memory
            .write(&mut self.store, ptr as usize, request)
            .map_err(|e| abi(format!("request buffer: {e}")))?;
        let packed = self.call(|s| export.call(s, (ptr, len)), deadline_ticks)?;
        let (out_ptr, out_len) = ((packed >> 32) as u32, (packed & 0xffff_ffff) as u32);
        if out_len as usize > wire::MAX_MESSAGE_BYTES {
            return Err(abi(format!("response of {out_len} bytes")));
        }
        let end = (out_ptr as usize)
            .checked_add(out_len as usize)
            .ok_or_else(|| abi("response pointer overflows"))?;
        let region = self
            .memory
            .data_mut(&mut self.store)
            .get_mut(out_ptr as usize..end)
            .ok_or_else(|| abi("response outside memory"))?;
        let bytes = region.to_vec();
        if zero {
            region.fill(0);
        }
        let free = self.free.clone();
        self.call(|s| free.call(s, (out_ptr, out_len, 1)), deadline_ticks)?;
        Ok(bytes)
    }

    pub(crate) fn run(&mut self, request: &[u8], deadline_ticks: u64) -> Result<InferResponse> {
        let infer = self.infer.clone();
        let bytes = self.call_export(infer, request, deadline_ticks, false)?;
        wire::decode(&bytes, "inference response").map_err(|e| abi(e.to_string()))
    }
}
