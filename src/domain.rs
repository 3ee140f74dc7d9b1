//! The domain's vocabulary, in one home: what an operator sells ([`ItemSpec`]), its live
//! counters ([`ItemState`]), an [`Order`] and its [`OrderStatus`], and the [`OrderEvent`]s
//! that carry every change to the database (and their stream-field encoding). The engines,
//! the persistence worker, the store and the front door all speak these types; none of them
//! owns them.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::engine::seq::Mark;

/// What an operator sells: the fields of `PUT /admin/v1/items/{id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemSpec {
    pub item_id: String,
    pub name: String,
    pub price_cents: i64,
    pub stock_total: i64,
    pub per_user_limit: i64,
    pub starts_ms: Millis,
    pub ends_ms: Millis,
    /// Stock buckets, 1–[`crate::ids::MAX_BUCKETS`]: the stock split over this many
    /// engine items on different shards (`docs/internals.md`, "Stock buckets"). The
    /// embedded engine keeps one counter whatever the number.
    #[serde(default = "one_bucket")]
    pub buckets: u32,
    /// The operator's pause switch (`POST /admin/v1/items/{id}/pause`, `…/resume`): while
    /// set, reserve answers 503 `paused`. Not a field of `PUT`: a replacement keeps it.
    #[serde(default)]
    pub paused: bool,
}

fn one_bucket() -> u32 {
    1
}

/// An item with its live counters (units).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ItemState {
    pub spec: ItemSpec,
    /// Units left: `stock_total − reserved − paid`.
    pub stock: i64,
    /// Units held by reservations awaiting payment.
    pub reserved: i64,
    pub paid: i64,
    /// Units returned by cancellations (cumulative).
    pub cancelled: i64,
    /// Units returned by expired reservations (cumulative).
    pub expired: i64,
    /// Units refunded (cumulative; with or without restock).
    pub refunded: i64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Reserved,
    Paid,
    Cancelled,
    Expired,
    /// Paid for after it closed (a late payment of an expired or cancelled order): the
    /// money is owed back. Its units were returned when it closed.
    RefundDue,
    /// Refunded by the operator, from `paid` or `refund_due`.
    Refunded,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Reserved => "reserved",
            OrderStatus::Paid => "paid",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Expired => "expired",
            OrderStatus::RefundDue => "refund_due",
            OrderStatus::Refunded => "refunded",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "reserved" => OrderStatus::Reserved,
            "paid" => OrderStatus::Paid,
            "cancelled" => OrderStatus::Cancelled,
            "expired" => OrderStatus::Expired,
            "refund_due" => OrderStatus::RefundDue,
            "refunded" => OrderStatus::Refunded,
            _ => return None,
        })
    }

    /// Reserved or paid: the order holds its units (and its buyer's quota).
    pub fn is_live(self) -> bool {
        matches!(self, OrderStatus::Reserved | OrderStatus::Paid)
    }

    /// No longer reserved: closed by payment, cancellation or expiry, or refunded since.
    pub fn is_final(self) -> bool {
        self != OrderStatus::Reserved
    }

    /// How far along the order's life a status is (invariant 7): `reserved` 0; `paid`,
    /// `cancelled`, `expired` 1; `refund_due` 2; `refunded` 3. A status only ever moves to
    /// a higher rank (never between two of rank 1), so the furthest record of an order
    /// wins wherever two meet (the database's upsert, a rebuild of Redis).
    pub fn rank(self) -> u8 {
        match self {
            OrderStatus::Reserved => 0,
            OrderStatus::Paid | OrderStatus::Cancelled | OrderStatus::Expired => 1,
            OrderStatus::RefundDue => 2,
            OrderStatus::Refunded => 3,
        }
    }
}

/// Where a refund (or a refund owed) came from: the status the order left, and whether
/// its units returned to the sale with it (always, for a cancelled or expired order: they
/// came back when it closed).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundOf {
    pub status: OrderStatus,
    pub restocked: bool,
}

