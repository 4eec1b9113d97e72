// A stand-in for the parts of `window` the SDK uses, with a cookie jar that behaves like
// a browser's (domain attribute, max-age=0 deletes, public suffixes refused), a
// localStorage, and a fetch/sendBeacon that record what was sent and answer as told.

const PUBLIC_SUFFIXES = new Set(['com', 'uk', 'co.uk', 'org', 'test']);

export function cookieJar(hostname) {
  const jar = new Map(); // name -> {value, domain}
  return {
    jar,
    get cookie() {
      return [...jar.entries()]
        .filter(([, c]) => c.domain === null || hostname === c.domain || hostname.endsWith('.' + c.domain))
        .map(([n, c]) => `${n}=${c.value}`)
        .join('; ');
    },
    set cookie(text) {
      const [pair, ...attrs] = text.split(/;\s*/);
      const eq = pair.indexOf('=');
      const name = pair.slice(0, eq);
      const value = pair.slice(eq + 1);
      let domain = null;
      let maxAge = null;
      for (const a of attrs) {
        const [k, v] = a.split('=');
        if (k.toLowerCase() === 'domain') domain = v.replace(/^\./, '');
        if (k.toLowerCase() === 'max-age') maxAge = Number(v);
      }
      if (domain !== null && (PUBLIC_SUFFIXES.has(domain) || !(hostname === domain || hostname.endsWith('.' + domain)))) {
        return; // the browser refuses it
      }
      if (maxAge !== null && maxAge <= 0) jar.delete(name);
      else jar.set(name, { value, domain });
    }
  };
}

export function memoryStorage() {
  const m = new Map();
  return {
    map: m,
    getItem: (k) => (m.has(k) ? m.get(k) : null),
    setItem: (k, v) => m.set(k, String(v)),
    removeItem: (k) => m.delete(k)
  };
}

/**
 * A fake window. `answer(request)` returns {status, body, headers} or throws for a
 * network error; every fetch is recorded in `w.requests` (parsed body), every beacon
 * in `w.beacons`.
 */
export function fakeWindow(opts = {}) {
  const url = new URL(opts.url || 'https://www.example.com/shop/item?utm_source=news&utm_campaign=spring#top');
  const listeners = {};
  const docListeners = {};
  const w = {
    requests: [],
    beacons: [],
    answer: opts.answer || (() => ({ status: 200, body: '{"success":true}' })),
    beaconResult: true,
    location: {
      href: url.href,
      pathname: url.pathname,
      search: url.search,
      hostname: url.hostname,
      protocol: url.protocol
    },
    document: Object.assign(cookieJar(url.hostname), {
      referrer: 'https://ref.example.org/',
      title: 'Item',
      visibilityState: 'visible',
      addEventListener: (n, f) => (docListeners[n] = docListeners[n] || []).push(f)
    }),
    navigator: {
      userAgent: 'FakeBrowser/1.0',
      language: 'de-DE',
      onLine: true,
      globalPrivacyControl: opts.gpc,
      sendBeacon: (u, body) => {
        if (!w.beaconResult) return false;
        w.beacons.push({ url: u, body: JSON.parse(body) });
        return true;
      }
    },
    screen: { width: 1280, height: 720 },
    devicePixelRatio: 2,
    crypto: globalThis.crypto,
    localStorage: opts.storage || memoryStorage(),
    setTimeout: (f, d) => setTimeout(f, d),
    clearTimeout: (t) => clearTimeout(t),
    addEventListener: (n, f) => (listeners[n] = listeners[n] || []).push(f),
    fire: (n) => (listeners[n] || []).forEach((f) => f()),
    hide: () => {
      w.document.visibilityState = 'hidden';
      (docListeners.visibilitychange || []).forEach((f) => f());
    },
    showAgain: () => {
      w.document.visibilityState = 'visible';
      (docListeners.visibilitychange || []).forEach((f) => f());
    },
    fetch: async (u, init) => {
      const req = { url: u, init, body: JSON.parse(init.body) };
      w.requests.push(req);
      const a = await w.answer(req);
      const headers = a.headers || {};
      return {
        status: a.status,
        text: async () => a.body || '',
        headers: { get: (k) => headers[k] ?? null }
      };
    }
  };
  if (opts.tcf) w.__tcfapi = opts.tcf;
  return w;
}

/** Lets pending promise callbacks run (fetch answers are promises). */
export const settle = () => new Promise((r) => setImmediate(r));

/** Every event sent by fetch, in order. */
export const sentEvents = (w) => w.requests.flatMap((r) => r.body.batch);

/** An edge that is down (network error) until `net.down = false`, then answers 200. */
export function outage(down = true) {
  const net = {
    down,
    answer: () => {
      if (net.down) throw new TypeError('Failed to fetch');
      return { status: 200, body: '{}' };
    }
  };
  return net;
}
