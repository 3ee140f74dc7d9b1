//! Redis state loss (issue 12, acceptance 4): a Redis that comes back without writes the
//! database already holds must not sell their stock again. The probe of the issue, with a
//! real `redis-server` restarted from an older snapshot (what `appendfsync everysec` allows
//! on a host crash, or a restore from backup), a real PostgreSQL and the gateway's own
//! workers: no manual step.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::gateway::Gateway;
use common::inspect::Redis;
use common::{RedisServer, poll, shared_pg, unique};
use seckill_gateway::domain::OrderStatus;
use seckill_gateway::store::Store;

const STOCK: i64 = 300;
const LIMIT: i64 = 2;

/// Reserve one unit for each of `users`, 16 at a time; the 200s' order ids by user, and
/// how many answers were 503.
async fn reserve_all(gw: &Gateway, item: &str, users: impl Iterator<Item = String>) -> (Vec<(String, String)>, usize) {
    let users: Vec<String> = users.collect();
    let mut made = Vec::new();
    let mut unavailable = 0;
    for chunk in users.chunks(16) {
        let replies = futures_util::future::join_all(chunk.iter().map(|u| gw.reserve(item, u))).await;
        for (user, r) in chunk.iter().zip(replies) {
            match r.status.as_u16() {
                200 => made.push((user.clone(), r.order_id())),
                409 | 410 => {}
                503 => unavailable += 1,
                other => panic!("reserve for {user}: unexpected {other}: {}", r.text),
            }
        }
    }
    (made, unavailable)
}

