//! Stage 7 — orders after the stock engine: the events the scripts write, the persistence
//! worker that carries them from the Redis streams to the database, the deadline sweeper,
//! and the store itself.

pub mod event;
pub mod journal;
pub mod store;
pub mod sweeper;
pub mod worker;

use std::sync::Arc;

use tokio::sync::watch;

use crate::app::App;

/// Start the sweeper (both engines) and, with Redis, the persistence worker.
pub fn spawn_workers(app: &Arc<App>, shutdown: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    if app.config.workers {
        tasks.push(tokio::spawn(sweeper::run(app.clone(), shutdown.clone())));
        tasks.extend(worker::spawn(app, shutdown.clone()));
    }
    tasks
}
pub mod reconcile;
