//! Capsule's browser core, compiled to WebAssembly with wasm-bindgen and used by the
//! `capsule-sdk` npm package (in its Web Worker). It reuses `capsule-format`, so a browser
//! decodes manifests, verifies update metadata (after TUF), encodes guest ABI requests and
//! counts telemetry exactly as an edge node does.
//!
//! Every function has a plain Rust form (tested natively) and a `#[wasm_bindgen]` wrapper.
//! Errors reach JavaScript as `Error`s whose message starts with their kind
//! (`verification failed:`, `invalid capsule:`, `invalid request:`, `model error:`).

use std::collections::BTreeMap;

use capsule_format::telemetry::{self, ModelWindow, Prediction, TelemetryBatch};
use capsule_format::tuf::{self, PublicKey, Role, Root, Signed, Target, Targets};
use capsule_format::wire::{self, InferResponse};
use capsule_format::{CapsuleManifest, DType, NamedTensor, Tensor};
use sha2::{Digest, Sha256};
use wasm_bindgen::prelude::*;

/// Errors of the browser core.
#[derive(Debug, thiserror::Error)]
pub enum SdkError {
    /// Signed metadata or a capsule that does not verify.
    #[error("verification failed: {0}")]
    Verification(String),
    /// A capsule or manifest that cannot be read.
    #[error("invalid capsule: {0}")]
    Capsule(String),
    /// A request that does not fit the capsule.
    #[error("invalid request: {0}")]
    Request(String),
    /// The model refused the request (the guest's typed error).
    #[error("model error: {0}")]
    Model(String),
}

/// Result with [`SdkError`].
pub type Result<T> = std::result::Result<T, SdkError>;

fn js(e: SdkError) -> JsError {
    JsError::new(&e.to_string())
}

/// A byte length given by JavaScript (a number): a whole, non-negative one.
fn byte_length(length: f64) -> std::result::Result<u64, JsError> {
    if length >= 0.0 && length.fract() == 0.0 && length <= u64::MAX as f64 {
        Ok(length as u64)
    } else {
        Err(js(SdkError::Verification(format!(
            "{length} is not a length"
        ))))
    }
}

