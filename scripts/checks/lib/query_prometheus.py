#!/usr/bin/env python3
"""Send every dashboard / variable / alert expression (deploy/grafana/exprs.py) to a running
Prometheus through its HTTP API and check the answers.

    query_prometheus.py --url http://127.0.0.1:9090                 # every expression parses and evaluates
    query_prometheus.py --url ... --require-data dashboard variables # ... and returns at least one series
    query_prometheus.py --url ... --rules deploy/prometheus/alerts.yml   # Prometheus loaded and evaluated every rule

Expressions are POSTed to /api/v1/query; a status other than "success" (a parse or evaluation
error) is a failure. With --require-data the kinds named must also return a non-empty result
(meant for a Prometheus scraping a live gateway under load; alerts are not in that list, they
only return data while firing). Options after the kinds are passed to exprs.py's substitution
(--job, --instance, --rate-interval, --range). Exit 1 on any failure. Standard library only.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.dont_write_bytecode = True  # no __pycache__ in deploy/grafana
sys.path.insert(0, os.path.join(ROOT, "deploy", "grafana"))
import exprs  # noqa: E402


def api(url, path, form=None, timeout=10):
    data = urllib.parse.urlencode(form).encode() if form is not None else None
    req = urllib.request.Request(url.rstrip("/") + path, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # 400/422 carry a JSON error body
        try:
            return json.load(e)
        except ValueError:
            return {"status": "error", "errorType": f"http {e.code}", "error": e.reason}


def check_rules(url, alerts_path, wait_s, problems):
    """Every rule of alerts.yml is loaded by Prometheus and has been evaluated without error."""
    expected = {q.source for q in exprs.alert_queries(alerts_path)}
    deadline = time.time() + wait_s
    while True:
        body = api(url, "/api/v1/rules")
        rules = [r for g in body.get("data", {}).get("groups", []) for r in g.get("rules", [])]
        loaded = {r.get("name") for r in rules}
        evaluated = all(r.get("health") in ("ok", "err") for r in rules)
        if (loaded >= expected and evaluated) or time.time() > deadline:
            break
        time.sleep(0.5)
    for name in sorted(expected - loaded):
        problems.append(f"rule {name}: not loaded by Prometheus")
    for r in rules:
        if r.get("health") != "ok":
            problems.append(f"rule {r.get('name')}: health {r.get('health')!r} {r.get('lastError', '')}")
    return len(rules)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kinds", nargs="*", default=["all"], help="dashboard, variables, alerts or all (default)")
    ap.add_argument("--url", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    ap.add_argument("--require-data", nargs="*", default=[], metavar="KIND",
                    help="kinds whose queries must return at least one series (dashboard, variables)")
    ap.add_argument("--rules", metavar="ALERTS_YML", help="also check /api/v1/rules has every rule of this file, evaluated, health ok")
    ap.add_argument("--rules-wait", type=float, default=20, help="seconds to wait for the first rule evaluation (default 20)")
    ap.add_argument("--dashboard", default=exprs.DEFAULT_DASHBOARD)
    ap.add_argument("--alerts", default=exprs.DEFAULT_ALERTS)
    ap.add_argument("--job", default="seckill")
    ap.add_argument("--instance", default=".+")
    ap.add_argument("--rate-interval", default="1m")
    ap.add_argument("--range", dest="range_", default="5m")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every expression and its result size")
    args = ap.parse_args()

    kinds = []
    for k in args.kinds:
        kinds += list(exprs.KINDS) if k == "all" else [k]
    require = {"variables" if k == "variable" else k for k in args.require_data}
    values = exprs.default_values(args.job, args.instance, args.rate_interval, "15s", args.range_)
    problems = []
    counts = {}
    for q in exprs.queries(kinds, values, args.dashboard, args.alerts):
        body = api(args.url, "/api/v1/query", {"query": q.expr})
        kind = {"variable": "variables", "dashboard": "dashboard"}.get(q.kind, "alerts")
        counts[kind] = counts.get(kind, 0) + 1
        where = f"{q.kind} {q.source!r} {q.ref}"
        if body.get("status") != "success":
            problems.append(f"{where}: {body.get('errorType')}: {body.get('error')}\n      {q.expr}")
            continue
        n = len(body["data"]["result"]) if isinstance(body["data"]["result"], list) else 1
        if args.verbose:
            print(f"  {n:4d} series  {where}: {q.expr}")
        if kind in require and n == 0:
            problems.append(f"{where}: no data\n      {q.expr}")
    n_rules = check_rules(args.url, args.rules, args.rules_wait, problems) if args.rules else None

    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    if problems:
        for p in problems:
            print(f"  FAIL {p}")
        print(f"promql: {len(problems)} failure(s) out of {summary}")
        return 1
    msg = f"promql: OK: {summary} expressions evaluated with status success"
    if require:
        msg += f"; every {'/'.join(sorted(require))} query returned data"
    if n_rules is not None:
        msg += f"; {n_rules} rules loaded and evaluated with health ok"
    print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
