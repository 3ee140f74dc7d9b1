//! The order store: PostgreSQL (`postgres://…`) or SQLite (`sqlite://…`), one interface.
//!
//! Writes are batched and idempotent: one multi-row `INSERT … ON CONFLICT` per batch, in one
//! transaction, whose update only moves a status forward (`reserved` → `paid` | `cancelled` |
//! `expired`), so a redelivered or reordered event never duplicates a row or moves it back
//! (invariant 4). Both databases accept the same SQL; each query is written once and
//! expanded for both pool types by [`with_pool!`] (sqlx's `Any` driver would need `?`
//! placeholders, which PostgreSQL rejects).
//!
//! SQLite (the embedded engine's journal commits through [`Store::apply`] before every
//! answer): WAL with `synchronous=NORMAL`, so a commit appends to the WAL and does not
//! fsync. Every write goes through one dedicated writer connection; queries use a small
//! pool of readers. Checkpoints (copying the WAL into the database file, with an fsync of
//! each) are taken off the commit path: the connections' automatic checkpoint is off and a
//! background task runs `wal_checkpoint(PASSIVE)` on a connection of its own, which does
//! not block the writer (see [`checkpointer`]).

use std::borrow::Cow;
use std::str::FromStr;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::future::BoxFuture;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Connection, QueryBuilder, Row};

use crate::domain::{ItemSpec, Order, OrderEvent, OrderStatus, RefundOf, TransferEvent, TransferSide};
use crate::engine::seq::Mark;
use crate::error::Error;
use crate::ids::split_bucket;
use crate::metrics;

enum Pool {
    Postgres(PgPool),
    /// `read` serves queries; `write` (one connection) every write: SQLite has one writer
    /// at a time anyway, so writers never wait on each other in SQLite's busy handler, and
    /// the writer's page cache stays valid from one commit to the next.
    Sqlite {
        read: SqlitePool,
        write: SqlitePool,
    },
}

pub struct Store {
    pool: Pool,
    /// Every call is bounded by this (the pool's acquire timeout covers only the checkout).
    timeout: Duration,
    /// Whether the last call reached the database. Every call reports here, so `/readyz`,
    /// the `seckill_store_up` gauge and the log tell the same story whoever called.
    up: AtomicBool,
    /// SQLite's background checkpointer, stopped with the store.
    _checkpointer: Option<AbortOnDrop>,
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Expand one body for whichever pool the store has.
macro_rules! with_pool {
    ($self:ident, $p:ident => $body:expr) => {
        match &$self.pool {
            Pool::Postgres($p) => $body,
            Pool::Sqlite { read: $p, .. } => $body,
        }
    };
}

/// As [`with_pool!`], for a write: SQLite's writer connection.
macro_rules! with_writer {
    ($self:ident, $p:ident => $body:expr) => {
        match &$self.pool {
            Pool::Postgres($p) => $body,
            Pool::Sqlite { write: $p, .. } => $body,
        }
    };
}

/// The times an order reached each step after `reserved` (paid, cancelled, expired,
/// refund due, refunded), from the events of a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StepTimes([Option<i64>; 5]);

impl StepTimes {
    const STEPS: [OrderStatus; 5] = [
        OrderStatus::Paid,
        OrderStatus::Cancelled,
        OrderStatus::Expired,
        OrderStatus::RefundDue,
        OrderStatus::Refunded,
    ];

    fn note(&mut self, ev: &OrderEvent) {
        if let Some(i) = Self::STEPS.iter().position(|s| *s == ev.status) {
            self.0[i] = self.0[i].or(Some(ev.at_ms));
        }
    }

    pub fn at(&self, status: OrderStatus) -> Option<i64> {
        Self::STEPS.iter().position(|s| *s == status).and_then(|i| self.0[i])
    }
}

/// One order's events of a batch, merged into one row's worth (one row may be touched once
/// per statement in PostgreSQL): the furthest event ([`OrderStatus::rank`]), the price of any
/// event that has one (an event of the format before prices has none), and the time of
/// every step the batch saw (a payment and its refund in one batch both keep their day).
pub struct Merged<'a> {
    pub event: Cow<'a, OrderEvent>,
    pub times: StepTimes,
}

/// The rows come out sorted by order id: concurrent transactions lock rows in one order.
pub fn dedupe(events: &[OrderEvent]) -> Vec<Merged<'_>> {
    let mut best: std::collections::HashMap<&str, Merged<'_>, foldhash::fast::RandomState> =
        std::collections::HashMap::with_capacity_and_hasher(events.len(), Default::default());
    for ev in events {
        best.entry(ev.order_id.as_str())
            .and_modify(|cur| {
                let price = cur.event.price_cents.or(ev.price_cents);
                if ev.status.rank() > cur.event.status.rank() {
                    cur.event = Cow::Borrowed(ev);
                }
                if cur.event.price_cents != price {
                    cur.event.to_mut().price_cents = price;
                }
                cur.times.note(ev);
            })
            .or_insert_with(|| {
                let mut times = StepTimes::default();
                times.note(ev);
                Merged {
                    event: Cow::Borrowed(ev),
                    times,
                }
            });
    }
    let mut out: Vec<Merged<'_>> = best.into_values().collect();
    // One row per order id: an unstable sort orders them the same.
    out.sort_unstable_by(|a, b| a.event.order_id.cmp(&b.event.order_id));
    out
}

const ORDER_COLUMNS: &str =
    "order_id, item_id, user_id, qty, status, idem_key, created_ms, pay_before_ms, updated_ms, price_cents, refund_of";

