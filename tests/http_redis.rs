//! The gateway over HTTP against a real `redis-server` (one per test, on a free
//! port), black-box: every route and every status the contract
//! (`docs/contract.md`) lists for it, the concurrency and idempotency
//! guarantees, the Redis commands the early answers save, a Redis outage and
//! recovery, and graceful shutdown. Issue 2, acceptance 1–5.
//!
//! Side effects are read from Redis directly (key layout: `docs/internals.md`).

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::gateway::{Backend, GAUGE_LOCK, Gateway, on_backend, on_redis};
use common::http::{ADMIN_TOKEN, HOUR_MS, Reply, item_body, metric_value, send, send_until};
use common::inspect::{Event, Redis};
use common::{poll, unique};
use futures_util::StreamExt;
use seckill_gateway::clock::{parse_rfc3339, system_now_ms};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

common::on_both!(
    item_get_answers_each_state_and_refusal,
    reserve_answers_every_contract_status,
    admin_put_validates_and_needs_the_token,
    stats_and_orders_csv,
    stats_count_units_and_rows_apart,
    plain_routes_and_unknown_routes,
    concurrent_reservations_sell_exactly_the_stock,
    idempotent_retry_returns_the_same_order,
    item_changes_reach_every_instance,
    unknown_item_ids_cost_no_redis_command,
    sold_out_answers_after_the_first_cost_no_redis_command,
);

/// Commands the gateway sends on its own, whatever the requests: the clock
/// sync (`TIME`), the pub/sub subscription, and what the test itself sends.
const BACKGROUND: &[&str] = &["time", "subscribe", "ping", "info", "config", "hello", "client"];

/// Calls of every command the gateway sent that is not background noise.
fn foreground(calls: &HashMap<String, u64>) -> HashMap<String, u64> {
    calls
        .iter()
        .filter(|(name, _)| !BACKGROUND.contains(&name.as_str()) && !name.starts_with("client|"))
        .filter(|(name, _)| !name.starts_with("config|"))
        .map(|(k, v)| (k.clone(), *v))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn calls_of(calls: &HashMap<String, u64>, names: &[&str]) -> u64 {
    names.iter().map(|n| calls.get(*n).copied().unwrap_or(0)).sum()
}

/// The value of an unlabelled metric line (`name value`).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

// ---------------------------------------------------------------------------
// Acceptance 1: every route, every status.

async fn item_get_answers_each_state_and_refusal(backend: Backend) {
    let (_redis, _, gw) = on_backend(backend, |b| b).await;
    let now = gw.now_ms();
    let active = unique("active");
    let upcoming = unique("upcoming");
    let sold_out = unique("soldout");
    let ended = unique("ended");
    gw.create_item_window(&active, 5, 2, now - 60_000, now + HOUR_MS).await;
    gw.create_item_window(&upcoming, 5, 2, now + HOUR_MS, now + 2 * HOUR_MS)
        .await;
    gw.create_item_window(&sold_out, 0, 1, now - 60_000, now + HOUR_MS)
        .await;
    gw.create_item_window(&ended, 5, 1, now - 2 * HOUR_MS, now - HOUR_MS)
        .await;

    let r = gw.get_item(&active).await;
    let v = r.assert_ok();
    assert_eq!(v["item_id"], json!(active));
    assert_eq!(v["name"], json!("Test item"));
    assert_eq!(v["price_cents"], json!(1999));
    assert_eq!(v["stock_total"], json!(5));
    assert_eq!(v["stock_remaining"], json!(5));
    assert_eq!(v["per_user_limit"], json!(2));
    assert_eq!(v["state"], json!("active"));
    let starts = parse_rfc3339(v["starts_at"].as_str().unwrap()).expect("starts_at is RFC 3339");
    let ends = parse_rfc3339(v["ends_at"].as_str().unwrap()).expect("ends_at is RFC 3339");
    assert_eq!((starts, ends), (now - 60_000, now + HOUR_MS));
    assert_eq!(r.header("content-type"), Some("application/json"), "JSON out");

    for (item, state) in [(&upcoming, "upcoming"), (&sold_out, "sold_out"), (&ended, "ended")] {
        let r = gw.get_item(item).await;
        assert_eq!(r.assert_ok()["state"], json!(state), "{item}: {}", r.text);
    }
    assert_eq!(gw.get_item(&sold_out).await.json["stock_remaining"], json!(0));

    // Selling the last unit turns an active item sold_out.
    let one = unique("one");
    gw.create_item(&one, 1, 1).await;
    gw.reserve_ok(&one, "u1").await;
    let r = gw.get_item(&one).await;
    assert_eq!(r.assert_ok()["state"], json!("sold_out"), "{}", r.text);
    assert_eq!(r.json["stock_remaining"], json!(0));

    gw.get_item(&unique("never")).await.assert_refused(404, "unknown_item");
    gw.get_item(&"a".repeat(65)).await.assert_refused(400, "bad_request");
    gw.get_item("a%20b").await.assert_refused(400, "bad_request");
    gw.get_item("a.b:c_d-1").await.assert_refused(404, "unknown_item");
}

async fn reserve_answers_every_contract_status(backend: Backend) {
    let (_redis, mut r, gw) = on_backend(backend, |b| b).await;
    let item = gw.new_item(10, 2).await;
    let path = format!("/api/v1/items/{item}/reserve");

    // 200 with every field.
    let started = system_now_ms();
    let ok = send(gw.reserve_req(&item, "alice").json(&json!({"qty": 1}))).await;
    let v = ok.assert_ok().clone();
    let order_id = v["order_id"].as_str().expect("order_id is a string");
    assert!(uuid_v7(order_id), "order id {order_id} is a UUIDv7");
    assert_eq!(v["item_id"], json!(item));
    assert_eq!(v["user_id"], json!("alice"));
    assert_eq!(v["qty"], json!(1));
    assert_eq!(v["status"], json!("reserved"));
    let pay_before = parse_rfc3339(v["pay_before"].as_str().unwrap()).expect("pay_before is RFC 3339");
    let expected = started + 15 * 60 * 1000;
    assert!(
        (expected - 5_000..=expected + 5_000).contains(&pay_before),
        "pay_before {pay_before} is about now + 15m ({expected})"
    );
    assert_eq!(r.item_field(&item, "stock").await, 9);
    // Body optional (none, or no bytes), qty defaults to 1; whitespace alone is no JSON.
    let v = gw.reserve(&item, "bob").await.assert_ok().clone();
    assert_eq!(v["qty"], json!(1));
    send(gw.reserve_req(&item, "carol").body(" \n"))
        .await
        .assert_refused(400, "bad_request");
    let v = send(gw.reserve_req(&item, "carol").body("")).await.assert_ok().clone();
    assert_eq!(v["qty"], json!(1));
    let v = send(gw.reserve_req(&item, "dave").json(&json!({"qty": 2})))
        .await
        .assert_ok()
        .clone();
    assert_eq!(v["qty"], json!(2));
    assert_eq!(r.item_field(&item, "stock").await, 5);

    // 400.
    let stock = r.item_field(&item, "stock").await;
    for body in ["{", "[1", "{\"qty\":\"one\"}", "{\"qty\":1.5}", "null x"] {
        send(gw.reserve_req(&item, "erin").body(body))
            .await
            .assert_refused(400, "bad_request");
    }
    for qty in [0, -1] {
        send(gw.reserve_req(&item, "erin").json(&json!({"qty": qty})))
            .await
            .assert_refused(400, "bad_request");
    }
    send(gw.reserve_req(&item, "erin").json(&json!({"qty": 3})))
        .await
        .assert_refused(400, "bad_request");
    for key in ["a b", "a/b", "", &"k".repeat(65)] {
        send(gw.reserve_req(&item, "erin").header("idempotency-key", key))
            .await
            .assert_refused(400, "bad_request");
    }
    send(
        gw.post(&format!("/api/v1/items/{}/reserve", "x".repeat(65)))
            .header("x-user-id", "erin"),
    )
    .await
    .assert_refused(400, "bad_request");
    assert_eq!(r.item_field(&item, "stock").await, stock, "refusals take no stock");

    // 401.
    send(gw.post(&path)).await.assert_refused(401, "unauthenticated");
    for user in ["", "bad user", &"u".repeat(65), "a/b"] {
        send(gw.post(&path).header("x-user-id", user))
            .await
            .assert_refused(401, "unauthenticated");
    }

    // 404.
    gw.reserve(&unique("never"), "erin")
        .await
        .assert_refused(404, "unknown_item");

    // 409: alice holds 1 of 2; 2 more is over the limit, dave holds 2.
    send(gw.reserve_req(&item, "alice").json(&json!({"qty": 2})))
        .await
        .assert_refused(409, "limit_reached");
    gw.reserve(&item, "dave").await.assert_refused(409, "limit_reached");

    // 410 sold out.
    let small = unique("small");
    gw.create_item(&small, 1, 1).await;
    gw.reserve_ok(&small, "alice").await;
    gw.reserve(&small, "bob").await.assert_refused(410, "sold_out");
    gw.reserve(&small, "carol").await.assert_refused(410, "sold_out");

    // 425 not started, 410 ended: nothing taken.
    let now = gw.now_ms();
    let later = unique("later");
    gw.create_item_window(&later, 5, 1, now + HOUR_MS, now + 2 * HOUR_MS)
        .await;
    let early = gw.reserve(&later, "alice").await;
    early.assert_refused(425, "not_started");
    let past = unique("past");
    gw.create_item_window(&past, 5, 1, now - 2 * HOUR_MS, now - HOUR_MS)
        .await;
    gw.reserve(&past, "alice").await.assert_refused(410, "ended");
    assert_eq!(r.item_field(&later, "stock").await, 5);
    assert_eq!(r.item_field(&past, "stock").await, 5);

    // 413: a body over 4 KiB, with and without a Content-Length.
    let big = format!("{{\"qty\":1,\"pad\":\"{}\"}}", "x".repeat(5000));
    send(gw.reserve_req(&item, "frank").body(big.clone()))
        .await
        .assert_refused(413, "payload_too_large");
    let just_under = format!("{{\"qty\":1,\"p\":\"{}\"}}", "x".repeat(4000));
    assert!(just_under.len() <= 4096);
    // Unknown fields are ignored by reserve; 4 KiB or less is read.
    send(gw.reserve_req(&item, "frank").body(just_under)).await.assert_ok();
    let chunked = raw_request(
        gw.running().addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nX-User-Id: gina\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{big}\r\n0\r\n\r\n",
            big.len()
        ),
    )
    .await;
    assert!(
        chunked.starts_with("HTTP/1.1 413"),
        "chunked body over 4 KiB: {chunked}"
    );
    assert!(chunked.contains("payload_too_large"), "{chunked}");
    assert_eq!(
        r.buyers(&item).await.get("gina"),
        None,
        "an oversized body takes nothing"
    );
}

