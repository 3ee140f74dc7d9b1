//! The Lua scripts' sources, as Redis runs them (`docs/internals.md`, "Scripts"). The
//! engine and `tests/lua_scripts.rs` both load them from here.

/// Reserve units of an item (`lua/reserve.lua`).
pub const RESERVE: &str = include_str!("../../lua/reserve.lua");

/// Pay a reserved order (`lua/pay.lua`).
pub const PAY: &str = include_str!("../../lua/pay.lua");

/// Cancel a reserved order (`lua/cancel.lua`).
pub const CANCEL: &str = include_str!("../../lua/cancel.lua");

/// Expire a reserved order past its deadline (`lua/expire.lua`).
pub const EXPIRE: &str = include_str!("../../lua/expire.lua");

/// Create or replace an item (`lua/put_item.lua`).
pub const PUT_ITEM: &str = include_str!("../../lua/put_item.lua");