impl RefundOf {
    /// `paid`, `paid+restock`, `cancelled`, `expired`: its form in an event and a row.
    pub fn as_text(self) -> String {
        if self.restocked && self.status == OrderStatus::Paid {
            "paid+restock".to_owned()
        } else {
            self.status.as_str().to_owned()
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        let (status, restocked) = match s.strip_suffix("+restock") {
            Some("paid") => (OrderStatus::Paid, true),
            Some(_) => return None,
            None => (OrderStatus::parse(s)?, false),
        };
        match status {
            OrderStatus::Paid => Some(RefundOf { status, restocked }),
            OrderStatus::Cancelled | OrderStatus::Expired => Some(RefundOf {
                status,
                restocked: true,
            }),
            _ => None,
        }
    }

    /// Whether the order's units are out of the sale (counted as sold): a paid order
    /// refunded without restock.
    pub fn units_kept(self) -> bool {
        self.status == OrderStatus::Paid && !self.restocked
    }
}

/// One order, as stored in the engine (and, later, in the database).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub item_id: String,
    pub user_id: String,
    pub qty: i64,
    pub status: OrderStatus,
    pub created_ms: Millis,
    pub pay_before_ms: Millis,
    pub updated_ms: Millis,
    pub idem_key: String,
    /// The unit price when it was reserved (`None`: an order made before prices were kept).
    #[serde(default)]
    pub price_cents: Option<i64>,
    /// For `refund_due` and `refunded`: what the refund came from.
    #[serde(default)]
    pub refund: Option<RefundOf>,
}

impl Order {
    /// Whether the order holds units of its item's stock and of its buyer's quota:
    /// reserved, paid, or refunded without restock (those units left the sale).
    pub fn holds_units(&self) -> bool {
        match self.status {
            OrderStatus::Reserved | OrderStatus::Paid => true,
            OrderStatus::Refunded => self.refund.is_some_and(RefundOf::units_kept),
            _ => false,
        }
    }
}

/// An item's counters as its orders make them (units): what a rebuild or a restart
/// writes back, and what the engines keep up as orders change. `stock = stock_total −
/// reserved − paid`; `paid` keeps the units of orders refunded without restock (they left
/// the sale), `refunded` counts every refunded unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrderUnits {
    pub reserved: i64,
    pub paid: i64,
    pub cancelled: i64,
    pub expired: i64,
    pub refunded: i64,
}

impl OrderUnits {
    pub fn add(&mut self, o: &Order) {
        // Where the units went when the order closed: a refund (owed) keeps its origin.
        let closed_as = match o.status {
            OrderStatus::RefundDue | OrderStatus::Refunded => o.refund.map(|r| r.status),
            other => Some(other),
        };
        match closed_as {
            Some(OrderStatus::Reserved) => self.reserved += o.qty,
            // A paid order refunded with restock holds nothing any more.
            Some(OrderStatus::Paid) if o.holds_units() => self.paid += o.qty,
            Some(OrderStatus::Cancelled) => self.cancelled += o.qty,
            Some(OrderStatus::Expired) => self.expired += o.qty,
            _ => {}
        }
        if o.status == OrderStatus::Refunded {
            self.refunded += o.qty;
        }
    }
}

/// An order event: what the scripts XADD to a shard stream (and what the embedded engine
/// journals). Every event carries the whole order, so a row can be created from any of them,
/// whatever order they arrive in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderEvent {
    /// The status this event moves the order to (`reserved` creates it).
    pub status: OrderStatus,
    pub order_id: String,
    pub item_id: String,
    pub user_id: String,
    pub qty: i64,
    /// When this transition happened.
    pub at_ms: Millis,
    pub created_ms: Millis,
    pub pay_before_ms: Millis,
    pub idem_key: String,
    /// The unit price when it was reserved (`None` in an event of an earlier format).
    pub price_cents: Option<i64>,
    /// On `refund_due` and `refunded` events: what the refund came from.
    pub refund: Option<RefundOf>,
}

impl OrderEvent {
    pub fn of(order: &Order, status: OrderStatus, at_ms: Millis) -> Self {
        OrderEvent {
            status,
            order_id: order.order_id.clone(),
            item_id: order.item_id.clone(),
            user_id: order.user_id.clone(),
            qty: order.qty,
            at_ms,
            created_ms: order.created_ms,
            pay_before_ms: order.pay_before_ms,
            idem_key: order.idem_key.clone(),
            price_cents: order.price_cents,
            refund: order.refund,
        }
    }

    /// Decode the fields of a stream entry into its events (one or more); `Err` names what
    /// is wrong with the entry (a poison entry: none of its events is taken). Reads every
    /// format written so far: the packed field `o` with one event per line (a batch of
    /// reservations is one entry), and the nine named fields of the first release (a
    /// rolling upgrade has them all in a stream).
    pub fn from_fields(f: &HashMap<String, String>) -> Result<Vec<Self>, String> {
        match f.get(PACKED) {
            Some(packed) => packed.split('\n').map(|line| Self::unpack(line)?.checked()).collect(),
            None => Ok(vec![Self::from_named(f)?.checked()?]),
        }
    }

