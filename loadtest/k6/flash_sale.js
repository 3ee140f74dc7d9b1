// k6 flash-sale scenarios for seckill-gateway.
//
//   k6 run -e BASE_URL=http://127.0.0.1:8080 -e ITEM=hot -e SCENARIO=burst loadtest/k6/flash_sale.js
//
// SCENARIO=burst (default): one hot item; the arrival rate ramps from 0 to PEAK_RATE
//   iterations/s in RAMP, then holds for DURATION. One iteration = one shopper trying to
//   reserve QTY units, retrying up to RETRIES times on 429/503 (small sleep, honouring a short
//   Retry-After). Each attempt carries the same Idempotency-Key, so a retry can never buy twice.
// SCENARIO=steady: constant arrival RATE iterations/s for DURATION; each iteration browses the
//   item (GET), reserves, and pays the order it got (PAY_PCT percent of the time).
//
// Parameters (__ENV): BASE_URL (http://127.0.0.1:8080), ITEM (demo), USERS (user ids drawn at
//   random among u1..uUSERS; 0 = every iteration is a new user; default 50000), PEAK_RATE (2000),
//   RAMP (3s), DURATION (20s), RATE (steady, 500), PAY_PCT (steady, 50), RETRIES (3),
//   RETRY_SLEEP_MS (50), VUS (pre-allocated, 200), MAX_VUS (2000), P95_MS (50), P99_MS (100),
//   FAILED_RATE (0.01), QTY (units per reservation, body {"qty":QTY}; 1), STOCK (if set:
//   threshold ok count <= floor(STOCK / QTY), the most reservations the stock allows),
//   TOKEN (admin token: only used for the admin stats call in setup/teardown, sent as
//   Authorization: Bearer), SUMMARY (JSON summary path, default loadtest/out/k6-summary.json),
//   TIMEOUT (request timeout, 10s).
// Shoppers identify with the X-User-Id header (the gateway's trusted-proxy mode).
//
// No remote jslib import: this machine has no internet; the text summary is written here.

import http from 'k6/http';
import { sleep } from 'k6';
import { Counter } from 'k6/metrics';
import exec from 'k6/execution';

const E = __ENV;
const BASE_URL = (E.BASE_URL || 'http://127.0.0.1:8080').replace(/\/+$/, '');
const ITEM = E.ITEM || 'demo';
const USERS = parseInt(E.USERS || '50000', 10);
const PEAK_RATE = parseInt(E.PEAK_RATE || '2000', 10);
const RAMP = E.RAMP || '3s';
const DURATION = E.DURATION || '20s';
const RATE = parseInt(E.RATE || '500', 10);
const PAY_PCT = parseFloat(E.PAY_PCT || '50');
const RETRIES = parseInt(E.RETRIES || '3', 10);
const RETRY_SLEEP_MS = parseInt(E.RETRY_SLEEP_MS || '50', 10);
const VUS = parseInt(E.VUS || '200', 10);
const MAX_VUS = parseInt(E.MAX_VUS || '2000', 10);
const P95_MS = E.P95_MS || '50';
const P99_MS = E.P99_MS || '100';
const FAILED_RATE = E.FAILED_RATE || '0.01';
const SCENARIO = E.SCENARIO || 'burst';
const SUMMARY = E.SUMMARY || 'loadtest/out/k6-summary.json';
const TOKEN = E.TOKEN || '';
const TIMEOUT = E.TIMEOUT || '10s';
const QTY = parseInt(E.QTY || '1', 10);
if (!(QTY >= 1)) {
  throw new Error(`QTY must be a whole number >= 1, got ${E.QTY}`);
}
const RESERVE_BODY = JSON.stringify({ qty: QTY });

// 409 (limit_reached) and 410 (sold_out) are the expected "no"; 429 is expected under load
// and retried. 503 and anything else count in http_req_failed.
http.setResponseCallback(http.expectedStatuses(200, 409, 410, 429));

