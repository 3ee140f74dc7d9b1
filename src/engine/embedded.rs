//! The embedded stock engine: the Lua scripts' semantics in one in-process critical section
//! (invariant 5), for a gateway with no Redis. Same checks in the same order, same replies.
//!
//! Durability: every change produces [`OrderEvent`]s that go to the [`Journal`] (SQLite,
//! group-committed) *before* the caller is answered. If the journal fails, the change is
//! undone and the caller gets an error (503), so an answer of 200 always means committed.
//! A commit in doubt (sent, its answer lost: the database may hold it) is not undone: the
//! caller gets the error, the change stays, and the journal writes it again until the
//! database answers; undoing it would sell its units a second time. At start-up the engine is rebuilt from the store ([`EmbeddedEngine::restore`]).

mod sharded_map;

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use futures_util::future::BoxFuture;
use sharded_map::ShardedMap;

use super::{
    Deaf, EngineSettings, ExpireReply, Expired, ItemNews, ItemSpec, ItemState, Listener, Order, OrderStatus, PutReply,
    ReserveCmd, ReserveReply, Settle, StockEngine, Transition, TransitionReply,
};
use crate::clock::{Clock, Millis};
use crate::domain::{OrderEvent, OrderUnits, RefundOf};
use crate::error::Error;

/// Where the embedded engine makes its changes durable.
pub trait Journal: Send + Sync {
    /// Enqueue these events at once (the engine calls it under its lock, so the journal
    /// commits changes in the order they were made); the future resolves once they are
    /// durable.
    fn append(&self, events: Vec<OrderEvent>) -> BoxFuture<'static, Result<(), Error>>;
    /// Store an item definition durably.
    fn put_item(&self, spec: ItemSpec) -> BoxFuture<'static, Result<(), Error>>;
    /// Store an item's pause switch (`Some`), or every sale's (`None`), durably.
    fn set_paused(&self, item_id: Option<String>, paused: bool) -> BoxFuture<'static, Result<(), Error>>;
    /// Resolves once everything appended before it is durable or refused (refused
    /// changes are undone by their callers): after the write again of a commit in doubt.
    /// `Ok` unless the journal stopped.
    fn barrier(&self) -> BoxFuture<'static, Result<(), Error>> {
        self.append(Vec::new())
    }
}

/// Everything the engine decides on, behind its one lock. The maps that grow with every
/// reservation (buyers, orders, idempotency keys) are [`ShardedMap`]s, so that growing never
/// moves all their entries at once while every request waits for the lock; the B-tree sets
/// grow a node at a time anyway.
#[derive(Default)]
struct State {
    /// A plain map: it grows with the catalogue (admin puts), not with the traffic. Read
    /// on every reservation, so with foldhash rather than the default SipHash.
    items: HashMap<String, ItemState, foldhash::quality::RandomState>,
    /// (item, user) → units held (reserved + paid).
    buyers: ShardedMap<(String, String), i64>,
    orders: ShardedMap<String, Order>,
    /// (item, user, key) → (order id, expires at).
    idem: ShardedMap<(String, String, String), (String, Millis)>,
    /// (pay_before_ms, order_id) of reserved orders.
    deadlines: BTreeSet<(Millis, String)>,
    /// (closed at, order_id): pruning pops from the front, so its cost is the number of
    /// orders dropped, never the number held (a scan of every order under the lock stalled
    /// all requests for tens of milliseconds at a few hundred thousand orders).
    closed: BTreeSet<(Millis, String)>,
    /// (expires at, key) of idempotency keys, for the same reason.
    idem_expiry: BTreeSet<(Millis, (String, String, String))>,
    /// Every sale paused by the operator (each item's own switch is in its spec).
    all_paused: bool,
}

pub struct EmbeddedEngine {
    /// A std Mutex: never held across an await (the journal is awaited after unlocking).
    state: Mutex<State>,
    clock: Clock,
    journal: Option<Box<dyn Journal>>,
    payment_timeout_ms: Millis,
    idem_ttl_ms: Millis,
    /// How long a closed order stays in memory (the store answers lookups after that), as
    /// the Redis engine's order hashes live `closed_order_ttl` once final: memory stays
    /// bounded during a long sale.
    closed_ttl_ms: Millis,
    listener: Arc<dyn Listener>,
    /// Orders with a change not yet durable.
    settling: Settling,
}

/// Orders with a change whose commit has not answered, or answered in doubt and has not
/// been written again yet: how many such changes each has. What memory says of them is
/// not repeated (an idempotent reserve's order, a pay or cancel "already done"): that
/// would be a 200 for a change a crash could still lose. Such an answer waits for the
/// commit and is decided again ([`Error::Settling`]); 503 if it does not come within
/// [`SETTLE_WAIT`].
///
/// Its own lock, taken after the engine's where both are, so that the in-doubt case can
/// settle from a task of its own.
#[derive(Clone)]
struct Settling(Arc<SettlingOrders>);

struct SettlingOrders {
    /// order id → (changes not yet durable, whether an answer waits for them).
    orders: Mutex<HashMap<String, (u32, bool), foldhash::quality::RandomState>>,
    /// Bumped when an order waited for is settled.
    settled: tokio::sync::watch::Sender<u64>,
}

/// How long an answer about an order waits for its last change's commit before it is 503:
/// about a store timeout's worth, and the `Retry-After` of that 503.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

impl Default for Settling {
    fn default() -> Self {
        Settling(Arc::new(SettlingOrders {
            orders: Mutex::default(),
            settled: tokio::sync::watch::Sender::new(0),
        }))
    }
}

