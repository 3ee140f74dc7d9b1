//! The real binary in embedded mode (issue 5, acceptances 3 and 4): started the way a new
//! user starts it — in an empty directory, no Redis, no database server, only a listen
//! address and an admin token (flags; the environment is otherwise empty) — so it sells
//! the preloaded demo item and keeps its orders in `./seckill.db`.
//!
//! - [`sigkill_loses_no_acknowledged_order`]: reserve, pay and cancel under concurrency,
//!   SIGKILL the gateway while requests are in flight, restart it in the same directory,
//!   and find every acknowledged order with its status, nothing that was not asked for,
//!   and the stock equal to what the orders hold.
//! - [`quickstart_curl_lines_work_as_printed`]: the curl lines of the start-up banner
//!   (what the README's quick start tells users to paste) run as printed.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::binary::{Binary, BinaryBuilder, READY_TIMEOUT};
use common::http::{ADMIN_TOKEN, Api, send_past_rate_limit, try_send};
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{Value, json};
use sqlx::Row;

/// The binary as a new user starts it: in `dir`, no Redis, no database server, an admin token.
fn embedded(dir: &Path) -> BinaryBuilder {
    Binary::builder().dir(dir).flag("--admin-token", ADMIN_TOKEN)
}

/// A request the gateway must answer (sent again after a 429): its status and JSON body.
async fn answered(req: RequestBuilder) -> (StatusCode, Value) {
    let r = send_past_rate_limit(req).await;
    (r.status, r.json)
}

// ---- acceptance 3: SIGKILL ----------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Ack {
    order_id: String,
    item: String,
    user: String,
    qty: i64,
}

/// What the phase before the kill knows about an acknowledged order's last transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fate {
    /// No pay or cancel acknowledged or in flight.
    Reserved,
    Paid,
    Cancelled,
    /// A pay whose answer was cut by the kill: reserved or paid.
    MaybePaid,
    /// A cancel whose answer was cut by the kill: reserved or cancelled.
    MaybeCancelled,
}

/// A request of the phase cut by the kill.
#[derive(Clone, Debug)]
enum Task {
    Reserve { item: String, user: String, qty: i64 },
    Pay(Ack),
    Cancel(Ack),
}

#[derive(Debug)]
struct DbOrder {
    item: String,
    user: String,
    qty: i64,
    status: String,
}

/// `./seckill.db` of the gateway in `dir`, read-only.
async fn open_db(dir: &Path) -> sqlx::SqlitePool {
    let url = format!("sqlite://{}?mode=ro", dir.join("seckill.db").display());
    sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("open seckill.db")
}

async fn read_db(dir: &Path) -> HashMap<String, DbOrder> {
    let pool = open_db(dir).await;
    let rows = sqlx::query("SELECT order_id, item_id, user_id, qty, status FROM orders")
        .fetch_all(&pool)
        .await
        .expect("read orders");
    let orders = rows
        .iter()
        .map(|r| {
            (
                r.get::<String, _>("order_id"),
                DbOrder {
                    item: r.get("item_id"),
                    user: r.get("user_id"),
                    qty: r.get("qty"),
                    status: r.get("status"),
                },
            )
        })
        .collect();
    pool.close().await;
    orders
}

async fn held_units(dir: &Path, item: &str) -> i64 {
    let pool = open_db(dir).await;
    let sum: Option<i64> =
        sqlx::query_scalar("SELECT sum(qty) FROM orders WHERE item_id = ? AND status IN ('reserved', 'paid')")
            .bind(item)
            .fetch_one(&pool)
            .await
            .expect("sum of held units");
    pool.close().await;
    sum.unwrap_or(0)
}

