//! Stock buckets (issue 13), as far as they are built: `PUT /admin/v1/items/{id}` takes
//! `buckets` (1–64, validated), the embedded engine sells a bucketed item exactly like any
//! other (one counter: every unit sells, then `sold_out`), the database keeps the number,
//! and the Redis engine refuses more than one bucket, changing nothing, until its reserve
//! path can move units between buckets. The transfer scripts themselves are tested in
//! `tests/lua_scripts.rs`.

mod common;

use std::time::Duration;

use common::gateway::{Gateway, on_redis};
use common::http::{Api, item_body, send};
use common::{shared_pg, unique};
use seckill_gateway::domain::ItemSpec;
use seckill_gateway::store::Store;
use serde_json::{Value, json};

const HOUR_MS: i64 = 3_600_000;

/// An embedded-mode gateway (no `--redis-url`) with a SQLite store of its own.
async fn embedded() -> Gateway {
    let b = Gateway::builder("redis://unused").without("--redis-url");
    assert!(
        b.config().redis_url.is_none(),
        "REDIS_URL in the environment would start Redis mode"
    );
    b.start().await
}

fn bucketed(api: &Api, stock: i64, buckets: Value) -> Value {
    let now = api.now_ms();
    let mut body = item_body(stock, 1, now - 1_000, now + HOUR_MS);
    body["buckets"] = buckets;
    body
}

async fn stats(api: &Api, item: &str) -> Value {
    send(api.admin(api.get(&format!("/admin/v1/items/{item}/stats"))))
        .await
        .assert_ok()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buckets_must_be_1_to_64() {
    let gw = embedded().await;
    let item = unique("item");
    for bad in [json!(0), json!(65), json!(-1), json!(1.5), json!("six"), json!([2])] {
        let r = gw.put_item_body(&item, &bucketed(&gw, 10, bad.clone())).await;
        assert_eq!(
            (r.status.as_u16(), r.error()),
            (400, "bad_request"),
            "buckets {bad}: {}",
            r.text
        );
    }
    gw.get_item(&item).await.assert_refused(404, "unknown_item");
    for good in [json!(1), json!(64), Value::Null] {
        gw.put_item_body(&item, &bucketed(&gw, 10, good)).await.assert_ok();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_bucketed_item_sells_every_unit_then_sold_out() {
    let gw = embedded().await;
    let item = unique("hot");
    let v = gw
        .put_item_body(&item, &bucketed(&gw, 30, json!(6)))
        .await
        .assert_ok()
        .clone();
    assert_eq!(v["stock_total"], json!(30));
    assert_eq!(v["stock_remaining"], json!(30));
    assert_eq!(stats(&gw, &item).await["buckets"], json!(6));

    let mut sold = 0;
    for u in 0..40 {
        let r = gw.reserve(&item, &format!("u{u}")).await;
        match r.status.as_u16() {
            200 => sold += 1,
            _ => {
                r.assert_refused(410, "sold_out");
                assert_eq!(sold, 30, "sold_out only once every unit is sold");
            }
        }
    }
    assert_eq!(sold, 30);
    let v = gw.get_item(&item).await.assert_ok().clone();
    assert_eq!(
        (v["stock_total"].clone(), v["stock_remaining"].clone()),
        (json!(30), json!(0))
    );
    let s = stats(&gw, &item).await;
    assert_eq!((s["reserved"].clone(), s["buckets"].clone()), (json!(30), json!(6)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_refuses_more_than_one_bucket_for_now_and_changes_nothing() {
    let (_redis, mut rd, gw) = on_redis(|b| b).await;
    let item = unique("hot");
    let r = gw.put_item_body(&item, &bucketed(&gw, 30, json!(6))).await;
    r.assert_refused(400, "bad_request");
    assert!(r.text.contains("not available with Redis yet"), "{}", r.text);
    assert!(rd.item(&item).await.is_empty(), "nothing stored");
    gw.get_item(&item).await.assert_refused(404, "unknown_item");

    // One bucket is every item as before; the number is kept in the item's hash.
    gw.put_item_body(&item, &bucketed(&gw, 30, json!(1))).await.assert_ok();
    assert_eq!(rd.item_field(&item, "buckets").await, 1);
    assert_eq!(stats(&gw, &item).await["buckets"], json!(1));
    gw.reserve_ok(&item, "alice").await;
}

/// The database keeps an item's bucket count (both stores).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_keeps_the_bucket_count() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("orders.db").display());
    for url in [sqlite, shared_pg()] {
        let store = Store::connect(&url, Duration::from_secs(5)).await.expect("store");
        let spec = ItemSpec {
            item_id: unique("hot"),
            name: "hot".into(),
            price_cents: 100,
            stock_total: 3_000,
            per_user_limit: 1,
            starts_ms: 0,
            ends_ms: HOUR_MS,
            buckets: 6,
        };
        store.put_item(&spec, 1).await.unwrap();
        let single = ItemSpec {
            item_id: unique("single"),
            buckets: 1,
            ..spec.clone()
        };
        store.put_item(&single, 1).await.unwrap();
        let items = store.items().await.unwrap();
        assert!(items.contains(&spec), "{url}: {items:?}");
        assert!(items.contains(&single), "{url}: {items:?}");
        // Replaced with another count: the new one.
        let fewer = ItemSpec {
            buckets: 2,
            ..spec.clone()
        };
        store.put_item(&fewer, 2).await.unwrap();
        assert!(store.items().await.unwrap().contains(&fewer), "{url}");
    }
}
