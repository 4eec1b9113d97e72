// Delivery: batching, request bodies, retries, persistence across page views and tabs,
// and the beacon on the way out. Time is mocked; fetch and storage are fakes.
import { test, mock, beforeEach, afterEach } from 'node:test';
import assert from 'node:assert/strict';

import { delivery, DEFAULTS } from '../src/queue.js';
import { fakeWindow, memoryStorage, outage, settle, sentEvents } from './fake.js';

const URL = 'https://edge.example.net/v1/batch';
let seq = 0;
const ev = (extra = {}) => ({ type: 'track', event: 'E', messageId: 'm' + ++seq, properties: {}, ...extra });

function setup(w, opts = {}, tab = 'tab-a') {
  const log = { ignored: [], delivered: 0 };
  const d = delivery(w, { ...DEFAULTS, url: URL, writeKey: 'wk', tab, ...opts }, {
    ignored: (reason, e) => log.ignored.push([reason, e && e.messageId]),
    delivered: (n) => (log.delivered += n)
  });
  return { d, log };
}

const stored = (w) => JSON.parse(w.localStorage.getItem('ec_queue:wk') || '[]');

beforeEach(() => mock.timers.enable({ apis: ['setTimeout', 'Date'], now: Date.UTC(2026, 10, 24) }));
afterEach(() => mock.timers.reset());

test('sends a batch when flushAt events are queued, as text/plain with the write key in the body', async () => {
  const w = fakeWindow();
  const { d, log } = setup(w, { flushAt: 3 });
  d.push(ev());
  d.push(ev());
  assert.equal(w.requests.length, 0);
  d.push(ev());
  assert.equal(w.requests.length, 1);
  const r = w.requests[0];
  assert.equal(r.url, URL);
  assert.equal(r.init.method, 'POST');
  assert.equal(r.init.keepalive, true);
  // No custom headers: a string body is text/plain, so the browser sends no preflight.
  assert.equal(r.init.headers, undefined);
  assert.equal(typeof r.init.body, 'string');
  assert.equal(r.body.writeKey, 'wk');
  assert.equal(r.body.sentAt, new Date(Date.now()).toISOString());
  assert.deepEqual(r.body.batch.map((e) => e.messageId), ['m' + (seq - 2), 'm' + (seq - 1), 'm' + seq]);
  await settle();
  assert.equal(log.delivered, 3);
  assert.deepEqual(stored(w), []);
});

test('sends after flushInterval when fewer events are queued', async () => {
  const w = fakeWindow();
  const { d } = setup(w, { flushAt: 10, flushInterval: 5000 });
  d.push(ev());
  mock.timers.tick(4999);
  assert.equal(w.requests.length, 0);
  mock.timers.tick(1);
  assert.equal(w.requests.length, 1);
});

test('request bodies stay under maxBodyBytes; one request at a time keeps the order', async () => {
  const w = fakeWindow();
  const { d, log } = setup(w, { flushAt: 1, maxBodyBytes: 60000 });
  const big = 'x'.repeat(20000);
  for (let i = 0; i < 7; i++) d.push(ev({ properties: { big } }));
  for (let i = 0; i < 10; i++) await settle();
  assert.ok(w.requests.length >= 3, `${w.requests.length} requests`);
  for (const r of w.requests) assert.ok(Buffer.byteLength(r.init.body) <= 60000, Buffer.byteLength(r.init.body));
  const ids = sentEvents(w).map((e) => e.messageId);
  assert.deepEqual(ids, [...ids].sort((a, b) => a.slice(1) - b.slice(1)));
  assert.equal(new Set(ids).size, 7);
  assert.equal(log.delivered, 7);
});

test('an event over the edge limit is ignored with a reason, not sent', () => {
  const w = fakeWindow();
  const { d, log } = setup(w, { flushAt: 1 });
  const e = ev({ properties: { big: 'y'.repeat(33000) } });
  d.push(e);
  assert.deepEqual(log.ignored, [['event_too_large', e.messageId]]);
  assert.equal(w.requests.length, 0);
});

test('network errors and 5xx are retried with backoff, keeping the messageId', async () => {
  let fail = 2;
  const w = fakeWindow({
    answer: () => {
      if (fail-- > 0) throw new TypeError('Failed to fetch');
      return { status: 200, body: '{}' };
    }
  });
  const { d, log } = setup(w, { flushAt: 1, backoffBase: 1000 });
  d.push(ev());
  await settle();
  assert.equal(w.requests.length, 1);
  // Persisted with one attempt while it waits.
  assert.equal(stored(w)[0].n, 1);
  mock.timers.tick(499);
  assert.equal(w.requests.length, 1, 'not before the smallest backoff');
  mock.timers.tick(501);
  await settle();
  assert.equal(w.requests.length, 2);
  mock.timers.tick(2000);
  await settle();
  assert.equal(w.requests.length, 3);
  const ids = w.requests.map((r) => r.body.batch[0].messageId);
  assert.equal(new Set(ids).size, 1);
  assert.equal(log.delivered, 1);
  assert.deepEqual(stored(w), []);
});

