#!/usr/bin/env python3
"""Helpers for loadtest/run: parse the load tools' output into measurement records, check
the gateway's invariants after a run, and print/write the report.

Every number this prints comes from a tool's output or the gateway/database of this run.
Standard library only.

  lt.py freeport
  lt.py wrk NAME TARGET SCRIPT ITEM OUT.jsonl WRK_OUTPUT.txt... [--baseline NAME [--paired]]
              [--redis NAME] [--gateway-ok JSON] [--cpu WINDOW.json] [--threads N]
              (--paired: this run is paired with NAME's latest run in OUT.jsonl, taken just before)
  lt.py redis-bench NAME PIPELINE OUT.jsonl CSV_OUTPUT.txt [--cpu WINDOW.json --calls N]
  lt.py k6 NAME SCENARIO ITEM OUT.jsonl SUMMARY.json K6_EXIT_CODE [--gateway-ok JSON]
              [--cpu WINDOW.json] [--max-vus N]
  lt.py cpu-snap OUT.json [--redis-port P,..] ROLE=PID|ROLE=LABEL:PID,..  utime+stime ticks of each process tree,
                                              the machine's, and Redis INFO commandstats
  lt.py cpu-sample PID OUT.json [INTERVAL_S]  per-second CPU of PID's tree and the machine,
                                              and how often the tree went to sleep (waits)
  lt.py cpu-window BEFORE.json AFTER.json OUT.json LOADGEN_TICKS LOADGEN_WALL_S [SAMPLES.json]
  lt.py wait-quiet BASE_URL TOKEN ITEM QTY TIMEOUT   wait until the item's pipeline is quiet
  lt.py sum-200 OUT.jsonl NAME [OUTCOME]      200s (or one outcome) counted by NAME's runs
  lt.py slack OUT.jsonl NAME CONNECTIONS      answers wrk may have missed (in flight at stop)
  lt.py check --base-url .. --token .. --item .. --stock .. --limit .. --answered-200 N
              --slack K --sold-out-seen M --scenario .. --out checks.jsonl [--qty Q]
              --psql 'psql -h .. -p .. -U postgres -d postgres'|sqlite:PATH [--paid-200 P] [--quiet-timeout S]
              [--gateway-200 N] [--gateway-paid-200 N] [--seeded-200 N]
              [--gateway-sold-out N --gateway-sold-out-flag N]  (the gateway's sold_out answers, flag hits)
  lt.py check-total --items A,B.. --answered-200 N --per-item-200 N --slack K --scenario ..
              --out checks.jsonl --psql '..' [--gateway-200 N]   checks over all items of a run
  lt.py items K PREFIX                        K item ids spread over the 16 shards
  lt.py metric-ok METRICS_URL...              {"reserve": n, "pay": n, "sold_out": n, "sold_out_flag": n}
                                              the gateways' counts: 200s, sold_out answers, flag hits
  lt.py metric-delta BEFORE AFTER             difference of two metric-ok answers
  lt.py sum-gateway-ok OUT.jsonl NAME ROUTE   the gateway's 200s over NAME's runs ("" if unknown)
  lt.py report RUN_DIR REPORT.json            tables on stdout; exit 1 if a check or a judged
                                              k6 threshold failed, 3 if the checks passed but
                                              the load generator was saturated (latency not judged)
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


def _load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


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
    paired = "--paired" in args
    if paired:
        args.remove("--paired")
    redis_ref = _flag(args, "--redis")
    gw_ok = _flag(args, "--gateway-ok")  # JSON {"reserve": n, "pay": n}: /metrics deltas
    cpu = _flag(args, "--cpu")            # a cpu-window file
    threads = _flag(args, "--threads")
    name, target, script, item, out = args[:5]
    raws = args[5:]
    parts = [_wrk_json(raw) for raw in raws]
    j = _wrk_sum(parts)
    lat = j["latency_us"]
    gw = json.loads(gw_ok) if gw_ok else None
    st, oc = j["statuses"], j["outcomes"]
    made = None
    if target == "gateway":
        made = (gw or {}).get("reserve") or int(oc.get("reserve_ok", 0)) or (
            int(st.get("200", 0)) if script == "reserve.lua" else 0)
    rec = {
        "name": name, "tool": "wrk", "target": target, "script": script, "item": item,
        "rps": j["rps"], "requests": j["requests"], "duration_s": j["duration_us"] / 1e6,
        "p50_ms": lat["p50"] / 1000.0, "p99_ms": lat["p99"] / 1000.0,
        "p999_ms": lat["p999"] / 1000.0, "max_ms": lat["max"] / 1000.0,
        "statuses": j["statuses"], "outcomes": j["outcomes"], "errors": j["errors"],
        "baseline_ref": baseline, "redis_ref": redis_ref, "raw": ",".join(os.path.basename(r) for r in raws),
        "gateway_ok": gw, "threads": int(threads) if threads else None,
    }
    if len(parts) > 1:
        # One wrk per gateway: what each one saw, next to the sums above.
        rec["per_wrk"] = [{"raw": os.path.basename(r), "rps": p["rps"], "requests": p["requests"],
                           "p50_ms": p["latency_us"]["p50"] / 1000.0,
                           "p99_ms": p["latency_us"]["p99"] / 1000.0, "statuses": p["statuses"]}
                          for r, p in zip(raws, parts)]
    _attach_cpu(rec, cpu, int(j["requests"]), made)
    if paired:
        runs = [r for r in read_jsonl(out) if r.get("name") == baseline]
        if not runs:
            sys.exit(f"lt.py: --paired, but no run of {baseline} in {out}")
        rec["pair"] = pair_ratios(rec, runs[-1])
    append(out, rec)


def pair_ratios(run, base):
    """A run's ratios to the bare-server run taken just before it: req/s, and the gateway's
    CPU per answer against the bare server's (None where either is missing)."""
    g = (run.get("cpu_us_per_answer") or {}).get("gateway")
    b = (base.get("cpu_us_per_answer") or {}).get("baseline")
    return {"baseline_raw": base.get("raw"), "baseline_rps": base["rps"],
            "rps_ratio": round(run["rps"] / base["rps"], 4) if base["rps"] else None,
            "cpu_ratio": round(g / b, 4) if g and b else None}


