#!/usr/bin/env python3
"""Structural lint of deploy/grafana/seckill.json (and the metric names of alerts.yml).

What Grafana's schema types cannot say, checked here:
  * a `datasource` variable (query: prometheus) and `job` / `instance` query variables using
    label_values() on that datasource;
  * every panel is a timeseries, stat or row; ids unique; grid positions inside 24 columns and
    not overlapping;
  * every panel and every target uses the `$datasource` variable;
  * every panel has a unit (fieldConfig.defaults.unit) and a legend: a legendFormat on every
    target, options.legend shown on timeseries panels, the series name shown on stat panels
    (textMode value_and_name);
  * every `{{label}}` of a legendFormat is a label the query keeps (in a `by (...)`);
  * every metric selector in every expression filters job=~"$job" and instance=~"$instance";
  * every metric name, label and label value used (dashboard and alert rules) exists in the
    contract (deploy/grafana/exprs.py CONTRACT_METRICS), and every alert selects job="seckill".

Exit status 1 with one line per problem, 0 with a summary.
"""

import os
import re
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", ".."))
sys.dont_write_bytecode = True  # no __pycache__ in deploy/grafana
sys.path.insert(0, os.path.join(ROOT, "deploy", "grafana"))
import exprs  # noqa: E402

DS_REFS = {"$datasource", "${datasource}"}
KEYWORDS_WITH_LABEL_LIST = {"by", "without", "on", "ignoring", "group_left", "group_right"}
OPERATOR_WORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end"}
# aggregations may be followed by `by (...)` before their `(`
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile"}


