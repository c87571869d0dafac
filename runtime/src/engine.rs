//! The one place that owns wasmtime's configuration: compilation policy, limits, epochs,
//! pooling, and the on-disk cache of compiled guest code.
//!
//! Precompiled code is only ever loaded from this process's own cache directory, from files
//! it wrote itself after compiling (wasmtime's `Module::deserialize_file` runs whatever it is
//! given, so bytes from anywhere else are never deserialized).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::{
    Config, Engine, InstanceAllocationStrategy, Module, OptLevel, PoolingAllocationConfig, Strategy,
};

use crate::{Error, Result};

/// How often the epoch ticker advances the engine's epoch: the granularity of deadlines.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Directory of the compiled-code cache; `None` keeps compiled code in memory only.
    pub cache_dir: Option<PathBuf>,
    /// Map each capsule's memory image copy-on-write into its instances (Linux): a fresh
    /// instance costs microseconds whatever the model's size. Instances then come from
    /// on-demand allocation, and `pooling` applies only where this is unavailable.
    pub copy_on_write: bool,
    /// Try the pooling allocator (falls back to on-demand allocation when it cannot reserve
    /// its address space, as on 39-bit ARM boards).
    pub pooling: bool,
    /// Instance slots of the pooling allocator.
    pub pool_slots: u32,
    /// Largest linear memory any guest may have (also the `StoreLimits` cap ceiling).
    pub max_memory_bytes: u64,
    /// Let capsules that can ([`capsule_format::HostKernels`] other than `None`) hand dense matrix products
    /// to this machine's native kernels ([`crate::host_kernels`]); in effect only where the
    /// machine has them (x86-64 with AVX2 and FMA).
    pub host_kernels: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            cache_dir: default_cache_dir(),
            copy_on_write: true,
            pooling: true,
            pool_slots: 64,
            max_memory_bytes: 4 << 30,
            host_kernels: true,
        }
    }
}

/// `$CAPSULE_CACHE_DIR`, else `$XDG_CACHE_HOME/capsule`, else `~/.cache/capsule`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("CAPSULE_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("capsule"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("capsule"))
}

/// Counters of what the engine did, for tests, benches and metrics.
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Cranelift compilations (every compile goes through [`CapsuleEngine::module`]).
    pub compilations: AtomicU64,
    /// Modules loaded from the on-disk cache.
    pub disk_cache_hits: AtomicU64,
    /// Modules found already loaded in memory.
    pub memory_cache_hits: AtomicU64,
}

/// One thread advances the epoch of every live engine of the process every [`EPOCH_TICK`]:
/// a process with many engines (a test or benchmark that runs a hundred nodes) wakes once per
/// tick, not once per engine. The thread ends when no engine is left, and the next engine
/// starts it again.
mod epoch_ticker {
    use std::sync::Mutex;

    use wasmtime::{Engine, EngineWeak};

    use super::EPOCH_TICK;
    use crate::{Error, Result};

    /// The engines, and whether the thread runs.
    static ENGINES: Mutex<(Vec<EngineWeak>, bool)> = Mutex::new((Vec::new(), false));

    pub(super) fn register(engine: &Engine) -> Result<()> {
        let mut state = ENGINES.lock().unwrap_or_else(|p| p.into_inner());
        state.0.push(engine.weak());
        if !state.1 {
            std::thread::Builder::new()
                .name("capsule-epoch".into())
                .spawn(tick)
                .map_err(Error::io("starting the epoch ticker thread"))?;
            state.1 = true;
        }
        Ok(())
    }

    fn tick() {
        loop {
            {
                let mut state = ENGINES.lock().unwrap_or_else(|p| p.into_inner());
                state.0.retain(|weak| match weak.upgrade() {
                    Some(engine) => {
                        engine.increment_epoch();
                        true
                    }
                    None => false,
                });
                if state.0.is_empty() {
                    state.1 = false;
                    return;
                }
            }
            std::thread::sleep(EPOCH_TICK);
        }
    }
}

/// A configured wasmtime engine with its epoch ticker and compiled-code caches.
#[derive(Debug)]
pub struct CapsuleEngine {
    engine: Engine,
    config: EngineConfig,
    pooling: bool,
    copy_on_write: bool,
    host_kernels: bool,
    linker: wasmtime::Linker<crate::instance::StoreData>,
    fingerprint: String,
    modules: Mutex<HashMap<String, Module>>,
    loading: Mutex<()>,
    stats: EngineStats,
}