def paired_medians(runs):
    """For a measurement whose every run was paired with a bare-server run: the median of the
    pairs' req/s ratios and of their CPU ratios, with the pairs; None otherwise."""
    pairs = [r.get("pair") for r in runs]
    if not pairs or not all(pairs):
        return None
    return {"pairs": len(pairs),
            "rps_ratio": _median([p["rps_ratio"] for p in pairs]),
            "cpu_ratio": _median([p["cpu_ratio"] for p in pairs]),
            "rps_ratios": [p["rps_ratio"] for p in pairs],
            "cpu_ratios": [p["cpu_ratio"] for p in pairs]}


def _wrk_json(raw):
    with open(raw, encoding="utf-8", errors="replace") as f:
        text = f.read()
    m = re.search(r"^WRK_JSON (\{.*\})\s*$", text, re.M)
    if not m:
        sys.exit(f"lt.py: no WRK_JSON line in {raw} (did wrk run the script's done()?)")
    return json.loads(m.group(1))


def _wrk_sum(parts):
    """One WRK_JSON record from several wrk processes run side by side (one per gateway):
    counts and req/s are summed (the runs overlap in time), the duration is the longest.
    Percentiles cannot be merged from percentiles: each is the highest of the runs', an upper
    bound of the merged one (at that latency every run has at least that share of answers)."""
    if len(parts) == 1:
        return parts[0]

    def add(key):
        tot = {}
        for p in parts:
            for k, v in (p.get(key) or {}).items():
                tot[k] = tot.get(k, 0) + v
        return tot

    lat = {k: max(float(p["latency_us"][k]) for p in parts)
           for k in ("p50", "p90", "p95", "p99", "p999", "max")}
    return {"requests": sum(p["requests"] for p in parts),
            "duration_us": max(p["duration_us"] for p in parts),
            "rps": sum(p["rps"] for p in parts), "bytes": sum(p.get("bytes", 0) for p in parts),
            "latency_us": lat, "errors": add("errors"), "statuses": add("statuses"),
            "outcomes": add("outcomes")}


def cmd_redis_bench(args):
    cpu = _flag(args, "--cpu")
    calls = _flag(args, "--calls")
    name, pipeline, out, raw = args
    rows = [line for line in open(raw, encoding="utf-8", errors="replace").read().splitlines()
            if line.startswith('"') and not line.startswith('"test"')]
    if not rows:
        sys.exit(f"lt.py: no CSV result row in {raw}")
    # "test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
    f = next(iter(__import__("csv").reader([rows[-1]])))
    rec = {
        "name": name, "tool": "redis-benchmark", "target": "redis", "script": "lua/reserve.lua",
        "pipeline": int(pipeline), "rps": float(f[1]), "p50_ms": float(f[4]),
        "p99_ms": float(f[6]), "max_ms": float(f[7]), "raw": os.path.basename(raw),
    }
    _attach_cpu(rec, cpu, int(calls) if calls else None, int(calls) if calls else None)
    append(out, rec)


def cmd_metric_ok(args):
    """Reservations made (seckill_orders_total{event="reserved"}) and pay 200s
    (seckill_requests_total{route=pay,outcome=ok}) from /metrics, as JSON, summed over every
    METRICS_URL given (one per gateway); {} when a gateway does not expose them."""
    tot = {}
    for url in args:
        counts = _metric_ok(url)
        if counts is None:
            print("{}")  # one gateway unreadable: the sum would be wrong, so none
            return
        for k, v in counts.items():
            tot[k] = tot.get(k, 0) + v
    print(json.dumps(tot))


def _metric_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return None
    return _ok_counts(text)


def _ok_counts(text):
    """metric-ok's counts from a /metrics text: reservations made, pay 200s, reserve
    `sold_out` answers, and the sold-out flag's hits (a sold_out answered locally)."""
    tot = {}
    for line in text.splitlines():
        m = re.match(r"(\w+)\{([^}]*)\}\s+([0-9.eE+-]+)", line)
        if not m:
            continue
        key = _ok_key(m.group(1), dict(re.findall(r'(\w+)="([^"]*)"', m.group(2))))
        if key:
            tot[key] = tot.get(key, 0) + int(float(m.group(3)))
    return tot


def _ok_key(name, labels):
    """The metric-ok count a sample adds to, or None."""
    if name == "seckill_orders_total" and labels.get("event") == "reserved":
        return "reserve"
    if name == "seckill_cache_requests_total" and (labels.get("cache"), labels.get("result")) == ("sold_out", "hit"):
        return "sold_out_flag"
    if name != "seckill_requests_total":
        return None
    if (labels.get("route"), labels.get("outcome")) == ("reserve", "sold_out"):
        return "sold_out"
    # Reservations come from seckill_orders_total{event="reserved"} above: counted when the
    # order is made, even if its client hung up before the answer.
    if labels.get("outcome") == "ok" and "pay" in labels.get("route", ""):
        return "pay"
    return None


METRIC_OK_KEYS = ("reserve", "pay", "sold_out", "sold_out_flag")


def cmd_metric_delta(args):
    before, after = json.loads(args[0]), json.loads(args[1])
    if not before and not after:
        print("")
        return
    print(json.dumps({k: after.get(k, 0) - before.get(k, 0) for k in METRIC_OK_KEYS}))


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
    cpu = _flag(args, "--cpu")
    max_vus = _flag(args, "--max-vus")
    name, scenario, item, out, summary, code = args
    data = _load_json(summary)
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
    gw = json.loads(gw_ok) if gw_ok else None
    rec = {
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
        "gateway_ok": gw,
        "vus_max": int(_metric(data, "vus_max", "max") or _metric(data, "vus_max", "value") or 0),
        "max_vus_allowed": int(max_vus) if max_vus else None,
    }
    _attach_cpu(rec, cpu, rec["requests"], (gw or {}).get("reserve") or counters.get("ok"))
    append(out, rec)


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


