//! What the Redis engine reads back from Redis (`src/engine/redis.rs`, "reply decoding";
//! `src/domain.rs` for stream entries). The input is a name line, then a reply as Redis
//! sends it (RESP; fuzz/corpus/lua_reply holds replies captured from the real scripts):
//! `reserve`, `pay`, `cancel`, `settle`, `refund`, `expire`, `put_item` (a script's reply),
//! `order_hash`, `item_hash` (an `HGETALL`), `stream` (a stream entry's fields, as
//! `XREADGROUP` gives them). Any reply is decoded or refused, never a panic; what is decoded,
//! written back as the scripts write it, decodes to the same again; a stream entry's events
//! carry valid ids and re-pack to themselves.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use redis::Value;
use seckill_gateway::domain::{ItemState, Order, OrderEvent, TransferEvent};
use seckill_gateway::engine::redis::{Decoded, decode_reply};
use seckill_gateway::engine::{ExpireReply, PutReply, ReserveReply, TransitionReply};
use seckill_gateway::ids::{MAX_BUCKETS, split_bucket, valid_id};

const ORDER_ID: &str = "01935c8f-7a3b-7c2e-9d41-5a6b7c8d9e0f";

fuzz_target!(|data: &[u8]| {
    let Some(at) = data.iter().position(|b| *b == b'\n') else {
        return;
    };
    let (Ok(name), resp) = (std::str::from_utf8(&data[..at]), &data[at + 1..]) else {
        return;
    };
    let Ok(reply) = redis::parse_redis_value(resp) else {
        return;
    };
    if name == "stream" {
        return stream_entry(reply);
    }
    let id = if name == "item_hash" { "phone-x1" } else { ORDER_ID };
    let Ok(decoded) = decode_reply(name, id, reply) else {
        return;
    };
    let again = decode_reply(name, id, written(&decoded)).expect("what was decoded, written back, decodes");
    assert_eq!(again, decoded);
});

fn text(s: &str) -> Value {
    Value::BulkString(s.as_bytes().to_vec())
}

fn array(parts: impl IntoIterator<Item = Value>) -> Value {
    Value::Array(parts.into_iter().collect())
}

/// A decoded reply as the scripts (or `HSET`) write it: strings bulk, numbers integers.
fn written(d: &Decoded) -> Value {
    use Value::Int;
    match d {
        Decoded::Reserve(replies) => array(replies.iter().map(|r| {
            array(match r {
                ReserveReply::Reserved {
                    order_id,
                    created_ms,
                    pay_before_ms,
                    stock_after,
                } => vec![
                    text("ok"),
                    text(order_id),
                    Int(*created_ms),
                    Int(*pay_before_ms),
                    Int(*stock_after),
                ],
                ReserveReply::Duplicate {
                    order_id,
                    qty,
                    status,
                    created_ms,
                    pay_before_ms,
                } => vec![
                    text("duplicate"),
                    text(order_id),
                    Int(*qty),
                    text(status.as_str()),
                    Int(*created_ms),
                    Int(*pay_before_ms),
                ],
                ReserveReply::UnknownItem => vec![text("unknown_item")],
                ReserveReply::Paused => vec![text("paused")],
                ReserveReply::NotStarted { starts_ms } => vec![text("not_started"), Int(*starts_ms)],
                ReserveReply::Ended { ends_ms } => vec![text("ended"), Int(*ends_ms)],
                ReserveReply::BadQty { limit } => vec![text("bad_qty"), Int(*limit)],
                ReserveReply::LimitReached { held, limit } => vec![text("limit_reached"), Int(*held), Int(*limit)],
                ReserveReply::SoldOut { stock } => vec![text("sold_out"), Int(*stock)],
            })
        })),
        Decoded::Transition(t) => array(match t {
            TransitionReply::Done { status, stock_after } => {
                vec![text("ok"), text(status.as_str()), Int(*stock_after)]
            }
            TransitionReply::Already { status } => vec![text("already"), text(status.as_str())],
            TransitionReply::Closed { status } => vec![text("closed"), text(status.as_str())],
            TransitionReply::Forbidden => vec![text("forbidden")],
            TransitionReply::UnknownOrder => vec![text("unknown_order")],
        }),
        Decoded::Expire(e) => array(match e {
            ExpireReply::Expired { stock_after } => vec![text("expired"), Int(*stock_after)],
            ExpireReply::NotDue { pay_before_ms } => vec![text("not_due"), Int(*pay_before_ms)],
            ExpireReply::NotReserved { status } => vec![text("not_reserved"), text(status.as_str())],
            ExpireReply::UnknownOrder => vec![text("unknown_order")],
        }),
        Decoded::Put(p) => array(match p {
            PutReply::Stored { stock } => vec![text("ok"), Int(*stock)],
            PutReply::BelowHeld { held } => vec![text("below_held"), Int(*held)],
            PutReply::BucketsFixed { .. } => panic!("put_item.lua never answers buckets_fixed"),
        }),
        Decoded::Order(o) => order_hash(o),
        Decoded::Item(i) => item_hash(i),
    }
}

