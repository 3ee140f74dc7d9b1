//! The durable order pipeline (issue 3), end to end against real redis-server and
//! PostgreSQL: a SIGKILL mid-burst loses nothing, a database outage is buffered and drained,
//! redelivered and reordered events are idempotent, a poison event reaches the dead-letter
//! stream without blocking the ones behind it, and `reconcile` finds and repairs a planted
//! difference.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::binary::{Binary, BinaryBuilder, command};
use common::gateway::{Builder, Gateway};
use common::http::{ADMIN_TOKEN, Api, send, try_send};
use common::inspect::Redis;
use common::{PgServer, RedisServer, poll, shared_pg, unique};
use seckill_gateway::domain::{Order, OrderEvent, RefundOf};
use seckill_gateway::engine::OrderStatus;
use seckill_gateway::store::Store;
use serde_json::json;

/// Reserve one unit: `Ok(Some(order_id))` on 200, `Ok(None)` on a refusal, `Err` when the
/// answer never came (connection cut).
async fn reserve(api: &Api, item: &str, user: &str) -> Result<Option<String>, String> {
    let r = try_send(api.reserve_req(item, user).json(&json!({"qty": 1})))
        .await
        .map_err(|e| e.to_string())?;
    if r.status == 200 {
        Ok(Some(r.order_id()))
    } else {
        assert!(
            [409, 410, 503].contains(&r.status.as_u16()),
            "unexpected {}: {}",
            r.status,
            r.text
        );
        Ok(None)
    }
}

/// An in-process gateway on the test's servers: entries idle for a second are claimed, an
/// entry delivered three times is dead-lettered.
fn gateway(redis: &RedisServer, db: &str) -> Builder {
    Gateway::builder(&redis.url())
        .database(db)
        .flag("--store-timeout", "1s")
        .flag("--claim-idle", "1s")
        .flag("--max-deliveries", "3")
        .flag("--persist-wait", "10ms")
        .flag("--consumer-name", "in-process")
}

/// The real binary on the test's servers, with the defaults of the binary otherwise.
fn binary(redis: &RedisServer, db: &str) -> BinaryBuilder {
    Binary::builder()
        .flag("--redis-url", &redis.url())
        .flag("--database-url", db)
        .flag("--admin-token", ADMIN_TOKEN)
        .flag("--rate-per-user", "0")
        .flag("--rate-per-ip", "0")
        .flag("--consumer-name", "killed-gateway")
        .env("RUST_LOG", "warn")
}

async fn store(db: &str) -> Store {
    Store::connect(db, Duration::from_secs(5)).await.unwrap()
}

async fn rows(store: &Store, item: &str) -> Vec<seckill_gateway::engine::Order> {
    store.orders(Some(item)).await.unwrap()
}

