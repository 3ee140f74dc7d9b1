//! The stock engines' contract (issue 5, acceptance 1): one suite, written once as generic
//! functions over [`StockEngine`], run against every engine — the Redis engine (the Lua
//! scripts, on a throwaway `redis-server`), the embedded engine, and the embedded engine
//! with its SQLite journal. Every reply of every operation is asserted exactly, and so are
//! the counters and quotas a refusal must leave alone. Interfaces: `docs/internals.md`.
//!
//! Time is a manual [`Clock`] the test moves; the Redis scripts then take `now_ms` as an
//! argument instead of Redis `TIME`, so both engines see the same instants.

mod common;

use std::time::Duration;

use common::engines::{
    EngineSettings, embedded_engine, journaled_engine, redis_engine_on_own_cluster, redis_engine_on_own_server,
};
use common::inspect::Redis;
use seckill_gateway::clock::{Clock, Millis};
use seckill_gateway::domain::RefundOf;
use seckill_gateway::engine::embedded::EmbeddedEngine;
use seckill_gateway::engine::redis::RedisEngine;
use seckill_gateway::engine::{
    ExpireReply, Expired, ItemSpec, ItemState, Order, OrderStatus, PutReply, ReserveCmd, ReserveReply, Settle,
    StockEngine, Transition, TransitionReply,
};
use seckill_gateway::ids::{new_order_id, shard_of};

/// The injected clock's start: 2023-11-14T22:13:20Z.
const NOW: Millis = 1_700_000_000_000;
/// The payment timeout of every engine here.
const TIMEOUT_MS: Millis = 60_000;

/// The engines here: the payment timeout above; idempotency keys and closed orders
/// remembered long.
const LONG: EngineSettings = EngineSettings {
    payment_timeout: Duration::from_millis(TIMEOUT_MS as u64),
    idempotency_ttl: Duration::from_secs(600),
    closed_order_ttl: Duration::from_secs(3_600),
    ..EngineSettings::TEST
};

// ---- the engines under test ---------------------------------------------------------

/// What the contract needs besides the trait: the units a user holds (`buyers` in Redis,
/// [`EmbeddedEngine::held`] in-process).
trait Probe: StockEngine {
    async fn held(&self, item_id: &str, user_id: &str) -> i64;
    /// Make the engine forget a closed order, as its TTL would (Redis: the hash's key TTL;
    /// embedded: a prune past the TTL, which the caller's clock has passed).
    async fn forget_closed(&self, order_id: &str);
}

impl Probe for RedisEngine {
    async fn held(&self, item_id: &str, user_id: &str) -> i64 {
        Redis::on(self.connection()).held(item_id, user_id).await
    }
    async fn forget_closed(&self, order_id: &str) {
        let key = seckill_gateway::engine::keys::order(order_id).expect("an order id of ours");
        let mut conn = self.connection();
        let _: i64 = redis::cmd("DEL").arg(key).query_async(&mut conn).await.expect("DEL");
    }
}

impl Probe for EmbeddedEngine {
    async fn held(&self, item_id: &str, user_id: &str) -> i64 {
        EmbeddedEngine::held(self, item_id, user_id)
    }
    async fn forget_closed(&self, _order_id: &str) {
        self.prune().await.expect("prune");
    }
}

/// `contract!(SETTINGS => f, g, …)` runs each `async fn f<E: Probe>(e: &E, clock: &Clock)`
/// against every engine, built with `SETTINGS`: `on_redis::f` (on a throwaway server of its
/// own), `on_cluster::f` (on a throwaway Redis Cluster of 3 masters), `on_embedded::f`, `on_journaled::f` (with its SQLite journal: every change
/// committed before the reply).
macro_rules! contract {
    ($settings:ident => $($name:ident),* $(,)?) => {
        mod on_redis {
            $(
                #[tokio::test]
                async fn $name() {
                    let clock = super::Clock::manual(super::NOW);
                    let (engine, _server) = super::redis_engine_on_own_server(&clock, &super::$settings);
                    super::$name(&engine, &clock).await;
                }
            )*
        }
        mod on_cluster {
            $(
                #[tokio::test]
                async fn $name() {
                    let clock = super::Clock::manual(super::NOW);
                    let (engine, _cluster) = super::redis_engine_on_own_cluster(&clock, &super::$settings).await;
                    super::$name(&engine, &clock).await;
                }
            )*
        }
        mod on_embedded {
            $(
                #[tokio::test]
                async fn $name() {
                    let clock = super::Clock::manual(super::NOW);
                    let engine = super::embedded_engine(&clock, &super::$settings, None);
                    super::$name(&engine, &clock).await;
                }
            )*
        }
        mod on_journaled {
            $(
                #[tokio::test]
                async fn $name() {
                    let clock = super::Clock::manual(super::NOW);
                    let journaled = super::journaled_engine(&clock, &super::$settings).await;
                    super::$name(&journaled.engine, &clock).await;
                }
            )*
        }
    };
}

contract!(LONG =>
    put_item_contract,
    reserve_contract,
    sale_window_contract,
    check_order_contract,
    transition_contract,
    expiry_on_transition_contract,
    expire_contract,
    expire_due_contract,
    expire_due_max_same_shard_contract,
    expire_due_max_is_per_shard_contract,
    order_contract,
    catalog_contract,
    payment_contract,
    refund_contract,
    refund_of_a_forgotten_order_contract,
);

/// Idempotency keys forgotten after one second.
const IDEM_1S: EngineSettings = EngineSettings {
    idempotency_ttl: Duration::from_secs(1),
    closed_order_ttl: Duration::from_secs(3_600),
    ..LONG
};
/// Closed orders forgotten after one second, idempotency keys after ten minutes.
const CLOSED_1S: EngineSettings = EngineSettings {
    idempotency_ttl: Duration::from_secs(600),
    closed_order_ttl: Duration::from_secs(1),
    ..LONG
};

mod idem_1s {
    use super::*;
    contract!(IDEM_1S => idempotency_key_forgotten_after_ttl_contract);
}

mod closed_1s {
    use super::*;
    contract!(CLOSED_1S => retry_after_closed_order_forgotten_contract);
}

// ---- helpers --------------------------------------------------------------------------

/// An item on sale from a second before [`NOW`] for an hour.
fn spec(item: &str, stock: i64, limit: i64) -> ItemSpec {
    ItemSpec {
        item_id: item.to_owned(),
        name: format!("{item} (contract)"),
        price_cents: 1_999,
        stock_total: stock,
        per_user_limit: limit,
        starts_ms: NOW - 1_000,
        ends_ms: NOW + 3_600_000,
        buckets: 1,
        paused: false,
    }
}

fn cmd(item: &str, user: &str, qty: i64, key: Option<&str>) -> ReserveCmd {
    ReserveCmd {
        item_id: item.to_owned(),
        user_id: user.to_owned(),
        qty,
        order_id: new_order_id(item),
        idem_key: key.map(str::to_owned),
        buckets: 1,
    }
}

