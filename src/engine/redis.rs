//! The Redis stock engine, on one Redis server or a Redis Cluster ([`super::conn`]): one
//! shared multiplexed connection carries every script and plain command; concurrent
//! requests are pipelined on it automatically, which measured 1.5–2× a pool here
//! (redis-rs #1319). The persistence worker's blocking stream reads use their own pooled
//! connections ([`crate::orders::worker`]), never this one (redis-rs #453, #643).
//!
//! Calls are guarded ([`Guard`]: in-flight cap, timeout, circuit breaker) per shard in
//! cluster mode, so a dead primary opens the circuit of its own shards only; standalone, one
//! guard covers every call.
//!
//! Scripts are loaded once from [`super::scripts`] and run through `Script::invoke_async`,
//! which reloads them after `NOSCRIPT` (a restarted or failed-over Redis has an empty script
//! cache; `invoke_script` would not reload, redis-rs #1394).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::{Script, Value};

use futures_util::StreamExt;
use tokio::sync::watch;

use super::batch::{BatchCall, Batches};
use super::buckets::whole_item_of;
use super::conn::{RedisConn, Target};
use super::guard::Guard;
use super::keys;
use super::seq::{Alarms, Floors};
use super::{
    Deaf, EngineSettings, ExpireReply, Expired, ItemNews, ItemSpec, ItemState, LimitsNews, Listener, Order,
    OrderStatus, PutReply, ReserveCmd, ReserveReply, Settle, StockEngine, Transition, TransitionReply,
};
use crate::clock::{Clock, system_now_ms};
use crate::config::{Config, RedisMode};
use crate::domain::{OrderEvent, RefundOf};
use crate::error::Error;
use crate::ids::{bucket_id, order_shard, shard_of, stock_buckets};
use crate::limiter::{LimitsChange, SharedLimits};
use crate::metrics;
use crate::shutdown::stopped;

/// The Lua scripts, each loaded once.
pub(super) struct Scripts {
    reserve: Script,
    pay: Script,
    cancel: Script,
    expire: Script,
    put_item: Script,
    pause: Script,
    settle: Script,
    refund: Script,
    pub(super) transfer_out: Script,
    pub(super) transfer_in: Script,
    pub(super) transfer_forget: Script,
}

impl Scripts {
    fn load() -> Self {
        use super::scripts::{
            CANCEL, EXPIRE, PAUSE, PAY, PUT_ITEM, REFUND, RESERVE, SETTLE, TRANSFER_FORGET, TRANSFER_IN, TRANSFER_OUT,
        };
        Scripts {
            reserve: Script::new(RESERVE),
            pay: Script::new(PAY),
            cancel: Script::new(CANCEL),
            expire: Script::new(EXPIRE),
            put_item: Script::new(PUT_ITEM),
            pause: Script::new(PAUSE),
            settle: Script::new(SETTLE),
            refund: Script::new(REFUND),
            transfer_out: Script::new(TRANSFER_OUT),
            transfer_in: Script::new(TRANSFER_IN),
            transfer_forget: Script::new(TRANSFER_FORGET),
        }
    }
}

/// The KEYS of the scripts on one order (pay, cancel, expire, settle, refund: `lua/lib/order.lua`):
/// the order, its item's hash and buyers, and its shard's deadlines, events and sequence.
fn order_keys(inv: &mut redis::ScriptInvocation<'_>, order_key: &str, item_id: &str) {
    let shard = shard_of(item_id);
    inv.key(order_key)
        .key(keys::item(item_id))
        .key(keys::buyers(item_id))
        .key(keys::deadlines(shard))
        .key(keys::events(shard))
        .key(keys::seq(shard));
}

/// Run a prepared script invocation of `shard` under its guard, timing it; its reply must
/// be a non-empty array. A `FENCED` answer wakes the repair task
/// ([`crate::orders::repair`]).
async fn run_script(
    conn: &RedisConn,
    guards: &Guards,
    alarms: &Alarms,
    shard: u32,
    name: &'static str,
    inv: redis::ScriptInvocation<'_>,
) -> Result<Vec<Value>, Error> {
    let mut conn = conn.clone();
    let started = std::time::Instant::now();
    let reply: Value = match guards.shard(shard).call(inv.invoke_async(&mut conn)).await {
        Err(Error::Fenced(why)) => {
            tracing::warn!(shard, why = %why, "shard fenced: its Redis is behind the database; rebuilding it");
            alarms.raise(shard);
            return Err(Error::Fenced(why));
        }
        other => other?,
    };
    metrics::script(name, started.elapsed().as_secs_f64());
    script_parts(name, reply)
}

/// What a shard's batch driver needs to call `reserve.lua`: cheap clones of the engine's
/// connection, scripts, guard and clock.
#[derive(Clone)]
pub(super) struct ReserveCaller {
    conn: RedisConn,
    scripts: Arc<Scripts>,
    guards: Guards,
    clock: Clock,
    payment_timeout_ms: u64,
    idem_ttl_s: u64,
    replicas: Replicas,
    /// How long a call whose reply was lost is sent again, counted from when its oldest
    /// request was queued.
    retry_for: Duration,
    /// Whether the last resend waits for the end of `retry_for` when the backoff's next step
    /// would pass it (one server), or gives up there (a cluster).
    last_try_at_deadline: bool,
    floors: Arc<Floors>,
    alarms: Arc<Alarms>,
    /// Told of each reservation of an unbucketed item as its batch is decided, in the
    /// batch's task: so it is told even when the request's own future was dropped (the
    /// client hung up) while the call was in flight.
    listener: Arc<dyn Listener>,
}

