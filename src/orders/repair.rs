//! Rebuild a Redis shard that lost writes, from the database ([`crate::engine::seq`]).
//!
//! A shard is *behind* when its write sequence in Redis is below the highest mark whose
//! events the database holds (a restart from an older AOF or RDB file, a replica promoted
//! before it caught up). The first script call that notices fences the shard (`FENCED`,
//! answered 503 to shoppers) and wakes the gateway's repair task ([`spawn`]); so does a
//! payment or cancellation of an open order the database has and Redis does not. The
//! rebuild, under a per-shard lock in Redis:
//!
//! 1. fence the shard (every gateway's scripts refuse it from now on);
//! 2. read every order of the shard's items from the database and from Redis, and keep for
//!    each the furthest state of the two (an order only moves forward);
//! 3. write the items' counters and stock (`stock_total − reserved − paid`), the buyers'
//!    units, the open orders with their deadlines and idempotency keys, and the closed
//!    orders still within their TTL;
//! 4. raise the shard's epoch and lift the fence; tell every gateway the items changed.
//!
//! `seckill-gateway reconcile --repair` runs the same rebuild by hand ([`repair_shard`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use redis::Value;
use tokio::sync::watch;

use crate::clock::system_now_ms;
use crate::config::Config;
use crate::domain::{ItemSpec, Order, OrderStatus, OrderUnits, RefundOf};
use crate::engine::buckets::{engine_items, record};
use crate::engine::conn::RedisConn;
use crate::engine::keys;
use crate::engine::redis::{RedisEngine, item_from_hash, paused_field};
use crate::engine::seq::{Alarms, Floors, Mark};
use crate::error::Error;
use crate::ids::{bucket_id, shard_of, split_bucket};
use crate::metrics;
use crate::shutdown::stopped;
use crate::store::Store;

/// How long a rebuild may hold its shard's lock (it is released when done).
const LOCK_TTL: Duration = Duration::from_secs(120);
/// Orders a rebuild writes at once (their commands pipelined on the connection).
const IN_FLIGHT: usize = 64;

/// What a rebuild needs to write orders as the scripts do.
#[derive(Clone, Debug)]
pub struct RepairSettings {
    pub closed_order_ttl: Duration,
    pub idempotency_ttl: Duration,
}

impl RepairSettings {
    pub fn from_config(c: &Config) -> Self {
        RepairSettings {
            closed_order_ttl: c.closed_order_ttl,
            idempotency_ttl: c.idempotency_ttl,
        }
    }
}

/// What one rebuild did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Rebuilt {
    pub shard: u32,
    pub items: usize,
    /// Orders written back (open, paid, and closed ones within their TTL).
    pub orders: usize,
    /// Orders the database held that this Redis had forgotten.
    pub forgotten: usize,
    /// Units sold beyond an item's stock before the loss was found (0 unless the loss went
    /// unnoticed while another gateway sold; the item is left at stock 0).
    pub oversold: i64,
    pub epoch: u64,
}

/// A shard's sequence in Redis: its mark, and why it is fenced (if it is).
pub async fn shard_seq(conn: &mut RedisConn, shard: u32) -> Result<(Mark, Option<String>), Error> {
    let (e, s, fence): (Option<u64>, Option<u64>, Option<String>) = redis::cmd("HMGET")
        .arg(keys::seq(shard))
        .arg("e")
        .arg("s")
        .arg("fence")
        .query_async(conn)
        .await?;
    Ok((
        Mark {
            epoch: e.unwrap_or(0),
            seq: s.unwrap_or(0),
        },
        fence,
    ))
}

/// Why a shard whose sequence is `mark` (and `fence`, as [`shard_seq`] reads them) must be
/// rebuilt: fenced, or behind `floor`; `None` when it need not.
pub fn why_rebuild(mark: Mark, fence: Option<String>, floor: Mark) -> Option<String> {
    match fence {
        Some(why) => Some(why),
        None if mark < floor => Some(format!("shard at {mark}, behind {floor}")),
        None => None,
    }
}

/// Whether a shard must be rebuilt ([`why_rebuild`]), reading its sequence.
pub async fn needs_repair(conn: &mut RedisConn, shard: u32, floor: Mark) -> Result<Option<String>, Error> {
    let (mark, fence) = shard_seq(conn, shard).await?;
    Ok(why_rebuild(mark, fence, floor))
}

