//! The stock gauge follows every change on every instance (issue 14, acceptance 6): two
//! gateway processes (real binaries: each has its own metrics registry) on one
//! `redis-server`; orders made on one, cancelled on the other, expired by whichever sweeper
//! comes first: within 2 s of each change both instances' `seckill_stock_remaining` equals
//! the item's remaining stock as the engine counts it.

mod common;

use std::time::{Duration, Instant};

use common::binary::Binary;
use common::http::{ADMIN_TOKEN, Api};
use common::{RedisServer, unique};

/// The value of `seckill_stock_remaining{item="<item>"}` in a `/metrics` text, if present.
fn gauge(metrics: &str, item: &str) -> Option<i64> {
    let series = format!("seckill_stock_remaining{{item=\"{item}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as i64)
}

async fn remaining(api: &Api, item: &str) -> i64 {
    api.stats(item).await.assert_ok()["stock_remaining"].as_i64().unwrap()
}

/// Both instances' gauges equal `expected` within 2 s; returns how long that took.
async fn gauges_reach(instances: &[&Binary], item: &str, expected: i64) -> Duration {
    let start = Instant::now();
    loop {
        let mut seen = Vec::new();
        for gw in instances {
            seen.push(gauge(&gw.metrics().await, item));
        }
        if seen.iter().all(|g| *g == Some(expected)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "gauges {seen:?}, stock {expected}: not followed within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn gateway(redis: &RedisServer, dir: &std::path::Path, name: &str) -> Binary {
    Binary::builder()
        .flag("--redis-url", &redis.url())
        .flag("--database-url", &format!("sqlite://{}/{name}.db", dir.display()))
        .flag("--admin-token", ADMIN_TOKEN)
        .flag("--rate-per-user", "0")
        .flag("--rate-per-ip", "0")
        .flag("--payment-timeout", "3s")
        .flag("--sweep-interval", "200ms")
        .flag("--consumer-name", &unique(name))
        .env("RUST_LOG", "warn")
        .spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stock_gauge_follows_cancel_and_expiry_on_every_instance() {
    let redis = RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut a = gateway(&redis, dir.path(), "a");
    let mut b = gateway(&redis, dir.path(), "b");
    a.ready().await;
    b.ready().await;
    let item = a.new_item(10, 1).await;
    // Each instance publishes the item's gauge once it has read it.
    b.get_item(&item).await.assert_ok();
    gauges_reach(&[&a, &b], &item, 10).await;

    // Orders on A only: B's gauge follows.
    let mut orders = Vec::new();
    for n in 0..4 {
        let user = format!("u{n}");
        orders.push((a.reserve_ok(&item, &user).await, user));
    }
    assert_eq!(remaining(&a, &item).await, 6);
    let took = gauges_reach(&[&a, &b], &item, 6).await;
    eprintln!("reservations on A: both gauges 6 after {took:?}");

    // A cancel on B: A's gauge follows.
    let (order, user) = &orders[0];
    b.cancel(order, user).await.assert_ok();
    assert_eq!(remaining(&b, &item).await, 7);
    let took = gauges_reach(&[&a, &b], &item, 7).await;
    eprintln!("cancel on B: both gauges 7 after {took:?}");

    // The other three expire (3 s), by whichever instance's sweeper comes first.
    let deadline = Instant::now() + Duration::from_secs(15);
    while remaining(&a, &item).await != 10 {
        assert!(Instant::now() < deadline, "the reservations expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = gauges_reach(&[&a, &b], &item, 10).await;
    eprintln!("expiry: both gauges 10 after {took:?}");
    a.terminate();
    b.terminate();
}
