// The SDK's Web Worker: fetches signed metadata and capsules, verifies them with the Rust
// core (capsule-format compiled to WebAssembly), caches verified capsules in Cache Storage by
// hash, instantiates them, runs inferences through the guest ABI, and records telemetry.
// The page never blocks on any of it.
//
// The same module runs on the page's thread when the page asks for it (`worker: false`): it
// then exports `handle` and installs no message handler.

import init, {
  ImageMemory,
  Manifest,
  Recorder,
  Request as CoreRequest,
  Verified,
  decodeResponse,
  sha256Hex,
  verifyWithKeys,
  verifyWithRoot,
} from "./core/capsule_sdk_core.js";
import type { ErrorInfo, Loaded, Request, Source, Trust, WireTensor } from "./protocol.js";

interface GuestExports {
  memory: WebAssembly.Memory;
  capsule_abi_version(): number;
  capsule_init(): number;
  capsule_alloc(size: number, align: number): number;
  capsule_free(ptr: number, size: number, align: number): void;
  capsule_infer(ptr: number, len: number): bigint;
}

interface Slot {
  name: string;
  version: string;
  sha256: string;
  module: WebAssembly.Module;
  manifest: Manifest;
  exports: GuestExports | null;
  /** For a model image (split form): what each fresh instance of the shared code module gets
   * before any guest call (memory size in pages, data segments). */
  image: { pages: number; segments: { offset: number; data: Uint8Array }[] } | null;
}

/** One signed artifact of the split form: where it is, its signed path, length and hash. */
interface SplitPart {
  path: string;
  length: number;
  sha256: string;
  url: string;
}

/** Compiled guest code modules by SHA-256, for the page's lifetime: a second model of the same
 * guest build instantiates without downloading or compiling the code again. */
const codeModules = new Map<string, Promise<WebAssembly.Module>>();

class SdkError extends Error {
  constructor(name: string, message: string) {
    super(message);
    this.name = name;
  }
}

/** Maps the core's message prefixes to error names. */
export function classify(e: unknown): ErrorInfo {
  if (e instanceof SdkError) return { name: e.name, message: e.message };
  const message = e instanceof Error ? e.message : String(e);
  const kinds: [string, string][] = [
    ["verification failed:", "VerificationError"],
    ["invalid capsule:", "CapsuleError"],
    ["invalid request:", "RequestError"],
    ["model error:", "ModelError"],
  ];
  for (const [prefix, name] of kinds) {
    if (message.startsWith(prefix)) return { name, message };
  }
  return { name: "CapsuleError", message };
}

const CACHE_HOST = "https://capsule.cache";
const TELEMETRY_QUEUE = 64;

let source: Source;
let trust: Trust;
let cacheName = "capsule-v1";
let recorder: Recorder | null = null;
let telemetryTimer: ReturnType<typeof setInterval> | null = null;
const pending: string[] = [];
const slots = new Map<number, Slot>();
let nextHandle = 1;
let registered = false;
/** The core's memory: encoded requests are copied from it straight into a guest's. */
let coreMemory: WebAssembly.Memory | null = null;
/** The static source's targets metadata, fetched while the core starts: used by a first
 * load that comes within PREFETCH_FRESH_MS (later loads fetch it again). */
let prefetched: { at: number; bytes: Promise<Uint8Array> } | null = null;
const PREFETCH_FRESH_MS = 10_000;

async function cache(): Promise<Cache> {
  return caches.open(cacheName);
}

/** Cache Storage writes run in the background, one after another, so a load does not wait
 * for them; `close` does. A write that fails leaves the cache as it was (a later load
 * downloads again). */
let writes: Promise<void> = Promise.resolve();
function inBackground(work: () => Promise<void>): void {
  writes = writes.then(work).catch(() => undefined);
}

interface State {
  targetsVersion: number;
  seq: number;
}
let current: State | null = null;

/** Small persistent state (highest targets version seen, telemetry sequence), kept here and
 * written back in the background. Each read also takes what other runtimes of this origin
 * wrote to the cache (the higher of the two), so none of them accepts older metadata than
 * another has seen. */
async function state(): Promise<State> {
  let read: State = { targetsVersion: 0, seq: 0 };
  const r = await (await cache()).match(`${CACHE_HOST}/state`);
  if (r) {
    try {
      const s = await r.json();
      if (Number.isSafeInteger(s.targetsVersion) && Number.isSafeInteger(s.seq)) read = s;
    } catch {
      // unreadable: start over (the signed metadata is still verified)
    }
  }
  current = {
    targetsVersion: Math.max(read.targetsVersion, current?.targetsVersion ?? 0),
    seq: Math.max(read.seq, current?.seq ?? 0),
  };
  return current;
}

