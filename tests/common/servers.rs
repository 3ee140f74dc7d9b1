//! Throwaway servers on free loopback ports, started as child processes and
//! waited for (envoyproxy/ratelimit `test/common/common.go`).
//!
//! - [`RedisServer`]: a private `redis-server` per test (or per file).
//! - [`PgServer`]: a private PostgreSQL cluster, for tests that stop and start
//!   the database.
//! - [`shared_pg`]: a fresh, empty database for tests that only need *a*
//!   database; on the one cluster `./scripts/test` starts, or on a private
//!   cluster shared by the whole test binary.
//! - [`unique`]: names that no other test, thread or process uses.
//!
//! Nothing here is skipped when a server binary is missing: the harness panics
//! with a message that says how to install it. No fixed ports, nothing is ever
//! killed by name, and the machine's own Redis and PostgreSQL are never used.

use std::ffi::OsStr;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use std::{fs, io, thread};

use tempfile::TempDir;

/// How long a server may take to answer after it was started.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Environment variable holding the base URL (`postgres://postgres@127.0.0.1:PORT`)
/// of the cluster that `./scripts/test` started for the whole run.
pub const SHARED_PG_ENV: &str = "SECKILL_TEST_PG";

/// A name no other call, thread or process of this run returns:
/// `<prefix>_<pid>_<start time>_<counter>`, all lowercase hex. It is a valid
/// item, user and order id and, when `prefix` is, an unquoted SQL identifier.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    static STARTED: OnceLock<u128> = OnceLock::new();
    let started = STARTED.get_or_init(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{prefix}_{:x}_{:x}_{n:x}",
        std::process::id(),
        started & 0xffff_ffff_ffff
    )
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read
/// the port, release it), and never handed out before in this process: the
/// kernel may give the same free port to two tests running at once before
/// either has bound it (a cluster then met another test's node: "node is not
/// empty"). A server started on it may still lose a race with another process,
/// which is why the `start` functions below retry on another port.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// `start` on a free port, tried on three ports (a server may lose the race
/// for one); panics naming `what` with the last error when none worked.
pub(super) fn on_a_free_port<T>(what: &str, mut start: impl FnMut(u16) -> Result<T, String>) -> T {
    let mut last_err = String::new();
    for _ in 0..3 {
        match start(free_port()) {
            Ok(started) => return started,
            Err(e) => last_err = e,
        }
    }
    panic!("{what} did not start: {last_err}");
}

// ---------------------------------------------------------------------------
// Redis

/// A throwaway `redis-server` on a free loopback port, keeping nothing on disk.
/// Dropping it kills it.
pub struct RedisServer {
    /// `None` while killed.
    child: Option<Child>,
    port: u16,
    /// Working directory and log file; removed on drop.
    dir: TempDir,
}

