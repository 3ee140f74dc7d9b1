"""Tests of lt.py's own readings and arithmetic (scripts/checks/loadtest-lib runs them):
the load tool's waits read from /proc, and the report's note on an unsaturated machine."""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lt  # noqa: E402

# 150 sleeps of 10 ms: about 100 voluntary context switches a second.
SLEEPER = "import time\nfor _ in range(150): time.sleep(0.01)"
# 1.5 s on the CPU without a sleep.
SPINNER = "import time\nend = time.monotonic() + 1.5\nwhile time.monotonic() < end: pass"


def sample(code):
    """Run `code` in a child python, cpu-sample it every 0.25 s; the samples taken while it ran."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "samples.json")
        child = subprocess.Popen([sys.executable, "-c", code])
        # cpu-sample stops once the child is gone; a child that has exited but is not yet
        # reaped still has its /proc entry, so reap it from a thread as soon as it exits.
        threading.Thread(target=child.wait, daemon=True).start()
        lt.cmd_cpu_sample([str(child.pid), out, "0.25"])
        with open(out, encoding="utf-8") as f:
            return json.load(f)["samples"]


class Waits(unittest.TestCase):
    def test_a_process_that_sleeps_is_seen_waiting_and_one_that_spins_is_not(self):
        sleeping = [s["loadgen_waits_per_s"] for s in sample(SLEEPER)]
        spinning = [s["loadgen_waits_per_s"] for s in sample(SPINNER)]
        self.assertGreaterEqual(len(sleeping), 3, sleeping)
        self.assertGreaterEqual(len(spinning), 3, spinning)
        self.assertGreater(lt._median(sleeping), 30, sleeping)
        self.assertLess(lt._median(spinning), 10, spinning)

    def test_waits_of_a_process_that_is_gone_are_none(self):
        child = subprocess.Popen([sys.executable, "-c", "pass"])
        child.wait()
        self.assertIsNone(lt.tree_waits(child.pid, {}))


def wrk_row(busy, waits, rps=92_000, loadgen=0.67):
    return {"tool": "wrk", "threads": 1, "cpus": 2, "rps": rps, "cpu_cores": {"gateway": 1.0},
            "cpu_machine_busy_cores": busy - 0.3, "cpu_machine_median_cores": busy,
            "cpu_machine_peak_cores": busy, "cpu_other_cores": 0.05,
            "cpu_loadgen_cores_max": loadgen, "cpu_loadgen_peak_max": loadgen,
            "cpu_loadgen_waits_per_s": waits}


class IdleNote(unittest.TestCase):
    def test_an_idle_machine_with_a_waiting_tool_is_explained(self):
        v = lt._loadgen_verdict(wrk_row(busy=1.35, waits=26_000))
        self.assertIsNotNone(v)
        notes = " ".join(v["notes"])
        self.assertIn("machine not saturated (1.35 of 2 cores busy while the tool ran", notes)
        self.assertIn("26,000 times/s", notes)
        self.assertIn("one per 3.5 answers", notes)

    def test_no_note_when_the_machine_is_busy_or_the_tool_rarely_waits(self):
        self.assertIsNone(lt._idle_note(wrk_row(busy=1.85, waits=26_000)))
        self.assertIsNone(lt._idle_note(wrk_row(busy=1.35, waits=500)))
        self.assertIsNone(lt._idle_note(wrk_row(busy=1.35, waits=None)))
        # no note, and the tool far from a core: nothing to say about the load generator
        self.assertIsNone(lt._loadgen_verdict(wrk_row(busy=1.85, waits=500)))


class CpuTable(unittest.TestCase):
    def test_the_cores_busy_under_load_are_shown_beside_the_windows(self):
        row = dict(wrk_row(busy=1.75, waits=26_000), target="gateway", answers=920_000,
                   cpu_us_per_answer={"gateway": 10.7, "loadgen": 7.2})
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            lt._print_cpu_table(["gateway/sold-out"], {"gateway/sold-out": row}, {})
        head, line = out.getvalue().strip().splitlines()[-2:]
        self.assertTrue(head.endswith("cores busy (other)  under load"), head)
        self.assertIn("1.45 of 2 (0.05)", line)  # the window's (wrk_row: 0.3 below)
        self.assertTrue(line.rstrip().endswith("1.75"), line)


METRICS = """\
# TYPE seckill_requests_total counter
seckill_requests_total{route="reserve",outcome="ok"} 7
seckill_requests_total{route="reserve",outcome="sold_out"} 1000
seckill_requests_total{route="pay",outcome="ok"} 3
seckill_requests_total{route="item_get",outcome="ok"} 50
seckill_orders_total{event="reserved"} 8
seckill_cache_requests_total{cache="sold_out",result="hit"} 990
seckill_cache_requests_total{cache="sold_out",result="miss"} 17
seckill_cache_requests_total{cache="item",result="hit"} 1007
"""


class SoldOutFlag(unittest.TestCase):
    def test_the_counts_are_read_from_the_gateways_metrics(self):
        self.assertEqual(lt._ok_counts(METRICS),
                         {"reserve": 8, "pay": 3, "sold_out": 1000, "sold_out_flag": 990})

    def test_a_sold_out_item_must_be_refused_by_its_flag(self):
        ok, detail = lt.flag_share(1000, 990)
        self.assertTrue(ok, detail)
        self.assertIn("990 of 1000", detail)
        # The embedded engine before 06c7a7e: the flag lapsed after 5 s and was never set
        # again, so most refusals went through the engine.
        ok, detail = lt.flag_share(1_450_178, 278_235)
        self.assertFalse(ok, detail)
        self.assertIn("1171943 went to the engine", detail)


def wrk_output(d, name, rps):
    """A wrk output file as loadtest/wrk/common.lua prints it: 10 s at `rps`, all 200s."""
    n = int(rps * 10)
    lat = {"p50": 900, "p99": 5000, "p999": 8000, "max": 9000}
    path = os.path.join(d, name)
    with open(path, "w", encoding="utf-8") as f:
        f.write("WRK_JSON " + json.dumps({
            "requests": n, "duration_us": 10_000_000, "rps": rps, "bytes": 0, "latency_us": lat,
            "errors": {"connect": 0, "read": 0, "write": 0, "status": 0, "timeout": 0},
            "statuses": {"200": n}, "outcomes": {}}) + "\n")
    return path


class Interleaved(unittest.TestCase):
    # A host whose speed drifts: the bare server's three runs answered 200k, 100k and 100k
    # req/s, and the gateway's run after each 100k, 50k and 55k. Each pair says 0.5, 0.5
    # and 0.55; the medians (55k over 100k) say 0.55.
    BARE = (200_000, 100_000, 100_000)
    GATEWAY = (100_000, 50_000, 55_000)

    def report(self, paired):
        with tempfile.TemporaryDirectory() as d:
            meas = os.path.join(d, "measurements.jsonl")
            for k, (b, g) in enumerate(zip(self.BARE, self.GATEWAY)):
                lt.cmd_wrk(["baseline/reserve", "baseline", "reserve.lua", "demo", meas,
                            wrk_output(d, f"b{k}.txt", b)])
                lt.cmd_wrk(["gateway/reserve", "gateway", "reserve.lua", "lt-bulk", meas,
                            wrk_output(d, f"g{k}.txt", g), "--baseline", "baseline/reserve"]
                           + (["--paired"] if paired else []))
            out = io.StringIO()
            with contextlib.redirect_stdout(out), self.assertRaises(SystemExit) as exit:
                lt.cmd_report([d, os.path.join(d, "report.json")])
            self.assertEqual(exit.exception.code, 0, out.getvalue())
            with open(os.path.join(d, "report.json"), encoding="utf-8") as f:
                rows = {r["name"]: r for r in json.load(f)["measurements"]}
            return rows["gateway/reserve"], out.getvalue()

    def test_each_gateway_run_is_compared_with_the_bare_run_before_it(self):
        row, text = self.report(paired=True)
        self.assertEqual(row["paired"]["rps_ratios"], [0.5, 0.5, 0.55])
        self.assertEqual(row["ratio_baseline"], 0.5)
        self.assertIn("medians of 3 pairs", text)
        self.assertIn("req/s ratios 0.50, 0.50, 0.55", text)

    def test_without_pairs_the_ratio_is_of_the_medians(self):
        row, text = self.report(paired=False)
        self.assertNotIn("paired", row)
        self.assertAlmostEqual(row["ratio_baseline"], 0.55)
        self.assertNotIn("pairs", text)

    def test_a_paired_run_without_a_bare_run_before_it_is_refused(self):
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaises(SystemExit) as exit:
                lt.cmd_wrk(["gateway/reserve", "gateway", "reserve.lua", "lt-bulk",
                            os.path.join(d, "m.jsonl"), wrk_output(d, "g.txt", 1000),
                            "--baseline", "baseline/reserve", "--paired"])
            self.assertIn("no run of baseline/reserve", str(exit.exception.code))


if __name__ == "__main__":
    unittest.main()
