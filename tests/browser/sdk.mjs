// Drive the browser SDK (sdk-js) in headless chromium:
//
//   node tests/browser/sdk.mjs <plan.json>
//
// The plan (written by cli/tests/all/browser.rs) names a page that imports the SDK, a static
// repository of signed capsules, the publisher key, the fixture cases and the negative
// cases. The script runs every case through `Capsule.fromUrl(...).load(...).infer(...)`,
// checks that a tampered capsule and a wrongly signed repository are refused, reloads the
// page and loads again (the capsule must come from Cache Storage with no download), and,
// when the plan has a hub, follows a new version published there. Prints one JSON line:
// {"ok":true,"cases":[...],"refusals":{...},"reload":{...},"hub":{...}}.

import { readFileSync } from 'node:fs';
import { launch, done, fail, run, consoleErrors, TIMEOUT_MS } from './lib.mjs';

run(async () => {
  const [planPath] = process.argv.slice(2);
  if (!planPath) return fail('usage: node tests/browser/sdk.mjs <plan.json>');
  const plan = JSON.parse(readFileSync(planPath, 'utf8'));
  const { page } = await launch();
  const requests = [];
  page.on('request', (r) => requests.push(r.url()));
  page.on('console', (m) => process.stderr.write(`[page] ${m.text()}\n`));
  await page.goto(plan.page, { timeout: TIMEOUT_MS });
  await page.waitForFunction(() => window.Capsule !== undefined, null, { timeout: TIMEOUT_MS });

  // 1. Every fixture through the SDK, outputs as raw little-endian bytes (base64): in the
  // SDK's worker, then on the page's thread (`worker: false`), which finds every capsule in
  // the cache the first runtime filled before it closed.
  const runCases = (worker) => page.evaluate(async ([plan, worker]) => {
    const b64 = (u8) => btoa(Array.from(u8, (c) => String.fromCharCode(c)).join(''));
    const unb64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
    const ARR = { FP32: Float32Array, FP64: Float64Array, INT64: BigInt64Array, INT32: Int32Array,
      UINT8: Uint8Array, BOOL: Uint8Array, INT8: Int8Array, UINT64: BigUint64Array };
    const rt = await window.Capsule.fromUrl(plan.repo, { publicKeys: plan.publicKeys, worker });
    // A second runtime alive at the same time, trusting another key: it must refuse, and
    // must not change what the first one trusts (on the page's thread they share a page).
    const rogue = await window.Capsule.fromUrl(plan.repo, { publicKeys: [plan.otherKey], worker, cacheName: 'rogue' });
    const out = [];
    for (const c of plan.cases) {
      const model = await rt.load(c.model);
      const inputs = {};
      for (const t of c.inputs) {
        if (t.datatype === 'BYTES') {
          inputs[t.name] = { datatype: 'BYTES', shape: t.shape, data: t.items.map(unb64) };
        } else {
          const bytes = unb64(t.data);
          inputs[t.name] = { datatype: t.datatype, shape: t.shape, data: new ARR[t.datatype](bytes.buffer) };
        }
      }
      const started = performance.now();
      const r = await model.infer(inputs);
      const ms = performance.now() - started;
      const outputs = {};
      for (const [name, t] of Object.entries(r.outputs)) {
        outputs[name] = t.datatype === 'BYTES'
          ? { datatype: t.datatype, shape: t.shape, items: t.data }
          : { datatype: t.datatype, shape: t.shape, data: b64(new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength)) };
      }
      out.push({ model: c.model, version: model.version, sha256: model.sha256, fromCache: model.fromCache, ms, outputs });
      model.dispose();
    }
    let rogueError = null;
    try {
      await rogue.load(plan.cases[0].model);
    } catch (e) {
      rogueError = e.name;
    }
    out.push({ rogue: rogueError });
    rogue.close();
    rt.close();
    return out;
  }, [plan, worker]);
  const cases = await runCases(true);
  const casesOnPage = await runCases(false);
  const codeDownloads = requests.filter((u) => u.startsWith(new URL('code/', plan.repo).href)).length;

  // 1b. Raw inputs as a page has them: a PNG Blob, ImageData, record objects, a list.
  const raw = await page.evaluate(async (plan) => {
    const unb64 = (s) => Uint8Array.from(atob(s), (c) => c.charCodeAt(0));
    const rt = await window.Capsule.fromUrl(plan.repo, { publicKeys: plan.publicKeys });
    const out = {};
    const image = plan.cases.find((c) => c.model === 'mnist-png');
    const png = unb64(image.inputs[0].items[0]);
    const mnist = await rt.load('mnist-png');
    const blob = new Blob([png], { type: 'image/png' });
    out.blob = (await mnist.infer({ image: blob })).outputs.top3.data;
    const bitmap = await createImageBitmap(blob);
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = canvas.getContext('2d');
    ctx.drawImage(bitmap, 0, 0);
    const imageData = ctx.getImageData(0, 0, bitmap.width, bitmap.height);
    out.imageData = (await mnist.infer({ image: imageData })).outputs.top3.data;
    out.list = (await mnist.infer({ image: [blob, png] })).outputs.top3.data;
    const wine = plan.cases.find((c) => c.model === 'wine-tabular');
    const records = wine.inputs[0].items.map((i) => JSON.parse(new TextDecoder().decode(unb64(i))));
    const w = await rt.load('wine-tabular');
    out.records = (await w.infer({ record: records })).outputs.label.data;
    out.record = (await w.infer({ record: records[0] })).outputs.label.data;
    rt.close();
    return out;
  }, plan);

  // 2. Refusals: a tampered capsule, a repository signed by another key, a missing model,
  // a request that does not fit.
  const refusals = await page.evaluate(async (plan) => {
    const attempt = async (f) => {
      try {
        await f();
        return { refused: false };
      } catch (e) {
        return { refused: true, name: e.name, message: e.message };
      }
    };
    const tampered = await window.Capsule.fromUrl(plan.tamperedRepo, { publicKeys: plan.publicKeys, cacheName: 'tampered' });
    const other = await window.Capsule.fromUrl(plan.repo, { publicKeys: [plan.otherKey], cacheName: 'other' });
    const good = await window.Capsule.fromUrl(plan.repo, { publicKeys: plan.publicKeys, cacheName: 'good' });
    const first = plan.cases[0];
    const r = {
      tampered: await attempt(() => tampered.load(plan.tamperedModel)),
      wrongKey: await attempt(() => other.load(first.model)),
      missing: await attempt(() => good.load('no-such-model')),
      badInput: await attempt(async () => {
        const m = await good.load(first.model);
        await m.infer({ nope: new Float32Array(1) });
      }),
    };
    for (const rt of [tampered, other, good]) rt.close();
    // A browser without Cache Storage (an insecure context, say) is told so.
    const caches = Object.getOwnPropertyDescriptor(window, 'caches') ? window.caches : undefined;
    Object.defineProperty(window, 'caches', { value: undefined, configurable: true });
    r.unsupported = await attempt(() => window.Capsule.fromUrl(plan.repo, { publicKeys: plan.publicKeys }));
    Object.defineProperty(window, 'caches', { value: caches, configurable: true });
    return r;
  }, plan);

  // 3. Reload: the first case's capsule must come from Cache Storage, not the network.
  const capsuleUrl = new URL(`${plan.cases[0].model}/`, plan.repo).href;
  requests.length = 0;
  await page.reload({ timeout: TIMEOUT_MS });
  await page.waitForFunction(() => window.Capsule !== undefined, null, { timeout: TIMEOUT_MS });
  const reload = await page.evaluate(async (plan) => {
    const rt = await window.Capsule.fromUrl(plan.repo, { publicKeys: plan.publicKeys });
    const m = await rt.load(plan.cases[0].model);
    const r = { fromCache: m.fromCache, version: m.version };
    rt.close();
    return r;
  }, plan);
  reload.downloads = requests.filter((u) => u.startsWith(capsuleUrl));
  reload.targetsFetched = requests.some((u) => u.endsWith('/targets.json'));

  // 4. A hub: the browser follows the version the hub assigns, and a new one replaces the old
  // in the cache.
  let hub = null;
  if (plan.hub) {
    hub = await page.evaluate(async (plan) => {
      const rt = await window.Capsule.connect({ hub: plan.hub.url, token: plan.hub.token, root: plan.hub.root, nodeId: plan.hub.nodeId, cacheName: 'hub' });
      const run = async () => {
        const m = await rt.load(plan.hub.model);
        const r = await m.infer({ x: new Float32Array([0]) });
        const y = r.outputs.y.data[0];
        m.dispose();
        return { version: m.version, y, id: r.id };
      };
      const first = await run();
      window.__capsuleHub = { rt, run };
      return { first };
    }, plan);
    // The Rust side publishes the new version, then tells us through a file.
    const { writeFileSync, existsSync } = await import('node:fs');
    writeFileSync(plan.hub.ready, 'loaded');
    const started = Date.now();
    while (!existsSync(plan.hub.published)) {
      if (Date.now() - started > 60_000) return fail('the new version was never published');
      await new Promise((r) => setTimeout(r, 100));
    }
    const second = await page.evaluate(async () => {
      const deadline = Date.now() + 20_000;
      for (;;) {
        const r = await window.__capsuleHub.run();
        if (r.version !== undefined && (r.y !== 1 || Date.now() > deadline)) return r;
        await new Promise((res) => setTimeout(res, 200));
      }
    });
    // The SDK writes the cache in the background: wait (10 s at most) for one model entry
    // (beside the guest code, which every model shares).
    const cached = await page.evaluate(async () => {
      const deadline = Date.now() + 10_000;
      for (;;) {
        const c = await caches.open('hub');
        const urls = (await c.keys()).map((r) => r.url).filter((u) => !u.endsWith('/state'));
        if (urls.filter((u) => !u.includes('/code/')).length === 1 || Date.now() > deadline) return urls;
        await new Promise((res) => setTimeout(res, 100));
      }
    });
    const beacons = await page.evaluate(async () => window.__capsuleHub.rt.beacon());
    await new Promise((r) => setTimeout(r, 1000)); // the beacon leaves before the browser closes
    hub.second = second;
    hub.cached = cached;
    hub.beacons = beacons;
  }

  done({ cases, casesOnPage, raw, refusals, reload, hub, code_downloads: codeDownloads, console_errors: consoleErrors });
});
