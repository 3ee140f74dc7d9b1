//! The persistence worker: carries order events from the shard streams to the database.
//!
//! One task per shard (a Redis Cluster script may only touch one slot, and so does this):
//! `XREADGROUP` a batch → decode → one transaction of forward-only upserts → `XACK`. Only
//! after the commit is an event acknowledged, so a crash anywhere means redelivery, never
//! loss; the upserts make redelivery harmless (invariant 4).
//!
//! - Blocking reads run on connections of their own from a bb8 pool
//!   ([`crate::engine::conn::Pool`]: one server's connection, or a cluster connection that
//!   reads each stream from the primary that owns it), never on the shared multiplexed
//!   connection (a `BLOCK` there would stall every request behind it, redis-rs #453, #643).
//!   Their response timeout is the Redis timeout plus [`MAX_BLOCK`], and every call has its
//!   own timeout too.
//! - Start-up drains this consumer's own pending entries first (the consumer name is stable
//!   across restarts: host name and listen port); `XAUTOCLAIM` takes over entries idle
//!   longer than `claim_idle` from consumers that died.
//! - An entry that cannot be decoded stays pending; once it has been delivered
//!   `max_deliveries` times it moves to the shard's dead-letter stream, with a metric and an
//!   error log, and the entries behind it are not held up.
//! - A database outage: the batch in hand is retried with capped, jittered exponential
//!   backoff while the stream buffers new events; `/readyz` reports the store degraded.
//! - Acknowledged entries are trimmed (`XTRIM MINID`), so Redis memory stays bounded.
//! - Each entry carries its shard's write mark (field `q`, [`crate::engine::seq`]): the
//!   highest one of a batch is recorded in the database in the batch's transaction, and
//!   raises this gateway's floor, so a Redis that loses these writes later is found out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use redis::Value;
use tokio::sync::watch;

use crate::clock::system_now_ms;
use crate::config::Config;
use crate::domain::{OrderEvent, TransferEvent};
use crate::engine::conn::{Pool, RedisConn};
use crate::engine::keys;
use crate::engine::redis::{RedisEngine, text};
use crate::engine::seq::{Floors, Mark};
use crate::error::Error;
use crate::ids::{bucket_id, shard_of};
use crate::lograte::BACKGROUND;
use crate::metrics;
use crate::retry::backoff;
use crate::shutdown::stopped;
use crate::store::Store;

/// Longest `BLOCK` (the pooled connections wait this much longer than the Redis timeout).
const MAX_BLOCK: Duration = Duration::from_millis(400);

/// Settings of the worker, from the configuration.
#[derive(Clone, Debug)]
pub struct WorkerSettings {
    pub consumer: String,
    pub batch: usize,
    /// How long an idle read waits for the first entry (`BLOCK`; returns at once when one
    /// arrives, so waiting long costs no latency, only fewer empty reads).
    pub block: Duration,
    /// After a read that did not fill a batch, how long to let the next one fill
    /// (`SECKILL_PERSIST_WAIT`): fewer, larger reads and acknowledgements for Redis, at most
    /// this much more persistence lag.
    pub fill_wait: Duration,
    pub claim_idle: Duration,
    pub max_deliveries: u64,
    pub timeout: Duration,
}

impl WorkerSettings {
    pub fn from_config(c: &Config) -> Self {
        WorkerSettings {
            consumer: c
                .consumer_name
                .clone()
                .unwrap_or_else(|| default_consumer(c.listen.port())),
            batch: c.persist_batch,
            block: MAX_BLOCK,
            fill_wait: c.persist_wait.min(MAX_BLOCK),
            claim_idle: c.claim_idle,
            max_deliveries: c.max_deliveries,
            timeout: c.redis_timeout + MAX_BLOCK,
        }
    }
}

/// Host name and port: stable across restarts of one instance, distinct between instances.
fn default_consumer(port: u16) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "gateway".into());
    format!("{host}:{port}")
}

/// A stream entry: its id and fields.
struct Entry {
    id: String,
    fields: HashMap<String, String>,
}