/// `(stock, reserved, paid, cancelled, expired)` of an item.
async fn counters<E: Probe>(e: &E, item: &str) -> (i64, i64, i64, i64, i64) {
    let s = e
        .item(item)
        .await
        .expect("item")
        .unwrap_or_else(|| panic!("item {item} missing"));
    (s.stock, s.reserved, s.paid, s.cancelled, s.expired)
}

async fn put<E: Probe>(e: &E, s: &ItemSpec) {
    assert_eq!(
        e.put_item(s).await.expect("put_item"),
        PutReply::Stored { stock: s.stock_total }
    );
}

/// Reserve and return the order id, asserting the exact `Reserved` reply.
async fn reserve_ok<E: Probe>(e: &E, clock: &Clock, c: &ReserveCmd, stock_after: i64) -> String {
    let now = clock.now_ms();
    assert_eq!(
        e.reserve(c).await.expect("reserve"),
        ReserveReply::Reserved {
            order_id: c.order_id.clone(),
            created_ms: now,
            pay_before_ms: now + TIMEOUT_MS,
            stock_after,
        },
        "reserve {c:?}"
    );
    c.order_id.clone()
}

async fn status<E: Probe>(e: &E, order_id: &str) -> OrderStatus {
    e.order(order_id)
        .await
        .expect("order")
        .unwrap_or_else(|| panic!("order {order_id} missing"))
        .status
}

/// Everything a refused call must leave alone: the item's state and the user's quota.
async fn snapshot<E: Probe>(e: &E, item: &str, user: &str) -> (Option<ItemState>, i64) {
    (e.item(item).await.expect("item"), e.held(item, user).await)
}

/// Two item ids in different shards.
fn two_shards() -> (String, String) {
    let a = "shard-a".to_owned();
    let b = (0..)
        .map(|i| format!("shard-b{i}"))
        .find(|b| shard_of(b) != shard_of(&a))
        .expect("another shard");
    (a, b)
}

fn sorted(mut v: Vec<Expired>) -> Vec<Expired> {
    v.sort_by(|x, y| x.order_id.cmp(&y.order_id));
    v
}

// ---- the contract -----------------------------------------------------------------------

/// `put_item`: Stored for a new item; a replacement keeps the counters and answers the new
/// remaining stock; BelowHeld (nothing changed) when the new total is below reserved + paid.
async fn put_item_contract<E: Probe>(e: &E, clock: &Clock) {
    assert_eq!(e.item("sku").await.unwrap(), None);
    let first = spec("sku", 5, 2);
    assert_eq!(e.put_item(&first).await.unwrap(), PutReply::Stored { stock: 5 });
    assert_eq!(
        e.item("sku").await.unwrap(),
        Some(ItemState {
            spec: first.clone(),
            stock: 5,
            reserved: 0,
            paid: 0,
            cancelled: 0,
            expired: 0,
            refunded: 0,
        })
    );

    // 2 paid (alice), 1 reserved (bob), 1 cancelled (carol).
    let a = reserve_ok(e, clock, &cmd("sku", "alice", 2, None), 3).await;
    let b = reserve_ok(e, clock, &cmd("sku", "bob", 1, None), 2).await;
    let c = reserve_ok(e, clock, &cmd("sku", "carol", 1, None), 1).await;
    assert_eq!(
        e.transition(Transition::Pay, &a, "alice").await.unwrap(),
        TransitionReply::Done {
            status: OrderStatus::Paid,
            stock_after: 1
        }
    );
    assert_eq!(
        e.transition(Transition::Cancel, &c, "carol").await.unwrap(),
        TransitionReply::Done {
            status: OrderStatus::Cancelled,
            stock_after: 2
        }
    );
    assert_eq!(counters(e, "sku").await, (2, 1, 2, 1, 0));

    // Replace: new name, price, limit, window and total; counters kept.
    let bigger = ItemSpec {
        name: "renamed".into(),
        price_cents: 500,
        stock_total: 10,
        per_user_limit: 3,
        starts_ms: NOW - 5_000,
        ends_ms: NOW + 7_200_000,
        ..first.clone()
    };
    assert_eq!(e.put_item(&bigger).await.unwrap(), PutReply::Stored { stock: 7 });
    assert_eq!(
        e.item("sku").await.unwrap(),
        Some(ItemState {
            spec: bigger.clone(),
            stock: 7,
            reserved: 1,
            paid: 2,
            cancelled: 1,
            expired: 0,
            refunded: 0,
        })
    );
    // The quotas are kept too.
    assert_eq!(e.held("sku", "alice").await, 2);
    assert_eq!(e.held("sku", "bob").await, 1);
    assert_eq!(e.held("sku", "carol").await, 0);

    // Below what is held (reserved 1 + paid 2): refused, nothing changed, spec included.
    let before = e.item("sku").await.unwrap();
    let too_small = ItemSpec {
        stock_total: 2,
        name: "too small".into(),
        ..bigger.clone()
    };
    assert_eq!(e.put_item(&too_small).await.unwrap(), PutReply::BelowHeld { held: 3 });
    assert_eq!(e.item("sku").await.unwrap(), before);
    let zero = ItemSpec {
        stock_total: 0,
        ..bigger.clone()
    };
    assert_eq!(e.put_item(&zero).await.unwrap(), PutReply::BelowHeld { held: 3 });
    assert_eq!(e.item("sku").await.unwrap(), before);

    // Exactly what is held: stored, nothing left.
    let exact = ItemSpec {
        stock_total: 3,
        ..bigger.clone()
    };
    assert_eq!(e.put_item(&exact).await.unwrap(), PutReply::Stored { stock: 0 });
    assert_eq!(counters(e, "sku").await, (0, 1, 2, 1, 0));
    assert_eq!(
        e.reserve(&cmd("sku", "dave", 1, None)).await.unwrap(),
        ReserveReply::SoldOut { stock: 0 }
    );
    // Bob's reservation still pays against the replaced item.
    assert_eq!(
        e.transition(Transition::Pay, &b, "bob").await.unwrap(),
        TransitionReply::Done {
            status: OrderStatus::Paid,
            stock_after: 0
        }
    );
    assert_eq!(counters(e, "sku").await, (0, 0, 3, 1, 0));

    // An item with no stock at all is a valid item.
    let empty = spec("empty", 0, 1);
    assert_eq!(e.put_item(&empty).await.unwrap(), PutReply::Stored { stock: 0 });
    assert_eq!(
        e.item("empty").await.unwrap(),
        Some(ItemState {
            spec: empty,
            stock: 0,
            reserved: 0,
            paid: 0,
            cancelled: 0,
            expired: 0,
            refunded: 0,
        })
    );
}

