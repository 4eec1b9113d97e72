// When to try again after a failed delivery.

/**
 * Exponential backoff with full jitter: a random delay in [base·2^n / 2, base·2^n],
 * capped. `random` is Math.random (injectable for tests).
 */
export const backoff = (attempt, base, cap, random) => {
  let max = Math.min(cap, base * Math.pow(2, Math.max(0, attempt - 1)));
  return Math.round(max / 2 + (random() * max) / 2);
};

/**
 * A `Retry-After` header value (delta seconds or an HTTP date) in milliseconds from
 * `now`; undefined when absent or unreadable. Never negative, never above `cap`.
 */
export const retryAfter = (value, now, cap) => {
  if (value == null || value === '') return undefined;
  let ms = isNaN(+value) ? Date.parse(value) - now : +value * 1000;
  if (isNaN(ms)) return undefined;
  return Math.min(cap, Math.max(0, ms));
};

/**
 * What a response status means for the events in the request:
 * 'ok' delivered; 'retry' try again later (network error = status 0, 408, 425, 429,
 * 5xx, and 401/403, which are the site's configuration, not the events' fault);
 * 'rejected' the edge refused the events themselves: never retried.
 */
export const classify = (status) => {
  return status >= 200 && status < 300 ? 'ok'
    : status > 499 || [0, 401, 403, 408, 425, 429].indexOf(status) >= 0 ? 'retry' : 'rejected';
};
