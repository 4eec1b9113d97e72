// Unit tests of the pure helpers: ids, time, sizes, storage encodings, consent merging,
// backoff and response classification.
import { test } from 'node:test';
import assert from 'node:assert/strict';

import { uuid, isoTime, byteLength, merge } from '../src/util.js';
import { decode, cookieGet, cookieSet, topDomain } from '../src/store.js';
import { mergeCategories, tcfDecided, consentState } from '../src/consent.js';
import { backoff, retryAfter, classify } from '../src/backoff.js';
import { cookieJar } from './fake.js';

const UUID4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/;

test('uuid is a v4 UUID, with and without crypto.randomUUID', () => {
  assert.match(uuid(globalThis.crypto), UUID4);
  const noRandomUuid = { getRandomValues: (b) => globalThis.crypto.getRandomValues(b) };
  const ids = new Set();
  for (let i = 0; i < 200; i++) {
    const id = uuid(noRandomUuid);
    assert.match(id, UUID4);
    ids.add(id);
  }
  assert.equal(ids.size, 200);
});

test('isoTime accepts dates, strings and numbers and refuses garbage', () => {
  assert.equal(isoTime(new Date(Date.UTC(2026, 0, 2, 3, 4, 5))), '2026-01-02T03:04:05.000Z');
  assert.equal(isoTime('2026-01-02T03:04:05Z'), '2026-01-02T03:04:05.000Z');
  assert.equal(isoTime(0), '1970-01-01T00:00:00.000Z');
  assert.equal(isoTime('yesterday-ish'), undefined);
  assert.equal(isoTime(undefined), undefined);
});

test('byteLength counts UTF-8 bytes, as the edge limits do', () => {
  assert.equal(byteLength('abc'), 3);
  assert.equal(byteLength('é'), 2);
  assert.equal(byteLength('€'), 3);
  assert.equal(byteLength('😀'), 4);
});

test('merge is deep for objects and replaces everything else', () => {
  const t = { a: { x: 1, y: 2 }, list: [1, 2], s: 'old' };
  merge(t, { a: { y: 3 }, list: [9], s: 'new', n: null });
  assert.deepEqual(t, { a: { x: 1, y: 3 }, list: [9], s: 'new', n: null });
});

test('stored values are read raw or JSON-encoded (analytics.js wrote both)', () => {
  assert.equal(decode('"abc"'), 'abc');
  assert.equal(decode('abc-123'), 'abc-123');
  assert.deepEqual(decode('{"a":1}'), { a: 1 });
  assert.equal(decode(''), null);
  assert.equal(decode(null), null);
  assert.equal(decode('null'), null);
});

test('cookies: legacy %22-quoted ids are read; set and delete round-trip', () => {
  const doc = cookieJar('www.example.com');
  doc.cookie = 'ajs_anonymous_id=%22legacy-id%22; path=/';
  doc.cookie = 'other=1';
  assert.equal(cookieGet(doc, 'ajs_anonymous_id'), 'legacy-id');
  assert.equal(cookieGet(doc, 'missing'), null);
  cookieSet(doc, 'ajs_user_id', 'user 1', {});
  assert.equal(cookieGet(doc, 'ajs_user_id'), 'user 1');
  cookieSet(doc, 'ajs_user_id', null, {});
  assert.equal(cookieGet(doc, 'ajs_user_id'), null);
  cookieSet(doc, 'ec_consent', { categories: { a: true } }, {});
  assert.deepEqual(cookieGet(doc, 'ec_consent'), { categories: { a: true } });
  // A cookie jar that throws (cookies disabled) reads as nothing.
  const blocked = { get cookie() { throw new Error('SecurityError'); } };
  assert.equal(cookieGet(blocked, 'x'), null);
});

test('topDomain finds the widest domain a cookie can be set on', () => {
  assert.equal(topDomain(cookieJar('shop.example.co.uk'), 'shop.example.co.uk'), 'example.co.uk');
  assert.equal(topDomain(cookieJar('www.example.com'), 'www.example.com'), 'example.com');
  assert.equal(topDomain(cookieJar('localhost'), 'localhost'), undefined);
  assert.equal(topDomain(cookieJar('127.0.0.1'), '127.0.0.1'), undefined);
  // The probe cookie is removed again.
  const doc = cookieJar('a.example.com');
  topDomain(doc, 'a.example.com');
  assert.equal(doc.cookie, '');
});

