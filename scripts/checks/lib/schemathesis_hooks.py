"""Schemathesis hooks of scripts/checks/schemathesis (loaded through SCHEMATHESIS_HOOKS).

- The payment callback is signed as the provider signs it, so the fuzzer's bodies get past the
  signature to the body rules and the payment's effect: when SECKILL_SCHEMA_PAYMENT_SECRET is
  set (the gateway's SECKILL_PAYMENT_SECRET), a generated `X-Seckill-Signature` header is
  replaced by a valid signature of the exact bytes sent. A case without the header (negative
  data leaves the required header out) goes unsigned and must be refused 401.
- What the fuzzer's operator calls change for everyone does not outlive the call, or the
  rest of the run would answer every shopper the same refusal. After a 200 to
  `PUT /admin/v1/limits` every rate is set back to the gateway's configured one (`null`; a
  generated `rate_per_ip: 1` would make the rest 429); after a 200 to `POST /admin/v1/pause`
  every sale is resumed (the rest would be 503 `paused`); after a 200 to `PUT` or `pause` of a
  seeded shopper item (`phone-x1`, `phone-x1-b4`: half the run's reserves name one, see
  lib/schemathesis.toml) it gets its seeded definition again, or is resumed. The routes' own
  answers are checked as usual; only the state they leave behind is undone. Other items keep
  their pause: the stateful phase reserves from a paused item along the `pauseItem` links.
- Generated bodies holding a whole number spelt as a float (`38611587251.0`) are left out. JSON
  Schema counts `1.0` as an integer, so the generator sends it as valid data; the gateway
  reads JSON integers only and answers 400, as docs/openapi.json says ("Whole numbers in
  bodies are JSON integers, written without a fraction or an exponent"). A schema cannot
  state a spelling, so this is the one place the rule is kept; `1.5` and every other
  non-integer still go out as negative data.
- One check of its own, `request_id_echo`: an answer's `X-Request-Id` is the request's own
  when that was a valid id (the contract: "the request's own header when it is a valid id,
  otherwise a generated one"); the schema can say the header is there, not that it echoes.
"""

import hashlib
import hmac
import os
import re
import sys
import time

import requests
import schemathesis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import schemathesis_gateway as gateway  # noqa: E402  (the seeded items, the admin calls)

PAYMENT_SECRET = os.environ.get("SECKILL_SCHEMA_PAYMENT_SECRET", "")
BASE_URL = os.environ["SECKILL_SCHEMA_URL"]
SIGNATURE = "X-Seckill-Signature"
VALID_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _raw_body(case) -> bytes:
    """The bytes schemathesis will send: its own serialization, encoded as `requests` does."""
    data = case.as_transport_kwargs(base_url=BASE_URL)
    prepared = requests.Request(
        method=data["method"],
        url=data["url"],
        json=data.get("json"),
        data=data.get("data"),
        files=data.get("files"),
    ).prepare()
    body = prepared.body or b""
    return body.encode("utf-8") if isinstance(body, str) else body


def _has_whole_float(value) -> bool:
    if isinstance(value, float):
        return value.is_integer()
    if isinstance(value, dict):
        return any(_has_whole_float(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_whole_float(v) for v in value)
    return False


@schemathesis.hook
def filter_body(context, body):
    return not _has_whole_float(body)


@schemathesis.hook
def before_call(context, case, kwargs):
    if not PAYMENT_SECRET or case.operation.path != "/webhooks/payments":
        return
    headers = case.headers if case.headers is not None else {}
    if not any(name.lower() == SIGNATURE.lower() for name in headers):
        return
    try:
        body = _raw_body(case)
    except (TypeError, ValueError):
        # Not serializable the way requests would send it: left unsigned (401).
        return
    t = int(time.time())
    mac = hmac.new(PAYMENT_SECRET.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    for name in [n for n in headers if n.lower() == SIGNATURE.lower()]:
        del headers[name]
    headers[SIGNATURE] = f"t={t},v1={mac}"
    case.headers = headers


def _admin(method, path, body=None):
    status, answer = gateway.call(method, path, body, gateway.ADMIN)
    if status != 200:
        raise RuntimeError(f"{method} {path}: {status} {answer!r}")


@schemathesis.hook
def after_call(context, case, response):
    if response.status_code != 200:
        return
    path = case.operation.path
    item_id = (case.path_parameters or {}).get("item_id")
    if path == "/admin/v1/limits":
        _admin("PUT", "/admin/v1/limits", {"rate_global": None, "rate_per_user": None, "rate_per_ip": None})
    elif path == "/admin/v1/pause":
        _admin("POST", "/admin/v1/resume")
    elif item_id in gateway.KEPT and path == "/admin/v1/items/{item_id}":
        _admin("PUT", f"/admin/v1/items/{item_id}", gateway.ITEMS[item_id])
    elif item_id in gateway.KEPT and path == "/admin/v1/items/{item_id}/pause":
        _admin("POST", f"/admin/v1/items/{item_id}/resume")


@schemathesis.check
def request_id_echo(ctx, response, case):
    sent = next((v for k, v in (case.headers or {}).items() if k.lower() == "x-request-id"), None)
    got = response.headers.get("x-request-id")
    got = got[0] if isinstance(got, list) else got
    assert got is not None and VALID_ID.fullmatch(got), f"X-Request-Id of the answer: {got!r}"
    if isinstance(sent, str) and VALID_ID.fullmatch(sent):
        assert got == sent, f"X-Request-Id: sent {sent!r}, answered {got!r}"
