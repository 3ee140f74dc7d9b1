//! The operator's routes, behind `Authorization: Bearer $SECKILL_ADMIN_TOKEN`:
//! `PUT /admin/v1/items/{id}`, `GET …/stats`, `GET …/orders.csv`, the pause switches
//! (`POST …/pause`, `…/resume`, of an item or of every sale), `PUT /admin/v1/limits`.

use http::header::CONTENT_DISPOSITION;
use http::{HeaderValue, Request, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;

use super::reply;
use super::router::{Answer, Ctx};
use super::views::{ItemView, OrderView};
use crate::clock::parse_rfc3339;
use crate::domain::ItemSpec;
use crate::engine::{PutReply, Settle, TransitionReply};
use crate::error::{Error, Reject};
use crate::identity::is_admin;
use crate::ids::MAX_BUCKETS;
use crate::limiter::LimitsChange;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemBody {
    name: String,
    price_cents: i64,
    stock: i64,
    per_user_limit: i64,
    starts_at: String,
    ends_at: String,
    /// Stock buckets (1–64, default 1).
    #[serde(default)]
    buckets: Option<i64>,
}

/// Lua numbers are doubles: integers above 2^53 would be stored imprecisely, so every count
/// stays far below that.
const MAX_COUNT: i64 = 1_000_000_000_000;

impl ItemBody {
    /// The item this body defines, or why it cannot be sold.
    fn into_spec(self, item_id: &str) -> Result<ItemSpec, Reject> {
        let bad = |why: &str| Err(Reject::BadRequest(why.to_owned()));
        if self.name.trim().is_empty() || self.name.chars().count() > 200 {
            return bad("name must be 1-200 characters");
        }
        if !(0..=MAX_COUNT).contains(&self.price_cents) {
            return bad("price_cents must be 0..=1000000000000");
        }
        if !(0..=MAX_COUNT).contains(&self.stock) {
            return bad("stock must be 0..=1000000000000");
        }
        if !(1..=MAX_COUNT).contains(&self.per_user_limit) {
            return bad("per_user_limit must be 1..=1000000000000");
        }
        let (Some(starts_ms), Some(ends_ms)) = (parse_rfc3339(&self.starts_at), parse_rfc3339(&self.ends_at)) else {
            return bad("starts_at and ends_at must be RFC 3339 times");
        };
        if starts_ms >= ends_ms {
            return bad("starts_at must be before ends_at");
        }
        let buckets = self.buckets.unwrap_or(1);
        if !(1..=i64::from(MAX_BUCKETS)).contains(&buckets) {
            return bad("buckets must be 1..=64");
        }
        Ok(ItemSpec {
            item_id: item_id.to_owned(),
            name: self.name,
            price_cents: self.price_cents,
            stock_total: self.stock,
            per_user_limit: self.per_user_limit,
            starts_ms,
            ends_ms,
            buckets: buckets as u32,
            // The switch has its own routes; a replacement keeps it.
            paused: false,
        })
    }
}

/// The item a `PUT /admin/v1/items/{id}` body defines, or why it cannot be sold.
pub(super) fn item_spec(item_id: &str, body: &[u8]) -> Result<ItemSpec, Reject> {
    reply::parse_json::<ItemBody>(body)?
        .ok_or_else(|| Reject::BadRequest("a JSON body is required".into()))?
        .into_spec(item_id)
}

/// `PUT /admin/v1/items/{id}`: create or replace a sale item.
pub async fn put_item(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    is_admin(req.headers(), ctx.app.config.admin_token.as_deref())?;
    let body = reply::read_body(req, ctx.app.config.header_timeout).await?;
    let spec = item_spec(ctx.id, &body)?;
    let reply = ctx
        .engine()
        .put_item(&spec, ctx.now())
        .await
        .map_err(|e| ctx.failed("put item", e))?;
    match reply {
        PutReply::Stored { stock } => {
            // The body does not carry the pause switch; a replacement keeps the item's.
            let kept = match ctx.engine().item(ctx.id).await {
                Ok(Some(state)) => state.spec.paused,
                _ => false,
            };
            let paused = kept || ctx.app.cache.is_paused(&spec);
            Ok(reply::ok(&ItemView::new(&spec, stock, ctx.now(), paused)))
        }
        PutReply::BelowHeld { held } => Err(Reject::BadRequest(format!(
            "stock below the {held} units already reserved or paid"
        ))),
        PutReply::BucketsFixed { buckets } => Err(Reject::BadRequest(format!(
            "the item exists with {buckets} stock bucket(s): its buckets cannot change, and an item with more than one \
             keeps its stock and definition (create a new item id instead)"
        ))),
    }
}

/// `POST /admin/v1/items/{id}/pause` (`paused`) and `…/resume` (`item` is the id), and
/// `POST /admin/v1/pause` and `/resume` for every sale (`item` is `None`): once answered,
/// no reservation succeeds on any instance (the engine enforces it in the script), and
/// every instance shows and answers `paused` within about a second (the change feed).
pub async fn pause(ctx: &Ctx<'_>, req: Request<Incoming>, item: Option<&str>, paused: bool) -> Answer {
    is_admin(req.headers(), ctx.app.config.admin_token.as_deref())?;
    let known = ctx
        .engine()
        .pause(item, paused, ctx.now())
        .await
        .map_err(|e| ctx.failed(if paused { "pause" } else { "resume" }, e))?;
    if !known {
        return Err(Reject::UnknownItem);
    }
    Ok(reply::ok(&match item {
        Some(id) => serde_json::json!({ "item_id": id, "paused": paused }),
        None => serde_json::json!({ "all_items": true, "paused": paused }),
    }))
}

/// `GET /admin/v1/items/{id}/stats`: the engine's counters (units) and what the database
/// holds (units and rows).
pub async fn stats(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    is_admin(req.headers(), ctx.app.config.admin_token.as_deref())?;
    let state = ctx
        .engine()
        .item(ctx.id)
        .await
        .map_err(|e| ctx.failed("stats", e))?
        .ok_or(Reject::UnknownItem)?;
    let totals = ctx.app.store.totals(ctx.id).await.map_err(|e| ctx.failed("stats", e))?;
    let per_bucket: Vec<serde_json::Value> = ctx
        .engine()
        .buckets(&state)
        .await
        .map_err(|e| ctx.failed("stats", e))?
        .iter()
        .map(|b| {
            serde_json::json!({
                "bucket": b.bucket,
                "stock_total": b.state.spec.stock_total,
                "stock_remaining": b.state.stock,
                "reserved": b.state.reserved,
                "paid": b.state.paid,
                "cancelled": b.state.cancelled,
                "expired": b.state.expired,
                "refunded": b.state.refunded,
                "in_transit": b.in_transit,
            })
        })
        .collect();
    Ok(reply::ok(&serde_json::json!({
        "item_id": ctx.id,
        "stock_total": state.spec.stock_total,
        "stock_remaining": state.stock,
        "reserved": state.reserved,
        "paid": state.paid,
        "cancelled": state.cancelled,
        "expired": state.expired,
        "refunded": state.refunded,
        "persisted": totals.units,
        "persisted_orders": totals.orders,
        "revenue_cents": totals.revenue_cents,
        "refund_due_orders": totals.refund_due_orders,
        "buckets": state.spec.buckets,
        "paused": ctx.app.cache.is_paused(&state.spec),
        "per_bucket": per_bucket,
    })))
}

/// `GET /admin/v1/items/{id}/orders.csv`: the item's rows from the database, as a download.
pub async fn orders_csv(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    is_admin(req.headers(), ctx.app.config.admin_token.as_deref())?;
    let orders = ctx
        .app
        .store
        .orders(Some(ctx.id))
        .await
        .map_err(|e| ctx.failed("orders export", e))?;
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
        "price_cents",
    ];
    let mut write = || -> Result<(), csv::Error> {
        w.write_record(header)?;
        for o in &orders {
            let v = OrderView::new(o);
            w.write_record([
                v.order_id,
                v.item_id,
                v.user_id,
                &v.qty.to_string(),
                v.status,
                &v.created_at,
                &v.pay_before,
                &v.updated_at,
                &v.price_cents.map(|p| p.to_string()).unwrap_or_default(),
            ])?;
        }
        w.flush()?;
        Ok(())
    };
    write().map_err(|e| ctx.failed("orders export", Error::Internal(e.to_string())))?;
    let bytes = w
        .into_inner()
        .map_err(|e| ctx.failed("orders export", Error::Internal(e.to_string())))?;
    let mut response = reply::text(StatusCode::OK, "text/csv; charset=utf-8", bytes);
    // Ids are [A-Za-z0-9_.:-] (checked by the router), so the file name needs no quoting.
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}-orders.csv\"", ctx.id)) {
        response.headers_mut().insert(CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

/// The body of `PUT /admin/v1/limits`: an object with any of `rate_global`, `rate_per_user`
/// and `rate_per_ip`, each a whole number of requests per second (0: off) or `null` (back to
/// the configured value); a rate left out keeps its value. Read by hand rather than by
/// serde: its errors would name Rust types (`u32`), not the API's words.
fn limits_change(body: &serde_json::Value) -> Result<LimitsChange, Reject> {
    const SHAPE: &str = "the body is a JSON object of rate_global, rate_per_user and/or rate_per_ip";
    let Some(fields) = body.as_object() else {
        return Err(Reject::BadRequest(SHAPE.into()));
    };
    let mut change = LimitsChange::default();
    for (name, value) in fields {
        let slot = match name.as_str() {
            "rate_global" => &mut change.global,
            "rate_per_user" => &mut change.per_user,
            "rate_per_ip" => &mut change.per_ip,
            _ => return Err(Reject::BadRequest(format!("unknown field {name:?}: {SHAPE}"))),
        };
        *slot = Some(match value {
            serde_json::Value::Null => None,
            v => Some(v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(|| {
                Reject::BadRequest(format!(
                    "{name} must be a whole number of requests per second, 0..=4294967295 (0: off), or null for the configured value"
                ))
            })?),
        });
    }
    Ok(change)
}

/// The change a `PUT /admin/v1/limits` body asks for.
pub(super) fn limits(body: &[u8]) -> Result<LimitsChange, Reject> {
    limits_change(
        &reply::parse_json::<serde_json::Value>(body)?
            .ok_or_else(|| Reject::BadRequest("a JSON body is required".into()))?,
    )
}

/// `PUT /admin/v1/limits`: change the rate limits of every instance; answers the limits in
/// force here, with the live instances and this instance's share of the global rate.
pub async fn put_limits(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    is_admin(req.headers(), ctx.app.config.admin_token.as_deref())?;
    let body = reply::read_body(req, ctx.app.config.header_timeout).await?;
    let change = limits(&body)?;
    if !change.is_empty() {
        ctx.engine()
            .share_limits(change)
            .await
            .map_err(|e| ctx.failed("put limits", e))?;
    }
    Ok(reply::ok(&ctx.app.limiter.in_force()))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn refused(body: serde_json::Value) -> String {
        match limits_change(&body) {
            Err(Reject::BadRequest(why)) => why,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn a_limits_body_sets_clears_and_keeps() {
        let c = limits_change(&json!({"rate_global": 500, "rate_per_ip": null})).unwrap();
        assert_eq!(c.global, Some(Some(500)));
        assert_eq!(c.per_user, None, "left out: kept");
        assert_eq!(c.per_ip, Some(None), "null: back to the configured value");
        assert!(limits_change(&json!({})).unwrap().is_empty());
        let c = limits_change(&json!({"rate_per_user": 0, "rate_per_ip": 4294967295u64})).unwrap();
        assert_eq!((c.per_user, c.per_ip), (Some(Some(0)), Some(Some(u32::MAX))));
    }

    #[test]
    fn a_bad_limits_body_is_refused_in_the_apis_words() {
        for body in [
            json!({"rate_global": -1}),
            json!({"rate_global": 4294967296u64}),
            json!({"rate_global": 1.5}),
            json!({"rate_global": "10"}),
            json!({"rate_global": true}),
            json!({"rate_per_user": [1]}),
        ] {
            let why = refused(body.clone());
            assert!(why.contains("whole number"), "{body}: {why}");
            assert!(!why.contains("u32") && !why.contains("i64"), "{body}: {why}");
        }
        assert!(refused(json!({"rate": 1})).contains("unknown field \"rate\""));
        for body in [json!([1]), json!(5), json!("x"), json!(null)] {
            assert!(refused(body.clone()).contains("JSON object"), "{body}");
        }
    }
}

/// The body of `POST /admin/v1/orders/{id}/refund`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefundBody {
    /// Whether a paid order's units and its buyer's quota return to the sale.
    restock: bool,
}

/// Whether a refund body asks for the units back (`restock`).
pub(super) fn restock(body: &[u8]) -> Result<bool, Reject> {
    let RefundBody { restock } = reply::parse_json::<RefundBody>(body)?
        .ok_or_else(|| Reject::BadRequest("a JSON body {\"restock\": true|false} is required".into()))?;
    Ok(restock)
}

/// `POST /admin/v1/orders/{id}/refund` `{"restock": bool}`: a `paid` or `refund_due` order
/// becomes `refunded`, exactly once (one script call; a repeat answers the same). 409
/// `order_closed` for an order with nothing to refund (reserved, cancelled, expired).
pub async fn refund(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    is_admin(req.headers(), ctx.app.config.admin_token.as_deref())?;
    let body = reply::read_body(req, ctx.app.config.header_timeout).await?;
    let restock = restock(&body)?;
    let reply = ctx
        .engine()
        .settle(Settle::Refund { restock }, ctx.id)
        .await
        .map_err(|e| ctx.failed("refund", e))?;
    match reply {
        TransitionReply::Done { status, .. } | TransitionReply::Already { status } => Ok(reply::ok(
            &serde_json::json!({"order_id": ctx.id, "status": status.as_str()}),
        )),
        TransitionReply::Closed { status } => Err(Reject::OrderClosed {
            status: status.as_str(),
        }),
        TransitionReply::Forbidden | TransitionReply::UnknownOrder => Err(Reject::UnknownOrder),
    }
}
