//! The order lifecycle over HTTP against a real `redis-server` (one per test):
//! pay, cancel and order lookup with every refusal, payment timeouts on a
//! manual clock, late payments racing the sweeper, and two gateways on one
//! Redis sharing the sold-out flag and its clearing. Issue 4, acceptance 1–3
//! (the Lua scripts themselves are tested directly in `tests/lua_scripts.rs`).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::gateway::{Backend, Gateway, on_backend};
use common::http::{Reply, send, send_until};
use common::inspect::Redis;
use common::unique;
use futures_util::StreamExt;
use seckill_gateway::clock::{Clock, parse_rfc3339, system_now_ms};
use seckill_gateway::orders::sweeper::sweep;
use serde_json::json;

/// A UUIDv7 that no order has: valid, of our shape, unknown.
fn random_v7() -> String {
    uuid::Uuid::now_v7().hyphenated().to_string()
}

common::on_both!(
    pay_and_order_lookup,
    cancel_returns_stock_and_quota_once,
    payment_timeout_expires_once_on_a_manual_clock,
    late_payments_race_the_sweeper,
    two_gateways_share_the_sold_out_flag_and_its_clearing,
);

/// Issue 4, acceptance 4: once the pipeline is quiet, the database agrees with Redis
/// (statuses equal), as `seckill-gateway reconcile` checks it.
async fn assert_reconcile_clean(gw: &Gateway, rd: &Redis, item: &str) {
    let mut conn = rd.conn.clone();
    let store = gw.running().app.store.clone();
    let mut last = None;
    for _ in 0..100 {
        let report = seckill_gateway::orders::reconcile::reconcile(&mut conn, &store, Some(item), None)
            .await
            .unwrap();
        if report.differences.is_empty() && report.pending_events == 0 {
            assert!(report.orders_checked > 0, "reconcile looked at the orders");
            return;
        }
        last = Some(report.differences);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("reconcile never came clean: {last:?}");
}

async fn pay_and_order_lookup(backend: Backend) {
    let (_redis, mut rd, gw) = on_backend(backend, |b| b).await;
    let item = gw.new_item(10, 2).await;
    let order = gw.reserve_ok(&item, "alice").await;

    // Lookup while reserved.
    let r = gw.get_order(&order, "alice").await;
    let v = r.assert_ok();
    assert_eq!(v["order_id"], json!(order));
    assert_eq!(v["item_id"], json!(item));
    assert_eq!(v["user_id"], json!("alice"));
    assert_eq!(v["qty"], json!(1));
    assert_eq!(v["status"], json!("reserved"));
    for field in ["created_at", "pay_before", "updated_at"] {
        assert!(
            v[field].as_str().and_then(parse_rfc3339).is_some(),
            "{field} is RFC 3339: {}",
            r.text
        );
    }
    gw.get_order(&order, "bob").await.assert_refused(403, "forbidden");

    // Someone else's order: 403 and nothing changes.
    gw.pay(&order, "bob").await.assert_refused(403, "forbidden");
    assert_eq!(rd.order(&order).await["status"], "reserved");

    // Pay: 200, then again 200 with the same body.
    let paid = gw.pay(&order, "alice").await;
    assert_eq!(paid.assert_ok(), &json!({"order_id": order, "status": "paid"}));
    let again = gw.pay(&order, "alice").await;
    assert_eq!(again.assert_ok(), paid.assert_ok());
    assert_eq!(rd.order(&order).await["status"], "paid");
    assert_eq!(rd.item_field(&item, "stock").await, 9, "paying moves no stock");
    assert_eq!(rd.item_field(&item, "reserved").await, 0);
    assert_eq!(rd.item_field(&item, "paid").await, 1);
    assert_eq!(
        rd.buyers(&item).await.get("alice"),
        Some(&1),
        "a paid unit keeps its quota"
    );
    let events = rd.events(&item).await;
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str()).collect();
    assert_eq!(types, ["reserved", "paid"], "one paid event, however often paid");
    let r = gw.get_order(&order, "alice").await;
    assert_eq!(r.assert_ok()["status"], json!("paid"));
    gw.pay(&order, "bob").await.assert_refused(403, "forbidden");

    // Unknown orders, bad ids, no identity.
    for id in [
        "nope".to_owned(),
        random_v7(),
        "67e55044-10b1-426f-9247-bb680e5fe0c8".to_owned(),
    ] {
        gw.pay(&id, "alice").await.assert_refused(404, "unknown_order");
        gw.cancel(&id, "alice").await.assert_refused(404, "unknown_order");
        gw.get_order(&id, "alice").await.assert_refused(404, "unknown_order");
    }
    let long = "o".repeat(65);
    gw.pay(&long, "alice").await.assert_refused(400, "bad_request");
    gw.get_order(&long, "alice").await.assert_refused(400, "bad_request");
    send(gw.post(&format!("/api/v1/orders/{order}/pay")))
        .await
        .assert_refused(401, "unauthenticated");
    send(gw.get(&format!("/api/v1/orders/{order}")))
        .await
        .assert_refused(401, "unauthenticated");

    // Cancel on a paid order: 409, nothing returned.
    let r = gw.cancel(&order, "alice").await;
    r.assert_refused(409, "order_closed");
    assert_eq!(rd.item_field(&item, "stock").await, 9);
    assert_eq!(rd.order(&order).await["status"], "paid");
}

