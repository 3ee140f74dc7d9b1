//! The request readers the handlers keep to themselves, for the fuzz targets (`fuzz/`,
//! README "Fuzzing"): each is the function its handler calls on the untrusted bytes, so a
//! target exercises exactly what a request does. Not an API.

use crate::domain::ItemSpec;
use crate::error::Reject;
use crate::limiter::LimitsChange;
use crate::payments::Payment;

/// `POST /api/v1/items/{id}/reserve`: the body's `qty`.
pub fn reserve_qty(body: &[u8]) -> Result<i64, Reject> {
    super::items::qty(body)
}

/// `PUT /admin/v1/items/{id}`: the body's item, validated.
pub fn item_spec(item_id: &str, body: &[u8]) -> Result<ItemSpec, Reject> {
    super::admin::item_spec(item_id, body)
}

/// `PUT /admin/v1/limits`: the body's change of rates.
pub fn limits(body: &[u8]) -> Result<LimitsChange, Reject> {
    super::admin::limits(body)
}

/// `POST /admin/v1/orders/{id}/refund`: the body's `restock`.
pub fn refund_restock(body: &[u8]) -> Result<bool, Reject> {
    super::admin::restock(body)
}

/// `POST /webhooks/payments`: the body's payment (after its signature is checked).
pub fn payment(body: &[u8]) -> Result<Payment, Reject> {
    super::webhook::payment_of(body)
}

/// `GET /api/v1/orders`: the `limit` of the query string.
pub fn list_limit(query: Option<&str>) -> Result<u32, Reject> {
    super::orders::ListQuery::limit(query)
}
