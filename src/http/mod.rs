//! Stage 0 — the hyper front door: accept loop with a connection cap, header-read timeout,
//! body limit (in [`reply`]), and graceful shutdown (stop accepting, let in-flight
//! requests finish, then return). [`router`] routes a request to its handler: one module per
//! resource ([`items`], [`orders`], [`admin`], [`reports`], [`health`]), each handler a list of stages.

mod admin;
mod health;
mod items;
mod orders;
pub mod reply;
mod reports;
pub mod router;
mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::app::App;

/// Serve until `shutdown` turns true, then drain connections for at most the grace period.
pub async fn serve(app: Arc<App>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let connections = Arc::new(Semaphore::new(app.config.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(app.config.header_timeout)
        .keep_alive(true)
        .max_buf_size(64 * 1024);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = crate::shutdown::stopped(&mut shutdown) => break,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            // Over the cap: close at once rather than queue.
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let svc = service_fn(move |req| {
            let app = app.clone();
            async move { Ok::<_, std::convert::Infallible>(router::handle(&app, req, peer).await) }
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(peer = %peer, cause = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(app.config.shutdown_grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

/// Bind the listen address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
