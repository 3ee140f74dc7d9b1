//! The deadline sweeper: expires reservations whose payment deadline passed, returning their
//! stock and quota. It may run on every instance at once: `expire.lua` is a compare-and-set
//! on the order's status, so an order cannot be expired twice (invariant 6). The engine
//! does the pass ([`crate::engine::Engine::sweep`]) and tells every instance.

use tokio::sync::watch;

use crate::engine::Engine;
use crate::shutdown::stopped;

pub async fn run(engine: Engine, every: std::time::Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut shutdown) => return,
        }
        sweep(&engine).await;
    }
}

/// One pass; returns the orders expired (a failure is logged: the next pass retries).
pub async fn sweep(engine: &Engine) -> usize {
    match engine.sweep().await {
        Ok(n) => n,
        Err(e) => {
            if let Some(suppressed) = crate::lograte::BACKGROUND.admit("sweep") {
                tracing::warn!(cause = %e, suppressed, "deadline sweep failed");
            }
            0
        }
    }
}
