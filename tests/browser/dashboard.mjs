// Drive the hub's dashboard in headless chromium:
//
//   node tests/browser/dashboard.mjs <hub_base_url> <admin_token> <model> <feature> <screenshot_path>
//
// Logs in with the admin token, checks the nodes table, opens the model's page, checks
// that the drift chart of <feature> says it is drifting and that the reference/live and
// traffic charts are there, and saves a full-page screenshot. Prints one JSON line:
// {"ok":true,"drifting":true,"title":...,"console_errors":[...]} or {"ok":false,"error":...}.

import { mkdirSync, statSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { launch, done, fail, run, cssString, consoleErrors, firstLine, TIMEOUT_MS } from './lib.mjs';

const USAGE =
  'usage: node tests/browser/dashboard.mjs <hub_base_url> <admin_token> <model> <feature> <screenshot_path>';

run(async () => {
  const argv = process.argv.slice(2);
  if (argv.length !== 5 || argv.some((a) => a === '')) {
    return fail(`expected 5 non-empty arguments, got ${argv.length}; ${USAGE}`);
  }
  const [hubArg, token, model, feature, screenshotArg] = argv;
  let hub;
  try {
    hub = new URL(hubArg);
  } catch {
    return fail(`not a URL: ${hubArg}; ${USAGE}`);
  }
  const base = hub.href.replace(/\/+$/, '');
  const loginUrl = `${base}/dashboard/login`;
  const dashboardUrl = `${base}/dashboard`;
  const modelUrl = `${base}/dashboard/models/${encodeURIComponent(model)}`;
  const screenshotPath = resolve(screenshotArg);

  const { context, page } = await launch();

  // Wrap a step so that its failure says which step, and where the page was.
  const step = async (what, fn) => {
    try {
      return await fn();
    } catch (e) {
      throw new Error(`${what}: ${firstLine(e)} (page at ${page.url()})`);
    }
  };

  // 1. Log in: the hub answers the form's POST with 303 to /dashboard and a cookie.
  await step(`GET ${loginUrl}`, async () => {
    const resp = await page.goto(loginUrl, { waitUntil: 'load' });
    if (!resp) throw new Error('no response');
    if (resp.status() >= 400) throw new Error(`HTTP ${resp.status()}`);
  });
  await step('fill input[name=token]', () => page.locator('input[name=token]').first().fill(token));
  await step('log in (click button[type=submit], expect to land on /dashboard)', async () => {
    // The POST's answer (303 to /dashboard, or an error page) commits one main-frame navigation.
    const navigated = page.waitForEvent('framenavigated', {
      predicate: (frame) => frame === page.mainFrame(),
      timeout: TIMEOUT_MS,
    });
    await page.locator('button[type=submit]').first().click();
    await navigated;
    await page.waitForLoadState('load');
    if (!sameUrl(new URL(page.url()), dashboardUrl)) {
      const cookies = await context.cookies(dashboardUrl).catch(() => []);
      throw new Error(
        `landed on ${page.url()}, not ${dashboardUrl} (${cookies.length} cookie(s) for the hub; ` +
          `page text: ${JSON.stringify(await bodyText(page))})`,
      );
    }
  });
  const cookies = await context.cookies(dashboardUrl);
  if (cookies.length === 0) {
    return fail(`logged in to ${page.url()} but the hub set no cookie`);
  }

  // 2. The overview: a heading and at least one node in table#nodes.
  await step('dashboard has an h1', () => page.locator('h1').first().waitFor({ state: 'attached' }));
  await step('dashboard has table#nodes', () =>
    page.locator('table#nodes').first().waitFor({ state: 'attached' }),
  );
  await step('dashboard has a row in table#nodes tbody', () =>
    page.locator('table#nodes tbody tr').first().waitFor({ state: 'attached' }),
  );
  const nodeRows = await page.locator('table#nodes tbody tr').count();

  // 3. The model's page: drift, reference-vs-live and traffic charts.
  await step(`GET ${modelUrl}`, async () => {
    const resp = await page.goto(modelUrl, { waitUntil: 'load' });
    if (!resp) throw new Error('no response');
    if (resp.status() >= 400) throw new Error(`HTTP ${resp.status()}`);
  });
  const featureSel = `[data-feature=${cssString(feature)}]`;
  const driftChart = page.locator(`svg.drift-chart${featureSel}`).first();
  await step(`wait for visible svg.drift-chart${featureSel}`, () => driftChart.waitFor({ state: 'visible' }));
  const drifting = await driftChart.getAttribute('data-drifting');
  if (drifting !== 'true') {
    return fail(
      `svg.drift-chart${featureSel} has data-drifting=${JSON.stringify(drifting)}, expected "true"`,
    );
  }
  await step(`model page has svg.reference-chart${featureSel}`, () =>
    page.locator(`svg.reference-chart${featureSel}`).first().waitFor({ state: 'attached' }),
  );
  await step('model page has an svg.traffic-chart', () =>
    page.locator('svg.traffic-chart').first().waitFor({ state: 'attached' }),
  );

  // 4. Screenshot, with the drift chart scrolled into view.
  await step('scroll the drift chart into view', () => driftChart.scrollIntoViewIfNeeded());
  await step(`screenshot to ${screenshotPath}`, async () => {
    mkdirSync(dirname(screenshotPath), { recursive: true });
    await page.screenshot({ path: screenshotPath, fullPage: true });
    if (statSync(screenshotPath).size === 0) throw new Error('empty file');
  });

  return done({
    drifting: true,
    title: await page.title(),
    node_rows: nodeRows,
    screenshot: screenshotPath,
    console_errors: consoleErrors,
  });
});

// Same origin and path, ignoring a trailing slash, query and fragment.
function sameUrl(u, target) {
  const t = new URL(target);
  const strip = (p) => p.replace(/\/+$/, '') || '/';
  return u.origin === t.origin && strip(u.pathname) === strip(t.pathname);
}

async function bodyText(page) {
  try {
    const text = await page.locator('body').innerText({ timeout: 2_000 });
    return text.replace(/\s+/g, ' ').trim().slice(0, 200);
  } catch {
    return '';
  }
}