# ---------------------------------------------------------------- CPU accounting
#
# Every figure is utime+stime from /proc/PID/stat (fields 14-15), in clock ticks
# (os.sysconf("SC_CLK_TCK")), read before and after a measurement's window. A role is a
# process tree: the process's own ticks, plus cutime+cstime (fields 16-17: children it has
# waited for, i.e. exited during its life), plus the same for every live descendant. So a
# PostgreSQL backend that exits during the window moves from "live child" to the
# postmaster's cutime with its whole life, and the difference of the two readings is the
# CPU spent in the window by the postmaster and every child, whether it lived through the
# window, started in it, or exited in it.

CLK_TCK = os.sysconf("SC_CLK_TCK")
ROLES = ("gateway", "redis", "postgres", "baseline", "loadgen")


def _proc_stat(pid):
    """(ppid, utime+stime, cutime+cstime) of PID, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as f:
            s = f.read()
    except OSError:
        return None
    f = s[s.rindex(")") + 2:].split()  # f[0] is field 3 (state)
    return int(f[1]), int(f[11]) + int(f[12]), int(f[13]) + int(f[14])


def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _proc_stat(d)
            if st:
                kids.setdefault(st[0], []).append(int(d))
    return kids


def tree_ticks(pid, kids):
    """Ticks of PID, its reaped children and every live descendant; None if PID is gone."""
    return _tree_sum(pid, kids, _own_ticks)


def tree_waits(pid, kids):
    """Voluntary context switches of every thread of PID and its live descendants: each one
    is a thread that went to sleep because it had nothing to do (a load tool waiting for
    answers). None if PID is gone."""
    return _tree_sum(pid, kids, _own_waits)


def _tree_sum(pid, kids, own):
    """own(PID) plus own() of every live descendant (a descendant gone meanwhile counts 0);
    None if PID itself is gone."""
    total = own(pid)
    if total is None:
        return None
    for c in kids.get(int(pid), []):
        total += _tree_sum(c, kids, own) or 0
    return total


def _own_ticks(pid):
    """utime+stime of PID and of the children it reaped; None if it is gone."""
    st = _proc_stat(pid)
    return None if st is None else st[1] + st[2]


def _own_waits(pid):
    """Voluntary context switches of PID's threads; None if it is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total = 0
    for t in tasks:
        try:
            with open(f"/proc/{pid}/task/{t}/status", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            pass  # a thread that ended between the listing and the read
    return total


def _machine_ticks():
    """(busy, total) ticks of all CPUs from /proc/stat (busy = total - idle - iowait)."""
    with open("/proc/stat", encoding="utf-8") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    total = sum(v[:8])  # user nice system idle iowait irq softirq steal (guest is in user)
    return total - v[3] - v[4], total


def redis_commandstats(port):
    """INFO commandstats of the redis-server on 127.0.0.1:PORT: {cmd: {calls, usec}}."""
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5) as s:
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
            buf = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if b"\r\n" in buf:
                    head, _, rest = buf.partition(b"\r\n")
                    if head.startswith(b"$") and len(rest) >= int(head[1:]) + 2:
                        break
    except OSError:
        return None
    out = {}
    for line in buf.decode("utf-8", "replace").splitlines():
        m = re.match(r"cmdstat_([^:]+):(.*)", line)
        if m:
            kv = dict(p.split("=", 1) for p in m.group(2).split(",") if "=" in p)
            out[m.group(1)] = {"calls": int(kv.get("calls", 0)), "usec": int(kv.get("usec", 0))}
    return out


def cmd_cpu_snap(args):
    """cpu-snap OUT.json [--redis-port P[,P...]] ROLE=PID...: one reading of every role's
    ticks. A role of several processes (two gateways, the nodes of a Redis Cluster) is
    ROLE=LABEL:PID,LABEL:PID...: the role's ticks are their sum (None if one is gone), and
    each process's are kept under `parts`. Commandstats are summed over the ports given."""
    ports = _flag(args, "--redis-port")
    out, pairs = args[0], args[1:]
    kids = _children_map()
    busy, total = _machine_ticks()
    snap = {"t": time.monotonic(), "clk_tck": CLK_TCK, "cpus": os.cpu_count(),
            "machine_busy": busy, "machine_total": total, "ticks": {}, "pids": {}, "parts": {}}
    for p in pairs:
        role, procs = p.split("=", 1)
        if not procs:
            continue
        if "," not in procs and ":" not in procs:
            snap["pids"][role] = int(procs)
            snap["ticks"][role] = tree_ticks(procs, kids)
            continue
        parts = {}
        for proc in procs.split(","):
            label, pid = proc.rsplit(":", 1) if ":" in proc else (proc, proc)
            parts[label] = tree_ticks(pid, kids)
        snap["parts"][role] = parts
        snap["ticks"][role] = None if None in parts.values() else sum(parts.values())
    if ports:
        stats = [redis_commandstats(port) for port in ports.split(",")]
        if None not in stats:
            tot = {}
            for st in stats:
                for cmd, v in st.items():
                    a = tot.setdefault(cmd, {"calls": 0, "usec": 0})
                    a["calls"] += v["calls"]
                    a["usec"] += v["usec"]
            snap["commandstats"] = tot
        else:
            snap["commandstats"] = None
    json.dump(snap, open(out, "w", encoding="utf-8"))


def cmd_cpu_sample(args):
    """cpu-sample PID OUT.json [INTERVAL_S]: every second (or INTERVAL_S), the CPU of PID's
    tree (the load tool) and of the machine, and how often the tool went to sleep for want of
    work (voluntary context switches), until PID is gone; writes the per-interval figures
    (cores, waits per second)."""
    pid, out = args[0], args[1]
    interval = float(args[2]) if len(args) > 2 else 1.0
    samples = []
    prev = None
    while True:
        t = time.monotonic()
        kids = _children_map()
        ticks = tree_ticks(pid, kids)
        waits = tree_waits(pid, kids)
        if ticks is None or waits is None:
            break
        busy, _ = _machine_ticks()
        if prev:
            dt = t - prev[0]
            samples.append({"t": round(t - t0, 2),
                            "loadgen_cores": round((ticks - prev[1]) / CLK_TCK / dt, 3),
                            "machine_cores": round((busy - prev[2]) / CLK_TCK / dt, 3),
                            "loadgen_waits_per_s": round((waits - prev[3]) / dt, 1)})
        else:
            t0 = t
        prev = (t, ticks, busy, waits)
        time.sleep(interval)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"samples": samples}, f)


