// Browser benchmark: a capsule through the SDK vs onnxruntime-web (wasm backend, one
// thread) on the same ONNX model, in the same headless chromium. Driven by run.sh, which
// builds and signs the capsules, lays out the site and starts `capsule serve --static`:
//
//   node benches/browser/bench.mjs --base http://127.0.0.1:PORT/ --key HEX --site DIR \
//        --models mnist_cnn,digits_mlp [--first-reps 3] [--warmup 200] [--runs 200] [--batch dynamic|1]
//        [--guest "capsule 0.1.0 (guest guest-release)"] [--profile 0|1]
//
// For each model:
//   - first result, capsule: a fresh browser context (empty HTTP cache and Cache Storage)
//     loads bench.html?mode=sdk-first, which imports the SDK, calls fromUrl, load, infer;
//     the time is performance.now() at the result, i.e. from navigation start. Twice: with
//     the SDK's worker (the default) and with `worker: false` (the page's thread).
//   - first result, ORT: the same with mode=ort-first (import ort, create session, run).
//   - bytes: every response of the page load, workers included, from playwright's
//     requestfinished events and request.sizes() (body as transferred + headers).
//   - steady state: a fresh context runs mode=steady: both runtimes loaded, `warmup` calls
//     of each, then `runs` iterations calling every arm, rotating which goes first. Arms:
//     `sdk` (worker), `sdk_page` (worker: false), `ort` (main thread), and diagnostics:
//     `guest` (the bare capsule_infer call; bench-direct.mjs) and `echo` (a worker round trip
//     that does nothing). A second page (proxy=1) runs `sdk` against ORT in its own worker
//     (`env.wasm.proxy`): both runtimes off the page's thread.
//   - with --profile 1 (PROFILE=1 in run.sh): V8's sampling profiler (Chrome DevTools
//     Protocol, 100 us) records the steady-state page, whose thread runs the `sdk_page`,
//     `guest` and `ort` arms, and `v8_profile` lists the top frames by self time with the
//     module each belongs to. The guest's function names are there only when the CLI carries
//     a guest with its name section (CAPSULE_GUEST_PROFILE=guest-profile); the shipped guest
//     shows wasm function indices.
// Prints one JSON line with every number (RAW=1 adds every steady-state sample); exits 1 with
// {"ok":false,...} on failure.
//
// The browser is Debian's chromium ($CHROMIUM, default /usr/bin/chromium) launched as in
// tests/browser/lib.mjs; playwright-core never downloads a browser.

import { accessSync, constants, readFileSync, writeSync } from 'node:fs';
import { loadavg } from 'node:os';
import { join } from 'node:path';
import { createHash } from 'node:crypto';
import { gzipSync } from 'node:zlib';
import { chromium } from 'playwright-core';

// Same flags as tests/browser/lib.mjs (not imported: that file resolves playwright-core
// from tests/browser/node_modules, which this benchmark does not install).
const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-dev-shm-usage',
];

/** The models: fixture directory (or generated real network, benches/models) -> capsule name,
 * input, shape, output compared, input scale. */
const MODELS = {
  textdir: { name: 'textdir', input: 'input', shape: [1, 3, 48, 192], out: 'gemm_41', scale: 1 },
  squeezenet: { name: 'squeezenet', input: 'input', shape: [1, 3, 224, 224], out: 'flatten_117', scale: 1 },
  resnet50: { name: 'resnet50', input: 'input', shape: [1, 3, 224, 224], out: 'gemm_230', scale: 1 },
  mnist_cnn: { name: 'mnist-cnn', input: 'input', shape: [1, 1, 28, 28], out: 'probabilities', scale: 1 },
  digits_mlp: { name: 'digits-mlp', input: 'input', shape: [1, 64], out: 'probabilities', scale: 16 },
  digits_logreg: { name: 'digits-logreg', input: 'input', shape: [1, 64], out: 'probabilities', scale: 16 },
};

const PAGE_TIMEOUT_MS = 120_000;
const WATCHDOG_MS = 15 * 60_000;

function args() {
  const a = process.argv.slice(2);
  const o = { firstReps: 3, warmup: 200, runs: 200, batch: 'dynamic', guest: null, profile: '0' };
  for (let i = 0; i < a.length; i += 2) {
    const k = a[i].replace(/^--/, '').replace(/-([a-z])/g, (_, c) => c.toUpperCase());
    o[k] = a[i + 1];
  }
  for (const k of ['base', 'key', 'site', 'models']) {
    if (!o[k]) throw new Error(`missing --${k}`);
  }
  o.firstReps = Number(o.firstReps);
  o.profile = o.profile === '1';
  o.models = o.models.split(',');
  return o;
}

