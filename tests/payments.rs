//! Payments and refunds (issue 14, acceptance 1 and 2) on the real gateway: the payment
//! provider's signed callback (`POST /webhooks/payments`), a payment that comes after its
//! order closed (`refund_due`, also across a SIGKILL), and the operator's refund
//! (`POST /admin/v1/orders/{id}/refund`), exactly once under concurrency, on the embedded
//! engine (SQLite) and on a real redis-server (PostgreSQL), the database rows following.

mod common;

use std::time::Duration;

use common::binary::Binary;
use common::gateway::{Builder, Gateway};
use common::http::{ADMIN_TOKEN, Api, Reply, RequestExt, send};
use common::inspect::Redis;
use common::{RedisServer, free_port, poll, shared_pg, unique};
use reqwest::RequestBuilder;
use seckill_gateway::clock::system_now_ms;
use seckill_gateway::domain::{OrderStatus, RefundOf};
use seckill_gateway::payments::{TOLERANCE_S, sign};
use seckill_gateway::store::Store;
use serde_json::{Value, json};

const SECRET: &str = "test-payment-secret-0123";
/// `item_body`'s unit price.
const PRICE: i64 = 1999;

#[derive(Clone, Copy, Debug)]
enum Engine {
    Embedded,
    Redis,
}

/// A gateway on `engine` with a database of its own (SQLite embedded, PostgreSQL with
/// Redis); the Redis server and the database URL are kept for the test.
struct Sale {
    gw: Gateway,
    db: String,
    _redis: Option<RedisServer>,
    _dir: tempfile::TempDir,
}

async fn sale(engine: Engine, configure: impl FnOnce(Builder) -> Builder) -> Sale {
    let dir = tempfile::tempdir().unwrap();
    let (builder, db, redis) = match engine {
        Engine::Embedded => {
            let db = format!("sqlite://{}/orders.db", dir.path().display());
            (Gateway::builder("unused").without("--redis-url"), db, None)
        }
        Engine::Redis => {
            let redis = RedisServer::start();
            (Gateway::builder(&redis.url()), shared_pg(), Some(redis))
        }
    };
    let gw = configure(builder.database(&db)).start().await;
    Sale {
        gw,
        db,
        _redis: redis,
        _dir: dir,
    }
}

/// The provider's callback: `body` signed with `secret` at `t` (unix seconds).
fn callback(api: &Api, body: &str, secret: &str, t: i64) -> RequestBuilder {
    let sig = sign(secret.as_bytes(), t, body.as_bytes());
    api.post("/webhooks/payments")
        .header("x-seckill-signature", format!("t={t},v1={sig}"))
        .header("content-type", "application/json")
        .body(body.to_owned())
}

fn now_s() -> i64 {
    system_now_ms() / 1000
}

fn payment(payment_id: &str, order: &str, amount: i64, status: &str) -> String {
    json!({"payment_id": payment_id, "order_id": order, "amount_cents": amount, "status": status}).to_string()
}

async fn order(api: &Api, order: &str, user: &str) -> Value {
    send(api.get(&format!("/api/v1/orders/{order}")).user(user))
        .await
        .assert_ok()
        .clone()
}

async fn refund(api: &Api, order: &str, restock: bool) -> Reply {
    send(
        api.admin(api.post(&format!("/admin/v1/orders/{order}/refund")))
            .json(&json!({ "restock": restock })),
    )
    .await
}

async fn stock(api: &Api, item: &str) -> i64 {
    api.get_item(item).await.assert_ok()["stock_remaining"]
        .as_i64()
        .expect("stock_remaining")
}

/// The database's row of an order once it reaches `status` (the worker's lag with Redis).
async fn row(db: &str, order: &str, status: OrderStatus) -> seckill_gateway::domain::Order {
    let store = Store::connect(db, Duration::from_secs(5)).await.expect("store");
    poll(Duration::from_secs(15), async || {
        store.order(order).await.ok().flatten().filter(|o| o.status == status)
    })
    .await
    .unwrap_or_else(|| panic!("order {order} {status:?} in the database"))
}

// ---- the signed callback ---------------------------------------------------------------

