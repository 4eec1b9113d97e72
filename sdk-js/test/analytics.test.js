// The analytics.js-compatible API on a fake page: argument forms, ids and cookies,
// context, options, calls before load, consent buffering and reporting.
import { test, mock, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';

import { createAnalytics, pageArgs, campaign, batchUrl } from '../src/analytics.js';
import { fakeWindow, memoryStorage, outage, settle, sentEvents } from './fake.js';

const UUID4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;
const T0 = Date.UTC(2026, 10, 24, 10, 0, 0);

beforeEach(() => mock.timers.enable({ apis: ['setTimeout', 'Date'], now: T0 }));
afterEach(() => mock.timers.reset());

function loaded(w, opts = {}) {
  const a = createAnalytics(w);
  a.load('wk', { apiHost: 'edge.example.net', flushAt: 1, ...opts });
  return a;
}

async function sent(w) {
  mock.timers.tick(10000);
  for (let i = 0; i < 5; i++) await settle();
  return sentEvents(w);
}

test('batchUrl accepts hosts with or without scheme and a /v1 suffix', () => {
  assert.equal(batchUrl('edge.example.net'), 'https://edge.example.net/v1/batch');
  assert.equal(batchUrl('http://127.0.0.1:8787/'), 'http://127.0.0.1:8787/v1/batch');
  assert.equal(batchUrl('https://api.example.com/v1'), 'https://api.example.com/v1/batch');
});

test('page() arguments follow analytics.js', () => {
  const cb = () => {};
  assert.deepEqual(pageArgs([]), { category: null, name: null, properties: {}, options: {}, callback: undefined });
  assert.deepEqual(pageArgs(['Home']).name, 'Home');
  const two = pageArgs(['Docs', 'Install', { v: 1 }, { context: { x: 1 } }, cb]);
  assert.deepEqual(two, { category: 'Docs', name: 'Install', properties: { v: 1 }, options: { context: { x: 1 } }, callback: cb });
  assert.deepEqual(pageArgs([{ v: 2 }]).properties, { v: 2 });
  assert.deepEqual(pageArgs([null, 'Pricing']), { category: null, name: 'Pricing', properties: {}, options: {}, callback: undefined });
});

test('campaign reads the UTM parameters', () => {
  assert.deepEqual(campaign('?utm_source=news&utm_medium=email&utm_campaign=spring+sale&utm_term=x&utm_content=y&q=1'), {
    source: 'news',
    medium: 'email',
    name: 'spring sale',
    term: 'x',
    content: 'y'
  });
  assert.equal(campaign('?q=1'), undefined);
  assert.equal(campaign(''), undefined);
  // A malformed escape does not break the others.
  assert.equal(campaign('?utm_source=%E0%A4%A&utm_medium=ok').medium, 'ok');
});

test('track builds a Segment event with the page context', async () => {
  const w = fakeWindow();
  const a = loaded(w);
  a.track('Clicked', { button: 'buy' });
  const [e] = await sent(w);
  assert.equal(e.type, 'track');
  assert.equal(e.event, 'Clicked');
  assert.deepEqual(e.properties, { button: 'buy' });
  assert.match(e.messageId, UUID4);
  assert.match(e.anonymousId, UUID4);
  assert.equal(e.timestamp, new Date(T0).toISOString());
  assert.equal(e.userId, undefined);
  assert.deepEqual(e.context.library, { name: 'edge-collector.js', version: '0.1.0' });
  assert.deepEqual(e.context.page, {
    path: '/shop/item',
    referrer: 'https://ref.example.org/',
    search: '?utm_source=news&utm_campaign=spring',
    title: 'Item',
    url: 'https://www.example.com/shop/item?utm_source=news&utm_campaign=spring'
  });
  assert.equal(e.context.userAgent, 'FakeBrowser/1.0');
  assert.equal(e.context.locale, 'de-DE');
  assert.equal(typeof e.context.timezone, 'string');
  assert.deepEqual(e.context.screen, { width: 1280, height: 720, density: 2 });
  assert.deepEqual(e.context.campaign, { source: 'news', name: 'spring' });
  assert.deepEqual(e.context.consent, { pending: true });
});

test('options.context, timestamp, messageId and other option keys are honoured', async () => {
  const w = fakeWindow();
  const a = loaded(w);
  a.track('X', {}, { context: { app: { name: 'shop' } }, timestamp: '2026-01-01T00:00:00Z', messageId: 'fixed-id', ip: '0.0.0.0', integrations: { All: false } });
  const [e] = await sent(w);
  assert.equal(e.messageId, 'fixed-id');
  assert.equal(e.timestamp, '2026-01-01T00:00:00.000Z');
  assert.deepEqual(e.context.app, { name: 'shop' });
  assert.equal(e.context.ip, '0.0.0.0');
  assert.deepEqual(e.integrations, { All: false });
});

test('page() sends name, category and the page properties', async () => {
  const w = fakeWindow();
  const a = loaded(w);
  a.page('Shop', 'Item', { sku: 'A1' });
  const [e] = await sent(w);
  assert.equal(e.type, 'page');
  assert.equal(e.name, 'Item');
  assert.equal(e.category, 'Shop');
  assert.equal(e.properties.sku, 'A1');
  assert.equal(e.properties.name, 'Item');
  assert.equal(e.properties.path, '/shop/item');
  assert.equal(e.properties.title, 'Item');
});

test('identify stores the user id and traits; later events carry them; reset forgets', async () => {
  const storage = memoryStorage();
  const w = fakeWindow({ storage });
  const a = loaded(w);
  const anon = a.user().anonymousId();
  a.identify('u-1', { plan: 'pro' });
  a.identify({ email: 'a@example.com' });
  a.track('After');
  const evs = await sent(w);
  assert.deepEqual(evs.map((e) => [e.type, e.userId, e.anonymousId]), [
    ['identify', 'u-1', anon],
    ['identify', 'u-1', anon],
    ['track', 'u-1', anon]
  ]);
  assert.deepEqual(evs[1].traits, { plan: 'pro', email: 'a@example.com' });
  // analytics.js names: cookie (raw) and localStorage (JSON).
  assert.match(w.document.cookie, /ajs_user_id=u-1/);
  assert.equal(storage.getItem('ajs_user_id'), '"u-1"');
  assert.equal(JSON.parse(storage.getItem('ajs_user_traits')).plan, 'pro');
  // The next page view (same cookies and storage) knows the visitor.
  const w2 = fakeWindow({ storage });
  w2.document.jar = w.document.jar;
  Object.defineProperty(w2.document, 'cookie', Object.getOwnPropertyDescriptor(w.document, 'cookie'));
  const b = loaded(w2);
  assert.equal(b.user().id(), 'u-1');
  assert.equal(b.user().anonymousId(), anon);
  // Another person signs in: the old traits are dropped.
  b.identify('u-2', { plan: 'free' });
  assert.deepEqual(b.user().traits(), { plan: 'free' });
  b.reset();
  assert.equal(b.user().id(), null);
  assert.notEqual(b.user().anonymousId(), anon);
});

test('an anonymous id from analytics.js (legacy quoted cookie) is kept', async () => {
  const w = fakeWindow();
  w.document.cookie = 'ajs_anonymous_id=%22legacy-anon-1%22; path=/';
  const a = loaded(w);
  a.track('X');
  const [e] = await sent(w);
  assert.equal(e.anonymousId, 'legacy-anon-1');
});

test('ids are set on the top domain so subdomains share them', () => {
  const w = fakeWindow({ url: 'https://shop.example.com/' });
  const a = loaded(w);
  const id = a.user().anonymousId();
  assert.equal(w.document.jar.get('ajs_anonymous_id').domain, 'example.com');
  assert.equal(w.document.jar.get('ajs_anonymous_id').value, id);
});

test('group and alias', async () => {
  const w = fakeWindow();
  const a = loaded(w);
  a.identify('u-1');
  a.group('g-1', { name: 'Acme' });
  a.alias('u-new');
  const evs = await sent(w);
  assert.deepEqual([evs[1].type, evs[1].groupId, evs[1].traits], ['group', 'g-1', { name: 'Acme' }]);
  assert.deepEqual([evs[2].type, evs[2].userId, evs[2].previousId], ['alias', 'u-new', 'u-1']);
});

test('calls before load wait and run in order, with the time they were made', async () => {
  const w = fakeWindow();
  const a = createAnalytics(w);
  a.track('First');
  mock.timers.tick(1500);
  a.identify('u-9');
  a.page('Home');
  let readyRan = false;
  a.ready(() => (readyRan = true));
  mock.timers.tick(500);
  a.load('wk', { apiHost: 'edge.example.net', flushAt: 1 });
  const evs = await sent(w);
  assert.deepEqual(evs.map((e) => e.type), ['track', 'identify', 'page']);
  assert.equal(evs[0].timestamp, new Date(T0).toISOString());
  assert.equal(evs[1].timestamp, new Date(T0 + 1500).toISOString());
  assert.equal(evs[2].userId, 'u-9');
  assert.equal(readyRan, true);
});

test('an invalid call is counted, not sent, and the count reaches the edge', async () => {
  const w = fakeWindow();
  const a = loaded(w);
  a.track();
  a.track('');
  assert.deepEqual(a.stats().ignored, { invalid_call: 2 });
  assert.equal((await sent(w)).length, 0);
  a.track('Valid');
  await sent(w);
  assert.deepEqual(w.requests[0].body.dropped, { invalid_call: 2 });
});

test('events the edge rejected are not reported again (the edge counted them)', async () => {
  let first = true;
  const w = fakeWindow({
    answer: () => {
      if (first) {
        first = false;
        return { status: 400, body: '{"code":"missing_field","rejected":[{"index":0,"code":"missing_field"}]}' };
      }
      return { status: 200, body: '{}' };
    }
  });
  const a = loaded(w);
  a.track('Bad');
  await sent(w);
  a.track('Good');
  await sent(w);
  assert.deepEqual(a.stats().ignored, { rejected_missing_field: 1 });
  assert.equal(w.requests[1].body.dropped, undefined);
});

test('consent.set goes with every event and persists; GPC is reported', async () => {
  const storage = memoryStorage();
  const w = fakeWindow({ storage, gpc: true });
  const a = loaded(w);
  a.consent.set({ analytics: true, marketing: false });
  a.track('X');
  const [e] = await sent(w);
  assert.deepEqual(e.context.consent, { categoryPreferences: { analytics: true, marketing: false }, gpc: true });
  assert.deepEqual(a.consent.get(), { categories: { analytics: true, marketing: false }, gpc: true, tcf: null, known: true });
  const w2 = fakeWindow({ storage });
  assert.deepEqual(loaded(w2).consent.get().categories, { analytics: true, marketing: false });
});

test('a TCF CMP: its TC string goes with events once it has a decision', async () => {
  let listener;
  const w = fakeWindow({
    tcf: (cmd, version, cb) => {
      assert.equal(cmd, 'addEventListener');
      assert.equal(version, 2);
      listener = cb;
    }
  });
  const a = loaded(w);
  listener({ eventStatus: 'cmpuishown', tcString: 'CQ-shown' }, true);
  a.track('Before');
  listener({ eventStatus: 'useractioncomplete', tcString: 'CQ-decided', gdprApplies: true }, true);
  a.track('After');
  const evs = await sent(w);
  assert.deepEqual(evs[0].context.consent, { pending: true });
  assert.deepEqual(evs[1].context.consent, { tcf: 'CQ-decided', gdprApplies: true });
});

test('whileUnknown: buffer holds events until consent is known, bounded and counted', async () => {
  const w = fakeWindow();
  const a = loaded(w, { consent: { whileUnknown: 'buffer', bufferMax: 2 } });
  a.track('One');
  a.track('Two');
  a.track('Three');
  assert.equal((await sent(w)).length, 0);
  assert.deepEqual(a.stats().ignored, { consent_unknown_buffer_full: 1 });
  assert.equal(a.stats().held, 2);
  a.consent.set({ analytics: true });
  const evs = await sent(w);
  assert.deepEqual(evs.map((e) => e.event), ['One', 'Two']);
  assert.deepEqual(evs[0].context.consent, { categoryPreferences: { analytics: true } });
});

test('whileUnknown: buffer, page left before consent: held events are counted as ignored', () => {
  const w = fakeWindow();
  const a = loaded(w, { consent: { whileUnknown: 'buffer' } });
  const reasons = [];
  a.on('ignored', (r) => reasons.push(r));
  a.track('One');
  w.fire('pagehide');
  assert.deepEqual(reasons, ['consent_unknown_at_unload']);
  assert.equal(w.beacons.length, 0);
});

test('pagehide flushes the queue with a beacon', () => {
  const w = fakeWindow();
  const a = loaded(w, { flushAt: 20 });
  a.track('Leaving');
  assert.equal(w.requests.length, 0);
  w.fire('pagehide');
  assert.equal(w.beacons.length, 1);
  assert.equal(w.beacons[0].body.batch[0].event, 'Leaving');
  assert.equal(w.beacons[0].url, 'https://edge.example.net/v1/batch');
  assert.equal(a.stats().sent, 1);
});

test('a hidden tab beacons what it has; shown again, it takes back what it had to leave', async () => {
  const net = outage(true);
  const w = fakeWindow({ answer: net.answer });
  const a = loaded(w, { flushAt: 1, backoffCap: 1000 });
  a.track('Failed Once');
  await settle();
  w.hide();
  // The last request failed: nothing goes into a beacon, the event is released to storage.
  assert.equal(w.beacons.length, 0);
  assert.equal(a.stats().queued, 0);
  assert.equal(JSON.parse(w.localStorage.getItem('ec_queue:wk'))[0].o, null);
  net.down = false;
  w.showAgain();
  assert.equal(a.stats().queued, 1);
  const evs = await sent(w);
  assert.deepEqual(evs.map((e) => e.event), ['Failed Once', 'Failed Once']);
  assert.equal(a.stats().sent, 1);
});

test('trackLink tracks the click; the event survives the navigation', () => {
  const w = fakeWindow();
  const a = loaded(w, { flushAt: 20 });
  const handlers = [];
  const link = { tagName: 'A', href: '/next', addEventListener: (n, f) => handlers.push([n, f]) };
  a.trackLink(link, (el) => 'Clicked ' + el.href, { area: 'nav' });
  assert.equal(handlers[0][0], 'click');
  handlers[0][1]();
  w.fire('pagehide');
  const e = w.beacons[0].body.batch[0];
  assert.deepEqual([e.event, e.properties], ['Clicked /next', { area: 'nav' }]);
});

test('load needs a write key and an apiHost', () => {
  assert.throws(() => createAnalytics(fakeWindow()).load('', { apiHost: 'x' }));
  assert.throws(() => createAnalytics(fakeWindow()).load('wk', {}));
});
