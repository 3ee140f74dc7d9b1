//! Network faults (issue 15): Redis, PostgreSQL, or both cut at the network level in the
//! middle of a burst of shoppers, by a proxy the test controls ([`common::proxy`]), then
//! restored. Unlike a killed server, a cut refuses nothing and closes nothing: the gateway
//! learns of it only from its own timeouts.
//!
//! Each burst test runs shoppers reserving one item of limited stock over HTTP (one unit
//! each) and shoppers listing their orders (read from the database), cuts once enough orders
//! are made, keeps the cut for [`CUT_FOR`], restores, and sells on. It checks:
//!
//! - during the cut: no request hangs (each is answered within its bound, below); a reserve
//!   that needs the cut side is answered 503 `unavailable`, never a 200 that is not durable;
//!   with only the database cut, reserves go on; `/readyz` answers within a second, and the
//!   routes that read the database within the store timeout;
//! - after the restore: selling resumes (200s again), the lists are answered again, the
//!   persistence worker catches up;
//! - once quiet: reserved + paid ≤ stock and the stock left is stock − sold, every 200's order
//!   is a row of the database, and every row was answered 200 — or, the one case the
//!   contract allows ("Deviations": a reserve call that ran and whose reply was lost), its
//!   request was answered 503 and its call could have reached Redis: sent before a blackhole
//!   began, still waiting when it ended (a call waiting for a connection goes out when one
//!   comes up), or sent before a hold ended.
//!
//! Each cut comes in both kinds ([`Cut`]): a blackhole (the connections it caught stay dead
//! after the restore: the gateway must give up on them) and a hold (everything sent during
//! the cut arrives after the restore, late). Two more tests: the database's pool after a
//! blackhole that caught a query on every connection, and the change feed (pub/sub) of an
//! instance cut off from Redis.
//!
//! `NETFAULT_LOG=seckill_gateway=debug` shows the gateway's log (with the cut and the
//! restore marked) next to a failing burst test's figures.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::gateway::Gateway;
use common::http::{Api, RequestExt, send, send_until, try_send};
use common::inspect::Redis;
use common::proxy::{Cut, Proxy};
use common::{RedisServer, poll, shared_pg, unique};
use seckill_gateway::store::Store;

/// `--redis-timeout` and `--store-timeout` of the gateway under test.
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
const STORE_TIMEOUT: Duration = Duration::from_secs(1);
/// Slack for a loaded 2-core machine on every latency bound.
const MARGIN: Duration = Duration::from_millis(1_500);
/// The longest a reserve may take: a call whose reply was lost is sent again for twice the
/// Redis timeout from when the request arrived, and the last call sent has a timeout of its
/// own (docs/contract.md, "Deviations").
const RESERVE_BOUND: Duration = REDIS_TIMEOUT.saturating_mul(3).saturating_add(MARGIN);
/// How long each cut lasts: longer than every timeout, so the gateway gives up on the cut
/// side, and more than a circuit cool-down.
const CUT_FOR: Duration = Duration::from_secs(4);

/// Enough that the burst does not sell out before the restore, even while the database is
/// cut and reserves are answered at full speed.
const STOCK: i64 = 6_000;
const SHOPPERS: usize = 24;
/// Shoppers listing their orders, as fast as they are answered.
const READERS: usize = 12;

/// What the test started: the servers, a proxy in front of each, the gateway that goes
/// through the proxies, and direct looks at Redis and the database.
struct Rig {
    redis: RedisServer,
    /// The database, directly.
    db: String,
    redis_proxy: Proxy,
    pg_proxy: Proxy,
    gw: Gateway,
    rd: Redis,
    store: Store,
}