fn order_from_row<R: Row>(row: &R) -> Result<Order, Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let status: String = row.try_get("status")?;
    Ok(Order {
        order_id: row.try_get("order_id")?,
        item_id: row.try_get("item_id")?,
        user_id: row.try_get("user_id")?,
        qty: row.try_get("qty")?,
        status: OrderStatus::parse(&status).ok_or_else(|| Error::Store(format!("bad status {status}")))?,
        idem_key: row.try_get("idem_key")?,
        created_ms: row.try_get("created_ms")?,
        pay_before_ms: row.try_get("pay_before_ms")?,
        updated_ms: row.try_get("updated_ms")?,
        price_cents: row.try_get("price_cents")?,
        refund: row
            .try_get::<Option<String>, _>("refund_of")?
            .and_then(|r| RefundOf::parse(&r)),
    })
}

fn item_from_row<R: Row>(row: &R) -> Result<ItemSpec, Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> bool: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(ItemSpec {
        item_id: row.try_get("item_id")?,
        name: row.try_get("name")?,
        price_cents: row.try_get("price_cents")?,
        stock_total: row.try_get("stock_total")?,
        per_user_limit: row.try_get("per_user_limit")?,
        starts_ms: row.try_get("starts_ms")?,
        ends_ms: row.try_get("ends_ms")?,
        buckets: u32::try_from(row.try_get::<i64, _>("buckets")?).unwrap_or(1).max(1),
        paused: row.try_get("paused")?,
    })
}

/// A row of `bucket_transfers`: one transfer between two stock buckets of an item, with
/// when each of its steps reached the database (`None`: not yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferRecord {
    pub transfer_id: String,
    pub from_bucket: i64,
    pub to_bucket: i64,
    pub units: i64,
    pub out_ms: Option<i64>,
    pub in_ms: Option<i64>,
}

/// An item's orders as the database holds them (`GET …/stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ItemTotals {
    pub orders: i64,
    pub units: i64,
    /// Σ qty × unit price of the paid orders.
    pub revenue_cents: i64,
    /// Orders paid for after they closed, whose money is owed back.
    pub refund_due_orders: i64,
}

/// One line of the sales report (`GET /admin/v1/reports/sales.csv`, `.xlsx`): what
/// happened to one item's orders on one UTC day, in units (Σ `qty`) and cents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SalesRow {
    /// The start of the day (UTC midnight), in milliseconds since the epoch.
    pub day_ms: i64,
    pub item_id: String,
    /// Units of orders created that day.
    pub reserved: i64,
    pub paid: i64,
    pub cancelled: i64,
    pub expired: i64,
    pub refunded: i64,
    /// Units of orders paid for that day after they had closed (money owed back).
    pub refund_due: i64,
    /// Σ qty × unit price of the orders paid that day, less that of the orders refunded
    /// that day which had been paid (a refund of a late payment gives back money that was
    /// never counted).
    pub revenue_cents: i64,
}

/// A UTC day in milliseconds.
pub const DAY_MS: i64 = 86_400_000;

/// The sales report's aggregation, one statement both databases run alike. Each order
/// counts once per timestamp that falls in `[$1, $2)`: one branch of the `UNION ALL` per
/// timestamp column, each a range predicate on its column (an index on it would serve it).
/// A row's day is its offset from `$1` in whole days: `$1` is a UTC midnight and every
/// timestamp of a branch is at or after it, so the integer division is a floor in both
/// databases (no date function: PostgreSQL's and SQLite's have nothing in common).
/// An order made before prices were kept counts at its item's price.
const SALES_SQL: &str = "SELECT day, item_id, \
     CAST(SUM(reserved) AS BIGINT) AS reserved, CAST(SUM(paid) AS BIGINT) AS paid, \
     CAST(SUM(cancelled) AS BIGINT) AS cancelled, CAST(SUM(expired) AS BIGINT) AS expired, \
     CAST(SUM(refunded) AS BIGINT) AS refunded, CAST(SUM(refund_due) AS BIGINT) AS refund_due, \
     CAST(SUM(revenue) AS BIGINT) AS revenue FROM ( \
     SELECT (o.created_ms - $1) / 86400000 AS day, o.item_id, o.qty AS reserved, 0 AS paid, 0 AS cancelled, \
         0 AS expired, 0 AS refunded, 0 AS refund_due, 0 AS revenue \
         FROM orders o WHERE o.created_ms >= $1 AND o.created_ms < $2 \
     UNION ALL SELECT (o.paid_ms - $1) / 86400000, o.item_id, 0, o.qty, 0, 0, 0, 0, \
         o.qty * COALESCE(o.price_cents, i.price_cents, 0) \
         FROM orders o LEFT JOIN items i ON i.item_id = o.item_id WHERE o.paid_ms >= $1 AND o.paid_ms < $2 \
     UNION ALL SELECT (o.cancelled_ms - $1) / 86400000, o.item_id, 0, 0, o.qty, 0, 0, 0, 0 \
         FROM orders o WHERE o.cancelled_ms >= $1 AND o.cancelled_ms < $2 \
     UNION ALL SELECT (o.expired_ms - $1) / 86400000, o.item_id, 0, 0, 0, o.qty, 0, 0, 0 \
         FROM orders o WHERE o.expired_ms >= $1 AND o.expired_ms < $2 \
     UNION ALL SELECT (o.refunded_ms - $1) / 86400000, o.item_id, 0, 0, 0, 0, o.qty, 0, \
         CASE WHEN o.refund_of IN ('paid', 'paid+restock') \
             THEN -(o.qty * COALESCE(o.price_cents, i.price_cents, 0)) ELSE 0 END \
         FROM orders o LEFT JOIN items i ON i.item_id = o.item_id WHERE o.refunded_ms >= $1 AND o.refunded_ms < $2 \
     UNION ALL SELECT (o.refund_due_ms - $1) / 86400000, o.item_id, 0, 0, 0, 0, 0, o.qty, 0 \
         FROM orders o WHERE o.refund_due_ms >= $1 AND o.refund_due_ms < $2 \
     ) t GROUP BY day, item_id ORDER BY day, item_id";