/// Entries of a reply shaped `[[id, [k, v, …]], …]` (XRANGE, XAUTOCLAIM's second element).
fn entries(v: &Value) -> Vec<Entry> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let Value::Array(pair) = item else {
                return None;
            };
            let id = text(pair.first()?)?;
            // A claimed entry deleted meanwhile comes back with nil fields.
            let fields = match pair.get(1)? {
                Value::Array(kv) => kv
                    .chunks(2)
                    .filter_map(|c| Some((text(c.first()?)?, text(c.get(1)?)?)))
                    .collect(),
                _ => HashMap::new(),
            };
            Some(Entry { id, fields })
        })
        .collect()
}

/// Entries of an XREADGROUP reply for one stream: `[[key, [entries]]]` (or nil).
fn read_entries(v: &Value) -> Vec<Entry> {
    let Value::Array(streams) = v else {
        return Vec::new();
    };
    streams
        .iter()
        .filter_map(|s| match s {
            Value::Array(kv) => kv.get(1).map(entries),
            _ => None,
        })
        .flatten()
        .collect()
}

/// Milliseconds part of a stream id.
pub fn id_ms(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}

struct ShardWorker {
    store: Arc<Store>,
    pool: Pool,
    shard: u32,
    stream: String,
    settings: WorkerSettings,
    floors: Arc<Floors>,
}