/// Acceptance 1 and 4: SIGKILL mid-burst, restart, quiet: every 200 is a row, every row was
/// a 200 or a request cut off by the kill, no duplicate, rows ≤ stock; reconcile is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_burst_loses_no_acknowledged_order() {
    let redis = RedisServer::start();
    let db = shared_pg();
    let mut gw = binary(&redis, &db).spawn();
    gw.ready().await;
    let item = unique("kill");
    let stock = 400;
    gw.create_item(&item, stock, 1).await;

    // 1,500 shoppers, 64 in flight; SIGKILL once a few hundred answers are in.
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..1500 {
        let (api, item, answered, sem) = (gw.api.clone(), item.clone(), answered.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let user = format!("u{i}");
            let r = reserve(&api, &item, &user).await;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (user, r)
        }));
    }
    while answered.load(std::sync::atomic::Ordering::SeqCst) < 250 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    gw.kill();
    let mut ok: HashMap<String, String> = HashMap::new(); // order id → user
    let mut cut_off: HashSet<String> = HashSet::new();
    for t in tasks {
        let (user, r) = t.await.unwrap();
        match r {
            Ok(Some(order)) => {
                ok.insert(order, user);
            }
            Ok(None) => {}
            Err(_) => {
                cut_off.insert(user);
            }
        }
    }
    assert!(!ok.is_empty(), "some orders were acknowledged before the kill");
    assert!(!cut_off.is_empty(), "the kill cut some requests off");

    // Restart on the same port and consumer name: the worker drains its own pending first.
    let mut gw = binary(&redis, &db).port(gw.port()).spawn();
    gw.ready().await;
    let store = store(&db).await;
    let mut rd = Redis::connect(&redis).await;
    poll(Duration::from_secs(30), async || {
        let held = rd.item_field(&item, "reserved").await + rd.item_field(&item, "paid").await;
        (rows(&store, &item).await.len() as i64 == held).then_some(())
    })
    .await
    .expect("every reservation Redis holds is a row");

    let rows = rows(&store, &item).await;
    let ids: HashSet<&str> = rows.iter().map(|r| r.order_id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "no duplicate rows");
    assert!(rows.len() as i64 <= stock, "rows {} ≤ stock {stock}", rows.len());
    for (order, user) in &ok {
        assert!(
            ids.contains(order.as_str()),
            "acknowledged order {order} of {user} is missing"
        );
    }
    for r in &rows {
        assert!(
            ok.contains_key(&r.order_id) || cut_off.contains(&r.user_id),
            "row {} of {} was never answered 200 and its request was not cut off",
            r.order_id,
            r.user_id
        );
        assert_eq!(r.status, OrderStatus::Reserved);
    }
    let stock_left = rd.item_field(&item, "stock").await;
    assert_eq!(stock_left, stock - rows.len() as i64, "stock = total − rows");

    let report = seckill_gateway::orders::reconcile::reconcile(&mut rd.conn, &store, Some(&item), None)
        .await
        .unwrap();
    assert!(
        report.differences.is_empty(),
        "reconcile clean: {:?}",
        report.differences
    );
    gw.kill();
}

/// Acceptance 2: PostgreSQL stopped during a burst and started again: every order arrives,
/// none twice, and `/readyz` said degraded meanwhile (while still accepting reservations).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_buffered_and_drained() {
    let redis = RedisServer::start();
    let mut pg = PgServer::start();
    pg.create_database("orders");
    let db = pg.url("orders");
    let mut gw = gateway(&redis, &db).start().await;
    let item = unique("outage");
    gw.create_item(&item, 1000, 1).await;

    let mut acknowledged = HashSet::new();
    for i in 0..100 {
        if let Some(o) = reserve(&gw, &item, &format!("a{i}")).await.unwrap() {
            acknowledged.insert(o);
        }
    }
    pg.stop();
    for i in 0..150 {
        let o = reserve(&gw, &item, &format!("b{i}")).await.unwrap();
        acknowledged.insert(o.expect("reservations are accepted while the database is down"));
    }
    let ready = gw.readyz_until("degraded").await.json;
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(ready["store"].as_str().unwrap().starts_with("down"), "{ready}");
    assert_eq!(acknowledged.len(), 250);

    pg.start_again();
    let store = store(&db).await;
    poll(Duration::from_secs(30), async || {
        (rows(&store, &item).await.len() == 250).then_some(())
    })
    .await
    .expect("all 250 orders persisted after the database came back");
    let rows = rows(&store, &item).await;
    let ids: HashSet<String> = rows.iter().map(|r| r.order_id.clone()).collect();
    assert_eq!(ids, acknowledged, "exactly the acknowledged orders, none twice");
    let ready = gw.readyz_until("ready").await.json;
    assert_eq!(ready["status"], "ready", "{ready}");
    gw.stop().await;
}

fn event(order: &str, item: &str, status: OrderStatus, at: i64) -> OrderEvent {
    OrderEvent {
        status,
        order_id: order.into(),
        item_id: item.into(),
        user_id: "u1".into(),
        qty: 1,
        at_ms: at,
        created_ms: 1_000,
        pay_before_ms: 901_000,
        idem_key: String::new(),
        price_cents: None,
        refund: None,
    }
}