function saveState(s: State): void {
  current = s;
  const body = JSON.stringify(s);
  inBackground(async () =>
    (await cache()).put(`${CACHE_HOST}/state`, new Response(body, { headers: { "content-type": "application/json" } })),
  );
}

async function fetchOk(url: string, init?: RequestInit): Promise<Response> {
  let r: Response;
  try {
    r = await fetch(url, init);
  } catch (e) {
    throw new SdkError("NetworkError", `cannot fetch ${url}: ${e instanceof Error ? e.message : e}`);
  }
  if (!r.ok) {
    const name = r.status === 404 ? "ModelNotFoundError" : "NetworkError";
    throw new SdkError(name, `${url} answered ${r.status}`);
  }
  return r;
}

function hubHeaders(): HeadersInit {
  return source.kind === "hub" ? { authorization: `Bearer ${source.token}` } : {};
}

interface Resolved {
  verified: Verified;
  model: string;
  version: string;
  sha256: string;
  length: number;
  url: string;
  /** The signed split form, when the publisher signed one. */
  split: { image: SplitPart; code: SplitPart } | null;
}

/** The signed target of `model` (and version), with where to download it. */
async function resolve(model: string, version?: string): Promise<Resolved> {
  let targetsJson: Uint8Array;
  let wanted = version ?? "";
  // What the hub assigned (checked against the signed target below); none for a static source.
  let assigned: { sha256: string; url: string } | null = null;
  let repo = "";
  if (source.kind === "url") {
    repo = source.base;
    const early = prefetched && performance.now() - prefetched.at < PREFETCH_FRESH_MS ? prefetched.bytes : null;
    prefetched = null;
    targetsJson = await (early ?? fetchTargets(source.targets));
  } else {
    const base = source.hub.replace(/\/$/, "");
    if (!registered) {
      await fetchOk(`${base}/api/v1/nodes/${encodeURIComponent(source.nodeId)}/register`, {
        method: "POST",
        headers: { ...hubHeaders(), "content-type": "application/json" },
        body: JSON.stringify({ labels: source.labels }),
      });
      registered = true;
    }
    const desired = await (
      await fetchOk(`${base}/api/v1/nodes/${encodeURIComponent(source.nodeId)}/desired`, {
        headers: hubHeaders(),
        cache: "no-store",
      })
    ).json();
    if (typeof desired.targets !== "string") {
      throw new SdkError("ModelNotFoundError", "the hub has no signed targets metadata yet");
    }
    targetsJson = new TextEncoder().encode(desired.targets);
    const entry = (desired.models as { model: string; version: string; sha256: string }[]).find(
      (m) => m.model === model && (!version || m.version === version),
    );
    if (!entry) {
      throw new SdkError("ModelNotFoundError", `the hub assigns no version of model "${model}" to this browser`);
    }
    wanted = entry.version;
    assigned = { sha256: entry.sha256, url: `${base}/api/v1/blobs/${entry.sha256}` };
  }
  const s = await state();
  const verified = verifyNow(targetsJson, s.targetsVersion);
  const target = verified.targetOf(model, wanted);
  if (!target) {
    throw assigned
      ? new SdkError("VerificationError", `verification failed: ${model}/${wanted}.capsule.wasm is not in the signed targets`)
      : new SdkError(
          "ModelNotFoundError",
          `model "${model}"${version ? ` version ${version}` : ""} is not in the signed targets`,
        );
  }
  const t = JSON.parse(target);
  if (assigned && t.sha256 !== assigned.sha256) {
    throw new SdkError("VerificationError", `verification failed: the hub's ${model} ${wanted} is not the signed one (mix-and-match)`);
  }
  if (verified.version > s.targetsVersion) saveState({ ...s, targetsVersion: verified.version });
  const url = assigned ? assigned.url : new URL(`${t.model}/${t.version}.capsule.wasm`, repo).href;
  // The split form, when signed: the image pairs only with the code its target names (the
  // core refuses an image whose code is not signed with that hash).
  let split: Resolved["split"] = null;
  const signedSplit = verified.splitOf(model, t.version);
  if (signedSplit) {
    const sp = JSON.parse(signedSplit) as { image: Omit<SplitPart, "url">; code: Omit<SplitPart, "url">};
    const where = (part: Omit<SplitPart, "url">): SplitPart => ({
      ...part,
      url:
        source.kind === "hub"
          ? `${source.hub.replace(/\/$/, "")}/api/v1/blobs/${part.sha256}`
          : new URL(part.path, repo).href,
    });
    split = { image: where(sp.image), code: where(sp.code) };
  }
  return { verified, model, version: t.version, sha256: t.sha256, length: t.length, url, split };
}

