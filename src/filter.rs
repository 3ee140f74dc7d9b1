//! Stage 3 — is this an item we sell? A Bloom filter of every item id answers "certainly
//! not" without any Redis command; a short-lived not-found cache remembers the ids that
//! were false positives once Redis said they don't exist.
//!
//! bloomfilter's `set` needs `&mut self` and there is no delete, so the filter is never
//! mutated in place: adding an id rebuilds it from the id set and swaps it in (`ArcSwap`:
//! readers never block, never see a half-built filter). An empty catalogue is fine: the
//! filter is sized for at least [`MIN_CAPACITY`] ids (the constructor asserts a non-zero
//! count).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use bloomfilter::Bloom;

use crate::error::Reject;
use crate::metrics;

const MIN_CAPACITY: usize = 1024;
const FALSE_POSITIVE_RATE: f64 = 0.001;

pub struct ItemFilter {
    bloom: ArcSwap<Bloom<str>>,
    /// The ids the filter is rebuilt from. A std Mutex, not a tokio one: it is held only
    /// for the rebuild, never across an await.
    known: Mutex<HashSet<String>>,
    /// Ids Redis said do not exist although the filter said maybe.
    not_found: moka::sync::Cache<String, (), foldhash::fast::RandomState>,
    /// Whether `not_found` was ever given an id: until then a lookup (~650 instructions, a
    /// third of this stage on every request of a sale) cannot find anything.
    any_not_found: AtomicBool,
    /// One seed per process, so a rebuild hashes like the filter it replaces.
    seed: [u8; 32],
}

fn build(ids: &HashSet<String>, seed: &[u8; 32]) -> Bloom<str> {
    let capacity = (ids.len() * 2).max(MIN_CAPACITY);
    let mut bloom =
        Bloom::new_for_fp_rate_with_seed(capacity, FALSE_POSITIVE_RATE, seed).expect("capacity > 0 and 0 < rate < 1");
    for id in ids {
        bloom.set(id.as_str());
    }
    bloom
}

impl ItemFilter {
    pub fn new<I: IntoIterator<Item = String>>(ids: I) -> Self {
        let seed: [u8; 32] = rand::random();
        let known: HashSet<String> = ids.into_iter().collect();
        ItemFilter {
            bloom: ArcSwap::from_pointee(build(&known, &seed)),
            known: Mutex::new(known),
            not_found: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(5))
                .build_with_hasher(foldhash::fast::RandomState::default()),
            any_not_found: AtomicBool::new(false),
            seed,
        }
    }

    /// The stage's decision: `unknown_item` for an id that certainly does not exist.
    pub fn check(&self, item_id: &str) -> Result<(), Reject> {
        if self.may_contain(item_id) {
            Ok(())
        } else {
            Err(Reject::UnknownItem)
        }
    }

    /// `false` means the item certainly does not exist.
    pub fn may_contain(&self, item_id: &str) -> bool {
        let maybe = self.bloom.load().check(item_id);
        metrics::cache(metrics::Cache::Bloom, maybe);
        if !maybe {
            return false;
        }
        if !self.any_not_found.load(Ordering::Acquire) {
            return true;
        }
        let missing = self.not_found.contains_key(item_id);
        metrics::cache(metrics::Cache::NotFound, missing);
        !missing
    }

    /// Redis said this id does not exist: answer it locally for a few seconds.
    pub fn remember_missing(&self, item_id: &str) {
        self.not_found.insert(item_id.to_owned(), ());
        self.any_not_found.store(true, Ordering::Release);
    }

    /// Add an id (an item was created here or on another instance).
    pub fn add(&self, item_id: &str) {
        self.not_found.invalidate(item_id);
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if known.insert(item_id.to_owned()) {
            self.bloom.store(Arc::new(build(&known, &self.seed)));
        }
    }

    /// Replace the whole id set (after a pub/sub reconnect, when messages may have been missed).
    pub fn replace_all<I: IntoIterator<Item = String>>(&self, ids: I) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        known.extend(ids);
        self.bloom.store(Arc::new(build(&known, &self.seed)));
        self.not_found.invalidate_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_catalogue_works_and_adds_are_seen() {
        let f = ItemFilter::new(Vec::new());
        assert!(!f.may_contain("phone"));
        f.add("phone");
        assert!(f.may_contain("phone"));
        f.remember_missing("phone");
        assert!(!f.may_contain("phone"), "not-found cache answers");
        f.add("phone");
        assert!(f.may_contain("phone"), "adding clears the not-found entry");
    }

    #[test]
    fn false_positive_rate_is_low() {
        let f = ItemFilter::new((0..10_000).map(|i| format!("item-{i}")));
        assert!(
            (0..10_000).all(|i| f.may_contain(&format!("item-{i}"))),
            "no false negatives"
        );
        let fp = (0..100_000).filter(|i| f.may_contain(&format!("other-{i}"))).count();
        assert!(fp < 1_000, "{fp} false positives in 100k");
    }
}
