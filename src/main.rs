//! Parse the configuration, start tracing, run the gateway until SIGTERM or ctrl-c.

use std::io::IsTerminal;

use clap::Parser;

/// mimalloc, not glibc's malloc: under load the gateway allocates from both cores at once,
/// and glibc's arenas spent ~20% of its CPU in malloc/free (measured with perf on the
/// reserve path).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use seckill_gateway::clock::Clock;
use seckill_gateway::config::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn init_tracing(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Logs go to stderr; stdout carries only the start-up banner. Colour codes only on a
    // terminal: in a file, a pipe or a log collector they are noise.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

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
    let cli = Cli::parse();
    init_tracing(cli.config.log_format);
    if let Err(e) = cli.config.validate() {
        eprintln!("{e}");
        return std::process::ExitCode::from(2);
    }
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => run(cli.config, true).await,
        Command::Worker if cli.config.embedded() => {
            // The worker carries events from the Redis streams to the database; embedded
            // mode has neither stream nor worker. Refuse before anything (./seckill.db) is
            // created, as `reconcile` does.
            eprintln!("worker carries order events from Redis to the database: set REDIS_URL");
            return std::process::ExitCode::from(2);
        }
        Command::Worker => run(cli.config, false).await,
        Command::Reconcile { item, repair } => {
            return seckill_gateway::orders::reconcile::main(cli.config, item, repair).await;
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

async fn run(config: seckill_gateway::config::Config, http: bool) -> anyhow::Result<()> {
    let stop = shutdown_signal();
    let embedded = config.embedded();
    let running = seckill_gateway::server::start(config, Clock::system(), http).await?;
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
