//! Drain benchmark of the persistence worker (issue 3): 100,000 `reserved` events already
//! in the shard streams are carried into PostgreSQL by the real worker; prints rows/s. Then
//! a steady feed (events XADDed at a fixed rate while the worker runs) and the p50/p99 of
//! the persistence lag: from an event's XADD until its row is in the database.
//!
//! Run: `cargo bench --bench persist_drain` (starts its own redis-server and PostgreSQL on
//! free ports; `SECKILL_BENCH_EVENTS` and `SECKILL_BENCH_RATE` override the sizes). Under
//! `cargo test` it runs with 5,000 events as a smoke test.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::gateway::Gateway;
use common::{PgServer, RedisServer, poll, unique};
use seckill_gateway::clock::system_now_ms;
use seckill_gateway::domain::OrderEvent;
use seckill_gateway::engine::{Order, OrderStatus, keys};
use seckill_gateway::ids::{new_order_id, shard_of};
use seckill_gateway::store::Store;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// XADD `n` reserved events for `items` (spread over shards), pipelined.
async fn feed(conn: &mut redis::aio::ConnectionManager, items: &[String], n: usize) {
    let now = system_now_ms();
    let mut pipe = redis::pipe();
    for i in 0..n {
        let item = &items[i % items.len()];
        let order = Order {
            order_id: new_order_id(item),
            item_id: item.clone(),
            user_id: format!("u{i}"),
            qty: 1,
            status: OrderStatus::Reserved,
            created_ms: now,
            pay_before_ms: now + 900_000,
            updated_ms: now,
            idem_key: String::new(),
            price_cents: None,
            refund: None,
        };
        let ev = OrderEvent::of(&order, OrderStatus::Reserved, system_now_ms());
        let cmd = pipe.cmd("XADD").arg(keys::events(shard_of(item))).arg("*");
        for (k, v) in ev.to_fields() {
            cmd.arg(k).arg(v);
        }
        cmd.ignore();
        if pipe.len() >= 1000 {
            let _: () = pipe.query_async(conn).await.unwrap();
            pipe = redis::pipe();
        }
    }
    if !pipe.is_empty() {
        let _: () = pipe.query_async(conn).await.unwrap();
    }
}

async fn total_rows(store: &Store, items: &[String]) -> usize {
    let mut n = 0;
    for i in items {
        n += store.count(i).await.unwrap().0 as usize;
    }
    n
}

fn main() {
    // `cargo bench` passes `--bench`; under `cargo test` this runs as a small smoke test.
    let bench = std::env::args().any(|a| a == "--bench");
    let events = env_usize("SECKILL_BENCH_EVENTS", if bench { 100_000 } else { 5_000 });
    let rate = env_usize("SECKILL_BENCH_RATE", if bench { 10_000 } else { 2_000 });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let redis = RedisServer::start();
        let pg = PgServer::start();
        pg.create_database("bench");
        let db = pg.url("bench");
        // 16 items: one per shard, so every shard worker has work.
        let mut items: Vec<String> = Vec::new();
        while items.len() < 16 {
            let id = unique("bench");
            if !items.iter().any(|i| shard_of(i) == shard_of(&id)) {
                items.push(id);
            }
        }
        let mut conn = redis::aio::ConnectionManager::new(redis.client()).await.unwrap();
        feed(&mut conn, &items, events).await;
        println!("persist_drain: {events} reserved events queued in 16 shard streams");

        let started = Instant::now();
        let mut gw = Gateway::builder(&redis.url())
            .database(&db)
            .flag("--persist-batch", "1000")
            .flag("--persist-wait", "20ms")
            .start()
            .await;
        let store = Store::connect(&db, Duration::from_secs(5)).await.unwrap();
        poll(Duration::from_secs(3_600), async || {
            (total_rows(&store, &items).await >= events).then_some(())
        })
        .await
        .expect("the backlog drains within an hour");
        let secs = started.elapsed().as_secs_f64();
        println!(
            "persist_drain: backlog of {events} drained in {secs:.2} s = {:.0} rows/s (worker start included)",
            events as f64 / secs
        );

        // Steady feed: `rate` events/s for 5 s in 50 ms slices. Lag of a slice = time from its
        // XADD until the database holds it (row counts polled every 10 ms).
        let slice = rate / 20;
        let base = events;
        let poller_store = Store::connect(&db, Duration::from_secs(5)).await.unwrap();
        let poll_items = items.clone();
        let total = base + slice * 100;
        let poller = tokio::spawn(async move {
            let mut seen = Vec::new(); // (instant, rows)
            loop {
                let n = total_rows(&poller_store, &poll_items).await;
                seen.push((Instant::now(), n));
                if n >= total {
                    return seen;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        });
        let mut fed = Vec::new(); // (instant after the XADDs returned, cumulative rows expected)
        let steady_start = Instant::now();
        for k in 0..100 {
            let t = Instant::now();
            feed(&mut conn, &items, slice).await;
            fed.push((Instant::now(), base + slice * (k + 1)));
            tokio::time::sleep(Duration::from_millis(50).saturating_sub(t.elapsed())).await;
        }
        let fed_secs = steady_start.elapsed().as_secs_f64();
        let seen = poller.await.unwrap();
        let mut lags: Vec<f64> = fed
            .iter()
            .map(|(at, want)| {
                let done = seen.iter().find(|(t, n)| t >= at && n >= want).map_or(*at, |(t, _)| *t);
                done.duration_since(*at).as_secs_f64()
            })
            .collect();
        lags.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let pct = |p: f64| lags[((lags.len() as f64 - 1.0) * p).round() as usize];
        println!(
            "persist_drain: steady feed {:.0} events/s for {fed_secs:.1} s: persistence lag p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (100 slices, 10 ms polling)",
            (slice * 100) as f64 / fed_secs,
            pct(0.5) * 1000.0,
            pct(0.99) * 1000.0,
            lags.last().unwrap() * 1000.0
        );
        gw.stop().await;
    });
}