fn hash(fields: Vec<(&str, String)>) -> Value {
    array(fields.into_iter().flat_map(|(k, v)| [text(k), text(&v)]))
}

fn order_hash(o: &Order) -> Value {
    let mut fields = vec![
        ("item_id", o.item_id.clone()),
        ("user_id", o.user_id.clone()),
        ("qty", o.qty.to_string()),
        ("status", o.status.as_str().to_owned()),
        ("created_ms", o.created_ms.to_string()),
        ("pay_before_ms", o.pay_before_ms.to_string()),
        ("updated_ms", o.updated_ms.to_string()),
        ("idem_key", o.idem_key.clone()),
    ];
    if let Some(p) = o.price_cents {
        fields.push(("price_cents", p.to_string()));
    }
    if let Some(r) = o.refund {
        fields.push(("refund_of", r.as_text()));
    }
    hash(fields)
}

fn item_hash(i: &ItemState) -> Value {
    let s = &i.spec;
    let mut fields = vec![
        ("name", s.name.clone()),
        ("price_cents", s.price_cents.to_string()),
        ("stock_total", s.stock_total.to_string()),
        ("per_user_limit", s.per_user_limit.to_string()),
        ("starts_ms", s.starts_ms.to_string()),
        ("ends_ms", s.ends_ms.to_string()),
        ("buckets", s.buckets.to_string()),
        ("stock", i.stock.to_string()),
        ("reserved", i.reserved.to_string()),
        ("paid", i.paid.to_string()),
        ("cancelled", i.cancelled.to_string()),
        ("expired", i.expired.to_string()),
        ("refunded", i.refunded.to_string()),
    ];
    if s.paused {
        fields.push(("paused", "1".to_owned()));
    }
    hash(fields)
}

/// A stream entry's fields: the persistence worker's order events, or a transfer step.
fn stream_entry(reply: Value) {
    let Ok(fields) = redis::from_redis_value::<HashMap<String, String>>(reply) else {
        return;
    };
    if let Ok(events) = OrderEvent::from_fields(&fields) {
        for ev in events {
            let (item, bucket) = split_bucket(&ev.item_id);
            assert!(valid_id(&ev.order_id) && valid_id(item) && valid_id(&ev.user_id) && bucket <= MAX_BUCKETS);
            assert!(ev.qty >= 1);
            let packed: HashMap<String, String> = ev.to_fields().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            assert_eq!(OrderEvent::from_fields(&packed), Ok(vec![ev.clone()]));
        }
    }
    if let Some(Ok(step)) = TransferEvent::from_fields(&fields) {
        assert!(valid_id(&step.transfer_id) && valid_id(&step.item_id) && step.units >= 1);
    }
}