test('consent categories merge: booleans only, other categories kept', () => {
  assert.deepEqual(mergeCategories({ analytics: true, marketing: true }, { marketing: false, junk: 'yes' }), {
    analytics: true,
    marketing: false
  });
  assert.deepEqual(mergeCategories(null, { analytics: false }), { analytics: false });
  assert.deepEqual(mergeCategories({ a: true }, 'nonsense'), { a: true });
});

test('a TCF callback counts once the CMP has a decision', () => {
  assert.equal(tcfDecided({ tcString: 'CQ', eventStatus: 'tcloaded' }, true), true);
  assert.equal(tcfDecided({ tcString: 'CQ', eventStatus: 'useractioncomplete' }, true), true);
  assert.equal(tcfDecided({ tcString: 'CQ', eventStatus: 'cmpuishown' }, true), false);
  assert.equal(tcfDecided({ tcString: 'CQ', eventStatus: 'tcloaded' }, false), false);
  assert.equal(tcfDecided({ tcString: '', eventStatus: 'tcloaded' }, true), false);
});

test('consent state: pending until known, persisted, GPC and TCF reported', () => {
  let saved = null;
  const store = { get: () => saved, set: (v) => (saved = v) };
  let changes = 0;
  const c = consentState(store, true, () => changes++);
  assert.deepEqual(c.context(), { gpc: true, pending: true });
  assert.equal(c.known(), false);
  c.set({ analytics: true, marketing: false });
  assert.equal(changes, 1);
  assert.deepEqual(c.context(), { categoryPreferences: { analytics: true, marketing: false }, gpc: true });
  c.setTcf({ tcString: 'CQabc', gdprApplies: true });
  assert.deepEqual(c.context().tcf, 'CQabc');
  assert.equal(c.context().gdprApplies, true);
  // The next page view starts from the stored choice.
  const next = consentState(store, false, () => {});
  assert.equal(next.known(), true);
  assert.deepEqual(next.get(), { categories: { analytics: true, marketing: false }, gpc: false, tcf: null, known: true });
  // get() hands out a copy.
  next.get().categories.analytics = false;
  assert.equal(next.get().categories.analytics, true);
});

test('backoff grows exponentially with jitter and a cap', () => {
  const lo = () => 0;
  const hi = () => 0.999999;
  assert.equal(backoff(1, 1000, 60000, lo), 500);
  assert.equal(backoff(1, 1000, 60000, hi), 1000);
  assert.equal(backoff(3, 1000, 60000, lo), 2000);
  assert.equal(backoff(3, 1000, 60000, hi), 4000);
  assert.equal(backoff(20, 1000, 60000, hi), 60000);
  assert.equal(backoff(20, 1000, 60000, lo), 30000);
});

test('Retry-After: seconds or an HTTP date, clamped', () => {
  const now = Date.UTC(2026, 10, 24, 12, 0, 0);
  assert.equal(retryAfter('7', now, 60000), 7000);
  assert.equal(retryAfter(new Date(now + 12000).toUTCString(), now, 60000), 12000);
  assert.equal(retryAfter(new Date(now - 5000).toUTCString(), now, 60000), 0);
  assert.equal(retryAfter('3600', now, 60000), 60000);
  assert.equal(retryAfter('soon', now, 60000), undefined);
  assert.equal(retryAfter(null, now, 60000), undefined);
});

test('responses: 2xx delivered, transient and configuration errors retried, bad events not', () => {
  for (const s of [200, 202, 204]) assert.equal(classify(s), 'ok');
  for (const s of [0, 401, 403, 408, 425, 429, 500, 502, 503]) assert.equal(classify(s), 'retry', s);
  for (const s of [400, 404, 405, 413, 415, 422]) assert.equal(classify(s), 'rejected', s);
});
