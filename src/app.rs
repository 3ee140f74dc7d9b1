//! The gateway's shared state, built once at start-up, and the one place where what an
//! engine says about an item ([`ItemNews`]) becomes local state: the Bloom filter, the
//! cache's flags and the stock gauge ([`LocalView`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::cache::LocalCache;
use crate::clock::Clock;
use crate::config::Config;
use crate::engine::{Engine, ItemNews, LimitsNews, Listener, OrderStatus};
use crate::filter::ItemFilter;
use crate::identity::Identity;
use crate::limiter::Limiter;
use crate::metrics;
use crate::shutdown::stopped;
use crate::store::Store;

/// How often every instance re-reads the stock of the items it publishes gauges for.
pub const STOCK_REFRESH: Duration = Duration::from_secs(1);

pub struct App {
    pub config: Config,
    pub engine: Engine,
    /// The order database (the same one the engine falls back to).
    pub store: Arc<Store>,
    pub identity: Identity,
    /// Shared with the engine's listener, which applies the limits shared by
    /// `PUT /admin/v1/limits` and the live instance count; and with the SIGHUP reloader.
    pub limiter: Arc<Limiter>,
    /// Shared with the engine's listener, which keeps it current.
    pub filter: Arc<ItemFilter>,
    /// Shared with the engine's listener, which keeps it current.
    pub cache: Arc<LocalCache>,
    pub metrics: PrometheusHandle,
    pub clock: Clock,
    /// The engine's and the store's health, checked in the background (`GET /readyz`).
    pub health: crate::health::Health,
    /// How often a request's failure is logged ([`crate::lograte`]).
    pub failure_log: crate::lograte::LogRate,
    /// Which requests are traced and logged, and the span exporter ([`crate::telemetry`]).
    pub telemetry: crate::telemetry::Telemetry,
    /// Request ids: an instance prefix and a counter (unique, cheap, sortable per instance).
    request_prefix: String,
    request_seq: AtomicU64,
}

impl App {
    /// Build everything from the configuration. `clock` is `Clock::system()` except in tests.
    pub async fn build(config: Config, clock: Clock) -> anyhow::Result<Arc<App>> {
        config.validate()?;
        let metrics = metrics::install();
        let telemetry = crate::telemetry::Telemetry::new(config.otel_endpoint.as_deref(), config.access_log_sample)?;
        let store = Arc::new(Store::connect(&config.database_url, config.store_timeout).await?);
        let filter = Arc::new(ItemFilter::new(Vec::new()));
        let cache = Arc::new(LocalCache::new(config.item_cache_ttl, config.sold_out_ttl));
        let limiter = Arc::new(Limiter::new(config.limits()));
        let view = Arc::new(LocalView {
            filter: filter.clone(),
            cache: cache.clone(),
            limiter: limiter.clone(),
        });
        let engine = Engine::from_config(&config, store.clone(), clock.clone(), view).await?;
        // The Bloom filter starts from the catalogue; an unreachable Redis leaves it empty
        // until the change feed connects and reloads it.
        match engine.catalog().await {
            Ok(ids) => filter.replace_all(ids),
            Err(e) => tracing::warn!(cause = %e, "catalogue not loaded at start-up; will retry"),
        }
        // The limits shared by `PUT /admin/v1/limits` win over the configured ones.
        if let Err(e) = engine.load_limits().await {
            tracing::warn!(cause = %e, "shared rate limits not read at start-up; will retry");
        }
        if config.jwt_secret.is_none() {
            tracing::warn!("SECKILL_JWT_SECRET unset: trusting the X-User-Id header (run behind a proxy that sets it)");
        }
        let app = Arc::new(App {
            identity: Identity::new(config.jwt_secret.as_deref()),
            limiter,
            filter,
            cache,
            request_prefix: format!("{:08x}", rand::random::<u32>()),
            request_seq: AtomicU64::new(0),
            config,
            engine,
            store,
            metrics,
            clock,
            health: crate::health::Health::default(),
            failure_log: crate::lograte::LogRate::default(),
            telemetry,
        });
        // Ready answers from the first check on (then every half second: `spawn_background`).
        app.health.check(&app.engine, &app.store).await;
        Ok(app)
    }

