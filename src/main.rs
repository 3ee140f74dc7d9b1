//! Parse the configuration, start tracing, run the gateway until SIGTERM or ctrl-c;
//! reload the config file on SIGHUP.

use std::ffi::OsString;

/// mimalloc, not glibc's malloc: under load the gateway allocates from both cores at once,
/// and glibc's arenas spent ~20% of its CPU in malloc/free (measured with perf on the
/// reserve path).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use seckill_gateway::clock::Clock;
use seckill_gateway::config::Command;
use seckill_gateway::config::file::{Settings, SettingsError};
use seckill_gateway::reload::{Reloader, init_tracing};

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is called, not when
/// the future is first polled: called before start-up, so a SIGTERM that arrives right
/// after the banner drains and exits 0 instead of killing the process.
#[cfg(unix)]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut interrupt = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = interrupt.recv() => {}
        }
    }
}

#[cfg(not(unix))]
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Installed first, like SIGTERM's before start-up: from here on SIGHUP reloads (at
    // once, or once start-up is done) and never terminates the process.
    #[cfg(unix)]
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).expect("install SIGHUP handler");
    let args: Vec<OsString> = std::env::args_os().collect();
    let mut settings = match Settings::load(&args) {
        Ok(s) => s,
        Err(SettingsError::Cli(e)) => e.exit(),
        Err(e) => {
            eprintln!("{e}");
            return std::process::ExitCode::from(2);
        }
    };
    let config = &settings.cli.config;
    let log = init_tracing(config.log_format, &config.log_filter());
    if let Err(e) = config.validate() {
        eprintln!("{e}");
        return std::process::ExitCode::from(2);
    }
    for setting in &settings.overridden {
        tracing::info!(setting = %setting, "set by a flag or the environment: the config file's value is not used");
    }
    let config = config.clone();
    let command = settings.cli.command.take();
    let reloader = Reloader::new(args, settings, log);
    #[cfg(unix)]
    let reloader = (reloader, hup);
    let result = match command {
        None | Some(Command::Serve) => run(config, true, reloader).await,
        Some(Command::Worker) if config.embedded() => {
            // The worker carries events from the Redis streams to the database; embedded
            // mode has neither stream nor worker. Refuse before anything (./seckill.db) is
            // created, as `reconcile` does.
            eprintln!("worker carries order events from Redis to the database: set REDIS_URL");
            return std::process::ExitCode::from(2);
        }
        Some(Command::Worker) => run(config, false, reloader).await,
        Some(Command::Reconcile { item, repair }) => {
            return seckill_gateway::orders::reconcile::main(config, item, repair).await;
        }
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(cause = %e, "gateway failed");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The reloader, and the SIGHUP stream it follows.
#[cfg(unix)]
type OnSighup = (Reloader, tokio::signal::unix::Signal);
#[cfg(not(unix))]
type OnSighup = Reloader;

async fn run(config: seckill_gateway::config::Config, http: bool, reload: OnSighup) -> anyhow::Result<()> {
    let stop = shutdown_signal();
    let embedded = config.embedded();
    let running = seckill_gateway::server::start(config, Clock::system(), http).await?;
    #[cfg(unix)]
    tokio::spawn(seckill_gateway::reload::on_sighup(
        reload.1,
        reload.0,
        running.app.limiter.clone(),
    ));
    #[cfg(not(unix))]
    drop(reload);
    if http {
        let url = running.url();
        println!(
            "seckill-gateway listening on {url} ({} mode)",
            if embedded { "embedded" } else { "redis" }
        );
        if running.app.config.demo_enabled() {
            println!("try:  curl -s {url}/api/v1/items/demo");
            println!(
                "      curl -s -X POST -H 'X-User-Id: alice' -H 'Content-Type: application/json' -d '{{\"qty\":1}}' {url}/api/v1/items/demo/reserve"
            );
        }
    } else {
        println!("seckill-gateway worker running");
    }
    stop.await;
    tracing::info!("shutting down: draining in-flight requests and the batch in hand");
    running.stop().await;
    Ok(())
}
