//! Stock buckets on a real Redis Cluster (issue 13, acceptance 1–3): one hot item whose
//! stock is split over 6 buckets on the 3 masters, sold by two gateways; then the same
//! with a gateway SIGKILLed and a primary killed while units move between buckets.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::binary::Binary;
use common::buckets::{bucketed, per_bucket, per_bucket_now, stats, users_at_home};
use common::gateway::Gateway;
use common::http::Api;
use common::inspect::Redis;
use common::{RedisCluster, poll, shared_pg, unique};
use seckill_gateway::engine::keys;
use seckill_gateway::ids::bucket_id;
use seckill_gateway::store::Store;
use serde_json::json;

const ADMIN_TOKEN: &str = "test-admin-token";

/// One reserve's answer: status, error code, order id, and when it was sent and answered
/// (since the burst began).
#[derive(Clone, Debug)]
struct Answer {
    user: String,
    status: u16,
    code: String,
    order: Option<String>,
    sent: Duration,
    answered: Duration,
}

/// `n` reserves of `item`, user `users[i % users.len()]`, through `apis` in turn, `in_flight`
/// at a time.
async fn burst(apis: Arc<Vec<Api>>, item: String, users: Arc<Vec<String>>, n: usize, in_flight: usize) -> Vec<Answer> {
    let sem = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let began = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        let (apis, item, users, sem) = (apis.clone(), item.clone(), users.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.expect("semaphore");
            let user = users[i % users.len()].clone();
            let sent = began.elapsed();
            let api = &apis[i % apis.len()];
            let (status, code, order) = match common::http::try_send(api.reserve_req(&item, &user)).await {
                Ok(r) => {
                    let order = (r.status == 200).then(|| r.order_id());
                    (r.status.as_u16(), r.error().to_owned(), order)
                }
                // A gateway killed under the request: no answer.
                Err(_) => (0, "no answer".to_owned(), None),
            };
            Answer {
                user,
                status,
                code,
                order,
                sent,
                answered: began.elapsed(),
            }
        }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("reserve task"));
    }
    out
}

/// Reconcile (per engine item: the item's own hash and each bucket) until clean: for up
/// to a minute, as entries a killed gateway's consumer had read but not acknowledged stay
/// pending until a survivor claims them, once idle for `--claim-idle` (30 s in the
/// tests, tests/common/gateway.rs) and at its next look (every 15 s): up to 45 s after
/// the kill.
async fn reconcile_clean(rd: &Redis, store: &Store, item: &str) {
    let mut last = None;
    let clean = poll(Duration::from_secs(60), async || {
        let report = seckill_gateway::orders::reconcile::reconcile(&mut rd.conn.clone(), store, Some(item), None)
            .await
            .expect("reconcile runs");
        if report.differences.is_empty() && report.pending_events == 0 {
            return Some(());
        }
        last = Some((report.differences, report.pending_events));
        None
    })
    .await;
    assert!(
        clean.is_some(),
        "reconcile never came clean (differences, pending events): {last:?}"
    );
}

/// Every acknowledged order is a row, no user holds two, and the rows add up to what
/// Redis says was sold.
async fn rows_agree(store: &Store, item: &str, acknowledged: &HashSet<String>, sold: i64) {
    let rows = poll(Duration::from_secs(60), async || {
        let rows = store.orders(Some(item)).await.ok()?;
        let ids: HashSet<&String> = rows.iter().map(|o| &o.order_id).collect();
        (acknowledged.iter().all(|a| ids.contains(a)) && rows.len() as i64 == sold).then_some(rows)
    })
    .await
    .expect("every 200 a row, and as many rows as units sold");
    let mut per_user: HashMap<&str, i64> = HashMap::new();
    for o in &rows {
        assert_eq!(o.item_id, item, "a bucket's order is the item's row");
        *per_user.entry(o.user_id.as_str()).or_default() += o.qty;
    }
    assert!(per_user.values().all(|&q| q == 1), "no user holds two");
}