/** Deletes every cached entry of `model` but `key` (its newest version, in either form). */
async function keepOnly(c: Cache, model: string, key: string): Promise<void> {
  const prefix = `${CACHE_HOST}/${encodeURIComponent(model)}/`;
  for (const old of await c.keys()) {
    if (old.url.startsWith(prefix) && old.url !== key) await c.delete(old);
  }
}

/** Downloads (or takes from Cache Storage) one split artifact and checks it against its
 * signed target; `null` when it is not published (a static repository with single files
 * only), so the caller falls back to the single file. */
async function fetchPart(
  c: Cache,
  r: Resolved,
  part: SplitPart,
): Promise<{ bytes: ArrayBuffer; fromCache: boolean } | null> {
  const key = `${CACHE_HOST}/${part.path}/${part.sha256}`;
  const hit = await c.match(key);
  let bytes: ArrayBuffer;
  let fromCache = false;
  if (hit) {
    bytes = await hit.arrayBuffer();
    fromCache = true;
  } else {
    let resp: Response;
    try {
      resp = await fetch(part.url, { headers: hubHeaders() });
    } catch (e) {
      throw new SdkError("NetworkError", `cannot fetch ${part.url}: ${e instanceof Error ? e.message : e}`);
    }
    if (resp.status === 404) return null;
    if (!resp.ok) throw new SdkError("NetworkError", `${part.url} answered ${resp.status}`);
    bytes = await resp.arrayBuffer();
  }
  try {
    const digest = (await nativeSha256(bytes)) ?? sha256Hex(new Uint8Array(bytes));
    r.verified.checkPathDigest(part.path, bytes.byteLength, digest);
  } catch (e) {
    if (fromCache) await c.delete(key);
    throw e;
  }
  if (!fromCache) {
    inBackground(async () => {
      await c.put(key, new Response(bytes));
      // A model's new image replaces its older ones (code modules stay: other models share
      // them).
      if (!part.path.startsWith("code/")) await keepOnly(c, r.model, key);
    });
  }
  return { bytes, fromCache };
}

/** Loads a model version in split form: the guest code once per page (compiled, kept by
 * hash), the model image per model. `null` when the repository has no split form. */
async function loadSplit(
  r: Resolved,
  split: NonNullable<Resolved["split"]>,
): Promise<{ module: WebAssembly.Module; image: ImageMemory; bytes: number; fromCache: boolean } | null> {
  const c = await cache();
  let module = codeModules.get(split.code.sha256);
  let codeBytes = 0;
  if (!module) {
    const code = await fetchPart(c, r, split.code);
    if (!code) return null;
    codeBytes = code.fromCache ? 0 : code.bytes.byteLength;
    module = WebAssembly.compile(code.bytes);
    codeModules.set(split.code.sha256, module);
    module.catch(() => codeModules.delete(split.code.sha256));
  }
  const image = await fetchPart(c, r, split.image);
  if (!image) return null;
  const memory = new ImageMemory(new Uint8Array(image.bytes), split.code.sha256);
  return {
    module: await module,
    image: memory,
    bytes: codeBytes + (image.fromCache ? 0 : image.bytes.byteLength),
    fromCache: image.fromCache,
  };
}

async function fetchTargets(url: string): Promise<Uint8Array> {
  return new Uint8Array(await (await fetchOk(url, { cache: "no-store" })).arrayBuffer());
}

/** Lowercase hex SHA-256 by the browser's own implementation, or null where there is none
 * (`crypto.subtle` needs a secure context). */
async function nativeSha256(bytes: ArrayBuffer): Promise<string | null> {
  if (typeof crypto === "undefined" || !crypto.subtle) return null;
  const d = new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  let hex = "";
  for (const b of d) hex += b.toString(16).padStart(2, "0");
  return hex;
}

