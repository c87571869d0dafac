// capsule-sdk: run signed Capsule models in the browser with the exact results of the edge.
//
//   const rt = await Capsule.fromUrl("https://cdn.example/capsules/", { publicKeys: [KEY] });
//   const rt = await Capsule.connect({ hub: "https://hub:8400", token, root });
//   const model = await rt.load("digits");
//   const { outputs } = await model.infer({ x: new Float32Array(64) });
//   model.dispose();

import type { ErrorInfo, Loaded, LoadTimings, Request, Response, Source, Trust, WireTensor } from "./protocol.js";

export type { LoadTimings } from "./protocol.js";

/** Base class of every SDK error; `name` tells which one. */
export class CapsuleError extends Error {
  constructor(message: string, name = "CapsuleError") {
    super(message);
    this.name = name;
  }
}
/** Signed metadata or a capsule that does not verify (wrong key, tampered bytes, expired, rolled back). */
export class VerificationError extends CapsuleError {
  constructor(message: string) {
    super(message, "VerificationError");
  }
}
/** The model (or version) is not published, or not assigned to this browser. */
export class ModelNotFoundError extends CapsuleError {
  constructor(message: string) {
    super(message, "ModelNotFoundError");
  }
}
/** The browser lacks what capsules need (WebAssembly SIMD, Web Workers, Cache Storage). */
export class UnsupportedBrowserError extends CapsuleError {
  constructor(message: string) {
    super(message, "UnsupportedBrowserError");
  }
}
/** A request that does not fit the capsule's signature. */
export class RequestError extends CapsuleError {
  constructor(message: string) {
    super(message, "RequestError");
  }
}
/** The model refused the request (bad raw input, shape mismatch) or trapped. */
export class ModelError extends CapsuleError {
  constructor(message: string) {
    super(message, "ModelError");
  }
}
/** A download failed. */
export class NetworkError extends CapsuleError {
  constructor(message: string) {
    super(message, "NetworkError");
  }
}

const ERRORS: Record<string, new (m: string) => CapsuleError> = {
  VerificationError,
  ModelNotFoundError,
  UnsupportedBrowserError,
  RequestError,
  ModelError,
  NetworkError,
};

function rebuild(e: { name: string; message: string }): CapsuleError {
  const C = ERRORS[e.name];
  return C ? new C(e.message) : new CapsuleError(e.message);
}

/** The smallest module using a SIMD instruction (v128.const): capsules are built with simd128. */
const SIMD_PROBE = new Uint8Array([
  0, 97, 115, 109, 1, 0, 0, 0, 1, 5, 1, 96, 0, 1, 123, 3, 2, 1, 0, 10, 22, 1, 20, 0, 253, 12, 0, 0,
  0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 11,
]);

/** Throws UnsupportedBrowserError when something capsules need is missing (Web Workers
 * only when `worker` is true, the default). */
export function checkSupport(worker = true): void {
  if (typeof WebAssembly !== "object") throw new UnsupportedBrowserError("this browser has no WebAssembly");
  if (!WebAssembly.validate(SIMD_PROBE)) {
    throw new UnsupportedBrowserError("this browser has no WebAssembly SIMD (capsules use simd128)");
  }
  if (worker && typeof Worker !== "function") throw new UnsupportedBrowserError("this browser has no Web Workers");
  if (typeof caches !== "object") {
    throw new UnsupportedBrowserError("Cache Storage is unavailable (it needs a secure context: https or localhost)");
  }
}

/** Tensor data as typed arrays, by datatype. */
export type TensorData =
  | Float32Array
  | Float64Array
  | Int8Array
  | Int16Array
  | Int32Array
  | BigInt64Array
  | Uint8Array
  | Uint16Array
  | Uint32Array
  | BigUint64Array
  | string[]
  | Uint8Array[];

/** A tensor with its shape and datatype. */
export interface Tensor {
  datatype: string;
  shape: number[];
  data: TensorData;
}

/** A raw input of the capsule's pipeline: an image, a record, a text. */
export type RawInput = Blob | ImageData | string | Record<string, unknown> | Uint8Array;

/** What `infer` takes per input: a typed array (its shape from the manifest), a full
 * tensor, a raw input, or a list of raw inputs (a batch). */
export type InputValue = TensorData | Tensor | RawInput | RawInput[];

export interface InferResult {
  /** The request id: pass it to `feedback` with the true label. */
  id: string;
  outputs: Record<string, Tensor>;
}

