//! `POST /api/v1/orders/{id}/pay`, `…/cancel` and `GET /api/v1/orders/{id}`: the order's
//! own shopper only.

use http::Request;
use hyper::body::Incoming;

use super::reply;
use super::router::{Answer, Ctx};
use super::views::OrderView;
use crate::engine::{Transition, TransitionReply};
use crate::error::Reject;

/// `POST /api/v1/orders/{id}/pay` and `…/cancel`.
pub async fn transition(ctx: &Ctx<'_>, req: Request<Incoming>, t: Transition) -> Answer {
    let user = ctx.shopper(&req)?; // limiter (ip) → identity → limiter (user)
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
