//! `seckill-gateway reconcile [--item ID] [--repair]`: compare, per item, what Redis holds
//! (item counters, order hashes, stream backlog) with the database, print the differences
//! as a table, and with `--repair` re-emit the events of orders the database is missing or
//! behind on (the persistence worker then writes them; the upserts make it idempotent).
//! A shard whose Redis is behind the database (it lost writes: [`crate::engine::seq`]) is
//! reported as `shard_behind`, and `--repair` rebuilds it from the database first
//! ([`super::repair`]), as the gateways do by themselves.
//! Exit status: 0 clean (or everything found was repaired), 1 differences, 2 could not run.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use crate::engine::conn::{RedisConn, Target};

use crate::config::Config;
use crate::domain::{Order, OrderEvent, OrderStatus};
use crate::engine::keys;
use crate::engine::redis::{item_from_hash, order_from_hash};
use crate::engine::seq::Mark;
use crate::error::Error;
use crate::ids::{SHARDS, shard_of};
use crate::orders::repair::{RepairSettings, repair_shard, shard_seq, why_rebuild};
use crate::orders::worker::group_info;
use crate::store::Store;

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub item_id: String,
    pub order_id: String,
    pub kind: &'static str,
    pub redis: String,
    pub database: String,
}

/// What reconcile found.
#[derive(Debug, Default)]
pub struct Report {
    pub items: usize,
    pub orders_checked: usize,
    pub pending_events: u64,
    pub differences: Vec<Difference>,
    pub repaired: usize,
}