impl Rig {
    async fn start() -> Rig {
        let redis = RedisServer::start();
        let redis_proxy = Proxy::start(redis.port()).await;
        // A fresh database on the test cluster; the gateway reaches it through the proxy.
        let db = shared_pg();
        let (base, name) = db.rsplit_once('/').expect("a database URL");
        let pg_port: u16 = base
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .expect("a port in the database URL");
        let pg_proxy = Proxy::start(pg_port).await;
        let gw = Gateway::builder(&format!("redis://127.0.0.1:{}/", redis_proxy.port()))
            .database(&format!("postgres://postgres@127.0.0.1:{}/{name}", pg_proxy.port()))
            .flag("--redis-timeout", &format!("{}ms", REDIS_TIMEOUT.as_millis()))
            .flag("--store-timeout", &format!("{}ms", STORE_TIMEOUT.as_millis()))
            .start()
            .await;
        let rd = Redis::connect(&redis).await;
        let store = Store::connect(&db, Duration::from_secs(5))
            .await
            .expect("the test's own connection to the database");
        Rig {
            redis,
            db,
            redis_proxy,
            pg_proxy,
            gw,
            rd,
            store,
        }
    }
}

/// One request of the burst, as the shopper saw it.
#[derive(Clone, Debug)]
struct Shot {
    /// A reserve (a new user each), or a shopper's `GET /api/v1/orders` (read from the
    /// database).
    reserve: bool,
    user: String,
    started: Instant,
    took: Duration,
    /// `Ok(order_id)` on 200 (`Ok("")` for a list); `Err("<status> <code>")` on a refusal,
    /// or `Err("no answer: …")`.
    outcome: Result<String, String>,
}

impl Shot {
    async fn take(reserve: bool, user: String, req: reqwest::RequestBuilder) -> Shot {
        let started = Instant::now();
        let outcome = match try_send(req).await {
            Ok(r) if r.status == 200 && reserve => Ok(r.order_id()),
            Ok(r) if r.status == 200 => Ok(String::new()),
            Ok(r) => Err(format!("{} {}", r.status.as_u16(), r.error())),
            Err(e) => Err(format!("no answer: {e}")),
        };
        Shot {
            reserve,
            user,
            started,
            took: started.elapsed(),
            outcome,
        }
    }
}

/// Shoppers reserving one unit each of `item` (a new user per request), [`SHOPPERS`] at a
/// time, and [`READERS`] shoppers listing their orders (which keeps the database's
/// connections busy), until stopped.
struct Burst {
    shots: Arc<Mutex<Vec<Shot>>>,
    ok: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Burst {
    fn start(api: &Api, item: &str) -> Burst {
        let shots = Arc::new(Mutex::new(Vec::new()));
        let ok = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let next = Arc::new(AtomicU64::new(0));
        let tasks = (0..SHOPPERS + READERS)
            .map(|i| {
                let reserve = i < SHOPPERS;
                let (api, item, shots, ok, stop, next) = (
                    api.clone(),
                    item.to_owned(),
                    shots.clone(),
                    ok.clone(),
                    stop.clone(),
                    next.clone(),
                );
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let shot = if reserve {
                            let user = format!("u{}", next.fetch_add(1, Ordering::Relaxed));
                            let req = api.reserve_req(&item, &user).raw_json("{\"qty\":1}");
                            Shot::take(true, user, req).await
                        } else {
                            let user = format!("u{}", next.load(Ordering::Relaxed) / 2);
                            let req = api.get("/api/v1/orders?limit=5").user(&user);
                            Shot::take(false, user, req).await
                        };
                        if reserve && shot.outcome.is_ok() {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        shots.lock().unwrap().push(shot);
                        // A steady stream rather than as fast as possible: the stock lasts
                        // through the cut on a fast machine too.
                        if reserve {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                })
            })
            .collect();
        Burst { shots, ok, stop, tasks }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    /// Wait until `n` more reservations than now were answered 200 (at most `within`).
    async fn until_more_ok(&self, n: u64, within: Duration) -> bool {
        let target = self.ok() + n;
        poll(within, async || (self.ok() >= target).then_some(()))
            .await
            .is_some()
    }

    async fn stop(self) -> Vec<Shot> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("a shopper task");
        }
        Arc::try_unwrap(self.shots)
            .expect("every shopper stopped")
            .into_inner()
            .unwrap()
    }
}

/// The shots of one kind (reserves or lists) started in `[from, to)`.
fn started_in(shots: &[Shot], reserve: bool, from: Instant, to: Instant) -> Vec<&Shot> {
    shots
        .iter()
        .filter(|s| s.reserve == reserve && s.started >= from && s.started < to)
        .collect()
}

fn slowest(shots: &[&Shot]) -> Duration {
    shots.iter().map(|s| s.took).max().unwrap_or_default()
}

