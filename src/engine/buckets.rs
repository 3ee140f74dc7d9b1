//! Stock buckets on Redis (issue 13; `docs/internals.md`, "Stock buckets"): an item of
//! `buckets: B > 1` keeps its stock in buckets 1..=B, each an item of its own to the scripts
//! (`<item>#<b>`, spread over the shards: [`crate::ids::BUCKET_OFFSETS`]), so one hot item
//! sells on several Redis cores.
//! The item's own hash keeps its definition, `stock 0` (nothing can be sold there) and the
//! whole stock in `item_total`.
//!
//! A shopper reserves in their home bucket ([`home_bucket`]); when it is empty, units move
//! there from the other buckets in turn (a transfer: [`RedisEngine::transfer`]) and the
//! reservation is made again. `sold_out` is answered only when no other bucket gives a unit,
//! nothing is in transit, and a second read of every bucket finds no stock.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::keys;
use super::redis::{RedisEngine, Reply, item_from_hash};
use super::seq::Mark;
use super::{ItemNews, ItemSpec, ItemState, OrderStatus, PutReply, ReserveCmd, ReserveReply};
use crate::error::Error;
use crate::ids::{bucket_id, home_bucket, shard_of, split_bucket, stock_buckets};
use crate::shutdown::stopped;
use crate::store::TransferRecord;

/// A transfer record older than this is replayed by whoever finds it
/// ([`RedisEngine::recover_transfers`]): its gateway died between the two steps or gave up.
/// The gateway that took the units credits them itself only within half of it, so the two
/// never race for a record whose `xin` side could already be forgotten.
fn stale_after(timeout: Duration) -> Duration {
    (timeout * 5).max(Duration::from_secs(5))
}

/// How long a destination remembers a credited transfer (`xin`): far longer than any replay
/// of the credit can take after its donor's record was read (a replay is one Redis call,
/// bounded by the call timeout). A credit replayed after its `xin` record is gone would
/// credit the units twice.
fn xin_kept(timeout: Duration) -> Duration {
    stale_after(timeout) + Duration::from_secs(60)
}

/// The whole item as its buckets hold it, for `GET` item and stats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BucketState {
    pub bucket: u32,
    pub state: ItemState,
    /// Units taken out of this bucket for another one, not yet known to be there.
    pub in_transit: i64,
}

/// What bringing units to an empty home bucket came to.
enum Refill {
    /// Units arrived (or another bucket holds some): reserve again.
    Moved,
    /// Every bucket is empty and nothing is in transit: `stock` units are left in all
    /// (fewer than the request asked for).
    SoldOut { stock: i64 },
    /// Units are on their way between buckets: wait a moment and look again.
    InTransit,
}

/// One step of a transfer, as its donor answered it.
enum Out {
    Taken,
    Empty { in_transit: i64 },
}

/// A transfer record (`xout` or `xin`): `<units>|<other bucket>|<at_ms>`, and on a donor's
/// record written since marks were carried, `|<E:S>` (the mark of the donor's step).
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Record<'a> {
    pub units: i64,
    pub other: &'a str,
    pub at_ms: i64,
    pub mark: Option<Mark>,
}

pub(crate) fn record(raw: &str) -> Option<Record<'_>> {
    let mut parts = raw.split('|');
    let units = parts.next()?.parse().ok()?;
    let other = parts.next()?;
    let at_ms = parts.next()?.parse().ok()?;
    let mark = match parts.next() {
        None => None,
        Some(m) => Some(Mark::parse(m)?),
    };
    if parts.next().is_some() {
        return None;
    }
    Some(Record {
        units,
        other,
        at_ms,
        mark,
    })
}

