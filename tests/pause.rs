//! The operator's pause switches over HTTP (issue 14, acceptance 3): two gateways on one
//! Redis (a `redis-server`, and a 3-master Redis Cluster), a burst of reservations in
//! flight on both, a pause of one item or of every sale: no order is made after the pause
//! returns, on either instance; both answer 503 `paused` with `Retry-After` and show
//! `state: "paused"`; after a resume both sell again. A bucketed item is paused in every
//! bucket. The embedded engine keeps both switches across a restart. (The scripts
//! themselves: `tests/lua_scripts.rs`.)

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::buckets::bucketed;
use common::gateway::{Backend, Gateway, on_backend};
use common::http::{Api, Reply, send, send_until, try_send};
use common::unique;
use seckill_gateway::ids::bucket_id;
use serde_json::{Value, json};

common::on_both!(
    pausing_an_item_mid_burst_stops_both_gateways_at_once,
    pausing_every_sale_stops_every_item_on_both_gateways,
);

/// One answer of the burst: when its request was sent, and how it was answered.
struct Answer {
    sent: Instant,
    status: u16,
    code: String,
    retry_after: Option<String>,
}

/// Reservations of `items` from new users, `lanes` at a time on each gateway, until `stop`.
fn burst(
    gateways: Vec<Api>,
    items: Vec<String>,
    lanes: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Vec<Answer>> {
    static USERS: AtomicUsize = AtomicUsize::new(0);
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for (g, api) in gateways.into_iter().enumerate() {
            let api = Arc::new(api);
            for lane in 0..lanes {
                let (api, items, stop) = (api.clone(), items.clone(), stop.clone());
                tasks.push(tokio::spawn(async move {
                    let mut answers = Vec::new();
                    let mut n = g + lane;
                    while !stop.load(Ordering::Relaxed) {
                        let user = format!("u{}", USERS.fetch_add(1, Ordering::Relaxed));
                        let item = &items[n % items.len()];
                        n += 1;
                        let sent = Instant::now();
                        let Ok(r) = try_send(api.reserve_req(item, &user)).await else {
                            continue;
                        };
                        answers.push(Answer {
                            sent,
                            status: r.status.as_u16(),
                            code: if r.status.as_u16() == 200 {
                                String::new()
                            } else {
                                r.error().to_owned()
                            },
                            retry_after: r.header("retry-after").map(str::to_owned),
                        });
                    }
                    answers
                }));
            }
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("burst lane"));
        }
        all
    })
}

/// The units sold of each item (reserved + paid), as the stats route reads the engine.
async fn sold(api: &Api, items: &[String]) -> Vec<i64> {
    let mut out = Vec::new();
    for item in items {
        let s = api.stats(item).await;
        let s = s.assert_ok();
        out.push(s["reserved"].as_i64().unwrap() + s["paid"].as_i64().unwrap());
    }
    out
}

async fn admin_post(api: &Api, path: &str) -> Reply {
    send(api.admin(api.post(path))).await
}

