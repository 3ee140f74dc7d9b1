//! Differential property test of the two stock engines (issue 5, acceptance 2).
//!
//! proptest generates random operation sequences — create or replace items (stock 0..5,
//! limit 1..3, sale windows open, upcoming, over or closing soon), reserve (a few users,
//! qty 0..4, idempotency keys from a small set or none, replays of earlier calls with the
//! same order id), pay and cancel (by the owner, by someone else, on unknown ids), expire,
//! clock advances (some past the payment timeout), `expire_due`, and the pause switches
//! (an item's, an unknown item's, every sale's; on and off) — and applies each
//! one to the Redis engine (the Lua scripts, on one throwaway `redis-server` flushed
//! between cases) and to the embedded engine (with its SQLite journal), on one shared
//! manual clock. Every reply must be identical, and so must the final state: each item's
//! [`ItemState`], each order, each user's held units and the catalogue. Finally a third,
//! embedded engine is rebuilt from the journal (`EmbeddedEngine::restore`, what a restart
//! does) and must hold the same state too.
//!
//! `PROPTEST_CASES` overrides the number of cases (64).

mod common;

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::RedisServer;
use common::engines::{EngineSettings, Journaled, embedded_engine, journaled_engine, redis_engine};
use common::inspect::Redis;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use seckill_gateway::clock::{Clock, Millis};
use seckill_gateway::engine::embedded::EmbeddedEngine;
use seckill_gateway::engine::redis::RedisEngine;
use seckill_gateway::engine::{ItemSpec, ReserveCmd, Settle, StockEngine, Transition};
use seckill_gateway::ids::new_order_id;
use seckill_gateway::store::Store;

const NOW: Millis = 1_700_000_000_000;
const TIMEOUT_MS: Millis = 60_000;
/// Long enough that neither engine forgets a key or an order during a case (the embedded
/// engine counts on the injected clock, Redis on its wall clock).
const DAY: Duration = Duration::from_secs(86_400);
/// Both engines: the payment timeout above, keys and closed orders kept a [`DAY`].
const SETTINGS: EngineSettings = EngineSettings {
    payment_timeout: Duration::from_millis(TIMEOUT_MS as u64),
    idempotency_ttl: DAY,
    closed_order_ttl: DAY,
    ..EngineSettings::TEST
};

/// Item ids; the last one is never created.
const ITEMS: [&str; 4] = ["i0", "i1", "i2", "missing"];
const USERS: [&str; 4] = ["u0", "u1", "u2", "u3"];
const KEYS: [&str; 3] = ["k0", "k1", "k2"];

#[derive(Clone, Copy, Debug)]
enum Window {
    /// Open since a second ago, for ten minutes.
    Open,
    /// Starts in 30 s.
    Upcoming,
    /// Ended a millisecond ago.
    Over,
    /// Open, ends in 45 s (inside one payment timeout).
    ClosingSoon,
}

#[derive(Clone, Debug)]
struct Put {
    item: usize,
    stock: i64,
    limit: i64,
    window: Window,
}

/// Which order a pay, cancel or expire names.
#[derive(Clone, Copy, Debug)]
enum Target {
    /// The order id of an earlier reserve call answered `Reserved` (index modulo their
    /// number; an attempted call's when there is none yet).
    Issued(usize),
    /// The order id of any earlier reserve call, whatever it answered.
    Attempted(usize),
    /// An order id of ours that was never reserved.
    Unknown,
    /// Not an order id at all.
    Garbage,
}

#[derive(Clone, Copy, Debug)]
enum Who {
    Owner,
    /// Any user, sometimes the owner.
    User(usize),
}

#[derive(Clone, Debug)]
enum Op {
    Put(Put),
    Reserve {
        item: usize,
        user: usize,
        qty: i64,
        key: Option<usize>,
    },
    /// The very same earlier reserve call again (same order id, same key).
    Replay(usize),
    Pay(Target, Who),
    Cancel(Target, Who),
    Expire(Target),
    Advance(Millis),
    ExpireDue,
    /// An item's pause switch (`Some`), or every sale's (`None`), on or off.
    Pause(Option<usize>, bool),
    /// The payment provider's payment of an order.
    Settle(Target),
    /// The operator's refund of an order, with restock or not.
    Refund(Target, bool),
}

