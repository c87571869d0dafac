// Shared helpers for the browser-test scripts that the Rust integration tests spawn.
//
// Each script prints exactly one JSON line on stdout and exits: `{"ok":true,...}` with
// status 0 (done), or `{"ok":false,"error":...}` with status 1 (fail). Everything else
// (chromium's own chatter) stays on stderr or inside playwright.
//
// The browser is Debian's chromium (`$CHROMIUM`, default /usr/bin/chromium), driven
// through playwright-core, which never downloads a browser of its own.

import { accessSync, constants, writeSync } from 'node:fs';
import { chromium } from 'playwright-core';

/** Per-operation timeout (waits, clicks, navigations), in milliseconds. */
export const TIMEOUT_MS = 15_000;
/** Starting chromium can be slow on a loaded two-core CI runner. */
const LAUNCH_TIMEOUT_MS = 30_000;
/** Whole-script cap, so a wedged browser can never hang the Rust test. */
const WATCHDOG_MS = 120_000;

export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--disable-dev-shm-usage',
];

/**
 * Console errors and uncaught page errors seen so far (by every page of every launch),
 * except the 404 of the /favicon.ico that chromium requests by itself.
 */
export const consoleErrors = [];

const browsers = new Set();
let finished = false;

/**
 * Launch a fresh headless chromium (playwright gives it its own temporary user-data
 * directory) with a fresh context and one page. Console errors and page errors of every
 * page in the context are appended to the returned `consoleErrors` array.
 */
export async function launch() {
  const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
  try {
    // Checked here: playwright would leave its temporary directories behind otherwise.
    accessSync(executablePath, constants.X_OK);
  } catch {
    throw new Error(`no executable chromium at ${executablePath} (set $CHROMIUM, or apt-get install chromium)`);
  }
  let browser;
  try {
    browser = await chromium.launch({
      executablePath,
      headless: true,
      timeout: LAUNCH_TIMEOUT_MS,
      args: CHROMIUM_ARGS,
    });
  } catch (e) {
    throw new Error(`could not launch chromium at ${executablePath}: ${firstLine(e)}`);
  }
  browsers.add(browser);
  browser.on('disconnected', () => browsers.delete(browser));

  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  context.setDefaultTimeout(TIMEOUT_MS);
  context.setDefaultNavigationTimeout(TIMEOUT_MS);
  context.on('page', watchPage);
  const page = await context.newPage();
  return { browser, context, page, consoleErrors };
}

function watchPage(page) {
  page.on('console', (msg) => {
    if (msg.type() !== 'error') return;
    const loc = msg.location();
    // chromium fetches /favicon.ico on its own; a 404 there is not the page's error.
    if (loc && loc.url && new URL(loc.url, 'http://x').pathname === '/favicon.ico') return;
    const where = loc && loc.url ? ` (${loc.url}:${loc.lineNumber})` : '';
    consoleErrors.push(`console.error: ${msg.text()}${where}`);
  });
  page.on('pageerror', (err) => {
    consoleErrors.push(`pageerror: ${err && err.message ? err.message : String(err)}`);
  });
}

/** Print `{"ok":false,"error":message,...}` and exit 1. */
export async function fail(message, extra = {}) {
  await finish(1, {
    ok: false,
    error: String(message),
    ...extra,
    console_errors: consoleErrors,
  });
}

/** Print `{"ok":true,...obj}` and exit 0. */
export async function done(obj = {}) {
  await finish(0, { ok: true, ...obj });
}

async function finish(code, result) {
  if (finished) return new Promise(() => {});
  finished = true;
  // Synchronous write: the line is on stdout before anything else can happen.
  writeSync(1, JSON.stringify(result) + '\n');
  // Close the browsers gracefully (bounded); playwright's exit hook kills any leftover
  // chromium and removes its temporary profile in any case.
  await Promise.race([
    Promise.allSettled([...browsers].map((b) => b.close())),
    new Promise((resolve) => setTimeout(resolve, 5_000).unref()),
  ]);
  process.exit(code);
}

/**
 * Run a script's `main`: any thrown error (including playwright's timeouts) becomes a
 * `fail()` with its first line, and the whole run is capped by a watchdog.
 */
export function run(main) {
  setTimeout(() => {
    fail(`timed out after ${WATCHDOG_MS / 1000} s overall`);
  }, WATCHDOG_MS).unref();
  process.on('unhandledRejection', (e) => fail(`unhandled rejection: ${firstLine(e)}`));
  Promise.resolve()
    .then(main)
    .then(
      () => fail('script ended without reporting a result'),
      (e) => fail(firstLine(e)),
    );
}

/** The first line of an error's message (playwright appends long call logs). */
export function firstLine(e) {
  const text = e && e.message ? e.message : String(e);
  return text.split('\n')[0];
}

/** A CSS string literal for `s`, for attribute selectors like `[data-feature=...]`. */
export function cssString(s) {
  return (
    '"' +
    String(s)
      .replace(/\\/g, '\\\\')
      .replace(/"/g, '\\"')
      .replace(/\n/g, '\\a ')
      .replace(/\r/g, '\\d ') +
    '"'
  );
}
