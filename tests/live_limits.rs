//! Live limits, on the real binary: a SIGHUP reloads the `--config` file (the rate limits
//! and the log filter at once; other settings logged as needing a restart; a broken file
//! changes nothing) and never stops the process; `PUT /admin/v1/limits` reaches every
//! instance on one `redis-server`; the global rate is shared by the live instances (those
//! serving HTTP, not a `worker`).
//!
//! Rates are measured with `POST /api/v1/items/<unknown>/reserve`: the limiter runs before
//! the item lookup, so a request the limiter lets through is a 404 (no stock is touched)
//! and one it refuses is a 429.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::RedisServer;
use common::binary::{Binary, command};
use common::http::{ADMIN_TOKEN, Api, send};
use serde_json::{Value, json};

/// Send `n` reserve requests as `user` back to back; how many the limiter let through,
/// and how long they took (a bucket refills meanwhile: rate × time).
async fn burst(api: &Api, user: &str, n: usize) -> (usize, Duration) {
    let started = Instant::now();
    let mut passed = 0;
    for _ in 0..n {
        let r = send(api.reserve_req("no_such_item", user)).await;
        match r.status.as_u16() {
            404 => passed += 1,
            429 => {}
            other => panic!("{other} {}", r.text),
        }
    }
    (passed, started.elapsed())
}

/// Assert a burst let `rate` requests through, give or take the refill during it (the
/// burst is a bucket's size, which is its rate).
#[track_caller]
fn assert_allowance(what: &str, (passed, took): (usize, Duration), rate: usize) {
    let refill = (took.as_secs_f64() * rate as f64).ceil() as usize;
    assert!(
        passed >= rate && passed <= rate + refill + 1,
        "{what}: {passed} let through in {took:?}, expected {rate} (+{refill} refilled)"
    );
}

fn sighup(gw: &Binary) {
    let ok = std::process::Command::new("kill")
        .arg("-HUP")
        .arg(gw.pid().to_string())
        .status()
        .expect("run kill -HUP");
    assert!(ok.success(), "kill -HUP {}", gw.pid());
}

/// Wait until the log has `n` lines containing `text`.
async fn logged(gw: &Binary, text: &str, n: usize) -> String {
    common::poll(Duration::from_secs(5), async || {
        let log = gw.log_text();
        (log.matches(text).count() >= n).then_some(log)
    })
    .await
    .unwrap_or_else(|| panic!("{text:?} not logged {n} time(s):\n{}", gw.log_text()))
}

/// An embedded gateway with `--config file` and a SQLite store in `dir`.
fn embedded(dir: &Path, config: &Path) -> Binary {
    Binary::builder()
        .dir(dir)
        .flag("--database-url", &format!("sqlite://{}/orders.db", dir.display()))
        .flag("--config", config.to_str().unwrap())
        .spawn()
}