impl BatchCall for ReserveCaller {
    /// One `reserve.lua` call for a batch of one shard, sent again (same order ids) when
    /// its reply was lost, while the requests' time lasts; then, with
    /// `SECKILL_REDIS_WAIT_REPLICAS`, the replicas' `WAIT`.
    async fn call(&self, cmds: &[ReserveCmd], since: std::time::Instant) -> Result<Vec<ReserveReply>, Error> {
        let Some(first) = cmds.first() else {
            return Ok(Vec::new());
        };
        let shard = shard_of(&first.item_id);
        // Sent again while the requests' time lasts (twice the Redis timeout from when the
        // oldest was queued): the answer then says what was made. Counted from the queue,
        // not from the call: while Redis did not answer, a request waited behind the shard's
        // calls in flight for as long as one of them, then took as long again for its own
        // (4.3 s at a 1 s timeout, tests/netfault.rs). Now a reserve is answered within this
        // time and the timeout of the last call sent in it.
        let deadline = since + self.retry_for;
        if std::time::Instant::now() >= deadline {
            // Its time went waiting in the queue: never sent, nothing made.
            return Err(Error::RedisTimeout);
        }
        let mut again = crate::retry::backoff();
        let mut resent = false;
        let mut replies = loop {
            match self.call_once(shard, cmds).await {
                // The script may have run: the same call again answers the orders it made
                // as duplicates of their own ids, and decides the others. Once a call may
                // have run, a resend refused before it was sent (the circuit opened by the
                // failures, calls shed) leaves that as unknown as before: keep trying.
                Err(e) if e.may_have_run() || (resent && e.not_sent()) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    let delay = match again.next() {
                        Some(d) if d < left => d,
                        // One server, connection broken: once more at the deadline rather
                        // than give up while time is left (a connection killed again and
                        // again can use up the backoff's steps early; giving up answers 503
                        // for an order that may exist). Not after a timeout: a hung Redis
                        // would hold the request one more timeout. Not on a cluster: there,
                        // calls at the deadline of a failover left the cluster client without
                        // connections for 20 s and more (3 runs of 5 of tests/cluster.rs),
                        // redis-rs' slot refresh failing.
                        _ if self.last_try_at_deadline && matches!(e, Error::RedisConnection(_)) && !left.is_zero() => {
                            left
                        }
                        _ => return Err(e),
                    };
                    tracing::warn!(shard, requests = cmds.len(), cause = %e, "reserve reply lost; sending the same call again");
                    tokio::time::sleep(delay).await;
                    resent = true;
                }
                other => break other?,
            }
        };
        if resent {
            self.made_by_a_lost_call(cmds, &mut replies).await;
        }
        // A 200 (an order made, or found again) must survive a failover; a refusal changed
        // nothing and is answered as it is.
        if replies
            .iter()
            .any(|r| matches!(r, ReserveReply::Reserved { .. } | ReserveReply::Duplicate { .. }))
        {
            self.replicas.wait(&self.conn, self.guards.shard(shard), shard).await?;
        }
        for (cmd, reply) in cmds.iter().zip(&replies) {
            // A bucket's reply is not its item's news: `tell_bucketed` reports those.
            if cmd.buckets <= 1
                && let Some(news) = reply.news(&cmd.item_id)
            {
                self.listener.news(news);
            }
        }
        Ok(replies)
    }
}

impl ReserveCaller {
    /// A sent-again call answers an order the lost call made as a duplicate of its own
    /// order id: it is this request's reservation, answered as made (and counted as made).
    async fn made_by_a_lost_call(&self, cmds: &[ReserveCmd], replies: &mut [ReserveReply]) {
        // The stock left, read once per item of the batch.
        let mut stock_of: HashMap<&str, Option<i64>> = HashMap::new();
        for (cmd, reply) in cmds.iter().zip(replies.iter_mut()) {
            let ReserveReply::Duplicate {
                order_id,
                created_ms,
                pay_before_ms,
                ..
            } = reply
            else {
                continue;
            };
            if *order_id != cmd.order_id {
                continue;
            }
            let stock = match stock_of.get(cmd.item_id.as_str()) {
                Some(known) => *known,
                None => {
                    let read: Result<Option<i64>, Error> = self
                        .guards
                        .of_item(&cmd.item_id)
                        .call(
                            redis::cmd("HGET")
                                .arg(keys::item(&cmd.item_id))
                                .arg("stock")
                                .query_async(&mut self.conn.clone()),
                        )
                        .await;
                    let stock = read.ok().flatten();
                    stock_of.insert(&cmd.item_id, stock);
                    stock
                }
            };
            // Without the stock left, the reply stays a duplicate: still a 200 with the order.
            if let Some(stock_after) = stock {
                tracing::info!(order = %order_id, "a reservation made by a lost call, answered as made");
                *reply = ReserveReply::Reserved {
                    order_id: std::mem::take(order_id),
                    created_ms: *created_ms,
                    pay_before_ms: *pay_before_ms,
                    stock_after,
                };
            }
        }
    }

    /// One `reserve.lua` call: the shard's deadlines, events and sequence, then four keys
    /// and five arguments per request (docs/internals.md).
    async fn call_once(&self, shard: u32, cmds: &[ReserveCmd]) -> Result<Vec<ReserveReply>, Error> {
        let mut inv = self.scripts.reserve.prepare_invoke();
        inv.key(keys::deadlines(shard))
            .key(keys::events(shard))
            .key(keys::seq(shard))
            .arg(self.payment_timeout_ms)
            .arg(self.idem_ttl_s)
            .arg(self.clock.script_arg())
            .arg(self.floors.arg(shard));
        // A batch is mostly one item: its two keys are formatted once per run of it.
        let mut item_keys: Option<(&str, String, String)> = None;
        for cmd in cmds {
            let idem_key = cmd.idem_key.as_deref().unwrap_or("");
            let order_key = keys::order(&cmd.order_id)
                .ok_or_else(|| Error::Internal(format!("order id {} is not ours", cmd.order_id)))?;
            let (_, item_key, buyers_key) = match item_keys {
                Some(ref k) if k.0 == cmd.item_id => k,
                _ => item_keys.insert((&cmd.item_id, keys::item(&cmd.item_id), keys::buyers(&cmd.item_id))),
            };
            // Without a key the idempotency key is never touched; it still names a key of
            // the same slot.
            inv.key(item_key.as_str())
                .key(buyers_key.as_str())
                .key(order_key)
                .key(keys::idem(
                    &cmd.item_id,
                    &cmd.user_id,
                    if idem_key.is_empty() { "-" } else { idem_key },
                ))
                .arg(&cmd.item_id)
                .arg(&cmd.user_id)
                .arg(cmd.qty)
                .arg(&cmd.order_id)
                .arg(idem_key);
        }
        let replies = run_script(&self.conn, &self.guards, &self.alarms, shard, "reserve", inv).await?;
        reserve_replies(&replies)
    }
}

/// `SECKILL_REDIS_WAIT_REPLICAS`: after a stock-changing script, `WAIT` on the same primary
/// (the same connection: one `WAIT` covers every write sent on it before) until this many
/// replicas have the change, or answer 503.
#[derive(Clone, Copy, Debug)]
struct Replicas {
    wanted: u32,
    timeout: Duration,
}

impl Replicas {
    async fn wait(&self, conn: &RedisConn, guard: &Guard, shard: u32) -> Result<(), Error> {
        if self.wanted == 0 {
            return Ok(());
        }
        let mut conn = conn.clone();
        let wait = redis::cmd("WAIT")
            .arg(self.wanted)
            .arg(self.timeout.as_millis() as u64)
            .clone();
        let acked: i64 = guard.call(conn.query_on_slot_of(&keys::events(shard), &wait)).await?;
        if acked < i64::from(self.wanted) {
            metrics::redis_error("not_replicated");
            return Err(Error::NotReplicated {
                acked,
                wanted: self.wanted,
            });
        }
        Ok(())
    }
}

/// How to reach Redis and how to protect the calls (the engine's own settings are
/// [`EngineSettings`]).
#[derive(Clone, Debug)]
pub struct RedisSettings {
    /// `REDIS_URL`: one URL, or the seed nodes of a cluster (comma-separated).
    pub url: String,
    pub mode: RedisMode,
    /// `WAIT` for this many replicas after a stock-changing script (0: don't).
    pub wait_replicas: u32,
    /// Timeout of every Redis command (connect and response).
    pub timeout: Duration,
    /// Calls in flight before new ones are shed with 503.
    pub max_inflight: usize,
    /// Consecutive failures that open the circuit.
    pub circuit_failures: u32,
    /// How long an open circuit answers 503 before one probe is let through.
    pub circuit_cooldown: Duration,
}