/// Wait until the database holds `n` orders of `item`, `paid` of them paid and `cancelled`
/// cancelled.
async fn persisted(store: &Store, item: &str, n: usize, paid: usize, cancelled: usize) {
    poll(Duration::from_secs(30), async || {
        let rows = store.orders(Some(item)).await.ok()?;
        let count = |s: OrderStatus| rows.iter().filter(|o| o.status == s).count();
        (rows.len() == n && count(OrderStatus::Paid) == paid && count(OrderStatus::Cancelled) == cancelled)
            .then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("{n} orders of {item} ({paid} paid, {cancelled} cancelled) reach the database"));
}

/// A redis-server, a fresh PostgreSQL database, a gateway on both, and an item (id starting
/// with `prefix`) on sale with `stock` units, `limit` per shopper.
async fn sale(prefix: &str, stock: i64, limit: i64) -> (RedisServer, Store, Gateway, String) {
    let redis = RedisServer::start();
    let db = shared_pg();
    let store = Store::connect(&db, Duration::from_secs(5)).await.expect("store");
    let gw = Gateway::builder(&redis.url()).database(&db).start().await;
    let item = unique(prefix);
    gw.create_item(&item, stock, limit).await;
    (redis, store, gw, item)
}

/// Reconcile of `item` finds nothing to report once the pipeline is quiet (within 20 s).
async fn reconcile_is_clean(rd: &mut Redis, store: &Store, item: &str) {
    let report = poll(Duration::from_secs(20), async || {
        let r = seckill_gateway::orders::reconcile::reconcile(&mut rd.conn, store, Some(item), None)
            .await
            .expect("reconcile");
        (r.differences.is_empty() && r.pending_events == 0).then_some(r)
    })
    .await;
    assert!(report.is_some(), "reconcile of {item} is clean after the rebuild");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redis_restarted_from_an_older_snapshot_is_rebuilt_before_it_sells_again() {
    let (mut redis, store, gw, item) = sale("loss", STOCK, LIMIT).await;
    let user = |i: usize| format!("u{i}");

    // Before the snapshot: 100 orders, 20 of them paid.
    let (first, _) = reserve_all(&gw, &item, (0..100).map(user)).await;
    assert_eq!(first.len(), 100);
    for (u, order) in &first[..20] {
        gw.pay(order, u).await.assert_ok();
    }
    persisted(&store, &item, 100, 20, 0).await;
    let snapshot = redis.snapshot();

    // After it, all acknowledged and persisted, then lost: 150 more orders (u50..u99 take
    // their second unit, reaching the limit), 30 of them paid, and 10 of the first ones
    // cancelled (their units came back: the old Redis still has them taken).
    let (second, _) = reserve_all(&gw, &item, (50..200).map(user)).await;
    assert_eq!(second.len(), 150);
    for (u, order) in &second[100..130] {
        gw.pay(order, u).await.assert_ok();
    }
    for (u, order) in &first[20..30] {
        gw.cancel(order, u).await.assert_ok();
    }
    persisted(&store, &item, 250, 50, 10).await;
    let live_before: i64 = 240;

    redis.restart_from(&snapshot);
    let mut rd = Redis::connect(&redis).await;
    assert_eq!(
        rd.item_field(&item, "reserved").await,
        80,
        "the restarted Redis forgot every write after the snapshot"
    );

    // Shoppers keep coming: users u0..u399 try again and again (the ones at the limit, the
    // ones whose units came back, new ones) until the sale is over. Units left: 300 − 240 =
    // 60. Until the rebuild the shard answers 503; after it, the forgotten writes must not be
    // sold again: exactly 60 more orders, none for a user already at the limit.
    let mut made_after = Vec::new();
    let mut unavailable = 0;
    for _round in 0..30 {
        let (made, refused) = reserve_all(&gw, &item, (0..400).map(user)).await;
        made_after.extend(made);
        unavailable += refused;
        if refused == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(unavailable > 0, "the shard behind the database refused first");
    assert_eq!(
        made_after.len() as i64,
        STOCK - live_before,
        "exactly the units that were left are sold ({unavailable} answers were 503 meanwhile)"
    );
    assert_eq!(gw.get_item(&item).await.assert_ok()["stock_remaining"], 0);

    // The forgotten orders are there again: the open ones payable, the paid ones paid, the
    // cancelled ones cancelled.
    for (u, order) in &second[130..140] {
        gw.pay(order, u).await.assert_ok();
    }
    let (u, order) = &second[100];
    assert_eq!(
        gw.pay(order, u).await.assert_ok()["status"],
        "paid",
        "paid before the loss: paid again"
    );
    let got = gw.get_order(&first[25].1, &first[25].0).await;
    assert_eq!(got.assert_ok()["status"], "cancelled");

    // The database: every 200 a row, never more live units than the stock, nobody over the limit.
    let total = 250 + made_after.len();
    persisted(&store, &item, total, 60, 10).await;
    let rows = store.orders(Some(&item)).await.expect("orders");
    let ids: HashSet<&str> = rows.iter().map(|o| o.order_id.as_str()).collect();
    for (_, order) in first.iter().chain(second.iter()).chain(made_after.iter()) {
        assert!(ids.contains(order.as_str()), "order {order} answered 200 is a row");
    }
    let live: Vec<_> = rows.iter().filter(|o| o.status.is_live()).collect();
    assert_eq!(live.iter().map(|o| o.qty).sum::<i64>(), STOCK, "sold exactly the stock");
    let mut per_user: HashMap<&str, i64> = HashMap::new();
    for o in &live {
        *per_user.entry(o.user_id.as_str()).or_default() += o.qty;
    }
    assert!(
        per_user.values().all(|&n| n <= LIMIT),
        "nobody over the limit: {:?}",
        per_user.iter().filter(|(_, n)| **n > LIMIT).collect::<Vec<_>>()
    );

    // Redis agrees with the database, and reconcile finds nothing to report.
    assert_eq!(rd.item_field(&item, "stock").await, 0);
    assert_eq!(rd.buyers(&item).await.values().sum::<i64>(), STOCK);
    reconcile_is_clean(&mut rd, &store, &item).await;
    let metrics = gw.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("seckill_redis_repairs_total") && !l.ends_with(" 0")),
        "the rebuild is counted"
    );
}

/// `reconcile --repair` does the same by hand: a Redis that lost writes while no gateway
/// ran is reported `shard_behind`, rebuilt, and then clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_reports_a_shard_behind_and_repair_rebuilds_it() {
    let (mut redis, store, mut gw, item) = sale("byhand", 10, 1).await;
    let snapshot = redis.snapshot();
    let (made, _) = reserve_all(&gw, &item, (0..4).map(|i| format!("v{i}"))).await;
    assert_eq!(made.len(), 4);
    persisted(&store, &item, 4, 0, 0).await;
    gw.stop().await;
    redis.restart_from(&snapshot);

    let mut rd = Redis::connect(&redis).await;
    let report = seckill_gateway::orders::reconcile::reconcile(&mut rd.conn, &store, Some(&item), None)
        .await
        .expect("reconcile");
    assert!(
        report.differences.iter().any(|d| d.kind == "shard_behind"),
        "{:?}",
        report.differences
    );
    let settings = seckill_gateway::orders::repair::RepairSettings {
        closed_order_ttl: Duration::from_secs(3600),
        idempotency_ttl: Duration::from_secs(600),
    };
    let report = seckill_gateway::orders::reconcile::reconcile(&mut rd.conn, &store, Some(&item), Some(&settings))
        .await
        .expect("reconcile --repair");
    assert_eq!(report.repaired, 1, "{:?}", report.differences);
    assert_eq!(rd.item_field(&item, "stock").await, 6);
    assert_eq!(rd.item_field(&item, "reserved").await, 4);
    for (_, order) in &made {
        assert!(rd.order_exists(order).await, "order {order} is back");
    }
    let report = seckill_gateway::orders::reconcile::reconcile(&mut rd.conn, &store, Some(&item), None)
        .await
        .expect("reconcile");
    assert!(report.differences.is_empty(), "{:?}", report.differences);
}

