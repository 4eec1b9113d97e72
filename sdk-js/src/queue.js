// Delivery: batches events, sends them to the edge, retries, and persists every event
// whose delivery has not been confirmed, so that a reload, a crash or an offline spell
// loses nothing. Each event keeps its messageId through every retry, so an event that
// is sent twice (a retry after a lost response, a beacon whose fate is unknown) is
// still stored once: the warehouse deduplicates on messageId.
//
// Several tabs of one site share the localStorage queue. Each entry names the tab that
// owns it and a lease; a page adopts entries whose owner released them (on pagehide)
// or whose lease ran out (the tab crashed), never those of a live tab.

import { backoff, classify, retryAfter } from './backoff.js';
import { lsGet, lsSet } from './store.js';
import { byteLength, isoTime, obj } from './util.js';

const LEASE = 30000;
// The JSON around the events in a request body: {"batch":[…],"sentAt":"…","writeKey":"…",
// "dropped":{…}} (a few reasons at most).
const ENVELOPE = 600;

export const DEFAULTS = {
  flushAt: 10,
  flushInterval: 5000,
  // keepalive fetches and beacons share a 64 KiB budget per page.
  maxBodyBytes: 60000,
  // The edge's per-event limit (Segment's too).
  maxEventBytes: 32768,
  maxQueue: 1000,
  backoffBase: 1000,
  backoffCap: 60000
};

/**
 * env: the page's `window` (or a stand-in with fetch, navigator.sendBeacon and
 * navigator.onLine, localStorage, setTimeout, clearTimeout). Time is Date.now().
 * opts: url, writeKey, tab (this page's id) and the DEFAULTS above.
 * hooks: ignored(reason, event), delivered(count).
 * Returns { push, adopt, unload, retryNow, size, drop }.
 *
 * `drop(reason)` counts an event the SDK did not send; the counts ride along with the
 * next request (`"dropped": {reason: n}`, counted at the edge as `client_<reason>`) and
 * wait in localStorage across page views until one goes out.
 */
