//! Redis key names. Every key of an item carries its shard's hash tag ([`tag`]) so that a
//! script's keys, and the stream its events go to, share one Redis Cluster slot.

use crate::ids::{SHARDS, order_shard, shard_of};

/// The set of every item id (read at start-up; never touched by a script).
pub const CATALOG: &str = "sk:catalog";
/// The pub/sub channel of cache invalidations.
pub const BUS: &str = "sk:bus";
/// A message on [`BUS`]: `item_changed <item id>` (created, replaced, paused, resumed, or
/// stock back).
pub const ITEM_CHANGED: &str = "item_changed ";
/// `"1"` while every sale is paused (`POST /admin/v1/pause`): what a gateway reads after
/// (re)subscribing to [`BUS`]. The scripts read each shard's own copy, the field `paused` of
/// [`seq`].
pub const PAUSED_ALL: &str = "sk:paused_all";
/// The message on [`BUS`] when every sale is paused or resumed: `all_paused 1` or `all_paused 0`.
pub const ALL_PAUSED: &str = "all_paused ";
/// The other message on [`BUS`]: the shared rate limits ([`LIMITS`]) changed.
pub const LIMITS_CHANGED: &str = "limits_changed";
/// The rate limits shared by `PUT /admin/v1/limits`: a hash of `rate_global`,
/// `rate_per_user`, `rate_per_ip` (a field absent: each instance's configured value). A
/// plain key (no hash tag): no script touches it.
pub const LIMITS: &str = "sk:limits";
/// The live instances: a sorted set of instance id → the last heartbeat (ms since the
/// epoch, Redis-corrected). A plain key, like [`LIMITS`].
pub const INSTANCES: &str = "sk:instances";
/// The consumer group of the persistence worker.
pub const GROUP: &str = "persist";

/// The hash tag of each shard: `s<N>` and a suffix chosen so that shard N's slot lies in
/// `[N × 1024, (N + 1) × 1024)`. A cluster whose slots are split evenly (what
/// `redis-cli --cluster create` does) then gets an even share of the shards on every master:
/// 8/8 on 2 masters, 5/6/5 on 3, 4 each on 4 (`{s0}`…`{s15}` by chance put 6/4/6 on 3).
const TAGS: [&str; SHARDS as usize] = [
    "s0.10", "s1.13", "s2", "s3.20", "s4.0", "s5.3", "s6.40", "s7.43", "s8.23", "s9.20", "s10.22", "s11.21", "s12.2",
    "s13.1", "s14.41", "s15.42",
];

/// `{s<N>.<suffix>}`: the hash tag of a shard's keys, written where a key is formatted
/// (no string of its own: a reservation formats four keys).
pub fn tag(shard: u32) -> Tag {
    Tag(TAGS[shard as usize])
}

/// A shard's hash tag as [`tag`] gives it: `Display` writes `{s<N>.<suffix>}`.
#[derive(Clone, Copy)]
pub struct Tag(&'static str);

impl std::fmt::Display for Tag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{{{}}}", self.0)
    }
}

pub fn item(item_id: &str) -> String {
    format!("sk:{}:item:{item_id}", tag(shard_of(item_id)))
}

pub fn buyers(item_id: &str) -> String {
    format!("sk:{}:buyers:{item_id}", tag(shard_of(item_id)))
}

/// A stock bucket's transfers out that the destination may not hold yet: transfer id →
/// `<units>|<to bucket>|<at_ms>` (`lua/transfer_out.lua`). `bucket` is a bucket id
/// ([`crate::ids::bucket_id`]), so the key is on the bucket's shard.
pub fn transfers_out(bucket: &str) -> String {
    format!("sk:{}:xout:{bucket}", tag(shard_of(bucket)))
}

/// The transfers a stock bucket has been credited, by id (`lua/transfer_in.lua`).
pub fn transfers_in(bucket: &str) -> String {
    format!("sk:{}:xin:{bucket}", tag(shard_of(bucket)))
}

/// `None` when the id is not one of ours (so the order is unknown without asking Redis).
pub fn order(order_id: &str) -> Option<String> {
    order_shard(order_id).map(|s| format!("sk:{}:order:{order_id}", tag(s)))
}

pub fn idem(item_id: &str, user_id: &str, key: &str) -> String {
    format!("sk:{}:idem:{item_id}:{user_id}:{key}", tag(shard_of(item_id)))
}

pub fn deadlines(shard: u32) -> String {
    format!("sk:{}:deadlines", tag(shard))
}

pub fn events(shard: u32) -> String {
    format!("sk:{}:events", tag(shard))
}

/// The shard's write sequence (`e`, `s`, `fence`: `lua/lib/seq.lua`, [`super::seq`]).
pub fn seq(shard: u32) -> String {
    format!("sk:{}:seq", tag(shard))
}

/// Held (with a TTL) by the gateway rebuilding the shard ([`crate::orders::repair`]).
pub fn repair_lock(shard: u32) -> String {
    format!("sk:{}:repairing", tag(shard))
}

/// Where events that keep failing to persist go.
pub fn dead_letters(shard: u32) -> String {
    format!("sk:{}:dead", tag(shard))
}

pub fn all_shards() -> impl Iterator<Item = u32> {
    0..SHARDS
}

/// The deadline set member of an order: `<order_id>|<item_id>`.
pub fn deadline_member(order_id: &str, item_id: &str) -> String {
    format!("{order_id}|{item_id}")
}

pub fn split_deadline_member(member: &str) -> Option<(&str, &str)> {
    member.split_once('|')
}

#[cfg(test)]
mod tests {
    use redis::cluster_routing::Slot;

    use super::*;

    #[test]
    fn shard_n_lies_in_the_nth_sixteenth_of_the_slots() {
        for shard in all_shards() {
            let slot = Slot::for_key(item_in(shard));
            let range = shard * 1024..(shard + 1) * 1024;
            assert!(
                range.clone().any(|n| Slot::new(n as u16) == Some(slot)),
                "shard {shard} ({}) in slots {range:?}: {slot:?}",
                tag(shard)
            );
        }
    }

    /// A key of some item of the shard.
    fn item_in(shard: u32) -> String {
        let id = (0..)
            .map(|i| format!("item-{i}"))
            .find(|id| shard_of(id) == shard)
            .expect("an id of every shard");
        item(&id)
    }
}
