// The script the snippet loads (IIFE build). Replaces the snippet's stub
// `window.analytics` with the SDK and replays, in order, every call the page made while
// the SDK was loading (with the time each was made), starting with `load`.

import { createAnalytics } from './analytics.js';

((w) => {
  const stub = w.analytics;
  if (stub && stub.loaded !== undefined) return; // the SDK is already there
  const a = (w.analytics = createAnalytics(w));
  if (!stub || !stub.push) return;
  if (stub._writeKey) a.load(stub._writeKey, stub._loadOptions);
  for (const c of stub) a.replay(c[0], c.slice(1), c.t);
})(window);
