//! Stage 6 — the stock engine: every stock-changing step is one atomic call.
//!
//! [`StockEngine`] is the contract both engines keep: [`redis::RedisEngine`] runs the Lua
//! scripts in `lua/` (one script call per step, all keys in one hash slot) and
//! [`embedded::EmbeddedEngine`] runs the same semantics in one in-process critical section,
//! made durable by its [`journal`]. The replies are the scripts' replies, decoded into enums;
//! the front door turns them into statuses. Key layout and script interfaces:
//! `docs/internals.md`.
//!
//! Each engine owns what follows from its own decisions, so no handler and no background
//! task asks which engine it is talking to:
//! - it tells the gateway what happened to an item through one [`Listener`] ([`ItemNews`]:
//!   orders made and closed, stock left, items put, sold out, unknown; and, with Redis, what
//!   other instances changed), which keeps the Bloom filter, the local cache and the stock
//!   gauge;
//! - [`Engine`], the one a gateway runs, adds what both need around the raw engines: a
//!   decision that survives a client hanging up, the database as the memory of orders the
//!   engine has forgotten, the sweeper's pass, and the engine's own background tasks
//!   (pub/sub and clock sync with Redis).

pub mod batch;
pub mod buckets;
pub mod conn;
pub mod embedded;
pub mod guard;
pub mod journal;
pub mod keys;
pub mod redis;
pub mod scripts;
pub mod seq;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::{Clock, Millis};
use crate::config::Config;
pub use crate::domain::{ItemSpec, ItemState, Order, OrderStatus};
use crate::error::Error;
use crate::limiter::LimitsChange;
use crate::store::Store;

/// What both engines are told by the configuration (one struct, not positional arguments).
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// How long a reservation waits for payment before its stock returns.
    pub payment_timeout: Duration,
    /// How long an idempotency key is remembered.
    pub idempotency_ttl: Duration,
    /// How long a closed (paid, cancelled, expired) order stays in the engine for lookups;
    /// the database answers after that.
    pub closed_order_ttl: Duration,
}

impl EngineSettings {
    pub fn from_config(c: &Config) -> Self {
        EngineSettings {
            payment_timeout: c.payment_timeout,
            idempotency_ttl: c.idempotency_ttl,
            closed_order_ttl: c.closed_order_ttl,
        }
    }
}