def cmd_cpu_window(args):
    """cpu-window BEFORE.json AFTER.json OUT.json LOADGEN_TICKS LOADGEN_WALL_S [SAMPLES.json]:
    the CPU each role spent between two cpu-snap readings (the load tool's from the run
    script's own cutime+cstime around the tool, read by bash without forking)."""
    before, after = (_load_json(p) for p in args[:2])
    out, lg_ticks, lg_wall = args[2], int(args[3]), float(args[4])
    samples = []
    if len(args) > 5 and os.path.exists(args[5]):
        samples = _load_json(args[5]).get("samples", [])
    wall = after["t"] - before["t"]
    tck = before["clk_tck"]
    cpu_s = {}
    for role, t1 in after["ticks"].items():
        t0 = before["ticks"].get(role)
        cpu_s[role] = (t1 - t0) / tck if t0 is not None and t1 is not None else None
    cpu_s["loadgen"] = lg_ticks / tck
    busy = (after["machine_busy"] - before["machine_busy"]) / tck
    ours = sum(v for v in cpu_s.values() if v)
    w = {"wall_s": round(wall, 3), "loadgen_wall_s": round(lg_wall, 3), "cpus": before["cpus"],
         "cpu_s": {k: (round(v, 3) if v is not None else None) for k, v in cpu_s.items()},
         "cores": {k: (round(v / (lg_wall if k == "loadgen" else wall), 3) if v is not None and wall > 0 else None)
                   for k, v in cpu_s.items()},
         "machine_busy_cores": round(busy / wall, 3) if wall > 0 else None,
         "other_cores": round(max(0.0, busy - ours) / wall, 3) if wall > 0 else None,
         "loadgen_peak_cores": max((s["loadgen_cores"] for s in samples), default=None),
         "machine_peak_cores": max((s["machine_cores"] for s in samples), default=None),
         "loadgen_waits_per_s": _median([s.get("loadgen_waits_per_s") for s in samples]),
         # while the tool ran (the window also holds the wait for the pipeline to go quiet)
         "machine_median_cores": _median([s["machine_cores"] for s in samples]),
         "samples": samples}
    # Per process, for the roles of several processes: CPU seconds in the window.
    parts = {}
    for role, p1 in (after.get("parts") or {}).items():
        p0 = (before.get("parts") or {}).get(role, {})
        parts[role] = {label: (round((t1 - p0[label]) / tck, 3)
                               if t1 is not None and p0.get(label) is not None else None)
                       for label, t1 in p1.items()}
    if parts:
        w["parts_cpu_s"] = parts
    cs0, cs1 = before.get("commandstats"), after.get("commandstats")
    if cs0 is not None and cs1 is not None:
        d = {}
        for cmd, v in cs1.items():
            a = cs0.get(cmd, {"calls": 0, "usec": 0})
            if v["calls"] - a["calls"] > 0:
                d[cmd] = {"calls": v["calls"] - a["calls"], "usec": v["usec"] - a["usec"]}
        w["commandstats"] = d
    json.dump(w, open(out, "w", encoding="utf-8"), indent=1)


def _attach_cpu(rec, window_path, answers, reservations=None):
    """Add the window's CPU figures to a measurement record: cpu_us_per_answer per role, and
    for runs that made reservations the Redis CPU and EVALSHA time per reservation."""
    if not window_path:
        return
    w = _load_json(window_path)
    rec["cpu"] = w
    rec["answers"] = answers
    rec["cpu_us_per_answer"] = {
        r: (round(w["cpu_s"][r] * 1e6 / answers, 2) if answers and w["cpu_s"].get(r) is not None else None)
        for r in ROLES}
    if w.get("parts_cpu_s") and answers:
        rec["cpu_us_per_answer_parts"] = {
            role: {label: (round(v * 1e6 / answers, 2) if v is not None else None) for label, v in p.items()}
            for role, p in w["parts_cpu_s"].items()}
    cs = w.get("commandstats") or {}
    ev = cs.get("evalsha")
    if ev and ev["calls"]:
        rec["evalsha"] = {"calls": ev["calls"], "usec_per_call": round(ev["usec"] / ev["calls"], 2)}
    if reservations:
        red = w["cpu_s"].get("redis")
        rec["reservations"] = reservations
        rec["redis_us_per_reservation"] = round(red * 1e6 / reservations, 2) if red is not None else None


# ---------------------------------------------------------------- invariants


def http_json(url, token, timeout=5):
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


def psql(psql_cmd, sql, *params):
    """Rows of a query, every value as text. PSQL_CMD is a psql command line, or
    `sqlite:PATH` for a gateway whose store is an SQLite file (the same SQL: psql's
    `:'pN'` / `:pN` variables become SQLite's numbered parameters)."""
    if psql_cmd.startswith("sqlite:"):
        return _sqlite_rows(psql_cmd[len("sqlite:"):], sql, params)
    argv = shlex.split(psql_cmd) + ["-X", "-At", "-v", "ON_ERROR_STOP=1"]
    for i, p in enumerate(params, 1):
        argv += ["-v", f"p{i}={p}"]
    r = subprocess.run(argv, input=sql, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"psql failed: {r.stderr.strip()}")
    return [line.split("|") for line in r.stdout.splitlines() if line.strip()]


def _sqlite_rows(path, sql, params):
    import sqlite3

    sql = re.sub(r":'p(\d+)'|:p(\d+)", lambda m: "?" + (m.group(1) or m.group(2)), sql)
    try:
        # Read-only beside the running gateway (WAL: readers do not block its writer).
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60) as db:
            rows = db.execute(sql, params).fetchall()
    except sqlite3.Error as e:
        raise RuntimeError(f"sqlite failed: {e}") from e
    return [["" if v is None else str(v) for v in row] for row in rows]


