//! Admin item validation (`PUT /admin/v1/items/{id}`, `src/http/admin.rs`): any body is
//! either refused (`bad_request`, in the API's words) or an item that can be sold, whose
//! every field is in range; and an accepted item, written back as a body in the API's own
//! format (times as `clock::rfc3339` shows them), is accepted again as the same item.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use seckill_gateway::clock::rfc3339;
use seckill_gateway::domain::ItemSpec;
use seckill_gateway::http::fuzz::item_spec;
use seckill_gateway::ids::MAX_BUCKETS;

/// The largest count the gateway takes (Lua numbers are doubles: far below 2^53).
const MAX_COUNT: i64 = 1_000_000_000_000;

fuzz_target!(|data: &[u8]| {
    let spec = match item_spec("phone-x1", data) {
        Ok(spec) => spec,
        Err(reject) => return common::bad_request_in_api_words(&reject, data),
    };
    assert_eq!(spec.item_id, "phone-x1");
    assert!(
        !spec.name.trim().is_empty() && spec.name.chars().count() <= 200,
        "{:?}",
        spec.name
    );
    assert!((0..=MAX_COUNT).contains(&spec.price_cents));
    assert!((0..=MAX_COUNT).contains(&spec.stock_total));
    assert!((1..=MAX_COUNT).contains(&spec.per_user_limit));
    assert!(spec.starts_ms < spec.ends_ms);
    assert!((1..=MAX_BUCKETS).contains(&spec.buckets));
    assert!(!spec.paused, "a PUT never pauses");

    let again = serde_json::json!({
        "name": spec.name,
        "price_cents": spec.price_cents,
        "stock": spec.stock_total,
        "per_user_limit": spec.per_user_limit,
        "starts_at": rfc3339(spec.starts_ms),
        "ends_at": rfc3339(spec.ends_ms),
        "buckets": spec.buckets,
    });
    let back: ItemSpec =
        item_spec("phone-x1", again.to_string().as_bytes()).unwrap_or_else(|r| panic!("{again} refused: {r:?}"));
    assert_eq!(back, spec, "{again}");
});