/// Counts of outcomes: `{"ok": 12, "503 unavailable": 40, …}`.
fn tally(shots: &[&Shot]) -> HashMap<String, usize> {
    let mut t = HashMap::new();
    for s in shots {
        let key = match &s.outcome {
            Ok(_) => "ok".to_owned(),
            Err(e) if e.starts_with("no answer") => "no answer".to_owned(),
            Err(e) => e.clone(),
        };
        *t.entry(key).or_default() += 1;
    }
    t
}

/// `n` shots, slowest so-and-so, outcomes: one line of figures.
fn figures(shots: &[&Shot]) -> String {
    format!("{} (slowest {:?}) {:?}", shots.len(), slowest(shots), tally(shots))
}

/// Asserts each shot was answered within `bound` with one of `allowed` (or 200).
#[track_caller]
fn assert_answered(name: &str, what: &str, shots: &[&Shot], bound: Duration, allowed: &[&str]) {
    let late: Vec<Duration> = shots.iter().map(|s| s.took).filter(|t| *t > bound).collect();
    assert!(
        late.is_empty(),
        "{name}: {} {what} took longer than {bound:?}, the slowest {:?}",
        late.len(),
        late.iter().max()
    );
    for s in shots {
        if let Err(e) = &s.outcome {
            assert!(
                allowed.contains(&e.as_str()),
                "{name}: {what} of {} answered {e}",
                s.user
            );
        }
    }
}

