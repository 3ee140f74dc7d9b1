//! Stock buckets in tests: an item body with `buckets`, the stats route, the per-bucket
//! figures and their invariants, users of a chosen home bucket.

use serde_json::Value;

use super::http::{Api, item_body};
use seckill_gateway::ids::home_bucket;

const HOUR_MS: i64 = 3_600_000;

/// An item body of `stock` units, limit 1, selling for the next hour, with `buckets`.
pub fn bucketed(api: &Api, stock: i64, buckets: Value) -> Value {
    let now = api.now_ms();
    let mut body = item_body(stock, 1, now - 1_000, now + HOUR_MS);
    body["buckets"] = buckets;
    body
}

/// The admin stats of an item (200).
pub async fn stats(api: &Api, item: &str) -> Value {
    api.stats(item).await.assert_ok().clone()
}

/// Users whose home bucket among `buckets` is `home`.
pub fn users_at_home(home: u32, buckets: u32, n: usize) -> Vec<String> {
    (0..)
        .map(|i| format!("u{i}"))
        .filter(|u| home_bucket(u, buckets) == home)
        .take(n)
        .collect()
}

/// Each bucket's `(stock_total, stock_remaining, in_transit)` as stats reads them, one bucket
/// after the other: while units move, a transfer can be counted twice (credited and not yet
/// forgotten at its donor). [`per_bucket`] checks them at a quiet point. `None` while the
/// stats route answers anything but 200 (503 while Redis fails over).
pub async fn per_bucket_now(api: &Api, item: &str) -> Option<Vec<(i64, i64, i64)>> {
    let r = api.stats(item).await;
    if r.status != 200 {
        return None;
    }
    Some(figures(r.assert_ok()))
}

/// A field of a stats answer, which must be there.
fn n(v: &Value, k: &str) -> i64 {
    v[k].as_i64().unwrap_or_else(|| panic!("{k} in {v}"))
}

/// Each bucket's `(stock_total, stock_remaining, in_transit)` of a stats answer.
fn figures(s: &Value) -> Vec<(i64, i64, i64)> {
    s["per_bucket"]
        .as_array()
        .expect("per_bucket")
        .iter()
        .map(|b| (n(b, "stock_total"), n(b, "stock_remaining"), n(b, "in_transit")))
        .collect()
}

/// The per-bucket figures of stats at a quiet point (no transfer under way), and their
/// invariants: each bucket's stock is its share
/// less what its orders hold, and the shares plus what is in transit add up to the item's
/// total. Returns the buckets' `(stock_total, stock_remaining, in_transit)`.
pub async fn per_bucket(api: &Api, item: &str) -> Vec<(i64, i64, i64)> {
    let s = stats(api, item).await;
    let buckets = s["per_bucket"].as_array().expect("per_bucket").clone();
    assert_eq!(buckets.len() as u64, s["buckets"].as_u64().unwrap(), "{s}");
    let mut shares = 0;
    for b in &buckets {
        assert_eq!(
            n(b, "stock_remaining"),
            n(b, "stock_total") - n(b, "reserved") - n(b, "paid"),
            "bucket arithmetic: {b}"
        );
        assert!(n(b, "stock_remaining") >= 0, "{b}");
        shares += n(b, "stock_total") + n(b, "in_transit");
    }
    assert_eq!(
        shares,
        n(&s, "stock_total"),
        "shares + in transit = the item's stock: {s}"
    );
    let sum = |k: &str| buckets.iter().map(|b| n(b, k)).sum::<i64>();
    for k in ["stock_remaining", "reserved", "paid", "cancelled", "expired"] {
        assert_eq!(sum(k), n(&s, k), "{k}: the item's is the sum of its buckets': {s}");
    }
    figures(&s)
}
