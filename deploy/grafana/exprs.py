#!/usr/bin/env python3
"""Print the PromQL of the Grafana dashboard and of the alert rules, ready to send to Prometheus.

Dashboard expressions get Grafana's variables substituted ($job, $instance, $datasource-free),
and its built-ins ($__rate_interval, $__interval, $__range, ...) replaced by fixed durations,
so each line is a plain PromQL query for /api/v1/query. Template variable queries
(label_values(metric{...}, label)) are printed as the series selector Grafana asks Prometheus
about. Alert rule expressions are printed as they are.

    deploy/grafana/exprs.py                      # everything, one expression per line
    deploy/grafana/exprs.py dashboard variables  # only some kinds
    deploy/grafana/exprs.py --json all           # with where each expression comes from
    deploy/grafana/exprs.py --job seckill --instance '.+' --rate-interval 30s --range 5m

Used by scripts/checks/promql-parse (every expression parses on a real Prometheus) and meant
for the integration test that scrapes a live gateway (every dashboard query returns data).
Importable too: `queries(kinds, values)` returns a list of Query.

Also holds CONTRACT_METRICS, the metric names and label values of the contract
(docs/contract.md, "Metrics"), which the dashboard lint checks every expression against.
"""

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_DASHBOARD = os.path.join(HERE, "seckill.json")
DEFAULT_ALERTS = os.path.join(HERE, "..", "prometheus", "alerts.yml")

ROUTES = {"item_get", "reserve", "pay", "cancel", "order_get", "orders_list", "admin_item_put",
          "admin_stats", "admin_orders_csv", "admin_item_pause", "admin_item_resume",
          "admin_pause_all", "admin_resume_all", "admin_limits", "admin_refund", "payment_webhook",
          "admin_sales_csv", "admin_sales_xlsx", "openapi", "metrics", "healthz", "readyz", "not_found"}
OUTCOMES = {"ok", "bad_request", "unauthenticated", "forbidden", "unknown_item", "unknown_order",
            "limit_reached", "order_closed", "sold_out", "not_started", "ended",
            "payload_too_large", "rate_limited", "paused", "unavailable", "bad_signature", "amount_mismatch", "internal",
            # route-level refusals outside the design's table (docs/contract.md: deviations)
            "not_found", "method_not_allowed"}
SCRIPTS = {"reserve", "pay", "cancel", "expire", "put_item", "pause", "transfer_out", "transfer_in", "transfer_forget",
           "settle", "refund"}
REDIS_ERROR_KINDS = {"timeout", "connection", "script", "circuit_open", "shed", "not_replicated", "fenced", "in_transit"}
CACHES = {"item", "sold_out", "not_found", "bloom"}
CACHE_RESULTS = {"hit", "miss"}
ORDER_EVENTS = {"reserved", "paid", "cancelled", "expired", "refund_due", "refunded"}

# metric name -> {label: allowed values, or None for free-form values}. Histograms are listed
# by their base name; their _bucket/_sum/_count series are accepted (with `le` on _bucket).
CONTRACT_METRICS = {
    "seckill_requests_total": {"route": ROUTES, "outcome": OUTCOMES},
    "seckill_request_duration_seconds": {"route": ROUTES},
    "seckill_redis_script_duration_seconds": {"script": SCRIPTS},
    "seckill_redis_errors_total": {"kind": REDIS_ERROR_KINDS},
    "seckill_cache_requests_total": {"cache": CACHES, "result": CACHE_RESULTS},
    "seckill_orders_total": {"event": ORDER_EVENTS},
    "seckill_persist_batch_size": {},
    "seckill_persist_lag_seconds": {},
    "seckill_stream_pending": {},
    "seckill_dead_letters_total": {},
    "seckill_refund_due_total": {},
    "seckill_stock_remaining": {"item": None},
    "seckill_stock_configured": {"item": None},
    "seckill_circuit_open": {"shard": None},
    "seckill_store_up": {},
    "seckill_redis_fenced": {"shard": None},
    "seckill_redis_repairs_total": {},
    "seckill_rate_limit": {"kind": {"global", "global_share", "per_user", "per_ip"}},
    "up": {},  # Prometheus' own per-target series
}
HISTOGRAMS = {"seckill_request_duration_seconds", "seckill_redis_script_duration_seconds",
              "seckill_persist_batch_size"}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every scraped series


def contract_labels(metric):
    """Labels a series of `metric` may carry, or None if the name is not in the contract."""
    base = metric
    extra = set()
    for suffix in ("_bucket", "_sum", "_count"):
        if metric.endswith(suffix) and metric[: -len(suffix)] in HISTOGRAMS:
            base = metric[: -len(suffix)]
            if suffix == "_bucket":
                extra = {"le"}
    if base in HISTOGRAMS and base == metric:
        return None  # a histogram is only queried through its _bucket/_sum/_count series
    if base not in CONTRACT_METRICS:
        return None
    return dict(CONTRACT_METRICS[base], **{label: None for label in extra | TARGET_LABELS})


@dataclass
class Query:
    kind: str     # "dashboard", "variable" or "alert"
    source: str   # panel title / variable name / alert name
    ref: str      # target refId, "query" or "expr"
    expr: str     # PromQL, variables substituted, on one line
    raw: str      # as written in the file


def one_line(expr):
    return " ".join(expr.split())


_VAR = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::[^\]]*)?\]\]|\$(\w+)")