impl Settling {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u32, bool), foldhash::quality::RandomState>> {
        self.0.orders.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change of `order_id` was enqueued (call it under the engine's lock).
    fn add(&self, order_id: &str) {
        self.map().entry(order_id.to_owned()).or_default().0 += 1;
    }

    /// One of its changes is durable, or undone.
    fn settle(&self, order_id: &str) {
        let mut map = self.map();
        if let Some((n, waited)) = map.get_mut(order_id) {
            *n -= 1;
            if *n == 0 {
                let waited = *waited;
                map.remove(order_id);
                if waited {
                    self.0.settled.send_modify(|n| *n += 1);
                }
            }
        }
    }

    /// `reply`, unless `order_id` has a change not yet durable: then
    /// [`Error::Settling`], for the caller to [`Self::wait`] and decide again (call it
    /// under the engine's lock, with what was read there).
    fn durable<T>(&self, order_id: &str, reply: T) -> Result<T, Error> {
        if self.map().contains_key(order_id) {
            return Err(Error::Settling(order_id.to_owned()));
        }
        Ok(reply)
    }

    /// `attempt`'s answer, attempted again after each [`Error::Settling`] once that order
    /// is settled; 503 if it is not within [`SETTLE_WAIT`].
    async fn answer<T, F>(&self, mut attempt: impl FnMut() -> F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        // Read the clock only when there is something to wait for (not per reservation).
        let mut until = None;
        loop {
            match attempt().await {
                Err(Error::Settling(id)) => {
                    let until = *until.get_or_insert_with(|| tokio::time::Instant::now() + SETTLE_WAIT);
                    self.wait(&id, until).await?;
                }
                answered => return answered,
            }
        }
    }

    /// Until `order_id` has no change that is not durable; 503 past `until`.
    async fn wait(&self, order_id: &str, until: tokio::time::Instant) -> Result<(), Error> {
        let mut settled = self.0.settled.subscribe();
        loop {
            match self.map().get_mut(order_id) {
                None => return Ok(()),
                Some((_, waited)) => *waited = true,
            }
            if tokio::time::timeout_at(until, settled.changed()).await.is_err() {
                return Err(Error::Store(
                    "this order's last change is still being written; retry".into(),
                ));
            }
        }
    }
}

impl EmbeddedEngine {
    /// `journal`: where changes are made durable before they are answered (`None`: tests of
    /// pure semantics).
    pub fn new(settings: EngineSettings, clock: Clock, journal: Option<Box<dyn Journal>>) -> Self {
        EmbeddedEngine {
            state: Mutex::new(State::default()),
            clock,
            journal,
            payment_timeout_ms: settings.payment_timeout.as_millis() as Millis,
            idem_ttl_ms: settings.idempotency_ttl.as_millis() as Millis,
            closed_ttl_ms: settings.closed_order_ttl.as_millis() as Millis,
            listener: Arc::new(Deaf),
            settling: Settling::default(),
        }
    }

    /// Tell `listener` what happens to items.
    pub fn with_listener(mut self, listener: Arc<dyn Listener>) -> Self {
        self.listener = listener;
        self
    }

    /// Drop closed orders past their TTL and idempotency keys past theirs. Returns how many
    /// orders were dropped.
    fn forget_old(&self) -> usize {
        let now = self.clock.now_ms();
        let mut s = self.lock();
        while s.idem_expiry.first().is_some_and(|(at, _)| *at <= now) {
            let (_, key) = s.idem_expiry.pop_first().expect("checked");
            // The key may have been set again since (after it expired): keep a live one.
            if s.idem.get(&key).is_some_and(|(_, expires)| *expires <= now) {
                s.idem.remove(&key);
            }
        }
        let ttl = self.closed_ttl_ms;
        let mut dropped = 0;
        while s.closed.first().is_some_and(|(at, _)| at + ttl <= now) {
            let (_, id) = s.closed.pop_first().expect("checked");
            // A stale entry (a transition undone after a journal failure) names an order
            // that is open again: keep it.
            if s.orders.get(&id).is_some_and(|o| o.status.is_final()) {
                s.orders.remove(&id);
                dropped += 1;
            }
        }
        dropped
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Rebuild stock, quotas, open reservations, deadlines and idempotency keys from what the
    /// store holds: the item definitions and every order with its current status.
    pub fn restore(&self, items: Vec<ItemSpec>, orders: Vec<Order>) {
        let now = self.clock.now_ms();
        let mut s = self.lock();
        for spec in items {
            let id = spec.item_id.clone();
            s.items.insert(
                id,
                ItemState {
                    stock: spec.stock_total,
                    spec,
                    reserved: 0,
                    paid: 0,
                    cancelled: 0,
                    expired: 0,
                    refunded: 0,
                },
            );
        }
        let mut units: HashMap<String, OrderUnits> = HashMap::new();
        for o in &orders {
            units.entry(o.item_id.clone()).or_default().add(o);
        }
        for (item_id, u) in units {
            let Some(item) = s.items.get_mut(&item_id) else {
                continue;
            };
            item.stock -= u.reserved + u.paid;
            item.reserved = u.reserved;
            item.paid = u.paid;
            item.cancelled = u.cancelled;
            item.expired = u.expired;
            item.refunded = u.refunded;
        }
        for o in orders {
            if !s.items.contains_key(&o.item_id) {
                continue;
            }
            if o.holds_units() {
                *s.buyers.entry((o.item_id.clone(), o.user_id.clone())).or_default() += o.qty;
            }
            if o.status == OrderStatus::Reserved {
                s.deadlines.insert((o.pay_before_ms, o.order_id.clone()));
            }
            if !o.idem_key.is_empty() && o.created_ms + self.idem_ttl_ms > now {
                let key = (o.item_id.clone(), o.user_id.clone(), o.idem_key.clone());
                s.idem
                    .insert(key.clone(), (o.order_id.clone(), o.created_ms + self.idem_ttl_ms));
                s.idem_expiry.insert((o.created_ms + self.idem_ttl_ms, key));
            }
            if o.status.is_final() {
                s.closed.insert((o.updated_ms, o.order_id.clone()));
            }
            s.orders.insert(o.order_id.clone(), o);
        }
    }

    /// Every sale was paused when the engine stopped (the store says so).
    pub fn restore_all_paused(&self) {
        self.lock().all_paused = true;
    }

    /// The units a user holds of an item (for tests and the differential check).
    pub fn held(&self, item_id: &str, user_id: &str) -> i64 {
        self.lock()
            .buyers
            .get(&(item_id.to_owned(), user_id.to_owned()))
            .copied()
            .unwrap_or(0)
    }

    /// Hand `events` to the journal now — call it under the lock, right after the change
    /// of `order_id` they record — and wait for them to be durable by awaiting the answer;
    /// then call [`Self::settled`] (after an undo, if any).
    fn journal(&self, order_id: &str, events: Vec<OrderEvent>) -> BoxFuture<'static, Result<(), Error>> {
        match &self.journal {
            Some(j) => {
                self.settling.add(order_id);
                j.append(events)
            }
            None => Box::pin(std::future::ready(Ok(()))),
        }
    }

