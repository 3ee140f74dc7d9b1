//! Configuration: one struct, flags with environment fallbacks (`--help` lists them all),
//! documented defaults, and [`Config::validate`], which fails at start-up naming the field.
//! A TOML file (`--config`, [`file`]) may hold any setting under its environment name; a
//! flag or an environment variable wins over it.

pub mod file;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "seckill-gateway",
    version,
    about = "Flash-sale gateway: sells exactly the stock, loses no order."
)]
pub struct Cli {
    /// Every setting is a global flag: it may come before or after the subcommand
    /// (`seckill-gateway --listen … serve` and `seckill-gateway serve --listen …`), and the
    /// subcommands' `--help` lists them.
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP (the default), with the persistence worker and sweeper unless disabled.
    Serve,
    /// Run only the persistence worker and the deadline sweeper, no HTTP front door.
    Worker,
    /// Compare Redis with the database per item; exit 1 on any difference.
    Reconcile {
        /// Only this item.
        #[arg(long)]
        item: Option<String>,
        /// Re-emit the events of orders missing or behind in the database.
        #[arg(long)]
        repair: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// How `REDIS_URL` is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RedisMode {
    /// One Redis server (with or without replicas behind it).
    Standalone,
    /// A Redis Cluster: `REDIS_URL` is a comma-separated list of seed nodes.
    Cluster,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// TOML file of settings under their environment names (`SECKILL_RATE_GLOBAL = 500`);
    /// a flag or environment variable wins over it. SIGHUP reloads it: the rate limits and
    /// SECKILL_LOG change at once, other changes are logged as needing a restart.
    #[arg(long = "config", global = true, env = "SECKILL_CONFIG", value_name = "FILE")]
    pub config_file: Option<PathBuf>,

    /// Address the HTTP front door listens on.
    #[arg(long, global = true, env = "SECKILL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Redis URL. Unset: the embedded in-process stock engine.
    #[arg(long, global = true, env = "REDIS_URL")]
    pub redis_url: Option<String>,

    /// `standalone`, or `cluster` (then `REDIS_URL` is a comma-separated list of seed nodes,
    /// `redis://127.0.0.1:7000,redis://127.0.0.1:7001,…`).
    #[arg(
        long,
        global = true,
        env = "SECKILL_REDIS_MODE",
        value_enum,
        default_value = "standalone"
    )]
    pub redis_mode: RedisMode,

    /// After a stock-changing script, `WAIT` for this many replicas of that primary before
    /// answering 200 (0: answer when the primary has it).
    #[arg(long, global = true, env = "SECKILL_REDIS_WAIT_REPLICAS", default_value_t = 0)]
    pub redis_wait_replicas: u32,

    /// Order store: `postgres://…` or `sqlite://…`.
    #[arg(long, global = true, env = "DATABASE_URL", default_value = "sqlite://seckill.db")]
    pub database_url: String,

    /// Bearer token of the operator routes; unset: the admin API answers 403.
    #[arg(long, global = true, env = "SECKILL_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// HMAC-SHA256 secret of the payment provider's callbacks (`POST /webhooks/payments`).
    /// Set: only the provider pays (the shopper's `…/pay` answers 403); unset: callbacks
    /// are refused and shoppers pay with a bare `POST` (demo, load tests).
    #[arg(long, global = true, env = "SECKILL_PAYMENT_SECRET", hide_env_values = true)]
    pub payment_secret: Option<String>,

    /// HS256 secret of shopper JWTs (`sub` = user id). Unset: trust `X-User-Id`.
    #[arg(long, global = true, env = "SECKILL_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// Requests per second for the whole deployment, shared by the live instances (with
    /// Redis each takes `ceil(rate / instances)`); 0: no global limit. Live: SIGHUP,
    /// `PUT /admin/v1/limits`.
    #[arg(long, global = true, env = "SECKILL_RATE_GLOBAL", default_value_t = 0)]
    pub rate_global: u32,

    /// Requests per second per user; the burst is the same number (0: off). Live: SIGHUP,
    /// `PUT /admin/v1/limits`.
    #[arg(long, global = true, env = "SECKILL_RATE_PER_USER", default_value_t = 10)]
    pub rate_per_user: u32,

    /// Requests per second per client IP (0: off). Live: SIGHUP, `PUT /admin/v1/limits`.
    #[arg(long, global = true, env = "SECKILL_RATE_PER_IP", default_value_t = 1000)]
    pub rate_per_ip: u32,

    /// Take the client IP from `X-Forwarded-For` (only behind a trusted proxy).
    #[arg(long, global = true, env = "SECKILL_TRUST_FORWARDED", default_value_t = false, action = clap::ArgAction::Set)]
    pub trust_forwarded: bool,

    /// How long a reservation waits for payment before its stock returns.
    #[arg(long, global = true, env = "SECKILL_PAYMENT_TIMEOUT", default_value = "15m", value_parser = humantime::parse_duration)]
    pub payment_timeout: Duration,

    /// Preload a demo item (default: on in embedded mode, off with Redis).
    #[arg(long, global = true, env = "SECKILL_DEMO", action = clap::ArgAction::Set)]
    pub demo: Option<bool>,

    /// Log format.
    #[arg(long, global = true, env = "SECKILL_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Log filter, RUST_LOG syntax (`info`, `warn,seckill_gateway::orders=debug`); reloaded
    /// on SIGHUP. Unset: RUST_LOG, else `info`.
    #[arg(long, global = true, env = "SECKILL_LOG", value_name = "FILTER")]
    pub log: Option<String>,

    /// Share of sale traffic (shopper and plain routes) given an access log line at info,
    /// 0–1. Admin and webhook requests, requests whose `traceparent` is sampled, and 5xx
    /// answers always get one. `SECKILL_LOG=info,access=off` turns the lines off.
    #[arg(long, global = true, env = "SECKILL_ACCESS_LOG_SAMPLE", default_value_t = 0.01)]
    pub access_log_sample: f64,

    /// OTLP/HTTP collector (e.g. `http://127.0.0.1:4318`): traced requests' spans are
    /// exported to `<endpoint>/v1/traces`. Unset: nothing is exported (W3C `traceparent` is
    /// honoured either way).
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otel_endpoint: Option<String>,

    /// Timeout of every Redis command (connect and response).
    #[arg(long, global = true, env = "SECKILL_REDIS_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// Timeout of every store (database) call.
    #[arg(long, global = true, env = "SECKILL_STORE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub store_timeout: Duration,

    /// Redis calls in flight, and reservations queued or in a call, before new ones are shed with 503.
    #[arg(long, global = true, env = "SECKILL_MAX_INFLIGHT", default_value_t = 2048)]
    pub max_inflight: usize,

    /// Consecutive Redis failures that open the circuit.
    #[arg(long, global = true, env = "SECKILL_CIRCUIT_FAILURES", default_value_t = 20)]
    pub circuit_failures: u32,

    /// How long an open circuit answers 503 before one probe is let through.
    #[arg(long, global = true, env = "SECKILL_CIRCUIT_COOLDOWN", default_value = "2s", value_parser = humantime::parse_duration)]
    pub circuit_cooldown: Duration,

    /// Concurrent client connections; more are closed at accept.
    #[arg(long, global = true, env = "SECKILL_MAX_CONNECTIONS", default_value_t = 20_000)]
    pub max_connections: usize,

    /// Time a client has to send its request headers.
    #[arg(long, global = true, env = "SECKILL_HEADER_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub header_timeout: Duration,

    /// How long an idempotency key is remembered.
    #[arg(long, global = true, env = "SECKILL_IDEMPOTENCY_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub idempotency_ttl: Duration,

    /// How long a closed (paid, cancelled, expired) order stays in Redis for lookups.
    #[arg(long, global = true, env = "SECKILL_CLOSED_ORDER_TTL", default_value = "24h", value_parser = humantime::parse_duration)]
    pub closed_order_ttl: Duration,

    /// Safety-net lifetime of a local sold-out flag (pub/sub clears it at once normally).
    #[arg(long, global = true, env = "SECKILL_SOLD_OUT_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub sold_out_ttl: Duration,

    /// Lifetime of cached item metadata (changes are also pushed by pub/sub).
    #[arg(long, global = true, env = "SECKILL_ITEM_CACHE_TTL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub item_cache_ttl: Duration,

    /// Run the persistence worker and deadline sweeper inside `serve`.
    #[arg(long, global = true, env = "SECKILL_WORKERS", default_value_t = true, action = clap::ArgAction::Set)]
    pub workers: bool,

    /// Events per persistence batch.
    #[arg(long, global = true, env = "SECKILL_PERSIST_BATCH", default_value_t = 1000)]
    pub persist_batch: usize,

    /// After a persistence read that did not fill a batch, how long the next one may fill
    /// (fewer, larger reads for Redis; at most this much more persistence lag).
    #[arg(long, global = true, env = "SECKILL_PERSIST_WAIT", default_value = "20ms", value_parser = humantime::parse_duration)]
    pub persist_wait: Duration,

    /// Pending entries idle longer than this are claimed from dead consumers.
    #[arg(long, global = true, env = "SECKILL_CLAIM_IDLE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub claim_idle: Duration,

    /// Deliveries before an event goes to the dead-letter stream.
    #[arg(long, global = true, env = "SECKILL_MAX_DELIVERIES", default_value_t = 5)]
    pub max_deliveries: u64,

    /// How often the deadline sweeper looks for expired reservations.
    #[arg(long, global = true, env = "SECKILL_SWEEP_INTERVAL", default_value = "500ms", value_parser = humantime::parse_duration)]
    pub sweep_interval: Duration,

    /// Name of this instance's stream consumer (default: host name and listen port).
    #[arg(long, global = true, env = "SECKILL_CONSUMER_NAME")]
    pub consumer_name: Option<String>,

    /// How long shutdown waits for in-flight requests and the batch in hand.
    #[arg(long, global = true, env = "SECKILL_SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,
}

