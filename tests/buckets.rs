//! Stock buckets (issue 13): `PUT /admin/v1/items/{id}` takes `buckets` (1–64, validated,
//! fixed once the item exists), the embedded engine sells a bucketed item exactly like any
//! other (one counter: every unit sells, then `sold_out`), the database keeps the number,
//! and the Redis engine (one server, and a cluster of 3 masters) splits the stock over the
//! buckets and sells all of it — also when every shopper's home bucket is the same one —
//! answering `sold_out` only once nothing is left anywhere; a transfer left half-done by a
//! dead gateway is finished by the next; cancel and expire return units to the bucket of
//! their order under a race with reserves. The transfer scripts themselves are tested in
//! `tests/lua_scripts.rs`; here the persistence worker takes both steps of a transfer from
//! the streams into the database, once.

mod common;

use std::time::Duration;

use common::buckets::{bucketed, per_bucket, stats, users_at_home};
use common::gateway::{Backend, Gateway, on_backend, on_redis};
use common::{poll, shared_pg, unique};
use futures_util::StreamExt;
use redis::Script;
use seckill_gateway::domain::ItemSpec;
use seckill_gateway::engine::{keys, scripts};
use seckill_gateway::ids::{bucket_id, home_bucket, shard_of};
use seckill_gateway::store::Store;
use seckill_gateway::store::TransferRecord;
use serde_json::{Value, json};

const HOUR_MS: i64 = 3_600_000;

