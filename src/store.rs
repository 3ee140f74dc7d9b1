//! The order store: PostgreSQL (`postgres://…`) or SQLite (`sqlite://…`), one interface.
//!
//! Writes are batched and idempotent: one multi-row `INSERT … ON CONFLICT` per batch, in one
//! transaction, whose update only moves a status forward (`reserved` → `paid` | `cancelled` |
//! `expired`), so a redelivered or reordered event never duplicates a row or moves it back
//! (invariant 4). Both databases accept the same SQL; each query is written once and
//! expanded for both pool types by [`with_pool!`] (sqlx's `Any` driver would need `?`
//! placeholders, which PostgreSQL rejects).

use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row};

use crate::domain::{ItemSpec, Order, OrderEvent, OrderStatus};
use crate::error::Error;
use crate::metrics;

enum Pool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

pub struct Store {
    pool: Pool,
    /// Every call is bounded by this (the pool's acquire timeout covers only the checkout).
    timeout: Duration,
    /// Whether the last call reached the database. Every call reports here, so `/readyz`,
    /// the `seckill_store_up` gauge and the log tell the same story whoever called.
    up: AtomicBool,
}

/// Expand one body for whichever pool the store has.
macro_rules! with_pool {
    ($self:ident, $p:ident => $body:expr) => {
        match &$self.pool {
            Pool::Postgres($p) => $body,
            Pool::Sqlite($p) => $body,
        }
    };
}

/// The most advanced event of each order in a batch (one row may be touched once per
/// statement in PostgreSQL): a final status beats `reserved`.
pub fn dedupe(events: &[OrderEvent]) -> Vec<&OrderEvent> {
    let mut best: std::collections::HashMap<&str, &OrderEvent> = std::collections::HashMap::new();
    for ev in events {
        best.entry(ev.order_id.as_str())
            .and_modify(|cur| {
                if !cur.status.is_final() && ev.status.is_final() {
                    *cur = ev;
                }
            })
            .or_insert(ev);
    }
    let mut out: Vec<&OrderEvent> = best.into_values().collect();
    out.sort_by(|a, b| a.order_id.cmp(&b.order_id));
    out
}

const ORDER_COLUMNS: &str = "order_id, item_id, user_id, qty, status, idem_key, created_ms, pay_before_ms, updated_ms";

fn order_from_row<R: Row>(row: &R) -> Result<Order, Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
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
    })
}

fn item_from_row<R: Row>(row: &R) -> Result<ItemSpec, Error>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(ItemSpec {
        item_id: row.try_get("item_id")?,
        name: row.try_get("name")?,
        price_cents: row.try_get("price_cents")?,
        stock_total: row.try_get("stock_total")?,
        per_user_limit: row.try_get("per_user_limit")?,
        starts_ms: row.try_get("starts_ms")?,
        ends_ms: row.try_get("ends_ms")?,
    })
}

