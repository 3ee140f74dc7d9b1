//! Routing and the handlers, in the order a request meets the stages: identity, limiter,
//! Bloom filter, local cache, sale window, stock engine. Each stage returns
//! `Err(Reject)` to answer early; only [`handle`] turns a refusal into a response.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use super::reply::{self, Body};
use crate::app::App;
use crate::clock::{parse_rfc3339, rfc3339};
use crate::engine::{
    ItemSpec, ItemState, Order, OrderStatus, PutReply, ReserveCmd, ReserveReply, StockEngine, Transition,
    TransitionReply,
};
use crate::error::{Error, Reject};
use crate::identity::is_admin;
use crate::ids::{new_order_id, valid_id};
use crate::metrics;

type Answer = Result<Response<Body>, Reject>;

/// Route templates: the `route` label, never a raw path.
#[derive(Clone, Copy)]
enum Route {
    ItemGet,
    Reserve,
    Pay,
    Cancel,
    OrderGet,
    AdminItemPut,
    AdminStats,
    AdminOrdersCsv,
    Metrics,
    Healthz,
    Readyz,
    NotFound,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::ItemGet => "item_get",
            Route::Reserve => "reserve",
            Route::Pay => "pay",
            Route::Cancel => "cancel",
            Route::OrderGet => "order_get",
            Route::AdminItemPut => "admin_item_put",
            Route::AdminStats => "admin_stats",
            Route::AdminOrdersCsv => "admin_orders_csv",
            Route::Metrics => "metrics",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::NotFound => "not_found",
        }
    }
}

/// Match a path to a route, its expected method, and its id segment.
fn route(path: &str) -> (Route, Method, Option<&str>) {
    let segs: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segs.as_slice() {
        ["api", "v1", "items", id] => (Route::ItemGet, Method::GET, Some(id)),
        ["api", "v1", "items", id, "reserve"] => (Route::Reserve, Method::POST, Some(id)),
        ["api", "v1", "orders", id] => (Route::OrderGet, Method::GET, Some(id)),
        ["api", "v1", "orders", id, "pay"] => (Route::Pay, Method::POST, Some(id)),
        ["api", "v1", "orders", id, "cancel"] => (Route::Cancel, Method::POST, Some(id)),
        ["admin", "v1", "items", id] => (Route::AdminItemPut, Method::PUT, Some(id)),
        ["admin", "v1", "items", id, "stats"] => (Route::AdminStats, Method::GET, Some(id)),
        ["admin", "v1", "items", id, "orders.csv"] => (Route::AdminOrdersCsv, Method::GET, Some(id)),
        ["metrics"] => (Route::Metrics, Method::GET, None),
        ["healthz"] => (Route::Healthz, Method::GET, None),
        ["readyz"] => (Route::Readyz, Method::GET, None),
        _ => (Route::NotFound, Method::GET, None),
    }
}

/// Everything a handler needs besides the request.
struct Ctx<'a> {
    app: &'a Arc<App>,
    peer: SocketAddr,
    id: &'a str,
    request_id: &'a str,
}