    /// The ids are the contract's; an event's item may be a stock bucket of one
    /// (`<item>#<b>`, 1 ≤ b ≤ [`crate::ids::MAX_BUCKETS`]): its row is the item's, with the bucket.
    fn checked(self) -> Result<Self, String> {
        let (item, bucket) = crate::ids::split_bucket(&self.item_id);
        if !crate::ids::valid_id(&self.order_id)
            || !crate::ids::valid_id(item)
            || bucket > crate::ids::MAX_BUCKETS
            || !crate::ids::valid_id(&self.user_id)
        {
            return Err("malformed id".into());
        }
        if self.qty < 1 {
            return Err("qty below 1".into());
        }
        Ok(self)
    }

    /// `status|order_id|item_id|user_id|qty|at_ms|created_ms|pay_before_ms|idem_key|
    /// price_cents|refund_of`: ids are `[A-Za-z0-9_.:-]`, so `|` never occurs inside a
    /// part; the idempotency key, the price (an order made before prices were kept) and
    /// `refund_of` ([`RefundOf::as_text`]; only on `refund_due` and `refunded`) may be
    /// empty. The nine parts of the previous format (no price) are read too.
    fn unpack(packed: &str) -> Result<Self, String> {
        let parts: Vec<&str> = packed.split('|').collect();
        if parts.len() != 9 && parts.len() != 11 {
            return Err(format!("packed event has {} parts, not 9 or 11", parts.len()));
        }
        let (base, extra) = parts.split_at(9);
        let &[
            status,
            order_id,
            item_id,
            user_id,
            qty,
            at_ms,
            created_ms,
            pay_before_ms,
            idem_key,
        ] = base
        else {
            return Err("packed event cut short".into());
        };
        let num = |name: &str, v: &str| -> Result<i64, String> {
            v.parse().map_err(|_| format!("part {name} is not an integer"))
        };
        let (price_cents, refund) = match extra {
            [price, refund] => (
                (!price.is_empty()).then(|| num("price_cents", price)).transpose()?,
                (!refund.is_empty())
                    .then(|| RefundOf::parse(refund).ok_or_else(|| format!("refund_of {refund:?}")))
                    .transpose()?,
            ),
            _ => (None, None),
        };
        Ok(OrderEvent {
            status: OrderStatus::parse(status).ok_or_else(|| format!("unknown event type {status:?}"))?,
            order_id: order_id.to_owned(),
            item_id: item_id.to_owned(),
            user_id: user_id.to_owned(),
            qty: num("qty", qty)?,
            at_ms: num("at_ms", at_ms)?,
            created_ms: num("created_ms", created_ms)?,
            pay_before_ms: num("pay_before_ms", pay_before_ms)?,
            idem_key: idem_key.to_owned(),
            price_cents,
            refund,
        })
    }

    fn from_named(f: &HashMap<String, String>) -> Result<Self, String> {
        let text = |k: &str| f.get(k).cloned().ok_or_else(|| format!("missing field {k}"));
        let num = |k: &str| -> Result<i64, String> {
            f.get(k)
                .ok_or_else(|| format!("missing field {k}"))?
                .parse()
                .map_err(|_| format!("field {k} is not an integer"))
        };
        let kind = text("type")?;
        Ok(OrderEvent {
            status: OrderStatus::parse(&kind).ok_or_else(|| format!("unknown event type {kind:?}"))?,
            order_id: text("order_id")?,
            item_id: text("item_id")?,
            user_id: text("user_id")?,
            qty: num("qty")?,
            at_ms: num("at_ms")?,
            created_ms: num("created_ms")?,
            pay_before_ms: num("pay_before_ms")?,
            idem_key: f.get("idem_key").cloned().unwrap_or_default(),
            price_cents: None,
            refund: None,
        })
    }

    /// The stream fields, as the scripts write them: one packed field (one listpack entry
    /// instead of nine pairs is most of what an XADD costs Redis).
    pub fn to_fields(&self) -> Vec<(&'static str, String)> {
        vec![(PACKED, self.packed())]
    }

    /// The event as one packed line ([`Self::unpack`]).
    pub fn packed(&self) -> String {
        [
            self.status.as_str(),
            &self.order_id,
            &self.item_id,
            &self.user_id,
            &self.qty.to_string(),
            &self.at_ms.to_string(),
            &self.created_ms.to_string(),
            &self.pay_before_ms.to_string(),
            &self.idem_key,
            &self.price_cents.map(|p| p.to_string()).unwrap_or_default(),
            &self.refund.map(RefundOf::as_text).unwrap_or_default(),
        ]
        .join("|")
    }

