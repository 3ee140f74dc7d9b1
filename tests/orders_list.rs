//! `GET /api/v1/orders` (issue 12, acceptance 5), black-box over HTTP: a shopper's own
//! orders, newest first, each in the shape of `GET /api/v1/orders/{id}`; at most 100, or
//! `?limit=N`; 401 without an identity, 400 for a bad query, 405 for another method, 503
//! while the store is down.
//!
//! The list is read from the database (`docs/contract.md`, "Your orders"). Redis mode
//! (here on PostgreSQL) polls until the persistence worker has written what the engine
//! answered; embedded mode (on SQLite) commits before every answer, so its list is asserted
//! at once, without waiting.

mod common;

use std::time::{Duration, Instant};

use common::gateway::Gateway;
use common::http::{Api, Reply, RequestExt, send};
use common::{PgServer, RedisServer, poll, shared_pg, unique};
use reqwest::RequestBuilder;
use seckill_gateway::clock::parse_rfc3339;
use serde_json::json;

/// How long a Redis-mode list may take to show what the engine answered: the persistence
/// delay (tens of milliseconds when idle), with room for a loaded machine.
const PERSISTED_WITHIN: Duration = Duration::from_secs(15);

/// One order as a test expects to see it listed: its id and status.
type Expected = (String, &'static str);

fn list_req(api: &Api, user: &str, query: &str) -> RequestBuilder {
    api.get(&format!("/api/v1/orders{query}")).user(user)
}

/// The order ids and statuses of a 200 list, in the order given.
fn listed(r: &Reply) -> Vec<(String, String)> {
    r.assert_ok()["orders"]
        .as_array()
        .unwrap_or_else(|| panic!("`orders` is an array: {}", r.text))
        .iter()
        .map(|o| {
            (
                o["order_id"].as_str().expect("order_id").to_owned(),
                o["status"].as_str().expect("status").to_owned(),
            )
        })
        .collect()
}

fn owned(expected: &[Expected]) -> Vec<(String, String)> {
    expected.iter().map(|(id, s)| (id.clone(), (*s).to_owned())).collect()
}

/// The list of `user` (with `query`) once it is exactly `expected` (newest first), polled
/// for at most `within` (at least once); panics with the last answer otherwise.
async fn list_until(api: &Api, user: &str, query: &str, expected: &[Expected], within: Duration) -> Reply {
    let want = owned(expected);
    let mut last = None;
    let found = poll(within, async || {
        let r = send(list_req(api, user, query)).await;
        let hit = r.status == 200 && listed(&r) == want;
        last = Some(r.text.clone());
        hit.then_some(r)
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "GET /api/v1/orders{query} as {user}: expected {want:?}, last answer {}",
            last.unwrap_or_default()
        )
    })
}

/// An embedded-mode gateway (no `--redis-url`) with a SQLite store of its own.
async fn embedded(configure: impl FnOnce(common::gateway::Builder) -> common::gateway::Builder) -> Gateway {
    configure(Gateway::embedded()).start().await
}

/// What [`shop`] did: each shopper's orders, newest first, with the status each has now.
struct Shopped {
    alice: String,
    bob: String,
    alice_orders: Vec<Expected>,
    bob_orders: Vec<Expected>,
}