fn put_strategy(items: usize) -> impl Strategy<Value = Put> {
    let window = prop_oneof![
        4 => Just(Window::Open),
        1 => Just(Window::Upcoming),
        1 => Just(Window::Over),
        2 => Just(Window::ClosingSoon),
    ];
    (0..items, 0..=5i64, 1..=3i64, window).prop_map(|(item, stock, limit, window)| Put {
        item,
        stock,
        limit,
        window,
    })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let target = prop_oneof![
        8 => any::<usize>().prop_map(Target::Issued),
        2 => any::<usize>().prop_map(Target::Attempted),
        1 => Just(Target::Unknown),
        1 => Just(Target::Garbage),
    ];
    let item = prop_oneof![9 => 0..ITEMS.len() - 1, 1 => Just(ITEMS.len() - 1)];
    let qty = prop_oneof![6 => Just(1i64), 3 => Just(2), 1 => Just(0), 1 => Just(3), 1 => Just(4)];
    let who = prop_oneof![4 => Just(Who::Owner), 1 => (0..USERS.len()).prop_map(Who::User)];
    let advance = prop_oneof![
        Just(1),
        Just(1_000),
        Just(20_000),
        Just(TIMEOUT_MS - 1),
        Just(TIMEOUT_MS),
        Just(TIMEOUT_MS + 1),
    ];
    prop_oneof![
        2 => put_strategy(ITEMS.len() - 1).prop_map(Op::Put),
        10 => (item, 0..USERS.len(), qty, proptest::option::weighted(0.5, 0..KEYS.len()))
            .prop_map(|(item, user, qty, key)| Op::Reserve { item, user, qty, key }),
        2 => any::<usize>().prop_map(Op::Replay),
        4 => (target.clone(), who.clone()).prop_map(|(t, w)| Op::Pay(t, w)),
        4 => (target.clone(), who).prop_map(|(t, w)| Op::Cancel(t, w)),
        3 => target.clone().prop_map(Op::Expire),
        4 => advance.prop_map(Op::Advance),
        2 => Just(Op::ExpireDue),
        2 => (proptest::option::weighted(0.7, 0..ITEMS.len()), any::<bool>())
            .prop_map(|(item, on)| Op::Pause(item, on)),
        3 => target.clone().prop_map(Op::Settle),
        3 => (target, any::<bool>()).prop_map(|(t, restock)| Op::Refund(t, restock)),
    ]
}

/// Three items created first (so most reserves meet an item), then the operations.
fn scenario() -> impl Strategy<Value = (Vec<Put>, Vec<Op>)> {
    let first = (put_strategy(1), put_strategy(1), put_strategy(1))
        .prop_map(|(a, b, c)| vec![Put { item: 0, ..a }, Put { item: 1, ..b }, Put { item: 2, ..c }]);
    (first, proptest::collection::vec(op_strategy(), 10..=50))
}

// ---- the engines ----------------------------------------------------------------------------

struct Engines {
    clock: Clock,
    redis: RedisEngine,
    embedded: EmbeddedEngine,
    /// The embedded engine's journal, for the restore check.
    store: Arc<Store>,
    _dir: tempfile::TempDir,
}

impl Engines {
    async fn new(server: &RedisServer) -> Result<Self, String> {
        let clock = Clock::manual(NOW);
        let redis = redis_engine(&server.url(), &clock, &SETTINGS);
        let mut conn = redis.connection();
        redis::cmd("FLUSHALL")
            .query_async::<()>(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        let Journaled {
            engine: embedded,
            store,
            dir,
        } = journaled_engine(&clock, &SETTINGS).await;
        Ok(Engines {
            clock,
            redis,
            embedded,
            store,
            _dir: dir,
        })
    }

    async fn redis_held(&self, item: &str, user: &str) -> Result<i64, String> {
        Ok(Redis::on(self.redis.connection()).held(item, user).await)
    }
}

fn spec(p: &Put, now: Millis) -> ItemSpec {
    let (starts_ms, ends_ms) = match p.window {
        Window::Open => (now - 1_000, now + 600_000),
        Window::Upcoming => (now + 30_000, now + 600_000),
        Window::Over => (now - 600_000, now - 1),
        Window::ClosingSoon => (now - 1_000, now + 45_000),
    };
    ItemSpec {
        item_id: ITEMS[p.item].to_owned(),
        name: format!("item {}", p.item),
        price_cents: 100 + p.stock,
        stock_total: p.stock,
        per_user_limit: p.limit,
        starts_ms,
        ends_ms,
        buckets: 1,
        paused: false,
    }
}

/// A reply as compared: errors by their text.
fn norm<T: Debug>(r: Result<T, seckill_gateway::error::Error>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("Err({e:?})"),
    }
}

