//! Identifiers: validation of item, user, order and idempotency ids, the item → shard map,
//! and order id generation.
//!
//! Every id the outside world hands us is 1–64 characters of `[A-Za-z0-9_.:-]` (the
//! contract). Checking that once, at the front door, is what lets the Redis key names, the
//! CSV export and the log lines use ids without escaping.

/// Number of shards. Fixed forever: an item's shard is part of its Redis key names and of its
/// order ids, so changing it would orphan live data.
pub const SHARDS: u32 = 16;

/// True when `s` is a valid external id: 1–64 chars of `[A-Za-z0-9_.:-]`.
pub fn valid_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// The shard of an item: CRC-32 of its id modulo [`SHARDS`]. Stable across instances and
/// releases (the Lua scripts never compute it; Rust builds every key).
///
/// A stock bucket's id ([`bucket_id`]) `<item>#<b>` lies `b` shards after its item's, so
/// the buckets of an item are on different slots (and, on a cluster whose slots are split
/// evenly, on different masters in turn).
pub fn shard_of(item_id: &str) -> u32 {
    let (item, bucket) = split_bucket(item_id);
    (crc32fast::hash(item.as_bytes()) % SHARDS + bucket % SHARDS) % SHARDS
}

/// Most stock buckets an item may have (the contract's `buckets`: 1–64).
pub const MAX_BUCKETS: u32 = 64;

/// The engine's id of bucket `b` of an item: the item's own id for bucket 0, `<item>#<b>`
/// for the others. `#` is outside the id charset ([`valid_id`]), so a bucket id is never an
/// item id the outside world could name.
pub fn bucket_id(item_id: &str, bucket: u32) -> String {
    if bucket == 0 {
        item_id.to_owned()
    } else {
        format!("{item_id}#{bucket}")
    }
}

/// An engine id as (item id, bucket): `("sku", 3)` for `sku#3`, `("sku", 0)` for `sku`.
/// Only what [`bucket_id`] writes is a bucket suffix (a positive number without leading
/// zeros); anything else is part of the id.
pub fn split_bucket(id: &str) -> (&str, u32) {
    if let Some((item, suffix)) = id.rsplit_once('#')
        && !suffix.starts_with('0')
        && suffix.bytes().all(|c| c.is_ascii_digit())
        && let Ok(b) = suffix.parse::<u32>()
    {
        return (item, b);
    }
    (id, 0)
}

/// A shopper's home bucket among `buckets`: where their reservations of the item are made
/// and their per-user limit is counted, so it holds exactly. A stable hash (CRC-32 of the
/// user id, a different input from the item's), the same on every instance and release.
pub fn home_bucket(user_id: &str, buckets: u32) -> u32 {
    if buckets <= 1 {
        return 0;
    }
    crc32fast::hash(user_id.as_bytes()) % buckets
}

/// A new order id for an item: a UUIDv7 (time-ordered, unique across instances without
/// coordination) whose last hex digit is replaced by the item's shard, so that the order's
/// Redis slot can be found from the id alone. 74 random bits remain, less 4: 70.
pub fn new_order_id(item_id: &str) -> String {
    let mut bytes = *uuid::Uuid::now_v7().as_bytes();
    bytes[15] = (bytes[15] & 0xf0) | shard_of(item_id) as u8;
    uuid::Uuid::from_bytes(bytes).hyphenated().to_string()
}

/// The shard encoded in an order id, or `None` when the id is not one of ours (then the
/// order is unknown; no Redis command is needed to say so).
pub fn order_shard(order_id: &str) -> Option<u32> {
    let uuid = uuid::Uuid::try_parse(order_id).ok()?;
    if uuid.get_version_num() != 7 {
        return None;
    }
    Some(u32::from(uuid.as_bytes()[15] & 0x0f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_the_contract_charset() {
        assert!(valid_id("sku-1:red_XL.v2"));
        assert!(valid_id(&"a".repeat(64)));
        assert!(!valid_id(""));
        assert!(!valid_id(&"a".repeat(65)));
        assert!(!valid_id("a b"));
        assert!(!valid_id("a/b"));
        assert!(!valid_id("é"));
    }

    #[test]
    fn buckets_are_named_apart_from_items_and_lie_on_consecutive_shards() {
        assert_eq!(bucket_id("sku", 0), "sku");
        assert_eq!(bucket_id("sku", 3), "sku#3");
        assert!(!valid_id(&bucket_id("sku", 3)), "no outside id names a bucket");
        for id in ["sku", "sku#3", "a:b#12", "x"] {
            let (item, b) = split_bucket(id);
            assert_eq!(bucket_id(item, b), id, "{id} round-trips");
        }
        // Not a bucket suffix: the whole id is the item (bucket 0 is never written `#0`).
        assert_eq!(split_bucket("sku#0"), ("sku#0", 0));
        assert_eq!(split_bucket("sku#03"), ("sku#03", 0));
        assert_eq!(split_bucket("sku#x"), ("sku#x", 0));
        assert_eq!(split_bucket("sku#"), ("sku#", 0));
        for item in ["demo", "sku-1", "hot"] {
            let first = shard_of(item);
            let shards: Vec<u32> = (0..SHARDS).map(|b| shard_of(&bucket_id(item, b))).collect();
            for (b, s) in shards.iter().enumerate() {
                assert_eq!(*s, (first + b as u32) % SHARDS, "{item} bucket {b}");
            }
            let mut distinct = shards.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), SHARDS as usize, "16 buckets, 16 shards");
            // An order id of a bucket carries the bucket's shard.
            assert_eq!(
                order_shard(&new_order_id(&bucket_id(item, 5))),
                Some((first + 5) % SHARDS)
            );
        }
    }

    #[test]
    fn a_home_bucket_is_stable_and_spreads_users() {
        assert_eq!(home_bucket("anyone", 1), 0);
        assert_eq!(home_bucket("anyone", 0), 0);
        let mut per_bucket = [0u32; 6];
        for u in 0..60_000 {
            let user = format!("u{u}");
            let b = home_bucket(&user, 6);
            assert_eq!(b, home_bucket(&user, 6), "stable");
            per_bucket[b as usize] += 1;
        }
        for n in per_bucket {
            assert!((9_000..11_000).contains(&n), "uneven: {per_bucket:?}");
        }
    }

    #[test]
    fn order_ids_carry_the_items_shard_and_sort_by_time() {
        for item in ["demo", "sku-1", "x", "another:item"] {
            let a = new_order_id(item);
            std::thread::sleep(std::time::Duration::from_millis(2));
            let b = new_order_id(item);
            assert_eq!(order_shard(&a), Some(shard_of(item)));
            assert_eq!(order_shard(&b), Some(shard_of(item)));
            assert!(a < b, "{a} should sort before {b}");
            assert!(valid_id(&a));
        }
        assert_eq!(order_shard("not-an-order"), None);
        // A UUIDv4 is not one of ours.
        assert_eq!(order_shard("67e55044-10b1-426f-9247-bb680e5fe0c8"), None);
    }
}