    /// `order_id`'s change enqueued by [`Self::journal`] is settled: committed, or undone
    /// (call it after the undo); in doubt, once the journal has written it again.
    fn settled(&self, order_id: &str, durable: &Result<(), Error>) {
        let Some(journal) = &self.journal else {
            return;
        };
        if let Err(Error::StoreInDoubt(_)) = durable {
            let written = journal.barrier();
            let settling = self.settling.clone();
            let order_id = order_id.to_owned();
            tokio::spawn(async move {
                // Err: the journal stopped with the process; nothing to settle.
                if written.await.is_ok() {
                    settling.settle(&order_id);
                }
            });
        } else {
            self.settling.settle(order_id);
        }
    }

    /// A reservation's decision, under the lock. A refusal (or a duplicate) is answered and
    /// reported at once; a reservation made is [`Decided::Made`]: its events are in the
    /// journal's queue, and [`Self::conclude`] must be called with the commit's result.
    pub(crate) fn decide(&self, cmd: &ReserveCmd) -> Decided {
        let decided = self.decide_locked(cmd);
        if let Decided::Now(Ok(reply)) = &decided {
            // Every reply, refusals included, as the Redis engine reports them: a sold-out
            // answer sets the local flag again after its safety-net lifetime let it go.
            self.report(&cmd.item_id, reply);
        }
        decided
    }

    /// `attempt` (a reservation: [`Self::decide`] and what follows) until it is answered
    /// without [`Error::Settling`]: a duplicate of an order not yet durable waits for it.
    pub(crate) async fn once_settled<T, F>(&self, attempt: impl FnMut() -> F) -> Result<T, Error>
    where
        F: Future<Output = Result<T, Error>>,
    {
        self.settling.answer(attempt).await
    }

    fn report(&self, item_id: &str, reply: &ReserveReply) {
        if let Some(news) = reply.news(item_id) {
            self.listener.news(news);
        }
    }

    fn decide_locked(&self, cmd: &ReserveCmd) -> Decided {
        let now = self.clock.now_ms();
        let idem_key = cmd.idem_key.clone().unwrap_or_default();
        let idem = (cmd.item_id.clone(), cmd.user_id.clone(), idem_key.clone());
        let mut s = self.lock();
        // Repeated only once durable: a crash must not lose an order a retry was told of.
        let duplicate = |s: &State, id: &str| {
            let reply = match s.orders.get(id) {
                Some(o) => ReserveReply::Duplicate {
                    order_id: o.order_id.clone(),
                    qty: o.qty,
                    status: o.status,
                    created_ms: o.created_ms,
                    pay_before_ms: o.pay_before_ms,
                },
                None => ReserveReply::Duplicate {
                    order_id: id.to_owned(),
                    qty: 0,
                    status: OrderStatus::Reserved,
                    created_ms: 0,
                    pay_before_ms: 0,
                },
            };
            self.settling.durable(id, reply)
        };
        if !idem_key.is_empty()
            && let Some((id, expires)) = s.idem.get(&idem).cloned()
        {
            if expires > now {
                return Decided::Now(duplicate(&s, &id));
            }
            s.idem.remove(&idem);
        }
        if s.orders.contains_key(&cmd.order_id) {
            return Decided::Now(duplicate(&s, &cmd.order_id));
        }
        let Some(item) = s.items.get(&cmd.item_id) else {
            return Decided::Now(Ok(ReserveReply::UnknownItem));
        };
        if s.all_paused || item.spec.paused {
            return Decided::Now(Ok(ReserveReply::Paused));
        }
        let (stock, limit, price_cents) = (item.stock, item.spec.per_user_limit, item.spec.price_cents);
        if now < item.spec.starts_ms {
            return Decided::Now(Ok(ReserveReply::NotStarted {
                starts_ms: item.spec.starts_ms,
            }));
        }
        if now >= item.spec.ends_ms {
            return Decided::Now(Ok(ReserveReply::Ended {
                ends_ms: item.spec.ends_ms,
            }));
        }
        if cmd.qty < 1 || cmd.qty > limit {
            return Decided::Now(Ok(ReserveReply::BadQty { limit }));
        }
        let buyer = (cmd.item_id.clone(), cmd.user_id.clone());
        let held = s.buyers.get(&buyer).copied().unwrap_or(0);
        if held + cmd.qty > limit {
            return Decided::Now(Ok(ReserveReply::LimitReached { held, limit }));
        }
        if stock < cmd.qty {
            return Decided::Now(Ok(ReserveReply::SoldOut { stock }));
        }
        let pay_before_ms = now + self.payment_timeout_ms;
        let item = s.items.get_mut(&cmd.item_id).expect("checked above");
        item.stock -= cmd.qty;
        item.reserved += cmd.qty;
        let stock_after = item.stock;
        *s.buyers.entry(buyer).or_default() += cmd.qty;
        let order = Order {
            order_id: cmd.order_id.clone(),
            item_id: cmd.item_id.clone(),
            user_id: cmd.user_id.clone(),
            qty: cmd.qty,
            status: OrderStatus::Reserved,
            created_ms: now,
            pay_before_ms,
            updated_ms: now,
            idem_key: idem_key.clone(),
            price_cents: Some(price_cents),
            refund: None,
        };
        s.orders.insert(order.order_id.clone(), order.clone());
        if !idem_key.is_empty() {
            s.idem
                .insert(idem.clone(), (order.order_id.clone(), now + self.idem_ttl_ms));
            s.idem_expiry.insert((now + self.idem_ttl_ms, idem.clone()));
        }
        s.deadlines.insert((pay_before_ms, order.order_id.clone()));
        let reply = ReserveReply::Reserved {
            order_id: order.order_id.clone(),
            created_ms: now,
            pay_before_ms,
            stock_after,
        };
        // Enqueued before the lock is let go: the journal commits in this order.
        let durable = self.journal(
            &order.order_id,
            vec![OrderEvent::of(&order, OrderStatus::Reserved, now)],
        );
        Decided::Made(Made { order, reply, idem }, durable)
    }