impl RedisServer {
    /// Starts a server and waits until it answers `PING`.
    ///
    /// Panics if `redis-server` is not installed, or it does not answer within
    /// 20 s (three ports are tried).
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("seckill-redis-")
            .tempdir()
            .expect("create a temporary directory for redis-server");
        let (port, child) = on_a_free_port("redis-server", |port| {
            spawn_redis(dir.path(), port, &NOTHING_ON_DISK).map(|child| (port, child))
        });
        Self {
            child: Some(child),
            port,
            dir,
        }
    }

    /// The port it listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT/`
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// A client for [`Self::url`] (connections are opened lazily by the caller).
    pub fn client(&self) -> redis::Client {
        redis::Client::open(self.url()).expect("redis client for the test server")
    }

    /// Kills the server with SIGKILL and waits for it: every connection drops
    /// at once and, as nothing is persisted, all data and the script cache are
    /// gone. No-op when already killed.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL on Unix
            let _ = child.wait();
        }
    }

    /// Kills the server and puts a listener that accepts connections and never
    /// answers on its port: a hung Redis. Drop the listener before
    /// [`Self::restart`]. Call it inside a Tokio runtime.
    pub fn hang(&mut self) -> tokio::net::TcpListener {
        self.kill();
        let socket = tokio::net::TcpSocket::new_v4().expect("a TCP socket");
        socket.set_reuseaddr(true).expect("SO_REUSEADDR");
        socket
            .bind((Ipv4Addr::LOCALHOST, self.port).into())
            .expect("bind the stalled port");
        socket.listen(64).expect("listen on the stalled port")
    }

    /// Kills the server if it runs, then starts a new, empty one on the same
    /// port and waits until it answers `PING` (a failover as the gateway sees
    /// it: same address, no data, empty script cache).
    pub fn restart(&mut self) {
        self.kill();
        let _ = fs::remove_file(self.dir.path().join("dump.rdb"));
        self.start_again();
    }

    /// `SAVE`s now and keeps a copy of the snapshot, for [`Self::restart_from`].
    pub fn snapshot(&self) -> PathBuf {
        let mut conn = self
            .client()
            .get_connection()
            .expect("connect to the test redis-server");
        let _: () = redis::cmd("SAVE").query(&mut conn).expect("SAVE");
        let copy = self.dir.path().join(format!("{}.rdb", unique("snapshot")));
        fs::copy(self.dir.path().join("dump.rdb"), &copy).expect("copy the snapshot");
        copy
    }

    /// Kills the server (SIGKILL) and starts it again on the same port from `snapshot`: a
    /// Redis restarted from an older persistence file, every write since then lost.
    pub fn restart_from(&mut self, snapshot: &Path) {
        self.kill();
        fs::copy(snapshot, self.dir.path().join("dump.rdb")).expect("put the snapshot back");
        self.start_again();
    }

    /// Starts the server on its port again (it loads `dump.rdb` when there is one).
    fn start_again(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match spawn_redis(self.dir.path(), self.port, &NOTHING_ON_DISK) {
                Ok(child) => {
                    self.child = Some(child);
                    return;
                }
                // The old socket may linger for a moment.
                Err(e) if Instant::now() > deadline => {
                    panic!("redis-server did not restart on port {}: {e}", self.port)
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The configuration of a [`RedisServer`]: no snapshots, no AOF.
const NOTHING_ON_DISK: [&str; 4] = ["--save", "", "--appendonly", "no"];

/// Starts `redis-server` on `port` with `config` (`--name value` pairs), its
/// working directory and log file (`redis-<port>.log`) in `dir`, and waits for
/// `+PONG` (a server loading its AOF answers `-LOADING` until it is done); on
/// failure the child is reaped and the error carries its log.
pub(super) fn spawn_redis(dir: &Path, port: u16, config: &[impl AsRef<OsStr>]) -> Result<Child, String> {
    let log = dir.join(format!("redis-{port}.log"));
    let spawned = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(config)
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            panic!("redis-server not found: install it (apt-get install redis-server) or run ./scripts/test")
        }
        Err(e) => panic!("could not run redis-server: {e}"),
    };
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if ping(port) {
            return Ok(child);
        }
        let exited = child.try_wait().ok().flatten();
        if exited.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let log = fs::read_to_string(&log).unwrap_or_default();
            return Err(format!(
                "port {port}: {}; log:\n{log}",
                match exited {
                    Some(status) => format!("exited with {status}"),
                    None => "no PONG within 20 s".to_owned(),
                }
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// True if a Redis server on `port` answers `PING` with `+PONG`.
fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}

// ---------------------------------------------------------------------------
// PostgreSQL

/// A throwaway PostgreSQL cluster: `initdb` into a temporary directory, then
/// `pg_ctl start` on a free loopback port (trust auth, user `postgres`,
/// `fsync=off`, the socket in the same directory). Dropping it stops it
/// (`pg_ctl stop -m fast`) and removes the directory.
///
/// `initdb` refuses to run as root: as root, the directory is given to the
/// `postgres` user and every PostgreSQL program runs through
/// `runuser -u postgres --`.
pub struct PgServer {
    port: u16,
    /// Holds `data/` (the cluster) and the Unix socket; removed on drop.
    root: TempDir,
    bin: PgBin,
    running: bool,
}

impl PgServer {
    /// Creates a cluster and starts it; `pg_ctl -w` waits until it accepts
    /// connections. Panics with a how-to-install message when the PostgreSQL
    /// server binaries are missing.
    pub fn start() -> Self {
        let bin = PgBin::find();
        let root = tempfile::Builder::new()
            .prefix("seckill-pg-")
            .tempdir()
            .expect("create a temporary directory for PostgreSQL");
        if bin.as_root {
            run(
                Command::new("chown").arg("postgres:").arg(root.path()),
                "chown the PostgreSQL directory to postgres",
            );
        }
        let data = root.path().join("data");
        run(
            bin.command("initdb", root.path())
                .arg("-D")
                .arg(&data)
                .args(["--auth=trust", "-U", "postgres", "-E", "UTF8"])
                .args(["--locale=C", "--no-sync"]),
            "initdb",
        );
        let mut server = Self {
            port: 0,
            root,
            bin,
            running: false,
        };
        on_a_free_port("PostgreSQL", |port| {
            server.port = port;
            server.pg_ctl_start()
        });
        server
    }

    /// The port it listens on (127.0.0.1 only).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT` (no database).
    pub fn base_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    /// `postgres://postgres@127.0.0.1:PORT/<db>`
    pub fn url(&self, db: &str) -> String {
        format!("{}/{db}", self.base_url())
    }

    /// Creates an empty database `name` (an unquoted identifier, e.g. from
    /// [`unique`]); panics if it cannot.
    pub fn create_database(&self, name: &str) {
        create_database(&self.bin.psql(), &self.base_url(), name);
    }

    /// Stops the server (`pg_ctl stop -m fast`): connections are refused until
    /// [`Self::start_again`]. Data is kept. No-op when stopped.
    pub fn stop(&mut self) {
        if self.running {
            run(
                self.bin
                    .command("pg_ctl", self.root.path())
                    .arg("-D")
                    .arg(self.data())
                    .args(["-m", "fast", "-w", "stop"]),
                "pg_ctl stop",
            );
            self.running = false;
        }
    }

    /// Starts the stopped server again on the same port with the same data and
    /// waits until it accepts connections. No-op when running.
    pub fn start_again(&mut self) {
        if !self.running
            && let Err(e) = self.pg_ctl_start()
        {
            panic!("PostgreSQL did not start again on port {}: {e}", self.port);
        }
    }

    fn data(&self) -> PathBuf {
        self.root.path().join("data")
    }

    fn pg_ctl_start(&mut self) -> Result<(), String> {
        let log = self.root.path().join("postgres.log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
            self.port,
            self.root.path().display()
        );
        let out = output(
            self.bin
                .command("pg_ctl", self.root.path())
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(&log)
                .args(["-o", &opts, "-w", "-t", "30", "start"]),
        );
        if out.status.success() {
            self.running = true;
            Ok(())
        } else {
            Err(format!(
                "port {}: {}; log:\n{}",
                self.port,
                describe(&out),
                fs::read_to_string(&log).unwrap_or_default()
            ))
        }
    }

    /// Makes the cluster outlive this value but not the test process: a
    /// watchdog shell stops it and removes its directory once this process
    /// has exited (statics are never dropped).
    fn stop_when_process_exits(self) {
        // Never dropped: the watchdog owns the cluster and its directory.
        let this = std::mem::ManuallyDrop::new(self);
        let pg_ctl = this.bin.dir.join("pg_ctl");
        let runuser = if this.bin.as_root { "runuser -u postgres --" } else { "" };
        // The watchdog runs in the background of a shell we wait for, so it
        // is never our child (no zombie) and outlives us.
        let script = format!(
            r#"(while kill -0 "$0" 2>/dev/null; do sleep 0.5; done
cd "$2" && {runuser} "$1" -D "$2/data" -m immediate -w stop >/dev/null 2>&1
rm -rf "$2") &"#
        );
        let status = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(std::process::id().to_string())
            .arg(&pg_ctl)
            .arg(this.root.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("start the PostgreSQL watchdog");
        assert!(status.success(), "the PostgreSQL watchdog did not start");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let _ = output(
                self.bin
                    .command("pg_ctl", self.root.path())
                    .arg("-D")
                    .arg(self.data())
                    .args(["-m", "immediate", "-w", "stop"]),
            );
        }
    }
}

/// A fresh, empty database for this test, as a URL
/// (`postgres://postgres@127.0.0.1:PORT/<unique name>`).
///
/// With `SECKILL_TEST_PG` set (`./scripts/test` does), the database is created
/// on that cluster. Otherwise the first call starts a private [`PgServer`]
/// that every later call of this test binary reuses; it is stopped and
/// removed after the test binary exits. Tests that need to stop and restart
/// the database must start their own [`PgServer`] instead.
pub fn shared_pg() -> String {
    static PRIVATE: OnceLock<String> = OnceLock::new();
    let base = match std::env::var(SHARED_PG_ENV) {
        Ok(url) if !url.is_empty() => url.trim_end_matches('/').to_owned(),
        _ => PRIVATE
            .get_or_init(|| {
                let server = PgServer::start();
                let base = server.base_url();
                server.stop_when_process_exits();
                base
            })
            .clone(),
    };
    let name = unique("t");
    create_database(&PgBin::find_psql(), &base, &name);
    format!("{base}/{name}")
}

/// Where the PostgreSQL programs are, and whether they must run as `postgres`.
struct PgBin {
    dir: PathBuf,
    as_root: bool,
}

impl PgBin {
    /// The directory of `pg_ctl` on PATH (resolved through symlinks), else the
    /// newest `/usr/lib/postgresql/*/bin`, provided it also has `initdb` and
    /// `postgres`.
    fn find() -> Self {
        let dir = Self::find_dir().unwrap_or_else(|| {
            panic!(
                "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found on PATH or in \
                 /usr/lib/postgresql/*/bin: install them (apt-get install postgresql) or run \
                 ./scripts/test"
            )
        });
        let as_root = fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
        Self { dir, as_root }
    }

    fn find_dir() -> Option<PathBuf> {
        let complete = |d: &Path| ["initdb", "pg_ctl", "postgres"].iter().all(|b| d.join(b).is_file());
        if let Some(dir) = which("pg_ctl")
            .and_then(|p| fs::canonicalize(p).ok())
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .filter(|d| complete(d))
        {
            return Some(dir);
        }
        let mut dirs: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .flatten()
            .filter_map(|e| {
                let version = e.file_name().to_str()?.parse().ok()?;
                Some((version, e.path().join("bin")))
            })
            .filter(|(_, d)| complete(d))
            .collect();
        dirs.sort();
        dirs.pop().map(|(_, d)| d)
    }

    /// `psql` beside the server binaries.
    fn psql(&self) -> PathBuf {
        self.dir.join("psql")
    }

    /// `psql` on PATH, else beside the server binaries.
    fn find_psql() -> PathBuf {
        which("psql").unwrap_or_else(|| Self::find().psql())
    }

    /// `tool` from the PostgreSQL directory, run as `postgres` when we are
    /// root, in `cwd` (which `postgres` can read: initdb fails otherwise).
    fn command(&self, tool: &str, cwd: &Path) -> Command {
        let mut cmd = if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.dir.join(tool));
            c
        } else {
            Command::new(self.dir.join(tool))
        };
        cmd.current_dir(cwd).stdin(Stdio::null());
        cmd
    }
}

/// `CREATE DATABASE name` on the cluster at `base` (no trailing database).
fn create_database(psql: &Path, base: &str, name: &str) {
    let out = output(
        Command::new(psql)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(format!("{base}/postgres"))
            .arg("-c")
            .arg(format!("CREATE DATABASE \"{name}\""))
            .stdin(Stdio::null()),
    );
    assert!(
        out.status.success(),
        "CREATE DATABASE {name} on {base} failed: {}",
        describe(&out)
    );
}

/// The first executable `name` on PATH.
fn which(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("could not run {:?}: {e}", cmd.get_program()))
}

fn run(cmd: &mut Command, what: &str) {
    let out = output(cmd);
    assert!(out.status.success(), "{what} failed: {}", describe(&out));
}

fn describe(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