/// Whether `id` is a hyphenated UUIDv7 (version nibble 7).
fn uuid_v7(id: &str) -> bool {
    id.len() == 36 && id.as_bytes()[14] == b'7' && id.chars().filter(|c| *c == '-').count() == 4
}

/// Send raw bytes on a new connection and read the answer until the server closes it.
async fn raw_request(addr: std::net::SocketAddr, request: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limited_users_get_429_with_retry_after() {
    let (_redis, _, gw) = on_redis(|b| b.flag("--rate-per-user", "1")).await;
    let item = gw.new_item(10, 5).await;
    gw.reserve_ok(&item, "alice").await;
    let r = gw.reserve(&item, "alice").await;
    r.assert_refused(429, "rate_limited");
    let secs = r.retry_after();
    assert!((1..=2).contains(&secs), "Retry-After {secs}");
    // Another user has a bucket of its own.
    gw.reserve_ok(&item, "bob").await;
    // After the wait, alice may buy again.
    tokio::time::sleep(Duration::from_secs(secs)).await;
    gw.reserve_ok(&item, "alice").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_takes_the_user_from_sub() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let secret = "0123456789abcdef-jwt";
    let (_redis, _, gw) = on_redis(|b| b.flag("--jwt-secret", secret)).await;
    let item = gw.new_item(10, 1).await;
    let token = |sub: &str, exp: i64, key: &str| {
        encode(
            &Header::default(),
            &json!({"sub": sub, "exp": exp}),
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let in_a_minute = system_now_ms() / 1000 + 60;
    let path = format!("/api/v1/items/{item}/reserve");

    let good = token("alice", in_a_minute, secret);
    let r = send(gw.post(&path).bearer_auth(&good)).await;
    assert_eq!(r.assert_ok()["user_id"], json!("alice"));
    send(gw.post(&path).bearer_auth(&good))
        .await
        .assert_refused(409, "limit_reached");

    let forged = token("bob", in_a_minute, "another-secret-0123");
    let expired = token("bob", system_now_ms() / 1000 - 3600, secret);
    let bad_sub = token("bad user", in_a_minute, secret);
    for auth in [
        format!("Bearer {forged}"),
        format!("Bearer {expired}"),
        format!("Bearer {bad_sub}"),
        "Bearer not.a.jwt".to_owned(),
        format!("Basic {good}"),
    ] {
        send(gw.post(&path).header("authorization", auth))
            .await
            .assert_refused(401, "unauthenticated");
    }
    // The trusted header means nothing in JWT mode.
    send(gw.post(&path).header("x-user-id", "bob"))
        .await
        .assert_refused(401, "unauthenticated");
    send(gw.post(&path)).await.assert_refused(401, "unauthenticated");
}

async fn admin_put_validates_and_needs_the_token(backend: Backend) {
    let (redis, mut rd, gw) = on_backend(backend, |b| b).await;
    let item = unique("item");
    let now = gw.now_ms();
    let body = item_body(7, 2, now - 1000, now + HOUR_MS);

    let r = gw.put_item_body(&item, &body).await;
    let v = r.assert_ok();
    assert_eq!(v["item_id"], json!(item));
    assert_eq!(v["stock_total"], json!(7));
    assert_eq!(v["stock_remaining"], json!(7));
    assert_eq!(v["state"], json!("active"));
    assert_eq!(rd.item_field(&item, "stock").await, 7);

    // Replacing keeps what is held: 1 reserved, new total 4 → 3 left.
    gw.reserve_ok(&item, "alice").await;
    let v = gw
        .put_item_body(&item, &item_body(4, 2, now - 1000, now + HOUR_MS))
        .await
        .assert_ok()
        .clone();
    assert_eq!(v["stock_remaining"], json!(3));
    assert_eq!(rd.item_field(&item, "stock").await, 3);
    // Below what is held: 400, nothing changed.
    gw.put_item_body(&item, &item_body(0, 2, now - 1000, now + HOUR_MS))
        .await
        .assert_refused(400, "bad_request");
    assert_eq!(rd.item_field(&item, "stock_total").await, 4);

    let other = unique("other");
    let mut invalid: Vec<(&str, Value)> = vec![
        ("stock < 0", item_body(-1, 1, now, now + HOUR_MS)),
        ("limit < 1", item_body(5, 0, now, now + HOUR_MS)),
        // Above 2^53 a Lua number is no longer an exact integer.
        ("stock too large", item_body(1 << 60, 1, now, now + HOUR_MS)),
        ("starts == ends", item_body(5, 1, now, now)),
        ("starts > ends", item_body(5, 1, now + HOUR_MS, now)),
    ];
    let mut bad_time = item_body(5, 1, now, now + HOUR_MS);
    bad_time["starts_at"] = json!("tomorrow");
    invalid.push(("bad time", bad_time));
    let mut no_zone = item_body(5, 1, now, now + HOUR_MS);
    no_zone["ends_at"] = json!("2030-01-01T00:00:00");
    invalid.push(("time without offset", no_zone));
    let mut unknown = item_body(5, 1, now, now + HOUR_MS);
    unknown["colour"] = json!("red");
    invalid.push(("unknown field", unknown));
    let mut missing = item_body(5, 1, now, now + HOUR_MS);
    missing.as_object_mut().unwrap().remove("stock");
    invalid.push(("missing field", missing));
    for (why, body) in invalid {
        let r = gw.put_item_body(&other, &body).await;
        assert_eq!(
            (r.status.as_u16(), r.error()),
            (400, "bad_request"),
            "{why}: {}",
            r.text
        );
    }
    let r = send(gw.admin(gw.put(&format!("/admin/v1/items/{other}"))).body("{")).await;
    r.assert_refused(400, "bad_request");
    let r = send(gw.admin(gw.put(&format!("/admin/v1/items/{other}")))).await;
    r.assert_refused(400, "bad_request");
    assert!(rd.item(&other).await.is_empty(), "no invalid item was stored");
    gw.get_item(&other).await.assert_refused(404, "unknown_item");

    // 403: no token, wrong token, another scheme.
    let put = || gw.put(&format!("/admin/v1/items/{other}")).json(&body);
    send(put()).await.assert_refused(403, "forbidden");
    send(put().bearer_auth("admin-token-124"))
        .await
        .assert_refused(403, "forbidden");
    send(put().bearer_auth("admin-token-1234"))
        .await
        .assert_refused(403, "forbidden");
    send(put().header("authorization", format!("Basic {ADMIN_TOKEN}")))
        .await
        .assert_refused(403, "forbidden");
    send(
        gw.get(&format!("/admin/v1/items/{item}/stats"))
            .bearer_auth("nope-nope"),
    )
    .await
    .assert_refused(403, "forbidden");
    send(gw.get(&format!("/admin/v1/items/{item}/orders.csv")))
        .await
        .assert_refused(403, "forbidden");
    assert!(rd.item(&other).await.is_empty());

    // A gateway without an admin token refuses the admin API, even with a token.
    assert!(
        std::env::var_os("SECKILL_ADMIN_TOKEN").is_none(),
        "unset SECKILL_ADMIN_TOKEN to run this test"
    );
    let closed = redis.builder().without("--admin-token").start().await;
    let r = send(
        closed
            .admin(closed.put(&format!("/admin/v1/items/{other}")))
            .json(&body),
    )
    .await;
    r.assert_refused(403, "forbidden");
    send(closed.admin(closed.get(&format!("/admin/v1/items/{item}/stats"))))
        .await
        .assert_refused(403, "forbidden");
    assert!(rd.item(&other).await.is_empty());
}

async fn stats_and_orders_csv(backend: Backend) {
    let (_redis, _, gw) = on_backend(backend, |b| b).await;
    let item = gw.new_item(10, 2).await;
    let o1 = gw.reserve_ok(&item, "alice").await;
    let o2 = gw.reserve_ok(&item, "bob").await;
    let o3 = gw.reserve_ok(&item, "carol").await;
    gw.pay(&o2, "bob").await.assert_ok();
    gw.cancel(&o3, "carol").await.assert_ok();

    let r = gw.stats(&item).await;
    let v = r.assert_ok();
    for (field, want) in [
        ("stock_total", 10),
        ("stock_remaining", 8),
        ("reserved", 1),
        ("paid", 1),
        ("cancelled", 1),
        ("expired", 0),
    ] {
        assert_eq!(v[field], json!(want), "{field} in {}", r.text);
    }
    assert_eq!(v["item_id"], json!(item));
    assert!(v["persisted"].is_i64(), "persisted is a count: {}", r.text);
    gw.stats(&unique("never")).await.assert_refused(404, "unknown_item");

    let csv_path = format!("/admin/v1/items/{item}/orders.csv");
    let r = send(gw.admin(gw.get(&csv_path))).await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text);
    assert!(
        r.header("content-type").is_some_and(|t| t.starts_with("text/csv")),
        "{:?}",
        r.headers
    );
    assert_eq!(
        r.header("content-disposition"),
        Some(format!("attachment; filename=\"{item}-orders.csv\"").as_str()),
        "a browser downloads it"
    );
    let header = "order_id,item_id,user_id,qty,status,created_at,pay_before,updated_at,price_cents";
    assert_eq!(r.text.lines().next(), Some(header));

    // Rows appear once the persistence worker has written the events.
    let want = HashMap::from([(o1, "reserved"), (o2, "paid"), (o3, "cancelled")]);
    let rows = poll(Duration::from_secs(10), || async {
        let r = send(gw.admin(gw.get(&csv_path))).await;
        let rows: HashMap<String, String> = r
            .text
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f.len() == 9).then(|| (f[0].to_owned(), f[4].to_owned()))
            })
            .collect();
        let done = want.iter().all(|(o, s)| rows.get(o).map(String::as_str) == Some(*s));
        done.then_some(rows)
    })
    .await;
    let rows = rows.expect("orders.csv lists the item's 3 orders with their statuses within 10 s (persistence worker)");
    assert_eq!(rows.len(), 3, "{rows:?}");
    let v = gw.stats(&item).await.assert_ok().clone();
    assert_eq!(v["persisted"], json!(3));
    assert_eq!(v["persisted_orders"], json!(3), "rows; persisted counts units");
    // Each row carries its unit price; revenue is the paid order's.
    let price = gw.get_item(&item).await.assert_ok()["price_cents"]
        .as_i64()
        .expect("price");
    let r = send(gw.admin(gw.get(&csv_path))).await;
    assert!(
        r.text.lines().skip(1).all(|l| l.ends_with(&format!(",{price}"))),
        "{}",
        r.text
    );
    assert_eq!(v["revenue_cents"], json!(price), "{v}");
    assert_eq!(
        (v["refunded"].clone(), v["refund_due_orders"].clone()),
        (json!(0), json!(0))
    );
}