    /// A made reservation's end, once its journal commit has answered: reported when it is
    /// durable; undone when it is not, so nothing is sold that was not answered 200. A
    /// commit in doubt (the database may hold it; the journal writes it again until it
    /// answers) keeps and reports the reservation, and the shopper gets the error: the
    /// contract's "reply lost" deviation, as with a Redis call whose reply was lost.
    pub(crate) fn conclude(&self, made: Made, durable: Result<(), Error>) -> Result<ReserveReply, Error> {
        let Made { order, reply, idem } = made;
        // Refused: undone before it is settled (a retry waiting on it then decides anew).
        let refused = undoable(&durable);
        if refused.is_err() {
            let mut s = self.lock();
            if s.orders
                .get(&order.order_id)
                .is_some_and(|o| o.status == OrderStatus::Reserved)
            {
                s.orders.remove(&order.order_id);
                if let Some(item) = s.items.get_mut(&order.item_id) {
                    item.stock += order.qty;
                    item.reserved -= order.qty;
                }
                let buyer = (order.item_id.clone(), order.user_id.clone());
                if let Some(h) = s.buyers.get_mut(&buyer) {
                    *h -= order.qty;
                    if *h <= 0 {
                        s.buyers.remove(&buyer);
                    }
                }
                s.idem.remove(&idem);
                s.deadlines.remove(&(order.pay_before_ms, order.order_id.clone()));
            }
        }
        self.settled(&order.order_id, &durable);
        refused?;
        self.report(&order.item_id, &reply);
        // In doubt: kept and reported above, answered with the error.
        durable.map(|()| reply)
    }
}

/// What [`EmbeddedEngine::decide`] did with a reservation.
// Returned once and taken apart at once: a box would be an allocation per reservation.
#[expect(clippy::large_enum_variant)]
pub(crate) enum Decided {
    /// Answered at once, reported.
    Now(Result<ReserveReply, Error>),
    /// Made under the lock, its events queued in the journal; durable once the future
    /// resolves. Give both to [`EmbeddedEngine::conclude`].
    Made(Made, BoxFuture<'static, Result<(), Error>>),
}

/// A reservation made and not yet settled.
pub(crate) struct Made {
    order: Order,
    reply: ReserveReply,
    idem: (String, String, String),
}

/// A journal commit's failure that its change must be undone for: the database did not
/// take it. One in doubt ([`Error::StoreInDoubt`]) is not: the journal writes it again
/// until the database answers, and the change stays.
fn undoable(durable: &Result<(), Error>) -> Result<(), Error> {
    match durable {
        Err(e) if !matches!(e, Error::StoreInDoubt(_)) => Err(e.clone()),
        _ => Ok(()),
    }
}

/// Pay a reserved order (`order`, as it was), under the lock: its units move from
/// `reserved` to `paid`, its deadline goes. Returns the item's stock.
fn pay(s: &mut State, order: &Order, now: Millis) -> i64 {
    if let Some(o) = s.orders.get_mut(&order.order_id) {
        o.status = OrderStatus::Paid;
        o.updated_ms = now;
    }
    s.closed.insert((now, order.order_id.clone()));
    s.deadlines.remove(&(order.pay_before_ms, order.order_id.clone()));
    let item = s.items.get_mut(&order.item_id).expect("an order's item exists");
    item.reserved -= order.qty;
    item.paid += order.qty;
    item.stock
}

/// Return a reserved order's units to the sale (cancel or expire), under the lock.
fn release(s: &mut State, order_id: &str, to: OrderStatus, now: Millis) -> Option<(Order, i64)> {
    let order = s.orders.get_mut(order_id)?;
    let prev = order.clone();
    order.status = to;
    order.updated_ms = now;
    let qty = order.qty;
    let item = s.items.get_mut(&prev.item_id)?;
    item.stock += qty;
    item.reserved -= qty;
    match to {
        OrderStatus::Cancelled => item.cancelled += qty,
        _ => item.expired += qty,
    }
    let stock_after = item.stock;
    let key = (prev.item_id.clone(), prev.user_id.clone());
    if let Some(h) = s.buyers.get_mut(&key) {
        *h -= qty;
        if *h <= 0 {
            s.buyers.remove(&key);
        }
    }
    s.deadlines.remove(&(prev.pay_before_ms, prev.order_id.clone()));
    s.closed.insert((now, prev.order_id.clone()));
    Some((prev, stock_after))
}

/// Put a closed order back to `reserved` (the journal refused the transition).
fn unrelease(s: &mut State, prev: &Order, from: OrderStatus) {
    if let Some(item) = s.items.get_mut(&prev.item_id) {
        item.stock -= prev.qty;
        item.reserved += prev.qty;
        match from {
            OrderStatus::Cancelled => item.cancelled -= prev.qty,
            _ => item.expired -= prev.qty,
        }
    }
    *s.buyers
        .entry((prev.item_id.clone(), prev.user_id.clone()))
        .or_default() += prev.qty;
    s.deadlines.insert((prev.pay_before_ms, prev.order_id.clone()));
    s.orders.insert(prev.order_id.clone(), prev.clone());
}

/// What a settle changed, to put back if the journal refuses it: the order, its item's
/// counters, its buyer's units, and whether it had a deadline.
struct Undo {
    order: Order,
    item: Option<ItemState>,
    buyer: Option<i64>,
    deadline: bool,
}

impl Undo {
    fn take(s: &State, order: &Order) -> Self {
        Undo {
            order: order.clone(),
            item: s.items.get(&order.item_id).cloned(),
            buyer: s.buyers.get(&(order.item_id.clone(), order.user_id.clone())).copied(),
            deadline: s.deadlines.contains(&(order.pay_before_ms, order.order_id.clone())),
        }
    }