/// A payment is often the first call after the loss: an open order the database holds and
/// Redis forgot is answered 503 (not 404: it exists), which starts the rebuild; the retry
/// pays it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_an_order_redis_forgot_answers_503_then_pays_it() {
    let (mut redis, store, gw, item) = sale("payloss", 10, 1).await;
    let snapshot = redis.snapshot();
    let (made, _) = reserve_all(&gw, &item, (0..2).map(|i| format!("w{i}"))).await;
    assert_eq!(made.len(), 2);
    persisted(&store, &item, 2, 0, 0).await;
    redis.restart_from(&snapshot);

    let (u, order) = &made[0];
    // Never 404: 503 while Redis reconnects and the shard is rebuilt, then 200.
    let mut told_rebuilding = false;
    let paid = poll(Duration::from_secs(10), async || {
        let r = gw.pay(order, u).await;
        match r.status.as_u16() {
            200 => Some(r),
            503 => {
                told_rebuilding |= r.text.contains("rebuilt");
                None
            }
            other => panic!("pay of a forgotten order: {other} {}", r.text),
        }
    })
    .await
    .expect("the order is payable once its shard is rebuilt");
    assert!(told_rebuilding, "the shopper was told the stock is being rebuilt");
    assert_eq!(paid.json["status"], "paid");
    let item_now = gw.get_item(&item).await;
    assert_eq!(
        item_now.assert_ok()["stock_remaining"],
        8,
        "both orders hold their unit again"
    );
}

