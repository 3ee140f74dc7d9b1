//! Protection around every Redis call: a timeout, a cap on calls in flight (shed with 503
//! rather than queue without bound), and a circuit breaker (after repeated failures answer
//! 503 at once for a cool-down, then let one probe through).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::error::Error;
use crate::metrics;

pub struct Guard {
    /// Permits for calls in flight; `try_acquire`, never wait: waiting is the unbounded queue
    /// this exists to prevent.
    inflight: Semaphore,
    breaker: Breaker,
    timeout: Duration,
}

impl Guard {
    pub fn new(max_inflight: usize, timeout: Duration, failures: u32, cooldown: Duration) -> Self {
        Guard {
            inflight: Semaphore::new(max_inflight),
            // A real probe ends within `timeout`; one silent for longer was abandoned.
            breaker: Breaker::new(failures, cooldown, timeout + Duration::from_millis(100)),
            timeout,
        }
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
                self.breaker.failure();
                Err(Error::RedisTimeout)
            }
            Ok(Err(e)) => {
                let e = Error::from(e);
                if matches!(e, Error::RedisTimeout | Error::RedisConnection(_)) {
                    self.breaker.failure();
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

/// A consecutive-failure circuit breaker on a monotonic clock.
struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the circuit is open; 0 = closed.
    open_until: AtomicI64,
    /// A probe is out while the cool-down is over but no call has succeeded yet.
    probing: AtomicBool,
    /// When the probe went out (ms since `epoch`). A probe whose caller went away (the
    /// client hung up and hyper dropped the handler) never reports back; after
    /// `probe_timeout` another caller may probe instead, so the circuit cannot stay stuck.
    probe_started: AtomicI64,
    probe_timeout: Duration,
    threshold: u32,
    cooldown: Duration,
    epoch: Instant,
}

impl Breaker {
    fn new(threshold: u32, cooldown: Duration, probe_timeout: Duration) -> Self {
        metrics::gauge_circuit(false);
        Breaker {
            failures: AtomicU32::new(0),
            open_until: AtomicI64::new(0),
            probing: AtomicBool::new(false),
            probe_started: AtomicI64::new(0),
            probe_timeout,
            threshold,
            cooldown,
            epoch: Instant::now(),
        }
    }

    fn now(&self) -> i64 {
        self.epoch.elapsed().as_millis() as i64
    }

    fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
    }

    fn allow(&self) -> Result<(), Error> {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return Ok(());
        }
        if self.now() < until {
            return Err(Error::CircuitOpen);
        }
        // Cool-down over: exactly one caller probes at a time.
        let now = self.now();
        if self
            .probing
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.probe_started.store(now, Ordering::Release);
            return Ok(());
        }
        let started = self.probe_started.load(Ordering::Acquire);
        let abandoned = now - started > self.probe_timeout.as_millis() as i64;
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
            metrics::gauge_circuit(false);
            tracing::info!("redis circuit closed");
        }
    }

    fn failure(&self) {
        let open = |why: &str| {
            self.open_until
                .store(self.now() + self.cooldown.as_millis() as i64, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            metrics::gauge_circuit(true);
            tracing::warn!(
                cooldown_ms = self.cooldown.as_millis() as u64,
                why,
                "redis circuit open"
            );
        };
        if self.probing.load(Ordering::Acquire) {
            open("probe failed");
            return;
        }
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if n >= self.threshold && !self.is_open() {
            open("consecutive failures");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail() -> redis::RedisResult<()> {
        Err(redis::RedisError::from(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "down",
        )))
    }

    #[tokio::test]
    async fn breaker_opens_then_probes() {
        let g = Guard::new(10, Duration::from_secs(1), 3, Duration::from_millis(50));
        for _ in 0..3 {
            assert!(matches!(g.call(async { fail() }).await, Err(Error::RedisConnection(_))));
        }
        assert!(g.circuit_open());
        assert!(
            matches!(g.call(async { Ok(()) }).await, Err(Error::CircuitOpen)),
            "open: not called"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(g.call(async { Ok(()) }).await.is_ok(), "the probe goes through");
        assert!(!g.circuit_open());
    }

    #[tokio::test]
    async fn an_abandoned_probe_does_not_keep_the_circuit_open() {
        let g = Guard::new(10, Duration::from_millis(20), 1, Duration::from_millis(10));
        assert!(g.call(async { fail() }).await.is_err());
        tokio::time::sleep(Duration::from_millis(15)).await;
        // The probe's caller goes away: the future is dropped before it finishes.
        let probe = g.call(std::future::pending::<redis::RedisResult<()>>());
        assert!(tokio::time::timeout(Duration::from_millis(5), probe).await.is_err());
        assert!(
            matches!(g.call(async { Ok(()) }).await, Err(Error::CircuitOpen)),
            "probe still out"
        );
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            g.call(async { Ok(()) }).await.is_ok(),
            "a new probe after the old one was abandoned"
        );
        assert!(!g.circuit_open());
    }

    #[tokio::test]
    async fn timeouts_and_shedding() {
        let g = Guard::new(1, Duration::from_millis(20), 100, Duration::from_secs(1));
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