/// `reserve`: Reserved with exact fields; Duplicate by idempotency key and by order id;
/// UnknownItem, BadQty, LimitReached, SoldOut (with what is left), each changing nothing.
async fn reserve_contract<E: Probe>(e: &E, clock: &Clock) {
    put(e, &spec("sku", 5, 2)).await;
    put(e, &spec("other", 5, 2)).await;
    let t0 = clock.now_ms();

    // Reserved: the order as written.
    let c1 = cmd("sku", "alice", 1, Some("k1"));
    reserve_ok(e, clock, &c1, 4).await;
    assert_eq!(
        e.order(&c1.order_id).await.unwrap(),
        Some(Order {
            order_id: c1.order_id.clone(),
            item_id: "sku".into(),
            user_id: "alice".into(),
            qty: 1,
            status: OrderStatus::Reserved,
            created_ms: t0,
            pay_before_ms: t0 + TIMEOUT_MS,
            updated_ms: t0,
            idem_key: "k1".into(),
            price_cents: Some(1_999),
            refund: None,
        })
    );
    assert_eq!(e.held("sku", "alice").await, 1);
    assert_eq!(counters(e, "sku").await, (4, 1, 0, 0, 0));

    // Duplicate by idempotency key: a later retry with a new order id (and another qty)
    // gets the first order, unchanged; the new id is not created.
    clock.advance(5);
    let before = snapshot(e, "sku", "alice").await;
    let retry = ReserveCmd {
        order_id: new_order_id("sku"),
        qty: 2,
        ..c1.clone()
    };
    let dup1 = ReserveReply::Duplicate {
        order_id: c1.order_id.clone(),
        qty: 1,
        status: OrderStatus::Reserved,
        created_ms: t0,
        pay_before_ms: t0 + TIMEOUT_MS,
    };
    assert_eq!(e.reserve(&retry).await.unwrap(), dup1);
    assert_eq!(e.order(&retry.order_id).await.unwrap(), None);
    assert_eq!(snapshot(e, "sku", "alice").await, before);
    // Even with a bad qty: the key is checked first.
    let retry_bad = ReserveCmd {
        order_id: new_order_id("sku"),
        qty: 0,
        ..c1.clone()
    };
    assert_eq!(e.reserve(&retry_bad).await.unwrap(), dup1);

    // The key is scoped to (item, user): the same key of another user, or of the same
    // user on another item, is a new reservation.
    let t1 = clock.now_ms();
    let bob = cmd("sku", "bob", 1, Some("k1"));
    reserve_ok(e, clock, &bob, 3).await;
    let alice_other = cmd("other", "alice", 1, Some("k1"));
    reserve_ok(e, clock, &alice_other, 4).await;
    assert_eq!(e.order(&bob.order_id).await.unwrap().unwrap().created_ms, t1);

    // Duplicate by order id: the very same call retried (no key).
    let c2 = cmd("sku", "carol", 1, None);
    reserve_ok(e, clock, &c2, 2).await;
    let before = snapshot(e, "sku", "carol").await;
    assert_eq!(
        e.reserve(&c2).await.unwrap(),
        ReserveReply::Duplicate {
            order_id: c2.order_id.clone(),
            qty: 1,
            status: OrderStatus::Reserved,
            created_ms: t1,
            pay_before_ms: t1 + TIMEOUT_MS,
        }
    );
    assert_eq!(snapshot(e, "sku", "carol").await, before);

    // UnknownItem (nothing created).
    let unknown = cmd("nope", "alice", 1, None);
    assert_eq!(e.reserve(&unknown).await.unwrap(), ReserveReply::UnknownItem);
    assert_eq!(e.order(&unknown.order_id).await.unwrap(), None);
    assert_eq!(e.item("nope").await.unwrap(), None);
    assert_eq!(
        e.reserve(&cmd("nope", "alice", 0, Some("k9"))).await.unwrap(),
        ReserveReply::UnknownItem
    );

    // BadQty: below 1 or above the per-user limit.
    let before = snapshot(e, "sku", "dave").await;
    for qty in [0, -1, 3, 100] {
        let c = cmd("sku", "dave", qty, Some("kq"));
        assert_eq!(
            e.reserve(&c).await.unwrap(),
            ReserveReply::BadQty { limit: 2 },
            "qty {qty}"
        );
        assert_eq!(e.order(&c.order_id).await.unwrap(), None);
    }
    assert_eq!(snapshot(e, "sku", "dave").await, before);
    // The key of a refused call was not remembered: it reserves now.
    reserve_ok(e, clock, &cmd("sku", "dave", 1, Some("kq")), 1).await;

    // LimitReached: alice holds 1 of 2.
    let before = snapshot(e, "sku", "alice").await;
    let c = cmd("sku", "alice", 2, None);
    assert_eq!(
        e.reserve(&c).await.unwrap(),
        ReserveReply::LimitReached { held: 1, limit: 2 }
    );
    assert_eq!(e.order(&c.order_id).await.unwrap(), None);
    assert_eq!(snapshot(e, "sku", "alice").await, before);

    // SoldOut with what is left: 1 left, erin asks 2.
    assert_eq!(counters(e, "sku").await, (1, 4, 0, 0, 0));
    let before = snapshot(e, "sku", "erin").await;
    let c = cmd("sku", "erin", 2, None);
    assert_eq!(e.reserve(&c).await.unwrap(), ReserveReply::SoldOut { stock: 1 });
    assert_eq!(e.order(&c.order_id).await.unwrap(), None);
    assert_eq!(snapshot(e, "sku", "erin").await, before);
    reserve_ok(e, clock, &cmd("sku", "erin", 1, None), 0).await;
    assert_eq!(
        e.reserve(&cmd("sku", "frank", 1, None)).await.unwrap(),
        ReserveReply::SoldOut { stock: 0 }
    );
    // The limit is checked before the stock.
    assert_eq!(
        e.reserve(&cmd("sku", "alice", 2, None)).await.unwrap(),
        ReserveReply::LimitReached { held: 1, limit: 2 }
    );
    assert_eq!(
        e.reserve(&cmd("sku", "alice", 1, None)).await.unwrap(),
        ReserveReply::SoldOut { stock: 0 }
    );
    // An idempotent retry still gets its order once sold out.
    assert_eq!(
        e.reserve(&ReserveCmd {
            order_id: new_order_id("sku"),
            ..c1.clone()
        })
        .await
        .unwrap(),
        dup1
    );
    assert_eq!(counters(e, "sku").await, (0, 5, 0, 0, 0));
    assert_eq!(e.held("sku", "frank").await, 0);
}