/// Stats count units (`persisted` included) and rows apart (`persisted_orders`): with qty 2,
/// one order is two units.
async fn stats_count_units_and_rows_apart(backend: Backend) {
    let (_redis, _, gw) = on_backend(backend, |b| b).await;
    let item = gw.new_item(10, 2).await;
    send(gw.reserve_req(&item, "alice").json(&json!({"qty": 2})))
        .await
        .assert_ok();
    let stats = send_until(
        Duration::from_secs(10),
        gw.admin(gw.get(&format!("/admin/v1/items/{item}/stats"))),
        |r| r.json["persisted_orders"] == json!(1),
    )
    .await
    .expect("the order is persisted within 10 s");
    let v = &stats.json;
    assert_eq!(
        (
            &v["reserved"],
            &v["stock_remaining"],
            &v["persisted"],
            &v["persisted_orders"]
        ),
        (&json!(2), &json!(8), &json!(2), &json!(1)),
        "{v}"
    );
}

async fn plain_routes_and_unknown_routes(backend: Backend) {
    let (_redis, _, gw) = on_backend(backend, |b| b).await;

    let r = send(gw.get("/healthz")).await;
    assert_eq!(r.assert_ok()["status"], json!("ok"));
    let r = send(gw.get("/readyz")).await;
    let v = r.assert_ok();
    assert_eq!(v["engine"], json!("ok"), "{}", r.text);
    assert_eq!(v["mode"], json!("redis"));
    assert_eq!(v["status"], json!("ready"));

    let item = gw.new_item(3, 1).await;
    gw.reserve_ok(&item, "alice").await;
    let r = send(gw.get("/metrics")).await;
    assert_eq!(r.status.as_u16(), 200);
    assert!(r.header("content-type").is_some_and(|t| t.starts_with("text/plain")));
    assert!(r.text.contains("seckill_requests_total"), "{}", r.text);
    assert!(
        r.text.lines().any(|l| l.starts_with("seckill_requests_total{")
            && l.contains("route=\"reserve\"")
            && l.contains("outcome=\"ok\"")),
        "reserve/ok is counted"
    );
    assert!(
        r.text.contains("seckill_request_duration_seconds_bucket"),
        "histogram buckets"
    );

    for path in [
        "/",
        "/nope",
        "/api/v1/items",
        "/api/v1/items/x/y/z",
        "/api/v2/items/x",
        "/metrics/x",
    ] {
        let r = send(gw.get(path)).await;
        r.assert_refused(404, "not_found");
    }
    for (method, path) in [
        (reqwest::Method::POST, format!("/api/v1/items/{item}")),
        (reqwest::Method::GET, format!("/api/v1/items/{item}/reserve")),
        (reqwest::Method::DELETE, format!("/admin/v1/items/{item}")),
        (reqwest::Method::POST, "/healthz".to_owned()),
        (reqwest::Method::PUT, "/metrics".to_owned()),
        (reqwest::Method::GET, "/api/v1/orders/x/pay".to_owned()),
    ] {
        let r = send(gw.http.request(method.clone(), format!("{}{path}", gw.url))).await;
        assert_eq!(
            (r.status.as_u16(), r.error()),
            (405, "method_not_allowed"),
            "{method} {path}: {}",
            r.text
        );
    }
}

