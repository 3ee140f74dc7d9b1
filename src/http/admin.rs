//! The operator's routes, behind `Authorization: Bearer $SECKILL_ADMIN_TOKEN`:
//! `PUT /admin/v1/items/{id}`, `GET …/stats`, `GET …/orders.csv`, the pause switches
//! (`POST …/pause`, `…/resume`, of an item or of every sale).

use http::header::CONTENT_DISPOSITION;
use http::{HeaderValue, Request, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;

use super::reply;
use super::router::{Answer, Ctx};
use super::views::{ItemView, OrderView};
use crate::clock::parse_rfc3339;
use crate::domain::ItemSpec;
use crate::engine::PutReply;
use crate::error::{Error, Reject};
use crate::identity::is_admin;
use crate::ids::MAX_BUCKETS;

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

/// `PUT /admin/v1/items/{id}`: create or replace a sale item.
pub async fn put_item(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    is_admin(req.headers(), ctx.app.config.admin_token.as_deref())?;
    let body = reply::read_body(req, ctx.app.config.header_timeout).await?;
    let spec = reply::parse_json::<ItemBody>(&body)?
        .ok_or_else(|| Reject::BadRequest("a JSON body is required".into()))?
        .into_spec(ctx.id)?;
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
    let (rows, units) = ctx.app.store.count(ctx.id).await.map_err(|e| ctx.failed("stats", e))?;
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
        "persisted": units,
        "persisted_orders": rows,
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