    /// The event as named fields (the previous release's stream format, still read; also
    /// the readable form of a dead letter).
    pub fn named_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("type", self.status.as_str().to_owned()),
            ("order_id", self.order_id.clone()),
            ("item_id", self.item_id.clone()),
            ("user_id", self.user_id.clone()),
            ("qty", self.qty.to_string()),
            ("at_ms", self.at_ms.to_string()),
            ("created_ms", self.created_ms.to_string()),
            ("pay_before_ms", self.pay_before_ms.to_string()),
            ("idem_key", self.idem_key.clone()),
        ]
    }
}

/// The one field of a packed stream entry.
pub const PACKED: &str = "o";

/// The field of a stream entry that records one step of a transfer between two stock
/// buckets of an item (`lua/transfer_out.lua`, `lua/transfer_in.lua`).
pub const TRANSFER: &str = "x";

/// The field of a credit's stream entry that carries its donor step's mark.
pub const DONOR_MARK: &str = "d";

/// Which step of a transfer between stock buckets an event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TransferSide {
    /// Units taken out of the donor bucket.
    Out,
    /// Units credited to the destination bucket.
    In,
}

/// One step of a transfer between two stock buckets of an item, as its stream entry
/// carries it: `x` = `out|<id>|<bucket>|<to>|<units>|<at_ms>` or
/// `in|<id>|<bucket>|<from>|<units>|<at_ms>` (`docs/internals.md`, "Stock buckets"), and
/// on a credit, `d` = the donor step's mark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TransferEvent {
    pub side: TransferSide,
    pub transfer_id: String,
    /// The item (not a bucket id).
    pub item_id: String,
    pub from_bucket: u32,
    pub to_bucket: u32,
    pub units: i64,
    pub at_ms: Millis,
    /// On a credit: the mark of its donor's step (`lua/transfer_in.lua`), which the
    /// database records as the donor shard's, so a Redis that lost that step is found
    /// behind. `None` on a donor's step and on credits written before marks were carried.
    pub donor_mark: Option<Mark>,
}

impl TransferEvent {
    /// The transfer step of a stream entry: `None` when the entry is not one (it holds
    /// order events), `Some(Err)` naming what is wrong with it (a poison entry).
    pub fn from_fields(f: &HashMap<String, String>) -> Option<Result<Self, String>> {
        f.get(TRANSFER).map(|x| {
            let mut ev = Self::unpack(x)?;
            if let Some(d) = f.get(DONOR_MARK) {
                ev.donor_mark = Some(Mark::parse(d).ok_or_else(|| format!("donor mark {d:?} is not E:S"))?);
            }
            Ok(ev)
        })
    }

