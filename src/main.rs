//! Parse the configuration, start tracing, run the gateway until SIGTERM or ctrl-c.

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
    // Logs go to stderr; stdout carries only the start-up banner.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
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
    shutdown_signal().await;
    tracing::info!("shutting down: draining in-flight requests and the batch in hand");
    running.stop().await;
    Ok(())
}