    fn put_back(self, s: &mut State) {
        let o = self.order;
        if let Some(item) = self.item {
            s.items.insert(o.item_id.clone(), item);
        }
        let buyer = (o.item_id.clone(), o.user_id.clone());
        match self.buyer {
            Some(n) => s.buyers.insert(buyer, n),
            None => s.buyers.remove(&buyer),
        };
        if self.deadline {
            s.deadlines.insert((o.pay_before_ms, o.order_id.clone()));
        }
        s.orders.insert(o.order_id.clone(), o);
    }
}

/// Close `order_id` as `status` (a refund or one owed), recording where it came from.
fn close_as(s: &mut State, order_id: &str, status: OrderStatus, refund: RefundOf, now: Millis) -> Order {
    let o = s.orders.get_mut(order_id).expect("present");
    o.status = status;
    o.refund = Some(refund);
    o.updated_ms = now;
    let closed = o.clone();
    s.closed.insert((now, order_id.to_owned()));
    closed
}

impl EmbeddedEngine {
    /// Undo `refused`, a definition the journal did not write: the `previous` one back,
    /// with the item's counters and pause switch as they are now (reservations made
    /// meanwhile stay; a pause is written on its own). Left alone when a later definition
    /// replaced it; kept, and said, when it cannot be undone: a new item sold from
    /// meanwhile (its orders name it), or a previous stock below what is now held.
    fn unput(&self, refused: &ItemSpec, previous: Option<ItemState>) {
        let mut s = self.lock();
        let item_id = refused.item_id.as_str();
        let Some(item) = s.items.get_mut(item_id) else {
            return;
        };
        let current = ItemSpec {
            paused: refused.paused,
            ..item.spec.clone()
        };
        if current != *refused {
            return;
        }
        let held = item.reserved + item.paid;
        match previous {
            Some(p) if p.spec.stock_total >= held => {
                item.stock = p.spec.stock_total - held;
                item.spec = ItemSpec {
                    paused: item.spec.paused,
                    ..p.spec
                };
            }
            None if held == 0 && item.cancelled == 0 && item.expired == 0 && item.refunded == 0 => {
                s.items.remove(item_id);
            }
            _ => tracing::warn!(
                item = item_id,
                "item definition kept: sold from while the database refused it"
            ),
        }
    }

    /// [`StockEngine::transition`], once: [`Error::Settling`] to wait and decide again.
    async fn transition_once(&self, t: Transition, order_id: &str, user_id: &str) -> Result<TransitionReply, Error> {
        let now = self.clock.now_ms();
        let (prev, to, reply, durable) = {
            let mut s = self.lock();
            let Some(order) = s.orders.get(order_id).cloned() else {
                return Ok(TransitionReply::UnknownOrder);
            };
            if order.user_id != user_id {
                return Ok(TransitionReply::Forbidden);
            }
            // Answers from memory repeat a change only once it is durable.
            match (t, order.status) {
                (Transition::Pay, OrderStatus::Paid) => {
                    return self.settling.durable(
                        order_id,
                        TransitionReply::Already {
                            status: OrderStatus::Paid,
                        },
                    );
                }
                (Transition::Cancel, OrderStatus::Cancelled) => {
                    return self.settling.durable(
                        order_id,
                        TransitionReply::Already {
                            status: OrderStatus::Cancelled,
                        },
                    );
                }
                (_, status) if status != OrderStatus::Reserved => {
                    return self.settling.durable(order_id, TransitionReply::Closed { status });
                }
                _ => {}
            }
            let (prev, event, reply) = if order.pay_before_ms <= now {
                release(&mut s, order_id, OrderStatus::Expired, now);
                let ev = OrderEvent::of(&order, OrderStatus::Expired, now);
                (
                    order,
                    ev,
                    TransitionReply::Closed {
                        status: OrderStatus::Expired,
                    },
                )
            } else if t == Transition::Pay {
                let stock_after = pay(&mut s, &order, now);
                let ev = OrderEvent::of(&order, OrderStatus::Paid, now);
                (
                    order,
                    ev,
                    TransitionReply::Done {
                        status: OrderStatus::Paid,
                        stock_after,
                    },
                )
            } else {
                let (_, stock_after) = release(&mut s, order_id, OrderStatus::Cancelled, now).expect("present");
                let ev = OrderEvent::of(&order, OrderStatus::Cancelled, now);
                (
                    order,
                    ev,
                    TransitionReply::Done {
                        status: OrderStatus::Cancelled,
                        stock_after,
                    },
                )
            };
            // Enqueued before the lock is let go: the journal commits in this order.
            let to = event.status;
            let durable = self.journal(order_id, vec![event]);
            (prev, to, reply, durable)
        };
        let durable = durable.await;
        // Refused: undone before it is settled (a retry waiting on it then decides anew).
        let refused = undoable(&durable);
        if refused.is_err() {
            let mut s = self.lock();
            if s.orders.get(order_id).is_some_and(|o| o.status == to) {
                if to == OrderStatus::Paid {
                    if let Some(item) = s.items.get_mut(&prev.item_id) {
                        item.reserved += prev.qty;
                        item.paid -= prev.qty;
                    }
                    s.deadlines.insert((prev.pay_before_ms, prev.order_id.clone()));
                    s.orders.insert(prev.order_id.clone(), prev.clone());
                } else {
                    unrelease(&mut s, &prev, to);
                }
            }
        }
        self.settled(order_id, &durable);
        refused?;
        match reply {
            TransitionReply::Done { status, stock_after } => self.listener.news(ItemNews::Order {
                item: &prev.item_id,
                event: status,
                stock: Some(stock_after),
            }),
            // Found overdue: this call expired it.
            TransitionReply::Closed { status } => self.listener.news(ItemNews::Order {
                item: &prev.item_id,
                event: status,
                stock: None,
            }),
            _ => {}
        }
        // In doubt: kept and reported above, answered with the error.
        durable?;
        Ok(reply)
    }

