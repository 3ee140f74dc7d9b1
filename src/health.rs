//! Readiness from cached health: a background check pings the engine and the store twice a
//! second, each bounded by [`PROBE_TIMEOUT`], and `GET /readyz` answers from the last result
//! at once. A health check of a load balancer (Kubernetes' default timeout is 1 s) never
//! waits on a database that hangs: it learns within about a second that it is down. The
//! Redis ping runs outside the circuit breaker and the in-flight cap, so the check never
//! takes a shopper's permit or an open circuit's probe.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::engine::Engine;
use crate::shutdown::stopped;
use crate::store::Store;

/// How long one ping may take before its side counts as down.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(800);
/// How often the check runs.
pub const EVERY: Duration = Duration::from_millis(500);

/// The last check: each side's result (`Err`: why it is down) and when it was made.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub engine: Result<(), String>,
    pub store: Result<(), String>,
    pub at: Option<Instant>,
}

pub struct Health {
    last: Mutex<Snapshot>,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            last: Mutex::new(Snapshot {
                engine: Err("not checked yet".into()),
                store: Err("not checked yet".into()),
                at: None,
            }),
        }
    }
}

async fn probe(ping: impl Future<Output = Result<(), crate::error::Error>>) -> Result<(), String> {
    match tokio::time::timeout(PROBE_TIMEOUT, ping).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

impl Health {
    /// The last check.
    pub fn snapshot(&self) -> Snapshot {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Ping both sides (at once) and keep the result.
    pub async fn check(&self, engine: &Engine, store: &Store) {
        let (engine, store) = tokio::join!(probe(engine.health_ping()), probe(store.ping()));
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Snapshot {
            engine,
            store,
            at: Some(Instant::now()),
        };
    }

    /// Check every [`EVERY`] until shutdown.
    pub async fn keep_checking(&self, engine: &Engine, store: &Store, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.check(engine, store).await,
                _ = stopped(&mut shutdown) => return,
            }
        }
    }
}
