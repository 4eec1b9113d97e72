// Where the SDK keeps state between page views: first-party cookies and localStorage,
// with analytics.js's names and encodings so sites that migrate keep their visitors' ids.
//
// analytics.js writes ids raw in cookies (older versions JSON-quoted them, `%22id%22`)
// and JSON-encoded in localStorage; both forms are read.

let YEAR_S = 31536000;

/** Reads a value stored raw or JSON-encoded (quoted strings lose their quotes). */
export const decode = (raw) => {
  try {
    return JSON.parse(raw) ?? null;
  } catch {
    return raw || null;
  }
};

export const cookieGet = (doc, name) => {
  try {
    const m = doc.cookie.match('(?:^|;) ?' + name + '=([^;]*)');
    return m && decode(decodeURIComponent(m[1]));
  } catch {
    return null; // cookies blocked, or a malformed escape
  }
};

/** Sets (or with `value === null`, removes) a cookie. */
export const cookieSet = (doc, name, value, opts) => {
  opts = opts || {};
  let v = value === null ? '' : typeof value === 'string' ? value : JSON.stringify(value);
  let c = name + '=' + encodeURIComponent(v) + '; path=/' +
    '; max-age=' + (value === null ? 0 : opts.maxage != null ? opts.maxage : YEAR_S) +
    '; SameSite=' + (opts.sameSite || 'Lax');
  if (opts.domain) c += '; domain=' + opts.domain;
  if (opts.secure) c += '; Secure';
  try {
    doc.cookie = c;
  } catch {
    /* cookies blocked */
  }
};

/**
 * The widest domain a cookie can be set on (`shop.example.co.uk` → `example.co.uk`),
 * found as analytics.js does: by trying to set a test cookie on each parent domain,
 * widest first. Hosts without dots (localhost) and IP addresses get host-only cookies.
 */
export const topDomain = (doc, hostname) => {
  if (!hostname || hostname.indexOf('.') < 0 || /^[\d.]+$|:/.test(hostname)) return undefined;
  let labels = hostname.split('.');
  for (let i = labels.length - 2; i >= 0; i--) {
    let d = labels.slice(i).join('.');
    cookieSet(doc, '__ec_tld', '1', { domain: d, maxage: 60 });
    if (cookieGet(doc, '__ec_tld') != null) {
      cookieSet(doc, '__ec_tld', null, { domain: d });
      return d;
    }
  }
  return undefined;
};

// `env.localStorage` itself throws where storage is blocked, hence the try around it.
export const lsGet = (env, key) => {
  try {
    return decode(env.localStorage.getItem(key));
  } catch {
    return null;
  }
};

/** Writes JSON (or removes the key for null); false when storage refused it. */
export const lsSet = (env, key, value) => {
  try {
    const ls = env.localStorage;
    if (value === null) ls.removeItem(key);
    else ls.setItem(key, JSON.stringify(value));
    return true;
  } catch {
    return false;
  }
};

/**
 * One persisted value, kept in a cookie and localStorage (either may be blocked):
 * read from the cookie first, then localStorage; written to both.
 */
export const persisted = (env, key, cookieOpts, useCookie) => {
  return {
    get: () => {
      let v = useCookie ? cookieGet(env.document, key) : null;
      return v != null ? v : lsGet(env, key);
    },
    set: (v) => {
      if (useCookie) cookieSet(env.document, key, v, cookieOpts);
      lsSet(env, key, v);
    }
  };
};