/// The sale window: NotStarted before `starts_ms`, open at exactly `starts_ms`, Ended at
/// exactly `ends_ms`; the window is checked before the quantity; an idempotent retry
/// after the end still gets its order.
async fn sale_window_contract<E: Probe>(e: &E, clock: &Clock) {
    let now = clock.now_ms();
    let later = ItemSpec {
        starts_ms: now + 10_000,
        ends_ms: now + 20_000,
        ..spec("later", 3, 2)
    };
    put(e, &later).await;
    let before = snapshot(e, "later", "alice").await;
    let c = cmd("later", "alice", 1, Some("w1"));
    assert_eq!(
        e.reserve(&c).await.unwrap(),
        ReserveReply::NotStarted {
            starts_ms: now + 10_000
        }
    );
    assert_eq!(e.order(&c.order_id).await.unwrap(), None);
    // The window comes before the quantity check.
    assert_eq!(
        e.reserve(&cmd("later", "alice", 0, None)).await.unwrap(),
        ReserveReply::NotStarted {
            starts_ms: now + 10_000
        }
    );
    clock.advance(9_999);
    assert_eq!(
        e.reserve(&c).await.unwrap(),
        ReserveReply::NotStarted {
            starts_ms: now + 10_000
        }
    );
    assert_eq!(snapshot(e, "later", "alice").await, before);

    // Open at exactly starts_ms (the refused key was not remembered).
    clock.advance(1);
    let first = reserve_ok(e, clock, &c, 2).await;
    let created = clock.now_ms();

    // Ended at exactly ends_ms, and after.
    clock.advance(9_999);
    reserve_ok(e, clock, &cmd("later", "bob", 1, None), 1).await;
    clock.advance(1);
    let before = snapshot(e, "later", "carol").await;
    assert_eq!(
        e.reserve(&cmd("later", "carol", 1, None)).await.unwrap(),
        ReserveReply::Ended { ends_ms: now + 20_000 }
    );
    assert_eq!(
        e.reserve(&cmd("later", "carol", 5, None)).await.unwrap(),
        ReserveReply::Ended { ends_ms: now + 20_000 }
    );
    // (Well past the end, but within the idempotency TTL: the embedded engine measures the
    // TTL on the injected clock, Redis on its own wall clock.)
    clock.advance(100_000);
    assert_eq!(
        e.reserve(&cmd("later", "carol", 1, None)).await.unwrap(),
        ReserveReply::Ended { ends_ms: now + 20_000 }
    );
    assert_eq!(snapshot(e, "later", "carol").await, before);

    // The idempotent retry of alice's call, long after the end (and after her deadline:
    // the duplicate reports the order as stored; nothing expires it here).
    assert_eq!(
        e.reserve(&ReserveCmd {
            order_id: new_order_id("later"),
            ..c.clone()
        })
        .await
        .unwrap(),
        ReserveReply::Duplicate {
            order_id: first,
            qty: 1,
            status: OrderStatus::Reserved,
            created_ms: created,
            pay_before_ms: created + TIMEOUT_MS,
        }
    );

    // Reopening the sale by replacing the item.
    let reopened = ItemSpec {
        ends_ms: clock.now_ms() + 1,
        ..later
    };
    assert_eq!(e.put_item(&reopened).await.unwrap(), PutReply::Stored { stock: 1 });
    reserve_ok(e, clock, &cmd("later", "carol", 1, None), 0).await;
}

/// The order of the checks: key, order id, item, window, qty, limit, stock — the first
/// failing one answers.
async fn check_order_contract<E: Probe>(e: &E, clock: &Clock) {
    let now = clock.now_ms();
    put(e, &spec("sku", 1, 1)).await;
    let held = reserve_ok(e, clock, &cmd("sku", "alice", 1, Some("k")), 0).await;
    // Sold out + over the limit + bad qty → BadQty; sold out + at the limit → LimitReached.
    assert_eq!(
        e.reserve(&cmd("sku", "alice", 2, None)).await.unwrap(),
        ReserveReply::BadQty { limit: 1 }
    );
    assert_eq!(
        e.reserve(&cmd("sku", "alice", 1, None)).await.unwrap(),
        ReserveReply::LimitReached { held: 1, limit: 1 }
    );
    assert_eq!(
        e.reserve(&cmd("sku", "bob", 1, None)).await.unwrap(),
        ReserveReply::SoldOut { stock: 0 }
    );
    // A replay of the original call by order id beats every check, even on a closed sale.
    let ended = ItemSpec {
        ends_ms: now,
        ..spec("sku", 1, 1)
    };
    assert_eq!(e.put_item(&ended).await.unwrap(), PutReply::Stored { stock: 0 });
    let same = ReserveCmd {
        order_id: held.clone(),
        ..cmd("sku", "alice", 1, None)
    };
    assert!(
        matches!(e.reserve(&same).await.unwrap(), ReserveReply::Duplicate { ref order_id, qty: 1, .. } if *order_id == held)
    );
    assert_eq!(
        e.reserve(&cmd("sku", "alice", 9, None)).await.unwrap(),
        ReserveReply::Ended { ends_ms: now }
    );
}

