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
/// A stock bucket's id ([`bucket_id`]) `<item>#<b>` lies [`BUCKET_OFFSETS`]`[b]` shards
/// after its item's, so the buckets of an item are on different slots and spread over the
/// whole ring of shards (and so over every master of a cluster).
pub fn shard_of(item_id: &str) -> u32 {
    let (item, bucket) = split_bucket(item_id);
    bucket_shard(item, bucket)
}

/// The shard of bucket `bucket` of an item (`shard_of(&bucket_id(item, bucket))`, without
/// building the id).
pub fn bucket_shard(item_id: &str, bucket: u32) -> u32 {
    let offset = if bucket == 0 {
        0
    } else {
        BUCKET_OFFSETS[((bucket - 1) % SHARDS) as usize]
    };
    (crc32fast::hash(item_id.as_bytes()) % SHARDS + offset) % SHARDS
}

/// How many shards after its item's bucket b (1-based: index b − 1) lies: `⌊frac(b·φ)·16⌋`,
/// the golden-ratio sequence, a permutation of the 16 shards whose every prefix is spread
/// over the whole ring (the first 6: 9, 3, 13, 7, 1, 11, at most 4 apart). A cluster gives
/// each master a contiguous run of shards (`{s<N>.<k>}` tags, [`crate::engine::keys`]), so
/// the first B buckets of an item fall on every master as soon as B allows: consecutive
/// shards would put 6 buckets on 2 masters of 3. Buckets past 16 repeat the sequence.
pub const BUCKET_OFFSETS: [u32; SHARDS as usize] = [9, 3, 13, 7, 1, 11, 5, 15, 8, 2, 12, 6, 0, 10, 4, 14];

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

/// The buckets an item's stock lies in: bucket 0 (the item's own keys) for an item of one
/// bucket; buckets 1..=B for an item of B > 1, whose own keys then hold its definition only
/// (no stock), so every order of a bucketed item names its bucket (`<item>#<b>`) and any id
/// tells whether a count it carries is a whole item's or a bucket's.
pub fn stock_buckets(buckets: u32) -> std::ops::RangeInclusive<u32> {
    if buckets <= 1 { 0..=0 } else { 1..=buckets }
}

/// A shopper's home bucket among `buckets` ([`stock_buckets`]): where their reservations of
/// the item are made and their per-user limit is counted, so it holds exactly. A stable
/// hash (CRC-32 of the user id, a different input from the item's), the same on every
/// instance and release.
pub fn home_bucket(user_id: &str, buckets: u32) -> u32 {
    if buckets <= 1 {
        return 0;
    }
    1 + crc32fast::hash(user_id.as_bytes()) % buckets
}

/// A new order id for an item: a UUIDv7 (time-ordered, unique across instances without
/// coordination) whose last hex digit is replaced by the item's shard, so that the order's
/// Redis slot can be found from the id alone. 74 random bits remain, less 4: 70.
pub fn new_order_id(item_id: &str) -> String {
    new_order_id_on(shard_of(item_id))
}

/// A new order id carrying `shard` (that of the bucket the order is made in).
pub fn new_order_id_on(shard: u32) -> String {
    let mut bytes = *uuid::Uuid::now_v7().as_bytes();
    bytes[15] = (bytes[15] & 0xf0) | (shard % SHARDS) as u8;
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
    fn buckets_are_named_apart_from_items_and_spread_over_the_shards() {
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
            let shards: Vec<u32> = (1..=SHARDS).map(|b| shard_of(&bucket_id(item, b))).collect();
            let mut distinct = shards.clone();
            distinct.sort_unstable();
            distinct.dedup();
            assert_eq!(distinct.len(), SHARDS as usize, "16 buckets, 16 shards");
            assert_eq!(
                shard_of(&bucket_id(item, 17)),
                shards[0],
                "past 16 the sequence repeats"
            );
            for b in 1..=SHARDS {
                assert_eq!(bucket_shard(item, b), shard_of(&bucket_id(item, b)));
            }
            // Any 6 buckets leave no run of 4 shards empty: on 3 masters (runs of 5, 5, 6
            // shards) each gets one.
            let mut six: Vec<u32> = shards[..6].iter().map(|s| (s + SHARDS - first) % SHARDS).collect();
            six.sort_unstable();
            let gaps: Vec<u32> = six
                .windows(2)
                .map(|w| w[1] - w[0])
                .chain([six[0] + SHARDS - six[5]])
                .collect();
            assert!(gaps.iter().all(|&g| g <= 4), "{item}: {six:?}");
            // An order id of a bucket carries the bucket's shard.
            assert_eq!(order_shard(&new_order_id(&bucket_id(item, 5))), Some(shards[4]));
        }
    }

    #[test]
    fn a_home_bucket_is_stable_and_spreads_users() {
        assert_eq!(home_bucket("anyone", 1), 0);
        assert_eq!(home_bucket("anyone", 0), 0);
        assert_eq!(stock_buckets(1), 0..=0);
        assert_eq!(stock_buckets(6), 1..=6);
        let mut per_bucket = [0u32; 7];
        for u in 0..60_000 {
            let user = format!("u{u}");
            let b = home_bucket(&user, 6);
            assert_eq!(b, home_bucket(&user, 6), "stable");
            assert!(stock_buckets(6).contains(&b), "bucket {b} holds no stock");
            per_bucket[b as usize] += 1;
        }
        assert_eq!(per_bucket[0], 0, "a bucketed item's own keys hold no stock");
        for n in &per_bucket[1..] {
            assert!((9_000..11_000).contains(n), "uneven: {per_bucket:?}");
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