function verifyNow(targetsJson: Uint8Array, trustedVersion: number): Verified {
  const now = Date.now() / 1000;
  return trust.kind === "keys"
    ? verifyWithKeys(targetsJson, trust.publicKeys, trust.threshold, trustedVersion, now)
    : verifyWithRoot(new TextEncoder().encode(trust.root), targetsJson, trustedVersion, now);
}

/** The manifest of a verified capsule or image: its name and version must be the signed
 * target's. */
function signedManifest(section: Uint8Array, r: Resolved): Manifest {
  const manifest = new Manifest(section);
  if (manifest.name !== r.model || manifest.version !== r.version) {
    throw new SdkError(
      "VerificationError",
      `verification failed: the capsule is ${manifest.name} ${manifest.version}, the signed target is ${r.model} ${r.version}`,
    );
  }
  return manifest;
}

/** Registers a loaded model: its instance (created now, so a capsule that cannot start fails
 * the load), its handle, its telemetry; answers the page. */
async function register(
  slot: Slot,
  section: Uint8Array,
  download: { fromCache: boolean; bytes: number },
  timings: (instantiated: number) => Loaded["timings"],
): Promise<Loaded> {
  await instantiate(slot);
  const handle = nextHandle++;
  slots.set(handle, slot);
  recorder?.register(section);
  return {
    handle,
    name: slot.name,
    version: slot.version,
    sha256: slot.sha256,
    manifest: JSON.parse(slot.manifest.json()),
    ...download,
    timings: timings(performance.now()),
  };
}

async function load(model: string, version?: string): Promise<Loaded> {
  const t0 = performance.now();
  const r = await resolve(model, version);
  const t1 = performance.now();
  const parts = r.split ? await loadSplit(r, r.split) : null;
  if (parts) {
    const t2 = performance.now();
    const section = parts.image.manifest;
    const manifest = signedManifest(section, r);
    const segments = [];
    for (let i = 0; i < parts.image.segments; i++) {
      segments.push({ offset: parts.image.offset(i), data: parts.image.data(i) });
    }
    const slot: Slot = {
      name: r.model,
      version: r.version,
      sha256: r.sha256,
      module: parts.module,
      manifest,
      exports: null,
      image: { pages: parts.image.pages, segments },
    };
    parts.image.free();
    return register(slot, section, { fromCache: parts.fromCache, bytes: parts.bytes }, (t3) => ({
      metadataMs: t1 - t0,
      downloadMs: t2 - t1,
      verifyMs: 0,
      compileMs: 0,
      instantiateMs: t3 - t2,
    }));
  }
  const c = await cache();
  const key = `${CACHE_HOST}/${encodeURIComponent(r.model)}/${r.sha256}`;
  let bytes: ArrayBuffer;
  let compiled: Promise<WebAssembly.Module> | null = null;
  let fromCache = false;
  const hit = await c.match(key);
  if (hit) {
    bytes = await hit.arrayBuffer();
    fromCache = true;
  } else {
    const resp = await fetchOk(r.url, { headers: hubHeaders() });
    if (
      typeof WebAssembly.compileStreaming === "function" &&
      (resp.headers.get("content-type") ?? "").startsWith("application/wasm")
    ) {
      // Compiles while the bytes arrive; nothing is instantiated before they verify.
      compiled = WebAssembly.compileStreaming(resp.clone());
      compiled.catch(() => undefined);
    }
    bytes = await resp.arrayBuffer();
  }
  const t2 = performance.now();
  // TUF 5.7.3: the signed length and hash, before anything runs. The browser's SHA-256 is
  // several times faster than the core's; without crypto.subtle the core hashes.
  try {
    const digest = await nativeSha256(bytes);
    if (digest !== null) r.verified.checkDigest(r.model, r.version, bytes.byteLength, digest);
    else r.verified.checkCapsule(r.model, r.version, new Uint8Array(bytes));
  } catch (e) {
    if (fromCache) await c.delete(key);
    throw e;
  }
  const t3 = performance.now();
  const module = await (compiled ?? WebAssembly.compile(bytes));
  const t4 = performance.now();
  const sections = WebAssembly.Module.customSections(module, "capsule.manifest");
  if (sections.length !== 1) {
    throw new SdkError("CapsuleError", "invalid capsule: no capsule.manifest section");
  }
  const section = new Uint8Array(sections[0]);
  const manifest = signedManifest(section, r);
  if (!fromCache) {
    inBackground(async () => {
      await c.put(key, new Response(bytes, { headers: { "content-type": "application/wasm" } }));
      // A new version replaces the model's older ones.
      await keepOnly(c, r.model, key);
    });
  }
  const slot: Slot = { name: r.model, version: r.version, sha256: r.sha256, module, manifest, exports: null, image: null };
  return register(slot, section, { fromCache, bytes: bytes.byteLength }, (t5) => ({
    metadataMs: t1 - t0,
    downloadMs: t2 - t1,
    verifyMs: t3 - t2,
    compileMs: t4 - t3,
    instantiateMs: t5 - t4,
  }));
}

