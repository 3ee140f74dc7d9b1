//! A real Redis Cluster on loopback: `redis-server` child processes on free
//! ports, joined by `redis-cli --cluster create`, killed and restarted by PID,
//! and waited for until every running node agrees on who serves which slots.
//!
//! ```ignore
//! let mut cluster = RedisCluster::start(3, 1).await;   // 3 masters, 1 replica each
//! let master = cluster.master_of("sk:{s1}:item:x").await;
//! cluster.kill(master);
//! let promoted = cluster.wait_failover(master).await;   // one of its replicas
//! cluster.restart(master);
//! cluster.wait_ok().await;                              // it is back, as a replica
//! ```
//!
//! Each node has a directory of its own (`dir(port)`: its `nodes-<port>.conf`,
//! log, and with AOF on the `appendonlydir/`) and a cluster bus port picked
//! apart from its client port (`--cluster-port`), so a node never depends on
//! `port + 10000` being free. The nodes are configured for tests that take a
//! master away:
//!
//! - `cluster-require-full-coverage no`: keys of healthy masters keep working
//!   while one master's slots have no primary;
//! - `cluster-allow-reads-when-down no`: a node that thinks the cluster is down
//!   refuses reads too;
//! - `cluster-replica-validity-factor 0`: a replica is promoted however long it
//!   was cut off, so a test decides what a replica missed, not a timer;
//! - `repl-diskless-sync-delay 0`: a (re)joining replica is synced at once
//!   instead of after the default 5 s wait for other replicas.
//!
//! Waits are `async` (on [`poll`]) so a gateway running in the same runtime
//! keeps serving while a test waits for a failover.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use redis::AsyncConnectionConfig;
use redis::aio::MultiplexedConnection;
use tempfile::TempDir;

use super::poll;
use super::servers::{free_port, on_a_free_port, spawn_redis};

/// How long the cluster may take to form, fail over, or take a node back.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one probe of one node may take (connect, then each reply).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long a restarted node may take to answer `PING` (AOF loading included).
const RESTART_TIMEOUT: Duration = Duration::from_secs(20);

/// `appendfsync`: when an AOF write reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AppendFsync {
    /// After every write command, before the reply.
    Always,
    /// Once a second: a crash loses up to a second of acknowledged writes.
    EverySec,
    /// When the kernel decides.
    No,
}

impl AppendFsync {
    fn as_str(self) -> &'static str {
        match self {
            AppendFsync::Always => "always",
            AppendFsync::EverySec => "everysec",
            AppendFsync::No => "no",
        }
    }
}

/// A cluster's shape and node settings; [`Self::start`] starts it.
#[derive(Clone, Debug)]
pub struct ClusterBuilder {
    masters: usize,
    replicas_per_master: usize,
    /// `cluster-node-timeout`: how long a node may be unreachable before it is
    /// failed (and, for a master, one of its replicas promoted).
    node_timeout: Duration,
    /// `None`: nothing on disk (no AOF, no snapshots).
    appendonly: Option<AppendFsync>,
}

impl ClusterBuilder {
    /// `cluster-node-timeout` (default 1 s). A failover takes about this long
    /// plus an election of 0.5–1 s.
    pub fn node_timeout(mut self, timeout: Duration) -> Self {
        self.node_timeout = timeout;
        self
    }

    /// Every node keeps an AOF (`appendonly yes`) fsynced as `fsync` says, in
    /// `dir(port)/appendonlydir/`, and a restarted node loads it.
    pub fn appendonly(mut self, fsync: AppendFsync) -> Self {
        self.appendonly = Some(fsync);
        self
    }

