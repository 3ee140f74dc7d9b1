//! Every metric name, one doc line each, and the Prometheus exporter.
//!
//! Names are the contract's (users' dashboards rely on them). Histograms get real buckets
//! (metrics-exporter-prometheus renders summaries otherwise, which `histogram_quantile`
//! cannot read and instances cannot aggregate), and an upkeep task drains raw samples so
//! memory stays flat when nobody scrapes (metrics #245, #339). Labels are bounded: route
//! templates, codes, script names and item ids (operator-created), never user or order ids.

use std::time::Duration;

use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
pub use ::metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Requests by route template and outcome (`ok` or the contract's error code).
pub const REQUESTS: &str = "seckill_requests_total";
/// Request latency by route, from headers read to response built.
pub const REQUEST_DURATION: &str = "seckill_request_duration_seconds";
/// Redis Lua script round trip by script.
pub const SCRIPT_DURATION: &str = "seckill_redis_script_duration_seconds";
/// Redis failures by kind: timeout, connection, script, circuit_open, shed.
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
/// Units left per item.
pub const STOCK_REMAINING: &str = "seckill_stock_remaining";
/// Units configured per item (so alerts can say "below 10% of stock").
pub const STOCK_TOTAL: &str = "seckill_stock_configured";
/// 1 while the Redis circuit breaker is open.
pub const CIRCUIT_OPEN: &str = "seckill_circuit_open";
/// 1 while the order store answers.
pub const STORE_UP: &str = "seckill_store_up";

const LATENCY_BUCKETS: &[f64] = &[
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0,
];
const BATCH_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
];

/// Install the global recorder once per process and start its upkeep task. Later calls
/// (tests start several gateways in one process) return the first handle.
pub fn install() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(REQUEST_DURATION.into()), LATENCY_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(SCRIPT_DURATION.into()), LATENCY_BUCKETS)
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(PERSIST_BATCH_SIZE.into()),
                        BATCH_BUCKETS,
                    )
                })
                .expect("static bucket lists are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            if ::metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics may be empty");
            }
            describe();
            register_zeroes();
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
    for kind in ["timeout", "connection", "script", "circuit_open", "shed"] {
        ::metrics::counter!(REDIS_ERRORS, "kind" => kind).absolute(0);
    }
    for event in ["reserved", "paid", "cancelled", "expired"] {
        ::metrics::counter!(ORDERS, "event" => event).absolute(0);
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
    describe_histogram!(
        SCRIPT_DURATION,
        Unit::Seconds,
        "Redis Lua script round trip by script."
    );
    describe_counter!(REDIS_ERRORS, "Redis failures by kind.");
    describe_counter!(CACHE_REQUESTS, "Local cache lookups by cache and result.");
    describe_counter!(ORDERS, "Order transitions by event.");
    describe_histogram!(PERSIST_BATCH_SIZE, "Rows written per persistence batch.");
    describe_gauge!(
        PERSIST_LAG,
        Unit::Seconds,
        "Age of the oldest event not yet persisted."
    );
    describe_gauge!(
        STREAM_PENDING,
        "Order events not yet acknowledged by the persistence worker."
    );
    describe_counter!(
        DEAD_LETTERS,
        "Order events moved to the dead-letter stream."
    );
    describe_gauge!(STOCK_REMAINING, "Units left per item.");
    describe_gauge!(STOCK_TOTAL, "Units configured per item.");
    describe_gauge!(CIRCUIT_OPEN, "1 while the Redis circuit breaker is open.");
    describe_gauge!(STORE_UP, "1 while the order store answers.");
}

/// Count a cache lookup.
#[inline]
pub fn cache(cache: &'static str, hit: bool) {
    ::metrics::counter!(CACHE_REQUESTS, "cache" => cache, "result" => if hit { "hit" } else { "miss" })
        .increment(1);
}

/// Count a Redis failure.
#[inline]
pub fn redis_error(kind: &'static str) {
    ::metrics::counter!(REDIS_ERRORS, "kind" => kind).increment(1);
}

/// Count an order transition.
#[inline]
pub fn order_event(event: &'static str) {
    ::metrics::counter!(ORDERS, "event" => event).increment(1);
}

/// Publish an item's stock gauges.
pub fn stock(item: &str, remaining: i64, total: i64) {
    ::metrics::gauge!(STOCK_REMAINING, "item" => item.to_owned()).set(remaining as f64);
    ::metrics::gauge!(STOCK_TOTAL, "item" => item.to_owned()).set(total as f64);
}

/// Publish the circuit breaker state.
pub fn gauge_circuit(open: bool) {
    ::metrics::gauge!(CIRCUIT_OPEN).set(if open { 1.0 } else { 0.0 });
}
