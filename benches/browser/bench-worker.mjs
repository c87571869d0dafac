// Diagnostic only, for bench.html: bench-direct.mjs in a module worker, answering
// {buf} (the input's bytes, transferred) with the outputs' bytes (transferred), the way the
// SDK's worker answers an infer message.
import { direct } from './bench-direct.mjs';

let d = null;
self.onmessage = async (e) => {
  if (e.data.init) {
    const { model, input, shape } = e.data.init;
    d = await direct(model, input, shape);
    self.postMessage({ ready: true });
    return;
  }
  const out = d.full(new Uint8Array(e.data.buf));
  const buffers = Object.values(out).map((b) => b.buffer);
  self.postMessage({ out }, buffers);
};
