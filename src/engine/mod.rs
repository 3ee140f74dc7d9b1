//! Stage 6 — the stock engine: every stock-changing step is one atomic call.
//!
//! [`StockEngine`] is the contract both engines keep: [`redis::RedisEngine`] runs the Lua
//! scripts in `lua/` (one script call per step, all keys in one hash slot) and
//! [`embedded::EmbeddedEngine`] runs the same semantics in one in-process critical section.
//! The replies are the scripts' replies, decoded into enums; the front door turns them into
//! statuses. Key layout and script interfaces: `docs/internals.md`.

pub mod embedded;
pub mod guard;
pub mod keys;
pub mod redis;
pub mod scripts;

use std::future::Future;

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::error::Error;

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

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PutReply {
    Stored {
        stock: i64,
    },
    /// The new total is below the units already reserved or paid; nothing changed.
    BelowHeld {
        held: i64,
    },
}

#[derive(Clone, Debug)]
pub struct ReserveCmd {
    pub item_id: String,
    pub user_id: String,
    pub qty: i64,
    /// Chosen by the caller ([`crate::ids::new_order_id`]) so the engine stays deterministic.
    pub order_id: String,
    pub idem_key: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReserveReply {
    Reserved {
        order_id: String,
        created_ms: Millis,
        pay_before_ms: Millis,
        stock_after: i64,
    },
    /// The idempotency key was seen: the order it created, unchanged.
    Duplicate {
        order_id: String,
        qty: i64,
        status: OrderStatus,
        created_ms: Millis,
        pay_before_ms: Millis,
    },
    UnknownItem,
    NotStarted {
        starts_ms: Millis,
    },
    Ended {
        ends_ms: Millis,
    },
    BadQty {
        limit: i64,
    },
    LimitReached {
        held: i64,
        limit: i64,
    },
    SoldOut {
        stock: i64,
    },
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    Pay,
    Cancel,
}

impl Transition {
    pub fn target(self) -> OrderStatus {
        match self {
            Transition::Pay => OrderStatus::Paid,
            Transition::Cancel => OrderStatus::Cancelled,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TransitionReply {
    /// Transitioned by this call.
    Done {
        status: OrderStatus,
        stock_after: i64,
    },
    /// The same transition happened before (pay and cancel are idempotent).
    Already {
        status: OrderStatus,
    },
    /// Closed another way (expired, cancelled, or paid for a cancel).
    Closed {
        status: OrderStatus,
    },
    Forbidden,
    UnknownOrder,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpireReply {
    Expired { stock_after: i64 },
    NotDue { pay_before_ms: Millis },
    NotReserved { status: OrderStatus },
    UnknownOrder,
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

/// A reservation the sweeper expired.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expired {
    pub order_id: String,
    pub item_id: String,
    pub stock_after: i64,
}

/// The operations both engines implement, with the Lua scripts' semantics.
pub trait StockEngine: Send + Sync {
    /// Create or replace an item (`put_item.lua`).
    fn put_item(&self, spec: &ItemSpec) -> impl Future<Output = Result<PutReply, Error>> + Send;
    /// An item with its counters, or `None`.
    fn item(&self, item_id: &str) -> impl Future<Output = Result<Option<ItemState>, Error>> + Send;
    /// Take stock for a shopper (`reserve.lua`).
    fn reserve(&self, cmd: &ReserveCmd) -> impl Future<Output = Result<ReserveReply, Error>> + Send;
    /// Pay or cancel an order of `user_id` (`pay.lua`, `cancel.lua`).
    fn transition(
        &self,
        t: Transition,
        order_id: &str,
        user_id: &str,
    ) -> impl Future<Output = Result<TransitionReply, Error>> + Send;
    /// Expire one reservation if its deadline passed (`expire.lua`).
    fn expire(&self, order_id: &str, item_id: &str) -> impl Future<Output = Result<ExpireReply, Error>> + Send;
    /// Expire every reservation whose deadline passed, at most `max` per shard per call.
    fn expire_due(&self, max: usize) -> impl Future<Output = Result<Vec<Expired>, Error>> + Send;
    /// An order while the engine still holds it.
    fn order(&self, order_id: &str) -> impl Future<Output = Result<Option<Order>, Error>> + Send;
    /// Every item id (the Bloom filter is built from it).
    fn catalog(&self) -> impl Future<Output = Result<Vec<String>, Error>> + Send;
    /// Reachability, for `/readyz`.
    fn ping(&self) -> impl Future<Output = Result<(), Error>> + Send;
}

/// The engine a gateway runs: chosen at start-up by `REDIS_URL`.
pub enum Engine {
    Redis(redis::RedisEngine),
    Embedded(embedded::EmbeddedEngine),
}

macro_rules! delegate {
    ($self:ident, $e:ident => $call:expr) => {
        match $self {
            Engine::Redis($e) => $call.await,
            Engine::Embedded($e) => $call.await,
        }
    };
}

impl StockEngine for Engine {
    async fn put_item(&self, spec: &ItemSpec) -> Result<PutReply, Error> {
        delegate!(self, e => e.put_item(spec))
    }
    async fn item(&self, item_id: &str) -> Result<Option<ItemState>, Error> {
        delegate!(self, e => e.item(item_id))
    }
    async fn reserve(&self, cmd: &ReserveCmd) -> Result<ReserveReply, Error> {
        delegate!(self, e => e.reserve(cmd))
    }
    async fn transition(&self, t: Transition, order_id: &str, user_id: &str) -> Result<TransitionReply, Error> {
        delegate!(self, e => e.transition(t, order_id, user_id))
    }
    async fn expire(&self, order_id: &str, item_id: &str) -> Result<ExpireReply, Error> {
        delegate!(self, e => e.expire(order_id, item_id))
    }
    async fn expire_due(&self, max: usize) -> Result<Vec<Expired>, Error> {
        delegate!(self, e => e.expire_due(max))
    }
    async fn order(&self, order_id: &str) -> Result<Option<Order>, Error> {
        delegate!(self, e => e.order(order_id))
    }
    async fn catalog(&self) -> Result<Vec<String>, Error> {
        delegate!(self, e => e.catalog())
    }
    async fn ping(&self) -> Result<(), Error> {
        delegate!(self, e => e.ping())
    }
}
