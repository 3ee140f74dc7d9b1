#!/usr/bin/env python3
"""A slow, in-process stand-in for seckill-gateway, to test loadtest/run itself.

  loadtest/run burst --gateway-cmd "python3 loadtest/lib/fake_gateway.py"

It speaks the parts of the contract (docs/contract.md) the load tests use, with the same
env vars as the gateway (SECKILL_LISTEN, DATABASE_URL=postgres://..., SECKILL_ADMIN_TOKEN):
reserve with {"qty":N} (1 by default), pay, item, and the admin item PUT and stats, whose
counters are units and whose `persisted` is the units in the database rows and
`persisted_orders` the rows. It keeps stock in memory and writes order rows to PostgreSQL
through psql every 200 ms. It is NOT a benchmark target: its figures mean nothing. Its
purpose is to show that the harness catches broken gateways:

  FAKE_BUG=oversell  sells one reservation more than the stock allows
  FAKE_BUG=lose      answers 200 to one reservation but never writes its row
  FAKE_BUG=limit     lets one user buy past the per-user limit
"""

import json
import os
import re
import subprocess
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LOCK = threading.Lock()
ITEMS = {}        # id -> dict
BUYERS = {}       # (item, user) -> units
ORDERS = {}       # order id -> dict
PENDING = []      # order dicts to write
PERSISTED = {}    # item -> [units, rows] written
BUG = os.environ.get("FAKE_BUG", "")
TOKEN = os.environ.get("SECKILL_ADMIN_TOKEN", "")
DB = urllib.parse.urlparse(os.environ.get("DATABASE_URL", ""))
PSQL = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", DB.hostname or "127.0.0.1",
        "-p", str(DB.port or 5432), "-U", DB.username or "postgres", "-d", DB.path.lstrip("/") or "postgres"]
bug_done = False
OK = {"reserve": 0, "pay": 0}  # 200s answered, exposed on /metrics like the gateway


def sql(text):
    subprocess.run(PSQL, input=text, text=True, check=True, capture_output=True)


def q(s):
    return "'" + str(s).replace("'", "''") + "'"


def writer():
    try:
        write_loop()
    except Exception as e:  # a dead writer must be visible, not silent
        print(f"fake_gateway: writer died: {e!r}", flush=True)
        os._exit(1)


def write_loop():
    while True:
        time.sleep(0.2)
        with LOCK:
            batch = PENDING[:]
            PENDING.clear()
        if not batch:
            continue
        # One row per order in a statement (ON CONFLICT cannot touch a row twice).
        last = {}
        for o in batch:
            last[o["order_id"]] = o
        values = ",".join(f"({q(o['order_id'])},{q(o['item_id'])},{q(o['user_id'])},{o['qty']},{q(o['status'])})"
                          for o in last.values())
        sql("INSERT INTO orders (order_id,item_id,user_id,qty,status) VALUES " + values
            + " ON CONFLICT (order_id) DO UPDATE SET status = EXCLUDED.status;")
        with LOCK:
            for o in batch:
                if o.pop("_new", False):
                    persisted(o)


def persisted(o):
    """Count a new row of order `o` as written (LOCK held)."""
    p = PERSISTED.setdefault(o["item_id"], [0, 0])
    p[0] += o["qty"]
    p[1] += 1


