// Small helpers shared by the SDK modules. No browser globals here: everything that
// touches the page comes in through an `env` object, so Node's test runner can drive it.

/** A random UUID v4 (crypto.randomUUID where available: it needs a secure context). */
export const uuid = (crypto) => {
  return crypto.randomUUID
    ? crypto.randomUUID()
    : '10000000-1000-4000-8000-100000000000'.replace(/[018]/g, (c) =>
      (c ^ (crypto.getRandomValues(new Uint8Array(1))[0] & (15 >> (c / 4)))).toString(16)
    );
};

export const isObject = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

/** Deep merge of plain objects (arrays and other values are replaced). */
export const merge = (target, source) => {
  if (isObject(source)) {
    for (const k in source) {
      const v = source[k];
      target[k] = isObject(v) && isObject(target[k]) ? merge(target[k], v) : v;
    }
  }
  return target;
};

/** A Date, a date string or a number as an ISO 8601 string; undefined if invalid. */
export const isoTime = (v) => {
  const d = new Date(v);
  return v == null || isNaN(d) ? undefined : d.toISOString();
};

/** UTF-8 length of a string (what the edge's size limits count). */
export const byteLength = (s) => new TextEncoder().encode(s).length;

/** `v` if it is a plain object, else a new empty one. */
export const obj = (v) => (isObject(v) ? v : {});
