// Drive the browser example (examples/browser) in headless chromium:
//
//   node tests/browser/example.mjs <node URL> <screenshot.png>
//
// Opens the page the node serves, waits until the SDK has verified and loaded the capsule,
// draws a "1" (one vertical stroke) on the pad with mouse events, clicks "Recognize", waits
// for both answers (the SDK in the page and the node over V2 REST), checks that they are the
// same (top-3 labels, scores to the last digit) and that the top label is a digit, saves a
// screenshot and prints one JSON line:
// {"ok":true,"browser":{"top3":[...],"scores":[...],"ms":"..."},"edge":{...},"verdict":...}.

import { launch, done, fail, run, consoleErrors, TIMEOUT_MS } from './lib.mjs';

/** Loading a 16 MiB capsule (download, hash, compile) on a loaded two-core runner. */
const LOAD_TIMEOUT_MS = 60_000;

run(async () => {
  const [url, screenshot] = process.argv.slice(2);
  if (!url || !screenshot) return fail('usage: node tests/browser/example.mjs <node URL> <screenshot.png>');
  const { page } = await launch();
  page.on('console', (m) => process.stderr.write(`[page] ${m.text()}\n`));
  await page.goto(url, { timeout: TIMEOUT_MS });

  // 1. The capsule is verified and loaded in the page.
  await page.waitForFunction(
    () => ['ready', 'error'].includes(document.getElementById('app').dataset.model),
    null,
    { timeout: LOAD_TIMEOUT_MS },
  );
  const status = await page.textContent('#status-text');
  if ((await page.getAttribute('#app', 'data-model')) !== 'ready') {
    return fail(`the page could not load the capsule: ${status}`);
  }

  // 2. A "1": one vertical stroke down the middle of the pad.
  const box = await page.locator('#pad').boundingBox();
  const x = box.x + box.width * 0.5;
  await page.mouse.move(x, box.y + box.height * 0.18);
  await page.mouse.down();
  for (let i = 1; i <= 16; i++) {
    await page.mouse.move(x + i * 0.4, box.y + box.height * (0.18 + (0.64 * i) / 16));
  }
  await page.mouse.up();

  // 3. Recognize: the run it starts is the one to wait for.
  await page.click('#predict');
  const runNo = Number(await page.getAttribute('#app', 'data-run'));
  await page.waitForFunction(
    (n) => {
      const app = document.getElementById('app');
      return Number(app.dataset.run) === n && app.dataset.status !== 'running';
    },
    runNo,
    { timeout: TIMEOUT_MS },
  );

  const read = (side) =>
    page.evaluate((side) => {
      const card = document.getElementById(side);
      const text = (sel) => Array.from(card.querySelectorAll(sel), (e) => e.textContent.trim());
      return {
        error: card.dataset.error ? document.getElementById(`${side}-error`).textContent : null,
        top3: card.dataset.top3 ? JSON.parse(card.dataset.top3) : null,
        scores: card.dataset.scores ? JSON.parse(card.dataset.scores) : null,
        shownLabels: text('.bar .label'),
        shownValues: text('.bar .value'),
        shownRaw: text('.bar .raw'),
        digit: document.getElementById(`${side}-digit`).textContent,
        ms: document.getElementById(`${side}-ms`).textContent,
      };
    }, side);
  const browser = await read('local');
  const edge = await read('edge');
  const verdict = {
    kind: await page.getAttribute('#verdict', 'data-verdict'),
    title: await page.textContent('#verdict-title'),
    detail: await page.textContent('#verdict-detail'),
  };
  const sent = await page.textContent('#sent-desc');
  await page.screenshot({ path: screenshot, fullPage: true });

  // 4. Both answered, the same, to the digit.
  const result = { browser, edge, verdict, sent, status, run: runNo };
  const pageStatus = await page.getAttribute('#app', 'data-status');
  if (pageStatus !== 'done') return fail(`the prediction ended as "${pageStatus}" (an empty pad?)`, result);
  if (browser.error || edge.error) return fail(`no answer: browser ${browser.error}, edge ${edge.error}`, result);
  if (JSON.stringify(browser.top3) !== JSON.stringify(edge.top3)) return fail('the top-3 labels differ', result);
  if (JSON.stringify(browser.scores) !== JSON.stringify(edge.scores)) return fail('the top-3 scores differ', result);
  for (const k of ['shownLabels', 'shownValues', 'shownRaw', 'digit']) {
    if (JSON.stringify(browser[k]) !== JSON.stringify(edge[k])) return fail(`the shown ${k} differ`, result);
  }
  if (!/^[0-9]$/.test(browser.top3[0]) || browser.digit !== browser.top3[0]) {
    return fail(`the top label is not a digit: ${browser.top3[0]}`, result);
  }
  if (browser.top3.length !== 3 || browser.shownLabels.length !== 3) return fail('not three answers', result);
  if (verdict.kind !== 'identical') return fail(`the page's verdict is ${verdict.kind}`, result);
  if (!/ms$/.test(browser.ms) || !/ms$/.test(edge.ms)) return fail('a latency is missing', result);
  done({ ...result, console_errors: consoleErrors });
});