/// The pause on `a` returns while both gateways are selling: every request sent after it
/// is refused with 503 `paused`, the engine's count does not move, and the other gateway
/// shows the item paused within a second; after a resume on `b`, both sell again.
async fn pause_mid_burst(a: &Gateway, b: &Gateway, items: &[String], pause: &str, resume: &str) {
    let stop = Arc::new(AtomicBool::new(false));
    let running = burst(vec![(**a).clone(), (**b).clone()], items.to_vec(), 8, stop.clone());
    tokio::time::sleep(Duration::from_millis(400)).await;
    let r = admin_post(a, pause).await;
    let paused_at = Instant::now();
    assert_eq!(r.assert_ok()["paused"], json!(true), "{}", r.text);
    let sold_at_pause = sold(a, items).await;
    assert!(sold_at_pause.iter().sum::<i64>() > 0, "the burst sold before the pause");

    // B shows it within a second (the change feed), whatever its cache held.
    for item in items {
        send_until(Duration::from_secs(1), b.get(&format!("/api/v1/items/{item}")), |r| {
            r.json["state"] == json!("paused")
        })
        .await
        .unwrap_or_else(|| panic!("B shows {item} paused within 1 s"));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = running.await.unwrap();

    let after: Vec<&Answer> = answers.iter().filter(|a| a.sent > paused_at).collect();
    assert!(
        after.len() > 50,
        "the burst went on after the pause: {} requests",
        after.len()
    );
    for ans in &after {
        assert_eq!(
            (ans.status, ans.code.as_str()),
            (503, "paused"),
            "a request sent after the pause returned"
        );
        assert_eq!(
            ans.retry_after.as_deref(),
            Some("5"),
            "paused answers carry Retry-After"
        );
    }
    assert_eq!(
        sold(a, items).await,
        sold_at_pause,
        "no unit sold after the pause returned"
    );
    assert_eq!(sold(b, items).await, sold_at_pause);
    let made = answers.iter().filter(|a| a.status == 200).count() as i64;
    assert_eq!(
        made,
        sold_at_pause.iter().sum::<i64>(),
        "every unit sold is a 200 of the burst"
    );
    for item in items {
        assert_eq!(a.stats(item).await.assert_ok()["paused"], json!(true));
        b.reserve(item, &unique("late")).await.assert_refused(503, "paused");
    }

    // Resume on the other gateway: both sell again within a second.
    let r = admin_post(b, resume).await;
    assert_eq!(r.assert_ok()["paused"], json!(false), "{}", r.text);
    for gw in [a, b] {
        for item in items {
            let user = unique("after");
            send_until(Duration::from_secs(1), gw.reserve_req(item, &user), |r| {
                r.status.as_u16() == 200
            })
            .await
            .unwrap_or_else(|| panic!("{item} sells again within 1 s of the resume"));
            assert_eq!(gw.get_item(item).await.assert_ok()["state"], json!("active"));
        }
    }
}

async fn pausing_an_item_mid_burst_stops_both_gateways_at_once(backend: Backend) {
    let (redis, _rd, a) = on_backend(backend, |b| b).await;
    let b = redis.builder().start().await;
    let item = a.new_item(1_000_000, 1).await;
    let other = a.new_item(10, 1).await;
    b.get_item(&item).await.assert_ok();
    pause_mid_burst(
        &a,
        &b,
        std::slice::from_ref(&item),
        &format!("/admin/v1/items/{item}/pause"),
        &format!("/admin/v1/items/{item}/resume"),
    )
    .await;
    // Only that item was paused.
    assert_eq!(a.get_item(&other).await.assert_ok()["state"], json!("active"));
    a.reserve_ok(&other, "someone").await;

    // The switch routes: unknown item, no token, wrong method.
    admin_post(&a, "/admin/v1/items/no_such_item/pause")
        .await
        .assert_refused(404, "unknown_item");
    send(a.post(&format!("/admin/v1/items/{item}/pause")))
        .await
        .assert_refused(403, "forbidden");
    send(a.admin(a.get(&format!("/admin/v1/items/{item}/pause"))))
        .await
        .assert_refused(405, "method_not_allowed");
    // A replacement keeps the switch.
    admin_post(&a, &format!("/admin/v1/items/{item}/pause"))
        .await
        .assert_ok();
    let r = a.put_item(&item, 1_000_000, 1).await;
    assert_eq!(r.assert_ok()["state"], json!("paused"), "{}", r.text);
    a.reserve(&item, &unique("u")).await.assert_refused(503, "paused");
}

async fn pausing_every_sale_stops_every_item_on_both_gateways(backend: Backend) {
    let (redis, _rd, a) = on_backend(backend, |b| b).await;
    let b = redis.builder().start().await;
    // Items on several shards (so, on a cluster, on every master).
    let mut items = Vec::new();
    for _ in 0..6 {
        items.push(a.new_item(1_000_000, 1).await);
    }
    pause_mid_burst(&a, &b, &items, "/admin/v1/pause", "/admin/v1/resume").await;
    // An item created while every sale is paused is paused too.
    admin_post(&a, "/admin/v1/pause").await.assert_ok();
    let late = a.new_item(5, 1).await;
    a.reserve(&late, "x").await.assert_refused(503, "paused");
    // A gateway started now learns it from Redis.
    let c = redis.builder().start().await;
    send_until(Duration::from_secs(2), c.get(&format!("/api/v1/items/{late}")), |r| {
        r.json["state"] == json!("paused")
    })
    .await
    .expect("a new gateway shows every sale paused");
    c.reserve(&late, "y").await.assert_refused(503, "paused");
    admin_post(&c, "/admin/v1/resume").await.assert_ok();
    send_until(Duration::from_secs(1), a.reserve_req(&late, "x"), |r| {
        r.status.as_u16() == 200
    })
    .await
    .expect("selling resumes");
}

/// Every bucket of a bucketed item carries the switch: shoppers of every home bucket are
/// refused, and the buckets' stock does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucketed_item_is_paused_in_every_bucket() {
    let (_redis, mut rd, gw) = on_backend(Backend::Cluster, |b| b).await;
    let item = unique("hot");
    gw.put_item_body(&item, &bucketed(&gw, 600, json!(6))).await.assert_ok();
    gw.reserve_ok(&item, "first").await;
    admin_post(&gw, &format!("/admin/v1/items/{item}/pause"))
        .await
        .assert_ok();
    for b in 1..=6 {
        assert_eq!(
            rd.item(&bucket_id(&item, b)).await.get("paused").map(String::as_str),
            Some("1")
        );
    }
    let stats_before: Value = gw.stats(&item).await.assert_ok().clone();
    for n in 0..60 {
        gw.reserve(&item, &format!("shopper{n}"))
            .await
            .assert_refused(503, "paused");
    }
    let stats_after: Value = gw.stats(&item).await.assert_ok().clone();
    assert_eq!(stats_after["per_bucket"], stats_before["per_bucket"], "no bucket moved");
    assert_eq!(gw.get_item(&item).await.assert_ok()["state"], json!("paused"));
    admin_post(&gw, &format!("/admin/v1/items/{item}/resume"))
        .await
        .assert_ok();
    for b in 1..=6 {
        assert!(!rd.item(&bucket_id(&item, b)).await.contains_key("paused"));
    }
    for n in 0..60 {
        gw.reserve_ok(&item, &format!("shopper{n}")).await;
    }
}

