//! The plain routes: `GET /metrics`, `GET /healthz`, `GET /readyz`.

use http::StatusCode;

use super::reply;
use super::router::{Answer, Ctx};

/// `GET /metrics`: Prometheus text.
pub fn metrics(ctx: &Ctx<'_>) -> Answer {
    Ok(reply::text(
        StatusCode::OK,
        "text/plain; version=0.0.4",
        crate::metrics::render(&ctx.app.metrics),
    ))
}

/// The OpenAPI 3.1 document of every route (`docs/openapi.json`, built in).
pub const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// `GET /openapi.json`.
pub fn openapi() -> Answer {
    Ok(reply::text(StatusCode::OK, "application/json", OPENAPI))
}

/// `GET /healthz`: the process is up.
pub fn healthz() -> Answer {
    Ok(reply::ok(&serde_json::json!({"status": "ok"})))
}

/// `GET /readyz`: 200 while the engine answers. With Redis, a store outage is reported as
/// `degraded` but stays 200: reservations keep being accepted (the stream buffers them),
/// and a balancer must not pull every instance because the database blinked. In embedded
/// mode the store is the engine's durability, so its outage is 503. Answered at once from
/// the background check's last result ([`crate::health`]), never waiting on a ping.
pub async fn readyz(ctx: &Ctx<'_>) -> Answer {
    let health = ctx.app.health.snapshot();
    let describe = |r: &Result<(), String>| match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("down: {e}"),
    };
    let store_ok = health.store.is_ok();
    let ready = health.engine.is_ok() && (store_ok || !ctx.engine().needs_store());
    let status = match (ready, store_ok) {
        (true, true) => "ready",
        (true, false) => "degraded",
        _ => "unavailable",
    };
    let body = serde_json::json!({
        "status": status,
        "engine": describe(&health.engine),
        "store": describe(&health.store),
        "mode": ctx.engine().mode(),
        "checked_ms_ago": health.at.map(|t| t.elapsed().as_millis() as u64),
    });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok(reply::json(code, &body))
}
