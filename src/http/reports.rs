//! The operator's sales report, behind the admin token: `GET /admin/v1/reports/sales.csv`
//! and `GET /admin/v1/reports/sales.xlsx`, `?from=YYYY-MM-DD&to=YYYY-MM-DD`. Per UTC day and
//! item, the units of orders reserved, paid, cancelled, expired, refunded and paid for too
//! late, and the revenue, from the database (`docs/contract.md`, "Sales report").
//!
//! The database aggregates ([`crate::store::Store::sales`]); this module checks the query
//! and renders the rows. Rendering is CPU work proportional to the rows (up to 366 days ×
//! the items), so it runs on the blocking pool, off the threads that serve the sale.

use http::header::CONTENT_DISPOSITION;
use http::{HeaderValue, Request, StatusCode};
use hyper::body::Incoming;
use rust_xlsxwriter::{Format, Workbook, XlsxError};
use time::Date;
use time::format_description::BorrowedFormatItem;
use time::macros::format_description;

use super::reply;
use super::router::{Answer, Ctx};
use crate::error::{Error, Reject};
use crate::identity::is_admin;
use crate::store::{DAY_MS, SalesRow};

/// The longest report, in days (a leap year).
pub const MAX_DAYS: i64 = 366;

/// The report's columns, in order: the CSV's header line and the worksheet's first row.
pub const COLUMNS: [&str; 9] = [
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

/// Rows a worksheet holds (Excel's limit), less the header and the totals.
const MAX_XLSX_LINES: usize = 1_048_576 - 2;

const DAY: &[BorrowedFormatItem<'_>] = format_description!("[year]-[month]-[day]");

/// The report's two formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    Csv,
    Xlsx,
}

impl ReportFormat {
    fn content_type(self) -> &'static str {
        match self {
            ReportFormat::Csv => "text/csv; charset=utf-8",
            ReportFormat::Xlsx => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        }
    }

    fn extension(self) -> &'static str {
        match self {
            ReportFormat::Csv => "csv",
            ReportFormat::Xlsx => "xlsx",
        }
    }
}

/// The days a report covers, both inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub from: Date,
    pub to: Date,
}

impl Range {
    /// `from=YYYY-MM-DD&to=YYYY-MM-DD`, both required, nothing else; `from` ≤ `to`, at most
    /// [`MAX_DAYS`] days. Refused in the API's words (400 `bad_request`).
    pub fn parse(query: &str) -> Result<Range, Reject> {
        const SHAPE: &str = "the query is from=YYYY-MM-DD&to=YYYY-MM-DD (UTC days, both included)";
        let bad = |why: String| Reject::BadRequest(why);
        let pairs: Vec<(String, String)> =
            serde_urlencoded::from_str(query).map_err(|_| bad(format!("malformed query: {SHAPE}")))?;
        let (mut from, mut to) = (None, None);
        for (name, value) in pairs {
            let slot = match name.as_str() {
                "from" => &mut from,
                "to" => &mut to,
                _ => return Err(bad(format!("unknown parameter {name:?}: {SHAPE}"))),
            };
            if slot.replace(value).is_some() {
                return Err(bad(format!("{name} given twice: {SHAPE}")));
            }
        }
        let day = |name: &str, value: Option<String>| -> Result<Date, Reject> {
            let value = value.ok_or_else(|| bad(format!("{name} is required: {SHAPE}")))?;
            // `[year]` also takes a sign (`+2026`, `-2026`): a date of the API starts with
            // its year's first digit.
            value
                .starts_with(|c: char| c.is_ascii_digit())
                .then(|| Date::parse(&value, DAY).ok())
                .flatten()
                .ok_or_else(|| bad(format!("{name} must be a date as YYYY-MM-DD, not {value:?}")))
        };
        let range = Range {
            from: day("from", from)?,
            to: day("to", to)?,
        };
        if range.from > range.to {
            return Err(bad(format!(
                "from ({}) is after to ({})",
                range.first_day(),
                range.last_day()
            )));
        }
        if range.days() > MAX_DAYS {
            return Err(bad(format!(
                "{} days asked for: a report covers at most {MAX_DAYS} days",
                range.days()
            )));
        }
        Ok(range)
    }

    /// Days covered, both ends included.
    pub fn days(&self) -> i64 {
        (self.to - self.from).whole_days() + 1
    }