/// The other way to lose writes: on a Redis Cluster without `WAIT`, a replica that missed
/// the last writes (here: it was down while they were made) is promoted when its primary
/// dies. The gateway finds the shard behind the database and rebuilds it on the new
/// primary before it sells there again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_promoted_before_it_caught_up_is_rebuilt_before_it_sells_again() {
    let mut cluster = common::RedisCluster::builder(3, 1)
        .appendonly(common::cluster::AppendFsync::Always)
        .start()
        .await;
    let db = shared_pg();
    let store = Store::connect(&db, Duration::from_secs(5)).await.expect("store");
    let gw = Gateway::builder(&cluster.seeds())
        .flag("--redis-mode", "cluster")
        .database(&db)
        .start()
        .await;
    let item = unique("promoted");
    gw.create_item(&item, 100, 1).await;
    let key = seckill_gateway::engine::keys::item(&item);
    let primary = cluster.master_of(&key).await;
    let replica = cluster.replicas_of(primary).await[0];

    // 20 orders, on the replica too; then the replica goes down and 30 more are made on
    // the primary alone (acknowledged, persisted).
    let (first, _) = reserve_all(&gw, &item, (0..20).map(|i| format!("p{i}"))).await;
    assert_eq!(first.len(), 20);
    persisted(&store, &item, 20, 0, 0).await;
    replica_caught_up(&cluster, primary).await;
    cluster.kill(replica);
    let (second, _) = reserve_all(&gw, &item, (20..50).map(|i| format!("p{i}"))).await;
    assert_eq!(second.len(), 30);
    persisted(&store, &item, 50, 0, 0).await;

    // The primary dies; the replica comes back with its own (older) data and is promoted.
    cluster.kill(primary);
    cluster.restart(replica);
    poll(Duration::from_secs(30), async || {
        (cluster.master_of(&key).await == replica).then_some(())
    })
    .await
    .expect("the stale replica is promoted");
    let mut rd = Redis::connect_cluster(&cluster.seeds());
    assert_eq!(
        rd.item_field(&item, "reserved").await,
        20,
        "the new primary missed 30 orders"
    );

    // Everyone tries (again): exactly the 50 units left are sold, nobody twice.
    let mut made_after = Vec::new();
    for _round in 0..40 {
        let (made, refused) = reserve_all(&gw, &item, (0..200).map(|i| format!("p{i}"))).await;
        made_after.extend(made);
        if refused == 0 && gw.get_item(&item).await.json["stock_remaining"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(made_after.len(), 50, "exactly the units left are sold");
    let users: HashSet<&str> = first
        .iter()
        .chain(second.iter())
        .chain(made_after.iter())
        .map(|(u, _)| u.as_str())
        .collect();
    assert_eq!(users.len(), 100, "nobody got two units of a limit-1 item");
    // A forgotten order is payable on the new primary.
    let (u, order) = &second[0];
    assert_eq!(gw.pay(order, u).await.assert_ok()["status"], "paid");

    persisted(&store, &item, 100, 1, 0).await;
    reconcile_is_clean(&mut rd, &store, &item).await;
}

/// Wait until every replica of `master` has acknowledged all it wrote (`INFO replication`:
/// each replica's offset equals the master's).
async fn replica_caught_up(cluster: &common::RedisCluster, master: u16) {
    let client = cluster.client(master);
    poll(Duration::from_secs(10), async || {
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query_async(&mut conn)
            .await
            .ok()?;
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_owned())
        };
        let offset: u64 = field("master_repl_offset:")?.parse().ok()?;
        let replica = field("slave0:")?;
        let replica_offset: u64 = replica
            .split(',')
            .find_map(|p| p.strip_prefix("offset="))?
            .parse()
            .ok()?;
        (replica_offset >= offset).then_some(())
    })
    .await
    .expect("the replica caught up");
}

