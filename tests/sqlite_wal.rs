//! The SQLite store's checkpoints (issue 11): no connection checkpoints when it commits; a
//! background task copies the WAL into the database file, and under a steady stream of
//! commits still makes the WAL start over, so it stays bounded.

use std::path::Path;
use std::time::{Duration, Instant};

use seckill_gateway::domain::OrderEvent;
use seckill_gateway::engine::{Order, OrderStatus};
use seckill_gateway::store::Store;

fn events(from: usize, n: usize, idem_len: usize) -> Vec<OrderEvent> {
    (from..from + n)
        .map(|i| {
            let order = Order {
                order_id: format!("o{i:08}"),
                item_id: "wal".into(),
                user_id: format!("u{i}"),
                qty: 1,
                status: OrderStatus::Reserved,
                created_ms: 1,
                pay_before_ms: 2,
                updated_ms: 1,
                idem_key: "k".repeat(idem_len),
                price_cents: None,
                refund: None,
            };
            OrderEvent::of(&order, OrderStatus::Reserved, 1)
        })
        .collect()
}

fn size(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

async fn store(dir: &Path) -> Store {
    let url = format!("sqlite://{}", dir.join("wal.db").display());
    Store::connect(&url, Duration::from_secs(5))
        .await
        .expect("sqlite store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_reach_the_database_file_without_a_checkpoint_on_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let db = dir.path().join("wal.db");
    let before = size(&db);
    // About 2 MiB: below SQLite's own automatic checkpoint mark (1,000 pages), so only the
    // store's checkpointer can have copied it into the database file.
    store.apply(&events(0, 2_000, 1_000)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while size(&db) < before + 1_000_000 {
        assert!(
            Instant::now() < deadline,
            "the WAL was never checkpointed into {}",
            db.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(store.count("wal").await.unwrap(), (2_000, 2_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_starts_over_under_a_steady_stream_of_commits() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path()).await;
    let wal = dir.path().join("wal.db-wal");
    // Rows of about a page, committed back to back (100 a commit) until three times the
    // WAL's size has been written: it never gets there if the WAL only grows. The store
    // makes it start over past 16 MiB.
    let batch = 100;
    let (mut written, mut n) = (0u64, 0usize);
    let deadline = Instant::now() + Duration::from_secs(60);
    while written < 48 << 20 || written < 3 * size(&wal) {
        assert!(
            Instant::now() < deadline,
            "WAL {} bytes after {written} bytes of rows: it never started over",
            size(&wal)
        );
        store.apply(&events(n, batch, 3_500)).await.unwrap();
        written += (batch * 3_500) as u64;
        n += batch;
    }
    assert_eq!(store.count("wal").await.unwrap(), (n as i64, n as i64));
}
