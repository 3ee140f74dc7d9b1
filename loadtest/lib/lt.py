#!/usr/bin/env python3
"""Helpers for loadtest/run: parse the load tools' output into measurement records, check
the gateway's invariants after a run, and print/write the report.

Every number this prints comes from a tool's output or the gateway/database of this run.
Standard library only.

  lt.py freeport
  lt.py wrk NAME TARGET SCRIPT ITEM OUT.jsonl WRK_OUTPUT.txt [--baseline NAME] [--redis NAME]
  lt.py redis-bench NAME PIPELINE OUT.jsonl CSV_OUTPUT.txt
  lt.py k6 NAME SCENARIO ITEM OUT.jsonl SUMMARY.json K6_EXIT_CODE
  lt.py sum-200 OUT.jsonl NAME [OUTCOME]      200s (or one outcome) counted by NAME's runs
  lt.py slack OUT.jsonl NAME CONNECTIONS      answers wrk may have missed (in flight at stop)
  lt.py check --base-url .. --token .. --item .. --stock .. --limit .. --answered-200 N
              --slack K --sold-out-seen M --scenario .. --out checks.jsonl [--qty Q]
              --psql 'psql -h .. -p .. -U postgres -d postgres' [--paid-200 P] [--quiet-timeout S]
              [--gateway-200 N] [--gateway-paid-200 N] [--seeded-200 N]
  lt.py metric-ok METRICS_URL                 {"reserve": n, "pay": n} 200s the gateway counted
  lt.py metric-delta BEFORE AFTER             difference of two metric-ok answers
  lt.py sum-gateway-ok OUT.jsonl NAME ROUTE   the gateway's 200s over NAME's runs ("" if unknown)
  lt.py report RUN_DIR REPORT.json            table on stdout; exit 1 if a check failed
"""

import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request


def append(path, rec):
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