impl ShardWorker {
    async fn cmd(&self, cmd: &redis::Cmd) -> Result<Value, Error> {
        let mut conn = match tokio::time::timeout(self.settings.timeout, self.pool.get()).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => return Err(Error::RedisConnection(e.to_string())),
            Err(_) => return Err(Error::RedisTimeout),
        };
        match tokio::time::timeout(self.settings.timeout, cmd.query_async::<Value>(&mut *conn)).await {
            Ok(r) => r.map_err(Error::from),
            Err(_) => Err(Error::RedisTimeout),
        }
    }

    async fn ensure_group(&self) -> Result<(), Error> {
        let r = self
            .cmd(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(&self.stream)
                    .arg(keys::GROUP)
                    .arg("0")
                    .arg("MKSTREAM"),
            )
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(Error::RedisRefused { code, .. }) if code == "BUSYGROUP" => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `>`: new entries; `0`: this consumer's pending entries (redelivered).
    async fn read(&self, from: &str, block: bool) -> Result<Vec<Entry>, Error> {
        let mut c = redis::cmd("XREADGROUP");
        c.arg("GROUP")
            .arg(keys::GROUP)
            .arg(&self.settings.consumer)
            .arg("COUNT")
            .arg(self.settings.batch);
        if block {
            c.arg("BLOCK").arg(self.settings.block.as_millis() as u64);
        }
        c.arg("STREAMS").arg(&self.stream).arg(from);
        Ok(read_entries(&self.cmd(&c).await?))
    }

    /// Take over entries idle longer than `claim_idle` (their consumer died).
    async fn autoclaim(&self) -> Result<Vec<Entry>, Error> {
        let reply = self
            .cmd(
                redis::cmd("XAUTOCLAIM")
                    .arg(&self.stream)
                    .arg(keys::GROUP)
                    .arg(&self.settings.consumer)
                    .arg(self.settings.claim_idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(self.settings.batch),
            )
            .await?;
        Ok(match &reply {
            Value::Array(parts) => parts.get(1).map(entries).unwrap_or_default(),
            _ => Vec::new(),
        })
    }

    /// Delivery counts of this consumer's pending entries.
    async fn deliveries(&self) -> Result<HashMap<String, u64>, Error> {
        let reply = self
            .cmd(
                redis::cmd("XPENDING")
                    .arg(&self.stream)
                    .arg(keys::GROUP)
                    .arg("-")
                    .arg("+")
                    .arg(self.settings.batch)
                    .arg(&self.settings.consumer),
            )
            .await?;
        let Value::Array(rows) = reply else {
            return Ok(HashMap::new());
        };
        Ok(rows
            .iter()
            .filter_map(|r| match r {
                Value::Array(f) => Some((text(f.first()?)?, text(f.get(3)?)?.parse().ok()?)),
                _ => None,
            })
            .collect())
    }

    async fn ack(&self, ids: &[String]) -> Result<(), Error> {
        if ids.is_empty() {
            return Ok(());
        }
        self.cmd(redis::cmd("XACK").arg(&self.stream).arg(keys::GROUP).arg(ids))
            .await?;
        Ok(())
    }

    /// Persist a batch: decode, write with retries, acknowledge. Undecodable entries stay
    /// pending until they have been delivered `max_deliveries` times, then go to the
    /// dead-letter stream.
    async fn process(&self, batch: Vec<Entry>, shutdown: &watch::Receiver<bool>) -> Result<usize, Error> {
        if batch.is_empty() {
            return Ok(0);
        }
        let mut events = Vec::with_capacity(batch.len());
        let mut transfers = Vec::new();
        let mut ids = Vec::with_capacity(batch.len());
        let mut poison = Vec::new();
        // Entries written before the marks existed have none.
        let mut mark: Option<Mark> = None;
        for e in &batch {
            // An entry is a transfer step between stock buckets (field `x`) or order events.
            let decoded = match TransferEvent::from_fields(&e.fields) {
                Some(t) => t.map(|t| transfers.push(t)),
                None => OrderEvent::from_fields(&e.fields).map(|evs| events.extend(evs)),
            };
            match decoded {
                Ok(()) => {
                    ids.push(e.id.clone());
                    mark = mark.max(e.fields.get("q").and_then(|q| Mark::parse(q)));
                }
                Err(why) => poison.push((e, why)),
            }
        }
        if !ids.is_empty() {
            // This shard's mark, and those its credits carry for their donors' shards.
            let mut marks: Vec<(u32, Mark)> = mark.map(|m| (self.shard, m)).into_iter().collect();
            for t in &transfers {
                if let Some(m) = t.donor_mark {
                    marks.push((shard_of(&bucket_id(&t.item_id, t.from_bucket)), m));
                }
            }
            self.write(&events, &transfers, &marks, shutdown).await?;
            for (shard, mark) in marks {
                self.floors.raise(shard, mark);
            }
            // Rows: order events and transfer steps alike (a transfer-only batch is not empty).
            metrics::histogram!(metrics::PERSIST_BATCH_SIZE).record((events.len() + transfers.len()) as f64);
            self.ack(&ids).await?;
        }
        if !poison.is_empty() {
            let counts = self.deliveries().await?;
            for (e, why) in poison {
                let n = counts.get(&e.id).copied().unwrap_or(0);
                if n >= self.settings.max_deliveries {
                    self.dead_letter(e, &why, n).await?;
                } else {
                    tracing::warn!(shard = self.shard, entry = %e.id, deliveries = n, cause = %why, "undecodable order event; will retry");
                }
            }
        }
        Ok(events.len())
    }

    async fn dead_letter(&self, e: &Entry, why: &str, deliveries: u64) -> Result<(), Error> {
        let mut c = redis::cmd("XADD");
        c.arg(keys::dead_letters(self.shard))
            .arg("*")
            .arg("source_id")
            .arg(&e.id)
            .arg("error")
            .arg(why);
        c.arg("deliveries").arg(deliveries);
        for (k, v) in &e.fields {
            c.arg(format!("f:{k}")).arg(v);
        }
        self.cmd(&c).await?;
        self.ack(std::slice::from_ref(&e.id)).await?;
        metrics::counter!(metrics::DEAD_LETTERS).increment(1);
        tracing::error!(shard = self.shard, entry = %e.id, cause = why, deliveries, "order event moved to the dead-letter stream");
        Ok(())
    }

    /// Write until it works (the stream keeps buffering meanwhile), or shutdown.
    async fn write(
        &self,
        events: &[OrderEvent],
        transfers: &[TransferEvent],
        marks: &[(u32, Mark)],
        shutdown: &watch::Receiver<bool>,
    ) -> Result<(), Error> {
        let mut delays = backoff();
        loop {
            match self.store.apply_marked(events, transfers, marks).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if let Some(suppressed) = BACKGROUND.admit("persist") {
                        tracing::warn!(shard = self.shard, events = events.len(), cause = %e, suppressed, "persisting a batch failed; retrying");
                    }
                    if *shutdown.borrow() {
                        return Err(e);
                    }
                    let mut stop = shutdown.clone();
                    tokio::select! {
                        _ = tokio::time::sleep(delays.next().unwrap_or(crate::retry::MAX_DELAY)) => {}
                        _ = stopped(&mut stop) => return Err(e),
                    }
                }
            }
        }
    }

    async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut delays = backoff();
        let mut started = false;
        let mut last_claim = std::time::Instant::now();
        loop {
            if *shutdown.borrow() {
                return;
            }
            let step = async {
                if !started {
                    self.ensure_group().await?;
                    // Our own pending entries first: what we read before a crash or restart.
                    loop {
                        let mine = self.read("0", false).await?;
                        if mine.is_empty() || self.process(mine, &shutdown).await? == 0 {
                            break;
                        }
                    }
                    started = true;
                }
                if last_claim.elapsed() >= self.settings.claim_idle / 2 {
                    last_claim = std::time::Instant::now();
                    let claimed = self.autoclaim().await?;
                    if !claimed.is_empty() {
                        tracing::info!(
                            shard = self.shard,
                            entries = claimed.len(),
                            "claimed entries of a dead consumer"
                        );
                        self.process(claimed, &shutdown).await?;
                    }
                    // Our own undecodable entries: deliver again so they reach the dead-letter
                    // threshold without holding anything up.
                    let mine = self.read("0", false).await?;
                    self.process(mine, &shutdown).await?;
                }
                let fresh = self.read(">", true).await?;
                let partial = !fresh.is_empty() && fresh.len() < self.settings.batch;
                self.process(fresh, &shutdown).await?;
                if partial && !self.settings.fill_wait.is_zero() {
                    tokio::time::sleep(self.settings.fill_wait).await;
                }
                Ok::<(), Error>(())
            };
            // A step is never cut off by shutdown: the batch in hand is finished and
            // acknowledged first (the store retry loop itself gives up on shutdown).
            match step.await {
                Ok(()) => delays = backoff(),
                Err(e) => {
                    if let Some(suppressed) = BACKGROUND.admit("worker step") {
                        tracing::warn!(shard = self.shard, cause = %e, suppressed, "persistence worker step failed; retrying");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delays.next().unwrap_or(crate::retry::MAX_DELAY)) => {}
                        _ = stopped(&mut shutdown) => return,
                    }
                }
            }
        }
    }
}