/// SHA-256 of `bytes`, lowercase hex.
#[wasm_bindgen(js_name = sha256Hex)]
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Decodes the `capsule.manifest` custom section (from
/// `WebAssembly.Module.customSections`) into the manifest.
pub fn manifest(section: &[u8]) -> Result<CapsuleManifest> {
    CapsuleManifest::from_section_bytes(section).map_err(|e| SdkError::Capsule(e.to_string()))
}

/// The manifest of a `capsule.manifest` section, as JSON.
#[wasm_bindgen(js_name = decodeManifest)]
pub fn decode_manifest(section: &[u8]) -> std::result::Result<String, JsError> {
    Manifest::new(section).map(|m| m.json())
}

/// Targets metadata that verified: the capsules a publisher approved.
#[wasm_bindgen]
#[derive(Debug, Clone)]
pub struct Verified {
    targets: Targets,
}

/// A root that trusts `keys` (hex ed25519 public keys) to sign targets, `threshold` of them.
pub fn root_of_keys(keys: &[String], threshold: u32) -> Result<Root> {
    if keys.is_empty() || threshold == 0 || threshold as usize > keys.len() {
        return Err(SdkError::Verification(format!(
            "{} public keys with threshold {threshold}",
            keys.len()
        )));
    }
    let mut map = BTreeMap::new();
    for k in keys {
        let key = PublicKey {
            keytype: "ed25519".into(),
            public: k.trim().to_lowercase(),
        };
        map.insert(key.keyid(), key);
    }
    let ids: Vec<String> = map.keys().cloned().collect();
    let mut roles = BTreeMap::new();
    roles.insert(
        "targets".to_owned(),
        Role {
            keyids: ids.clone(),
            threshold,
        },
    );
    roles.insert(
        "root".to_owned(),
        Role {
            keyids: ids,
            threshold,
        },
    );
    Ok(Root {
        kind: "root".into(),
        version: 1,
        expires: u64::MAX,
        keys: map,
        roles,
    })
}

fn refuse(e: capsule_format::Error) -> SdkError {
    SdkError::Verification(e.to_string())
}

/// Verifies signed targets metadata against a root (TUF 5.6: threshold of valid signatures
/// by the root's targets keys, expiry, no version below `trusted_version`).
pub fn verify(
    root: &Root,
    targets_json: &[u8],
    trusted_version: Option<u64>,
    now_s: u64,
) -> Result<Verified> {
    let signed: Signed<Targets> = tuf::parse(targets_json, "targets").map_err(refuse)?;
    let targets = tuf::verify_targets(root, trusted_version, &signed, now_s).map_err(refuse)?;
    Ok(Verified { targets })
}

fn trusted(v: f64) -> Option<u64> {
    (v.is_finite() && v >= 1.0).then_some(v as u64)
}

/// Verifies targets metadata signed by `threshold` of these publisher keys.
#[wasm_bindgen(js_name = verifyWithKeys)]
pub fn verify_with_keys(
    targets_json: &[u8],
    public_keys: Vec<String>,
    threshold: u32,
    trusted_version: f64,
    now_s: f64,
) -> std::result::Result<Verified, JsError> {
    let root = root_of_keys(&public_keys, threshold).map_err(js)?;
    verify(&root, targets_json, trusted(trusted_version), now_s as u64).map_err(js)
}

/// Verifies targets metadata against pinned root metadata (as nodes do).
#[wasm_bindgen(js_name = verifyWithRoot)]
pub fn verify_with_root(
    root_json: &[u8],
    targets_json: &[u8],
    trusted_version: f64,
    now_s: f64,
) -> std::result::Result<Verified, JsError> {
    let signed: Signed<Root> = tuf::parse(root_json, "root").map_err(|e| js(refuse(e)))?;
    let root = tuf::trust_root(&signed, now_s as u64).map_err(|e| js(refuse(e)))?;
    verify(&root, targets_json, trusted(trusted_version), now_s as u64).map_err(js)
}

impl Verified {
    /// The approved target of a model version.
    pub fn target(&self, model: &str, version: &str) -> Option<&Target> {
        self.targets.targets.get(&tuf::target_path(model, version))
    }

    /// The newest approved version of `model` (semver order), among its capsules (not the
    /// model images and code modules signed beside them).
    pub fn latest(&self, model: &str) -> Option<&Target> {
        self.targets
            .targets
            .iter()
            .filter(|(path, t)| t.model == model && **path == tuf::target_path(model, &t.version))
            .map(|(_, t)| t)
            .max_by(|a, b| {
                match (
                    semver::Version::parse(&a.version),
                    semver::Version::parse(&b.version),
                ) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    _ => a.version.cmp(&b.version),
                }
            })
    }

    /// Checks capsule bytes against the approved target (TUF 5.7.3: length, then hash).
    pub fn check(&self, model: &str, version: &str, bytes: &[u8]) -> Result<()> {
        let (path, target) = self.approved(model, version)?;
        tuf::verify_target(&path, target, bytes).map_err(refuse)
    }

    /// The same check as [`Verified::check`] for bytes hashed elsewhere (the browser's native
    /// SHA-256): `length` bytes whose SHA-256 is `sha256` (lowercase hex).
    pub fn check_digest(
        &self,
        model: &str,
        version: &str,
        length: u64,
        sha256: &str,
    ) -> Result<()> {
        let (path, target) = self.approved(model, version)?;
        tuf::verify_target_hashed(&path, target, length, sha256).map_err(refuse)
    }

    /// The split form of a model version, when its publisher signed one: the image's target
    /// and the code's, paired by `tuf::image_and_code` (the image only with the code its
    /// target names, itself signed with that hash). `None` when no image is signed; an error
    /// when one is but its code is not.
    pub fn split(&self, model: &str, version: &str) -> Result<Option<(&Target, &Target)>> {
        let path = tuf::image_target_path(model, version);
        if !self.targets.targets.contains_key(&path) {
            return Ok(None);
        }
        tuf::image_and_code(&self.targets, &path)
            .map(Some)
            .map_err(refuse)
    }

    /// Checks bytes hashed elsewhere against the approved target at `path` (a model image or
    /// a code module).
    pub fn check_path_digest(&self, path: &str, length: u64, sha256: &str) -> Result<()> {
        let target = self.targets.targets.get(path).ok_or_else(|| {
            SdkError::Verification(format!("{path} is not in the signed targets"))
        })?;
        tuf::verify_target_hashed(path, target, length, sha256).map_err(refuse)
    }

    /// The target path of a model version and its approved target.
    fn approved(&self, model: &str, version: &str) -> Result<(String, &Target)> {
        let path = tuf::target_path(model, version);
        match self.target(model, version) {
            Some(target) => Ok((path, target)),
            None => Err(SdkError::Verification(format!(
                "{path} is not in the signed targets"
            ))),
        }
    }
}

