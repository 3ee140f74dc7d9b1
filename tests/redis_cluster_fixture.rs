//! The Redis Cluster fixture (`common::cluster`) does what issue 12's tests
//! rely on: the cluster forms, a key lives on the master it names, a killed
//! master's replica takes over within a bounded time and holds the
//! acknowledged write, the old master comes back as a replica, and a node with
//! an AOF restarts with its data.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{AppendFsync, RedisCluster};
use common::unique;
use redis::aio::MultiplexedConnection;

/// Well above a failover's node timeout (1 s) plus election (0.5–1 s).
const FAILOVER_BOUND: Duration = Duration::from_secs(10);

async fn connect(cluster: &RedisCluster, port: u16) -> MultiplexedConnection {
    cluster
        .client(port)
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("connect to cluster node {port}: {e}"))
}

async fn get(cluster: &RedisCluster, port: u16, key: &str, readonly: bool) -> Option<String> {
    let mut conn = connect(cluster, port).await;
    if readonly {
        let () = redis::cmd("READONLY").query_async(&mut conn).await.expect("READONLY");
    }
    redis::cmd("GET").arg(key).query_async(&mut conn).await.expect("GET")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_by_its_replica_and_rejoins_as_a_replica() {
    let started = Instant::now();
    let mut cluster = RedisCluster::start(3, 1).await;
    println!("3 masters + 3 replicas formed in {:?}", started.elapsed());
    assert_eq!(cluster.ports().len(), 6);
    assert_eq!(cluster.seeds().split(',').count(), 6);
    assert!(cluster.seeds().starts_with("redis://127.0.0.1:"), "{}", cluster.seeds());
    let masters = cluster.masters().await;
    assert_eq!(masters.len(), 3, "masters: {masters:?}");
    for &m in &masters {
        assert_eq!(cluster.replicas_of(m).await.len(), 1, "replicas of {m}");
    }

    // A key in the gateway's layout (a hash tag per shard), written through its master
    // and acknowledged by its replica.
    let key = format!("sk:{{s1}}:item:{}", unique("fixture"));
    let master = cluster.master_of(&key).await;
    let replica = cluster.replicas_of(master).await[0];
    let mut conn = connect(&cluster, master).await;
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("42")
        .query_async(&mut conn)
        .await
        .expect("SET on its master");
    let acked: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(2000)
        .query_async(&mut conn)
        .await
        .expect("WAIT");
    assert_eq!(acked, 1, "the replica acknowledges the write");
    let other = *masters.iter().find(|&&m| m != master).expect("another master");
    let moved = redis::cmd("SET")
        .arg(&key)
        .arg("0")
        .query_async::<()>(&mut connect(&cluster, other).await)
        .await
        .expect_err("another master refuses the key");
    assert!(
        moved.to_string().contains(&format!("127.0.0.1:{master}")),
        "redirected to {master}: {moved}"
    );

    // The master dies; its replica takes over with the write.
    cluster.kill(master);
    let killed = Instant::now();
    let promoted = cluster.wait_failover(master).await;
    let failover = killed.elapsed();
    println!("failover of {master} to {promoted} took {failover:?}");
    assert_eq!(promoted, replica);
    assert!(failover < FAILOVER_BOUND, "failover took {failover:?}");
    assert_eq!(cluster.master_of(&key).await, promoted);
    assert_eq!(get(&cluster, promoted, &key, false).await.as_deref(), Some("42"));

    // The old master comes back as the new master's replica, synced.
    cluster.restart(master);
    let restarted = Instant::now();
    cluster.wait_ok().await;
    println!("{master} rejoined in {:?}", restarted.elapsed());
    assert_eq!(cluster.replicas_of(promoted).await, vec![master]);
    assert!(!cluster.masters().await.contains(&master));
    assert_eq!(get(&cluster, master, &key, true).await.as_deref(), Some("42"));
    println!("whole test: {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_restarted_from_its_aof_serves_its_slots_with_its_data() {
    let mut cluster = RedisCluster::builder(3, 0)
        .appendonly(AppendFsync::Always)
        .start()
        .await;
    let key = format!("sk:{{s2}}:item:{}", unique("aof"));
    let master = cluster.master_of(&key).await;
    let () = redis::cmd("SET")
        .arg(&key)
        .arg("7")
        .query_async(&mut connect(&cluster, master).await)
        .await
        .expect("SET");
    assert!(
        cluster.dir(master).join("appendonlydir").is_dir(),
        "an AOF in {:?}",
        cluster.dir(master)
    );

    cluster.kill(master);
    assert!(!cluster.is_running(master));
    cluster.restart(master);
    cluster.wait_ok().await;
    assert_eq!(cluster.master_of(&key).await, master);
    assert_eq!(get(&cluster, master, &key, false).await.as_deref(), Some("7"));
}
