// Builds the SDK with esbuild and checks its size budget.
//
//   node sdk-js/build.mjs          build into sdk-js/dist/, print sizes, fail over budget
//
// Outputs:
//   dist/edge/sdk/v1/collector.js  the IIFE the snippet loads (served by the Worker as a
//                                  static asset, see wrangler.toml [assets])
//   dist/edge/_headers             its Cache-Control
//   dist/collector.esm.js          the ES module build
//   dist/snippet.min.js            the snippet to paste
//   dist/sizes.json                bytes raw / gzip, and the budgets
import { build, transform } from 'esbuild';
import { gzipSync } from 'node:zlib';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const here = dirname(fileURLToPath(import.meta.url));
const dist = join(here, 'dist');
export const BUDGET = { sdkGzip: 5 * 1024, snippetMin: 1024 };

// Private members (`_name`) are renamed; `__tcfapi` and the snippet's `_writeKey`/`_loadOptions` are not.
const common = {
  bundle: true,
  minify: true,
  target: 'es2020',
  legalComments: 'none',
  write: false,
  mangleProps: /^_/,
  reserveProps: /^__|^_(writeKey|loadOptions)$/
};
const iife = await build({ ...common, entryPoints: [join(here, 'src/browser.js')], format: 'iife' });
const esm = await build({ ...common, entryPoints: [join(here, 'src/index.js')], format: 'esm' });
const snippet = await transform(readFileSync(join(here, 'snippet/snippet.js'), 'utf8'), {
  minify: true,
  target: 'es5',
  legalComments: 'none'
});

const out = (rel, text) => {
  const p = join(dist, rel);
  mkdirSync(dirname(p), { recursive: true });
  writeFileSync(p, text);
  return text;
};
const sdk = out('edge/sdk/v1/collector.js', iife.outputFiles[0].text);
// Workers static assets read `_headers`. Browsers may use the SDK for an hour without
// asking, and up to a week longer while they fetch a fresh copy in the background: so a
// page still loads the SDK (which keeps its events until the edge is back) when the edge
// is unreachable, and a new SDK version reaches every browser within about an hour.
out('edge/_headers', '/sdk/v1/*\n  Cache-Control: public, max-age=3600, stale-while-revalidate=604800\n');
const mod = out('collector.esm.js', esm.outputFiles[0].text);
const snip = out('snippet.min.js', snippet.code.trim() + '\n');

const gz = (s) => gzipSync(Buffer.from(s), { level: 9 }).length;
const sizes = {
  sdk: { raw: Buffer.byteLength(sdk), gzip: gz(sdk) },
  esm: { raw: Buffer.byteLength(mod), gzip: gz(mod) },
  snippet: { raw: Buffer.byteLength(snip.trim()), gzip: gz(snip) },
  budget: BUDGET
};
out('sizes.json', JSON.stringify(sizes, null, 2) + '\n');
console.log(
  `sdk-js: collector.js ${sizes.sdk.raw} B, ${sizes.sdk.gzip} B gzip (budget ${BUDGET.sdkGzip}); ` +
    `esm ${sizes.esm.gzip} B gzip; snippet ${sizes.snippet.raw} B minified (budget ${BUDGET.snippetMin})`
);
const over = [];
if (sizes.sdk.gzip > BUDGET.sdkGzip) over.push(`SDK is ${sizes.sdk.gzip} B gzip, budget ${BUDGET.sdkGzip}`);
if (sizes.snippet.raw > BUDGET.snippetMin) over.push(`snippet is ${sizes.snippet.raw} B, budget ${BUDGET.snippetMin}`);
if (over.length) {
  console.error('sdk-js: over the size budget: ' + over.join('; '));
  process.exit(1);
}