/** The host kernels a capsule may import (`capsule_kernels`): a browser has no native
 * kernels, so `abi_version` answers 0 and the capsule computes every product with its own wasm
 * kernels, bit for bit as a node that runs without host kernels. A capsule that calls a
 * product anyway traps. */
const HOST_KERNELS: WebAssembly.Imports = {
  capsule_kernels: {
    abi_version: (): number => 0,
    f32_mmm_8x8: (): never => {
      throw new WebAssembly.RuntimeError("capsule_kernels.f32_mmm_8x8: no host kernels in a browser");
    },
    f32_mmm_block: (): never => {
      throw new WebAssembly.RuntimeError("capsule_kernels.f32_mmm_block: no host kernels in a browser");
    },
  },
};

async function instantiate(slot: Slot): Promise<GuestExports> {
  const instance = await WebAssembly.instantiate(slot.module, HOST_KERNELS);
  const ex = instance.exports as unknown as GuestExports;
  if (slot.image) {
    // The shared code module's memory starts empty: the image's size and data go in before
    // any guest call, as instantiating the single file would have put them.
    const have = ex.memory.buffer.byteLength / 65536;
    if (slot.image.pages > have) ex.memory.grow(slot.image.pages - have);
    for (const s of slot.image.segments) new Uint8Array(ex.memory.buffer, s.offset, s.data.length).set(s.data);
  }
  if (ex.capsule_abi_version() !== 1) {
    throw new SdkError("CapsuleError", `invalid capsule: guest ABI version ${ex.capsule_abi_version()}`);
  }
  if (ex.capsule_init() !== 0) {
    throw new SdkError("CapsuleError", "invalid capsule: capsule_init reports that no model is loaded");
  }
  slot.exports = ex;
  return ex;
}

/** One call through the guest ABI: the encoded request (`len` bytes at `src` in the core's
 * memory) into the guest's memory, `capsule_infer`, and where the response is in the guest's
 * memory (the caller frees it with `capsule_free`). */
function invoke(ex: GuestExports, src: number, len: number): { ptr: number; len: number } {
  if (!coreMemory) throw new SdkError("CapsuleError", "the SDK core is not initialized");
  const ptr = ex.capsule_alloc(len, 1);
  if (ptr === 0) throw new SdkError("ModelError", `model error: the capsule cannot allocate ${len} bytes`);
  new Uint8Array(ex.memory.buffer, ptr, len).set(new Uint8Array(coreMemory.buffer, src, len));
  const packed = ex.capsule_infer(ptr, len);
  const outPtr = Number(packed >> 32n);
  const outLen = Number(packed & 0xffffffffn);
  if (outPtr + outLen > ex.memory.buffer.byteLength) {
    throw new SdkError("CapsuleError", "invalid capsule: response outside memory");
  }
  return { ptr: outPtr, len: outLen };
}

async function infer(handle: number, inputs: WireTensor[], id: string): Promise<WireTensor[]> {
  const slot = slots.get(handle);
  if (!slot) throw new SdkError("CapsuleError", "this model was disposed");
  const started = performance.now();
  const req = new CoreRequest();
  let encoded = false;
  let ex: GuestExports | null = null;
  let response: { ptr: number; len: number } | null = null;
  let errorKind = "";
  try {
    // Shapes go in as plain arrays (the glue copies any array-like).
    for (const t of inputs) req.add(t.name, t.datatype, t.shape as unknown as Float64Array, t.data);
    const len = req.encodeChecked(slot.manifest);
    encoded = true;
    const instance = slot.exports ?? (await instantiate(slot));
    ex = instance;
    try {
      response = invoke(instance, req.encodedPtr(), len);
    } catch (e) {
      // After a trap the guest's state is poisoned: the next call gets a fresh instance.
      slot.exports = null;
      ex = null;
      errorKind = "trap";
      throw new SdkError("ModelError", `model error: the capsule trapped: ${e instanceof Error ? e.message : e}`);
    }
    const out = decodeResponse(new Uint8Array(instance.memory.buffer, response.ptr, response.len));
    const tensors: WireTensor[] = [];
    for (let i = 0; i < out.length; i++) {
      tensors.push({
        name: out.name(i),
        datatype: out.datatype(i),
        shape: Array.from(out.shape(i)),
        data: out.data(i),
      });
    }
    out.free();
    return tensors;
  } catch (e) {
    if (!errorKind) errorKind = classify(e).name === "RequestError" ? "bad_request" : "error";
    throw e;
  } finally {
    if (recorder && encoded) {
      const bytes = !errorKind && ex && response ? new Uint8Array(ex.memory.buffer, response.ptr, response.len) : new Uint8Array();
      recorder.record(slot.name, slot.version, req, bytes, errorKind, performance.now() - started, id);
    }
    if (ex && response) ex.capsule_free(response.ptr, response.len, 1);
    req.free();
  }
}