    /// Milliseconds since the epoch of `from`'s UTC midnight, and of the midnight after `to`
    /// (the end, excluded).
    pub fn millis(&self) -> (i64, i64) {
        let start = self.from.midnight().assume_utc().unix_timestamp() * 1000;
        (start, start + self.days() * DAY_MS)
    }

    pub fn first_day(&self) -> String {
        day_text(self.from)
    }

    pub fn last_day(&self) -> String {
        day_text(self.to)
    }
}

fn day_text(d: Date) -> String {
    d.format(DAY).unwrap_or_default()
}

/// A row's day as `YYYY-MM-DD` (UTC).
fn row_day(row: &SalesRow) -> String {
    time::OffsetDateTime::from_unix_timestamp(row.day_ms.div_euclid(1000))
        .map(|t| day_text(t.date()))
        .unwrap_or_default()
}

/// The column sums of `rows` (the worksheet's totals row), in [`COLUMNS`] order from
/// `reserved` on.
pub fn totals(rows: &[SalesRow]) -> [i64; 7] {
    rows.iter().fold([0; 7], |mut t, r| {
        for (sum, v) in t.iter_mut().zip(counts(r)) {
            *sum += v;
        }
        t
    })
}

/// A row's numbers, in [`COLUMNS`] order from `reserved` on.
fn counts(r: &SalesRow) -> [i64; 7] {
    [
        r.reserved,
        r.paid,
        r.cancelled,
        r.expired,
        r.refunded,
        r.refund_due,
        r.revenue_cents,
    ]
}

/// The report as CSV: the header line, then one line per row.
pub fn csv(rows: &[SalesRow]) -> Result<Vec<u8>, csv::Error> {
    let mut w = csv::Writer::from_writer(Vec::new());
    w.write_record(COLUMNS)?;
    for r in rows {
        let mut line = vec![row_day(r), r.item_id.clone()];
        line.extend(counts(r).iter().map(i64::to_string));
        w.write_record(&line)?;
    }
    w.flush()?;
    w.into_inner().map_err(|e| csv::Error::from(e.into_error()))
}

/// The report as a workbook: one worksheet "Sales", the header in bold, one row per line
/// (the day as text `YYYY-MM-DD`, as in the CSV; the counts and revenue as numbers), and a
/// bold totals row (`total` in the day column) below them. Numbers are written as Excel
/// stores them, doubles: exact up to 2^53 cents.
pub fn xlsx(rows: &[SalesRow]) -> Result<Vec<u8>, XlsxError> {
    let mut book = Workbook::new();
    let bold = Format::new().set_bold();
    let sheet = book.add_worksheet();
    sheet.set_name("Sales")?;
    for (col, name) in (0u16..).zip(COLUMNS) {
        sheet.write_string_with_format(0, col, name, &bold)?;
    }
    let mut line = 1u32;
    for r in rows {
        sheet.write_string(line, 0, row_day(r))?;
        sheet.write_string(line, 1, &r.item_id)?;
        for (col, v) in (2u16..).zip(counts(r)) {
            sheet.write_number(line, col, v as f64)?;
        }
        line += 1;
    }
    sheet.write_string_with_format(line, 0, "total", &bold)?;
    for (col, v) in (2u16..).zip(totals(rows)) {
        sheet.write_number_with_format(line, col, v as f64, &bold)?;
    }
    sheet.set_column_width(0, 12)?;
    sheet.set_column_width(1, 24)?;
    sheet.set_freeze_panes(1, 0)?;
    book.save_to_buffer()
}

fn render(format: ReportFormat, rows: &[SalesRow]) -> Result<Vec<u8>, Error> {
    match format {
        ReportFormat::Csv => csv(rows).map_err(|e| Error::Internal(e.to_string())),
        ReportFormat::Xlsx => xlsx(rows).map_err(|e| Error::Internal(e.to_string())),
    }
}

