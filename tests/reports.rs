//! The sales report (`GET /admin/v1/reports/sales.csv` and `….xlsx`), black-box over HTTP
//! on a real gateway and a real database, SQLite and PostgreSQL alike:
//!
//! - [`written_orders_on_sqlite`], [`written_orders_on_postgres`]: orders written straight
//!   into the store with chosen times over three days (and the days around them) and two
//!   items, through every status: reserved, paid, cancelled, expired, a late payment of a
//!   cancelled and of an expired order (`refund_due`), refunds of paid orders with and
//!   without restock and of a late payment, one order without a price of its own, times on
//!   both sides of midnight. The expected report is computed here from those orders (each
//!   step's units on its UTC day; revenue: payments less refunds of payments), and both
//!   files must say exactly that, for ranges that take every day, one day, and none; the
//!   workbook read back with `calamine` (header in bold, numbers as numbers, totals row).
//!   Headers (content type, `Content-Disposition`), 400 for bad ranges, 403 without the
//!   admin token.
//! - [`sales_through_the_routes_embedded`], [`sales_through_the_routes_redis`]: reserve,
//!   pay and cancel on a gateway (embedded on SQLite; Redis with the persistence worker on
//!   PostgreSQL), and the report shows their units and `qty × price` as revenue.

mod common;

use std::collections::BTreeMap;
use std::io::Cursor;
use std::time::Duration;

use calamine::{Data, Reader, Xlsx};
use common::gateway::{Builder, Gateway, on_redis};
use common::http::{RequestExt, send};
use common::{poll, shared_pg, unique};
use reqwest::StatusCode;
use seckill_gateway::clock::system_now_ms;
use seckill_gateway::domain::{ItemSpec, OrderEvent, OrderStatus, RefundOf};
use seckill_gateway::store::Store;
use serde_json::json;
use time::macros::{date, format_description};

const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;
const MIN: i64 = 60_000;

const XLSX_TYPE: &str = "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet";
const HEADER: [&str; 9] = [
    "day",
    "item_id",
    "reserved",
    "paid",
    "cancelled",
    "expired",
    "refunded",
    "refund_due",
    "revenue_cents",
];

/// A report line as the test expects it: `(day, item_id)` → reserved, paid, cancelled,
/// expired, refunded, refund_due, revenue_cents.
type Report = BTreeMap<(String, String), [i64; 7]>;

/// The UTC day of a time, as `YYYY-MM-DD`.
fn day_of(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).expect("a time in range");
    t.date()
        .format(format_description!("[year]-[month]-[day]"))
        .expect("a date formats")
}

/// UTC midnight of a date, in milliseconds.
fn midnight(d: time::Date) -> i64 {
    d.midnight().assume_utc().unix_timestamp() * 1000
}

/// One order of the fixture: its item (an index into the items), quantity, own price,
/// each step of its life with its time, and for its `refund_due` and `refunded` steps what
/// the refund came from.
struct Sale {
    order_id: String,
    item: usize,
    qty: i64,
    price_cents: Option<i64>,
    steps: Vec<(OrderStatus, i64)>,
    refund: Option<RefundOf>,
}

