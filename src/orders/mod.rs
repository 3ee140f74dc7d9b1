//! Stage 7 — orders after the stock engine: the persistence worker that carries the events
//! from the Redis streams to the database, the deadline sweeper, and reconcile.

pub mod reconcile;
pub mod sweeper;
pub mod worker;

use std::sync::Arc;

use tokio::sync::watch;

use crate::app::App;

/// Start the sweeper (both engines) and, with Redis, the persistence workers.
pub fn spawn_workers(app: &Arc<App>, shutdown: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
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
