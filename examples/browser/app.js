// The page of examples/browser: a digit drawn (or an image dropped) goes, as the same PNG
// bytes, to the mnist capsule in the browser (the SDK: verified, cached, run in a Web
// Worker) and to the same capsule on the edge node (Open Inference Protocol V2 REST); both
// answers are shown side by side and compared.
//
// The state of the page is mirrored on #app for tests: data-model (loading|ready|error),
// data-status (idle|running|done) and data-run (the number of the latest prediction); each
// result card carries data-top3 and data-scores (JSON), #verdict carries data-verdict.

import Capsule from "/sdk/capsule.js";

const $ = (id) => document.getElementById(id);
const app = $("app");
const pad = $("pad");
const ctx = pad.getContext("2d", { willReadFrequently: true });

const SIZE = pad.width; // 280: ten times MNIST's 28
const BRUSH = 22; // about 2.2 pixels at 28x28, like MNIST's strokes
const BOX = (SIZE * 20) / 28; // MNIST digits fit a 20x20 box inside 28x28
const MAX_FILE_BYTES = 1 << 20; // the capsule's max_bytes (examples/mnist-png/pipeline.toml)

let modelLoaded, modelFailed;
const state = {
  config: null,
  model: null, // the SDK's Model once loaded
  modelReady: null, // a promise of it (rejects with the load error), set below
  input: null, // { kind: "draw" } | { kind: "file", file, bitmap }
  run: 0,
  queue: Promise.resolve(),
  sentUrl: null,
};
state.modelReady = new Promise((resolve, reject) => {
  modelLoaded = resolve;
  modelFailed = reject;
});
state.modelReady.catch(() => {}); // reported by start(), and by each prediction

// ---------------------------------------------------------------------------------------
// Drawing

function clearPad() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, SIZE, SIZE);
  state.input = null;
  $("drop").classList.remove("has-ink", "has-file");
}

function padPoint(ev) {
  const r = pad.getBoundingClientRect();
  return { x: ((ev.clientX - r.left) * SIZE) / r.width, y: ((ev.clientY - r.top) * SIZE) / r.height };
}

let last = null;
pad.addEventListener("pointerdown", (ev) => {
  if (ev.button !== 0) return;
  ev.preventDefault();
  if (!state.input || state.input.kind !== "draw") {
    clearPad();
    state.input = { kind: "draw" };
  }
  $("drop").classList.add("has-ink");
  pad.setPointerCapture(ev.pointerId);
  last = padPoint(ev);
  ctx.fillStyle = "#fff";
  ctx.beginPath();
  ctx.arc(last.x, last.y, BRUSH / 2, 0, Math.PI * 2);
  ctx.fill();
});
pad.addEventListener("pointermove", (ev) => {
  if (!last) return;
  const events = ev.getCoalescedEvents ? ev.getCoalescedEvents() : [ev];
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = BRUSH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(last.x, last.y);
  for (const e of events.length ? events : [ev]) {
    const p = padPoint(e);
    ctx.lineTo(p.x, p.y);
    last = p;
  }
  ctx.stroke();
});
function endStroke() {
  if (!last) return;
  last = null;
  predict(); // every finished stroke asks both sides again
}
pad.addEventListener("pointerup", endStroke);
pad.addEventListener("pointercancel", endStroke);

/**
 * The drawing as MNIST prepared its digits: scaled so that it fits a 20x20 box of 28x28
 * (here 200x200 of 280x280) and moved so that its center of mass is in the middle. The
 * capsule itself then resizes the 280x280 PNG to 28x28 and scales it, like on the edge.
 */
async function drawingPng() {
  const { data } = ctx.getImageData(0, 0, SIZE, SIZE);
  let minX = SIZE, minY = SIZE, maxX = -1, maxY = -1, mass = 0, mx = 0, my = 0;
  for (let y = 0; y < SIZE; y++) {
    for (let x = 0; x < SIZE; x++) {
      const v = data[(y * SIZE + x) * 4];
      if (v === 0) continue;
      if (x < minX) minX = x;
      if (x > maxX) maxX = x;
      if (y < minY) minY = y;
      if (y > maxY) maxY = y;
      mass += v;
      mx += v * x;
      my += v * y;
    }
  }
  if (maxX < 0) return null;
  const w = maxX - minX + 1;
  const h = maxY - minY + 1;
  const scale = Math.min(BOX / Math.max(w, h), 3);
  const cx = mx / mass;
  const cy = my / mass;
  const out = new OffscreenCanvas(SIZE, SIZE);
  const o = out.getContext("2d");
  o.fillStyle = "#000";
  o.fillRect(0, 0, SIZE, SIZE);
  o.imageSmoothingQuality = "high";
  o.drawImage(pad, minX, minY, w, h, SIZE / 2 - (cx - minX) * scale, SIZE / 2 - (cy - minY) * scale, w * scale, h * scale);
  return out.convertToBlob({ type: "image/png" });
}

