//! [`ShardedMap`]: a hash map that grows in small steps, for the embedded engine's big maps.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hash};

/// The hash of the picker and of every sub-map: foldhash's quality variant, randomly seeded
/// per instance (the keys include client-chosen user ids and idempotency keys); two SipHash
/// runs per lookup were a measurable share of a reservation (callgrind).
type RandomState = foldhash::quality::RandomState;

/// How many sub-maps a [`ShardedMap`] has. One growth moves 1/4096 of the entries: ~450 at
/// 2M orders, a ~100 µs rehash into a ~160 KB table (measured; with 256 sub-maps it was
/// ~7,800 entries into 2.6 MB, 8–20 ms on this project's VMs, where memory touched for the
/// first time costs far more than the copy). The price is 4096 empty maps' headers, 192 KiB.
const SUB_MAPS: usize = 4096;

/// A `HashMap` split into [`SUB_MAPS`] sub-maps; a key lives in the one a hash of it picks.
///
/// Why: a std `HashMap` grows by doubling its table and moving every entry at once. Under the
/// embedded engine's lock that stalled every request for 115–420 ms when the orders map
/// passed 115k and 229k entries (issue 11). A sub-map holds 1/4096 of the entries, so one
/// growth moves 1/4096 of them; and as the sub-maps fill at slightly different paces, their
/// growths spread over many inserts instead of landing on one. Memory stays what a single
/// map's would be (no pre-sizing), plus the empty maps' headers.
///
/// Not a concurrent map: it has one owner (the engine's `State`, behind its one Mutex), so a
/// critical section still sees and changes every entry at once (invariant 5). Why not a map
/// that resizes incrementally (`griddle` 0.6): it is built on `hashbrown` 0.14's raw-table
/// API, which `hashbrown` 0.15 removed, so it cannot follow `hashbrown` any more; this is a
/// hundred lines over std's map.
pub struct ShardedMap<K, V> {
    /// Picks the sub-map. A hasher of its own, not the sub-maps': with one hasher for both,
    /// every key of a sub-map would share the hash bits that picked it, and the sub-map places
    /// entries by those same bits, so they would all collide.
    pick: RandomState,
    sub_maps: Box<[HashMap<K, V, RandomState>]>,
}

impl<K: Hash + Eq, V> ShardedMap<K, V> {
    pub fn new() -> Self {
        ShardedMap {
            pick: RandomState::default(),
            sub_maps: (0..SUB_MAPS)
                .map(|_| HashMap::with_hasher(RandomState::default()))
                .collect(),
        }
    }

    /// The sub-map `key` lives in. `Q` hashes as `K` does (the `Borrow` contract), so a
    /// lookup by `&str` finds what was inserted by `String`.
    fn sub_map<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        self.pick.hash_one(key) as usize % SUB_MAPS
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.sub_maps[self.sub_map(key)].get(key)
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.sub_map(key);
        self.sub_maps[i].get_mut(key)
    }

    pub fn contains_key<Q>(&self, key: &Q) -> bool
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get(key).is_some()
    }

    /// As `HashMap::insert`: the previous value, if any.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let i = self.sub_map(&key);
        self.sub_maps[i].insert(key, value)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = self.sub_map(key);
        self.sub_maps[i].remove(key)
    }

    /// The std entry of `key` in its sub-map (`*map.entry(k).or_default() += 1`).
    pub fn entry(&mut self, key: K) -> Entry<'_, K, V> {
        let i = self.sub_map(&key);
        self.sub_maps[i].entry(key)
    }

    /// Counts every sub-map's entries: O(sub-maps), for tests.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.sub_maps.iter().map(HashMap::len).sum()
    }

    /// Looks at every sub-map: O(sub-maps), for tests.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.sub_maps.iter().all(HashMap::is_empty)
    }
}

impl<K: Hash + Eq, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u16, u32),
        Remove(u16),
        Add(u16, u32),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Few keys, so removes and adds often hit entries that exist.
        let key = 0u16..64;
        prop_oneof![
            (key.clone(), any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            key.clone().prop_map(Op::Remove),
            (key, any::<u32>()).prop_map(|(k, v)| Op::Add(k, v)),
        ]
    }

    proptest! {
        /// Every operation answers what a single `HashMap` answers.
        #[test]
        fn behaves_as_one_hash_map(ops in proptest::collection::vec(op(), 0..300)) {
            let mut sharded = ShardedMap::new();
            let mut model = HashMap::new();
            for op in ops {
                match op {
                    Op::Insert(k, v) => {
                        prop_assert_eq!(sharded.insert(k.to_string(), v), model.insert(k.to_string(), v));
                    }
                    Op::Remove(k) => prop_assert_eq!(sharded.remove(k.to_string().as_str()), model.remove(&k.to_string())),
                    Op::Add(k, v) => {
                        let s: &mut u32 = sharded.entry(k.to_string()).or_default();
                        *s = s.wrapping_add(v);
                        let m: &mut u32 = model.entry(k.to_string()).or_default();
                        *m = m.wrapping_add(v);
                    }
                }
                prop_assert_eq!(sharded.len(), model.len());
                prop_assert_eq!(sharded.is_empty(), model.is_empty());
                for k in 0u16..64 {
                    let k = k.to_string();
                    // Looked up by `&str`, inserted as `String`.
                    prop_assert_eq!(sharded.get(k.as_str()), model.get(&k));
                    prop_assert_eq!(sharded.contains_key(k.as_str()), model.contains_key(&k));
                }
            }
        }
    }

    #[test]
    fn get_mut_changes_the_entry() {
        let mut m = ShardedMap::new();
        m.insert(("item".to_owned(), "user".to_owned()), 1);
        *m.get_mut(&("item".to_owned(), "user".to_owned())).unwrap() += 2;
        assert_eq!(m.get(&("item".to_owned(), "user".to_owned())), Some(&3));
        assert_eq!(m.get_mut(&("item".to_owned(), "other".to_owned())), None);
    }

    /// What makes growth small: no sub-map holds much more than its share, so none grows
    /// much more at once.
    #[test]
    fn keys_spread_evenly_over_the_sub_maps() {
        let mut m = ShardedMap::new();
        let n = SUB_MAPS * 100;
        for i in 0..n {
            m.insert(format!("0190a3b4-0000-7000-8000-{i:012x}"), ());
        }
        assert_eq!(m.len(), n);
        let (min, max) = m
            .sub_maps
            .iter()
            .map(HashMap::len)
            .fold((usize::MAX, 0), |(lo, hi), l| (lo.min(l), hi.max(l)));
        // 100 a sub-map on average, a standard deviation of 10: 40..160 is six of them.
        assert!(min > 40 && max < 160, "sub-map sizes from {min} to {max}");
    }
}