/// The one entry point: route, run the handler, turn a refusal into the contract's JSON,
/// count and time it, and tag it with a request id.
pub async fn handle(app: &Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| app.next_request_id());
    let (route, method, id) = route(req.uri().path());
    let id = id.map(str::to_owned);
    let ctx = Ctx {
        app,
        peer,
        id: id.as_deref().unwrap_or(""),
        request_id: &request_id,
    };
    // At debug level every log line of the request carries its id and route (span fields);
    // the warnings and errors a request logs at the default level name its id themselves.
    // (An info span would be formatted by the log layer on every request: measurable.)
    let span = tracing::debug_span!("request", request_id = %request_id, route = route.label());
    let answer = async {
        if matches!(route, Route::NotFound) {
            Err(Reject::NotFound)
        } else if req.method() != method {
            Err(Reject::MethodNotAllowed)
        } else if id.as_deref().is_some_and(|id| !valid_id(id)) {
            Err(Reject::BadRequest("ids are 1-64 characters of [A-Za-z0-9_.:-]".into()))
        } else {
            match route {
                Route::ItemGet => item_get(&ctx, req).await,
                Route::Reserve => reserve(&ctx, req).await,
                Route::Pay => transition(&ctx, req, Transition::Pay).await,
                Route::Cancel => transition(&ctx, req, Transition::Cancel).await,
                Route::OrderGet => order_get(&ctx, req).await,
                Route::AdminItemPut => admin_item_put(&ctx, req).await,
                Route::AdminStats => admin_stats(&ctx, req).await,
                Route::AdminOrdersCsv => admin_orders_csv(&ctx, req).await,
                Route::Metrics => Ok(reply::text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    app.metrics.render(),
                )),
                Route::Healthz => Ok(reply::ok(&serde_json::json!({"status": "ok"}))),
                Route::Readyz => readyz(&ctx).await,
                Route::NotFound => Err(Reject::NotFound),
            }
        }
    }
    .instrument(span.clone())
    .await;
    let (mut response, outcome) = match answer {
        Ok(r) => (r, "ok"),
        Err(reject) => {
            if matches!(reject, Reject::Internal) {
                tracing::error!(request_id = %request_id, route = route.label(), "internal error");
            }
            (reply::reject(&reject), reject.code())
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert("x-request-id", v);
    }
    metrics::request(route.label(), outcome, started.elapsed().as_secs_f64());
    span.in_scope(|| tracing::debug!(outcome, status = response.status().as_u16(), "request"));
    response
}

/// A failure, logged with its cause, told to the client as 503 or 500.
fn failed(ctx: &Ctx<'_>, what: &'static str, e: Error) -> Reject {
    tracing::warn!(request_id = ctx.request_id, item_or_order = ctx.id, cause = %e, side = ?e.side(), "{what} failed");
    if matches!(e, Error::Store(_)) {
        ctx.app.set_store_up(false);
    }
    e.to_reject()
}

/// The client's IP: the socket peer, or the last `X-Forwarded-For` hop when a trusted proxy
/// sets it (the last hop is the one the proxy saw; earlier ones are client-supplied).
fn client_ip(ctx: &Ctx<'_>, req: &Request<Incoming>) -> IpAddr {
    if ctx.app.config.trust_forwarded
        && let Some(ip) = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|v| v.trim().parse().ok())
    {
        return ip;
    }
    ctx.peer.ip()
}

/// Stages 1–2 of shopper routes: IP and instance buckets, identity, the user's bucket.
fn shopper(ctx: &Ctx<'_>, req: &Request<Incoming>) -> Result<String, Reject> {
    ctx.app.limiter.check_ip(client_ip(ctx, req))?;
    let user = ctx.app.identity.user(req.headers())?;
    ctx.app.limiter.check_user(&user)?;
    Ok(user)
}

/// Stages 3–4: is the item known (Bloom filter, not-found cache), and its metadata (local
/// cache, else the engine). No Redis command for an id the filter rules out.
/// On a cache miss it also returns the state it just read, so a caller that needs the
/// counters does not read the item twice.
async fn item_meta(ctx: &Ctx<'_>, item_id: &str) -> Result<(Arc<ItemSpec>, Option<ItemState>), Reject> {
    if !ctx.app.filter.may_contain(item_id) {
        return Err(Reject::UnknownItem);
    }
    if let Some(spec) = ctx.app.cache.item(item_id) {
        return Ok((spec, None));
    }
    match ctx.app.engine.item(item_id).await {
        Ok(Some(state)) => {
            let spec = Arc::new(state.spec.clone());
            ctx.app.cache.put_item(spec.clone());
            Ok((spec, Some(state)))
        }
        Ok(None) => {
            ctx.app.filter.remember_missing(item_id);
            Err(Reject::UnknownItem)
        }
        Err(e) => Err(failed(ctx, "item lookup", e)),
    }
}

#[derive(Serialize)]
struct ItemView<'a> {
    item_id: &'a str,
    name: &'a str,
    price_cents: i64,
    stock_total: i64,
    stock_remaining: i64,
    per_user_limit: i64,
    starts_at: String,
    ends_at: String,
    state: &'static str,
}