impl RedisSettings {
    pub fn from_config(url: &str, c: &Config) -> Self {
        RedisSettings {
            url: url.to_owned(),
            mode: c.redis_mode,
            wait_replicas: c.redis_wait_replicas,
            timeout: c.redis_timeout,
            max_inflight: c.max_inflight,
            circuit_failures: c.circuit_failures,
            circuit_cooldown: c.circuit_cooldown,
        }
    }
}

/// The guards of the calls: one per shard in cluster mode (shards on a dead primary fail
/// alone), one for everything standalone; `other` guards calls of no shard (catalogue,
/// pub/sub, TIME, PING).
#[derive(Clone)]
struct Guards {
    shards: Arc<Vec<Arc<Guard>>>,
    other: Arc<Guard>,
}

impl Guards {
    /// On a cluster, a shard whose calls keep failing past a cool-down makes `conn` anew
    /// ([`RedisConn::reset`]).
    fn new(redis: &RedisSettings, conn: &RedisConn) -> Self {
        let reset: Arc<dyn Fn() + Send + Sync> = {
            let conn = conn.clone();
            Arc::new(move || conn.reset())
        };
        let guard = || {
            Guard::new(
                redis.max_inflight,
                redis.timeout,
                redis.circuit_failures,
                redis.circuit_cooldown,
                Clock::system(),
            )
            .on_stuck(reset.clone())
        };
        let other = Arc::new(guard());
        let shards = match redis.mode {
            RedisMode::Standalone => keys::all_shards().map(|_| other.clone()).collect(),
            RedisMode::Cluster => keys::all_shards().map(|s| Arc::new(guard().of_shard(s))).collect(),
        };
        Guards {
            shards: Arc::new(shards),
            other,
        }
    }

    fn shard(&self, shard: u32) -> &Guard {
        &self.shards[shard as usize]
    }

    fn of_item(&self, item_id: &str) -> &Guard {
        self.shard(shard_of(item_id))
    }
}

pub struct RedisEngine {
    target: Target,
    conn: RedisConn,
    pub(super) scripts: Arc<Scripts>,
    guards: Guards,
    /// Reservations, batched per shard ([`super::batch`]).
    pub(super) batches: Batches<ReserveCaller>,
    replicas: Replicas,
    pub(super) clock: Clock,
    pub(super) redis: RedisSettings,
    settings: EngineSettings,
    pub(super) listener: Arc<dyn Listener>,
    pub(super) floors: Arc<Floors>,
    alarms: Arc<Alarms>,
    /// This instance's member of [`keys::INSTANCES`]: random, so two instances never share one.
    instance_id: String,
}

/// How often the change feed's connection is pinged (a silent one is left for a new one).
const FEED_PING: Duration = Duration::from_secs(1);
/// How often an instance says it is alive in [`keys::INSTANCES`].
const HEARTBEAT: Duration = Duration::from_secs(1);
/// A heartbeat older than this is a dead instance (three missed beats): its share of the
/// global rate goes to the others.
const HEARTBEAT_STALE: Duration = Duration::from_secs(3);

impl RedisEngine {
    /// Connects lazily: the gateway starts (and answers 503) while Redis is still down.
    pub fn new(redis: RedisSettings, settings: EngineSettings, clock: Clock) -> Result<Self, Error> {
        let target = Target::new(&redis.url, redis.mode, redis.timeout);
        let conn = target.shared()?;
        let guards = Guards::new(&redis, &conn);
        let scripts = Arc::new(Scripts::load());
        let floors = Arc::new(Floors::default());
        let alarms = Arc::new(Alarms::default());
        // Half the call timeout: a WAIT holds up every call queued behind it on the
        // primary's connection.
        let replicas = Replicas {
            wanted: redis.wait_replicas,
            timeout: redis.timeout / 2,
        };
        let caller = ReserveCaller {
            conn: conn.clone(),
            scripts: scripts.clone(),
            guards: guards.clone(),
            clock: clock.clone(),
            payment_timeout_ms: settings.payment_timeout.as_millis() as u64,
            idem_ttl_s: settings.idempotency_ttl.as_secs().max(1),
            replicas,
            retry_for: redis.timeout * 2,
            last_try_at_deadline: redis.mode == RedisMode::Standalone,
            floors: floors.clone(),
            alarms: alarms.clone(),
            listener: Arc::new(Deaf),
        };
        Ok(RedisEngine {
            target,
            conn,
            scripts,
            guards,
            batches: Batches::new(caller, redis.max_inflight),
            replicas,
            clock,
            redis,
            settings,
            listener: Arc::new(Deaf),
            floors,
            alarms,
            instance_id: uuid::Uuid::now_v7().simple().to_string(),
        })
    }

    /// The floors passed to the scripts: the persistence worker and the repair task raise them.
    pub fn floors(&self) -> &Arc<Floors> {
        &self.floors
    }

    /// Shards whose scripts answered `FENCED`, for the repair task.
    pub fn alarms(&self) -> &Arc<Alarms> {
        &self.alarms
    }

    /// Tell `listener` what happens to items, here and (through [`Self::follow_changes`])
    /// on other instances.
    pub fn with_listener(mut self, listener: Arc<dyn Listener>) -> Self {
        self.batches.call_mut().listener = listener.clone();
        self.listener = listener;
        self
    }

    /// Where Redis is (the persistence worker opens its own pool of blocking connections).
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Whether a circuit is open: standalone, the one; on a cluster, any shard's.
    pub fn circuit_open(&self) -> bool {
        self.guards.other.circuit_open() || self.guards.shards.iter().any(|g| g.circuit_open())
    }

    /// A clone of the shared connection, for the worker's non-blocking commands.
    pub fn connection(&self) -> RedisConn {
        self.conn.clone()
    }

    /// Run a plain command of no shard under its guard.
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, Error> {
        self.query_in(&self.guards.other, cmd).await
    }

    /// Run a plain command of a shard's keys under its guard.
    pub(super) async fn query_shard<T: redis::FromRedisValue>(&self, shard: u32, cmd: &redis::Cmd) -> Result<T, Error> {
        self.query_in(self.guards.shard(shard), cmd).await
    }

    async fn query_in<T: redis::FromRedisValue>(&self, guard: &Guard, cmd: &redis::Cmd) -> Result<T, Error> {
        let mut conn = self.conn.clone();
        guard.call(cmd.query_async(&mut conn)).await
    }

    /// Run a plain command of the engine's own bookkeeping (the heartbeat) with the Redis
    /// timeout but outside the guards: a periodic background call must not take the probe
    /// of an open circuit from the shoppers' requests, nor open or close their circuit.
    async fn query_unguarded<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T, Error> {
        let mut conn = self.conn.clone();
        match tokio::time::timeout(self.redis.timeout, cmd.query_async(&mut conn)).await {
            Ok(reply) => Ok(reply?),
            Err(_) => Err(Error::RedisTimeout),
        }
    }