#[wasm_bindgen]
impl Verified {
    /// The metadata's version.
    #[wasm_bindgen(getter)]
    pub fn version(&self) -> f64 {
        self.targets.version as f64
    }

    /// `{"model", "version", "sha256", "length"}` of the approved target of `model`:
    /// `version`, or the newest when it is empty; `undefined` when there is none.
    #[wasm_bindgen(js_name = targetOf)]
    pub fn target_of(&self, model: &str, version: &str) -> Option<String> {
        let t = if version.is_empty() {
            self.latest(model)
        } else {
            self.target(model, version)
        }?;
        serde_json::to_string(t).ok()
    }

    /// The split form of a model version:
    /// `{"image": {"path", "length", "sha256"}, "code": {"path", "length", "sha256"}}`, or
    /// `undefined` when its publisher signed none. Throws when an image is signed but its code
    /// is not (mix-and-match).
    #[wasm_bindgen(js_name = splitOf)]
    pub fn split_of(
        &self,
        model: &str,
        version: &str,
    ) -> std::result::Result<Option<String>, JsError> {
        let Some((image, code)) = self.split(model, version).map_err(js)? else {
            return Ok(None);
        };
        let entry = |path: String, t: &Target| serde_json::json!({"path": path, "length": t.length, "sha256": t.sha256});
        Ok(Some(
            serde_json::json!({
                "image": entry(tuf::image_target_path(model, version), image),
                "code": entry(tuf::code_target_path(&code.sha256), code),
            })
            .to_string(),
        ))
    }

    /// Checks bytes hashed by the browser against the approved target at `path`.
    #[wasm_bindgen(js_name = checkPathDigest)]
    pub fn check_path_digest_js(
        &self,
        path: &str,
        length: f64,
        sha256: &str,
    ) -> std::result::Result<(), JsError> {
        self.check_path_digest(path, byte_length(length)?, sha256)
            .map_err(js)
    }

    /// Checks capsule bytes against the approved target (length and SHA-256).
    #[wasm_bindgen(js_name = checkCapsule)]
    pub fn check_capsule(
        &self,
        model: &str,
        version: &str,
        bytes: &[u8],
    ) -> std::result::Result<(), JsError> {
        self.check(model, version, bytes).map_err(js)
    }

    /// Checks a capsule hashed by the browser (`crypto.subtle`): its length and SHA-256 (hex)
    /// against the approved target.
    #[wasm_bindgen(js_name = checkDigest)]
    pub fn check_digest_js(
        &self,
        model: &str,
        version: &str,
        length: f64,
        sha256: &str,
    ) -> std::result::Result<(), JsError> {
        self.check_digest(model, version, byte_length(length)?, sha256)
            .map_err(js)
    }
}

/// What a model image writes into a fresh instance of its code module
/// (`capsule_format::split::image_memory`), after checking that the image names the code the
/// caller holds (the code its signed target names).
#[wasm_bindgen]
#[derive(Debug)]
pub struct ImageMemory(capsule_format::split::ImageMemory);

#[wasm_bindgen]
impl ImageMemory {
    /// Reads an image (verified against its signed target) that must name `code_sha256`.
    #[wasm_bindgen(constructor)]
    pub fn new(image: &[u8], code_sha256: &str) -> std::result::Result<ImageMemory, JsError> {
        image_memory(image, code_sha256)
            .map(ImageMemory)
            .map_err(js)
    }

    /// Initial memory size in 64 KiB pages.
    #[wasm_bindgen(getter)]
    pub fn pages(&self) -> f64 {
        self.0.pages as f64
    }

    /// Number of data segments.
    #[wasm_bindgen(getter)]
    pub fn segments(&self) -> usize {
        self.0.segments.len()
    }

    /// Where segment `i` goes in memory.
    pub fn offset(&self, i: usize) -> f64 {
        self.0.segments.get(i).map_or(0.0, |(o, _)| f64::from(*o))
    }