/// Rows of one `INSERT … ON CONFLICT` in [`Store::apply_marked`]: in SQLite 17 parameters a
/// row, so 1,000 rows stay below its limit (32,766); PostgreSQL binds 17 arrays.
const APPLY_CHUNK: usize = 1000;

/// The columns every order upsert writes, in its order.
const ORDER_INSERT: &str = "INSERT INTO orders (order_id, item_id, bucket, user_id, qty, status, idem_key, created_ms, \
     pay_before_ms, updated_ms, paid_ms, cancelled_ms, expired_ms, refund_due_ms, refunded_ms, price_cents, refund_of) ";

/// [`OrderStatus::rank`] in SQL, of the column in place of `{}`.
const STATUS_RANK: &str = "(CASE {} WHEN 'reserved' THEN 0 WHEN 'refund_due' THEN 2 WHEN 'refunded' THEN 3 ELSE 1 END)";

/// An order upsert's `ON CONFLICT` clause, the same in both databases. Forward only
/// (invariant 7): the status (with its time and refund origin) moves to a higher rank, never
/// back. An event of an earlier step arriving late (redelivered, or persisted from another
/// batch after a later one) still fills in its step's time.
static ON_CONFLICT: LazyLock<String> = LazyLock::new(|| {
    let (old, new) = (
        STATUS_RANK.replace("{}", "orders.status"),
        STATUS_RANK.replace("{}", "excluded.status"),
    );
    let forward = format!("{old} < {new}");
    format!(
        " ON CONFLICT (order_id) DO UPDATE SET \
         status = CASE WHEN {forward} THEN excluded.status ELSE orders.status END, \
         updated_ms = CASE WHEN {forward} THEN excluded.updated_ms ELSE orders.updated_ms END, \
         refund_of = CASE WHEN {forward} THEN COALESCE(excluded.refund_of, orders.refund_of) \
             ELSE orders.refund_of END, \
         paid_ms = COALESCE(orders.paid_ms, excluded.paid_ms), \
         cancelled_ms = COALESCE(orders.cancelled_ms, excluded.cancelled_ms), \
         expired_ms = COALESCE(orders.expired_ms, excluded.expired_ms), \
         refund_due_ms = COALESCE(orders.refund_due_ms, excluded.refund_due_ms), \
         refunded_ms = COALESCE(orders.refunded_ms, excluded.refunded_ms), \
         price_cents = COALESCE(orders.price_cents, excluded.price_cents) \
         WHERE {forward} \
         OR (orders.paid_ms IS NULL AND excluded.paid_ms IS NOT NULL) \
         OR (orders.cancelled_ms IS NULL AND excluded.cancelled_ms IS NOT NULL) \
         OR (orders.expired_ms IS NULL AND excluded.expired_ms IS NOT NULL) \
         OR (orders.refund_due_ms IS NULL AND excluded.refund_due_ms IS NOT NULL) \
         OR (orders.refunded_ms IS NULL AND excluded.refunded_ms IS NOT NULL) \
         OR (orders.price_cents IS NULL AND excluded.price_cents IS NOT NULL)"
    )
});

/// PostgreSQL's order upsert: the same for any number of rows, each column one array
/// parameter. A multi-row `VALUES` is another statement for every row count (parsed and
/// planned again, 17 parameters a row, each bound and written into the SQL); this one is
/// prepared once per connection, and a batch is 17 arrays.
static PG_UPSERT: LazyLock<String> = LazyLock::new(|| {
    format!(
        "{ORDER_INSERT}SELECT * FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::int8[], \
         $6::text[], $7::text[], $8::int8[], $9::int8[], $10::int8[], $11::int8[], $12::int8[], $13::int8[], \
         $14::int8[], $15::int8[], $16::int8[], $17::text[]){}",
        *ON_CONFLICT
    )
});

