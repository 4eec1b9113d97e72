// The ES module build: `import { createAnalytics } from '…/collector.esm.js'`, then
// `const analytics = createAnalytics(window); analytics.load(writeKey, { apiHost })`.

export { createAnalytics, VERSION } from './analytics.js';