interface TensorSpec {
  name: string;
  dtype: string;
  shape: ({ Fixed: number } | { Symbolic: string })[];
}

const V2: Record<string, string> = {
  Bool: "BOOL", U8: "UINT8", U16: "UINT16", U32: "UINT32", U64: "UINT64", I8: "INT8", I16: "INT16",
  I32: "INT32", I64: "INT64", F16: "FP16", F32: "FP32", F64: "FP64", Bytes: "BYTES",
};

interface ArrayKind {
  new (buffer: ArrayBufferLike, byteOffset: number, length: number): TensorData;
  readonly BYTES_PER_ELEMENT: number;
}

const ARRAYS: Record<string, ArrayKind> = {
  FP32: Float32Array, FP64: Float64Array, INT8: Int8Array, INT16: Int16Array, INT32: Int32Array,
  INT64: BigInt64Array, UINT8: Uint8Array, BOOL: Uint8Array, UINT16: Uint16Array, UINT32: Uint32Array,
  UINT64: BigUint64Array,
} as never;

function isTyped(v: unknown): v is Exclude<TensorData, string[] | Uint8Array[]> {
  return ArrayBuffer.isView(v) && !(v instanceof DataView);
}

async function rawBytes(v: RawInput): Promise<Uint8Array> {
  if (v instanceof Uint8Array) return v;
  if (typeof v === "string") return new TextEncoder().encode(v);
  if (typeof Blob !== "undefined" && v instanceof Blob) return new Uint8Array(await v.arrayBuffer());
  if (typeof ImageData !== "undefined" && v instanceof ImageData) {
    // The capsule decodes images itself (the same decoder as on the edge): send a PNG.
    const canvas = new OffscreenCanvas(v.width, v.height);
    const ctx = canvas.getContext("2d");
    if (!ctx) throw new UnsupportedBrowserError("no 2D canvas to encode ImageData");
    ctx.putImageData(v, 0, 0);
    return new Uint8Array(await (await canvas.convertToBlob({ type: "image/png" })).arrayBuffer());
  }
  return new TextEncoder().encode(JSON.stringify(v));
}

function packBytes(items: Uint8Array[]): Uint8Array {
  const total = items.reduce((n, b) => n + 4 + b.length, 0);
  const out = new Uint8Array(total);
  const view = new DataView(out.buffer);
  let at = 0;
  for (const b of items) {
    view.setUint32(at, b.length, true);
    out.set(b, at + 4);
    at += 4 + b.length;
  }
  return out;
}

function unpackBytes(data: Uint8Array): Uint8Array[] {
  const out: Uint8Array[] = [];
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  let at = 0;
  while (at + 4 <= data.byteLength) {
    const len = view.getUint32(at, true);
    out.push(data.subarray(at + 4, at + 4 + len));
    at += 4 + len;
  }
  return out;
}

/** A typed array's bytes: a copy that owns its buffer (to transfer it to the worker), or a
 * view (on the page's thread, the engine copies them into the core in the same task, before
 * `infer` yields to the event loop). */
function bytesOf(v: Exclude<TensorData, string[] | Uint8Array[]>, copy: boolean): Uint8Array {
  const view = new Uint8Array(v.buffer, v.byteOffset, v.byteLength);
  return copy ? view.slice() : view;
}

async function toWire(spec: TensorSpec, v: InputValue, copy: boolean): Promise<WireTensor> {
  const datatype = V2[spec.dtype] ?? spec.dtype;
  if (v && typeof v === "object" && "datatype" in v && "shape" in v && "data" in v) {
    const t = v as Tensor;
    const data = Array.isArray(t.data)
      ? packBytes(await Promise.all((t.data as RawInput[]).map(rawBytes)))
      : bytesOf(t.data as Exclude<TensorData, string[] | Uint8Array[]>, copy);
    return { name: spec.name, datatype: t.datatype, shape: t.shape, data };
  }
  if (datatype === "BYTES") {
    const items = Array.isArray(v) ? (v as RawInput[]) : [v as RawInput];
    const packed = packBytes(await Promise.all(items.map(rawBytes)));
    const shape = spec.shape.length === 1 ? [items.length] : spec.shape.map((d, i) => ("Fixed" in d ? d.Fixed : i === 0 ? items.length : 1));
    return { name: spec.name, datatype, shape, data: packed };
  }
  if (!isTyped(v)) {
    throw new RequestError(`input "${spec.name}" is ${datatype}: pass a typed array or {datatype, shape, data}`);
  }
  // The shape from the manifest: fixed dimensions as declared, one symbolic dimension from the length.
  const fixed = spec.shape.reduce((n, d) => n * ("Fixed" in d ? d.Fixed : 1), 1);
  const symbolic = spec.shape.filter((d) => "Symbolic" in d).length;
  if (symbolic > 1 || (symbolic === 0 && fixed !== v.length) || (symbolic === 1 && v.length % fixed !== 0)) {
    throw new RequestError(
      `input "${spec.name}": ${v.length} elements do not fit the shape [${spec.shape.map((d) => ("Fixed" in d ? d.Fixed : d.Symbolic)).join(", ")}]; pass {datatype, shape, data}`,
    );
  }
  const shape = spec.shape.map((d) => ("Fixed" in d ? d.Fixed : v.length / fixed));
  return { name: spec.name, datatype, shape, data: bytesOf(v, copy) };
}