/// Which of two records of one order is further along ([`OrderStatus::rank`]); the
/// database wins a tie.
fn furthest(db: Order, redis: Order) -> Order {
    if redis.status.rank() > db.status.rank() {
        redis
    } else {
        db
    }
}

/// Rebuild one shard from the database (and what Redis still holds). `Ok(None)` when another
/// gateway holds the shard's lock.
pub async fn repair_shard(
    conn: &mut RedisConn,
    store: &Store,
    shard: u32,
    floor: Mark,
    settings: &RepairSettings,
) -> Result<Option<Rebuilt>, Error> {
    let lock = keys::repair_lock(shard);
    let token = uuid::Uuid::new_v4().to_string();
    let got: Option<String> = redis::cmd("SET")
        .arg(&lock)
        .arg(&token)
        .arg("NX")
        .arg("PX")
        .arg(LOCK_TTL.as_millis() as u64)
        .query_async(conn)
        .await?;
    if got.is_none() {
        return Ok(None);
    }
    let result = rebuild(conn, store, shard, floor, settings).await;
    // Released only if still ours (a rebuild slower than the TTL lost it).
    let holder: Option<String> = redis::cmd("GET").arg(&lock).query_async(conn).await?;
    if holder.as_deref() == Some(token.as_str()) {
        let _: i64 = redis::cmd("DEL").arg(&lock).query_async(conn).await?;
    }
    result.map(Some)
}