    /// Starts `masters * (1 + replicas_per_master)` nodes, joins them with
    /// `redis-cli --cluster create`, and waits until every node reports
    /// `cluster_state:ok`, agrees on the slots, and every replica's link to its
    /// master is up.
    ///
    /// Panics if `redis-server` or `redis-cli` is missing, with fewer than 3
    /// masters (`redis-cli` refuses), or when the cluster does not form within
    /// [`SETTLE_TIMEOUT`].
    pub async fn start(self) -> RedisCluster {
        assert!(
            self.masters >= 3,
            "a Redis Cluster needs at least 3 masters, not {}",
            self.masters
        );
        let root = tempfile::Builder::new()
            .prefix("seckill-cluster-")
            .tempdir()
            .expect("create a temporary directory for the Redis Cluster");
        let count = self.masters * (1 + self.replicas_per_master);
        let mut cluster = RedisCluster {
            nodes: Vec::with_capacity(count),
            settings: self,
            root,
        };
        for _ in 0..count {
            let node = cluster.spawn_node();
            cluster.nodes.push(node);
        }
        cluster.create().await;
        let (masters, replicas) = (cluster.settings.masters, cluster.settings.replicas_per_master);
        cluster
            .settle("the Redis Cluster to form", |view| {
                let shape = masters_with_slots(view)
                    .map(|m| replicas_in(view, m).count())
                    .collect::<Vec<_>>();
                let slots: u32 = view
                    .values()
                    .flat_map(|n| &n.slots)
                    .map(|(a, b)| u32::from(b - a) + 1)
                    .sum();
                if shape.len() == masters && shape.iter().all(|&r| r == replicas) && slots == 16384 {
                    Ok(())
                } else {
                    Err(format!(
                        "want {masters} masters with {replicas} replicas each covering 16384 slots, \
                         have replicas per master {shape:?} covering {slots} slots"
                    ))
                }
            })
            .await;
        cluster
    }
}

/// One `redis-server` of the cluster.
struct Node {
    port: u16,
    /// The cluster bus port (`--cluster-port`), kept across restarts: the
    /// other nodes know the node by both.
    bus_port: u16,
    /// Its `--dir`: nodes file, log, AOF. Inside the cluster's root directory.
    dir: PathBuf,
    /// `None` while killed.
    child: Option<Child>,
    /// The replicas it had when it was last killed, as it listed them itself:
    /// the nodes [`RedisCluster::wait_failover`] waits for.
    replicas_when_killed: Vec<u16>,
}

/// A throwaway Redis Cluster on loopback. Dropping it kills every node
/// (SIGKILL, by PID) and removes their directories.
pub struct RedisCluster {
    /// In start order; its ports never change (a restart reuses them).
    nodes: Vec<Node>,
    settings: ClusterBuilder,
    /// Holds one directory per node; removed on drop, after the nodes are killed.
    root: TempDir,
}

impl RedisCluster {
    /// [`ClusterBuilder::start`] with the default settings (no AOF, 1 s node
    /// timeout): `RedisCluster::start(3, 1)` is 3 masters with one replica each.
    pub async fn start(masters: usize, replicas_per_master: usize) -> Self {
        Self::builder(masters, replicas_per_master).start().await
    }

    /// A cluster of this shape, to configure before starting it.
    pub fn builder(masters: usize, replicas_per_master: usize) -> ClusterBuilder {
        ClusterBuilder {
            masters,
            replicas_per_master,
            node_timeout: Duration::from_secs(1),
            appendonly: None,
        }
    }