def in_list(first, n):
    """`:'pFIRST', …` for an IN list of N text parameters (psql and SQLite alike)."""
    return ", ".join(f":'p{i}'" for i in range(first, first + n))


def _persisted_units(st, qty):
    """The database's units for the item, from the stats, or None if they do not say.
    reserved/paid/cancelled/expired are units. `persisted` is units too when the stats
    also carry `persisted_orders` (rows); a gateway without that field counts rows in
    `persisted`, which equal units only when every reservation is of 1 unit."""
    if "persisted_orders" in st or qty == 1:
        return int(st.get("persisted", -1))
    return None


def _wait_quiet(url, token, qty, timeout):
    """Poll the item's stats until the pipeline is quiet: every unit the engine accounts for
    is in a database row, and two polls in a row agree. Returns (stats, quiet, seconds)."""
    t0, prev, stats, quiet = time.monotonic(), None, None, False
    while time.monotonic() - t0 < timeout:
        try:
            stats = http_json(url, token)
        except urllib.error.HTTPError as e:
            stats = {"error": f"HTTP {e.code}: {e.read()[:200]!r}"}
            if 400 <= e.code < 500:
                break  # the route or the token is wrong: waiting will not help
        except (urllib.error.URLError, OSError, ValueError) as e:
            stats = {"error": str(e)}
        if "error" not in stats:
            if _persisted_units(stats, qty) is None:
                break  # cannot tell: reported by check
            units = sum(int(stats.get(k, 0)) for k in ("reserved", "paid", "cancelled", "expired"))
            if _persisted_units(stats, qty) == units and stats == prev:
                quiet = True
                break
        prev = stats
        time.sleep(1.0)
    return stats, quiet, time.monotonic() - t0


def cmd_wait_quiet(args):
    """wait-quiet BASE_URL TOKEN ITEM QTY TIMEOUT: wait for the item's pipeline to go quiet
    (so a CPU window covers the persistence of what the load made); prints the seconds."""
    base, token, item, qty, timeout = args
    _, quiet, waited = _wait_quiet(f"{base}/admin/v1/items/{item}/stats", token, int(qty), float(timeout))
    print(f"{waited:.1f}" + ("" if quiet else " (not quiet)"))


# The share of a sold-out item's refusals its sold-out flag must answer. The rest go to the
# engine: the requests in flight when the flag was set, and those of each moment its
# safety-net lifetime (SECKILL_SOLD_OUT_TTL) lapses, until the engine's sold_out sets it again.
FLAG_SHARE = 0.99


def flag_share(sold_out, flag_hits):
    """The check that a sold-out item is refused locally: (ok, detail) from the gateway's
    sold_out answers and its sold-out flag's hits over the run."""
    share = flag_hits / sold_out if sold_out else 1.0
    detail = (f"{flag_hits} of {sold_out} sold_out answers from the flag ({share:.2%}); "
              f"seckill_cache_requests_total{{cache=sold_out,result=hit}} against "
              f"seckill_requests_total{{route=reserve,outcome=sold_out}}")
    if share < FLAG_SHARE:
        detail += f"; {sold_out - flag_hits} went to the engine"
    return share >= FLAG_SHARE, detail


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
    gw_sold_out = opts.get("gateway-sold-out") or None        # the gateway's reserve sold_out answers
    gw_flag = opts.get("gateway-sold-out-flag") or None       # ... of which its local flag answered

    def record(check, ok, detail):
        append(out, {"scenario": scenario, "item": item, "check": check, "ok": bool(ok),
                     "detail": detail})
        print(f"  [{'PASS' if ok else 'FAIL'}] {item}: {check}: {detail}", flush=True)

    url = f"{base}/admin/v1/items/{item}/stats"

    def persisted_units(st):
        return _persisted_units(st, qty)

    stats, quiet, waited = _wait_quiet(url, token, qty, quiet_timeout)
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
    if gw_sold_out is not None and int(gw_sold_out) > 0:
        ok, detail = flag_share(int(gw_sold_out), int(gw_flag or 0))
        record(f"sold_out answered from the local flag (at least {FLAG_SHARE:.0%}, no engine call)", ok, detail)
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


def cmd_check_total(args):
    """check-total: the checks a multi-item run can only make over all its items, because
    the gateways count reservations (/metrics) for every item together: database rows over
    the items against the load tool's 200s and the gateways' own count, and every 200 the
    tool counted named one of the run's items."""
    opts = {}
    while args:
        k = args.pop(0)
        opts[k[2:]] = args.pop(0)
    items = opts["items"].split(",")
    answered, per_item = int(opts["answered-200"]), int(opts["per-item-200"])
    slack, scenario, out = int(opts.get("slack", "0")), opts["scenario"], opts["out"]
    gw_200 = opts.get("gateway-200") or None
    label = f"{len(items)} items"

    def record(check, ok, detail):
        append(out, {"scenario": scenario, "item": label, "check": check, "ok": bool(ok),
                     "detail": detail})
        print(f"  [{'PASS' if ok else 'FAIL'}] {label}: {check}: {detail}", flush=True)

    record("every 200 named one of the run's items (item_id of the answer)", per_item == answered,
           f"{per_item} 200s counted per item, {answered} 200s in all")
    try:
        rows = psql(opts["psql"],
                    f"SELECT count(*) FROM orders WHERE item_id IN ({in_list(1, len(items))}) "
                    "AND status IN ('reserved','paid');", *items)
        n_rows = int(rows[0][0])
    except (RuntimeError, subprocess.TimeoutExpired, IndexError, ValueError) as e:
        record("database readable (orders table)", False, str(e))
        return
    record("database rows, all items == 200 answers (nothing lost, nothing extra)",
           answered <= n_rows <= answered + slack,
           f"{n_rows} rows reserved/paid; {answered} 200s counted by the load tools "
           f"(+ up to {slack} answers they may not have seen)")
    if gw_200 is not None:
        gap = n_rows - int(gw_200)
        record("database rows, all items == the gateways' own count of reserve 200s (/metrics)",
               0 <= gap <= slack,
               f"{n_rows} rows reserved/paid; seckill_orders_total{{event=reserved}} rose by {gw_200} "
               f"over every gateway"
               + (f"; {gap} reservations were made for requests never answered (client gone)" if gap > 0 else "")
               + (f"; {-gap} counted 200s have no row: LOST" if gap < 0 else ""))


