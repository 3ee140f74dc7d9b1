//! `GET /api/v1/items/{id}` and `POST /api/v1/items/{id}/reserve`: each handler reads as
//! its stages, in the order a request meets them.

use http::Request;
use hyper::body::Incoming;
use serde::Deserialize;

use super::reply;
use super::router::{Answer, Ctx};
use super::views::{ItemView, ReservationView};
use crate::clock::rfc3339;
use crate::engine::{ReserveCmd, ReserveReply};
use crate::error::Reject;
use crate::ids::{bucket_shard, home_bucket, new_order_id_on, valid_id};

/// `GET /api/v1/items/{id}`: browsing needs no identity; it is limited per IP.
pub async fn get(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    ctx.app.limiter.check_ip(ctx.client_ip(&req))?; // limiter (ip)
    let item = ctx.item(ctx.id).await?; // Bloom filter → cache → engine
    if ctx.app.cache.is_sold_out(ctx.id) {
        let paused = ctx.app.cache.is_paused(&item.spec);
        return Ok(reply::ok(&ItemView::new(&item.spec, 0, ctx.now(), paused))); // sold-out flag: no engine read
    }
    let state = match item.fresh {
        Some(state) => state,
        None => ctx
            .engine()
            .item(ctx.id)
            .await
            .map_err(|e| ctx.failed("item lookup", e))?
            .ok_or(Reject::UnknownItem)?,
    };
    let paused = ctx.app.cache.is_paused(&state.spec);
    Ok(reply::ok(&ItemView::new(&state.spec, state.stock, ctx.now(), paused)))
}

/// `POST /api/v1/items/{id}/reserve`: the hot path.
pub async fn reserve(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    let user = ctx.shopper(&req)?; // limiter (ip) → identity → limiter (user)
    let ask = Ask::read(ctx, req).await?; // idempotency key, body, qty ≥ 1
    let item = ctx.item(ctx.id).await?; // Bloom filter → cache → engine
    ctx.app
        .cache
        .early_answer(&item.spec, ctx.now(), ask.qty, ask.idem_key.is_some())?; // qty ≤ limit, sold-out flag, sale window
    let qty = ask.qty;
    let cmd = ask.into_cmd(ctx.id, user.clone(), item.spec.buckets); // a new order id, only for a request that goes on
    // Boxed: the engine's future (a script call, its resends) would make every reserve
    // request's future that much larger, and a sold-out answer moves it too.
    let reply = Box::pin(ctx.engine().reserve(cmd))
        .await
        .map_err(|e| ctx.failed("reserve", e))?; // one script
    answer(ctx.id, &user, qty, reply)
}

#[derive(Deserialize)]
struct ReserveBody {
    qty: Option<i64>,
}

/// The units a reserve body asks for: its `qty`, 1 when the body or the field is absent.
pub(super) fn qty(body: &[u8]) -> Result<i64, Reject> {
    let qty = reply::parse_json::<ReserveBody>(body)?.and_then(|b| b.qty).unwrap_or(1);
    if qty < 1 {
        return Err(Reject::BadRequest("qty must be at least 1".into()));
    }
    Ok(qty)
}

/// What a reserve request asks for: the body's `qty` (default 1) and the
/// `Idempotency-Key` header.
struct Ask {
    qty: i64,
    idem_key: Option<String>,
}

impl Ask {
    /// Not an `async fn`: the headers are read now, and the future it returns keeps only
    /// the body's (a whole request in it would be moved with every reserve future).
    fn read(ctx: &Ctx<'_>, req: Request<Incoming>) -> impl Future<Output = Result<Ask, Reject>> + Send {
        let idem_key = match req.headers().get("idempotency-key") {
            None => Ok(None),
            Some(v) => match v.to_str() {
                Ok(k) if valid_id(k) => Ok(Some(k.to_owned())),
                _ => Err(Reject::BadRequest(
                    "Idempotency-Key must be 1-64 characters of [A-Za-z0-9_.:-]".into(),
                )),
            },
        };
        let body = reply::read_body(req, ctx.app.config.header_timeout);
        async move {
            let idem_key = idem_key?;
            let body = body.await?;
            Ok(Ask {
                qty: qty(&body)?,
                idem_key,
            })
        }
    }

    /// The engine's command, with a fresh order id.
    fn into_cmd(self, item_id: &str, user_id: String, buckets: u32) -> ReserveCmd {
        // Made in the shopper's home bucket: the id carries that bucket's shard.
        let order_id = new_order_id_on(bucket_shard(item_id, home_bucket(&user_id, buckets)));
        ReserveCmd {
            item_id: item_id.to_owned(),
            user_id,
            qty: self.qty,
            order_id,
            idem_key: self.idem_key,
            buckets,
        }
    }
}

/// The engine's decision as the contract's answer.
fn answer(item_id: &str, user_id: &str, asked_qty: i64, reply: ReserveReply) -> Answer {
    match reply {
        ReserveReply::Reserved {
            order_id,
            pay_before_ms,
            ..
        } => Ok(reply::ok(&ReservationView {
            order_id: &order_id,
            item_id,
            user_id,
            qty: asked_qty,
            status: "reserved",
            pay_before: rfc3339(pay_before_ms),
        })),
        ReserveReply::Duplicate {
            order_id,
            qty,
            status,
            pay_before_ms,
            ..
        } => Ok(reply::ok(&ReservationView {
            order_id: &order_id,
            item_id,
            user_id,
            qty,
            status: status.as_str(),
            pay_before: rfc3339(pay_before_ms),
        })),
        ReserveReply::UnknownItem => Err(Reject::UnknownItem),
        ReserveReply::Paused => Err(Reject::Paused),
        ReserveReply::NotStarted { starts_ms } => Err(Reject::NotStarted {
            starts_at_ms: starts_ms,
        }),
        ReserveReply::Ended { .. } => Err(Reject::Ended),
        ReserveReply::BadQty { limit } => Err(Reject::BadRequest(format!("qty must be 1..={limit}"))),
        ReserveReply::LimitReached { held, limit } => Err(Reject::LimitReached { held, limit }),
        ReserveReply::SoldOut { .. } => Err(Reject::SoldOut),
    }
}
