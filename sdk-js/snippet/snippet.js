// The snippet sites paste (minified by the build into dist/snippet.min.js). It defines
// a stub `analytics` that records calls (with their time) until the SDK has loaded;
// `analytics.load(writeKey, { apiHost })` fetches the SDK from the edge itself.
(function (w, d) {
  var a = (w.analytics = w.analytics || []);
  if (a.loaded !== undefined || a.invoked) return;
  a.invoked = true;
  var stub = function (m) {
    return function () {
      var c = [].slice.call(arguments);
      c.unshift(m);
      c.t = +new Date();
      a.push(c);
      return a;
    };
  };
  var ms = 'track page identify group alias reset ready on off setAnonymousId trackLink trackForm'.split(' ');
  for (var i = 0; i < ms.length; i++) a[ms[i]] = stub(ms[i]);
  a.consent = { set: stub('consent.set') };
  a.load = function (key, opts) {
    a._writeKey = key;
    a._loadOptions = opts;
    var h = String(opts.apiHost).replace(/\/+$/, '').replace(/\/v1$/, '');
    var s = d.createElement('script');
    s.async = true;
    s.src = opts.sdkUrl || (/^https?:/.test(h) ? '' : 'https://') + h + '/sdk/v1/collector.js';
    var f = d.getElementsByTagName('script')[0];
    f ? f.parentNode.insertBefore(s, f) : d.head.appendChild(s);
  };
  a.SNIPPET_VERSION = '1';
})(window, document);
