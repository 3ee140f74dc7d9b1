//! The gateway's shared state, built once at start-up, and the background tasks that keep
//! it fresh: the pub/sub listener (Bloom additions, sold-out clears on every instance), the
//! limiter pruner, and the clock sync with Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::cache::LocalCache;
use crate::clock::Clock;
use crate::config::Config;
use crate::engine::embedded::EmbeddedEngine;
use crate::engine::redis::{RedisEngine, RedisSettings};
use crate::engine::{Engine, StockEngine, keys};
use crate::error::Error;
use crate::filter::ItemFilter;
use crate::identity::Identity;
use crate::limiter::Limiter;
use crate::metrics;
use crate::orders::store::Store;

/// Resolve once `shutdown` turns true (or its sender is gone). The guard `wait_for` returns
/// is dropped here, so callers' futures stay `Send`.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

pub struct App {
    pub config: Config,
    pub engine: Engine,
    pub store: Arc<Store>,
    pub identity: Identity,
    pub limiter: Limiter,
    pub filter: ItemFilter,
    pub cache: LocalCache,
    pub metrics: PrometheusHandle,
    pub clock: Clock,
    /// Last store health seen by `/readyz` or the worker (for the readiness body).
    pub store_up: AtomicBool,
    /// Request ids: an instance prefix and a counter (unique, cheap, sortable per instance).
    request_prefix: String,
    request_seq: AtomicU64,
}

impl App {
    /// Build everything from the configuration. `clock` is `Clock::system()` except in tests.
    pub async fn build(config: Config, clock: Clock) -> anyhow::Result<Arc<App>> {
        config.validate()?;
        let metrics = metrics::install();
        let store = Arc::new(Store::connect(&config.database_url, config.store_timeout).await?);
        let engine = match &config.redis_url {
            Some(url) => Engine::Redis(RedisEngine::new(
                RedisSettings {
                    url: url.clone(),
                    timeout: config.redis_timeout,
                    max_inflight: config.max_inflight,
                    circuit_failures: config.circuit_failures,
                    circuit_cooldown: config.circuit_cooldown,
                    payment_timeout: config.payment_timeout,
                    idempotency_ttl: config.idempotency_ttl,
                    closed_order_ttl: config.closed_order_ttl,
                },
                clock.clone(),
            )?),
            None => {
                let journal = crate::orders::journal::SqliteJournal::start(store.clone(), clock.clone());
                let engine = EmbeddedEngine::new(
                    clock.clone(),
                    config.payment_timeout,
                    config.idempotency_ttl,
                    Some(Box::new(journal)),
                )
                .with_closed_ttl(config.closed_order_ttl);
                engine.restore(store.items().await?, store.orders(None).await?);
                Engine::Embedded(engine)
            }
        };
        if let Engine::Redis(r) = &engine
            && !clock.is_manual()
            && let Err(e) = r.sync_clock().await
        {
            tracing::warn!(cause = %e, "could not read Redis TIME; local window checks use this host's clock");
        }
        // The Bloom filter starts from the catalogue; an unreachable Redis leaves it empty
        // until the pub/sub listener connects and reloads it.
        let catalog = match engine.catalog().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(cause = %e, "catalogue not loaded at start-up; will retry");
                Vec::new()
            }
        };
        if config.jwt_secret.is_none() {
            tracing::warn!("SECKILL_JWT_SECRET unset: trusting the X-User-Id header (run behind a proxy that sets it)");
        }
        let app = App {
            identity: Identity::new(config.jwt_secret.as_deref()),
            limiter: Limiter::new(config.rate_global, config.rate_per_user, config.rate_per_ip),
            filter: ItemFilter::new(catalog),
            cache: LocalCache::new(config.item_cache_ttl, config.sold_out_ttl),
            request_prefix: format!("{:08x}", rand::random::<u32>()),
            request_seq: AtomicU64::new(0),
            store_up: AtomicBool::new(true),
            config,
            engine,
            store,
            metrics,
            clock,
        };
        metrics::gauge!(metrics::STORE_UP).set(1.0);
        Ok(Arc::new(app))
    }

    pub fn next_request_id(&self) -> String {
        format!(
            "{}-{}",
            self.request_prefix,
            self.request_seq.fetch_add(1, Ordering::Relaxed)
        )
    }

    /// An item changed here or on another instance: make every local answer about it fresh.
    pub fn item_changed(&self, item_id: &str) {
        self.filter.add(item_id);
        self.cache.invalidate(item_id);
    }

    pub fn set_store_up(&self, up: bool) {
        if self.store_up.swap(up, Ordering::Relaxed) != up {
            metrics::gauge!(metrics::STORE_UP).set(if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!("order store reachable again");
            } else {
                tracing::warn!("order store unreachable");
            }
        }
    }

    /// Start the background tasks; they end when `shutdown` turns true.
    pub fn spawn_background(self: &Arc<Self>, shutdown: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
        let mut tasks = Vec::new();
        let app = self.clone();
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => app.limiter.prune(),
                    _ = stopped(&mut stop) => break,
                }
            }
        }));
        if let Engine::Redis(_) = &self.engine {
            let app = self.clone();
            tasks.push(tokio::spawn(subscribe_loop(app, shutdown.clone())));
            let app = self.clone();
            let mut stop = shutdown.clone();
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(10));
                loop {
                    tokio::select! {
                        _ = tick.tick() => {
                            if let Engine::Redis(r) = &app.engine
                                && !app.clock.is_manual() {
                                    let _ = r.sync_clock().await;
                                }
                        }
                        _ = stopped(&mut stop) => break,
                    }
                }
            }));
        }
        tasks
    }
}

/// Listen on the invalidation channel, reconnecting with backoff. After every (re)connect the
/// filter is reloaded from the catalogue and every flag dropped: messages may have been
/// missed while disconnected.
async fn subscribe_loop(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    use backon::BackoffBuilder;
    let Engine::Redis(engine) = &app.engine else {
        return;
    };
    let backoff = || {
        backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .with_jitter()
            .without_max_times()
            .build()
    };
    let mut delays = backoff();
    loop {
        let connected = AtomicBool::new(false);
        let attempt = async {
            let mut pubsub = tokio::time::timeout(app.config.redis_timeout, engine.client().get_async_pubsub())
                .await
                .map_err(|_| Error::RedisTimeout)??;
            tokio::time::timeout(app.config.redis_timeout, pubsub.subscribe(keys::BUS))
                .await
                .map_err(|_| Error::RedisTimeout)??;
            let catalog = engine.catalog().await?;
            app.filter.replace_all(catalog);
            app.cache.invalidate_all();
            connected.store(true, Ordering::Relaxed);
            tracing::debug!(channel = keys::BUS, "subscribed");
            let mut messages = pubsub.on_message();
            while let Some(msg) = messages.next().await {
                let Ok(payload) = msg.get_payload::<String>() else {
                    continue;
                };
                if let Some(item) = payload.strip_prefix("item_changed ") {
                    app.item_changed(item);
                }
            }
            Ok::<(), Error>(())
        };
        tokio::select! {
            r = attempt => match r {
                Ok(()) => tracing::warn!("pub/sub connection closed; reconnecting"),
                Err(e) => tracing::warn!(cause = %e, "pub/sub unavailable; retrying"),
            },
            _ = stopped(&mut shutdown) => return,
        }
        if connected.load(Ordering::Relaxed) {
            delays = backoff();
        }
        let delay = delays.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stopped(&mut shutdown) => return,
        }
    }
}