/// Two items; alice orders three units of the first (pays one, cancels one) and two of
/// the second (pays one); bob orders one of each (pays one), in between. The orders are
/// made a few milliseconds apart, so their creation times differ and the newest-first
/// order is the reverse of the order they were made in.
async fn shop(api: &Api) -> Shopped {
    let (first, second) = (api.new_item(10, 5).await, api.new_item(10, 5).await);
    let (alice, bob) = (unique("alice"), unique("bob"));
    let plan: [(&str, &str, &'static str); 7] = [
        (&first, &alice, "paid"),
        (&second, &bob, "reserved"),
        (&first, &alice, "cancelled"),
        (&second, &alice, "reserved"),
        (&first, &bob, "paid"),
        (&first, &alice, "reserved"),
        (&second, &alice, "paid"),
    ];
    let (mut alice_orders, mut bob_orders) = (Vec::new(), Vec::new());
    for (item, user, status) in plan {
        let order = api.reserve_ok(item, user).await;
        match status {
            "paid" => {
                api.pay(&order, user).await.assert_ok();
            }
            "cancelled" => {
                api.cancel(&order, user).await.assert_ok();
            }
            _ => {}
        }
        let mine = if user == alice {
            &mut alice_orders
        } else {
            &mut bob_orders
        };
        mine.insert(0, (order, status));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Shopped {
        alice,
        bob,
        alice_orders,
        bob_orders,
    }
}

/// Every listed order is exactly what `GET /api/v1/orders/{id}` answers for it.
async fn assert_same_as_lookups(api: &Api, user: &str, list: &Reply) {
    for o in list.json["orders"].as_array().expect("orders") {
        let id = o["order_id"].as_str().expect("order_id");
        let one = api.get_order(id, user).await;
        assert_eq!(o, one.assert_ok(), "order {id}: the list and the lookup differ");
        assert_eq!(o["user_id"], json!(user));
    }
}

/// Acceptance 5 (1), Redis mode on PostgreSQL: each shopper sees exactly their own orders,
/// newest first, with their statuses, once persisted; a shopper with none sees `[]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mode_lists_each_shoppers_own_orders_newest_first() {
    let redis = RedisServer::start();
    let gw = Gateway::builder(&redis.url()).database(&shared_pg()).start().await;
    let s = shop(&gw).await;

    let r = list_until(&gw, &s.alice, "", &s.alice_orders, PERSISTED_WITHIN).await;
    assert_eq!(r.header("content-type"), Some("application/json"));
    let keys: Vec<&String> = r.json.as_object().expect("an object").keys().collect();
    assert_eq!(keys, ["orders"], "{}", r.text);
    assert_same_as_lookups(&gw, &s.alice, &r).await;
    let r = list_until(&gw, &s.bob, "", &s.bob_orders, PERSISTED_WITHIN).await;
    assert_same_as_lookups(&gw, &s.bob, &r).await;

    let r = send(list_req(&gw, &unique("carol"), "")).await;
    assert_eq!(r.assert_ok(), &json!({"orders": []}));
}

/// Acceptance 5 (3): the same in embedded mode (SQLite), where every answered change is
/// committed before the answer: the list shows it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_mode_lists_each_shoppers_own_orders_at_once() {
    let gw = embedded(|b| b).await;
    let s = shop(&gw).await;

    let r = list_until(&gw, &s.alice, "", &s.alice_orders, Duration::ZERO).await;
    assert_same_as_lookups(&gw, &s.alice, &r).await;
    list_until(&gw, &s.bob, "", &s.bob_orders, Duration::ZERO).await;
    let r = send(list_req(&gw, &unique("carol"), "")).await;
    assert_eq!(r.assert_ok(), &json!({"orders": []}));

    // An order made now is listed first, at once.
    let item = gw.new_item(5, 5).await;
    let newest = gw.reserve_ok(&item, &s.alice).await;
    let r = send(list_req(&gw, &s.alice, "")).await;
    assert_eq!(listed(&r)[0], (newest, "reserved".to_owned()));
    assert_eq!(listed(&r).len(), s.alice_orders.len() + 1);
}

