//! Connections to Redis, one server or a Redis Cluster: every command and script of the
//! engine, the persistence worker, the monitor and reconcile goes through a [`RedisConn`],
//! so none of them knows which it talks to.
//!
//! - Standalone: a `ConnectionManager` (one multiplexed connection that reconnects by
//!   itself when it breaks; concurrent requests are pipelined on it, redis-rs #1319), made
//!   anew when it goes silent ([`Renewing`]).
//! - Cluster: redis-rs' async `ClusterConnection` (one multiplexed connection per node,
//!   MOVED/ASK followed, topology refreshed). A script runs on the slot of its first key;
//!   `SCRIPT LOAD` after `NOSCRIPT` goes to every primary (a promoted replica starts with an
//!   empty script cache).
//!
//! The shared connection carries requests; blocking stream reads take their own
//! connections from a [`Pool`] (a `BLOCK` on a shared connection stalls every request
//! behind it, redis-rs #453, #643).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use redis::{Cmd, RedisFuture, Value};

use crate::config::RedisMode;
use crate::error::Error;
use crate::lograte::BACKGROUND;

/// Where Redis is: the mode and the URL(s) of `REDIS_URL`.
#[derive(Clone, Debug)]
pub struct Target {
    pub mode: RedisMode,
    /// One URL (standalone) or the seed nodes (cluster).
    pub urls: Vec<String>,
    /// Connect and response timeout of every command.
    pub timeout: Duration,
}

impl Target {
    pub fn new(url: &str, mode: RedisMode, timeout: Duration) -> Self {
        Target {
            mode,
            urls: url
                .split(',')
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty())
                .collect(),
            timeout,
        }
    }

    pub fn is_cluster(&self) -> bool {
        self.mode == RedisMode::Cluster
    }

    fn cluster_client(&self, response_timeout: Duration) -> Result<ClusterClient, Error> {
        ClusterClient::builder(self.urls.iter().map(String::as_str))
            .connection_timeout(self.timeout)
            .response_timeout(response_timeout)
            // A failover takes about the node timeout: retry MOVED/TRYAGAIN/CLUSTERDOWN a few
            // times within the caller's own deadline (the guard's timeout cuts it off).
            .retries(3)
            .min_retry_wait(50)
            .max_retry_wait(400)
            .build()
            .map_err(|e| Error::RedisConnection(format!("bad REDIS_URL: {e}")))
    }

    fn single_client(&self) -> Result<redis::Client, Error> {
        let url = self.urls.first().map(String::as_str).unwrap_or_default();
        redis::Client::open(url).map_err(|e| Error::RedisConnection(format!("bad REDIS_URL: {e}")))
    }

    /// The shared connection. Lazy: the gateway starts (and answers 503) while Redis is
    /// still down, and connects on first use.
    pub fn shared(&self) -> Result<RedisConn, Error> {
        match self.mode {
            RedisMode::Standalone => {
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(self.timeout))
                    .set_response_timeout(Some(self.timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_millis(500));
                Ok(RedisConn::Renewing(Arc::new(Renewing::new(
                    self.single_client()?,
                    config,
                    self.timeout / 2,
                )?)))
            }
            RedisMode::Cluster => Ok(RedisConn::Cluster(Arc::new(LazyCluster::new(
                self.cluster_client(self.timeout)?,
            )))),
        }
    }

    /// A connection of its own (for blocking reads), whose commands may take up to
    /// `response_timeout`.
    pub async fn dedicated(&self, response_timeout: Duration) -> Result<RedisConn, Error> {
        let connect = async {
            match self.mode {
                RedisMode::Standalone => {
                    let config = redis::AsyncConnectionConfig::new()
                        .set_connection_timeout(Some(self.timeout))
                        .set_response_timeout(Some(response_timeout));
                    let conn = self
                        .single_client()?
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?;
                    Ok(RedisConn::Dedicated(OwnConn {
                        conn,
                        silent: Arc::new(AtomicBool::new(false)),
                    }))
                }
                RedisMode::Cluster => {
                    let conn = self.cluster_client(response_timeout)?.get_async_connection().await?;
                    Ok(RedisConn::Cluster(Arc::new(LazyCluster::ready(conn))))
                }
            }
        };
        match tokio::time::timeout(self.timeout * 2, connect).await {
            Ok(r) => r,
            Err(_) => Err(Error::RedisTimeout),
        }
    }

    /// A pool of dedicated connections (see [`Pool`]).
    pub fn pool(&self, size: u32, response_timeout: Duration) -> Pool {
        bb8::Pool::builder()
            .max_size(size)
            .connection_timeout(self.timeout)
            // A standalone connection is checked with PING on check-out; a cluster
            // connection heals itself per node (and a PING would go to every node).
            .test_on_check_out(!self.is_cluster())
            .build_unchecked(Dedicated {
                target: self.clone(),
                response_timeout,
            })
    }

    /// The URLs to try, in turn, for a pub/sub subscription (classic `PUBLISH` reaches the
    /// subscribers of every node of a cluster, so any live node will do).
    pub fn pubsub_urls(&self) -> &[String] {
        &self.urls
    }
}

