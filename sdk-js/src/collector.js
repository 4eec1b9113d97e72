// Minimal browser sender for the edge collector (the full analytics.js-compatible SDK
// is issue #4). Sends Segment-spec events to /v1/batch as text/plain (no CORS
// preflight) with the write key in the body, and keeps an anonymous id in localStorage.
(function (global) {
  'use strict';
  var KEY = 'ajs_anonymous_id';
  function uuid() {
    if (global.crypto && global.crypto.randomUUID) return global.crypto.randomUUID();
    var b = new Uint8Array(16);
    global.crypto.getRandomValues(b);
    b[6] = (b[6] & 0x0f) | 0x40; b[8] = (b[8] & 0x3f) | 0x80;
    var h = Array.prototype.map.call(b, function (x) { return (x + 256).toString(16).slice(1); }).join('');
    return h.slice(0, 8) + '-' + h.slice(8, 12) + '-' + h.slice(12, 16) + '-' + h.slice(16, 20) + '-' + h.slice(20);
  }
  function anonymousId() {
    var id = null;
    try { id = global.localStorage.getItem(KEY); } catch (e) { /* storage blocked */ }
    if (!id) {
      id = uuid();
      try { global.localStorage.setItem(KEY, id); } catch (e) { /* storage blocked */ }
    }
    return id;
  }
  var cfg = null;
  var userId = null;
  function send(type, fields) {
    if (!cfg) throw new Error('collector: call init({writeKey, apiHost}) first');
    var now = new Date().toISOString();
    var ev = Object.assign({
      type: type,
      messageId: uuid(),
      anonymousId: anonymousId(),
      userId: userId,
      timestamp: now,
      context: {
        library: { name: 'edge-collector-mini', version: '0.1.0' },
        page: { url: global.location.href, path: global.location.pathname, referrer: global.document.referrer, title: global.document.title },
        userAgent: global.navigator.userAgent,
        locale: global.navigator.language
      }
    }, fields);
    var body = JSON.stringify({ writeKey: cfg.writeKey, sentAt: new Date().toISOString(), batch: [ev] });
    return global.fetch(cfg.apiHost.replace(/\/$/, '') + '/v1/batch', {
      method: 'POST', body: body, keepalive: true, headers: { 'Content-Type': 'text/plain' }
    }).then(function (r) { return r.json(); });
  }
  global.collector = {
    init: function (c) { cfg = c; },
    track: function (event, properties) { return send('track', { event: event, properties: properties || {} }); },
    page: function (name, properties) { return send('page', { name: name, properties: properties || {} }); },
    identify: function (id, traits) { userId = id; return send('identify', { userId: id, traits: traits || {} }); },
    anonymousId: anonymousId
  };
})(window);
