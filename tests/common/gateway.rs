//! The one in-process gateway launcher: a whole gateway
//! (`seckill_gateway::server::start`) on `127.0.0.1:0` against a test's own
//! `redis-server` (mini-redis `tests/server.rs`), with its own SQLite order
//! store unless a test names a database.
//!
//! Every flag that has an environment fallback is passed explicitly, so a
//! `REDIS_URL` or `SECKILL_*` variable of the machine never leaks into a test.

use std::ops::Deref;
use std::time::Duration;

use seckill_gateway::clock::Clock;
use seckill_gateway::config::Config;
use seckill_gateway::server::Running;

use super::http::{ADMIN_TOKEN, Api};
use super::inspect::Redis;
use super::{RedisCluster, RedisServer, unique};

/// `seckill_circuit_open` is one gauge for the whole process while every
/// gateway's breaker sets it (a new gateway sets it to 0). Every start takes
/// this lock, and a test that reads the gauge holds it, so that no gateway
/// starts in between.
pub static GAUGE_LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The flags a test gateway starts with; a test overrides any of them with
/// [`Builder::flag`] or drops one with [`Builder::without`].
fn default_flags(redis_url: &str, db_url: &str) -> Vec<(String, String)> {
    [
        ("--listen", "127.0.0.1:0"),
        ("--redis-url", redis_url),
        ("--redis-mode", "standalone"),
        ("--redis-wait-replicas", "0"),
        ("--database-url", db_url),
        ("--admin-token", ADMIN_TOKEN),
        ("--rate-global", "0"),
        ("--rate-per-user", "0"),
        ("--rate-per-ip", "0"),
        ("--trust-forwarded", "false"),
        ("--payment-timeout", "15m"),
        ("--demo", "false"),
        ("--log-format", "text"),
        ("--redis-timeout", "1s"),
        ("--store-timeout", "5s"),
        ("--max-inflight", "2048"),
        ("--circuit-failures", "20"),
        ("--circuit-cooldown", "2s"),
        ("--max-connections", "20000"),
        ("--header-timeout", "5s"),
        ("--idempotency-ttl", "24h"),
        ("--closed-order-ttl", "24h"),
        ("--sold-out-ttl", "5s"),
        ("--item-cache-ttl", "30s"),
        ("--workers", "true"),
        ("--persist-batch", "1000"),
        ("--persist-wait", "20ms"),
        ("--claim-idle", "30s"),
        ("--max-deliveries", "5"),
        ("--sweep-interval", "500ms"),
        ("--shutdown-grace", "10s"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

pub struct Builder {
    flags: Vec<(String, String)>,
    clock: Clock,
    serve_http: bool,
    dir: tempfile::TempDir,
}

impl Builder {
    /// Set (or replace) a flag, e.g. `.flag("--rate-per-user", "1")`.
    pub fn flag(mut self, name: &str, value: &str) -> Self {
        self.flags.retain(|(k, _)| k != name);
        self.flags.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Leave a flag out (then its environment fallback or default applies).
    pub fn without(mut self, name: &str) -> Self {
        self.flags.retain(|(k, _)| k != name);
        self
    }

    /// The order store (default: a SQLite file of the gateway's own).
    pub fn database(self, url: &str) -> Self {
        self.flag("--database-url", url)
    }

    /// The clock the gateway runs on (default: the system clock).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    /// Only the workers, no HTTP front door (the `worker` subcommand).
    pub fn worker_only(mut self) -> Self {
        self.serve_http = false;
        self
    }

    /// The configuration these flags make (a consumer name of its own unless given).
    pub fn config(&self) -> Config {
        let mut args = vec!["seckill-gateway".to_owned()];
        let mut consumer = false;
        for (k, v) in &self.flags {
            consumer |= k == "--consumer-name";
            args.push(k.clone());
            args.push(v.clone());
        }
        if !consumer {
            args.push("--consumer-name".into());
            args.push(unique("consumer"));
        }
        Config::from_args(&args).expect("test gateway flags parse")
    }

    pub async fn start(self) -> Gateway {
        let config = self.config();
        let running = {
            let _gauge = GAUGE_LOCK.lock().await;
            seckill_gateway::server::start(config, self.clock, self.serve_http)
                .await
                .expect("test gateway starts")
        };
        let api = Api::with_clock(running.url(), running.app.clock.clone());
        Gateway {
            running: Some(running),
            api,
            _dir: self.dir,
        }
    }
}

/// A running in-process gateway; its HTTP routes through [`Api`] (`Deref`).
pub struct Gateway {
    pub running: Option<Running>,
    pub api: Api,
    _dir: tempfile::TempDir,
}

impl Deref for Gateway {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Gateway {
    /// The default test flags against `redis_url`, the system clock, a SQLite store.
    pub fn builder(redis_url: &str) -> Builder {
        let dir = tempfile::Builder::new()
            .prefix("seckill-gw-")
            .tempdir()
            .expect("temporary directory for the SQLite store");
        let db = format!("sqlite://{}/orders.db", dir.path().display());
        Builder {
            flags: default_flags(redis_url, &db),
            clock: Clock::system(),
            serve_http: true,
            dir,
        }
    }

    /// The default test flags without `--redis-url`: an embedded-mode gateway with a SQLite
    /// store of its own.
    pub fn embedded() -> Builder {
        let b = Self::builder("redis://unused").without("--redis-url");
        assert!(
            b.config().redis_url.is_none(),
            "REDIS_URL in the environment would start Redis mode"
        );
        b
    }

    /// A gateway with the default test flags and the system clock.
    pub async fn start(redis_url: &str) -> Gateway {
        Self::builder(redis_url).start().await
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("gateway running")
    }

    /// The gateway's clock: the system clock corrected to Redis TIME, or the
    /// manual clock of the test.
    pub fn clock(&self) -> &Clock {
        &self.running().app.clock
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    /// Stop, but wait at most `within`: with Redis gone its workers retry until
    /// told to stop, and the test is over anyway.
    pub async fn stop_within(&mut self, within: Duration) {
        if let Some(r) = self.running.take() {
            let _ = tokio::time::timeout(within, r.stop()).await;
        }
    }
}

/// Where a test's gateways keep their stock: one `redis-server`, or a Redis Cluster of 3
/// masters (the gateways then run with `--redis-mode cluster`).
pub enum Backend {
    Server,
    Cluster,
}

/// A started [`Backend`]: kept as long as the test's gateways.
pub enum RedisBackend {
    Server(RedisServer),
    Cluster(RedisCluster),
}

impl RedisBackend {
    pub async fn start(kind: Backend) -> RedisBackend {
        match kind {
            Backend::Server => RedisBackend::Server(RedisServer::start()),
            Backend::Cluster => RedisBackend::Cluster(RedisCluster::start(3, 0).await),
        }
    }

    /// A gateway builder on this backend (mode and URL set).
    pub fn builder(&self) -> Builder {
        match self {
            RedisBackend::Server(s) => Gateway::builder(&s.url()),
            RedisBackend::Cluster(c) => Gateway::builder(&c.seeds()).flag("--redis-mode", "cluster"),
        }
    }

    /// A direct look at the keys, whichever node holds them.
    pub async fn inspect(&self) -> Redis {
        match self {
            RedisBackend::Server(s) => Redis::connect(s).await,
            RedisBackend::Cluster(c) => Redis::connect_cluster(&c.seeds()),
        }
    }
}

/// [`on_redis`] on either backend.
pub async fn on_backend(kind: Backend, configure: impl FnOnce(Builder) -> Builder) -> (RedisBackend, Redis, Gateway) {
    let backend = RedisBackend::start(kind).await;
    let rd = backend.inspect().await;
    let gw = configure(backend.builder()).start().await;
    (backend, rd, gw)
}

/// The set-up of most HTTP tests: a `redis-server` of the test's own, a direct
/// look at it, and a gateway on it with the default flags as `configure` changes
/// them (`|b| b` for none).
pub async fn on_redis(configure: impl FnOnce(Builder) -> Builder) -> (RedisServer, Redis, Gateway) {
    let redis = RedisServer::start();
    let rd = Redis::connect(&redis).await;
    let gw = configure(Gateway::builder(&redis.url())).start().await;
    (redis, rd, gw)
}
