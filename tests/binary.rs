//! The real binary's process contract: `--help` lists every setting with its environment
//! variable, a bad setting fails at start-up naming it, and SIGTERM finishes in-flight
//! requests and exits 0.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn gateway() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_seckill-gateway"));
    c.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    c
}

#[test]
fn help_lists_the_contract_settings() {
    let out = gateway().arg("--help").output().unwrap();
    assert!(out.status.success());
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
    ] {
        assert!(help.contains(var), "--help mentions {var}");
    }
}

#[test]
fn a_bad_setting_fails_naming_it() {
    let out = gateway().env("DATABASE_URL", "mysql://nope").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("DATABASE_URL"));
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let port = common::free_port();
    let mut child = gateway()
        .current_dir(dir.path())
        .env("SECKILL_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/readyz");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !http.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
            assert!(Instant::now() < deadline, "gateway did not become ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // A request whose body is still arriving when SIGTERM comes is answered.
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        conn.write_all(
            b"POST /api/v1/items/demo/reserve HTTP/1.1\r\nhost: x\r\nx-user-id: late\r\n\
              content-type: application/json\r\ncontent-length: 9\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let term = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        assert!(term.success());
        tokio::time::sleep(Duration::from_millis(200)).await;
        conn.write_all(br#"{"qty":1}"#).await.unwrap();
        let mut response = String::new();
        conn.read_to_string(&mut response).await.unwrap();
        assert!(
            response.starts_with("HTTP/1.1 200"),
            "in-flight request answered: {response}"
        );
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
            break;
        }
        assert!(Instant::now() < deadline, "gateway did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    }
}