def cmd_items(args):
    """items K PREFIX: K item ids spread over the 16 shards (shard = crc32(id) % 16, as
    src/ids.rs): item i lands on shard (2i+1)·16 ÷ 2K, the middle of its share, so on a
    cluster whose slots are split evenly the items are split evenly over the masters.
    Prints `id shard` per line."""
    k, prefix = int(args[0]), args[1]
    import zlib
    for i in range(k):
        target = (2 * i + 1) * 16 // (2 * k)
        n = 0
        while zlib.crc32(f"{prefix}{i}-{n}".encode()) % 16 != target:
            n += 1
        print(f"{prefix}{i}-{n} {target}")


# ---------------------------------------------------------------- report


def _fmt_rps(v):
    return f"{v:,.0f}" if isinstance(v, (int, float)) else "-"


def _fmt_ms(v):
    return f"{v:.2f}" if isinstance(v, (int, float)) else "-"


def _median_run(runs):
    """The run with the median req/s (the lower middle one for an even count)."""
    s = sorted(runs, key=lambda r: r["rps"])
    return s[(len(s) - 1) // 2]


def _median(vals):
    vals = [v for v in vals if isinstance(v, (int, float))]
    return round(statistics.median(vals), 2) if vals else None


def _median_cpu(med, runs):
    """Per-role medians of the CPU figures over a measurement's runs (each figure on its own,
    as for req/s)."""
    cpu_runs = [r for r in runs if r.get("cpu_us_per_answer")]
    if not cpu_runs:
        return
    med["cpu_us_per_answer"] = {role: _median([r["cpu_us_per_answer"].get(role) for r in cpu_runs])
                                for role in ROLES}
    med["cpu_runs"] = len(cpu_runs)
    for key in ("redis_us_per_reservation", "answers", "reservations"):
        v = _median([r.get(key) for r in cpu_runs])
        if v is not None:
            med[key] = v
    ev = [r["evalsha"]["usec_per_call"] for r in cpu_runs if r.get("evalsha")]
    if ev:
        med["evalsha"] = {"usec_per_call": _median(ev),
                          "calls": _median([r["evalsha"]["calls"] for r in cpu_runs if r.get("evalsha")])}
    med["cpu_cores"] = {role: _median([(r["cpu"].get("cores") or {}).get(role) for r in cpu_runs])
                        for role in ROLES}
    for key in ("machine_busy_cores", "other_cores", "loadgen_peak_cores", "machine_peak_cores",
                "loadgen_waits_per_s", "machine_median_cores"):
        med["cpu_" + key] = _median([r["cpu"].get(key) for r in cpu_runs])
    # The load generator's figures are judged on the worst run, not the median.
    med["cpu_loadgen_cores_max"] = max((r["cpu"]["cores"].get("loadgen") or 0) for r in cpu_runs)
    med["cpu_loadgen_peak_max"] = max((r["cpu"].get("loadgen_peak_cores") or 0) for r in cpu_runs)
    med["cpus"] = cpu_runs[0]["cpu"].get("cpus")


def _fmt_us(v):
    return f"{v:,.1f}" if isinstance(v, (int, float)) else "-"


def _print_cpu_table(order, rows, meta):
    names = [n for n in order if rows[n].get("cpu_us_per_answer")]
    if not names:
        return
    head = ["measurement", "answers", "gateway", "redis", "postgres", "baseline", "load gen",
            "servers", "gateway/baseline", "cores busy (other)", "under load"]
    table = []
    for n in names:
        r = rows[n]
        c = r["cpu_us_per_answer"]
        servers = [c.get(k) for k in ("gateway", "redis", "postgres") if c.get(k) is not None]
        b = rows.get(r.get("baseline_ref") or "")
        ratio = None
        if (r.get("paired") or {}).get("cpu_ratio"):
            ratio = r["paired"]["cpu_ratio"]
            r["cpu_ratio_gateway_baseline"] = round(ratio, 2)
        elif b and c.get("gateway") and (b.get("cpu_us_per_answer") or {}).get("baseline"):
            ratio = c["gateway"] / b["cpu_us_per_answer"]["baseline"]
            r["cpu_ratio_gateway_baseline"] = round(ratio, 2)
        busy, loaded = r.get("cpu_machine_busy_cores"), r.get("cpu_machine_median_cores")
        table.append([n, _fmt_rps(r.get("answers")), _fmt_us(c.get("gateway")), _fmt_us(c.get("redis")),
                      _fmt_us(c.get("postgres")), _fmt_us(c.get("baseline")),
                      f"{_fmt_us(c.get('loadgen'))} {r['tool']}",
                      _fmt_us(sum(servers)) if servers and r["target"] != "baseline" else "-",
                      f"{ratio:.2f}" if ratio else "-",
                      f"{busy:.2f} of {r.get('cpus')} ({r.get('cpu_other_cores') or 0:.2f})"
                      if busy is not None else "-",
                      f"{loaded:.2f}" if loaded is not None else "-"])
    runs = max(rows[n].get("cpu_runs", 1) for n in names)
    print()
    print("CPU µs per answer (utime+stime from /proc, before/after each run, ÷ the tool's answers"
          + (f"; median of {runs} runs" if runs > 1 else "") + "; cores busy over the whole window, "
          "which includes the wait for the item's pipeline to go quiet, and under "
          "load: the median of the load tool's seconds):")
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)))
    for n in names:
        r = rows[n]
        parts = r.get("cpu_us_per_answer_parts")
        if parts and r["target"] == "gateway":
            print(f"{n}: CPU µs per answer, per process"
                  + (" (the median run's)" if r.get("cpu_runs", 1) > 1 else "") + ": "
                  + "; ".join(f"{role} " + ", ".join(f"{label} {_fmt_us(v)}" for label, v in p.items())
                              for role, p in parts.items()))
    for n in names:
        r = rows[n]
        if r["target"] == "gateway" and r.get("redis_us_per_reservation") is not None:
            ev = r.get("evalsha")
            print(f"{n}: Redis CPU {r['redis_us_per_reservation']:.1f} µs per reservation "
                  f"(redis-server utime+stime in the window, refusals' calls included, "
                  f"÷ {r.get('reservations', 0):,.0f} reservations)"
                  + (f"; INFO commandstats evalsha: {ev['usec_per_call']:.1f} usec_per_call "
                     f"({ev['calls']:,.0f} calls)" if ev else ""))
        elif r["tool"] == "redis-benchmark" and r.get("redis_us_per_reservation") is not None:
            ev = r.get("evalsha")
            print(f"{n}: Redis CPU {r['redis_us_per_reservation']:.1f} µs per EVALSHA call"
                  + (f"; INFO commandstats evalsha: {ev['usec_per_call']:.1f} usec_per_call" if ev else ""))