/// Reserve concurrently, acknowledging what got 200.
async fn reserve_all(api: &Api, reqs: Vec<(String, String, i64)>) -> Vec<Ack> {
    let calls = reqs.into_iter().map(|(item, user, qty)| {
        let req = api.reserve_req(&item, &user).json(&json!({"qty": qty}));
        async move {
            let (status, v) = answered(req).await;
            match status {
                StatusCode::OK => {
                    assert_eq!(v["status"], "reserved", "{v}");
                    assert_eq!(
                        (v["item_id"].as_str(), v["user_id"].as_str(), v["qty"].as_i64()),
                        (Some(&*item), Some(&*user), Some(qty))
                    );
                    Some(Ack {
                        order_id: v["order_id"].as_str().expect("order_id").to_owned(),
                        item,
                        user,
                        qty,
                    })
                }
                StatusCode::GONE => {
                    assert_eq!(v["error"], "sold_out", "{v}");
                    None
                }
                other => panic!("reserve {item} by {user}: {other} {v}"),
            }
        }
    });
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_loses_no_acknowledged_order() {
    let dir = tempfile::Builder::new()
        .prefix("seckill-embedded-")
        .tempdir()
        .expect("tempdir");
    let logs = tempfile::tempdir().expect("log dir");
    let log = logs.path().join("gateway.log");
    let mut gw = embedded(dir.path()).log(&log).spawn();
    gw.ready().await;

    // The demo item, as preloaded.
    let (status, demo) = answered(gw.get("/api/v1/items/demo")).await;
    assert_eq!(status, StatusCode::OK, "{demo}");
    assert_eq!(
        (
            demo["stock_total"].as_i64(),
            demo["stock_remaining"].as_i64(),
            demo["per_user_limit"].as_i64()
        ),
        (Some(100), Some(100), Some(2))
    );

    // Two items created by the operator: `second` sells out in phase 1; `third` has stock
    // to spare for the phase cut by the kill.
    for (item, stock, limit) in [("second", 40, 1), ("third", 500, 2)] {
        let r = gw.put_item(item, stock, limit).await;
        let (status, v) = (r.status, r.json);
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["stock_remaining"], stock, "{v}");
    }
    let totals: HashMap<&str, i64> = HashMap::from([("demo", 100), ("second", 40), ("third", 500)]);
    let limits: HashMap<&str, i64> = HashMap::from([("demo", 2), ("second", 1), ("third", 2)]);

    // Phase 1, answered in full: 300 shoppers on the demo item (450 units asked for 100),
    // 60 on the second item (60 for 40).
    let mut reqs: Vec<(String, String, i64)> = (0..300)
        .map(|i| ("demo".to_owned(), format!("u{i}"), 1 + i % 2))
        .collect();
    reqs.extend((0..60).map(|i| ("second".to_owned(), format!("s{i}"), 1)));
    let acks = reserve_all(&gw, reqs).await;
    let units = |item: &str| acks.iter().filter(|a| a.item == item).map(|a| a.qty).sum::<i64>();
    assert!(
        units("demo") <= 100 && units("second") <= 40,
        "oversold: {} demo, {} second",
        units("demo"),
        units("second")
    );
    assert!(
        units("demo") >= 99 && units("second") == 40,
        "undersold: {} demo, {} second",
        units("demo"),
        units("second")
    );

    // Pay a third, cancel a third, all answered.
    let mut fate: HashMap<String, Fate> = acks.iter().map(|a| (a.order_id.clone(), Fate::Reserved)).collect();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let transitions = acks.iter().enumerate().filter(|(i, _)| i % 3 != 2).map(|(i, a)| {
        let a = a.clone();
        let verb = if i % 3 == 0 { "pay" } else { "cancel" };
        let req = if i % 3 == 0 {
            gw.pay_req(&a.order_id, &a.user)
        } else {
            gw.cancel_req(&a.order_id, &a.user)
        };
        async move {
            let (status, v) = answered(req).await;
            assert_eq!(status, StatusCode::OK, "{verb} {a:?}: {v}");
            let want = if verb == "pay" { "paid" } else { "cancelled" };
            assert_eq!(v["status"], want);
            (a.order_id, if verb == "pay" { Fate::Paid } else { Fate::Cancelled })
        }
    });
    fate.extend(futures_util::future::join_all(transitions).await);
    let open: Vec<Ack> = acks
        .iter()
        .filter(|a| fate[&a.order_id] == Fate::Reserved)
        .cloned()
        .collect();

    // Phase 2, cut by SIGKILL: new shoppers try for the returned stock and buy the third
    // item while the open reservations are paid or cancelled; the gateway is killed after
    // 120 answers.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let mut tasks: VecDeque<Task> = VecDeque::new();
    let mut opens = open.iter();
    for i in 0..400 {
        tasks.push_back(match i % 3 {
            0 => Task::Reserve {
                item: "demo".into(),
                user: format!("v{i}"),
                qty: 1 + (i / 3) % 2,
            },
            1 => Task::Reserve {
                item: "second".into(),
                user: format!("w{i}"),
                qty: 1,
            },
            _ => Task::Reserve {
                item: "third".into(),
                user: format!("x{i}"),
                qty: 1 + (i / 3) % 2,
            },
        });
        if i % 4 == 0 {
            match opens.next() {
                Some(a) if i % 8 == 0 => tasks.push_back(Task::Pay(a.clone())),
                Some(a) => tasks.push_back(Task::Cancel(a.clone())),
                None => {}
            }
        }
    }
    for a in opens {
        tasks.push_back(Task::Cancel(a.clone()));
    }
    let queue = Arc::new(Mutex::new(tasks));
    let answers = Arc::new(AtomicUsize::new(0));
    let killed = Arc::new(AtomicBool::new(false));
    /// What phase 2 learnt: (task, Some(status, body)) or (task, None) when cut.
    type Outcome = (Task, Option<(StatusCode, Value)>);
    let workers: Vec<tokio::task::JoinHandle<Vec<Outcome>>> = (0..32)
        .map(|_| {
            let (api, queue, answers, killed) = (gw.api.clone(), queue.clone(), answers.clone(), killed.clone());
            tokio::spawn(async move {
                let mut out = Vec::new();
                while !killed.load(Ordering::SeqCst) {
                    let Some(task) = queue.lock().unwrap().pop_front() else {
                        break;
                    };
                    let req = match &task {
                        Task::Reserve { item, user, qty } => api.reserve_req(item, user).json(&json!({"qty": qty})),
                        Task::Pay(a) => api.pay_req(&a.order_id, &a.user),
                        Task::Cancel(a) => api.cancel_req(&a.order_id, &a.user),
                    };
                    let reply = try_send(req).await.map(|r| (r.status, r.json));
                    if reply.is_ok() {
                        answers.fetch_add(1, Ordering::SeqCst);
                    }
                    out.push((task, reply.ok()));
                }
                out
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while answers.load(Ordering::SeqCst) < 120 {
        assert!(
            Instant::now() < deadline,
            "phase 2 got only {} answers in 60 s",
            answers.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gw.kill();
    killed.store(true, Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for w in workers {
        outcomes.extend(w.await.expect("worker"));
    }
    let mut statuses: std::collections::BTreeMap<String, usize> = Default::default();
    for (task, reply) in &outcomes {
        let kind = match task {
            Task::Reserve { item, .. } => format!("reserve {item}"),
            Task::Pay(_) => "pay".into(),
            Task::Cancel(_) => "cancel".into(),
        };
        let status = reply.as_ref().map_or("cut".to_owned(), |(s, _)| s.as_u16().to_string());
        *statuses.entry(format!("{kind}: {status}")).or_default() += 1;
    }
    eprintln!("phase 2 (cut by the kill): {statuses:?}");

    // Sort phase 2 out: acknowledged, refused, or cut by the kill (outcome unknown).
    let mut acks = acks;
    let mut cut_reserves: HashSet<(String, String)> = HashSet::new();
    let (mut acked_2, mut cut) = (0, 0);
    for (task, reply) in outcomes {
        match (task, reply) {
            (Task::Reserve { item, user, qty }, Some((StatusCode::OK, v))) => {
                acked_2 += 1;
                assert_eq!(v["status"], "reserved", "{v}");
                let order_id = v["order_id"].as_str().expect("order_id").to_owned();
                fate.insert(order_id.clone(), Fate::Reserved);
                acks.push(Ack {
                    order_id,
                    item,
                    user,
                    qty,
                });
            }
            (Task::Reserve { item, user, .. }, Some((status, v))) => assert!(
                matches!(status, StatusCode::GONE | StatusCode::TOO_MANY_REQUESTS),
                "reserve {item} by {user}: {status} {v}"
            ),
            (Task::Reserve { item, user, .. }, None) => {
                cut += 1;
                cut_reserves.insert((item, user));
            }
            (task @ (Task::Pay(_) | Task::Cancel(_)), reply) => {
                let (a, is_pay, verb) = match task {
                    Task::Pay(a) => (a, true, "pay"),
                    Task::Cancel(a) => (a, false, "cancel"),
                    Task::Reserve { .. } => unreachable!(),
                };
                let f = fate.get_mut(&a.order_id).expect("an acknowledged order");
                match reply {
                    Some((StatusCode::OK, v)) => {
                        acked_2 += 1;
                        assert_eq!(
                            v["status"],
                            if is_pay { "paid" } else { "cancelled" },
                            "{verb} {a:?}: {v}"
                        );
                        *f = if is_pay { Fate::Paid } else { Fate::Cancelled };
                    }
                    Some((StatusCode::TOO_MANY_REQUESTS, _)) => {}
                    Some((status, v)) => panic!("{verb} {a:?}: {status} {v}"),
                    None => {
                        cut += 1;
                        *f = if is_pay { Fate::MaybePaid } else { Fate::MaybeCancelled };
                    }
                }
            }
        }
    }
    assert!(
        acked_2 > 0 && cut > 0,
        "phase 2: {acked_2} acknowledged, {cut} cut by the kill"
    );

    // Restart in the same directory.
    let mut gw = embedded(dir.path()).log(&log).spawn();
    gw.ready().await;
    let db = read_db(dir.path()).await;

    // Every acknowledged order is in the database with its status, and the gateway
    // answers it with the same status.
    let lookups = acks.iter().map(|a| {
        let req = gw.order_req(&a.order_id, &a.user);
        async move { (a, answered(req).await) }
    });
    for (a, (status, v)) in futures_util::future::join_all(lookups).await {
        let row = db
            .get(&a.order_id)
            .unwrap_or_else(|| panic!("acknowledged order {a:?} is not in seckill.db"));
        assert_eq!((&row.item, &row.user, row.qty), (&a.item, &a.user, a.qty), "{a:?}");
        let allowed: &[&str] = match fate[&a.order_id] {
            Fate::Reserved => &["reserved"],
            Fate::Paid => &["paid"],
            Fate::Cancelled => &["cancelled"],
            Fate::MaybePaid => &["reserved", "paid"],
            Fate::MaybeCancelled => &["reserved", "cancelled"],
        };
        assert!(
            allowed.contains(&row.status.as_str()),
            "{a:?} ({:?}) is {} in seckill.db",
            fate[&a.order_id],
            row.status
        );
        assert_eq!(status, StatusCode::OK, "GET order {a:?}: {v}");
        assert_eq!(v["status"], row.status.as_str(), "GET order {a:?}: {v}");
        assert_eq!(
            (v["order_id"].as_str(), v["qty"].as_i64()),
            (Some(a.order_id.as_str()), Some(a.qty)),
            "{v}"
        );
    }

    // Nothing is in the database that was not acknowledged, except what a request cut by
    // the kill may have committed (then still reserved: nobody knew its id).
    let acked: HashSet<&str> = acks.iter().map(|a| a.order_id.as_str()).collect();
    let mut unacked = 0;
    for (id, row) in &db {
        if acked.contains(id.as_str()) {
            continue;
        }
        unacked += 1;
        assert!(
            cut_reserves.contains(&(row.item.clone(), row.user.clone())),
            "order {id} {row:?} is in seckill.db but was never acknowledged, nor cut by the kill"
        );
        assert_eq!(row.status, "reserved", "{id} {row:?}");
    }
    eprintln!(
        "{} acknowledged orders, {acked_2} answers of 200 in the phase cut by the kill, {cut} requests cut, \
         {unacked} orders committed without an answer",
        acks.len()
    );

    // The stock is what the orders hold; no item is oversold, no user above the limit.
    for (item, total) in &totals {
        let held = held_units(dir.path(), item).await;
        let (status, v) = answered(gw.get(&format!("/api/v1/items/{item}"))).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        assert_eq!(v["stock_total"].as_i64(), Some(*total), "{v}");
        assert_eq!(
            v["stock_remaining"].as_i64(),
            Some(total - held),
            "{item}: {v}, {held} units reserved or paid in seckill.db"
        );
        assert!(held <= *total, "{item} oversold: {held} of {total}");
    }
    let mut per_user: HashMap<(&str, &str), i64> = HashMap::new();
    for row in db.values().filter(|r| r.status == "reserved" || r.status == "paid") {
        *per_user.entry((&row.item, &row.user)).or_default() += row.qty;
    }
    for ((item, user), units) in per_user {
        assert!(units <= limits[item], "{user} holds {units} of {item}");
    }

    // The restored reservations are live: one is cancelled and its stock comes back.
    let open = acks
        .iter()
        .find(|a| db[&a.order_id].status == "reserved")
        .expect("an open reservation");
    let before = answered(gw.get(&format!("/api/v1/items/{}", open.item))).await.1;
    let (status, v) = answered(gw.cancel_req(&open.order_id, &open.user)).await;
    assert_eq!(
        (status, v["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{v}"
    );
    let after = answered(gw.get(&format!("/api/v1/items/{}", open.item))).await.1;
    assert_eq!(
        after["stock_remaining"].as_i64(),
        before["stock_remaining"].as_i64().map(|s| s + open.qty),
        "{before} -> {after}"
    );
    gw.kill();
}

/// A cancellation returns the stock (the contract), so the next shopper gets it at once —
/// not `sold_out` from a stale local flag. (With Redis the engine's pub/sub message clears
/// the flag; the embedded engine must clear it too.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_stock_sells_again_at_once() {
    let dir = tempfile::Builder::new()
        .prefix("seckill-embedded-")
        .tempdir()
        .expect("tempdir");
    let mut gw = embedded(dir.path()).spawn();
    gw.ready().await;
    assert_eq!(gw.put_item("single", 1, 1).await.status, StatusCode::OK);
    let reserve = |user: &'static str| answered(gw.reserve_req("single", user).json(&json!({"qty": 1})));
    let (status, order) = reserve("alice").await;
    assert_eq!(status, StatusCode::OK, "{order}");
    let (status, v) = reserve("bob").await;
    assert_eq!(
        (status, v["error"].as_str()),
        (StatusCode::GONE, Some("sold_out")),
        "{v}"
    );

    let (status, v) = answered(gw.cancel_req(order["order_id"].as_str().unwrap(), "alice")).await;
    assert_eq!(
        (status, v["status"].as_str()),
        (StatusCode::OK, Some("cancelled")),
        "{v}"
    );

    let (status, v) = answered(gw.get("/api/v1/items/single")).await;
    assert_eq!(
        (status, v["stock_remaining"].as_i64(), v["state"].as_str()),
        (StatusCode::OK, Some(1), Some("active")),
        "after the cancel: {v}"
    );
    let (status, v) = reserve("bob").await;
    assert_eq!(status, StatusCode::OK, "the unit alice cancelled: {v}");
    gw.kill();
}

// ---- acceptance 4: the quick start ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_curl_lines_work_as_printed() {
    let dir = tempfile::Builder::new()
        .prefix("seckill-quickstart-")
        .tempdir()
        .expect("tempdir");
    let mut gw = embedded(dir.path()).captured().spawn();

    // The banner: the URL, the mode, then the curl lines (the last one reserves).
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut output = Vec::new();
    let mut curls: Vec<String> = Vec::new();
    while !curls.last().is_some_and(|c| c.contains("/reserve")) {
        let left = deadline.saturating_duration_since(Instant::now());
        match gw.next_line(left) {
            Some(line) => {
                if let Some(at) = line.find("curl ") {
                    curls.push(line[at..].trim_end().to_owned());
                }
                output.push(line);
            }
            None => panic!(
                "no banner with curl lines within {READY_TIMEOUT:?}; output:\n{}",
                output.join("\n")
            ),
        }
    }
    let banner = output.join("\n");
    assert!(
        banner.contains(&format!("listening on {}", gw.url)),
        "banner:\n{banner}"
    );
    assert!(banner.contains("embedded"), "banner:\n{banner}");
    assert!(
        output.iter().any(|l| l.starts_with("try:") && l.contains("curl")),
        "banner:\n{banner}"
    );
    assert_eq!(curls.len(), 2, "banner:\n{banner}");

    // Run each line as printed, with sh, as a user pasting it would.
    let run = |line: &str| -> Value {
        let out = Command::new("sh")
            .arg("-c")
            .arg(line)
            .current_dir(dir.path())
            .output()
            .expect("sh -c");
        assert!(
            out.status.success(),
            "`{line}` failed: {:?}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "`{line}` printed no JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    };
    let item = run(&curls[0]);
    assert_eq!(item["item_id"], "demo", "{item}");
    assert_eq!(item["state"], "active", "{item}");
    assert_eq!(
        (
            item["stock_total"].as_i64(),
            item["stock_remaining"].as_i64(),
            item["per_user_limit"].as_i64()
        ),
        (Some(100), Some(100), Some(2)),
        "{item}"
    );
    for field in ["name", "starts_at", "ends_at"] {
        assert!(item[field].is_string(), "{field} in {item}");
    }
    assert!(item["price_cents"].is_i64(), "{item}");

    let order = run(&curls[1]);
    assert_eq!(order["status"], "reserved", "{order}");
    assert_eq!(
        (
            order["item_id"].as_str(),
            order["user_id"].as_str(),
            order["qty"].as_i64()
        ),
        (Some("demo"), Some("alice"), Some(1)),
        "{order}"
    );
    assert!(order["order_id"].as_str().is_some_and(|s| !s.is_empty()), "{order}");
    let pay_before = order["pay_before"]
        .as_str()
        .and_then(seckill_gateway::clock::parse_rfc3339)
        .expect("pay_before");
    assert!(pay_before > seckill_gateway::clock::system_now_ms(), "{order}");

    // The first line again shows the unit gone.
    assert_eq!(run(&curls[0])["stock_remaining"], 99);
    gw.kill();
}
