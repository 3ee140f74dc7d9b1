//! The operator's view of a sale (issue 6, acceptance 1 and 2), on the real tools:
//!
//! 1. [`metrics_pass_promtool_lint`]: after traffic of every outcome, `GET /metrics` passes
//!    `promtool check metrics` without a single complaint; every contract metric
//!    (`docs/contract.md`, "Metrics") is there with `# HELP` and `# TYPE`; the histograms
//!    are real histograms; and no label carries a user id, an order id or a raw path.
//! 2. [`prometheus_scrapes_and_every_dashboard_query_returns_data`]: a real `prometheus`
//!    (Debian package) scrapes a gateway under a short load and loads
//!    `deploy/prometheus/alerts.yml`; `scripts/checks/lib/query_prometheus.py` then sends it
//!    every expression of `deploy/grafana/seckill.json` (panels and variables) and of the
//!    alert rules: every one parses, every dashboard and variable query returns data, and
//!    every rule is loaded and evaluated with health `ok`.
//!
//! `promtool`, `prometheus` and `python3` (with PyYAML) are required: a missing one is a
//! failure that says how to install it, never a skip. The gateway runs in-process
//! (`server::start`) against a throwaway `redis-server` and a fresh PostgreSQL database;
//! Prometheus runs as a child process on a free loopback port with a temporary storage
//! directory and is killed by PID when the test ends.
//!
//! The metrics recorder is one per process: both tests see each other's series. Nothing
//! below depends on a series belonging to one test only.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::binary::Binary;
use common::gateway::{Builder, Gateway};
use common::http::{ADMIN_TOKEN, HOUR_MS, MINUTE_MS, Reply, RequestExt, client, item_body, send};
use common::{RedisServer, free_port, poll, shared_pg, unique};
use reqwest::{RequestBuilder, StatusCode};
use seckill_gateway::clock::system_now_ms;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

/// Every metric of the contract (`docs/contract.md`, "Metrics") and the three the
/// alerts and dashboard also use, with their Prometheus type.
const CONTRACT: &[(&str, &str)] = &[
    ("seckill_requests_total", "counter"),
    ("seckill_request_duration_seconds", "histogram"),
    ("seckill_redis_script_duration_seconds", "histogram"),
    ("seckill_redis_errors_total", "counter"),
    ("seckill_cache_requests_total", "counter"),
    ("seckill_orders_total", "counter"),
    ("seckill_persist_batch_size", "histogram"),
    ("seckill_persist_lag_seconds", "gauge"),
    ("seckill_stream_pending", "gauge"),
    ("seckill_stock_remaining", "gauge"),
    ("seckill_circuit_open", "gauge"),
    ("seckill_refund_due_total", "counter"),
    // Not in the contract; the alerts and the dashboard use them. Names from src/metrics.rs.
    (seckill_gateway::metrics::DEAD_LETTERS, "counter"),
    (seckill_gateway::metrics::STOCK_TOTAL, "gauge"),
    (seckill_gateway::metrics::STORE_UP, "gauge"),
    (seckill_gateway::metrics::RATE_LIMIT, "gauge"),
];

/// Route templates: the only values of the `route` label.
/// The process metrics (the Prometheus client libraries' names, outside the `seckill_`
/// namespace), with a value that must be above zero in a running gateway.
const PROCESS_METRICS: &[&str] = &[
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_max_fds",
    "process_virtual_memory_bytes",
    "process_virtual_memory_max_bytes",
    "process_start_time_seconds",
    "process_threads",
];

