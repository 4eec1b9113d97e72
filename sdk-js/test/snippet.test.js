// The built snippet (what sites paste): a stub that records calls with their time and
// loads the SDK from the edge; and the README shows exactly this snippet.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import vm from 'node:vm';

const built = fileURLToPath(new URL('../dist/snippet.min.js', import.meta.url));
const readme = fileURLToPath(new URL('../../README.md', import.meta.url));
const snippet = () => readFileSync(built, 'utf8'); // run `node sdk-js/build.mjs` first

function page() {
  const inserted = [];
  const firstScript = { parentNode: { insertBefore: (s) => inserted.push(s) } };
  const window = {
    document: {
      createElement: (tag) => ({ tag }),
      getElementsByTagName: () => [firstScript],
      head: { appendChild: (s) => inserted.push(s) }
    }
  };
  window.window = window;
  return { window, inserted, ctx: vm.createContext(window) };
}

test('the snippet records calls in order with their time, then loads the SDK from the edge', () => {
  const p = page();
  vm.runInContext(snippet(), p.ctx);
  vm.runInContext(
    "analytics.load('wk', { apiHost: 'https://collect.example.com/' }); analytics.track('A', {x: 1}); analytics.consent.set({analytics: true}); analytics.page();",
    p.ctx
  );
  const a = p.window.analytics;
  assert.equal(a._writeKey, 'wk');
  // (arrays from the page's realm: compared by value)
  assert.deepEqual(Array.from(a, (c) => c[0]), ['track', 'consent.set', 'page']);
  assert.deepEqual(JSON.parse(JSON.stringify(a[0].slice(1))), ['A', { x: 1 }]);
  assert.equal(typeof a[0].t, 'number');
  assert.equal(p.inserted.length, 1);
  assert.equal(p.inserted[0].src, 'https://collect.example.com/sdk/v1/collector.js');
  assert.equal(p.inserted[0].async, true);
});

test('the snippet takes a host without scheme (or with /v1) and an sdkUrl', () => {
  const p = page();
  vm.runInContext(snippet(), p.ctx);
  vm.runInContext("analytics.load('wk', { apiHost: 'collect.example.com/v1' })", p.ctx);
  assert.equal(p.inserted[0].src, 'https://collect.example.com/sdk/v1/collector.js');
  const q = page();
  vm.runInContext(snippet(), q.ctx);
  vm.runInContext("analytics.load('wk', { apiHost: 'x', sdkUrl: '/static/collector.js' })", q.ctx);
  assert.equal(q.inserted[0].src, '/static/collector.js');
});

test('pasting the snippet twice does nothing the second time', () => {
  const p = page();
  vm.runInContext(snippet(), p.ctx);
  vm.runInContext("analytics.track('A')", p.ctx);
  vm.runInContext(snippet(), p.ctx);
  assert.equal(p.window.analytics.length, 1);
});

test('the README shows the snippet as built', () => {
  assert.ok(readFileSync(readme, 'utf8').includes(snippet().trim()), 'update the snippet in README.md');
});