def tokenize_selectors(expr):
    """Yield (metric_name, matchers, by_labels) found in a PromQL expression.

    matchers: list of (label, op, value); by_labels: labels named in by/on/... lists.
    A small scanner, enough for the expressions of this repo (no `@`, no subqueries needed).
    """
    selectors, label_lists = [], []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c in "\"'`":
            j = expr.index(c, i + 1)
            i = j + 1
        elif c == "[":
            i = expr.index("]", i) + 1
        elif c.isalpha() or c in "_:":
            m = re.compile(r"[A-Za-z_:][\w:]*").match(expr, i)
            word = m.group(0)
            i = m.end()
            k = i
            while k < n and expr[k].isspace():
                k += 1
            if word in KEYWORDS_WITH_LABEL_LIST:
                if k < n and expr[k] == "(":
                    end = expr.index(")", k)
                    label_lists += [w.strip() for w in expr[k + 1:end].split(",") if w.strip()]
                    i = end + 1
                continue
            if word in OPERATOR_WORDS or word in AGGREGATIONS:
                continue
            if k < n and expr[k] == "(":
                continue  # a function or aggregation
            matchers = []
            if k < n and expr[k] == "{":
                end = k + 1
                while expr[end] != "}":
                    if expr[end] == '"':
                        end = expr.index('"', end + 1)
                    end += 1
                body = expr[k + 1:end]
                for mm in re.finditer(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?', body):
                    matchers.append((mm.group(1), mm.group(2), mm.group(3)))
                rebuilt = len(re.findall(r'(=~|!~|!=|=)', re.sub(r'"(?:[^"\\]|\\.)*"', '""', body)))
                if rebuilt != len(matchers):
                    raise ValueError(f"could not parse matchers {{{body}}} in: {expr}")
                i = end + 1
            selectors.append((word, matchers))
        elif c == "{":
            raise ValueError(f"selector without a metric name in: {expr}")
        else:
            i += 1
    return selectors, label_lists


def check_contract(where, expr, problems, require=None, extra_labels=()):
    """Metric names, labels and label values against the contract; `require` matchers must be present."""
    try:
        selectors, by_labels = tokenize_selectors(expr)
    except ValueError as e:
        problems.append(f"{where}: {e}")
        return set()
    if not selectors:
        problems.append(f"{where}: no metric selector in {expr!r}")
    kept = set(by_labels)
    for metric, matchers in selectors:
        labels = exprs.contract_labels(metric)
        if labels is None:
            problems.append(f"{where}: metric {metric!r} is not in the contract")
            continue
        for label in by_labels:
            if label not in labels and label not in extra_labels:
                # by/on lists are shared by the whole expression: a label is fine if any metric has it
                if not any(label in (exprs.contract_labels(m) or {}) for m, _ in selectors):
                    problems.append(f"{where}: label {label!r} in by/on is not a label of {metric}")
        have = set()
        for label, op, value in matchers:
            have.add((label, op, value))
            if label not in labels:
                problems.append(f"{where}: {metric} has no label {label!r}")
                continue
            allowed = labels[label]
            if allowed is None:
                continue
            if op in ("=", "!="):
                vals = [value]
            elif re.fullmatch(r"[a-z_]+(\|[a-z_]+)*", value):
                vals = value.split("|")
            else:
                vals = []  # a real regex: not checked value by value
            for v in vals:
                if v not in allowed:
                    problems.append(f"{where}: {metric}{{{label}{op}\"{value}\"}}: {v!r} is not a {label} of the contract")
        for req in require or []:
            if req not in have:
                problems.append(f"{where}: selector {metric} does not filter {req[0]}{req[1]}\"{req[2]}\"")
    return kept


def overlaps(a, b):
    return not (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"]
                or a["y"] + a["h"] <= b["y"] or b["y"] + b["h"] <= a["y"])


def lint_dashboard(d, problems):
    if not (36 <= int(d.get("schemaVersion", 0)) <= 41):
        problems.append(f"schemaVersion {d.get('schemaVersion')} is not one Grafana 10/11 writes (36..41)")
    for key in ("uid", "title"):
        if not d.get(key):
            problems.append(f"dashboard has no {key}")

    variables = {v.get("name"): v for v in d.get("templating", {}).get("list", [])}
    ds = variables.get("datasource")
    if not ds or ds.get("type") != "datasource" or ds.get("query") != "prometheus":
        problems.append("no `datasource` variable of type datasource with query prometheus")
    for name in ("job", "instance"):
        v = variables.get(name)
        if not v or v.get("type") != "query":
            problems.append(f"no `{name}` query variable")
            continue
        if (v.get("datasource") or {}).get("uid") not in DS_REFS:
            problems.append(f"variable {name}: datasource is not $datasource")
        if not exprs.variable_query_text(v).startswith("label_values("):
            problems.append(f"variable {name}: query is not label_values(...)")
    inst = variables.get("instance")
    if inst and '$job' not in exprs.variable_query_text(inst):
        problems.append("variable instance: its label_values() does not filter by $job")
    for q in exprs.variable_queries(d, exprs.default_values()):
        check_contract(f"variable {q.source}", q.expr, problems)

    ids, boxes = set(), []
    panels = list(exprs.iter_panels(d))
    n_targets = 0
    for p in panels:
        title = p.get("title") or f"panel {p.get('id')}"
        where = f"panel {title!r}"
        pid = p.get("id")
        if pid in ids:
            problems.append(f"{where}: duplicate id {pid}")
        ids.add(pid)
        g = p.get("gridPos") or {}
        if not all(isinstance(g.get(k), int) for k in ("x", "y", "w", "h")):
            problems.append(f"{where}: gridPos incomplete")
        else:
            if g["x"] < 0 or g["x"] + g["w"] > 24:
                problems.append(f"{where}: gridPos outside the 24 columns")
            for other_title, og in boxes:
                if overlaps(g, og):
                    problems.append(f"{where}: overlaps panel {other_title!r}")
            boxes.append((title, g))
        ptype = p.get("type")
        if ptype == "row":
            if p.get("targets"):
                problems.append(f"{where}: a row has targets")
            continue
        if ptype not in ("timeseries", "stat"):
            problems.append(f"{where}: type {ptype!r}, expected timeseries or stat")
        if not p.get("description"):
            problems.append(f"{where}: no description")
        if (p.get("datasource") or {}).get("uid") not in DS_REFS:
            problems.append(f"{where}: panel datasource is not $datasource")
        unit = ((p.get("fieldConfig") or {}).get("defaults") or {}).get("unit")
        if not isinstance(unit, str) or not unit:
            problems.append(f"{where}: no unit (fieldConfig.defaults.unit)")
        opts = p.get("options") or {}
        if ptype == "timeseries":
            legend = opts.get("legend") or {}
            if legend.get("showLegend") is not True or legend.get("displayMode") not in ("list", "table"):
                problems.append(f"{where}: options.legend is not shown (showLegend true, displayMode list/table)")
        if ptype == "stat" and opts.get("textMode") != "value_and_name":
            problems.append(f"{where}: stat textMode is not value_and_name, the legend name would not show")
        targets = p.get("targets") or []
        if not targets:
            problems.append(f"{where}: no targets")
        refs = set()
        for t in targets:
            n_targets += 1
            twhere = f"{where} target {t.get('refId')}"
            if t.get("refId") in refs:
                problems.append(f"{twhere}: duplicate refId")
            refs.add(t.get("refId"))
            if (t.get("datasource") or {}).get("uid") not in DS_REFS:
                problems.append(f"{twhere}: datasource is not $datasource")
            legend_format = t.get("legendFormat")
            if not isinstance(legend_format, str) or not legend_format.strip() or legend_format == "__auto":
                problems.append(f"{twhere}: no legendFormat")
                legend_format = ""
            expr = t.get("expr") or ""
            if not expr.strip():
                problems.append(f"{twhere}: empty expr")
                continue
            kept = check_contract(twhere, expr, problems,
                                  require=[("job", "=~", "$job"), ("instance", "=~", "$instance")])
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend_format):
                if label not in kept:
                    problems.append(f"{twhere}: legendFormat uses {{{{{label}}}}} but the query does not keep it in a by (...)")
            try:
                exprs.substitute(expr, exprs.default_values())
            except KeyError as e:
                problems.append(f"{twhere}: {e.args[0]}")
    return len([p for p in panels if p.get("type") != "row"]), n_targets


def lint_alerts(problems):
    n = 0
    for q in exprs.alert_queries():
        n += 1
        check_contract(f"alert {q.source}", q.expr, problems, require=[("job", "=", "seckill")])
    return n


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else exprs.DEFAULT_DASHBOARD
    problems = []
    n_panels, n_targets = lint_dashboard(exprs.load_dashboard(path), problems)
    n_alerts = lint_alerts(problems)
    if problems:
        for p in problems:
            print(f"  FAIL {p}")
        print(f"dashboard lint: {len(problems)} problem(s)")
        return 1
    print(f"dashboard lint: OK: {n_panels} panels, {n_targets} targets: unit, legend, $datasource, "
          f"job/instance filters, contract metric names/labels/values; {n_alerts} alert rules use "
          f"contract metrics with job=\"seckill\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
