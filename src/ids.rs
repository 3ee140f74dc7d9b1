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
pub fn shard_of(item_id: &str) -> u32 {
    crc32fast::hash(item_id.as_bytes()) % SHARDS
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