export const delivery = (env, opts, hooks) => {
  const key = 'ec_queue:' + opts.writeKey;
  const tab = opts.tab;
  let mine = [];
  let inflight = null;
  let timer = null;
  let timerAt = Infinity;
  // The last request failed (network or edge trouble): a beacon now would likely be lost.
  let failing = false;
  // Drop counts not yet reported; this page takes over the stored ones.
  const dkey = 'ec_dropped:' + opts.writeKey;
  let drops = obj(lsGet(env, dkey));
  lsSet(env, dkey, null);
  const addTo = (t, c) => {
    for (const k in c) t[k] = (t[k] || 0) + c[k];
    return t;
  };

  const stored = () => {
    const v = lsGet(env, key);
    return Array.isArray(v) ? v : [];
  };

  const ids = (list) => {
    const out = {};
    for (let i = 0; i < list.length; i++) out[list[i].e.messageId] = 1;
    return out;
  };

  /** Writes this tab's entries into the shared queue, keeping the other tabs' entries. */
  const save = () => {
    const have = ids(mine);
    const others = stored().filter((x) => {
      return x && x.e && x.o !== tab && !have[x.e.messageId];
    });
    lsSet(env, key, others.concat(mine));
    return others.length;
  };

  /** Takes over entries that no live page owns, and sends them soon. */
  const adopt = () => {
    const now = Date.now();
    const have = ids(mine);
    let took = 0;
    stored().forEach((x) => {
      if (x && x.e && x.e.messageId && !have[x.e.messageId] && (x.o == null || x.o === tab || !(x.l > now))) {
        x.o = tab;
        x.l = now + LEASE;
        x.at = 0;
        mine.push(x);
        took++;
      }
    });
    if (took) {
      save();
      schedule(0);
    }
    return took;
  };

  const idle = (x) => {
    return !inflight || inflight.indexOf(x) < 0;
  };

  // Events go in the order they were made: nothing passes an event that waits for a
  // retry (each visitor's events reach the edge in order).
  const due = (now) => {
    const out = [];
    for (const x of mine) {
      if (x.at > now) break;
      if (idle(x)) out.push(x);
    }
    return out;
  };

  const schedule = (delay) => {
    const at = Date.now() + delay;
    if (at >= timerAt) return;
    if (timer) env.clearTimeout(timer);
    timerAt = at;
    timer = env.setTimeout(() => {
      timer = null;
      timerAt = Infinity;
      flush();
    }, delay);
  };

  /** The entries that fit one request body, oldest first. */
  const take = (entries) => {
    let out = [];
    let bytes = ENVELOPE + opts.writeKey.length;
    for (let i = 0; i < entries.length; i++) {
      const s = entries[i].s || byteLength(JSON.stringify(entries[i].e));
      if (out.length && bytes + s + 1 > opts.maxBodyBytes) break;
      out.push(entries[i]);
      bytes += s + 1;
    }
    return out;
  };

  // A request body; `d` are the drop counts it reports (taken from `drops`).
  const body = (entries, d) => {
    return JSON.stringify({
      batch: entries.map((x) => { return x.e; }),
      sentAt: isoTime(Date.now()),
      writeKey: opts.writeKey,
      dropped: Object.keys(d).length ? d : undefined
    });
  };

  const remove = (x) => {
    const i = mine.indexOf(x);
    if (i >= 0) mine.splice(i, 1);
  };

  /** Queues one event (already complete: messageId, timestamp, context). */
  const push = (event) => {
    const size = byteLength(JSON.stringify(event));
    if (size > opts.maxEventBytes) return hooks.ignored('event_too_large', event);
    const now = Date.now();
    mine.push({ e: event, n: 0, at: 0, o: tab, l: now + LEASE, s: size });
    let others = save();
    // Bounded: the oldest of this page's events that are not on the wire make room.
    while (others + mine.length > opts.maxQueue) {
      let old = mine.filter(idle)[0];
      if (!old) break;
      remove(old);
      hooks.ignored('queue_full', old.e);
      others = save();
    }
    if (due(now).length >= opts.flushAt) flush();
    else schedule(opts.flushInterval);
  };

  /** Sends what is due, one request at a time (which keeps each visitor's order). */
  const flush = () => {
    if (inflight) return;
    const now = Date.now();
    let ready = due(now);
    if (!ready.length) {
      let next = Infinity;
      mine.forEach((x) => { next = Math.min(next, x.at); });
      if (next < Infinity) schedule(Math.max(0, next - now));
      return;
    }
    const batch = (inflight = take(ready));
    const d = drops;
    drops = {};
    const done = (status, text, ra) => {
      if (inflight === batch) inflight = null;
      // Not received: report the counts again with the next request.
      if (classify(status) === 'retry') addTo(drops, d);
      settle(batch, status, text, ra);
    };
    let p;
    try {
      p = env.fetch(opts.url, {
        method: 'POST',
        body: body(batch, d),
        // A string body goes as text/plain;charset=UTF-8: a "simple" request, so no
        // CORS preflight. keepalive lets it finish if the page goes away meanwhile.
        keepalive: true
      });
    } catch (e) {
      p = Promise.reject(e);
    }
    p.then((res) => {
      return res.text().then((t) => {
        done(res.status, t, res.headers.get('Retry-After'));
      }, () => {
        done(res.status, '', null);
      });
    }, () => {
      done(0, '', null);
    });
  };

  /** Applies the edge's answer to the events of one request. */
  const settle = (batch, status, text, ra) => {
    const now = Date.now();
    const kind = classify(status);
    failing = kind === 'retry';
    if (failing) {
      let n = 0;
      batch.forEach((x) => { n = Math.max(n, ++x.n); });
      let wait = retryAfter(ra, now, opts.backoffCap);
      if (wait === undefined) wait = backoff(n, opts.backoffBase, opts.backoffCap, Math.random);
      batch.forEach((x) => {
        x.at = now + wait;
        x.l = x.at + LEASE;
      });
    } else {
      let res = null;
      try {
        res = JSON.parse(text);
      } catch (e) {
        /* not JSON */
      }
      const bad = {};
      let all = kind === 'rejected';
      if (all && res && Array.isArray(res.rejected)) {
        res.rejected.forEach((r) => {
          if (typeof r.index === 'number') {
            bad[r.index] = r.code || 'invalid';
            all = false;
          } else all = true;
        });
      }
      let ok = 0;
      batch.forEach((x, i) => {
        remove(x);
        if (all) hooks.ignored('rejected_' + ((res && res.code) || status), x.e);
        else if (bad[i]) hooks.ignored('rejected_' + bad[i], x.e);
        else ok++;
      });
      if (ok) hooks.delivered(ok);
    }
    save();
    flush();
  };

  /**
   * The page is going away (pagehide, or hidden: it may never come back). Hands what
   * has never failed to the browser with sendBeacon, which delivers after the page is
   * gone, and releases the rest to the next page view: events already retrying, and
   * everything when the last request failed or the browser is offline (a beacon into
   * a dead network or edge would be lost, and nobody would know).
   * Released entries live in storage only; if the page comes back (a hidden tab shown
   * again), `adopt` takes them back unless another page did.
   */
  const unload = () => {
    if (timer) env.clearTimeout(timer);
    timer = null;
    timerAt = Infinity;
    if (!failing && env.navigator.onLine !== false) {
      let fresh = due(Infinity).filter((x) => { return x.n === 0; });
      while (fresh.length) {
        const chunk = take(fresh);
        let queued = false;
        try {
          queued = env.navigator.sendBeacon(opts.url, body(chunk, drops));
        } catch (e) {
          /* refused: stays for the next page view */
        }
        if (!queued) break;
        drops = {};
        chunk.forEach(remove);
        hooks.delivered(chunk.length);
        fresh = fresh.slice(chunk.length);
      }
    }
    mine.forEach((x) => { x.o = null; });
    save();
    const all = addTo(obj(lsGet(env, dkey)), drops);
    lsSet(env, dkey, Object.keys(all).length ? all : null);
    drops = {};
    const released = mine.length;
    mine = [];
    inflight = null;
    return released;
  };

  /** The network is back: what was waiting for a retry goes now. */
  const retryNow = () => {
    mine.forEach((x) => { x.at = 0; });
    flush();
  };

  adopt();
  return {
    push: push,
    adopt: adopt,
    unload: unload,
    retryNow: retryNow,
    size: () => { return mine.length; },
    drop: (reason) => addTo(drops, { [reason]: 1 })
  };
};