/// A cluster connection made on first use; a failed attempt is retried by the next use.
/// [`LazyCluster::reset`] drops it, so the next use connects afresh from the seed nodes.
pub struct LazyCluster {
    /// `None` when made ready ([`Target::dedicated`]).
    client: Option<ClusterClient>,
    conn: ArcSwapOption<ClusterConnection>,
    /// Connecting, one at a time.
    connecting: tokio::sync::Mutex<()>,
}

impl LazyCluster {
    fn new(client: ClusterClient) -> Self {
        LazyCluster {
            client: Some(client),
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    fn ready(conn: ClusterConnection) -> Self {
        LazyCluster {
            client: None,
            conn: ArcSwapOption::new(Some(Arc::new(conn))),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    async fn get(&self) -> redis::RedisResult<ClusterConnection> {
        // Every command passes here: `load` takes no reference count on the Arc; what is
        // cloned is the connection's own cheap handle.
        if let Some(c) = self.conn.load().as_ref() {
            return Ok(ClusterConnection::clone(c));
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.conn.load_full() {
            return Ok((*c).clone());
        }
        let conn = match &self.client {
            Some(client) => client.get_async_connection().await?,
            None => {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "a dedicated cluster connection is made connected",
                )));
            }
        };
        self.conn.store(Some(Arc::new(conn.clone())));
        Ok(conn)
    }

    /// Forget the connection: the next use makes a new one, with the topology read again
    /// from the seed nodes. After a failover redis-rs' cluster connection was seen to time
    /// out on some slots for a minute and more (its slot refresh failing while a node was
    /// down, and not retried); a new connection serves them at once. A dedicated connection
    /// (no client to connect with) is kept.
    pub fn reset(&self) {
        if self.client.is_some() && self.conn.swap(None).is_some() {
            tracing::warn!("redis cluster connection reset: a shard's calls kept failing");
        }
    }
}

/// The shared connection to one server: a `ConnectionManager`, replaced by a new one when
/// it leaves a command unanswered. The manager reconnects by itself when its connection
/// breaks (reset, closed, refused), but a connection that goes silent — a network
/// partition, a firewall or load balancer that lost its state and drops the packets —
/// breaks nothing: every command times out, forever, and the manager keeps it (a timeout
/// is not a broken connection to redis-rs). Seen: after a 4 s blackhole between the gateway
/// and Redis, every reserve still answered 503 15 s after the network came back
/// (tests/netfault.rs).
///
/// A command abandoned unanswered after [`Renewing::silent_for`] (its caller's timeout, or
/// the manager's response timeout, ended it) makes the next command use a new manager, which
/// connects afresh; commands in flight on the old one end as they would have, and the old
/// connection closes when the last of them lets go of it.
pub struct Renewing {
    client: redis::Client,
    config: ConnectionManagerConfig,
    current: ArcSwap<ConnectionManager>,
    /// Unanswered this long, then abandoned: the connection is given up. Half the Redis
    /// timeout, because the callers' timeouts (the guard's, the health probe's) are about
    /// the Redis timeout and drop a command a moment before the manager's own would end it.
    silent_for: Duration,
}

impl Renewing {
    fn new(client: redis::Client, config: ConnectionManagerConfig, silent_for: Duration) -> Result<Self, Error> {
        let first = Self::manager(&client, &config)?;
        Ok(Renewing {
            client,
            config,
            current: ArcSwap::from_pointee(first),
            silent_for,
        })
    }

    /// A manager that connects on first use.
    fn manager(client: &redis::Client, config: &ConnectionManagerConfig) -> Result<ConnectionManager, Error> {
        ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|e| Error::RedisConnection(e.to_string()))
    }

    /// Replace `silent` with a new manager, unless another command already did.
    fn renew(&self, silent: &Arc<ConnectionManager>, waited: Duration) {
        let fresh = match Self::manager(&self.client, &self.config) {
            Ok(m) => Arc::new(m),
            Err(e) => {
                tracing::warn!(cause = %e, "redis connection silent; no new one made");
                return;
            }
        };
        let before = self.current.compare_and_swap(silent, fresh);
        if Arc::ptr_eq(&before, silent)
            && let Some(suppressed) = BACKGROUND.admit("redis silent")
        {
            tracing::warn!(
                waited_ms = waited.as_millis() as u64,
                suppressed,
                "redis connection silent; connecting afresh"
            );
        }
    }

    /// Run `send` on the current manager, renewing it if the command is left unanswered
    /// for [`Self::silent_for`].
    async fn send<T>(
        &self,
        send: impl AsyncFnOnce(&mut ConnectionManager) -> redis::RedisResult<T>,
    ) -> redis::RedisResult<T> {
        let used = self.current.load_full();
        let mut manager = ConnectionManager::clone(&used);
        answered(send(&mut manager), |waited| {
            if waited >= self.silent_for {
                self.renew(&used, waited);
            }
        })
        .await
    }
}

/// A connection of one caller's own (the persistence workers' blocking reads, from a
/// [`Pool`]), which remembers leaving a command unanswered: its pool then drops it rather
/// than hand it out again (bb8 puts back a connection whose command or check-out `PING`
/// was cut off by a timeout, and a connection gone silent answers nothing, ever: after a
/// blackhole the workers persisted nothing more, tests/netfault.rs).
#[derive(Clone)]
pub struct OwnConn {
    conn: redis::aio::MultiplexedConnection,
    /// Set when a command was dropped or timed out unanswered.
    silent: Arc<AtomicBool>,
}

/// Await `command`; when it ends without an answer (a timeout, or dropped by the caller's
/// own timeout), call `silent` with how long it waited. An error reply, or a broken
/// connection, is an answer.
async fn answered<T>(
    command: impl Future<Output = redis::RedisResult<T>>,
    silent: impl FnOnce(Duration),
) -> redis::RedisResult<T> {
    let mut waiting = Waiting {
        since: Instant::now(),
        silent: Some(silent),
    };
    let result = command.await;
    if !matches!(&result, Err(e) if e.is_timeout()) {
        waiting.silent = None;
    }
    result
}

/// A drop guard, because a caller's timeout usually ends a command by dropping it.
struct Waiting<F: FnOnce(Duration)> {
    since: Instant,
    /// `None` once answered.
    silent: Option<F>,
}

impl<F: FnOnce(Duration)> Drop for Waiting<F> {
    fn drop(&mut self) {
        if let Some(silent) = self.silent.take() {
            silent(self.since.elapsed());
        }
    }
}

/// A connection to Redis: what the commands and scripts run on.
#[derive(Clone)]
pub enum RedisConn {
    /// The shared connection to one server.
    Renewing(Arc<Renewing>),
    /// A connection manager of the caller's own (tests).
    Single(ConnectionManager),
    /// A connection of its own to one server.
    Dedicated(OwnConn),
    Cluster(Arc<LazyCluster>),
}

impl RedisConn {
    /// A cluster connection: forget it, so the next call connects afresh
    /// ([`LazyCluster::reset`]); one server's shared connection renews itself when it goes
    /// silent ([`Renewing`]).
    pub fn reset(&self) {
        if let RedisConn::Cluster(c) = self {
            c.reset();
        }
    }