const ROUTES: &[&str] = &[
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

/// The contract's error codes, `ok`, and `internal` (a 500): the `outcome` label's values.
const OUTCOMES: &[&str] = &[
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
    "internal",
];

/// Bounded label values of the other labels.
const LABEL_VALUES: &[(&str, &[&str])] = &[
    (
        "script",
        &[
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
        ],
    ),
    (
        "kind",
        &[
            "timeout",
            "connection",
            "script",
            "circuit_open",
            "shed",
            "not_replicated",
            "fenced",
            "in_transit",
        ],
    ),
    ("cache", &["item", "sold_out", "not_found", "bloom"]),
    ("result", &["hit", "miss"]),
    (
        "event",
        &["reserved", "paid", "cancelled", "expired", "refund_due", "refunded"],
    ),
];

/// The `kind` label of `seckill_rate_limit`.
const RATE_LIMIT_KINDS: &[&str] = &["global", "global_share", "per_user", "per_ip"];

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

// ---------------------------------------------------------------------------
// The gateway and HTTP

/// A gateway on the test's servers that stops within 2 s (the default flags of the
/// fixture otherwise: every flag with an environment fallback is given, so a `SECKILL_*`
/// variable of the machine does not leak in).
fn gateway(redis: &RedisServer, db: &str) -> Builder {
    Gateway::builder(&redis.url())
        .database(db)
        .flag("--shutdown-grace", "2s")
}

/// Stop the gateway, but never wait long: with Redis killed its workers retry until told
/// to stop, and the test is over anyway.
async fn stop_gateway(mut gw: Gateway) {
    gw.stop_within(Duration::from_secs(5)).await;
}

/// Sends requests and checks each answer's code, remembering the outcomes seen.
struct Driver {
    outcomes: BTreeMap<String, usize>,
}

impl Driver {
    /// Send `req` and require the `error` code `expect` ("ok" for a 2xx).
    async fn expect(&mut self, expect: &str, req: RequestBuilder) -> Value {
        let a = send(req).await;
        assert_eq!(a.code(), expect, "{}: {} {}", a.request, a.status, a.text);
        *self.outcomes.entry(a.code().to_owned()).or_default() += 1;
        a.json
    }
}

// ---------------------------------------------------------------------------
// Prometheus text format

/// One sample line: metric name and labels, in order.
struct Sample {
    name: String,
    labels: Vec<(String, String)>,
}

/// Parse `name{a="x",b="y"} value [timestamp]` (exposition format 0.0.4).
fn parse_sample(line: &str) -> Sample {
    let end = line
        .find(['{', ' '])
        .unwrap_or_else(|| panic!("sample line without a value: {line}"));
    let name = line[..end].to_owned();
    let mut labels = Vec::new();
    if line[end..].starts_with('{') {
        let mut chars = line[end + 1..].chars().peekable();
        loop {
            while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
                chars.next();
            }
            if chars.peek() == Some(&'}') || chars.peek().is_none() {
                break;
            }
            let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
            assert_eq!(chars.next(), Some('"'), "label {key} not quoted: {line}");
            let mut value = String::new();
            loop {
                match chars.next() {
                    Some('\\') => match chars.next() {
                        Some('n') => value.push('\n'),
                        Some(c) => value.push(c),
                        None => panic!("unterminated label value: {line}"),
                    },
                    Some('"') => break,
                    Some(c) => value.push(c),
                    None => panic!("unterminated label value: {line}"),
                }
            }
            labels.push((key.trim().to_owned(), value));
        }
    }
    Sample { name, labels }
}

/// `8-4-4-4-12` hex: the shape of an order id (a UUID).
fn looks_like_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => c == '-',
            _ => c.is_ascii_hexdigit(),
        })
}

