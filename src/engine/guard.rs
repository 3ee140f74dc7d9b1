//! Protection around every Redis call: a timeout, a cap on calls in flight (shed with 503
//! rather than queue without bound), and a circuit breaker (after repeated failures answer
//! 503 at once for a cool-down, then let one probe through). The breaker reads an injected
//! [`Clock`]: production passes `Clock::system()`, tests a manual clock they advance.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::clock::{Clock, Millis};
use crate::error::Error;
use crate::metrics;

pub struct Guard {
    /// Permits for calls in flight; `try_acquire`, never wait: waiting is the unbounded queue
    /// this exists to prevent.
    inflight: Semaphore,
    breaker: Breaker,
    timeout: Duration,
    /// Run when the circuit's probe fails (the failure outlasted a cool-down): a cluster
    /// connection is then made anew ([`super::conn::RedisConn::reset`]).
    on_stuck: Option<Arc<dyn Fn() + Send + Sync>>,
}

impl Guard {
    /// `clock` times the breaker's cool-down and its probes (the call timeout is tokio's).
    /// The Redis engine passes `Clock::system()`, not its own clock: that one is the sale's
    /// clock (manual in tests, offset to Redis `TIME`), while an outage lasts in real time.
    pub fn new(max_inflight: usize, timeout: Duration, failures: u32, cooldown: Duration, clock: Clock) -> Self {
        Guard {
            inflight: Semaphore::new(max_inflight),
            // A real probe ends within `timeout`; one silent for longer was abandoned.
            breaker: Breaker::new(failures, cooldown, timeout + Duration::from_millis(100), clock),
            timeout,
            on_stuck: None,
        }
    }

    /// What to do when a failure outlasts a cool-down (its probe fails too).
    pub fn on_stuck(mut self, f: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.on_stuck = Some(f);
        self
    }

    fn failed(&self) {
        if self.breaker.failure()
            && let Some(f) = &self.on_stuck
        {
            f();
        }
    }

    /// The guard of one shard of a cluster: its gauge and logs say which
    /// (`seckill_circuit_open{shard="N"}`).
    pub fn of_shard(mut self, shard: u32) -> Self {
        self.breaker.shard = Some(shard.to_string());
        metrics::gauge_circuit(self.breaker.shard.as_deref(), false);
        self
    }

    /// Run one Redis call under the guard.
    pub async fn call<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let result = self.call_inner(f).await;
        if let Err(e) = &result
            && let Some(kind) = e.redis_kind()
        {
            metrics::redis_error(kind);
        }
        result
    }

    async fn call_inner<T, F>(&self, f: F) -> Result<T, Error>
    where
        F: Future<Output = redis::RedisResult<T>>,
    {
        let _permit = self.inflight.try_acquire().map_err(|_| Error::Shed)?;
        self.breaker.allow()?;
        match tokio::time::timeout(self.timeout, f).await {
            Err(_) => {
                self.failed();
                Err(Error::RedisTimeout)
            }
            Ok(Err(e)) => {
                let e = Error::from(e);
                if matches!(e, Error::RedisTimeout | Error::RedisConnection(_)) {
                    self.failed();
                } else {
                    // Redis answered: the connection is fine even if the reply was an error.
                    self.breaker.success();
                }
                Err(e)
            }
            Ok(Ok(v)) => {
                self.breaker.success();
                Ok(v)
            }
        }
    }

    pub fn circuit_open(&self) -> bool {
        self.breaker.is_open()
    }
}