/// The embedded engine: both switches refuse, and survive a restart (the journal keeps them
/// in the database).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_engine_keeps_both_switches_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}/orders.db", dir.path().display());
    let start = || Gateway::builder("unused").without("--redis-url").database(&db).start();
    let mut gw = start().await;
    let item = gw.new_item(10, 1).await;
    let other = gw.new_item(10, 1).await;
    gw.reserve_ok(&item, "alice").await;
    admin_post(&gw, &format!("/admin/v1/items/{item}/pause"))
        .await
        .assert_ok();
    let r = gw.reserve(&item, "bob").await;
    r.assert_refused(503, "paused");
    assert_eq!(r.header("retry-after"), Some("5"));
    gw.reserve_ok(&other, "bob").await;
    gw.stop().await;

    let mut gw = start().await;
    assert_eq!(gw.get_item(&item).await.assert_ok()["state"], json!("paused"));
    gw.reserve(&item, "bob").await.assert_refused(503, "paused");
    admin_post(&gw, "/admin/v1/pause").await.assert_ok();
    gw.reserve(&other, "carol").await.assert_refused(503, "paused");
    gw.stop().await;

    let gw = start().await;
    assert_eq!(gw.get_item(&other).await.assert_ok()["state"], json!("paused"));
    gw.reserve(&other, "carol").await.assert_refused(503, "paused");
    admin_post(&gw, "/admin/v1/resume").await.assert_ok();
    gw.reserve_ok(&other, "carol").await;
    // The item's own switch is still on until it is resumed.
    gw.reserve(&item, "bob").await.assert_refused(503, "paused");
    admin_post(&gw, &format!("/admin/v1/items/{item}/resume"))
        .await
        .assert_ok();
    gw.reserve_ok(&item, "bob").await;
    assert_eq!(gw.stats(&item).await.assert_ok()["reserved"], json!(2));
}
