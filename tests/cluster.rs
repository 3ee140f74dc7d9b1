//! The gateway on a real Redis Cluster (issue 12): throwaway clusters of `redis-server
//! --cluster-enabled yes` nodes on free loopback ports ([`RedisCluster`]), gateways in
//! cluster mode (`--redis-mode cluster`, `REDIS_URL` = every node), a shared PostgreSQL.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use common::gateway::Gateway;
use common::inspect::Redis;
use common::{RedisCluster, poll, shared_pg, unique};
use seckill_gateway::engine::keys;
use seckill_gateway::store::Store;

/// A gateway in cluster mode on `cluster`, persisting to `db`.
async fn gateway(cluster: &RedisCluster, db: &str) -> Gateway {
    Gateway::builder(&cluster.seeds())
        .flag("--redis-mode", "cluster")
        .database(db)
        .start()
        .await
}

/// Create `items` through `a` (stock, limit 1) and wait until `b` knows them too (its Bloom
/// filter hears of a new item through pub/sub, a few milliseconds later).
async fn create_everywhere(a: &Gateway, b: &Gateway, items: &[String], stock: i64) {
    for item in items {
        a.create_item(item, stock, 1).await;
        poll(Duration::from_secs(10), async || {
            (b.get_item(item).await.status == 200).then_some(())
        })
        .await
        .expect("the other gateway hears of the item");
    }
}

/// `n` item ids whose shards lie on every master of `cluster`, spread round-robin over
/// the masters.
async fn items_on_every_master(cluster: &RedisCluster, n: usize) -> Vec<String> {
    let masters = cluster.masters().await;
    let mut by_master: HashMap<u16, Vec<String>> = HashMap::new();
    let mut i = 0;
    while masters
        .iter()
        .any(|m| by_master.get(m).map_or(0, Vec::len) < n.div_ceil(masters.len()))
    {
        let id = unique(&format!("spread{i}"));
        i += 1;
        let master = cluster.master_of(&keys::item(&id)).await;
        let list = by_master.entry(master).or_default();
        if list.len() < n.div_ceil(masters.len()) {
            list.push(id);
        }
    }
    let mut lists: Vec<Vec<String>> = by_master.into_values().collect();
    let mut out = Vec::new();
    while out.len() < n {
        for l in &mut lists {
            if let Some(id) = l.pop()
                && out.len() < n
            {
                out.push(id);
            }
        }
    }
    out
}

/// Acceptance 2: two gateways on a 3-master cluster, six items (two on each master) of
/// 100 units with a limit of 1, 3,000 reservations from 1,000 users, alternating between
/// the gateways, 128 in flight: each item sells exactly its stock, no user holds two of an
/// item, and once the pipeline is quiet every 200 is a row and every row a 200.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_on_a_cluster_sell_exactly_the_stock() {
    let cluster = RedisCluster::start(3, 0).await;
    let db = shared_pg();
    let a = gateway(&cluster, &db).await;
    let b = gateway(&cluster, &db).await;
    let items = items_on_every_master(&cluster, 6).await;
    create_everywhere(&a, &b, &items, 100).await;

    let apis = Arc::new([a.api.clone(), b.api.clone()]);
    let items = Arc::new(items);
    let sem = Arc::new(tokio::sync::Semaphore::new(128));
    let mut tasks = Vec::new();
    for i in 0..3_000usize {
        let (apis, items, sem) = (apis.clone(), items.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("semaphore");
            let item = &items[i % items.len()];
            let user = format!("u{}", (i * 7919) % 1_000);
            let reply = apis[i % 2].reserve(item, &user).await;
            (item.clone(), user, reply)
        }));
    }
    let mut made: HashMap<String, HashSet<String>> = HashMap::new();
    let mut orders: HashSet<String> = HashSet::new();
    for t in tasks {
        let (item, user, reply) = t.await.expect("task");
        match reply.status.as_u16() {
            200 => {
                assert!(
                    made.entry(item.clone()).or_default().insert(user.clone()),
                    "{user} got two units of {item}"
                );
                orders.insert(reply.order_id());
            }
            409 | 410 => {}
            other => panic!("unexpected {other}: {}", reply.text),
        }
    }
    for item in items.iter() {
        assert_eq!(
            made.get(item).map_or(0, HashSet::len),
            100,
            "{item} sold its stock exactly"
        );
        let stats = a.get_item(item).await;
        assert_eq!(stats.assert_ok()["stock_remaining"], 0, "{item}");
    }

    let store = Store::connect(&db, Duration::from_secs(5)).await.expect("store");
    poll(Duration::from_secs(30), async || {
        let rows = store.orders(None).await.expect("orders");
        (rows.len() == orders.len()).then_some(())
    })
    .await
    .expect("every 200 reaches the database");
    let rows = store.orders(None).await.expect("orders");
    let ids: HashSet<String> = rows.iter().map(|o| o.order_id.clone()).collect();
    assert_eq!(ids, orders, "the rows are the 200s, no more, no fewer");
    let mut per_user: HashMap<(String, String), i64> = HashMap::new();
    for o in &rows {
        *per_user.entry((o.item_id.clone(), o.user_id.clone())).or_default() += o.qty;
    }
    assert!(
        per_user.values().all(|&q| q == 1),
        "no user over the limit in the database"
    );

    // The persistence pipeline read every shard's stream from its own master, and
    // reconcile (its SCAN sent to the primary of each shard) finds Redis and the database
    // in agreement.
    let mut rd = Redis::connect_cluster(&cluster.seeds());
    for item in items.iter() {
        assert_eq!(rd.item_field(item, "reserved").await, 100, "{item}");
        let report = poll(Duration::from_secs(20), async || {
            let r = seckill_gateway::orders::reconcile::reconcile(&mut rd.conn, &store, Some(item), None)
                .await
                .expect("reconcile runs on a cluster");
            (r.differences.is_empty() && r.pending_events == 0).then_some(r)
        })
        .await
        .unwrap_or_else(|| panic!("reconcile of {item} is clean"));
        assert_eq!(
            report.orders_checked, 100,
            "{item}: every order hash found on its primary"
        );
    }
}

