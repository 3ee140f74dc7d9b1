//! Every metric name, one doc line each, and the Prometheus exporter.
//!
//! Names are the contract's (users' dashboards rely on them). Histograms get real buckets
//! (metrics-exporter-prometheus renders summaries otherwise, which `histogram_quantile`
//! cannot read and instances cannot aggregate), and an upkeep task drains raw samples so
//! memory stays flat when nobody scrapes (metrics #245, #339). Labels are bounded: route
//! templates, codes, script names and item ids (operator-created), never user or order ids.

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};
use std::time::Duration;

use ::metrics::{Counter, Gauge, Histogram};

use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
pub use ::metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests by route template and outcome (`ok` or the contract's error code).
pub const REQUESTS: &str = "seckill_requests_total";
/// Request latency by route, from headers read to response built.
pub const REQUEST_DURATION: &str = "seckill_request_duration_seconds";
/// Redis Lua script round trip by script.
pub const SCRIPT_DURATION: &str = "seckill_redis_script_duration_seconds";
/// Redis failures by kind: timeout, connection, script, circuit_open, shed, not_replicated.
pub const REDIS_ERRORS: &str = "seckill_redis_errors_total";
/// Local cache lookups by cache (item, sold_out, not_found, bloom) and result (hit, miss).
pub const CACHE_REQUESTS: &str = "seckill_cache_requests_total";
/// Order transitions by event: reserved, paid, cancelled, expired.
pub const ORDERS: &str = "seckill_orders_total";
/// Rows written per persistence batch.
pub const PERSIST_BATCH_SIZE: &str = "seckill_persist_batch_size";
/// Age of the oldest event not yet persisted (0 when the pipeline is quiet).
pub const PERSIST_LAG: &str = "seckill_persist_lag_seconds";
/// Events not yet acknowledged by the persistence worker, all shards.
pub const STREAM_PENDING: &str = "seckill_stream_pending";
/// Events moved to the dead-letter stream.
pub const DEAD_LETTERS: &str = "seckill_dead_letters_total";
/// Orders paid for after they closed (expired or cancelled): money owed back.
pub const REFUND_DUE: &str = "seckill_refund_due_total";
/// Units left per item.
pub const STOCK_REMAINING: &str = "seckill_stock_remaining";
/// Units configured per item (so alerts can say "below 10% of stock").
pub const STOCK_TOTAL: &str = "seckill_stock_configured";
/// 1 while the Redis circuit breaker is open.
pub const CIRCUIT_OPEN: &str = "seckill_circuit_open";
/// 1 while the order store answers.
pub const STORE_UP: &str = "seckill_store_up";
/// 1 while a Redis shard is fenced: behind the database, refusing until rebuilt (label shard).
pub const REDIS_FENCED: &str = "seckill_redis_fenced";
/// Redis shards rebuilt from the database after Redis lost writes.
pub const REDIS_REPAIRS: &str = "seckill_redis_repairs_total";
/// Rate limits in force, requests per second (0: off), by kind: global (the deployment's),
/// global_share (this instance's own bucket), per_user, per_ip.
pub const RATE_LIMIT: &str = "seckill_rate_limit";

const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

/// The exposition text of every metric: the recorder's, then the process metrics
/// ([`process_text`]).
pub fn render(handle: &PrometheusHandle) -> String {
    let mut text = handle.render();
    process_text(&mut text);
    text
}

/// The process metrics, the Prometheus client libraries' names (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`, …), read from `/proc` now by
/// `metrics_process`. Written here, not through the recorder: a `metrics` counter holds whole
/// numbers, and CPU seconds need their fraction (`rate()` of whole seconds is coarse).
fn process_text(out: &mut String) {
    use std::fmt::Write;
    let m = metrics_process::collector::collect();
    let u = |v: Option<u64>| v.map(|v| v as f64);
    let all = [
        (
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            m.cpu_seconds_total,
        ),
        (
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            u(m.open_fds),
        ),
        (
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors.",
            u(m.max_fds),
        ),
        (
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            u(m.virtual_memory_bytes),
        ),
        (
            "process_virtual_memory_max_bytes",
            "gauge",
            "Maximum amount of virtual memory available in bytes (0: unlimited).",
            u(m.virtual_memory_max_bytes),
        ),
        (
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            u(m.resident_memory_bytes),
        ),
        (
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            u(m.start_time_seconds),
        ),
        (
            "process_threads",
            "gauge",
            "Number of OS threads in the process.",
            u(m.threads),
        ),
    ];
    for (name, kind, help, value) in all {
        if let Some(v) = value {
            let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n");
        }
    }
}

/// Install the global recorder once per process and start its upkeep task. Later calls
/// (tests start several gateways in one process) return the first handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), LATENCY_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(SCRIPT_DURATION.into()), LATENCY_BUCKETS))
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(PERSIST_BATCH_SIZE.into()), BATCH_BUCKETS))
                .expect("static bucket lists are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            if ::metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe();
            register_zeroes();
            let _ = HANDLES.set(Handles::new());
            let upkeep = handle.clone();
            std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(Duration::from_secs(5));
                        upkeep.run_upkeep();
                    }
                })
                .expect("spawn metrics upkeep thread");
            handle
        })
        .clone()
}