    /// Every node's port, in start order (killed ones included).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis://127.0.0.1:PORT` of every node, in start order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| url(n.port)).collect()
    }

    /// Every node as a seed list: `redis://127.0.0.1:P1,redis://127.0.0.1:P2,…`
    /// (what `REDIS_URL` takes in cluster mode).
    pub fn seeds(&self) -> String {
        self.urls().join(",")
    }

    /// A client of the one node on `port` (no cluster redirections followed).
    pub fn client(&self, port: u16) -> redis::Client {
        redis::Client::open(url(self.node(port).port)).expect("redis client for a cluster node")
    }

    /// The node's working directory: `nodes-<port>.conf`, `redis-<port>.log`
    /// and, with AOF on, `appendonlydir/`.
    pub fn dir(&self, port: u16) -> &Path {
        &self.node(port).dir
    }

    /// Whether the node on `port` runs (it was not killed, or was restarted).
    pub fn is_running(&self, port: u16) -> bool {
        self.node(port).child.is_some()
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`, asked of a running node).
    pub async fn slot_of(&self, key: &str) -> u16 {
        let port = self.running().next().expect("a running cluster node");
        let mut conn = connect(port).await.unwrap_or_else(|e| panic!("CLUSTER KEYSLOT: {e}"));
        redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("CLUSTER KEYSLOT on port {port}: {e}"))
    }

    /// The port of the master serving `key`'s slot, once every running node
    /// agrees (it may be a killed master that no replica has replaced yet).
    pub async fn master_of(&self, key: &str) -> u16 {
        let slot = self.slot_of(key).await;
        self.settle(&format!("a master of slot {slot} all nodes agree on"), |view| {
            masters_with_slots(view)
                .find(|m| view[m].slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
                .ok_or_else(|| format!("no node serves slot {slot}"))
        })
        .await
    }

    /// The masters serving slots, by port, once every running node agrees.
    pub async fn masters(&self) -> Vec<u16> {
        self.settle("the masters", |view| Ok(masters_with_slots(view).collect()))
            .await
    }

    /// The running replicas of `master`, by port, once every running node agrees.
    pub async fn replicas_of(&self, master: u16) -> Vec<u16> {
        self.settle(&format!("the replicas of {master}"), |view| {
            Ok(replicas_in(view, master).filter(|&r| self.is_running(r)).collect())
        })
        .await
    }

    /// Kills the node on `port` with SIGKILL (by PID) and reaps it; first asks
    /// it which replicas it has, for [`Self::wait_failover`]. No-op when killed.
    pub fn kill(&mut self, port: u16) {
        if !self.is_running(port) {
            return;
        }
        let replicas = own_replicas(port);
        let node = self.node_mut(port);
        node.replicas_when_killed = replicas;
        if let Some(mut child) = node.child.take() {
            let _ = child.kill(); // SIGKILL on Unix
            let _ = child.wait();
        }
    }

    /// Starts the killed node on `port` again: same port, bus port, directory,
    /// nodes file (and AOF), and waits until it answers `PING`. It then rejoins
    /// on its own; [`Self::wait_ok`] waits for that. Kills it first if it runs.
    pub fn restart(&mut self, port: u16) {
        self.kill(port);
        let config = self.node_config(self.node(port));
        let node = self.node(port);
        let deadline = Instant::now() + RESTART_TIMEOUT;
        let child = loop {
            match spawn_redis(&node.dir, port, &config) {
                Ok(child) => break child,
                // The old sockets may linger for a moment.
                Err(e) if Instant::now() > deadline => {
                    panic!("cluster node did not restart on port {port}: {e}")
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        };
        self.node_mut(port).child = Some(child);
    }

    /// Waits until one of the replicas the master on `old_master` had when it
    /// was [killed](Self::kill) serves its slots and the cluster has settled
    /// ([`Self::wait_ok`]); returns the promoted replica's port.
    ///
    /// Panics if the node was not killed through [`Self::kill`] while a master
    /// with replicas, or no replica took over within [`SETTLE_TIMEOUT`].
    pub async fn wait_failover(&self, old_master: u16) -> u16 {
        let node = self.node(old_master);
        assert!(
            node.child.is_none() && !node.replicas_when_killed.is_empty(),
            "wait_failover({old_master}): the node must have been killed with `kill` while a master with replicas"
        );
        let candidates = &node.replicas_when_killed;
        self.settle(
            &format!("a replica of {old_master} ({candidates:?}) to take over"),
            |view| {
                candidates
                    .iter()
                    .copied()
                    .find(|r| view.get(r).is_some_and(|n| n.master.is_none() && !n.slots.is_empty()))
                    .ok_or_else(|| "none of them is a master with slots yet".to_owned())
            },
        )
        .await
    }

    /// Waits until every running node reports `cluster_state:ok`, all of them
    /// list the same roles and slots, each one's own role matches that list,
    /// and every running replica's link to its master is up.
    ///
    /// Panics, saying what was last missing, after [`SETTLE_TIMEOUT`].
    pub async fn wait_ok(&self) {
        self.settle("the Redis Cluster to settle", |_| Ok(())).await
    }

    /// Waits until the node on `port` (a killed master [restarted](Self::restart) after its
    /// failover) is a replica whose link to its primary is up, past its first sync: only
    /// then can a `WAIT 1` on that primary be confirmed. Redis's part of the recovery, so
    /// that a test's own wait measures the gateway's; panics after [`SETTLE_TIMEOUT`].
    pub async fn wait_in_sync(&self, port: u16) {
        let mut last = String::new();
        let synced = poll(SETTLE_TIMEOUT, async || {
            let info = match connect(port).await {
                Ok(mut conn) => query(&mut conn, port, &["INFO", "replication"]).await,
                Err(e) => Err(e),
            };
            match info {
                Ok(info)
                    if field(&info, "role") == Some("slave") && field(&info, "master_link_status") == Some("up") =>
                {
                    Some(())
                }
                Ok(info) => {
                    last = format!(
                        "role {:?}, link {:?}",
                        field(&info, "role"),
                        field(&info, "master_link_status")
                    );
                    None
                }
                Err(e) => {
                    last = e;
                    None
                }
            }
        })
        .await;
        synced.unwrap_or_else(|| panic!("port {port} not an in-sync replica after {SETTLE_TIMEOUT:?}: {last}"))
    }

    /// Polls until the cluster has settled (see [`Self::wait_ok`]) and `check`
    /// accepts the view all running nodes share; panics after
    /// [`SETTLE_TIMEOUT`] with what was last missing.
    async fn settle<T>(&self, what: &str, mut check: impl FnMut(&View) -> Result<T, String>) -> T {
        let mut last = String::new();
        let found = poll(SETTLE_TIMEOUT, async || {
            match self.probe().await.and_then(|view| check(&view)) {
                Ok(found) => Some(found),
                Err(e) => {
                    last = e;
                    None
                }
            }
        })
        .await;
        found.unwrap_or_else(|| panic!("timed out after {SETTLE_TIMEOUT:?} waiting for {what}: {last}"))
    }

    /// The view every running node shares, if the cluster has settled; else
    /// what is not there yet.
    async fn probe(&self) -> Result<View, String> {
        let mut agreed: Option<(u16, View)> = None;
        for port in self.running() {
            let mut conn = connect(port).await?;
            let info = query(&mut conn, port, &["CLUSTER", "INFO"]).await?;
            if field(&info, "cluster_state") != Some("ok") {
                return Err(format!("port {port} reports {:?}", field(&info, "cluster_state")));
            }
            let view = parse_nodes(&query(&mut conn, port, &["CLUSTER", "NODES"]).await?);
            let me = view
                .get(&port)
                .ok_or_else(|| format!("port {port} does not list itself"))?;
            let replication = query(&mut conn, port, &["INFO", "replication"]).await?;
            let role = field(&replication, "role");
            match me.master {
                None if role == Some("master") => {}
                Some(master)
                    if role == Some("slave")
                        && field(&replication, "master_port") == Some(&*master.to_string())
                        && field(&replication, "master_link_status") == Some("up") => {}
                _ => {
                    return Err(format!(
                        "port {port} is listed as {me:?} but its replication is: {}",
                        replication.trim().replace("\r\n", " ")
                    ));
                }
            }
            match &agreed {
                None => agreed = Some((port, view)),
                Some((first, seen)) if *seen != view => {
                    return Err(format!(
                        "ports {first} and {port} disagree:\n  {first}: {seen:?}\n  {port}: {view:?}"
                    ));
                }
                Some(_) => {}
            }
        }
        let (_, view) = agreed.ok_or("no cluster node runs")?;
        match self.running().find(|p| !view.contains_key(p)) {
            Some(missing) => Err(format!("port {missing} is not in the cluster: {view:?}")),
            None => Ok(view),
        }
    }

    /// `redis-cli --cluster create` over every node, replicas assigned by it.
    async fn create(&self) {
        let mut cmd = tokio::process::Command::new("redis-cli");
        cmd.args(["--cluster", "create"])
            .args(self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", &self.settings.replicas_per_master.to_string()])
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = match tokio::time::timeout(SETTLE_TIMEOUT, cmd.output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                panic!("redis-cli not found: install it (apt-get install redis-tools) or run ./scripts/test")
            }
            Ok(Err(e)) => panic!("could not run redis-cli: {e}"),
            Err(_) => panic!("redis-cli --cluster create did not finish within {SETTLE_TIMEOUT:?}"),
        };
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts one node on a free port with a free bus port and a directory of its own.
    fn spawn_node(&self) -> Node {
        on_a_free_port("cluster redis-server", |port| {
            let bus_port = loop {
                let p = free_port();
                if p != port {
                    break p;
                }
            };
            let dir = self.root.path().join(port.to_string());
            std::fs::create_dir_all(&dir).expect("create a cluster node's directory");
            let mut node = Node {
                port,
                bus_port,
                dir,
                child: None,
                replicas_when_killed: Vec::new(),
            };
            let config = self.node_config(&node);
            node.child = Some(spawn_redis(&node.dir, port, &config)?);
            Ok(node)
        })
    }

    /// The `redis-server` arguments of `node`, but for port, bind, dir and log file.
    fn node_config(&self, node: &Node) -> Vec<String> {
        let s = &self.settings;
        let nodes_file = node.dir.join(format!("nodes-{}.conf", node.port));
        let mut config: Vec<(&str, String)> = vec![
            ("--cluster-enabled", "yes".into()),
            ("--cluster-port", node.bus_port.to_string()),
            ("--cluster-config-file", nodes_file.to_string_lossy().into_owned()),
            ("--cluster-node-timeout", s.node_timeout.as_millis().to_string()),
            ("--cluster-require-full-coverage", "no".into()),
            ("--cluster-allow-reads-when-down", "no".into()),
            ("--cluster-replica-validity-factor", "0".into()),
            ("--repl-diskless-sync-delay", "0".into()),
            ("--save", String::new()),
        ];
        match s.appendonly {
            None => config.push(("--appendonly", "no".into())),
            Some(fsync) => {
                config.push(("--appendonly", "yes".into()));
                config.push(("--appendfsync", fsync.as_str().into()));
            }
        }
        config
            .into_iter()
            .flat_map(|(name, value)| [name.to_owned(), value])
            .collect()
    }

    fn running(&self) -> impl Iterator<Item = u16> + '_ {
        self.nodes.iter().filter(|n| n.child.is_some()).map(|n| n.port)
    }

    fn node(&self, port: u16) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port} (ports: {:?})", self.ports()))
    }

    fn node_mut(&mut self, port: u16) -> &mut Node {
        let ports = self.ports();
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node of this cluster on port {port} (ports: {ports:?})"))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = child.kill(); // SIGKILL on Unix
                let _ = child.wait();
            }
        }
    }
}

/// How one node lists the cluster: every node it knows, by port.
type View = BTreeMap<u16, Listed>;

/// One line of `CLUSTER NODES`, reduced to what all nodes must agree on
/// (flags such as `fail?` may differ for a while and are left out).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Listed {
    /// The port of its master; `None` for a master.
    master: Option<u16>,
    /// Inclusive slot ranges it serves.
    slots: Vec<(u16, u16)>,
}

/// Parses `CLUSTER NODES`: `<id> <ip:port@bus[,host]> <flags> <master id|-> <ping> <pong> <epoch> <link> <slot>…`.
/// Nodes still in a handshake or without an address are left out; so are
/// slots being migrated (`[slot->-id]`).
fn parse_nodes(text: &str) -> View {
    let lines: Vec<Vec<&str>> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 8 && !f[2].split(',').any(|flag| flag == "handshake" || flag == "noaddr"))
        .collect();
    let port_of = |addr: &str| -> Option<u16> { addr.split(['@', ',']).next()?.rsplit(':').next()?.parse().ok() };
    let ids: BTreeMap<&str, u16> = lines.iter().filter_map(|f| Some((f[0], port_of(f[1])?))).collect();
    lines
        .iter()
        .filter_map(|f| {
            let port = port_of(f[1])?;
            let master = if f[2].split(',').any(|flag| flag == "slave") {
                Some(*ids.get(f[3])?)
            } else {
                None
            };
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some((port, Listed { master, slots }))
        })
        .collect()
}

/// The masters of `view` that serve at least one slot.
fn masters_with_slots(view: &View) -> impl Iterator<Item = u16> + '_ {
    view.iter()
        .filter(|(_, n)| n.master.is_none() && !n.slots.is_empty())
        .map(|(&p, _)| p)
}

/// The replicas `view` lists for `master`.
fn replicas_in(view: &View, master: u16) -> impl Iterator<Item = u16> + '_ {
    view.iter()
        .filter(move |(_, n)| n.master == Some(master))
        .map(|(&p, _)| p)
}

/// `key:value` from an `INFO`-style reply.
fn field<'a>(info: &'a str, key: &str) -> Option<&'a str> {
    info.lines().find_map(|l| l.trim().strip_prefix(key)?.strip_prefix(':'))
}

fn url(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

async fn connect(port: u16) -> Result<MultiplexedConnection, String> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(PROBE_TIMEOUT))
        .set_response_timeout(Some(PROBE_TIMEOUT));
    redis::Client::open(url(port))
        .map_err(|e| e.to_string())?
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| format!("port {port}: {e}"))
}

/// A command whose reply is text (`CLUSTER INFO`, `CLUSTER NODES`, `INFO`).
async fn query(conn: &mut MultiplexedConnection, port: u16, args: &[&str]) -> Result<String, String> {
    redis::cmd(args[0])
        .arg(&args[1..])
        .query_async(conn)
        .await
        .map_err(|e| format!("port {port}: {}: {e}", args.join(" ")))
}

/// The replicas the node on `port` lists for itself, asked synchronously just
/// before it is killed; empty if it is a replica or does not answer.
fn own_replicas(port: u16) -> Vec<u16> {
    let nodes = redis::Client::open(url(port))
        .and_then(|c| c.get_connection_with_timeout(PROBE_TIMEOUT))
        .and_then(|mut conn| {
            conn.set_read_timeout(Some(PROBE_TIMEOUT))?;
            redis::cmd("CLUSTER").arg("NODES").query::<String>(&mut conn)
        });
    match nodes {
        Ok(text) => replicas_in(&parse_nodes(&text), port).collect(),
        Err(_) => Vec::new(),
    }
}
