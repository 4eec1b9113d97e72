// Bundles unmodified third-party browser SDKs for the compatibility tests into
// tests/browser/pages/gen/ (not committed): Segment's own analytics-next, exactly as
// published on npm (pinned in package-lock.json), exposed as window.AnalyticsBrowser.
import { build } from 'esbuild';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
await build({
  stdin: {
    contents: "import { AnalyticsBrowser } from '@segment/analytics-next'; window.AnalyticsBrowser = AnalyticsBrowser;",
    resolveDir: here,
    loader: 'js'
  },
  bundle: true,
  format: 'iife',
  target: 'es2020',
  outfile: join(here, 'pages/gen/analytics-next.js'),
  logLevel: 'warning'
});
