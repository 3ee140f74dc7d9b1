//! Repeated failures logged at a bounded rate. A Redis outage at 300 requests/s made 300
//! identical warnings a second (1,347 lines in 3 s): each kind of failure (`what`) is now
//! logged at most once a second, and that line counts the ones left out since the last.
//! The background tasks' retries (16 persistence workers, the sweeper) share [`BACKGROUND`].

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Mutex;

use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

/// The background tasks' failures, per kind, for the whole process.
pub static BACKGROUND: std::sync::LazyLock<LogRate> = std::sync::LazyLock::new(LogRate::default);

pub struct LogRate {
    limiter: DefaultKeyedRateLimiter<&'static str>,
    suppressed: Mutex<HashMap<&'static str, u64>>,
}

impl Default for LogRate {
    fn default() -> Self {
        LogRate {
            limiter: RateLimiter::keyed(Quota::per_second(NonZeroU32::MIN)),
            suppressed: Mutex::new(HashMap::new()),
        }
    }
}

impl LogRate {
    /// Whether a failure of kind `what` is logged now: `Some(n)` with the number left out
    /// since the last line of that kind, `None` to leave this one out (counted).
    pub fn admit(&self, what: &'static str) -> Option<u64> {
        let mut suppressed = self.suppressed.lock().unwrap_or_else(|e| e.into_inner());
        if self.limiter.check_key(&what).is_ok() {
            Some(suppressed.remove(what).unwrap_or(0))
        } else {
            *suppressed.entry(what).or_default() += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_a_second_per_kind_counting_the_rest() {
        let log = LogRate::default();
        assert_eq!(log.admit("reserve"), Some(0));
        for _ in 0..99 {
            assert_eq!(log.admit("reserve"), None);
        }
        assert_eq!(log.admit("pay"), Some(0), "kinds are apart");
        std::thread::sleep(std::time::Duration::from_millis(1_050));
        assert_eq!(log.admit("reserve"), Some(99), "the next line counts the 99 left out");
        assert_eq!(log.admit("reserve"), None);
    }
}
