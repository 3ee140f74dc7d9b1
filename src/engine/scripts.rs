//! The Lua scripts' sources, as Redis runs them (`docs/internals.md`, "Scripts").
//!
//! A script run with `EVALSHA` is one self-contained chunk: it cannot load another script,
//! and sharing code between scripts in Redis takes Redis Functions (`FUNCTION LOAD`, 7.0+),
//! which this engine does not use. So shared code lives once in a prelude joined in front of
//! the scripts here, at build time: `lua/lib/seq.lua` (the shard's write sequence) in front of
//! every script that writes events (reserve, pay, cancel, expire, settle, refund, transfer_out, transfer_in), and `lua/lib/order.lua` in front of `pay.lua`,
//! `cancel.lua`, `expire.lua`, `settle.lua` and `refund.lua`. The preludes only define functions, so each script's own
//! argument-count asserts still run first.
//!
//! `put_item.lua`, `pause.lua` and `transfer_forget.lua` take no prelude. The load kit joins `lua/lib/seq.lua` and `lua/reserve.lua`
//! the same way for `redis-benchmark` (`loadtest/README.md`).

/// Reserve units of an item (`lua/lib/seq.lua` + `lua/reserve.lua`).
pub const RESERVE: &str = concat!(
    include_str!("../../lua/lib/seq.lua"),
    include_str!("../../lua/reserve.lua")
);

/// Pay a reserved order (`lua/lib/seq.lua` + `lua/lib/order.lua` + `lua/pay.lua`).
pub const PAY: &str = concat!(
    include_str!("../../lua/lib/seq.lua"),
    include_str!("../../lua/lib/order.lua"),
    include_str!("../../lua/pay.lua")
);

/// Cancel a reserved order (`lua/lib/seq.lua` + `lua/lib/order.lua` + `lua/cancel.lua`).
pub const CANCEL: &str = concat!(
    include_str!("../../lua/lib/seq.lua"),
    include_str!("../../lua/lib/order.lua"),
    include_str!("../../lua/cancel.lua")
);

/// Expire a reserved order past its deadline (`lua/lib/seq.lua` + `lua/lib/order.lua` + `lua/expire.lua`).
pub const EXPIRE: &str = concat!(
    include_str!("../../lua/lib/seq.lua"),
    include_str!("../../lua/lib/order.lua"),
    include_str!("../../lua/expire.lua")
);

/// A payment provider's payment of an order (`lua/lib/seq.lua` + `lua/lib/order.lua` +
/// `lua/settle.lua`).
pub const SETTLE: &str = concat!(
    include_str!("../../lua/lib/seq.lua"),
    include_str!("../../lua/lib/order.lua"),
    include_str!("../../lua/settle.lua")
);

/// Refund a paid (or refund-due) order (`lua/lib/seq.lua` + `lua/lib/order.lua` +
/// `lua/refund.lua`).
pub const REFUND: &str = concat!(
    include_str!("../../lua/lib/seq.lua"),
    include_str!("../../lua/lib/order.lua"),
    include_str!("../../lua/refund.lua")
);

/// Take units out of a stock bucket for a transfer (`lua/lib/seq.lua` + `lua/transfer_out.lua`).
pub const TRANSFER_OUT: &str = concat!(
    include_str!("../../lua/lib/seq.lua"),
    include_str!("../../lua/transfer_out.lua")
);

/// Credit a transfer to its destination bucket, once (`lua/lib/seq.lua` + `lua/transfer_in.lua`).
pub const TRANSFER_IN: &str = concat!(
    include_str!("../../lua/lib/seq.lua"),
    include_str!("../../lua/transfer_in.lua")
);

/// Drop a transfer record (`lua/transfer_forget.lua`, self-contained).
pub const TRANSFER_FORGET: &str = include_str!("../../lua/transfer_forget.lua");

/// Pause or resume the sale of one engine item (`lua/pause.lua`, self-contained).
pub const PAUSE: &str = include_str!("../../lua/pause.lua");

/// Create or replace an item (`lua/put_item.lua`, self-contained).
pub const PUT_ITEM: &str = include_str!("../../lua/put_item.lua");

#[cfg(test)]
mod tests {
    use super::*;

    const SEQ_PRELUDE: &str = include_str!("../../lua/lib/seq.lua");
    const ORDER_PRELUDE: &str = include_str!("../../lua/lib/order.lua");

    #[test]
    fn scripts_are_their_preludes_then_their_own_file() {
        assert!(SEQ_PRELUDE.ends_with('\n'), "each script starts on a line of its own");
        assert!(ORDER_PRELUDE.ends_with('\n'), "each script starts on a line of its own");
        assert_eq!(
            RESERVE,
            format!("{SEQ_PRELUDE}{}", include_str!("../../lua/reserve.lua"))
        );
        assert_eq!(
            TRANSFER_OUT,
            format!("{SEQ_PRELUDE}{}", include_str!("../../lua/transfer_out.lua"))
        );
        assert_eq!(
            TRANSFER_IN,
            format!("{SEQ_PRELUDE}{}", include_str!("../../lua/transfer_in.lua"))
        );
        for (script, own) in [
            (PAY, include_str!("../../lua/pay.lua")),
            (CANCEL, include_str!("../../lua/cancel.lua")),
            (EXPIRE, include_str!("../../lua/expire.lua")),
        ] {
            assert_eq!(script, format!("{SEQ_PRELUDE}{ORDER_PRELUDE}{own}"));
        }
    }
}