def _is_latency_threshold(key):
    return key.split(":", 1)[0].strip() in ("http_req_duration", "http_req_waiting")


def _loadgen_verdict(r):
    """Was the load generator the bottleneck of this measurement? Judged from its own CPU
    (/proc), and for k6 its dropped_iterations and VUs; None without CPU figures."""
    if not r.get("cpu_cores"):
        return None
    sat = float(os.environ.get("LT_LOADGEN_SAT_CORES", "0.9"))
    cpus = r.get("cpus") or 1
    avg = r.get("cpu_loadgen_cores_max") or 0.0
    peak = r.get("cpu_loadgen_peak_max") or avg
    notes = []
    busy, other = r.get("cpu_machine_peak_cores") or r.get("cpu_machine_busy_cores"), r.get("cpu_other_cores")
    if busy is not None and busy >= 0.95 * cpus:
        notes.append(f"machine CPU saturated ({busy:.2f} of {cpus} cores busy"
                     + (f", {other:.2f} of them by processes this run did not start" if other else "")
                     + "): every figure includes waiting for a CPU")
    if r["tool"] == "k6":
        # k6 is saturated when it dropped iterations (it could not start them on time) while
        # it was itself near a core and the machine had no CPU left to give it: then its
        # latencies include its own delays. Dropped iterations with all VUs busy, or with k6
        # far from a core, are the gateway's latency (and are judged).
        dropped = int(r.get("dropped_iterations") or 0)
        vus, allowed = r.get("vus_max"), r.get("max_vus_allowed")
        exhausted = bool(allowed and vus is not None and vus >= allowed)
        full = busy is not None and busy >= 0.95 * cpus
        base = {"dropped_iterations": dropped, "loadgen_cores": peak, "vus_max": vus,
                "max_vus_allowed": allowed, "machine_cores": busy}
        if dropped and peak >= sat and (full or peak >= 0.9 * cpus):
            return dict(base, saturated=True, notes=notes,
                        text=f"load generator saturated (k6 dropped {dropped:,} iterations, k6 CPU "
                             f"{peak:.2f} cores, machine {busy:.2f} of {cpus} cores busy): latency "
                             f"thresholds not judged")
        if dropped and exhausted:
            why = (f"all {allowed} VUs were waiting for answers (k6 CPU {peak:.2f} cores): the "
                   f"gateway did not answer fast enough")
        elif dropped:
            why = (f"k6 CPU {peak:.2f} cores (not saturated), {vus} of {allowed} VUs: k6 started "
                   f"VUs more slowly than the answers slowed down")
        if dropped:
            return dict(base, saturated=False, notes=notes,
                        text=f"k6 dropped {dropped:,} iterations; {why} (latency judged)")
        return dict(base, saturated=False, notes=notes,
                    text=f"kept up (0 dropped iterations, k6 CPU {peak:.2f} cores at most)")
    threads = r.get("threads") or 1
    tool = r["tool"]
    note = _idle_note(r)
    if note:
        notes.append(note)
    if avg >= sat * threads:
        return {"saturated": False, "bound": True, "loadgen_cores": avg,
                "text": f"{tool} used {avg:.2f} cores with {threads} thread(s): its req/s is its own "
                        f"ceiling as much as the server's (more -t, or a bigger machine)", "notes": notes}
    if notes:
        return {"saturated": False, "loadgen_cores": avg, "text": f"{tool} used {avg:.2f} cores",
                "notes": notes}
    return None


def _idle_note(r):
    """For a closed-loop tool (wrk): when the machine had CPU to spare while the tool kept
    going to sleep for want of answers (at least one wait per 20 answers), say so: the servers
    set the pace, and their threads and the tool's wake each other thousands of times a
    second (on this project's 2-core VM: ~20,000 interrupts/s in `vmstat` against ~5,000 for
    the bare server, which keeps wrk busy)."""
    busy, cpus = r.get("cpu_machine_median_cores"), r.get("cpus") or 1
    waits, rps = r.get("cpu_loadgen_waits_per_s"), r.get("rps")
    if busy is None or not waits or not rps or busy >= 0.9 * cpus or waits < rps / 20:
        return None
    return (f"machine not saturated ({busy:.2f} of {cpus} cores busy while the tool ran, median "
            f"of its seconds) while {r['tool']} went to "
            f"sleep {waits:,.0f} times/s waiting for answers (one per {rps / waits:.1f} answers): "
            f"the servers, not the load generator, set the pace, and the idle CPU is time every "
            f"process spent waiting to be woken")


def _capacity(rows, order):
    """Cores per 10,000 reservations/s (reserve path) and per 100,000 refusals/s (sold-out
    path): rate × µs per answer ÷ 1e6, for each server role."""
    out = []
    for n in order:
        r = rows[n]
        c = r.get("cpu_us_per_answer")
        if r["target"] != "gateway" or r["tool"] != "wrk" or not c:
            continue
        if r["script"] == "reserve.lua":
            load, rate, kind = "reservations/s", 10_000, "200"
        elif r["script"] == "sold_out.lua":
            load, rate, kind = "refusals/s (sold out)", 100_000, "410"
        else:
            continue
        total = sum((r.get("statuses") or {}).values())
        share = (r.get("statuses") or {}).get(kind, 0) / total if total else None
        cores = {k: (round(rate * c[k] / 1e6, 3) if c.get(k) is not None else None)
                 for k in ("gateway", "redis", "postgres")}
        cores["total"] = round(sum(v for v in cores.values() if v is not None), 3)
        out.append({"measurement": n, "load": f"{rate:,} {load}", "rate": rate,
                    "us_per_answer": {k: c.get(k) for k in ("gateway", "redis", "postgres")},
                    "cores": cores, "answer_share": round(share, 4) if share is not None else None})
    return out


