//! A whole gateway started in-process on `127.0.0.1:0` against a test's own
//! `redis-server` (mini-redis `tests/server.rs`), and the HTTP and Redis
//! helpers the black-box tests share: [`Gateway`], [`Reply`], [`Redis`].
//!
//! Every flag that has an environment fallback is passed explicitly, so a
//! `REDIS_URL` or `SECKILL_*` variable of the machine never leaks into a test.

// Each test binary includes this module and uses only part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use reqwest::StatusCode;
use seckill_gateway::clock::{Clock, rfc3339};
use seckill_gateway::config::Config;
use seckill_gateway::server::Running;
use serde_json::{Value, json};

pub const ADMIN_TOKEN: &str = "admin-token-123";
pub const HOUR_MS: i64 = 3_600_000;

/// The flags a test gateway starts with; a test overrides any of them with
/// [`Gateway::builder`]`.flag(name, value)` or drops one with `.without(name)`.
fn default_flags(redis_url: &str, db_url: &str) -> Vec<(String, String)> {
    [
        ("--listen", "127.0.0.1:0"),
        ("--redis-url", redis_url),
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

    pub fn clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub async fn start(self) -> Gateway {
        let mut args = vec!["seckill-gateway".to_owned()];
        let mut consumer = false;
        for (k, v) in &self.flags {
            consumer |= k == "--consumer-name";
            args.push(k.clone());
            args.push(v.clone());
        }
        if !consumer {
            args.push("--consumer-name".into());
            args.push(crate::common::unique("consumer"));
        }
        let config = Config::from_args(&args).expect("test gateway flags parse");
        let running = seckill_gateway::server::start(config, self.clock, true)
            .await
            .expect("test gateway starts");
        let url = running.url();
        Gateway {
            running: Some(running),
            url,
            http: client(),
            _dir: self.dir,
        }
    }
}

/// A reqwest client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// A running in-process gateway with its own SQLite order store.
pub struct Gateway {
    pub running: Option<Running>,
    pub url: String,
    pub http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// One HTTP answer, read whole.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub text: String,
    /// The body as JSON (`Null` when it is not JSON).
    pub json: Value,
    pub elapsed: Duration,
}

impl Reply {
    /// The `error` code of a refusal ("" when absent).
    pub fn error(&self) -> &str {
        self.json["error"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Assert a refusal: status, `error` code and a non-empty `message`.
    #[track_caller]
    pub fn assert_refused(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status.as_u16(), self.error()),
            (status, code),
            "expected {status} {code}, got {} {}",
            self.status,
            self.text
        );
        assert!(
            self.json["message"].as_str().is_some_and(|m| !m.is_empty()),
            "a refusal carries a message: {}",
            self.text
        );
    }

    #[track_caller]
    pub fn assert_ok(&self) -> &Value {
        assert_eq!(self.status, StatusCode::OK, "expected 200, got {}", self.text);
        &self.json
    }

    /// `Retry-After` in whole seconds (asserts it is there).
    #[track_caller]
    pub fn retry_after(&self) -> u64 {
        self.header("retry-after")
            .unwrap_or_else(|| panic!("no Retry-After on {} {}", self.status, self.text))
            .parse()
            .expect("Retry-After is whole seconds")
    }
}

pub async fn send(req: reqwest::RequestBuilder) -> Reply {
    let started = Instant::now();
    let resp = req.send().await.expect("HTTP request");
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.expect("HTTP body");
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        text,
        json,
        elapsed: started.elapsed(),
    }
}

/// The admin body of an item.
pub fn item_body(stock: i64, limit: i64, starts_ms: i64, ends_ms: i64) -> Value {
    json!({
        "name": "Test item",
        "price_cents": 1999,
        "stock": stock,
        "per_user_limit": limit,
        "starts_at": rfc3339(starts_ms),
        "ends_at": rfc3339(ends_ms),
    })
}

impl Gateway {
    pub fn builder(redis_url: &str) -> Builder {
        let dir = tempfile::Builder::new()
            .prefix("seckill-gw-")
            .tempdir()
            .expect("temporary directory for the SQLite store");
        let db = format!("sqlite://{}/orders.db", dir.path().display());
        Builder {
            flags: default_flags(redis_url, &db),
            clock: Clock::system(),
            dir,
        }
    }

    /// A gateway with the default test flags and the system clock.
    pub async fn start(redis_url: &str) -> Gateway {
        Self::builder(redis_url).start().await
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("gateway running")
    }

    pub fn clock(&self) -> &Clock {
        &self.running().app.clock
    }