// ---------------------------------------------------------------------------
// Acceptance 2: concurrency.

async fn concurrent_reservations_sell_exactly_the_stock(backend: Backend) {
    // No persistence worker: the test reads the events in the stream, which a worker trims
    // once it has persisted them (every 2 s: a loaded machine's burst takes longer).
    let (_redis, mut rd, gw) = on_backend(backend, |b| b.flag("--workers", "false")).await;
    let item = unique("hot");
    gw.create_item(&item, 100, 1).await;

    let started = Instant::now();
    let replies: Vec<(String, Reply)> = futures_util::stream::iter(0..3000)
        .map(|i| {
            let user = format!("user-{}", i % 1000);
            let gw = &gw;
            let item = &item;
            async move {
                let r = gw.reserve(item, &user).await;
                (user, r)
            }
        })
        .buffer_unordered(200)
        .collect()
        .await;
    let took = started.elapsed();

    let mut by_code: HashMap<(u16, String), usize> = HashMap::new();
    let mut winners = HashSet::new();
    let mut orders = HashSet::new();
    for (user, r) in &replies {
        *by_code.entry((r.status.as_u16(), r.error().to_owned())).or_default() += 1;
        if r.status.as_u16() == 200 {
            assert_eq!(r.json["user_id"], json!(user));
            winners.insert(user.clone());
            orders.insert(r.json["order_id"].as_str().unwrap().to_owned());
        }
    }
    eprintln!("3000 reserves in {took:?}: {by_code:?}");
    assert_eq!(by_code.get(&(200, String::new())), Some(&100), "{by_code:?}");
    assert_eq!(winners.len(), 100, "100 distinct users");
    assert_eq!(orders.len(), 100, "100 distinct order ids");
    for (status, code) in by_code.keys() {
        assert!(
            matches!(
                (*status, code.as_str()),
                (200, "") | (409, "limit_reached") | (410, "sold_out")
            ),
            "unexpected answer {status} {code}: {by_code:?}"
        );
    }

    assert_eq!(rd.item_field(&item, "stock").await, 0);
    assert_eq!(rd.item_field(&item, "reserved").await, 100);
    let buyers = rd.buyers(&item).await;
    assert_eq!(buyers.keys().cloned().collect::<HashSet<_>>(), winners);
    assert!(buyers.values().all(|&n| n == 1));
    let events = rd.events(&item).await;
    let reserved: Vec<&Event> = events.iter().filter(|e| e["type"] == "reserved").collect();
    assert_eq!(reserved.len(), 100);
    assert_eq!(
        reserved.iter().map(|e| e["order_id"].clone()).collect::<HashSet<_>>(),
        orders
    );
    assert_eq!(events.len(), 100, "the 100 reserved events and no other of the item");
    // Concurrent reservations share stream entries (one per batch).
    assert!(rd.xlen(&item).await <= 100);
}