pub async fn main(config: Config, item: Option<String>, repair: bool) -> ExitCode {
    let Some(url) = config.redis_url.clone() else {
        eprintln!("reconcile compares Redis with the database: set REDIS_URL");
        return ExitCode::from(2);
    };
    let run = async {
        let store = Store::connect(&config.database_url, config.store_timeout).await?;
        let target = Target::new(&url, config.redis_mode, config.redis_timeout);
        let mut conn = target
            .dedicated(config.redis_timeout.max(Duration::from_secs(5)))
            .await?;
        let settings = RepairSettings::from_config(&config);
        reconcile(&mut conn, &store, item.as_deref(), repair.then_some(&settings)).await
    };
    match run.await {
        Ok(report) => {
            print_report(&report);
            if report.differences.is_empty() || (repair && report.repaired == report.differences.len()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("reconcile failed: {e}");
            ExitCode::from(2)
        }
    }
}

fn print_report(r: &Report) {
    println!(
        "items checked: {}  orders in redis: {}  events not yet persisted: {}",
        r.items, r.orders_checked, r.pending_events
    );
    if r.differences.is_empty() {
        println!("clean: the database agrees with Redis");
        return;
    }
    println!(
        "{:<24} {:<38} {:<20} {:<12} {:<12}",
        "item", "order", "difference", "redis", "database"
    );
    for d in &r.differences {
        println!(
            "{:<24} {:<38} {:<20} {:<12} {:<12}",
            d.item_id, d.order_id, d.kind, d.redis, d.database
        );
    }
    println!(
        "{} difference(s); repaired (events re-emitted): {}",
        r.differences.len(),
        r.repaired
    );
}

/// Every order hash of one shard (SCAN, so Redis is never blocked).
pub(crate) async fn shard_orders(conn: &mut RedisConn, shard: u32) -> Result<Vec<Order>, Error> {
    let pattern = format!("sk:{}:order:*", keys::tag(shard));
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        // On a cluster, every SCAN of the shard goes to the primary that owns its slot.
        let (next, batch): (u64, Vec<String>) = conn
            .query_on_slot_of(
                &keys::events(shard),
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(1000),
            )
            .await?;
        for key in batch {
            let h: HashMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
            if !h.is_empty()
                && let Some((_, order_id)) = key.split_once(":order:")
            {
                out.push(order_from_hash(order_id, &h)?);
            }
        }
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

/// Compare and, with `repair` settings, repair. Public for the tests.
pub async fn reconcile(
    conn: &mut RedisConn,
    store: &Store,
    only: Option<&str>,
    repair: Option<&RepairSettings>,
) -> Result<Report, Error> {
    let items: Vec<String> = match only {
        Some(i) => vec![i.to_owned()],
        None => {
            let mut v: Vec<String> = redis::cmd("SMEMBERS").arg(keys::CATALOG).query_async(conn).await?;
            v.sort();
            v
        }
    };
    // A bucketed item is checked as the engine items it lies in: its own hash and each bucket.
    let mut engine_ids = Vec::with_capacity(items.len());
    for item in items {
        let buckets: Option<u32> = redis::cmd("HGET")
            .arg(keys::item(&item))
            .arg("buckets")
            .query_async(conn)
            .await?;
        let buckets = buckets.unwrap_or(1);
        if buckets > 1 {
            engine_ids.extend(crate::ids::stock_buckets(buckets).map(|b| crate::ids::bucket_id(&item, b)));
        }
        engine_ids.push(item);
    }
    let items = engine_ids;
    let mut report = Report {
        items: items.len(),
        ..Report::default()
    };
    // Backlog: events the worker has not acknowledged yet. Differences while it is non-zero
    // may just be in flight.
    for shard in 0..SHARDS {
        // A shard whose stream does not exist yet has no backlog.
        if let Ok(Some(group)) = group_info(conn, &keys::events(shard)).await {
            report.pending_events += group.pending + group.lag;
        }
    }
    // Shards behind the database first: a rebuild changes what the items below hold.
    let marks: HashMap<u32, Mark> = store.marks().await?.into_iter().collect();
    for shard in keys::all_shards() {
        let floor = marks.get(&shard).copied().unwrap_or_default();
        let (mark, fence) = shard_seq(conn, shard).await?;
        let Some(why) = why_rebuild(mark, fence, floor) else {
            continue;
        };
        report.differences.push(Difference {
            item_id: format!("shard {shard}"),
            order_id: why,
            kind: "shard_behind",
            redis: mark.to_string(),
            database: floor.to_string(),
        });
        if let Some(settings) = repair {
            match repair_shard(conn, store, shard, floor, settings).await? {
                Some(_) => report.repaired += 1,
                None => eprintln!("shard {shard} is being rebuilt by a gateway; run reconcile again"),
            }
        }
    }
    let shards: std::collections::BTreeSet<u32> = items.iter().map(|i| shard_of(i)).collect();
    let mut redis_orders: HashMap<String, Vec<Order>> = HashMap::new();
    for shard in shards {
        for o in shard_orders(conn, shard).await? {
            redis_orders.entry(o.item_id.clone()).or_default().push(o);
        }
    }
    for item_id in &items {
        let h: HashMap<String, String> = redis::cmd("HGETALL").arg(keys::item(item_id)).query_async(conn).await?;
        let diff = |order_id: &str, kind, redis: String, database: String| Difference {
            item_id: item_id.clone(),
            order_id: order_id.to_owned(),
            kind,
            redis,
            database,
        };
        let orders = redis_orders.remove(item_id).unwrap_or_default();
        report.orders_checked += orders.len();
        if let Ok(state) = item_from_hash(item_id, &h) {
            // Counters agree with the order hashes, and stock = total − reserved − paid.
            let units = |s: OrderStatus| orders.iter().filter(|o| o.status == s).map(|o| o.qty).sum::<i64>();
            if state.stock != state.spec.stock_total - state.reserved - state.paid {
                report.differences.push(diff(
                    "-",
                    "stock_arithmetic",
                    state.stock.to_string(),
                    format!("{}-{}-{}", state.spec.stock_total, state.reserved, state.paid),
                ));
            }
            if units(OrderStatus::Reserved) != state.reserved {
                report.differences.push(diff(
                    "-",
                    "reserved_counter",
                    state.reserved.to_string(),
                    units(OrderStatus::Reserved).to_string(),
                ));
            }
        }
        let rows: HashMap<String, Order> = store
            .orders_in(item_id)
            .await?
            .into_iter()
            .map(|o| (o.order_id.clone(), o))
            .collect();
        let mut to_emit = Vec::new();
        for o in &orders {
            match rows.get(&o.order_id) {
                None => {
                    report.differences.push(diff(
                        &o.order_id,
                        "missing_in_database",
                        o.status.as_str().into(),
                        "-".into(),
                    ));
                    to_emit.push(o);
                }
                Some(row) if row.status != o.status => {
                    let kind = if row.status == OrderStatus::Reserved {
                        "database_behind"
                    } else {
                        "status_conflict"
                    };
                    report.differences.push(diff(
                        &o.order_id,
                        kind,
                        o.status.as_str().into(),
                        row.status.as_str().into(),
                    ));
                    if kind == "database_behind" {
                        to_emit.push(o);
                    }
                }
                Some(_) => {}
            }
        }
        // A row whose order hash is gone is fine when final (closed orders expire from
        // Redis); a `reserved` row without its hash never got its closing event.
        let in_redis: std::collections::HashSet<&str> = orders.iter().map(|o| o.order_id.as_str()).collect();
        for (id, row) in &rows {
            if !in_redis.contains(id.as_str()) && row.status == OrderStatus::Reserved {
                report
                    .differences
                    .push(diff(id, "missing_in_redis", "-".into(), "reserved".into()));
            }
        }
        if repair.is_some() {
            for o in to_emit {
                let ev = OrderEvent::of(o, o.status, o.updated_ms);
                let mut c = redis::cmd("XADD");
                c.arg(keys::events(shard_of(&o.item_id))).arg("*");
                for (k, v) in ev.to_fields() {
                    c.arg(k).arg(v);
                }
                let _: String = c.query_async(conn).await?;
                report.repaired += 1;
            }
        }
    }
    Ok(report)
}