    /// Read the stock of every item this instance has a gauge for (the read sets the
    /// gauge: [`ItemNews::Read`]; with Redis outside the guards, as the heartbeat). The changes this instance makes set its gauges at once;
    /// this catches the ones other instances made (a reservation, a cancel, an expiry, a
    /// payment elsewhere), so that every instance's gauge, and the alerts that read it, are
    /// true within [`STOCK_REFRESH`]. One read per item per tick: a sale has few items.
    async fn refresh_stock_gauges(&self) {
        for item in metrics::stock_items() {
            if let Err(e) = self.engine.refresh_stock(&item).await {
                tracing::debug!(item, cause = %e, "stock gauge not refreshed");
                return;
            }
        }
    }

    pub fn next_request_id(&self) -> String {
        // Not `format!`: its machinery was ~830 instructions of every answer (callgrind).
        let mut n = itoa::Buffer::new();
        let n = n.format(self.request_seq.fetch_add(1, Ordering::Relaxed));
        let mut id = String::with_capacity(self.request_prefix.len() + 1 + n.len());
        id.push_str(&self.request_prefix);
        id.push('-');
        id.push_str(n);
        id
    }

    /// Start the background tasks (the limiter pruner, the stock gauges' refresh, the
    /// engine's own, and, for an instance that serves shoppers, the heartbeat that shares
    /// the global rate: a `worker` takes no share); they end when `shutdown` turns true.
    pub fn spawn_background(
        self: &Arc<Self>,
        shutdown: watch::Receiver<bool>,
        serves_http: bool,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let app = self.clone();
        let mut stop = shutdown.clone();
        let mut tasks = vec![tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => app.limiter.prune(),
                    _ = stopped(&mut stop) => break,
                }
            }
        })];
        let app = self.clone();
        let mut stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(STOCK_REFRESH);
            loop {
                tokio::select! {
                    _ = tick.tick() => app.refresh_stock_gauges().await,
                    _ = stopped(&mut stop) => break,
                }
            }
        }));
        let app = self.clone();
        let stop = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            app.health.keep_checking(&app.engine, &app.store, stop).await;
        }));
        if serves_http {
            tasks.extend(self.engine.spawn_heartbeat(shutdown.clone()));
        }
        tasks.extend(self.engine.spawn_background(shutdown));
        tasks
    }
}

/// What this instance knows locally about items, kept current by the engine's news: the
/// only place that sets the sold-out flag, the stock gauge and the order counters; and the
/// rate limits the engine shares between instances.
pub struct LocalView {
    filter: Arc<ItemFilter>,
    cache: Arc<LocalCache>,
    limiter: Arc<Limiter>,
}

impl Listener for LocalView {
    fn news(&self, news: ItemNews<'_>) {
        match news {
            ItemNews::Order { item, event, stock } => {
                metrics::order_event(event.as_str());
                if event == OrderStatus::RefundDue {
                    metrics::counter!(metrics::REFUND_DUE).increment(1);
                }
                if let Some(stock) = stock {
                    metrics::stock(item, stock, None);
                }
                match event {
                    OrderStatus::Reserved if stock == Some(0) => self.cache.mark_sold_out(item),
                    // Units came back (a refund with restock; a late payment that found its
                    // order overdue expired it first): the flag no longer holds.
                    OrderStatus::Cancelled | OrderStatus::Expired | OrderStatus::Refunded | OrderStatus::RefundDue => {
                        self.cache.invalidate(item)
                    }
                    _ => {}
                }
            }
            ItemNews::Put { item, stock, total } => {
                self.filter.add(item);
                self.cache.invalidate(item);
                metrics::stock(item, stock, Some(total));
            }
            ItemNews::Read { item, stock, total } => metrics::stock(item, stock, Some(total)),
            ItemNews::SoldOut { item } => {
                self.cache.mark_sold_out(item);
                metrics::stock(item, 0, None);
            }
            ItemNews::Missing { item } => {
                self.filter.remember_missing(item);
                self.cache.invalidate(item);
            }
            ItemNews::Remote { item } => {
                self.filter.add(item);
                self.cache.invalidate(item);
            }
            ItemNews::Catalog(ids) => {
                self.filter.replace_all(ids);
                self.cache.invalidate_all();
            }
            ItemNews::AllPaused(paused) => self.cache.set_all_paused(paused),
        }
    }

    fn limits(&self, news: LimitsNews) {
        match news {
            LimitsNews::Shared(change) => self.limiter.share(change),
            LimitsNews::Instances(n) => self.limiter.instances(n),
        };
    }
}