async fn a_signed_payment_pays_and_nothing_else_changes_anything(engine: Engine) {
    let s = sale(engine, |b| b.flag("--payment-secret", SECRET)).await;
    let gw = &s.gw;
    let item = gw.new_item(10, 2).await;
    let o = gw.reserve_ok(&item, "alice").await;
    let view = order(gw, &o, "alice").await;
    assert_eq!(
        (view["price_cents"].clone(), view["amount_cents"].clone()),
        (json!(PRICE), json!(PRICE))
    );

    // Only the provider pays.
    gw.pay(&o, "alice").await.assert_refused(403, "forbidden");

    // Refused callbacks change nothing.
    let body = payment("pay-1", &o, PRICE, "succeeded");
    let t = now_s();
    let altered = payment("pay-1", &o, PRICE + 1, "succeeded");
    let sig = sign(SECRET.as_bytes(), t, body.as_bytes());
    let refused = [
        ("wrong secret", callback(gw, &body, "another-secret-0123456", t)),
        ("stale", callback(gw, &body, SECRET, t - TOLERANCE_S - 5)),
        ("future", callback(gw, &body, SECRET, t + 3_600)),
        (
            "altered body",
            gw.post("/webhooks/payments")
                .header("x-seckill-signature", format!("t={t},v1={sig}"))
                .body(altered),
        ),
        ("unsigned", gw.post("/webhooks/payments").body(body.clone())),
    ];
    for (what, req) in refused {
        let r = send(req).await;
        r.assert_refused(401, "bad_signature");
        assert!(
            r.json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {}",
            r.text
        );
    }
    assert_eq!(
        order(gw, &o, "alice").await["status"],
        "reserved",
        "refused callbacks change nothing"
    );

    // Signed, but not what the order costs.
    let cheap = payment("pay-cheap", &o, PRICE - 1, "succeeded");
    send(callback(gw, &cheap, SECRET, t))
        .await
        .assert_refused(409, "amount_mismatch");
    // A failed payment: recorded, the order waits for another.
    let failed = payment("pay-failed", &o, PRICE, "failed");
    let r = send(callback(gw, &failed, SECRET, t)).await;
    assert_eq!(r.json["status"], "reserved", "{}", r.text);
    assert_eq!(order(gw, &o, "alice").await["status"], "reserved");

    // The payment: paid. The same payment again: the same answer, nothing changes again.
    let first = send(callback(gw, &body, SECRET, t)).await;
    assert_eq!(first.status.as_u16(), 200, "{}", first.text);
    assert_eq!(first.json["status"], "paid");
    let paid = order(gw, &o, "alice").await;
    assert_eq!(paid["status"], "paid");
    tokio::time::sleep(Duration::from_millis(20)).await;
    let again = send(callback(gw, &body, SECRET, now_s())).await;
    assert_eq!(
        (again.status, &again.text),
        (first.status, &first.text),
        "a retry is answered the same"
    );
    assert_eq!(
        order(gw, &o, "alice").await["updated_at"],
        paid["updated_at"],
        "paid once"
    );
    if let Engine::Redis = engine {
        let mut rd = Redis::connect(s._redis.as_ref().unwrap()).await;
        let paid_events = rd
            .events(&item)
            .await
            .into_iter()
            .filter(|e| e.get("order_id") == Some(&o) && e.get("type").map(String::as_str) == Some("paid"))
            .count();
        assert_eq!(paid_events, 1, "one paid event for two deliveries");
    }
    // Another payment of a paid order changes nothing either.
    let second = payment("pay-2", &o, PRICE, "succeeded");
    assert_eq!(send(callback(gw, &second, SECRET, t)).await.json["status"], "paid");
    assert_eq!(order(gw, &o, "alice").await["updated_at"], paid["updated_at"]);

    // An order that does not exist, and a body that is not a payment.
    let ghost = payment("pay-ghost", "0190c1f2-0000-7000-8000-000000000000", PRICE, "succeeded");
    send(callback(gw, &ghost, SECRET, t))
        .await
        .assert_refused(404, "unknown_order");
    let junk = r#"{"payment_id": "p", "order_id": 3}"#;
    send(callback(gw, junk, SECRET, t))
        .await
        .assert_refused(400, "bad_request");
    let row = row(&s.db, &o, OrderStatus::Paid).await;
    assert_eq!(row.price_cents, Some(PRICE));
}

/// Without a secret the callback is refused, and the shopper pays (demo, load tests).
async fn without_a_secret_the_shopper_pays_and_callbacks_are_refused(engine: Engine) {
    let s = sale(engine, |b| b).await;
    let gw = &s.gw;
    let item = gw.new_item(10, 2).await;
    let o = gw.reserve_ok(&item, "alice").await;
    let body = payment("pay-1", &o, PRICE, "succeeded");
    send(callback(gw, &body, SECRET, now_s()))
        .await
        .assert_refused(401, "bad_signature");
    gw.pay(&o, "alice").await.assert_ok();
}