// ---------------------------------------------------------------------------
// Acceptance 3: idempotent retries; no stock before starts_at.

async fn idempotent_retry_returns_the_same_order(backend: Backend) {
    let (_redis, mut rd, gw) = on_backend(backend, |b| b).await;
    let item = gw.new_item(3, 2).await;
    let keyed = || gw.reserve_req(&item, "alice").header("idempotency-key", "checkout-1");

    let first = send(keyed()).await.assert_ok().clone();
    let again = send(keyed()).await.assert_ok().clone();
    assert_eq!(first["order_id"], again["order_id"]);
    assert_eq!(first, again, "the retry answers the same body");
    assert_eq!(rd.item_field(&item, "stock").await, 2, "decremented once");
    assert_eq!(rd.buyers(&item).await.get("alice"), Some(&1));
    // The same key from another user is another reservation.
    let bob = send(gw.reserve_req(&item, "bob").header("idempotency-key", "checkout-1"))
        .await
        .assert_ok()
        .clone();
    assert_ne!(bob["order_id"], first["order_id"]);
    // Sell out, then retry: still the same order, 200.
    gw.reserve_ok(&item, "carol").await;
    gw.reserve(&item, "dave").await.assert_refused(410, "sold_out");
    let late = send(keyed()).await.assert_ok().clone();
    assert_eq!(late["order_id"], first["order_id"]);
    assert_eq!(late["status"], json!("reserved"));
    assert_eq!(rd.item_field(&item, "stock").await, 0);
    let events = rd.events(&item).await;
    let alice: Vec<_> = events.iter().filter(|e| e["user_id"] == "alice").collect();
    assert_eq!(alice.len(), 1, "one reserved event for alice: {alice:?}");
    // Without the key alice makes a second, distinct order (limit 2) — but stock is gone.
    gw.reserve(&item, "alice").await.assert_refused(410, "sold_out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_started_per_redis_even_when_the_local_clock_is_ahead() {
    let (_redis, mut rd, gw) = on_redis(|b| b).await;
    let item = unique("item");
    let redis_now = rd.time_ms().await;
    gw.create_item_window(&item, 5, 1, redis_now + HOUR_MS, redis_now + 24 * HOUR_MS)
        .await;
    // Let the start-up clock sync run first, then make this instance's clock 2 h fast.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.clock().set_offset(2 * HOUR_MS);
    rd.reset_stats().await;
    let r = gw.reserve(&item, "alice").await;
    assert!(
        gw.now_ms() > system_now_ms() + HOUR_MS,
        "the gateway's clock was still ahead during the request"
    );
    r.assert_refused(425, "not_started");
    let calls = rd.command_calls().await;
    // (`evalsha` may count twice: a NOSCRIPT reply, then the retry after SCRIPT LOAD.)
    assert!(
        calls_of(&calls, &["evalsha", "eval"]) >= 1 && calls_of(&calls, &["hmget"]) == 2,
        "the local clock said started: the script (Redis TIME) decided, reading the shard's \
         sequence and the item once each: {calls:?}"
    );
    assert_eq!(rd.item_field(&item, "stock").await, 5, "stock untouched");
    assert_eq!(rd.item_field(&item, "reserved").await, 0);
    assert!(rd.buyers(&item).await.is_empty());
    assert_eq!(rd.xlen(&item).await, 0, "no stream entry");
    let orders: Vec<String> = redis::cmd("KEYS")
        .arg("sk:*:order:*")
        .query_async(&mut rd.conn)
        .await
        .unwrap();
    assert!(orders.is_empty(), "no order: {orders:?}");
    let deadlines: Vec<String> = redis::cmd("KEYS")
        .arg("sk:*:deadlines")
        .query_async(&mut rd.conn)
        .await
        .unwrap();
    assert!(deadlines.is_empty(), "no deadline: {deadlines:?}");
}

// ---------------------------------------------------------------------------
// Acceptance 4: early answers cost no Redis command.

async fn unknown_item_ids_cost_no_redis_command(backend: Backend) {
    // No workers: the sweeper's and persistence worker's polling are not requests.
    let (_redis, mut rd, gw) = on_backend(backend, |b| b.flag("--workers", "false")).await;
    gw.create_item(&unique("real"), 5, 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    rd.reset_stats().await;

    let ids: Vec<String> = (0..200).map(|_| unique("ghost")).collect();
    let replies: Vec<Reply> = futures_util::stream::iter(ids.iter())
        .flat_map(|id| futures_util::stream::iter([true, false].map(|reserve| (id, reserve))))
        .map(|(id, reserve)| {
            let gw = &gw;
            async move {
                if reserve {
                    gw.reserve(id, "alice").await
                } else {
                    gw.get_item(id).await
                }
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert_eq!(replies.len(), 400);
    for r in &replies {
        r.assert_refused(404, "unknown_item");
    }
    let calls = rd.command_calls().await;
    assert_eq!(
        calls_of(
            &calls,
            &["evalsha", "eval", "hgetall", "hget", "hmget", "get", "exists"]
        ),
        0,
        "{calls:?}"
    );
    assert_eq!(foreground(&calls), HashMap::new(), "every command: {calls:?}");
}

async fn sold_out_answers_after_the_first_cost_no_redis_command(backend: Backend) {
    let (_redis, mut rd, gw) = on_backend(backend, |b| b.flag("--sold-out-ttl", "60s")).await;
    let item = gw.new_item(1, 1).await;
    // The item's own pub/sub notice must not clear the flag we are about to set.
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.reserve_ok(&item, "winner").await;
    gw.reserve(&item, "first-loser").await.assert_refused(410, "sold_out");
    rd.reset_stats().await;

    let replies: Vec<Reply> = futures_util::stream::iter(0..500)
        .map(|i| {
            let gw = &gw;
            let item = &item;
            async move { gw.reserve(item, &format!("late-{i}")).await }
        })
        .buffer_unordered(50)
        .collect()
        .await;
    for r in &replies {
        r.assert_refused(410, "sold_out");
    }
    let calls = rd.command_calls().await;
    assert_eq!(
        calls_of(&calls, &["evalsha", "eval", "hgetall", "hget", "hmget"]),
        0,
        "{calls:?}"
    );
    assert_eq!(rd.item_field(&item, "stock").await, 0);
}

// ---------------------------------------------------------------------------
// Acceptance 5: Redis killed and restarted.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_gives_503_within_the_timeout_and_recovers() {
    let (mut redis, _, gw) = on_redis(|b| {
        b.flag("--redis-timeout", "300ms")
            .flag("--circuit-failures", "3")
            .flag("--circuit-cooldown", "1s")
    })
    .await;
    let item = gw.new_item(100, 1).await;
    gw.reserve_ok(&item, "before").await;
    let breaker_open = || gw.running().app.engine.redis().expect("a Redis gateway").circuit_open();

    // No other gateway of this file starts while the process-wide gauge is read.
    let gauge = GAUGE_LOCK.lock().await;
    redis.kill();
    for i in 0..6 {
        let r = gw.reserve(&item, &format!("down-{i}")).await;
        assert!(r.elapsed < Duration::from_secs(2), "answered in {:?}", r.elapsed);
        r.assert_refused(503, "unavailable");
        assert!((1..=5).contains(&r.retry_after()), "Retry-After: {:?}", r.headers);
    }
    assert!(breaker_open(), "3 failures open the circuit");
    let text = gw.metrics().await;
    assert_eq!(metric(&text, "seckill_circuit_open"), Some(1.0), "circuit gauge");
    drop(gauge);
    let r = gw.get_item(&item).await;
    assert!(r.elapsed < Duration::from_secs(2));
    r.assert_refused(503, "unavailable");
    r.retry_after();
    let r = gw.readyz_until("unavailable").await;
    assert!(r.elapsed < Duration::from_secs(2));
    assert_eq!(r.status.as_u16(), 503, "{}", r.text);
    assert!(
        r.json["engine"].as_str().is_some_and(|e| e.starts_with("down")),
        "{}",
        r.text
    );
    let r = send(gw.get("/healthz")).await;
    assert_eq!(r.status.as_u16(), 200, "the process is up");

    // Same port, no data, empty script cache: Redis lost what the database holds. The
    // admin PUT works at once; the first reservation finds the shard behind the database,
    // the gateway rebuilds it (the order made before the outage keeps its unit), and it
    // sells again.
    redis.restart();
    let restarted = Instant::now();
    let put = gw.put_item_within(Duration::from_secs(10), &item, 100, 1).await;
    assert!(put.is_some(), "admin PUT works again within 10 s of the restart");
    let order = send_until(Duration::from_secs(5), gw.reserve_req(&item, "after"), |r| {
        r.status.as_u16() == 200
    })
    .await
    .expect("reserve answers 200 again without restarting the gateway");
    eprintln!("serving again {:?} after the Redis restart", restarted.elapsed());
    assert_eq!(order.json["user_id"], json!("after"));
    assert!(!breaker_open(), "the circuit closed again");
    let r = gw.readyz_until("ready").await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text);
    let mut rd = Redis::connect(&redis).await;
    assert_eq!(rd.item_field(&item, "stock").await, 98, "100 − before − after");
    assert_eq!(rd.buyers(&item).await.len(), 2, "before and after");
}

// ---------------------------------------------------------------------------
// Graceful shutdown.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_answers_in_flight_requests() {
    let (_redis, mut rd, mut gw) = on_redis(|b| b).await;
    let item = gw.new_item(10, 1).await;
    let addr = gw.running().addr;

    // A request whose headers are in but whose body is still coming.
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /api/v1/items/{item}/reserve HTTP/1.1\r\nHost: t\r\nX-User-Id: slow\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{{\"qty\":"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let running = gw.running.take().unwrap();
    let stopping = tokio::spawn(async move {
        let t = Instant::now();
        running.stop().await;
        t.elapsed()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stopping.is_finished(), "stop waits for the request in flight");
    // No new connections once stopping.
    let refused = common::http::client().get(format!("{}/healthz", gw.url)).send().await;
    assert!(
        refused.is_err(),
        "new connections are refused while stopping: {refused:?}"
    );

    conn.write_all(b" 1}").await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), conn.read_to_end(&mut out))
        .await
        .expect("the answer and then the close come in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&out);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"status\":\"reserved\""), "{answer}");
    let took = tokio::time::timeout(Duration::from_secs(15), stopping)
        .await
        .expect("stop completes")
        .unwrap();
    eprintln!("stop took {took:?}");
    assert_eq!(rd.item_field(&item, "stock").await, 9);
}

/// The circuit's half-open probe is an ordinary request. A shopper who gives
/// up (closes the connection) while the probe waits on an unresponsive Redis
/// must not leave the circuit open for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn circuit_recovers_after_an_abandoned_probe() {
    let (mut redis, _, gw) = on_redis(|b| {
        b.flag("--redis-timeout", "500ms")
            .flag("--circuit-failures", "2")
            .flag("--circuit-cooldown", "300ms")
            // The sweeper would otherwise take the probe.
            .flag("--workers", "false")
    })
    .await;
    let item = gw.new_item(10, 1).await;
    gw.reserve_ok(&item, "before").await;

    // Redis hangs: something accepts connections on its port and never answers.
    let black_hole = redis.hang();
    for i in 0..4 {
        gw.reserve(&item, &format!("down-{i}"))
            .await
            .assert_refused(503, "unavailable");
    }
    // Cool-down over: the next call is the probe. Its client gives up first.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let gave_up = impatient
        .post(format!("{}/api/v1/items/{item}/reserve", gw.url))
        .header("x-user-id", "impatient")
        .send()
        .await;
    assert!(gave_up.is_err(), "the probe outlasts the client: {gave_up:?}");
    tokio::time::sleep(Duration::from_millis(600)).await;

    drop(black_hole);
    redis.restart();
    let put = gw.put_item_within(Duration::from_secs(10), &item, 10, 1).await;
    let last = gw.reserve(&item, "after").await;
    assert!(
        put.is_some() && last.status.as_u16() == 200,
        "still refusing 10 s after Redis came back: {} {}",
        last.status,
        last.text
    );
}

/// A retry whose idempotency key outlived its order hash (a closed order's
/// hash expires after --closed-order-ttl; the key lives --idempotency-ttl)
/// still names the same order: reserve.lua answers
/// `{"duplicate", order_id, 0, "", 0, 0}` (docs/internals.md).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_retry_after_the_order_hash_expired() {
    let (_redis, mut rd, gw) = on_redis(|b| b.flag("--closed-order-ttl", "1s").flag("--idempotency-ttl", "1h")).await;
    let item = gw.new_item(5, 1).await;
    let keyed = || gw.reserve_req(&item, "alice").header("idempotency-key", "k-1");
    let first = send(keyed()).await.assert_ok().clone();
    let order = first["order_id"].as_str().unwrap().to_owned();
    gw.cancel(&order, "alice").await.assert_ok();
    let gone = poll(Duration::from_secs(5), async || {
        (!rd.order_exists(&order).await).then_some(())
    })
    .await;
    assert!(gone.is_some(), "the closed order's hash expires");
    let stock = rd.item_field(&item, "stock").await;
    let retry = send(keyed()).await;
    assert_eq!(
        (retry.status.as_u16(), retry.json["order_id"].as_str()),
        (200, Some(order.as_str())),
        "the retry names the same order: {}",
        retry.text
    );
    assert_eq!(rd.item_field(&item, "stock").await, stock, "and takes nothing");
}