/// Acceptance 5 (2): the identity stage of the other shopper routes: 401 without one; in
/// JWT mode `sub` is the shopper and `X-User-Id` means nothing. Another method is 405; a
/// bad query 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_method_and_query_are_checked() {
    let redis = RedisServer::start();
    let gw = Gateway::start(&redis.url()).await;
    let path = "/api/v1/orders";

    send(gw.get(path)).await.assert_refused(401, "unauthenticated");
    for user in ["", "bad user", &"u".repeat(65), "a/b"] {
        send(gw.get(path).header("x-user-id", user))
            .await
            .assert_refused(401, "unauthenticated");
    }
    // Identity comes before the query is read.
    send(gw.get("/api/v1/orders?limit=0"))
        .await
        .assert_refused(401, "unauthenticated");

    for req in [gw.post(path), gw.put(path), gw.http.delete(format!("{}{path}", gw.url))] {
        send(req.user("alice")).await.assert_refused(405, "method_not_allowed");
    }

    for query in [
        "?limit=0",
        "?limit=101",
        "?limit=-1",
        "?limit=abc",
        "?limit=",
        "?limit=1&limit=2",
        "?limit=5&x=1",
        "?page=2",
    ] {
        send(list_req(&gw, "alice", query))
            .await
            .assert_refused(400, "bad_request");
    }
    for query in ["", "?", "?limit=1", "?limit=100"] {
        let r = send(list_req(&gw, "alice", query)).await;
        assert_eq!(r.assert_ok(), &json!({"orders": []}), "{query}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_mode_lists_the_orders_of_sub() {
    use jsonwebtoken::{EncodingKey, Header, encode};
    let secret = "0123456789abcdef-jwt";
    let gw = embedded(|b| b.flag("--jwt-secret", secret)).await;
    let token = |sub: &str| {
        let exp = seckill_gateway::clock::system_now_ms() / 1000 + 60;
        encode(
            &Header::default(),
            &json!({"sub": sub, "exp": exp}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let item = gw.new_item(5, 2).await;
    let r = send(
        gw.post(&format!("/api/v1/items/{item}/reserve"))
            .bearer_auth(token("alice")),
    )
    .await;
    let order = r.order_id();

    let r = send(gw.get("/api/v1/orders").bearer_auth(token("alice"))).await;
    assert_eq!(listed(&r), [(order, "reserved".to_owned())]);
    let r = send(gw.get("/api/v1/orders").bearer_auth(token("bob"))).await;
    assert_eq!(r.assert_ok(), &json!({"orders": []}));
    send(gw.get("/api/v1/orders").user("alice"))
        .await
        .assert_refused(401, "unauthenticated");
}

/// Acceptance 5 (4): at most 100 orders, the newest, without `limit`; `?limit=N` the
/// newest N.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_list_is_bounded_and_limit_is_honoured() {
    // Embedded mode: the list is current as soon as the reservations are answered.
    let gw = embedded(|b| b).await;
    let item = gw.new_item(200, 200).await;
    let user = unique("hoarder");
    let mut made = Vec::new();
    for _ in 0..103 {
        made.insert(0, (gw.reserve_ok(&item, &user).await, "reserved"));
    }
    // Creation times may repeat within a millisecond here: order id breaks the tie, so the
    // expected order is (created_at, order_id), newest first.
    let mut newest_first = Vec::new();
    for (id, status) in &made {
        let created = gw.get_order(id, &user).await.assert_ok()["created_at"].clone();
        let created = parse_rfc3339(created.as_str().expect("created_at")).expect("created_at is RFC 3339");
        newest_first.push((created, id.clone(), *status));
    }
    newest_first.sort_by(|a, b| (b.0, &b.1).cmp(&(a.0, &a.1)));
    let made: Vec<Expected> = newest_first.into_iter().map(|(_, id, s)| (id, s)).collect();

    let r = list_until(&gw, &user, "", &made[..100], Duration::ZERO).await;
    assert_eq!(r.json["orders"].as_array().unwrap().len(), 100);
    list_until(&gw, &user, "?limit=100", &made[..100], Duration::ZERO).await;
    list_until(&gw, &user, "?limit=3", &made[..3], Duration::ZERO).await;
    list_until(&gw, &user, "?limit=1", &made[..1], Duration::ZERO).await;

    // Redis mode, once persisted.
    let redis = RedisServer::start();
    let gw = Gateway::builder(&redis.url()).database(&shared_pg()).start().await;
    let s = shop(&gw).await;
    list_until(&gw, &s.alice, "?limit=2", &s.alice_orders[..2], PERSISTED_WITHIN).await;
    list_until(&gw, &s.bob, "?limit=5", &s.bob_orders, PERSISTED_WITHIN).await;
}

/// The store down (Redis mode, PostgreSQL stopped): 503 `unavailable` with `Retry-After`,
/// within the store timeout; the list is back once the database is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_down_is_503_within_the_store_timeout() {
    let redis = RedisServer::start();
    let mut pg = PgServer::start();
    pg.create_database("orders");
    let mut gw = Gateway::builder(&redis.url())
        .database(&pg.url("orders"))
        .flag("--store-timeout", "1s")
        .start()
        .await;
    let item = gw.new_item(10, 2).await;
    let user = unique("alice");
    let order = gw.reserve_ok(&item, &user).await;
    let mine = [(order, "reserved")];
    list_until(&gw, &user, "", &mine, PERSISTED_WITHIN).await;

    pg.stop();
    let started = Instant::now();
    let r = send(list_req(&gw, &user, "")).await;
    r.assert_refused(503, "unavailable");
    assert!(r.retry_after() >= 1);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "answered within the store timeout (1 s) and a reconnect: {:?}",
        started.elapsed()
    );

    pg.start_again();
    list_until(&gw, &user, "", &mine, PERSISTED_WITHIN).await;
    gw.stop_within(Duration::from_secs(5)).await;
}