/// How a database upserts a chunk of merged events (at most [`APPLY_CHUNK`]): a new order is
/// inserted, an existing `reserved` row moves to a final status; a final row never changes.
trait UpsertOrders: sqlx::Database {
    fn upsert_orders<'e, E>(rows: &'e [Merged<'e>], ex: E) -> BoxFuture<'e, Result<u64, sqlx::Error>>
    where
        E: sqlx::Executor<'e, Database = Self> + 'e;
}

/// [`UpsertOrders`] of whichever database `ex` is of. Returns the rows written.
fn upsert_orders<'e, DB: UpsertOrders, E>(rows: &'e [Merged<'e>], ex: E) -> BoxFuture<'e, Result<u64, sqlx::Error>>
where
    E: sqlx::Executor<'e, Database = DB> + 'e,
{
    DB::upsert_orders(rows, ex)
}

impl UpsertOrders for sqlx::Sqlite {
    /// One multi-row `VALUES` (SQLite has no arrays to bind).
    fn upsert_orders<'e, E>(rows: &'e [Merged<'e>], ex: E) -> BoxFuture<'e, Result<u64, sqlx::Error>>
    where
        E: sqlx::Executor<'e, Database = Self> + 'e,
    {
        Box::pin(async move {
            let mut q = QueryBuilder::<sqlx::Sqlite>::new(ORDER_INSERT);
            q.push_values(rows, |mut b, row| {
                let (ev, at) = (&row.event, |s: OrderStatus| row.times.at(s));
                // A bucket's order (`<item>#<b>`): the item's row, with its bucket.
                let (item, bucket) = split_bucket(&ev.item_id);
                b.push_bind(ev.order_id.as_str())
                    .push_bind(item)
                    .push_bind(i64::from(bucket))
                    .push_bind(ev.user_id.as_str())
                    .push_bind(ev.qty)
                    .push_bind(ev.status.as_str())
                    .push_bind(ev.idem_key.as_str())
                    .push_bind(ev.created_ms)
                    .push_bind(ev.pay_before_ms)
                    .push_bind(ev.at_ms)
                    .push_bind(at(OrderStatus::Paid))
                    .push_bind(at(OrderStatus::Cancelled))
                    .push_bind(at(OrderStatus::Expired))
                    .push_bind(at(OrderStatus::RefundDue))
                    .push_bind(at(OrderStatus::Refunded))
                    .push_bind(ev.price_cents)
                    .push_bind(ev.refund.map(RefundOf::as_text));
            });
            q.push(ON_CONFLICT.as_str());
            Ok(q.build().execute(ex).await?.rows_affected())
        })
    }
}

impl UpsertOrders for sqlx::Postgres {
    /// [`PG_UPSERT`], the rows' columns as arrays.
    fn upsert_orders<'e, E>(rows: &'e [Merged<'e>], ex: E) -> BoxFuture<'e, Result<u64, sqlx::Error>>
    where
        E: sqlx::Executor<'e, Database = Self> + 'e,
    {
        let n = rows.len();
        let (mut order_id, mut item_id, mut bucket, mut user_id) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let (mut qty, mut status, mut idem_key, mut created_ms, mut pay_before_ms, mut updated_ms) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        let mut steps: [Vec<Option<i64>>; 5] = std::array::from_fn(|_| Vec::with_capacity(n));
        let (mut price_cents, mut refund_of) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for row in rows {
            let ev = &row.event;
            let (item, b) = split_bucket(&ev.item_id);
            order_id.push(ev.order_id.as_str());
            item_id.push(item);
            bucket.push(i64::from(b));
            user_id.push(ev.user_id.as_str());
            qty.push(ev.qty);
            status.push(ev.status.as_str());
            idem_key.push(ev.idem_key.as_str());
            created_ms.push(ev.created_ms);
            pay_before_ms.push(ev.pay_before_ms);
            updated_ms.push(ev.at_ms);
            for (times, step) in steps.iter_mut().zip(StepTimes::STEPS) {
                times.push(row.times.at(step));
            }
            price_cents.push(ev.price_cents);
            refund_of.push(ev.refund.map(RefundOf::as_text));
        }
        let [paid_ms, cancelled_ms, expired_ms, refund_due_ms, refunded_ms] = steps;
        Box::pin(async move {
            let done = sqlx::query(PG_UPSERT.as_str())
                .bind(order_id)
                .bind(item_id)
                .bind(bucket)
                .bind(user_id)
                .bind(qty)
                .bind(status)
                .bind(idem_key)
                .bind(created_ms)
                .bind(pay_before_ms)
                .bind(updated_ms)
                .bind(paid_ms)
                .bind(cancelled_ms)
                .bind(expired_ms)
                .bind(refund_due_ms)
                .bind(refunded_ms)
                .bind(price_cents)
                .bind(refund_of)
                .execute(ex)
                .await?;
            Ok(done.rows_affected())
        })
    }
}

impl Store {
    /// Connect and run the embedded migrations.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, Error> {
        let mut background = None;
        let pool = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                // WAL + NORMAL: a committed transaction survives a process kill (SIGKILL);
                // only an OS crash could lose the last few, which FULL would cover.
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                // SQLite's own wait for the write lock ends before the store timeout does, so
                // that a write kept from the lock is refused (SQLITE_BUSY: not applied, its
                // changes undone) rather than abandoned by the timeout while it still waits
                // (in doubt: see `bounded_write`).
                .busy_timeout(timeout * 3 / 4)
                // No checkpoint by the connection that commits (it ran one every 1,000
                // pages, inside the commit of whichever request crossed the mark): the
                // checkpointer below takes them, on a connection of its own.
                .pragma("wal_autocheckpoint", "0");
            // The writer first: it creates the file and switches it to WAL.
            let write = SqlitePoolOptions::new()
                .max_connections(1)
                .acquire_timeout(timeout)
                // A file, not a socket: no ping (a round trip to its thread) per commit.
                .test_before_acquire(false)
                .connect_with(opts.clone())
                .await?;
            sqlx::migrate!("./migrations/sqlite")
                .run(&write)
                .await
                .map_err(|e| Error::Store(e.to_string()))?;
            let read = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(timeout)
                .connect_with(opts.clone())
                .await?;
            let task = tokio::spawn(checkpointer(opts, write.clone()));
            background = Some(AbortOnDrop(task.abort_handle()));
            Pool::Sqlite { read, write }
        } else {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(timeout)
                // sqlx takes a connection back with a ping that has no timeout: on a
                // connection gone silent (a partition, a firewall dropping its packets) it
                // never ends, and the connection's pool slot is lost for good. A blackhole
                // that caught every connection with a query in flight left the store
                // unreachable after the network came back (tests/netfault.rs). Ping first,
                // within the timeout: a connection that does not answer is dropped.
                .after_release(move |conn, _| {
                    Box::pin(async move {
                        match tokio::time::timeout(timeout, conn.ping()).await {
                            Ok(pong) => pong.map(|()| true),
                            Err(_) => Err(sqlx::Error::Io(std::io::Error::new(
                                std::io::ErrorKind::TimedOut,
                                "no answer to a ping on release",
                            ))),
                        }
                    })
                })
                .connect(url)
                .await?;
            sqlx::migrate!("./migrations/postgres")
                .run(&pool)
                .await
                .map_err(|e| Error::Store(e.to_string()))?;
            Pool::Postgres(pool)
        };
        metrics::gauge!(metrics::STORE_UP).set(1.0);
        Ok(Store {
            pool,
            timeout,
            up: AtomicBool::new(true),
            _checkpointer: background,
        })
    }

    /// Whether the database answered the last call.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Record whether the database was reached; log and publish only the changes.
    fn report(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            metrics::gauge!(metrics::STORE_UP).set(if up { 1.0 } else { 0.0 });
            if up {
                tracing::info!("order store reachable again");
            } else {
                tracing::warn!("order store unreachable");
            }
        }
    }

    async fn bounded<T>(&self, f: impl std::future::Future<Output = Result<T, sqlx::Error>>) -> Result<T, Error> {
        self.bounded_as(false, f).await
    }

    /// [`Self::bounded`] for a write whose outcome matters when it fails: a failure that
    /// leaves it unknown whether the database applied it (the timeout, a connection that
    /// broke while the write was out) is [`Error::StoreInDoubt`]. Only a refusal by the
    /// database, or a connection never had from the pool, says it was not applied.
    async fn bounded_write<T>(&self, f: impl std::future::Future<Output = Result<T, sqlx::Error>>) -> Result<T, Error> {
        self.bounded_as(true, f).await
    }

    async fn bounded_as<T>(
        &self,
        write: bool,
        f: impl std::future::Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, Error> {
        let in_doubt = |e: &sqlx::Error| {
            write
                && !matches!(
                    e,
                    sqlx::Error::Database(_)
                        | sqlx::Error::PoolTimedOut
                        | sqlx::Error::PoolClosed
                        | sqlx::Error::Configuration(_)
                )
        };
        let result = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                // A refused statement is an answer; only an unreachable database is an outage.
                if !matches!(
                    e,
                    sqlx::Error::Database(_) | sqlx::Error::RowNotFound | sqlx::Error::ColumnDecode { .. }
                ) {
                    self.report(false);
                    if in_doubt(&e) {
                        return Err(Error::StoreInDoubt(e.to_string()));
                    }
                    return Err(Error::from(e));
                }
                Err(Error::from(e))
            }
            Err(_) => {
                self.report(false);
                if write {
                    return Err(Error::StoreInDoubt("timed out".into()));
                }
                return Err(Error::Store("timed out".into()));
            }
        };
        self.report(true);
        result
    }