test('events made after a failed one wait for it: the edge sees them in order', async () => {
  const net = outage(true);
  const w = fakeWindow({ answer: net.answer });
  const { d } = setup(w, { flushAt: 1, backoffBase: 1000 });
  const first = ev();
  d.push(first);
  await settle();
  const second = ev();
  d.push(second);
  await settle();
  assert.equal(w.requests.length, 1, 'the second event does not overtake the first');
  net.down = false;
  mock.timers.tick(1000);
  for (let i = 0; i < 5; i++) await settle();
  const ids = sentEvents(w).map((e) => e.messageId);
  assert.deepEqual(ids, [first.messageId, first.messageId, second.messageId]);
});

test('Retry-After is honoured on 429 and 503', async () => {
  let first = true;
  const w = fakeWindow({
    answer: () => {
      if (first) {
        first = false;
        return { status: 429, body: '{"code":"rate_limited"}', headers: { 'Retry-After': '7' } };
      }
      return { status: 200, body: '{}' };
    }
  });
  const { d } = setup(w, { flushAt: 1 });
  d.push(ev());
  await settle();
  mock.timers.tick(6999);
  await settle();
  assert.equal(w.requests.length, 1);
  mock.timers.tick(1);
  await settle();
  assert.equal(w.requests.length, 2);
});

test('a 4xx naming bad events drops only those, with the edge code as reason, and never retries', async () => {
  const w = fakeWindow({
    answer: () => ({
      status: 400,
      body: JSON.stringify({ success: false, code: 'missing_field', accepted: 2, rejected: [{ index: 1, code: 'missing_field' }] })
    })
  });
  const { d, log } = setup(w, { flushAt: 3 });
  const a = ev();
  const b = ev();
  const c = ev();
  [a, b, c].forEach((e) => d.push(e));
  await settle();
  assert.deepEqual(log.ignored, [['rejected_missing_field', b.messageId]]);
  assert.equal(log.delivered, 2);
  mock.timers.tick(120000);
  await settle();
  assert.equal(w.requests.length, 1);
  assert.deepEqual(stored(w), []);
});

test('a 4xx for the whole body drops every event in it with a reason', async () => {
  const w = fakeWindow({ answer: () => ({ status: 413, body: '{"code":"body_too_large"}' }) });
  const { d, log } = setup(w, { flushAt: 2 });
  d.push(ev());
  d.push(ev());
  await settle();
  assert.deepEqual(log.ignored.map((x) => x[0]), ['rejected_body_too_large', 'rejected_body_too_large']);
});

test('the queue is bounded: the oldest waiting event makes room, counted', () => {
  const w = fakeWindow();
  const { d, log } = setup(w, { flushAt: 100, maxQueue: 3 });
  const evs = [ev(), ev(), ev(), ev()];
  evs.forEach((e) => d.push(e));
  assert.deepEqual(log.ignored, [['queue_full', evs[0].messageId]]);
  assert.deepEqual(stored(w).map((x) => x.e.messageId), evs.slice(1).map((e) => e.messageId));
});

test('events still waiting at pagehide are released, never beaconed after a failure, and the next page view sends them with the same messageIds', async () => {
  const net = outage(true);
  const storage = memoryStorage();
  const w = fakeWindow({ storage, answer: net.answer });
  const { d } = setup(w, { flushAt: 1 });
  const failing = ev();
  d.push(failing);
  await settle();
  const fresh = ev();
  d.push(fresh); // waits behind nothing: the first is idle now, both are due at different times
  await settle();
  const fresh2 = ev();
  // A third event queued but not yet sent when the page goes away.
  d.push(fresh2);
  w.requests.length = 0;
  const released = d.unload();
  assert.ok(released >= 1);
  const beaconed = w.beacons.flatMap((b) => b.body.batch.map((e) => e.messageId));
  assert.ok(!beaconed.includes(failing.messageId), 'a failing event is not handed to a beacon');
  assert.ok(w.beacons.every((b) => b.url === URL && b.body.writeKey === 'wk'));
  // Everything not beaconed is in storage, owned by nobody.
  const left = stored(w);
  assert.ok(left.some((x) => x.e.messageId === failing.messageId));
  assert.ok(left.every((x) => x.o === null));
  // The next page view (same storage) sends what was left, with the same messageIds.
  net.down = false;
  const w2 = fakeWindow({ storage });
  const next = setup(w2, { flushAt: 1 }, 'tab-b');
  mock.timers.tick(0);
  await settle();
  const resent = sentEvents(w2).map((e) => e.messageId);
  assert.ok(resent.includes(failing.messageId));
  assert.equal(next.log.delivered, left.length);
  assert.deepEqual(stored(w2), []);
});