    /// [`StockEngine::settle`], once: [`Error::Settling`] to wait and decide again.
    async fn settle_once(&self, op: Settle, order_id: &str, record: Option<&Order>) -> Result<TransitionReply, Error> {
        let now = self.clock.now_ms();
        let (undo, events, reply) = {
            let mut s = self.lock();
            if !s.orders.contains_key(order_id) {
                // Forgotten (closed longer ago than its TTL): the database's record back.
                match record {
                    Some(r) if r.status.is_final() => {
                        s.closed.insert((r.updated_ms, r.order_id.clone()));
                        s.orders.insert(r.order_id.clone(), r.clone());
                    }
                    _ => return Ok(TransitionReply::UnknownOrder),
                }
            }
            let order = s.orders.get(order_id).cloned().expect("present");
            let undo = Undo::take(&s, &order);
            let mut events = Vec::new();
            let reply = match (op, order.status) {
                (Settle::Payment, OrderStatus::Reserved) if order.pay_before_ms > now => {
                    let stock_after = pay(&mut s, &order, now);
                    events.push(OrderEvent::of(&order, OrderStatus::Paid, now));
                    TransitionReply::Done {
                        status: OrderStatus::Paid,
                        stock_after,
                    }
                }
                // Paid for after it closed: the money is owed back; its units came back
                // when it closed (an overdue one is expired here first, as expire.lua).
                (Settle::Payment, OrderStatus::Reserved | OrderStatus::Cancelled | OrderStatus::Expired) => {
                    let from = if order.status == OrderStatus::Reserved {
                        let (prev, _) = release(&mut s, order_id, OrderStatus::Expired, now).expect("present");
                        events.push(OrderEvent::of(&prev, OrderStatus::Expired, now));
                        OrderStatus::Expired
                    } else {
                        order.status
                    };
                    let refund = RefundOf {
                        status: from,
                        restocked: true,
                    };
                    let due = close_as(&mut s, order_id, OrderStatus::RefundDue, refund, now);
                    events.push(OrderEvent::of(&due, OrderStatus::RefundDue, now));
                    TransitionReply::Done {
                        status: OrderStatus::RefundDue,
                        stock_after: s.items.get(&order.item_id).map_or(0, |i| i.stock),
                    }
                }
                (Settle::Payment, status) => TransitionReply::Already { status },
                (Settle::Refund { .. }, OrderStatus::Refunded) => TransitionReply::Already {
                    status: OrderStatus::Refunded,
                },
                (Settle::Refund { restock }, OrderStatus::Paid | OrderStatus::RefundDue) => {
                    let refund = match order.refund {
                        // A late payment's units came back when the order closed.
                        Some(r) if order.status == OrderStatus::RefundDue => r,
                        _ => RefundOf {
                            status: OrderStatus::Paid,
                            restocked: restock,
                        },
                    };
                    let item = s.items.get_mut(&order.item_id).expect("an order's item exists");
                    item.refunded += order.qty;
                    if order.status == OrderStatus::Paid && restock {
                        item.stock += order.qty;
                        item.paid -= order.qty;
                        let key = (order.item_id.clone(), order.user_id.clone());
                        if let Some(h) = s.buyers.get_mut(&key) {
                            *h -= order.qty;
                            if *h <= 0 {
                                s.buyers.remove(&key);
                            }
                        }
                    }
                    let refunded = close_as(&mut s, order_id, OrderStatus::Refunded, refund, now);
                    events.push(OrderEvent::of(&refunded, OrderStatus::Refunded, now));
                    TransitionReply::Done {
                        status: OrderStatus::Refunded,
                        stock_after: s.items.get(&order.item_id).map_or(0, |i| i.stock),
                    }
                }
                (Settle::Refund { .. }, status) => TransitionReply::Closed { status },
            };
            if events.is_empty() {
                // Answered from memory (already so, or closed): once durable.
                return self.settling.durable(order_id, reply);
            }
            // Enqueued before the lock is let go: the journal commits in this order.
            let durable = self.journal(order_id, events.clone());
            (undo, (events, durable), reply)
        };
        let (events, durable) = events;
        let durable = durable.await;
        // Refused: undone before it is settled (a retry waiting on it then decides anew).
        let refused = undoable(&durable);
        if refused.is_err() {
            let mut s = self.lock();
            let last = events.last().map(|ev| ev.status);
            if s.orders.get(order_id).map(|o| o.status) == last {
                undo.put_back(&mut s);
            }
        }
        self.settled(order_id, &durable);
        refused?;
        for ev in &events {
            let stock = match (&reply, ev.status) {
                (TransitionReply::Done { status, stock_after }, s) if *status == s => Some(*stock_after),
                _ => None,
            };
            self.listener.news(ItemNews::Order {
                item: &ev.item_id,
                event: ev.status,
                stock,
            });
        }
        // In doubt: kept and reported above, answered with the error.
        durable?;
        Ok(reply)
    }
}

impl StockEngine for EmbeddedEngine {
    async fn put_item(&self, spec: &ItemSpec) -> Result<PutReply, Error> {
        let mut spec = spec.clone();
        let previous = {
            let mut s = self.lock();
            let prev = s.items.get(&spec.item_id).cloned();
            // A replacement keeps the pause switch (as put_item.lua leaves the field).
            spec.paused = prev.as_ref().is_some_and(|p| p.spec.paused);
            // The Redis engine's rule (its stock lies in its buckets there): the buckets of
            // an existing item never change, and one of several buckets only takes its own
            // definition again.
            if let Some(p) = &prev
                && (p.spec.buckets != spec.buckets || (spec.buckets > 1 && p.spec != spec))
            {
                return Ok(PutReply::BucketsFixed {
                    buckets: p.spec.buckets,
                });
            }
            let (reserved, paid, cancelled, expired, refunded) = prev.as_ref().map_or((0, 0, 0, 0, 0), |p| {
                (p.reserved, p.paid, p.cancelled, p.expired, p.refunded)
            });
            if spec.stock_total < reserved + paid {
                return Ok(PutReply::BelowHeld { held: reserved + paid });
            }
            let state = ItemState {
                spec: spec.clone(),
                stock: spec.stock_total - reserved - paid,
                reserved,
                paid,
                cancelled,
                expired,
                refunded,
            };
            s.items.insert(spec.item_id.clone(), state);
            prev
        };
        let durable = match &self.journal {
            Some(j) => j.put_item(spec.clone()).await,
            None => Ok(()),
        };
        if let Err(refused) = undoable(&durable) {
            self.unput(&spec, previous);
            return Err(refused);
        }
        // In doubt, the definition stays (the journal writes it again): 503 all the same.
        let stock = self.lock().items.get(&spec.item_id).map_or(0, |i| i.stock);
        self.listener.news(ItemNews::Put {
            item: &spec.item_id,
            stock,
            total: spec.stock_total,
        });
        durable.map(|()| PutReply::Stored { stock })
    }