    /// Run a prepared script invocation of an item's (or a bucket's) shard under its guard,
    /// timing it.
    pub(super) async fn run(
        &self,
        item_id: &str,
        name: &'static str,
        inv: redis::ScriptInvocation<'_>,
    ) -> Result<Vec<Value>, Error> {
        run_script(&self.conn, &self.guards, &self.alarms, shard_of(item_id), name, inv).await
    }

    /// Learn the offset between this host's clock and Redis `TIME`, so that the local early
    /// answers (`not_started`, `ended`) agree with the scripts. Half the round trip is
    /// credited to the way back.
    pub async fn sync_clock(&self) -> Result<i64, Error> {
        let before = system_now_ms();
        let (secs, micros): (i64, i64) = self.query(&redis::cmd("TIME")).await?;
        let after = system_now_ms();
        let redis_ms = secs * 1000 + micros / 1000;
        let offset = redis_ms - (before + after) / 2;
        self.clock.set_offset(offset);
        Ok(offset)
    }

    /// Every 10 s, learn Redis' clock offset again (not with a test's manual clock).
    pub async fn keep_clock_in_sync(&self, mut shutdown: watch::Receiver<bool>) {
        if self.clock.is_manual() {
            return;
        }
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.sync_clock().await {
                        tracing::debug!(cause = %e, "Redis TIME not read");
                    }
                }
                _ = stopped(&mut shutdown) => return,
            }
        }
    }

    /// Tell every instance that an item changed (added, replaced, stock back).
    async fn publish_changed(&self, item_id: &str) -> Result<(), Error> {
        self.query::<i64>(
            redis::cmd("PUBLISH")
                .arg(keys::BUS)
                .arg(format!("{}{item_id}", keys::ITEM_CHANGED)),
        )
        .await?;
        Ok(())
    }

    /// Follow the change feed (`sk:bus`), reconnecting with backoff, until shutdown. After
    /// every (re)connect the listener gets the whole catalogue and the shared rate limits:
    /// messages may have been missed while disconnected. On a cluster the subscription is on one node (a classic
    /// `PUBLISH` reaches every node's subscribers); each reconnect tries the next URL of
    /// `REDIS_URL`, so a dead node is left for a live one.
    pub async fn follow_changes(&self, mut shutdown: watch::Receiver<bool>) {
        let mut delays = crate::retry::backoff();
        let urls = self.target.pubsub_urls();
        for attempt_no in 0usize.. {
            let url = &urls[attempt_no % urls.len()];
            let connected = std::sync::atomic::AtomicBool::new(false);
            let attempt = async {
                let timeout = self.redis.timeout;
                let client = redis::Client::open(url.as_str())?;
                let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
                    .await
                    .map_err(|_| Error::RedisTimeout)??;
                let (mut sink, mut messages) = pubsub.split();
                tokio::time::timeout(timeout, sink.subscribe(keys::BUS))
                    .await
                    .map_err(|_| Error::RedisTimeout)??;
                self.listener.news(ItemNews::Catalog(self.catalog().await?));
                let paused_all: Option<String> = self.query(redis::cmd("GET").arg(keys::PAUSED_ALL)).await?;
                self.listener
                    .news(ItemNews::AllPaused(paused_all.as_deref() == Some("1")));
                self.load_limits().await?;
                connected.store(true, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(channel = keys::BUS, node = %url, "subscribed");
                // A subscriber only listens: a connection gone silent (a partition, a
                // firewall that dropped its state) would never end, and this instance would
                // miss every change for good (tests/netfault.rs). A ping unanswered within
                // the timeout ends it, and the reconnect reads what was missed.
                let mut ping = tokio::time::interval(FEED_PING);
                ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ping.tick().await;
                loop {
                    let msg = tokio::select! {
                        msg = messages.next() => match msg {
                            Some(msg) => msg,
                            None => break,
                        },
                        _ = ping.tick() => {
                            tokio::time::timeout(timeout, sink.ping::<Value>())
                                .await
                                .map_err(|_| Error::RedisTimeout)??;
                            continue;
                        }
                    };
                    let Ok(payload) = msg.get_payload::<String>() else {
                        continue;
                    };
                    if let Some(item) = payload.strip_prefix(keys::ITEM_CHANGED) {
                        self.listener.news(ItemNews::Remote { item });
                    } else if let Some(flag) = payload.strip_prefix(keys::ALL_PAUSED) {
                        self.listener.news(ItemNews::AllPaused(flag == "1"));
                    } else if payload == keys::LIMITS_CHANGED {
                        // A failed read ends the subscription: the reconnect reads again.
                        self.load_limits().await?;
                    }
                }
                Ok::<(), Error>(())
            };
            tokio::select! {
                r = attempt => match r {
                    Ok(()) => tracing::warn!("pub/sub connection closed; reconnecting"),
                    Err(e) => tracing::warn!(cause = %e, "pub/sub unavailable; retrying"),
                },
                _ = stopped(&mut shutdown) => return,
            }
            if connected.load(std::sync::atomic::Ordering::Relaxed) {
                delays = crate::retry::backoff();
            }
            let delay = delays.next().unwrap_or(crate::retry::MAX_DELAY);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stopped(&mut shutdown) => return,
            }
        }
    }

    /// Change the shared rate limits: set and clear the fields of [`keys::LIMITS`], tell
    /// every instance ([`keys::LIMITS_CHANGED`] on the bus), and apply what the key now
    /// holds here before answering (other changes may have landed in between).
    pub async fn share_limits(&self, change: LimitsChange) -> Result<(), Error> {
        let fields = [
            ("rate_global", change.global),
            ("rate_per_user", change.per_user),
            ("rate_per_ip", change.per_ip),
        ];
        let mut set = redis::cmd("HSET");
        set.arg(keys::LIMITS);
        let mut clear = redis::cmd("HDEL");
        clear.arg(keys::LIMITS);
        let (mut sets, mut clears) = (0, 0);
        for (field, value) in fields {
            match value {
                Some(Some(rate)) => {
                    set.arg(field).arg(rate);
                    sets += 1;
                }
                Some(None) => {
                    clear.arg(field);
                    clears += 1;
                }
                None => {}
            }
        }
        if sets > 0 {
            self.query::<i64>(&set).await?;
        }
        if clears > 0 {
            self.query::<i64>(&clear).await?;
        }
        self.query::<i64>(redis::cmd("PUBLISH").arg(keys::BUS).arg(keys::LIMITS_CHANGED))
            .await?;
        self.load_limits().await
    }

    /// Read [`keys::LIMITS`] and apply it: each rate it holds wins over the configured one,
    /// each it does not hold is the configured one again. A field that is not a rate is
    /// logged and left out.
    pub async fn load_limits(&self) -> Result<(), Error> {
        let h: HashMap<String, String> = self.query(redis::cmd("HGETALL").arg(keys::LIMITS)).await?;
        let rate = |field: &str| {
            let v = h.get(field)?;
            let parsed = v.parse::<u32>().ok();
            if parsed.is_none() {
                tracing::warn!(key = keys::LIMITS, field, value = %v, "not a rate; ignored");
            }
            parsed
        };
        let shared = SharedLimits {
            global: rate("rate_global"),
            per_user: rate("rate_per_user"),
            per_ip: rate("rate_per_ip"),
        };
        self.listener.limits(LimitsNews::Shared(LimitsChange::exactly(shared)));
        Ok(())
    }

    /// Say this instance is alive every [`HEARTBEAT`] (`ZADD` to [`keys::INSTANCES`]), drop
    /// the instances silent for [`HEARTBEAT_STALE`], and tell the listener how many are
    /// left: each takes its share of the global rate. Until shutdown, when this instance
    /// leaves the set (the others take its share at their next beat). A failed beat keeps
    /// the last count: an instance that cannot reach Redis cannot sell anyway. Its calls
    /// have the Redis timeout but pass no guard ([`Self::query_unguarded`]).
    pub async fn keep_heartbeat(&self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => match self.heartbeat().await {
                    Ok(n) => self.listener.limits(LimitsNews::Instances(n)),
                    Err(e) => tracing::debug!(cause = %e, "heartbeat not sent"),
                },
                _ = stopped(&mut shutdown) => break,
            }
        }
        let leave = redis::cmd("ZREM").arg(keys::INSTANCES).arg(&self.instance_id).clone();
        if let Err(e) = self.query_unguarded::<i64>(&leave).await {
            tracing::debug!(cause = %e, "instance not removed from the live set");
        }
    }

    /// One beat; returns the live instances, this one included.
    async fn heartbeat(&self) -> Result<u32, Error> {
        // Heartbeats of every instance are compared: Redis-corrected time (a test's manual
        // clock is not the time instances live in).
        let now = if self.clock.is_manual() {
            system_now_ms()
        } else {
            self.clock.now_ms()
        };
        let stale = now - HEARTBEAT_STALE.as_millis() as i64;
        self.query_unguarded::<i64>(redis::cmd("ZADD").arg(keys::INSTANCES).arg(now).arg(&self.instance_id))
            .await?;
        self.query_unguarded::<i64>(
            redis::cmd("ZREMRANGEBYSCORE")
                .arg(keys::INSTANCES)
                .arg("-inf")
                .arg(format!("({stale}")),
        )
        .await?;
        let n: u32 = self.query_unguarded(redis::cmd("ZCARD").arg(keys::INSTANCES)).await?;
        Ok(n.max(1))
    }

    /// An order moved here: tell the listener, and, when its units came back, every
    /// instance (their sold-out flags no longer hold).
    /// A failed publish is logged, not returned: the change is made, and the other
    /// instances' flags expire by their TTL.
    async fn moved(&self, item_id: &str, event: OrderStatus, stock: Option<i64>) {
        // A bucket's order: the news is the item's, without the bucket's stock figure.
        let (item_id, bucket) = whole_item_of(item_id);
        let stock = if bucket { None } else { stock };
        self.listener.news(ItemNews::Order {
            item: item_id,
            event,
            stock,
        });
        // Units came back (a refund with restock; a late payment of an overdue order, which
        // expired it first): every instance forgets what it cached.
        let returned = matches!(
            event,
            OrderStatus::Cancelled | OrderStatus::Expired | OrderStatus::Refunded | OrderStatus::RefundDue
        );
        if returned && let Err(e) = self.publish_changed(item_id).await {
            tracing::warn!(item = %item_id, cause = %e, "stock came back but other instances were not told");
        }
    }

    /// `put_item.lua` on one engine item (an item of one bucket, a bucket, or a bucketed
    /// item's own hash) with `stock_total` units.
    pub(super) async fn put_script(&self, id: &str, spec: &ItemSpec, stock_total: i64) -> Result<PutReply, Error> {
        let mut inv = self.scripts.put_item.prepare_invoke();
        inv.key(keys::item(id))
            .arg(id)
            .arg(&spec.name)
            .arg(spec.price_cents)
            .arg(stock_total)
            .arg(spec.per_user_limit)
            .arg(spec.starts_ms)
            .arg(spec.ends_ms)
            .arg(spec.buckets);
        let parts = self.run(id, "put_item", inv).await?;
        put_reply(&Reply {
            script: "put_item",
            parts: &parts,
        })
    }

    /// An item's units left and its total, for the stock gauges' refresh
    /// ([`crate::app::STOCK_REFRESH`]): read outside the guards, as the heartbeat, so that a
    /// periodic background read never takes a shopper's in-flight permit or an open
    /// circuit's probe. A bucketed item sums its buckets. `None`: no such item.
    /// An order's key and its item (a bucket's id where it was made in one), which its
    /// scripts' keys are built from (one slot: the order id carries the item's shard): from
    /// its hash, else from the database's `record` of it; `None` for neither.
    async fn order_item(&self, order_id: &str, record: Option<&Order>) -> Result<Option<(String, String)>, Error> {
        let (Some(order_key), Some(order_shard)) = (keys::order(order_id), order_shard(order_id)) else {
            return Ok(None);
        };
        let item_id: Option<String> = self
            .query_shard(order_shard, redis::cmd("HGET").arg(&order_key).arg("item_id"))
            .await?;
        Ok(item_id
            .or_else(|| record.map(|r| r.item_id.clone()))
            .map(|i| (order_key, i)))
    }

    /// `PING` outside the guards, for the background health check (`crate::health`): a
    /// periodic check must not take a shopper's in-flight permit or an open circuit's probe
    /// (as the stock gauges' reads, [`Self::stock_for_gauge`]).
    pub async fn ping_unguarded(&self) -> Result<(), Error> {
        let _: String = self.query_unguarded(&redis::cmd("PING")).await?;
        Ok(())
    }

    pub async fn stock_for_gauge(&self, item: &str) -> Result<Option<(i64, i64)>, Error> {
        let h: Vec<Option<i64>> = self
            .query_unguarded(
                redis::cmd("HMGET")
                    .arg(keys::item(item))
                    .arg("stock")
                    .arg("stock_total")
                    .arg("buckets")
                    .arg("item_total"),
            )
            .await?;
        let (Some(stock), Some(total)) = (h[0], h[1]) else {
            return Ok(None);
        };
        let buckets = u32::try_from(h[2].unwrap_or(1)).unwrap_or(1);
        if buckets <= 1 {
            return Ok(Some((stock, total)));
        }
        let mut left = 0;
        for b in stock_buckets(buckets) {
            let s: Option<i64> = self
                .query_unguarded(redis::cmd("HGET").arg(keys::item(&bucket_id(item, b))).arg("stock"))
                .await?;
            left += s.unwrap_or(0);
        }
        Ok(Some((left, h[3].unwrap_or(total))))
    }

    /// `pause.lua` on one engine item; `false` when it does not exist.
    async fn pause_one(&self, id: &str, paused: bool) -> Result<bool, Error> {
        let mut inv = self.scripts.pause.prepare_invoke();
        inv.key(keys::item(id)).arg(id).arg(if paused { "1" } else { "0" });
        let parts = self.run(id, "pause", inv).await?;
        let r = Reply {
            script: "pause",
            parts: &parts,
        };
        match r.status()?.as_str() {
            "ok" => Ok(true),
            "unknown_item" => Ok(false),
            other => Err(Error::ScriptReply(format!("pause: unknown reply {other}"))),
        }
    }

    /// Every sale's switch: each shard's copy, which the scripts read (all of them before
    /// this returns), then the one gateways read on (re)connecting, then the news.
    async fn pause_all(&self, paused: bool) -> Result<(), Error> {
        let sets = (0..crate::ids::SHARDS).map(|shard| async move {
            self.query_shard::<i64>(shard, &paused_field(keys::seq(shard), paused))
                .await
        });
        for set in futures_util::future::join_all(sets).await {
            set?;
        }
        self.query::<()>(
            redis::cmd("SET")
                .arg(keys::PAUSED_ALL)
                .arg(if paused { "1" } else { "0" }),
        )
        .await?;
        self.listener.news(ItemNews::AllPaused(paused));
        self.query::<i64>(redis::cmd("PUBLISH").arg(keys::BUS).arg(format!(
            "{}{}",
            keys::ALL_PAUSED,
            if paused { "1" } else { "0" }
        )))
        .await?;
        Ok(())
    }

    /// `WAIT` for `SECKILL_REDIS_WAIT_REPLICAS` replicas of `shard`'s primary (nothing
    /// without the setting).
    pub(super) async fn wait_replicas(&self, shard: u32) -> Result<(), Error> {
        self.replicas.wait(&self.conn, self.guards.shard(shard), shard).await
    }

    fn now_arg(&self) -> String {
        self.clock.script_arg()
    }
}