function fromWire(t: WireTensor): Tensor {
  if (t.datatype === "BYTES") {
    const items = unpackBytes(t.data);
    const text = new TextDecoder("utf-8", { fatal: true });
    let data: TensorData;
    try {
      data = items.map((b) => text.decode(b));
    } catch {
      data = items.map((b) => b.slice());
    }
    return { datatype: t.datatype, shape: t.shape, data };
  }
  const C = ARRAYS[t.datatype];
  if (!C) throw new CapsuleError(`output "${t.name}" has datatype ${t.datatype}, which the SDK cannot read`);
  // A fresh array from the core: its own buffer, at offset 0.
  const d = t.data;
  return { datatype: t.datatype, shape: t.shape, data: new C(d.buffer, d.byteOffset, d.byteLength / C.BYTES_PER_ELEMENT) };
}

/** How the page reaches the SDK's engine (worker.ts). */
interface Channel {
  call<T>(msg: Request, transfer?: Transferable[]): Promise<T>;
  infer(handle: number, inputs: WireTensor[], id: string): Promise<WireTensor[]>;
  close(): void;
  /** Whether `infer` needs inputs it can transfer (copies that own their buffers). */
  readonly transfers: boolean;
}

/** The RPC channel to the SDK's worker. */
class WorkerChannel implements Channel {
  readonly transfers = true;
  private next = 1;
  private waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  constructor(readonly worker: Worker) {
    worker.onmessage = (ev: MessageEvent<Response>) => {
      const w = this.waiting.get(ev.data.id);
      if (!w) return;
      this.waiting.delete(ev.data.id);
      if (ev.data.ok) w.resolve(ev.data.result);
      else w.reject(rebuild(ev.data.error));
    };
    worker.onerror = (ev) => {
      for (const w of this.waiting.values()) w.reject(new CapsuleError(`the SDK worker failed: ${ev.message}`));
      this.waiting.clear();
    };
  }
  call<T>(msg: Request, transfer: Transferable[] = []): Promise<T> {
    const id = this.next++;
    return new Promise<T>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.worker.postMessage({ id, msg }, transfer);
    });
  }
  /** The inputs' buffers (copies made for this call) move to the worker. */
  infer(handle: number, inputs: WireTensor[], id: string): Promise<WireTensor[]> {
    return this.call({ op: "infer", handle, inputs, id }, inputs.map((t) => t.data.buffer));
  }
  /** Terminates the worker once its cache writes are done (at most 10 s later). */
  close(): void {
    const stop = () => this.worker.terminate();
    const timer = setTimeout(stop, 10_000);
    this.call({ op: "close" }).finally(() => {
      clearTimeout(timer);
      stop();
    }).catch(() => undefined);
  }
}

/** What worker.ts exports when it is imported as a module. */
interface Engine {
  handle(msg: Request): Promise<unknown>;
  classify(e: unknown): ErrorInfo;
}

/** The engine on the page's own thread (`worker: false`): no round trip per call, but each
 * inference runs on the page's thread. */
class PageChannel implements Channel {
  readonly transfers = false;
  constructor(private readonly engine: Engine) {}
  infer(handle: number, inputs: WireTensor[], id: string): Promise<WireTensor[]> {
    return this.call({ op: "infer", handle, inputs, id });
  }
  async call<T>(msg: Request): Promise<T> {
    try {
      return (await this.engine.handle(msg)) as T;
    } catch (e) {
      throw rebuild(this.engine.classify(e));
    }
  }
  close(): void {
    void this.engine.handle({ op: "close" }).catch(() => undefined);
  }
}

