//! Order events: what the scripts XADD to a shard stream (and what the embedded engine
//! journals), and their stream-field encoding. Every event carries the whole order, so a
//! row can be created from any of them, whatever order they arrive in.

use std::collections::HashMap;

use crate::clock::Millis;
use crate::engine::{Order, OrderStatus};

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