/// A payment for an order that already expired (or was cancelled) is recorded, never
/// dropped: the order becomes `refund_due` (200 to the provider), stats count it, revenue
/// leaves it out, the metric counts it; then the operator refunds it.
async fn a_payment_after_expiry_is_owed_back(engine: Engine) {
    let s = sale(engine, |b| {
        b.flag("--payment-secret", SECRET)
            .flag("--payment-timeout", "1s")
            .flag("--sweep-interval", "100ms")
    })
    .await;
    let gw = &s.gw;
    let item = gw.new_item(10, 2).await;
    let late = gw.reserve_ok(&item, "alice").await;
    let cancelled = gw.reserve_ok(&item, "bob").await;
    gw.cancel(&cancelled, "bob").await.assert_ok();
    poll(Duration::from_secs(10), async || {
        (order(gw, &late, "alice").await["status"] == "expired").then_some(())
    })
    .await
    .expect("the reservation expires");
    assert_eq!(stock(gw, &item).await, 10);

    for (o, pid) in [(&late, "pay-late"), (&cancelled, "pay-cancelled")] {
        let body = payment(pid, o, PRICE, "succeeded");
        let r = send(callback(gw, &body, SECRET, now_s())).await;
        assert_eq!(
            (r.status.as_u16(), r.json["status"].clone()),
            (200, json!("refund_due")),
            "{}",
            r.text
        );
        let again = send(callback(gw, &body, SECRET, now_s())).await;
        assert_eq!(again.text, r.text, "the same answer to the retry");
    }
    assert_eq!(stock(gw, &item).await, 10, "no unit moves");
    let due = row(&s.db, &late, OrderStatus::RefundDue).await;
    assert_eq!(
        due.refund,
        Some(RefundOf {
            status: OrderStatus::Expired,
            restocked: true
        })
    );
    row(&s.db, &cancelled, OrderStatus::RefundDue).await;
    let stats = gw.stats(&item).await.assert_ok().clone();
    assert_eq!(stats["refund_due_orders"], json!(2), "{stats}");
    assert_eq!(stats["revenue_cents"], json!(0), "owed back is not revenue: {stats}");
    let metrics = gw.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("seckill_refund_due_total ") && !l.ends_with(" 0")),
        "seckill_refund_due_total counts them"
    );

    // The operator refunds one; restock does not apply (its units came back when it closed).
    refund(gw, &late, true).await.assert_ok();
    assert_eq!(stock(gw, &item).await, 10);
    let refunded = row(&s.db, &late, OrderStatus::Refunded).await;
    assert_eq!(refunded.refund, due.refund, "the refund keeps where it came from");
    assert_eq!(gw.stats(&item).await.assert_ok()["refund_due_orders"], json!(1));
}

/// The provider's payment of an expired order survives a SIGKILL right after the 200: the
/// database has the order `refund_due` after a restart, and the provider's retry gets the
/// same answer.
async fn a_late_payment_survives_a_sigkill(engine: Engine) {
    let dir = tempfile::tempdir().unwrap();
    let redis = matches!(engine, Engine::Redis).then(RedisServer::start);
    let db = match engine {
        Engine::Embedded => format!("sqlite://{}/orders.db", dir.path().display()),
        Engine::Redis => shared_pg(),
    };
    // Restarted as the same instance: the same port, so the same stream consumer, whose
    // worker first takes what it had read and not yet persisted when it was killed. (On a
    // new port it is a new consumer, and such an entry waits `SECKILL_CLAIM_IDLE`, 30 s,
    // for XAUTOCLAIM: longer than this test waits for the row.)
    let port = free_port();
    let start = || {
        let mut b = Binary::builder()
            .port(port)
            .flag("--database-url", &db)
            .flag("--admin-token", ADMIN_TOKEN)
            .flag("--payment-secret", SECRET)
            .flag("--payment-timeout", "1s")
            .flag("--sweep-interval", "100ms")
            .flag("--demo", "false")
            .flag("--rate-per-user", "0")
            .flag("--rate-per-ip", "0")
            .dir(dir.path());
        if let Some(r) = &redis {
            b = b.flag("--redis-url", &r.url());
        }
        b.spawn()
    };
    let mut gw = start();
    gw.ready().await;
    let item = unique("late");
    gw.create_item(&item, 5, 1).await;
    let o = gw.reserve_ok(&item, "alice").await;
    poll(Duration::from_secs(10), async || {
        (order(&gw, &o, "alice").await["status"] == "expired").then_some(())
    })
    .await
    .expect("the reservation expires");
    let body = payment("pay-kill", &o, PRICE, "succeeded");
    let first = send(callback(&gw, &body, SECRET, now_s())).await;
    assert_eq!(first.json["status"], "refund_due", "{}", first.text);
    gw.kill();

    let mut gw = start();
    gw.ready().await;
    row(&db, &o, OrderStatus::RefundDue).await;
    let retry = send(callback(&gw, &body, SECRET, now_s())).await;
    assert_eq!(retry.text, first.text, "the provider's retry after the crash");
    assert_eq!(order(&gw, &o, "alice").await["status"], "refund_due");
    gw.kill();
}