function print(obj) {
  writeSync(1, JSON.stringify(obj) + '\n');
}

function median(xs) {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

const round = (x, d = 3) => (typeof x === 'number' ? Number(x.toFixed(d)) : x);
function roundAll(v) {
  if (Array.isArray(v)) return v.map(roundAll);
  if (v && typeof v === 'object') return Object.fromEntries(Object.entries(v).map(([k, x]) => [k, roundAll(x)]));
  return round(v);
}

function category(path) {
  if (path.startsWith('/sdk/') || path.startsWith('/ort/')) return 'runtime';
  if (path.endsWith('.capsule.wasm') || path.endsWith('.onnx')) return 'model';
  if (path.endsWith('/targets.json')) return 'metadata';
  if (path.startsWith('/bench')) return 'page';
  return 'other';
}

const gzipSizes = new Map();
/** gzip -6 size of a served file (what a server that compresses would send). */
function gzipSize(path, file) {
  if (!gzipSizes.has(path)) gzipSizes.set(path, gzipSync(file).length);
  return gzipSizes.get(path);
}

/** A legacy-mangled Rust symbol (`_ZN13capsule_model7kernels4wasm4half17h...E`) as a path
 * without its hash (`capsule_model::kernels::wasm::half`); other names as they are. */
function demangle(name) {
  const m = /^\$?_ZN(.*)E$/.exec(name);
  // Names a module's name section already demangled keep their hash: dropped too.
  if (!m) return name.replace(/::h[0-9a-f]{16}$/, '');
  const parts = [];
  let rest = m[1];
  while (rest.length > 0) {
    const len = /^(\d+)/.exec(rest);
    if (!len) return name;
    const n = Number(len[1]);
    // A `_` before a `$` escape only keeps the identifier from starting with `$`.
    parts.push(rest.slice(len[1].length, len[1].length + n).replace(/^_\$/, '$'));
    rest = rest.slice(len[1].length + n);
  }
  if (parts.length > 1 && /^h[0-9a-f]{16}$/.test(parts[parts.length - 1])) parts.pop();
  const escapes = { SP: '@', BP: '*', RF: '&', LT: '<', GT: '>', LP: '(', RP: ')', C: ',' };
  return parts
    .join('::')
    .replace(/\$([A-Z]{1,2})\$/g, (e, k) => escapes[k] ?? e)
    .replace(/\$u([0-9a-f]{2})\$/g, (_, h) => String.fromCharCode(parseInt(h, 16)))
    .replace(/\.\./g, '::')
    .replace(/^_/, '');
}

/** Which module a profiled frame belongs to: the capsule's guest, the SDK's core,
 * onnxruntime-web's wasm (the page's other wasm module), or the script's file name. */
function moduleOf(url, names) {
  if (!url.startsWith('wasm://')) return url ? url.split('/').pop().split('?')[0] : '(V8)';
  if (names.some((n) => n.includes('tract_') || n.includes('capsule_model'))) return 'capsule guest (wasm)';
  if (names.some((n) => n.includes('capsule_sdk_core'))) return 'capsule SDK core (wasm)';
  return `other wasm (onnxruntime-web) ${url.slice(-8)}`;
}

/** Self time per function and per module of a V8 CPU profile (`Profiler.stop`), in percent
 * of the thread's busy samples (idle ones left out), the top `top` functions first. */
function summarizeProfile(profile, top = 25) {
  const interval = (profile.endTime - profile.startTime) / Math.max(1, profile.samples?.length ?? 1);
  const namesByUrl = new Map();
  for (const n of profile.nodes) {
    const { url } = n.callFrame;
    if (!namesByUrl.has(url)) namesByUrl.set(url, []);
    namesByUrl.get(url).push(n.callFrame.functionName);
  }
  // Each script's module once, not once per node: a ResNet-50 profile has thousands of nodes.
  const moduleByUrl = new Map([...namesByUrl].map(([url, names]) => [url, moduleOf(url, names)]));
  const hits = new Map();
  for (const id of profile.samples ?? []) hits.set(id, (hits.get(id) ?? 0) + 1);
  const byFunction = new Map();
  const byModule = new Map();
  let total = 0;
  for (const n of profile.nodes) {
    const count = hits.get(n.id) ?? 0;
    const { url, functionName } = n.callFrame;
    // Time the thread waited (between iterations, for the worker's answers) is no one's.
    if (count === 0 || (!url && functionName === '(idle)')) continue;
    const module = moduleByUrl.get(url);
    const name = demangle(functionName) || '(anonymous)';
    const key = `${module}\u0000${name}`;
    byFunction.set(key, (byFunction.get(key) ?? 0) + count);
    byModule.set(module, (byModule.get(module) ?? 0) + count);
    total += count;
  }
  const share = (c) => Number(((100 * c) / Math.max(1, total)).toFixed(2));
  return {
    busy_samples: total,
    sample_interval_us: Number(interval.toFixed(1)),
    modules: [...byModule].sort((a, b) => b[1] - a[1]).map(([module, c]) => ({ module, percent: share(c) })),
    top: [...byFunction]
      .sort((a, b) => b[1] - a[1])
      .slice(0, top)
      .map(([key, c]) => {
        const [module, name] = key.split('\u0000');
        return { percent: share(c), function: name, module };
      }),
  };
}

/** One page load in a fresh context; returns the page's result and what it downloaded (and,
 * with `profile`, the page's V8 CPU profile summarized). */
async function measure(browser, url, site, profile = false) {
  const context = await browser.newContext();
  context.setDefaultTimeout(PAGE_TIMEOUT_MS);
  const page = await context.newPage();
  let cdp = null;
  if (profile) {
    cdp = await context.newCDPSession(page);
    await cdp.send('Profiler.enable');
    await cdp.send('Profiler.setSamplingInterval', { interval: 100 });
    await cdp.send('Profiler.start');
  }
  const finished = [];
  const failed = [];
  const errors = [];
  let workers = 0;
  context.on('requestfinished', (r) => finished.push(r));
  context.on('requestfailed', (r) => failed.push(`${r.url()}: ${r.failure()?.errorText}`));
  page.on('worker', () => workers++);
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.location()?.url?.endsWith('/favicon.ico')) errors.push(m.text());
  });
  page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
  try {
    await page.goto(url, { timeout: PAGE_TIMEOUT_MS });
    await page.waitForFunction(() => window.__bench || window.__benchError, null, {
      timeout: PAGE_TIMEOUT_MS,
      polling: 100,
    });
    const error = await page.evaluate(() => window.__benchError);
    if (error) throw new Error(`${url}: ${error} ${errors.join('; ')}`);
    const result = await page.evaluate(() => window.__bench);
    const v8Profile = cdp ? summarizeProfile((await cdp.send('Profiler.stop')).profile) : undefined;
    // The page's own resource timing (its worker's fetches are not in it).
    const pageResources = await page.evaluate(() =>
      performance.getEntriesByType('resource').reduce((n, e) => n + e.transferSize, 0),
    );
    const requests = [];
    for (const r of finished) {
      const u = new URL(r.url());
      if (u.pathname === '/favicon.ico') continue;
      const s = await r.sizes();
      const response = await r.response();
      let file = null;
      try {
        file = readFileSync(join(site, decodeURIComponent(u.pathname)));
      } catch {
        // not a file of the site
      }
      const encoding = response ? (await response.allHeaders())['content-encoding'] ?? null : null;
      // Chromium reports no body size for a worker's own script (0 bytes): the server sends
      // files as they are (no content-encoding), so that body is the file.
      const fromFile = s.responseBodySize === 0 && file !== null && file.length > 0 && !encoding;
      requests.push({
        path: u.pathname,
        status: response ? response.status() : null,
        category: category(u.pathname),
        body: fromFile ? file.length : s.responseBodySize,
        body_from_file: fromFile,
        encoding,
        headers: s.responseHeadersSize,
        gzip: file ? gzipSize(u.pathname, file) : null,
      });
    }
    const bytes = { total: 0, gzip_total: 0, by_category: {} };
    for (const r of requests) {
      const n = r.body + r.headers;
      bytes.total += n;
      bytes.gzip_total += (r.gzip ?? r.body) + r.headers;
      const c = (bytes.by_category[r.category] ??= { bytes: 0, gzip: 0, files: [] });
      c.bytes += n;
      c.gzip += (r.gzip ?? r.body) + r.headers;
      c.files.push(`${r.path} ${r.status} ${r.body}${r.body_from_file ? ' (file size)' : ''}${r.encoding ? ` ${r.encoding}` : ''}`);
    }
    return { result, bytes, page_resource_timing_bytes: pageResources, workers, failed, console_errors: errors, v8Profile };
  } finally {
    await context.close();
  }
}

