// Writes dashboard.ts: the dashboard JSON as a TypeScript object literal typed with Grafana's
// dashboard schema, for `tsc --noEmit`. (Importing the .json with resolveJsonModule would widen
// every string to `string`, so enum-valued fields could not be checked, and excess-property
// checks only apply to object literals.)
//
//   node gen-dashboard-ts.mjs <dashboard.json> <out-dir>
import { readFileSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

const [src, outDir] = process.argv.slice(2);
if (!src || !outDir) {
  console.error('usage: node gen-dashboard-ts.mjs <dashboard.json> <out-dir>');
  process.exit(2);
}
const text = readFileSync(src, 'utf8');
JSON.parse(text); // fail early, with the JSON parser's message, on invalid JSON

// The JSON text is kept byte for byte, so tsc's line numbers map to the JSON file: line N of
// the JSON is line N + HEADER_LINES of dashboard.ts.
const header = [
  `// generated from ${resolve(src)} by gen-dashboard-ts.mjs; do not edit`,
  "import type { GrafanaDashboardJson, SeckillDashboardJson } from './seckill-types.js';",
  '// Grafana dashboard with the timeseries/stat panel options and Prometheus targets typed:',
  'export const dashboard: SeckillDashboardJson =',
];
const footer = [
  ';',
  "// and the same object is a plain Grafana Dashboard (no narrowing above hides a mismatch):",
  'export const grafana: GrafanaDashboardJson = dashboard;',
  '',
];
writeFileSync(join(outDir, 'dashboard.ts'), header.join('\n') + '\n' + text.trimEnd() + '\n' + footer.join('\n'));
console.log(`HEADER_LINES=${header.length}`);