/// `transition`: Done, Already, Closed{Paid}, Closed{Cancelled}, Forbidden, UnknownOrder,
/// with the counters and quotas each moves (or leaves alone).
async fn transition_contract<E: Probe>(e: &E, clock: &Clock) {
    put(e, &spec("sku", 10, 3)).await;
    let a = reserve_ok(e, clock, &cmd("sku", "alice", 2, None), 8).await;
    let created = clock.now_ms();

    // Forbidden: another user's order, nothing changed.
    let before = (snapshot(e, "sku", "alice").await, e.order(&a).await.unwrap());
    assert_eq!(
        e.transition(Transition::Pay, &a, "bob").await.unwrap(),
        TransitionReply::Forbidden
    );
    assert_eq!(
        e.transition(Transition::Cancel, &a, "bob").await.unwrap(),
        TransitionReply::Forbidden
    );
    assert_eq!((snapshot(e, "sku", "alice").await, e.order(&a).await.unwrap()), before);

    // Pay one millisecond before the deadline: Done, stock unchanged.
    clock.advance(TIMEOUT_MS - 1);
    assert_eq!(
        e.transition(Transition::Pay, &a, "alice").await.unwrap(),
        TransitionReply::Done {
            status: OrderStatus::Paid,
            stock_after: 8
        }
    );
    let paid_at = clock.now_ms();
    assert_eq!(
        e.order(&a).await.unwrap().unwrap(),
        Order {
            order_id: a.clone(),
            item_id: "sku".into(),
            user_id: "alice".into(),
            qty: 2,
            status: OrderStatus::Paid,
            created_ms: created,
            pay_before_ms: created + TIMEOUT_MS,
            updated_ms: paid_at,
            idem_key: String::new(),
            price_cents: Some(1_999),
            refund: None,
        }
    );
    assert_eq!(counters(e, "sku").await, (8, 0, 2, 0, 0));
    assert_eq!(e.held("sku", "alice").await, 2);

    // Paid is final: pay again → Already, cancel → Closed{Paid}, even past the deadline.
    clock.advance(TIMEOUT_MS * 2);
    let before = (snapshot(e, "sku", "alice").await, e.order(&a).await.unwrap());
    assert_eq!(
        e.transition(Transition::Pay, &a, "alice").await.unwrap(),
        TransitionReply::Already {
            status: OrderStatus::Paid
        }
    );
    assert_eq!(
        e.transition(Transition::Cancel, &a, "alice").await.unwrap(),
        TransitionReply::Closed {
            status: OrderStatus::Paid
        }
    );
    assert_eq!(
        e.transition(Transition::Cancel, &a, "bob").await.unwrap(),
        TransitionReply::Forbidden
    );
    assert_eq!((snapshot(e, "sku", "alice").await, e.order(&a).await.unwrap()), before);
    // Paid units count towards the limit.
    assert_eq!(
        e.reserve(&cmd("sku", "alice", 2, None)).await.unwrap(),
        ReserveReply::LimitReached { held: 2, limit: 3 }
    );

    // Cancel: stock and quota come back.
    let b = reserve_ok(e, clock, &cmd("sku", "bob", 3, None), 5).await;
    assert_eq!(e.held("sku", "bob").await, 3);
    clock.advance(1_000);
    assert_eq!(
        e.transition(Transition::Cancel, &b, "bob").await.unwrap(),
        TransitionReply::Done {
            status: OrderStatus::Cancelled,
            stock_after: 8
        }
    );
    let ob = e.order(&b).await.unwrap().unwrap();
    assert_eq!((ob.status, ob.updated_ms), (OrderStatus::Cancelled, clock.now_ms()));
    assert_eq!(counters(e, "sku").await, (8, 0, 2, 3, 0));
    assert_eq!(e.held("sku", "bob").await, 0);

    // Cancelled is final, and returns the stock exactly once.
    let before = (snapshot(e, "sku", "bob").await, e.order(&b).await.unwrap());
    assert_eq!(
        e.transition(Transition::Cancel, &b, "bob").await.unwrap(),
        TransitionReply::Already {
            status: OrderStatus::Cancelled
        }
    );
    assert_eq!(
        e.transition(Transition::Pay, &b, "bob").await.unwrap(),
        TransitionReply::Closed {
            status: OrderStatus::Cancelled
        }
    );
    assert_eq!((snapshot(e, "sku", "bob").await, e.order(&b).await.unwrap()), before);
    // The quota came back: bob can take 3 again.
    reserve_ok(e, clock, &cmd("sku", "bob", 3, None), 5).await;

    // UnknownOrder: an id of ours that was never reserved, one of another shard, garbage.
    for id in [
        new_order_id("sku"),
        new_order_id("elsewhere"),
        "not-an-order".to_owned(),
        "67e55044-10b1-426f-9247-bb680e5fe0c8".to_owned(),
    ] {
        for t in [Transition::Pay, Transition::Cancel] {
            assert_eq!(
                e.transition(t, &id, "alice").await.unwrap(),
                TransitionReply::UnknownOrder,
                "{t:?} {id}"
            );
        }
    }
    // An order id whose reservation was refused is unknown too.
    let refused = cmd("sku", "carol", 9, None);
    assert_eq!(e.reserve(&refused).await.unwrap(), ReserveReply::BadQty { limit: 3 });
    assert_eq!(
        e.transition(Transition::Pay, &refused.order_id, "carol").await.unwrap(),
        TransitionReply::UnknownOrder
    );
    assert_eq!(counters(e, "sku").await, (5, 3, 2, 3, 0));
}

/// A reserved order past its deadline is expired by the pay or cancel that finds it:
/// Closed{Expired}, stock and quota returned by that call, exactly once.
async fn expiry_on_transition_contract<E: Probe>(e: &E, clock: &Clock) {
    put(e, &spec("sku", 10, 3)).await;

    // Pay at exactly pay_before_ms.
    let c = reserve_ok(e, clock, &cmd("sku", "bob", 3, None), 7).await;
    clock.advance(TIMEOUT_MS);
    assert_eq!(
        e.transition(Transition::Pay, &c, "bob").await.unwrap(),
        TransitionReply::Closed {
            status: OrderStatus::Expired
        }
    );
    let oc = e.order(&c).await.unwrap().unwrap();
    assert_eq!((oc.status, oc.updated_ms), (OrderStatus::Expired, clock.now_ms()));
    assert_eq!(counters(e, "sku").await, (10, 0, 0, 0, 3));
    assert_eq!(e.held("sku", "bob").await, 0);
    // Exactly once.
    clock.advance(10);
    for t in [Transition::Pay, Transition::Cancel] {
        assert_eq!(
            e.transition(t, &c, "bob").await.unwrap(),
            TransitionReply::Closed {
                status: OrderStatus::Expired
            }
        );
    }
    assert_eq!(e.order(&c).await.unwrap().unwrap(), oc);
    assert_eq!(counters(e, "sku").await, (10, 0, 0, 0, 3));
    assert_eq!(
        e.expire(&c, "sku").await.unwrap(),
        ExpireReply::NotReserved {
            status: OrderStatus::Expired
        }
    );
    assert!(e.expire_due(100).await.unwrap().is_empty());

    // Cancel after the deadline: expired, not cancelled.
    let d = reserve_ok(e, clock, &cmd("sku", "carol", 1, None), 9).await;
    clock.advance(TIMEOUT_MS + 1);
    assert_eq!(
        e.transition(Transition::Cancel, &d, "carol").await.unwrap(),
        TransitionReply::Closed {
            status: OrderStatus::Expired
        }
    );
    assert_eq!(status(e, &d).await, OrderStatus::Expired);
    assert_eq!(counters(e, "sku").await, (10, 0, 0, 0, 4));
    assert_eq!(e.held("sku", "carol").await, 0);

    // Another user on a due order: Forbidden, and the order is not expired by it.
    let f = reserve_ok(e, clock, &cmd("sku", "dave", 2, None), 8).await;
    clock.advance(TIMEOUT_MS);
    assert_eq!(
        e.transition(Transition::Pay, &f, "erin").await.unwrap(),
        TransitionReply::Forbidden
    );
    assert_eq!(
        e.transition(Transition::Cancel, &f, "erin").await.unwrap(),
        TransitionReply::Forbidden
    );
    assert_eq!(status(e, &f).await, OrderStatus::Reserved);
    assert_eq!(counters(e, "sku").await, (8, 2, 0, 0, 4));
    assert_eq!(e.held("sku", "dave").await, 2);
}