async fn rebuild(
    conn: &mut RedisConn,
    store: &Store,
    shard: u32,
    floor: Mark,
    settings: &RepairSettings,
) -> Result<Rebuilt, Error> {
    // 1. Nothing changes the shard from here on.
    let _: i64 = redis::cmd("HSET")
        .arg(keys::seq(shard))
        .arg("fence")
        .arg("being rebuilt from the database")
        .query_async(conn)
        .await?;
    let (before, _) = shard_seq(conn, shard).await?;

    // 2. The items and orders of the shard, from both sides.
    let mut specs: HashMap<String, ItemSpec> = HashMap::new();
    let catalog: Vec<String> = redis::cmd("SMEMBERS").arg(keys::CATALOG).query_async(conn).await?;
    for item_id in catalog.into_iter().filter(|i| shard_of(i) == shard) {
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(keys::item(&item_id))
            .query_async(conn)
            .await?;
        if let Ok(state) = item_from_hash(&item_id, &h) {
            specs.insert(item_id, state.spec);
        }
    }
    // The database's description wins: it outlives Redis. A bucketed item is several
    // engine items (its own hash and its buckets, on their shards), and its transfers:
    // those out of a bucket of this shard not yet credited are in transit again (their
    // donor records rebuilt, so that any gateway finishes them), and those credited to one
    // are remembered (so that no replay credits them twice).
    let mut totals: HashMap<String, i64> = HashMap::new();
    let mut transfer_records: Vec<redis::Cmd> = Vec::new();
    // Transfer steps the database holds, by transfer id: [given, credited].
    let mut persisted: HashMap<String, [bool; 2]> = HashMap::new();
    for spec in store.items().await? {
        let transfers = if spec.buckets > 1 {
            store.transfers(&spec.item_id).await?
        } else {
            Vec::new()
        };
        for t in &transfers {
            persisted.insert(t.transfer_id.clone(), [t.out_ms.is_some(), t.in_ms.is_some()]);
        }
        for (engine_spec, total) in engine_items(&spec, &transfers) {
            if shard_of(&engine_spec.item_id) != shard {
                continue;
            }
            if let Some(total) = total {
                totals.insert(engine_spec.item_id.clone(), total);
            }
            specs.insert(engine_spec.item_id.clone(), engine_spec);
        }
        for t in &transfers {
            let from = bucket_id(&spec.item_id, t.from_bucket as u32);
            let to = bucket_id(&spec.item_id, t.to_bucket as u32);
            if let (Some(out_ms), None) = (t.out_ms, t.in_ms)
                && shard_of(&from) == shard
            {
                transfer_records.push(
                    redis::cmd("HSET")
                        .arg(keys::transfers_out(&from))
                        .arg(&t.transfer_id)
                        .arg(format!("{}|{to}|{out_ms}", t.units))
                        .clone(),
                );
            }
            if let Some(in_ms) = t.in_ms
                && shard_of(&to) == shard
            {
                transfer_records.push(
                    redis::cmd("HSET")
                        .arg(keys::transfers_in(&to))
                        .arg(&t.transfer_id)
                        .arg(format!("{}|{from}|{in_ms}", t.units))
                        .clone(),
                );
            }
        }
    }
    // Transfer steps Redis still holds that the database does not have yet (their events
    // not persisted): the units left or reached the bucket all the same.
    for (id, spec) in specs.iter_mut() {
        if split_bucket(id).1 == 0 {
            continue;
        }
        // Out of the bucket (the donor's step, given; counted from the database once either
        // step is there, [`engine_items`]) and into it (the destination's, credited).
        for (out, key, sign) in [(true, keys::transfers_out(id), -1), (false, keys::transfers_in(id), 1)] {
            let records: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
            for (tid, raw) in &records {
                let counted = persisted
                    .get(tid)
                    .is_some_and(|[given, credited]| *credited || (out && *given));
                if !counted && let Some(r) = record(raw) {
                    spec.stock_total += sign * r.units;
                }
            }
        }
    }
    let mut orders: HashMap<String, Order> = HashMap::new();
    for o in super::reconcile::shard_orders(conn, shard).await? {
        orders.insert(o.order_id.clone(), o);
    }
    let in_redis: std::collections::HashSet<String> = orders.keys().cloned().collect();
    let mut forgotten = 0;
    let mut items: Vec<&String> = specs.keys().collect();
    items.sort();
    for item_id in &items {
        for row in store.orders_in(item_id).await? {
            match orders.remove(&row.order_id) {
                Some(cached) => {
                    orders.insert(row.order_id.clone(), furthest(row, cached));
                }
                None => {
                    if row.holds_units() {
                        forgotten += 1;
                    }
                    orders.insert(row.order_id.clone(), row);
                }
            }
        }
    }

    // 3. Counters from the orders; then every write.
    let mut units: HashMap<&str, OrderUnits> = HashMap::new();
    for o in orders.values() {
        units.entry(o.item_id.as_str()).or_default().add(o);
    }
    // First the resets, in order (the deadline set and buyers are rebuilt whole); then each
    // order's writes, in order per order, orders concurrently (their buyer increments and
    // deadlines commute).
    let mut resets: Vec<redis::Cmd> = vec![redis::cmd("DEL").arg(keys::deadlines(shard)).clone()];
    let mut per_order: Vec<Vec<redis::Cmd>> = Vec::new();
    let mut oversold = 0;
    for item_id in &items {
        let spec = &specs[item_id.as_str()];
        let u = units.remove(item_id.as_str()).unwrap_or_default();
        let stock = spec.stock_total - u.reserved - u.paid;
        if stock < 0 {
            oversold += -stock;
            tracing::error!(shard, item = %item_id, oversold = -stock, "item oversold before the Redis loss was found");
        }
        resets.push(redis::cmd("DEL").arg(keys::buyers(item_id)).clone());
        // The pause switch as the database records it (a bucket's is its item's).
        resets.push(paused_field(keys::item(item_id), spec.paused));
        resets.push(
            redis::cmd("HSET")
                .arg(keys::item(item_id))
                .arg("name")
                .arg(&spec.name)
                .arg("price_cents")
                .arg(spec.price_cents)
                .arg("stock_total")
                .arg(spec.stock_total)
                .arg("stock")
                .arg(stock.max(0))
                .arg("per_user_limit")
                .arg(spec.per_user_limit)
                .arg("starts_ms")
                .arg(spec.starts_ms)
                .arg("ends_ms")
                .arg(spec.ends_ms)
                .arg("reserved")
                .arg(u.reserved)
                .arg("paid")
                .arg(u.paid)
                .arg("cancelled")
                .arg(u.cancelled)
                .arg("expired")
                .arg(u.expired)
                .arg("refunded")
                .arg(u.refunded)
                .arg("buckets")
                .arg(spec.buckets)
                .clone(),
        );
        if let Some(total) = totals.get(item_id.as_str()) {
            resets.push(
                redis::cmd("HSET")
                    .arg(keys::item(item_id))
                    .arg("item_total")
                    .arg(total)
                    .clone(),
            );
        }
        // Buckets are not in the catalogue: their item is.
        if split_bucket(item_id).1 == 0 {
            resets.push(redis::cmd("SADD").arg(keys::CATALOG).arg(item_id.as_str()).clone());
        }
    }
    let now = system_now_ms();
    let closed_ttl_ms = settings.closed_order_ttl.as_millis() as i64;
    let mut written = 0;
    for o in orders.values() {
        if !specs.contains_key(&o.item_id) {
            // An order of an item neither side describes: nothing to rebuild it into.
            tracing::error!(shard, order = %o.order_id, item = %o.item_id, "order of an unknown item not rebuilt");
            continue;
        }
        let Some(key) = keys::order(&o.order_id) else { continue };
        let live = o.holds_units();
        // Closed orders answer repeated calls for their TTL; older ones the database answers.
        if !live && o.updated_ms + closed_ttl_ms <= now && !in_redis.contains(&o.order_id) {
            continue;
        }
        written += 1;
        let mut cmds = Vec::with_capacity(5);
        let mut h = redis::cmd("HSET");
        h.arg(&key)
            .arg("item_id")
            .arg(&o.item_id)
            .arg("user_id")
            .arg(&o.user_id)
            .arg("qty")
            .arg(o.qty)
            .arg("status")
            .arg(o.status.as_str())
            .arg("created_ms")
            .arg(o.created_ms)
            .arg("pay_before_ms")
            .arg(o.pay_before_ms)
            .arg("updated_ms")
            .arg(o.updated_ms);
        if !o.idem_key.is_empty() {
            h.arg("idem_key").arg(&o.idem_key);
        }
        if let Some(price) = o.price_cents {
            h.arg("price_cents").arg(price);
        }
        if let Some(refund) = o.refund {
            h.arg("refund_of").arg(RefundOf::as_text(refund));
        }
        cmds.push(h);
        match o.status {
            OrderStatus::Reserved => {
                cmds.push(redis::cmd("PERSIST").arg(&key).clone());
                cmds.push(
                    redis::cmd("ZADD")
                        .arg(keys::deadlines(shard))
                        .arg(o.pay_before_ms)
                        .arg(keys::deadline_member(&o.order_id, &o.item_id))
                        .clone(),
                );
            }
            _ => {
                let left_ms = (o.updated_ms + closed_ttl_ms - now).max(1000);
                cmds.push(redis::cmd("PEXPIRE").arg(&key).arg(left_ms).clone());
            }
        }
        if live {
            cmds.push(
                redis::cmd("HINCRBY")
                    .arg(keys::buyers(&o.item_id))
                    .arg(&o.user_id)
                    .arg(o.qty)
                    .clone(),
            );
            if !o.idem_key.is_empty() {
                cmds.push(
                    redis::cmd("SET")
                        .arg(keys::idem(&o.item_id, &o.user_id, &o.idem_key))
                        .arg(&o.order_id)
                        .arg("EX")
                        .arg(settings.idempotency_ttl.as_secs().max(1))
                        .clone(),
                );
            }
        }
        per_order.push(cmds);
    }
    resets.extend(transfer_records);
    for c in resets {
        let _: Value = c.query_async(conn).await?;
    }
    let results: Vec<Result<(), redis::RedisError>> = futures_util::stream::iter(per_order)
        .map(|cmds| {
            let mut conn = conn.clone();
            async move {
                for c in cmds {
                    let _: Value = c.query_async(&mut conn).await?;
                }
                Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    for r in results {
        r?;
    }

    // 4. Every sale's pause switch as the database records it; a new epoch, above anything
    // any gateway has seen, and selling resumes.
    let paused_all = store.all_paused().await?;
    let _: i64 = paused_field(keys::seq(shard), paused_all).query_async(conn).await?;
    let epoch = before.epoch.max(floor.epoch) + 1;
    let _: i64 = redis::cmd("HSET")
        .arg(keys::seq(shard))
        .arg("e")
        .arg(epoch)
        .arg("s")
        .arg(0)
        .query_async(conn)
        .await?;
    let _: i64 = redis::cmd("HDEL")
        .arg(keys::seq(shard))
        .arg("fence")
        .query_async(conn)
        .await?;
    for item_id in &items {
        let _: Result<i64, _> = redis::cmd("PUBLISH")
            .arg(keys::BUS)
            .arg(format!("{}{item_id}", keys::ITEM_CHANGED))
            .query_async(conn)
            .await;
    }
    Ok(Rebuilt {
        shard,
        items: items.len(),
        orders: written,
        forgotten,
        oversold,
        epoch,
    })
}

/// The repair task of a gateway in Redis mode: every second it raises the floors to the
/// database's marks; a shard found fenced (a script answered `FENCED`) or holding less than
/// the database (an open order the database has and Redis does not) wakes it, and it
/// rebuilds the shard if it is fenced or behind. Runs until shutdown.
///
/// It never polls Redis by itself: a shard nobody calls sells nothing and loses nothing, and
/// the first call that touches it (a reservation, a payment, the sweeper's expiry) finds out.
pub fn spawn(
    engine: &RedisEngine,
    store: Arc<Store>,
    settings: RepairSettings,
    shutdown: watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    let task = Task {
        conn: engine.connection(),
        timeout: engine.target().timeout,
        store,
        floors: engine.floors().clone(),
        alarms: engine.alarms().clone(),
        settings,
    };
    tokio::spawn(task.run(shutdown))
}

struct Task {
    conn: RedisConn,
    timeout: Duration,
    store: Arc<Store>,
    floors: Arc<Floors>,
    alarms: Arc<Alarms>,
    settings: RepairSettings,
}

impl Task {
    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Shards to look at again (a rebuild failed, or another gateway was at it), and when.
        let mut retry_at: HashMap<u32, std::time::Instant> = HashMap::new();
        loop {
            let woken: Vec<u32> = tokio::select! {
                _ = tick.tick() => Vec::new(),
                shards = self.alarms.next() => shards,
                _ = stopped(&mut shutdown) => return,
            };
            self.learn_marks().await;
            let now = std::time::Instant::now();
            let due: Vec<u32> = retry_at.iter().filter(|(_, t)| **t <= now).map(|(s, _)| *s).collect();
            let mut conn = self.conn.clone();
            for shard in keys::all_shards().filter(|s| woken.contains(s) || due.contains(s)) {
                let floor = self.floors.get(shard);
                let why = match tokio::time::timeout(self.timeout, needs_repair(&mut conn, shard, floor)).await {
                    Ok(Ok(Some(why))) => why,
                    Ok(Ok(None)) => {
                        retry_at.remove(&shard);
                        metrics::gauge!(metrics::REDIS_FENCED, "shard" => shard.to_string()).set(0.0);
                        continue;
                    }
                    // Redis unreachable: the guards answer 503 meanwhile; look again later.
                    _ => {
                        retry_at.insert(shard, now + Duration::from_secs(1));
                        continue;
                    }
                };
                metrics::gauge!(metrics::REDIS_FENCED, "shard" => shard.to_string()).set(1.0);
                tracing::warn!(shard, why = %why, "Redis shard behind the database: rebuilding it from the database");
                let repaired = tokio::time::timeout(
                    LOCK_TTL,
                    repair_shard(&mut conn, &self.store, shard, floor, &self.settings),
                )
                .await
                .unwrap_or_else(|_| Err(Error::Internal("the rebuild took longer than its lock".into())));
                match repaired {
                    Ok(Some(r)) => {
                        retry_at.remove(&shard);
                        metrics::counter!(metrics::REDIS_REPAIRS).increment(1);
                        metrics::gauge!(metrics::REDIS_FENCED, "shard" => shard.to_string()).set(0.0);
                        tracing::warn!(
                            shard,
                            items = r.items,
                            orders = r.orders,
                            forgotten = r.forgotten,
                            oversold = r.oversold,
                            epoch = r.epoch,
                            "Redis shard rebuilt from the database; selling resumes"
                        );
                    }
                    // Another gateway is rebuilding it: look again in a second.
                    Ok(None) => {
                        retry_at.insert(shard, now + Duration::from_secs(1));
                    }
                    Err(e) => {
                        retry_at.insert(shard, now + Duration::from_secs(5));
                        tracing::error!(
                            shard,
                            cause = %e,
                            "rebuilding a Redis shard failed; it stays fenced (503) and is tried again in 5 s, \
                             or run `seckill-gateway reconcile --repair`"
                        );
                    }
                }
            }
        }
    }

    /// Raise the floors to the database's marks (what every gateway's workers recorded).
    async fn learn_marks(&self) {
        match self.store.marks().await {
            Ok(marks) => {
                for (shard, mark) in marks {
                    self.floors.raise(shard, mark);
                }
            }
            Err(e) => tracing::debug!(cause = %e, "write marks not read from the database"),
        }
    }
}
