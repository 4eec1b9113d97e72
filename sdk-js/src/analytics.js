// The analytics.js-compatible API: load, track, page, identify, group, alias, reset,
// user(), ready(), consent.set/get, trackLink/trackForm, on/off, stats. Builds
// Segment-spec events with the page's context and hands them to the delivery queue, or
// holds them while consent is unknown (`consent: { whileUnknown: 'buffer' }`).

import { consentState, tcfDecided } from './consent.js';
import { DEFAULTS, delivery } from './queue.js';
import { persisted, topDomain } from './store.js';
import { isObject, isoTime, merge, obj, uuid } from './util.js';

export const VERSION = '0.1.0';
export const LIBRARY = 'edge-collector.js';

/** `https://host` from `host`, `host/v1`, `https://host/`; the batch endpoint under it. */
export const batchUrl = (apiHost) => {
  let h = String(apiHost).replace(/\/+$/, '');
  if (!/^https?:\/\//.test(h)) h = 'https://' + h;
  return h.replace(/\/v1$/, '') + '/v1/batch';
};

/** analytics.js's `page()` arguments: ([category,] [name,] [properties,] [options,] [callback]). */
export const pageArgs = (args) => {
  const a = [].slice.call(args);
  const cb = typeof a[a.length - 1] === 'function' ? a.pop() : undefined;
  const s = [];
  while (s.length < 2 && a.length && (typeof a[0] === 'string' || a[0] === null)) s.push(a.shift());
  return {
    category: s.length === 2 ? s[0] : null,
    name: s.length ? s[s.length - 1] : null,
    properties: obj(a[0]),
    options: obj(a[1]),
    callback: cb
  };
};

/** UTM parameters of a query string as `context.campaign`. */
export const campaign = (search) => {
  let out;
  new URLSearchParams(search).forEach((v, k) => {
    if (!k.indexOf('utm_')) (out = out || {})[k === 'utm_campaign' ? 'name' : k.slice(4)] = v;
  });
  return out;
};

// Options that are not one of these go into the event's context (analytics.js does so).
const OPTION_KEYS = { integrations: 1, timestamp: 1, messageId: 1, anonymousId: 1, userId: 1, context: 1, traits: 1 };

const done = (v) => Promise.resolve(v);
const lastFn = (args) => (typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined);
const str = (v) => (v == null ? undefined : String(v));

/**
 * A new SDK instance for `env`: the page's `window` (tests pass a stand-in). Calls made before `load` wait, in
 * order and with the time they were made, and run once it has.
 */
export const createAnalytics = (env) => {
  const calls = [];
  const readyFns = [];
  const held = [];
  const handlers = {};
  const stats = { sent: 0, ignored: {} };
  let opts, consent, queue, at, anon, uid, traits, gid, gtraits;
  const api = {};
  const impl = {};

  const later = (fn) => {
    if (typeof fn === 'function') {
      // Its own task: a callback that throws breaks nothing here.
      env.setTimeout(() => fn.call(api), 0);
    }
  };

  const emit = (name, ...args) =>
    (handlers[name] || []).slice().forEach((fn) => {
      try {
        fn(...args);
      } catch (e) {
        /* the site's handler */
      }
    });

  /** The one path for every event that will not be sent: counted by reason. */
  const ignored = (reason, event) => {
    stats.ignored[reason] = (stats.ignored[reason] || 0) + 1;
    // Reported to the edge, which counts it; events the edge rejected it counted itself.
    if (reason.indexOf('rejected_')) queue.drop(reason);
    emit('ignored', reason, event);
  };

  const call = (method, args, time) => {
    if (!api.loaded) {
      calls.push([method, [].slice.call(args), time || Date.now()]);
      return done();
    }
    const prev = at;
    at = time;
    try {
      return impl[method](...args);
    } finally {
      at = prev;
    }
  };

  const user = {
    id: () => str(uid.get()) || null,
    anonymousId: (id) => {
      if (id != null) anon.set(String(id));
      let v = anon.get();
      if (v == null) anon.set((v = uuid(env.crypto)));
      return String(v);
    },
    traits: () => obj(traits.get())
  };

  const context = () => {
    const loc = env.location;
    const doc = env.document;
    const nav = env.navigator;
    const url = loc.href.replace(/#.*$/, '');
    const ctx = {
      library: { name: LIBRARY, version: VERSION },
      page: { path: loc.pathname, referrer: doc.referrer, search: loc.search, title: doc.title, url },
      userAgent: nav.userAgent,
      locale: nav.language
    };
    ctx.timezone = Intl.DateTimeFormat().resolvedOptions().timeZone;
    const sc = env.screen;
    if (sc) ctx.screen = { width: sc.width, height: sc.height, density: env.devicePixelRatio };
    const c = campaign(loc.search);
    if (c) ctx.campaign = c;
    return ctx;
  };

  /** A complete Segment-spec event of `type` with `fields`, shaped by `options`. */
  const event = (type, fields, options) => {
    options = obj(options);
    const ctx = context();
    for (const k in options) if (!OPTION_KEYS[k]) ctx[k] = options[k];
    merge(ctx, options.context);
    const ev = {
      type,
      messageId: str(options.messageId) || uuid(env.crypto),
      timestamp: isoTime(options.timestamp) || isoTime(at || Date.now()),
      anonymousId: str(options.anonymousId) || user.anonymousId(),
      context: ctx,
      integrations: obj(options.integrations)
    };
    const id = str(options.userId !== undefined ? options.userId : uid.get());
    if (id) ev.userId = id;
    for (const k in fields) if (fields[k] != null) ev[k] = fields[k];
    return ev;
  };

  /** Sends an event now, or holds it while consent is unknown and the site asked to wait. */
  const dispatch = (ev, callback) => {
    if (opts.consent.whileUnknown === 'buffer' && !consent.known()) {
      if (held.length >= opts.consent.bufferMax) ignored('consent_unknown_buffer_full', ev);
      else held.push(ev);
    } else {
      // Consent stated by the call itself (options.context.consent) wins over the SDK's.
      ev.context.consent = merge(consent.context(), ev.context.consent);
      queue.push(ev);
    }
    later(callback);
    return done(ev);
  };

  impl['consent.set'] = (categories) => {
    consent.set(categories);
    return done(consent.get());
  };

  impl.track = function (name, properties, options) {
    if (typeof name !== 'string' || !name) {
      ignored('invalid_call', null);
      return done();
    }
    return dispatch(event('track', { event: name, properties: obj(properties) }, options), lastFn(arguments));
  };

  impl.page = function () {
    const p = pageArgs(arguments);
    const props = merge(context().page, p.properties);
    if (p.name != null) props.name = p.name;
    if (p.category != null) props.category = p.category;
    return dispatch(event('page', { name: p.name, category: p.category, properties: props }, p.options), p.callback);
  };

  impl.identify = function (id, newTraits, options) {
    if (isObject(id) || id == null) {
      options = newTraits;
      newTraits = id;
      id = undefined;
    }
    if (id !== undefined) {
      id = String(id);
      // Another person signed in: the previous person's traits are not theirs.
      if (user.id() && user.id() !== id) traits.set(null);
      uid.set(id);
    }
    const all = merge(user.traits(), obj(newTraits));
    traits.set(all);
    return dispatch(event('identify', { traits: all }, options), lastFn(arguments));
  };

  impl.group = function (id, newTraits, options) {
    if (isObject(id)) {
      options = newTraits;
      newTraits = id;
      id = null;
    }
    if (id != null) gid.set(String(id));
    const all = merge(obj(gtraits.get()), obj(newTraits));
    gtraits.set(all);
    return dispatch(event('group', { groupId: str(gid.get()), traits: all }, options), lastFn(arguments));
  };

  impl.alias = function (to, from, options) {
    if (isObject(from)) {
      options = from;
      from = undefined;
    }
    const prev = typeof from === 'string' || typeof from === 'number' ? String(from) : user.id() || user.anonymousId();
    return dispatch(event('alias', { userId: String(to), previousId: prev }, merge({ userId: String(to) }, options)), lastFn(arguments));
  };

  /** Signs out: forgets the user id, traits and group; the next event gets a new anonymous id. */
  impl.reset = () => {
    [uid, traits, gid, gtraits, anon].forEach((s) => s.set(null));
    return done();
  };

  impl.setAnonymousId = (id) => done(user.anonymousId(id));

  // Clicks on links (or any element) and form submissions; the event survives the
  // navigation that follows (sendBeacon on pagehide), so nothing needs delaying.
  const bind = (on) => (els, name, properties) => {
    els = els && els.length !== undefined && !els.tagName ? [].slice.call(els) : els ? [els] : [];
    els.forEach((el) =>
      el.addEventListener(on, () =>
        impl.track(typeof name === 'function' ? name(el) : name, typeof properties === 'function' ? properties(el) : properties)
      )
    );
    return done();
  };
  impl.trackLink = bind('click');
  impl.trackForm = bind('submit');

  const load = (writeKey, options) => {
    if (api.loaded) return api;
    opts = merge(merge({ consent: { whileUnknown: 'send', bufferMax: 100 }, cookie: {} }, DEFAULTS), options);
    if (!writeKey || !opts.apiHost) throw new Error('load(writeKey, {apiHost})');
    const loc = env.location;
    const ck = merge({ secure: loc.protocol === 'https:' }, opts.cookie);
    if (ck.domain === undefined) ck.domain = topDomain(env.document, loc.hostname);
    const keep = (name, cookie) => persisted(env, name, ck, cookie);
    anon = keep('ajs_anonymous_id', 1);
    uid = keep('ajs_user_id', 1);
    traits = keep('ajs_user_traits');
    gid = keep('ajs_group_id', 1);
    gtraits = keep('ajs_group_properties');
    consent = consentState(keep('ec_consent', 1), env.navigator.globalPrivacyControl, () => {
      if (consent.known()) held.splice(0).forEach((ev) => dispatch(ev));
    });
    queue = delivery(
      env,
      merge({ url: batchUrl(opts.apiHost), writeKey: String(writeKey), tab: uuid(env.crypto) }, opts),
      {
        ignored,
        delivered: (n) => {
          stats.sent += n;
          emit('delivered', n);
        }
      }
    );
    const w = env;
    if (w.addEventListener) {
      const doc = env.document;
      const away = () => {
        // Events waiting for a consent that never came cannot be sent.
        held.splice(0).forEach((ev) => ignored('consent_unknown_at_unload', ev));
        queue.unload();
      };
      w.addEventListener('pagehide', away);
      doc.addEventListener('visibilitychange', () => (doc.visibilityState === 'hidden' ? away() : queue.adopt()));
      w.addEventListener('online', () => queue.retryNow());
      if (typeof w.__tcfapi === 'function') {
        try {
          w.__tcfapi('addEventListener', 2, (tcData, success) => {
            if (tcfDecided(tcData, success)) consent.setTcf(tcData);
          });
        } catch (e) {
          /* a broken CMP must not break tracking */
        }
      }
    }
    api.loaded = true;
    calls.splice(0).forEach((c) => call(c[0], c[1], c[2]));
    readyFns.splice(0).forEach(later);
    return api;
  };

  Object.keys(impl).forEach((m) => {
    if (m !== 'consent.set') api[m] = (...args) => call(m, args);
  });
  return merge(api, {
    VERSION,
    loaded: false,
    load,
    /** Replays a call recorded by the snippet, at the time it was made. */
    replay: (m, args, time) => (impl[m] ? call(m, args, time) : api[m] ? api[m](...args) : undefined),
    ready: (fn) => {
      if (api.loaded) later(fn);
      else readyFns.push(fn);
      return done();
    },
    on: (name, fn) => {
      (handlers[name] = handlers[name] || []).push(fn);
      return api;
    },
    off: (name, fn) => {
      const l = handlers[name] || [];
      if (l.indexOf(fn) >= 0) l.splice(l.indexOf(fn), 1);
      return api;
    },
    // After load (analytics.js's User: id(), anonymousId(), traits()).
    user: () => user,
    /** Events handed to the edge, events not sent by reason, events waiting. */
    stats: () => ({
      sent: stats.sent,
      ignored: merge({}, stats.ignored),
      queued: queue ? queue.size() : calls.length,
      held: held.length
    }),
    consent: {
      set: (c) => call('consent.set', [c]),
      get: () => (consent ? consent.get() : null)
    }
  });
};