    async fn item(&self, item_id: &str) -> Result<Option<ItemState>, Error> {
        Ok(self.lock().items.get(item_id).cloned())
    }

    async fn pause(&self, item_id: Option<&str>, paused: bool) -> Result<bool, Error> {
        let (before, durable) = {
            let mut s = self.lock();
            let before = match item_id {
                Some(id) => match s.items.get_mut(id) {
                    Some(item) => std::mem::replace(&mut item.spec.paused, paused),
                    None => return Ok(false),
                },
                None => std::mem::replace(&mut s.all_paused, paused),
            };
            let durable = self
                .journal
                .as_ref()
                .map(|j| j.set_paused(item_id.map(str::to_owned), paused));
            (before, durable)
        };
        let durable = match durable {
            Some(durable) => durable.await,
            None => Ok(()),
        };
        if let Err(refused) = undoable(&durable) {
            let mut s = self.lock();
            match item_id {
                Some(id) => {
                    if let Some(item) = s.items.get_mut(id) {
                        item.spec.paused = before;
                    }
                }
                None => s.all_paused = before,
            }
            return Err(refused);
        }
        // In doubt, the switch stays (the journal writes it again): 503 all the same.
        self.listener.news(match item_id {
            Some(item) => ItemNews::Remote { item },
            None => ItemNews::AllPaused(paused),
        });
        durable.map(|()| true)
    }

    /// [`Self::decide`], then the commit awaited and [`Self::conclude`]d. Not safe to drop
    /// half-way (a reservation made would be neither reported nor, on a failed commit,
    /// undone): the server calls it through [`super::Engine::reserve`], which is.
    async fn reserve(&self, cmd: &ReserveCmd) -> Result<ReserveReply, Error> {
        self.settling
            .answer(|| async {
                match self.decide(cmd) {
                    Decided::Now(reply) => reply,
                    Decided::Made(made, durable) => {
                        let durable = durable.await;
                        self.conclude(made, durable)
                    }
                }
            })
            .await
    }

    async fn transition(&self, t: Transition, order_id: &str, user_id: &str) -> Result<TransitionReply, Error> {
        self.settling
            .answer(|| self.transition_once(t, order_id, user_id))
            .await
    }

    async fn settle(&self, op: Settle, order_id: &str, record: Option<&Order>) -> Result<TransitionReply, Error> {
        self.settling.answer(|| self.settle_once(op, order_id, record)).await
    }

    async fn expire(&self, order_id: &str, _item_id: &str) -> Result<ExpireReply, Error> {
        let now = self.clock.now_ms();
        let (prev, stock_after, durable) = {
            let mut s = self.lock();
            let Some(order) = s.orders.get(order_id) else {
                return Ok(ExpireReply::UnknownOrder);
            };
            if order.status != OrderStatus::Reserved {
                return Ok(ExpireReply::NotReserved { status: order.status });
            }
            if order.pay_before_ms > now {
                return Ok(ExpireReply::NotDue {
                    pay_before_ms: order.pay_before_ms,
                });
            }
            let (prev, stock_after) = release(&mut s, order_id, OrderStatus::Expired, now).expect("present");
            // Enqueued before the lock is let go: the journal commits in this order.
            let durable = self.journal(order_id, vec![OrderEvent::of(&prev, OrderStatus::Expired, now)]);
            (prev, stock_after, durable)
        };
        let durable = durable.await;
        // Refused: undone before it is settled (a retry waiting on it then decides anew).
        let refused = undoable(&durable);
        if refused.is_err() {
            let mut s = self.lock();
            if s.orders.get(order_id).is_some_and(|o| o.status == OrderStatus::Expired) {
                unrelease(&mut s, &prev, OrderStatus::Expired);
            }
        }
        self.settled(order_id, &durable);
        refused?;
        self.listener.news(ItemNews::Order {
            item: &prev.item_id,
            event: OrderStatus::Expired,
            stock: Some(stock_after),
        });
        // In doubt: kept and reported above, answered with the error.
        durable?;
        Ok(ExpireReply::Expired { stock_after })
    }

    async fn expire_due(&self, max: usize) -> Result<Vec<Expired>, Error> {
        let now = self.clock.now_ms();
        // At most `max` per shard, as the Redis engine reads each shard's deadline set.
        let due: Vec<(String, String)> = {
            let s = self.lock();
            let mut per_shard: HashMap<u32, usize> = HashMap::new();
            s.deadlines
                .iter()
                .take_while(|(at, _)| *at <= now)
                .filter_map(|(_, id)| s.orders.get(id).map(|o| (id.clone(), o.item_id.clone())))
                .filter(|(_, item)| {
                    let n = per_shard.entry(crate::ids::shard_of(item)).or_default();
                    *n += 1;
                    *n <= max
                })
                .collect()
        };
        let mut expired = Vec::new();
        for (order_id, item_id) in due {
            if let ExpireReply::Expired { stock_after } = self.expire(&order_id, &item_id).await? {
                expired.push(Expired {
                    order_id,
                    item_id,
                    stock_after,
                });
            }
        }
        Ok(expired)
    }

