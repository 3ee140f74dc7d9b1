//! The deadline sweeper: expires reservations whose payment deadline passed, returning their
//! stock and quota. It may run on every instance at once: `expire.lua` is a compare-and-set
//! on the order's status, so an order cannot be expired twice (invariant 6).

use std::sync::Arc;

use tokio::sync::watch;

use crate::app::App;
use crate::engine::StockEngine;
use crate::metrics;

/// Orders expired per shard per pass.
const BATCH: usize = 500;

pub async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(app.config.sweep_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = crate::app::stopped(&mut shutdown) => return,
        }
        sweep(&app).await;
    }
}

/// One pass: expire everything due (in batches), then clear local flags of items whose
/// stock came back (other instances hear it by pub/sub).
pub async fn sweep(app: &App) -> usize {
    if let crate::engine::Engine::Embedded(e) = &app.engine {
        e.prune();
    }
    let mut total = 0;
    loop {
        match app.engine.expire_due(BATCH).await {
            Ok(expired) => {
                for e in &expired {
                    metrics::order_event("expired");
                    app.cache.invalidate(&e.item_id);
                }
                total += expired.len();
                if expired.len() < BATCH {
                    return total;
                }
            }
            Err(e) => {
                tracing::warn!(cause = %e, "deadline sweep failed");
                return total;
            }
        }
    }
}