let counter = 0;
let prefix = "";
/** A request id unique across pages: one random UUID per page, then a counter. */
function requestId(): string {
  if (!prefix) {
    prefix = typeof crypto !== "undefined" && "randomUUID" in crypto ? crypto.randomUUID() : `${Date.now()}-${Math.random()}`;
  }
  return `${prefix}-${counter++}`;
}

/** A loaded model version, running in the SDK's worker (or on the page's thread). */
export class Model {
  /** The capsule's manifest (signature, pipeline, labels, card, reference statistics...). */
  readonly manifest: Record<string, unknown>;
  readonly name: string;
  readonly version: string;
  /** SHA-256 of the capsule. */
  readonly sha256: string;
  /** Whether the capsule came from Cache Storage (no download). */
  readonly fromCache: boolean;
  /** Size of the capsule. */
  readonly bytes: number;
  /** Where the load's time went. */
  readonly loadTimings: LoadTimings;
  private disposed = false;

  constructor(private readonly channel: Channel, private readonly loaded: Loaded) {
    this.manifest = loaded.manifest as Record<string, unknown>;
    this.name = loaded.name;
    this.version = loaded.version;
    this.sha256 = loaded.sha256;
    this.fromCache = loaded.fromCache;
    this.bytes = loaded.bytes;
    this.loadTimings = loaded.timings;
  }

  /** Runs one inference. Inputs by name: typed arrays, tensors, or the pipeline's raw
   * inputs (image Blob or ImageData, record object, string, or a list of them). */
  async infer(inputs: Record<string, InputValue>, options: { id?: string } = {}): Promise<InferResult> {
    if (this.disposed) throw new CapsuleError("this model was disposed");
    const specs = this.manifest.inputs as TensorSpec[];
    const wire: WireTensor[] = [];
    for (const [name, value] of Object.entries(inputs)) {
      const spec = specs.find((s) => s.name === name);
      if (!spec) {
        throw new RequestError(`unknown input "${name}"; the capsule's inputs are ${JSON.stringify(specs.map((s) => s.name))}`);
      }
      wire.push(await toWire(spec, value, this.channel.transfers));
    }
    const id = options.id ?? requestId();
    const out = await this.channel.infer(this.loaded.handle, wire, id);
    const outputs: Record<string, Tensor> = {};
    for (const t of out) outputs[t.name] = fromWire(t);
    return { id, outputs };
  }

  /** Frees the capsule's instance in the worker. */
  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    void this.channel.call({ op: "dispose", handle: this.loaded.handle });
  }
}

export interface LoadOptions {
  /** A specific version (default: the newest signed one, or the hub's assignment). */
  version?: string;
}

/** Capsules from one source, verified against one trust anchor. */
export class Runtime {
  private hidden = () => void this.beacon();
  constructor(
    private readonly channel: Channel,
    private readonly source: Source,
  ) {
    if (source.kind === "hub" && typeof document !== "undefined") {
      document.addEventListener("visibilitychange", this.onVisibility);
      addEventListener("pagehide", this.hidden);
    }
  }

  private onVisibility = () => {
    if (document.visibilityState === "hidden") void this.beacon();
  };

  /** Fetches (or takes from the cache), verifies and instantiates a model. */
  async load(name: string, options: LoadOptions = {}): Promise<Model> {
    const loaded = await this.channel.call<Loaded>({ op: "load", model: name, version: options.version });
    return new Model(this.channel, loaded);
  }

  /** A ground-truth label for an earlier prediction (`row` for a batch of several). */
  feedback(model: string, id: string, label: string | number, row?: number): void {
    const key = row === undefined ? id : `${id}/${row}`;
    void this.channel.call({ op: "feedback", model, id: key, label: String(label) });
  }

  /** Sends pending telemetry with `navigator.sendBeacon` (also done on page hide). */
  async beacon(): Promise<number> {
    if (this.source.kind !== "hub") return 0;
    const batches = await this.channel.call<string[]>({ op: "flush" });
    if (batches.length === 0) return 0;
    const url = `${this.source.hub.replace(/\/$/, "")}/api/v1/telemetry?access_token=${encodeURIComponent(this.source.token)}`;
    // text/plain is CORS-safelisted: a beacon to the hub's origin needs no preflight.
    const body = new Blob([`{"batches":[${batches.join(",")}]}`], { type: "text/plain" });
    if (!navigator.sendBeacon(url, body)) {
      throw new NetworkError("the browser refused to queue the telemetry beacon");
    }
    return batches.length;
  }

