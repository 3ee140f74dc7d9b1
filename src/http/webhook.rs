//! `POST /webhooks/payments`: the payment provider confirms (or reports failed) a payment
//! of an order ([`crate::payments`] checks its signature). Providers retry until they get a
//! 2xx, so every payment id is answered the same each time, and changes its order once: the
//! first answer is recorded in the database (`payments`) and given again to every retry.
//!
//! A payment that arrives after its order closed (expired or cancelled) is never dropped:
//! the order becomes `refund_due` (money owed back), answered 200 so the provider stops
//! retrying, counted in `seckill_refund_due_total`, and listed in stats and the report.

use http::{Request, StatusCode};
use hyper::body::Incoming;

use super::reply;
use super::router::{Answer, Ctx};
use crate::engine::{Settle, TransitionReply};
use crate::error::Reject;
use crate::ids::{split_bucket, valid_id};
use crate::payments::{self, Payment, PaymentStatus, SIGNATURE_HEADER};

/// `POST /webhooks/payments`: the signature, then the body, then the payment's effect.
pub async fn payment(ctx: &Ctx<'_>, req: Request<Incoming>) -> Answer {
    let Some(secret) = ctx.app.config.payment_secret.as_deref() else {
        return Err(Reject::BadSignature(
            "payment callbacks are off: SECKILL_PAYMENT_SECRET is not set",
        ));
    };
    let signature = req.headers().get(SIGNATURE_HEADER).map(|v| v.as_bytes().to_vec());
    let body = reply::read_body(req, ctx.app.config.header_timeout).await?;
    payments::verify(secret.as_bytes(), signature.as_deref(), &body, ctx.now() / 1000)
        .map_err(|refused| Reject::BadSignature(refused.why()))?;
    let p = payment_of(&body)?;
    let store = &ctx.app.store;
    // A retry of a payment answered before: the same answer, nothing changes again.
    if let Some((status, answer)) = store
        .payment_answer(&p.payment_id)
        .await
        .map_err(|e| ctx.failed("payment lookup", e))?
    {
        return Ok(recorded(status, answer));
    }
    let order = ctx
        .engine()
        .order(&p.order_id)
        .await
        .map_err(|e| ctx.failed("order lookup", e))?
        .ok_or(Reject::UnknownOrder)?;
    let status = match p.status {
        // Nothing happens to the order; the shopper may pay again before the deadline.
        PaymentStatus::Failed => order.status,
        PaymentStatus::Succeeded => {
            let unit = match order.price_cents {
                Some(price) => price,
                // An order made before prices were kept: the item's price.
                None => ctx
                    .engine()
                    .item(split_bucket(&order.item_id).0)
                    .await
                    .map_err(|e| ctx.failed("item lookup", e))?
                    .map_or(0, |i| i.spec.price_cents),
            };
            let expected = unit.saturating_mul(order.qty);
            if p.amount_cents != expected {
                return Err(Reject::AmountMismatch {
                    expected_cents: expected,
                    got_cents: p.amount_cents,
                });
            }
            match ctx
                .engine()
                .settle(Settle::Payment, &p.order_id)
                .await
                .map_err(|e| ctx.failed("payment", e))?
            {
                TransitionReply::Done { status, .. }
                | TransitionReply::Already { status }
                | TransitionReply::Closed { status } => status,
                TransitionReply::Forbidden | TransitionReply::UnknownOrder => return Err(Reject::UnknownOrder),
            }
        }
    };
    let answer = serde_json::json!({
        "payment_id": p.payment_id,
        "order_id": p.order_id,
        "payment": p.status.as_str(),
        "status": status.as_str(),
    })
    .to_string();
    let (code, answer) = store
        .record_payment(&p, StatusCode::OK.as_u16(), &answer, ctx.now())
        .await
        .map_err(|e| ctx.failed("payment record", e))?;
    Ok(recorded(code, answer))
}

/// The payment a (verified) callback body reports.
pub(super) fn payment_of(body: &[u8]) -> Result<Payment, Reject> {
    let p: Payment = reply::parse_json(body)?.ok_or_else(|| Reject::BadRequest("a JSON body is required".into()))?;
    if !valid_id(&p.payment_id) || !valid_id(&p.order_id) {
        return Err(Reject::BadRequest(
            "payment_id and order_id are 1-64 characters of [A-Za-z0-9_.:-]".into(),
        ));
    }
    Ok(p)
}

/// A recorded answer as the response.
fn recorded(status: u16, answer: String) -> http::Response<reply::Body> {
    reply::text(
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        "application/json",
        answer,
    )
}