// ---- reply decoding -------------------------------------------------------------------

/// A script's reply, which must be a non-empty array: its elements.
fn script_parts(name: &str, reply: Value) -> Result<Vec<Value>, Error> {
    match reply {
        Value::Array(parts) if !parts.is_empty() => Ok(parts),
        other => Err(Error::ScriptReply(format!("{name}: unexpected reply {other:?}"))),
    }
}

/// A script reply decoded as the engine decodes it, for the fuzz target `lua_reply`
/// (`fuzz/`): `script` names the script (`reserve`, `pay`, `cancel`, `settle`, `refund`,
/// `expire`, `put_item`) or the hash an `HGETALL` read (`order_hash`, `item_hash`).
#[doc(hidden)]
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    Reserve(Vec<ReserveReply>),
    Transition(TransitionReply),
    Expire(ExpireReply),
    Put(PutReply),
    Order(Order),
    Item(ItemState),
}

/// Decode `reply` as the engine does the reply of `script` ([`Decoded`]); `id` is the
/// order's or item's id of a hash (its key's, which the hash does not repeat).
#[doc(hidden)]
pub fn decode_reply(script: &str, id: &str, reply: Value) -> Result<Decoded, Error> {
    if let Some(hash) = script.strip_suffix("_hash") {
        let h: HashMap<String, String> =
            redis::from_redis_value(reply).map_err(|e| Error::ScriptReply(format!("{script}: {e}")))?;
        return match hash {
            "order" => order_from_hash(id, &h).map(Decoded::Order),
            _ => item_from_hash(id, &h).map(Decoded::Item),
        };
    }
    let name = ["reserve", "pay", "cancel", "settle", "refund", "expire", "put_item"]
        .into_iter()
        .find(|n| *n == script)
        .ok_or_else(|| Error::Internal(format!("no script {script}")))?;
    let parts = script_parts(name, reply)?;
    let r = Reply {
        script: name,
        parts: &parts,
    };
    match name {
        "reserve" => reserve_replies(&parts).map(Decoded::Reserve),
        "expire" => expire_reply(&r).map(Decoded::Expire),
        "put_item" => put_reply(&r).map(Decoded::Put),
        _ => transition_reply(&r).map(Decoded::Transition),
    }
}

