// Consent as the browser knows it. The SDK does not decide anything: it reports what
// the visitor chose (categories), what the browser says (Global Privacy Control) and
// what a TCF CMP says (the TC string), with every event; the edge's policy decides.

import { isObject } from './util.js';

/**
 * Merges a `consent.set()` argument into the current categories. Only booleans count;
 * `{analytics: true}` keeps the other categories as they were.
 */
export const mergeCategories = (current, update) => {
  let out = {};
  let k;
  for (k in current || {}) out[k] = current[k];
  if (isObject(update)) {
    for (k in update) {
      if (typeof update[k] === 'boolean') out[k] = update[k];
    }
  }
  return out;
};

/** Whether a TCF `addEventListener` callback carries a decision (not just a loaded CMP). */
export const tcfDecided = (tcData, success) => {
  return !!(success && tcData && tcData.tcString &&
    (tcData.eventStatus === 'tcloaded' || tcData.eventStatus === 'useractioncomplete'));
};

/**
 * The consent state of one page: categories set by the site, GPC, the TC string.
 * `known()` is true once the visitor's choice is known from any of them (a stored
 * choice from an earlier page view counts; GPC alone does not: it only opts out).
 * `changed` runs after every change.
 */
export const consentState = (store, gpc, changed) => {
  let saved = store.get();
  let categories = isObject(saved) && isObject(saved.categories) ? saved.categories : null;
  let tcf = null;
  let gdprApplies;
  gpc = gpc === true;
  let known = () => {
    return categories !== null || tcf !== null;
  };
  return {
    known: known,
    set: (update) => {
      categories = mergeCategories(categories, update);
      store.set({ categories: categories });
      changed();
    },
    setTcf: (tcData) => {
      tcf = tcData.tcString;
      gdprApplies = tcData.gdprApplies;
      changed();
    },
    /** What goes into `context.consent` (Segment's `categoryPreferences` shape). */
    context: () => {
      let c = {};
      if (categories) c.categoryPreferences = mergeCategories(categories);
      if (gpc) c.gpc = true;
      if (tcf) {
        c.tcf = tcf;
        if (typeof gdprApplies === 'boolean') c.gdprApplies = gdprApplies;
      }
      if (!known()) c.pending = true;
      return c;
    },
    /** `analytics.consent.get()`: a copy, safe to keep. */
    get: () => {
      return { categories: mergeCategories(categories), gpc: gpc, tcf: tcf, known: known() };
    }
  };
};
