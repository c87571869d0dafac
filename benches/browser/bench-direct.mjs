// Diagnostic only, for bench.html (not how an application uses the SDK): a capsule
// instantiated in the calling thread, so that bench.html can time `capsule_infer` alone (the
// bare guest) on a request the SDK's core encoded and checked once.

/** Loads `/repo/MODEL/1.0.0.capsule.wasm`; returns `encode(bytes)` and `call(encoded)`. */
export async function direct(modelName, inputName, shape) {
  const core = await import('/sdk/core/capsule_sdk_core.js');
  await core.default({ module_or_path: '/sdk/core/capsule_sdk_core_bg.wasm' });
  const bytes = await (await fetch(`/repo/${modelName}/1.0.0.capsule.wasm`)).arrayBuffer();
  const module = await WebAssembly.compile(bytes);
  const manifest = new core.Manifest(new Uint8Array(WebAssembly.Module.customSections(module, 'capsule.manifest')[0]));
  // The host kernels answer "unavailable", as the SDK's worker does: every product function
  // the guest imports traps (the guest never calls one after abi_version answers 0).
  const hostKernels = { capsule_kernels: { abi_version: () => 0 } };
  for (const i of WebAssembly.Module.imports(module)) {
    if (i.module === 'capsule_kernels' && i.kind === 'function' && !(i.name in hostKernels.capsule_kernels)) {
      hostKernels.capsule_kernels[i.name] = () => {
        throw new WebAssembly.RuntimeError(`capsule_kernels.${i.name}: no host kernels in a browser`);
      };
    }
  }
  const ex = (await WebAssembly.instantiate(module, hostKernels)).exports;
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
  return { call, encode };
}