  /** Frees the models, stops telemetry and then the worker. Cache writes still pending
   * (a capsule downloaded by the last load) finish first. */
  close(): void {
    if (typeof document !== "undefined") {
      document.removeEventListener("visibilitychange", this.onVisibility);
      removeEventListener("pagehide", this.hidden);
    }
    this.channel.close();
  }
}

export interface FromUrlOptions {
  /** Publisher ed25519 public keys (hex) that sign the targets metadata. */
  publicKeys: string[];
  /** How many of them must sign (default 1). */
  threshold?: number;
  /** The signed targets metadata (default: `targets.json` in the base URL). */
  targets?: string;
  /** Cache Storage name (default `capsule-v1`). */
  cacheName?: string;
  /** Run capsules in a Web Worker (default true), so the page never blocks. With false they
   * run on the page's thread: each `infer` saves the worker round trip (0.1-0.2 ms in
   * Chromium) but blocks the page while the model runs. For models that answer in well
   * under a frame. */
  worker?: boolean;
}

export interface ConnectOptions {
  /** The hub's URL. */
  hub: string;
  /** This browser's node token (`POST /api/v1/nodes/{id}/token`). */
  token: string;
  /** The pinned root metadata (JSON text, as `capsule keys root` writes it). */
  root: string;
  /** This browser's id at the hub (default: one kept in localStorage). */
  nodeId?: string;
  /** Labels for rollouts (default `{kind: "browser"}`). */
  labels?: Record<string, string>;
  /** Telemetry window in milliseconds (default 10000). */
  telemetryWindowMs?: number;
  cacheName?: string;
  /** See `FromUrlOptions.worker` (default true). */
  worker?: boolean;
}

function browserId(): string {
  try {
    const k = "capsule-sdk-node-id";
    const have = localStorage.getItem(k);
    if (have) return have;
    const id = `browser-${requestId().slice(0, 8)}`;
    localStorage.setItem(k, id);
    return id;
  } catch {
    return `browser-${requestId().slice(0, 8)}`;
  }
}

let pageRuntimes = 0;

async function start(
  source: Source,
  trust: Trust,
  cacheName: string,
  telemetryWindowMs: number,
  worker: boolean,
): Promise<Runtime> {
  checkSupport(worker);
  const engine = new URL("./capsule-worker.js", import.meta.url);
  // On the page's thread, each runtime imports the engine under its own URL: a module of its
  // own, with its own state and core instance, as each worker has.
  const channel: Channel = worker
    ? new WorkerChannel(new Worker(engine, { type: "module" }))
    : new PageChannel((await import(/* @vite-ignore */ `${engine.href}?runtime=${++pageRuntimes}`)) as Engine);
  await channel.call({ op: "init", source, trust, cacheName, telemetryWindowMs });
  return new Runtime(channel, source);
}

export const Capsule = {
  /** Capsules from a static directory holding `targets.json` and `MODEL/VERSION.capsule.wasm`,
   * signed by these publisher keys. */
  async fromUrl(url: string, options: FromUrlOptions): Promise<Runtime> {
    const base = new URL(url.endsWith("/") ? url : `${url}/`, location.href).href;
    const targets = new URL(options.targets ?? "targets.json", base).href;
    return start(
      { kind: "url", base, targets },
      { kind: "keys", publicKeys: options.publicKeys, threshold: options.threshold ?? 1 },
      options.cacheName ?? "capsule-v1",
      0,
      options.worker ?? true,
    );
  },

  /** Capsules a hub assigns to this browser (rollouts included), verified against the pinned
   * root; telemetry and feedback go back to the hub. */
  async connect(options: ConnectOptions): Promise<Runtime> {
    return start(
      {
        kind: "hub",
        hub: options.hub,
        token: options.token,
        nodeId: options.nodeId ?? browserId(),
        labels: options.labels ?? { kind: "browser" },
      },
      { kind: "root", root: options.root },
      options.cacheName ?? "capsule-v1",
      options.telemetryWindowMs ?? 10_000,
      options.worker ?? true,
    );
  },
  checkSupport,
};

export default Capsule;
