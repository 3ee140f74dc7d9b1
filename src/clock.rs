//! The clock the engines ask. Production uses the system clock (and, for the Redis engine,
//! Redis `TIME` inside the scripts); tests inject a manual clock so payment timeouts and
//! sale windows are tested without sleeping (the pattern of envoy's `TimeSource`).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

/// Milliseconds since the Unix epoch.
pub type Millis = i64;

#[derive(Clone, Debug)]
pub enum Clock {
    /// The system clock plus an offset. The Redis engine learns Redis' offset from `TIME`
    /// so that local early answers (`not_started`, `ended`) agree with the scripts, which
    /// use Redis `TIME` and stay authoritative whatever this instance's clock says.
    System { offset_ms: Arc<AtomicI64> },
    /// A clock that only moves when a test moves it.
    Manual(Arc<AtomicI64>),
}

impl Default for Clock {
    fn default() -> Self {
        Clock::System {
            offset_ms: Arc::new(AtomicI64::new(0)),
        }
    }
}

impl Clock {
    pub fn system() -> Self {
        Clock::default()
    }

    pub fn manual(start: Millis) -> Self {
        Clock::Manual(Arc::new(AtomicI64::new(start)))
    }

    pub fn now_ms(&self) -> Millis {
        match self {
            Clock::System { offset_ms } => system_now_ms() + offset_ms.load(Ordering::Relaxed),
            Clock::Manual(t) => t.load(Ordering::SeqCst),
        }
    }

    /// Move a manual clock forward; a no-op on the system clock.
    pub fn advance(&self, ms: Millis) {
        if let Clock::Manual(t) = self {
            t.fetch_add(ms, Ordering::SeqCst);
        }
    }

    /// The `now_ms` argument the Lua scripts take: empty means "use Redis `TIME`".
    pub fn script_arg(&self) -> String {
        match self {
            Clock::System { .. } => String::new(),
            Clock::Manual(t) => t.load(Ordering::SeqCst).to_string(),
        }
    }

    /// Set the system clock's correction (ignored by a manual clock).
    pub fn set_offset(&self, ms: Millis) {
        if let Clock::System { offset_ms } = self {
            offset_ms.store(ms, Ordering::Relaxed);
        }
    }

    pub fn is_manual(&self) -> bool {
        matches!(self, Clock::Manual(_))
    }
}

pub fn system_now_ms() -> Millis {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    d.as_millis() as Millis
}

/// RFC 3339 (UTC, millisecond precision) for a millisecond timestamp, as the API shows times.
/// The last time each thread formatted: the replies of one reserve batch share their
/// `pay_before` (the script's clock read once per call), so most are this one.
pub fn rfc3339(ms: Millis) -> String {
    thread_local! {
        static LAST: std::cell::RefCell<(Option<Millis>, String)> = const { std::cell::RefCell::new((None, String::new())) };
    }
    LAST.with_borrow_mut(|(at, text)| {
        if *at != Some(ms) {
            *text = format_rfc3339(ms);
            *at = Some(ms);
        }
        text.clone()
    })
}

fn format_rfc3339(ms: Millis) -> String {
    // Always three fractional digits (the contract's `2026-11-21T09:00:00.123Z`): times of
    // one format sort as text, and `.120Z` is not shortened to `.12Z`.
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z");
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(FORMAT).unwrap_or_default()
}

/// Parse an RFC 3339 time into milliseconds since the epoch.
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips_with_offsets() {
        let ms = parse_rfc3339("2026-11-21T10:00:00+01:00").unwrap();
        assert_eq!(rfc3339(ms), "2026-11-21T09:00:00.000Z");
        assert_eq!(rfc3339(1_700_000_000_120), "2023-11-14T22:13:20.120Z");
        assert_eq!(parse_rfc3339(&rfc3339(1_700_000_000_123)), Some(1_700_000_000_123));
        assert_eq!(parse_rfc3339("yesterday"), None);
    }

    #[test]
    fn rfc3339_of_a_time_again_and_after_another_is_its_own() {
        let (a, b) = (1_700_000_000_123, 1_700_000_060_456);
        assert_eq!(rfc3339(a), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(a), "2023-11-14T22:13:20.123Z", "the remembered text");
        assert_eq!(rfc3339(b), "2023-11-14T22:14:20.456Z");
        assert_eq!(rfc3339(a), "2023-11-14T22:13:20.123Z");
        assert_eq!(rfc3339(i64::MIN), "1970-01-01T00:00:00.000Z", "out of range: the epoch");
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = Clock::manual(1_000);
        assert_eq!(c.now_ms(), 1_000);
        c.advance(500);
        assert_eq!(c.now_ms(), 1_500);
        assert_eq!(c.script_arg(), "1500");
        assert_eq!(Clock::system().script_arg(), "");
    }
}