// One counter per answer (every attempt, retries included).
const ok = new Counter('ok');                       // 200 reserve
const soldOut = new Counter('sold_out');            // 410 sold_out
const limitReached = new Counter('limit_reached');  // 409 limit_reached
const rateLimited = new Counter('rate_limited');    // 429
const unavailable = new Counter('unavailable');     // 503
const other = new Counter('other');                 // anything else (must stay 0)
// Per shopper (iteration): gave up after RETRIES retries on 429/503.
const gaveUp = new Counter('gave_up');
// steady scenario only
const browsed = new Counter('browsed');             // 200 GET item
const paid = new Counter('paid');                   // 200 pay
const orderClosed = new Counter('order_closed');    // 409 order_closed on pay

const scenarios = {
  burst: {
    executor: 'ramping-arrival-rate',
    exec: 'burst',
    startRate: 0,
    timeUnit: '1s',
    preAllocatedVUs: VUS,
    maxVUs: MAX_VUS,
    stages: [
      { target: PEAK_RATE, duration: RAMP },
      { target: PEAK_RATE, duration: DURATION },
    ],
    gracefulStop: '30s',
  },
  steady: {
    executor: 'constant-arrival-rate',
    exec: 'steady',
    rate: RATE,
    timeUnit: '1s',
    duration: DURATION,
    preAllocatedVUs: VUS,
    maxVUs: MAX_VUS,
    gracefulStop: '30s',
  },
};
if (!scenarios[SCENARIO]) {
  throw new Error(`SCENARIO must be one of ${Object.keys(scenarios).join(', ')}, got ${SCENARIO}`);
}

const thresholds = {
  http_req_failed: [`rate<${FAILED_RATE}`],
  http_req_duration: [`p(95)<${P95_MS}`, `p(99)<${P99_MS}`],
  other: ['count==0'],
};
if (E.STOCK !== undefined && E.STOCK !== '') {
  // Each 200 is one reservation of QTY units.
  thresholds.ok = [`count<=${Math.floor(parseInt(E.STOCK, 10) / QTY)}`];
}

export const options = {
  scenarios: { [SCENARIO]: scenarios[SCENARIO] },
  thresholds,
  summaryTrendStats: ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'],
  discardResponseBodies: false,
  noConnectionReuse: false,
};

function adminStats() {
  if (!TOKEN) return null;
  const r = http.get(`${BASE_URL}/admin/v1/items/${ITEM}/stats`, {
    headers: { Authorization: `Bearer ${TOKEN}` },
    tags: { name: 'admin_stats' },
    responseCallback: http.expectedStatuses(200),
  });
  if (r.status !== 200) {
    console.warn(`admin stats: HTTP ${r.status} ${r.body}`);
    return { status: r.status };
  }
  try { return JSON.parse(r.body); } catch (_) { return { body: r.body }; }
}

export function setup() {
  return { nonce: Date.now().toString(36), stats_before: adminStats() };
}

export function teardown(data) {
  const after = adminStats();
  if (after) console.log(`admin stats after run: ${JSON.stringify(after)}`);
}

function userId(data) {
  if (USERS > 0) return `u${1 + Math.floor(Math.random() * USERS)}`;
  return `k${data.nonce}-${exec.scenario.iterationInTest}`;
}

function errorCode(res) {
  try {
    const j = JSON.parse(res.body);
    return j && j.error ? j.error : '';
  } catch (_) {
    return '';
  }
}

function retryDelaySeconds(res) {
  const ra = parseFloat(res.headers['Retry-After'] || '');
  const base = RETRY_SLEEP_MS / 1000;
  // Honour Retry-After but keep the burst short: never wait more than 1 s per retry.
  const d = isNaN(ra) ? base : Math.min(Math.max(ra, base), 1);
  return d * (0.5 + Math.random()); // jitter
}

// One reserve attempt with retries. Returns the final response.
function reserve(uid, idemKey) {
  const params = {
    headers: {
      'Content-Type': 'application/json',
      'X-User-Id': uid,
      'Idempotency-Key': idemKey,
    },
    tags: { name: 'reserve' },
    timeout: TIMEOUT,
  };
  const url = `${BASE_URL}/api/v1/items/${ITEM}/reserve`;
  let res;
  for (let attempt = 0; attempt <= RETRIES; attempt++) {
    res = http.post(url, RESERVE_BODY, params);
    const code = res.status === 200 ? '' : errorCode(res);
    if (res.status === 200) { ok.add(1); return res; }
    if (res.status === 410 && code === 'sold_out') { soldOut.add(1); return res; }
    if (res.status === 409 && code === 'limit_reached') { limitReached.add(1); return res; }
    if (res.status === 429) rateLimited.add(1);
    else if (res.status === 503) unavailable.add(1);
    else { other.add(1, { status: String(res.status), code }); return res; }
    if (attempt < RETRIES) sleep(retryDelaySeconds(res));
  }
  gaveUp.add(1);
  return res;
}