/// An embedded-mode gateway (no `--redis-url`) with a SQLite store of its own.
async fn embedded() -> Gateway {
    Gateway::embedded().start().await
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
        gw.put_item_body(&unique("item"), &bucketed(&gw, 10, good))
            .await
            .assert_ok();
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
            paused: false,
        };
        store.put_item(&spec, 1).await.unwrap();
        let single = ItemSpec {
            item_id: unique("single"),
            buckets: 1,
            paused: false,
            ..spec.clone()
        };
        store.put_item(&single, 1).await.unwrap();
        let items = store.items().await.unwrap();
        assert!(items.contains(&spec), "{url}: {items:?}");
        assert!(items.contains(&single), "{url}: {items:?}");
        // Replaced with another count: the new one.
        let fewer = ItemSpec {
            buckets: 2,
            paused: false,
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
        let (_, _, _, mark): (String, i64, i64, String) = step(&take, &donor, keys::transfers_out(&donor), &dest, now)
            .invoke_async(&mut con)
            .await
            .unwrap();
        let _: redis::Value = step(&credit, &dest, keys::transfers_in(&dest), &donor, now)
            .arg(mark)
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

// ---- the Redis engine ----------------------------------------------------------------

common::on_both!(
    a_bucketed_item_is_split_over_its_buckets_and_fixed_once_it_exists,
    every_unit_sells_when_every_shopper_has_the_same_home_bucket,
    a_transfer_left_half_done_is_finished_and_its_units_sold,
    cancel_and_expire_race_reserves_on_a_bucketed_item,
);

async fn a_bucketed_item_is_split_over_its_buckets_and_fixed_once_it_exists(backend: Backend) {
    let (_redis, mut rd, gw) = on_backend(backend, |b| b).await;
    let item = unique("hot");
    let body = bucketed(&gw, 32, json!(6));
    let v = gw.put_item_body(&item, &body).await.assert_ok().clone();
    assert_eq!(
        (v["stock_total"].clone(), v["stock_remaining"].clone()),
        (json!(32), json!(32))
    );
    let v = gw.get_item(&item).await.assert_ok().clone();
    assert_eq!(
        (v["stock_total"].clone(), v["stock_remaining"].clone()),
        (json!(32), json!(32))
    );
    // Even shares, the remainder to the first buckets; the item's own hash sells nothing.
    let shares: Vec<i64> = per_bucket(&gw, &item).await.iter().map(|b| b.0).collect();
    assert_eq!(shares, vec![6, 6, 5, 5, 5, 5]);
    assert_eq!(rd.item_field(&item, "stock").await, 0);
    assert_eq!(rd.item_field(&item, "item_total").await, 32);
    let shards: std::collections::HashSet<u32> = (1..=6).map(|b| shard_of(&bucket_id(&item, b))).collect();
    assert_eq!(shards.len(), 6, "each bucket on a shard of its own");

    // The same definition again: as stored. Another stock, another count, or one bucket
    // for it: refused, nothing changed.
    gw.put_item_body(&item, &body).await.assert_ok();
    let mut more = body.clone();
    more["stock"] = json!(40);
    let mut fewer = body.clone();
    fewer["buckets"] = json!(3);
    let mut one = body.clone();
    one["buckets"] = json!(1);
    for changed in [more, fewer, one] {
        let r = gw.put_item_body(&item, &changed).await;
        r.assert_refused(400, "bad_request");
        assert!(r.text.contains("buckets cannot change"), "{}", r.text);
    }
    let plain = gw.new_item(5, 1).await;
    let mut to_six = bucketed(&gw, 5, json!(6));
    to_six["per_user_limit"] = json!(1);
    gw.put_item_body(&plain, &to_six)
        .await
        .assert_refused(400, "bad_request");
    assert_eq!(
        per_bucket(&gw, &item).await.iter().map(|b| b.0).collect::<Vec<_>>(),
        vec![6, 6, 5, 5, 5, 5]
    );
    gw.reserve_ok(&plain, "alice").await;

    // An order is made in its shopper's home bucket and named as the item's outside.
    let user = "alice";
    let order = gw.reserve_ok(&item, user).await;
    let home = bucket_id(&item, home_bucket(user, 6));
    assert_eq!(rd.order(&order).await["item_id"], home);
    assert_eq!(gw.get_order(&order, user).await.assert_ok()["item_id"], json!(item));
    gw.reserve(&item, user).await.assert_refused(409, "limit_reached");
    assert_eq!(gw.get_item(&item).await.assert_ok()["stock_remaining"], json!(31));
}

/// Acceptance 2 at its hardest: every shopper's home is bucket 1, which holds a sixth of the
/// stock; the rest must come over from the other five, and every unit sells. No `sold_out`
/// is answered while units are left: a request begun after a `sold_out` answer never gets
/// a unit (there are no cancellations here to bring one back).
async fn every_unit_sells_when_every_shopper_has_the_same_home_bucket(backend: Backend) {
    let (_redis, _rd, gw) = on_backend(backend, |b| b.flag("--rate-per-user", "1000")).await;
    let item = unique("hot");
    gw.put_item_body(&item, &bucketed(&gw, 120, json!(6))).await.assert_ok();
    let users = users_at_home(1, 6, 300);
    let started = std::time::Instant::now();
    let answers: Vec<(u16, String, Duration, Duration)> = futures_util::stream::iter(users.iter())
        .map(|u| {
            let (gw, item) = (&gw, &item);
            async move {
                let begun = started.elapsed();
                let r = gw.reserve(item, u).await;
                (r.status.as_u16(), r.error().to_owned(), begun, started.elapsed())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let sold = answers.iter().filter(|a| a.0 == 200).count();
    let others: Vec<_> = answers.iter().filter(|a| a.0 != 200 && a.1 != "sold_out").collect();
    assert!(others.is_empty(), "only 200 and sold_out: {others:?}");
    assert_eq!(sold, 120, "every unit sold");
    let first_sold_out = answers
        .iter()
        .filter(|a| a.0 == 410)
        .map(|a| a.3)
        .min()
        .expect("some sold out");
    let late = answers.iter().filter(|a| a.0 == 200 && a.2 > first_sold_out).count();
    assert_eq!(late, 0, "a unit sold to a request begun after a sold_out answer");
    let buckets = per_bucket(&gw, &item).await;
    assert!(buckets.iter().all(|b| b.1 == 0 && b.2 == 0), "{buckets:?}");
    assert!(buckets[0].0 > 20, "bucket 1 received the others' units: {buckets:?}");
}

/// Acceptance 3's unit: a gateway that died between a transfer's two steps left its units
/// recorded at the donor only. Another gateway finishes it (its recovery credits the
/// destination once) and sells them; nothing is created or lost.
async fn a_transfer_left_half_done_is_finished_and_its_units_sold(backend: Backend) {
    let (_redis, mut rd, gw) = on_backend(backend, |b| b.flag("--redis-timeout", "500ms")).await;
    let item = unique("hot");
    gw.put_item_body(&item, &bucketed(&gw, 12, json!(3))).await.assert_ok();
    let (donor, dest) = (bucket_id(&item, 2), bucket_id(&item, 1));
    // transfer_out.lua as a gateway runs it, a minute ago, and nothing after.
    let mut con = rd.conn.clone();
    let taken: redis::Value = Script::new(scripts::TRANSFER_OUT)
        .key(keys::item(&donor))
        .key(keys::transfers_out(&donor))
        .key(keys::events(shard_of(&donor)))
        .key(keys::seq(shard_of(&donor)))
        .arg("dead-gateway-1")
        .arg(3)
        .arg(&dest)
        .arg(gw.now_ms() - 60_000)
        .arg("")
        .invoke_async(&mut con)
        .await
        .unwrap();
    assert!(format!("{taken:?}").contains("taken"), "{taken:?}");
    let before = per_bucket(&gw, &item).await;
    assert_eq!(before.iter().map(|b| b.0).collect::<Vec<_>>(), vec![4, 1, 4]);
    assert_eq!(before[1].2, 3, "in transit");

    // Every unit sells, those in transit too.
    let mut sold = 0;
    for u in 0..30 {
        let r = gw.reserve(&item, &format!("u{u}")).await;
        match r.status.as_u16() {
            200 => sold += 1,
            _ => r.assert_refused(410, "sold_out"),
        }
    }
    assert_eq!(sold, 12);
    let after = per_bucket(&gw, &item).await;
    assert!(after.iter().all(|b| b.1 == 0 && b.2 == 0), "{after:?}");
    let credited: std::collections::HashMap<String, String> =
        redis::AsyncCommands::hgetall(&mut rd.conn, keys::transfers_in(&dest))
            .await
            .unwrap();
    assert!(
        credited.contains_key("dead-gateway-1"),
        "credited once, remembered: {credited:?}"
    );
}

/// Acceptance 5: cancellations and expiries return units to their orders' buckets while
/// reserves run on every bucket; afterwards every unit is paid for exactly once, every
/// bucket's arithmetic holds, nothing is in transit, reconcile finds Redis and the database
/// in agreement, and the database holds every order answered 200.
async fn cancel_and_expire_race_reserves_on_a_bucketed_item(backend: Backend) {
    let (_redis, rd, gw) = on_backend(backend, |b| {
        b.flag("--payment-timeout", "1s")
            .flag("--sweep-interval", "200ms")
            .flag("--rate-per-user", "1000")
    })
    .await;
    let item = unique("hot");
    gw.put_item_body(&item, &bucketed(&gw, 60, json!(4))).await.assert_ok();
    // A user's fate by the number of their name: 0 cancels, 1 pays, 2 lets it expire.
    let wave = |from: usize, n: usize, fate: fn(usize) -> usize| {
        let gw = &gw;
        let item = &item;
        futures_util::stream::iter(from..from + n)
            .map(move |i| async move {
                let user = format!("u{i}");
                let r = gw.reserve(item, &user).await;
                if r.status.as_u16() != 200 {
                    r.assert_refused(410, "sold_out");
                    return (0, 0, 0);
                }
                let order = r.order_id();
                match fate(i) {
                    0 => {
                        gw.cancel(&order, &user).await.assert_ok();
                        (1, 0, 0)
                    }
                    1 => {
                        gw.pay(&order, &user).await.assert_ok();
                        (1, 1, 0)
                    }
                    _ => (1, 0, 1),
                }
            })
            .buffer_unordered(32)
            .fold((0, 0, 0), |a, b| async move { (a.0 + b.0, a.1 + b.1, a.2 + b.2) })
    };
    let (made, paid_first, left) = wave(0, 400, |i| i % 3).await;
    assert!(made >= 60, "at least the stock was reserved: {made}");
    assert!(left > 0, "some reservations were left to expire");
    // The expiries come back; then shoppers who pay take whatever is left.
    let quiet = poll(Duration::from_secs(20), async || {
        let s = stats(&gw, &item).await;
        (s["reserved"] == json!(0)).then_some(s)
    })
    .await;
    assert!(quiet.is_some(), "the unpaid reservations expired");
    let (made_second, paid_second, _) = wave(1_000, 400, |_| 1).await;
    let total_paid = paid_first + paid_second;
    assert_eq!(total_paid, 60, "every unit paid for once");
    let s = stats(&gw, &item).await;
    assert_eq!(
        (s["paid"].clone(), s["reserved"].clone(), s["stock_remaining"].clone()),
        (json!(60), json!(0), json!(0)),
        "{s}"
    );
    let buckets = per_bucket(&gw, &item).await;
    assert!(buckets.iter().all(|b| b.1 == 0 && b.2 == 0), "{buckets:?}");

    // Reconcile (per bucket) and the database: every 200 a row.
    let store = gw.running().app.store.clone();
    let rows = poll(Duration::from_secs(20), async || {
        let (rows, _) = store.count(&item).await.ok()?;
        (rows as usize == made + made_second).then_some(rows)
    })
    .await;
    assert!(
        rows.is_some(),
        "every order answered 200 in the database ({} + {made_second})",
        made
    );
    let mut conn = rd.conn.clone();
    let report = poll(Duration::from_secs(10), async || {
        let r = seckill_gateway::orders::reconcile::reconcile(&mut conn.clone(), &store, Some(&item), None)
            .await
            .ok()?;
        (r.differences.is_empty() && r.pending_events == 0).then_some(r)
    })
    .await;
    let _ = &mut conn;
    let report = report.expect("reconcile clean");
    assert!(report.orders_checked > 0);
    assert_eq!(report.items, 5, "the item's own hash and its 4 buckets");
}