    /// Apply a batch of events in one transaction. Returns the rows inserted or moved forward.
    pub async fn apply(&self, events: &[OrderEvent]) -> Result<u64, Error> {
        self.apply_marked(events, &[], &[]).await
    }

    /// [`Self::apply`], and in the same transaction record the steps of transfers between
    /// stock buckets (each step once, whatever the redeliveries) and raise the shards'
    /// write marks to `marks` (the highest mark among the entries, per shard). Returns the
    /// order rows written.
    pub async fn apply_marked(
        &self,
        events: &[OrderEvent],
        transfers: &[TransferEvent],
        marks: &[(u32, Mark)],
    ) -> Result<u64, Error> {
        let events = dedupe(events);
        if events.is_empty() && transfers.is_empty() && marks.is_empty() {
            return Ok(0);
        }
        with_writer!(self, pool => {
            self.bounded_write(async {
                // One statement is atomic on its own: a batch of one chunk without marks (the
                // embedded journal's every commit) is one round trip to the database instead
                // of three (BEGIN, INSERT, COMMIT), and SQLite's connection thread answers
                // each with a wake-up of this task that waits its turn among the requests'.
                if !events.is_empty() && events.len() <= APPLY_CHUNK && transfers.is_empty() && marks.is_empty() {
                    return upsert_orders(&events, pool).await;
                }
                let mut tx = pool.begin().await?;
                let mut affected = 0;
                for chunk in events.chunks(APPLY_CHUNK) {
                    affected += upsert_orders(chunk, &mut *tx).await?;
                }
                for t in transfers {
                    let (out_ms, in_ms) = match t.side {
                        TransferSide::Out => (Some(t.at_ms), None),
                        TransferSide::In => (None, Some(t.at_ms)),
                    };
                    sqlx::query(
                        "INSERT INTO bucket_transfers (transfer_id, item_id, from_bucket, to_bucket, units, out_ms, in_ms) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7) \
                         ON CONFLICT (transfer_id) DO UPDATE SET \
                         out_ms = COALESCE(bucket_transfers.out_ms, excluded.out_ms), \
                         in_ms = COALESCE(bucket_transfers.in_ms, excluded.in_ms)",
                    )
                    .bind(&t.transfer_id)
                    .bind(&t.item_id)
                    .bind(i64::from(t.from_bucket))
                    .bind(i64::from(t.to_bucket))
                    .bind(t.units)
                    .bind(out_ms)
                    .bind(in_ms)
                    .execute(&mut *tx)
                    .await?;
                }
                for (shard, mark) in marks {
                    sqlx::query(
                        "INSERT INTO redis_marks (shard, epoch, seq) VALUES ($1, $2, $3) \
                         ON CONFLICT (shard) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq \
                         WHERE (excluded.epoch, excluded.seq) > (redis_marks.epoch, redis_marks.seq)",
                    )
                    .bind(i64::from(*shard))
                    .bind(mark.epoch as i64)
                    .bind(mark.seq as i64)
                    .execute(&mut *tx)
                    .await?;
                }
                tx.commit().await?;
                Ok(affected)
            })
            .await
        })
    }