    /// The bytes of segment `i`.
    pub fn data(&self, i: usize) -> Vec<u8> {
        self.0
            .segments
            .get(i)
            .and_then(|(_, range)| self.0.data.get(range.clone()))
            .map(<[u8]>::to_vec)
            .unwrap_or_default()
    }

    /// The manifest section's content.
    #[wasm_bindgen(getter)]
    pub fn manifest(&self) -> Vec<u8> {
        self.0.manifest.clone()
    }
}

/// [`ImageMemory::new`] in plain Rust.
pub fn image_memory(image: &[u8], code_sha256: &str) -> Result<capsule_format::split::ImageMemory> {
    let header =
        capsule_format::split::image_header(image).map_err(|e| SdkError::Capsule(e.to_string()))?;
    if header.code_sha256 != code_sha256 {
        return Err(SdkError::Verification(format!(
            "the model image names code {}, its signed target names {code_sha256}",
            header.code_sha256
        )));
    }
    capsule_format::split::image_memory(image).map_err(|e| SdkError::Capsule(e.to_string()))
}

/// The inputs of one inference, built from JavaScript one tensor at a time.
#[wasm_bindgen]
#[derive(Debug, Default)]
pub struct Request {
    inputs: Vec<NamedTensor>,
    /// The encoding of `inputs` after [`Request::encode_checked`].
    encoded: Vec<u8>,
}

#[wasm_bindgen]
impl Request {
    /// An empty request.
    #[wasm_bindgen(constructor)]
    pub fn new() -> Request {
        Request::default()
    }

    /// Adds a tensor: its V2 datatype (`FP32`, `INT64`, `BYTES`, ...), shape and packed
    /// little-endian data (`BYTES`: each element as a 4-byte little-endian length, then its
    /// bytes).
    pub fn add(
        &mut self,
        name: &str,
        datatype: &str,
        shape: Vec<f64>,
        data: Vec<u8>,
    ) -> std::result::Result<(), JsError> {
        self.push(name, datatype, &shape, data).map_err(js)
    }

    /// The request in the guest ABI's encoding.
    pub fn encode(&self) -> std::result::Result<Vec<u8>, JsError> {
        wire::encode_request(&self.inputs).map_err(|e| js(SdkError::Request(e.to_string())))
    }

    /// Checks the request against the capsule's signature and encodes it, keeping the bytes
    /// in the core: they are the returned length at `encodedPtr()` in the core's memory, so
    /// JavaScript copies them into the guest's memory without an intermediate buffer.
    #[wasm_bindgen(js_name = encodeChecked)]
    pub fn encode_checked(&mut self, manifest: &Manifest) -> std::result::Result<usize, JsError> {
        check_request(&manifest.manifest, &self.inputs).map_err(js)?;
        self.encoded =
            wire::encode_request(&self.inputs).map_err(|e| js(SdkError::Request(e.to_string())))?;
        Ok(self.encoded.len())
    }

    /// Where the bytes of the last `encodeChecked` are in the core's memory.
    #[wasm_bindgen(js_name = encodedPtr)]
    pub fn encoded_ptr(&self) -> usize {
        self.encoded.as_ptr() as usize
    }
}

impl Request {
    /// Adds a tensor (see [`Request::add`]).
    pub fn push(&mut self, name: &str, datatype: &str, shape: &[f64], data: Vec<u8>) -> Result<()> {
        let dtype = DType::from_v2_name(datatype).map_err(|e| SdkError::Request(e.to_string()))?;
        let shape = shape
            .iter()
            .map(|d| {
                if d.is_finite() && *d >= 0.0 && d.fract() == 0.0 && *d < 9.007e15 {
                    Ok(*d as u64)
                } else {
                    Err(SdkError::Request(format!(
                        "input {name:?}: dimension {d} is not a size"
                    )))
                }
            })
            .collect::<Result<Vec<u64>>>()?;
        let tensor = Tensor::new(dtype, shape, data)
            .map_err(|e| SdkError::Request(format!("input {name:?}: {e}")))?;
        self.inputs.push(NamedTensor {
            name: name.to_owned(),
            tensor,
        });
        Ok(())
    }

    /// The inputs so far.
    pub fn inputs(&self) -> &[NamedTensor] {
        &self.inputs
    }
}