// ---------------------------------------------------------------------------
// Every instance hears about item changes; front-door protections.

/// An item created or replaced on one instance is seen by another: its Bloom
/// filter learns the id, its cached metadata is dropped (pub/sub).
async fn item_changes_reach_every_instance(backend: Backend) {
    let (redis, _, a) = on_backend(backend, |b| b).await;
    let b = redis.builder().start().await;
    let item = unique("item");
    let now = a.now_ms();
    a.create_item(&item, 5, 1).await;
    let seen = send_until(Duration::from_secs(1), b.get(&format!("/api/v1/items/{item}")), |r| {
        r.status.as_u16() == 200
    })
    .await
    .expect("B knows an item created on A within 1 s");
    assert_eq!(seen.json["state"], json!("active"));
    // B caches the metadata on a reserve; A then ends the sale.
    b.reserve_ok(&item, "alice").await;
    a.create_item_window(&item, 5, 1, now - 2 * HOUR_MS, now - HOUR_MS)
        .await;
    let ended = send_until(Duration::from_secs(1), b.reserve_req(&item, "bob"), |r| {
        r.status.as_u16() != 200
    })
    .await
    .expect("B stops selling within 1 s");
    ended.assert_refused(410, "ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_trusted_only_when_configured() {
    let (redis, _, trusting) = on_redis(|b| b.flag("--rate-per-ip", "1").flag("--trust-forwarded", "true")).await;
    let direct = Gateway::builder(&redis.url()).flag("--rate-per-ip", "1").start().await;
    let item = trusting.new_item(5, 1).await;
    let get = |gw: &Gateway, ip: &str| send(gw.get(&format!("/api/v1/items/{item}")).header("x-forwarded-for", ip));
    // Behind a trusted proxy every shopper has a bucket of their own …
    get(&trusting, "10.0.0.1").await.assert_ok();
    let r = get(&trusting, "10.0.0.1").await;
    r.assert_refused(429, "rate_limited");
    r.retry_after();
    get(&trusting, "10.0.0.2").await.assert_ok();
    // … the last hop is the one the proxy saw; earlier ones are the client's.
    get(&trusting, "1.2.3.4, 10.0.0.3").await.assert_ok();
    get(&trusting, "5.6.7.8, 10.0.0.3")
        .await
        .assert_refused(429, "rate_limited");
    // Without trust the header is ignored: one socket address, one bucket.
    get(&direct, "10.0.0.1").await.assert_ok();
    get(&direct, "10.0.0.2").await.assert_refused(429, "rate_limited");

    let global = Gateway::builder(&redis.url()).flag("--rate-global", "1").start().await;
    global.reserve_ok(&item, "alice").await;
    let r = global.reserve(&item, "bob").await;
    r.assert_refused(429, "rate_limited");
    r.retry_after();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_and_the_connection_cap() {
    let (_redis, _, gw) = on_redis(|b| b.flag("--header-timeout", "500ms").flag("--max-connections", "2")).await;
    let addr = gw.running().addr;

    // A client that never finishes its headers is cut off.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n").await.unwrap();
    let t = Instant::now();
    let mut sink = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut sink))
        .await
        .expect("the server closes a connection whose headers never end")
        .ok();
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    drop(slow);

    // Two connections held open; the third is closed at once.
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    // (A connection the harness left idle holds a slot until the header timeout closes it:
    // a 503 meanwhile is tried again.)
    let mut held = Vec::new();
    while held.len() < 2 {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(healthz).await.unwrap();
        let mut buf = [0u8; 12];
        c.read_exact(&mut buf).await.unwrap();
        if &buf == b"HTTP/1.1 503" {
            assert!(t.elapsed() < Duration::from_secs(5), "no free slot");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        assert_eq!(&buf, b"HTTP/1.1 200");
        held.push(c);
    }
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = third.write_all(healthz).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), third.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 503 "),
        "over the cap: a 503, then closed: {out}"
    );
    // A freed slot is usable again.
    drop(held.pop());
    let again = poll(Duration::from_secs(2), || async {
        let answer = raw_request(addr, "GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").await;
        answer.starts_with("HTTP/1.1 200").then_some(())
    })
    .await;
    assert!(again.is_some(), "a connection is accepted once one closed");
}