    /// Now on the gateway's clock (the system clock corrected to Redis TIME, or the
    /// manual clock of the test).
    pub fn now_ms(&self) -> i64 {
        self.clock().now_ms()
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop().await;
        }
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.get(format!("{}{path}", self.url))
    }

    pub fn post(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.post(format!("{}{path}", self.url))
    }

    pub fn put(&self, path: &str) -> reqwest::RequestBuilder {
        self.http.put(format!("{}{path}", self.url))
    }

    pub fn admin(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        req.bearer_auth(ADMIN_TOKEN)
    }

    /// `PUT /admin/v1/items/{id}` with the admin token.
    pub async fn put_item_body(&self, item: &str, body: &Value) -> Reply {
        send(self.admin(self.put(&format!("/admin/v1/items/{item}"))).json(body)).await
    }

    /// Create an item on sale now (for an hour, on the gateway's clock); asserts 200.
    pub async fn create_item(&self, item: &str, stock: i64, limit: i64) -> Value {
        let now = self.now_ms();
        self.create_item_window(item, stock, limit, now - 60_000, now + HOUR_MS)
            .await
    }

    pub async fn create_item_window(&self, item: &str, stock: i64, limit: i64, starts_ms: i64, ends_ms: i64) -> Value {
        let r = self
            .put_item_body(item, &item_body(stock, limit, starts_ms, ends_ms))
            .await;
        r.assert_ok().clone()
    }

    pub async fn get_item(&self, item: &str) -> Reply {
        send(self.get(&format!("/api/v1/items/{item}"))).await
    }

    /// `POST …/reserve` as `user` with no body (qty 1).
    pub async fn reserve(&self, item: &str, user: &str) -> Reply {
        send(self.reserve_req(item, user)).await
    }

    pub fn reserve_req(&self, item: &str, user: &str) -> reqwest::RequestBuilder {
        self.post(&format!("/api/v1/items/{item}/reserve"))
            .header("x-user-id", user)
    }

    /// Reserve and assert 200; returns the order id.
    pub async fn reserve_ok(&self, item: &str, user: &str) -> String {
        let r = self.reserve(item, user).await;
        r.assert_ok()["order_id"]
            .as_str()
            .expect("order_id is a string")
            .to_owned()
    }

    pub async fn pay(&self, order: &str, user: &str) -> Reply {
        send(
            self.post(&format!("/api/v1/orders/{order}/pay"))
                .header("x-user-id", user),
        )
        .await
    }

    pub async fn cancel(&self, order: &str, user: &str) -> Reply {
        send(
            self.post(&format!("/api/v1/orders/{order}/cancel"))
                .header("x-user-id", user),
        )
        .await
    }

    pub async fn get_order(&self, order: &str, user: &str) -> Reply {
        send(self.get(&format!("/api/v1/orders/{order}")).header("x-user-id", user)).await
    }

    pub async fn stats(&self, item: &str) -> Reply {
        send(self.admin(self.get(&format!("/admin/v1/items/{item}/stats")))).await
    }

    pub async fn metrics(&self) -> String {
        let r = send(self.get("/metrics")).await;
        assert_eq!(r.status, StatusCode::OK);
        r.text
    }
}

/// Poll `f` every 50 ms until it returns `Some`, for at most `within`.
pub async fn poll<T, F, Fut>(within: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------
// Redis, read directly: the side effects behind the HTTP answers.

pub struct Redis {
    pub conn: MultiplexedConnection,
}

/// One stream entry: its fields.
pub type Event = HashMap<String, String>;

impl Redis {
    pub async fn connect(client: &redis::Client) -> Redis {
        Redis {
            conn: client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to the test redis-server"),
        }
    }

    pub async fn item(&mut self, item: &str) -> HashMap<String, String> {
        let key = seckill_gateway::engine::keys::item(item);
        self.conn.hgetall(key).await.expect("HGETALL item")
    }

    /// An integer field of the item hash (0 when absent).
    pub async fn item_field(&mut self, item: &str, field: &str) -> i64 {
        let key = seckill_gateway::engine::keys::item(item);
        let v: Option<i64> = self.conn.hget(key, field).await.expect("HGET item");
        v.unwrap_or(0)
    }

    pub async fn buyers(&mut self, item: &str) -> HashMap<String, i64> {
        let key = seckill_gateway::engine::keys::buyers(item);
        self.conn.hgetall(key).await.expect("HGETALL buyers")
    }

    pub async fn order(&mut self, order: &str) -> HashMap<String, String> {
        let key = seckill_gateway::engine::keys::order(order).expect("one of our order ids");
        self.conn.hgetall(key).await.expect("HGETALL order")
    }

    /// Every event of the item's shard stream that names `item`, oldest first.
    pub async fn events(&mut self, item: &str) -> Vec<Event> {
        let key = seckill_gateway::engine::keys::events(seckill_gateway::ids::shard_of(item));
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query_async(&mut self.conn)
            .await
            .expect("XRANGE events");
        // Each entry decoded (the scripts write one packed field), shown as named fields.
        entries
            .into_iter()
            .map(|(id, fields)| {
                let ev = seckill_gateway::domain::OrderEvent::from_fields(&fields)
                    .unwrap_or_else(|e| panic!("stream entry {id}: {e}"));
                ev.named_fields()
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect::<HashMap<String, String>>()
            })
            .filter(|f| f.get("item_id").map(String::as_str) == Some(item))
            .collect()
    }

    pub async fn xlen(&mut self, item: &str) -> i64 {
        let key = seckill_gateway::engine::keys::events(seckill_gateway::ids::shard_of(item));
        self.conn.xlen(key).await.expect("XLEN")
    }

    pub async fn reset_stats(&mut self) {
        let () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut self.conn)
            .await
            .expect("CONFIG RESETSTAT");
    }

    /// `INFO commandstats` as command name → calls (`cmdstat_evalsha` → `evalsha`).
    pub async fn command_calls(&mut self) -> HashMap<String, u64> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn)
            .await
            .expect("INFO commandstats");
        parse_commandstats(&info)
    }
}

/// Parse `cmdstat_<name>:calls=N,usec=…` lines.
pub fn parse_commandstats(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}