/// Acceptance 3: the same events applied twice, and out of order, on both databases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_and_reordered_events_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    for db in [shared_pg(), format!("sqlite://{}/r.db", dir.path().display())] {
        let store = store(&db).await;
        let item = unique("redeliver");
        let (a, b, c) = (unique("a"), unique("b"), unique("c"));
        let reserved = event(&a, &item, OrderStatus::Reserved, 1_000);
        let paid = event(&a, &item, OrderStatus::Paid, 2_000);
        store.apply(std::slice::from_ref(&reserved)).await.unwrap();
        store.apply(std::slice::from_ref(&reserved)).await.unwrap();
        store.apply(std::slice::from_ref(&paid)).await.unwrap();
        // Redelivered `reserved` after `paid`: nothing moves back.
        store
            .apply(&[reserved.clone(), paid.clone(), reserved.clone()])
            .await
            .unwrap();
        // Out of order: `cancelled` arrives before `reserved`.
        store
            .apply(&[event(&b, &item, OrderStatus::Cancelled, 3_000)])
            .await
            .unwrap();
        store
            .apply(&[event(&b, &item, OrderStatus::Reserved, 1_000)])
            .await
            .unwrap();
        // A final status never changes into another final one.
        store
            .apply(&[
                event(&c, &item, OrderStatus::Reserved, 1_000),
                event(&c, &item, OrderStatus::Expired, 5_000),
            ])
            .await
            .unwrap();
        store
            .apply(&[event(&c, &item, OrderStatus::Paid, 6_000)])
            .await
            .unwrap();

        // Refunds move on from a final status, and never back: `refund_due` (a late
        // payment of an expired order) before its `expired`; `refunded` of a paid order,
        // then a redelivered `paid`. The price comes with whichever event has it.
        let (d, e) = (unique("d"), unique("e"));
        let refund = |of: OrderStatus, restocked: bool| Some(RefundOf { status: of, restocked });
        let priced = |mut ev: OrderEvent| {
            ev.price_cents = Some(1_999);
            ev
        };
        let due = OrderEvent {
            refund: refund(OrderStatus::Expired, true),
            ..priced(event(&d, &item, OrderStatus::RefundDue, 8_000))
        };
        store.apply(std::slice::from_ref(&due)).await.unwrap();
        store
            .apply(&[
                event(&d, &item, OrderStatus::Reserved, 1_000),
                event(&d, &item, OrderStatus::Expired, 7_000),
            ])
            .await
            .unwrap();
        store
            .apply(&[
                priced(event(&e, &item, OrderStatus::Reserved, 1_000)),
                event(&e, &item, OrderStatus::Paid, 2_000),
            ])
            .await
            .unwrap();
        let refunded = OrderEvent {
            refund: refund(OrderStatus::Paid, false),
            ..event(&e, &item, OrderStatus::Refunded, 9_000)
        };
        store.apply(std::slice::from_ref(&refunded)).await.unwrap();
        store
            .apply(&[event(&e, &item, OrderStatus::Paid, 2_000), due.clone()])
            .await
            .unwrap();

        let orders: HashMap<String, Order> = rows(&store, &item)
            .await
            .into_iter()
            .map(|o| (o.order_id.clone(), o))
            .collect();
        let got: HashMap<&String, OrderStatus> = orders.iter().map(|(id, o)| (id, o.status)).collect();
        assert_eq!(got.len(), 5, "{db}: one row per order");
        assert_eq!(got[&a], OrderStatus::Paid, "{db}");
        assert_eq!(got[&b], OrderStatus::Cancelled, "{db}");
        assert_eq!(got[&c], OrderStatus::Expired, "{db}");
        assert_eq!(got[&d], OrderStatus::RefundDue, "{db}");
        assert_eq!(got[&e], OrderStatus::Refunded, "{db}");
        assert_eq!(orders[&d].refund, refund(OrderStatus::Expired, true), "{db}");
        assert_eq!(orders[&e].refund, refund(OrderStatus::Paid, false), "{db}");
        assert_eq!(
            (orders[&d].price_cents, orders[&e].price_cents),
            (Some(1_999), Some(1_999)),
            "{db}"
        );
        assert_eq!(orders[&a].price_cents, None, "{db}: an order of events without a price");

        // Every step keeps its time: a payment and its refund in one batch, and a payment
        // persisted after its refund; the report counts each on its day.
        const DAY: i64 = 86_400_000;
        let day = |n: i64| 20_000 * DAY + n * DAY + 3_600_000;
        let (f, g) = (unique("f"), unique("g"));
        let ev = |o: &str, status, at| OrderEvent {
            price_cents: Some(100),
            refund: (status == OrderStatus::Refunded).then_some(RefundOf {
                status: OrderStatus::Paid,
                restocked: true,
            }),
            created_ms: day(0),
            ..event(o, &item, status, at)
        };
        store
            .apply(&[
                ev(&f, OrderStatus::Reserved, day(0)),
                ev(&f, OrderStatus::Paid, day(1)),
                ev(&f, OrderStatus::Refunded, day(2)),
            ])
            .await
            .unwrap();
        store
            .apply(&[
                ev(&g, OrderStatus::Reserved, day(0)),
                ev(&g, OrderStatus::Refunded, day(2)),
            ])
            .await
            .unwrap();
        store.apply(&[ev(&g, OrderStatus::Paid, day(1))]).await.unwrap();
        let report = store.sales(day(0) - 3_600_000, day(3) - 3_600_000).await.unwrap();
        let on = |n: i64| {
            report
                .iter()
                .find(|r| r.item_id == item && r.day_ms == day(n) - 3_600_000)
                .map(|r| (r.reserved, r.paid, r.refunded, r.revenue_cents))
        };
        assert_eq!(on(0), Some((2, 0, 0, 0)), "{db}: {report:?}");
        assert_eq!(on(1), Some((0, 2, 0, 200)), "{db}: both payments on their day");
        assert_eq!(on(2), Some((0, 0, 2, -200)), "{db}: both refunds on theirs");
        let rows = rows(&store, &item).await;
        let status = |o: &str| rows.iter().find(|r| r.order_id == o).map(|r| r.status);
        assert_eq!(
            (status(&f), status(&g)),
            (Some(OrderStatus::Refunded), Some(OrderStatus::Refunded)),
            "{db}"
        );
    }
}