/// A Redis reply value as text (bulk or simple string, integer, OK), or `None`.
pub(crate) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        Value::Okay => Some("OK".into()),
        _ => None,
    }
}

fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(i) => Some(*i),
        Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        Value::SimpleString(s) => s.parse().ok(),
        _ => None,
    }
}

/// Positional access to a script reply, failing with the script's name.
pub(super) struct Reply<'a> {
    pub(super) script: &'static str,
    pub(super) parts: &'a [Value],
}

impl Reply<'_> {
    pub(super) fn status(&self) -> Result<String, Error> {
        self.text(0)
    }
    pub(super) fn text(&self, i: usize) -> Result<String, Error> {
        self.parts.get(i).and_then(text).ok_or_else(|| self.bad(i))
    }
    pub(super) fn int(&self, i: usize) -> Result<i64, Error> {
        self.parts.get(i).and_then(int).ok_or_else(|| self.bad(i))
    }
    fn order_status(&self, i: usize) -> Result<OrderStatus, Error> {
        OrderStatus::parse(&self.text(i)?).ok_or_else(|| self.bad(i))
    }
    fn bad(&self, i: usize) -> Error {
        Error::ScriptReply(format!("{}: element {i} of {:?}", self.script, self.parts))
    }
}

fn transition_reply(r: &Reply<'_>) -> Result<TransitionReply, Error> {
    Ok(match r.status()?.as_str() {
        "ok" => TransitionReply::Done {
            status: r.order_status(1)?,
            stock_after: r.int(2)?,
        },
        "already" => TransitionReply::Already {
            status: r.order_status(1)?,
        },
        "closed" => TransitionReply::Closed {
            status: r.order_status(1)?,
        },
        "forbidden" => TransitionReply::Forbidden,
        "unknown_order" => TransitionReply::UnknownOrder,
        other => {
            return Err(Error::ScriptReply(format!("{}: unknown reply {other}", r.script)));
        }
    })
}

fn expire_reply(r: &Reply<'_>) -> Result<ExpireReply, Error> {
    Ok(match r.status()?.as_str() {
        "expired" => ExpireReply::Expired { stock_after: r.int(1)? },
        "not_due" => ExpireReply::NotDue {
            pay_before_ms: r.int(1)?,
        },
        "not_reserved" => ExpireReply::NotReserved {
            status: r.order_status(1)?,
        },
        "unknown_order" => ExpireReply::UnknownOrder,
        other => return Err(Error::ScriptReply(format!("expire: unknown reply {other}"))),
    })
}

/// The replies of a `reserve.lua` call, one per request of its batch.
fn reserve_replies(replies: &[Value]) -> Result<Vec<ReserveReply>, Error> {
    replies
        .iter()
        .map(|v| match v {
            Value::Array(parts) => reserve_reply(parts),
            other => Err(Error::ScriptReply(format!("reserve: unexpected reply {other:?}"))),
        })
        .collect()
}

fn put_reply(r: &Reply<'_>) -> Result<PutReply, Error> {
    match r.status()?.as_str() {
        "ok" => Ok(PutReply::Stored { stock: r.int(1)? }),
        "below_held" => Ok(PutReply::BelowHeld { held: r.int(1)? }),
        other => Err(Error::ScriptReply(format!("put_item: unknown reply {other}"))),
    }
}