/// Series that alerts and `rate()` need to exist before their first event.
fn register_zeroes() {
    ::metrics::counter!(DEAD_LETTERS).absolute(0);
    ::metrics::counter!(REFUND_DUE).absolute(0);
    ::metrics::counter!(REDIS_REPAIRS).absolute(0);
    for kind in REDIS_ERROR_KINDS {
        ::metrics::counter!(REDIS_ERRORS, "kind" => *kind).absolute(0);
    }
    for event in EVENTS {
        ::metrics::counter!(ORDERS, "event" => *event).absolute(0);
    }
    ::metrics::gauge!(CIRCUIT_OPEN).set(0.0);
    ::metrics::gauge!(STORE_UP).set(1.0);
    ::metrics::gauge!(PERSIST_LAG).set(0.0);
    ::metrics::gauge!(STREAM_PENDING).set(0.0);
}

fn describe() {
    describe_counter!(
        REQUESTS,
        "Requests by route template and outcome (ok or the error code)."
    );
    describe_histogram!(REQUEST_DURATION, Unit::Seconds, "Request latency by route.");
    describe_histogram!(SCRIPT_DURATION, Unit::Seconds, "Redis Lua script round trip by script.");
    describe_counter!(REDIS_ERRORS, "Redis failures by kind.");
    describe_counter!(CACHE_REQUESTS, "Local cache lookups by cache and result.");
    describe_counter!(ORDERS, "Order transitions by event.");
    describe_histogram!(PERSIST_BATCH_SIZE, "Rows written per persistence batch.");
    describe_gauge!(PERSIST_LAG, Unit::Seconds, "Age of the oldest event not yet persisted.");
    describe_gauge!(
        STREAM_PENDING,
        "Order events not yet acknowledged by the persistence worker."
    );
    describe_counter!(DEAD_LETTERS, "Order events moved to the dead-letter stream.");
    describe_counter!(
        REFUND_DUE,
        "Orders paid for after they closed (expired or cancelled): the money is owed back."
    );
    describe_gauge!(STOCK_REMAINING, "Units left per item.");
    describe_gauge!(STOCK_TOTAL, "Units configured per item.");
    describe_gauge!(
        CIRCUIT_OPEN,
        "1 while the Redis circuit breaker is open (cluster mode: one per shard, label shard; unlabelled: calls of no shard)."
    );
    describe_gauge!(STORE_UP, "1 while the order store answers.");
    describe_gauge!(
        REDIS_FENCED,
        "1 while a Redis shard is behind the database (it lost writes) and refuses until rebuilt, by shard."
    );
    describe_counter!(
        REDIS_REPAIRS,
        "Redis shards rebuilt from the database after Redis lost writes."
    );
    describe_gauge!(
        RATE_LIMIT,
        "Rate limits in force, requests per second (0: off), by kind: global (the deployment's), global_share (this instance's bucket), per_user, per_ip."
    );
}

/// Route templates (the `route` label) and outcomes (`ok` or an error code): bounded sets.
pub const ROUTES: &[&str] = &[
    "item_get",
    "reserve",
    "pay",
    "cancel",
    "order_get",
    "orders_list",
    "admin_item_put",
    "admin_stats",
    "admin_orders_csv",
    "admin_item_pause",
    "admin_item_resume",
    "admin_pause_all",
    "admin_resume_all",
    "admin_limits",
    "admin_refund",
    "payment_webhook",
    "admin_sales_csv",
    "admin_sales_xlsx",
    "openapi",
    "metrics",
    "healthz",
    "readyz",
    "not_found",
];
pub const OUTCOMES: &[&str] = &[
    "ok",
    "bad_request",
    "unauthenticated",
    "forbidden",
    "unknown_item",
    "unknown_order",
    "limit_reached",
    "order_closed",
    "sold_out",
    "not_started",
    "ended",
    "payload_too_large",
    "rate_limited",
    "paused",
    "unavailable",
    "bad_signature",
    "amount_mismatch",
    "not_found",
    "method_not_allowed",
    "internal",
];
/// A lookup of the request path, by the `cache` label of [`CACHE_REQUESTS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cache {
    /// Item metadata (moka).
    Item,
    /// An item's sold-out flag (moka).
    SoldOut,
    /// Ids Redis said do not exist although the Bloom filter said maybe.
    NotFound,
    /// The Bloom filter of item ids.
    Bloom,
}