/// `PUT /admin/v1/limits`.
async fn put_limits(api: &Api, body: &Value) -> common::http::Reply {
    send(api.admin(api.put("/admin/v1/limits")).json(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_a_new_rate_within_a_second_and_the_process_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("seckill.toml");
    std::fs::write(
        &config,
        "SECKILL_RATE_PER_USER = 1000\nSECKILL_RATE_PER_IP = 0\nSECKILL_LOG = \"info\"\n",
    )
    .unwrap();
    let mut gw = embedded(dir.path(), &config);
    gw.ready().await;
    let (passed, _) = burst(&gw, "before", 30).await;
    assert_eq!(passed, 30, "1000/s per user: nothing refused");
    assert!(!gw.log_text().contains("DEBUG"), "info level: no debug lines yet");

    std::fs::write(
        &config,
        "SECKILL_RATE_PER_USER = 5\nSECKILL_RATE_PER_IP = 0\nSECKILL_LOG = \"info,seckill_gateway::http=debug\"\n",
    )
    .unwrap();
    sighup(&gw);
    let hup = Instant::now();
    logged(&gw, "config reloaded", 1).await;
    // The next second's requests: a fresh user gets the new bucket's burst, 5.
    let measured = burst(&gw, "after", 20).await;
    assert!(
        hup.elapsed() < Duration::from_secs(1),
        "reloaded and measured within a second of SIGHUP: {:?}",
        hup.elapsed()
    );
    assert_allowance("5/s after SIGHUP", measured, 5);
    // The user of before is limited at the new rate too (a replaced bucket starts full).
    assert_allowance("5/s for a user seen before", burst(&gw, "before", 20).await, 5);

    // Still running, answering; the log filter was reloaded too (the router's debug line).
    assert_eq!(send(gw.get("/healthz")).await.status, 200);
    let log = gw.log_text();
    assert!(
        log.lines().any(|l| l.contains("DEBUG") && l.contains("reserve")),
        "debug lines of seckill_gateway::http after the reload:\n{log}"
    );
    gw.terminate();
    let status = gw.wait_exit(Duration::from_secs(15)).expect("exits on SIGTERM");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_logs_what_needs_a_restart_and_keeps_the_limits_of_a_broken_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("seckill.toml");
    let db = format!("sqlite://{}/orders.db", dir.path().display());
    let file = |listen: &str, per_user: &str| {
        format!(
            "SECKILL_LISTEN = \"{listen}\"\nDATABASE_URL = \"{db}\"\nSECKILL_RATE_PER_IP = 0\nSECKILL_RATE_PER_USER = {per_user}\n"
        )
    };
    std::fs::write(&config, file("127.0.0.1:0", "3")).unwrap();
    // The listen address comes from the file: read back from the banner.
    let mut gw = Binary::builder()
        .dir(dir.path())
        .arg("--config")
        .arg(config.to_str().unwrap())
        .address_from_banner()
        .spawn();
    gw.ready().await;
    assert_allowance("3/s from the file", burst(&gw, "u1", 10).await, 3);

    // A setting that cannot change while running: logged, named; the rest applies.
    std::fs::write(&config, file("127.0.0.1:9", "4")).unwrap();
    sighup(&gw);
    let log = logged(&gw, "config reloaded", 1).await;
    let line = log
        .lines()
        .find(|l| l.contains("needs restart"))
        .unwrap_or_else(|| panic!("no \"needs restart\" line:\n{log}"));
    assert!(line.contains("SECKILL_LISTEN") && line.contains("WARN"), "{line}");
    assert!(
        !log.lines()
            .any(|l| l.contains("needs restart") && l.contains("SECKILL_RATE")),
        "a rate limit never needs a restart:\n{log}"
    );
    assert_allowance("4/s after the reload", burst(&gw, "u2", 10).await, 4);

    // Broken files: not valid TOML, a bad value, an unknown key. Each is logged; the limits
    // in force stay 4/s and the process runs on.
    for (n, broken) in [
        "SECKILL_RATE_PER_USER = \n".to_owned(),
        file("127.0.0.1:9", "-2"),
        format!("{}SECKILL_RATE_PER_FOOT = 1\n", file("127.0.0.1:9", "50")),
    ]
    .into_iter()
    .enumerate()
    {
        std::fs::write(&config, broken).unwrap();
        sighup(&gw);
        logged(&gw, "config not reloaded", n + 1).await;
        assert_allowance("4/s after a broken file", burst(&gw, &format!("b{n}"), 10).await, 4);
    }
    let log = gw.log_text();
    assert!(
        log.contains("SECKILL_RATE_PER_FOOT"),
        "the unknown key is named:\n{log}"
    );
    assert!(
        log.contains("SECKILL_RATE_PER_USER"),
        "the bad value's key is named:\n{log}"
    );
    assert_eq!(send(gw.get("/healthz")).await.status, 200, "still running");
    assert!(gw.wait_exit(Duration::ZERO).is_none(), "still running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_without_a_config_file_changes_nothing_and_keeps_running() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Binary::builder()
        .dir(dir.path())
        .flag(
            "--database-url",
            &format!("sqlite://{}/orders.db", dir.path().display()),
        )
        .flag("--rate-per-user", "2")
        .flag("--rate-per-ip", "0")
        .spawn();
    gw.ready().await;
    sighup(&gw);
    sighup(&gw);
    logged(&gw, "nothing to reload", 1).await;
    assert_allowance("2/s as started", burst(&gw, "u", 10).await, 2);
    assert!(gw.wait_exit(Duration::ZERO).is_none(), "SIGHUP did not stop it");
}

#[test]
fn a_config_file_with_an_unknown_key_or_bad_value_is_refused_at_start_up() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("seckill.toml");
    for (text, key) in [
        ("SECKILL_RATE_GLOBAL = 5\nrate_per_user = 5\n", "rate_per_user"),
        ("SECKILL_RATE_GLOBAL = \"many\"\n", "SECKILL_RATE_GLOBAL"),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = command()
            .current_dir(dir.path())
            .arg("--config")
            .arg(&config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains(key), "names {key}: {stderr}");
        if key == "rate_per_user" {
            assert!(
                stderr.contains("SECKILL_RATE_PER_USER"),
                "says the name to use: {stderr}"
            );
        }
    }
    assert!(
        !dir.path().join("seckill.db").exists(),
        "refused before creating anything"
    );
}

/// A gateway on `redis` with the admin token and the given rates (SQLite store of its own).
fn on_redis(redis: &RedisServer, global: u32, per_user: u32) -> Binary {
    Binary::builder()
        .flag("--redis-url", &redis.url())
        .flag("--admin-token", ADMIN_TOKEN)
        .flag("--rate-global", &global.to_string())
        .flag("--rate-per-user", &per_user.to_string())
        .flag("--rate-per-ip", "0")
        .flag("--shutdown-grace", "2s")
        .spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_limits_reaches_the_other_instance() {
    let redis = RedisServer::start();
    let mut a = on_redis(&redis, 0, 1000);
    let mut b = on_redis(&redis, 0, 1000);
    a.ready().await;
    b.ready().await;
    assert_eq!(burst(&b, "before", 20).await.0, 20);

    let r = put_limits(&a, &json!({"rate_per_user": 4})).await;
    let put_at = Instant::now();
    let answer = r.assert_ok();
    assert_eq!(answer["rate_per_user"], 4, "{answer}");
    assert_eq!(answer["rate_global"], 0, "left out: kept");
    assert_eq!(answer["rate_per_ip"], 0);
    // B limits at the new rate within a second: each try is a fresh user's burst.
    let mut tries = 0;
    common::poll(Duration::from_secs(1), async || {
        tries += 1;
        let (passed, _) = burst(&b, &format!("probe{tries}"), 12).await;
        (passed < 12).then_some(())
    })
    .await
    .unwrap_or_else(|| panic!("B did not limit within 1 s of the PUT:\n{}", b.log_text()));
    assert!(put_at.elapsed() < Duration::from_millis(1500), "{:?}", put_at.elapsed());
    // At the new rate, measured by a burst that begins after it: the burst that first
    // showed it may have begun under the old one (8 of 12 through: 4 before, 4 after).
    assert_allowance("4/s on B", burst(&b, "on_b", 12).await, 4);
    assert_allowance("4/s on A", burst(&a, "on_a", 12).await, 4);

    // An instance started later reads the shared limits at start-up.
    let mut c = on_redis(&redis, 0, 1000);
    c.ready().await;
    let now = put_limits(&c, &json!({})).await;
    assert_eq!(now.assert_ok()["rate_per_user"], 4, "{}", now.text);
    assert_allowance("4/s on C", burst(&c, "on_c", 12).await, 4);

    // null: back to each instance's configured rate, everywhere.
    let r = put_limits(&b, &json!({"rate_per_user": null})).await;
    assert_eq!(r.assert_ok()["rate_per_user"], 1000);
    let back = common::poll(Duration::from_secs(1), async || {
        let answer = put_limits(&a, &json!({})).await;
        (answer.json["rate_per_user"] == 1000).then_some(())
    })
    .await;
    assert!(back.is_some(), "A back to its configured 1000/s");
    assert_eq!(burst(&a, "after_null", 20).await.0, 20);
    for gw in [&mut a, &mut b, &mut c] {
        gw.terminate();
        assert_eq!(gw.wait_exit(Duration::from_secs(15)).and_then(|s| s.code()), Some(0));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_global_rate_is_shared_by_the_live_instances() {
    let redis = RedisServer::start();
    let mut a = on_redis(&redis, 20, 0);
    let mut b = on_redis(&redis, 20, 0);
    // A `worker` serves no shopper: it takes no share.
    let worker = Binary::builder()
        .arg("worker")
        .flag("--redis-url", &redis.url())
        .flag("--rate-global", "20")
        .spawn();
    a.ready().await;
    b.ready().await;
    logged(&worker, "worker running", 1).await;
    // Both heartbeat within a second or two: each takes half.
    let share = |api: &Api, instances: u64, share: u64| {
        let api = Api::new(api.url.clone());
        async move {
            common::poll(Duration::from_secs(5), async || {
                let r = put_limits(&api, &json!({})).await;
                (r.json["instances"] == instances && r.json["rate_global_share"] == share).then_some(r.json)
            })
            .await
        }
    };
    let answer = share(&a, 2, 10)
        .await
        .unwrap_or_else(|| panic!("A never saw 2 instances:\n{}", a.log_text()));
    assert_eq!(answer["rate_global"], 20, "{answer}");
    share(&b, 2, 10).await.expect("B shares too");
    // Counting: A lets 10 through at once (distinct users: only the global bucket limits).
    let started = Instant::now();
    let mut passed = 0;
    for i in 0..30 {
        let r = send(a.reserve_req("no_such_item", &format!("user{i}"))).await;
        passed += usize::from(r.status == 404);
    }
    assert_allowance("A's half of 20/s", (passed, started.elapsed()), 10);
    let metrics = send(a.get("/metrics")).await.text;
    assert!(
        metrics.contains("seckill_rate_limit{kind=\"global_share\"} 10")
            && metrics.contains("seckill_rate_limit{kind=\"global\"} 20"),
        "the gauges say it:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("rate_limit"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A PUT of the global rate is shared the same way.
    let r = put_limits(&b, &json!({"rate_global": 40})).await;
    assert_eq!(r.assert_ok()["rate_global_share"], 20, "{}", r.text);
    share(&a, 2, 20).await.expect("A takes half of the new 40/s");

    // B leaves (SIGTERM): A takes the whole rate again.
    b.terminate();
    assert_eq!(b.wait_exit(Duration::from_secs(15)).and_then(|s| s.code()), Some(0));
    share(&a, 1, 40)
        .await
        .expect("A alone takes all 40/s (the worker is no instance)");
    assert!(worker.log_text().contains("worker running"), "{}", worker.log_text());
    a.terminate();
    a.wait_exit(Duration::from_secs(15)).expect("A exits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_limits_refuses_bad_bodies_and_strangers_and_applies_locally_without_redis() {
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Binary::builder()
        .dir(dir.path())
        .flag(
            "--database-url",
            &format!("sqlite://{}/orders.db", dir.path().display()),
        )
        .flag("--admin-token", ADMIN_TOKEN)
        .flag("--rate-per-user", "1000")
        .flag("--rate-per-ip", "0")
        .spawn();
    gw.ready().await;
    let body = json!({"rate_per_user": 1});
    send(gw.put("/admin/v1/limits").json(&body))
        .await
        .assert_refused(403, "forbidden");
    send(gw.put("/admin/v1/limits").bearer_auth("not-the-token").json(&body))
        .await
        .assert_refused(403, "forbidden");
    let wrong_method = send(gw.admin(gw.get("/admin/v1/limits"))).await;
    assert_eq!(wrong_method.status, 405, "{}", wrong_method.text);

    for raw in [
        "",
        "not json",
        "[1]",
        "5",
        "null",
        r#"{"rate_per_user": -1}"#,
        r#"{"rate_per_user": 4294967296}"#,
        r#"{"rate_per_user": 2.5}"#,
        r#"{"rate_per_user": "2"}"#,
        r#"{"rate_per_user": 2, "burst": 9}"#,
    ] {
        let r = send(
            gw.admin(gw.put("/admin/v1/limits"))
                .header("content-type", "application/json")
                .body(raw),
        )
        .await;
        r.assert_refused(400, "bad_request");
        let message = r.json["message"].as_str().unwrap();
        for rust in ["u32", "u64", "i64", "Option", "serde"] {
            assert!(!message.contains(rust), "{raw:?}: {message}");
        }
    }
    assert_eq!(
        burst(&gw, "u0", 10).await.0,
        10,
        "nothing changed by the refused bodies"
    );

    let r = put_limits(&gw, &json!({"rate_per_user": 3, "rate_global": 0})).await;
    let answer = r.assert_ok();
    assert_eq!(
        *answer,
        json!({"rate_global": 0, "rate_per_user": 3, "rate_per_ip": 0, "instances": 1, "rate_global_share": 0})
    );
    assert_allowance("3/s after the PUT", burst(&gw, "u1", 10).await, 3);
}
