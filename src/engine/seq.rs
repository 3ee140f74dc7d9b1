//! The write sequence of each shard, and the floors that tell a gateway a Redis lost writes.
//!
//! Every script call that writes order events bumps its shard's `sk:T:seq` and stamps the
//! stream entry with the result, `E:S` ([`Mark`]: epoch, sequence; `lua/lib/seq.lua`). The
//! persistence worker records the highest mark it has written to the database, per shard.
//! A Redis that restarted from an older file, or a replica promoted before it caught up, is
//! then *behind* the database: its sequence is below that mark. The gateway passes the
//! highest mark it knows of ([`Floors`]) to every call, and a script on a shard below it
//! refuses (`FENCED`) and fences the shard for every gateway until it is rebuilt from the
//! database ([`crate::orders::repair`]), which raises the epoch. Without this, the stock the
//! lost writes had taken would be sold a second time.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::ids::SHARDS;

/// A shard's position in its write history: the epoch (raised by each repair) and the
/// writes of that epoch. Ordered by epoch, then sequence.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mark {
    pub epoch: u64,
    pub seq: u64,
}

/// Sequences stay below 2^40 (a trillion writes per epoch), so a mark packs into one `u64`
/// whose order is the marks' order.
const SEQ_BITS: u32 = 40;
const SEQ_MAX: u64 = (1 << SEQ_BITS) - 1;
const EPOCH_MAX: u64 = (1 << (64 - SEQ_BITS)) - 1;

impl Mark {
    /// `E:S`, as the scripts write it; `None` for anything else.
    pub fn parse(s: &str) -> Option<Mark> {
        let (e, q) = s.split_once(':')?;
        let mark = Mark {
            epoch: e.parse().ok()?,
            seq: q.parse().ok()?,
        };
        (mark.epoch <= EPOCH_MAX && mark.seq <= SEQ_MAX).then_some(mark)
    }

    fn pack(self) -> u64 {
        (self.epoch.min(EPOCH_MAX) << SEQ_BITS) | self.seq.min(SEQ_MAX)
    }

    fn unpack(v: u64) -> Mark {
        Mark {
            epoch: v >> SEQ_BITS,
            seq: v & SEQ_MAX,
        }
    }
}

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}

/// Per shard, the highest mark this gateway knows reached the database. Only ever raised.
#[derive(Debug)]
pub struct Floors([AtomicU64; SHARDS as usize]);

impl Default for Floors {
    fn default() -> Self {
        Floors(std::array::from_fn(|_| AtomicU64::new(0)))
    }
}

impl Floors {
    pub fn raise(&self, shard: u32, mark: Mark) {
        if let Some(f) = self.0.get(shard as usize) {
            f.fetch_max(mark.pack(), Ordering::AcqRel);
        }
    }

    pub fn get(&self, shard: u32) -> Mark {
        self.0
            .get(shard as usize)
            .map_or(Mark::default(), |f| Mark::unpack(f.load(Ordering::Acquire)))
    }

    /// The scripts' floor argument: `E:S`, or `""` while nothing is known (no check).
    pub fn arg(&self, shard: u32) -> String {
        let m = self.get(shard);
        if m == Mark::default() {
            String::new()
        } else {
            m.to_string()
        }
    }
}

/// Shards found fenced (a script answered `FENCED`), for the repair task to take.
#[derive(Debug, Default)]
pub struct Alarms {
    shards: AtomicU32,
    notify: Notify,
}

impl Alarms {
    pub fn raise(&self, shard: u32) {
        if shard < SHARDS {
            self.shards.fetch_or(1 << shard, Ordering::AcqRel);
            self.notify.notify_one();
        }
    }

    /// The shards raised since the last call, waiting for one if there is none.
    pub async fn next(&self) -> Vec<u32> {
        loop {
            let bits = self.shards.swap(0, Ordering::AcqRel);
            if bits != 0 {
                return (0..SHARDS).filter(|s| bits & (1 << s) != 0).collect();
            }
            self.notify.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_what_the_scripts_write_and_nothing_else() {
        assert_eq!(Mark::parse("3:17"), Some(Mark { epoch: 3, seq: 17 }));
        for bad in ["", "3", "3:", ":1", "a:1", "1:-1", "1:2:3", "1:1099511627776"] {
            assert_eq!(Mark::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_floor_is_only_raised_and_empty_until_known() {
        let f = Floors::default();
        assert_eq!(f.arg(2), "");
        f.raise(2, Mark { epoch: 0, seq: 9 });
        f.raise(2, Mark { epoch: 0, seq: 4 });
        assert_eq!(f.arg(2), "0:9");
        f.raise(2, Mark { epoch: 1, seq: 0 });
        assert_eq!(f.get(2), Mark { epoch: 1, seq: 0 });
        assert_eq!(f.arg(3), "", "shards are apart");
        f.raise(99, Mark { epoch: 1, seq: 1 });
    }

    #[tokio::test]
    async fn alarms_hand_over_each_raised_shard_once() {
        let a = Alarms::default();
        a.raise(3);
        a.raise(0);
        a.raise(3);
        a.raise(SHARDS);
        assert_eq!(a.next().await, vec![0, 3]);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), a.next()).await;
        assert!(waiting.is_err(), "nothing raised since: {waiting:?}");
    }

    proptest! {
        #[test]
        fn packing_keeps_the_order(a in (0..EPOCH_MAX, 0..SEQ_MAX), b in (0..EPOCH_MAX, 0..SEQ_MAX)) {
            let (a, b) = (Mark { epoch: a.0, seq: a.1 }, Mark { epoch: b.0, seq: b.1 });
            prop_assert_eq!(a.cmp(&b), a.pack().cmp(&b.pack()));
            prop_assert_eq!(Mark::unpack(a.pack()), a);
        }
    }
}