/// Everything an engine holds that the contract defines, as comparable text.
async fn state<E: StockEngine>(
    e: &E,
    held: impl AsyncFn(&str, &str) -> Result<i64, String>,
    order_ids: &[String],
) -> Result<BTreeMap<String, String>, String> {
    let mut s = BTreeMap::new();
    for item in ITEMS {
        s.insert(format!("item {item}"), norm(e.item(item).await));
        for user in USERS {
            s.insert(format!("held {item} {user}"), format!("{:?}", held(item, user).await?));
        }
    }
    for id in order_ids {
        s.insert(format!("order {id}"), norm(e.order(id).await));
    }
    let mut catalog = e.catalog().await.map_err(|e| e.to_string())?;
    catalog.sort();
    s.insert("catalog".into(), format!("{catalog:?}"));
    Ok(s)
}

fn diff(a_name: &str, a: &BTreeMap<String, String>, b_name: &str, b: &BTreeMap<String, String>) -> Option<String> {
    let lines: Vec<String> = a
        .iter()
        .filter(|(k, v)| b.get(*k) != Some(*v))
        .map(|(k, v)| {
            format!(
                "  {k}:\n    {a_name}: {v}\n    {b_name}: {}",
                b.get(k).map_or("-", String::as_str)
            )
        })
        .collect();
    (!lines.is_empty()).then(|| lines.join("\n"))
}

/// How often each kind of reply was seen over the whole run (a generator that never
/// reaches a reply would make the comparison vacuous).
type Seen = Mutex<BTreeMap<String, usize>>;

/// `Reserved { … }` → `reserve:Reserved`; `[]` → `expire_due:[]`.
fn kind(op: &Op, reply: &str) -> String {
    let op = match op {
        Op::Put(_) => "put_item",
        Op::Reserve { .. } | Op::Replay(_) => "reserve",
        Op::Pay(..) | Op::Cancel(..) => "transition",
        Op::Expire(_) => "expire",
        Op::Advance(_) => "advance",
        Op::ExpireDue => "expire_due",
        Op::Pause(..) => "pause",
        Op::Settle(_) => "settle",
        Op::Refund(..) => "refund",
    };
    let name = match reply {
        "[]" => "[]",
        r if r.starts_with('[') => "[..]",
        r => r.split([' ', '{', '(']).next().unwrap_or(r),
    };
    format!("{op}:{name}")
}