export function burst(data) {
  const uid = userId(data);
  reserve(uid, `b${data.nonce}-${exec.scenario.iterationInTest}`);
}

export function steady(data) {
  const uid = userId(data);
  const g = http.get(`${BASE_URL}/api/v1/items/${ITEM}`, {
    headers: { 'X-User-Id': uid }, tags: { name: 'item' }, timeout: TIMEOUT,
  });
  if (g.status === 200) browsed.add(1);
  else other.add(1, { status: String(g.status), code: errorCode(g) });

  const r = reserve(uid, `s${data.nonce}-${exec.scenario.iterationInTest}`);
  if (r.status !== 200 || Math.random() * 100 >= PAY_PCT) return;
  let orderId = '';
  try { orderId = JSON.parse(r.body).order_id || ''; } catch (_) { orderId = ''; }
  if (!orderId) { other.add(1, { status: '200', code: 'no_order_id' }); return; }
  const p = http.post(`${BASE_URL}/api/v1/orders/${orderId}/pay`, '{}', {
    headers: { 'Content-Type': 'application/json', 'X-User-Id': uid },
    tags: { name: 'pay' }, timeout: TIMEOUT,
  });
  const code = p.status === 200 ? '' : errorCode(p);
  if (p.status === 200) paid.add(1);
  else if (p.status === 409 && code === 'order_closed') orderClosed.add(1);
  else other.add(1, { status: String(p.status), code });
}

// ---- summary (own minimal text summary: the k6 jslib is fetched at run time, not here) ----

function fmtNum(v) {
  if (typeof v !== 'number') return String(v);
  if (Number.isInteger(v)) return String(v);
  return v.toFixed(Math.abs(v) >= 100 ? 1 : 3);
}

function fmtMetric(name, m) {
  const v = m.values || {};
  if (m.type === 'trend') {
    const keys = ['avg', 'min', 'med', 'max', 'p(90)', 'p(95)', 'p(99)'].filter((k) => k in v);
    return keys.map((k) => `${k}=${fmtNum(v[k])}${m.contains === 'time' ? 'ms' : ''}`).join(' ');
  }
  if (m.type === 'counter') return `${fmtNum(v.count)} (${fmtNum(v.rate)}/s)`;
  if (m.type === 'rate') return `${(100 * (v.rate || 0)).toFixed(2)}% (${v.passes} of ${v.passes + v.fails})`;
  if (m.type === 'gauge') return `${fmtNum(v.value)} (min ${fmtNum(v.min)}, max ${fmtNum(v.max)})`;
  return JSON.stringify(v);
}

function textSummary(data) {
  const lines = [];
  lines.push(`scenario ${SCENARIO} against ${BASE_URL}, item ${ITEM}, qty ${QTY}`);
  const names = Object.keys(data.metrics).sort();
  const width = names.reduce((w, n) => Math.max(w, n.length), 0);
  for (const name of names) {
    const m = data.metrics[name];
    let mark = '  ';
    if (m.thresholds) {
      mark = Object.values(m.thresholds).every((t) => t.ok) ? 'ok' : 'XX';
    }
    lines.push(`${mark} ${name.padEnd(width)}  ${fmtMetric(name, m)}`);
    if (m.thresholds) {
      for (const [expr, t] of Object.entries(m.thresholds)) {
        lines.push(`     ${' '.repeat(width)}  threshold ${expr}: ${t.ok ? 'met' : 'FAILED'}`);
      }
    }
  }
  const failed = names.filter((n) => data.metrics[n].thresholds
    && Object.values(data.metrics[n].thresholds).some((t) => !t.ok));
  lines.push(failed.length ? `THRESHOLDS FAILED: ${failed.join(', ')}` : 'all thresholds met');
  return lines.join('\n') + '\n';
}

export function handleSummary(data) {
  return {
    stdout: textSummary(data),
    [SUMMARY]: JSON.stringify(data, null, 2),
  };
}
