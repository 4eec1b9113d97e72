// Drives Debian's Chromium for the Rust browser tests (tests/src/browser.rs) with npm
// playwright-core. One JSON command per stdin line, one JSON answer per stdout line:
//
//   {"op":"open","initScript":"…"?}      a fresh browser context (new visitor) + page
//   {"op":"goto","url":"…"}               navigate and wait for `load`
//   {"op":"reload"}
//   {"op":"eval","js":"…"}                evaluate an expression (awaited) → value
//   {"op":"waitFor","js":"…","timeoutMs":N}  poll an expression until truthy → value
//   {"op":"press","key":"Tab"}            a key press on the page → the focused element's
//                                          tag, id and text
//   {"op":"screenshot","path":"…","fullPage":true,"width":N,"height":N}
//                                          a PNG of the page → its size in bytes
//   {"op":"quit"}
//
// Answers: {"ok":true,"value":…} or {"ok":false,"error":"…"}. Console messages and page
// errors go to stderr, which the Rust side keeps for failure reports.
import { chromium } from 'playwright-core';
import { createInterface } from 'node:readline';

const executablePath = process.env.CHROMIUM || '/usr/bin/chromium';
const browser = await chromium.launch({
  executablePath,
  headless: true,
  // As root in a container, with no network but loopback: no sandbox, and none of
  // Chromium's background connections (they fail here and slow every start).
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
    '--disable-default-apps',
    '--disable-features=Translate,OptimizationHints,MediaRouter'
  ]
});

let context = null;
let page = null;

async function open(initScript) {
  if (context) await context.close();
  context = await browser.newContext();
  if (initScript) await context.addInitScript({ content: initScript });
  page = await context.newPage();
  page.on('console', (m) => process.stderr.write(`[console.${m.type()}] ${m.text()}\n`));
  page.on('pageerror', (e) => process.stderr.write(`[pageerror] ${e.message}\n`));
  page.on('requestfailed', (r) => process.stderr.write(`[requestfailed] ${r.method()} ${r.url()} ${r.failure()?.errorText}\n`));
}

async function handle(cmd) {
  switch (cmd.op) {
    case 'open':
      await open(cmd.initScript);
      return null;
    case 'goto':
      await page.goto(cmd.url, { waitUntil: 'load' });
      return page.url();
    case 'reload':
      await page.reload({ waitUntil: 'load' });
      return page.url();
    case 'eval':
      return await page.evaluate(`(async () => (${cmd.js}))()`);
    case 'waitFor': {
      // Polled from here, not with page.waitForFunction: that evaluates a string
      // predicate inside the page, which a Content-Security-Policy without
      // 'unsafe-eval' (the dashboard's) refuses once a navigation lands mid-wait.
      // page.evaluate goes through the DevTools protocol, which no CSP governs.
      const timeoutMs = cmd.timeoutMs || 30000;
      const deadline = Date.now() + timeoutMs;
      const probe = `(async () => { const v = (${cmd.js}); return (typeof Node !== 'undefined' && v instanceof Node) ? true : v; })()`;
      for (;;) {
        try {
          const v = await page.evaluate(probe);
          if (v) return v;
        } catch (e) {
          // A navigation replaced the document mid-poll: poll the new one.
          if (!/Execution context was destroyed|navigat|Cannot find context/i.test(String(e && e.message))) throw e;
        }
        if (Date.now() >= deadline) throw new Error(`waitFor: not true after ${timeoutMs} ms: ${cmd.js}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    case 'press': {
      await page.keyboard.press(cmd.key);
      try {
        return await page.evaluate(() => {
          const e = document.activeElement;
          return e ? { tag: e.tagName.toLowerCase(), id: e.id || null, text: (e.textContent || '').trim().slice(0, 80) } : null;
        });
      } catch (e) {
        // The key navigated (Enter in a form): wait for the new page instead.
        await page.waitForLoadState('load');
        return null;
      }
    }
    case 'screenshot': {
      if (cmd.width && cmd.height) await page.setViewportSize({ width: cmd.width, height: cmd.height });
      const png = await page.screenshot({ path: cmd.path, fullPage: !!cmd.fullPage });
      return png.length;
    }
    case 'quit':
      await browser.close();
      process.stdout.write(JSON.stringify({ ok: true, value: null }) + '\n');
      process.exit(0);
    default:
      throw new Error(`unknown op ${cmd.op}`);
  }
}

function serializable(v) {
  try {
    JSON.stringify(v);
    return true;
  } catch {
    return false;
  }
}

process.stdout.write(JSON.stringify({ ok: true, value: browser.version() }) + '\n');
const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer;
  try {
    const value = (await handle(JSON.parse(line))) ?? null;
    // A value that is not JSON (a page object with cycles) comes back as its string form.
    answer = { ok: true, value: serializable(value) ? value : String(value) };
  } catch (e) {
    answer = { ok: false, error: String(e && e.stack ? e.stack : e) };
  }
  process.stdout.write(JSON.stringify(answer) + '\n');
}
await browser.close();
