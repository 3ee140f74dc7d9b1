//! Per-stage costs of the request path (criterion): limiter check, Bloom lookup, cache hit,
//! request JSON parse + reply JSON, the whole in-process decision path on the embedded
//! engine, and the reserve script round trip on a throwaway redis-server.
//!
//! Run: `cargo bench --bench stages`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::engines::{EngineSettings, embedded_engine, redis_engine};
use criterion::{Criterion, criterion_group, criterion_main};
use seckill_gateway::cache::LocalCache;
use seckill_gateway::clock::Clock;
use seckill_gateway::engine::{ItemSpec, ReserveCmd, StockEngine};
use seckill_gateway::filter::ItemFilter;
use seckill_gateway::ids::new_order_id;
use seckill_gateway::limiter::{Limiter, Limits};

/// Both engines: the gateway's default timeouts and TTLs, a guard that never sheds here.
const SETTINGS: EngineSettings = EngineSettings {
    payment_timeout: Duration::from_secs(900),
    idempotency_ttl: Duration::from_secs(3600),
    closed_order_ttl: Duration::from_secs(3600),
    redis_timeout: Duration::from_secs(1),
    max_inflight: 1024,
    circuit_failures: 100,
    circuit_cooldown: Duration::from_secs(1),
};

fn spec(id: &str, stock: i64) -> ItemSpec {
    ItemSpec {
        item_id: id.into(),
        name: "bench".into(),
        price_cents: 1,
        stock_total: stock,
        per_user_limit: 1,
        starts_ms: 0,
        ends_ms: i64::MAX / 2,
        buckets: 1,
        paused: false,
    }
}

fn stages(c: &mut Criterion) {
    let limiter = Limiter::new(Limits {
        global: 0,
        per_user: 1_000_000,
        per_ip: 0,
    });
    let users: Vec<String> = (0..10_000).map(|i| format!("user-{i}")).collect();
    let n = AtomicU64::new(0);
    c.bench_function("limiter: per-user bucket check", |b| {
        b.iter(|| {
            let i = n.fetch_add(1, Ordering::Relaxed) as usize % users.len();
            limiter.check_user(&users[i]).is_ok()
        })
    });

    let filter = ItemFilter::new((0..1000).map(|i| format!("item-{i}")));
    c.bench_function("bloom: unknown id", |b| b.iter(|| filter.may_contain("no-such-item")));
    c.bench_function("bloom: known id", |b| b.iter(|| filter.may_contain("item-500")));

    let cache = LocalCache::new(Duration::from_secs(60), Duration::from_secs(60));
    cache.put_item(Arc::new(spec("hot", 10)));
    cache.mark_sold_out("gone");
    c.bench_function("cache: item metadata hit", |b| b.iter(|| cache.item("hot").is_some()));
    c.bench_function("cache: sold-out flag hit", |b| b.iter(|| cache.is_sold_out("gone")));

    #[derive(serde::Deserialize)]
    struct Body {
        #[allow(dead_code)]
        qty: Option<i64>,
    }
    c.bench_function("json: parse reserve body + render reply", |b| {
        b.iter(|| {
            let body: Body = serde_json::from_slice(br#"{"qty":1}"#).unwrap();
            let reply = serde_json::json!({
                "order_id": "01a1fdd5-6f40-711c-ae84-e75867669880", "item_id": "demo", "user_id": "alice",
                "qty": body.qty, "status": "reserved", "pay_before": "2026-11-21T11:34:45.728Z"});
            serde_json::to_vec(&reply).unwrap()
        })
    });

    // The whole decision path without sockets, on the embedded engine (no journal: the
    // SQLite group commit is measured by the load tests).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let engine = embedded_engine(&Clock::system(), &SETTINGS, None);
    rt.block_on(engine.put_item(&spec("bench-item", 1_000_000_000)))
        .unwrap();
    let filter = ItemFilter::new(["bench-item".to_owned()]);
    cache.put_item(Arc::new(spec("bench-item", 1_000_000_000)));
    let seq = AtomicU64::new(0);
    c.bench_function("path: limiter+bloom+cache+embedded reserve+reply", |b| {
        b.iter(|| {
            let u = format!("u{}", seq.fetch_add(1, Ordering::Relaxed));
            limiter.check_user(&u).unwrap();
            assert!(filter.may_contain("bench-item"));
            assert!(!cache.is_sold_out("bench-item"));
            let _meta = cache.item("bench-item").unwrap();
            let cmd = ReserveCmd {
                item_id: "bench-item".into(),
                user_id: u,
                qty: 1,
                order_id: new_order_id("bench-item"),
                idem_key: None,
                buckets: 1,
            };
            let r = rt.block_on(engine.reserve(&cmd)).unwrap();
            serde_json::to_vec(&format!("{r:?}")).unwrap()
        })
    });

    // The reserve script round trip on a real redis-server.
    let redis = common::RedisServer::start();
    let _runtime = rt.enter(); // the connection manager spawns its task on it
    let engine = redis_engine(&redis.url(), &Clock::system(), &SETTINGS);
    rt.block_on(engine.put_item(&spec("bench-item", 1_000_000_000)))
        .unwrap();
    let seq = AtomicU64::new(0);
    c.bench_function("redis: reserve.lua round trip (one connection, sequential)", |b| {
        b.iter(|| {
            let cmd = ReserveCmd {
                item_id: "bench-item".into(),
                user_id: format!("u{}", seq.fetch_add(1, Ordering::Relaxed)),
                qty: 1,
                order_id: new_order_id("bench-item"),
                idem_key: None,
                buckets: 1,
            };
            rt.block_on(engine.reserve(&cmd)).unwrap()
        })
    });
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = stages
}
criterion_main!(benches);