def substitute(expr, values):
    """Replace Grafana variables ($x, ${x}, ${x:fmt}, [[x]]); unknown variables are an error."""
    def repl(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name not in values:
            raise KeyError(f"unknown Grafana variable ${name} in: {expr}")
        return values[name]
    return _VAR.sub(repl, expr)


def default_values(job="seckill", instance=".+", rate_interval="1m", interval="15s", range_="5m"):
    seconds = duration_seconds(range_)
    return {
        "job": job, "instance": instance, "datasource": "prometheus",
        "__rate_interval": rate_interval, "__interval": interval,
        "__interval_ms": str(int(duration_seconds(interval) * 1000)),
        "__range": range_, "__range_s": str(int(seconds)), "__range_ms": str(int(seconds * 1000)),
    }


def duration_seconds(d):
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    total, pos = 0.0, 0
    for m in re.finditer(r"(\d+)(ms|s|m|h|d|w|y)", d):
        if m.start() != pos:
            break
        total += int(m.group(1)) * units[m.group(2)]
        pos = m.end()
    if pos != len(d) or not d:
        raise ValueError(f"not a Prometheus duration: {d!r}")
    return total


def load_dashboard(path=DEFAULT_DASHBOARD):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def iter_panels(dashboard):
    """Every panel, including those nested in collapsed rows."""
    for p in dashboard.get("panels", []):
        yield p
        for child in p.get("panels", []) or []:
            yield child


def dashboard_queries(dashboard, values):
    out = []
    for p in iter_panels(dashboard):
        for t in p.get("targets", []) or []:
            if t.get("hide"):
                continue
            raw = t.get("expr", "")
            out.append(Query("dashboard", p.get("title", f"panel {p.get('id')}"), t.get("refId", "?"),
                             one_line(substitute(raw, values)), raw))
    return out


_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?:(.*)\s*,\s*)?(\w+)\s*\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\((.*)\)\s*$", re.S)
_METRICS = re.compile(r"^\s*metrics\((.*)\)\s*$", re.S)


def variable_query_text(var):
    q = var.get("query", "")
    if isinstance(q, dict):
        q = q.get("query", "")
    return q


def variable_queries(dashboard, values):
    """The series selector each Prometheus query variable asks about, as a PromQL query."""
    out = []
    for v in dashboard.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        raw = variable_query_text(v)
        m = _LABEL_VALUES.match(raw)
        if m:
            selector = m.group(1) or f'{{{m.group(2)}!=""}}'
            expr = selector
        elif _QUERY_RESULT.match(raw):
            expr = _QUERY_RESULT.match(raw).group(1)
        elif _METRICS.match(raw):
            expr = '{__name__=~"%s"}' % _METRICS.match(raw).group(1).strip()
        else:
            raise ValueError(f"variable {v.get('name')}: unsupported query {raw!r}")
        out.append(Query("variable", v.get("name", "?"), "query", one_line(substitute(expr, values)), raw))
    return out


def alert_queries(path=DEFAULT_ALERTS):
    try:
        import yaml  # PyYAML: Debian python3-yaml, or pip install pyyaml
    except ImportError:
        sys.exit("exprs.py: PyYAML is needed to read alerts.yml: apt-get install python3-yaml (or pip install pyyaml)")
    with open(path, encoding="utf-8") as f:
        doc = yaml.safe_load(f)
    out = []
    for g in doc.get("groups", []):
        for r in g.get("rules", []):
            name = r.get("alert") or r.get("record")
            out.append(Query("alert" if "alert" in r else "record", name, "expr", one_line(r["expr"]), r["expr"]))
    return out


KINDS = ("dashboard", "variables", "alerts")


def queries(kinds=KINDS, values=None, dashboard_path=DEFAULT_DASHBOARD, alerts_path=DEFAULT_ALERTS):
    values = values or default_values()
    out = []
    dash = None
    for k in kinds:
        if k in ("dashboard", "variables") and dash is None:
            dash = load_dashboard(dashboard_path)
        if k == "dashboard":
            out += dashboard_queries(dash, values)
        elif k == "variables":
            out += variable_queries(dash, values)
        elif k == "alerts":
            out += alert_queries(alerts_path)
        else:
            raise ValueError(f"unknown kind {k!r} (one of {', '.join(KINDS)}, all)")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("kinds", nargs="*", default=["all"], help="dashboard, variables, alerts or all (default)")
    ap.add_argument("--dashboard", default=DEFAULT_DASHBOARD)
    ap.add_argument("--alerts", default=DEFAULT_ALERTS)
    ap.add_argument("--job", default="seckill", help="value for $job (a regex; default seckill)")
    ap.add_argument("--instance", default=".+", help="value for $instance (a regex; default .+)")
    ap.add_argument("--rate-interval", default="1m", help="value for $__rate_interval (default 1m)")
    ap.add_argument("--interval", default="15s", help="value for $__interval (default 15s)")
    ap.add_argument("--range", dest="range_", default="5m", help="value for $__range (default 5m)")
    ap.add_argument("--json", action="store_true", help="print a JSON list with kind/source/ref/expr")
    args = ap.parse_args(argv)
    kinds = []
    for k in args.kinds:
        kinds += list(KINDS) if k == "all" else [k]
    values = default_values(args.job, args.instance, args.rate_interval, args.interval, args.range_)
    qs = queries(kinds, values, args.dashboard, args.alerts)
    if args.json:
        json.dump([asdict(q) for q in qs], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for q in qs:
            print(q.expr)


if __name__ == "__main__":
    main()