function query(params) {
  return new URLSearchParams(Object.entries(params).map(([k, v]) => [k, String(v)])).toString();
}

async function main() {
  const o = args();
  const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
  accessSync(executablePath, constants.X_OK);
    const browser = await chromium.launch({ executablePath, headless: true, timeout: 60_000, args: CHROMIUM_ARGS });
  const out = {
    ok: true,
    chromium: browser.version(),
    commit: o.commit ?? null,
    // The CLI that built the capsules (`capsule --version` names its guest build).
    cli: o.guest,
    // dynamic: N stays symbolic; 1: capsules built with --input-shape, ORT given
    // freeDimensionOverrides {N: 1}.
    batch: o.batch,
    // Which SDK build was served (sha256 of capsule.js, capsule-worker.js and the core wasm).
    sdk_sha256: createHash('sha256')
      .update(Buffer.concat(['capsule.js', 'capsule-worker.js', 'core/capsule_sdk_core_bg.wasm'].map((f) => readFileSync(join(o.site, 'sdk', f)))))
      .digest('hex')
      .slice(0, 16),
    // The machine's 1-minute load average when the run started and ended (2 cores here:
    // above 2, other processes compete with the browser's threads).
    load_start: Number(loadavg()[0].toFixed(2)),
    first_reps: o.firstReps,
    warmup: Number(o.warmup),
    runs: Number(o.runs),
    models: {},
  };
  try {
    for (const dir of o.models) {
      const m = MODELS[dir];
      if (!m) throw new Error(`unknown model ${dir}`);
      const common = { input: m.input, shape: m.shape.join(','), scale: m.scale, batch: o.batch };
      const sdkUrl = new URL(`bench.html?${query({ mode: 'sdk-first', model: m.name, key: o.key, ...common })}`, o.base).href;
      const pageUrl = new URL(`bench.html?${query({ mode: 'sdk-first', model: m.name, key: o.key, worker: 0, ...common })}`, o.base).href;
      const ortUrl = new URL(`bench.html?${query({ mode: 'ort-first', onnx: `/models/${dir}.onnx`, ...common })}`, o.base).href;
      const steadyUrl = (proxy) =>
        new URL(
          `bench.html?${query({ mode: 'steady', model: m.name, key: o.key, onnx: `/models/${dir}.onnx`, out: m.out, warmup: o.warmup, runs: o.runs, raw: process.env.RAW === '1' ? 1 : 0, proxy, ...common })}`,
          o.base,
        ).href;

      const sdk = [];
      const sdkPage = [];
      const ort = [];
      const firsts = [
        [sdk, sdkUrl],
        [sdkPage, pageUrl],
        [ort, ortUrl],
      ];
      for (let i = 0; i < o.firstReps; i++) {
        // Rotate which goes first.
        for (let j = 0; j < firsts.length; j++) {
          const [into, url] = firsts[(i + j) % firsts.length];
          into.push(await measure(browser, url, o.site));
        }
      }
      const steady = await measure(browser, steadyUrl(0), o.site, o.profile);
      const steadyProxy = await measure(browser, steadyUrl(1), o.site);

      // The first results of the two runtimes must agree.
      const b = ort[0].result.outputs[m.out];
      const firstDiff = Math.max(
        ...[sdk, sdkPage].flatMap((runs) => runs[0].result.outputs[m.out].map((x, i) => Math.abs(x - b[i]))),
      );

      const summary = (runs, keys) => ({
        first_result_ms: runs.map((r) => r.result.first_result_ms),
        first_result_median_ms: median(runs.map((r) => r.result.first_result_ms)),
        ...Object.fromEntries(keys.map((k) => [`${k}_median`, median(runs.map((r) => r.result[k]))])),
        bytes: runs[0].bytes.total,
        bytes_gzip: runs[0].bytes.gzip_total,
        bytes_by_category: runs[0].bytes.by_category,
        bytes_every_load: runs.map((r) => r.bytes.total),
        page_resource_timing_bytes: runs[0].page_resource_timing_bytes,
        workers: runs[0].workers,
        failed: runs.flatMap((r) => r.failed),
        console_errors: runs.flatMap((r) => r.console_errors),
      });
      const capsule = (runs) => ({
        ...summary(runs, ['script_start_ms', 'import_ms', 'from_url_ms', 'load_ms', 'infer_ms']),
        load_timings_median: Object.fromEntries(
          Object.keys(runs[0].result.load_timings).map((k) => [k, median(runs.map((r) => r.result.load_timings[k]))]),
        ),
        from_cache: runs.map((r) => r.result.from_cache),
        capsule_bytes: runs[0].result.capsule_bytes,
      });
      const firstMedian = (runs) => median(runs.map((r) => r.result.first_result_ms));
      out.models[dir] = roundAll({
        capsule: capsule(sdk),
        capsule_page: capsule(sdkPage),
        ort: {
          ...summary(ort, ['script_start_ms', 'import_ms', 'create_ms', 'run_ms']),
          env: ort[0].result.ort,
          cross_origin_isolated: ort[0].result.cross_origin_isolated,
        },
        first_result_ratio: firstMedian(sdk) / firstMedian(ort),
        first_result_page_ratio: firstMedian(sdkPage) / firstMedian(ort),
        first_result_max_abs_diff: firstDiff,
        steady: {
          ...steady.result,
          workers: steady.workers,
          console_errors: steady.console_errors,
        },
        ...(steady.v8Profile ? { v8_profile: steady.v8Profile } : {}),
        steady_proxy: {
          ...steadyProxy.result,
          workers: steadyProxy.workers,
          console_errors: steadyProxy.console_errors,
        },
      });
      out.ort_version = out.ort_version ?? ort[0].result.ort.version;
    }
    // Two models of one guest build on one page (the first two models given): the second
    // one's time to its first result and bytes, capsule SDK (split form: the second model
    // moves only its image) against onnxruntime-web (its runtime is loaded; the second model
    // moves its .onnx).
    if (o.models.length >= 2) {
      const [a, b] = o.models.slice(0, 2).map((d) => [d, MODELS[d]]);
      const params = {
        model: a[1].name, input: a[1].input, shape: a[1].shape.join(','), scale: a[1].scale, onnx: `/models/${a[0]}.onnx`,
        model2: b[1].name, input2: b[1].input, shape2: b[1].shape.join(','), scale2: b[1].scale, onnx2: `/models/${b[0]}.onnx`,
        key: o.key, batch: o.batch,
      };
      const sdkTwo = [];
      const ortTwo = [];
      for (let i = 0; i < o.firstReps; i++) {
        for (const [into, mode] of i % 2 ? [[ortTwo, 'ort-two'], [sdkTwo, 'sdk-two']] : [[sdkTwo, 'sdk-two'], [ortTwo, 'ort-two']]) {
          into.push(await measure(browser, new URL(`bench.html?${query({ mode, ...params })}`, o.base).href, o.site));
        }
      }
      const two = (runs) => ({
        first_result_median_ms: median(runs.map((r) => r.result.first.result_ms)),
        first_bytes: runs[0].result.first.bytes,
        second_result_median_ms: median(runs.map((r) => r.result.second.result_ms)),
        second_bytes: runs[0].result.second.bytes,
        console_errors: runs.flatMap((r) => r.console_errors),
      });
      const c = two(sdkTwo);
      const r = two(ortTwo);
      out.two_models = roundAll({
        models: [a[0], b[0]],
        capsule: c,
        ort: r,
        capsule_second_vs_first_time: c.second_result_median_ms / c.first_result_median_ms,
        capsule_second_vs_first_bytes: c.second_bytes / c.first_bytes,
        ort_second_vs_first_time: r.second_result_median_ms / r.first_result_median_ms,
        second_time_capsule_vs_ort: c.second_result_median_ms / r.second_result_median_ms,
      });
    }
  } finally {
    await browser.close();
  }
  out.load_end = Number(loadavg()[0].toFixed(2));
  print(out);
  process.exit(0);
}

setTimeout(() => {
  print({ ok: false, error: `timed out after ${WATCHDOG_MS / 1000} s` });
  process.exit(1);
}, WATCHDOG_MS).unref();
main().catch((e) => {
  print({ ok: false, error: String(e && e.message ? e.message : e).split('\n')[0] });
  process.exit(1);
});