fn item_view(spec: &ItemSpec, remaining: i64, now: i64) -> ItemView<'_> {
    let state = if now < spec.starts_ms {
        "upcoming"
    } else if now >= spec.ends_ms {
        "ended"
    } else if remaining <= 0 {
        "sold_out"
    } else {
        "active"
    };
    ItemView {
        item_id: &spec.item_id,
        name: &spec.name,
        price_cents: spec.price_cents,
        stock_total: spec.stock_total,
        stock_remaining: remaining,
        per_user_limit: spec.per_user_limit,
        starts_at: rfc3339(spec.starts_ms),
        ends_at: rfc3339(spec.ends_ms),
        state,
    }
}

/// `GET /api/v1/items/{id}`: browsing needs no identity; it is limited per IP.
async fn item_get(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    ctx.app.limiter.check_ip(client_ip(ctx, &req))?;
    let item_id = ctx.id;
    let (spec, fresh) = item_meta(ctx, item_id).await?;
    let now = ctx.app.clock.now_ms();
    if ctx.app.cache.is_sold_out(item_id) {
        return Ok(reply::ok(&item_view(&spec, 0, now)));
    }
    let state: ItemState = match fresh {
        Some(s) => s,
        None => match ctx.app.engine.item(item_id).await {
            Ok(Some(s)) => s,
            Ok(None) => return Err(Reject::UnknownItem),
            Err(e) => return Err(failed(ctx, "item lookup", e)),
        },
    };
    metrics::stock(item_id, state.stock, state.spec.stock_total);
    Ok(reply::ok(&item_view(&state.spec, state.stock, now)))
}

#[derive(Deserialize)]
struct ReserveBody {
    qty: Option<i64>,
}

#[derive(Serialize)]
struct Reservation<'a> {
    order_id: &'a str,
    item_id: &'a str,
    user_id: &'a str,
    qty: i64,
    status: &'static str,
    pay_before: String,
}