class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def reply(self, code, obj):
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def err(self, code, e):
        self.reply(code, {"error": e, "message": e})

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def qty(self, raw):
        """The reserve body's qty (1 when absent), or None when it is not a whole number."""
        try:
            q = (json.loads(raw) if raw.strip() else {}).get("qty", 1)
        except (ValueError, AttributeError):
            return None
        return q if isinstance(q, int) and not isinstance(q, bool) else None

    def admin(self):
        return TOKEN and self.headers.get("Authorization") == f"Bearer {TOKEN}"

    def do_GET(self):
        p = self.path
        if p in ("/readyz", "/healthz"):
            return self.reply(200, {"status": "ok"})
        if p == "/metrics":
            with LOCK:
                text = "".join(f'seckill_requests_total{{route="{r}",outcome="ok"}} {n}\n' for r, n in OK.items())
                # Reservations made, as the gateway counts them (lt.py metric-ok reads this).
                text += f'seckill_orders_total{{event="reserved"}} {OK["reserve"]}\n'
            body = text.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        m = re.fullmatch(r"/admin/v1/items/([^/]+)/stats", p)
        if m:
            if not self.admin():
                return self.err(403, "forbidden")
            with LOCK:
                it = ITEMS.get(m[1])
                if not it:
                    return self.err(404, "unknown_item")
                units, rows = PERSISTED.get(m[1], [0, 0])
                return self.reply(200, {"item_id": m[1], "stock_total": it["stock_total"],
                                        "stock_remaining": it["stock"], "reserved": it["reserved"],
                                        "paid": it["paid"], "cancelled": 0, "expired": 0,
                                        "persisted": units, "persisted_orders": rows})
        m = re.fullmatch(r"/api/v1/items/([^/]+)", p)
        if m:
            with LOCK:
                it = ITEMS.get(m[1])
                if not it:
                    return self.err(404, "unknown_item")
                return self.reply(200, {"item_id": m[1], "stock_total": it["stock_total"],
                                        "stock_remaining": it["stock"], "state": "active"})
        self.err(404, "not_found")

    def do_PUT(self):
        m = re.fullmatch(r"/admin/v1/items/([^/]+)", self.path)
        b = json.loads(self.body() or b"{}")
        if not m:
            return self.err(404, "not_found")
        if not self.admin():
            return self.err(403, "forbidden")
        with LOCK:
            ITEMS[m[1]] = {"stock_total": b["stock"], "stock": b["stock"], "reserved": 0, "paid": 0,
                           "limit": b["per_user_limit"]}
        self.reply(200, {"item_id": m[1]})

    def do_POST(self):
        global bug_done
        raw = self.body()
        user = self.headers.get("X-User-Id")
        if not user:
            return self.err(401, "unauthenticated")
        m = re.fullmatch(r"/api/v1/items/([^/]+)/reserve", self.path)
        if m:
            item = m[1]
            qty = self.qty(raw)
            with LOCK:
                it = ITEMS.get(item)
                if not it:
                    return self.err(404, "unknown_item")
                if qty is None or qty < 1 or qty > it["limit"]:
                    return self.err(400, "bad_request")
                held = BUYERS.get((item, user), 0)
                over = BUG == "limit" and not bug_done and held + qty > it["limit"]
                if held + qty > it["limit"] and not over:
                    return self.err(409, "limit_reached")
                extra = BUG == "oversell" and not bug_done and it["stock"] < qty
                if it["stock"] < qty and not extra:
                    return self.err(410, "sold_out")
                if over or extra:
                    bug_done = True
                it["stock"] -= qty
                it["reserved"] += qty
                BUYERS[(item, user)] = held + qty
                o = {"order_id": str(uuid.uuid4()), "item_id": item, "user_id": user, "qty": qty,
                     "status": "reserved", "_new": True}
                ORDERS[o["order_id"]] = o
                if BUG == "lose" and not bug_done:
                    bug_done = True
                    persisted(o)  # claims it, never writes it
                else:
                    PENDING.append(o)
                OK["reserve"] += 1
            return self.reply(200, {"order_id": o["order_id"], "item_id": item, "user_id": user,
                                    "qty": qty, "status": "reserved", "pay_before": "later"})
        m = re.fullmatch(r"/api/v1/orders/([^/]+)/pay", self.path)
        if m:
            with LOCK:
                o = ORDERS.get(m[1])
                if not o:
                    return self.err(404, "unknown_order")
                if o["user_id"] != user:
                    return self.err(403, "forbidden")
                if o["status"] == "reserved":
                    o["status"] = "paid"
                    ITEMS[o["item_id"]]["reserved"] -= o["qty"]
                    ITEMS[o["item_id"]]["paid"] += o["qty"]
                    PENDING.append({k: v for k, v in o.items() if k != "_new"})
                OK["pay"] += 1
            return self.reply(200, {"order_id": m[1], "status": "paid"})
        self.err(404, "not_found")


def main():
    sql("CREATE TABLE IF NOT EXISTS orders (order_id text PRIMARY KEY, item_id text NOT NULL, "
        "user_id text NOT NULL, qty int NOT NULL, status text NOT NULL);")
    threading.Thread(target=writer, daemon=True).start()
    host, port = os.environ.get("SECKILL_LISTEN", "127.0.0.1:8080").rsplit(":", 1)
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer.request_queue_size = 1024
    ThreadingHTTPServer((host, int(port)), H).serve_forever()


if __name__ == "__main__":
    main()