    async fn order(&self, order_id: &str) -> Result<Option<Order>, Error> {
        // A read shows an order's change once it is durable, as the change's own answer
        // does: a crash before the commit would take back what it showed.
        self.settling
            .answer(|| {
                // Under the lock, as the undo of a refused commit runs before it settles.
                let s = self.lock();
                let order = s.orders.get(order_id).cloned();
                std::future::ready(self.settling.durable(order_id, order))
            })
            .await
    }

    async fn catalog(&self) -> Result<Vec<String>, Error> {
        Ok(self.lock().items.keys().cloned().collect())
    }

    async fn ping(&self) -> Result<(), Error> {
        Ok(())
    }

    async fn prune(&self) -> Result<usize, Error> {
        Ok(self.forget_old())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A journal that takes events at once and holds every item definition after the
    /// first until `gate` is notified, then refuses it.
    struct RefusingItems {
        puts: std::sync::atomic::AtomicU32,
        gate: Arc<tokio::sync::Notify>,
    }

    impl Journal for RefusingItems {
        fn append(&self, _events: Vec<OrderEvent>) -> BoxFuture<'static, Result<(), Error>> {
            Box::pin(async { Ok(()) })
        }
        fn put_item(&self, _spec: ItemSpec) -> BoxFuture<'static, Result<(), Error>> {
            let first = self.puts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
            let gate = self.gate.clone();
            Box::pin(async move {
                if first {
                    return Ok(());
                }
                gate.notified().await;
                Err(Error::Store("refused".into()))
            })
        }
        fn set_paused(&self, _item_id: Option<String>, _paused: bool) -> BoxFuture<'static, Result<(), Error>> {
            Box::pin(async { Ok(()) })
        }
    }

    /// A minute to pay; idempotency keys kept 10 s, closed orders 30 s.
    fn settings() -> EngineSettings {
        EngineSettings {
            payment_timeout: Duration::from_secs(60),
            idempotency_ttl: Duration::from_secs(10),
            closed_order_ttl: Duration::from_secs(30),
        }
    }

    /// Item `i`, on sale from the epoch for ever, `per_user_limit` units a shopper.
    fn item_spec(stock_total: i64, per_user_limit: i64) -> ItemSpec {
        ItemSpec {
            item_id: "i".into(),
            name: "n".into(),
            price_cents: 1,
            stock_total,
            per_user_limit,
            starts_ms: 0,
            ends_ms: i64::MAX / 2,
            buckets: 1,
            paused: false,
        }
    }

    /// One unit of item `i` for `user_id`, as order `order_id`.
    fn reserve_one(user_id: &str, order_id: &str, idem_key: Option<String>) -> ReserveCmd {
        ReserveCmd {
            item_id: "i".into(),
            user_id: user_id.into(),
            qty: 1,
            order_id: order_id.into(),
            idem_key,
            buckets: 1,
        }
    }

    /// A replacement the journal refuses puts the previous definition back, but not the
    /// previous counters: what was reserved while it was being written stays reserved (it
    /// was answered 200), and the stock is the previous total less what is held. Were the
    /// old counters put back, those units would be sold again. When the previous total is
    /// below what is now held, the new definition stays. A pause made meanwhile (written on
    /// its own) stays too.
    #[tokio::test]
    async fn a_refused_replacement_keeps_what_was_sold_meanwhile() {
        for (sold_meanwhile, stock_total, stock) in [(2, 5, 3), (7, 9, 2)] {
            let gate = Arc::new(tokio::sync::Notify::new());
            let journal = RefusingItems {
                puts: Default::default(),
                gate: gate.clone(),
            };
            let e = EmbeddedEngine::new(settings(), Clock::manual(1_000_000), Some(Box::new(journal)));
            e.put_item(&item_spec(5, 1)).await.unwrap();
            let nine = item_spec(9, 1);
            let replace = e.put_item(&nine);
            let sell = async {
                for n in 0..sold_meanwhile {
                    let cmd = reserve_one(&format!("u{n}"), &format!("o{n}"), None);
                    assert!(matches!(e.reserve(&cmd).await.unwrap(), ReserveReply::Reserved { .. }));
                }
                assert!(
                    e.pause(Some("i"), true).await.unwrap(),
                    "paused meanwhile (and written)"
                );
                gate.notify_one();
            };
            let (replaced, ()) = tokio::join!(replace, sell);
            assert!(replaced.is_err(), "the replacement is refused");
            let item = e.item("i").await.unwrap().unwrap();
            assert_eq!(item.reserved, sold_meanwhile, "sold meanwhile: {sold_meanwhile}");
            assert_eq!(
                (item.spec.stock_total, item.stock),
                (stock_total, stock),
                "sold meanwhile: {sold_meanwhile}"
            );
            assert!(item.spec.paused, "the pause written meanwhile stays");
        }
    }

    #[tokio::test]
    async fn closed_orders_and_old_keys_are_pruned() {
        let clock = Clock::manual(1_000_000);
        let e = EmbeddedEngine::new(settings(), clock.clone(), None);
        e.put_item(&item_spec(10, 5)).await.unwrap();
        let mut ids = Vec::new();
        for n in 0..3 {
            let cmd = reserve_one("u", &format!("o{n}"), Some(format!("k{n}")));
            e.reserve(&cmd).await.unwrap();
            ids.push(cmd.order_id);
        }
        e.transition(Transition::Pay, &ids[0], "u").await.unwrap();
        e.transition(Transition::Cancel, &ids[1], "u").await.unwrap();
        clock.advance(29_000);
        assert_eq!(e.prune().await.unwrap(), 0, "closed less than the TTL ago");
        clock.advance(2_000);
        assert_eq!(
            e.prune().await.unwrap(),
            2,
            "paid and cancelled orders dropped, the reserved one kept"
        );
        assert!(e.order(&ids[2]).await.unwrap().is_some());
        assert!(e.lock().idem.is_empty(), "keys older than 10 s dropped");
        // Counters and quotas are untouched by pruning.
        let item = e.item("i").await.unwrap().unwrap();
        assert_eq!((item.stock, item.reserved, item.paid, item.cancelled), (8, 1, 1, 1));
        assert_eq!(e.held("i", "u"), 2);
    }
}
