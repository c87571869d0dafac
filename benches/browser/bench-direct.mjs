// Diagnostic only, for bench.html (not how an application uses the SDK): a capsule
// instantiated in the calling thread and called the way the SDK's worker calls it
// (sdk-js/src/worker.ts): the request encoded and checked against the manifest by the SDK's
// core, capsule_infer, the response decoded. bench.html times `call` alone: the bare guest.

/** Loads `/repo/MODEL/1.0.0.capsule.wasm`; returns `full(bytes)` and `call(encoded)`. */
export async function direct(modelName, inputName, shape) {
  const core = await import('/sdk/core/capsule_sdk_core.js');
  await core.default({ module_or_path: '/sdk/core/capsule_sdk_core_bg.wasm' });
  const bytes = await (await fetch(`/repo/${modelName}/1.0.0.capsule.wasm`)).arrayBuffer();
  const module = await WebAssembly.compile(bytes);
  const manifest = new core.Manifest(new Uint8Array(WebAssembly.Module.customSections(module, 'capsule.manifest')[0]));
  const ex = (await WebAssembly.instantiate(module, {})).exports;
  if (ex.capsule_abi_version() !== 1 || ex.capsule_init() !== 0) throw new Error('capsule init failed');
  const call = (request) => {
    const ptr = ex.capsule_alloc(request.length, 1);
    new Uint8Array(ex.memory.buffer, ptr, request.length).set(request);
    const packed = ex.capsule_infer(ptr, request.length);
    const outPtr = Number(packed >> 32n);
    const outLen = Number(packed & 0xffffffffn);
    const out = new Uint8Array(ex.memory.buffer, outPtr, outLen).slice();
    ex.capsule_free(outPtr, outLen, 1);
    return out;
  };
  /** The input's raw bytes -> an encoded, checked request. */
  const encode = (data) => {
    const req = new core.Request();
    req.add(inputName, 'FP32', new Float64Array(shape), data);
    manifest.check(req);
    const encoded = req.encode();
    req.free();
    return encoded;
  };
  /** The input's raw bytes -> {output name: raw bytes}. */
  const full = (data) => {
    const out = core.decodeResponse(call(encode(data)));
    const tensors = {};
    for (let i = 0; i < out.length; i++) tensors[out.name(i)] = out.data(i);
    out.free();
    return tensors;
  };
  return { full, call, encode };
}
