//! Stage 0 — the hyper front door: accept loop with a connection cap, header-read timeout
//! (one watchdog per connection, [`watchdog`]),
//! body limit (in [`reply`]), and graceful shutdown (stop accepting, let in-flight
//! requests finish, then return). [`router`] routes a request to its handler: one module per
//! resource ([`items`], [`orders`], [`admin`], [`reports`], [`health`]), each handler a list of stages.

mod admin;
#[doc(hidden)]
pub mod fuzz;
mod health;
mod items;
mod orders;
pub mod reply;
mod reports;
pub mod router;
mod socket;
mod views;
mod watchdog;
mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use crate::app::App;

/// Serve until `shutdown` turns true, then drain connections for at most the grace period.
pub async fn serve(app: Arc<App>, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let connections = Arc::new(Semaphore::new(app.config.max_connections));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let header_timeout = app.config.header_timeout;
    let mut builder = http1::Builder::new();
    builder
        // The header-read timeout is the connection's watchdog's (below), not hyper's: one
        // timer per connection instead of one per request ([`watchdog`]).
        .header_read_timeout(None)
        .keep_alive(true)
        // The most a connection buffers (request line, headers, what of a body is unread):
        // every request of the API fits in a few KiB, and a slow or hostile client sending
        // an endless header holds this much at most before it gets 431 and is closed
        // (64 KiB let one hold ~137 KiB: 6,000 of them took 824 MiB).
        .max_buf_size(MAX_BUF);
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
            // Over the cap: a 503 the client can read (a new socket's send buffer is empty,
            // so the write does not block), then close, rather than queue.
            let _ = stream.try_write(&over_capacity(&app.next_request_id()));
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let socket = socket::Socket::new(stream, app.clone());
        let app = app.clone();
        let clock = watchdog::HeadClock::new();
        let watch = clock.clone();
        let svc = service_fn(move |req| {
            clock.busy();
            router::handle(app.clone(), req, peer, clock.clone())
        });
        let conn = graceful.watch(builder.serve_connection(TokioIo::new(socket), svc));
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                ended = conn => if let Err(e) = ended {
                    tracing::debug!(peer = %peer, cause = %e, "connection ended with an error");
                },
                // Dropping the connection closes it, as hyper's own timeout did.
                _ = watch.expired(header_timeout) => {
                    tracing::debug!(peer = %peer, "no request head within the header timeout; connection closed");
                }
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections closed"),
        _ = tokio::time::sleep(app.config.shutdown_grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
}

/// Largest read buffer of a connection (hyper's `max_buf_size`; it takes no less than 8 KiB).
pub const MAX_BUF: usize = 16 * 1024;

/// The whole answer to a connection over `SECKILL_MAX_CONNECTIONS`: 503 `unavailable` in the
/// contract's JSON, with `Retry-After` and a request id, and `Connection: close`.
fn over_capacity(request_id: &str) -> Vec<u8> {
    let reject = crate::error::Reject::Unavailable {
        retry_after_s: 1,
        reason: "too many connections",
    };
    socket::error_answer(
        "503 Service Unavailable",
        reject.code(),
        &reject.message(),
        request_id,
        "retry-after: 1\r\n",
    )
}

/// Bind the listen address.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