async fn cancel_returns_stock_and_quota_once(backend: Backend) {
    let (_redis, mut rd, gw) = on_backend(backend, |b| b).await;
    let item = gw.new_item(2, 1).await;
    let order = gw.reserve_ok(&item, "alice").await;
    gw.reserve(&item, "alice").await.assert_refused(409, "limit_reached");
    let bob_order = gw.reserve_ok(&item, "bob").await;
    gw.reserve(&item, "carol").await.assert_refused(410, "sold_out");

    gw.cancel(&order, "bob").await.assert_refused(403, "forbidden");
    assert_eq!(rd.order(&order).await["status"], "reserved");

    let r = gw.cancel(&order, "alice").await;
    assert_eq!(r.assert_ok(), &json!({"order_id": order, "status": "cancelled"}));
    let again = gw.cancel(&order, "alice").await;
    assert_eq!(again.assert_ok(), r.assert_ok());
    assert_eq!(rd.item_field(&item, "stock").await, 1, "stock back, once");
    assert_eq!(rd.item_field(&item, "reserved").await, 1);
    assert_eq!(rd.item_field(&item, "cancelled").await, 1);
    assert_eq!(
        rd.buyers(&item).await,
        HashMap::from([("bob".to_owned(), 1)]),
        "alice's quota back, bob's kept"
    );
    gw.pay(&order, "alice").await.assert_refused(409, "order_closed");
    assert_eq!(rd.order(&order).await["status"], "cancelled");
    assert_eq!(rd.order(&bob_order).await["status"], "reserved");
    let r = gw.get_order(&order, "alice").await;
    assert_eq!(r.assert_ok()["status"], json!("cancelled"));
    let mine: Vec<String> = rd
        .events(&item)
        .await
        .into_iter()
        .filter(|e| e["order_id"] == order)
        .map(|e| e["type"].clone())
        .collect();
    assert_eq!(mine, ["reserved", "cancelled"], "one cancelled event");

    // The same user may buy again (the sold-out flag clears within a second).
    let second = send_until(Duration::from_secs(1), gw.reserve_req(&item, "alice"), |r| {
        r.status.as_u16() == 200
    })
    .await
    .expect("alice can reserve again within 1 s of cancelling");
    assert_ne!(second.json["order_id"], json!(order));
    assert_eq!(rd.item_field(&item, "stock").await, 0);
    let v = gw.stats(&item).await.assert_ok().clone();
    assert_eq!((v["reserved"].clone(), v["cancelled"].clone()), (json!(2), json!(1)));
    assert_eq!(v["stock_remaining"], json!(0));
    assert_reconcile_clean(&gw, &rd, &item).await;
}