impl RedisEngine {
    /// Create a bucketed item: every bucket with its share (the remainder to the first
    /// ones), then the item's own hash last, so the item exists only once all its buckets
    /// do (a PUT that dies half-way is simply sent again). An existing item keeps its
    /// buckets and its stock ([`PutReply::BucketsFixed`]); the same definition again is
    /// answered as stored.
    pub(super) async fn put_bucketed(&self, spec: &ItemSpec, existing: Option<ItemState>) -> Result<PutReply, Error> {
        if let Some(current) = existing {
            // The same definition again (the pause switch is not part of one).
            let same = ItemSpec {
                paused: current.spec.paused,
                ..spec.clone()
            };
            return Ok(if current.spec == same {
                PutReply::Stored { stock: current.stock }
            } else {
                PutReply::BucketsFixed {
                    buckets: current.spec.buckets,
                }
            });
        }
        for bucket in stock_buckets(spec.buckets) {
            let share = initial_share(spec.stock_total, spec.buckets, bucket);
            self.put_one(&bucket_id(&spec.item_id, bucket), spec, share).await?;
        }
        self.put_one(&spec.item_id, spec, 0).await?;
        self.query_shard::<i64>(
            shard_of(&spec.item_id),
            redis::cmd("HSET")
                .arg(keys::item(&spec.item_id))
                .arg("item_total")
                .arg(spec.stock_total),
        )
        .await?;
        Ok(PutReply::Stored {
            stock: spec.stock_total,
        })
    }

    /// `put_item.lua` on one bucket (or the item's own hash) with `stock_total`.
    async fn put_one(&self, id: &str, spec: &ItemSpec, stock_total: i64) -> Result<(), Error> {
        match self.put_script(id, spec, stock_total).await? {
            PutReply::Stored { .. } => Ok(()),
            // A new item's bucket holds nothing yet, unless a half-done PUT left one with
            // orders (then its share cannot go below them).
            PutReply::BelowHeld { held } => Err(Error::Internal(format!("bucket {id} already holds {held} units"))),
            other => Err(Error::ScriptReply(format!("put_item on {id}: {other:?}"))),
        }
    }

    /// Every bucket of an item, read at once (pipelined on the shared connection); the
    /// item's own hash is `head`.
    pub async fn bucket_states(&self, head: &ItemState) -> Result<Vec<BucketState>, Error> {
        let item = head.spec.item_id.as_str();
        let reads = stock_buckets(head.spec.buckets).map(|b| async move {
            let id = bucket_id(item, b);
            let shard = shard_of(&id);
            let h: HashMap<String, String> = self
                .query_shard(shard, redis::cmd("HGETALL").arg(keys::item(&id)))
                .await?;
            let out: Vec<String> = self
                .query_shard(shard, redis::cmd("HVALS").arg(keys::transfers_out(&id)))
                .await?;
            if h.is_empty() {
                return Err(Error::Internal(format!("bucket {id} of a stored item is missing")));
            }
            Ok(BucketState {
                bucket: b,
                state: item_from_hash(&id, &h)?,
                in_transit: out.iter().filter_map(|r| record(r)).map(|r| r.units).sum(),
            })
        });
        futures_util::future::join_all(reads).await.into_iter().collect()
    }

    /// A bucketed item as a whole: its definition (the whole stock) from its own hash, the
    /// stock and counters summed over its buckets: one `HMGET` per bucket, pipelined (`GET`
    /// item of a selling item reads this on every call; stats add the transfer records,
    /// [`Self::bucket_states`]).
    pub(super) async fn whole_item(&self, head: ItemState, h: &HashMap<String, String>) -> Result<ItemState, Error> {
        const FIELDS: [&str; 7] = [
            "stock",
            "reserved",
            "paid",
            "cancelled",
            "expired",
            "stock_total",
            "refunded",
        ];
        let item = head.spec.item_id.as_str();
        let reads = stock_buckets(head.spec.buckets).map(|b| async move {
            let id = bucket_id(item, b);
            let v: Vec<Option<i64>> = self
                .query_shard(shard_of(&id), redis::cmd("HMGET").arg(keys::item(&id)).arg(&FIELDS[..]))
                .await?;
            Ok::<_, Error>(v)
        });
        let mut sums = [0i64; 7];
        for r in futures_util::future::join_all(reads).await {
            for (sum, v) in sums.iter_mut().zip(r?) {
                *sum += v.unwrap_or(0);
            }
        }
        let mut whole = head;
        whole.stock = sums[0];
        whole.reserved = sums[1];
        whole.paid = sums[2];
        whole.cancelled = sums[3];
        whole.expired = sums[4];
        whole.refunded = sums[6];
        // Written with the item; a hash without it (a PUT that died before its last step)
        // counts the shares, which leave out units in transit.
        whole.spec.stock_total = h.get("item_total").and_then(|v| v.parse().ok()).unwrap_or(sums[5]);
        Ok(whole)
    }