/// Checks a request against the capsule's signature before it enters the guest, with the
/// edge node's own check (`capsule_format::request`): names (each once, none unknown, none
/// missing), datatypes, ranks, fixed dimensions, symbolic dimensions at least 1 and equal
/// wherever one symbol appears.
pub fn check_request(m: &CapsuleManifest, inputs: &[NamedTensor]) -> Result<()> {
    let declared: Vec<capsule_format::request::Declared<'_>> = inputs
        .iter()
        .map(|t| capsule_format::request::Declared {
            name: &t.name,
            dtype: t.tensor.dtype,
            shape: &t.tensor.shape,
        })
        .collect();
    capsule_format::request::check_signature(m, &declared)
        .map_err(|e| SdkError::Request(e.to_string()))
}

/// A capsule's decoded manifest.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Manifest {
    manifest: CapsuleManifest,
}

#[wasm_bindgen]
impl Manifest {
    /// Decodes a `capsule.manifest` section; refuses another guest ABI version.
    #[wasm_bindgen(constructor)]
    pub fn new(section: &[u8]) -> std::result::Result<Manifest, JsError> {
        let manifest = manifest(section).map_err(js)?;
        if manifest.abi_version != capsule_format::ABI_VERSION {
            return Err(js(SdkError::Capsule(format!(
                "manifest declares guest ABI version {}, this SDK implements version {}",
                manifest.abi_version,
                capsule_format::ABI_VERSION
            ))));
        }
        Ok(Manifest { manifest })
    }

    /// The manifest as JSON.
    pub fn json(&self) -> String {
        serde_json::to_string(&self.manifest).unwrap_or_default()
    }

    /// Model name.
    #[wasm_bindgen(getter)]
    pub fn name(&self) -> String {
        self.manifest.name.clone()
    }

    /// Model version.
    #[wasm_bindgen(getter)]
    pub fn version(&self) -> String {
        self.manifest.version.to_string()
    }

    /// Checks a request against the capsule's signature.
    pub fn check(&self, request: &Request) -> std::result::Result<(), JsError> {
        check_request(&self.manifest, &request.inputs).map_err(js)
    }
}

/// The outputs of one inference.
#[wasm_bindgen]
#[derive(Debug)]
pub struct Outputs {
    outputs: Vec<NamedTensor>,
}

/// Decodes a guest response: its outputs, or the model's typed error.
pub fn response(bytes: &[u8]) -> Result<Vec<NamedTensor>> {
    match wire::decode::<InferResponse>(bytes, "inference response")
        .map_err(|e| SdkError::Capsule(e.to_string()))?
    {
        InferResponse::Outputs(o) => Ok(o),
        InferResponse::Error(e) => Err(SdkError::Model(e.message)),
    }
}

/// Decodes a guest response.
#[wasm_bindgen(js_name = decodeResponse)]
pub fn decode_response(bytes: &[u8]) -> std::result::Result<Outputs, JsError> {
    response(bytes)
        .map(|outputs| Outputs { outputs })
        .map_err(js)
}

#[wasm_bindgen]
impl Outputs {
    /// Number of outputs.
    #[wasm_bindgen(getter)]
    pub fn length(&self) -> usize {
        self.outputs.len()
    }

    /// Name of output `i`.
    pub fn name(&self, i: usize) -> String {
        self.outputs
            .get(i)
            .map(|o| o.name.clone())
            .unwrap_or_default()
    }

    /// V2 datatype of output `i`.
    pub fn datatype(&self, i: usize) -> String {
        self.outputs
            .get(i)
            .map(|o| o.tensor.dtype.v2_name().to_owned())
            .unwrap_or_default()
    }

    /// Shape of output `i`.
    pub fn shape(&self, i: usize) -> Vec<f64> {
        self.outputs
            .get(i)
            .map(|o| o.tensor.shape.iter().map(|d| *d as f64).collect())
            .unwrap_or_default()
    }

    /// Packed little-endian data of output `i`.
    pub fn data(&self, i: usize) -> Vec<u8> {
        self.outputs
            .get(i)
            .map(|o| o.tensor.data.clone())
            .unwrap_or_default()
    }
}

/// Telemetry of a browser, in the same batches as a node's (`capsule-format::telemetry`).
#[wasm_bindgen]
#[derive(Debug)]
pub struct Recorder {
    node_id: String,
    references: BTreeMap<(String, String), CapsuleManifest>,
    window: BTreeMap<(String, String), ModelWindow>,
    feedback: Vec<telemetry::Feedback>,
    window_start_ms: f64,
}

