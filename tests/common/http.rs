//! The one HTTP vocabulary of the tests: [`Api`] (the routes of one gateway,
//! in-process or a real process), [`Reply`] (one answer, read whole),
//! [`send`] / [`try_send`], and [`item_body`] (the admin body of an item).

use std::time::{Duration, Instant};

use reqwest::{RequestBuilder, StatusCode};
use seckill_gateway::clock::{Clock, rfc3339};
use serde_json::{Value, json};

use super::unique;

/// The admin token every test gateway is started with.
pub const ADMIN_TOKEN: &str = "admin-token-123";
pub const MINUTE_MS: i64 = 60_000;
pub const HOUR_MS: i64 = 3_600_000;

/// A reqwest client that never uses a proxy from the environment.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// One HTTP answer, read whole.
#[derive(Debug)]
pub struct Reply {
    /// What was asked: `POST /api/v1/items/x/reserve (user alice)`.
    pub request: String,
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

    /// "ok" for a 2xx, else the `error` code of the refusal.
    pub fn code(&self) -> &str {
        if self.status.is_success() { "ok" } else { self.error() }
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

    /// The `order_id` of a 200 (asserts both).
    #[track_caller]
    pub fn order_id(&self) -> String {
        self.assert_ok()["order_id"]
            .as_str()
            .expect("order_id is a string")
            .to_owned()
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

/// Send and read the whole answer; `Err` when none came (refused, cut, timed out).
pub async fn try_send(req: RequestBuilder) -> Result<Reply, reqwest::Error> {
    let (http, req) = req.build_split();
    let req = req?;
    let mut request = format!("{} {}", req.method(), req.url().path());
    if let Some(user) = req.headers().get("x-user-id").and_then(|v| v.to_str().ok()) {
        request.push_str(&format!(" (user {user})"));
    }
    let started = Instant::now();
    let resp = http.execute(req).await?;
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await?;
    let json = serde_json::from_str(&text).unwrap_or(Value::Null);
    Ok(Reply {
        request,
        status,
        headers,
        text,
        json,
        elapsed: started.elapsed(),
    })
}

/// Send and read the whole answer; panics when none came.
pub async fn send(req: RequestBuilder) -> Reply {
    try_send(req).await.unwrap_or_else(|e| panic!("HTTP request: {e}"))
}

/// Sends `req` again and again (see [`super::poll`]) until the answer satisfies `done`,
/// for at most `within`; that answer, or `None`.
pub async fn send_until(within: Duration, req: RequestBuilder, done: impl Fn(&Reply) -> bool) -> Option<Reply> {
    super::poll(within, async || {
        let r = send(req.try_clone().expect("a request with a plain body")).await;
        done(&r).then_some(r)
    })
    .await
}

/// A request the gateway must answer, sent again after a 429 (the bucket
/// refills) for at most 30 s; panics when no answer came.
pub async fn send_past_rate_limit(req: RequestBuilder) -> Reply {
    for _ in 0..30 {
        let again = req.try_clone().expect("a request with a plain body");
        let r = try_send(again).await.unwrap_or_else(|e| panic!("no answer: {e}"));
        if r.status != StatusCode::TOO_MANY_REQUESTS {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(1_100)).await;
    }
    panic!("still rate limited after 30 s");
}

/// The admin body of an item (`PUT /admin/v1/items/{id}`).
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

/// What a request says besides its route.
pub trait RequestExt {
    /// The shopper (`X-User-Id`).
    fn user(self, user: &str) -> Self;
    /// A body sent as JSON whatever it holds (`Content-Type: application/json`).
    fn raw_json(self, body: impl Into<Vec<u8>>) -> Self;
}

impl RequestExt for RequestBuilder {
    fn user(self, user: &str) -> Self {
        self.header("x-user-id", user)
    }

    fn raw_json(self, body: impl Into<Vec<u8>>) -> Self {
        self.header("content-type", "application/json").body(body.into())
    }
}

/// The routes of one gateway at `url`, in-process or a real process. Item
/// windows are placed on `clock`: the gateway's own for an in-process one.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub http: reqwest::Client,
    pub clock: Clock,
}

impl Api {
    /// `url` (`http://127.0.0.1:PORT`) on the system clock.
    pub fn new(url: String) -> Api {
        Api::with_clock(url, Clock::system())
    }

    pub fn with_clock(url: String, clock: Clock) -> Api {
        Api {
            url,
            http: client(),
            clock,
        }
    }

    /// Now on the clock item windows are placed on.
    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    pub fn get(&self, path: &str) -> RequestBuilder {
        self.http.get(format!("{}{path}", self.url))
    }

    pub fn post(&self, path: &str) -> RequestBuilder {
        self.http.post(format!("{}{path}", self.url))
    }

    pub fn put(&self, path: &str) -> RequestBuilder {
        self.http.put(format!("{}{path}", self.url))
    }

    /// With the admin token.
    pub fn admin(&self, req: RequestBuilder) -> RequestBuilder {
        req.bearer_auth(ADMIN_TOKEN)
    }

    /// `PUT /admin/v1/items/{id}` with the admin token.
    pub async fn put_item_body(&self, item: &str, body: &Value) -> Reply {
        send(self.admin(self.put(&format!("/admin/v1/items/{item}"))).json(body)).await
    }

    /// `PUT` an item on sale now (for an hour, from a minute ago), as answered.
    pub async fn put_item(&self, item: &str, stock: i64, limit: i64) -> Reply {
        let now = self.now_ms();
        self.put_item_body(item, &item_body(stock, limit, now - MINUTE_MS, now + HOUR_MS))
            .await
    }

    /// [`Self::put_item`] again and again until it is stored (200), for at
    /// most `within`: the engine may be coming back, or busy.
    pub async fn put_item_within(&self, within: Duration, item: &str, stock: i64, limit: i64) -> Option<Reply> {
        let now = self.now_ms();
        let body = item_body(stock, limit, now - MINUTE_MS, now + HOUR_MS);
        let req = self.admin(self.put(&format!("/admin/v1/items/{item}"))).json(&body);
        send_until(within, req, |r| r.status == StatusCode::OK).await
    }

    /// Create an item on sale now (for an hour); asserts 200.
    pub async fn create_item(&self, item: &str, stock: i64, limit: i64) -> Value {
        let now = self.now_ms();
        self.create_item_window(item, stock, limit, now - MINUTE_MS, now + HOUR_MS)
            .await
    }

    pub async fn create_item_window(&self, item: &str, stock: i64, limit: i64, starts_ms: i64, ends_ms: i64) -> Value {
        let r = self
            .put_item_body(item, &item_body(stock, limit, starts_ms, ends_ms))
            .await;
        r.assert_ok().clone()
    }

    /// A new item (`item_…`, a [`unique`] id) on sale now; returns its id.
    pub async fn new_item(&self, stock: i64, limit: i64) -> String {
        let item = unique("item");
        self.create_item(&item, stock, limit).await;
        item
    }

    pub async fn get_item(&self, item: &str) -> Reply {
        send(self.get(&format!("/api/v1/items/{item}"))).await
    }

    /// `POST …/reserve` as `user` with no body (qty 1).
    pub async fn reserve(&self, item: &str, user: &str) -> Reply {
        send(self.reserve_req(item, user)).await
    }

    pub fn reserve_req(&self, item: &str, user: &str) -> RequestBuilder {
        self.post(&format!("/api/v1/items/{item}/reserve")).user(user)
    }

    /// Reserve and assert 200; returns the order id.
    pub async fn reserve_ok(&self, item: &str, user: &str) -> String {
        self.reserve(item, user).await.order_id()
    }

    pub fn pay_req(&self, order: &str, user: &str) -> RequestBuilder {
        self.post(&format!("/api/v1/orders/{order}/pay")).user(user)
    }

    pub async fn pay(&self, order: &str, user: &str) -> Reply {
        send(self.pay_req(order, user)).await
    }

    pub fn cancel_req(&self, order: &str, user: &str) -> RequestBuilder {
        self.post(&format!("/api/v1/orders/{order}/cancel")).user(user)
    }

    pub async fn cancel(&self, order: &str, user: &str) -> Reply {
        send(self.cancel_req(order, user)).await
    }

    pub fn order_req(&self, order: &str, user: &str) -> RequestBuilder {
        self.get(&format!("/api/v1/orders/{order}")).user(user)
    }

    pub async fn get_order(&self, order: &str, user: &str) -> Reply {
        send(self.order_req(order, user)).await
    }

    pub async fn stats(&self, item: &str) -> Reply {
        send(self.admin(self.get(&format!("/admin/v1/items/{item}/stats")))).await
    }

    /// `GET /readyz`, as answered.
    pub async fn readyz(&self) -> Reply {
        send(self.get("/readyz")).await
    }

    /// `GET /readyz` until its `status` is `status` (it answers from a health check made
    /// every half second: a change shows within about a second), at most 5 s; the last
    /// answer.
    pub async fn readyz_until(&self, status: &str) -> Reply {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let r = self.readyz().await;
            if r.json["status"] == status || std::time::Instant::now() >= deadline {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `GET /metrics`; asserts 200.
    pub async fn metrics(&self) -> String {
        let r = send(self.get("/metrics")).await;
        assert_eq!(r.status, StatusCode::OK);
        r.text
    }
}

/// The value of the unlabelled sample `name` in a `/metrics` text; panics without one.
#[track_caller]
pub fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} sample in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}