test('after a failed request, pagehide beacons nothing: every event waits for the next page view', async () => {
  const w = fakeWindow({ answer: () => ({ status: 503, body: '{"code":"queue_unavailable"}' }) });
  const { d } = setup(w, { flushAt: 1 });
  d.push(ev());
  await settle();
  d.push(ev()); // queued behind the failure, never tried itself
  d.push(ev());
  d.unload();
  assert.equal(w.beacons.length, 0);
  assert.equal(stored(w).length, 3);
});

test('offline at pagehide: no beacon (it would be lost), everything persisted', () => {
  const w = fakeWindow();
  w.navigator.onLine = false;
  const { d } = setup(w, { flushAt: 100 });
  d.push(ev());
  d.push(ev());
  d.unload();
  assert.equal(w.beacons.length, 0);
  assert.equal(stored(w).length, 2);
});

test('a refused beacon leaves the events for the next page view', () => {
  const w = fakeWindow();
  w.beaconResult = false;
  const { d, log } = setup(w, { flushAt: 100 });
  d.push(ev());
  d.unload();
  assert.equal(log.delivered, 0);
  assert.equal(stored(w).length, 1);
});

test("another live tab's events are left alone; a crashed tab's are adopted after its lease", async () => {
  const storage = memoryStorage();
  const wA = fakeWindow({ storage, answer: () => { throw new TypeError('offline'); } });
  // Tab A's timers never fire: it will die without a pagehide.
  wA.setTimeout = () => 0;
  const a = setup(wA, { flushAt: 100 }, 'tab-a');
  a.d.push(ev());
  const wB = fakeWindow({ storage });
  const b = setup(wB, { flushAt: 1 }, 'tab-b');
  mock.timers.tick(0);
  await settle();
  assert.equal(wB.requests.length, 0, 'tab B does not take a live tab\'s event');
  // B queues its own event; A's stays in storage next to it.
  b.d.push(ev());
  await settle();
  assert.equal(stored(wB).length, 1);
  // Tab A dies without pagehide; after its lease a new page adopts its event.
  mock.timers.tick(31000);
  const wC = fakeWindow({ storage });
  const c = setup(wC, { flushAt: 1 }, 'tab-c');
  mock.timers.tick(0);
  await settle();
  assert.equal(c.log.delivered, 1);
  assert.deepEqual(stored(wC), []);
});

test('storage that throws (blocked) still delivers from memory', async () => {
  const w = fakeWindow();
  Object.defineProperty(w, 'localStorage', { get() { throw new Error('SecurityError'); } });
  const { d, log } = setup(w, { flushAt: 1 });
  d.push(ev());
  await settle();
  assert.equal(log.delivered, 1);
});

test('drop counts ride with the next request, again after a failure, and wait across page views', async () => {
  const net = outage(false);
  const storage = memoryStorage();
  const w = fakeWindow({ storage, answer: net.answer });
  const { d } = setup(w, { flushAt: 1 });
  d.drop('queue_full');
  d.drop('queue_full');
  d.drop('consent_unknown_buffer_full');
  net.down = true;
  d.push(ev());
  await settle();
  assert.deepEqual(w.requests[0].body.dropped, { queue_full: 2, consent_unknown_buffer_full: 1 });
  // Not received: reported again with the retry.
  net.down = false;
  mock.timers.tick(1000);
  await settle();
  assert.deepEqual(w.requests[1].body.dropped, { queue_full: 2, consent_unknown_buffer_full: 1 });
  d.push(ev());
  await settle();
  assert.equal(w.requests[2].body.dropped, undefined, 'reported once it was received');
  // A count with no request left on this page waits in storage for the next one.
  d.drop('consent_unknown_at_unload');
  d.unload();
  assert.equal(storage.getItem('ec_dropped:wk'), '{"consent_unknown_at_unload":1}');
  const w2 = fakeWindow({ storage });
  const next = setup(w2, { flushAt: 1 }, 'tab-b');
  next.d.push(ev());
  await settle();
  assert.deepEqual(w2.requests[0].body.dropped, { consent_unknown_at_unload: 1 });
  assert.equal(storage.getItem('ec_dropped:wk'), null);
});

test('a beacon carries the drop counts too', () => {
  const w = fakeWindow();
  const { d } = setup(w, { flushAt: 100 });
  d.drop('event_too_large');
  d.push(ev());
  d.unload();
  assert.deepEqual(w.beacons[0].body.dropped, { event_too_large: 1 });
  assert.equal(w.localStorage.getItem('ec_dropped:wk'), null);
});