/// What the test checks while the network is cut, besides the burst: `/readyz` answers
/// within a second, and a route reading the database within the store timeout. Returns the
/// slowest answer.
async fn probe_during_cut(api: &Api, item: &str, cut_pg: bool) -> Duration {
    let mut slowest = Duration::ZERO;
    for _ in 0..3 {
        let started = Instant::now();
        let r = try_send(api.get("/readyz")).await.expect("/readyz answers");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "/readyz took {took:?} during the cut");
        assert!(
            r.status.is_success() || r.status == 503,
            "/readyz: {} {}",
            r.status,
            r.text
        );
        slowest = slowest.max(took);
        if cut_pg {
            // Stats read the database: answered (503) within the store timeout.
            let started = Instant::now();
            let r = try_send(api.admin(api.get(&format!("/admin/v1/items/{item}/stats"))))
                .await
                .expect("stats answer");
            let took = started.elapsed();
            assert!(
                took < STORE_TIMEOUT + MARGIN,
                "stats took {took:?} with the database cut"
            );
            r.assert_refused(503, "unavailable");
            slowest = slowest.max(took);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    slowest
}

/// The scenario of every test: a burst, `cut_redis` and/or `cut_pg` cut `how` for
/// [`CUT_FOR`], restored, sold on, then the invariants once quiet.
async fn cut_mid_burst(cut_redis: bool, cut_pg: bool, how: Cut) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("NETFAULT_LOG").unwrap_or_else(|_| "off".into()))
        .with_test_writer()
        .try_init();
    let mut rig = Rig::start().await;
    let item = unique("netfault");
    rig.gw.create_item(&item, STOCK, 1).await;
    let name = match (cut_redis, cut_pg) {
        (true, true) => format!("redis+postgres {how:?}"),
        (true, false) => format!("redis {how:?}"),
        _ => format!("postgres {how:?}"),
    };

    let burst = Burst::start(&rig.gw.api, &item);
    assert!(
        burst.until_more_ok(150, Duration::from_secs(30)).await,
        "the burst sells before the cut"
    );
    let cut_at = Instant::now();
    tracing::info!(how = ?how, "network cut");
    if cut_redis {
        rig.redis_proxy.cut(how);
    }
    if cut_pg {
        rig.pg_proxy.cut(how);
    }
    let ok_before_cut = burst.ok();
    let probe_slowest = probe_during_cut(&rig.gw.api, &item, cut_pg).await;
    tokio::time::sleep(CUT_FOR.saturating_sub(cut_at.elapsed())).await;
    let ok_during_cut = burst.ok() - ok_before_cut;
    let restored_at = Instant::now();
    tracing::info!("network restored");
    rig.redis_proxy.restore();
    rig.pg_proxy.restore();
    // Selling resumes: 100 more orders within 15 s of the restore; then a second for the
    // lists to come back too.
    let resumed = burst.until_more_ok(100, Duration::from_secs(15)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let end = Instant::now();
    let shots = burst.stop().await;

    // --- During the cut, and after ---
    let reserves_during = started_in(&shots, true, cut_at, restored_at);
    let reserves_after = started_in(&shots, true, restored_at, end);
    let lists_during = started_in(&shots, false, cut_at, restored_at);
    let lists_after = started_in(&shots, false, restored_at, end);
    // The last second: every list is answered from the database again.
    let lists_last = started_in(&shots, false, end - Duration::from_secs(1), end);
    // Recovery: the first reserve begun after the restore that was answered 200.
    let recovered = reserves_after
        .iter()
        .filter(|s| s.outcome.is_ok())
        .map(|s| s.started - restored_at)
        .min();
    println!(
        "{name}: reserves during the cut {}; after the restore {}, selling again {recovered:?} after it; lists during the cut {}; after the restore {}, in its last second {}; \
         /readyz and stats during the cut: slowest {probe_slowest:?}; 200s while cut {ok_during_cut}; \
         connections made: Redis {}, PostgreSQL {}",
        figures(&reserves_during),
        figures(&reserves_after),
        figures(&lists_during),
        figures(&lists_after),
        figures(&lists_last),
        rig.redis_proxy.accepted(),
        rig.pg_proxy.accepted(),
    );
    let reserves = started_in(
        &shots,
        true,
        cut_at - Duration::from_secs(60),
        end + Duration::from_secs(60),
    );
    let lists = started_in(
        &shots,
        false,
        cut_at - Duration::from_secs(60),
        end + Duration::from_secs(60),
    );
    assert_answered(
        &name,
        "reserves",
        &reserves,
        RESERVE_BOUND,
        &["503 unavailable", "410 sold_out"],
    );
    assert_answered(&name, "lists", &lists, STORE_TIMEOUT + MARGIN, &["503 unavailable"]);
    assert!(resumed, "{name}: selling resumed after the restore");
    assert!(
        !lists_last.is_empty() && lists_last.iter().all(|s| s.outcome.is_ok()),
        "{name}: every list of the last second answered from the database: {:?}",
        tally(&lists_last)
    );
    // Begun and answered inside the cut.
    let inside = |s: &Shot| s.started >= cut_at + Duration::from_millis(100) && s.started + s.took <= restored_at;
    if cut_redis {
        // Every reserve that began and ended inside the cut needed Redis: 503.
        for s in reserves_during.iter().filter(|s| inside(s)) {
            assert_eq!(
                s.outcome.as_ref().err().map(String::as_str),
                Some("503 unavailable"),
                "{name}: a reserve of {} during the Redis cut",
                s.user
            );
        }
    } else {
        // Redis mode: the stream holds the events while the database is away.
        assert!(
            ok_during_cut >= 50,
            "{name}: reserves sold on while the database was cut"
        );
    }
    if cut_pg {
        for s in lists_during.iter().filter(|s| inside(s)) {
            assert_eq!(
                s.outcome.as_ref().err().map(String::as_str),
                Some("503 unavailable"),
                "{name}: a list of {} during the database cut",
                s.user
            );
        }
    }

    // --- Once quiet ---
    let rows = poll(Duration::from_secs(30), async || {
        let held = rig.rd.item_field(&item, "reserved").await + rig.rd.item_field(&item, "paid").await;
        let rows = rig.store.orders(Some(&item)).await.ok()?;
        (rows.len() as i64 == held).then_some(rows)
    })
    .await;
    let Some(rows) = rows else {
        let held = rig.rd.item_field(&item, "reserved").await + rig.rd.item_field(&item, "paid").await;
        let rows = rig.store.orders(Some(&item)).await.map(|r| r.len());
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(seckill_gateway::engine::keys::events(seckill_gateway::ids::shard_of(
                &item,
            )))
            .arg(seckill_gateway::engine::keys::GROUP)
            .query_async(&mut rig.rd.conn)
            .await
            .expect("XPENDING");
        panic!(
            "{name}: Redis holds {held} reservations, the database {rows:?} rows 30 s after the restore; pending {pending:?}"
        );
    };
    let quiet_after = restored_at.elapsed();
    let ids: HashSet<&str> = rows.iter().map(|r| r.order_id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "{name}: no duplicate rows");
    let (reserved, paid, left) = (
        rig.rd.item_field(&item, "reserved").await,
        rig.rd.item_field(&item, "paid").await,
        rig.rd.item_field(&item, "stock").await,
    );
    assert!(
        reserved + paid <= STOCK,
        "{name}: sold {} > stock {STOCK}",
        reserved + paid
    );
    assert_eq!(left, STOCK - reserved - paid, "{name}: stock left = stock − sold");
    let shown = rig.gw.get_item(&item).await;
    assert_eq!(
        shown.assert_ok()["stock_remaining"],
        left,
        "{name}: the item shows the stock left"
    );

    let answered: HashMap<&str, &Shot> = shots
        .iter()
        .filter(|s| s.reserve)
        .filter_map(|s| s.outcome.as_ref().ok().map(|o| (o.as_str(), s)))
        .collect();
    for order in answered.keys() {
        assert!(
            ids.contains(order),
            "{name}: order {order} was answered 200 and is not a row"
        );
    }
    let by_user: HashMap<&str, &Shot> = shots
        .iter()
        .filter(|s| s.reserve)
        .map(|s| (s.user.as_str(), s))
        .collect();
    let (mut in_doubt, mut late) = (0, 0);
    for r in &rows {
        if answered.contains_key(r.order_id.as_str()) {
            continue;
        }
        let s = by_user
            .get(r.user_id.as_str())
            .unwrap_or_else(|| panic!("{name}: row {} of unknown user {}", r.order_id, r.user_id));
        // The reply of a call that ran was lost: answered 503, the order made
        // (docs/contract.md, "Deviations"). Blackholed, a call can have run if it was
        // already sent when the cut began, or if its request was still waiting at the
        // restore: a call issued during the cut waits for the new connection the gateway
        // is making, goes out when that comes up after the restore, runs, and its timeout,
        // counted from when it was issued, can end before the reply is in (seen under load:
        // sent 0.1 s before its timeout). Held, any call sent before the restore runs after
        // it, late.
        let could_have_run = match how {
            Cut::Blackhole => s.started < cut_at || s.started + s.took > restored_at,
            Cut::Hold => s.started < restored_at,
        };
        assert!(
            cut_redis && could_have_run && s.outcome.as_ref().err().map(String::as_str) == Some("503 unavailable"),
            "{name}: row {} of {} was not answered 200 (it was {:?}, started {:?} after the cut)",
            r.order_id,
            r.user_id,
            s.outcome,
            s.started.checked_duration_since(cut_at)
        );
        if s.started >= cut_at {
            late += 1;
        }
        in_doubt += 1;
    }
    println!(
        "{name}: sold {} of {STOCK}, {} rows (all in the database {quiet_after:?} after the restore), {} answered 200, \
         {in_doubt} answered 503 in doubt ({late} of them sent during the cut)",
        reserved + paid,
        rows.len(),
        answered.len()
    );
    rig.gw.stop_within(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_blackholed_mid_burst() {
    cut_mid_burst(true, false, Cut::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_held_mid_burst() {
    cut_mid_burst(true, false, Cut::Hold).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_blackholed_mid_burst() {
    cut_mid_burst(false, true, Cut::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_held_mid_burst() {
    cut_mid_burst(false, true, Cut::Hold).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_blackholed_mid_burst() {
    cut_mid_burst(true, true, Cut::Blackhole).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_held_mid_burst() {
    cut_mid_burst(true, true, Cut::Hold).await;
}

/// The database stalls (a lock the test holds blocks the gateway's queries), and is
/// blackholed while they wait: the store timeout cuts them off. After the restore the store
/// must serve again. sqlx checks a connection it gets back with a ping that has no timeout,
/// and on a blackholed connection that ping never ends, holding its pool slot for good:
/// with every slot caught so, the database stayed unreachable after the restore.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_blackholed_with_queries_in_flight() {
    let rig = Rig::start().await;
    let direct = sqlx::PgPool::connect(&rig.db).await.expect("the test's own pool");
    let lock = lock_table(&direct, "orders").await;
    // More lists than the gateway's pool has connections: every connection waits on the lock.
    let lists: Vec<_> = (0..16)
        .map(|i| {
            let api = rig.gw.api.clone();
            tokio::spawn(Shot::take(
                false,
                format!("u{i}"),
                api.get("/api/v1/orders").user(&format!("u{i}")),
            ))
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    rig.pg_proxy.cut(Cut::Blackhole);
    let mut shots = Vec::new();
    for l in lists {
        shots.push(l.await.expect("a list"));
    }
    lock.rollback().await.expect("ROLLBACK: the lock goes");
    let shots: Vec<&Shot> = shots.iter().collect();
    println!("lists in flight at the cut: {}", figures(&shots));
    assert_answered(
        "postgres stalled",
        "lists",
        &shots,
        STORE_TIMEOUT + MARGIN,
        &["503 unavailable"],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    rig.pg_proxy.restore();
    let restored_at = Instant::now();
    let back = common::http::send_until(
        Duration::from_secs(15),
        rig.gw.api.get("/api/v1/orders").user("u0"),
        |r| r.status == 200,
    )
    .await;
    println!(
        "lists answered again {:?} after the restore",
        back.as_ref().map(|_| restored_at.elapsed())
    );
    assert!(back.is_some(), "the store serves again after the restore");
}

/// The change feed of an instance whose link to Redis was blackholed: its subscription's
/// connection is dead after the restore, and as a subscriber only listens, nothing it does
/// times out. Another instance's change must still reach it: here a per-user limit raised
/// on the other instance, which this one checks from its item cache (30 s) before Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_comes_back_after_a_blackhole() {
    let rig = Rig::start().await;
    let other = Gateway::builder(&rig.redis.url()).database(&rig.db).start().await;
    let item = unique("feed");
    rig.gw.create_item(&item, 10, 1).await;
    let two = |user: &str| rig.gw.reserve_req(&item, user).raw_json("{\"qty\":2}");
    // Refused from the cached item: qty above its limit.
    common::http::send(two("early"))
        .await
        .assert_refused(400, "bad_request");
    rig.redis_proxy.cut(Cut::Blackhole);
    tokio::time::sleep(CUT_FOR).await;
    rig.redis_proxy.restore();
    let ready = rig.gw.readyz_until("ready").await;
    assert_eq!(ready.json["status"], "ready", "{}", ready.text);

    other.put_item(&item, 10, 3).await.assert_ok();
    let changed_at = Instant::now();
    let mut n = 0;
    let seen = poll(Duration::from_secs(10), async || {
        n += 1;
        let r = common::http::send(two(&format!("late{n}"))).await;
        (r.status == 200).then(|| changed_at.elapsed())
    })
    .await;
    println!("a change on another instance seen {seen:?} after it");
    assert!(
        seen.is_some(),
        "the raised limit holds on the instance that was cut off"
    );
}

/// Embedded mode on PostgreSQL: a reservation's commit is sent, stalls in the database
/// (the test holds a lock on the orders table), and the gateway's store timeout ends its
/// wait; the database applies it once the lock goes. Undoing the reservation at the timeout
/// (what the engine did) sold the unit twice: to this shopper in the database, and again to
/// the next one. The commit is in doubt: the shopper gets 503 (the contract's "reply lost"
/// deviation), the engine keeps the reservation, and the journal writes it again until the
/// database answers; what the engine is given meanwhile is refused at once (nothing of it
/// was sent). Once the lock goes: one row, the item sold out, the engine and the database
/// agree, and the journal writes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_commit_left_in_doubt_is_kept_not_sold_again() {
    let db = shared_pg();
    let gw = embedded_on(&db).await;
    let store = Store::connect(&db, Duration::from_secs(5))
        .await
        .expect("the test's own connection to the database");
    let item = gw.new_item(1, 1).await;
    gw.get_item(&item).await.assert_ok();
    // Made now: an item's definition goes through the journal too.
    let other = gw.new_item(5, 1).await;
    let rows = async || {
        let rows = store.orders(Some(&item)).await.expect("the item's rows");
        rows.iter().map(|o| o.user_id.clone()).collect::<Vec<_>>()
    };
    let direct = sqlx::PgPool::connect(&db).await.expect("the test's own pool");
    let lock = lock_table(&direct, "orders").await;

    let started = Instant::now();
    let alice = gw.reserve(&item, "alice").await;
    let took = started.elapsed();
    alice.assert_refused(503, "unavailable");
    assert!(took < STORE_TIMEOUT + MARGIN, "answered at the store timeout: {took:?}");
    // The engine kept her reservation: the next shopper finds the item sold out (no unit
    // came back), and a reservation of another item, made while the journal is writing
    // alice's again, is refused at once and undone.
    gw.reserve(&item, "bob").await.assert_refused(410, "sold_out");
    assert_eq!(gw.get_item(&item).await.assert_ok()["stock_remaining"], 0);
    let started = Instant::now();
    gw.reserve(&other, "erin").await.assert_refused(503, "unavailable");
    assert!(started.elapsed() < MARGIN, "refused at once: {:?}", started.elapsed());
    assert_eq!(
        gw.get_item(&other).await.assert_ok()["stock_remaining"],
        5,
        "erin's undone"
    );

    lock.rollback().await.expect("ROLLBACK: the lock goes");
    // The database applies what was waiting for the lock, and the journal's next write
    // of alice's reservation is answered: the engine's writes go through again.
    let carol = send_until(Duration::from_secs(15), gw.reserve_req(&other, "carol"), |r| {
        r.status == 200
    })
    .await;
    assert!(carol.is_some(), "the journal writes again after the stall");
    assert_eq!(rows().await, ["alice"], "one row for one unit, nothing sold twice");
    let item_after = gw.get_item(&item).await.assert_ok().clone();
    assert_eq!(item_after["stock_remaining"], 0, "{item_after}");
    gw.reserve(&item, "dave").await.assert_refused(410, "sold_out");
    let other_rows = store.orders(Some(&other)).await.expect("rows");
    assert_eq!(
        other_rows.iter().map(|o| o.user_id.as_str()).collect::<Vec<_>>(),
        ["carol"],
        "erin's refused reservation was never written"
    );
}

/// Embedded: a retry is told of a change only once it is durable. While a reservation's
/// commit (or a payment's) waits on the database, the engine holds the change in memory; a
/// retry answered 200 from there ("your order", "already paid") would be a yes that a
/// crash before the commit loses. Such a retry waits for the commit: answered with the
/// change once it lands, 503 if it has not landed within a second (in doubt, say). So does
/// a read of the order (`GET /api/v1/orders/{id}`): it never shows a change a crash could
/// take back.
#[tokio::test(flavor = "multi_thread")]
async fn an_embedded_retry_is_answered_from_memory_only_once_durable() {
    let db = shared_pg();
    let gw = embedded_on(&db).await;
    let item = gw.new_item(5, 1).await;
    let bobs = gw.reserve_ok(&item, "bob").await;
    let direct = sqlx::PgPool::connect(&db).await.expect("the test's own pool");
    let status = async |order: &str| -> Option<String> {
        sqlx::query_scalar("SELECT status FROM orders WHERE order_id = $1")
            .bind(order)
            .fetch_optional(&direct)
            .await
            .expect("the order's row")
    };
    assert_eq!(status(&bobs).await.as_deref(), Some("reserved"));

    // Alice's reservation waits on the lock; her retry with the same key comes meanwhile
    // and waits too; the lock goes before the store timeout: both get her one order.
    let lock = lock_table(&direct, "orders").await;
    let keyed = || gw.reserve_req(&item, "alice").header("Idempotency-Key", "checkout-1");
    let first = tokio::spawn(send(keyed()));
    tokio::time::sleep(STORE_TIMEOUT / 4).await;
    let retry = tokio::spawn(send(keyed()));
    tokio::time::sleep(STORE_TIMEOUT / 4).await;
    assert!(!first.is_finished(), "alice's reservation waits on the lock");
    assert!(!retry.is_finished(), "her retry is not answered from memory meanwhile");
    lock.rollback().await.expect("ROLLBACK: the lock goes");
    let alices = first.await.expect("alice's call").order_id();
    let again = retry.await.expect("alice's retry");
    assert_eq!(again.order_id(), alices, "the retry's order is the first call's");
    assert_eq!(status(&alices).await.as_deref(), Some("reserved"), "a 200 is a row");

    // Bob's payment waits past the store timeout: in doubt. A repeated pay, during the wait
    // and after it, is 503, never "paid" from memory.
    let lock = lock_table(&direct, "orders").await;
    let bob_pays = tokio::spawn(send(gw.pay_req(&bobs, "bob")));
    tokio::time::sleep(STORE_TIMEOUT / 4).await;
    assert!(!bob_pays.is_finished(), "bob's payment waits on the lock");
    gw.pay(&bobs, "bob").await.assert_refused(503, "unavailable");
    // Nor does a read of his order show "paid" before it is durable.
    gw.get_order(&bobs, "bob").await.assert_refused(503, "unavailable");
    bob_pays
        .await
        .expect("bob's first pay")
        .assert_refused(503, "unavailable");
    gw.pay(&bobs, "bob").await.assert_refused(503, "unavailable");
    gw.get_order(&bobs, "bob").await.assert_refused(503, "unavailable");
    lock.rollback().await.expect("ROLLBACK: the lock goes");
    // Once the journal's write again is answered, the retry gets the payment, in the
    // database, and a read shows it.
    let paid = send_until(Duration::from_secs(15), gw.pay_req(&bobs, "bob"), |r| r.status == 200).await;
    assert_eq!(paid.expect("bob's retry answered 200").json["status"], "paid");
    assert_eq!(status(&bobs).await.as_deref(), Some("paid"), "a 200 is a row");
    assert_eq!(gw.get_order(&bobs, "bob").await.assert_ok()["status"], "paid");
    assert_eq!(
        gw.get_item(&item).await.assert_ok()["stock_remaining"],
        3,
        "alice's one reservation, bob's paid unit"
    );
}

/// Embedded: an item's definition whose write is in doubt (the store timeout passed while
/// the database held it) is kept, and written again until the database takes it: the
/// gateway and the database agree, also after a restart. The admin is told 503 (sending the
/// same definition again is harmless). A pause switch that arrives meanwhile is refused at
/// once, undone, and never written.
#[tokio::test(flavor = "multi_thread")]
async fn an_embedded_item_definition_in_doubt_is_kept_and_written() {
    let db = shared_pg();
    let mut gw = embedded_on(&db).await;
    let item = gw.new_item(5, 1).await;
    let direct = sqlx::PgPool::connect(&db).await.expect("the test's own pool");
    let row = async || -> (i64, bool) {
        sqlx::query_as("SELECT stock_total, paused FROM items WHERE item_id = $1")
            .bind(&item)
            .fetch_one(&direct)
            .await
            .expect("the item's row")
    };

    let lock = lock_table(&direct, "items").await;
    gw.put_item(&item, 9, 1).await.assert_refused(503, "unavailable");
    send(gw.admin(gw.post(&format!("/admin/v1/items/{item}/pause"))))
        .await
        .assert_refused(503, "unavailable");
    lock.rollback().await.expect("ROLLBACK: the lock goes");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while row().await.0 != 9 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the definition is written once the lock goes"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shown = gw.get_item(&item).await;
    assert_eq!(shown.assert_ok()["stock_total"], 9, "the gateway kept the definition");
    assert_eq!(shown.assert_ok()["state"], "active", "the refused pause was undone");
    assert!(!row().await.1, "the refused pause was not written");

    gw.stop().await;
    let gw = embedded_on(&db).await;
    let shown = gw.get_item(&item).await;
    assert_eq!(shown.assert_ok()["stock_total"], 9, "after a restart, the same");
    assert_eq!(shown.assert_ok()["stock_remaining"], 9);
}

/// A transaction holding `LOCK TABLE table` (every statement on the table waits on it
/// until it is rolled back).
async fn lock_table(pool: &sqlx::PgPool, table: &str) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut lock = pool.begin().await.expect("BEGIN");
    sqlx::query(&format!("LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE"))
        .execute(&mut *lock)
        .await
        .expect("LOCK TABLE");
    lock
}

/// An embedded gateway whose store is the database `db`, with this file's store timeout.
async fn embedded_on(db: &str) -> Gateway {
    Gateway::embedded()
        .database(db)
        .flag("--store-timeout", &format!("{}ms", STORE_TIMEOUT.as_millis()))
        .start()
        .await
}
