//! Retry delays for the background loops that reconnect (the change feed, the persistence
//! workers): backon's exponential backoff with jitter, one set of bounds for all of them.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// The first delay after a failure.
pub const MIN_DELAY: Duration = Duration::from_millis(100);
/// The longest delay between two attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(5);

/// Fresh delays: 100 ms doubling to 5 s, jittered, never giving up. Start a new one after a
/// success, so the next failure is retried quickly again.
pub fn backoff() -> ExponentialBackoff {
    ExponentialBuilder::default()
        .with_min_delay(MIN_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_stay_within_the_bounds_and_never_end() {
        let delays: Vec<Duration> = backoff().take(50).collect();
        assert_eq!(delays.len(), 50, "never gives up");
        // Jitter adds up to one more delay on top of each step.
        assert!(
            delays.iter().all(|d| *d >= MIN_DELAY && *d <= MAX_DELAY * 2),
            "{delays:?}"
        );
        assert!(delays[0] < Duration::from_millis(250), "starts small: {:?}", delays[0]);
    }
}
