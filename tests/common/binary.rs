//! The one real-binary launcher: `seckill-gateway` as a child process with a
//! cleared environment (only `PATH` and `HOME`) and explicit flags, on a free
//! loopback port, in a directory of its own; waited for (`/readyz`), stopped
//! by PID (SIGTERM or SIGKILL), its output kept in a log file (or piped).

use std::ffi::OsString;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use super::free_port;
use super::http::Api;

/// The gateway executable cargo built for this test.
pub const BIN: &str = env!("CARGO_BIN_EXE_seckill-gateway");

/// How long a started binary may take to answer `/readyz` with 200.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

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

/// Where the output of a [`Binary`] goes.
enum Output {
    /// Appended to this file (the default: `gateway.log` in a directory of its own).
    Log(PathBuf),
    /// Piped, for the test to read ([`Binary::take_stdout`], [`Binary::take_stderr`]).
    Piped,
}

pub struct BinaryBuilder {
    args: Vec<OsString>,
    envs: Vec<(String, String)>,
    dir: Option<PathBuf>,
    port: Option<u16>,
    output: Option<Output>,
}

impl BinaryBuilder {
    /// A flag, e.g. `.flag("--redis-url", &redis.url())`.
    pub fn flag(mut self, name: &str, value: &str) -> Self {
        self.args.push(name.into());
        self.args.push(value.into());
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

    /// Append stdout and stderr to this file (kept over a restart).
    pub fn log(mut self, path: &Path) -> Self {
        self.output = Some(Output::Log(path.to_owned()));
        self
    }

    /// Pipe stdout and stderr, for the test to read.
    pub fn piped(mut self) -> Self {
        self.output = Some(Output::Piped);
        self
    }

    /// Starts it with `--listen 127.0.0.1:PORT` and the flags given; does not
    /// wait (see [`Binary::ready`]).
    pub fn spawn(self) -> Binary {
        let own = tempfile::Builder::new()
            .prefix("seckill-bin-")
            .tempdir()
            .expect("temporary directory for the gateway binary");
        let dir = self.dir.unwrap_or_else(|| own.path().to_owned());
        let port = self.port.unwrap_or_else(free_port);
        let mut cmd = command();
        cmd.current_dir(&dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .args(&self.args);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        let log = match self
            .output
            .unwrap_or_else(|| Output::Log(own.path().join("gateway.log")))
        {
            Output::Log(path) => {
                let out = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .expect("the gateway's log file");
                cmd.stdout(out.try_clone().expect("log file")).stderr(out);
                Some(path)
            }
            Output::Piped => {
                cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
                None
            }
        };
        let child = cmd.spawn().unwrap_or_else(|e| panic!("could not run {BIN}: {e}"));
        let api = Api::new(format!("http://127.0.0.1:{port}"));
        Binary {
            child: Some(child),
            port,
            log,
            api,
            _own: own,
        }
    }
}

/// A gateway process; killed (SIGKILL, by PID) and reaped when dropped. Its
/// HTTP routes through [`Api`] (`Deref`).
pub struct Binary {
    /// `None` once it has exited and been reaped.
    child: Option<Child>,
    port: u16,
    /// `None` when the output is piped.
    log: Option<PathBuf>,
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
            output: None,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the gateway runs").id()
    }

    /// Waits until `/readyz` answers 200; panics with the log if the process
    /// exits first or is not ready within [`READY_TIMEOUT`].
    pub async fn ready(&mut self) {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(r) = self.api.get("/readyz").send().await
                && r.status() == StatusCode::OK
            {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("the gateway exited with {status}; log:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "the gateway was not ready within {READY_TIMEOUT:?}; log:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// What it wrote so far ("" when its output is piped).
    pub fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    pub fn take_stdout(&mut self) -> ChildStdout {
        self.child.as_mut().and_then(|c| c.stdout.take()).expect("piped stdout")
    }

    pub fn take_stderr(&mut self) -> ChildStderr {
        self.child.as_mut().and_then(|c| c.stderr.take()).expect("piped stderr")
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

    /// Waits at most `within` for the process to exit and reaps it; `None` if
    /// it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("the gateway was started");
            if let Some(status) = child.try_wait().expect("wait for the gateway") {
                self.child = None;
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
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        self.kill();
    }
}