// ---------------------------------------------------------------------------------------
// Image files

async function setFile(file) {
  if (!file) return;
  showInputError(null);
  if (!file.type.startsWith("image/")) {
    showInputError(`${file.name} is not an image`);
    return;
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch {
    showInputError(`This browser cannot decode ${file.name}`);
    return;
  }
  clearPad();
  // Shown fitted in the pad (the capsule gets the file itself, or a re-encoded PNG).
  const s = Math.min(SIZE / bitmap.width, SIZE / bitmap.height);
  const w = bitmap.width * s;
  const h = bitmap.height * s;
  ctx.save();
  if ($("invert").checked) ctx.filter = "invert(1)";
  ctx.drawImage(bitmap, (SIZE - w) / 2, (SIZE - h) / 2, w, h);
  ctx.restore();
  state.input = { kind: "file", file, bitmap };
  $("drop").classList.add("has-file");
  predict();
}

/** A file as the capsule takes it: PNG or JPEG up to 1 MiB as is; anything else re-encoded. */
async function filePng({ file, bitmap }) {
  const invert = $("invert").checked;
  const asIs = /^image\/(png|jpeg)$/.test(file.type) && file.size <= MAX_FILE_BYTES && !invert;
  if (asIs) return { blob: file, note: `${file.name}, as is` };
  const s = Math.min(1, 512 / Math.max(bitmap.width, bitmap.height));
  const c = new OffscreenCanvas(Math.max(1, Math.round(bitmap.width * s)), Math.max(1, Math.round(bitmap.height * s)));
  const g = c.getContext("2d");
  if (invert) g.filter = "invert(1)";
  g.drawImage(bitmap, 0, 0, c.width, c.height);
  const why = invert ? "inverted" : file.size > MAX_FILE_BYTES ? "shrunk under 1 MiB" : "converted";
  return { blob: await c.convertToBlob({ type: "image/png" }), note: `${file.name}, ${why}` };
}

// ---------------------------------------------------------------------------------------
// The two sides

async function inferBrowser(bytes) {
  const model = await state.modelReady;
  const started = performance.now();
  const r = await model.infer({ image: bytes });
  const ms = performance.now() - started;
  const o = r.outputs;
  return {
    ms,
    top3: Array.from(o.top3.data, String),
    scores: Float32Array.from(o.top3_scores.data),
    probabilities: Float32Array.from(o.probabilities.data),
  };
}

function base64(bytes) {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
}

async function inferEdge(bytes) {
  if (!state.config) throw named("ConfigError", "no config.json: which model to ask is unknown");
  const { model: name } = state.config;
  // The version the browser verified, so that both sides run the very same capsule.
  const version = state.model ? `/versions/${encodeURIComponent(state.model.version)}` : "";
  const path = `/v2/models/${encodeURIComponent(name)}${version}/infer`;
  const body = JSON.stringify({
    inputs: [{ name: "image", shape: [1], datatype: "BYTES", data: [{ b64: base64(bytes) }] }],
  });
  const started = performance.now();
  let response;
  try {
    response = await fetch(path, { method: "POST", headers: { "content-type": "application/json" }, body });
  } catch (e) {
    throw named("NetworkError", `the node did not answer: ${e.message}`);
  }
  const json = await response.json().catch(() => ({}));
  const ms = performance.now() - started;
  if (!response.ok) throw named(`HTTP ${response.status}`, json.error || response.statusText);
  const out = Object.fromEntries((json.outputs || []).map((t) => [t.name, t.data.flat(Infinity)]));
  if (!out.top3 || !out.top3_scores) throw named("ProtocolError", "the answer has no top3 / top3_scores outputs");
  return {
    ms,
    path,
    top3: out.top3.map(String),
    scores: Float32Array.from(out.top3_scores),
    probabilities: out.probabilities ? Float32Array.from(out.probabilities) : null,
  };
}

function named(name, message) {
  const e = new Error(message);
  e.name = name;
  return e;
}

// ---------------------------------------------------------------------------------------
// Predictions: one at a time, a newer one supersedes the older ones still waiting.

function predict() {
  const run = ++state.run;
  app.dataset.run = String(run);
  app.dataset.status = "running";
  state.queue = state.queue
    .then(() => runPrediction(run))
    .catch((e) => {
      showInputError(`${e.name}: ${e.message}`);
      if (run === state.run) app.dataset.status = "done";
    });
  return state.queue;
}

async function runPrediction(run) {
  if (run !== state.run) return;
  let input;
  if (state.input && state.input.kind === "file") input = await filePng(state.input);
  else if (state.input) {
    const blob = await drawingPng();
    input = blob && { blob, note: "your drawing, centered like MNIST" };
  }
  if (!input) {
    resetResults("Draw a digit to see the answer");
    setVerdict("none", "Waiting for a digit", "Draw something first: the pad is empty.");
    app.dataset.status = "idle";
    return;
  }
  const bytes = new Uint8Array(await input.blob.arrayBuffer());
  showInputError(null);
  showSent(input, bytes);
  for (const side of ["local", "edge"]) $(side).classList.add("busy");

  // One after the other, so that neither latency includes the other's work.
  let local, edge;
  try {
    local = await inferBrowser(bytes.slice());
  } catch (e) {
    local = { error: e };
  }
  try {
    edge = await inferEdge(bytes);
  } catch (e) {
    edge = { error: e };
  }
  if (run !== state.run) return; // a newer prediction is on its way
  renderSide("local", local);
  renderSide("edge", edge);
  compare(local, edge);
  app.dataset.status = "done";
}

// ---------------------------------------------------------------------------------------
// Rendering

function pct(score) {
  const p = score * 100;
  if (p >= 0.01) return `${p.toFixed(2)} %`;
  if (p >= 0.0001) return `${p.toPrecision(2)} %`;
  return "< 0.0001 %";
}

function resetResults(message) {
  for (const side of ["local", "edge"]) {
    const card = $(side);
    card.classList.remove("busy");
    delete card.dataset.top3;
    delete card.dataset.scores;
    $(`${side}-digit`).textContent = "–";
    $(`${side}-conf`).textContent = message;
    $(`${side}-ms`).textContent = "–";
    $(`${side}-bars`).replaceChildren();
    $(`${side}-error`).hidden = true;
  }
  $("sent-box").hidden = true;
}

function renderSide(side, r) {
  const card = $(side);
  card.classList.remove("busy");
  const err = $(`${side}-error`);
  const bars = $(`${side}-bars`);
  if (r.error) {
    delete card.dataset.top3;
    delete card.dataset.scores;
    card.dataset.error = r.error.name || "Error";
    $(`${side}-digit`).textContent = "!";
    $(`${side}-conf`).textContent = "No answer";
    $(`${side}-ms`).textContent = "–";
    bars.replaceChildren();
    err.hidden = false;
    err.replaceChildren(Object.assign(document.createElement("strong"), { textContent: r.error.name || "Error" }), `: ${r.error.message}`);
    return;
  }
  delete card.dataset.error;
  err.hidden = true;
  card.dataset.top3 = JSON.stringify(r.top3);
  card.dataset.scores = JSON.stringify(Array.from(r.scores));
  $(`${side}-digit`).textContent = r.top3[0];
  $(`${side}-conf`).textContent = `${pct(r.scores[0])} sure`;
  $(`${side}-ms`).textContent = r.ms < 10 ? `${r.ms.toFixed(1)} ms` : `${Math.round(r.ms)} ms`;
  if (r.path) $("edge-call").textContent = `POST ${r.path}`;
  bars.replaceChildren(
    ...r.top3.map((label, i) => {
      const li = document.createElement("li");
      li.className = i === 0 ? "bar first" : "bar";
      const score = r.scores[i];
      li.innerHTML = `<span class="label"></span><span class="track"><span class="fill"></span></span><span class="value"></span><span class="raw"></span>`;
      li.querySelector(".label").textContent = label;
      li.querySelector(".fill").style.width = `${Math.max(0.5, score * 100)}%`;
      li.querySelector(".value").textContent = pct(score);
      li.querySelector(".raw").textContent = score.toPrecision(7);
      li.title = `P(${label}) = ${score}`;
      return li;
    }),
  );
}

function sameFloats(a, b) {
  if (!a || !b || a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (!Object.is(a[i], b[i])) return false;
  return true;
}

function maxDiff(a, b) {
  let d = 0;
  for (let i = 0; i < Math.min(a.length, b.length); i++) d = Math.max(d, Math.abs(a[i] - b[i]));
  return d;
}

function compare(local, edge) {
  const times = () => `In the browser ${$("local-ms").textContent}, on the edge ${$("edge-ms").textContent} (HTTP round trip included).`;
  if (local.error || edge.error) {
    const which = local.error && edge.error ? "Neither side" : local.error ? "The browser" : "The edge node";
    setVerdict("error", `${which} could not answer`, "See the error under the answer; nothing to compare.");
    return;
  }
  const sameLabels = local.top3.length === edge.top3.length && local.top3.every((l, i) => l === edge.top3[i]);
  const sameScores = sameFloats(local.scores, edge.scores);
  const sameProbs = sameFloats(local.probabilities, edge.probabilities);
  if (sameLabels && sameScores) {
    const all = sameProbs ? "all 10 probabilities" : "the three scores";
    setVerdict(
      "identical",
      `Identical answers: ${local.top3[0]}, with the same top 3 and the same scores`,
      `Bit for bit (${all} as FP32): one capsule, two runtimes. ${times()}`,
    );
  } else if (sameLabels) {
    setVerdict(
      "close",
      "Same digits, different scores",
      `The scores differ by up to ${maxDiff(local.scores, edge.scores).toExponential(2)}. ${times()}`,
    );
  } else {
    setVerdict("different", "The answers differ", `Browser: ${local.top3.join(", ")}; edge: ${edge.top3.join(", ")}. ${times()}`);
  }
}

function setVerdict(kind, title, detail) {
  const v = $("verdict");
  v.dataset.verdict = kind;
  $("verdict-title").textContent = title;
  $("verdict-detail").textContent = detail;
}

function showSent({ note }, bytes) {
  if (state.sentUrl) URL.revokeObjectURL(state.sentUrl);
  const kind = bytes[0] === 0x89 ? "PNG" : bytes[0] === 0xff ? "JPEG" : "image";
  state.sentUrl = URL.createObjectURL(new Blob([bytes]));
  const img = $("sent");
  img.src = state.sentUrl;
  img.onload = () => {
    $("sent-desc").textContent = `${kind} ${img.naturalWidth}×${img.naturalHeight}, ${kb(bytes.length)} · ${note}`;
  };
  $("sent-desc").textContent = `${kind}, ${kb(bytes.length)} · ${note}`;
  $("sent-box").hidden = false;
}

function kb(n) {
  return n < 1024 ? `${n} B` : `${(n / 1024).toFixed(1)} KB`;
}

function showInputError(message) {
  const p = $("input-error");
  p.hidden = !message;
  p.textContent = message || "";
}

function showStatus(kind, text) {
  $("status").dataset.kind = kind;
  $("status-text").textContent = text;
}

function short(hex) {
  return `${hex.slice(0, 12)}…`;
}

// ---------------------------------------------------------------------------------------
// Start

function wire() {
  $("clear").addEventListener("click", () => {
    clearPad();
    state.run++;
    app.dataset.run = String(state.run);
    app.dataset.status = "idle";
    resetResults("Draw a digit to see the answer");
    setVerdict("none", "Waiting for a digit", "Both answers will be compared here, score by score.");
  });
  $("predict").addEventListener("click", () => predict());
  document.querySelector("label[for=file]").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" || ev.key === " ") {
      ev.preventDefault();
      $("file").click();
    }
  });
  $("file").addEventListener("change", (ev) => {
    setFile(ev.target.files[0]);
    ev.target.value = "";
  });
  $("invert").addEventListener("change", () => {
    if (state.input && state.input.kind === "file") setFile(state.input.file);
  });
  const drop = $("drop");
  // Anywhere on the page: a dropped file must never navigate away.
  addEventListener("dragover", (ev) => {
    ev.preventDefault();
    drop.classList.add("dragging");
  });
  addEventListener("dragleave", (ev) => {
    if (!ev.relatedTarget) drop.classList.remove("dragging");
  });
  addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("dragging");
    setFile(ev.dataTransfer && ev.dataTransfer.files[0]);
  });
}