// ---------------------------------------------------------------------------
// Test 1: promtool lint after traffic of every outcome

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_lint() {
    let t0 = Instant::now();
    let promtool = std::process::Command::new("promtool").arg("--version").output();
    if let Err(e) = promtool {
        panic!(
            "promtool not runnable ({e}): install Prometheus' promtool (Debian/Ubuntu: \
             apt-get install prometheus; or a release from prometheus.io on PATH), or run ./scripts/test"
        );
    }

    let mut redis = RedisServer::start();
    let db = shared_pg();
    let gw = gateway(&redis, &db).flag("--rate-per-user", "1").start().await;
    let mut d = Driver {
        outcomes: BTreeMap::new(),
    };
    eprintln!("[lint] gateway up after {:?}", t0.elapsed());

    // Items: on sale (limit 1), a single unit, upcoming, over.
    let now = system_now_ms();
    let open = unique("item");
    let single = unique("item");
    let upcoming = unique("item");
    let over = unique("item");
    let items = [&open, &single, &upcoming, &over];
    for (item, body) in [
        (&open, item_body(100, 1, now - MINUTE_MS, now + HOUR_MS)),
        (&single, item_body(1, 1, now - MINUTE_MS, now + HOUR_MS)),
        (&upcoming, item_body(10, 1, now + HOUR_MS, now + 2 * HOUR_MS)),
        (&over, item_body(10, 1, now - 2 * HOUR_MS, now - HOUR_MS)),
    ] {
        gw.put_item_body(item, &body).await.assert_ok();
    }
    // And one on sale that the operator paused.
    let held = unique("item");
    gw.put_item_body(&held, &item_body(10, 1, now - MINUTE_MS, now + HOUR_MS))
        .await
        .assert_ok();

    // Shoppers. The per-user bucket allows 1 request/s, so a user's second request waits
    // for the next phase (1.1 s later), except where the test wants a 429.
    let mut users: Vec<String> = Vec::new();
    let mut user = || {
        let u = unique("user");
        users.push(u.clone());
        u
    };
    let (ua, ub, uc, ud, ue, uf, ug, uh, ui, uj, uk, ul, um, un, uo, up) = (
        user(),
        user(),
        user(),
        user(),
        user(),
        user(),
        user(),
        user(),
        user(),
        user(),
        user(),
        user(),
        user(),
        user(),
        user(),
        user(),
    );
    let held_by = user();
    let reserve = |item: &str| gw.post(&format!("/api/v1/items/{item}/reserve"));
    let pay = |order: &str| gw.post(&format!("/api/v1/orders/{order}/pay"));
    let cancel = |order: &str| gw.post(&format!("/api/v1/orders/{order}/cancel"));
    let order_id = |v: &Value| v["order_id"].as_str().expect("order_id").to_owned();

    // Phase A: one request per user.
    d.expect(
        "forbidden",
        gw.put(&format!("/admin/v1/items/{open}"))
            .json(&item_body(1, 1, now, now + HOUR_MS)),
    )
    .await;
    d.expect(
        "forbidden",
        gw.put(&format!("/admin/v1/items/{open}"))
            .bearer_auth("wrong-token-123")
            .json(&item_body(1, 1, now, now + HOUR_MS)),
    )
    .await;
    d.expect(
        "bad_request",
        gw.put(&format!("/admin/v1/items/{open}"))
            .bearer_auth(ADMIN_TOKEN)
            .raw_json("{not json"),
    )
    .await;
    d.expect(
        "payload_too_large",
        gw.put(&format!("/admin/v1/items/{open}"))
            .bearer_auth(ADMIN_TOKEN)
            .raw_json(vec![b' '; 5000]),
    )
    .await;
    let oa = order_id(&d.expect("ok", reserve(&open).user(&ua)).await);
    let ob = order_id(&d.expect("ok", reserve(&open).user(&ub)).await);
    let oc = order_id(&d.expect("ok", reserve(&open).user(&uc).json(&json!({"qty": 1}))).await);
    let od = order_id(&d.expect("ok", reserve(&single).user(&ud)).await);
    d.expect("sold_out", reserve(&single).user(&ue)).await;
    d.expect("not_started", reserve(&upcoming).user(&uf)).await;
    d.expect(
        "ok",
        gw.post(&format!("/admin/v1/items/{held}/pause"))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await;
    d.expect("paused", reserve(&held).user(&held_by)).await;
    d.expect("ended", reserve(&over).user(&ug)).await;
    d.expect("unknown_item", reserve(&unique("item")).user(&uh)).await;
    d.expect("unauthenticated", reserve(&open)).await;
    d.expect("bad_request", reserve(&open).user(&ui).json(&json!({"qty": 0})))
        .await;
    d.expect("payload_too_large", reserve(&open).user(&uo).raw_json(vec![b' '; 5000]))
        .await;
    d.expect("ended", reserve(&over).user(&uj)).await;
    d.expect("rate_limited", reserve(&over).user(&uj)).await;
    let missing_order = seckill_gateway::ids::new_order_id(&open);
    d.expect("unknown_order", pay(&missing_order).user(&uk)).await;
    d.expect("forbidden", pay(&oa).user(&ul)).await;
    d.expect("forbidden", gw.get(&format!("/api/v1/orders/{ob}")).user(&um))
        .await;
    d.expect("ok", gw.get(&format!("/api/v1/items/{open}"))).await;
    d.expect("unknown_item", gw.get(&format!("/api/v1/items/{}", unique("item"))))
        .await;
    d.expect("ok", gw.get("/healthz")).await;
    d.expect("ok", gw.get("/readyz")).await;
    d.expect(
        "ok",
        gw.get(&format!("/admin/v1/items/{open}/stats"))
            .bearer_auth(ADMIN_TOKEN),
    )
    .await;
    d.expect("forbidden", gw.get(&format!("/admin/v1/items/{open}/stats")))
        .await;

    // Phase B: each user's second request.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    d.expect("ok", pay(&oa).user(&ua)).await;
    d.expect("ok", cancel(&ob).user(&ub)).await;
    d.expect("limit_reached", reserve(&open).user(&uc)).await;
    d.expect("ok", cancel(&od).user(&ud)).await;

    // Phase C: third requests.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    d.expect("order_closed", pay(&ob).user(&ub)).await;
    d.expect("order_closed", pay(&od).user(&ud)).await;
    d.expect("ok", gw.get(&format!("/api/v1/orders/{oa}")).user(&ua)).await;
    d.expect("ok", pay(&oc).user(&uc)).await;
    eprintln!("[lint] traffic driven after {:?}", t0.elapsed());

    // The persistence worker has written a batch (seckill_persist_batch_size exists).
    poll(Duration::from_secs(10), async || {
        let m = send(gw.get("/metrics")).await;
        *d.outcomes.entry("ok".into()).or_default() += 1;
        m.text.contains("seckill_persist_batch_size_count").then_some(())
    })
    .await
    .expect("no seckill_persist_batch_size after 10 s: the persistence worker wrote no batch");

    // The payment callback: refused unsigned here (no secret configured: callbacks off);
    // on a gateway with a secret (same process, same metrics), a signed payment of the
    // wrong amount.
    let webhook = |api: &Gateway| api.post("/webhooks/payments");
    d.expect("bad_signature", webhook(&gw).body("{}")).await;
    const PAYMENT_SECRET: &str = "lint-payment-secret-0123";
    let paying = gateway(&redis, &db)
        .flag("--payment-secret", PAYMENT_SECRET)
        .start()
        .await;
    let priced = d
        .expect("ok", paying.post(&format!("/api/v1/items/{open}/reserve")).user(&uo))
        .await;
    let body = json!({"payment_id": unique("pay"), "order_id": order_id(&priced), "amount_cents": 1,
        "status": "succeeded"})
    .to_string();
    let t = system_now_ms() / 1000;
    let signature = format!(
        "t={t},v1={}",
        seckill_gateway::payments::sign(PAYMENT_SECRET.as_bytes(), t, body.as_bytes())
    );
    d.expect(
        "amount_mismatch",
        webhook(&paying).header("x-seckill-signature", signature).body(body),
    )
    .await;
    stop_gateway(paying).await;

    // Redis gone: 503 unavailable.
    redis.kill();
    d.expect("unavailable", reserve(&open).user(&un)).await;
    d.expect("unavailable", pay(&oc).user(&up)).await;
    eprintln!("[lint] unavailable driven after {:?}", t0.elapsed());

    let metrics = send(gw.get("/metrics")).await;
    assert_eq!(metrics.status, StatusCode::OK);
    let text = metrics.text;

    // promtool check metrics: exit 0 and nothing printed.
    let mut child = tokio::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run promtool check metrics");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(text.as_bytes()).await.unwrap();
    drop(stdin);
    let out = child.wait_with_output().await.unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && printed.trim().is_empty(),
        "promtool check metrics: {}\n{printed}\n--- /metrics ---\n{text}",
        out.status
    );

    // The process metrics the contract names, each with a value a running process has.
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        let value = common::http::metric_value(&text, name);
        assert!(value > 0.0, "{name} is {value}");
    }

    // Every contract metric with HELP and TYPE; histograms as histograms.
    for (name, kind) in CONTRACT {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("# HELP {name} "))),
            "no `# HELP {name}` in /metrics:\n{text}"
        );
        assert!(
            text.lines().any(|l| l == format!("# TYPE {name} {kind}")),
            "no `# TYPE {name} {kind}` in /metrics:\n{text}"
        );
        if *kind == "histogram" {
            let bucket = format!("{name}_bucket{{");
            assert!(
                text.lines().any(|l| l.starts_with(&bucket) && l.contains("le=\"")),
                "{name} has no `_bucket{{…le=…}}` series:\n{text}"
            );
            assert!(
                text.lines()
                    .any(|l| l.starts_with(&bucket) && l.contains("le=\"+Inf\"")),
                "{name} has no +Inf bucket"
            );
            for suffix in ["_sum", "_count"] {
                assert!(
                    text.lines().any(|l| l.starts_with(&format!("{name}{suffix}"))),
                    "{name} has no {suffix} series"
                );
            }
        }
    }
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("# TYPE ") && l.ends_with(" summary")),
        "a summary in /metrics (histogram_quantile cannot read it):\n{text}"
    );

    // Labels are bounded: templates and codes, item ids; never a user id, order id, path.
    let secret_ids: HashSet<&str> = users
        .iter()
        .map(String::as_str)
        .chain([
            oa.as_str(),
            ob.as_str(),
            oc.as_str(),
            od.as_str(),
            missing_order.as_str(),
        ])
        .collect();
    let mut outcomes_seen: BTreeSet<String> = BTreeSet::new();
    let mut items_seen: BTreeSet<String> = BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let s = parse_sample(line);
        assert!(
            s.name.starts_with("seckill_") || PROCESS_METRICS.contains(&s.name.as_str()),
            "a metric outside the seckill_ namespace (and not a process metric): {line}"
        );
        for (k, v) in &s.labels {
            assert!(
                !secret_ids.iter().any(|id| v.contains(id)),
                "label {k}={v:?} carries a user or order id: {line}"
            );
            assert!(!looks_like_uuid(v), "label {k}={v:?} looks like an order id: {line}");
            assert!(!v.contains('/'), "label {k}={v:?} looks like a raw path: {line}");
            match k.as_str() {
                "route" => assert!(ROUTES.contains(&v.as_str()), "route {v:?} is not a template: {line}"),
                "outcome" => {
                    assert!(
                        OUTCOMES.contains(&v.as_str()),
                        "outcome {v:?} is not a contract code: {line}"
                    );
                    if s.name == "seckill_requests_total" {
                        outcomes_seen.insert(v.clone());
                    }
                }
                "item" => {
                    assert!(
                        seckill_gateway::ids::valid_id(v) && v.starts_with("item_"),
                        "item label {v:?} is not an item id of these tests: {line}"
                    );
                    items_seen.insert(v.clone());
                }
                "le" => assert!(
                    v == "+Inf" || v.parse::<f64>().is_ok(),
                    "le={v:?} is not a number: {line}"
                ),
                // The one `kind` that is not a Redis error's.
                "kind" if s.name == seckill_gateway::metrics::RATE_LIMIT => assert!(
                    RATE_LIMIT_KINDS.contains(&v.as_str()),
                    "rate limit kind {v:?} unknown: {line}"
                ),
                other => {
                    let allowed = LABEL_VALUES
                        .iter()
                        .find(|(name, _)| *name == other)
                        .unwrap_or_else(|| panic!("unexpected label {other:?}: {line}"));
                    assert!(
                        allowed.1.contains(&v.as_str()),
                        "{other}={v:?} not a known value: {line}"
                    );
                }
            }
        }
    }

    // Every outcome driven is counted, and every outcome of the brief was driven.
    // Every outcome but `internal` (a 500 the test cannot provoke honestly).
    let required = OUTCOMES.iter().copied().filter(|o| *o != "internal");
    for o in required {
        assert!(d.outcomes.contains_key(o), "the test did not drive outcome {o}");
    }
    for o in d.outcomes.keys() {
        assert!(
            outcomes_seen.contains(o),
            "outcome {o} was answered but is not in seckill_requests_total (seen: {outcomes_seen:?})"
        );
    }
    for item in items {
        assert!(
            items_seen.contains(item.as_str()),
            "no seckill_stock_remaining/total for item {item}"
        );
    }
    // The routes driven appear too.
    for route in [
        "item_get",
        "reserve",
        "pay",
        "cancel",
        "order_get",
        "admin_item_put",
        "admin_stats",
        "metrics",
        "healthz",
        "readyz",
    ] {
        assert!(
            text.contains(&format!("route=\"{route}\"")),
            "route {route} missing from /metrics"
        );
    }

    stop_gateway(gw).await;
    eprintln!(
        "[lint] done in {:?}: {} outcomes driven ({:?}), {} lines of /metrics",
        t0.elapsed(),
        d.outcomes.len(),
        d.outcomes,
        text.lines().count()
    );
}

