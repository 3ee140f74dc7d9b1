//! Every stock engine the tests and benches build, built here and only here:
//! [`redis_engine`] and [`embedded_engine`] (plus [`journaled_engine`], the
//! embedded engine with its SQLite journal), from one test-side
//! [`EngineSettings`]. When the engines' own settings change, these functions
//! change, and no test.

use std::sync::Arc;
use std::time::Duration;

use seckill_gateway::clock::Clock;
use seckill_gateway::config::RedisMode;
use seckill_gateway::engine::embedded::{EmbeddedEngine, Journal};
use seckill_gateway::engine::journal::SqliteJournal;
use seckill_gateway::engine::redis::{RedisEngine, RedisSettings};
use seckill_gateway::store::Store;

use super::{RedisCluster, RedisServer};

/// What a test or bench sets on an engine. [`EngineSettings::TEST`] (also the
/// [`Default`]): a 60 s payment timeout, keys kept 10 min, closed orders 1 h, a
/// generous Redis guard; a test changes what it needs with
/// `EngineSettings { idempotency_ttl: …, ..EngineSettings::TEST }`.
#[derive(Clone, Copy, Debug)]
pub struct EngineSettings {
    pub payment_timeout: Duration,
    /// How long idempotency keys are remembered.
    pub idempotency_ttl: Duration,
    /// How long a closed order stays in the engine (Redis: the hash's TTL; the
    /// embedded engine: until it prunes).
    pub closed_order_ttl: Duration,
    /// Redis only: the timeout of one call.
    pub redis_timeout: Duration,
    /// Redis only: calls in flight before more are shed.
    pub max_inflight: usize,
    /// Redis only: failures in a row that open the circuit.
    pub circuit_failures: u32,
    /// Redis only: how long an open circuit waits before a probe.
    pub circuit_cooldown: Duration,
}

impl EngineSettings {
    pub const TEST: EngineSettings = EngineSettings {
        payment_timeout: Duration::from_secs(60),
        idempotency_ttl: Duration::from_secs(600),
        closed_order_ttl: Duration::from_secs(3_600),
        redis_timeout: Duration::from_secs(5),
        max_inflight: 256,
        circuit_failures: 1_000,
        circuit_cooldown: Duration::from_millis(100),
    };
}

impl EngineSettings {
    /// The engines' own settings (the Redis connection's are passed apart).
    fn engine(&self) -> seckill_gateway::engine::EngineSettings {
        seckill_gateway::engine::EngineSettings {
            payment_timeout: self.payment_timeout,
            idempotency_ttl: self.idempotency_ttl,
            closed_order_ttl: self.closed_order_ttl,
        }
    }
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings::TEST
    }
}

/// The Redis engine (the Lua scripts) on the server at `url`; it connects lazily.
pub fn redis_engine(url: &str, clock: &Clock, s: &EngineSettings) -> RedisEngine {
    engine_in_mode(url, RedisMode::Standalone, clock, s)
}

/// The Redis engine on a Redis Cluster (`seeds`: comma-separated node URLs).
pub fn cluster_engine(seeds: &str, clock: &Clock, s: &EngineSettings) -> RedisEngine {
    engine_in_mode(seeds, RedisMode::Cluster, clock, s)
}

/// The Redis engine on a Redis Cluster of 3 masters of its own (keep the cluster as long
/// as the engine).
pub async fn redis_engine_on_own_cluster(clock: &Clock, s: &EngineSettings) -> (RedisEngine, RedisCluster) {
    let cluster = RedisCluster::start(3, 0).await;
    let engine = cluster_engine(&cluster.seeds(), clock, s);
    (engine, cluster)
}

fn engine_in_mode(url: &str, mode: RedisMode, clock: &Clock, s: &EngineSettings) -> RedisEngine {
    RedisEngine::new(
        RedisSettings {
            url: url.to_owned(),
            mode,
            wait_replicas: 0,
            timeout: s.redis_timeout,
            max_inflight: s.max_inflight,
            circuit_failures: s.circuit_failures,
            circuit_cooldown: s.circuit_cooldown,
        },
        s.engine(),
        clock.clone(),
    )
    .expect("redis engine")
}

/// The in-process engine, with `journal` or none (nothing durable).
pub fn embedded_engine(clock: &Clock, s: &EngineSettings, journal: Option<Box<dyn Journal>>) -> EmbeddedEngine {
    EmbeddedEngine::new(s.engine(), clock.clone(), journal)
}

/// The Redis engine on a throwaway `redis-server` of its own (keep the server
/// as long as the engine).
pub fn redis_engine_on_own_server(clock: &Clock, s: &EngineSettings) -> (RedisEngine, RedisServer) {
    let server = RedisServer::start();
    let engine = redis_engine(&server.url(), clock, s);
    (engine, server)
}

/// The embedded engine with its SQLite journal: every change committed before
/// the reply, to `store` (a fresh database in `dir`).
pub struct Journaled {
    pub engine: EmbeddedEngine,
    pub store: Arc<Store>,
    pub dir: tempfile::TempDir,
}

pub async fn journaled_engine(clock: &Clock, s: &EngineSettings) -> Journaled {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("sqlite://{}", dir.path().join("journal.db").display());
    let store = Arc::new(
        Store::connect(&url, Duration::from_secs(5))
            .await
            .expect("sqlite store"),
    );
    let journal = SqliteJournal::start(store.clone(), clock.clone());
    let engine = embedded_engine(clock, s, Some(Box::new(journal)));
    Journaled { engine, store, dir }
}
