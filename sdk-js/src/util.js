// Small helpers shared by the SDK modules. No browser globals here: everything that
// touches the page comes in through an `env` object, so Node's test runner can drive it.

/** A random UUID v4 (crypto.randomUUID where available: it needs a secure context). */
export function uuid(crypto) {
  return crypto.randomUUID
    ? crypto.randomUUID()
    : '10000000-1000-4000-8000-100000000000'.replace(/[018]/g, (c) =>
      (c ^ (crypto.getRandomValues(new Uint8Array(1))[0] & (15 >> (c / 4)))).toString(16)
    );
}

export function isObject(v) {
  return v !== null && typeof v === 'object' && !Array.isArray(v);
}

/** Deep merge of plain objects (arrays and other values are replaced). */
export function merge(target, source) {
  if (!isObject(source)) return target;
  for (let k in source) {
    if (!Object.prototype.hasOwnProperty.call(source, k)) continue;
    let v = source[k];
    target[k] = isObject(v) && isObject(target[k]) ? merge(target[k], v) : v;
  }
  return target;
}

/** A Date, a date string or a number as an ISO 8601 string; undefined if invalid. */
export function isoTime(v) {
  if (v == null) return undefined;
  let d = v instanceof Date ? v : new Date(v);
  return isNaN(d.getTime()) ? undefined : d.toISOString();
}

/** UTF-8 length of a string (what the edge's size limits count). */
export function byteLength(s) {
  return new TextEncoder().encode(s).length;
}

/** `v` if it is a plain object, else a new empty one. */
export function obj(v) {
  return isObject(v) ? v : {};
}
