//! Redis key names. Every key of an item carries its shard's hash tag `{s<N>}` so that a
//! script's keys, and the stream its events go to, share one Redis Cluster slot.

use crate::ids::{SHARDS, order_shard, shard_of};

/// The set of every item id (read at start-up; never touched by a script).
pub const CATALOG: &str = "sk:catalog";
/// The pub/sub channel of cache invalidations.
pub const BUS: &str = "sk:bus";
/// The one message on [`BUS`]: `item_changed <item id>` (created, replaced, or stock back).
pub const ITEM_CHANGED: &str = "item_changed ";
/// The consumer group of the persistence worker.
pub const GROUP: &str = "persist";

pub fn tag(shard: u32) -> String {
    format!("{{s{shard}}}")
}

pub fn item(item_id: &str) -> String {
    format!("sk:{}:item:{item_id}", tag(shard_of(item_id)))
}

pub fn buyers(item_id: &str) -> String {
    format!("sk:{}:buyers:{item_id}", tag(shard_of(item_id)))
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
