//! The real binary's process contract: `--help` lists every setting with its environment
//! variable (also after a subcommand), flags work before and after the subcommand, a bad
//! setting fails at start-up naming it, `worker` without Redis is refused before it creates
//! anything, logs written to a pipe carry no colour codes, and SIGTERM finishes in-flight
//! requests and exits 0.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::binary::{Binary, command};

/// A gateway started in embedded mode by the fixture's launcher, in `dir`, with its SQLite
/// file there, giving its own listen address in `args` (read back from the banner) and its
/// output captured.
fn start(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Binary {
    let db = dir.join("orders.db");
    let mut b = Binary::builder()
        .dir(dir)
        .env("DATABASE_URL", &format!("sqlite://{}", db.display()))
        .address_from_banner()
        .captured();
    for (k, v) in env {
        b = b.env(k, v);
    }
    for a in args {
        b = b.arg(a);
    }
    b.spawn()
}

/// SIGTERM (by PID), then the exit status.
fn stop(g: &mut Binary) -> std::process::ExitStatus {
    g.terminate();
    g.wait_exit(Duration::from_secs(15))
        .expect("gateway did not exit after SIGTERM")
}

/// One HTTP/1.1 GET over a plain socket; returns the whole response.
fn http_get(addr: &str, path: &str) -> String {
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(conn, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn help_lists_the_contract_settings() {
    // Also after a subcommand: the settings are global flags.
    for args in [&["--help"][..], &["serve", "--help"], &["worker", "--help"]] {
        let out = command().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("--listen"), "{args:?} lists the flags:\n{help}");
        assert!(
            help.contains("host name and listen port"),
            "{args:?} describes the consumer name's default"
        );
    }
    let out = command().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "SECKILL_LISTEN",
        "REDIS_URL",
        "DATABASE_URL",
        "SECKILL_ADMIN_TOKEN",
        "SECKILL_JWT_SECRET",
        "SECKILL_RATE_GLOBAL",
        "SECKILL_RATE_PER_USER",
        "SECKILL_RATE_PER_IP",
        "SECKILL_TRUST_FORWARDED",
        "SECKILL_PAYMENT_TIMEOUT",
        "SECKILL_DEMO",
        "SECKILL_LOG_FORMAT",
        "SECKILL_LOG",
        "SECKILL_CONFIG",
    ] {
        assert!(help.contains(var), "--help mentions {var}");
    }
}

#[test]
fn a_bad_setting_fails_naming_it() {
    let out = command().env("DATABASE_URL", "mysql://nope").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));
}

#[test]
fn flags_work_after_the_subcommand() {
    // The flag after the subcommand wins over the environment.
    let dir = tempfile::tempdir().unwrap();
    let mut g = start(
        dir.path(),
        &["serve", "--listen", "127.0.0.1:0"],
        &[("SECKILL_LISTEN", "127.0.0.1:9")],
    );
    let port = g.port();
    assert!(port != 0 && port != 9, "listening on a free port, not {}", g.addr());
    let response = http_get(&g.addr(), "/healthz");
    assert!(response.starts_with("HTTP/1.1 200"), "GET /healthz: {response}");
    assert!(dir.path().join("orders.db").exists(), "DATABASE_URL is used");
    assert!(!dir.path().join("seckill.db").exists());
    let status = stop(&mut g);
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
}

#[test]
fn worker_without_redis_is_refused_before_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out = command().current_dir(dir.path()).arg("worker").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("REDIS_URL"), "the message names REDIS_URL: {stderr}");
    assert!(!dir.path().join("seckill.db").exists(), "no seckill.db created");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created in the working directory"
    );
}

#[test]
fn text_logs_to_a_pipe_carry_no_colour_codes() {
    let dir = tempfile::tempdir().unwrap();
    let mut g = start(
        dir.path(),
        &["--listen", "127.0.0.1:0"],
        &[("SECKILL_LOG_FORMAT", "text")],
    );
    // A request that logs nothing at the default level, to run the request path too.
    assert!(http_get(&g.addr(), "/readyz").starts_with("HTTP/1.1 200"));
    let status = stop(&mut g);
    let text = g.stderr_text();
    assert_eq!(status.code(), Some(0), "{status:?} {text}");
    // Start-up warns that X-User-Id is trusted (no JWT secret): a line that is coloured on
    // a terminal.
    assert!(
        text.contains("WARN") && text.contains("X-User-Id"),
        "logs written: {text}"
    );
    assert!(!text.contains('\x1b'), "no ANSI escape (ESC) in piped logs: {text:?}");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let mut gw = Binary::builder().spawn();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        gw.ready().await;
        // A request whose body is still arriving when SIGTERM comes is answered.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", gw.port())).await.unwrap();
        conn.write_all(
            b"POST /api/v1/items/demo/reserve HTTP/1.1\r\nhost: x\r\nx-user-id: late\r\n\
              content-type: application/json\r\ncontent-length: 9\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        gw.terminate();
        tokio::time::sleep(Duration::from_millis(200)).await;
        conn.write_all(br#"{"qty":1}"#).await.unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "in-flight request answered: {response}"
        );
    });
    let status = gw
        .wait_exit(Duration::from_secs(15))
        .expect("gateway did not exit after SIGTERM");
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
}
