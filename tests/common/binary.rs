//! The one real-binary launcher: `seckill-gateway` as a child process with a
//! cleared environment (only `PATH` and `HOME`) and explicit flags, on a free
//! loopback port, in a directory of its own; waited for (`/readyz`), stopped
//! by PID (SIGTERM or SIGKILL), its output kept in a log file or captured line
//! by line.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use super::free_port;
use super::http::Api;

/// The gateway executable cargo built for this test.
pub const BIN: &str = env!("CARGO_BIN_EXE_seckill-gateway");

/// How long a started binary may take to print its banner or answer `/readyz`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The start-up banner's prefix; the address follows, then ` (<mode> mode)`.
pub const BANNER: &str = "seckill-gateway listening on http://";

/// The binary with a cleared environment (only `PATH` and `HOME`): for runs
/// that are not a server (`--help`, `reconcile`, a bad setting).
pub fn command() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_clear();
    for var in ["PATH", "HOME"] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

pub struct BinaryBuilder {
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
    dir: Option<PathBuf>,
    port: Option<u16>,
    from_banner: bool,
    log: Option<PathBuf>,
    captured: bool,
}

impl BinaryBuilder {
    /// A flag, e.g. `.flag("--redis-url", &redis.url())`.
    pub fn flag(self, name: &str, value: &str) -> Self {
        self.arg(name).arg(value)
    }

    /// One argument as is (a subcommand: `.arg("serve")`), after the ones before.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    /// A variable of the (otherwise cleared) environment: for what has no flag
    /// (`RUST_LOG`), or a test of the variable itself.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.envs.push((name.to_owned(), value.to_owned()));
        self
    }

    /// The working directory (default: an empty one of its own, so the
    /// embedded `./seckill.db` never lands in the source tree).
    pub fn dir(mut self, dir: &Path) -> Self {
        self.dir = Some(dir.to_owned());
        self
    }

    /// Listen on this port (default: a free one), e.g. to restart on the same.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// The test gives the listen address itself (`--listen 127.0.0.1:0`,
    /// `SECKILL_LISTEN`, after a subcommand…): no `--listen` is added, and
    /// [`Self::spawn`] reads the address from the start-up banner.
    pub fn address_from_banner(mut self) -> Self {
        self.from_banner = true;
        self
    }

    /// Append stdout and stderr to this file (kept over a restart). Default: a
    /// file of its own.
    pub fn log(mut self, path: &Path) -> Self {
        self.log = Some(path.to_owned());
        self
    }

    /// Read stdout and stderr through pipes, line by line, as they come
    /// ([`Binary::next_line`], [`Binary::stdout_text`], [`Binary::stderr_text`]).
    pub fn captured(mut self) -> Self {
        self.captured = true;
        self
    }

    /// Starts it: `--listen 127.0.0.1:PORT` then the arguments given (or, with
    /// [`Self::address_from_banner`], only those, and waits for the banner).
    /// Does not wait for readiness (see [`Binary::ready`]).
    pub fn spawn(self) -> Binary {
        let own = tempfile::Builder::new()
            .prefix("seckill-bin-")
            .tempdir()
            .expect("temporary directory for the gateway binary");
        let dir = self.dir.unwrap_or_else(|| own.path().to_owned());
        let port = self.port.unwrap_or_else(free_port);
        let mut cmd = command();
        cmd.current_dir(&dir);
        if !self.from_banner {
            cmd.arg("--listen").arg(format!("127.0.0.1:{port}"));
        }
        cmd.args(&self.args);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let log = if self.captured {
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
            None
        } else {
            let path = self.log.unwrap_or_else(|| own.path().join("gateway.log"));
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .expect("the gateway's log file");
            cmd.stdout(out.try_clone().expect("log file")).stderr(out);
            Some(path)
        };
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("could not run {BIN}: {e}"));
        let output = self.captured.then(|| Output::capture(&mut child));
        let mut binary = Binary {
            child: Some(child),
            port,
            log,
            output,
            api: Api::new(format!("http://127.0.0.1:{port}")),
            _own: own,
        };
        if self.from_banner {
            let addr = binary.banner_address();
            binary.port = addr.rsplit(':').next().and_then(|p| p.parse().ok()).unwrap_or(0);
            binary.api = Api::new(format!("http://{addr}"));
        }
        binary
    }
}

/// A gateway process; killed (SIGKILL, by PID) and reaped when dropped. Its
/// HTTP routes through [`Api`] (`Deref`).
pub struct Binary {
    /// `None` once it has exited and been reaped.
    child: Option<Child>,
    port: u16,
    /// `None` when the output is captured.
    log: Option<PathBuf>,
    /// `Some` when the output is captured.
    output: Option<Output>,
    pub api: Api,
    _own: tempfile::TempDir,
}

