//! The one shutdown pattern: a `watch` channel that turns `true` once; every background task
//! selects on [`stopped`] and finishes the work in hand before returning (the mini-redis
//! `src/shutdown.rs` pattern).

use tokio::sync::watch;

/// Resolve once `shutdown` turns true (or its sender is gone). The guard `wait_for` returns
/// is dropped here, so callers' futures stay `Send`.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}