async fn payment_timeout_expires_once_on_a_manual_clock(backend: Backend) {
    // No background sweeper: this test decides when sweeps run.
    let (_redis, mut rd, gw) = on_backend(backend, |b| {
        b.clock(Clock::manual(system_now_ms()))
            .flag("--payment-timeout", "60s")
            .flag("--workers", "false")
    })
    .await;
    let app = gw.running().app.clone();
    let item = gw.new_item(5, 1).await;
    let created = gw.now_ms();
    let a = gw.reserve(&item, "alice").await;
    let a_order = a.assert_ok()["order_id"].as_str().unwrap().to_owned();
    assert_eq!(
        parse_rfc3339(a.json["pay_before"].as_str().unwrap()),
        Some(created + 60_000),
        "pay_before is the manual clock + 60 s"
    );
    let b_order = gw.reserve_ok(&item, "bob").await;
    let c_order = gw.reserve_ok(&item, "carol").await;
    assert_eq!(rd.item_field(&item, "stock").await, 2);

    // Not due yet: nothing happens.
    gw.clock().advance(59_999);
    assert_eq!(sweep(&app.engine).await, 0);
    assert_eq!(rd.order(&a_order).await["status"], "reserved");

    gw.clock().advance(2);
    // Carol pays after her deadline: pay expires the order itself and refuses.
    gw.pay(&c_order, "carol").await.assert_refused(409, "order_closed");
    assert_eq!(rd.order(&c_order).await["status"], "expired");
    assert_eq!(rd.item_field(&item, "stock").await, 3);

    assert_eq!(sweep(&app.engine).await, 2, "alice's and bob's reservations expire");
    for o in [&a_order, &b_order, &c_order] {
        assert_eq!(rd.order(o).await["status"], "expired", "{o}");
    }
    let r = gw.get_order(&a_order, "alice").await;
    assert_eq!(r.assert_ok()["status"], json!("expired"));
    assert_eq!(rd.item_field(&item, "stock").await, 5, "stock back");
    assert_eq!(rd.item_field(&item, "reserved").await, 0);
    assert_eq!(rd.item_field(&item, "expired").await, 3);
    assert!(rd.buyers(&item).await.is_empty(), "quotas back");

    // Exactly once: sweeping again changes nothing.
    gw.clock().advance(60_000);
    assert_eq!(sweep(&app.engine).await, 0);
    assert_eq!(rd.item_field(&item, "stock").await, 5);
    assert_eq!(rd.item_field(&item, "expired").await, 3);
    let events = rd.events(&item).await;
    let expired: Vec<_> = events.iter().filter(|e| e["type"] == "expired").collect();
    assert_eq!(expired.len(), 3, "one expired event per order");

    // Closed: pay and cancel refuse; the stats count it.
    gw.pay(&a_order, "alice").await.assert_refused(409, "order_closed");
    gw.cancel(&b_order, "bob").await.assert_refused(409, "order_closed");
    gw.pay(&a_order, "bob").await.assert_refused(403, "forbidden");
    assert_eq!(rd.item_field(&item, "stock").await, 5);
    let v = gw.stats(&item).await.assert_ok().clone();
    assert_eq!(v["expired"], json!(3));
    assert_eq!(v["stock_remaining"], json!(5));
    // And alice may buy again.
    gw.reserve_ok(&item, "alice").await;
}

