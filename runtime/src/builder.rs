//! The capsule builder: loads a model inside the guest, snapshots the initialized instance
//! (wizer-style pre-initialization), and writes the manifest.
//!
//! The guest is instrumented and compiled **once** per builder (and cached on disk by the
//! engine); each model is then a fresh instantiation, one `capsule_build` call and a memory
//! snapshot, which takes milliseconds. wizer's stock driver would instrument and recompile
//! the whole guest for every model instead.

use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use capsule_format::manifest::{
    GoldenSample, HostKernels, Limits, ModelCard, Numerics, SourceModel,
};
use capsule_format::wire::{
    self, BuildReport, BuildRequest, BuildResponse, InputShape, OneRowPlan,
};
use capsule_format::{CapsuleManifest, MANIFEST_SECTION, Pipeline};
use sha2::{Digest, Sha256};
use wasmtime::{Instance, Module, Store};
use wasmtime_wizer::{InstanceState, ModuleContext, SnapshotVal, ValType, Wizer};

use crate::engine::{CapsuleEngine, EPOCH_TICK};
use crate::instance::{GuestInstance, LoadedCapsule, RunConfig, StoreData, new_store};
use crate::{Error, Result, golden};

/// Time budget of loading one model inside the guest at build time.
const BUILD_DEADLINE: Duration = Duration::from_secs(600);

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Model name.
    pub name: String,
    /// Model version.
    pub version: semver::Version,
    /// The ONNX model.
    pub model: Vec<u8>,
    /// Shapes fixed by the user.
    pub input_shapes: Vec<InputShape>,
    /// The model card.
    pub card: ModelCard,
    /// Class labels.
    pub labels: Vec<String>,
    /// Golden samples, verified against the built capsule before it is returned.
    pub golden: Vec<GoldenSample>,
    /// Limits recorded in the manifest.
    pub limits: Limits,
    /// Preprocessing and postprocessing compiled into the capsule.
    pub pipeline: Option<Pipeline>,
    /// Training data whose statistics the manifest carries, for drift detection, and what
    /// they may reveal of it.
    pub reference: Option<crate::reference::Reference>,
    /// Whether the model gets a second plan for batches of one.
    pub one_row_plan: OneRowPlan,
}

