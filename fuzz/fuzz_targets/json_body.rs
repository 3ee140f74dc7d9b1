//! The JSON request bodies (`src/http/reply.rs` `parse_json` and each route's body type):
//! every reader takes any bytes; only a JSON object is a body; what a reader accepts is
//! what the JSON says (read back with `serde_json::Value`); a refusal is `bad_request` in
//! the API's words.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use seckill_gateway::error::Reject;
use seckill_gateway::http::fuzz::{item_spec, limits, payment, refund_restock, reserve_qty};
use seckill_gateway::ids::valid_id;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let blank = data.iter().all(u8::is_ascii_whitespace);
    let starts_an_object = data.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    // `None` for a body serde_json's `Value` cannot hold although a body type that ignores
    // the field takes it (a number out of f64's range in a field reserve ignores).
    let json: Option<Value> = serde_json::from_slice(data).ok();
    let object = json.as_ref().and_then(Value::as_object);
    let refused = |reject: Reject| common::bad_request_in_api_words(&reject, data);

    // POST /api/v1/items/{id}/reserve: an empty body, or an object without qty, is 1.
    match reserve_qty(data) {
        Ok(qty) => {
            assert!(qty >= 1);
            assert!(blank || starts_an_object, "accepted: an object");
            if let Some(o) = object {
                assert_eq!(o.get("qty").and_then(Value::as_i64).unwrap_or(1), qty);
            }
        }
        Err(r) => refused(r),
    }
    // PUT /admin/v1/limits: each rate 0..=u32::MAX or null; nothing else.
    match limits(data) {
        Ok(change) => {
            let o = object.expect("accepted: an object");
            for (name, rate) in [
                ("rate_global", change.global),
                ("rate_per_user", change.per_user),
                ("rate_per_ip", change.per_ip),
            ] {
                let sent = o
                    .get(name)
                    .map(|v| v.as_u64().map(|n| u32::try_from(n).expect("a u32")));
                assert_eq!(rate, sent, "{name}");
            }
            assert!(o.keys().all(|k| k.starts_with("rate_")));
        }
        Err(r) => refused(r),
    }
    // POST /admin/v1/orders/{id}/refund: {"restock": bool}, required.
    match refund_restock(data) {
        Ok(restock) => {
            let o = object.expect("accepted: an object");
            assert_eq!(o.get("restock").and_then(Value::as_bool), Some(restock));
        }
        Err(r) => refused(r),
    }
    // POST /webhooks/payments: the four fields, ids of the contract's charset.
    match payment(data) {
        Ok(p) => {
            let o = object.expect("accepted: an object");
            assert!(valid_id(&p.payment_id) && valid_id(&p.order_id));
            assert_eq!(o.get("payment_id").and_then(Value::as_str), Some(p.payment_id.as_str()));
            assert_eq!(o.get("order_id").and_then(Value::as_str), Some(p.order_id.as_str()));
            assert_eq!(o.get("amount_cents").and_then(Value::as_i64), Some(p.amount_cents));
            assert_eq!(o.get("status").and_then(Value::as_str), Some(p.status.as_str()));
            assert_eq!(o.len(), 4);
        }
        Err(r) => refused(r),
    }
    // PUT /admin/v1/items/{id} (its validation: the admin_item target).
    if let Err(r) = item_spec("phone-x1", data) {
        refused(r);
    }
    // Not an object, not blank: refused by every reader.
    if !blank && !starts_an_object {
        assert!(reserve_qty(data).is_err() && limits(data).is_err() && payment(data).is_err());
    }
});