/// Acceptance 2: 1,000 reservations whose deadline passes while their pay
/// requests arrive, with sweeps running: every order ends paid xor expired.
async fn late_payments_race_the_sweeper(backend: Backend) {
    const N: usize = 1000;
    // The test runs the sweeps itself (two loops, as two instances would). Its gateway
    // persists nothing, so every event stays in the stream for the checks below; a second
    // instance persists them afterwards.
    let (redis, mut rd, gw) = on_backend(backend, |b| {
        b.flag("--payment-timeout", "2s").flag("--workers", "false")
    })
    .await;
    let app = gw.running().app.clone();
    let item = unique("race");
    gw.create_item(&item, N as i64, 1).await;

    let started = Instant::now();
    let reserved: Vec<(String, String, i64)> = futures_util::stream::iter(0..N)
        .map(|i| {
            let gw = &gw;
            let item = &item;
            async move {
                let user = format!("user-{i}");
                let r = gw.reserve(item, &user).await;
                let v = r.assert_ok();
                let pay_before = parse_rfc3339(v["pay_before"].as_str().unwrap()).unwrap();
                (v["order_id"].as_str().unwrap().to_owned(), user, pay_before)
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    eprintln!("{N} reservations in {:?}", started.elapsed());
    assert_eq!(rd.item_field(&item, "stock").await, 0);

    // Each payment is sent within ±40 ms of its own order's deadline, while two
    // sweep loops (as on two instances) expire whatever is due.
    let mut deadlines: Vec<i64> = reserved.iter().map(|r| r.2).collect();
    deadlines.sort_unstable();
    let wait = deadlines[0] - 100 - system_now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    let paying = Arc::new(AtomicBool::new(true));
    let swept = Arc::new(AtomicUsize::new(0));
    let sweepers: Vec<_> = (0..2)
        .map(|_| {
            let (app, paying, swept) = (app.clone(), paying.clone(), swept.clone());
            tokio::spawn(async move {
                while paying.load(Ordering::Relaxed) {
                    swept.fetch_add(sweep(&app.engine).await, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    let pays: Vec<(String, String, Reply)> =
        futures_util::future::join_all(reserved.iter().map(|(order, user, pay_before)| {
            let gw = &gw;
            async move {
                let at = pay_before + rand::random_range(-40..=40);
                let wait = at - system_now_ms();
                if wait > 0 {
                    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                }
                (order.clone(), user.clone(), gw.pay(order, user).await)
            }
        }))
        .await;
    paying.store(false, Ordering::Relaxed);
    for s in sweepers {
        s.await.unwrap();
    }
    // Whatever is still reserved expires once its deadline is past.
    let last = deadlines[N - 1];
    let wait = last + 50 - system_now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(wait as u64)).await;
    }
    let late = sweep(&app.engine).await;
    swept.fetch_add(late, Ordering::Relaxed);

    // Every order is paid xor expired, and its pay answer says which.
    let mut paid_users = HashSet::new();
    let mut paid = 0i64;
    let mut expired = 0i64;
    for (order, user, r) in &pays {
        let status = rd.order(order).await["status"].clone();
        match (r.status.as_u16(), r.error(), status.as_str()) {
            (200, _, "paid") => {
                assert_eq!(r.json, json!({"order_id": order, "status": "paid"}));
                paid += 1;
                paid_users.insert(user.clone());
            }
            (409, "order_closed", "expired") => expired += 1,
            other => panic!("order {order}: pay answered {} {}, status {other:?}", r.status, r.text),
        }
    }
    eprintln!(
        "paid {paid}, expired {expired} (by sweeps {}, by pay {})",
        swept.load(Ordering::Relaxed),
        expired - swept.load(Ordering::Relaxed) as i64
    );
    assert_eq!(paid + expired, N as i64);

    // Stock: exactly stock − paid; every counter agrees.
    let h = rd.item(&item).await;
    let field = |k: &str| h[k].parse::<i64>().unwrap();
    assert_eq!(field("stock"), N as i64 - paid, "{h:?}");
    assert_eq!(field("reserved"), 0, "{h:?}");
    assert_eq!(field("paid"), paid, "{h:?}");
    assert_eq!(field("expired"), expired, "{h:?}");
    // Quotas: only paid users still hold a unit; none returned twice.
    let buyers = rd.buyers(&item).await;
    assert_eq!(buyers.values().sum::<i64>(), paid, "buyers hold exactly the paid units");
    assert!(buyers.values().all(|&n| n == 1), "{buyers:?}");
    assert_eq!(buyers.keys().cloned().collect::<HashSet<_>>(), paid_users);
    // Events: one final event per order, never both.
    let mut finals: HashMap<String, Vec<String>> = HashMap::new();
    let mut reserved_events = 0;
    for e in rd.events(&item).await {
        match e["type"].as_str() {
            "reserved" => reserved_events += 1,
            t @ ("paid" | "expired") => finals.entry(e["order_id"].clone()).or_default().push(t.to_owned()),
            other => panic!("unexpected {other} event"),
        }
    }
    assert_eq!(reserved_events, N);
    assert_eq!(finals.values().map(Vec::len).sum::<usize>(), N, "paid + expired events");
    assert_eq!(finals.len(), N);
    for (order, _, r) in &pays {
        let want = if r.status.as_u16() == 200 { "paid" } else { "expired" };
        assert_eq!(finals[order], [want], "order {order}");
    }
    let deadlines_left: i64 = redis::cmd("ZCARD")
        .arg(seckill_gateway::engine::keys::deadlines(
            seckill_gateway::ids::shard_of(&item),
        ))
        .query_async(&mut rd.conn)
        .await
        .unwrap();
    assert_eq!(deadlines_left, 0, "no deadline left behind");
    // Acceptance 4: an instance with the persistence worker drains the streams; then the
    // database statuses equal Redis statuses.
    let persister = redis.builder().flag("--payment-timeout", "2s").start().await;
    assert_reconcile_clean(&persister, &rd, &item).await;
}

/// Acceptance 3: two gateways on one Redis; the sold-out flag of the second
/// clears when a unit comes back, and the unit is bought by another user.
async fn two_gateways_share_the_sold_out_flag_and_its_clearing(backend: Backend) {
    // Long flag TTLs: only pub/sub can clear them within this test.
    let (redis, mut rd, a) = on_backend(backend, |b| b.flag("--sold-out-ttl", "60s")).await;
    let b = redis.builder().flag("--sold-out-ttl", "60s").start().await;
    let item = a.new_item(1, 1).await;

    let order = a.reserve_ok(&item, "alice").await;
    a.reserve(&item, "bob").await.assert_refused(410, "sold_out");
    // B learns it from one script call, then answers locally.
    let known = send_until(Duration::from_secs(2), b.reserve_req(&item, "carol"), |r| {
        r.status.as_u16() != 404
    })
    .await
    .expect("B knows the item (catalogue or pub/sub)");
    known.assert_refused(410, "sold_out");
    rd.reset_stats().await;
    for user in ["dave", "erin", "frank"] {
        b.reserve(&item, user).await.assert_refused(410, "sold_out");
        a.reserve(&item, user).await.assert_refused(410, "sold_out");
    }
    let calls = rd.command_calls().await;
    assert_eq!(
        ["evalsha", "eval", "hgetall"]
            .iter()
            .map(|c| calls.get(*c).copied().unwrap_or(0))
            .sum::<u64>(),
        0,
        "both flags set: no script, no item read: {calls:?}"
    );
    let r = b.get_item(&item).await;
    assert_eq!(r.assert_ok()["state"], json!("sold_out"));

    // Cancel on A: within a second B sells the unit to another user.
    a.cancel(&order, "alice").await.assert_ok();
    let t = Instant::now();
    let bought = send_until(Duration::from_secs(1), b.reserve_req(&item, "grace"), |r| {
        match (r.status.as_u16(), r.error()) {
            (200, _) => true,
            (410, "sold_out") => false,
            _ => panic!("B answered {} {}", r.status, r.text),
        }
    })
    .await
    .expect("B's sold-out flag clears within 1 s of the cancel on A");
    eprintln!("B sold the returned unit {:?} after the cancel", t.elapsed());
    assert_eq!(bought.json["user_id"], json!("grace"));
    let grace_order = bought.json["order_id"].as_str().unwrap().to_owned();
    assert_eq!(rd.item_field(&item, "stock").await, 0);
    assert_eq!(rd.item_field(&item, "reserved").await, 1);
    assert_eq!(rd.item_field(&item, "cancelled").await, 1);
    assert_eq!(
        rd.buyers(&item).await,
        HashMap::from([("grace".to_owned(), 1)]),
        "the unit is grace's; alice's quota came back"
    );
    // Sold out again on both.
    a.reserve(&item, "heidi").await.assert_refused(410, "sold_out");
    b.reserve(&item, "ivan").await.assert_refused(410, "sold_out");
    // The order is one order, whichever gateway is asked.
    let r = a.get_order(&grace_order, "grace").await;
    assert_eq!(r.assert_ok()["status"], json!("reserved"));
    a.pay(&grace_order, "grace").await.assert_ok();
    let r = b.pay(&grace_order, "grace").await;
    assert_eq!(r.assert_ok(), &json!({"order_id": grace_order, "status": "paid"}));
    assert_eq!(rd.item_field(&item, "paid").await, 1);
}
