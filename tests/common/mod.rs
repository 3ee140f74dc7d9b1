//! The one test fixture of the integration tests and benches: every launcher,
//! HTTP helper, poller, Redis probe and engine constructor lives here, once.
//!
//! | module | offers |
//! | --- | --- |
//! | [`servers`] | throwaway `redis-server` and PostgreSQL ([`RedisServer`], [`PgServer`], [`shared_pg`]), [`unique`] names, [`free_port`] |
//! | [`cluster`] | a throwaway Redis Cluster ([`RedisCluster`]): seeds, who serves a key, kill/restart by port, waits for failover |
//! | [`http`] | the HTTP vocabulary: [`http::Api`] (a gateway's routes), [`http::Reply`], [`http::send`], [`http::item_body`] |
//! | [`gateway`] | the in-process gateway launcher: [`gateway::Gateway::builder`] (flag overrides, injectable clock) |
//! | [`binary`] | the real-binary launcher: [`binary::Binary::builder`] (cleared environment, explicit flags, readiness, SIGTERM/SIGKILL by PID, logs) |
//! | [`inspect`] | Redis read directly: [`inspect::Redis`] |
//! | [`engines`] | every stock engine tests and benches build: [`engines::redis_engine`], [`engines::embedded_engine`] |
//! | [`buckets`] | stock buckets: [`buckets::bucketed`] bodies, [`buckets::per_bucket`] figures and their invariants, [`buckets::users_at_home`] |
//! | [`poll`] | the one poller: [`poll::poll`] |
//! | [`proxy`] | network faults: [`proxy::Proxy`] between the gateway and a server, cut ([`proxy::Cut`]: blackhole or hold) and restored |
//! | [`on_both!`] | a test run on one `redis-server` and on a Redis Cluster |
//!
//! A test includes it with `mod common;`, a bench with
//! `#[path = "../tests/common/mod.rs"] mod common;`.

// Each test binary includes this module and uses only part of it.
#![allow(dead_code, unused_imports)]

/// `common::on_both!(f, …)`: each `async fn f(backend: Backend)` of the calling test file
/// as two tests, `f::server` (one `redis-server`) and `f::cluster` (a Redis Cluster of 3
/// masters): the same assertions hold on both.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn server() {
                    super::$name($crate::common::gateway::Backend::Server).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn cluster() {
                    super::$name($crate::common::gateway::Backend::Cluster).await;
                }
            }
        )*
    };
}
pub use on_both;

pub mod binary;
pub mod buckets;
pub mod cluster;
pub mod engines;
pub mod gateway;
pub mod http;
pub mod inspect;
pub mod poll;
pub mod proxy;
pub mod servers;

pub use cluster::RedisCluster;
pub use poll::poll;
pub use servers::{PgServer, RedisServer, SHARED_PG_ENV, free_port, shared_pg, unique};