/// Acceptance 1 and 2: one item of 3,000 units in 6 buckets on a 3-master cluster, two
/// gateways, 20,000 reserves from 10,000 users (limit 1), 256 in flight: exactly 3,000
/// orders, no user with two, every 200 a row, every bucket empty at the end; and no
/// `sold_out` while units were left: no request sent after a `sold_out` answer got a unit
/// (nothing is cancelled here, so no unit comes back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gateways_sell_a_bucketed_item_exactly_with_no_false_sold_out() {
    let cluster = RedisCluster::start(3, 0).await;
    let db = shared_pg();
    let start = || {
        Gateway::builder(&cluster.seeds())
            .flag("--redis-mode", "cluster")
            .flag("--rate-per-user", "0")
            .database(&db)
            .start()
    };
    let (a, b) = (start().await, start().await);
    let item = unique("hot");
    a.put_item_body(&item, &bucketed(&a, 3_000, json!(6))).await.assert_ok();
    let masters: HashSet<u16> = {
        let mut m = HashSet::new();
        for bucket in 1..=6 {
            m.insert(cluster.master_of(&keys::item(&bucket_id(&item, bucket))).await);
        }
        m
    };
    assert_eq!(masters.len(), 3, "the 6 buckets lie on all 3 masters");
    poll(Duration::from_secs(10), async || {
        (b.get_item(&item).await.status == 200).then_some(())
    })
    .await
    .expect("the other gateway hears of the item");

    let users: Vec<String> = (0..10_000).map(|u| format!("u{u}")).collect();
    let apis = Arc::new(vec![a.api.clone(), b.api.clone()]);
    let started = Instant::now();
    let answers = burst(apis, item.clone(), Arc::new(users), 20_000, 256).await;
    let took = started.elapsed();

    let mut by_status: HashMap<(u16, String), usize> = HashMap::new();
    for x in &answers {
        *by_status.entry((x.status, x.code.clone())).or_default() += 1;
    }
    eprintln!("20,000 reserves in {took:?}: {by_status:?}");
    let ok: Vec<&Answer> = answers.iter().filter(|x| x.status == 200).collect();
    assert_eq!(ok.len(), 3_000, "exactly the stock sold: {by_status:?}");
    let unexpected: Vec<&Answer> = answers
        .iter()
        .filter(|x| {
            !matches!(
                (x.status, x.code.as_str()),
                (200, _) | (410, "sold_out") | (409, "limit_reached")
            )
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "only 200, sold_out and limit_reached: {:?}",
        &unexpected[..unexpected.len().min(5)]
    );
    let users_with_one: HashSet<&str> = ok.iter().map(|x| x.user.as_str()).collect();
    assert_eq!(users_with_one.len(), 3_000, "no user with two");
    let first_sold_out = answers
        .iter()
        .filter(|x| x.status == 410)
        .map(|x| x.answered)
        .min()
        .expect("demand exceeded supply");
    let late: Vec<&&Answer> = ok.iter().filter(|x| x.sent > first_sold_out).collect();
    assert!(
        late.is_empty(),
        "units sold after a sold_out answer (false sold_out): {late:?}"
    );

    let buckets = per_bucket(&a, &item).await;
    assert!(
        buckets.iter().all(|b| b.1 == 0 && b.2 == 0),
        "every bucket empty: {buckets:?}"
    );
    let s = stats(&b, &item).await;
    assert_eq!(
        (s["reserved"].clone(), s["stock_remaining"].clone()),
        (json!(3_000), json!(0))
    );
    let store = Store::connect(&db, Duration::from_secs(5)).await.expect("store");
    let acknowledged: HashSet<String> = ok.iter().filter_map(|x| x.order.clone()).collect();
    rows_agree(&store, &item, &acknowledged, 3_000).await;
    reconcile_clean(&Redis::connect_cluster(&cluster.seeds()), &store, &item).await;
}