    /// Run `cmd` on the primary that owns `key`'s slot, for commands whose keys Redis does
    /// not name (`SCAN … MATCH sk:{tag}:…`, `WAIT`). Standalone: the one server.
    pub async fn query_on_slot_of<T: redis::FromRedisValue>(&mut self, key: &str, cmd: &Cmd) -> redis::RedisResult<T> {
        match self {
            RedisConn::Cluster(c) => {
                let mut conn = c.get().await?;
                let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(
                    key,
                    SlotAddr::Master,
                )));
                let v = conn.route_command(cmd.clone(), route).await?;
                Ok(redis::from_redis_value(v)?)
            }
            _ => cmd.query_async(self).await,
        }
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            RedisConn::Renewing(c) => Box::pin(c.send(async |m| m.req_packed_command(cmd).await)),
            RedisConn::Single(c) => c.req_packed_command(cmd),
            RedisConn::Dedicated(c) => {
                let silent = c.silent.clone();
                Box::pin(answered(c.conn.req_packed_command(cmd), move |_| {
                    silent.store(true, Ordering::Relaxed)
                }))
            }
            RedisConn::Cluster(c) => Box::pin(async move {
                let mut conn = c.get().await?;
                conn.req_packed_command(cmd).await
            }),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            RedisConn::Renewing(c) => {
                Box::pin(c.send(async move |m| m.req_packed_commands(pipeline, offset, count).await))
            }
            RedisConn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            RedisConn::Dedicated(c) => {
                let silent = c.silent.clone();
                Box::pin(answered(
                    c.conn.req_packed_commands(pipeline, offset, count),
                    move |_| silent.store(true, Ordering::Relaxed),
                ))
            }
            RedisConn::Cluster(c) => Box::pin(async move {
                let mut conn = c.get().await?;
                conn.req_packed_commands(pipeline, offset, count).await
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            RedisConn::Renewing(c) => c.current.load().get_db(),
            RedisConn::Single(c) => c.get_db(),
            RedisConn::Dedicated(c) => c.conn.get_db(),
            RedisConn::Cluster(_) => 0,
        }
    }
}

/// A pool of dedicated connections (the persistence workers' blocking reads).
pub type Pool = bb8::Pool<Dedicated>;

/// Makes the connections of a [`Pool`].
pub struct Dedicated {
    target: Target,
    response_timeout: Duration,
}

impl bb8::ManageConnection for Dedicated {
    type Connection = RedisConn;
    type Error = Error;

    async fn connect(&self) -> Result<RedisConn, Error> {
        self.target.dedicated(self.response_timeout).await
    }

    async fn is_valid(&self, conn: &mut RedisConn) -> Result<(), Error> {
        let pong: String = redis::cmd("PING").query_async(conn).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(Error::RedisConnection(format!("PING answered {pong}")))
        }
    }

    /// A connection that left a command unanswered ([`OwnConn`]); a cluster connection
    /// heals itself per node.
    fn has_broken(&self, conn: &mut RedisConn) -> bool {
        matches!(conn, RedisConn::Dedicated(c) if c.silent.load(Ordering::Relaxed))
    }
}
