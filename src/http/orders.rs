//! `POST /api/v1/orders/{id}/pay`, `…/cancel` and `GET /api/v1/orders/{id}`: the order's
//! own shopper only. `GET /api/v1/orders`: the caller's own orders.

use http::Request;
use hyper::body::Incoming;
use serde::Deserialize;

use super::reply;
use super::router::{Answer, Ctx};
use super::views::{OrderListView, OrderView};
use crate::engine::{Transition, TransitionReply};
use crate::error::Reject;

/// `POST /api/v1/orders/{id}/pay` and `…/cancel`.
pub async fn transition(ctx: &Ctx<'_>, req: Request<Incoming>, t: Transition) -> Answer {
    let user = ctx.shopper(&req)?; // limiter (ip) → identity → limiter (user)
    // With a payment provider, only it pays (POST /webhooks/payments).
    if t == Transition::Pay && ctx.app.config.payment_secret.is_some() {
        return Err(Reject::Forbidden(
            "payments are confirmed by the payment provider, not by the shopper",
        ));
    }
    let what = match t {
        Transition::Pay => "pay",
        Transition::Cancel => "cancel",
    };
    let reply = ctx
        .engine()
        .transition(t, ctx.id, &user)
        .await
        .map_err(|e| ctx.failed(what, e))?; // one script
    match reply {
        TransitionReply::Done { status, .. } | TransitionReply::Already { status } => Ok(reply::ok(
            &serde_json::json!({"order_id": ctx.id, "status": status.as_str()}),
        )),
        TransitionReply::Closed { status } => Err(Reject::OrderClosed {
            status: status.as_str(),
        }),
        TransitionReply::Forbidden => Err(Reject::Forbidden("not your order")),
        TransitionReply::UnknownOrder => Err(Reject::UnknownOrder),
    }
}

/// `GET /api/v1/orders/{id}`: from the engine while the order is hot, else the database.
pub async fn get(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    let user = ctx.shopper(&req)?; // limiter (ip) → identity → limiter (user)
    let order = ctx
        .engine()
        .order(ctx.id)
        .await
        .map_err(|e| ctx.failed("order lookup", e))?
        .ok_or(Reject::UnknownOrder)?;
    if order.user_id != user {
        return Err(Reject::Forbidden("not your order"));
    }
    Ok(reply::ok(&OrderView::new(&order)))
}

/// Most orders `GET /api/v1/orders` answers with, and its default `limit`.
pub const MAX_LIST: u32 = 100;

/// The query of `GET /api/v1/orders`: `?limit=N`, 1 to [`MAX_LIST`]; no other parameter.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    limit: Option<u32>,
}

impl ListQuery {
    /// The number of orders a query asks for (400 `bad_request` for anything but a valid
    /// `limit`).
    pub(super) fn limit(query: Option<&str>) -> Result<u32, Reject> {
        let query: ListQuery = serde_urlencoded::from_str(query.unwrap_or(""))
            .map_err(|e| Reject::BadRequest(format!("bad query: {e}")))?;
        match query.limit {
            None => Ok(MAX_LIST),
            Some(n @ 1..=MAX_LIST) => Ok(n),
            Some(_) => Err(Reject::BadRequest(format!("limit must be 1 to {MAX_LIST}"))),
        }
    }
}

/// `GET /api/v1/orders`: the caller's newest orders, from the database. Embedded mode
/// commits every change there before answering it, so the list is current; with Redis it
/// is what the persistence worker has written, which lags the engine by the persistence
/// delay (`docs/contract.md`, "Your orders"). Redis keeps no per-user index of orders, so
/// the orders the worker has not written yet cannot be found there.
pub async fn list(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    let user = ctx.shopper(&req)?; // limiter (ip) → identity → limiter (user)
    let limit = ListQuery::limit(req.uri().query())?; // ?limit=N, 1..=100
    let orders = ctx
        .app
        .store
        .orders_of_user(&user, limit)
        .await
        .map_err(|e| ctx.failed("orders list", e))?; // one query, bounded by the store timeout
    Ok(reply::ok(&OrderListView::new(&orders)))
}
