// Sends one call of each type with Segment's own, unmodified @segment/analytics-node,
// pointed at a local edge. Usage: node segment-analytics-node.mjs <host> <writeKey>
import { Analytics } from '@segment/analytics-node';

const [host, writeKey] = process.argv.slice(2);
const analytics = new Analytics({ writeKey, host, flushAt: 3, maxRetries: 3 });
const errors = [];
analytics.on('error', (err) => errors.push(String(err && (err.reason || err.message || err))));

analytics.identify({ userId: 'compat-user', traits: { plan: 'enterprise', email: 'dev@example.com' } });
analytics.track({ userId: 'compat-user', event: 'Compat Track', properties: { revenue: 42.5, currency: 'EUR' } });
analytics.page({ anonymousId: 'compat-anon', category: 'Docs', name: 'Getting Started', properties: { path: '/docs' } });
analytics.group({ userId: 'compat-user', groupId: 'compat-group', traits: { employees: 12 } });
analytics.alias({ userId: 'compat-user', previousId: 'compat-anon' });
analytics.screen({ userId: 'compat-user', name: 'Settings', properties: { tab: 'billing' } });

await analytics.closeAndFlush({ timeout: 20000 });
if (errors.length) {
  console.error(JSON.stringify(errors));
  process.exit(1);
}
console.log('sent 6');