#[wasm_bindgen]
impl Recorder {
    /// A recorder for this browser (`node_id`: its id at the hub).
    #[wasm_bindgen(constructor)]
    pub fn new(node_id: &str, now_ms: f64) -> Recorder {
        Recorder {
            node_id: node_id.to_owned(),
            references: BTreeMap::new(),
            window: BTreeMap::new(),
            feedback: Vec::new(),
            window_start_ms: now_ms,
        }
    }

    /// Registers a loaded model version (its manifest section: reference statistics,
    /// labels).
    pub fn register(&mut self, section: &[u8]) -> std::result::Result<(), JsError> {
        let m = manifest(section).map_err(js)?;
        self.references
            .insert((m.name.clone(), m.version.to_string()), m);
        Ok(())
    }

    /// Records one inference: its request, the response bytes (empty when it failed with
    /// `error_kind`), its latency and its request id.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &mut self,
        model: &str,
        version: &str,
        request: &Request,
        response_bytes: &[u8],
        error_kind: &str,
        latency_ms: f64,
        request_id: &str,
    ) {
        let key = (model.to_owned(), version.to_owned());
        let inputs = &request.inputs;
        let manifest = self.references.get(&key);
        let (features, rows) = match manifest.and_then(|m| m.reference.as_ref()) {
            Some(r) => {
                let mut live = r.empty_live();
                let rows = r.observe(inputs, &mut live);
                (live, rows)
            }
            None => (Vec::new(), 0),
        };
        let labels = manifest.map(|m| m.labels.clone()).unwrap_or_default();
        let classes = if error_kind.is_empty() {
            response(response_bytes)
                .map(|o| telemetry::classes(&o, &labels))
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let w = self.window.entry(key).or_insert_with(|| ModelWindow {
            model: model.to_owned(),
            version: version.to_owned(),
            ..ModelWindow::default()
        });
        w.requests += 1;
        w.rows += rows;
        w.latency.observe(latency_ms);
        if !error_kind.is_empty() {
            *w.errors.entry(error_kind.to_owned()).or_default() += 1;
        }
        if w.features.is_empty() {
            w.features = features;
        } else if w.features.len() == features.len() {
            for (a, b) in w.features.iter_mut().zip(&features) {
                let _ = a.merge(b);
            }
        }
        let n = classes.len();
        for (i, class) in classes.into_iter().enumerate() {
            w.count_class(&class);
            if w.predictions.len() < telemetry::MAX_PREDICTIONS {
                w.predictions.push(Prediction {
                    id: telemetry::prediction_id(request_id, i, n),
                    class,
                });
            }
        }
    }

    /// Records a ground-truth label for an earlier prediction.
    pub fn feedback(&mut self, model: &str, id: &str, label: &str) {
        if self.feedback.len() < telemetry::MAX_FEEDBACK {
            self.feedback.push(telemetry::Feedback {
                model: model.to_owned(),
                id: telemetry::cut(id),
                label: telemetry::cut(label),
            });
        }
    }

    /// Closes the window: the batch (JSON) numbered `seq`, or `undefined` when the window
    /// saw nothing.
    pub fn take(&mut self, seq: f64, now_ms: f64) -> Option<String> {
        let start = self.window_start_ms;
        self.window_start_ms = now_ms;
        if self.window.is_empty() && self.feedback.is_empty() {
            return None;
        }
        let batch = TelemetryBatch {
            node_id: self.node_id.clone(),
            seq: seq as u64,
            window_start_ms: start as u64,
            window_end_ms: now_ms.max(start) as u64,
            dropped_batches: 0,
            dropped_requests: 0,
            models: std::mem::take(&mut self.window).into_values().collect(),
            feedback: std::mem::take(&mut self.feedback),
        };
        serde_json::to_string(&batch).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_encode_and_are_checked() {
        let mut r = Request::new();
        r.push("x", "FP32", &[1.0, 2.0], vec![0; 8]).unwrap();
        assert!(matches!(
            r.push("y", "FP32", &[1.5], vec![0; 4]),
            Err(SdkError::Request(m)) if m == "input \"y\": dimension 1.5 is not a size"
        ));
        assert!(r.push("z", "FP32", &[3.0], vec![0; 4]).is_err());
        let bytes = wire::encode_request(r.inputs()).unwrap();
        let back: wire::InferRequest = wire::decode(&bytes, "request").unwrap();
        assert_eq!(back.inputs, r.inputs());
    }

    #[test]
    fn keys_make_a_root_and_bad_thresholds_are_refused() {
        let key = "11".repeat(32);
        let root = root_of_keys(std::slice::from_ref(&key), 1).unwrap();
        assert_eq!(root.roles["targets"].threshold, 1);
        assert_eq!(
            root_of_keys(&[key], 2).unwrap_err().to_string(),
            "verification failed: 1 public keys with threshold 2"
        );
        assert!(verify(&root, b"{}", None, 0).is_err());
    }

    /// The split form as a browser reads it: the image pairs with its signed code; an image
    /// whose code is not signed is refused; the latest capsule ignores the image and code
    /// targets signed beside it.
    #[test]
    fn split_targets_pair_an_image_with_its_signed_code() {
        let (image, code) = (b"image".to_vec(), b"code".to_vec());
        let t = |bytes: &[u8], model: &str, version: &str, code: Option<String>| Target {
            length: bytes.len() as u64,
            sha256: sha256_hex(bytes),
            model: model.into(),
            version: version.into(),
            code,
        };
        let code_sha = sha256_hex(&code);
        let mut targets = Targets {
            kind: "targets".into(),
            version: 1,
            expires: u64::MAX,
            targets: [
                (
                    tuf::target_path("m", "1.0.0"),
                    t(b"capsule", "m", "1.0.0", None),
                ),
                (
                    tuf::image_target_path("m", "1.0.0"),
                    t(&image, "m", "1.0.0", Some(code_sha.clone())),
                ),
                (tuf::code_target_path(&code_sha), t(&code, "", "", None)),
            ]
            .into(),
        };
        let v = Verified {
            targets: targets.clone(),
        };
        assert_eq!(v.latest("m").map(|t| t.length), Some(7));
        let (i, c) = v.split("m", "1.0.0").unwrap().unwrap();
        assert_eq!((i.length, c.sha256.as_str()), (5, code_sha.as_str()));
        v.check_path_digest(&tuf::code_target_path(&code_sha), 4, &code_sha)
            .unwrap();
        assert!(
            v.check_path_digest(&tuf::image_target_path("m", "1.0.0"), 5, &code_sha)
                .is_err()
        );
        assert!(v.split("m", "2.0.0").unwrap().is_none());
        targets.targets.remove(&tuf::code_target_path(&code_sha));
        let v = Verified { targets };
        assert!(matches!(
            v.split("m", "1.0.0"),
            Err(SdkError::Verification(m)) if m.contains("5.7.1")
        ));
    }

    #[test]
    fn a_digest_from_elsewhere_is_checked_like_the_bytes() {
        let bytes = b"capsule bytes".to_vec();
        let sha = sha256_hex(&bytes);
        let target = Target {
            length: bytes.len() as u64,
            sha256: sha.clone(),
            model: "m".into(),
            version: "1.0.0".into(),
            code: None,
        };
        let v = Verified {
            targets: Targets {
                kind: "targets".into(),
                version: 1,
                expires: u64::MAX,
                targets: [(tuf::target_path("m", "1.0.0"), target)].into(),
            },
        };
        v.check("m", "1.0.0", &bytes).unwrap();
        v.check_digest("m", "1.0.0", bytes.len() as u64, &sha)
            .unwrap();
        let mut tampered = bytes.clone();
        tampered[0] ^= 1;
        let other = sha256_hex(&tampered);
        // Both forms refuse with the same words.
        assert_eq!(
            v.check("m", "1.0.0", &tampered).unwrap_err().to_string(),
            v.check_digest("m", "1.0.0", bytes.len() as u64, &other)
                .unwrap_err()
                .to_string()
        );
        assert_eq!(
            v.check_digest("m", "1.0.0", 3, &sha)
                .unwrap_err()
                .to_string(),
            "verification failed: refused (5.7.3): m/1.0.0.capsule.wasm: 3 bytes, the signed length is 13"
        );
        assert_eq!(
            v.check_digest("m", "2.0.0", 13, &sha)
                .unwrap_err()
                .to_string(),
            "verification failed: m/2.0.0.capsule.wasm is not in the signed targets"
        );
    }
}
