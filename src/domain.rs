//! The domain's vocabulary, in one home: what an operator sells ([`ItemSpec`]), its live
//! counters ([`ItemState`]), an [`Order`] and its [`OrderStatus`], and the [`OrderEvent`]s
//! that carry every change to the database (and their stream-field encoding). The engines,
//! the persistence worker, the store and the front door all speak these types; none of them
//! owns them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::clock::Millis;

/// What an operator sells: the fields of `PUT /admin/v1/items/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemSpec {
    pub item_id: String,
    pub name: String,
    pub price_cents: i64,
    pub stock_total: i64,
    pub per_user_limit: i64,
    pub starts_ms: Millis,
    pub ends_ms: Millis,
}

/// An item with its live counters (units).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemState {
    pub spec: ItemSpec,
    /// Units left: `stock_total − reserved − paid`.
    pub stock: i64,
    /// Units held by reservations awaiting payment.
    pub reserved: i64,
    pub paid: i64,
    /// Units returned by cancellations (cumulative).
    pub cancelled: i64,
    /// Units returned by expired reservations (cumulative).
    pub expired: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Reserved,
    Paid,
    Cancelled,
    Expired,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Reserved => "reserved",
            OrderStatus::Paid => "paid",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "reserved" => OrderStatus::Reserved,
            "paid" => OrderStatus::Paid,
            "cancelled" => OrderStatus::Cancelled,
            "expired" => OrderStatus::Expired,
            _ => return None,
        })
    }

    /// Final statuses never change again (invariant 4).
    pub fn is_final(self) -> bool {
        self != OrderStatus::Reserved
    }
}

/// One order, as stored in the engine (and, later, in the database).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub item_id: String,
    pub user_id: String,
    pub qty: i64,
    pub status: OrderStatus,
    pub created_ms: Millis,
    pub pay_before_ms: Millis,
    pub updated_ms: Millis,
    pub idem_key: String,
}

/// An order event: what the scripts XADD to a shard stream (and what the embedded engine
/// journals). Every event carries the whole order, so a row can be created from any of them,
/// whatever order they arrive in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderEvent {
    /// The status this event moves the order to (`reserved` creates it).
    pub status: OrderStatus,
    pub order_id: String,
    pub item_id: String,
    pub user_id: String,
    pub qty: i64,
    /// When this transition happened.
    pub at_ms: Millis,
    pub created_ms: Millis,
    pub pay_before_ms: Millis,
    pub idem_key: String,
}

impl OrderEvent {
    pub fn of(order: &Order, status: OrderStatus, at_ms: Millis) -> Self {
        OrderEvent {
            status,
            order_id: order.order_id.clone(),
            item_id: order.item_id.clone(),
            user_id: order.user_id.clone(),
            qty: order.qty,
            at_ms,
            created_ms: order.created_ms,
            pay_before_ms: order.pay_before_ms,
            idem_key: order.idem_key.clone(),
        }
    }

    /// Decode the fields of a stream entry; `Err` names what is wrong (a poison event).
    pub fn from_fields(f: &HashMap<String, String>) -> Result<Self, String> {
        let text = |k: &str| f.get(k).cloned().ok_or_else(|| format!("missing field {k}"));
        let num = |k: &str| -> Result<i64, String> {
            f.get(k)
                .ok_or_else(|| format!("missing field {k}"))?
                .parse()
                .map_err(|_| format!("field {k} is not an integer"))
        };
        let kind = text("type")?;
        let status = OrderStatus::parse(&kind).ok_or_else(|| format!("unknown event type {kind:?}"))?;
        let ev = OrderEvent {
            status,
            order_id: text("order_id")?,
            item_id: text("item_id")?,
            user_id: text("user_id")?,
            qty: num("qty")?,
            at_ms: num("at_ms")?,
            created_ms: num("created_ms")?,
            pay_before_ms: num("pay_before_ms")?,
            idem_key: f.get("idem_key").cloned().unwrap_or_default(),
        };
        if !crate::ids::valid_id(&ev.order_id)
            || !crate::ids::valid_id(&ev.item_id)
            || !crate::ids::valid_id(&ev.user_id)
        {
            return Err("malformed id".into());
        }
        if ev.qty < 1 {
            return Err("qty below 1".into());
        }
        Ok(ev)
    }

    /// The stream fields, as the scripts write them.
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("type", self.status.as_str().to_owned()),
            ("order_id", self.order_id.clone()),
            ("item_id", self.item_id.clone()),
            ("user_id", self.user_id.clone()),
            ("qty", self.qty.to_string()),
            ("at_ms", self.at_ms.to_string()),
            ("created_ms", self.created_ms.to_string()),
            ("pay_before_ms", self.pay_before_ms.to_string()),
            ("idem_key", self.idem_key.clone()),
        ]
    }
}