/// One HTTP/1.1 answer read off a keep-alive connection: its head and a `Content-Length`
/// body; `None` when the connection was closed first.
async fn read_answer(c: &mut tokio::io::BufReader<tokio::net::TcpStream>) -> Option<String> {
    use tokio::io::AsyncBufReadExt;
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if c.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let length = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(str::to_owned)
        })
        .and_then(|n| n.trim().parse::<usize>().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    c.read_exact(&mut body).await.ok()?;
    Some(head + &String::from_utf8_lossy(&body))
}

/// The header timeout runs while a connection waits for a request head, as hyper's own did
/// (it is now one watchdog per connection, `src/http/watchdog.rs`): a keep-alive connection
/// asked more often than the timeout stays open across several timeouts; left idle it is
/// closed one timeout later; a request handled for longer than the timeout (Redis not
/// answering) gets its answer on its connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_timeout_counts_only_the_wait_for_a_head() {
    let timeout = Duration::from_millis(500);
    let (mut redis, _, gw) = on_redis(|b| {
        b.flag("--header-timeout", "500ms")
            .flag("--redis-timeout", "1500ms")
            .flag("--circuit-failures", "100")
    })
    .await;
    let addr = gw.running().addr;
    let healthz = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";

    // Eight requests 200 ms apart on one connection: 1.6 s, over three timeouts.
    let mut c = tokio::io::BufReader::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    let started = Instant::now();
    for i in 0..8 {
        c.get_mut().write_all(healthz).await.unwrap();
        let answer = read_answer(&mut c)
            .await
            .unwrap_or_else(|| panic!("request {i} after {:?}: connection closed", started.elapsed()));
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(started.elapsed() > timeout * 3);

    // Left idle: closed one timeout after its last answer (read_answer sees the close).
    let idle = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(5), read_answer(&mut c)).await;
    assert_eq!(closed, Ok(None), "an idle connection is closed");
    let waited = idle.elapsed();
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(2),
        "closed {waited:?} after the last answer (200 ms of it slept above)"
    );

    // A request that takes longer than the timeout is answered, not cut off.
    let item = gw.new_item(5, 1).await;
    let _black_hole = redis.hang();
    let mut slow = None;
    for user in ["u1", "u2", "u3"] {
        let mut c = tokio::io::BufReader::new(tokio::net::TcpStream::connect(addr).await.unwrap());
        let request = format!(
            "POST /api/v1/items/{item}/reserve HTTP/1.1\r\nHost: t\r\nX-User-Id: {user}\r\nContent-Length: 0\r\n\r\n"
        );
        c.get_mut().write_all(request.as_bytes()).await.unwrap();
        let t = Instant::now();
        let answer = tokio::time::timeout(Duration::from_secs(10), read_answer(&mut c))
            .await
            .expect("answered within 10 s")
            .unwrap_or_else(|| panic!("closed after {:?} without an answer", t.elapsed()));
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        if t.elapsed() > timeout * 2 {
            slow = Some(t.elapsed());
            break;
        }
    }
    let slow = slow.expect("a reserve waited on the hung Redis for longer than the header timeout");
    eprintln!("a reserve handled for {slow:?} was answered");
}

