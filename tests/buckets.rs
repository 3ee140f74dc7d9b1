//! Stock buckets (issue 13), as far as they are built: `PUT /admin/v1/items/{id}` takes
//! `buckets` (1–64, validated), the embedded engine sells a bucketed item exactly like any
//! other (one counter: every unit sells, then `sold_out`), the database keeps the number,
//! and the Redis engine refuses more than one bucket, changing nothing, until its reserve
//! path can move units between buckets. The transfer scripts themselves are tested in
//! `tests/lua_scripts.rs`; here the persistence worker takes both steps of a transfer from
//! the streams into the database, once.

mod common;

use std::time::Duration;

use common::gateway::{Gateway, on_redis};
use common::http::{Api, item_body, send};
use common::{poll, shared_pg, unique};
use redis::Script;
use seckill_gateway::domain::ItemSpec;
use seckill_gateway::engine::{keys, scripts};
use seckill_gateway::ids::{bucket_id, shard_of};
use seckill_gateway::store::Store;
use seckill_gateway::store::TransferRecord;
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

/// Both steps of a transfer reach the database as one row, once, whatever the replays, and
/// the write marks of both buckets' shards with them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_records_both_steps_of_a_transfer_once() {
    let (redis, _rd, gw) = on_redis(|b| b.database(&shared_pg())).await;
    let item = unique("hot");
    gw.put_item(&item, 10, 1).await.assert_ok();
    let (donor, dest) = (bucket_id(&item, 0), bucket_id(&item, 1));
    assert_ne!(shard_of(&donor), shard_of(&dest));
    let mut con = redis.client().get_multiplexed_async_connection().await.unwrap();
    // The second bucket, as the Redis engine will write it (its API does not yet).
    let now = gw.now_ms();
    let stored: redis::Value = Script::new(scripts::PUT_ITEM)
        .key(keys::item(&dest))
        .arg(&dest)
        .arg("hot")
        .arg(100)
        .arg(0)
        .arg(1)
        .arg(now - 1_000)
        .arg(now + HOUR_MS)
        .invoke_async(&mut con)
        .await
        .unwrap();
    assert!(format!("{stored:?}").contains("ok"), "{stored:?}");

    let (take, credit) = (Script::new(scripts::TRANSFER_OUT), Script::new(scripts::TRANSFER_IN));
    fn step<'a>(script: &'a Script, bucket: &str, xkey: String, other: &str, now: i64) -> redis::ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(keys::item(bucket))
            .key(xkey)
            .key(keys::events(shard_of(bucket)))
            .key(keys::seq(shard_of(bucket)))
            .arg("t-1")
            .arg(4)
            .arg(other)
            .arg(now)
            .arg("");
        inv
    }
    for _ in 0..2 {
        // The second time is a replay: nothing new is written.
        let _: redis::Value = step(&take, &donor, keys::transfers_out(&donor), &dest, now)
            .invoke_async(&mut con)
            .await
            .unwrap();
        let _: redis::Value = step(&credit, &dest, keys::transfers_in(&dest), &donor, now)
            .invoke_async(&mut con)
            .await
            .unwrap();
    }

    let store = gw.running().app.store.clone();
    let want = vec![TransferRecord {
        transfer_id: "t-1".into(),
        from_bucket: 0,
        to_bucket: 1,
        units: 4,
        out_ms: Some(now),
        in_ms: Some(now),
    }];
    let got = poll(Duration::from_secs(10), async || {
        let rows = store.transfers(&item).await.ok()?;
        (rows == want).then_some(rows)
    })
    .await;
    assert_eq!(got, Some(want), "both steps in the database, as one row");
    let marks = store.marks().await.unwrap();
    for bucket in [&donor, &dest] {
        let shard = shard_of(bucket);
        assert!(
            marks.iter().any(|(s, m)| *s == shard && m.seq >= 1),
            "shard {shard}'s mark recorded: {marks:?}"
        );
    }
}