def read_jsonl(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cmd_freeport(_args):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def _flag(args, name, default=None):
    if name in args:
        i = args.index(name)
        v = args[i + 1]
        del args[i:i + 2]
        return v
    return default


def cmd_wrk(args):
    baseline = _flag(args, "--baseline")
    redis_ref = _flag(args, "--redis")
    gw_ok = _flag(args, "--gateway-ok")  # JSON {"reserve": n, "pay": n}: /metrics deltas
    name, target, script, item, out, raw = args
    text = open(raw, encoding="utf-8", errors="replace").read()
    m = re.search(r"^WRK_JSON (\{.*\})\s*$", text, re.M)
    if not m:
        sys.exit(f"lt.py: no WRK_JSON line in {raw} (did wrk run the script's done()?)")
    j = json.loads(m.group(1))
    lat = j["latency_us"]
    append(out, {
        "name": name, "tool": "wrk", "target": target, "script": script, "item": item,
        "rps": j["rps"], "requests": j["requests"], "duration_s": j["duration_us"] / 1e6,
        "p50_ms": lat["p50"] / 1000.0, "p99_ms": lat["p99"] / 1000.0,
        "p999_ms": lat["p999"] / 1000.0, "max_ms": lat["max"] / 1000.0,
        "statuses": j["statuses"], "outcomes": j["outcomes"], "errors": j["errors"],
        "baseline_ref": baseline, "redis_ref": redis_ref, "raw": os.path.basename(raw),
        "gateway_ok": json.loads(gw_ok) if gw_ok else None,
    })


def cmd_redis_bench(args):
    name, pipeline, out, raw = args
    rows = [line for line in open(raw, encoding="utf-8", errors="replace").read().splitlines()
            if line.startswith('"') and not line.startswith('"test"')]
    if not rows:
        sys.exit(f"lt.py: no CSV result row in {raw}")
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    f = next(iter(__import__("csv").reader([rows[-1]])))
    append(out, {
        "name": name, "tool": "redis-benchmark", "target": "redis", "script": "lua/reserve.lua",
        "pipeline": int(pipeline), "rps": float(f[1]), "p50_ms": float(f[4]),
        "p99_ms": float(f[6]), "max_ms": float(f[7]), "raw": os.path.basename(raw),
    })


def cmd_metric_ok(args):
    """Reservations made (seckill_orders_total{event="reserved"}) and pay 200s
    (seckill_requests_total{route=pay,outcome=ok}) from /metrics, as JSON; {} when the gateway
    does not expose them."""
    url = args[0]
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        print("{}")
        return
    tot = {}
    for line in text.splitlines():
        if line.startswith("seckill_orders_total{") and 'event="reserved"' in line:
            tot["reserve"] = tot.get("reserve", 0) + int(float(line.rsplit(" ", 1)[1]))
            continue
        if not line.startswith("seckill_requests_total{"):
            continue
        m = re.match(r"seckill_requests_total\{([^}]*)\}\s+([0-9.eE+-]+)", line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("outcome") != "ok":
            continue
        # Reservations come from seckill_orders_total{event="reserved"} above: counted when
        # the order is made, even if its client hung up before the answer.
        if "pay" in labels.get("route", ""):
            tot["pay"] = tot.get("pay", 0) + int(float(m.group(2)))
    print(json.dumps(tot))


def cmd_metric_delta(args):
    before, after = json.loads(args[0]), json.loads(args[1])
    if not before and not after:
        print("")
        return
    print(json.dumps({k: after.get(k, 0) - before.get(k, 0) for k in ("reserve", "pay")}))


def cmd_sum_gateway_ok(args):
    """Sum of the gateway's own 200 count (route) over NAME's runs; empty if unknown."""
    out, name, route = args
    runs = _runs(out, name)
    if not runs or any(not r.get("gateway_ok") for r in runs):
        print("")
        return
    print(sum(int(r["gateway_ok"].get(route, 0)) for r in runs))


def _metric(data, name, key):
    m = data.get("metrics", {}).get(name)
    if not m:
        return None
    return m.get("values", {}).get(key)


def cmd_k6(args):
    gw_ok = _flag(args, "--gateway-ok")
    name, scenario, item, out, summary, code = args
    data = json.load(open(summary, encoding="utf-8"))
    counters = {}
    for c in ("ok", "sold_out", "limit_reached", "rate_limited", "unavailable", "other",
              "gave_up", "browsed", "paid", "order_closed"):
        v = _metric(data, c, "count")
        if v is not None:
            counters[c] = int(v)
    thresholds = {}
    for mname, m in data.get("metrics", {}).items():
        for expr, t in (m.get("thresholds") or {}).items():
            thresholds[f"{mname}: {expr}"] = bool(t.get("ok"))
    append(out, {
        "name": name, "tool": "k6", "target": "gateway", "script": f"k6/flash_sale.js:{scenario}",
        "item": item, "rps": _metric(data, "http_reqs", "rate") or 0.0,
        "requests": int(_metric(data, "http_reqs", "count") or 0),
        "iterations": int(_metric(data, "iterations", "count") or 0),
        "dropped_iterations": int(_metric(data, "dropped_iterations", "count") or 0),
        "p50_ms": _metric(data, "http_req_duration", "med"),
        "p95_ms": _metric(data, "http_req_duration", "p(95)"),
        "p99_ms": _metric(data, "http_req_duration", "p(99)"),
        "outcomes": counters, "statuses": {}, "thresholds": thresholds,
        "k6_exit_code": int(code), "raw": os.path.basename(summary),
        "gateway_ok": json.loads(gw_ok) if gw_ok else None,
    })


def _runs(out, name):
    return [r for r in read_jsonl(out) if r["name"] == name]


def cmd_sum_200(args):
    out, name = args[0], args[1]
    outcome = args[2] if len(args) > 2 else None
    total = 0
    for r in _runs(out, name):
        if outcome:
            total += int(r.get("outcomes", {}).get(outcome, 0))
        elif r["tool"] == "k6":
            total += int(r["outcomes"].get("ok", 0))
        else:
            total += int(r.get("statuses", {}).get("200", 0))
    print(total)


def cmd_slack(args):
    """wrk stops with up to one request in flight per connection, and a socket error or
    timeout loses one answer each: the server may have said 200 to those without wrk
    counting it."""
    out, name, conns = args
    total = 0
    for r in _runs(out, name):
        e = r.get("errors", {})
        total += int(conns) + int(e.get("read", 0)) + int(e.get("write", 0)) + int(e.get("timeout", 0))
    print(total)


# ---------------------------------------------------------------- invariants


def http_json(url, token, timeout=5):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


def psql(psql_cmd, sql, *params):
    argv = shlex.split(psql_cmd) + ["-X", "-At", "-v", "ON_ERROR_STOP=1"]
    for i, p in enumerate(params, 1):
        argv += ["-v", f"p{i}={p}"]
    r = subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"psql failed: {r.stderr.strip()}")
    return [line.split("|") for line in r.stdout.splitlines() if line.strip()]


def cmd_check(args):
    opts = {}
    while args:
        k = args.pop(0)
        if not k.startswith("--"):
            sys.exit(f"lt.py check: unexpected {k}")
        opts[k[2:]] = args.pop(0)
    base, token, item = opts["base-url"], opts["token"], opts["item"]
    stock, limit = int(opts["stock"]), int(opts["limit"])
    qty = int(opts.get("qty", "1"))  # units per reservation of the run
    answered, slack = int(opts["answered-200"]), int(opts.get("slack", "0"))
    sold_out_seen = int(opts.get("sold-out-seen", "0"))
    scenario, out = opts["scenario"], opts["out"]
    quiet_timeout = float(opts.get("quiet-timeout", "180"))
    paid_200 = opts.get("paid-200")
    gw_200 = opts.get("gateway-200") or None        # the gateway's own count of reserve 200s
    gw_paid = opts.get("gateway-paid-200") or None  # ... and of pay 200s
    seeded_200 = int(opts.get("seeded-200", "0"))   # 200s of the seeding step (not in the tool's run)

    def record(check, ok, detail):
        append(out, {"scenario": scenario, "item": item, "check": check, "ok": bool(ok),
                     "detail": detail})
        print(f"  [{'PASS' if ok else 'FAIL'}] {item}: {check}: {detail}", flush=True)

    url = f"{base}/admin/v1/items/{item}/stats"

    def persisted_units(st):
        """The database's units for the item, from the stats, or None if they do not say.
        reserved/paid/cancelled/expired are units. `persisted` is units too when the stats
        also carry `persisted_orders` (rows); a gateway without that field counts rows in
        `persisted`, which equal units only when every reservation is of 1 unit."""
        if "persisted_orders" in st or qty == 1:
            return int(st.get("persisted", -1))
        return None

    # 1. Wait for the pipeline to go quiet: every unit the engine accounts for is in a
    #    database row, and two polls in a row agree.
    t0, prev, stats, quiet = time.monotonic(), None, None, False
    while time.monotonic() - t0 < quiet_timeout:
        try:
            stats = http_json(url, token)
        except urllib.error.HTTPError as e:
            stats = {"error": f"HTTP {e.code}: {e.read()[:200]!r}"}
            if 400 <= e.code < 500:
                break  # the route or the token is wrong: waiting will not help
        except (urllib.error.URLError, OSError, ValueError) as e:
            stats = {"error": str(e)}
        if "error" not in stats:
            if persisted_units(stats) is None:
                break  # cannot tell: reported below
            units = sum(int(stats.get(k, 0)) for k in ("reserved", "paid", "cancelled", "expired"))
            if persisted_units(stats) == units and stats == prev:
                quiet = True
                break
        prev = stats
        time.sleep(1.0)
    waited = time.monotonic() - t0
    if not stats or "error" in stats:
        record("admin stats readable", False, f"GET {url}: {stats}")
        return
    units = sum(int(stats.get(k, 0)) for k in ("reserved", "paid", "cancelled", "expired"))
    if persisted_units(stats) is None:
        record("pipeline quiet (persisted units == reserved+paid+cancelled+expired)", False,
               f"the stats have no persisted_orders, so this gateway's persisted counts rows, not "
               f"units; with --qty {qty} they cannot be compared (run with --qty 1); "
               f"stats {json.dumps(stats, sort_keys=True)}")
    else:
        record("pipeline quiet (persisted units == reserved+paid+cancelled+expired)", quiet,
               f"persisted {stats.get('persisted')} units vs {units} after {waited:.1f}s; "
               f"stats {json.dumps(stats, sort_keys=True)}")

    total = int(stats["stock_total"])
    reserved, paid = int(stats["reserved"]), int(stats["paid"])
    sold = reserved + paid
    record("stock_total is what was seeded", total == stock, f"stock_total {total}, seeded {stock}")
    record("no oversell (reserved+paid <= stock)", sold <= total,
           f"reserved {reserved} + paid {paid} = {sold}, stock {total}")
    if sold_out_seen > 0:
        # sold_out means fewer than qty units were left for that reservation: with qty 1 the
        # stock is sold exactly; with qty Q up to Q-1 units may stay unsold.
        record("sold the stock (sold_out was answered: fewer than qty units left)",
               sold <= total and total - sold < qty,
               f"sold {sold}, stock {total}, left {total - sold} (< qty {qty}), "
               f"sold_out answers {sold_out_seen}")
    record("stock_remaining == stock - reserved - paid",
           int(stats["stock_remaining"]) == total - reserved - paid,
           f"stock_remaining {stats['stock_remaining']}, expected {total - reserved - paid}")

    try:
        over = psql(opts["psql"],
                    "SELECT user_id, sum(qty) FROM orders WHERE item_id = :'p1' "
                    "AND status IN ('reserved','paid') GROUP BY user_id HAVING sum(qty) > :p2;",
                    item, limit)
        record("no user over the per-user limit (database)", not over,
               f"{len(over)} users over {limit}" + (f", e.g. {over[:3]}" if over else ""))
        rows = psql(opts["psql"],
                    "SELECT count(*), coalesce(sum(qty),0), "
                    "count(*) FILTER (WHERE status='paid'), "
                    "coalesce(sum(qty) FILTER (WHERE status='paid'),0) FROM orders "
                    "WHERE item_id = :'p1' AND status IN ('reserved','paid');", item)
        n_rows, units, n_paid, paid_units = (int(x) for x in rows[0])
        all_rows = psql(opts["psql"],
                        "SELECT count(*), coalesce(sum(qty),0) FROM orders WHERE item_id = :'p1';",
                        item)
        n_all, units_all = (int(x) for x in all_rows[0])
        bad_qty = psql(opts["psql"],
                       "SELECT count(*) FROM orders WHERE item_id = :'p1' AND qty <> :p2;",
                       item, qty)
        n_bad_qty = int(bad_qty[0][0])
        record("every row is of the run's qty", n_bad_qty == 0,
               f"{n_bad_qty} rows with qty other than {qty}")
        if slack:
            ok = answered <= n_rows <= answered + slack
            detail = (f"{n_rows} rows reserved/paid; {answered} 200s counted by the load tool "
                      f"(+ up to {slack} answers it may not have seen: in flight at stop, socket errors)")
        else:
            ok = n_rows == answered
            detail = f"{n_rows} rows reserved/paid; {answered} 200s counted by the load tool"
        record("database rows == 200 answers (nothing lost, nothing extra)", ok, detail)
        if gw_200 is not None:
            # A 200 the gateway counted must be a row (strict). A row the gateway did not count
            # is a reservation whose client left before the answer (wrk closes its connections
            # at stop; the gateway's handler is then dropped after the script ran): bounded by
            # the same slack, and reported.
            g = int(gw_200) + seeded_200
            gap = n_rows - g
            ok = gap == 0 if not slack else 0 <= gap <= slack
            record("database rows == the gateway's own count of reserve 200s (/metrics)", ok,
                   f"{n_rows} rows reserved/paid; seckill_orders_total{{event=reserved}} rose by "
                   f"{gw_200}" + (f" (+{seeded_200} seeding)" if seeded_200 else "")
                   + (f"; {gap} reservations were made for requests the gateway never answered "
                      f"(client gone: in flight when the load tool stopped)" if gap > 0 else "")
                   + (f"; {-gap} counted 200s have no row: LOST" if gap < 0 else ""))
        record("database units == engine reserved+paid", units == sold,
               f"database {units} units, engine {sold}")
        record("database paid units == engine paid", paid_units == paid,
               f"database {paid_units} units in {n_paid} paid rows, engine {paid}")
        if persisted_units(stats) is not None:
            record("database units (every status) == stats persisted", units_all == persisted_units(stats),
                   f"database {units_all} units in {n_all} rows, persisted {stats.get('persisted')}")
        if "persisted_orders" in stats:
            record("database rows (every status) == stats persisted_orders",
                   n_all == int(stats["persisted_orders"]),
                   f"database {n_all} rows, persisted_orders {stats['persisted_orders']}")
        if paid_200 is not None:
            p = int(paid_200)
            ok = p <= n_paid <= p + slack if slack else n_paid == p
            record("paid rows == pay 200 answers", ok,
                   f"{n_paid} paid rows; {p} pay 200s counted" + (f" (+ up to {slack})" if slack else ""))
        if gw_paid is not None:
            gap = n_paid - int(gw_paid)
            ok = gap == 0 if not slack else 0 <= gap <= slack
            record("paid rows == the gateway's own count of pay 200s (/metrics)", ok,
                   f"{n_paid} paid rows; seckill_requests_total{{route=pay,outcome=ok}} rose by {gw_paid}"
                   + (f"; {gap} payments made for requests never answered (client gone)" if gap > 0 else ""))
    except (RuntimeError, subprocess.TimeoutExpired, IndexError, ValueError) as e:
        record("database readable (orders table)", False, str(e))


# ---------------------------------------------------------------- report


def _fmt_rps(v):
    return f"{v:,.0f}" if isinstance(v, (int, float)) else "-"


def _fmt_ms(v):
    return f"{v:.2f}" if isinstance(v, (int, float)) else "-"


def _median_run(runs):
    """The run with the median req/s (the lower middle one for an even count)."""
    s = sorted(runs, key=lambda r: r["rps"])
    return s[(len(s) - 1) // 2]


def cmd_report(args):
    run_dir, report_path = args
    meas = read_jsonl(os.path.join(run_dir, "measurements.jsonl"))
    checks = read_jsonl(os.path.join(run_dir, "checks.jsonl"))
    meta = {}
    meta_path = os.path.join(run_dir, "meta.json")
    if os.path.exists(meta_path):
        meta = json.load(open(meta_path, encoding="utf-8"))

    order, groups = [], {}
    for r in meas:
        if r["name"] not in groups:
            order.append(r["name"])
            groups[r["name"]] = []
        groups[r["name"]].append(r)
    rows = {}
    for name in order:
        runs = groups[name]
        med = dict(_median_run(runs))
        med["runs_rps"] = [r["rps"] for r in runs]
        # Statuses and outcomes summed over the repeats (they all hit the same item).
        for key in ("statuses", "outcomes"):
            tot = {}
            for r in runs:
                for k, v in (r.get(key) or {}).items():
                    tot[k] = tot.get(k, 0) + v
            med[key] = tot
        rows[name] = med
    for name, r in rows.items():
        b = rows.get(r.get("baseline_ref") or "")
        rr = rows.get(r.get("redis_ref") or "")
        r["ratio_baseline"] = r["rps"] / b["rps"] if b and b["rps"] else None
        r["ratio_redis"] = r["rps"] / rr["rps"] if rr and rr["rps"] else None

    head = ["measurement", "target", "tool", "req/s", "p50 ms", "p99 ms", "answers",
            "x baseline", "x redis-bench"]
    table = []
    for name in order:
        r = rows[name]
        answers = r.get("statuses") or {}
        if r["tool"] == "k6":
            answers = r.get("outcomes") or {}
        ans = " ".join(f"{k}:{v}" for k, v in sorted(answers.items())) or "-"
        if r["tool"] == "wrk" and r.get("outcomes"):
            ans += " (" + " ".join(f"{k}:{v}" for k, v in sorted(r["outcomes"].items())) + ")"
        if r["tool"] == "redis-benchmark":
            ans = f"-P {r.get('pipeline')}"
        rps = _fmt_rps(r["rps"])
        if len(r["runs_rps"]) > 1:
            rps += f" (median of {len(r['runs_rps'])})"
        table.append([name, r["target"], r["tool"], rps, _fmt_ms(r.get("p50_ms")),
                      _fmt_ms(r.get("p99_ms")), ans,
                      f"{r['ratio_baseline']:.2f}" if r.get("ratio_baseline") else "-",
                      f"{r['ratio_redis']:.2f}" if r.get("ratio_redis") else "-"])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)] if table else []
    print()
    if meta:
        print(f"machine: {meta.get('cpus')} CPUs ({meta.get('cpu_model')}), {meta.get('kernel')}; "
              f"load tools share those CPUs with the servers: compare ratios, not absolutes")
        print(f"settings: {meta.get('settings')}")
    if table:
        print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
        for row in table:
            print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    for name in order:
        r = rows[name]
        if r["tool"] == "k6":
            bad = [k for k, ok in r.get("thresholds", {}).items() if not ok]
            print(f"k6 {name}: iterations {r.get('iterations')}, dropped {r.get('dropped_iterations')}, "
                  f"p95 {_fmt_ms(r.get('p95_ms'))} ms; thresholds: "
                  + ("all met" if not bad else "FAILED " + "; ".join(bad)))
    failed = [c for c in checks if not c["ok"]]
    k6_failed = [n for n in order if rows[n]["tool"] == "k6"
                 and not all(rows[n].get("thresholds", {}).values())]
    if checks:
        print(f"invariants: {len(checks) - len(failed)} of {len(checks)} checks passed")
        for c in failed:
            print(f"  FAIL {c['scenario']} {c['item']}: {c['check']}: {c['detail']}")
    report = {"meta": meta, "measurements": [rows[n] for n in order], "runs": meas,
              "checks": checks, "checks_failed": len(failed),
              "k6_thresholds_failed": k6_failed}
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    print(f"report: {report_path}")
    sys.exit(1 if failed or k6_failed else 0)


def cmd_meta(args):
    out, settings = args
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    json.dump({"cpus": os.cpu_count(), "cpu_model": cpu,
               "kernel": f"{platform.system()} {platform.release()}",
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "settings": settings}, open(out, "w", encoding="utf-8"), indent=2)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {
        "freeport": cmd_freeport, "wrk": cmd_wrk, "redis-bench": cmd_redis_bench,
        "k6": cmd_k6, "sum-200": cmd_sum_200, "slack": cmd_slack, "check": cmd_check,
        "report": cmd_report, "meta": cmd_meta, "metric-ok": cmd_metric_ok,
        "metric-delta": cmd_metric_delta, "sum-gateway-ok": cmd_sum_gateway_ok,
    }.get(cmd)
    if not fn:
        sys.exit(__doc__)
    fn(args)


if __name__ == "__main__":
    main()
