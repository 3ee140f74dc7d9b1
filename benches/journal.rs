//! Latency of the embedded engine's journal alone (issue 11): `SECKILL_BENCH_CONC` tasks
//! (256) each append one `reserved` event and wait for its commit, in a loop, for
//! `SECKILL_BENCH_SECS` seconds (10), against a fresh SQLite file — the reserve path's
//! durability step without HTTP or the engine's maps. Prints appends/s, the p50/p99/p99.9/max
//! of one append (enqueue → committed), and the SQLite files' sizes at the end.
//!
//! Run: `cargo bench --bench journal` (`RUST_LOG=seckill_gateway=debug` shows the store's
//! and the journal's logs). Under `cargo test --benches` it runs for one second
//! as a smoke test.

use std::sync::Arc;
use std::time::{Duration, Instant};

use seckill_gateway::clock::{Clock, system_now_ms};
use seckill_gateway::domain::{ItemSpec, OrderEvent};
use seckill_gateway::engine::embedded::Journal;
use seckill_gateway::engine::journal::SqliteJournal;
use seckill_gateway::engine::{Order, OrderStatus};
use seckill_gateway::ids::new_order_id;
use seckill_gateway::store::Store;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn pct(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * p / 100.0) as usize).min(sorted.len() - 1);
    sorted[i] as f64 / 1000.0
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let secs = if bench { env_u64("SECKILL_BENCH_SECS", 10) } else { 1 };
    let conc = env_u64("SECKILL_BENCH_CONC", 256) as usize;
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .init();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let dir = tempfile::tempdir().expect("temp dir");
        let url = format!("sqlite://{}/bench.db", dir.path().display());
        let store = Arc::new(Store::connect(&url, Duration::from_secs(5)).await.expect("store"));
        let journal = Arc::new(SqliteJournal::start(store.clone(), Clock::system()));
        let now = system_now_ms();
        let item = "bench".to_owned();
        journal
            .put_item(ItemSpec {
                item_id: item.clone(),
                name: "bench".into(),
                price_cents: 1,
                stock_total: 1 << 40,
                per_user_limit: 1,
                starts_ms: now - 60_000,
                ends_ms: now + 7_200_000,
                buckets: 1,
                paused: false,
            })
            .await
            .expect("item");
        let deadline = Instant::now() + Duration::from_secs(secs);
        let started = Instant::now();
        let mut tasks = Vec::new();
        for t in 0..conc {
            let journal = journal.clone();
            let item = item.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let now = system_now_ms();
                    let order = Order {
                        order_id: new_order_id(&item),
                        item_id: item.clone(),
                        user_id: format!("t{t}n{n}"),
                        qty: 1,
                        status: OrderStatus::Reserved,
                        created_ms: now,
                        pay_before_ms: now + 900_000,
                        updated_ms: now,
                        idem_key: String::new(),
                        price_cents: None,
                        refund: None,
                    };
                    n += 1;
                    let at = Instant::now();
                    journal
                        .append(vec![OrderEvent::of(&order, OrderStatus::Reserved, now)])
                        .await
                        .expect("append");
                    lat.push(at.elapsed().as_micros() as u64);
                }
                lat
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("task"));
        }
        let took = started.elapsed().as_secs_f64();
        all.sort_unstable();
        let size = |suffix: &str| {
            std::fs::metadata(dir.path().join(format!("bench.db{suffix}")))
                .map(|m| m.len() / 1024)
                .unwrap_or(0)
        };
        println!(
            "journal: {} appends in {took:.1}s = {:.0}/s; latency ms p50 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}; \
             db {} KiB, wal {} KiB",
            all.len(),
            all.len() as f64 / took,
            pct(&all, 50.0),
            pct(&all, 99.0),
            pct(&all, 99.9),
            pct(&all, 100.0),
            size(""),
            size("-wal"),
        );
    });
}