/// Acceptance 3: with `SECKILL_REDIS_WAIT_REPLICAS=1`, SIGKILL the primary of two of six
/// items in the middle of a burst. Its replica is promoted; every 200 is a row, no item is
/// oversold, no user goes over the limit; the items on the other primaries keep selling
/// through the failover; once the old primary is back (as a replica: `WAIT 1` needs one)
/// the failed-over items sell again, no gateway restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_burst_loses_no_acknowledged_order() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let mut cluster = RedisCluster::start(3, 1).await;
    let db = shared_pg();
    let start = |cluster: &RedisCluster| {
        Gateway::builder(&cluster.seeds())
            .flag("--redis-mode", "cluster")
            .flag("--redis-wait-replicas", "1")
            .database(&db)
            .start()
    };
    let a = start(&cluster).await;
    let b = start(&cluster).await;
    let items = items_on_every_master(&cluster, 6).await;
    create_everywhere(&a, &b, &items, 300).await;
    let victim = cluster.master_of(&keys::item(&items[0])).await;
    // An item of the victim's that the burst leaves alone, to show it sells again: the
    // burst's own may sell out before the kill on a fast machine (500 asks for 300 units).
    let spare = loop {
        let id = unique("spare");
        if cluster.master_of(&keys::item(&id)).await == victim {
            break id;
        }
    };
    create_everywhere(&a, &b, std::slice::from_ref(&spare), 10).await;
    let on_victim: HashSet<String> = {
        let mut s = HashSet::new();
        for item in &items {
            if cluster.master_of(&keys::item(item)).await == victim {
                s.insert(item.clone());
            }
        }
        s
    };

    let apis = Arc::new([a.api.clone(), b.api.clone()]);
    let items = Arc::new(items);
    let burst = |from: usize, to: usize| {
        let (apis, items) = (apis.clone(), items.clone());
        tokio::spawn(async move {
            let sem = Arc::new(tokio::sync::Semaphore::new(32));
            let mut tasks = Vec::new();
            for i in from..to {
                let (apis, items, sem) = (apis.clone(), items.clone(), sem.clone());
                tasks.push(tokio::spawn(async move {
                    let _permit = sem.acquire().await.expect("semaphore");
                    let item = items[i % items.len()].clone();
                    let user = format!("u{i}");
                    let reply = apis[i % 2].reserve(&item, &user).await;
                    let status = reply.status.as_u16();
                    assert!(
                        matches!(status, 200 | 409 | 410 | 503),
                        "unexpected {status}: {}",
                        reply.text
                    );
                    (item, user, status, (status == 200).then(|| reply.order_id()))
                }));
            }
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("task"));
            }
            out
        })
    };
    let first = burst(0, 3_000);
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.kill(victim);
    let killed_at = std::time::Instant::now();
    let promoted = cluster.wait_failover(victim).await;
    eprintln!("failover: {victim} -> {promoted} in {:?}", killed_at.elapsed());
    let mut answers = first.await.expect("burst");
    // The promoted primary has no replica, so WAIT 1 cannot succeed there (503) until the
    // old primary is back, as a replica (what a process supervisor does). Then the
    // failed-over items sell again, with no gateway restarted.
    cluster.restart(victim);
    cluster.wait_ok().await;
    cluster.wait_in_sync(victim).await;
    let mut last = String::new();
    let after = poll(Duration::from_secs(20), async || {
        let r = a.reserve(&spare, &unique("late")).await;
        last = format!("{} {}", r.status, r.text);
        (r.status == 200).then(|| r.order_id())
    })
    .await
    .unwrap_or_else(|| panic!("the failed-over item sells again (last answer: {last})"));
    answers.push((spare.clone(), "late".into(), 200, Some(after)));

    let mut acknowledged = HashSet::new();
    let mut per_item: HashMap<String, i64> = HashMap::new();
    let mut healthy_503 = 0;
    for (item, _user, status, order) in &answers {
        match status {
            200 => {
                acknowledged.insert(order.clone().expect("an order id"));
                *per_item.entry(item.clone()).or_default() += 1;
            }
            503 if !on_victim.contains(item) => healthy_503 += 1,
            409 | 410 | 503 => {}
            other => panic!("unexpected {other}"),
        }
    }
    eprintln!(
        "acknowledged {} ({per_item:?}); 503s of items on healthy primaries: {healthy_503}",
        acknowledged.len()
    );
    for item in items.iter().filter(|i| !on_victim.contains(*i)) {
        assert!(
            per_item.get(item).copied().unwrap_or(0) > 0,
            "{item} sold during the burst"
        );
    }

    let store = Store::connect(&db, Duration::from_secs(5)).await.expect("store");
    poll(Duration::from_secs(60), async || {
        let rows = store.orders(None).await.expect("orders");
        let ids: HashSet<String> = rows.iter().map(|o| o.order_id.clone()).collect();
        acknowledged.is_subset(&ids).then_some(())
    })
    .await
    .expect("every 200 is a row");
    let rows = store.orders(None).await.expect("orders");
    let mut units: HashMap<String, i64> = HashMap::new();
    let mut per_user: HashMap<(String, String), i64> = HashMap::new();
    for o in &rows {
        *units.entry(o.item_id.clone()).or_default() += o.qty;
        *per_user.entry((o.item_id.clone(), o.user_id.clone())).or_default() += o.qty;
    }
    for (item, n) in &units {
        assert!(*n <= 300, "{item} oversold: {n} rows");
    }
    assert!(per_user.values().all(|&q| q == 1), "no user over the limit");
    let ids: Vec<&String> = rows.iter().map(|o| &o.order_id).collect();
    assert_eq!(ids.len(), ids.iter().collect::<HashSet<_>>().len(), "no duplicate rows");
}