/// How instances get their linear memories.
enum Memories<'a> {
    /// Copy-on-write images through [`crate::cow::CowMemoryCreator`].
    #[cfg(target_os = "linux")]
    CopyOnWrite,
    /// wasmtime's pooling allocator, sized by the engine settings.
    Pooling(&'a EngineConfig),
    /// wasmtime's on-demand allocation.
    OnDemand,
}

fn wasmtime_config(memories: Memories<'_>) -> Config {
    let mut config = Config::new();
    config
        .strategy(Strategy::Cranelift)
        .cranelift_opt_level(OptLevel::Speed)
        .wasm_simd(true)
        // Fast guests (`Numerics::RelaxedSimd`) use relaxed_madd; deterministic ones contain
        // no relaxed instruction (their builder checks the code), so enabling the proposal
        // changes nothing for them. Non-deterministic lowering: fused multiply-add where the
        // CPU has it, which is the point.
        .wasm_relaxed_simd(true)
        .relaxed_simd_deterministic(false)
        .epoch_interruption(true)
        .parallel_compilation(true);
    if let Some(profiler) = profiler_from_env() {
        config.profiler(profiler);
    }
    match memories {
        #[cfg(target_os = "linux")]
        Memories::CopyOnWrite => {
            // wasmtime's own copy-on-write initialization (from a module's data segments,
            // used by the builder's instrumented guest) needs its own mmap-based memories;
            // with a memory creator, data segments are copied instead.
            config
                .with_host_memory(Arc::new(crate::cow::CowMemoryCreator))
                .memory_init_cow(false);
        }
        Memories::Pooling(c) => {
            let mut pool = PoolingAllocationConfig::default();
            pool.total_core_instances(c.pool_slots)
                .total_memories(c.pool_slots)
                .total_tables(c.pool_slots)
                .max_memory_size(usize::try_from(c.max_memory_bytes).unwrap_or(usize::MAX))
                .table_elements(100_000);
            config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        }
        Memories::OnDemand => {}
    }
    config
}