    /// Create or replace an item's row (its pause switch stays). A write whose outcome is
    /// unknown is [`Error::StoreInDoubt`], as for [`Self::set_paused`]: an upsert, so
    /// writing it again is harmless.
    pub async fn put_item(&self, spec: &ItemSpec, now_ms: i64) -> Result<(), Error> {
        with_writer!(self, pool => {
            self.bounded_write(
                sqlx::query(
                    "INSERT INTO items (item_id, name, price_cents, stock_total, per_user_limit, starts_ms, ends_ms, updated_ms, buckets, paused) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                     ON CONFLICT (item_id) DO UPDATE SET name = excluded.name, price_cents = excluded.price_cents, \
                     stock_total = excluded.stock_total, per_user_limit = excluded.per_user_limit, \
                     starts_ms = excluded.starts_ms, ends_ms = excluded.ends_ms, updated_ms = excluded.updated_ms, \
                     buckets = excluded.buckets",
                )
                .bind(&spec.item_id)
                .bind(&spec.name)
                .bind(spec.price_cents)
                .bind(spec.stock_total)
                .bind(spec.per_user_limit)
                .bind(spec.starts_ms)
                .bind(spec.ends_ms)
                .bind(now_ms)
                .bind(i64::from(spec.buckets))
                .bind(spec.paused)
                .execute(pool),
            )
            .await
            .map(|_| ())
        })
    }

    /// Record an item's pause switch (`Some`), or the one of every sale (`None`). Returns
    /// false when the item has no row. (`put_item` never changes `paused`: a replacement
    /// keeps it.)
    pub async fn set_paused(&self, item_id: Option<&str>, paused: bool, now_ms: i64) -> Result<bool, Error> {
        with_writer!(self, pool => {
            let done = match item_id {
                Some(id) => self.bounded_write(
                    sqlx::query("UPDATE items SET paused = $1, updated_ms = $2 WHERE item_id = $3")
                        .bind(paused)
                        .bind(now_ms)
                        .bind(id)
                        .execute(pool),
                ),
                None => self.bounded_write(
                    sqlx::query(
                        "INSERT INTO controls (name, value, updated_ms) VALUES ('paused_all', $1, $2) \
                         ON CONFLICT (name) DO UPDATE SET value = excluded.value, updated_ms = excluded.updated_ms",
                    )
                    .bind(if paused { "1" } else { "0" })
                    .bind(now_ms)
                    .execute(pool),
                ),
            }
            .await?;
            Ok(done.rows_affected() > 0)
        })
    }

    /// Whether every sale is paused (`POST /admin/v1/pause`), as the database records it.
    pub async fn all_paused(&self) -> Result<bool, Error> {
        with_pool!(self, pool => {
            let value: Option<String> = self
                .bounded(
                    sqlx::query_scalar("SELECT value FROM controls WHERE name = 'paused_all'").fetch_optional(pool),
                )
                .await?;
            Ok(value.as_deref() == Some("1"))
        })
    }