/// Two items, and orders on the days before, in and after 2025-03-10..=2025-03-12.
fn fixture() -> (Vec<ItemSpec>, Vec<Sale>) {
    use OrderStatus::*;
    // The items' prices differ from the orders' own: an order without one counts at its
    // item's.
    let items: Vec<ItemSpec> = [("a", 1_200), ("b", 300)]
        .into_iter()
        .map(|(name, price_cents)| ItemSpec {
            item_id: unique(&format!("item_{name}")),
            name: format!("Item {name}"),
            price_cents,
            stock_total: 1_000,
            per_user_limit: 100,
            starts_ms: midnight(date!(2025 - 03 - 01)),
            ends_ms: midnight(date!(2025 - 04 - 01)),
            buckets: 1,
            paused: false,
        })
        .collect();
    let d0 = midnight(date!(2025 - 03 - 10));
    let (d1, d2, d3, before) = (d0 + DAY, d0 + 2 * DAY, d0 + 3 * DAY, d0 - DAY);
    let sale = |item, qty, price_cents, steps, refund| Sale {
        order_id: unique("order"),
        item,
        qty,
        price_cents,
        steps,
        refund,
    };
    let of = |status, restocked| Some(RefundOf { status, restocked });
    let sales = vec![
        // Paid the day it was made.
        sale(
            0,
            2,
            Some(1_000),
            vec![(Reserved, d0 + 10 * HOUR), (Paid, d0 + 10 * HOUR + 5 * MIN)],
            None,
        ),
        // Made the last millisecond of a day, cancelled the first of the next.
        sale(0, 1, Some(1_000), vec![(Reserved, d1 - 1), (Cancelled, d1)], None),
        sale(
            1,
            3,
            Some(250),
            vec![(Reserved, d0 + 12 * HOUR), (Expired, d0 + 12 * HOUR + 15 * MIN)],
            None,
        ),
        // Expired, paid for too late, and that payment refunded: no revenue either way.
        sale(
            1,
            1,
            Some(250),
            vec![
                (Reserved, d1 + 8 * HOUR),
                (Expired, d1 + 8 * HOUR + 15 * MIN),
                (RefundDue, d1 + 9 * HOUR),
                (Refunded, d2 + 10 * HOUR),
            ],
            of(Expired, true),
        ),
        // No price of its own (the item's: 1,200), paid, refunded without restock a day later.
        sale(
            0,
            2,
            None,
            vec![
                (Reserved, d1 + 9 * HOUR),
                (Paid, d1 + 9 * HOUR + MIN),
                (Refunded, d2 + 11 * HOUR),
            ],
            of(Paid, false),
        ),
        // Paid, refunded with restock a day later.
        sale(
            1,
            4,
            Some(250),
            vec![
                (Reserved, d1 + 10 * HOUR),
                (Paid, d1 + 10 * HOUR + MIN),
                (Refunded, d2 + 12 * HOUR),
            ],
            of(Paid, true),
        ),
        // Still reserved (payable until long after the test).
        sale(0, 1, Some(1_000), vec![(Reserved, d2 + 13 * HOUR)], None),
        // Made the day before the range, paid in it.
        sale(
            1,
            2,
            Some(250),
            vec![(Reserved, before + 22 * HOUR), (Paid, d0 + HOUR)],
            None,
        ),
        // Made in the range, paid the day after it.
        sale(
            0,
            5,
            Some(1_000),
            vec![(Reserved, d2 + 23 * HOUR), (Paid, d3 + 30 * MIN)],
            None,
        ),
        // Cancelled, then paid for too late: owed back, not revenue.
        sale(
            1,
            1,
            Some(250),
            vec![
                (Reserved, d0 + 14 * HOUR),
                (Cancelled, d0 + 14 * HOUR + 10 * MIN),
                (RefundDue, d0 + 20 * HOUR),
            ],
            of(Cancelled, true),
        ),
    ];
    (items, sales)
}

/// The events of a sale, one per step, as the engines write them: each carries the whole
/// order.
fn events(items: &[ItemSpec], s: &Sale) -> Vec<OrderEvent> {
    let created_ms = s.steps[0].1;
    s.steps
        .iter()
        .map(|&(status, at_ms)| OrderEvent {
            status,
            order_id: s.order_id.clone(),
            item_id: items[s.item].item_id.clone(),
            user_id: unique("user"),
            qty: s.qty,
            at_ms,
            created_ms,
            // Reservations left open stay payable: no sweeper touches them in the test.
            pay_before_ms: system_now_ms() + 24 * HOUR,
            idem_key: String::new(),
            price_cents: s.price_cents,
            refund: matches!(status, OrderStatus::RefundDue | OrderStatus::Refunded)
                .then_some(s.refund)
                .flatten(),
        })
        .collect()
}