/// A built capsule and what it took.
#[derive(Debug)]
pub struct BuiltCapsule {
    /// The `.capsule.wasm` bytes.
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`.
    pub sha256: String,
    /// The manifest written into it.
    pub manifest: CapsuleManifest,
    /// What the guest reported about the model.
    pub report: BuildReport,
    /// Time spent loading and optimizing the model inside the guest.
    pub load_time: Duration,
    /// Time spent taking the snapshot and writing the module.
    pub snapshot_time: Duration,
    /// Time spent installing the capsule and running its golden samples.
    pub verify_time: Duration,
    /// Bytes of non-zero memory in the snapshot.
    pub image_bytes: usize,
    /// The capsule, installed on the builder's engine (its golden samples passed).
    pub capsule: LoadedCapsule,
}

/// Builds capsules from the guest this runtime carries.
pub struct CapsuleBuilder {
    engine: Arc<CapsuleEngine>,
    guest_sha256: String,
    numerics: Numerics,
    host_kernels: HostKernels,
    cx: ModuleContext<'static>,
    instrumented: Module,
    wizer: Wizer,
}

impl std::fmt::Debug for CapsuleBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CapsuleBuilder")
            .field("guest_sha256", &self.guest_sha256)
            .field("numerics", &self.numerics)
            .finish()
    }
}

/// Whether a guest build uses relaxed-simd instructions: it validates without them, or only
/// with them. Read from the code itself, so a manifest cannot claim bit-identical results
/// for a guest that fuses multiply-adds.
fn numerics_of(guest: &[u8]) -> Result<Numerics> {
    use wasmparser::{Validator, WasmFeatures};
    let strict = WasmFeatures::default().difference(WasmFeatures::RELAXED_SIMD);
    if Validator::new_with_features(strict)
        .validate_all(guest)
        .is_ok()
    {
        return Ok(Numerics::Deterministic);
    }
    Validator::new_with_features(WasmFeatures::default())
        .validate_all(guest)
        .map_err(|e| Error::Build(format!("the guest is not valid WebAssembly: {e}")))?;
    Ok(Numerics::RelaxedSimd)
}

/// Whether a guest build imports the host kernels (and nothing else, which `CapsuleImage`
/// checks again on every capsule). Read from the code, as [`numerics_of`] is.
fn host_kernels_of(guest: &[u8]) -> Result<HostKernels> {
    let mut imported = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(guest) {
        let payload = payload
            .map_err(|e| Error::Build(format!("the guest is not valid WebAssembly: {e}")))?;
        if let wasmparser::Payload::ImportSection(reader) = payload {
            for import in reader.into_imports() {
                let import = import.map_err(|e| {
                    Error::Build(format!("the guest is not valid WebAssembly: {e}"))
                })?;
                if !crate::host_kernels::importable(import.module, import.name, &import.ty) {
                    return Err(Error::Build(format!(
                        "the guest imports {:?}::{:?}: a capsule's code may import only the host kernels",
                        import.module, import.name
                    )));
                }
                imported.push(import.name.to_owned());
            }
        }
    }
    // The newest version whose functions cover the imports.
    Ok([HostKernels::None, HostKernels::V1, HostKernels::V2]
        .into_iter()
        .find(|v| {
            imported
                .iter()
                .all(|name| v.imports().contains(&name.as_str()))
        })
        .unwrap_or(HostKernels::V2))
}

struct SnapshotSource<'a> {
    store: &'a mut Store<StoreData>,
    instance: Instance,
    missing: Vec<String>,
}

impl InstanceState for SnapshotSource<'_> {
    async fn global_get(&mut self, name: &str, _: ValType) -> SnapshotVal {
        let value = self
            .instance
            .get_global(&mut *self.store, name)
            .map(|g| g.get(&mut *self.store));
        match value {
            Some(wasmtime::Val::I32(x)) => SnapshotVal::I32(x),
            Some(wasmtime::Val::I64(x)) => SnapshotVal::I64(x),
            Some(wasmtime::Val::F32(x)) => SnapshotVal::F32(x),
            Some(wasmtime::Val::F64(x)) => SnapshotVal::F64(x),
            Some(wasmtime::Val::V128(x)) => SnapshotVal::V128(x.as_u128()),
            _ => {
                self.missing.push(name.to_owned());
                SnapshotVal::I32(0)
            }
        }
    }

    async fn memory_contents(&mut self, name: &str, contents: impl FnOnce(&[u8]) + Send) {
        match self.instance.get_memory(&mut *self.store, name) {
            Some(memory) => contents(memory.data(&*self.store)),
            None => self.missing.push(name.to_owned()),
        }
    }
}

/// Polls a future that never waits (our [`InstanceState`] is synchronous).
fn resolve<F: std::future::Future>(future: F) -> Result<F::Output> {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(v) => Ok(v),
        Poll::Pending => Err(Error::Build(
            "the snapshot did not complete synchronously".into(),
        )),
    }
}

impl CapsuleBuilder {
    /// A builder for the guest this runtime carries ([`crate::GUEST_WASM`]).
    pub fn new(engine: &Arc<CapsuleEngine>) -> Result<CapsuleBuilder> {
        Self::with_guest(engine, crate::GUEST_WASM)
    }

    /// A builder for another guest build.
    pub fn with_guest(engine: &Arc<CapsuleEngine>, guest: &'static [u8]) -> Result<CapsuleBuilder> {
        let mut wizer = Wizer::new();
        wizer.init_func("capsule_init").keep_init_func(true);
        let (cx, instrumented) = wizer
            .instrument(guest)
            .map_err(|e| Error::Build(format!("instrumenting the guest: {e:#}")))?;
        let instrumented = engine.module(&instrumented)?;
        Ok(CapsuleBuilder {
            engine: Arc::clone(engine),
            guest_sha256: hex::encode(Sha256::digest(guest)),
            numerics: numerics_of(guest)?,
            host_kernels: host_kernels_of(guest)?,
            cx,
            instrumented,
            wizer,
        })
    }

    /// SHA-256 of the guest build.
    pub fn guest_sha256(&self) -> &str {
        &self.guest_sha256
    }

    /// A fresh instance of the instrumented guest with the model loaded in it (constructors
    /// run, `capsule_build` done): the state the snapshot captures.
    fn load_in_guest(
        &self,
        model: Vec<u8>,
        input_shapes: &[InputShape],
        pipeline: Option<&Pipeline>,
        labels: &[String],
        one_row_plan: OneRowPlan,
    ) -> Result<(GuestInstance, BuildReport)> {
        let deadline = (BUILD_DEADLINE.as_micros() / EPOCH_TICK.as_micros()) as u64;
        // Host kernels off: the snapshot is taken here, and nothing a node decides may be in it.
        let mut store = new_store(
            &self.engine,
            self.engine.config().max_memory_bytes,
            deadline,
            HostKernels::None,
        );
        let instance = self
            .engine
            .linker()
            .instantiate(&mut store, &self.instrumented)
            .map_err(Error::wasmtime)?;
        let mut guest = GuestInstance::new(store, instance)?;
        let crashed = |e: Error| match e {
            Error::Trap { message, .. } => Error::Build(format!(
                "the guest crashed while loading the model: {message}"
            )),
            other => other,
        };
        let initialize = guest.typed::<(), ()>("_initialize")?;
        guest
            .call(|s| initialize.call(s, ()), deadline)
            .map_err(crashed)?;
        let build = guest.typed::<(u32, u32), u64>("capsule_build")?;
        let request = wire::encode(
            &BuildRequest {
                model,
                input_shapes: input_shapes.to_vec(),
                pipeline: pipeline.cloned(),
                labels: labels.to_vec(),
                one_row_plan,
            },
            "build request",
        )?;
        let response = guest
            .call_export(build, &request, deadline, true)
            .map_err(crashed)?;
        match wire::decode::<BuildResponse>(&response, "build response")? {
            BuildResponse::Ready(report) => Ok((guest, report)),
            BuildResponse::Error(e) => Err(Error::Build(e.message)),
        }
    }

    /// Cold start without a snapshot, for comparison: a fresh guest instance loads the model
    /// from its bytes, then runs its first inference. Returns the time to the first output.
    pub fn cold_start_without_snapshot(
        &self,
        model: &[u8],
        input_shapes: &[InputShape],
        inputs: &[capsule_format::NamedTensor],
    ) -> Result<Duration> {
        let request = wire::encode_request(inputs)?;
        let started = Instant::now();
        let (mut guest, _) = self.load_in_guest(
            model.to_vec(),
            input_shapes,
            None,
            &[],
            OneRowPlan::default(),
        )?;
        let deadline = (BUILD_DEADLINE.as_micros() / EPOCH_TICK.as_micros()) as u64;
        match guest.run(&request, deadline)? {
            capsule_format::wire::InferResponse::Outputs(_) => Ok(started.elapsed()),
            capsule_format::wire::InferResponse::Error(e) => Err(Error::Guest(e)),
        }
    }

    /// Loads the model in a fresh guest instance, snapshots it, writes the manifest, then
    /// installs the result and checks its golden samples.
    pub fn build(&self, options: BuildOptions) -> Result<BuiltCapsule> {
        let started = Instant::now();
        let source = SourceModel {
            format: "onnx".into(),
            sha256: hex::encode(Sha256::digest(&options.model)),
            size_bytes: options.model.len() as u64,
        };
        let pipeline = options.pipeline.filter(|p| !p.is_empty());
        let (mut guest, report) = self.load_in_guest(
            options.model,
            &options.input_shapes,
            pipeline.as_ref(),
            &options.labels,
            options.one_row_plan,
        )?;
        // The guest validated the same spec against the same signature; resolving it here
        // gives the stored form and the capsule's external signature.
        let (pipeline, signature) = match pipeline {
            Some(p) => {
                let (resolved, signature) = p
                    .resolve(&report.inputs, &report.outputs, &options.labels)
                    .map_err(|e| Error::Build(e.to_string()))?;
                (Some(resolved), signature)
            }
            None => (
                None,
                capsule_format::pipeline::Signature {
                    inputs: report.inputs.clone(),
                    outputs: report.outputs.clone(),
                },
            ),
        };
        let reference = options
            .reference
            .as_ref()
            .map(|r| {
                r.data
                    .statistics(&signature.inputs, pipeline.as_ref(), &r.privacy)
            })
            .transpose()?;
        let load_time = started.elapsed();

        let snapshot_started = Instant::now();
        let (store, instance) = guest.parts();
        let mut state = SnapshotSource {
            store,
            instance,
            missing: Vec::new(),
        };
        let mut bytes = resolve(self.wizer.snapshot(&self.cx, &mut state))?
            .map_err(|e| Error::Build(format!("snapshot: {e:#}")))?;
        if !state.missing.is_empty() {
            return Err(Error::Build(format!(
                "snapshot could not read {:?}",
                state.missing
            )));
        }
        let created_at_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let manifest = CapsuleManifest {
            name: options.name,
            version: options.version,
            abi_version: capsule_format::ABI_VERSION,
            created_at_unix,
            builder_version: env!("CARGO_PKG_VERSION").to_owned(),
            guest_sha256: self.guest_sha256.clone(),
            source,
            inputs: signature.inputs,
            outputs: signature.outputs,
            model_inputs: report.inputs.clone(),
            model_outputs: report.outputs.clone(),
            pipeline,
            labels: options.labels,
            card: options.card,
            golden: options.golden,
            limits: options.limits,
            reference,
            numerics: self.numerics,
            host_kernels: self.host_kernels,
        };
        let section = wasm_encoder::CustomSection {
            name: MANIFEST_SECTION.into(),
            data: manifest.to_section_bytes()?.into(),
        };
        wasm_encoder::Section::append_to(&section, &mut bytes);
        let snapshot_time = snapshot_started.elapsed();

        let verify_started = Instant::now();
        let capsule = LoadedCapsule::load(&self.engine, bytes.clone(), RunConfig::default())?;
        for sample in &manifest.golden {
            golden::check(&capsule, sample)?;
        }
        if self.engine.host_kernels() && manifest.host_kernels != HostKernels::None {
            // The samples above ran on this machine's native kernels; browsers and nodes
            // without them run every product in wasm: check that path too.
            let portable = LoadedCapsule::load(
                &self.engine,
                bytes.clone(),
                RunConfig {
                    host_kernels: false,
                    ..RunConfig::default()
                },
            )?;
            for sample in &manifest.golden {
                golden::check(&portable, sample).map_err(|e| match e {
                    Error::GoldenMismatch { sample, reason } => Error::GoldenMismatch {
                        sample,
                        reason: format!("{reason} (without host kernels, as browsers run it)"),
                    },
                    other => other,
                })?;
            }
        }
        let image_bytes = capsule.image().image_bytes();
        Ok(BuiltCapsule {
            sha256: capsule.image().sha256.clone(),
            bytes,
            manifest,
            report,
            load_time,
            snapshot_time,
            verify_time: verify_started.elapsed(),
            image_bytes,
            capsule,
        })
    }
}