/** Closes the telemetry window into the queue. */
async function closeWindow(): Promise<void> {
  if (!recorder) return;
  const s = await state();
  const batch = recorder.take(s.seq + 1, Date.now());
  if (batch === undefined) return;
  saveState({ ...s, seq: s.seq + 1 });
  pending.push(batch);
  while (pending.length > TELEMETRY_QUEUE) pending.shift();
}

async function ship(): Promise<void> {
  if (source.kind !== "hub" || pending.length === 0) return;
  const batches = pending.splice(0, pending.length);
  try {
    await fetchOk(`${source.hub.replace(/\/$/, "")}/api/v1/telemetry`, {
      method: "POST",
      headers: { ...hubHeaders(), "content-type": "application/json" },
      body: `{"batches":[${batches.join(",")}]}`,
      keepalive: true,
    });
  } catch {
    pending.unshift(...batches); // retried at the next window (the hub stores each once)
    while (pending.length > TELEMETRY_QUEUE) pending.shift();
  }
}

export async function handle(msg: Request): Promise<unknown> {
  switch (msg.op) {
    case "init": {
      source = msg.source;
      trust = msg.trust;
      cacheName = msg.cacheName;
      // The targets metadata downloads while the core compiles.
      if (source.kind === "url") {
        prefetched = { at: performance.now(), bytes: fetchTargets(source.targets) };
        prefetched.bytes.catch(() => undefined);
      }
      const core = await init({ module_or_path: new URL("./core/capsule_sdk_core_bg.wasm", import.meta.url) });
      coreMemory = core.memory;
      if (source.kind === "hub") {
        recorder = new Recorder(source.nodeId, Date.now());
        telemetryTimer = setInterval(() => {
          void closeWindow().then(ship);
        }, msg.telemetryWindowMs);
      }
      return null;
    }
    case "load":
      return load(msg.model, msg.version);
    case "infer":
      return infer(msg.handle, msg.inputs, msg.id);
    case "dispose":
      slots.get(msg.handle)?.manifest.free();
      slots.delete(msg.handle);
      return null;
    case "feedback":
      recorder?.feedback(msg.model, msg.id, msg.label);
      return null;
    case "close": {
      // Before the worker is terminated (or, on the page's thread, dropped): the cache
      // writes finish.
      if (telemetryTimer !== null) clearInterval(telemetryTimer);
      telemetryTimer = null;
      for (const slot of slots.values()) slot.manifest.free();
      slots.clear();
      await writes;
      return null;
    }
    case "flush": {
      // For the page's sendBeacon on hide: everything not yet shipped.
      await closeWindow();
      return pending.splice(0, pending.length);
    }
  }
}

/** In a worker: answers the page's messages. On the page's thread, the page calls `handle`. */
function inWorker(): boolean {
  const scope = (globalThis as { WorkerGlobalScope?: abstract new () => unknown }).WorkerGlobalScope;
  return scope !== undefined && self instanceof scope;
}

if (inWorker()) self.onmessage = async (ev: MessageEvent<{ id: number; msg: Request }>) => {
  const { id, msg } = ev.data;
  try {
    const result = await handle(msg);
    const transfer: Transferable[] = Array.isArray(result)
      ? (result as WireTensor[]).filter((t) => t && t.data instanceof Uint8Array).map((t) => t.data.buffer)
      : [];
    (self as unknown as Worker).postMessage({ id, ok: true, result }, transfer);
  } catch (e) {
    (self as unknown as Worker).postMessage({ id, ok: false, error: classify(e) });
  }
};

void telemetryTimer;