/// `GET /admin/v1/reports/sales.csv` and `….xlsx`: the report of the days asked for, as a
/// download.
pub async fn sales(ctx: &Ctx<'_>, req: Request<Incoming>, format: ReportFormat) -> Answer {
    is_admin(req.headers(), ctx.app.config.admin_token.as_deref())?;
    let range = Range::parse(req.uri().query().unwrap_or(""))?;
    let (from_ms, to_ms) = range.millis();
    let rows = ctx
        .app
        .store
        .sales(from_ms, to_ms)
        .await
        .map_err(|e| ctx.failed("sales report", e))?;
    if format == ReportFormat::Xlsx && rows.len() > MAX_XLSX_LINES {
        return Err(Reject::BadRequest(format!(
            "the report has {} lines, more than a worksheet holds ({MAX_XLSX_LINES}): ask for fewer days, or for sales.csv",
            rows.len()
        )));
    }
    let rendered = tokio::task::spawn_blocking(move || render(format, &rows))
        .await
        .map_err(|e| Error::Internal(e.to_string()))
        .and_then(|r| r)
        .map_err(|e| ctx.failed("sales report", e))?;
    let mut response = reply::text(StatusCode::OK, format.content_type(), rendered);
    // The dates were parsed and are written back as YYYY-MM-DD: no quoting needed.
    let name = format!(
        "attachment; filename=\"sales-{}-{}.{}\"",
        range.first_day(),
        range.last_day(),
        format.extension()
    );
    if let Ok(v) = HeaderValue::from_str(&name) {
        response.headers_mut().insert(CONTENT_DISPOSITION, v);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(query: &str) -> String {
        match Range::parse(query) {
            Err(Reject::BadRequest(why)) => why,
            other => panic!("{query}: {other:?}"),
        }
    }

    #[test]
    fn a_range_is_two_utc_days_both_included() {
        let r = Range::parse("from=2026-02-27&to=2026-03-01").unwrap();
        assert_eq!(
            (r.first_day(), r.last_day(), r.days()),
            ("2026-02-27".into(), "2026-03-01".into(), 3)
        );
        let (from_ms, to_ms) = r.millis();
        assert_eq!(from_ms, 1_772_150_400_000, "2026-02-27T00:00:00Z");
        assert_eq!(to_ms - from_ms, 3 * DAY_MS);
        assert_eq!(Range::parse("to=2026-01-01&from=2026-01-01").unwrap().days(), 1);
        // A leap year is the longest range.
        assert_eq!(Range::parse("from=2024-01-01&to=2024-12-31").unwrap().days(), 366);
    }

    #[test]
    fn a_bad_range_is_refused_in_the_apis_words() {
        assert!(refused("").contains("from is required"));
        assert!(refused("from=2026-01-01").contains("to is required"));
        for bad in [
            "2026-1-1",
            "2026-02-30",
            "01/02/2026",
            "2026-01-01T00:00:00Z",
            "",
            "yesterday",
            "%2B2026-01-01",
            "-2026-01-01",
            "20260-01-01",
            "+2026-01-01",
            "226-01-01",
            "2026-01-1",
            "2026-13-01",
        ] {
            let why = refused(&format!("from={bad}&to=2026-03-01"));
            assert!(why.contains("from must be a date as YYYY-MM-DD"), "{bad}: {why}");
        }
        assert!(refused("from=2026-03-02&to=2026-03-01").contains("after"));
        assert!(refused("from=2024-01-01&to=2025-01-01").contains("at most 366 days"));
        assert!(refused("from=2026-01-01&to=2026-01-02&item=x").contains("unknown parameter \"item\""));
        assert!(refused("from=2026-01-01&from=2026-01-01&to=2026-01-02").contains("twice"));
    }

    fn row(day_ms: i64, item: &str, n: i64) -> SalesRow {
        SalesRow {
            day_ms,
            item_id: item.into(),
            reserved: n,
            paid: n,
            cancelled: 0,
            expired: 1,
            refunded: 0,
            refund_due: 2,
            revenue_cents: n * 150,
        }
    }

    #[test]
    fn the_csv_has_the_header_then_a_line_per_row() {
        let day = 1_772_150_400_000;
        let text = String::from_utf8(csv(&[row(day, "a", 3), row(day + DAY_MS, "b", 1)]).unwrap()).unwrap();
        assert_eq!(
            text,
            "day,item_id,reserved,paid,cancelled,expired,refunded,refund_due,revenue_cents\n\
             2026-02-27,a,3,3,0,1,0,2,450\n\
             2026-02-28,b,1,1,0,1,0,2,150\n"
        );
        assert_eq!(totals(&[row(day, "a", 3), row(day, "b", 1)]), [4, 4, 0, 2, 0, 4, 600]);
    }

    #[test]
    fn the_workbook_is_a_zip_even_when_empty() {
        for rows in [vec![], vec![row(0, "a", 1)]] {
            let bytes = xlsx(&rows).unwrap();
            assert!(bytes.starts_with(b"PK"), "an .xlsx is a zip archive");
        }
    }
}