/// `SECKILL_REDIS_WAIT_REPLICAS=1` on a Redis with no replica: the reservation is made on
/// the primary, but no replica confirms it, so the answer is 503 `unavailable` with
/// `Retry-After` (a failover now could lose it), and so is the retry with the same
/// idempotency key (the order found again is still unconfirmed); the order reaches the
/// database all the same. A refusal changed nothing and is answered as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_replicas_it_waits_for_a_reservation_answers_503_and_stays_findable() {
    let redis = common::RedisServer::start();
    let gw = Gateway::builder(&redis.url())
        .flag("--redis-wait-replicas", "1")
        .flag("--redis-timeout", "400ms")
        .start()
        .await;
    let item = unique("wait");
    gw.create_item(&item, 10, 1).await;
    let req = || gw.reserve_req(&item, "alice").header("Idempotency-Key", "k1");
    let first = common::http::send(req()).await;
    first.assert_refused(503, "unavailable");
    assert!(first.retry_after() >= 1);
    let mut rd = Redis::connect(&redis).await;
    assert_eq!(rd.item_field(&item, "reserved").await, 1, "made on the primary");
    common::http::send(req()).await.assert_refused(503, "unavailable");
    assert_eq!(rd.item_field(&item, "reserved").await, 1, "one unit, not two");
    // alice holds 1 of 1: the script refuses without a write, nothing to wait for.
    gw.reserve(&item, "alice").await.assert_refused(409, "limit_reached");

    let store = gw.running().app.store.clone();
    let rows = poll(Duration::from_secs(10), async || {
        let rows = store.orders(Some(&item)).await.expect("orders");
        (!rows.is_empty()).then_some(rows)
    })
    .await
    .expect("the order reaches the database");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].user_id, "alice");
}

/// The change feed survives the death of the node it listens on: a gateway subscribes to
/// the first node of `REDIS_URL`; that node is killed (its replica takes over); the gateway
/// subscribes to the next node, and an item created through the other gateway afterwards
/// reaches it (its Bloom filter would otherwise answer 404 without asking Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_moves_to_a_live_node_when_its_node_dies() {
    let mut cluster = RedisCluster::start(3, 1).await;
    let db = shared_pg();
    let a = gateway(&cluster, &db).await;
    let b = gateway(&cluster, &db).await;
    let before = unique("before");
    create_everywhere(&a, &b, std::slice::from_ref(&before), 10).await;

    let listened = cluster.ports()[0];
    let was_master = cluster.masters().await.contains(&listened);
    cluster.kill(listened);
    if was_master {
        cluster.wait_failover(listened).await;
    }
    let after = unique("after");
    poll(Duration::from_secs(20), async || {
        (a.put_item(&after, 10, 1).await.status.is_success()).then_some(())
    })
    .await
    .expect("the item is created once the cluster serves its slot");
    poll(Duration::from_secs(20), async || {
        (b.get_item(&after).await.status == 200).then_some(())
    })
    .await
    .expect("the other gateway hears of the item through a live node");
    assert_eq!(b.get_item(&before).await.status, 200);
}