/// `POST /api/v1/items/{id}/reserve`: the hot path.
async fn reserve(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    let user = shopper(ctx, &req)?;
    let item_id = ctx.id;
    let idem_key = match req.headers().get("idempotency-key") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(k) if valid_id(k) => Some(k.to_owned()),
            _ => {
                return Err(Reject::BadRequest(
                    "Idempotency-Key must be 1-64 characters of [A-Za-z0-9_.:-]".into(),
                ));
            }
        },
    };
    let body = reply::read_body(req, ctx.app.config.header_timeout).await?;
    let qty = reply::parse_json::<ReserveBody>(&body)?
        .and_then(|b| b.qty)
        .unwrap_or(1);
    if qty < 1 {
        return Err(Reject::BadRequest("qty must be at least 1".into()));
    }
    let (spec, _) = item_meta(ctx, item_id).await?;
    if qty > spec.per_user_limit {
        return Err(Reject::BadRequest(format!(
            "qty above the per-user limit of {}",
            spec.per_user_limit
        )));
    }
    // Local early answers. A retry carrying an idempotency key goes to the engine, which
    // returns the order it already made even after the item sold out or the sale ended.
    if idem_key.is_none() {
        if ctx.app.cache.is_sold_out(item_id) {
            return Err(Reject::SoldOut);
        }
        let now = ctx.app.clock.now_ms();
        if now >= spec.ends_ms {
            return Err(Reject::Ended);
        }
        // Only refuse early when clearly before the start; near the boundary the script
        // (Redis TIME) decides, so a fast local clock never starts a sale early and a slow
        // one never refuses a started sale.
        if now + 1000 < spec.starts_ms {
            return Err(Reject::NotStarted {
                starts_at_ms: spec.starts_ms,
            });
        }
    }
    let cmd = ReserveCmd {
        item_id: item_id.to_owned(),
        user_id: user.clone(),
        qty,
        order_id: new_order_id(item_id),
        idem_key,
    };
    // The decision runs as its own task: if the client hangs up, hyper drops this future,
    // but a reservation the script makes is still completed (counted, sold-out flag set),
    // so `seckill_orders_total{event="reserved"}` always equals the orders made.
    let app = ctx.app.clone();
    let stock_total = spec.stock_total;
    let decided = tokio::spawn(async move {
        let outcome = app.engine.reserve(&cmd).await;
        if let Ok(ReserveReply::Reserved { stock_after, .. }) = &outcome {
            metrics::order_event("reserved");
            metrics::stock(&cmd.item_id, *stock_after, stock_total);
            if *stock_after == 0 {
                app.cache.mark_sold_out(&cmd.item_id);
            }
        }
        (outcome, cmd)
    });
    let (outcome, cmd) = decided.await.map_err(|_| Reject::Internal)?;
    match outcome.map_err(|e| failed(ctx, "reserve", e))? {
        ReserveReply::Reserved {
            order_id,
            pay_before_ms,
            ..
        } => Ok(reply::ok(&Reservation {
            order_id: &order_id,
            item_id,
            user_id: &user,
            qty,
            status: "reserved",
            pay_before: rfc3339(pay_before_ms),
        })),
        ReserveReply::Duplicate {
            order_id,
            qty,
            status,
            pay_before_ms,
            ..
        } => {
            // qty 0: the engine no longer holds the order (closed long ago); the database does.
            let (qty, status, pay_before_ms) = if qty == 0 {
                match ctx.app.store.order(&order_id).await {
                    Ok(Some(o)) => (o.qty, o.status, o.pay_before_ms),
                    Ok(None) => (cmd.qty, status, pay_before_ms),
                    Err(e) => return Err(failed(ctx, "reserve", e)),
                }
            } else {
                (qty, status, pay_before_ms)
            };
            Ok(reply::ok(&Reservation {
                order_id: &order_id,
                item_id,
                user_id: &user,
                qty,
                status: status.as_str(),
                pay_before: rfc3339(pay_before_ms),
            }))
        }
        ReserveReply::UnknownItem => {
            ctx.app.filter.remember_missing(item_id);
            ctx.app.cache.invalidate(item_id);
            Err(Reject::UnknownItem)
        }
        ReserveReply::NotStarted { starts_ms } => Err(Reject::NotStarted {
            starts_at_ms: starts_ms,
        }),
        ReserveReply::Ended { .. } => Err(Reject::Ended),
        ReserveReply::BadQty { limit } => Err(Reject::BadRequest(format!("qty must be 1..={limit}"))),
        ReserveReply::LimitReached { held, limit } => Err(Reject::LimitReached { held, limit }),
        ReserveReply::SoldOut { stock } => {
            if stock == 0 {
                ctx.app.cache.mark_sold_out(item_id);
                metrics::stock(item_id, 0, spec.stock_total);
            }
            Err(Reject::SoldOut)
        }
    }
}

/// `POST /api/v1/orders/{id}/pay` and `…/cancel`.
async fn transition(ctx: &Ctx<'_>, req: Request<Incoming>, t: Transition) -> Answer {
    let user = shopper(ctx, &req)?;
    let order_id = ctx.id;
    let what = match t {
        Transition::Pay => "pay",
        Transition::Cancel => "cancel",
    };
    let outcome = ctx
        .app
        .engine
        .transition(t, order_id, &user)
        .await
        .map_err(|e| failed(ctx, what, e))?;
    let stock_back = matches!(
        outcome,
        TransitionReply::Done {
            status: OrderStatus::Cancelled,
            ..
        } | TransitionReply::Closed {
            status: OrderStatus::Expired
        }
    );
    if stock_back && ctx.app.config.embedded() {
        // Stock came back: clear the local sold-out flag (with Redis, the engine's pub/sub
        // message does this on every instance, this one included).
        if let Ok(Some(o)) = ctx.app.engine.order(order_id).await {
            ctx.app.cache.invalidate(&o.item_id);
        }
    }
    match outcome {
        TransitionReply::Done { status, .. } => {
            metrics::order_event(status.as_str());
            Ok(reply::ok(
                &serde_json::json!({"order_id": order_id, "status": status.as_str()}),
            ))
        }
        TransitionReply::Already { status } => Ok(reply::ok(
            &serde_json::json!({"order_id": order_id, "status": status.as_str()}),
        )),
        TransitionReply::Closed { status } => Err(Reject::OrderClosed {
            status: status.as_str(),
        }),
        TransitionReply::Forbidden => Err(Reject::Forbidden("not your order")),
        TransitionReply::UnknownOrder => Err(Reject::UnknownOrder),
    }
}

