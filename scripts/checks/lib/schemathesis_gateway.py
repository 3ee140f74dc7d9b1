"""Helpers of scripts/checks/schemathesis, against the gateway at SECKILL_SCHEMA_URL.

  seed                           create the sale items the positive cases reserve
  summary MODE REPORT_DIR N OUT  test cases per operation of docs/openapi.json and phase (from
                                 schemathesis's NDJSON reports; each operation must reach N),
                                 and the gateway's answers per route and outcome (its own
                                 /metrics); a one-line total into the file OUT; exit 1 when an
                                 operation fell short
"""

import collections
import glob
import json
import os
import re
import sys
import urllib.error
import urllib.request

URL = os.environ["SECKILL_SCHEMA_URL"]
ADMIN = {"Authorization": "Bearer " + os.environ["SECKILL_SCHEMA_ADMIN_TOKEN"]}

# The document's example item ids (the examples phase uses them): `phone-x1` of the shopper
# routes, on sale for the whole run with stock and a per-user limit no run can exhaust, and
# `phone-x2` of the operator's, which the examples redefine and pause; and an
# item of 4 stock buckets (contract: "PUT item rules"; the embedded engine sells it as one).
ITEM = {
    "name": "Phone X1",
    "price_cents": 99900,
    "stock": 1_000_000_000,
    "per_user_limit": 1_000_000,
    "starts_at": "2020-01-01T00:00:00Z",
    "ends_at": "2100-01-01T00:00:00Z",
}
ITEMS = {"phone-x1": ITEM, "phone-x2": ITEM, "phone-x1-b4": {**ITEM, "buckets": 4}}
# The shopper routes' items, kept as seeded for the whole run (lib/schemathesis_hooks.py).
KEPT = ("phone-x1", "phone-x1-b4")


def call(method, path, body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(URL + path, data=data, method=method, headers={**(headers or {})})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def seed():
    for item_id, spec in ITEMS.items():
        status, body = call("PUT", f"/admin/v1/items/{item_id}", spec, ADMIN)
        if status != 200:
            sys.exit(f"PUT /admin/v1/items/{item_id}: {status} {body!r}")
        print(f"schemathesis: seeded {item_id}: {body.decode()}")


PHASES = ("examples", "coverage", "fuzzing", "stateful")


def cases_per_operation(report_dir):
    """Test cases schemathesis sent per operation and phase (its NDJSON reports, every run)."""
    counts = collections.defaultdict(collections.Counter)
    for path in glob.glob(os.path.join(report_dir, "**", "*.ndjson"), recursive=True):
        with open(path) as f:
            for line in f:
                finished = json.loads(line).get("ScenarioFinished")
                if not isinstance(finished, dict):
                    continue
                for case in ((finished.get("recorder") or {}).get("cases") or {}).values():
                    value = case.get("value") or {}
                    phase = ((value.get("meta") or {}).get("phase") or {}).get("name", "?")
                    counts[f"{value.get('method', '?').upper()} {value.get('path', '?')}"][phase] += 1
    return counts


def summary(mode, report_dir, minimum, cases_file):
    ok = True
    counts = cases_per_operation(report_dir)
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "../../../docs/openapi.json")) as f:
        operations = [f"{m.upper()} {p}" for p, item in json.load(f)["paths"].items() for m in item]
    print(f"schemathesis: {mode}: test cases per operation and phase (at least {minimum} each)")
    print("   total  " + "  ".join(f"{p:>9}" for p in PHASES) + "  operation")
    for op in operations:
        n = sum(counts[op].values())
        short = "" if n >= minimum else f"   FAIL: fewer than {minimum}"
        ok &= n >= minimum
        print(f"  {n:6d}  " + "  ".join(f"{counts[op][p]:9d}" for p in PHASES) + f"  {op}{short}")
    total = collections.Counter()
    for op in operations:
        total.update(counts[op])
    print(f"  {sum(total.values()):6d}  " + "  ".join(f"{total[p]:9d}" for p in PHASES) + "  all")
    fewest = min(sum(counts[op].values()) for op in operations)
    with open(cases_file, "w") as f:
        f.write(f"{sum(total.values())} test cases, {len(operations)} operations, at least {fewest} each")
    status, text = call("GET", "/metrics")
    answers = collections.defaultdict(collections.Counter)
    for line in text.decode().splitlines():
        m = re.match(r'seckill_requests_total\{([^}]*)\} (\S+)', line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        answers[labels.get("route", "?")][labels.get("outcome", "?")] += int(float(m.group(2)))
    print(f"schemathesis: {mode}: the gateway's answers per route (seckill_requests_total)")
    for route, outcomes in sorted(answers.items()):
        total = sum(outcomes.values())
        parts = ", ".join(f"{o} {n}" for o, n in outcomes.most_common())
        print(f"  {total:6d}  {route}: {parts}")
    return ok


if __name__ == "__main__":
    if sys.argv[1] == "seed":
        seed()
    elif sys.argv[1] == "summary":
        sys.exit(0 if summary(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]) else 1)
    else:
        sys.exit(__doc__)