/// Acceptance 3: a poison event goes to the dead-letter stream after a few deliveries and
/// does not hold up the events behind it. Acceptance 4: reconcile reports a planted
/// difference (a row deleted by hand), repairs it with `--repair`, then reports clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_event_dead_letters_and_reconcile_repairs() {
    let redis = RedisServer::start();
    let db = shared_pg();
    let item = unique("poison");
    let mut rd = Redis::connect(&redis).await;
    // The poison entry is in the stream before the worker starts.
    rd.add_event(&item, &[("type", "teleported"), ("order_id", "x")]).await;
    let mut gw = gateway(&redis, &db).start().await;
    gw.create_item(&item, 10, 1).await;
    let mut acknowledged = HashSet::new();
    for i in 0..5 {
        acknowledged.insert(reserve(&gw, &item, &format!("p{i}")).await.unwrap().unwrap());
    }
    let store = store(&db).await;
    poll(Duration::from_secs(20), async || {
        (rows(&store, &item).await.len() == 5).then_some(())
    })
    .await
    .expect("the good events are persisted");
    poll(Duration::from_secs(20), async || {
        (rd.dead_letters(&item).await.len() == 1).then_some(())
    })
    .await
    .expect("the poison event reaches the dead-letter stream");
    let letters = rd.dead_letters(&item).await;
    assert_eq!(letters[0]["f:type"], "teleported");
    assert!(letters[0]["error"].contains("unknown event type"), "{:?}", letters[0]);
    let metrics = send(gw.get("/metrics")).await.text;
    assert!(metrics.contains("seckill_dead_letters_total 1"), "dead letter counted");

    // Reconcile through the real CLI: clean, then a planted difference, repaired.
    let cli = |args: &[&str]| {
        let out = command()
            .args(["--redis-url", &redis.url(), "--database-url", &db])
            .arg("reconcile")
            .args(["--item", &item])
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = cli(&[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("clean"), "{out}");

    let victim = acknowledged.iter().next().unwrap().clone();
    assert_eq!(store.delete_order(&victim).await.unwrap(), 1);
    let (code, out) = cli(&[]);
    assert_eq!(code, Some(1), "a difference exits 1: {out}");
    assert!(out.contains(&victim) && out.contains("missing_in_database"), "{out}");

    let (code, out) = cli(&["--repair"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("repaired (events re-emitted): 1"), "{out}");
    poll(Duration::from_secs(20), async || {
        store.order(&victim).await.unwrap().is_some().then_some(())
    })
    .await
    .expect("the re-emitted event is persisted");
    let (code, out) = cli(&[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("clean"), "{out}");
    gw.stop().await;
}

/// The worker runs apart from the front door (`seckill-gateway worker` is
/// `server::start(.., serve_http: false)`): a gateway without workers takes reservations, a
/// worker-only instance persists them, and acknowledged entries are trimmed from the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_worker_persists_and_trims() {
    let redis = RedisServer::start();
    let db = shared_pg();
    let mut gw = gateway(&redis, &db).flag("--workers", "false").start().await;
    let item = unique("apart");
    gw.create_item(&item, 100, 1).await;
    let mut acknowledged = HashSet::new();
    for i in 0..40 {
        acknowledged.insert(reserve(&gw, &item, &format!("w{i}")).await.unwrap().unwrap());
    }
    let mut rd = Redis::connect(&redis).await;
    let queued = rd.xlen(&item).await;
    assert_eq!(queued, 40, "nothing persisted or trimmed without a worker");

    let mut worker = gateway(&redis, &db).worker_only().start().await;
    let store = store(&db).await;
    poll(Duration::from_secs(20), async || {
        (rows(&store, &item).await.len() == 40).then_some(())
    })
    .await
    .expect("the worker-only instance persists every order");
    let ids: HashSet<String> = rows(&store, &item).await.into_iter().map(|o| o.order_id).collect();
    assert_eq!(ids, acknowledged);
    poll(Duration::from_secs(20), async || {
        (rd.xlen(&item).await <= 1).then_some(())
    })
    .await
    .expect("acknowledged entries are trimmed");
    worker.stop().await;
    gw.stop().await;
}

/// Issue 12, acceptance 5: Redis drops every client connection again and again during a
/// burst (`CLIENT KILL TYPE normal`), so some reserve calls lose their reply after the
/// script ran. The gateway sends such a call again with the same order ids: every
/// reservation made is answered 200 (a row whose order was never answered would be a 503
/// for an order that exists), and a 503 is only for an order that does not exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_made_when_the_connection_broke_is_answered_200() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let redis = RedisServer::start();
    let db = shared_pg();
    let gw = gateway(&redis, &db).start().await;
    let item = unique("broken");
    gw.create_item(&item, 100_000, 1).await;

    let killer = {
        let client = redis.client();
        tokio::spawn(async move {
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("killer connection");
            let mut kills = 0u64;
            for _ in 0..40 {
                tokio::time::sleep(Duration::from_millis(25)).await;
                // Every normal client but this one: the gateway's connections.
                let n: Result<i64, _> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("TYPE")
                    .arg("normal")
                    .arg("SKIPME")
                    .arg("yes")
                    .query_async(&mut conn)
                    .await;
                kills += n.unwrap_or(0) as u64;
            }
            kills
        })
    };
    let api = Arc::new(gw.api.clone());
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..3_000 {
        let (api, item, sem) = (api.clone(), item.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("semaphore");
            let r = api.reserve(&item, &format!("u{i}")).await;
            (r.status.as_u16(), (r.status == 200).then(|| r.order_id()))
        }));
    }
    let mut ok = HashSet::new();
    let mut unavailable = 0;
    for t in tasks {
        match t.await.expect("task") {
            (200, Some(order)) => {
                ok.insert(order);
            }
            (503, _) => unavailable += 1,
            (other, _) => panic!("unexpected {other}"),
        }
    }
    let kills = killer.await.expect("killer");
    eprintln!(
        "{} answered 200, {unavailable} 503; {kills} connections killed",
        ok.len()
    );
    assert!(kills > 0, "the gateway's connections were cut");

    let store = store(&db).await;
    let mut rd = Redis::connect(&redis).await;
    let reserved = poll(Duration::from_secs(30), async || {
        let reserved = rd.item_field(&item, "reserved").await;
        (rows(&store, &item).await.len() as i64 == reserved).then_some(reserved)
    })
    .await
    .expect("the pipeline goes quiet");
    let rows: HashSet<String> = rows(&store, &item).await.into_iter().map(|o| o.order_id).collect();
    assert_eq!(rows.len() as i64, reserved);
    assert_eq!(
        rows.difference(&ok).count(),
        0,
        "every reservation made was answered 200 ({} made, {} answered)",
        rows.len(),
        ok.len()
    );
    assert_eq!(ok.difference(&rows).count(), 0, "every 200 is a row");
}