/// Acceptance 3: while every shopper's home bucket is bucket 1 (so nearly every sale moves a
/// unit from another bucket), a gateway is SIGKILLed and a primary holding a donor bucket is
/// killed (`SECKILL_REDIS_WAIT_REPLICAS=1`). After the failover, the victim back as a
/// replica and the other gateway's recovery: every unit is sold, in stock, or nowhere else
/// (sold + remaining + in transit = stock, per bucket and in all), nothing is in transit,
/// every acknowledged order is a row, no user holds two, and reconcile is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_and_a_primary_killed_during_transfers_create_and_lose_no_unit() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let mut cluster = RedisCluster::start(3, 1).await;
    let db = shared_pg();
    let mut killed = Binary::builder()
        .flag("--redis-url", &cluster.seeds())
        .flag("--redis-mode", "cluster")
        .flag("--redis-wait-replicas", "1")
        .flag("--database-url", &db)
        .flag("--admin-token", ADMIN_TOKEN)
        .flag("--rate-per-user", "0")
        .flag("--rate-per-ip", "0")
        .flag("--consumer-name", &unique("killed"))
        .env("RUST_LOG", "warn")
        .spawn();
    killed.ready().await;
    let survivor = Gateway::builder(&cluster.seeds())
        .flag("--redis-mode", "cluster")
        .flag("--redis-wait-replicas", "1")
        .flag("--rate-per-user", "0")
        .database(&db)
        .start()
        .await;
    let item = unique("hot");
    const STOCK: i64 = 1_200;
    survivor
        .put_item_body(&item, &bucketed(&survivor, STOCK, json!(6)))
        .await
        .assert_ok();
    let doomed = Api::new(format!("http://{}", killed.addr()));
    poll(Duration::from_secs(10), async || {
        (doomed.get_item(&item).await.status == 200).then_some(())
    })
    .await
    .expect("the binary gateway hears of the item");
    let victim = cluster.master_of(&keys::item(&bucket_id(&item, 2))).await;

    // Every shopper at home in bucket 1 (200 units): the other 1,000 units all move.
    let users = Arc::new(users_at_home(1, 6, 2_000));
    let apis = Arc::new(vec![doomed.clone(), survivor.api.clone()]);
    let first = tokio::spawn(burst(apis, item.clone(), users.clone(), 2_000, 32));
    tokio::time::sleep(Duration::from_millis(400)).await;
    killed.kill();
    cluster.kill(victim);
    let promoted = cluster.wait_failover(victim).await;
    eprintln!("gateway SIGKILLed; primary {victim} failed over to {promoted}");
    let mut answers = first.await.expect("burst");
    cluster.restart(victim);
    cluster.wait_ok().await;
    cluster.wait_in_sync(victim).await;

    // The survivor sells what is left, to new shoppers, until every bucket is empty and
    // nothing is in transit (its recovery finishes what the dead gateway left).
    let store = Store::connect(&db, Duration::from_secs(5)).await.expect("store");
    let more = users_at_home(1, 6, 40_000)[2_000..].to_vec();
    let only_survivor = Arc::new(vec![survivor.api.clone()]);
    let mut rounds = more.chunks(400).map(|c| Arc::new(c.to_vec()));
    let done = poll(Duration::from_secs(60), async || {
        let buckets = per_bucket_now(&survivor, &item).await?;
        if buckets.iter().all(|b| b.1 == 0 && b.2 == 0) {
            return Some(buckets);
        }
        // Units left somewhere: new shoppers for them (while only in transit: wait).
        if buckets.iter().any(|b| b.1 > 0) {
            let shoppers = rounds.next().expect("shoppers enough");
            answers.extend(burst(only_survivor.clone(), item.clone(), shoppers, 400, 16).await);
        }
        None
    })
    .await;
    let s = stats(&survivor, &item).await;
    let mut by_status: HashMap<(u16, String), usize> = HashMap::new();
    for x in &answers {
        *by_status.entry((x.status, x.code.clone())).or_default() += 1;
    }
    eprintln!("answers: {by_status:?}; stats {s}");
    let last: Vec<&Answer> = answers.iter().rev().take(3).collect();
    assert!(
        done.is_some(),
        "everything sold and nothing in transit: {s}; last answers {last:?}"
    );
    // Quiet now: the shares add up to the stock (per_bucket checks it).
    let buckets = per_bucket(&survivor, &item).await;
    assert!(buckets.iter().all(|b| b.1 == 0 && b.2 == 0), "{buckets:?}");

    let unexpected: Vec<&Answer> = answers
        .iter()
        .filter(|x| !matches!(x.status, 0 | 200 | 409 | 410 | 503))
        .collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
    // sold + remaining = stock, nothing in transit (per_bucket asserted the sums).
    assert_eq!(s["stock_remaining"], json!(0));
    let sold = s["reserved"].as_i64().unwrap() + s["paid"].as_i64().unwrap();
    assert_eq!(sold, STOCK, "every unit sold once: {s}");
    let acknowledged: HashSet<String> = answers.iter().filter_map(|x| x.order.clone()).collect();
    rows_agree(&store, &item, &acknowledged, sold).await;
    reconcile_clean(&Redis::connect_cluster(&cluster.seeds()), &store, &item).await;
    // Both steps of every transfer reach the database (the dead gateway's consumer's pending
    // entries are claimed by the survivor's worker).
    let transfers = poll(Duration::from_secs(60), async || {
        let t = store.transfers(&item).await.ok()?;
        t.iter().all(|t| t.out_ms.is_some() && t.in_ms.is_some()).then_some(t)
    })
    .await
    .expect("every transfer both taken and credited in the database");
    assert!(transfers.len() > 10, "units moved between buckets: {}", transfers.len());
    let moved: i64 = transfers.iter().map(|t| t.units).sum();
    assert_eq!(moved, STOCK - STOCK / 6, "every unit outside bucket 1 moved there once");
}