/// The `persist` group of one stream, as `XINFO GROUPS` reports it.
pub(crate) struct GroupInfo {
    /// Entries delivered but not acknowledged.
    pub pending: u64,
    /// Entries not delivered yet.
    pub lag: u64,
    pub last_delivered: Option<String>,
}

/// `XINFO GROUPS` of a stream, for the `persist` group; `None` when there is no such group.
pub(crate) async fn group_info(conn: &mut RedisConn, stream: &str) -> Result<Option<GroupInfo>, Error> {
    let groups: Value = redis::cmd("XINFO").arg("GROUPS").arg(stream).query_async(conn).await?;
    let Value::Array(groups) = groups else {
        return Ok(None);
    };
    for g in groups {
        let fields: HashMap<String, Value> = match g {
            Value::Array(kv) => kv
                .chunks(2)
                .filter_map(|c| Some((text(&c[0])?, c.get(1)?.clone())))
                .collect(),
            Value::Map(kv) => kv.into_iter().filter_map(|(k, v)| Some((text(&k)?, v))).collect(),
            _ => continue,
        };
        if fields.get("name").and_then(text).as_deref() != Some(keys::GROUP) {
            continue;
        }
        let num = |k: &str| {
            fields
                .get(k)
                .and_then(text)
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        return Ok(Some(GroupInfo {
            pending: num("pending"),
            lag: num("lag"),
            last_delivered: fields.get("last-delivered-id").and_then(text),
        }));
    }
    Ok(None)
}

/// The backlog of one shard: entries not yet acknowledged, and the oldest one's id.
async fn shard_backlog(conn: &mut RedisConn, stream: &str) -> Result<(u64, Option<String>, Option<String>), Error> {
    let Some(group) = group_info(conn, stream).await? else {
        return Ok((0, None, None));
    };
    let oldest_pending = if group.pending > 0 {
        let summary: Value = redis::cmd("XPENDING")
            .arg(stream)
            .arg(keys::GROUP)
            .query_async(conn)
            .await?;
        match summary {
            Value::Array(s) => s.get(1).and_then(text),
            _ => None,
        }
    } else {
        None
    };
    Ok((group.pending + group.lag, oldest_pending, group.last_delivered))
}

/// Every couple of seconds: publish pending and lag, and trim what every reader has acknowledged.
async fn monitor(mut conn: RedisConn, timeout: Duration, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stopped(&mut shutdown) => return,
        }
        let mut total = 0u64;
        let mut oldest: Option<i64> = None;
        let mut ok = true;
        for shard in keys::all_shards() {
            let stream = keys::events(shard);
            let r = tokio::time::timeout(timeout * 2, shard_backlog(&mut conn, &stream)).await;
            let Ok(Ok((backlog, oldest_pending, last_delivered))) = r else {
                ok = false;
                continue;
            };
            total += backlog;
            // The oldest unpersisted event: the oldest pending one, else the first one not
            // yet delivered.
            let oldest_id = match &oldest_pending {
                Some(id) => Some(id.clone()),
                None if backlog > 0 => {
                    let start = last_delivered
                        .as_ref()
                        .map(|l| format!("({l}"))
                        .unwrap_or_else(|| "-".into());
                    let first: Result<Value, _> = redis::cmd("XRANGE")
                        .arg(&stream)
                        .arg(start)
                        .arg("+")
                        .arg("COUNT")
                        .arg(1)
                        .query_async(&mut conn)
                        .await;
                    first.ok().and_then(|v| entries(&v).into_iter().next()).map(|e| e.id)
                }
                None => None,
            };
            if let Some(ms) = oldest_id.as_deref().and_then(id_ms) {
                oldest = Some(oldest.map_or(ms, |o: i64| o.min(ms)));
            }
            // Trim below the oldest entry still needed: the oldest pending one, else the last
            // delivered (everything before it is acknowledged; anything added since has a
            // larger id, so nothing unread is ever trimmed).
            if let Some(min_id) = oldest_pending.or(last_delivered).filter(|id| id != "0-0") {
                let _: Result<Value, _> = redis::cmd("XTRIM")
                    .arg(&stream)
                    .arg("MINID")
                    .arg(min_id)
                    .query_async(&mut conn)
                    .await;
            }
        }
        if ok {
            metrics::gauge!(metrics::STREAM_PENDING).set(total as f64);
            let lag = oldest.map_or(0.0, |ms| ((system_now_ms() - ms).max(0) as f64) / 1000.0);
            metrics::gauge!(metrics::PERSIST_LAG).set(lag);
        }
    }
}

/// Start one worker per shard plus the monitor.
pub fn spawn(
    engine: &RedisEngine,
    store: Arc<Store>,
    settings: WorkerSettings,
    shutdown: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let target = engine.target();
    let pool = target.pool(keys::all_shards().count() as u32 + 2, target.timeout + MAX_BLOCK);
    tracing::info!(consumer = %settings.consumer, "persistence worker starting");
    let mut tasks: Vec<_> = keys::all_shards()
        .map(|shard| {
            let w = ShardWorker {
                store: store.clone(),
                pool: pool.clone(),
                shard,
                stream: keys::events(shard),
                settings: settings.clone(),
                floors: engine.floors().clone(),
            };
            tokio::spawn(w.run(shutdown.clone()))
        })
        .collect();
    tasks.push(tokio::spawn(monitor(engine.connection(), settings.timeout, shutdown)));
    tasks
}