/// `expire`: NotDue, Expired (stock and quota back), NotReserved for every final status,
/// UnknownOrder.
async fn expire_contract<E: Probe>(e: &E, clock: &Clock) {
    put(e, &spec("sku", 10, 5)).await;
    let a = reserve_ok(e, clock, &cmd("sku", "alice", 2, None), 8).await;
    let pay_before = clock.now_ms() + TIMEOUT_MS;

    assert_eq!(
        e.expire(&a, "sku").await.unwrap(),
        ExpireReply::NotDue {
            pay_before_ms: pay_before
        }
    );
    clock.advance(TIMEOUT_MS - 1);
    let before = (snapshot(e, "sku", "alice").await, e.order(&a).await.unwrap());
    assert_eq!(
        e.expire(&a, "sku").await.unwrap(),
        ExpireReply::NotDue {
            pay_before_ms: pay_before
        }
    );
    assert_eq!((snapshot(e, "sku", "alice").await, e.order(&a).await.unwrap()), before);

    clock.advance(1);
    assert_eq!(
        e.expire(&a, "sku").await.unwrap(),
        ExpireReply::Expired { stock_after: 10 }
    );
    let oa = e.order(&a).await.unwrap().unwrap();
    assert_eq!((oa.status, oa.updated_ms), (OrderStatus::Expired, pay_before));
    assert_eq!(counters(e, "sku").await, (10, 0, 0, 0, 2));
    assert_eq!(e.held("sku", "alice").await, 0);
    // Exactly once.
    assert_eq!(
        e.expire(&a, "sku").await.unwrap(),
        ExpireReply::NotReserved {
            status: OrderStatus::Expired
        }
    );
    assert_eq!(counters(e, "sku").await, (10, 0, 0, 0, 2));

    // NotReserved for paid and cancelled orders, even long past their deadline.
    let b = reserve_ok(e, clock, &cmd("sku", "alice", 1, None), 9).await;
    let c = reserve_ok(e, clock, &cmd("sku", "bob", 1, None), 8).await;
    assert!(matches!(
        e.transition(Transition::Pay, &b, "alice").await.unwrap(),
        TransitionReply::Done { .. }
    ));
    assert!(matches!(
        e.transition(Transition::Cancel, &c, "bob").await.unwrap(),
        TransitionReply::Done { .. }
    ));
    clock.advance(TIMEOUT_MS * 3);
    assert_eq!(
        e.expire(&b, "sku").await.unwrap(),
        ExpireReply::NotReserved {
            status: OrderStatus::Paid
        }
    );
    assert_eq!(
        e.expire(&c, "sku").await.unwrap(),
        ExpireReply::NotReserved {
            status: OrderStatus::Cancelled
        }
    );
    assert_eq!(counters(e, "sku").await, (9, 0, 1, 1, 2));
    assert_eq!(e.held("sku", "alice").await, 1);

    // UnknownOrder.
    assert_eq!(
        e.expire(&new_order_id("sku"), "sku").await.unwrap(),
        ExpireReply::UnknownOrder
    );
    assert_eq!(
        e.expire("not-an-order", "sku").await.unwrap(),
        ExpireReply::UnknownOrder
    );
}

/// `expire_due`: exactly the reserved orders whose deadline passed, each once, with the
/// stock left after it; paid and cancelled orders are never expired.
async fn expire_due_contract<E: Probe>(e: &E, clock: &Clock) {
    let (x, y) = two_shards();
    put(e, &spec(&x, 10, 5)).await;
    put(e, &spec(&y, 10, 5)).await;
    let t0 = clock.now_ms();
    assert!(e.expire_due(100).await.unwrap().is_empty());

    let o1 = reserve_ok(e, clock, &cmd(&x, "alice", 1, None), 9).await; // due t0+T
    clock.advance(10);
    let o2 = reserve_ok(e, clock, &cmd(&x, "bob", 2, None), 7).await; // due t0+10+T
    clock.advance(10);
    let o3 = reserve_ok(e, clock, &cmd(&y, "carol", 1, None), 9).await; // due t0+20+T
    clock.advance(10);
    let o4 = reserve_ok(e, clock, &cmd(&x, "dave", 1, None), 6).await; // paid
    let o5 = reserve_ok(e, clock, &cmd(&y, "erin", 3, None), 6).await; // cancelled
    assert!(matches!(
        e.transition(Transition::Pay, &o4, "dave").await.unwrap(),
        TransitionReply::Done { .. }
    ));
    assert!(matches!(
        e.transition(Transition::Cancel, &o5, "erin").await.unwrap(),
        TransitionReply::Done { .. }
    ));

    // Nothing due yet.
    clock.advance(TIMEOUT_MS - 31);
    assert_eq!(clock.now_ms(), t0 + TIMEOUT_MS - 1);
    assert!(e.expire_due(100).await.unwrap().is_empty());

    // o1 and o2 due (o2 at exactly its deadline), o3 not yet.
    clock.advance(11);
    let got = sorted(e.expire_due(100).await.unwrap());
    let mut want = vec![
        Expired {
            order_id: o1.clone(),
            item_id: x.clone(),
            stock_after: 7,
        },
        Expired {
            order_id: o2.clone(),
            item_id: x.clone(),
            stock_after: 9,
        },
    ];
    want.sort_by(|p, q| p.order_id.cmp(&q.order_id));
    assert_eq!(got, want);
    assert_eq!(status(e, &o1).await, OrderStatus::Expired);
    assert_eq!(status(e, &o2).await, OrderStatus::Expired);
    assert_eq!(status(e, &o3).await, OrderStatus::Reserved);
    assert_eq!(counters(e, &x).await, (9, 0, 1, 0, 3));
    assert_eq!((e.held(&x, "alice").await, e.held(&x, "bob").await), (0, 0));
    // Each once.
    assert!(e.expire_due(100).await.unwrap().is_empty());

    clock.advance(10);
    assert_eq!(
        e.expire_due(100).await.unwrap(),
        vec![Expired {
            order_id: o3.clone(),
            item_id: y.clone(),
            stock_after: 10
        }]
    );
    assert_eq!(counters(e, &y).await, (10, 0, 0, 3, 1));

    // Paid and cancelled orders stay so, however late it gets.
    clock.advance(TIMEOUT_MS * 10);
    assert!(e.expire_due(100).await.unwrap().is_empty());
    assert_eq!(status(e, &o4).await, OrderStatus::Paid);
    assert_eq!(status(e, &o5).await, OrderStatus::Cancelled);
}

/// `expire_due(max)` on one shard: at most `max` per call, earliest deadline first.
async fn expire_due_max_same_shard_contract<E: Probe>(e: &E, clock: &Clock) {
    put(e, &spec("sku", 10, 5)).await;
    let o1 = reserve_ok(e, clock, &cmd("sku", "alice", 1, None), 9).await;
    clock.advance(1);
    let o2 = reserve_ok(e, clock, &cmd("sku", "bob", 1, None), 8).await;
    clock.advance(TIMEOUT_MS);
    assert_eq!(
        e.expire_due(1).await.unwrap(),
        vec![Expired {
            order_id: o1,
            item_id: "sku".into(),
            stock_after: 9
        }]
    );
    assert_eq!(
        e.expire_due(1).await.unwrap(),
        vec![Expired {
            order_id: o2,
            item_id: "sku".into(),
            stock_after: 10
        }]
    );
    assert!(e.expire_due(1).await.unwrap().is_empty());
}

/// `expire_due(max)` is "at most `max` per shard per call" (the trait's doc): two due
/// orders in two shards are both expired by `expire_due(1)`.
async fn expire_due_max_is_per_shard_contract<E: Probe>(e: &E, clock: &Clock) {
    let (x, y) = two_shards();
    put(e, &spec(&x, 10, 5)).await;
    put(e, &spec(&y, 10, 5)).await;
    let o1 = reserve_ok(e, clock, &cmd(&x, "alice", 1, None), 9).await;
    let o2 = reserve_ok(e, clock, &cmd(&y, "alice", 1, None), 9).await;
    clock.advance(TIMEOUT_MS);
    let mut want = vec![
        Expired {
            order_id: o1,
            item_id: x,
            stock_after: 10,
        },
        Expired {
            order_id: o2,
            item_id: y,
            stock_after: 10,
        },
    ];
    want.sort_by(|p, q| p.order_id.cmp(&q.order_id));
    assert_eq!(
        sorted(e.expire_due(1).await.unwrap()),
        want,
        "expire_due(1) with one due order in each of two shards"
    );
}