/// Apply the scenario to both engines; `Err` describes the first difference.
async fn run_case(server: &RedisServer, seen: &Seen, puts: Vec<Put>, ops: Vec<Op>) -> Result<(), String> {
    let en = Engines::new(server).await?;
    let (r, m, clock) = (&en.redis, &en.embedded, &en.clock);
    let mut calls: Vec<ReserveCmd> = Vec::new();
    // The calls answered `Reserved`.
    let mut reserved: Vec<ReserveCmd> = Vec::new();
    let mut transcript: Vec<String> = Vec::new();

    let ops = puts.into_iter().map(Op::Put).chain(ops);
    for (step, op) in ops.enumerate() {
        let now = clock.now_ms();
        // The order id and item a target names.
        let target = |t: Target, calls: &[ReserveCmd]| -> (String, String, Option<String>) {
            let (t, calls) = match t {
                Target::Issued(i) if !reserved.is_empty() => (Target::Attempted(i), &reserved[..]),
                Target::Issued(i) => (Target::Attempted(i), calls),
                t => (t, calls),
            };
            match t {
                Target::Attempted(i) if !calls.is_empty() => {
                    let c = &calls[i % calls.len()];
                    (c.order_id.clone(), c.item_id.clone(), Some(c.user_id.clone()))
                }
                Target::Issued(_) | Target::Attempted(_) | Target::Unknown => {
                    (new_order_id(ITEMS[0]), ITEMS[0].to_owned(), None)
                }
                Target::Garbage => ("no-such-order".to_owned(), ITEMS[0].to_owned(), None),
            }
        };
        let user_of = |w: Who, owner: Option<String>| match (w, owner) {
            (Who::Owner, Some(o)) => o,
            (Who::Owner, None) => USERS[0].to_owned(),
            (Who::User(u), _) => USERS[u].to_owned(),
        };
        let (what, a, b) = match &op {
            Op::Put(p) => {
                let s = spec(p, now);
                (
                    format!("put_item {s:?}"),
                    norm(r.put_item(&s).await),
                    norm(m.put_item(&s).await),
                )
            }
            Op::Reserve { item, user, qty, key } => {
                let c = ReserveCmd {
                    item_id: ITEMS[*item].to_owned(),
                    user_id: USERS[*user].to_owned(),
                    qty: *qty,
                    order_id: new_order_id(ITEMS[*item]),
                    idem_key: key.map(|k| KEYS[k].to_owned()),
                    buckets: 1,
                };
                let out = (
                    format!("reserve {c:?}"),
                    norm(r.reserve(&c).await),
                    norm(m.reserve(&c).await),
                );
                if out.1.starts_with("Reserved") {
                    reserved.push(c.clone());
                }
                calls.push(c);
                out
            }
            Op::Replay(i) => {
                if calls.is_empty() {
                    continue;
                }
                let c = calls[i % calls.len()].clone();
                (
                    format!("replay reserve {c:?}"),
                    norm(r.reserve(&c).await),
                    norm(m.reserve(&c).await),
                )
            }
            Op::Pay(t, w) | Op::Cancel(t, w) => {
                let tr = if matches!(op, Op::Pay(..)) {
                    Transition::Pay
                } else {
                    Transition::Cancel
                };
                let (id, _, owner) = target(*t, &calls);
                let user = user_of(*w, owner);
                (
                    format!("{tr:?} {id} by {user}"),
                    norm(r.transition(tr, &id, &user).await),
                    norm(m.transition(tr, &id, &user).await),
                )
            }
            Op::Expire(t) => {
                let (id, item, _) = target(*t, &calls);
                (
                    format!("expire {id} {item}"),
                    norm(r.expire(&id, &item).await),
                    norm(m.expire(&id, &item).await),
                )
            }
            Op::Pause(item, on) => {
                let item = item.map(|i| ITEMS[i]);
                (
                    format!("pause {item:?} {on}"),
                    norm(r.pause(item, *on).await),
                    norm(m.pause(item, *on).await),
                )
            }
            Op::Settle(t) | Op::Refund(t, _) => {
                let settle = match op {
                    Op::Refund(_, restock) => Settle::Refund { restock },
                    _ => Settle::Payment,
                };
                let (id, _, _) = target(*t, &calls);
                (
                    format!("{settle:?} {id}"),
                    norm(r.settle(settle, &id, None).await),
                    norm(m.settle(settle, &id, None).await),
                )
            }
            Op::Advance(ms) => {
                clock.advance(*ms);
                transcript.push(format!("#{step} t+{} advance {ms}", now - NOW));
                continue;
            }
            Op::ExpireDue => {
                // The order of the list is not part of the contract (Redis walks shard by
                // shard, the embedded engine by deadline): compare it sorted.
                let sorted = |v: Result<Vec<seckill_gateway::engine::Expired>, _>| {
                    norm(v.map(|mut v| {
                        v.sort_by(|x, y| x.order_id.cmp(&y.order_id));
                        v
                    }))
                };
                (
                    "expire_due(1000)".to_owned(),
                    sorted(r.expire_due(1000).await),
                    sorted(m.expire_due(1000).await),
                )
            }
        };
        transcript.push(format!("#{step} t+{} {what}\n      -> {a}", now - NOW));
        *seen.lock().unwrap().entry(kind(&op, &a)).or_default() += 1;
        if a != b {
            return Err(format!(
                "replies differ at step {step}: {what}\n  redis:    {a}\n  embedded: {b}\ntranscript:\n{}",
                transcript.join("\n")
            ));
        }
    }

    let ids: Vec<String> = calls.iter().map(|c| c.order_id.clone()).collect();
    let rs = state(r, async |i: &str, u: &str| en.redis_held(i, u).await, &ids).await?;
    let ms = state(m, async |i: &str, u: &str| Ok(m.held(i, u)), &ids).await?;
    if let Some(d) = diff("redis", &rs, "embedded", &ms) {
        return Err(format!(
            "final states differ:\n{d}\ntranscript:\n{}",
            transcript.join("\n")
        ));
    }

    // A restart: the embedded engine rebuilt from its journal holds the same state.
    let restored = embedded_engine(clock, &SETTINGS, None);
    restored.restore(
        en.store.items().await.map_err(|e| e.to_string())?,
        en.store.orders(None).await.map_err(|e| e.to_string())?,
    );
    let ss = state(&restored, async |i: &str, u: &str| Ok(restored.held(i, u)), &ids).await?;
    if let Some(d) = diff("live", &ms, "restored", &ss) {
        return Err(format!(
            "the embedded engine restored from its journal differs:\n{d}\ntranscript:\n{}",
            transcript.join("\n")
        ));
    }
    Ok(())
}