/// One request's reply of `reserve.lua`.
fn reserve_reply(parts: &[Value]) -> Result<ReserveReply, Error> {
    let r = Reply {
        script: "reserve",
        parts,
    };
    Ok(match r.status()?.as_str() {
        "ok" => ReserveReply::Reserved {
            order_id: r.text(1)?,
            created_ms: r.int(2)?,
            pay_before_ms: r.int(3)?,
            stock_after: r.int(4)?,
        },
        // The key outlived its order's hash (closed and expired from Redis): the same
        // reply the embedded engine gives for a missing order; the front door then asks
        // the database.
        "duplicate" if r.text(3)?.is_empty() => ReserveReply::Duplicate {
            order_id: r.text(1)?,
            qty: 0,
            status: OrderStatus::Reserved,
            created_ms: 0,
            pay_before_ms: 0,
        },
        "duplicate" => ReserveReply::Duplicate {
            order_id: r.text(1)?,
            qty: r.int(2)?,
            status: r.order_status(3)?,
            created_ms: r.int(4)?,
            pay_before_ms: r.int(5)?,
        },
        "unknown_item" => ReserveReply::UnknownItem,
        "paused" => ReserveReply::Paused,
        "not_started" => ReserveReply::NotStarted { starts_ms: r.int(1)? },
        "ended" => ReserveReply::Ended { ends_ms: r.int(1)? },
        "bad_qty" => ReserveReply::BadQty { limit: r.int(1)? },
        "limit_reached" => ReserveReply::LimitReached {
            held: r.int(1)?,
            limit: r.int(2)?,
        },
        "sold_out" => ReserveReply::SoldOut { stock: r.int(1)? },
        other => {
            return Err(Error::ScriptReply(format!("reserve: unknown reply {other}")));
        }
    })
}

/// The command that sets (`paused`) or drops the field `paused` of the hash `key`: an
/// item's or a bucket's switch, or a shard's copy of every sale's (`keys::seq`). As
/// `lua/pause.lua` writes it: `"1"`, or absent.
pub(crate) fn paused_field(key: String, paused: bool) -> redis::Cmd {
    let mut cmd = redis::cmd(if paused { "HSET" } else { "HDEL" });
    cmd.arg(key).arg("paused");
    if paused {
        cmd.arg("1");
    }
    cmd
}

fn field<T: std::str::FromStr>(h: &HashMap<String, String>, k: &str) -> Result<T, Error> {
    h.get(k)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::ScriptReply(format!("hash field {k} missing or malformed")))
}

/// An order from its hash. `order_id` is the key's (the hash does not repeat it);
/// `updated_ms` is written once the order closes (until then: `created_ms`), `idem_key`
/// only when there is one.
pub(crate) fn order_from_hash(order_id: &str, h: &HashMap<String, String>) -> Result<Order, Error> {
    let created_ms = field(h, "created_ms")?;
    Ok(Order {
        order_id: order_id.to_owned(),
        item_id: field(h, "item_id")?,
        user_id: field(h, "user_id")?,
        qty: field(h, "qty")?,
        status: h
            .get("status")
            .and_then(|s| OrderStatus::parse(s))
            .ok_or_else(|| Error::ScriptReply("order status".into()))?,
        created_ms,
        pay_before_ms: field(h, "pay_before_ms")?,
        updated_ms: h.get("updated_ms").and_then(|v| v.parse().ok()).unwrap_or(created_ms),
        idem_key: h.get("idem_key").cloned().unwrap_or_default(),
        // Absent in orders made before prices were kept.
        price_cents: h.get("price_cents").and_then(|v| v.parse().ok()),
        refund: h.get("refund_of").and_then(|v| RefundOf::parse(v)),
    })
}

pub(crate) fn item_from_hash(item_id: &str, h: &HashMap<String, String>) -> Result<ItemState, Error> {
    Ok(ItemState {
        spec: ItemSpec {
            item_id: item_id.to_owned(),
            name: h.get("name").cloned().unwrap_or_default(),
            price_cents: field(h, "price_cents")?,
            stock_total: field(h, "stock_total")?,
            per_user_limit: field(h, "per_user_limit")?,
            starts_ms: field(h, "starts_ms")?,
            ends_ms: field(h, "ends_ms")?,
            // Absent in items written before buckets existed: one.
            buckets: h.get("buckets").and_then(|v| v.parse().ok()).unwrap_or(1),
            paused: h.get("paused").is_some_and(|v| v == "1"),
        },
        stock: field(h, "stock")?,
        reserved: field(h, "reserved")?,
        paid: field(h, "paid")?,
        cancelled: field(h, "cancelled")?,
        expired: field(h, "expired")?,
        // Absent in items written before refunds existed.
        refunded: h.get("refunded").and_then(|v| v.parse().ok()).unwrap_or(0),
    })
}

impl StockEngine for RedisEngine {
    async fn put_item(&self, spec: &ItemSpec) -> Result<PutReply, Error> {
        // Buckets are fixed once an item exists: its stock lies in them (`super::buckets`).
        let existing = self.item(&spec.item_id).await?;
        let reply = match &existing {
            Some(current) if current.spec.buckets != spec.buckets => {
                return Ok(PutReply::BucketsFixed {
                    buckets: current.spec.buckets,
                });
            }
            _ if spec.buckets > 1 => self.put_bucketed(spec, existing).await?,
            _ => self.put_script(&spec.item_id, spec, spec.stock_total).await?,
        };
        let PutReply::Stored { stock } = reply else {
            return Ok(reply);
        };
        self.query::<i64>(redis::cmd("SADD").arg(keys::CATALOG).arg(&spec.item_id))
            .await?;
        self.listener.news(ItemNews::Put {
            item: &spec.item_id,
            stock,
            total: spec.stock_total,
        });
        self.publish_changed(&spec.item_id).await?;
        Ok(reply)
    }

    async fn item(&self, item_id: &str) -> Result<Option<ItemState>, Error> {
        let h: HashMap<String, String> = self
            .query_shard(shard_of(item_id), redis::cmd("HGETALL").arg(keys::item(item_id)))
            .await?;
        if h.is_empty() {
            return Ok(None);
        }
        let head = item_from_hash(item_id, &h)?;
        if head.spec.buckets > 1 {
            return self.whole_item(head, &h).await.map(Some);
        }
        Ok(Some(head))
    }

    async fn pause(&self, item_id: Option<&str>, paused: bool) -> Result<bool, Error> {
        let Some(item) = item_id else {
            self.pause_all(paused).await?;
            return Ok(true);
        };
        // A bucketed item's reservations are made in its buckets: each of them first, then
        // the item's own hash (which GET item reads).
        let buckets: Option<u32> = self
            .query_shard(shard_of(item), redis::cmd("HGET").arg(keys::item(item)).arg("buckets"))
            .await?;
        for bucket in stock_buckets(buckets.unwrap_or(1)).filter(|b| *b > 0) {
            self.pause_one(&bucket_id(item, bucket), paused).await?;
        }
        if !self.pause_one(item, paused).await? {
            return Ok(false);
        }
        self.listener.news(ItemNews::Remote { item });
        self.publish_changed(item).await?;
        Ok(true)
    }

