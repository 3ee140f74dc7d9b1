//! The header-read timeout (`SECKILL_HEADER_TIMEOUT`) with one timer per connection. A
//! connection keeps when it began waiting for its next request head: when it was accepted,
//! and when an answer's body was handed to hyper to write. Its [`HeadClock::expired`]
//! sleeps until that instant plus the timeout, and when the connection moved on meanwhile
//! (a request came and was answered) sleeps again until the new instant's: a timer event per
//! connection per timeout, not per request.
//!
//! hyper's own `header_read_timeout` arms a timer for every head it reads (a boxed sleep,
//! registered in tokio's timer wheel and taken out again under its lock): 3.6 % of the
//! gateway's CPU samples on the sold-out path, more than the Bloom filter and the sold-out
//! flag together. The semantics are hyper's: the time runs while the connection waits for a
//! head (idle keep-alive included), not while a request is handled or its answer written.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::time::Instant;

use super::reply::Body;

/// [`HeadClock`]'s state while a request is being handled.
const BUSY: u64 = u64::MAX;

/// When a connection began waiting for a request head, or that it is handling one.
pub struct HeadClock {
    base: Instant,
    /// Nanoseconds from `base` to when the wait began, or [`BUSY`].
    since: AtomicU64,
}

impl HeadClock {
    /// A connection just accepted: it waits for its first head from now.
    pub fn new() -> Arc<Self> {
        Arc::new(HeadClock {
            base: Instant::now(),
            since: AtomicU64::new(0),
        })
    }

    /// A head arrived: its request is being handled.
    pub fn busy(&self) {
        self.since.store(BUSY, Ordering::Relaxed);
    }

    /// The answer is with hyper: the next head is waited for from now.
    pub fn waiting(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(BUSY - 1);
        self.since.store(nanos, Ordering::Relaxed);
    }

    /// When the wait for a head began, if the connection is waiting for one.
    fn waiting_since(&self) -> Option<Instant> {
        match self.since.load(Ordering::Relaxed) {
            BUSY => None,
            nanos => Some(self.base + Duration::from_nanos(nanos)),
        }
    }

    /// Resolves once the connection has waited `timeout` for a head.
    pub async fn expired(&self, timeout: Duration) {
        let sleep = tokio::time::sleep(timeout);
        tokio::pin!(sleep);
        loop {
            sleep.as_mut().await;
            let now = Instant::now();
            let next = match self.waiting_since() {
                Some(since) if now >= since + timeout => return,
                Some(since) => since + timeout,
                // Handling a request: a wait can begin at the earliest now.
                None => now + timeout,
            };
            sleep.as_mut().reset(next);
        }
    }
}

/// An answer's body that tells its connection's [`HeadClock`] when hyper is done with it
/// (hyper drops a body once its last bytes are queued to be written).
pub struct Tracked {
    body: Body,
    clock: Arc<HeadClock>,
}

impl Tracked {
    pub fn new(body: Body, clock: Arc<HeadClock>) -> Self {
        Tracked { body, clock }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.clock.waiting();
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The clock's states as the watchdog reads them.
    #[tokio::test]
    async fn the_clock_tells_a_wait_from_a_request() {
        let clock = HeadClock::new();
        let accepted = clock
            .waiting_since()
            .expect("a new connection waits for its first head");
        assert!(accepted <= Instant::now());
        clock.busy();
        assert!(clock.waiting_since().is_none(), "handling a request");
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(Tracked::new(Body::default(), clock.clone()));
        let since = clock.waiting_since().expect("the answer handed over: waiting again");
        assert!(since >= accepted + Duration::from_millis(20), "{since:?} {accepted:?}");
    }

    /// A connection that keeps being answered is not timed out; one left waiting is, one
    /// timeout after its wait began.
    #[tokio::test]
    async fn only_a_wait_longer_than_the_timeout_expires() {
        let timeout = Duration::from_millis(200);
        let clock = HeadClock::new();
        let watch = clock.clone();
        let expired = tokio::spawn(async move { watch.expired(timeout).await });
        // Requests every 50 ms for 3 timeouts: the watchdog re-arms past each.
        for _ in 0..12 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            clock.busy();
            clock.waiting();
        }
        assert!(!expired.is_finished(), "answered every 50 ms, never waited 200 ms");
        let waited = Instant::now();
        expired.await.unwrap();
        let took = waited.elapsed();
        assert!(took >= timeout, "expired after {took:?}");
    }

    /// A request handled for longer than the timeout is not cut off.
    #[tokio::test]
    async fn a_long_request_is_not_a_wait() {
        let timeout = Duration::from_millis(100);
        let clock = HeadClock::new();
        clock.busy();
        let watch = clock.clone();
        let expired = tokio::spawn(async move { watch.expired(timeout).await });
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(!expired.is_finished(), "busy for 3.5 timeouts");
        clock.waiting();
        let waited = Instant::now();
        expired.await.unwrap();
        assert!(waited.elapsed() >= Duration::from_millis(90), "{:?}", waited.elapsed());
    }
}