/// A configuration value that cannot work, named by its field.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {field}: {why}")]
pub struct ConfigError {
    pub field: &'static str,
    pub why: String,
}

impl Config {
    /// Parse flags and environment (for tests and tools: `Config::parse_from([...])`).
    pub fn from_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            config: Config,
        }
        Ok(Only::try_parse_from(args)?.config)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field, why: &str| {
            Err(ConfigError {
                field,
                why: why.to_owned(),
            })
        };
        if let Some(url) = &self.redis_url {
            let urls: Vec<&str> = url.split(',').map(str::trim).collect();
            let scheme_ok =
                |u: &&str| u.starts_with("redis://") || u.starts_with("rediss://") || u.starts_with("unix://");
            if !urls.iter().all(scheme_ok) {
                return bad("REDIS_URL", "must start with redis://, rediss:// or unix://");
            }
            if urls.len() > 1 && self.redis_mode == RedisMode::Standalone {
                return bad(
                    "REDIS_URL",
                    "is a list of nodes: set SECKILL_REDIS_MODE=cluster, or give one URL",
                );
            }
        }
        if !(self.database_url.starts_with("postgres://")
            || self.database_url.starts_with("postgresql://")
            || self.database_url.starts_with("sqlite:"))
        {
            return bad("DATABASE_URL", "must be postgres://… or sqlite://…");
        }
        if matches!(&self.admin_token, Some(t) if t.len() < 8) {
            return bad("SECKILL_ADMIN_TOKEN", "must be at least 8 characters");
        }
        if matches!(&self.payment_secret, Some(s) if s.len() < 16) {
            return bad("SECKILL_PAYMENT_SECRET", "must be at least 16 characters");
        }
        if matches!(&self.jwt_secret, Some(s) if s.len() < 16) {
            return bad("SECKILL_JWT_SECRET", "must be at least 16 bytes");
        }
        if self.payment_timeout < Duration::from_secs(1) {
            return bad("SECKILL_PAYMENT_TIMEOUT", "must be at least 1s");
        }
        if self.redis_timeout.is_zero() {
            return bad("SECKILL_REDIS_TIMEOUT", "must be above zero");
        }
        if self.max_inflight == 0 {
            return bad("SECKILL_MAX_INFLIGHT", "must be at least 1");
        }
        if self.max_connections == 0 {
            return bad("SECKILL_MAX_CONNECTIONS", "must be at least 1");
        }
        if self.persist_batch == 0 || self.persist_batch > 10_000 {
            return bad("SECKILL_PERSIST_BATCH", "must be 1..=10000");
        }
        if self.circuit_failures == 0 {
            return bad("SECKILL_CIRCUIT_FAILURES", "must be at least 1");
        }
        if self.max_deliveries == 0 {
            return bad("SECKILL_MAX_DELIVERIES", "must be at least 1");
        }
        if !(0.0..=1.0).contains(&self.access_log_sample) {
            return bad("SECKILL_ACCESS_LOG_SAMPLE", "must be a share from 0 to 1");
        }
        if let Some(url) = &self.otel_endpoint
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return bad("OTEL_EXPORTER_OTLP_ENDPOINT", "must be an http:// or https:// URL");
        }
        if let Some(log) = &self.log
            && let Err(e) = tracing_subscriber::EnvFilter::try_new(log)
        {
            return bad("SECKILL_LOG", &format!("not a log filter: {e}"));
        }
        Ok(())
    }

    /// The log filter in force: `SECKILL_LOG`, else `RUST_LOG`, else `info`.
    pub fn log_filter(&self) -> String {
        self.log
            .clone()
            .or_else(|| std::env::var("RUST_LOG").ok().filter(|v| !v.trim().is_empty()))
            .unwrap_or_else(|| "info".to_owned())
    }

    /// The rate limits these settings configure (shared ones may win: [`crate::limiter`]).
    pub fn limits(&self) -> crate::limiter::Limits {
        crate::limiter::Limits {
            global: self.rate_global,
            per_user: self.rate_per_user,
            per_ip: self.rate_per_ip,
        }
    }

    /// Embedded mode: no Redis configured.
    pub fn embedded(&self) -> bool {
        self.redis_url.is_none()
    }

    /// Whether to preload the demo item: on by default in embedded mode only.
    pub fn demo_enabled(&self) -> bool {
        self.demo.unwrap_or(self.embedded())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_contract() {
        let c = Config::from_args(["x"]).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.database_url, "sqlite://seckill.db");
        assert_eq!(c.payment_timeout, Duration::from_secs(15 * 60));
        assert!(c.embedded());
        assert!(c.demo_enabled());
        c.validate().unwrap();
    }

    #[test]
    fn flags_go_before_or_after_the_subcommand() {
        let listen = |args: &[&str]| Cli::try_parse_from(args).unwrap().config.listen.to_string();
        assert_eq!(listen(&["x", "--listen", "127.0.0.1:0"]), "127.0.0.1:0");
        assert_eq!(listen(&["x", "--listen", "127.0.0.1:0", "serve"]), "127.0.0.1:0");
        assert_eq!(listen(&["x", "serve", "--listen", "127.0.0.1:0"]), "127.0.0.1:0");
        assert_eq!(listen(&["x", "worker", "--listen", "127.0.0.1:0"]), "127.0.0.1:0");
        // A flag not given after the subcommand keeps its default.
        assert_eq!(listen(&["x", "serve"]), "127.0.0.1:8080");
        let cli = Cli::try_parse_from([
            "x",
            "reconcile",
            "--item",
            "a",
            "--redis-url",
            "redis://h/",
            "--payment-timeout",
            "2m",
        ])
        .unwrap();
        assert!(matches!(cli.command, Some(Command::Reconcile { item: Some(ref i), repair: false }) if i == "a"));
        assert_eq!(cli.config.redis_url.as_deref(), Some("redis://h/"));
        assert_eq!(cli.config.payment_timeout, Duration::from_secs(120));
    }

    #[test]
    fn validate_names_the_field() {
        let c = Config::from_args(["x", "--database-url", "mysql://x"]).unwrap();
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "DATABASE_URL");
        let c = Config::from_args(["x", "--payment-timeout", "10ms"]).unwrap();
        assert_eq!(c.validate().unwrap_err().field, "SECKILL_PAYMENT_TIMEOUT");
        assert!(Config::from_args(["x", "--payment-timeout", "soon"]).is_err());
    }
}