/// A consecutive-failure circuit breaker on an injected clock.
///
/// The system clock can be stepped (NTP). So that a step back cannot keep the circuit open
/// longer than a monotonic clock would, it ends a running cool-down and makes an out probe
/// count as abandoned.
struct Breaker {
    /// The shard whose calls it guards (cluster mode); `None`: every call.
    shard: Option<String>,
    failures: AtomicU32,
    /// Clock time (ms) until which the circuit is open; 0 = closed.
    open_until: AtomicI64,
    /// A probe is out while the cool-down is over but no call has succeeded yet.
    probing: AtomicBool,
    /// When the probe went out (clock ms). A probe whose caller went away (the client hung
    /// up and hyper dropped the handler) never reports back; after `probe_timeout` another
    /// caller may probe instead, so the circuit cannot stay stuck.
    probe_started: AtomicI64,
    probe_timeout: Duration,
    threshold: u32,
    cooldown: Duration,
    clock: Clock,
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration, probe_timeout: Duration, clock: Clock) -> Self {
        metrics::gauge_circuit(None, false);
        Breaker {
            shard: None,
            failures: AtomicU32::new(0),
            open_until: AtomicI64::new(0),
            probing: AtomicBool::new(false),
            probe_started: AtomicI64::new(0),
            probe_timeout,
            threshold,
            cooldown,
            clock,
        }
    }

    fn now(&self) -> Millis {
        self.clock.now_ms()
    }

    fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }

    fn allow(&self) -> Result<(), Error> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Ok(());
        }
        let now = self.now();
        // Open while the cool-down runs: `until - now` in 1..=cooldown (more: the clock
        // stepped back, and the cool-down is not stretched).
        if (1..=self.cooldown.as_millis() as i64).contains(&(until - now)) {
            return Err(Error::CircuitOpen);
        }
        // Cool-down over: exactly one caller probes at a time.
        if self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.probe_started.store(now, Ordering::Release);
            return Ok(());
        }
        let started = self.probe_started.load(Ordering::Acquire);
        let abandoned = !(0..=self.probe_timeout.as_millis() as i64).contains(&(now - started));
        if abandoned
            && self
                .probe_started
                .compare_exchange(started, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Ok(());
        }
        Err(Error::CircuitOpen)
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Release);
        if self.open_until.swap(0, Ordering::AcqRel) != 0 {
            self.probing.store(false, Ordering::Release);
            metrics::gauge_circuit(self.shard.as_deref(), false);
            tracing::info!(shard = self.shard.as_deref(), "redis circuit closed");
        }
    }

    /// Count a failure; true when it was the probe's (the circuit opens again).
    fn failure(&self) -> bool {
        let open = |why: &str| {
            self.open_until
                .store(self.now() + self.cooldown.as_millis() as i64, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            metrics::gauge_circuit(self.shard.as_deref(), true);
            tracing::warn!(
                shard = self.shard.as_deref(),
                cooldown_ms = self.cooldown.as_millis() as u64,
                why,
                "redis circuit open"
            );
        };
        if self.probing.load(Ordering::Acquire) {
            open("probe failed");
            return true;
        }
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold && !self.is_open() {
            open("consecutive failures");
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn fail() -> redis::RedisResult<()> {
        Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "down",
        )))
    }

    /// A guard whose breaker reads a manual clock, and that clock.
    fn guard(max_inflight: usize, timeout: Duration, failures: u32, cooldown: Duration) -> (Guard, Clock) {
        let clock = Clock::manual(1_000_000);
        (
            Guard::new(max_inflight, timeout, failures, cooldown, clock.clone()),
            clock,
        )
    }

    /// The circuit refuses calls without making them for `ms` more milliseconds, then lets
    /// a probe through, which closes it.
    async fn refuses_for_then_closes(g: &Guard, clock: &Clock, ms: i64) {
        let refused = || async { matches!(g.call(async { Ok(()) }).await, Err(Error::CircuitOpen)) };
        assert!(g.circuit_open());
        assert!(refused().await, "open: not called");
        clock.advance(ms - 1);
        assert!(refused().await, "still open {} ms later", ms - 1);
        clock.advance(1);
        assert!(
            g.call(async { Ok(()) }).await.is_ok(),
            "the probe goes through {ms} ms later"
        );
        assert!(!g.circuit_open());
    }

    #[tokio::test]
    async fn breaker_opens_then_probes() {
        let (g, clock) = guard(10, Duration::from_secs(1), 3, Duration::from_millis(50));
        for _ in 0..3 {
            assert!(matches!(g.call(async { fail() }).await, Err(Error::RedisConnection(_))));
        }
        refuses_for_then_closes(&g, &clock, 50).await;
    }

    #[tokio::test]
    async fn an_abandoned_probe_does_not_keep_the_circuit_open() {
        // Cool-down 10 ms; probe timeout 20 ms + 100 ms.
        let (g, clock) = guard(10, Duration::from_millis(20), 1, Duration::from_millis(10));
        assert!(g.call(async { fail() }).await.is_err());
        clock.advance(15);
        // The probe's caller goes away: the future is dropped before it finishes.
        let probe = g.call(std::future::pending::<redis::RedisResult<()>>());
        assert!(probe.now_or_never().is_none());
        // Another probe only once the first one has been out longer than the probe timeout.
        refuses_for_then_closes(&g, &clock, 121).await;
    }

    #[tokio::test]
    async fn a_failed_probe_and_only_that_runs_the_stuck_hook() {
        let (g, clock) = guard(10, Duration::from_secs(1), 2, Duration::from_millis(50));
        let runs = Arc::new(AtomicU32::new(0));
        let counter = runs.clone();
        let g = g.on_stuck(Arc::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        for _ in 0..2 {
            assert!(g.call(async { fail() }).await.is_err());
        }
        assert_eq!(
            runs.load(Ordering::SeqCst),
            0,
            "opening on consecutive failures is not stuck yet"
        );
        clock.advance(50);
        assert!(g.call(async { fail() }).await.is_err(), "the probe fails");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "a failure outlasting a cool-down");
        refuses_for_then_closes(&g, &clock, 50).await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_failed_probe_opens_the_circuit_again() {
        let (g, clock) = guard(10, Duration::from_secs(1), 2, Duration::from_millis(50));
        for _ in 0..2 {
            assert!(g.call(async { fail() }).await.is_err());
        }
        clock.advance(50);
        assert!(
            matches!(g.call(async { fail() }).await, Err(Error::RedisConnection(_))),
            "the probe is called"
        );
        refuses_for_then_closes(&g, &clock, 50).await;
    }

    #[test]
    fn a_clock_stepped_back_does_not_stretch_the_cool_down() {
        let clock = Clock::manual(1_000_000);
        let b = Breaker::new(1, Duration::from_millis(50), Duration::from_millis(100), clock.clone());
        b.failure();
        assert!(matches!(b.allow(), Err(Error::CircuitOpen)));
        clock.advance(-60_000);
        assert!(b.allow().is_ok(), "the cool-down ends: a probe goes out");
        clock.advance(-60_000);
        assert!(b.allow().is_ok(), "a probe started in the future counts as abandoned");
    }

    #[tokio::test]
    async fn timeouts_and_shedding() {
        let (g, _clock) = guard(1, Duration::from_millis(20), 100, Duration::from_secs(1));
        let slow = g.call(async {
            tokio::time::sleep(Duration::from_secs(5)).await;
            Ok(())
        });
        let fast = async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            g.call(async { Ok(()) }).await
        };
        let (slow, fast) = tokio::join!(slow, fast);
        assert!(matches!(slow, Err(Error::RedisTimeout)));
        assert!(matches!(fast, Err(Error::Shed)), "one permit, in use");
    }
}