// ---------------------------------------------------------------------------
// Test 2: a real Prometheus scraping the gateway; every dashboard query returns data

/// A `prometheus` child process on a free loopback port, with its configuration and
/// storage in a temporary directory. Dropping it kills it (by PID) and reaps it.
struct Prometheus {
    child: std::process::Child,
    url: String,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Start Prometheus scraping `target` (host:port) every second as job `seckill`, with
    /// the alert rules of `alerts` evaluated every second; wait until it is ready.
    async fn start(target: &str, alerts: &Path) -> Prometheus {
        let dir = tempfile::Builder::new()
            .prefix("seckill-prom-")
            .tempdir()
            .expect("temporary directory for prometheus");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {alerts}\n\
             scrape_configs:\n  - job_name: seckill\n    metrics_path: /metrics\n    \
             static_configs:\n      - targets: ['{target}']\n",
            alerts = alerts.display()
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let http = client();
        let mut last_log = String::new();
        for _ in 0..3 {
            let port = free_port();
            let url = format!("http://127.0.0.1:{port}");
            let log_path = dir.path().join(format!("prometheus-{port}.log"));
            let log = std::fs::File::create(&log_path).unwrap();
            let spawned = std::process::Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join(format!("data-{port}")).display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .arg("--log.level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn();
            let mut child = match spawned {
                Ok(c) => c,
                Err(e) => panic!(
                    "prometheus not runnable ({e}): install Prometheus (Debian/Ubuntu: apt-get install \
                     prometheus; or a release from prometheus.io on PATH), or run ./scripts/test"
                ),
            };
            // Ready, or exited (then `Some(false)`), within 20 s.
            let ready = poll(Duration::from_secs(20), async || {
                if let Ok(r) = http.get(format!("{url}/-/ready")).send().await
                    && r.status().is_success()
                {
                    return Some(true);
                }
                child.try_wait().ok().flatten().map(|_| false)
            })
            .await;
            if ready == Some(true) {
                return Prometheus { child, url, dir };
            }
            // Lost the port race or never ready: stop this one (by PID) and try another port.
            let _ = child.kill();
            let _ = child.wait();
            last_log = std::fs::read_to_string(&log_path).unwrap_or_default();
        }
        panic!("prometheus did not become ready on 3 ports; last log:\n{last_log}");
    }

    /// An instant query; panics unless Prometheus answers `success`.
    async fn query(&self, http: &reqwest::Client, expr: &str) -> Vec<Value> {
        let body: Value = http
            .post(format!("{}/api/v1/query", self.url))
            .form(&[("query", expr)])
            .send()
            .await
            .unwrap_or_else(|e| panic!("query {expr}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("query {expr}: {e}"));
        assert_eq!(body["status"], "success", "query {expr}: {body}");
        body["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The first value of an instant vector query, if any.
    async fn value(&self, http: &reqwest::Client, expr: &str) -> Option<f64> {
        self.query(http, expr)
            .await
            .first()
            .and_then(|s| s["value"][1].as_str().and_then(|v| v.parse().ok()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_and_every_dashboard_query_returns_data() {
    let t0 = Instant::now();
    let root = repo_root();
    let alerts = root.join("deploy/prometheus/alerts.yml");
    let query_script = root.join("scripts/checks/lib/query_prometheus.py");
    assert!(alerts.is_file() && query_script.is_file());
    match std::process::Command::new("python3")
        .args(["-c", "import yaml"])
        .output()
    {
        Ok(o) if o.status.success() => {}
        Ok(_) => panic!("python3 has no PyYAML (needed to read alerts.yml): apt-get install python3-yaml"),
        Err(e) => panic!("python3 not runnable ({e}): apt-get install python3 python3-yaml"),
    }

    let redis = RedisServer::start();
    let db = shared_pg();
    let gw = gateway(&redis, &db)
        .flag("--rate-per-user", "5")
        .flag("--persist-wait", "10ms")
        .start()
        .await;
    let http = client();
    let prom = Prometheus::start(&gw.running().addr.to_string(), &alerts).await;
    eprintln!(
        "[prom] gateway and prometheus ({}) up after {:?}",
        prom.url,
        t0.elapsed()
    );

    // Items: a hot one that sells out during the load, a calm one, one whose sale is over.
    let now = system_now_ms();
    let hot = unique("item");
    let calm = unique("item");
    let over = unique("item");
    for (item, body) in [
        (&hot, item_body(25, 1, now - MINUTE_MS, now + HOUR_MS)),
        (&calm, item_body(1000, 2, now - MINUTE_MS, now + HOUR_MS)),
        (&over, item_body(10, 1, now - 2 * HOUR_MS, now - HOUR_MS)),
    ] {
        gw.put_item_body(item, &body).await.assert_ok();
    }

    // Prometheus sees the gateway before the load starts.
    poll(Duration::from_secs(15), async || {
        (prom.value(&http, r#"up{job="seckill"}"#).await == Some(1.0)).then_some(())
    })
    .await
    .expect("prometheus never scraped the gateway (up != 1)");

    // The load: ~9 s (so rate() over the 1m $__rate_interval the script substitutes has
    // many samples of every series), rounds of mixed outcomes every 200 ms.
    let load_for = Duration::from_secs(9);
    let started = Instant::now();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    let mut count = |a: &Reply| *outcomes.entry(a.code().to_owned()).or_default() += 1;
    let mut previous: Vec<(String, String)> = Vec::new(); // (user, order) of the last round
    let mut round = 0u32;
    while started.elapsed() < load_for {
        round += 1;
        // Last round's orders: pay one, cancel the other, look one up.
        for (i, (user, order)) in previous.drain(..).enumerate() {
            let path = if i % 2 == 0 { "pay" } else { "cancel" };
            count(&send(gw.post(&format!("/api/v1/orders/{order}/{path}")).user(&user)).await);
            count(&send(gw.get(&format!("/api/v1/orders/{order}")).user(&user)).await);
        }
        // New shoppers on both items (hot sells out after a while: sold_out).
        for item in [&hot, &hot, &calm] {
            let user = unique("user");
            let a = send(gw.post(&format!("/api/v1/items/{item}/reserve")).user(&user)).await;
            count(&a);
            if let Some(order) = a.json["order_id"].as_str() {
                previous.push((user, order.to_owned()));
            }
        }
        let user = unique("user");
        count(&send(gw.get(&format!("/api/v1/items/{hot}"))).await);
        count(&send(gw.get(&format!("/api/v1/items/{calm}"))).await);
        count(&send(gw.post(&format!("/api/v1/items/{over}/reserve")).user(&user)).await);
        count(
            &send(
                gw.post(&format!("/api/v1/items/{}/reserve", unique("item")))
                    .user(&user),
            )
            .await,
        );
        count(&send(gw.post(&format!("/api/v1/items/{calm}/reserve"))).await);
        count(
            &send(
                gw.post(&format!("/api/v1/items/{calm}/reserve"))
                    .user(&user)
                    .json(&json!({"qty": 5})),
            )
            .await,
        );
        if round.is_multiple_of(5) {
            // One shopper hammering: past the burst of 5, 429.
            let eager = unique("user");
            for _ in 0..8 {
                count(&send(gw.post(&format!("/api/v1/items/{over}/reserve")).user(&eager)).await);
            }
            count(&send(gw.get(&format!("/admin/v1/items/{hot}/stats")).bearer_auth(ADMIN_TOKEN)).await);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let total: usize = outcomes.values().sum();
    eprintln!(
        "[prom] load: {total} requests in {round} rounds, {:?}: {outcomes:?}",
        started.elapsed()
    );
    for o in [
        "ok",
        "sold_out",
        "ended",
        "unknown_item",
        "unauthenticated",
        "bad_request",
        "rate_limited",
    ] {
        assert!(outcomes.contains_key(o), "the load produced no {o}: {outcomes:?}");
    }
    assert!(
        outcomes
            .keys()
            .all(|o| !["internal", "unavailable"].contains(&o.as_str())),
        "the gateway failed under the load: {outcomes:?}"
    );

    // Wait for two scrapes after the load (the last counts and gauges are in Prometheus)
    // and for the persistence histogram to have been scraped.
    let load_end = system_now_ms() as f64 / 1000.0;
    let (mut scraped, mut batches) = (None, None);
    let after_load = poll(Duration::from_secs(15), async || {
        scraped = prom.value(&http, r#"timestamp(up{job="seckill"})"#).await;
        batches = prom
            .value(&http, r#"sum(seckill_persist_batch_size_count{job="seckill"})"#)
            .await;
        (scraped.is_some_and(|t| t > load_end + 1.0) && batches.is_some_and(|n| n > 0.0)).then_some(())
    })
    .await;
    assert!(
        after_load.is_some(),
        "prometheus did not scrape after the load (last scrape {scraped:?}, load end {load_end}; \
         persisted batches {batches:?})"
    );
    eprintln!("[prom] scraped after the load at {:?}", t0.elapsed());

    // Every dashboard and variable query parses and returns data; every alert expression
    // parses; every rule of alerts.yml is loaded and evaluated with health ok.
    let out = tokio::process::Command::new("python3")
        .arg(&query_script)
        .args(["dashboard", "variables", "alerts"])
        .args(["--url", &prom.url])
        .arg("--rules")
        .arg(&alerts)
        .args(["--require-data", "dashboard", "variables"])
        .arg("-v")
        .current_dir(&root)
        .kill_on_drop(true)
        .output()
        .await
        .expect("run python3 scripts/checks/lib/query_prometheus.py");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    assert!(
        out.status.success(),
        "query_prometheus.py failed ({}):\n{report}\n--- prometheus log ---\n{}",
        out.status,
        std::fs::read_dir(prom.dir.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
            .collect::<String>()
    );
    assert!(
        report.contains("every dashboard/variables query returned data"),
        "query_prometheus.py did not require data:\n{report}"
    );

    drop(prom);
    stop_gateway(gw).await;
    drop(redis);
    eprintln!("[prom] done in {:?}", t0.elapsed());
}

/// Issue 6: with `SECKILL_LOG_FORMAT=json` every log line is JSON, and the lines of one
/// request carry its request id (the one the client sent, echoed in `X-Request-Id`).
#[test]
fn json_logs_carry_the_request_id() {
    let mut gw = Binary::builder()
        .env("SECKILL_LOG_FORMAT", "json")
        .env("RUST_LOG", "seckill_gateway=debug")
        .captured()
        .spawn();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let echoed = rt.block_on(async {
        gw.ready().await;
        let r = send(gw.reserve_req("demo", "logger").header("x-request-id", "req-json-1")).await;
        r.header("x-request-id").expect("X-Request-Id").to_owned()
    });
    assert_eq!(echoed, "req-json-1");
    gw.kill();
    let mut carried = 0;
    for line in gw.stderr_text().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let in_request = v["span"]["request_id"].as_str() == Some("req-json-1")
            || v["spans"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["request_id"] == "req-json-1"));
        if in_request {
            assert_eq!(v["span"]["route"], "reserve", "{line}");
            carried += 1;
        }
    }
    assert!(carried >= 1, "a log line of the request carries its request id");
}

/// The three lists of route labels agree: the gateway's (`src/metrics.rs`, which every
/// route of the router must be in), the one this test holds the `/metrics` labels to, and
/// the dashboard lint's (`deploy/grafana/exprs.py`). A route added to one and not the
/// others fails here, before any scrape.
#[test]
fn route_label_lists_agree() {
    let ours: BTreeSet<&str> = ROUTES.iter().copied().collect();
    let gateway: BTreeSet<&str> = seckill_gateway::metrics::ROUTES.iter().copied().collect();
    assert_eq!(ours, gateway, "tests/observability.rs ROUTES vs src/metrics.rs ROUTES");
    let out = std::process::Command::new("python3")
        .arg("-c")
        .arg("import json, sys; sys.path.insert(0, sys.argv[1]); import exprs; print(json.dumps(sorted(exprs.ROUTES)))")
        .arg(repo_root().join("deploy/grafana"))
        .output()
        .expect("python3 runs (apt-get install python3)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dashboard: BTreeSet<String> = serde_json::from_slice(&out.stdout).expect("a JSON list of routes");
    let dashboard: BTreeSet<&str> = dashboard.iter().map(String::as_str).collect();
    assert_eq!(
        ours, dashboard,
        "tests/observability.rs ROUTES vs deploy/grafana/exprs.py ROUTES"
    );
}
