//! The plain routes: `GET /metrics`, `GET /healthz`, `GET /readyz`.

use http::StatusCode;

use super::reply;
use super::router::{Answer, Ctx};
use crate::error::Error;

/// `GET /metrics`: Prometheus text.
pub fn metrics(ctx: &Ctx<'_>) -> Answer {
    Ok(reply::text(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        ctx.app.metrics.render(),
    ))
}

/// `GET /healthz`: the process is up.
pub fn healthz() -> Answer {
    Ok(reply::ok(&serde_json::json!({"status": "ok"})))
}

/// `GET /readyz`: 200 while the engine answers. With Redis, a store outage is reported as
/// `degraded` but stays 200: reservations keep being accepted (the stream buffers them),
/// and a balancer must not pull every instance because the database blinked. In embedded
/// mode the store is the engine's durability, so its outage is 503.
pub async fn readyz(ctx: &Ctx<'_>) -> Answer {
    let engine = ctx.engine().ping().await;
    let store = ctx.app.store.ping().await;
    let describe = |r: &Result<(), Error>| match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("down: {e}"),
    };
    let ready = engine.is_ok() && (store.is_ok() || !ctx.engine().needs_store());
    let status = match (ready, store.is_ok()) {
        (true, true) => "ready",
        (true, false) => "degraded",
        _ => "unavailable",
    };
    let body = serde_json::json!({
        "status": status,
        "engine": describe(&engine),
        "store": describe(&store),
        "mode": ctx.engine().mode(),
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(reply::json(code, &body))
}
