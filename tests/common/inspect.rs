//! Redis, read directly: the side effects behind the HTTP answers and the
//! engine replies (key layout: `docs/internals.md`).

use std::collections::HashMap;

use redis::AsyncCommands;
use redis::aio::ConnectionManager;
use seckill_gateway::config::RedisMode;
use seckill_gateway::domain::OrderEvent;
use seckill_gateway::engine::conn::{RedisConn, Target};
use seckill_gateway::engine::keys;
use seckill_gateway::ids::shard_of;

use super::RedisServer;

/// One stream entry: its fields.
pub type Event = HashMap<String, String>;

/// A connection to a test's Redis, and what the tests read through it. The
/// connection is public for anything else (`redis::cmd(…).query_async(&mut rd.conn)`).
#[derive(Clone)]
pub struct Redis {
    pub conn: RedisConn,
}

impl Redis {
    pub async fn connect(server: &RedisServer) -> Redis {
        let conn = ConnectionManager::new(server.client())
            .await
            .expect("connect to the test redis-server");
        Redis {
            conn: RedisConn::Single(conn),
        }
    }

    /// A cluster's keys, whichever primary holds them (`seeds`: comma-separated URLs).
    pub fn connect_cluster(seeds: &str) -> Redis {
        let target = Target::new(seeds, RedisMode::Cluster, std::time::Duration::from_secs(2));
        Redis {
            conn: target.shared().expect("a cluster connection"),
        }
    }

    /// Through a connection the test already has (an engine's).
    pub fn on(conn: RedisConn) -> Redis {
        Redis { conn }
    }

    pub async fn item(&mut self, item: &str) -> HashMap<String, String> {
        self.conn.hgetall(keys::item(item)).await.expect("HGETALL item")
    }

    /// An integer field of the item hash (0 when absent).
    pub async fn item_field(&mut self, item: &str, field: &str) -> i64 {
        let v: Option<i64> = self.conn.hget(keys::item(item), field).await.expect("HGET item");
        v.unwrap_or(0)
    }

    pub async fn buyers(&mut self, item: &str) -> HashMap<String, i64> {
        self.conn.hgetall(keys::buyers(item)).await.expect("HGETALL buyers")
    }

    /// The units `user` holds of `item` (0 when none).
    pub async fn held(&mut self, item: &str, user: &str) -> i64 {
        let v: Option<i64> = self.conn.hget(keys::buyers(item), user).await.expect("HGET buyers");
        v.unwrap_or(0)
    }

    pub async fn order(&mut self, order: &str) -> HashMap<String, String> {
        let key = keys::order(order).expect("one of our order ids");
        self.conn.hgetall(key).await.expect("HGETALL order")
    }

    /// Whether the order's hash is still there.
    pub async fn order_exists(&mut self, order: &str) -> bool {
        let key = keys::order(order).expect("one of our order ids");
        self.conn.exists(key).await.expect("EXISTS order")
    }

    /// Every event of the item's shard stream that names `item`, oldest first.
    pub async fn events(&mut self, item: &str) -> Vec<Event> {
        self.entries(&keys::events(shard_of(item)))
            .await
            .into_iter()
            // An order event as its named fields (the scripts write one packed field); an
            // entry that is no order event (a test's poison) as it is.
            .flat_map(|f| match OrderEvent::from_fields(&f) {
                Ok(evs) => evs
                    .into_iter()
                    .map(|ev| ev.named_fields().into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
                    .collect(),
                Err(_) => vec![f],
            })
            .filter(|f| f.get("item_id").map(String::as_str) == Some(item))
            .collect()
    }

    /// The length of the item's shard stream (every item of the shard).
    pub async fn xlen(&mut self, item: &str) -> i64 {
        self.conn.xlen(keys::events(shard_of(item))).await.expect("XLEN")
    }

    /// Append an entry with these fields to the item's shard stream, as is.
    pub async fn add_event(&mut self, item: &str, fields: &[(&str, &str)]) {
        let _: String = self
            .conn
            .xadd(keys::events(shard_of(item)), "*", fields)
            .await
            .expect("XADD");
    }

    /// The dead letters of the item's shard, oldest first.
    pub async fn dead_letters(&mut self, item: &str) -> Vec<Event> {
        self.entries(&keys::dead_letters(shard_of(item))).await
    }

    /// The fields of every entry of a stream, oldest first.
    async fn entries(&mut self, stream: &str) -> Vec<Event> {
        let entries: Vec<(String, Event)> = redis::cmd("XRANGE")
            .arg(stream)
            .arg("-")
            .arg("+")
            .query_async(&mut self.conn)
            .await
            .expect("XRANGE");
        entries.into_iter().map(|(_, fields)| fields).collect()
    }

    /// Redis `TIME`, in milliseconds.
    pub async fn time_ms(&mut self) -> i64 {
        let (secs, micros): (i64, i64) = redis::cmd("TIME").query_async(&mut self.conn).await.expect("TIME");
        secs * 1000 + micros / 1000
    }

    pub async fn reset_stats(&mut self) {
        let () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut self.conn)
            .await
            .expect("CONFIG RESETSTAT");
    }

    /// `INFO commandstats` as command name → calls (`cmdstat_evalsha` → `evalsha`); on a
    /// cluster, summed over every node (the reply is one text per node).
    pub async fn command_calls(&mut self) -> HashMap<String, u64> {
        let info: redis::Value = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.conn)
            .await
            .expect("INFO commandstats");
        let texts: Vec<String> = match info {
            redis::Value::Map(nodes) => nodes
                .into_iter()
                .map(|(_, v)| redis::from_redis_value(v).expect("one node's INFO text"))
                .collect(),
            one => vec![redis::from_redis_value(one).expect("INFO text")],
        };
        let mut calls = HashMap::new();
        for text in texts {
            for (name, n) in parse_commandstats(&text) {
                *calls.entry(name).or_default() += n;
            }
        }
        calls
    }
}

/// Parse `cmdstat_<name>:calls=N,usec=…` lines.
pub fn parse_commandstats(info: &str) -> HashMap<String, u64> {
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest.split(',').find_map(|kv| kv.strip_prefix("calls="))?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}
