//! Stage 7 — orders after the stock engine: the persistence worker that carries the events
//! from the Redis streams to the database, the deadline sweeper, and reconcile. Start-up
//! ([`crate::server`]) decides which of them an instance runs.

pub mod reconcile;
pub mod repair;
pub mod sweeper;
pub mod worker;
