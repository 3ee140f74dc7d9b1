//! SIGHUP: read the settings again (flags, environment and the `--config` file,
//! [`crate::config::file`]) and apply what can change while the gateway runs: the rate
//! limits ([`crate::limiter::Limiter::configure`]) and the log filter (`SECKILL_LOG`).
//! Every other setting that changed is logged as needing a restart; a file that cannot be
//! read, or holds a bad value, is logged and what is in force stays. SIGHUP never stops the
//! process: the handler replaces the default action (terminate) before start-up.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::sync::Arc;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry};

use crate::config::LogFormat;
use crate::config::file::Settings;
use crate::limiter::Limiter;

/// The settings a reload applies; the others need a restart.
pub const RELOADABLE: &[&str] = &[
    "SECKILL_RATE_GLOBAL",
    "SECKILL_RATE_PER_USER",
    "SECKILL_RATE_PER_IP",
    "SECKILL_LOG",
];

/// Swaps the log filter in force.
pub type LogHandle = tracing_subscriber::reload::Handle<EnvFilter, Registry>;

/// Logs to stderr (stdout carries only the start-up banner), colour codes only on a
/// terminal, through a filter that [`Reloader`] can replace. The reload layer takes a read
/// lock only where the filter is asked per event; a callsite the filter disables is
/// cached as disabled (the request path's debug span stays free), and a reload rebuilds
/// that cache. A filter that does not parse falls back to `info` (`validate` then refuses it).
pub fn init_tracing(format: LogFormat, filter: &str) -> LogHandle {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Json => registry.with(fmt.json()).init(),
        LogFormat::Text => registry.with(fmt).init(),
    }
    handle
}

/// Reads the settings again on demand and applies them.
pub struct Reloader {
    /// The process's arguments, parsed again with the file at every reload.
    args: Vec<OsString>,
    /// The settings the process started with: what a setting that needs a restart still
    /// runs on.
    started: Settings,
    /// The log filter last applied.
    filter: String,
    log: LogHandle,
}

impl Reloader {
    pub fn new(args: Vec<OsString>, started: Settings, log: LogHandle) -> Self {
        let filter = started.cli.config.log_filter();
        Reloader {
            args,
            started,
            filter,
            log,
        }
    }

    /// One reload: apply the rate limits and the log filter to `limiter` and the logs, or
    /// log why nothing changed.
    pub fn reload(&mut self, limiter: &Limiter) {
        let Some(file) = self.started.file.clone() else {
            tracing::info!("SIGHUP: no --config file, nothing to reload");
            return;
        };
        let newer = match Settings::load(&self.args) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(file = %file.display(), cause = %e, "config not reloaded; the settings in force stay");
                return;
            }
        };
        if let Err(e) = newer.cli.config.validate() {
            tracing::warn!(file = %file.display(), cause = %e, "config not reloaded; the settings in force stay");
            return;
        }
        for setting in self.started.changed(&newer) {
            if !RELOADABLE.contains(&setting.as_str()) {
                tracing::warn!(setting = %setting, file = %file.display(), "setting changed; needs restart");
            }
        }
        for setting in &newer.overridden {
            tracing::info!(setting = %setting, "set by a flag or the environment: the file's value is not used");
        }
        let filter = newer.cli.config.log_filter();
        if filter != self.filter {
            match EnvFilter::try_new(&filter).map(|f| self.log.reload(f)) {
                Ok(Ok(())) => self.filter = filter,
                Ok(Err(e)) => tracing::warn!(cause = %e, "log filter not reloaded"),
                Err(e) => tracing::warn!(cause = %e, "log filter not reloaded"),
            }
        }
        let now = limiter.configure(newer.cli.config.limits());
        tracing::info!(
            file = %file.display(),
            log = %self.filter,
            rate_global = now.rate_global,
            rate_per_user = now.rate_per_user,
            rate_per_ip = now.rate_per_ip,
            "config reloaded"
        );
    }
}

#[cfg(unix)]
/// Reload on every SIGHUP `hup` delivers (the caller installed it before start-up, so a
/// SIGHUP during start-up waits here instead of killing the process).
pub async fn on_sighup(mut hup: tokio::signal::unix::Signal, mut reloader: Reloader, limiter: Arc<Limiter>) {
    while hup.recv().await.is_some() {
        reloader.reload(&limiter);
    }
}
