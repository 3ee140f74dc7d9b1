//! # seckill-gateway
//!
//! A flash-sale gateway: sells exactly the stock and never one more, never loses an order it
//! said yes to, and answers the shoppers who get "no" without bothering Redis.
//!
//! ## Request path
//!
//! Read the code in the order a request travels; every stage may answer early with a
//! [`error::Reject`], and only the front door turns a refusal into a status code.
//!
//! | stage | module | answers early with |
//! |---|---|---|
//! | hyper front door: accept, header timeout, 4 KiB body limit, routing | [`http`] | 400, 404, 413 |
//! | identity: HS256 JWT `sub`, or trusted `X-User-Id` | [`identity`] | 401 |
//! | governor token buckets: instance, per IP, per user | [`limiter`] | 429 + `Retry-After` |
//! | Bloom filter of item ids + not-found cache | [`filter`] | 404, no Redis command |
//! | moka: item metadata, sold-out flags | [`cache`] | 410, 425, no Redis command |
//! | stock engine: one atomic Lua script (or in-process critical section) | [`engine`] | 409, 410, 425, 503 |
//! | order event on the shard's Redis Stream, written by the same script | `lua/reserve.lua` | |
//! | persistence worker → PostgreSQL, batched, forward-only upserts, then XACK | [`orders`] | |
//!
//! Supporting modules: [`domain`] (items, orders, order events: the types every stage
//! speaks), [`config`] (flags and environment), [`error`] (refusals, failures, the one status
//! mapping), [`metrics`] (every metric name), [`ids`] (ids, shards, order ids), [`clock`]
//! (injectable time), [`store`] (PostgreSQL or SQLite), [`app`] (shared state, and the one
//! place an engine's item news becomes local state), [`server`] (start and stop a gateway),
//! [`shutdown`] and [`retry`] (the background tasks' stop signal and reconnect delays),
//! [`reload`] (SIGHUP: the `--config` file read again, rate limits and log filter applied),
//! [`telemetry`] (W3C trace context, the access log, OTLP span export).
//! The Redis key layout and script interfaces are in `docs/internals.md`.

pub mod app;
pub mod cache;
pub mod clock;
pub mod config;
pub mod domain;
pub mod engine;
pub mod error;
pub mod filter;
pub mod health;
pub mod http;
pub mod identity;
pub mod ids;
pub mod limiter;
pub mod lograte;
pub mod metrics;
pub mod orders;
pub mod payments;
pub mod reload;
pub mod retry;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