impl Store {
    /// Connect and run the embedded migrations.
    pub async fn connect(url: &str, timeout: Duration) -> Result<Self, Error> {
        let pool = if url.starts_with("sqlite:") {
            let opts = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                // WAL + NORMAL: a committed transaction survives a process kill (SIGKILL);
                // only an OS crash could lose the last few, which FULL would cover.
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(timeout);
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(timeout)
                .connect_with(opts)
                .await?;
            sqlx::migrate!("./migrations/sqlite")
                .run(&pool)
                .await
                .map_err(|e| Error::Store(e.to_string()))?;
            Pool::Sqlite(pool)
        } else {
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(timeout)
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
        let result = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                // A refused statement is an answer; only an unreachable database is an outage.
                if !matches!(
                    e,
                    sqlx::Error::Database(_) | sqlx::Error::RowNotFound | sqlx::Error::ColumnDecode { .. }
                ) {
                    self.report(false);
                    return Err(Error::from(e));
                }
                Err(Error::from(e))
            }
            Err(_) => {
                self.report(false);
                return Err(Error::Store("timed out".into()));
            }
        };
        self.report(true);
        result
    }

    /// Apply a batch of events in one transaction. Returns the rows inserted or moved forward.
    pub async fn apply(&self, events: &[OrderEvent]) -> Result<u64, Error> {
        let events = dedupe(events);
        if events.is_empty() {
            return Ok(0);
        }
        with_pool!(self, pool => {
            self.bounded(async {
                let mut tx = pool.begin().await?;
                let mut affected = 0;
                // 12 parameters a row: 1,000 rows stay far below both databases' limits.
                for chunk in events.chunks(1000) {
                    let mut q = QueryBuilder::new(
                        "INSERT INTO orders (order_id, item_id, user_id, qty, status, idem_key, created_ms, \
                         pay_before_ms, updated_ms, paid_ms, cancelled_ms, expired_ms) ",
                    );
                    q.push_values(chunk, |mut b, ev| {
                        let at = |s: OrderStatus| (ev.status == s).then_some(ev.at_ms);
                        b.push_bind(ev.order_id.clone())
                            .push_bind(ev.item_id.clone())
                            .push_bind(ev.user_id.clone())
                            .push_bind(ev.qty)
                            .push_bind(ev.status.as_str())
                            .push_bind(ev.idem_key.clone())
                            .push_bind(ev.created_ms)
                            .push_bind(ev.pay_before_ms)
                            .push_bind(ev.at_ms)
                            .push_bind(at(OrderStatus::Paid))
                            .push_bind(at(OrderStatus::Cancelled))
                            .push_bind(at(OrderStatus::Expired));
                    });
                    q.push(
                        " ON CONFLICT (order_id) DO UPDATE SET status = excluded.status, \
                         updated_ms = excluded.updated_ms, \
                         paid_ms = COALESCE(excluded.paid_ms, orders.paid_ms), \
                         cancelled_ms = COALESCE(excluded.cancelled_ms, orders.cancelled_ms), \
                         expired_ms = COALESCE(excluded.expired_ms, orders.expired_ms) \
                         WHERE orders.status = 'reserved' AND excluded.status <> 'reserved'",
                    );
                    affected += q.build().execute(&mut *tx).await?.rows_affected();
                }
                tx.commit().await?;
                Ok(affected)
            })
            .await
        })
    }

    pub async fn put_item(&self, spec: &ItemSpec, now_ms: i64) -> Result<(), Error> {
        with_pool!(self, pool => {
            self.bounded(
                sqlx::query(
                    "INSERT INTO items (item_id, name, price_cents, stock_total, per_user_limit, starts_ms, ends_ms, updated_ms) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                     ON CONFLICT (item_id) DO UPDATE SET name = excluded.name, price_cents = excluded.price_cents, \
                     stock_total = excluded.stock_total, per_user_limit = excluded.per_user_limit, \
                     starts_ms = excluded.starts_ms, ends_ms = excluded.ends_ms, updated_ms = excluded.updated_ms",
                )
                .bind(&spec.item_id)
                .bind(&spec.name)
                .bind(spec.price_cents)
                .bind(spec.stock_total)
                .bind(spec.per_user_limit)
                .bind(spec.starts_ms)
                .bind(spec.ends_ms)
                .bind(now_ms)
                .execute(pool),
            )
            .await
            .map(|_| ())
        })
    }

    pub async fn items(&self) -> Result<Vec<ItemSpec>, Error> {
        const SQL: &str =
            "SELECT item_id, name, price_cents, stock_total, per_user_limit, starts_ms, ends_ms FROM items";
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

    /// What the database holds of an item: `(orders, units)` — rows, and the sum of their
    /// quantities (the stats route's `persisted_orders` and `persisted`).
    pub async fn count(&self, item_id: &str) -> Result<(i64, i64), Error> {
        const SQL: &str =
            "SELECT COUNT(*) AS n, CAST(COALESCE(SUM(qty), 0) AS BIGINT) AS units FROM orders WHERE item_id = $1";
        with_pool!(self, pool => {
            let row = self.bounded(sqlx::query(SQL).bind(item_id).fetch_one(pool)).await?;
            Ok((row.try_get::<i64, _>("n")?, row.try_get::<i64, _>("units")?))
        })
    }

    pub async fn ping(&self) -> Result<(), Error> {
        with_pool!(self, pool => {
            self.bounded(sqlx::query("SELECT 1").execute(pool)).await.map(|_| ())
        })
    }

    /// Delete one row (for operators' repair drills and the reconcile tests).
    pub async fn delete_order(&self, order_id: &str) -> Result<u64, Error> {
        with_pool!(self, pool => {
            self.bounded(sqlx::query("DELETE FROM orders WHERE order_id = $1").bind(order_id).execute(pool))
                .await
                .map(|r| r.rows_affected())
        })
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        Error::Store(e.to_string())
    }
}
