//! Stage 4 — the local cache: item metadata (so `not_started` and `ended` are answered
//! without Redis) and sold-out flags (so the sold-out path never reaches Redis). The stage's
//! decision is [`LocalCache::early_answer`].
//!
//! moka's `sync` cache, not `future`: reads of the future cache go through a shared queue
//! that slows down with many readers (moka #498); nothing here awaits. Flags are cleared on
//! every instance by pub/sub when stock comes back; their TTL is only a safety net for a
//! missed message.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::clock::Millis;
use crate::domain::ItemSpec;
use crate::error::Reject;
use crate::metrics;

/// foldhash instead of SipHash for the two lookups of every reservation: the keys are item
/// ids that passed the Bloom filter (known items), and the seed is random per process.
type Hasher = foldhash::fast::RandomState;

pub struct LocalCache {
    items: moka::sync::Cache<String, Arc<ItemSpec>, Hasher>,
    sold_out: moka::sync::Cache<String, (), Hasher>,
    /// Every sale paused by the operator, as this instance last heard (the engine's
    /// scripts enforce it whatever this says; this answers early and shows `paused`).
    all_paused: AtomicBool,
}

impl LocalCache {
    pub fn new(item_ttl: Duration, sold_out_ttl: Duration) -> Self {
        LocalCache {
            items: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(item_ttl)
                .build_with_hasher(Hasher::default()),
            sold_out: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(sold_out_ttl)
                .build_with_hasher(Hasher::default()),
            all_paused: AtomicBool::new(false),
        }
    }

    pub fn item(&self, item_id: &str) -> Option<Arc<ItemSpec>> {
        let hit = self.items.get(item_id);
        metrics::cache(metrics::Cache::Item, hit.is_some());
        hit
    }

    pub fn put_item(&self, spec: Arc<ItemSpec>) {
        self.items.insert(spec.item_id.clone(), spec);
    }

    /// Answer a reservation of `qty` locally when the answer is certain: a quantity over the
    /// per-user limit (400), a paused sale (503), a sold-out flag (410), a sale that ended
    /// (410) or is clearly yet to start (425). A retry carrying an idempotency key (`keyed`) goes on to the
    /// engine, which returns the order it already made even after the item sold out or the
    /// sale ended.
    pub fn early_answer(&self, spec: &ItemSpec, now: Millis, qty: i64, keyed: bool) -> Result<(), Reject> {
        if qty > spec.per_user_limit {
            return Err(Reject::BadRequest(format!(
                "qty above the per-user limit of {}",
                spec.per_user_limit
            )));
        }
        if keyed {
            return Ok(());
        }
        if self.is_paused(spec) {
            return Err(Reject::Paused);
        }
        if self.is_sold_out(&spec.item_id) {
            return Err(Reject::SoldOut);
        }
        if now >= spec.ends_ms {
            return Err(Reject::Ended);
        }
        // Only refuse early when clearly before the start; near the boundary the engine
        // (Redis TIME) decides, so a fast local clock never starts a sale early and a slow
        // one never refuses a started sale.
        if now + 1000 < spec.starts_ms {
            return Err(Reject::NotStarted {
                starts_at_ms: spec.starts_ms,
            });
        }
        Ok(())
    }

    pub fn is_sold_out(&self, item_id: &str) -> bool {
        let hit = self.sold_out.contains_key(item_id);
        metrics::cache(metrics::Cache::SoldOut, hit);
        hit
    }

    /// Whether the sale of `spec` is paused, by its own switch or the one of every sale.
    pub fn is_paused(&self, spec: &ItemSpec) -> bool {
        spec.paused || self.all_paused.load(Ordering::Relaxed)
    }

    pub fn set_all_paused(&self, paused: bool) {
        self.all_paused.store(paused, Ordering::Relaxed);
    }

    pub fn mark_sold_out(&self, item_id: &str) {
        self.sold_out.insert(item_id.to_owned(), ());
    }

    /// The item changed (replaced, or stock came back): forget what we knew.
    pub fn invalidate(&self, item_id: &str) {
        self.items.invalidate(item_id);
        self.sold_out.invalidate(item_id);
    }

    /// After a pub/sub reconnect: messages may have been missed.
    pub fn invalidate_all(&self) {
        self.items.invalidate_all();
        self.sold_out.invalidate_all();
    }
}