    /// Reserve in the shopper's home bucket; when it is empty, bring units from the other
    /// buckets and reserve again. Answers `sold_out` only when every bucket is empty and
    /// nothing is in transit; 503 ([`Error::InTransit`]) when units stay in transit for
    /// the whole of the request's time.
    pub(super) async fn reserve_bucketed(&self, cmd: &ReserveCmd) -> Result<ReserveReply, Error> {
        let item = cmd.item_id.as_str();
        let home = home_bucket(&cmd.user_id, cmd.buckets);
        let mut at_home = cmd.clone();
        at_home.item_id = bucket_id(item, home);
        let deadline = Instant::now() + self.redis.timeout * 2;
        loop {
            let reply = self.batches.reserve(at_home.clone()).await?;
            let ReserveReply::SoldOut { .. } = reply else {
                return Ok(reply);
            };
            match self.refill(item, home, cmd.buckets, cmd.qty).await? {
                Refill::SoldOut { stock } => return Ok(ReserveReply::SoldOut { stock }),
                Refill::Moved | Refill::InTransit if Instant::now() >= deadline => return Err(Error::InTransit),
                Refill::Moved => {}
                Refill::InTransit => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// The home bucket is empty: take units from the other buckets in turn, starting after
    /// home (so the shoppers of different buckets ask different donors first).
    async fn refill(&self, item: &str, home: u32, buckets: u32, qty: i64) -> Result<Refill, Error> {
        let mut in_transit = 0;
        for step in 1..buckets {
            let donor = (home - 1 + step) % buckets + 1;
            match self.transfer(item, donor, home, qty).await? {
                Some(Out::Taken) => return Ok(Refill::Moved),
                Some(Out::Empty { in_transit: n }) => in_transit += n,
                // Taken, but not credited by us in time: in transit until recovered.
                None => in_transit += 1,
            }
        }
        let home_id = bucket_id(item, home);
        let home_out: i64 = self
            .query_shard(
                shard_of(&home_id),
                redis::cmd("HLEN").arg(keys::transfers_out(&home_id)),
            )
            .await?;
        if in_transit + home_out > 0 {
            if let Err(e) = self.recover_transfers(item, buckets).await {
                tracing::warn!(item, cause = %e, "transfers in transit not recovered");
            }
            return Ok(Refill::InTransit);
        }
        // Every donor was empty when asked. A unit may have moved into a bucket after it was
        // asked and out of view of the others since: read every bucket once more.
        let stocks = stock_buckets(buckets).map(|b| async move {
            let id = bucket_id(item, b);
            let stock: Option<i64> = self
                .query_shard(shard_of(&id), redis::cmd("HGET").arg(keys::item(&id)).arg("stock"))
                .await?;
            Ok::<_, Error>((b, stock.unwrap_or(0)))
        });
        let mut left = 0;
        for r in futures_util::future::join_all(stocks).await {
            let (b, stock) = r?;
            // Units outside home to move, or enough at home now (a cancellation): again.
            if (b != home && stock > 0) || (b == home && stock >= qty) {
                return Ok(Refill::Moved);
            }
            left += stock;
        }
        Ok(Refill::SoldOut { stock: left })
    }

    /// Move up to `want` units from bucket `from` to bucket `to` of an item: take them out
    /// of the donor (recorded there), wait for its replicas, credit the destination (once,
    /// by transfer id), wait for its replicas, and forget the donor's record. `None` when
    /// the units were taken but are left for recovery (the credit came too late to be sent
    /// safely by us).
    async fn transfer(&self, item: &str, from: u32, to: u32, want: i64) -> Result<Option<Out>, Error> {
        let (donor, dest) = (bucket_id(item, from), bucket_id(item, to));
        let id = uuid::Uuid::now_v7().simple().to_string();
        let started = Instant::now();
        let (d_shard, t_shard) = (shard_of(&donor), shard_of(&dest));
        let mut inv = self.scripts.transfer_out.prepare_invoke();
        inv.key(keys::item(&donor))
            .key(keys::transfers_out(&donor))
            .key(keys::events(d_shard))
            .key(keys::seq(d_shard))
            .arg(&id)
            .arg(want)
            .arg(&dest)
            .arg(self.clock.now_ms()) // the transfer scripts take a time, never Redis TIME: it is their record's
            .arg(self.floors.arg(d_shard));
        let parts = self.run(&donor, "transfer_out", inv).await?;
        let r = Reply {
            script: "transfer_out",
            parts: &parts,
        };
        let (units, mark) = match r.status()?.as_str() {
            // The mark is "" on a replay of a record older than marks.
            "taken" => (r.int(1)?, r.text(3).ok().and_then(|m| Mark::parse(&m))),
            "empty" => return Ok(Some(Out::Empty { in_transit: r.int(1)? })),
            // A bucket missing: nothing to take from it.
            "unknown_item" => return Ok(Some(Out::Empty { in_transit: 0 })),
            other => return Err(Error::ScriptReply(format!("transfer_out: unknown reply {other}"))),
        };
        self.wait_replicas(d_shard).await?;
        if started.elapsed() >= stale_after(self.redis.timeout) / 2 {
            return Ok(None);
        }
        self.credit(&id, &donor, mark, &dest, units).await?;
        self.wait_replicas(t_shard).await?;
        self.forget(&keys::transfers_out(&donor), &donor, &id).await?;
        Ok(Some(Out::Taken))
    }

    /// `transfer_in.lua`: credit `units` of transfer `id` from `donor` to `dest`, unless done;
    /// `mark` is the donor step's, carried in the credit's event (`None`: not known).
    async fn credit(&self, id: &str, donor: &str, mark: Option<Mark>, dest: &str, units: i64) -> Result<(), Error> {
        let shard = shard_of(dest);
        let mut inv = self.scripts.transfer_in.prepare_invoke();
        inv.key(keys::item(dest))
            .key(keys::transfers_in(dest))
            .key(keys::events(shard))
            .key(keys::seq(shard))
            .arg(id)
            .arg(units)
            .arg(donor)
            .arg(self.clock.now_ms()) // the transfer scripts take a time, never Redis TIME: it is their record's
            .arg(self.floors.arg(shard))
            .arg(mark.map(|m| m.to_string()).unwrap_or_default());
        let parts = self.run(dest, "transfer_in", inv).await?;
        match (Reply {
            script: "transfer_in",
            parts: &parts,
        })
        .status()?
        .as_str()
        {
            "credited" | "already" => Ok(()),
            "unknown_item" => Err(Error::Internal(format!("transfer {id}: bucket {dest} is missing"))),
            other => Err(Error::ScriptReply(format!("transfer_in: unknown reply {other}"))),
        }
    }

    /// `transfer_forget.lua`: drop record `id` from `key`, a transfer hash of `bucket`.
    async fn forget(&self, key: &str, bucket: &str, id: &str) -> Result<(), Error> {
        let mut inv = self.scripts.transfer_forget.prepare_invoke();
        inv.key(key).arg(id);
        self.run(bucket, "transfer_forget", inv).await?;
        Ok(())
    }

    /// Finish the transfers of an item whose gateway died between the two steps (or left
    /// them, [`Self::transfer`]): every donor record older than [`stale_after`] is credited
    /// to its destination (a no-op when it already was) and forgotten; every destination
    /// record older than [`xin_kept`] whose donor record is gone is forgotten. Returns the
    /// transfers finished.
    pub async fn recover_transfers(&self, item: &str, buckets: u32) -> Result<usize, Error> {
        let now = self.clock.now_ms();
        let stale = stale_after(self.redis.timeout).as_millis() as i64;
        let kept = xin_kept(self.redis.timeout).as_millis() as i64;
        let mut finished = 0;
        for b in stock_buckets(buckets) {
            let id = bucket_id(item, b);
            let shard = shard_of(&id);
            let out: HashMap<String, String> = self
                .query_shard(shard, redis::cmd("HGETALL").arg(keys::transfers_out(&id)))
                .await?;
            for (tid, raw) in &out {
                let Some(Record {
                    units,
                    other: dest,
                    at_ms,
                    mark,
                }) = record(raw)
                else {
                    tracing::error!(bucket = %id, transfer = %tid, record = %raw, "malformed transfer record left alone");
                    continue;
                };
                if now - at_ms < stale || split_bucket(dest).0 != item {
                    continue;
                }
                tracing::info!(transfer = %tid, from = %id, to = %dest, units, "finishing a transfer left in transit");
                self.credit(tid, &id, mark, dest, units).await?;
                let t_shard = shard_of(dest);
                self.wait_replicas(t_shard).await?;
                self.forget(&keys::transfers_out(&id), &id, tid).await?;
                finished += 1;
            }
            let credited: HashMap<String, String> = self
                .query_shard(shard, redis::cmd("HGETALL").arg(keys::transfers_in(&id)))
                .await?;
            for (tid, raw) in &credited {
                let Some(Record {
                    other: donor, at_ms, ..
                }) = record(raw)
                else {
                    continue;
                };
                if now - at_ms < kept {
                    continue;
                }
                let open: bool = self
                    .query_shard(
                        shard_of(donor),
                        redis::cmd("HEXISTS").arg(keys::transfers_out(donor)).arg(tid),
                    )
                    .await?;
                if !open {
                    self.forget(&keys::transfers_in(&id), &id, tid).await?;
                }
            }
        }
        Ok(finished)
    }

    /// Every few seconds, finish the transfers left in transit of every bucketed item (a
    /// gateway that died mid-transfer leaves them; any gateway finishes them), until
    /// shutdown.
    pub async fn keep_transfers_moving(&self, mut shutdown: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(stale_after(self.redis.timeout) / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = self.recover_all_transfers().await {
                        tracing::debug!(cause = %e, "transfer recovery pass failed");
                    }
                }
                _ = stopped(&mut shutdown) => return,
            }
        }
    }

    async fn recover_all_transfers(&self) -> Result<(), Error> {
        use super::StockEngine;
        let items = self.catalog().await?;
        let reads = items.iter().map(|item| async move {
            let b: Option<String> = self
                .query_shard(shard_of(item), redis::cmd("HGET").arg(keys::item(item)).arg("buckets"))
                .await?;
            Ok::<_, Error>((item, b.and_then(|b| b.parse::<u32>().ok()).unwrap_or(1)))
        });
        for r in futures_util::future::join_all(reads).await {
            let (item, buckets) = r?;
            if buckets > 1 {
                self.recover_transfers(item, buckets).await?;
            }
        }
        Ok(())
    }

    /// What a bucketed reservation tells the gateway about the whole item: an order (no
    /// stock figure: the reply's is its bucket's), or sold out when the whole item is.
    pub(super) fn tell_bucketed(&self, item: &str, reply: &ReserveReply) {
        match reply {
            ReserveReply::Reserved { .. } => self.listener.news(ItemNews::Order {
                item,
                event: OrderStatus::Reserved,
                stock: None,
            }),
            ReserveReply::SoldOut { stock: 0 } => self.listener.news(ItemNews::SoldOut { item }),
            _ => {}
        }
    }
}

/// Bucket `bucket`'s share of `total` units over `buckets` when the item is created: even,
/// the remainder one each to the first buckets.
pub fn initial_share(total: i64, buckets: u32, bucket: u32) -> i64 {
    let b = i64::from(buckets.max(1));
    total / b + i64::from(i64::from(bucket) <= total % b)
}

/// An item as the engine items it is stored in, from the database (the state-loss rebuild,
/// [`crate::orders::repair`]): the item itself; for `buckets` > 1 its own hash holds no
/// stock (`stock_total` 0, the whole in the returned `item_total`) and each bucket its
/// initial share plus the transfers it received, less those it gave (given from the first
/// step on: units in transit are the donor's no more).
pub fn engine_items(spec: &ItemSpec, transfers: &[TransferRecord]) -> Vec<(ItemSpec, Option<i64>)> {
    if spec.buckets <= 1 {
        return vec![(spec.clone(), None)];
    }
    let mut out = vec![(
        ItemSpec {
            stock_total: 0,
            ..spec.clone()
        },
        Some(spec.stock_total),
    )];
    for b in stock_buckets(spec.buckets) {
        let moved: i64 = transfers
            .iter()
            .map(|t| {
                // A credit recorded without its donor's step (that event lost with a Redis
                // that restarted from an older file) was given all the same.
                let gave = if t.from_bucket == i64::from(b) && (t.out_ms.is_some() || t.in_ms.is_some()) {
                    t.units
                } else {
                    0
                };
                let got = if t.to_bucket == i64::from(b) && t.in_ms.is_some() {
                    t.units
                } else {
                    0
                };
                got - gave
            })
            .sum();
        out.push((
            ItemSpec {
                item_id: bucket_id(&spec.item_id, b),
                stock_total: initial_share(spec.stock_total, spec.buckets, b) + moved,
                ..spec.clone()
            },
            None,
        ));
    }
    out
}

/// An id the engine handed around (an order's `item_id` in Redis, a deadline member) as the
/// item it belongs to, and whether a stock figure about it is a bucket's (not the item's).
pub(crate) fn whole_item_of(id: &str) -> (&str, bool) {
    let (item, bucket) = split_bucket(id);
    (item, bucket > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transfer_record_reads_with_or_without_its_mark() {
        let old = record("3|hot#2|1700000000000").expect("a record without a mark");
        assert_eq!(
            (old.units, old.other, old.at_ms, old.mark),
            (3, "hot#2", 1_700_000_000_000, None)
        );
        let new = record("3|hot#2|1700000000000|1:42").expect("a record with a mark");
        assert_eq!(new.mark, Some(Mark { epoch: 1, seq: 42 }));
        for bad in [
            "3|hot#2",
            "x|hot#2|1",
            "3|hot#2|soon",
            "3|hot#2|1|42",
            "3|hot#2|1|1:2|more",
        ] {
            assert_eq!(record(bad), None, "{bad}");
        }
    }

    /// A credit the database holds without its donor's step (that event lost with a Redis
    /// that restarted from an older file) is taken from the donor all the same: the units
    /// are counted once, in the destination.
    #[test]
    fn a_bucket_gave_what_any_persisted_step_of_its_transfer_says() {
        let spec = ItemSpec {
            item_id: "hot".into(),
            name: "hot".into(),
            price_cents: 100,
            stock_total: 30,
            per_user_limit: 1,
            starts_ms: 0,
            ends_ms: 1,
            buckets: 3,
            paused: false,
        };
        let step = |id: &str, out_ms: Option<i64>, in_ms: Option<i64>| TransferRecord {
            transfer_id: id.into(),
            from_bucket: 2,
            to_bucket: 1,
            units: 4,
            out_ms,
            in_ms,
        };
        let totals = |transfers: &[TransferRecord]| -> Vec<i64> {
            engine_items(&spec, transfers)
                .iter()
                .skip(1)
                .map(|(s, _)| s.stock_total)
                .collect()
        };
        assert_eq!(totals(&[]), vec![10, 10, 10]);
        assert_eq!(totals(&[step("both", Some(1), Some(2))]), vec![14, 6, 10]);
        assert_eq!(totals(&[step("in transit", Some(1), None)]), vec![10, 6, 10]);
        assert_eq!(totals(&[step("credit only", None, Some(2))]), vec![14, 6, 10]);
    }
}
