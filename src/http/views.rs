//! What the API shows of an item and an order: the JSON bodies (and the CSV columns) built
//! from the domain types.

use serde::Serialize;

use crate::clock::{Millis, rfc3339};
use crate::domain::{ItemSpec, Order};

#[derive(Serialize)]
pub struct ItemView<'a> {
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

impl<'a> ItemView<'a> {
    /// The item as a shopper sees it at `now`, with `remaining` units left; `paused` when
    /// its sale or every sale is paused (an ended sale stays `ended`).
    pub fn new(spec: &'a ItemSpec, remaining: i64, now: Millis, paused: bool) -> Self {
        let state = if now >= spec.ends_ms {
            "ended"
        } else if paused {
            "paused"
        } else if now < spec.starts_ms {
            "upcoming"
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
}

#[derive(Serialize)]
pub struct OrderView<'a> {
    pub order_id: &'a str,
    pub item_id: &'a str,
    pub user_id: &'a str,
    pub qty: i64,
    pub status: &'static str,
    pub created_at: String,
    pub pay_before: String,
    pub updated_at: String,
    /// The unit price at reservation, and what the order costs (`qty` × it): the amount a
    /// payment of it must carry. Absent for an order made before prices were kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_cents: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount_cents: Option<i64>,
}

impl<'a> OrderView<'a> {
    pub fn new(o: &'a Order) -> Self {
        OrderView {
            order_id: &o.order_id,
            item_id: &o.item_id,
            user_id: &o.user_id,
            qty: o.qty,
            status: o.status.as_str(),
            created_at: rfc3339(o.created_ms),
            pay_before: rfc3339(o.pay_before_ms),
            updated_at: rfc3339(o.updated_ms),
            price_cents: o.price_cents,
            amount_cents: o.price_cents.map(|p| p * o.qty),
        }
    }
}

/// A shopper's orders (`GET /api/v1/orders`), each as `GET /api/v1/orders/{id}` shows it.
#[derive(Serialize)]
pub struct OrderListView<'a> {
    pub orders: Vec<OrderView<'a>>,
}

impl<'a> OrderListView<'a> {
    pub fn new(orders: &'a [Order]) -> Self {
        OrderListView {
            orders: orders.iter().map(OrderView::new).collect(),
        }
    }
}

/// A reservation made (or found again by its idempotency key).
#[derive(Serialize)]
pub struct ReservationView<'a> {
    pub order_id: &'a str,
    pub item_id: &'a str,
    pub user_id: &'a str,
    pub qty: i64,
    pub status: &'static str,
    pub pay_before: String,
}
