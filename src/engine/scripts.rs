//! The Lua scripts' sources, as Redis runs them (`docs/internals.md`, "Scripts").
//!
//! A script run with `EVALSHA` is one self-contained chunk: it cannot load another script,
//! and sharing code between scripts in Redis takes Redis Functions (`FUNCTION LOAD`, 7.0+),
//! which this engine does not use. So the code that `pay.lua`, `cancel.lua` and `expire.lua`
//! share lives once in the prelude `lua/lib/order.lua` and is joined in front of each of them
//! here, at build time. The prelude only defines functions, so each script's own
//! argument-count asserts still run first.
//!
//! `reserve.lua` and `put_item.lua` take no prelude: they are run as they stand, also by the
//! load kit (`redis-benchmark` `SCRIPT LOAD` of `lua/reserve.lua`, `loadtest/README.md`).

/// Reserve units of an item (`lua/reserve.lua`, self-contained).
pub const RESERVE: &str = include_str!("../../lua/reserve.lua");

/// Pay a reserved order (`lua/lib/order.lua` + `lua/pay.lua`).
pub const PAY: &str = concat!(
    include_str!("../../lua/lib/order.lua"),
    include_str!("../../lua/pay.lua")
);

/// Cancel a reserved order (`lua/lib/order.lua` + `lua/cancel.lua`).
pub const CANCEL: &str = concat!(
    include_str!("../../lua/lib/order.lua"),
    include_str!("../../lua/cancel.lua")
);

/// Expire a reserved order past its deadline (`lua/lib/order.lua` + `lua/expire.lua`).
pub const EXPIRE: &str = concat!(
    include_str!("../../lua/lib/order.lua"),
    include_str!("../../lua/expire.lua")
);

/// Create or replace an item (`lua/put_item.lua`, self-contained).
pub const PUT_ITEM: &str = include_str!("../../lua/put_item.lua");

#[cfg(test)]
mod tests {
    use super::*;

    const ORDER_PRELUDE: &str = include_str!("../../lua/lib/order.lua");

    #[test]
    fn order_scripts_are_the_prelude_then_their_own_file() {
        assert!(ORDER_PRELUDE.ends_with('\n'), "each script starts on a line of its own");
        for (script, own) in [
            (PAY, include_str!("../../lua/pay.lua")),
            (CANCEL, include_str!("../../lua/cancel.lua")),
            (EXPIRE, include_str!("../../lua/expire.lua")),
        ] {
            assert_eq!(script, format!("{ORDER_PRELUDE}{own}"));
        }
    }
}