/// Redis that accepts connections but never answers: every call ends at the
/// configured timeout, and calls beyond --max-inflight are shed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_redis_times_out_and_sheds_load() {
    let (mut redis, _, gw) = on_redis(|b| {
        b.flag("--redis-timeout", "2s")
            .flag("--max-inflight", "1")
            .flag("--circuit-failures", "100")
            .flag("--workers", "false")
    })
    .await;
    let item = unique("item");
    // With one permit, the gateway's own start-up reads (catalogue, clock) may hold it for a
    // moment and shed this call: retry until it lands.
    let created = gw.put_item_within(Duration::from_secs(5), &item, 5, 1).await;
    assert!(created.is_some(), "item created");
    // The same for the first reservation (the item's pub/sub news may be read meanwhile).
    let before = send_until(Duration::from_secs(5), gw.reserve_req(&item, "before"), |r| {
        r.status.as_u16() == 200
    })
    .await;
    assert!(before.is_some(), "a reservation before Redis hangs");
    let _black_hole = redis.hang();
    // The first call finds the old connection dead; later ones wait on the new one.
    gw.reserve(&item, "zero").await.assert_refused(503, "unavailable");

    let (hung, shed) = tokio::join!(gw.reserve(&item, "first"), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        gw.reserve(&item, "second").await
    });
    hung.assert_refused(503, "unavailable");
    hung.retry_after();
    assert!(
        hung.elapsed >= Duration::from_millis(1800) && hung.elapsed < Duration::from_secs(5),
        "the hung call ends at the timeout: {:?}",
        hung.elapsed
    );
    shed.assert_refused(503, "unavailable");
    shed.retry_after();
    assert!(
        // Queued, it would wait for the hung call's 2 s timeout; shed, it is answered at once
        // (the margin is wide because these machines are shared and noisy).
        shed.elapsed < Duration::from_secs(1),
        "shed at once, not queued: {:?}",
        shed.elapsed
    );
}

/// A client that gives up while its reserve is queued behind a slow Redis: its batch's task
/// runs the call to the end anyway, so the decision is taken and counted once, never left
/// half-done by the dropped connection and handler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_does_not_abandon_its_request() {
    let (redis, mut rd, gw) = on_redis(|b| b.flag("--redis-timeout", "3s")).await;
    let item = gw.new_item(10, 1).await;
    // Warm the item cache so the only Redis call of the request is the script.
    gw.get_item(&item).await.assert_ok();
    // Redis stalls every client for 1.5 s; the client gives up after 500 ms (time enough,
    // on a loaded machine, for the request to reach the engine: hyper drops a handler that
    // has not yet handed its decision to its own task when the client closes first).
    let mut pauser = redis.client().get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1_500)
        .arg("ALL")
        .query_async(&mut pauser)
        .await
        .unwrap();
    let stall = tokio::spawn(tokio::time::sleep(Duration::from_millis(1_500)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let r = impatient
        .post(format!("{}/api/v1/items/{item}/reserve", gw.running().url()))
        .header("x-user-id", "impatient")
        .send()
        .await;
    assert!(r.is_err(), "the client gave up before the answer");
    stall.await.unwrap();
    let made = poll(Duration::from_secs(3), async || {
        (rd.item_field(&item, "reserved").await == 1).then_some(())
    })
    .await;
    assert!(made.is_some(), "the script ran after the client left: the order exists");
    assert_eq!(rd.item_field(&item, "stock").await, 9);
    // And it was counted, though no handler was left to count it.
    let counted = poll(Duration::from_secs(3), async || {
        let m = gw.metrics().await;
        (metric_value(&m, r#"seckill_orders_total{event="reserved"}"#) == 1.0).then_some(())
    })
    .await;
    assert!(
        counted.is_some(),
        "the order made is counted once: {}",
        gw.metrics().await
    );
}