/// Issue 13: a bucketed item sold through transfers (every shopper's home is bucket 1, a
/// quarter of the stock), then Redis restarted from a snapshot older than some of the sales
/// and transfers. Each bucket's shard is rebuilt from the database when first touched: its
/// share from its initial share and the transfers the database holds, its orders and
/// buyers; afterwards exactly the units that were left are sold, nothing is in transit,
/// the shares add up to the stock, and reconcile is clean bucket by bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bucketed_item_is_rebuilt_bucket_by_bucket_with_its_transfers() {
    use common::buckets::{bucketed, per_bucket, users_at_home};
    const STOCK: i64 = 120;
    let mut redis = RedisServer::start();
    let db = shared_pg();
    let store = Store::connect(&db, Duration::from_secs(5)).await.expect("store");
    let gw = Gateway::builder(&redis.url())
        .database(&db)
        .flag("--rate-per-user", "0")
        .start()
        .await;
    let item = unique("bucketloss");
    gw.put_item_body(&item, &bucketed(&gw, STOCK, serde_json::json!(4)))
        .await
        .assert_ok();
    let users = users_at_home(1, 4, 2_000);

    let (first, _) = reserve_all(&gw, &item, users[..40].iter().cloned()).await;
    assert_eq!(first.len(), 40, "30 from bucket 1, 10 moved there");
    persisted(&store, &item, 40, 0, 0).await;
    let moved = async |n: i64| {
        poll(Duration::from_secs(30), async || {
            let t = store.transfers(&item).await.ok()?;
            let units: i64 = t.iter().filter(|t| t.in_ms.is_some()).map(|t| t.units).sum();
            (units == n).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("{n} units' transfers in the database"));
    };
    moved(10).await;
    let snapshot = redis.snapshot();

    let (second, _) = reserve_all(&gw, &item, users[40..90].iter().cloned()).await;
    assert_eq!(second.len(), 50);
    persisted(&store, &item, 90, 0, 0).await;
    moved(60).await;

    redis.restart_from(&snapshot);
    let mut rd = Redis::connect(&redis).await;
    assert_eq!(
        rd.item_field(&seckill_gateway::ids::bucket_id(&item, 1), "reserved")
            .await,
        40,
        "the restarted Redis forgot the later sales"
    );

    // New shoppers until the sale is over: exactly the 30 units left are sold.
    let mut made_after = Vec::new();
    let mut unavailable = 0;
    let mut next = 90;
    for _round in 0..40 {
        let (made, refused) = reserve_all(&gw, &item, users[next..next + 40].iter().cloned()).await;
        next += 40;
        made_after.extend(made);
        unavailable += refused;
        if refused == 0 && made_after.len() as i64 >= STOCK - 90 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(unavailable > 0, "the shards behind the database refused first");
    assert_eq!(
        made_after.len() as i64,
        STOCK - 90,
        "exactly the units left ({unavailable} 503s)"
    );
    let (none, _) = reserve_all(&gw, &item, users[next..next + 40].iter().cloned()).await;
    assert!(none.is_empty(), "sold out");

    let buckets = per_bucket(&gw, &item).await;
    assert!(buckets.iter().all(|b| b.1 == 0 && b.2 == 0), "{buckets:?}");
    assert_eq!(buckets[0].0, STOCK, "every unit ended in bucket 1: {buckets:?}");
    persisted(&store, &item, STOCK as usize, 0, 0).await;
    let rows = store.orders(Some(&item)).await.expect("orders");
    let ids: HashSet<&str> = rows.iter().map(|o| o.order_id.as_str()).collect();
    for (_, order) in first.iter().chain(second.iter()).chain(made_after.iter()) {
        assert!(ids.contains(order.as_str()), "order {order} answered 200 is a row");
    }
    reconcile_is_clean(&mut rd, &store, &item).await;
}

/// The race the bucket rebuild above can meet: a transfer's credit reached the database
/// while its donor's step (the `out` event, on another shard's stream) had not when Redis
/// restarted from a snapshot older than both. The donor's Redis forgot giving the units and
/// the database never heard of it; the destination is rebuilt with the credit. The credit's
/// event carries the donor step's mark, so the database knows the donor shard got further
/// than its Redis did: the donor is rebuilt too, having given the units, and no unit sells
/// twice. The persistence worker runs apart, so the test decides what reaches the database:
/// it drops the donors' `out` entries before the worker reads them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_persisted_without_its_donors_step_sells_nothing_twice() {
    use common::buckets::{bucketed, per_bucket, users_at_home};
    use seckill_gateway::engine::keys;
    use seckill_gateway::ids::{bucket_id, shard_of};
    const STOCK: i64 = 40;
    let mut redis = RedisServer::start();
    let db = shared_pg();
    let store = Store::connect(&db, Duration::from_secs(5)).await.expect("store");
    let builder = || {
        Gateway::builder(&redis.url())
            .database(&db)
            .flag("--rate-per-user", "0")
    };
    let gw = builder().flag("--workers", "false").start().await;
    let item = unique("creditonly");
    gw.put_item_body(&item, &bucketed(&gw, STOCK, serde_json::json!(4)))
        .await
        .assert_ok();
    let users = users_at_home(1, 4, 200);

    // Bucket 1's own ten units, persisted; the snapshot.
    let mut worker = builder().worker_only().start().await;
    let (first, _) = reserve_all(&gw, &item, users[..10].iter().cloned()).await;
    assert_eq!(first.len(), 10);
    persisted(&store, &item, 10, 0, 0).await;
    let snapshot = redis.snapshot();
    worker.stop().await;

    // Ten more: every one moved to bucket 1 from the other buckets.
    let (second, _) = reserve_all(&gw, &item, users[10..20].iter().cloned()).await;
    assert_eq!(second.len(), 10);
    let mut rd = Redis::connect(&redis).await;
    let mut dropped = 0;
    for b in 2..=4 {
        let stream = keys::events(shard_of(&bucket_id(&item, b)));
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .query_async(&mut rd.conn)
            .await
            .unwrap();
        for (id, fields) in entries {
            if fields.get("x").is_some_and(|x| x.starts_with("out|")) {
                let _: i64 = redis::cmd("XDEL")
                    .arg(&stream)
                    .arg(&id)
                    .query_async(&mut rd.conn)
                    .await
                    .unwrap();
                dropped += 1;
            }
        }
    }
    assert!(dropped > 0, "the donors' steps were in their streams");
    let worker = builder().worker_only().start().await;
    persisted(&store, &item, 20, 0, 0).await;
    let credited = poll(Duration::from_secs(30), async || {
        let t = store.transfers(&item).await.ok()?;
        let units: i64 = t.iter().filter(|t| t.in_ms.is_some()).map(|t| t.units).sum();
        (units == 10).then_some(t)
    })
    .await
    .expect("the credits reach the database");
    assert!(
        credited.iter().all(|t| t.out_ms.is_none()),
        "no donor's step reached it: {credited:?}"
    );

    let donor_marks = store.marks().await.expect("marks");
    assert!(
        (2..=4).any(|b| donor_marks.iter().any(|(s, _)| *s == shard_of(&bucket_id(&item, b)))),
        "a donor shard's mark came with the credits: {donor_marks:?}"
    );
    // The serving gateway learns the database's marks within a second (its repair task):
    // the loss is noticed from then on.
    let floors = gw.running().app.engine.redis().expect("redis mode").floors().clone();
    poll(Duration::from_secs(10), async || {
        donor_marks.iter().all(|(s, m)| floors.get(*s) >= *m).then_some(())
    })
    .await
    .expect("the gateway learns the marks");
    redis.restart_from(&snapshot);
    let mut rd = Redis::connect(&redis).await;
    for b in 2..=4 {
        assert_eq!(
            rd.item_field(&bucket_id(&item, b), "stock").await,
            10,
            "the restarted Redis forgot what bucket {b} gave"
        );
    }

    // New shoppers until the sale is over: exactly the 20 units left are sold.
    let mut made_after = Vec::new();
    let mut next = 20;
    for _round in 0..40 {
        let (made, refused) = reserve_all(&gw, &item, users[next..next + 4].iter().cloned()).await;
        next += 4;
        made_after.extend(made);
        if refused == 0 && made_after.len() as i64 >= STOCK - 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(made_after.len() as i64, STOCK - 20, "exactly the units left");
    let (none, _) = reserve_all(&gw, &item, users[next..next + 16].iter().cloned()).await;
    assert!(none.is_empty(), "sold out: {none:?}");
    let buckets = per_bucket(&gw, &item).await;
    assert!(buckets.iter().all(|b| b.1 == 0 && b.2 == 0), "{buckets:?}");
    assert_eq!(buckets.iter().map(|b| b.0).sum::<i64>(), STOCK, "{buckets:?}");
    persisted(&store, &item, STOCK as usize, 0, 0).await;
    drop(worker);
}

/// Refunds and late payments outlive a Redis state loss: refunded after the snapshot, an
/// order refunded without restock keeps its units out of the sale, one refunded with
/// restock gives them back, a late payment's order stays `refund_due`; the rebuild counts
/// each from the database (its `refund_of`), so exactly the units left are sold again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refunds_and_late_payments_survive_a_rebuild_from_the_database() {
    use seckill_gateway::engine::{Settle, TransitionReply};
    let (mut redis, store, gw, item) = sale("refundloss", 10, 2).await;
    let (made, _) = reserve_all(&gw, &item, ["alice", "bob", "carol"].map(String::from).into_iter()).await;
    let (a, b, c) = (&made[0], &made[1], &made[2]);
    gw.pay(&a.1, &a.0).await.assert_ok();
    gw.pay(&b.1, &b.0).await.assert_ok();
    gw.cancel(&c.1, &c.0).await.assert_ok();
    persisted(&store, &item, 3, 2, 1).await;
    let snapshot = redis.snapshot();

    let refund = |order: &str, restock: bool| {
        gw.admin(gw.post(&format!("/admin/v1/orders/{order}/refund")))
            .json(&serde_json::json!({ "restock": restock }))
    };
    common::http::send(refund(&a.1, false)).await.assert_ok();
    common::http::send(refund(&b.1, true)).await.assert_ok();
    let engine = gw.running().app.engine.clone();
    assert!(matches!(
        engine.settle(Settle::Payment, &c.1).await.unwrap(),
        TransitionReply::Done {
            status: OrderStatus::RefundDue,
            ..
        }
    ));
    let statuses = async || {
        let rows = store.orders(Some(&item)).await.ok()?;
        let status = |id: &str| rows.iter().find(|o| o.order_id == id).map(|o| o.status);
        Some((status(&a.1)?, status(&b.1)?, status(&c.1)?))
    };
    poll(Duration::from_secs(15), async || {
        (statuses().await? == (OrderStatus::Refunded, OrderStatus::Refunded, OrderStatus::RefundDue)).then_some(())
    })
    .await
    .expect("the refunds reach the database");

    redis.restart_from(&snapshot);
    // 10 units, 1 kept out of the sale by alice's refund without restock: 9 to sell.
    let mut made_after = Vec::new();
    for round in 0..40 {
        let users = (0..12).map(|i| format!("r{round}-{i}"));
        let (made, refused) = reserve_all(&gw, &item, users).await;
        made_after.extend(made);
        if refused == 0 && made_after.len() >= 9 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(made_after.len(), 9, "exactly the units left after the refunds");
    let stats = gw.stats(&item).await.assert_ok().clone();
    assert_eq!(
        (
            stats["paid"].clone(),
            stats["refunded"].clone(),
            stats["cancelled"].clone()
        ),
        (serde_json::json!(1), serde_json::json!(2), serde_json::json!(1)),
        "{stats}"
    );
    let mut rd = Redis::connect(&redis).await;
    assert_eq!(rd.held(&item, "alice").await, 1, "alice's quota stays used");
    assert_eq!(rd.held(&item, "bob").await, 0, "bob's came back");
    assert_eq!(
        statuses().await,
        Some((OrderStatus::Refunded, OrderStatus::Refunded, OrderStatus::RefundDue))
    );
}

/// The pause switches outlive a Redis state loss: paused after the snapshot, the item and
/// every sale are paused again once the shard is rebuilt from the database (which records
/// both), so the rebuild never reopens a sale the operator stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pause_switches_survive_a_rebuild_from_the_database() {
    let (mut redis, store, gw, item) = sale("pauseloss", 10, 1).await;
    let snapshot = redis.snapshot();
    let (made, _) = reserve_all(&gw, &item, (0..2).map(|i| format!("p{i}"))).await;
    assert_eq!(made.len(), 2);
    persisted(&store, &item, 2, 0, 0).await;
    let admin = |path: String| gw.admin(gw.post(&path));
    common::http::send(admin(format!("/admin/v1/items/{item}/pause")))
        .await
        .assert_ok();
    common::http::send(admin("/admin/v1/pause".into())).await.assert_ok();
    redis.restart_from(&snapshot);
    let mut rd = Redis::connect(&redis).await;
    assert!(
        !rd.item(&item).await.contains_key("paused"),
        "the snapshot predates the pause"
    );

    // A payment of a forgotten order starts the rebuild; it pays once the shard is back.
    let (u, order) = &made[0];
    poll(Duration::from_secs(10), async || {
        let r = gw.pay(order, u).await;
        (r.status.as_u16() == 200).then_some(())
    })
    .await
    .expect("the order is payable once its shard is rebuilt");
    assert_eq!(rd.item(&item).await.get("paused").map(String::as_str), Some("1"));
    let shard = seckill_gateway::ids::shard_of(&item);
    let all: Option<String> = redis::cmd("HGET")
        .arg(seckill_gateway::engine::keys::seq(shard))
        .arg("paused")
        .query_async(&mut rd.conn)
        .await
        .unwrap();
    assert_eq!(
        all.as_deref(),
        Some("1"),
        "every sale's switch is back on the rebuilt shard"
    );
    // A gateway that starts now, with nothing cached, is refused by Redis itself.
    let fresh = Gateway::builder(&redis.url()).database(&shared_pg()).start().await;
    fresh.reserve(&item, "late").await.assert_refused(503, "paused");
    common::http::send(fresh.admin(fresh.post("/admin/v1/resume")))
        .await
        .assert_ok();
    common::http::send(fresh.admin(fresh.post(&format!("/admin/v1/items/{item}/resume"))))
        .await
        .assert_ok();
    fresh.reserve_ok(&item, "late").await;
}