/// What an engine tells the gateway about an item. The [`Listener`] turns each into the
/// local consequences (Bloom filter, cache, sold-out flag, stock gauge, order counters).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ItemNews<'a> {
    /// An order moved to `event` here (`reserved` made it; `paid`, `cancelled` and
    /// `expired` closed it); `stock` is the item's remaining units after it, where the
    /// engine's reply says (a pay or cancel that found the order overdue expires it and
    /// answers without the count).
    Order {
        item: &'a str,
        event: OrderStatus,
        stock: Option<i64>,
    },
    /// The item was created or replaced here.
    Put { item: &'a str, stock: i64, total: i64 },
    /// The item's counters, as just read.
    Read { item: &'a str, stock: i64, total: i64 },
    /// A reserve found no stock left: answer `sold_out` locally from now on.
    SoldOut { item: &'a str },
    /// The engine does not know this id (the Bloom filter said maybe).
    Missing { item: &'a str },
    /// Another instance changed the item (created, replaced, stock back): forget what is
    /// cached about it.
    Remote { item: &'a str },
    /// Every item id, after a reconnect to the change feed (messages may have been missed).
    Catalog(Vec<String>),
    /// Every sale paused (`true`) or resumed, here or by another instance; also told after
    /// every reconnect to the change feed, with what Redis holds.
    AllPaused(bool),
}

/// What an engine tells the gateway about the rate limits it shares between instances
/// ([`crate::limiter`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitsNews {
    /// The shared limits changed (`PUT /admin/v1/limits` here or, with Redis, on any
    /// instance), or were read again after a reconnect: apply the change.
    Shared(LimitsChange),
    /// The live instances sharing the global limit (with Redis: the heartbeats).
    Instances(u32),
}

/// Receives every [`ItemNews`]; called synchronously on the path that caused it, so a
/// sold-out flag is set before the reply that sold the last unit leaves.
pub trait Listener: Send + Sync {
    fn news(&self, news: ItemNews<'_>);

    /// The rate limits' news (ignored by default: engines built by tests and tools).
    fn limits(&self, _news: LimitsNews) {}
}

/// A listener that ignores everything (engines built by tests and tools).
pub struct Deaf;

impl Listener for Deaf {
    fn news(&self, _: ItemNews<'_>) {}
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
    /// The item exists and has stock buckets, or is asked to get them: its buckets and
    /// its stock stay as they are (only the same definition again is accepted); nothing
    /// changed.
    BucketsFixed {
        buckets: u32,
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
    /// The item's stock buckets (its definition's `buckets`, from the caller's cache): the
    /// Redis engine makes the order in the shopper's home bucket
    /// ([`crate::ids::home_bucket`]); the embedded engine keeps one counter.
    pub buckets: u32,
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
    /// The item, or every sale, is paused by the operator.
    Paused,
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

impl ReserveReply {
    /// What this reply tells the gateway about the item; both engines report it this way.
    pub(crate) fn news<'a>(&self, item: &'a str) -> Option<ItemNews<'a>> {
        match self {
            ReserveReply::Reserved { stock_after, .. } => Some(ItemNews::Order {
                item,
                event: OrderStatus::Reserved,
                stock: Some(*stock_after),
            }),
            ReserveReply::SoldOut { stock: 0 } => Some(ItemNews::SoldOut { item }),
            ReserveReply::UnknownItem => Some(ItemNews::Missing { item }),
            // Paused where this instance had not heard of it yet (a pause message still on
            // its way, or missed): forget the cached definition, so the next read sees it.
            ReserveReply::Paused => Some(ItemNews::Remote { item }),
            _ => None,
        }
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

/// What a payment provider or the operator does to an order ([`StockEngine::settle`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settle {
    /// The provider confirmed a payment (`settle.lua`): a reserved order is paid; one that
    /// closed before the money came (cancelled, expired, or overdue: expired first) becomes
    /// `refund_due`.
    Payment,
    /// The operator refunds (`refund.lua`): `paid` or `refund_due` becomes `refunded`, with
    /// the units and the buyer's quota back in the sale when `restock` (a paid order's; a
    /// `refund_due` one's came back when it closed).
    Refund { restock: bool },
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
    /// Pause (`paused`) or resume the sale of an item (`Some`) or of every item (`None`):
    /// once this returns, no reserve of it succeeds (`pause.lua`; every shard's `paused`
    /// field for every item). `false` when the item does not exist.
    fn pause(&self, item_id: Option<&str>, paused: bool) -> impl Future<Output = Result<bool, Error>> + Send;
    /// Take stock for a shopper (`reserve.lua`).
    fn reserve(&self, cmd: &ReserveCmd) -> impl Future<Output = Result<ReserveReply, Error>> + Send;
    /// Pay or cancel an order of `user_id` (`pay.lua`, `cancel.lua`).
    fn transition(
        &self,
        t: Transition,
        order_id: &str,
        user_id: &str,
    ) -> impl Future<Output = Result<TransitionReply, Error>> + Send;
    /// A provider's payment or an operator's refund of an order (`settle.lua`,
    /// `refund.lua`): `Done` with the status reached, `Already` when the order is there
    /// already (paid, refund_due or refunded for a payment; refunded for a refund),
    /// `Closed` when a refund finds nothing to refund (reserved, cancelled, expired).
    /// `record` is the database's copy of a closed order the engine may have forgotten
    /// (its engine item id: a bucket's where it has one): the engine takes it back first.
    fn settle(
        &self,
        op: Settle,
        order_id: &str,
        record: Option<&Order>,
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
    /// Forget closed orders and idempotency keys past their TTLs; returns the orders
    /// forgotten. (Redis forgets by key TTLs by itself: nothing to do there.)
    fn prune(&self) -> impl Future<Output = Result<usize, Error>> + Send;
}

/// The engine a gateway runs, chosen at start-up by `REDIS_URL`, with what both engines
/// need around them. Cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    kind: Kind,
    listener: Arc<dyn Listener>,
    /// The database: every order an engine forgot (closed long ago) is still there.
    store: Arc<Store>,
}

// One per process, behind an `Arc`: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Kind {
    Redis(redis::RedisEngine),
    Embedded(embedded::EmbeddedEngine),
}

macro_rules! delegate {
    ($self:ident, $e:ident => $call:expr) => {
        match &$self.inner.kind {
            Kind::Redis($e) => $call.await,
            Kind::Embedded($e) => $call.await,
        }
    };
}

/// An embedded reservation made and waiting for its journal commit. Dropped before the
/// commit answered (the client hung up, hyper dropped the handler), it hands the wait to a
/// task, which concludes the reservation: reported when durable, undone when not.
struct Unsettled {
    engine: Engine,
    made: Option<embedded::Made>,
    durable: Option<futures_util::future::BoxFuture<'static, Result<(), Error>>>,
}

impl Drop for Unsettled {
    fn drop(&mut self) {
        let (Some(made), Some(durable)) = (self.made.take(), self.durable.take()) else {
            return;
        };
        // No runtime (the process is ending): the journal still commits what it was given;
        // only the report and a failed commit's undo in memory are left out.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let engine = self.engine.clone();
        runtime.spawn(async move {
            let durable = durable.await;
            if let Kind::Embedded(e) = &engine.inner.kind {
                match e.conclude(made, durable) {
                    Ok(_) => {}
                    Err(e @ Error::StoreInDoubt(_)) => {
                        tracing::warn!(cause = %e, "a reservation whose client left: its commit's outcome is unknown, kept and written again");
                    }
                    Err(e) => tracing::warn!(cause = %e, "a reservation whose client left was not committed: undone"),
                }
            }
        });
    }
}

/// Orders expired per shard per sweeper call.
const SWEEP_BATCH: usize = 500;

impl Engine {
    /// Build the engine the configuration names: Redis with `REDIS_URL`, else the embedded
    /// engine journaling to `store` and rebuilt from it.
    pub async fn from_config(
        config: &Config,
        store: Arc<Store>,
        clock: Clock,
        listener: Arc<dyn Listener>,
    ) -> anyhow::Result<Engine> {
        let settings = EngineSettings::from_config(config);
        let kind = match &config.redis_url {
            Some(url) => {
                let engine =
                    redis::RedisEngine::new(redis::RedisSettings::from_config(url, config), settings, clock.clone())?
                        .with_listener(listener.clone());
                if !clock.is_manual()
                    && let Err(e) = engine.sync_clock().await
                {
                    tracing::warn!(cause = %e, "could not read Redis TIME; local window checks use this host's clock");
                }
                Kind::Redis(engine)
            }
            None => {
                let journal = journal::SqliteJournal::start(store.clone(), clock.clone());
                let engine = embedded::EmbeddedEngine::new(settings, clock, Some(Box::new(journal)))
                    .with_listener(listener.clone());
                engine.restore(store.items().await?, store.orders(None).await?);
                if store.all_paused().await? {
                    engine.restore_all_paused();
                    listener.news(ItemNews::AllPaused(true));
                }
                Kind::Embedded(engine)
            }
        };
        Ok(Engine {
            inner: Arc::new(Inner { kind, listener, store }),
        })
    }

    /// `"redis"` or `"embedded"`, for the banner and `/readyz`.
    pub fn mode(&self) -> &'static str {
        match &self.inner.kind {
            Kind::Redis(_) => "redis",
            Kind::Embedded(_) => "embedded",
        }
    }

    /// Whether the store is this engine's durability (embedded: every change is committed
    /// there before it is answered), so that a store outage makes the gateway unready. With
    /// Redis the streams buffer events while the database is down.
    pub fn needs_store(&self) -> bool {
        matches!(self.inner.kind, Kind::Embedded(_))
    }

    /// The Redis engine, for the start-up code that runs its persistence workers.
    pub fn redis(&self) -> Option<&redis::RedisEngine> {
        match &self.inner.kind {
            Kind::Redis(r) => Some(r),
            Kind::Embedded(_) => None,
        }
    }

    /// Create or replace an item. With Redis the database keeps a copy for reports (the
    /// embedded journal stored it before answering).
    pub async fn put_item(&self, spec: &ItemSpec, now_ms: Millis) -> Result<PutReply, Error> {
        let reply = delegate!(self, e => e.put_item(spec))?;
        if let (PutReply::Stored { .. }, Kind::Redis(_)) = (&reply, &self.inner.kind)
            && let Err(e) = self.inner.store.put_item(spec, now_ms).await
        {
            tracing::warn!(item = %spec.item_id, cause = %e, "item stored in the engine but not in the database");
        }
        Ok(reply)
    }

    /// Read an item's stock again for its gauge ([`ItemNews::Read`]); with Redis outside the
    /// guards ([`redis::RedisEngine::stock_for_gauge`]).
    pub async fn refresh_stock(&self, item_id: &str) -> Result<(), Error> {
        let figures = match &self.inner.kind {
            Kind::Redis(r) => r.stock_for_gauge(item_id).await?,
            Kind::Embedded(e) => e.item(item_id).await?.map(|s| (s.stock, s.spec.stock_total)),
        };
        if let Some((stock, total)) = figures {
            self.inner.listener.news(ItemNews::Read {
                item: item_id,
                stock,
                total,
            });
        }
        Ok(())
    }

    /// Pause or resume the sale of an item (`Some`) or of every item (`None`); `false` when
    /// the item does not exist. With Redis the database records the switch too (the
    /// embedded journal did before answering), so that a rebuild of Redis keeps it: a
    /// failure to record it is an error after the switch took effect (sending it again
    /// is harmless).
    pub async fn pause(&self, item_id: Option<&str>, paused: bool, now_ms: Millis) -> Result<bool, Error> {
        let known = delegate!(self, e => e.pause(item_id, paused))?;
        if known && let Kind::Redis(_) = &self.inner.kind {
            self.inner.store.set_paused(item_id, paused, now_ms).await?;
        }
        Ok(known)
    }

    /// An item with its counters (the stock gauge follows what was read).
    pub async fn item(&self, item_id: &str) -> Result<Option<ItemState>, Error> {
        let state = delegate!(self, e => e.item(item_id))?;
        if let Some(s) = &state {
            self.inner.listener.news(ItemNews::Read {
                item: item_id,
                stock: s.stock,
                total: s.spec.stock_total,
            });
        }
        Ok(state)
    }

    /// Take stock for a shopper. If the client hangs up, hyper drops the caller's future,
    /// but a reservation the engine makes is still completed (counted, sold-out flag set;
    /// embedded: undone if its commit fails), so `seckill_orders_total{event="reserved"}`
    /// always equals the orders made. An idempotent retry whose order the engine has
    /// forgotten is answered from the database.
    ///
    /// No task per request where none is needed (its spawn and second wake-up were 18% of
    /// the gateway's CPU per reservation: 24.9 → 20.3 µs, `loadtest/run wrk-reserve
    /// --repeat 3`): a Redis reservation of an unbucketed item is decided and reported by
    /// its batch's task once queued ([`batch`]); an embedded one is decided under the lock
    /// at once, and only its wait for the journal's commit can be dropped, whereupon
    /// [`Unsettled`] finishes it on a task. A bucketed Redis reservation runs as a task.
    pub async fn reserve(&self, cmd: ReserveCmd) -> Result<ReserveReply, Error> {
        let qty = cmd.qty;
        let reply = match &self.inner.kind {
            Kind::Redis(e) if cmd.buckets <= 1 => e.batches.reserve(cmd).await,
            Kind::Embedded(e) => {
                e.once_settled(|| async {
                    match e.decide(&cmd) {
                        embedded::Decided::Now(reply) => reply,
                        embedded::Decided::Made(made, durable) => {
                            let mut wait = Unsettled {
                                engine: self.clone(),
                                made: Some(made),
                                durable: Some(durable),
                            };
                            let durable = wait.durable.as_mut().expect("set above").await;
                            wait.durable = None;
                            e.conclude(wait.made.take().expect("set above"), durable)
                        }
                    }
                })
                .await
            }
            Kind::Redis(_) => {
                let engine = self.clone();
                tokio::spawn(async move { delegate!(engine, e => e.reserve(&cmd)) })
                    .await
                    .map_err(|e| Error::Internal(format!("reserve task ended: {e}")))?
            }
        };
        match reply? {
            ReserveReply::Duplicate { order_id, qty: 0, .. } => {
                let (qty, status, created_ms, pay_before_ms) = match self.inner.store.order(&order_id).await? {
                    Some(o) => (o.qty, o.status, o.created_ms, o.pay_before_ms),
                    None => (qty, OrderStatus::Reserved, 0, 0),
                };
                Ok(ReserveReply::Duplicate {
                    order_id,
                    qty,
                    status,
                    created_ms,
                    pay_before_ms,
                })
            }
            other => Ok(other),
        }
    }

    /// Pay or cancel an order of `user_id`.
    ///
    /// With Redis, an order Redis does not know but the database holds open was lost by
    /// Redis (an open order's hash has no TTL): answered 503 while the repair task rebuilds
    /// its shard ([`crate::orders::repair`]), never 404.
    ///
    /// An order the engine forgot because it closed longer ago than its TTL is answered from
    /// the database, as the engine answered while it held it: the same transition again is
    /// `Already`, another `Closed` (a repeated pay or cancel is answered the same forever).
    pub async fn transition(&self, t: Transition, order_id: &str, user_id: &str) -> Result<TransitionReply, Error> {
        let reply = delegate!(self, e => e.transition(t, order_id, user_id))?;
        let TransitionReply::UnknownOrder = reply else {
            return Ok(reply);
        };
        let Some(row) = self.forgotten(order_id).await? else {
            return Ok(reply);
        };
        Ok(if row.user_id != user_id {
            TransitionReply::Forbidden
        } else if row.status == t.target() {
            TransitionReply::Already { status: row.status }
        } else {
            TransitionReply::Closed { status: row.status }
        })
    }

    /// A provider's payment or an operator's refund of an order ([`StockEngine::settle`]).
    /// An order the engine has forgotten (closed longer ago than its TTL) is taken back
    /// from the database's record; one the database holds open and Redis does not was lost
    /// by Redis: 503 while its shard is rebuilt, as for pay and cancel.
    pub async fn settle(&self, op: Settle, order_id: &str) -> Result<TransitionReply, Error> {
        let reply = delegate!(self, e => e.settle(op, order_id, None))?;
        let TransitionReply::UnknownOrder = reply else {
            return Ok(reply);
        };
        match self.forgotten(order_id).await? {
            Some(record) => delegate!(self, e => e.settle(op, order_id, Some(&record))),
            None => Ok(reply),
        }
    }

    /// The database's record of an order the engine did not know: `Some` when it is closed
    /// (the engine forgot it past its TTL; its item id is the engine's, a bucket's where it
    /// has one); `None` when there is none, or it is open in the embedded engine's database
    /// (never forgotten there). Open in the database and missing from Redis, Redis lost it:
    /// its shard is fenced and rebuilt ([`crate::orders::repair`]), and the caller answers
    /// 503. Only an id of ours can be a row: a made-up one costs no database query.
    async fn forgotten(&self, order_id: &str) -> Result<Option<Order>, Error> {
        let Some(shard) = crate::ids::order_shard(order_id) else {
            return Ok(None);
        };
        let Some(record) = self.inner.store.engine_order(order_id).await? else {
            return Ok(None);
        };
        if record.status != OrderStatus::Reserved {
            return Ok(Some(record));
        }
        if let Some(redis) = self.redis() {
            // The order's shard, which its id carries: its bucket's, not always its item's.
            redis.alarms().raise(shard);
            return Err(Error::Fenced(format!(
                "order {order_id} is open in the database but not in Redis"
            )));
        }
        Ok(None)
    }

    /// An order: from the engine while it holds it, else from the database.
    pub async fn order(&self, order_id: &str) -> Result<Option<Order>, Error> {
        match delegate!(self, e => e.order(order_id))? {
            Some(o) => Ok(Some(o)),
            None => self.inner.store.order(order_id).await,
        }
    }

    pub async fn catalog(&self) -> Result<Vec<String>, Error> {
        delegate!(self, e => e.catalog())
    }

    /// Each stock bucket of an item read as `item` (Redis, `buckets` > 1); none otherwise
    /// (the embedded engine keeps one counter).
    pub async fn buckets(&self, item: &ItemState) -> Result<Vec<buckets::BucketState>, Error> {
        match &self.inner.kind {
            Kind::Redis(r) if item.spec.buckets > 1 => r.bucket_states(item).await,
            _ => Ok(Vec::new()),
        }
    }

    pub async fn ping(&self) -> Result<(), Error> {
        delegate!(self, e => e.ping())
    }

    /// The background health check's ping: with Redis outside the guards
    /// ([`redis::RedisEngine::ping_unguarded`]).
    pub async fn health_ping(&self) -> Result<(), Error> {
        match &self.inner.kind {
            Kind::Redis(r) => r.ping_unguarded().await,
            Kind::Embedded(e) => e.ping().await,
        }
    }

    /// Change the shared rate limits (`PUT /admin/v1/limits`). With Redis: stored in
    /// `sk:limits` and announced on the change feed, so every instance applies them (this
    /// one before answering); embedded: applied here, until the process stops.
    pub async fn share_limits(&self, change: LimitsChange) -> Result<(), Error> {
        match &self.inner.kind {
            Kind::Redis(r) => r.share_limits(change).await,
            Kind::Embedded(_) => {
                self.inner.listener.limits(LimitsNews::Shared(change));
                Ok(())
            }
        }
    }

    /// Read the shared rate limits at start-up (Redis; the embedded engine shares none yet).
    pub async fn load_limits(&self) -> Result<(), Error> {
        match &self.inner.kind {
            Kind::Redis(r) => r.load_limits().await,
            Kind::Embedded(_) => Ok(()),
        }
    }

    /// One sweeper pass: forget what is past its TTL, then expire every reservation whose
    /// deadline passed, in batches. Returns the orders expired.
    pub async fn sweep(&self) -> Result<usize, Error> {
        delegate!(self, e => e.prune())?;
        let mut total = 0;
        loop {
            let expired = delegate!(self, e => e.expire_due(SWEEP_BATCH))?;
            total += expired.len();
            if expired.len() < SWEEP_BATCH {
                return Ok(total);
            }
        }
    }

    /// The engine's own background tasks (with Redis: the change feed and the clock sync);
    /// they end when `shutdown` turns true.
    pub fn spawn_background(&self, shutdown: watch::Receiver<bool>) -> Vec<tokio::task::JoinHandle<()>> {
        match &self.inner.kind {
            Kind::Redis(_) => {
                let (a, b, c) = (self.clone(), self.clone(), self.clone());
                let stop = shutdown.clone();
                let stop_c = shutdown.clone();
                vec![
                    tokio::spawn(async move {
                        if let Some(r) = c.redis() {
                            r.keep_transfers_moving(stop_c).await;
                        }
                    }),
                    tokio::spawn(async move {
                        if let Some(r) = a.redis() {
                            r.follow_changes(stop).await;
                        }
                    }),
                    tokio::spawn(async move {
                        if let Some(r) = b.redis() {
                            r.keep_clock_in_sync(shutdown).await;
                        }
                    }),
                ]
            }
            Kind::Embedded(_) => Vec::new(),
        }
    }

    /// With Redis, the heartbeat of an instance that serves shoppers: it takes its share of
    /// the global rate ([`redis::RedisEngine::keep_heartbeat`]) until `shutdown` turns true.
    /// Embedded: one instance, nothing to share.
    pub fn spawn_heartbeat(&self, shutdown: watch::Receiver<bool>) -> Option<tokio::task::JoinHandle<()>> {
        self.redis()?;
        let engine = self.clone();
        Some(tokio::spawn(async move {
            if let Some(r) = engine.redis() {
                r.keep_heartbeat(shutdown).await;
            }
        }))
    }
}