/// The report the fixture makes, computed from the sales themselves: each step's units on
/// the UTC day of its time; revenue, a payment's `qty × price` on its day less a refund of
/// a payment (not of a late payment) on the refund's day, at the order's price or else its
/// item's.
fn expected(items: &[ItemSpec], sales: &[Sale]) -> Report {
    let mut report = Report::new();
    for s in sales {
        let item = &items[s.item];
        let amount = s.qty * s.price_cents.unwrap_or(item.price_cents);
        for &(status, at) in &s.steps {
            let line = report.entry((day_of(at), item.item_id.clone())).or_default();
            let (column, revenue) = match status {
                OrderStatus::Reserved => (0, 0),
                OrderStatus::Paid => (1, amount),
                OrderStatus::Cancelled => (2, 0),
                OrderStatus::Expired => (3, 0),
                OrderStatus::Refunded => {
                    let of_payment = s.refund.is_some_and(|r| r.status == OrderStatus::Paid);
                    (4, if of_payment { -amount } else { 0 })
                }
                OrderStatus::RefundDue => (5, 0),
            };
            line[column] += s.qty;
            line[6] += revenue;
        }
    }
    report
}

/// The lines of `report` whose day is in `from..=to` (days as `YYYY-MM-DD` sort as text).
fn within(report: &Report, from: &str, to: &str) -> Vec<(String, String, [i64; 7])> {
    report
        .iter()
        .filter(|((day, _), _)| (from..=to).contains(&day.as_str()))
        .map(|((day, item), v)| (day.clone(), item.clone(), *v))
        .collect()
}

/// A download: status, content type, `Content-Disposition`, body.
struct Download {
    status: StatusCode,
    content_type: String,
    disposition: String,
    body: Vec<u8>,
}