#[derive(Serialize)]
struct OrderView<'a> {
    order_id: &'a str,
    item_id: &'a str,
    user_id: &'a str,
    qty: i64,
    status: &'static str,
    created_at: String,
    pay_before: String,
    updated_at: String,
}

fn order_view(o: &Order) -> OrderView<'_> {
    OrderView {
        order_id: &o.order_id,
        item_id: &o.item_id,
        user_id: &o.user_id,
        qty: o.qty,
        status: o.status.as_str(),
        created_at: rfc3339(o.created_ms),
        pay_before: rfc3339(o.pay_before_ms),
        updated_at: rfc3339(o.updated_ms),
    }
}

/// `GET /api/v1/orders/{id}`: from the engine while the order is hot, else the database.
async fn order_get(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    let user = shopper(ctx, &req)?;
    let order_id = ctx.id;
    let order = match ctx
        .app
        .engine
        .order(order_id)
        .await
        .map_err(|e| failed(ctx, "order lookup", e))?
    {
        Some(o) => o,
        None => ctx
            .app
            .store
            .order(order_id)
            .await
            .map_err(|e| failed(ctx, "order lookup", e))?
            .ok_or(Reject::UnknownOrder)?,
    };
    if order.user_id != user {
        return Err(Reject::Forbidden("not your order"));
    }
    Ok(reply::ok(&order_view(&order)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemBody {
    name: String,
    price_cents: i64,
    stock: i64,
    per_user_limit: i64,
    starts_at: String,
    ends_at: String,
}

/// `PUT /admin/v1/items/{id}`: create or replace a sale item.
async fn admin_item_put(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    is_admin(req.headers(), ctx.app.config.admin_token.as_deref())?;
    let body = reply::read_body(req, ctx.app.config.header_timeout).await?;
    let b: ItemBody = reply::parse_json(&body)?.ok_or_else(|| Reject::BadRequest("a JSON body is required".into()))?;
    let bad = |why: &str| Err(Reject::BadRequest(why.to_owned()));
    if b.name.trim().is_empty() || b.name.chars().count() > 200 {
        return bad("name must be 1-200 characters");
    }
    // Lua numbers are doubles: integers above 2^53 would be stored imprecisely, so every
    // count stays far below that.
    const MAX_COUNT: i64 = 1_000_000_000_000;
    if !(0..=MAX_COUNT).contains(&b.price_cents) {
        return bad("price_cents must be 0..=1000000000000");
    }
    if !(0..=MAX_COUNT).contains(&b.stock) {
        return bad("stock must be 0..=1000000000000");
    }
    if !(1..=MAX_COUNT).contains(&b.per_user_limit) {
        return bad("per_user_limit must be 1..=1000000000000");
    }
    let (Some(starts_ms), Some(ends_ms)) = (parse_rfc3339(&b.starts_at), parse_rfc3339(&b.ends_at)) else {
        return bad("starts_at and ends_at must be RFC 3339 times");
    };
    if starts_ms >= ends_ms {
        return bad("starts_at must be before ends_at");
    }
    let spec = ItemSpec {
        item_id: ctx.id.to_owned(),
        name: b.name,
        price_cents: b.price_cents,
        stock_total: b.stock,
        per_user_limit: b.per_user_limit,
        starts_ms,
        ends_ms,
    };
    let stock = match ctx
        .app
        .engine
        .put_item(&spec)
        .await
        .map_err(|e| failed(ctx, "put item", e))?
    {
        PutReply::Stored { stock } => stock,
        PutReply::BelowHeld { held } => {
            return Err(Reject::BadRequest(format!(
                "stock below the {held} units already reserved or paid"
            )));
        }
    };
    if !ctx.app.config.embedded() {
        // With Redis the engine is the source of truth; the database keeps a copy for reports.
        // (The embedded engine's journal stored the item before answering.)
        if let Err(e) = ctx.app.store.put_item(&spec, ctx.app.clock.now_ms()).await {
            tracing::warn!(item = %spec.item_id, cause = %e, "item stored in the engine but not in the database");
        }
    }
    ctx.app.item_changed(&spec.item_id);
    metrics::stock(&spec.item_id, stock, spec.stock_total);
    Ok(reply::ok(&item_view(&spec, stock, ctx.app.clock.now_ms())))
}

/// `GET /admin/v1/items/{id}/stats`.
async fn admin_stats(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    is_admin(req.headers(), ctx.app.config.admin_token.as_deref())?;
    let state = ctx
        .app
        .engine
        .item(ctx.id)
        .await
        .map_err(|e| failed(ctx, "stats", e))?
        .ok_or(Reject::UnknownItem)?;
    let persisted = ctx.app.store.count(ctx.id).await.map_err(|e| failed(ctx, "stats", e))?;
    metrics::stock(ctx.id, state.stock, state.spec.stock_total);
    Ok(reply::ok(&serde_json::json!({
        "item_id": ctx.id,
        "stock_total": state.spec.stock_total,
        "stock_remaining": state.stock,
        "reserved": state.reserved,
        "paid": state.paid,
        "cancelled": state.cancelled,
        "expired": state.expired,
        "persisted": persisted,
    })))
}

/// `GET /admin/v1/items/{id}/orders.csv`: the item's rows from the database.
async fn admin_orders_csv(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    is_admin(req.headers(), ctx.app.config.admin_token.as_deref())?;
    let orders = ctx
        .app
        .store
        .orders(Some(ctx.id))
        .await
        .map_err(|e| failed(ctx, "orders export", e))?;
    let mut w = csv::Writer::from_writer(Vec::new());
    let header = [
        "order_id",
        "item_id",
        "user_id",
        "qty",
        "status",
        "created_at",
        "pay_before",
        "updated_at",
    ];
    let mut write = || -> Result<(), csv::Error> {
        w.write_record(header)?;
        for o in &orders {
            let v = order_view(o);
            w.write_record([
                v.order_id,
                v.item_id,
                v.user_id,
                &v.qty.to_string(),
                v.status,
                &v.created_at,
                &v.pay_before,
                &v.updated_at,
            ])?;
        }
        w.flush()?;
        Ok(())
    };
    write().map_err(|_| Reject::Internal)?;
    let bytes = w.into_inner().map_err(|_| Reject::Internal)?;
    Ok(reply::text(StatusCode::OK, "text/csv; charset=utf-8", bytes))
}

/// `GET /readyz`: 200 while the engine answers. With Redis, a store outage is reported as
/// `degraded` but stays 200: reservations keep being accepted (the stream buffers them),
/// and a balancer must not pull every instance because the database blinked. In embedded
/// mode the store is the engine's durability, so its outage is 503.
async fn readyz(ctx: &Ctx<'_>) -> Answer {
    let engine = ctx.app.engine.ping().await;
    let store = ctx.app.store.ping().await;
    ctx.app.set_store_up(store.is_ok());
    let describe = |r: &Result<(), Error>| match r {
        Ok(()) => "ok".to_owned(),
        Err(e) => format!("down: {e}"),
    };
    let embedded = ctx.app.config.embedded();
    let ready = engine.is_ok() && (store.is_ok() || !embedded);
    let status = match (ready, store.is_ok()) {
        (true, true) => "ready",
        (true, false) => "degraded",
        _ => "unavailable",
    };
    let body = serde_json::json!({
        "status": status,
        "engine": describe(&engine),
        "store": describe(&store),
        "mode": if embedded { "embedded" } else { "redis" },
    });
    Ok(reply::json(
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        &body,
    ))
}