#[test]
fn engines_give_identical_replies_and_state() {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let seen = Seen::default();
    let missing = || -> Vec<&str> {
        let seen = seen.lock().unwrap();
        EXPECTED_KINDS
            .iter()
            .copied()
            .filter(|k| !seen.contains_key(*k))
            .collect()
    };
    // Rounds of `cases` random cases (a new seed each), until every kind of reply has been
    // compared, at most ROUNDS: a rare reply can miss one round of 64 (`LimitReached` did
    // once in a fresh CI clone), four in a row would mean the generator lost it.
    const ROUNDS: usize = 4;
    let mut rounds = 0;
    loop {
        rounds += 1;
        let mut runner = TestRunner::new(Config {
            cases,
            // The minimal case is printed; no regression file is written into the tree.
            failure_persistence: None,
            max_shrink_iters: 2_000,
            ..Config::default()
        });
        let result = runner.run(&scenario(), |(puts, ops)| {
            rt.block_on(run_case(&server, &seen, puts, ops))
                .map_err(TestCaseError::fail)
        });
        if let Err(e) = result {
            panic!("{e}");
        }
        // Fewer cases (`PROPTEST_CASES`): one round, no coverage check.
        if cases < 64 || rounds == ROUNDS || missing().is_empty() {
            break;
        }
    }
    let missing = missing();
    let seen = seen.into_inner().unwrap();
    eprintln!("replies seen over {rounds} round(s) of {cases} cases: {seen:#?}");
    if cases >= 64 {
        assert!(
            missing.is_empty(),
            "the generator never produced {missing:?} in {ROUNDS} rounds of {cases} cases; seen: {seen:?}"
        );
    }
}

/// Replies that runs of 64 cases (up to four such rounds) must have compared at least once.
const EXPECTED_KINDS: &[&str] = &[
    "put_item:Stored",
    "put_item:BelowHeld",
    "reserve:Reserved",
    "reserve:Duplicate",
    "reserve:UnknownItem",
    "reserve:NotStarted",
    "reserve:Ended",
    "reserve:BadQty",
    "reserve:LimitReached",
    "reserve:SoldOut",
    "reserve:Paused",
    "pause:true",
    "pause:false",
    "transition:Done",
    "transition:Already",
    "transition:Closed",
    "transition:Forbidden",
    "transition:UnknownOrder",
    "settle:Done",
    "settle:Already",
    "settle:UnknownOrder",
    "refund:Done",
    "refund:Already",
    "refund:Closed",
    "expire:Expired",
    "expire:NotDue",
    "expire:NotReserved",
    "expire:UnknownOrder",
    "expire_due:[]",
    "expire_due:[..]",
];