/// `order`: None for unknown ids; the whole order, with its status, once reserved.
async fn order_contract<E: Probe>(e: &E, clock: &Clock) {
    assert_eq!(e.order(&new_order_id("sku")).await.unwrap(), None);
    assert_eq!(e.order("not-an-order").await.unwrap(), None);
    put(e, &spec("sku", 3, 3)).await;
    let c = cmd("sku", "alice", 3, Some("key-1"));
    let id = reserve_ok(e, clock, &c, 0).await;
    let want = Order {
        order_id: id.clone(),
        item_id: "sku".into(),
        user_id: "alice".into(),
        qty: 3,
        status: OrderStatus::Reserved,
        created_ms: NOW,
        pay_before_ms: NOW + TIMEOUT_MS,
        updated_ms: NOW,
        idem_key: "key-1".into(),
        price_cents: Some(1_999),
        refund: None,
    };
    assert_eq!(e.order(&id).await.unwrap(), Some(want.clone()));
    clock.advance(7);
    assert!(matches!(
        e.transition(Transition::Pay, &id, "alice").await.unwrap(),
        TransitionReply::Done { .. }
    ));
    assert_eq!(
        e.order(&id).await.unwrap(),
        Some(Order {
            status: OrderStatus::Paid,
            updated_ms: NOW + 7,
            ..want
        })
    );
}

/// `catalog`: every item id once; `ping`.
async fn catalog_contract<E: Probe>(e: &E, _clock: &Clock) {
    e.ping().await.expect("ping");
    assert!(e.catalog().await.unwrap().is_empty());
    put(e, &spec("b-item", 1, 1)).await;
    put(e, &spec("a-item", 1, 1)).await;
    put(e, &spec("b-item", 2, 1)).await;
    let mut ids = e.catalog().await.unwrap();
    ids.sort();
    assert_eq!(ids, vec!["a-item".to_owned(), "b-item".to_owned()]);
}

/// With a 1 s idempotency TTL: once the key is forgotten (one second later on both the
/// injected clock and the wall clock, since Redis expires keys by its own time), a retry
/// is a new reservation.
async fn idempotency_key_forgotten_after_ttl_contract<E: Probe>(e: &E, clock: &Clock) {
    put(e, &spec("sku", 5, 2)).await;
    let c = cmd("sku", "alice", 1, Some("k"));
    reserve_ok(e, clock, &c, 4).await;
    clock.advance(1_100);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    reserve_ok(
        e,
        clock,
        &ReserveCmd {
            order_id: new_order_id("sku"),
            ..c
        },
        3,
    )
    .await;
}

/// With closed orders forgotten after 1 s (shorter than the idempotency TTL, which the
/// configuration allows): an idempotent retry of a cancelled order must still answer
/// Duplicate with the order's id — not fail, and not reserve again.
async fn retry_after_closed_order_forgotten_contract<E: Probe>(e: &E, clock: &Clock) {
    put(e, &spec("sku", 5, 2)).await;
    let c = cmd("sku", "alice", 1, Some("k"));
    let first = reserve_ok(e, clock, &c, 4).await;
    assert!(matches!(
        e.transition(Transition::Cancel, &first, "alice").await.unwrap(),
        TransitionReply::Done { .. }
    ));
    clock.advance(1_100);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    // Past the closed-order TTL the engine forgets the order (Redis: the hash's TTL; the
    // embedded engine: its pruning, which the sweeper runs).
    e.prune().await.expect("prune");
    assert_eq!(
        e.order(&first).await.expect("order lookup"),
        None,
        "a closed order is forgotten after its TTL"
    );
    let retry = ReserveCmd {
        order_id: new_order_id("sku"),
        ..c
    };
    let reply = e.reserve(&retry).await;
    assert!(
        matches!(&reply, Ok(ReserveReply::Duplicate { order_id, .. }) if *order_id == first),
        "idempotent retry after the closed order's TTL: {reply:?}"
    );
    assert_eq!(counters(e, "sku").await, (5, 0, 0, 1, 0));
}

// ---- payments and refunds (issue 14) -----------------------------------------------------

/// `(refunded units, the order's refund origin)`.
async fn refund_state<E: Probe>(e: &E, item: &str, order: &str) -> (i64, Option<RefundOf>) {
    let refunded = e.item(item).await.expect("item").expect("item exists").refunded;
    let o = e.order(order).await.expect("order").expect("order exists");
    (refunded, o.refund)
}

fn done(status: OrderStatus, stock_after: i64) -> TransitionReply {
    TransitionReply::Done { status, stock_after }
}

/// A provider's payment: a reserved order is paid (as the shopper's pay); one that closed
/// before the money came becomes `refund_due` whatever closed it (cancelled, expired by
/// the sweeper, or overdue: expired by the payment itself), and no unit moves; a repeat
/// changes nothing.
async fn payment_contract<E: Probe>(e: &E, clock: &Clock) {
    put(e, &spec("sku", 10, 5)).await;
    let a = reserve_ok(e, clock, &cmd("sku", "alice", 2, None), 8).await;
    let b = reserve_ok(e, clock, &cmd("sku", "bob", 1, None), 7).await;
    let c = reserve_ok(e, clock, &cmd("sku", "carol", 1, None), 6).await;
    assert_eq!(
        e.settle(Settle::Payment, &a, None).await.unwrap(),
        done(OrderStatus::Paid, 6)
    );
    assert_eq!(counters(e, "sku").await, (6, 2, 2, 0, 0));
    let before = snapshot(e, "sku", "alice").await;
    assert_eq!(
        e.settle(Settle::Payment, &a, None).await.unwrap(),
        TransitionReply::Already {
            status: OrderStatus::Paid
        }
    );
    assert_eq!(snapshot(e, "sku", "alice").await, before, "a repeat changes nothing");

    // Cancelled, then paid for: owed back; the units stay returned.
    e.transition(Transition::Cancel, &b, "bob").await.unwrap();
    assert_eq!(counters(e, "sku").await, (7, 1, 2, 1, 0));
    assert_eq!(
        e.settle(Settle::Payment, &b, None).await.unwrap(),
        done(OrderStatus::RefundDue, 7)
    );
    assert_eq!(counters(e, "sku").await, (7, 1, 2, 1, 0));
    assert_eq!(e.held("sku", "bob").await, 0, "the quota stays returned");
    let due = e.order(&b).await.unwrap().unwrap();
    assert_eq!(
        (due.status, due.refund),
        (
            OrderStatus::RefundDue,
            Some(RefundOf {
                status: OrderStatus::Cancelled,
                restocked: true
            })
        )
    );
    assert_eq!(
        e.settle(Settle::Payment, &b, None).await.unwrap(),
        TransitionReply::Already {
            status: OrderStatus::RefundDue
        }
    );

    // Overdue and not yet swept: the payment expires it first, then owes the money back.
    clock.advance(TIMEOUT_MS);
    assert_eq!(
        e.settle(Settle::Payment, &c, None).await.unwrap(),
        done(OrderStatus::RefundDue, 8)
    );
    assert_eq!(counters(e, "sku").await, (8, 0, 2, 1, 1));
    assert_eq!(
        e.order(&c).await.unwrap().unwrap().refund,
        Some(RefundOf {
            status: OrderStatus::Expired,
            restocked: true
        })
    );
    assert_eq!(
        e.settle(Settle::Payment, "0190c1f2-0000-7000-8000-000000000000", None)
            .await
            .unwrap(),
        TransitionReply::UnknownOrder
    );
}

