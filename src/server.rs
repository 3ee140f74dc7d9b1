//! Running a gateway: the pieces `main` and the integration tests share. A test starts a
//! whole gateway in-process on `127.0.0.1:0` with [`start`] and stops it with
//! [`Running::stop`] (the mini-redis `tests/server.rs` pattern).

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::watch;

use crate::app::App;
use crate::clock::Clock;
use crate::config::Config;
use crate::domain::ItemSpec;
use crate::orders::{repair, sweeper, worker};

pub struct Running {
    pub app: Arc<App>,
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stop accepting, finish in-flight requests and the batch in hand, then return.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        for t in self.tasks {
            let _ = t.await;
        }
        // The spans still queued for export (a blocking flush, bounded by the export timeout).
        let app = self.app.clone();
        let _ = tokio::task::spawn_blocking(move || app.telemetry.shutdown()).await;
    }
}

/// Build the app, bind, and serve in the background. `serve_http: false` runs only the
/// workers (the `worker` subcommand).
pub async fn start(config: Config, clock: Clock, serve_http: bool) -> anyhow::Result<Running> {
    let demo = config.demo_enabled();
    let listen = config.listen;
    let app = App::build(config, clock).await?;
    if demo {
        preload_demo(&app).await;
    }
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = app.spawn_background(rx.clone(), serve_http);
    tasks.extend(spawn_workers(&app, rx.clone()));
    let (addr, server) = if serve_http {
        let listener = crate::http::bind(listen).await?;
        let addr = listener.local_addr()?;
        (addr, tokio::spawn(crate::http::serve(app.clone(), listener, rx)))
    } else {
        (listen, tokio::spawn(async {}))
    };
    Ok(Running {
        app,
        addr,
        shutdown,
        server,
        tasks,
    })
}

/// With Redis, the repair task ([`repair`]); and unless `SECKILL_WORKERS=false`, the
/// sweeper (both engines) and, with Redis, the persistence workers.
fn spawn_workers(app: &Arc<App>, shutdown: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    // Every instance with Redis watches for a Redis that lost writes (it must stop selling
    // from it), with or without workers.
    if let Some(redis) = app.engine.redis() {
        let settings = repair::RepairSettings::from_config(&app.config);
        tasks.push(repair::spawn(redis, app.store.clone(), settings, shutdown.clone()));
    }
    if app.config.workers {
        tasks.push(tokio::spawn(sweeper::run(
            app.engine.clone(),
            app.config.sweep_interval,
            shutdown.clone(),
        )));
        if let Some(redis) = app.engine.redis() {
            let settings = worker::WorkerSettings::from_config(&app.config);
            tasks.extend(worker::spawn(redis, app.store.clone(), settings, shutdown));
        }
    }
    tasks
}

/// The demo item: on sale now for 24 hours, 100 units, 2 per shopper. Kept if it exists
/// (a restart must not reset a sale in progress).
pub const DEMO_ITEM: &str = "demo";

async fn preload_demo(app: &App) {
    match app.engine.item(DEMO_ITEM).await {
        Ok(Some(_)) => return,
        Ok(None) => {}
        Err(e) => {
            tracing::warn!(cause = %e, "demo item not loaded");
            return;
        }
    }
    let now = app.clock.now_ms();
    let spec = ItemSpec {
        item_id: DEMO_ITEM.into(),
        name: "Demo flash-sale item".into(),
        price_cents: 999,
        stock_total: 100,
        per_user_limit: 2,
        starts_ms: now - 60_000,
        ends_ms: now + 24 * 3600 * 1000,
        buckets: 1,
        paused: false,
    };
    if let Err(e) = app.engine.put_item(&spec, now).await {
        tracing::warn!(cause = %e, "demo item not loaded");
    }
}