// ---- refunds -----------------------------------------------------------------------------

/// 16 concurrent refunds of one paid order: every answer 200 `refunded`, the units and the
/// quota back exactly once (restock); without restock they stay out of the sale. Refused:
/// an order with nothing to refund (409), an unknown one (404), no token (403), a bad body
/// (400). The database rows follow.
async fn refunds_happen_exactly_once(engine: Engine) {
    let s = sale(engine, |b| b).await;
    let gw = &s.gw;
    let item = gw.new_item(10, 2).await;
    let api: &Api = gw;
    let reserve2 = |user: &'static str| {
        let api = api.clone();
        let item = item.clone();
        async move {
            let r = send(
                api.post(&format!("/api/v1/items/{item}/reserve"))
                    .user(user)
                    .json(&json!({"qty": 2})),
            )
            .await;
            r.assert_ok()["order_id"].as_str().expect("order_id").to_owned()
        }
    };
    let a = reserve2("alice").await;
    let b = reserve2("bob").await;
    gw.pay(&a, "alice").await.assert_ok();
    gw.pay(&b, "bob").await.assert_ok();
    assert_eq!(stock(gw, &item).await, 6);

    let answers = futures_util::future::join_all((0..16).map(|_| refund(gw, &a, true))).await;
    for r in &answers {
        assert_eq!(
            (r.status.as_u16(), r.json["status"].clone()),
            (200, json!("refunded")),
            "{}",
            r.text
        );
    }
    assert_eq!(stock(gw, &item).await, 8, "two units back, once");
    let stats = gw.stats(&item).await.assert_ok().clone();
    assert_eq!(
        (stats["paid"].clone(), stats["refunded"].clone()),
        (json!(2), json!(2)),
        "{stats}"
    );
    // alice's quota came back: she can buy two again.
    reserve2("alice").await;
    assert_eq!(stock(gw, &item).await, 6);

    // Without restock: the units stay out of the sale, bob's quota stays used.
    refund(gw, &b, false).await.assert_ok();
    refund(gw, &b, true).await.assert_ok();
    assert_eq!(stock(gw, &item).await, 6, "no unit back");
    gw.reserve(&item, "bob").await.assert_refused(409, "limit_reached");

    // Refused.
    let open = gw.reserve_ok(&item, "carol").await;
    refund(gw, &open, true).await.assert_refused(409, "order_closed");
    refund(gw, "0190c1f2-0000-7000-8000-000000000000", true)
        .await
        .assert_refused(404, "unknown_order");
    send(
        gw.post(&format!("/admin/v1/orders/{a}/refund"))
            .json(&json!({"restock": true})),
    )
    .await
    .assert_refused(403, "forbidden");
    for bad in [json!({}), json!({"restock": "yes"}), json!({"restock": true, "x": 1})] {
        send(gw.admin(gw.post(&format!("/admin/v1/orders/{a}/refund"))).json(&bad))
            .await
            .assert_refused(400, "bad_request");
    }

    let ra = row(&s.db, &a, OrderStatus::Refunded).await;
    assert_eq!(
        ra.refund,
        Some(RefundOf {
            status: OrderStatus::Paid,
            restocked: true
        })
    );
    let rb = row(&s.db, &b, OrderStatus::Refunded).await;
    assert_eq!(
        rb.refund,
        Some(RefundOf {
            status: OrderStatus::Paid,
            restocked: false
        })
    );
    assert_eq!(
        gw.stats(&item).await.assert_ok()["revenue_cents"],
        json!(0),
        "both paid orders refunded"
    );
}

macro_rules! on_engines {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    super::$name(super::Engine::Embedded).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn redis() {
                    super::$name(super::Engine::Redis).await;
                }
            }
        )*
    };
}

on_engines!(
    a_signed_payment_pays_and_nothing_else_changes_anything,
    without_a_secret_the_shopper_pays_and_callbacks_are_refused,
    a_payment_after_expiry_is_owed_back,
    a_late_payment_survives_a_sigkill,
    refunds_happen_exactly_once,
);
