//! The real binary's process contract: `--help` lists every setting with its environment
//! variable (also after a subcommand), flags work before and after the subcommand, a bad
//! setting fails at start-up naming it, `worker` without Redis is refused before it creates
//! anything, logs written to a pipe carry no colour codes, and SIGTERM finishes in-flight
//! requests and exits 0.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn gateway() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_seckill-gateway"));
    c.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    c
}

/// The start-up banner's prefix; the address follows, then ` (<mode> mode)`.
const BANNER: &str = "seckill-gateway listening on http://";

/// A gateway started in embedded mode, with its working directory and its SQLite file in a
/// temporary directory, and its banner read from stdout.
struct Started {
    child: Child,
    /// `host:port` from the banner.
    addr: String,
    /// Everything the process writes to stderr, collected by a thread (a full pipe would
    /// block the process).
    stderr: JoinHandle<Vec<u8>>,
    dir: tempfile::TempDir,
}

impl Started {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Started {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("orders.db");
        let mut cmd = gateway();
        cmd.current_dir(dir.path())
            .env("DATABASE_URL", format!("sqlite://{}", db.display()))
            .envs(env.iter().copied())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut b = Vec::new();
            let _ = err.read_to_end(&mut b);
            b
        });
        // Keep reading stdout to the end: a closed pipe would make the process' next
        // println fail.
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(rest) = line.strip_prefix(BANNER) {
                        break rest.split(' ').next().unwrap_or_default().to_owned();
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let err = stderr.join().unwrap_or_default();
                    panic!(
                        "no start-up banner on stdout; stderr:\n{}",
                        String::from_utf8_lossy(&err)
                    );
                }
            }
        };
        Started {
            child,
            addr,
            stderr,
            dir,
        }
    }

    /// SIGTERM, then the exit status and everything written to stderr.
    fn stop(mut self) -> (ExitStatus, Vec<u8>) {
        let term = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(term.success());
        let deadline = Instant::now() + Duration::from_secs(15);
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!("gateway did not exit after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        (status, self.stderr.join().unwrap_or_default())
    }
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
        let out = gateway().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(help.contains("--listen"), "{args:?} lists the flags:\n{help}");
        assert!(
            help.contains("host name and listen port"),
            "{args:?} describes the consumer name's default"
        );
    }
    let out = gateway().arg("--help").output().unwrap();
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
fn flags_work_after_the_subcommand() {
    // The flag after the subcommand wins over the environment.
    let g = Started::start(
        &["serve", "--listen", "127.0.0.1:0"],
        &[("SECKILL_LISTEN", "127.0.0.1:9")],
    );
    let port: u16 = g.addr.rsplit(':').next().unwrap().parse().unwrap();
    assert!(port != 0 && port != 9, "listening on a free port, not {}", g.addr);
    let response = http_get(&g.addr, "/healthz");
    assert!(response.starts_with("HTTP/1.1 200"), "GET /healthz: {response}");
    assert!(g.dir.path().join("orders.db").exists(), "DATABASE_URL is used");
    assert!(!g.dir.path().join("seckill.db").exists());
    let (status, _) = g.stop();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
}

#[test]
fn worker_without_redis_is_refused_before_creating_anything() {
    let dir = tempfile::tempdir().unwrap();
    let out = gateway().current_dir(dir.path()).arg("worker").output().unwrap();
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
    let g = Started::start(&["--listen", "127.0.0.1:0"], &[("SECKILL_LOG_FORMAT", "text")]);
    // A request that logs nothing at the default level, to run the request path too.
    assert!(http_get(&g.addr, "/readyz").starts_with("HTTP/1.1 200"));
    let (status, stderr) = g.stop();
    let text = String::from_utf8_lossy(&stderr);
    assert_eq!(status.code(), Some(0), "{status:?} {text}");
    // Start-up warns that X-User-Id is trusted (no JWT secret): a line that is coloured on
    // a terminal.
    assert!(
        text.contains("WARN") && text.contains("X-User-Id"),
        "logs written: {text}"
    );
    assert!(!stderr.contains(&0x1b), "no ANSI escape (ESC) in piped logs: {text:?}");
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