    fn unpack(x: &str) -> Result<Self, String> {
        let parts: Vec<&str> = x.split('|').collect();
        let [side, id, here, there, units, at] = parts[..] else {
            return Err(format!("transfer event has {} parts, not 6", parts.len()));
        };
        let side = match side {
            "out" => TransferSide::Out,
            "in" => TransferSide::In,
            other => return Err(format!("transfer side {other:?}")),
        };
        let (item, here) = crate::ids::split_bucket(here);
        let (other_item, there) = crate::ids::split_bucket(there);
        if item != other_item {
            return Err("a transfer between buckets of two items".into());
        }
        if !crate::ids::valid_id(id) || !crate::ids::valid_id(item) {
            return Err("malformed id".into());
        }
        let units: i64 = units.parse().map_err(|_| "units is not a number".to_owned())?;
        if units < 1 {
            return Err("units below 1".into());
        }
        let (from_bucket, to_bucket) = match side {
            TransferSide::Out => (here, there),
            TransferSide::In => (there, here),
        };
        Ok(TransferEvent {
            side,
            transfer_id: id.to_owned(),
            item_id: item.to_owned(),
            from_bucket,
            to_bucket,
            units,
            at_ms: at.parse().map_err(|_| "at_ms is not a number".to_owned())?,
            donor_mark: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(idem_key: &str) -> OrderEvent {
        OrderEvent {
            status: OrderStatus::Paid,
            order_id: "0190c1f2-0000-7000-8000-00000000000a".into(),
            item_id: "phone".into(),
            user_id: "alice".into(),
            qty: 2,
            at_ms: 1_700_000_001_000,
            created_ms: 1_700_000_000_000,
            pay_before_ms: 1_700_000_900_000,
            idem_key: idem_key.into(),
            price_cents: Some(1999),
            refund: None,
        }
    }

    fn map(fields: Vec<(&'static str, String)>) -> HashMap<String, String> {
        fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }

    #[test]
    fn packed_and_named_fields_decode_to_the_same_event() {
        for key in ["", "k-1"] {
            let ev = event(key);
            assert_eq!(ev.to_fields().len(), 1, "one packed field");
            assert_eq!(OrderEvent::from_fields(&map(ev.to_fields())), Ok(vec![ev.clone()]));
            // The named fields of the first release carry no price.
            let named = OrderEvent {
                price_cents: None,
                ..ev.clone()
            };
            assert_eq!(
                OrderEvent::from_fields(&map(ev.named_fields())),
                Ok(vec![named.clone()])
            );
            // Nor do the nine packed parts of the release before prices.
            let nine = ev.packed().rsplitn(3, '|').nth(2).unwrap().to_owned();
            assert_eq!(OrderEvent::from_fields(&map(vec![(PACKED, nine)])), Ok(vec![named]));
        }
    }

    #[test]
    fn transfer_entries_decode_both_steps_and_refuse_what_is_malformed() {
        let out = map(vec![
            (TRANSFER, "out|t-1|hot|hot#3|5|1700000000000".into()),
            ("q", "0:7".into()),
        ]);
        let ev = TransferEvent::from_fields(&out)
            .expect("a transfer entry")
            .expect("well formed");
        assert_eq!(
            ev,
            TransferEvent {
                side: TransferSide::Out,
                transfer_id: "t-1".into(),
                item_id: "hot".into(),
                from_bucket: 0,
                to_bucket: 3,
                units: 5,
                at_ms: 1_700_000_000_000,
                donor_mark: None,
            }
        );
        let credit = map(vec![(TRANSFER, "in|t-1|hot#3|hot|5|1700000000001".into())]);
        let ev = TransferEvent::from_fields(&credit).unwrap().unwrap();
        assert_eq!((ev.side, ev.from_bucket, ev.to_bucket), (TransferSide::In, 0, 3));
        assert_eq!(ev.donor_mark, None, "a credit written before marks were carried");
        let marked = map(vec![
            (TRANSFER, "in|t-1|hot#3|hot|5|1700000000001".into()),
            (DONOR_MARK, "2:41".into()),
        ]);
        let ev = TransferEvent::from_fields(&marked).unwrap().unwrap();
        assert_eq!(ev.donor_mark, Some(Mark { epoch: 2, seq: 41 }));
        let bad_mark = map(vec![
            (TRANSFER, "in|t-1|hot#3|hot|5|1700000000001".into()),
            (DONOR_MARK, "41".into()),
        ]);
        assert!(
            TransferEvent::from_fields(&bad_mark).unwrap().is_err(),
            "a donor mark not E:S"
        );
        // Order entries are not transfers.
        assert!(TransferEvent::from_fields(&map(event("").to_fields())).is_none());
        for bad in [
            "out|t-1|hot|hot#3|5",
            "sideways|t-1|hot|hot#3|5|1",
            "out|t-1|hot|cold#3|5|1",
            "out|t 1|hot|hot#3|5|1",
            "out|t-1|hot|hot#3|0|1",
            "out|t-1|hot|hot#3|x|1",
            "out|t-1|hot|hot#3|5|soon",
        ] {
            let f = map(vec![(TRANSFER, bad.into())]);
            assert!(TransferEvent::from_fields(&f).unwrap().is_err(), "{bad}");
        }
    }

    #[test]
    fn an_entry_of_a_batch_holds_one_event_per_line() {
        let (a, b) = (event(""), event("k-2"));
        let lines = format!("{}\n{}", a.to_fields()[0].1, b.to_fields()[0].1);
        assert_eq!(
            OrderEvent::from_fields(&map(vec![(PACKED, lines.clone())])),
            Ok(vec![a, b])
        );
        // One bad line makes the whole entry poison: none of it is half-taken.
        let poisoned = format!("{lines}\npaid|o|i|u|1|2|3");
        assert!(OrderEvent::from_fields(&map(vec![(PACKED, poisoned)])).is_err());
    }

    #[test]
    fn a_malformed_packed_event_is_refused_with_a_reason() {
        let bad = |v: &str| OrderEvent::from_fields(&map(vec![(PACKED, v.to_owned())])).unwrap_err();
        assert!(bad("paid|o|i|u|1|2|3").contains("7 parts"));
        assert!(bad("paid|o|i|u|x|2|3|4|").contains("qty"));
        assert!(bad("sold|o|i|u|1|2|3|4|").contains("unknown event type"));
        assert!(bad("paid|o|i|u|0|2|3|4|").contains("qty below 1"));
        assert!(bad("paid|o|i|u s|1|2|3|4|").contains("malformed id"));
    }
}