/// A refund: `paid` → `refunded` exactly once; with restock the units and the quota return
/// to the sale, without they stay out of it; a `refund_due` order's units came back when it
/// closed; nothing else is refunded.
async fn refund_contract<E: Probe>(e: &E, clock: &Clock) {
    put(e, &spec("sku", 10, 5)).await;
    let a = reserve_ok(e, clock, &cmd("sku", "alice", 2, None), 8).await;
    let b = reserve_ok(e, clock, &cmd("sku", "bob", 3, None), 5).await;
    let c = reserve_ok(e, clock, &cmd("sku", "carol", 1, None), 4).await;
    for (o, u) in [(&a, "alice"), (&b, "bob")] {
        assert!(matches!(
            e.transition(Transition::Pay, o, u).await.unwrap(),
            TransitionReply::Done { .. }
        ));
    }
    // Reserved: nothing to refund.
    let before = snapshot(e, "sku", "carol").await;
    assert_eq!(
        e.settle(Settle::Refund { restock: true }, &c, None).await.unwrap(),
        TransitionReply::Closed {
            status: OrderStatus::Reserved
        }
    );
    assert_eq!(snapshot(e, "sku", "carol").await, before);

    // With restock: the units and alice's quota come back.
    assert_eq!(
        e.settle(Settle::Refund { restock: true }, &a, None).await.unwrap(),
        done(OrderStatus::Refunded, 6)
    );
    assert_eq!(counters(e, "sku").await, (6, 1, 3, 0, 0));
    assert_eq!(e.held("sku", "alice").await, 0);
    assert_eq!(
        refund_state(e, "sku", &a).await,
        (
            2,
            Some(RefundOf {
                status: OrderStatus::Paid,
                restocked: true
            })
        )
    );
    // Exactly once: again (with either flag) changes nothing.
    let before = snapshot(e, "sku", "alice").await;
    for restock in [true, false] {
        assert_eq!(
            e.settle(Settle::Refund { restock }, &a, None).await.unwrap(),
            TransitionReply::Already {
                status: OrderStatus::Refunded
            }
        );
    }
    assert_eq!(snapshot(e, "sku", "alice").await, before);

    // Without restock: the units stay out of the sale, bob keeps his quota used.
    assert_eq!(
        e.settle(Settle::Refund { restock: false }, &b, None).await.unwrap(),
        done(OrderStatus::Refunded, 6)
    );
    assert_eq!(counters(e, "sku").await, (6, 1, 3, 0, 0));
    assert_eq!(e.held("sku", "bob").await, 3);
    assert_eq!(
        refund_state(e, "sku", &b).await,
        (
            5,
            Some(RefundOf {
                status: OrderStatus::Paid,
                restocked: false
            })
        )
    );

    // A late payment owed back: refunded; its units came back when it closed.
    e.transition(Transition::Cancel, &c, "carol").await.unwrap();
    e.settle(Settle::Payment, &c, None).await.unwrap();
    assert_eq!(
        e.settle(Settle::Refund { restock: false }, &c, None).await.unwrap(),
        done(OrderStatus::Refunded, 7)
    );
    assert_eq!(counters(e, "sku").await, (7, 0, 3, 1, 0));
    assert_eq!(
        refund_state(e, "sku", &c).await,
        (
            6,
            Some(RefundOf {
                status: OrderStatus::Cancelled,
                restocked: true
            })
        )
    );
    // Cancelled or expired (never paid): nothing to refund.
    let d = reserve_ok(e, clock, &cmd("sku", "dave", 1, None), 6).await;
    e.transition(Transition::Cancel, &d, "dave").await.unwrap();
    assert_eq!(
        e.settle(Settle::Refund { restock: true }, &d, None).await.unwrap(),
        TransitionReply::Closed {
            status: OrderStatus::Cancelled
        }
    );
    assert_eq!(counters(e, "sku").await, (7, 0, 3, 2, 0));
}

/// An order the engine forgot (closed longer ago than its TTL) is refunded from the
/// database's record, exactly once; an engine that still has the order ignores a record.
async fn refund_of_a_forgotten_order_contract<E: Probe>(e: &E, clock: &Clock) {
    put(e, &spec("sku", 10, 5)).await;
    let a = reserve_ok(e, clock, &cmd("sku", "alice", 2, None), 8).await;
    e.transition(Transition::Pay, &a, "alice").await.unwrap();
    let record = e.order(&a).await.unwrap().unwrap();
    // The engine still has it: a stale record (claiming `refund_due`) is not used.
    let stale = Order {
        status: OrderStatus::RefundDue,
        ..record.clone()
    };
    assert_eq!(
        e.settle(Settle::Refund { restock: true }, &a, Some(&stale))
            .await
            .unwrap(),
        done(OrderStatus::Refunded, 10)
    );
    assert_eq!(counters(e, "sku").await, (10, 0, 0, 0, 0));

    // A paid order forgotten: the record brings it back, then the refund runs once.
    let b = reserve_ok(e, clock, &cmd("sku", "bob", 1, None), 9).await;
    e.transition(Transition::Pay, &b, "bob").await.unwrap();
    let record = e.order(&b).await.unwrap().unwrap();
    clock.advance(2 * 3_600_000);
    e.forget_closed(&b).await;
    assert_eq!(e.order(&b).await.unwrap(), None, "forgotten");
    assert_eq!(
        e.settle(Settle::Refund { restock: true }, &b, None).await.unwrap(),
        TransitionReply::UnknownOrder,
        "forgotten, and no record"
    );
    assert_eq!(
        e.settle(Settle::Refund { restock: true }, &b, Some(&record))
            .await
            .unwrap(),
        done(OrderStatus::Refunded, 10)
    );
    assert_eq!(counters(e, "sku").await, (10, 0, 0, 0, 0));
    assert_eq!(e.held("sku", "bob").await, 0);
    assert_eq!(
        e.settle(Settle::Refund { restock: true }, &b, Some(&record))
            .await
            .unwrap(),
        TransitionReply::Already {
            status: OrderStatus::Refunded
        }
    );
    assert_eq!(counters(e, "sku").await, (10, 0, 0, 0, 0));
}