impl Cache {
    const ALL: [Cache; 4] = [Cache::Item, Cache::SoldOut, Cache::NotFound, Cache::Bloom];

    pub fn label(self) -> &'static str {
        match self {
            Cache::Item => "item",
            Cache::SoldOut => "sold_out",
            Cache::NotFound => "not_found",
            Cache::Bloom => "bloom",
        }
    }
}

const SCRIPTS: &[&str] = &[
    "reserve",
    "pay",
    "cancel",
    "expire",
    "put_item",
    "pause",
    "transfer_out",
    "transfer_in",
    "transfer_forget",
    "settle",
    "refund",
];
const EVENTS: &[&str] = &["reserved", "paid", "cancelled", "expired", "refund_due", "refunded"];
const REDIS_ERROR_KINDS: &[&str] = &[
    "timeout",
    "connection",
    "script",
    "circuit_open",
    "shed",
    "not_replicated",
    "fenced",
    "in_transit",
];

/// The maps of [`Handles`]: their keys are this module's own `&'static str`s, so a fixed,
/// fast hash (foldhash) instead of SipHash, which cost a sold-out answer ~1,400 instructions
/// in lookups (callgrind).
type FastMap<K, V> = HashMap<K, V, foldhash::fast::FixedState>;

/// Handles of the hot-path series, registered once. `counter!` with labels builds a key
/// (allocating its label list) and looks it up in the registry on every call; a handle is
/// one atomic add. Unknown label values fall back to the macros.
struct Handles {
    /// Registered on first use, so /metrics lists only the pairs that happened (a
    /// pre-registered `route="metrics",outcome="sold_out"` would be noise).
    requests: FastMap<(&'static str, &'static str), OnceLock<Counter>>,
    durations: FastMap<&'static str, OnceLock<Histogram>>,
    /// By [`Cache`] and hit (1) or miss (0): an index, not a hash (three lookups a request).
    cache: [[Counter; 2]; 4],
    scripts: FastMap<&'static str, Histogram>,
    orders: FastMap<&'static str, Counter>,
    redis_errors: FastMap<&'static str, Counter>,
    /// Per-item stock gauges (remaining, configured), created on first use. A std RwLock:
    /// never held across an await; reads dominate.
    stock: RwLock<HashMap<String, (Gauge, Gauge)>>,
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

impl Handles {
    fn new() -> Self {
        let mut requests = FastMap::default();
        let mut durations = FastMap::default();
        for &route in ROUTES {
            durations.insert(route, OnceLock::new());
            for &outcome in OUTCOMES {
                requests.insert((route, outcome), OnceLock::new());
            }
        }
        let cache = Cache::ALL.map(|c| {
            [false, true].map(|hit| {
                let result = if hit { "hit" } else { "miss" };
                ::metrics::counter!(CACHE_REQUESTS, "cache" => c.label(), "result" => result)
            })
        });
        Handles {
            requests,
            durations,
            cache,
            scripts: SCRIPTS
                .iter()
                .map(|&s| (s, ::metrics::histogram!(SCRIPT_DURATION, "script" => s)))
                .collect(),
            orders: EVENTS
                .iter()
                .map(|&e| (e, ::metrics::counter!(ORDERS, "event" => e)))
                .collect(),
            redis_errors: REDIS_ERROR_KINDS
                .iter()
                .map(|&k| (k, ::metrics::counter!(REDIS_ERRORS, "kind" => k)))
                .collect(),
            stock: RwLock::new(HashMap::new()),
        }
    }
}

/// Count and time one request.
#[inline]
pub fn request(route: &'static str, outcome: &'static str, seconds: f64) {
    match HANDLES.get() {
        Some(h) => {
            match h.requests.get(&(route, outcome)) {
                Some(c) => c
                    .get_or_init(|| ::metrics::counter!(REQUESTS, "route" => route, "outcome" => outcome))
                    .increment(1),
                None => ::metrics::counter!(REQUESTS, "route" => route, "outcome" => outcome).increment(1),
            }
            match h.durations.get(route) {
                Some(d) => d
                    .get_or_init(|| ::metrics::histogram!(REQUEST_DURATION, "route" => route))
                    .record(seconds),
                None => ::metrics::histogram!(REQUEST_DURATION, "route" => route).record(seconds),
            }
        }
        None => {
            ::metrics::counter!(REQUESTS, "route" => route, "outcome" => outcome).increment(1);
            ::metrics::histogram!(REQUEST_DURATION, "route" => route).record(seconds);
        }
    }
}

/// Time one Redis script call.
#[inline]
pub fn script(name: &'static str, seconds: f64) {
    match HANDLES.get().and_then(|h| h.scripts.get(name)) {
        Some(h) => h.record(seconds),
        None => ::metrics::histogram!(SCRIPT_DURATION, "script" => name).record(seconds),
    }
}

/// Count a cache lookup.
#[inline]
pub fn cache(cache: Cache, hit: bool) {
    match HANDLES.get() {
        Some(h) => h.cache[cache as usize][usize::from(hit)].increment(1),
        None => {
            ::metrics::counter!(CACHE_REQUESTS, "cache" => cache.label(), "result" => if hit { "hit" } else { "miss" })
                .increment(1)
        }
    }
}

/// Count a Redis failure.
#[inline]
pub fn redis_error(kind: &'static str) {
    match HANDLES.get().and_then(|h| h.redis_errors.get(kind)) {
        Some(c) => c.increment(1),
        None => ::metrics::counter!(REDIS_ERRORS, "kind" => kind).increment(1),
    }
}

/// Count an order transition.
#[inline]
pub fn order_event(event: &'static str) {
    match HANDLES.get().and_then(|h| h.orders.get(event)) {
        Some(c) => c.increment(1),
        None => ::metrics::counter!(ORDERS, "event" => event).increment(1),
    }
}

/// Publish an item's stock gauges: the units left, and the configured total when the
/// caller knows it (an order's reply carries only what is left).
pub fn stock(item: &str, remaining: i64, total: Option<i64>) {
    let Some(h) = HANDLES.get() else {
        ::metrics::gauge!(STOCK_REMAINING, "item" => item.to_owned()).set(remaining as f64);
        if let Some(total) = total {
            ::metrics::gauge!(STOCK_TOTAL, "item" => item.to_owned()).set(total as f64);
        }
        return;
    };
    if let Some((r, t)) = h.stock.read().unwrap_or_else(|p| p.into_inner()).get(item) {
        r.set(remaining as f64);
        if let Some(total) = total {
            t.set(total as f64);
        }
        return;
    }
    let r = ::metrics::gauge!(STOCK_REMAINING, "item" => item.to_owned());
    r.set(remaining as f64);
    // The pair is cached once the total is known, so no series reads a made-up total.
    let Some(total) = total else {
        return;
    };
    let t = ::metrics::gauge!(STOCK_TOTAL, "item" => item.to_owned());
    t.set(total as f64);
    h.stock
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .insert(item.to_owned(), (r, t));
}

/// The items whose stock gauges this process publishes (with their total known), for the
/// refresh that keeps them true when another instance changed the stock.
pub fn stock_items() -> Vec<String> {
    HANDLES.get().map_or_else(Vec::new, |h| {
        h.stock
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    })
}

/// Publish the rate limits in force (a change is rare: the macros' lookup is fine).
pub fn rate_limits(l: &crate::limiter::InForce) {
    for (kind, v) in [
        ("global", l.rate_global),
        ("global_share", l.rate_global_share),
        ("per_user", l.rate_per_user),
        ("per_ip", l.rate_per_ip),
    ] {
        ::metrics::gauge!(RATE_LIMIT, "kind" => kind).set(f64::from(v));
    }
}

/// Publish the circuit breaker state.
/// The breaker of every call (standalone), or of one shard's calls (cluster: label `shard`).
pub fn gauge_circuit(shard: Option<&str>, open: bool) {
    let v = if open { 1.0 } else { 0.0 };
    match shard {
        None => ::metrics::gauge!(CIRCUIT_OPEN).set(v),
        Some(s) => ::metrics::gauge!(CIRCUIT_OPEN, "shard" => s.to_owned()).set(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_is_the_index_of_its_handles_and_keeps_its_label() {
        for (i, c) in Cache::ALL.into_iter().enumerate() {
            assert_eq!(c as usize, i, "{c:?}");
        }
        let labels = Cache::ALL.map(Cache::label);
        assert_eq!(labels, ["item", "sold_out", "not_found", "bloom"]);
    }
}
