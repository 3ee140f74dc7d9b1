//! The one poller: wait for something that happens in the background (a worker
//! persists, a flag clears, a server comes up) without sleeping a fixed time.

use std::time::{Duration, Instant};

/// How long [`poll`] waits between two tries.
pub const POLL_EVERY: Duration = Duration::from_millis(50);

/// Calls `f` every 50 ms until it returns `Some`, for at most `within` (always
/// at least once); `None` when it never did. A test says what it waited for:
/// `poll(…).await.expect("the worker persists every order")`.
pub async fn poll<T>(within: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}
