//! The durable order pipeline (issue 3), end to end against real redis-server and
//! PostgreSQL: a SIGKILL mid-burst loses nothing, a database outage is buffered and drained,
//! redelivered and reordered events are idempotent, a poison event reaches the dead-letter
//! stream without blocking the ones behind it, and `reconcile` finds and repairs a planted
//! difference.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{PgServer, RedisServer, free_port, shared_pg, unique};
use seckill_gateway::clock::{Clock, rfc3339, system_now_ms};
use seckill_gateway::config::Config;
use seckill_gateway::domain::OrderEvent;
use seckill_gateway::engine::{OrderStatus, keys};
use seckill_gateway::ids::shard_of;
use seckill_gateway::store::Store;
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-123";

fn item_body(stock: i64, limit: i64) -> Value {
    let now = system_now_ms();
    json!({
        "name": "pipeline test item", "price_cents": 100, "stock": stock, "per_user_limit": limit,
        "starts_at": rfc3339(now - 60_000), "ends_at": rfc3339(now + 3_600_000),
    })
}

async fn put_item(http: &reqwest::Client, base: &str, item: &str, stock: i64, limit: i64) {
    let r = http
        .put(format!("{base}/admin/v1/items/{item}"))
        .bearer_auth(ADMIN)
        .json(&item_body(stock, limit))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// Reserve one unit: `Ok(Some(order_id))` on 200, `Ok(None)` on a refusal, `Err` when the
/// answer never came (connection cut).
async fn reserve(http: &reqwest::Client, base: &str, item: &str, user: &str) -> Result<Option<String>, String> {
    let r = http
        .post(format!("{base}/api/v1/items/{item}/reserve"))
        .header("x-user-id", user)
        .json(&json!({"qty": 1}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = r.status();
    let body: Value = r.json().await.map_err(|e| e.to_string())?;
    if status == 200 {
        Ok(Some(body["order_id"].as_str().unwrap().to_owned()))
    } else {
        assert!(
            [409, 410, 503].contains(&status.as_u16()),
            "unexpected {status}: {body}"
        );
        Ok(None)
    }
}

fn gateway_args(redis: &RedisServer, db: &str) -> Vec<String> {
    [
        "x",
        "--listen",
        "127.0.0.1:0",
        "--redis-url",
        &redis.url(),
        "--database-url",
        db,
        "--admin-token",
        ADMIN,
        "--rate-global",
        "0",
        "--rate-per-user",
        "0",
        "--rate-per-ip",
        "0",
        "--demo",
        "false",
        "--store-timeout",
        "1s",
        "--claim-idle",
        "1s",
        "--max-deliveries",
        "3",
        "--persist-wait",
        "10ms",
        "--consumer-name",
        "in-process",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect()
}

async fn store(db: &str) -> Store {
    Store::connect(db, Duration::from_secs(5)).await.unwrap()
}

/// Poll until `f` is true, or fail after `secs`.
async fn eventually<F, Fut>(secs: u64, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// The real binary, run against the test's servers.
struct Binary {
    child: Child,
    base: String,
}

impl Binary {
    fn start(redis: &RedisServer, db: &str, port: u16) -> Binary {
        let child = Command::new(env!("CARGO_BIN_EXE_seckill-gateway"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("SECKILL_LISTEN", format!("127.0.0.1:{port}"))
            .env("REDIS_URL", redis.url())
            .env("DATABASE_URL", db)
            .env("SECKILL_ADMIN_TOKEN", ADMIN)
            .env("SECKILL_RATE_PER_USER", "0")
            .env("SECKILL_RATE_PER_IP", "0")
            .env("SECKILL_CONSUMER_NAME", "killed-gateway")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start the gateway binary");
        Binary {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn ready(&self, http: &reqwest::Client) {
        let url = format!("{}/readyz", self.base);
        eventually(20, "the gateway answers /readyz", || async {
            http.get(&url).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
    }

    fn kill(&mut self) {
        self.child.kill().expect("SIGKILL");
        self.child.wait().unwrap();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn redis_conn(redis: &RedisServer) -> redis::aio::ConnectionManager {
    redis::aio::ConnectionManager::new(redis.client()).await.unwrap()
}

async fn hget_i64(conn: &mut redis::aio::ConnectionManager, key: &str, field: &str) -> i64 {
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async::<Option<i64>>(conn)
        .await
        .unwrap()
        .unwrap_or(0)
}

async fn rows(store: &Store, item: &str) -> Vec<seckill_gateway::engine::Order> {
    store.orders(Some(item)).await.unwrap()
}

/// Acceptance 1 and 4: SIGKILL mid-burst, restart, quiet: every 200 is a row, every row was
/// a 200 or a request cut off by the kill, no duplicate, rows ≤ stock; reconcile is clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_burst_loses_no_acknowledged_order() {
    let redis = RedisServer::start();
    let db = shared_pg();
    let port = free_port();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut gw = Binary::start(&redis, &db, port);
    gw.ready(&http).await;
    let item = unique("kill");
    let stock = 400;
    put_item(&http, &gw.base, &item, stock, 1).await;

    // 1,500 shoppers, 64 in flight; SIGKILL once a few hundred answers are in.
    let answered = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(64));
    let mut tasks = Vec::new();
    for i in 0..1500 {
        let (http, base, item, answered, sem) = (
            http.clone(),
            gw.base.clone(),
            item.clone(),
            answered.clone(),
            sem.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await.unwrap();
            let user = format!("u{i}");
            let r = reserve(&http, &base, &item, &user).await;
            answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            (user, r)
        }));
    }
    while answered.load(std::sync::atomic::Ordering::SeqCst) < 250 {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    gw.kill();
    let mut ok: HashMap<String, String> = HashMap::new(); // order id → user
    let mut cut_off: HashSet<String> = HashSet::new();
    for t in tasks {
        let (user, r) = t.await.unwrap();
        match r {
            Ok(Some(order)) => {
                ok.insert(order, user);
            }
            Ok(None) => {}
            Err(_) => {
                cut_off.insert(user);
            }
        }
    }
    assert!(!ok.is_empty(), "some orders were acknowledged before the kill");
    assert!(!cut_off.is_empty(), "the kill cut some requests off");

    // Restart on the same port and consumer name: the worker drains its own pending first.
    let mut gw = Binary::start(&redis, &db, port);
    gw.ready(&http).await;
    let store = store(&db).await;
    let mut conn = redis_conn(&redis).await;
    let item_key = keys::item(&item);
    eventually(30, "every reservation Redis holds is a row", || {
        let (store, item, item_key, mut conn) = (&store, &item, item_key.clone(), conn.clone());
        async move {
            let held = hget_i64(&mut conn, &item_key, "reserved").await + hget_i64(&mut conn, &item_key, "paid").await;
            rows(store, item).await.len() as i64 == held
        }
    })
    .await;

    let rows = rows(&store, &item).await;
    let ids: HashSet<&str> = rows.iter().map(|r| r.order_id.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "no duplicate rows");
    assert!(rows.len() as i64 <= stock, "rows {} ≤ stock {stock}", rows.len());
    for (order, user) in &ok {
        assert!(
            ids.contains(order.as_str()),
            "acknowledged order {order} of {user} is missing"
        );
    }
    for r in &rows {
        assert!(
            ok.contains_key(&r.order_id) || cut_off.contains(&r.user_id),
            "row {} of {} was never answered 200 and its request was not cut off",
            r.order_id,
            r.user_id
        );
        assert_eq!(r.status, OrderStatus::Reserved);
    }
    let stock_left = hget_i64(&mut conn, &item_key, "stock").await;
    assert_eq!(stock_left, stock - rows.len() as i64, "stock = total − rows");

    let report = seckill_gateway::orders::reconcile::reconcile(&mut conn, &store, Some(&item), false)
        .await
        .unwrap();
    assert!(
        report.differences.is_empty(),
        "reconcile clean: {:?}",
        report.differences
    );
    gw.kill();
}

/// Acceptance 2: PostgreSQL stopped during a burst and started again: every order arrives,
/// none twice, and `/readyz` said degraded meanwhile (while still accepting reservations).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_is_buffered_and_drained() {
    let redis = RedisServer::start();
    let mut pg = PgServer::start();
    pg.create_database("orders");
    let db = pg.url("orders");
    let config = Config::from_args(gateway_args(&redis, &db)).unwrap();
    let gw = seckill_gateway::server::start(config, Clock::system(), true)
        .await
        .unwrap();
    let base = gw.url();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let item = unique("outage");
    put_item(&http, &base, &item, 1000, 1).await;

    let mut acknowledged = HashSet::new();
    for i in 0..100 {
        if let Some(o) = reserve(&http, &base, &item, &format!("a{i}")).await.unwrap() {
            acknowledged.insert(o);
        }
    }
    pg.stop();
    for i in 0..150 {
        let o = reserve(&http, &base, &item, &format!("b{i}")).await.unwrap();
        acknowledged.insert(o.expect("reservations are accepted while the database is down"));
    }
    let ready: Value = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "degraded", "{ready}");
    assert!(ready["store"].as_str().unwrap().starts_with("down"), "{ready}");
    assert_eq!(acknowledged.len(), 250);

    pg.start_again();
    let store = store(&db).await;
    eventually(30, "all 250 orders persisted after the database came back", || {
        let (store, item) = (&store, &item);
        async move { rows(store, item).await.len() == 250 }
    })
    .await;
    let rows = rows(&store, &item).await;
    let ids: HashSet<String> = rows.iter().map(|r| r.order_id.clone()).collect();
    assert_eq!(ids, acknowledged, "exactly the acknowledged orders, none twice");
    let ready: Value = http
        .get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready", "{ready}");
    gw.stop().await;
}

fn event(order: &str, item: &str, status: OrderStatus, at: i64) -> OrderEvent {
    OrderEvent {
        status,
        order_id: order.into(),
        item_id: item.into(),
        user_id: "u1".into(),
        qty: 1,
        at_ms: at,
        created_ms: 1_000,
        pay_before_ms: 901_000,
        idem_key: String::new(),
    }
}

/// Acceptance 3: the same events applied twice, and out of order, on both databases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivered_and_reordered_events_are_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    for db in [shared_pg(), format!("sqlite://{}/r.db", dir.path().display())] {
        let store = store(&db).await;
        let item = unique("redeliver");
        let (a, b, c) = (unique("a"), unique("b"), unique("c"));
        let reserved = event(&a, &item, OrderStatus::Reserved, 1_000);
        let paid = event(&a, &item, OrderStatus::Paid, 2_000);
        store.apply(std::slice::from_ref(&reserved)).await.unwrap();
        store.apply(std::slice::from_ref(&reserved)).await.unwrap();
        store.apply(std::slice::from_ref(&paid)).await.unwrap();
        // Redelivered `reserved` after `paid`: nothing moves back.
        store
            .apply(&[reserved.clone(), paid.clone(), reserved.clone()])
            .await
            .unwrap();
        // Out of order: `cancelled` arrives before `reserved`.
        store
            .apply(&[event(&b, &item, OrderStatus::Cancelled, 3_000)])
            .await
            .unwrap();
        store
            .apply(&[event(&b, &item, OrderStatus::Reserved, 1_000)])
            .await
            .unwrap();
        // A final status never changes into another final one.
        store
            .apply(&[
                event(&c, &item, OrderStatus::Reserved, 1_000),
                event(&c, &item, OrderStatus::Expired, 5_000),
            ])
            .await
            .unwrap();
        store
            .apply(&[event(&c, &item, OrderStatus::Paid, 6_000)])
            .await
            .unwrap();

        let got: HashMap<String, OrderStatus> = rows(&store, &item)
            .await
            .into_iter()
            .map(|o| (o.order_id, o.status))
            .collect();
        assert_eq!(got.len(), 3, "{db}: one row per order");
        assert_eq!(got[&a], OrderStatus::Paid, "{db}");
        assert_eq!(got[&b], OrderStatus::Cancelled, "{db}");
        assert_eq!(got[&c], OrderStatus::Expired, "{db}");
    }
}

/// Acceptance 3: a poison event goes to the dead-letter stream after a few deliveries and
/// does not hold up the events behind it. Acceptance 4: reconcile reports a planted
/// difference (a row deleted by hand), repairs it with `--repair`, then reports clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_event_dead_letters_and_reconcile_repairs() {
    let redis = RedisServer::start();
    let db = shared_pg();
    let item = unique("poison");
    let shard = shard_of(&item);
    let mut conn = redis_conn(&redis).await;
    // The poison entry is in the stream before the worker starts.
    let _: String = redis::cmd("XADD")
        .arg(keys::events(shard))
        .arg("*")
        .arg("type")
        .arg("teleported")
        .arg("order_id")
        .arg("x")
        .query_async(&mut conn)
        .await
        .unwrap();
    let config = Config::from_args(gateway_args(&redis, &db)).unwrap();
    let gw = seckill_gateway::server::start(config, Clock::system(), true)
        .await
        .unwrap();
    let base = gw.url();
    let http = reqwest::Client::new();
    put_item(&http, &base, &item, 10, 1).await;
    let mut acknowledged = HashSet::new();
    for i in 0..5 {
        acknowledged.insert(reserve(&http, &base, &item, &format!("p{i}")).await.unwrap().unwrap());
    }
    let store = store(&db).await;
    eventually(20, "the good events are persisted", || {
        let (store, item) = (&store, &item);
        async move { rows(store, item).await.len() == 5 }
    })
    .await;
    let dead = keys::dead_letters(shard);
    eventually(20, "the poison event reaches the dead-letter stream", || {
        let (mut conn, dead) = (conn.clone(), dead.clone());
        async move {
            redis::cmd("XLEN")
                .arg(&dead)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
                == 1
        }
    })
    .await;
    let letters: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
        .arg(&dead)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(letters[0].1["f:type"], "teleported");
    assert!(
        letters[0].1["error"].contains("unknown event type"),
        "{:?}",
        letters[0].1
    );
    let metrics = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("seckill_dead_letters_total 1"), "dead letter counted");

    // Reconcile through the real CLI: clean, then a planted difference, repaired.
    let cli = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_seckill-gateway"))
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("REDIS_URL", redis.url())
            .env("DATABASE_URL", &db)
            .arg("reconcile")
            .args(["--item", &item])
            .args(args)
            .output()
            .unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (code, out) = cli(&[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("clean"), "{out}");

    let victim = acknowledged.iter().next().unwrap().clone();
    assert_eq!(store.delete_order(&victim).await.unwrap(), 1);
    let (code, out) = cli(&[]);
    assert_eq!(code, Some(1), "a difference exits 1: {out}");
    assert!(out.contains(&victim) && out.contains("missing_in_database"), "{out}");

    let (code, out) = cli(&["--repair"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("repaired (events re-emitted): 1"), "{out}");
    eventually(20, "the re-emitted event is persisted", || {
        let (store, victim) = (&store, &victim);
        async move { store.order(victim).await.unwrap().is_some() }
    })
    .await;
    let (code, out) = cli(&[]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("clean"), "{out}");
    gw.stop().await;
}

/// The worker runs apart from the front door (`seckill-gateway worker` is
/// `server::start(.., serve_http: false)`): a gateway without workers takes reservations, a
/// worker-only instance persists them, and acknowledged entries are trimmed from the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_worker_persists_and_trims() {
    let redis = RedisServer::start();
    let db = shared_pg();
    let mut front = gateway_args(&redis, &db);
    front.extend(["--workers", "false"].map(str::to_owned));
    let gw = seckill_gateway::server::start(Config::from_args(front).unwrap(), Clock::system(), true)
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let item = unique("apart");
    put_item(&http, &gw.url(), &item, 100, 1).await;
    let mut acknowledged = HashSet::new();
    for i in 0..40 {
        acknowledged.insert(
            reserve(&http, &gw.url(), &item, &format!("w{i}"))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let mut conn = redis_conn(&redis).await;
    let stream = keys::events(shard_of(&item));
    let queued: i64 = redis::cmd("XLEN").arg(&stream).query_async(&mut conn).await.unwrap();
    assert_eq!(queued, 40, "nothing persisted or trimmed without a worker");

    let worker_args = gateway_args(&redis, &db);
    let worker = seckill_gateway::server::start(Config::from_args(worker_args).unwrap(), Clock::system(), false)
        .await
        .unwrap();
    let store = store(&db).await;
    eventually(20, "the worker-only instance persists every order", || {
        let (store, item) = (&store, &item);
        async move { rows(store, item).await.len() == 40 }
    })
    .await;
    let ids: HashSet<String> = rows(&store, &item).await.into_iter().map(|o| o.order_id).collect();
    assert_eq!(ids, acknowledged);
    eventually(20, "acknowledged entries are trimmed", || {
        let (mut conn, stream) = (conn.clone(), stream.clone());
        async move {
            redis::cmd("XLEN")
                .arg(&stream)
                .query_async::<i64>(&mut conn)
                .await
                .unwrap()
                <= 1
        }
    })
    .await;
    worker.stop().await;
    gw.stop().await;
}