    /// The transfers between an item's stock buckets the database holds, by id.
    pub async fn transfers(&self, item_id: &str) -> Result<Vec<TransferRecord>, Error> {
        const SQL: &str = "SELECT transfer_id, from_bucket, to_bucket, units, out_ms, in_ms \
                           FROM bucket_transfers WHERE item_id = $1 ORDER BY transfer_id";
        with_pool!(self, pool => {
            let rows = self.bounded(sqlx::query(SQL).bind(item_id).fetch_all(pool)).await?;
            rows.iter()
                .map(|r| {
                    Ok(TransferRecord {
                        transfer_id: r.try_get("transfer_id")?,
                        from_bucket: r.try_get("from_bucket")?,
                        to_bucket: r.try_get("to_bucket")?,
                        units: r.try_get("units")?,
                        out_ms: r.try_get("out_ms")?,
                        in_ms: r.try_get("in_ms")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(Error::from)
        })
    }

    pub async fn items(&self) -> Result<Vec<ItemSpec>, Error> {
        const SQL: &str = "SELECT item_id, name, price_cents, stock_total, per_user_limit, starts_ms, ends_ms, buckets, paused FROM items";
        with_pool!(self, pool => {
            let rows = self.bounded(sqlx::query(SQL).fetch_all(pool)).await?;
            rows.iter().map(item_from_row).collect()
        })
    }

    pub async fn order(&self, order_id: &str) -> Result<Option<Order>, Error> {
        let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE order_id = $1");
        with_pool!(self, pool => {
            let row = self.bounded(sqlx::query(&sql).bind(order_id).fetch_optional(pool)).await?;
            row.as_ref().map(order_from_row).transpose()
        })
    }

    /// Every order of an item (or of every item), oldest first.
    pub async fn orders(&self, item_id: Option<&str>) -> Result<Vec<Order>, Error> {
        let sql = match item_id {
            Some(_) => {
                format!("SELECT {ORDER_COLUMNS} FROM orders WHERE item_id = $1 ORDER BY order_id")
            }
            None => format!("SELECT {ORDER_COLUMNS} FROM orders ORDER BY order_id"),
        };
        with_pool!(self, pool => {
            let mut q = sqlx::query(&sql);
            if let Some(id) = item_id {
                q = q.bind(id);
            }
            let rows = self.bounded(q.fetch_all(pool)).await?;
            rows.iter().map(order_from_row).collect()
        })
    }

    /// The orders an engine item holds: those of an item of one bucket, or of one bucket
    /// (`<item>#<b>`) of a bucketed item (reconcile and repair work per engine item).
    pub async fn orders_in(&self, engine_id: &str) -> Result<Vec<Order>, Error> {
        let (item, bucket) = split_bucket(engine_id);
        let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE item_id = $1 AND bucket = $2 ORDER BY order_id");
        with_pool!(self, pool => {
            let q = sqlx::query(&sql).bind(item).bind(i64::from(bucket));
            let rows = self.bounded(q.fetch_all(pool)).await?;
            rows.iter()
                .map(|r| {
                    let mut o = order_from_row(r)?;
                    o.item_id = engine_id.to_owned();
                    Ok(o)
                })
                .collect()
        })
    }

    /// A shopper's orders, newest first (by creation time, then order id), at most `limit`:
    /// a backward range scan of the `orders_by_user` index that stops after `limit` rows.
    pub async fn orders_of_user(&self, user_id: &str, limit: u32) -> Result<Vec<Order>, Error> {
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE user_id = $1 \
             ORDER BY created_ms DESC, order_id DESC LIMIT $2"
        );
        with_pool!(self, pool => {
            let q = sqlx::query(&sql).bind(user_id).bind(i64::from(limit));
            let rows = self.bounded(q.fetch_all(pool)).await?;
            rows.iter().map(order_from_row).collect()
        })
    }

    /// An order as its engine names it: its `item_id` is its stock bucket's
    /// (`<item>#<b>`) where it was made in one, as in the engine's own record.
    pub async fn engine_order(&self, order_id: &str) -> Result<Option<Order>, Error> {
        let sql = format!("SELECT {ORDER_COLUMNS}, bucket FROM orders WHERE order_id = $1");
        with_pool!(self, pool => {
            let row = self.bounded(sqlx::query(&sql).bind(order_id).fetch_optional(pool)).await?;
            row.map(|r| {
                let mut o = order_from_row(&r)?;
                let bucket: i64 = r.try_get("bucket")?;
                if bucket > 0 {
                    o.item_id = crate::ids::bucket_id(&o.item_id, bucket as u32);
                }
                Ok(o)
            })
            .transpose()
        })
    }

    /// The answer given to a payment callback before (`POST /webhooks/payments`): its HTTP
    /// status and body.
    pub async fn payment_answer(&self, payment_id: &str) -> Result<Option<(u16, String)>, Error> {
        const SQL: &str = "SELECT http_status, answer FROM payments WHERE payment_id = $1";
        with_pool!(self, pool => {
            let row = self.bounded(sqlx::query(SQL).bind(payment_id).fetch_optional(pool)).await?;
            row.map(|r| Ok((r.try_get::<i64, _>("http_status")? as u16, r.try_get::<String, _>("answer")?)))
                .transpose()
        })
    }

    /// Record a payment callback and its answer, unless its id is recorded already; returns
    /// the answer recorded for the id (this one, or the first: every retry of one payment
    /// gets the same answer).
    pub async fn record_payment(
        &self,
        p: &crate::payments::Payment,
        http_status: u16,
        answer: &str,
        now_ms: i64,
    ) -> Result<(u16, String), Error> {
        const SQL: &str = "INSERT INTO payments (payment_id, order_id, amount_cents, status, http_status, answer, \
                           received_ms) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (payment_id) DO NOTHING";
        with_writer!(self, pool => {
            self.bounded(
                sqlx::query(SQL)
                    .bind(&p.payment_id)
                    .bind(&p.order_id)
                    .bind(p.amount_cents)
                    .bind(p.status.as_str())
                    .bind(i64::from(http_status))
                    .bind(answer)
                    .bind(now_ms)
                    .execute(pool),
            )
            .await?;
        });
        Ok(self
            .payment_answer(&p.payment_id)
            .await?
            .unwrap_or((http_status, answer.to_owned())))
    }

    /// What the database holds of an item: `(orders, units)` — rows, and the sum of their
    /// quantities (the stats route's `persisted_orders` and `persisted`).
    pub async fn count(&self, item_id: &str) -> Result<(i64, i64), Error> {
        let t = self.totals(item_id).await?;
        Ok((t.orders, t.units))
    }

    /// What the database holds of an item ([`ItemTotals`]).
    pub async fn totals(&self, item_id: &str) -> Result<ItemTotals, Error> {
        // Revenue is what paid orders brought in (a refunded order's money went back, a
        // `refund_due` one's is owed back), at each order's own unit price; an order made
        // before prices were kept counts at the item's.
        const SQL: &str = "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(o.qty), 0) AS BIGINT) AS units, \
             CAST(COALESCE(SUM(CASE WHEN o.status = 'paid' \
                 THEN o.qty * COALESCE(o.price_cents, i.price_cents, 0) ELSE 0 END), 0) AS BIGINT) AS revenue, \
             CAST(COALESCE(SUM(CASE WHEN o.status = 'refund_due' THEN 1 ELSE 0 END), 0) AS BIGINT) AS due \
             FROM orders o LEFT JOIN items i ON i.item_id = o.item_id WHERE o.item_id = $1";
        with_pool!(self, pool => {
            let row = self.bounded(sqlx::query(SQL).bind(item_id).fetch_one(pool)).await?;
            Ok(ItemTotals {
                orders: row.try_get("n")?,
                units: row.try_get("units")?,
                revenue_cents: row.try_get("revenue")?,
                refund_due_orders: row.try_get("due")?,
            })
        })
    }

    /// The sales report of the UTC days from `from_ms` (a UTC midnight) up to `to_ms`
    /// (exclusive, a later midnight): one [`SalesRow`] per day and item with anything in
    /// it, by day then item id. Aggregated by the database, so what crosses the wire is the
    /// report, not the orders.
    pub async fn sales(&self, from_ms: i64, to_ms: i64) -> Result<Vec<SalesRow>, Error> {
        with_pool!(self, pool => {
            let rows = self.bounded(sqlx::query(SALES_SQL).bind(from_ms).bind(to_ms).fetch_all(pool)).await?;
            rows.iter()
                .map(|r| {
                    let day: i64 = r.try_get("day")?;
                    Ok(SalesRow {
                        day_ms: from_ms + day * DAY_MS,
                        item_id: r.try_get("item_id")?,
                        reserved: r.try_get("reserved")?,
                        paid: r.try_get("paid")?,
                        cancelled: r.try_get("cancelled")?,
                        expired: r.try_get("expired")?,
                        refunded: r.try_get("refunded")?,
                        refund_due: r.try_get("refund_due")?,
                        revenue_cents: r.try_get("revenue")?,
                    })
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(Error::from)
        })
    }

    pub async fn ping(&self) -> Result<(), Error> {
        with_pool!(self, pool => {
            self.bounded(sqlx::query("SELECT 1").execute(pool)).await.map(|_| ())
        })
    }

    /// The write mark of every shard that has one ([`Self::apply_marked`]).
    pub async fn marks(&self) -> Result<Vec<(u32, Mark)>, Error> {
        with_pool!(self, pool => {
            let rows = self
                .bounded(sqlx::query("SELECT shard, epoch, seq FROM redis_marks").fetch_all(pool))
                .await?;
            rows.iter()
                .map(|r| {
                    let shard: i64 = r.try_get("shard")?;
                    let (epoch, seq): (i64, i64) = (r.try_get("epoch")?, r.try_get("seq")?);
                    Ok((shard as u32, Mark { epoch: epoch as u64, seq: seq as u64 }))
                })
                .collect::<Result<_, sqlx::Error>>()
                .map_err(Error::from)
        })
    }

    /// Delete one row (for operators' repair drills and the reconcile tests).
    pub async fn delete_order(&self, order_id: &str) -> Result<u64, Error> {
        with_writer!(self, pool => {
            self.bounded(sqlx::query("DELETE FROM orders WHERE order_id = $1").bind(order_id).execute(pool))
                .await
                .map(|r| r.rows_affected())
        })
    }
}

/// How often the checkpointer copies what the WAL holds into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);

/// WAL frames (4 KiB pages) beyond which the checkpointer makes the WAL start over
/// (16 MiB): see [`checkpointer`].
const RESTART_FRAMES: i64 = 4_096;

/// SQLite's checkpoints, off the commit path: every [`CHECKPOINT_EVERY`], a
/// `wal_checkpoint(PASSIVE)` on a connection of its own, which runs alongside the writer
/// and never takes the write lock. It copies the frames committed before it started,
/// after an fsync of the WAL; the database file is fsynced only by a checkpoint that
/// copied everything (SQLite's rule: before the WAL may be overwritten).
///
/// The WAL starts over from its beginning only when a write begins with every frame
/// already copied; under a steady stream of commits that moment may never come and the
/// WAL would grow for as long as the stream lasts. So past [`RESTART_FRAMES`] the
/// checkpointer fsyncs the database file itself (the pages the checkpoints since the last
/// complete one wrote: tens of megabytes, which the final checkpoint's fsync would
/// otherwise flush while holding the writer), catches up once more, then holds the writer
/// connection for one last checkpoint — the group or two committed meanwhile and two small
/// fsyncs — and the next write starts the WAL over. Below that size it starts over
/// whenever the writer pauses.
async fn checkpointer(opts: SqliteConnectOptions, write: SqlitePool) {
    use sqlx::Connection;
    let mut conn: Option<sqlx::SqliteConnection> = None;
    let mut failing = false;
    loop {
        tokio::time::sleep(CHECKPOINT_EVERY).await;
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match sqlx::SqliteConnection::connect_with(&opts).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(cause = %e, "sqlite checkpointer cannot connect");
                    }
                    continue;
                }
            },
        };
        let frames = match checkpoint(c).await {
            Ok(frames) => frames,
            Err(e) => {
                if !std::mem::replace(&mut failing, true) {
                    tracing::warn!(cause = %e, "sqlite checkpoint failed");
                }
                conn = None;
                continue;
            }
        };
        failing = false;
        if frames < RESTART_FRAMES {
            continue;
        }
        let db = opts.get_filename().to_owned();
        let synced = tokio::task::spawn_blocking(move || std::fs::File::open(db)?.sync_all()).await;
        if let Ok(Err(e)) = &synced {
            tracing::debug!(cause = %e, "sqlite checkpointer could not fsync the database file");
        }
        if checkpoint(c).await.is_err() {
            continue;
        }
        // Hold the writer: nothing commits until this checkpoint has copied the rest.
        let Ok(writer) = write.acquire().await else {
            continue;
        };
        let started = std::time::Instant::now();
        let result = checkpoint(c).await;
        drop(writer);
        tracing::debug!(
            frames,
            held_us = started.elapsed().as_micros() as u64,
            ok = result.is_ok(),
            "sqlite WAL checkpointed for a restart"
        );
    }
}

/// `wal_checkpoint(PASSIVE)`: the WAL's size in frames.
async fn checkpoint(conn: &mut sqlx::SqliteConnection) -> Result<i64, sqlx::Error> {
    let (_busy, frames, _copied): (i64, i64, i64) =
        sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)").fetch_one(conn).await?;
    Ok(frames)
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Store(e.to_string())
    }
}