impl Deref for Binary {
    type Target = Api;

    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Binary {
    /// No flags but `--listen`, an empty working directory, output to a log.
    pub fn builder() -> BinaryBuilder {
        BinaryBuilder {
            args: Vec::new(),
            envs: Vec::new(),
            dir: None,
            port: None,
            from_banner: false,
            log: None,
            captured: false,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        self.api.url.trim_start_matches("http://").to_owned()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the gateway runs").id()
    }

    /// Waits until `/readyz` answers 200; panics with the output if the
    /// process exits first or is not ready within [`READY_TIMEOUT`].
    pub async fn ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(r) = self.api.get("/readyz").send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the gateway exited with {status}; output:\n{}", self.output_text());
            }
            assert!(
                Instant::now() < deadline,
                "the gateway was not ready within {READY_TIMEOUT:?}; output:\n{}",
                self.output_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address of the banner line; panics with the output without one.
    fn banner_address(&mut self) -> String {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = if self.output.is_some() {
                self.next_line(left.min(Duration::from_millis(100)))
            } else {
                self.log_text().lines().find(|l| l.contains(BANNER)).map(str::to_owned)
            };
            if let Some(line) = line
                && let Some(at) = line.find(BANNER)
            {
                return line[at + BANNER.len()..]
                    .split(' ')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
            }
            let exited = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            if exited.is_some() || left.is_zero() {
                self.kill();
                panic!("no start-up banner ({exited:?}); output:\n{}", self.output_text());
            }
            if self.output.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// The next line it printed (stdout or stderr, in the order read), waiting
    /// at most `within`; `None` then, or once both streams are closed.
    /// Captured output only.
    pub fn next_line(&mut self, within: Duration) -> Option<String> {
        let out = self.output.as_ref().expect("a binary started with .captured()");
        out.lines.recv_timeout(within).ok()
    }

    /// Everything it printed on stdout so far (all of it once it has exited).
    /// Captured output only.
    pub fn stdout_text(&self) -> String {
        self.output
            .as_ref()
            .expect("a binary started with .captured()")
            .stdout
            .text()
    }

    /// Everything it printed on stderr so far (all of it once it has exited).
    /// Captured output only.
    pub fn stderr_text(&self) -> String {
        self.output
            .as_ref()
            .expect("a binary started with .captured()")
            .stderr
            .text()
    }

    /// What it wrote so far: the log, or the captured streams.
    pub fn output_text(&self) -> String {
        match &self.output {
            Some(out) => format!("{}{}", out.stdout.text(), out.stderr.text()),
            None => self.log_text(),
        }
    }

    /// Its log file so far ("" when the output is captured).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Sends SIGTERM (by PID); see [`Self::wait_exit`].
    pub fn terminate(&self) {
        let term = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status()
            .expect("run kill -TERM");
        assert!(term.success(), "kill -TERM {}", self.pid());
    }

    /// Waits at most `within` for the process to exit and reaps it (and reads
    /// the rest of a captured output); `None` if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("the gateway was started");
            if let Some(status) = child.try_wait().expect("wait for the gateway") {
                self.reaped();
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL (by PID), and reap. No-op once it has exited.
    pub fn kill(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
            self.reaped();
        }
    }

    /// The process is gone: drop it, and read its captured output to the end.
    fn reaped(&mut self) {
        self.child = None;
        if let Some(out) = self.output.as_mut() {
            for reader in out.readers.drain(..) {
                let _ = reader.join();
            }
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Captured stdout and stderr: each read to its end by a thread (a full pipe
/// would block the process), kept, and sent line by line.
struct Output {
    lines: Receiver<String>,
    stdout: Lines,
    stderr: Lines,
    readers: Vec<JoinHandle<()>>,
}

/// The lines of one stream, as read so far.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn text(&self) -> String {
        self.0.lock().unwrap().iter().map(|l| format!("{l}\n")).collect()
    }

    /// Reads `stream` to its end on a thread.
    fn read(&self, stream: impl Read + Send + 'static, tx: Sender<String>) -> JoinHandle<()> {
        let kept = self.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stream);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&buf).trim_end_matches(['\r', '\n']).to_owned();
                kept.0.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
                buf.clear();
            }
        })
    }
}

impl Output {
    fn capture(child: &mut Child) -> Output {
        let (tx, lines) = mpsc::channel();
        let (stdout, stderr) = (Lines::default(), Lines::default());
        let readers = vec![
            stdout.read(child.stdout.take().expect("piped stdout"), tx.clone()),
            stderr.read(child.stderr.take().expect("piped stderr"), tx),
        ];
        Output {
            lines,
            stdout,
            stderr,
            readers,
        }
    }
}