impl CapsuleEngine {
    /// Creates the engine and registers it with the process's epoch ticker (one thread for
    /// every engine; it stops when the last engine is dropped).
    pub fn new(config: EngineConfig) -> Result<Arc<CapsuleEngine>> {
        let copy_on_write = cfg!(target_os = "linux") && config.copy_on_write;
        let (engine, pooling) = if copy_on_write {
            #[cfg(target_os = "linux")]
            let memories = Memories::CopyOnWrite;
            #[cfg(not(target_os = "linux"))]
            let memories = Memories::OnDemand;
            let engine = Engine::new(&wasmtime_config(memories)).map_err(Error::wasmtime)?;
            (engine, false)
        } else {
            match config
                .pooling
                .then(|| Engine::new(&wasmtime_config(Memories::Pooling(&config))))
            {
                Some(Ok(engine)) => (engine, true),
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "pooling allocator unavailable; using on-demand allocation");
                    (
                        Engine::new(&wasmtime_config(Memories::OnDemand))
                            .map_err(Error::wasmtime)?,
                        false,
                    )
                }
                None => (
                    Engine::new(&wasmtime_config(Memories::OnDemand)).map_err(Error::wasmtime)?,
                    false,
                ),
            }
        };
        let mut h = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        let fingerprint = format!(
            "wasmtime-48.0.8-{}-{:016x}",
            std::env::consts::ARCH,
            h.finish()
        );
        let linker = crate::host_kernels::linker(&engine)?;
        let host_kernels = config.host_kernels && crate::host_kernels::supported_here();
        epoch_ticker::register(&engine)?;
        Ok(Arc::new(CapsuleEngine {
            engine,
            config,
            pooling,
            copy_on_write,
            host_kernels,
            linker,
            fingerprint,
            modules: Mutex::new(HashMap::new()),
            loading: Mutex::new(()),
            stats: EngineStats::default(),
        }))
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Whether the pooling allocator is in use.
    pub fn pooling(&self) -> bool {
        self.pooling
    }

    /// Whether capsules that can use host kernels do (on in the config and supported here).
    pub fn host_kernels(&self) -> bool {
        self.host_kernels
    }

    /// The linker every instance is made with (the `capsule_kernels` import).
    pub(crate) fn linker(&self) -> &wasmtime::Linker<crate::instance::StoreData> {
        &self.linker
    }

    /// Whether instances map their capsule's memory image copy-on-write.
    pub fn copy_on_write(&self) -> bool {
        self.copy_on_write
    }

    /// The settings.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// What the engine did so far.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Number of Cranelift compilations so far.
    pub fn compilations(&self) -> u64 {
        self.stats.compilations.load(Ordering::Relaxed)
    }

    /// Identifies compiled code compatible with this engine (wasmtime version, target and
    /// every setting that changes code generation).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// The compiled module for `wasm`: from memory, else from the disk cache, else compiled
    /// with Cranelift (and written to the cache). The key is the SHA-256 of `wasm` plus the
    /// engine fingerprint.
    pub fn module(&self, wasm: &[u8]) -> Result<Module> {
        self.module_with_sha256(wasm, hex::encode(Sha256::digest(wasm)))
    }

    /// [`Self::module`] for a caller that already hashed `wasm` (`CapsuleImage::parse` does),
    /// so installing a capsule hashes its code once. `key` must be the SHA-256 of `wasm`.
    pub(crate) fn module_with_sha256(&self, wasm: &[u8], key: String) -> Result<Module> {
        // One load or compile at a time: threads asking for the same guest build wait for
        // the first one instead of compiling it again.
        let _loading = self.loading.lock().map_err(|_| poisoned())?;
        if let Some(m) = self.modules.lock().map_err(|_| poisoned())?.get(&key) {
            self.stats.memory_cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(m.clone());
        }
        let path = self
            .config
            .cache_dir
            .as_ref()
            .map(|d| d.join(format!("{key}-{}.cwasm", self.fingerprint)));
        if let Some(path) = &path
            && path.exists()
        {
            // SAFETY: the file is in our own cache directory, named by the hash of the wasm it
            // was compiled from, and was written by `store` below after a Cranelift compile
            // by this same engine configuration (the fingerprint is in its name).
            match unsafe { Module::deserialize_file(&self.engine, path) } {
                Ok(m) => {
                    self.stats.disk_cache_hits.fetch_add(1, Ordering::Relaxed);
                    self.remember(key, &m)?;
                    return Ok(m);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "ignoring unusable cache entry")
                }
            }
        }
        let module = Module::new(&self.engine, wasm).map_err(Error::wasmtime)?;
        self.stats.compilations.fetch_add(1, Ordering::Relaxed);
        if let Some(path) = &path
            && let Err(e) = store(&module, path)
        {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the compiled-code cache");
        }
        self.remember(key, &module)?;
        Ok(module)
    }

    fn remember(&self, key: String, module: &Module) -> Result<()> {
        self.modules
            .lock()
            .map_err(|_| poisoned())?
            .insert(key, module.clone());
        Ok(())
    }
}

/// `CAPSULE_WASM_PROFILER=perfmap` (or `jitdump`, where wasmtime was built with it) makes
/// compiled guest code visible to `perf`: /tmp/perf-PID.map names each guest function (from
/// the guest's name section when it has one; `guest-profile` builds keep it).
fn profiler_from_env() -> Option<wasmtime::ProfilingStrategy> {
    match std::env::var("CAPSULE_WASM_PROFILER").ok()?.as_str() {
        "perfmap" => Some(wasmtime::ProfilingStrategy::PerfMap),
        "jitdump" => Some(wasmtime::ProfilingStrategy::JitDump),
        other => {
            tracing::warn!(
                value = other,
                "CAPSULE_WASM_PROFILER is not perfmap or jitdump; ignored"
            );
            None
        }
    }
}

fn poisoned() -> Error {
    Error::Poisoned("module cache")
}

/// Writes a compiled module atomically (temporary file, then rename), so a crash never
/// leaves a half-written cache entry.
fn store(module: &Module, path: &Path) -> Result<()> {
    let bytes = module.serialize().map_err(Error::wasmtime)?;
    let dir = path
        .parent()
        .ok_or_else(|| Error::InvalidCapsule("cache path has no parent".into()))?;
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(Error::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("renaming {}", tmp.display())))
}