async function start() {
  clearPad();
  wire();
  try {
    const r = await fetch("config.json", { cache: "no-store" });
    if (!r.ok) throw named("ConfigError", `config.json answered ${r.status} (run examples/browser/run.sh)`);
    state.config = await r.json();
  } catch (e) {
    modelFailed(e);
    app.dataset.model = "error";
    showStatus("error", `${e.name}: ${e.message}`);
    return;
  }
  const { model: name, publicKey } = state.config;
  $("edge-call").textContent = `POST /v2/models/${name}/infer`;
  showStatus("loading", `Verifying and loading the “${name}” capsule in the browser…`);
  const started = performance.now();
  try {
    const rt = await Capsule.fromUrl("/capsules/", { publicKeys: [publicKey], targets: "/targets.json" });
    const model = await rt.load(name);
    state.model = model;
    modelLoaded(model);
    app.dataset.model = "ready";
    const ms = Math.round(performance.now() - started);
    const how = model.fromCache ? "from Cache Storage" : `downloaded (${(model.bytes / 1048576).toFixed(1)} MB)`;
    showStatus(
      "ready",
      `${model.name} ${model.version} · sha256 ${short(model.sha256)} · signature verified (key ${short(publicKey)}) · ${how}, ready in ${ms} ms`,
    );
  } catch (e) {
    modelFailed(e);
    app.dataset.model = "error";
    app.dataset.modelError = e.name;
    showStatus("error", `The browser could not load the capsule: ${e.name}: ${e.message}`);
    renderSide("local", { error: e });
  }
}

start();