async fn download(gw: &Gateway, path: &str) -> Download {
    let resp = gw
        .admin(gw.get(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    let header = |name| {
        resp.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let (status, content_type, disposition) = (resp.status(), header("content-type"), header("content-disposition"));
    let body = resp.bytes().await.expect("the body arrives").to_vec();
    Download {
        status,
        content_type,
        disposition,
        body,
    }
}

/// The CSV report of `from..=to`: checks the headers and the header line; its lines.
async fn csv_report(gw: &Gateway, from: &str, to: &str) -> Vec<(String, String, [i64; 7])> {
    let d = download(gw, &format!("/admin/v1/reports/sales.csv?from={from}&to={to}")).await;
    let text = String::from_utf8(d.body).expect("the CSV is UTF-8");
    assert_eq!(d.status, StatusCode::OK, "{text}");
    assert_eq!(d.content_type, "text/csv; charset=utf-8");
    assert_eq!(d.disposition, format!("attachment; filename=\"sales-{from}-{to}.csv\""));
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .expect("a header line")
        .iter()
        .map(str::to_owned)
        .collect();
    assert_eq!(header, HEADER);
    reader
        .records()
        .map(|r| {
            let r = r.expect("a CSV line");
            assert_eq!(r.len(), HEADER.len(), "{r:?}");
            let mut counts = [0; 7];
            for (c, v) in counts.iter_mut().zip(r.iter().skip(2)) {
                *c = v.parse().unwrap_or_else(|_| panic!("{v:?} is a whole number: {r:?}"));
            }
            (r[0].to_owned(), r[1].to_owned(), counts)
        })
        .collect()
}

/// A worksheet cell that must be a whole number.
fn number(cell: &Data) -> i64 {
    match cell {
        Data::Float(f) if f.fract() == 0.0 => *f as i64,
        Data::Int(i) => *i,
        other => panic!("{other:?} is not a whole number"),
    }
}

fn text(cell: &Data) -> String {
    match cell {
        Data::String(s) => s.clone(),
        other => panic!("{other:?} is not text"),
    }
}

/// The workbook report of `from..=to`, read back with calamine: checks the headers, the
/// sheet, its bold header row and its totals row (the column sums); its lines.
async fn xlsx_report(gw: &Gateway, from: &str, to: &str) -> Vec<(String, String, [i64; 7])> {
    let d = download(gw, &format!("/admin/v1/reports/sales.xlsx?from={from}&to={to}")).await;
    assert_eq!(d.status, StatusCode::OK, "{}", String::from_utf8_lossy(&d.body));
    assert_eq!(d.content_type, XLSX_TYPE);
    assert_eq!(
        d.disposition,
        format!("attachment; filename=\"sales-{from}-{to}.xlsx\"")
    );
    let mut book = Xlsx::new(Cursor::new(d.body)).expect("an .xlsx workbook");
    assert_eq!(book.sheet_names(), ["Sales"]);
    let sheet = book.worksheet_range("Sales").expect("the Sales worksheet");
    assert_eq!(sheet.start(), Some((0, 0)));
    let rows: Vec<&[Data]> = sheet.rows().collect();
    let header: Vec<String> = rows[0].iter().map(text).collect();
    assert_eq!(header, HEADER);
    let styles = book.worksheet_style("Sales").expect("the Sales worksheet's styles");
    for col in 0..HEADER.len() as u32 {
        let bold = styles
            .get((0, col))
            .and_then(|s| s.font.as_ref())
            .is_some_and(|f| f.is_bold());
        assert!(bold, "header cell {col} is bold");
    }
    let (last, lines) = rows[1..].split_last().expect("a totals row");
    let lines: Vec<(String, String, [i64; 7])> = lines
        .iter()
        .map(|r| {
            let mut counts = [0; 7];
            for (c, cell) in counts.iter_mut().zip(&r[2..]) {
                *c = number(cell);
            }
            (text(&r[0]), text(&r[1]), counts)
        })
        .collect();
    assert_eq!(text(&last[0]), "total");
    assert_eq!(last[1], Data::Empty);
    let mut sums = [0; 7];
    for (_, _, counts) in &lines {
        for (s, c) in sums.iter_mut().zip(counts) {
            *s += c;
        }
    }
    let totals: Vec<i64> = last[2..].iter().map(number).collect();
    assert_eq!(totals, sums, "the totals row is the column sums");
    lines
}

/// Write the fixture into the database at `db`, start an embedded gateway on it, and
/// check both files against the expectation, and the refusals.
async fn written_orders(db: &str) {
    let (items, sales) = fixture();
    {
        let store = Store::connect(db, Duration::from_secs(5)).await.expect("the database");
        for item in &items {
            store.put_item(item, system_now_ms()).await.expect("item stored");
        }
        // One event at a time, in the order they happened, as the journal commits them:
        // every step keeps its time.
        let mut all: Vec<OrderEvent> = sales.iter().flat_map(|s| events(&items, s)).collect();
        all.sort_by_key(|e| e.at_ms);
        for ev in &all {
            store.apply(std::slice::from_ref(ev)).await.expect("event stored");
        }
    }
    let gw = embedded(|b| b.database(db)).await;
    let report = expected(&items, &sales);
    // The expectation covers what the fixture promises: every column on some line, lines
    // before, in and after the range.
    for col in 0..7 {
        assert!(report.values().any(|v| v[col] != 0), "column {col} is exercised");
    }
    assert!(
        report.values().any(|v| v[6] < 0),
        "a day of refunds has negative revenue"
    );

    for (from, to) in [
        ("2025-03-10", "2025-03-12"),
        ("2025-03-11", "2025-03-11"),
        ("2025-03-01", "2025-03-31"),
        ("2024-12-31", "2024-12-31"),
    ] {
        let want = within(&report, from, to);
        assert_eq!(csv_report(&gw, from, to).await, want, "sales.csv {from}..={to}");
        assert_eq!(xlsx_report(&gw, from, to).await, want, "sales.xlsx {from}..={to}");
    }
    // The range leaves out the days around it, and the one-day range the others.
    let three = within(&report, "2025-03-10", "2025-03-12");
    assert!(three.len() < report.len(), "the fixture has lines outside the range");
    assert!(
        three
            .iter()
            .all(|(day, _, _)| day.as_str() >= "2025-03-10" && day.as_str() <= "2025-03-12")
    );
    assert!(within(&report, "2024-12-31", "2024-12-31").is_empty());

    refusals(&gw).await;
}

/// 400 for bad ranges, 403 without the admin token, 405 for another method.
async fn refusals(gw: &Gateway) {
    for ext in ["csv", "xlsx"] {
        let path = format!("/admin/v1/reports/sales.{ext}");
        for (query, says) in [
            ("", "from is required"),
            ("?from=2025-03-10", "to is required"),
            ("?from=2025-3-10&to=2025-03-12", "from must be a date as YYYY-MM-DD"),
            ("?from=2025-03-10&to=2025-02-30", "to must be a date as YYYY-MM-DD"),
            ("?from=2025-03-10&to=tomorrow", "to must be a date as YYYY-MM-DD"),
            ("?from=2025-03-12&to=2025-03-10", "after"),
            ("?from=2024-01-01&to=2025-01-01", "at most 366 days"),
            ("?from=2025-03-10&to=2025-03-12&item=x", "unknown parameter"),
        ] {
            let r = send(gw.admin(gw.get(&format!("{path}{query}")))).await;
            r.assert_refused(400, "bad_request");
            let message = r.json["message"].as_str().unwrap_or("");
            assert!(message.contains(says), "{path}{query}: {message}");
        }
        // 366 days (a leap year) is the longest range.
        let r = send(gw.admin(gw.get(&format!("{path}?from=2024-01-01&to=2024-12-31")))).await;
        r.assert_ok();
        let ok = format!("{path}?from=2025-03-10&to=2025-03-12");
        send(gw.get(&ok)).await.assert_refused(403, "forbidden");
        send(gw.get(&ok).bearer_auth("not-the-token"))
            .await
            .assert_refused(403, "forbidden");
        send(gw.get(&ok).user("shopper")).await.assert_refused(403, "forbidden");
        send(gw.admin(gw.post(&ok)))
            .await
            .assert_refused(405, "method_not_allowed");
    }
}

/// An embedded-mode gateway (no `--redis-url`), configured by `configure`.
async fn embedded(configure: impl FnOnce(Builder) -> Builder) -> Gateway {
    configure(Gateway::embedded()).start().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_orders_on_sqlite() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    written_orders(&format!("sqlite://{}/orders.db", dir.path().display())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn written_orders_on_postgres() {
    written_orders(&shared_pg()).await;
}

/// Reserve 2 and pay, reserve 1 and cancel, through the routes; the report of the days
/// around now (the steps may straddle midnight) shows the item's units and revenue once
/// the database has them (`within`: the persistence delay in Redis mode).
async fn sales_through_the_routes(gw: &Gateway, within_: Duration) {
    let item = gw.new_item(10, 5).await;
    let price = gw.get_item(&item).await.assert_ok()["price_cents"]
        .as_i64()
        .expect("price_cents");
    let paid = send(gw.reserve_req(&item, "alice").json(&json!({"qty": 2})))
        .await
        .order_id();
    gw.pay(&paid, "alice").await.assert_ok();
    let cancelled = gw.reserve_ok(&item, "bob").await;
    gw.cancel(&cancelled, "bob").await.assert_ok();

    let now = system_now_ms();
    let (from, to) = (day_of(now - DAY), day_of(now + DAY));
    let mut last = None;
    let found = poll(within_, async || {
        let lines = csv_report(gw, &from, &to).await;
        let mut sums = [0; 7];
        for (_, _, counts) in lines.iter().filter(|(_, id, _)| *id == item) {
            for (s, c) in sums.iter_mut().zip(counts) {
                *s += c;
            }
        }
        last = Some(sums);
        (sums == [3, 2, 1, 0, 0, 0, 2 * price]).then_some(())
    })
    .await;
    assert!(
        found.is_some(),
        "item {item}: reserved, paid, cancelled, expired, refunded, refund_due, revenue expected [3, 2, 1, 0, 0, 0, {}], last {last:?}",
        2 * price
    );
    let lines = xlsx_report(gw, &from, &to).await;
    assert!(
        lines.iter().any(|(_, id, _)| *id == item),
        "the workbook has the item's lines too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_through_the_routes_embedded() {
    let gw = embedded(|b| b).await;
    // Embedded mode commits before it answers: the report has it at once.
    sales_through_the_routes(&gw, Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_through_the_routes_redis() {
    let (_redis, _rd, gw) = on_redis(|b| b.database(&shared_pg())).await;
    sales_through_the_routes(&gw, Duration::from_secs(15)).await;
}