    async fn reserve(&self, cmd: &ReserveCmd) -> Result<ReserveReply, Error> {
        if cmd.buckets > 1 {
            let reply = self.reserve_bucketed(cmd).await?;
            self.tell_bucketed(&cmd.item_id, &reply);
            return Ok(reply);
        }
        // Reported by the batch's task ([`ReserveCaller`]).
        self.batches.reserve(cmd.clone()).await
    }

    async fn transition(&self, t: Transition, order_id: &str, user_id: &str) -> Result<TransitionReply, Error> {
        let Some((order_key, item_id)) = self.order_item(order_id, None).await? else {
            return Ok(TransitionReply::UnknownOrder);
        };
        let (name, script) = match t {
            Transition::Pay => ("pay", &self.scripts.pay),
            Transition::Cancel => ("cancel", &self.scripts.cancel),
        };
        let shard = shard_of(&item_id);
        let mut inv = script.prepare_invoke();
        order_keys(&mut inv, &order_key, &item_id);
        inv.arg(order_id)
            .arg(user_id)
            .arg(&item_id)
            .arg(self.settings.closed_order_ttl.as_secs().max(1))
            .arg(self.now_arg())
            .arg(self.floors.arg(shard));
        let parts = self.run(&item_id, name, inv).await?;
        let reply = transition_reply(&Reply {
            script: name,
            parts: &parts,
        })?;
        if matches!(reply, TransitionReply::Done { .. }) {
            self.wait_replicas(shard).await?;
        }
        match reply {
            TransitionReply::Done { status, stock_after } => self.moved(&item_id, status, Some(stock_after)).await,
            // Found overdue: this call expired it.
            TransitionReply::Closed {
                status: OrderStatus::Expired,
            } => self.moved(&item_id, OrderStatus::Expired, None).await,
            _ => {}
        }
        Ok(reply)
    }

    async fn settle(&self, op: Settle, order_id: &str, record: Option<&Order>) -> Result<TransitionReply, Error> {
        let Some((order_key, item_id)) = self.order_item(order_id, record).await? else {
            return Ok(TransitionReply::UnknownOrder);
        };
        let record = record.map_or_else(String::new, |r| OrderEvent::of(r, r.status, r.updated_ms).packed());
        let shard = shard_of(&item_id);
        let (name, script) = match op {
            Settle::Payment => ("settle", &self.scripts.settle),
            Settle::Refund { .. } => ("refund", &self.scripts.refund),
        };
        let mut inv = script.prepare_invoke();
        order_keys(&mut inv, &order_key, &item_id);
        inv.arg(order_id).arg(&item_id);
        if let Settle::Refund { restock } = op {
            inv.arg(if restock { "1" } else { "0" });
        }
        inv.arg(self.settings.closed_order_ttl.as_secs().max(1))
            .arg(self.now_arg())
            .arg(self.floors.arg(shard))
            .arg(record);
        let parts = self.run(&item_id, name, inv).await?;
        let reply = transition_reply(&Reply {
            script: name,
            parts: &parts,
        })?;
        if let TransitionReply::Done { status, stock_after } = reply {
            self.wait_replicas(shard).await?;
            // A late payment of an overdue order expired it first, in the same call.
            if status == OrderStatus::RefundDue && parts.get(3).and_then(int) == Some(1) {
                self.moved(&item_id, OrderStatus::Expired, None).await;
            }
            self.moved(&item_id, status, Some(stock_after)).await;
        }
        Ok(reply)
    }

    async fn expire(&self, order_id: &str, item_id: &str) -> Result<ExpireReply, Error> {
        let Some(order_key) = keys::order(order_id) else {
            return Ok(ExpireReply::UnknownOrder);
        };
        let shard = shard_of(item_id);
        let mut inv = self.scripts.expire.prepare_invoke();
        order_keys(&mut inv, &order_key, item_id);
        inv.arg(order_id)
            .arg(item_id)
            .arg(self.settings.closed_order_ttl.as_secs().max(1))
            .arg(self.now_arg())
            .arg(self.floors.arg(shard));
        let parts = self.run(item_id, "expire", inv).await?;
        let reply = expire_reply(&Reply {
            script: "expire",
            parts: &parts,
        })?;
        if matches!(reply, ExpireReply::Expired { .. }) {
            self.wait_replicas(shard).await?;
        }
        if let ExpireReply::Expired { stock_after } = reply {
            // Other instances hear it once per item per sweep ([`Self::expire_due`]).
            let (item, bucket) = whole_item_of(item_id);
            self.listener.news(ItemNews::Order {
                item,
                event: OrderStatus::Expired,
                stock: (!bucket).then_some(stock_after),
            });
        }
        Ok(reply)
    }

    async fn expire_due(&self, max: usize) -> Result<Vec<Expired>, Error> {
        let now = self.clock.now_ms();
        let mut expired = Vec::new();
        for shard in keys::all_shards() {
            let members: Vec<String> = self
                .query_shard(
                    shard,
                    redis::cmd("ZRANGEBYSCORE")
                        .arg(keys::deadlines(shard))
                        .arg("-inf")
                        .arg(now)
                        .arg("LIMIT")
                        .arg(0)
                        .arg(max),
                )
                .await?;
            // Concurrent calls on the multiplexed connection are pipelined.
            let calls = members
                .iter()
                .filter_map(|m| keys::split_deadline_member(m))
                .map(|(order_id, item_id)| async move { (order_id, item_id, self.expire(order_id, item_id).await) });
            for (order_id, item_id, reply) in futures_util::future::join_all(calls).await {
                if let ExpireReply::Expired { stock_after } = reply? {
                    expired.push(Expired {
                        order_id: order_id.to_owned(),
                        item_id: item_id.to_owned(),
                        stock_after,
                    });
                }
            }
        }
        let mut changed: Vec<&str> = expired.iter().map(|e| whole_item_of(&e.item_id).0).collect();
        changed.sort_unstable();
        changed.dedup();
        for item_id in changed {
            if let Err(e) = self.publish_changed(item_id).await {
                tracing::warn!(item = %item_id, cause = %e, "stock came back but other instances were not told");
            }
        }
        Ok(expired)
    }

    async fn order(&self, order_id: &str) -> Result<Option<Order>, Error> {
        let (Some(key), Some(shard)) = (keys::order(order_id), order_shard(order_id)) else {
            return Ok(None);
        };
        let h: HashMap<String, String> = self.query_shard(shard, redis::cmd("HGETALL").arg(key)).await?;
        if h.is_empty() {
            return Ok(None);
        }
        let mut order = order_from_hash(order_id, &h)?;
        // A bucket's order (`<item>#<b>`) is the item's to the outside.
        let (item, bucket) = whole_item_of(&order.item_id);
        if bucket {
            order.item_id = item.to_owned();
        }
        Ok(Some(order))
    }

    async fn catalog(&self) -> Result<Vec<String>, Error> {
        self.query(redis::cmd("SMEMBERS").arg(keys::CATALOG)).await
    }

    async fn ping(&self) -> Result<(), Error> {
        let _: String = self.query(&redis::cmd("PING")).await?;
        Ok(())
    }

    async fn prune(&self) -> Result<usize, Error> {
        Ok(0)
    }
}