def _print_capacity(cap):
    print()
    print("capacity (cores = rate × µs per answer ÷ 1e6, from the medians above):")
    head = ["load", "gateway", "redis", "postgres", "total", "from", "answers of that kind"]
    table = [[c["load"]] + [f"{c['cores'][k]:.2f}" if c["cores"][k] is not None else "-"
                            for k in ("gateway", "redis", "postgres", "total")]
             + [c["measurement"], f"{100 * c['answer_share']:.1f}%" if c["answer_share"] is not None else "-"]
             for c in cap]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *table)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for row in table:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def cmd_report(args):
    run_dir, report_path = args
    meas = read_jsonl(os.path.join(run_dir, "measurements.jsonl"))
    checks = read_jsonl(os.path.join(run_dir, "checks.jsonl"))
    meta = {}
    meta_path = os.path.join(run_dir, "meta.json")
    if os.path.exists(meta_path):
        meta = _load_json(meta_path)

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
        _median_cpu(med, runs)
        med.pop("pair", None)
        paired = paired_medians(runs)
        if paired:
            med["paired"] = paired
        rows[name] = med
    for name, r in rows.items():
        b = rows.get(r.get("baseline_ref") or "")
        rr = rows.get(r.get("redis_ref") or "")
        r["ratio_baseline"] = r["rps"] / b["rps"] if b and b["rps"] else None
        if r.get("paired"):
            # Interleaved: the median of the pairs' ratios, not the ratio of the medians.
            r["ratio_baseline"] = r["paired"]["rps_ratio"]
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
    def ratios(vs):
        return ", ".join(f"{v:.2f}" if v is not None else "-" for v in vs)

    for name in order:
        pr = rows[name].get("paired")
        if pr:
            print(f"{name}: x baseline and gateway/baseline are the medians of {pr['pairs']} pairs "
                  f"(each run right after a run of {rows[name].get('baseline_ref')}): req/s ratios "
                  f"{ratios(pr['rps_ratios'])}; CPU ratios {ratios(pr['cpu_ratios'])}")
    for name in order:
        per = rows[name].get("per_wrk")
        if per:
            print(f"{name}: {len(per)} wrk processes side by side, one per gateway (req/s and counts "
                  f"summed; p50/p99 above: the highest of theirs): "
                  + "; ".join(f"{_fmt_rps(w['rps'])} req/s p50 {_fmt_ms(w['p50_ms'])} p99 {_fmt_ms(w['p99_ms'])} ms"
                              for w in per))
    verdicts = {n: _loadgen_verdict(rows[n]) for n in order}
    verdicts = {n: v for n, v in verdicts.items() if v}
    saturated = [n for n, v in verdicts.items() if v.get("saturated")]
    for name in order:
        r = rows[name]
        if r["tool"] == "k6":
            ths = r.get("thresholds", {})
            bad = [k for k, ok in ths.items() if not ok
                   and not (name in saturated and _is_latency_threshold(k))]
            unjudged = [k for k in ths if name in saturated and _is_latency_threshold(k)]
            print(f"k6 {name}: iterations {r.get('iterations')}, dropped {r.get('dropped_iterations')}, "
                  f"p95 {_fmt_ms(r.get('p95_ms'))} ms; thresholds: "
                  + ("all met" if not bad else "FAILED " + "; ".join(bad))
                  + (f" (not judged: {'; '.join(unjudged)})" if unjudged else ""))
    _print_cpu_table(order, rows, meta)
    if verdicts:
        print("load generator:")
        for n, v in verdicts.items():
            for line in [v["text"]] + v["notes"]:
                print(f"  {n}: {line}")
    capacity = _capacity(rows, order)
    if capacity:
        _print_capacity(capacity)
    failed = [c for c in checks if not c["ok"]]
    # With the load generator saturated its latency is its own as much as the gateway's: the
    # latency thresholds are not judged; every other threshold and every check still is.
    k6_failed = [n for n in order if rows[n]["tool"] == "k6"
                 and any(not ok for k, ok in rows[n].get("thresholds", {}).items()
                         if not (n in saturated and _is_latency_threshold(k)))]
    if checks:
        print(f"invariants: {len(checks) - len(failed)} of {len(checks)} checks passed")
        for c in failed:
            print(f"  FAIL {c['scenario']} {c['item']}: {c['check']}: {c['detail']}")
    status = 1 if failed or k6_failed else (3 if saturated else 0)
    if status == 3:
        print("verdict: INCONCLUSIVE: checks passed, but the load generator was saturated, so the "
              "latency was not judged (lower --peak-rate/--rate, or run the load from another machine)")
    elif status == 1:
        print("verdict: FAILED" + (" (latency not judged: load generator saturated)" if saturated else ""))
    else:
        print("verdict: passed")
    report = {"meta": meta, "measurements": [rows[n] for n in order], "runs": meas,
              "checks": checks, "checks_failed": len(failed),
              "k6_thresholds_failed": k6_failed, "loadgen": verdicts,
              "loadgen_saturated": saturated, "capacity": capacity, "exit_status": status}
    with open(report_path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, sort_keys=True)
    print(f"report: {report_path}")
    sys.exit(status)


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
        "cpu-snap": cmd_cpu_snap, "cpu-sample": cmd_cpu_sample, "cpu-window": cmd_cpu_window,
        "wait-quiet": cmd_wait_quiet, "check-total": cmd_check_total, "items": cmd_items,
    }.get(cmd)
    if not fn:
        sys.exit(__doc__)
    fn(args)


if __name__ == "__main__":
    main()
