//! The Lua scripts in `lua/`, as the engine runs them ([`engine::scripts`]: pay,
//! cancel and expire joined after their prelude `lua/lib/order.lua`), called
//! directly against a real `redis-server` (one per test, on a free port),
//! asserting every reply of every script and its side effects: stock and
//! counters, buyers, the order hash, stream entries, the idempotency key, the
//! deadline set and TTLs. Interfaces: `docs/internals.md`.
//!
//! "Changes nothing" is checked by snapshotting every key of the server
//! (DUMP, plus whether it has a TTL) before and after a refused call.
//!
//! [`engine::scripts`]: seckill_gateway::engine::scripts

mod common;

use std::collections::HashMap;
use std::sync::LazyLock;

use common::{RedisServer, unique};
use redis::aio::MultiplexedConnection;
use redis::{Script, Value};

use seckill_gateway::domain::OrderEvent;
use seckill_gateway::engine::scripts;

static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::RESERVE));
static PAY: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::PAY));
static CANCEL: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::CANCEL));
static EXPIRE: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::EXPIRE));
static PUT_ITEM: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::PUT_ITEM));
static PAUSE: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::PAUSE));
static TRANSFER_OUT: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::TRANSFER_OUT));
static TRANSFER_IN: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::TRANSFER_IN));
static TRANSFER_FORGET: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::TRANSFER_FORGET));
static SETTLE: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::SETTLE));
static REFUND: LazyLock<Script> = LazyLock::new(|| Script::new(scripts::REFUND));

/// The injected clock of these tests: 2023-11-14T22:13:20Z.
const NOW: i64 = 1_700_000_000_000;
const TIMEOUT_MS: i64 = 60_000;
const IDEM_TTL_S: i64 = 600;
const CLOSED_TTL_S: i64 = 3_600;
/// The sale window of [`Sale::with_item`]: open from a second before [`NOW`]
/// for an hour.
const STARTS: i64 = NOW - 1_000;
const ENDS: i64 = NOW + 3_600_000;

/// One element of a script reply.
#[derive(Debug, Clone, PartialEq, Eq)]
enum R {
    S(String),
    I(i64),
}

impl From<&str> for R {
    fn from(s: &str) -> Self {
        R::S(s.to_owned())
    }
}
impl From<&String> for R {
    fn from(s: &String) -> Self {
        R::S(s.clone())
    }
}
impl From<i64> for R {
    fn from(n: i64) -> Self {
        R::I(n)
    }
}
impl From<i32> for R {
    fn from(n: i32) -> Self {
        R::I(n.into())
    }
}

/// `reply!["ok", 3]` is the expected reply `{"ok", 3}`.
macro_rules! reply {
    ($($x:expr),* $(,)?) => { vec![$(R::from($x)),*] };
}

fn decode(v: Value) -> Vec<R> {
    let Value::Array(items) = v else {
        panic!("script reply is not an array: {v:?}")
    };
    items
        .into_iter()
        .map(|x| match x {
            Value::Int(n) => R::I(n),
            Value::BulkString(b) => R::S(String::from_utf8(b).expect("UTF-8 reply")),
            Value::SimpleString(s) => R::S(s),
            other => panic!("unexpected reply element {other:?}"),
        })
        .collect()
}

/// Every key of the server: name, DUMP, and whether it has a TTL.
type Snapshot = Vec<(String, Vec<u8>, bool)>;

/// One test's world: a private redis-server and one sale item whose keys
/// carry the item's shard tag, as `src/engine/redis.rs` builds them.
struct Sale {
    con: MultiplexedConnection,
    item: String,
    /// The item's shard's hash tag.
    tag: String,
    shard: u32,
    orders: u32,
    /// The floor the scripts get ("E:S", "" = none: `lua/lib/seq.lua`).
    floor: String,
    /// The server, owned by the first [`Sale`] on it ([`Sale::bucket`]s share it).
    _server: Option<RedisServer>,
}

impl Sale {
    /// A server and an item id, no item yet.
    async fn new() -> Self {
        let server = RedisServer::start();
        let con = server
            .client()
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis-server");
        let item = unique("item");
        let shard = crc32fast::hash(item.as_bytes()) % 16;
        Self {
            con,
            tag: seckill_gateway::engine::keys::tag(shard).to_string(),
            item,
            shard,
            orders: 0,
            floor: String::new(),
            _server: Some(server),
        }
    }

    /// Stock bucket `b` of this sale's item, on the same server, with `stock` units (its
    /// keys on the bucket's shard, as `ids::bucket_id` and `engine::keys` name them).
    async fn bucket(&self, b: u32, stock: i64, limit: i64) -> Sale {
        let item = seckill_gateway::ids::bucket_id(&self.item, b);
        let shard = seckill_gateway::ids::shard_of(&item);
        let mut bucket = Sale {
            con: self.con.clone(),
            tag: seckill_gateway::engine::keys::tag(shard).to_string(),
            item,
            shard,
            orders: 1000 * b,
            floor: String::new(),
            _server: None,
        };
        assert_eq!(bucket.put(stock, limit, STARTS, ENDS).await, reply!["ok", stock]);
        bucket
    }

    fn xout_key(&self) -> String {
        seckill_gateway::engine::keys::transfers_out(&self.item)
    }
    fn xin_key(&self) -> String {
        seckill_gateway::engine::keys::transfers_in(&self.item)
    }

    /// transfer_out.lua from this bucket: `want` units for transfer `id` to `dest`.
    async fn try_transfer_out(&mut self, id: &str, want: i64, dest: &str) -> redis::RedisResult<Value> {
        TRANSFER_OUT
            .key(self.item_key())
            .key(self.xout_key())
            .key(self.events_key())
            .key(self.seq_key())
            .arg(id)
            .arg(want)
            .arg(dest)
            .arg(NOW)
            .arg(&self.floor)
            .invoke_async(&mut self.con)
            .await
    }

    async fn transfer_out(&mut self, id: &str, want: i64, dest: &str) -> Vec<R> {
        decode(self.try_transfer_out(id, want, dest).await.expect("transfer_out.lua"))
    }

    /// transfer_in.lua into this bucket: `units` of transfer `id` from `from`, whose step
    /// had mark `mark` ("" = not known).
    async fn try_transfer_in(&mut self, id: &str, units: i64, from: &str, mark: &str) -> redis::RedisResult<Value> {
        TRANSFER_IN
            .key(self.item_key())
            .key(self.xin_key())
            .key(self.events_key())
            .key(self.seq_key())
            .arg(id)
            .arg(units)
            .arg(from)
            .arg(NOW)
            .arg(&self.floor)
            .arg(mark)
            .invoke_async(&mut self.con)
            .await
    }

    async fn transfer_in(&mut self, id: &str, units: i64, from: &str, mark: &str) -> Vec<R> {
        decode(
            self.try_transfer_in(id, units, from, mark)
                .await
                .expect("transfer_in.lua"),
        )
    }

    async fn forget(&mut self, key: &str, id: &str) -> Vec<R> {
        decode(
            TRANSFER_FORGET
                .key(key)
                .arg(id)
                .invoke_async(&mut self.con)
                .await
                .expect("transfer_forget.lua"),
        )
    }

    /// The transfer events of this bucket's shard stream: (field `x`, field `q`).
    /// The transfer entries of this shard's stream: the event, its mark, and on a credit
    /// the donor step's mark when it was passed.
    async fn transfer_events(&mut self) -> Vec<(String, String, Option<String>)> {
        let key = self.events_key();
        let entries: Vec<(String, HashMap<String, String>)> = self.cmd(&["XRANGE", &key, "-", "+"]).await;
        entries
            .into_iter()
            .filter_map(|(_, f)| {
                let x = f.get("x")?.clone();
                let mut names: Vec<&str> = f.keys().map(String::as_str).collect();
                names.sort_unstable();
                let d = f.get("d").cloned();
                let expected: &[&str] = if d.is_some() { &["d", "q", "x"] } else { &["q", "x"] };
                assert_eq!(names, expected, "a transfer entry is its event and its marks: {f:?}");
                Some((x, f["q"].clone(), d))
            })
            .collect()
    }

    /// A server and an item on sale in [`STARTS`, `ENDS`).
    async fn with_item(stock: i64, limit: i64) -> Self {
        let mut sale = Self::new().await;
        assert_eq!(sale.put(stock, limit, STARTS, ENDS).await, reply!["ok", stock]);
        sale
    }

    fn item_key(&self) -> String {
        format!("sk:{}:item:{}", self.tag, self.item)
    }
    fn buyers_key(&self) -> String {
        format!("sk:{}:buyers:{}", self.tag, self.item)
    }
    fn order_key(&self, order: &str) -> String {
        format!("sk:{}:order:{order}", self.tag)
    }
    fn idem_key(&self, user: &str, key: &str) -> String {
        format!("sk:{}:idem:{}:{user}:{key}", self.tag, self.item)
    }
    fn deadlines_key(&self) -> String {
        format!("sk:{}:deadlines", self.tag)
    }
    fn events_key(&self) -> String {
        format!("sk:{}:events", self.tag)
    }
    fn seq_key(&self) -> String {
        format!("sk:{}:seq", self.tag)
    }
    fn member(&self, order: &str) -> String {
        format!("{order}|{}", self.item)
    }

    /// A UUIDv7-shaped id whose last hex digit is the shard.
    fn new_order_id(&mut self) -> String {
        self.orders += 1;
        format!("018bcfe5-6800-7000-8000-{:011x}{:x}", self.orders, self.shard)
    }

    async fn put(&mut self, stock_total: i64, limit: i64, starts: i64, ends: i64) -> Vec<R> {
        let res = PUT_ITEM
            .key(self.item_key())
            .arg(&self.item)
            .arg("Phone")
            .arg(99_900)
            .arg(stock_total)
            .arg(limit)
            .arg(starts)
            .arg(ends)
            .invoke_async(&mut self.con)
            .await;
        decode(res.expect("put_item.lua"))
    }

    async fn try_reserve(
        &mut self,
        user: &str,
        qty: &str,
        order: &str,
        idem: &str,
        now: &str,
    ) -> redis::RedisResult<Value> {
        let reply = self.try_reserve_batch(&[(user, qty, order, idem)], now).await?;
        let Value::Array(mut replies) = reply else {
            panic!("reserve.lua answers an array of replies: {reply:?}")
        };
        assert_eq!(replies.len(), 1, "one reply per request");
        Ok(replies.remove(0))
    }

    /// reserve.lua with a batch of `(user, qty, order, idem)` requests, decided in order.
    async fn try_reserve_batch(
        &mut self,
        requests: &[(&str, &str, &str, &str)],
        now: &str,
    ) -> redis::RedisResult<Value> {
        let mut inv = RESERVE.prepare_invoke();
        inv.key(self.deadlines_key())
            .key(self.events_key())
            .key(self.seq_key())
            .arg(TIMEOUT_MS)
            .arg(IDEM_TTL_S)
            .arg(now)
            .arg(&self.floor);
        for (user, qty, order, idem) in requests {
            inv.key(self.item_key())
                .key(self.buyers_key())
                .key(self.order_key(order))
                .key(self.idem_key(user, if idem.is_empty() { "-" } else { idem }))
                .arg(&self.item)
                .arg(*user)
                .arg(*qty)
                .arg(*order)
                .arg(*idem);
        }
        inv.invoke_async(&mut self.con).await
    }

    /// reserve.lua with a batch of `(user, qty, order, idem)` requests at [`NOW`]: each
    /// request's reply, decoded.
    async fn reserve_batch(&mut self, requests: &[(&str, &str, &str, &str)]) -> Vec<Vec<R>> {
        let reply = self
            .try_reserve_batch(requests, &NOW.to_string())
            .await
            .expect("reserve.lua");
        let Value::Array(replies) = reply else {
            panic!("reserve.lua answers an array of replies: {reply:?}")
        };
        assert_eq!(replies.len(), requests.len(), "one reply per request");
        replies.into_iter().map(decode).collect()
    }

    /// reserve.lua with a new order id and no idempotency key, at [`NOW`].
    async fn reserve(&mut self, user: &str, qty: i64) -> Vec<R> {
        let order = self.new_order_id();
        self.reserve_with(user, &qty.to_string(), &order, "", &NOW.to_string())
            .await
    }

    async fn reserve_with(&mut self, user: &str, qty: &str, order: &str, idem: &str, now: &str) -> Vec<R> {
        decode(
            self.try_reserve(user, qty, order, idem, now)
                .await
                .expect("reserve.lua"),
        )
    }

    /// A reserved order of `qty` for `user` at [`NOW`]: its id.
    async fn reserved(&mut self, user: &str, qty: i64) -> String {
        let reply = self.reserve(user, qty).await;
        assert_eq!(reply[0], R::from("ok"), "{reply:?}");
        let R::S(order) = &reply[1] else { panic!("{reply:?}") };
        order.clone()
    }

    async fn close(&mut self, script: &Script, order: &str, user: &str, now: &str) -> Vec<R> {
        decode(
            self.try_close(script, order, user, now)
                .await
                .expect("pay.lua / cancel.lua"),
        )
    }

    /// pay.lua or cancel.lua, its reply or error as Redis gave it.
    async fn try_close(&mut self, script: &Script, order: &str, user: &str, now: &str) -> redis::RedisResult<Value> {
        script
            .key(self.order_key(order))
            .key(self.item_key())
            .key(self.buyers_key())
            .key(self.deadlines_key())
            .key(self.events_key())
            .key(self.seq_key())
            .arg(order)
            .arg(user)
            .arg(&self.item)
            .arg(CLOSED_TTL_S)
            .arg(now)
            .arg(&self.floor)
            .invoke_async(&mut self.con)
            .await
    }

    /// settle.lua (`restock` None) or refund.lua of `order`, with the database's `record`.
    async fn try_settle(&mut self, order: &str, restock: Option<bool>, record: &str) -> redis::RedisResult<Value> {
        let script: &Script = if restock.is_some() { &REFUND } else { &SETTLE };
        let mut inv = script.prepare_invoke();
        inv.key(self.order_key(order))
            .key(self.item_key())
            .key(self.buyers_key())
            .key(self.deadlines_key())
            .key(self.events_key())
            .key(self.seq_key())
            .arg(order)
            .arg(&self.item);
        if let Some(r) = restock {
            inv.arg(if r { "1" } else { "0" });
        }
        inv.arg(CLOSED_TTL_S).arg(NOW).arg(&self.floor).arg(record);
        inv.invoke_async(&mut self.con).await
    }

    async fn pay(&mut self, order: &str, user: &str, now: i64) -> Vec<R> {
        self.close(&PAY, order, user, &now.to_string()).await
    }

    async fn cancel(&mut self, order: &str, user: &str, now: i64) -> Vec<R> {
        self.close(&CANCEL, order, user, &now.to_string()).await
    }

    async fn expire_at(&mut self, order: &str, now: &str) -> Vec<R> {
        decode(self.try_expire_at(order, now).await.expect("expire.lua"))
    }

    /// expire.lua, its reply or error as Redis gave it.
    async fn try_expire_at(&mut self, order: &str, now: &str) -> redis::RedisResult<Value> {
        EXPIRE
            .key(self.order_key(order))
            .key(self.item_key())
            .key(self.buyers_key())
            .key(self.deadlines_key())
            .key(self.events_key())
            .key(self.seq_key())
            .arg(order)
            .arg(&self.item)
            .arg(CLOSED_TTL_S)
            .arg(now)
            .arg(&self.floor)
            .invoke_async(&mut self.con)
            .await
    }

    async fn expire(&mut self, order: &str, now: i64) -> Vec<R> {
        self.expire_at(order, &now.to_string()).await
    }

    async fn cmd<T: redis::FromRedisValue>(&mut self, args: &[&str]) -> T {
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut self.con).await.expect("redis command")
    }

    async fn hash(&mut self, key: &str) -> HashMap<String, String> {
        self.cmd(&["HGETALL", key]).await
    }

    /// The item's hash field `name` as a number.
    async fn item_field(&mut self, name: &str) -> i64 {
        let key = self.item_key();
        let v: String = self.cmd(&["HGET", &key, name]).await;
        v.parse().expect("numeric item field")
    }

    /// stock, reserved, paid, cancelled, expired.
    async fn counters(&mut self) -> [i64; 5] {
        let mut out = [0; 5];
        for (i, f) in ["stock", "reserved", "paid", "cancelled", "expired"].iter().enumerate() {
            out[i] = self.item_field(f).await;
        }
        out
    }

    async fn held(&mut self, user: &str) -> Option<i64> {
        let key = self.buyers_key();
        self.cmd::<Option<i64>>(&["HGET", &key, user]).await
    }

    /// The write mark of each stream entry (field `q`, `lua/lib/seq.lua`).
    async fn marks(&mut self) -> Vec<String> {
        let key = self.events_key();
        let entries: Vec<(String, HashMap<String, String>)> = self.cmd(&["XRANGE", &key, "-", "+"]).await;
        entries
            .into_iter()
            .map(|(id, fields)| {
                fields
                    .get("q")
                    .cloned()
                    .unwrap_or_else(|| panic!("entry {id} has no mark"))
            })
            .collect()
    }

    /// The stream's events, each decoded (the scripts write one packed field and the
    /// entry's mark) and shown as its named fields.
    async fn events(&mut self) -> Vec<HashMap<String, String>> {
        let key = self.events_key();
        let entries: Vec<(String, HashMap<String, String>)> = self.cmd(&["XRANGE", &key, "-", "+"]).await;
        entries
            .into_iter()
            .flat_map(|(id, fields)| {
                let mut names: Vec<&str> = fields.keys().map(String::as_str).collect();
                names.sort_unstable();
                assert_eq!(names, ["o", "q"], "one packed field and the mark per entry: {fields:?}");
                let evs = OrderEvent::from_fields(&fields).unwrap_or_else(|e| panic!("event {id}: {e}"));
                evs.into_iter().map(|ev| {
                    let mut m = ev
                        .named_fields()
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .collect::<HashMap<_, _>>();
                    m.insert(
                        "price_cents".into(),
                        ev.price_cents.map(|p| p.to_string()).unwrap_or_default(),
                    );
                    m.insert("refund_of".into(), ev.refund.map(|r| r.as_text()).unwrap_or_default());
                    m
                })
            })
            .collect()
    }

    async fn deadline(&mut self, order: &str) -> Option<i64> {
        let (key, member) = (self.deadlines_key(), self.member(order));
        self.cmd(&["ZSCORE", &key, &member]).await
    }

    async fn ttl(&mut self, key: &str) -> i64 {
        self.cmd(&["TTL", key]).await
    }

    /// Redis's own clock, in ms.
    async fn redis_now(&mut self) -> i64 {
        let (s, us): (i64, i64) = self.cmd(&["TIME"]).await;
        s * 1000 + us / 1000
    }

    async fn snapshot(&mut self) -> Snapshot {
        let mut keys: Vec<String> = self.cmd(&["KEYS", "*"]).await;
        keys.sort();
        let mut snap = Vec::new();
        for k in keys {
            let dump: Vec<u8> = self.cmd(&["DUMP", &k]).await;
            let pttl: i64 = self.cmd(&["PTTL", &k]).await;
            snap.push((k, dump, pttl >= 0));
        }
        snap
    }

    /// Invariant 1 at a quiet point, and buyers add up to the units held.
    async fn assert_invariants(&mut self) {
        let [stock, reserved, paid, ..] = self.counters().await;
        let total = self.item_field("stock_total").await;
        assert_eq!(stock, total - reserved - paid, "stock = total - reserved - paid");
        let key = self.buyers_key();
        let buyers: HashMap<String, i64> = self.cmd(&["HGETALL", &key]).await;
        assert_eq!(buyers.values().sum::<i64>(), reserved + paid, "buyers add up");
        assert!(buyers.values().all(|&n| n > 0), "no buyer field at 0: {buyers:?}");
    }
}

/// Asserts the map has exactly these string fields.
fn assert_fields(got: &HashMap<String, String>, want: &[(&str, &str)]) {
    let want: HashMap<String, String> = want.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
    assert_eq!(got, &want);
}

// ---------------------------------------------------------------------------
// put_item.lua

#[tokio::test]
async fn put_item_creates_an_item_with_zero_counters() {
    let mut sale = Sale::new().await;
    assert_eq!(sale.put(10, 2, STARTS, ENDS).await, reply!["ok", 10]);
    let key = sale.item_key();
    let item = sale.hash(&key).await;
    let (starts, ends) = (STARTS.to_string(), ENDS.to_string());
    assert_fields(
        &item,
        &[
            ("name", "Phone"),
            ("price_cents", "99900"),
            ("stock_total", "10"),
            ("stock", "10"),
            ("per_user_limit", "2"),
            ("starts_ms", &starts),
            ("ends_ms", &ends),
            ("reserved", "0"),
            ("paid", "0"),
            ("cancelled", "0"),
            ("expired", "0"),
            // Without the optional 8th argument: one stock bucket.
            ("buckets", "1"),
        ],
    );
    assert_eq!(sale.ttl(&key).await, -1, "items never expire");
    // Only the item hash: put_item touches nothing else.
    assert_eq!(sale.snapshot().await.len(), 1);

    // With it: kept as given; 0 is refused and changes nothing.
    for (buckets, ok) in [(6, true), (0, false)] {
        let res: redis::RedisResult<Value> = PUT_ITEM
            .key(sale.item_key())
            .arg(&sale.item)
            .arg("Phone")
            .arg(99_900)
            .arg(10)
            .arg(2)
            .arg(STARTS)
            .arg(ENDS)
            .arg(buckets)
            .invoke_async(&mut sale.con)
            .await;
        assert_eq!(res.is_ok(), ok, "buckets {buckets}: {res:?}");
        assert_eq!(sale.item_field("buckets").await, 6);
    }
}

#[tokio::test]
async fn put_item_replace_keeps_counters_and_units_held() {
    let mut sale = Sale::with_item(10, 5).await;
    let paid = sale.reserved("alice", 2).await;
    sale.pay(&paid, "alice", NOW).await;
    let cancelled = sale.reserved("bob", 1).await;
    sale.cancel(&cancelled, "bob", NOW).await;
    sale.reserved("carol", 3).await;
    assert_eq!(sale.counters().await, [5, 3, 2, 1, 0]);

    // 2 paid + 3 reserved are held: a new total of 8 leaves 3 to sell.
    assert_eq!(sale.put(8, 4, STARTS, ENDS + 1).await, reply!["ok", 3]);
    assert_eq!(sale.counters().await, [3, 3, 2, 1, 0]);
    assert_eq!(sale.item_field("stock_total").await, 8);
    assert_eq!(sale.item_field("per_user_limit").await, 4);
    assert_eq!(sale.item_field("ends_ms").await, ENDS + 1);
    sale.assert_invariants().await;

    // Exactly the units held is allowed: stock 0.
    assert_eq!(sale.put(5, 4, STARTS, ENDS).await, reply!["ok", 0]);
    sale.assert_invariants().await;
}

#[tokio::test]
async fn put_item_below_held_changes_nothing() {
    let mut sale = Sale::with_item(10, 5).await;
    let paid = sale.reserved("alice", 2).await;
    sale.pay(&paid, "alice", NOW).await;
    sale.reserved("bob", 3).await;
    let before = sale.snapshot().await;
    assert_eq!(sale.put(4, 5, STARTS, ENDS).await, reply!["below_held", 5]);
    assert_eq!(sale.snapshot().await, before);
}

// ---------------------------------------------------------------------------
// reserve.lua

#[tokio::test]
async fn reserve_takes_stock_and_records_everything() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.new_order_id();
    let now = NOW.to_string();
    let reply = sale.reserve_with("alice", "2", &order, "", &now).await;
    assert_eq!(reply, reply!["ok", &order, NOW, NOW + TIMEOUT_MS, 3]);

    assert_eq!(sale.counters().await, [3, 2, 0, 0, 0]);
    assert_eq!(sale.held("alice").await, Some(2));

    let order_key = sale.order_key(&order);
    let (item, pay_before) = (sale.item.clone(), (NOW + TIMEOUT_MS).to_string());
    let whole_order = [
        ("item_id", item.as_str()),
        ("user_id", "alice"),
        ("qty", "2"),
        ("created_ms", now.as_str()),
        ("pay_before_ms", pay_before.as_str()),
    ];
    // The hash is lean: its key names the order, `updated_ms` comes when it closes, and
    // `idem_key` only when there is one; the unit price is the item's now.
    let mut want = whole_order.to_vec();
    want.extend([("status", "reserved"), ("price_cents", "99900")]);
    assert_fields(&sale.hash(&order_key).await, &want);
    assert_eq!(sale.ttl(&order_key).await, -1, "no TTL while reserved");

    assert_eq!(sale.deadline(&order).await, Some(NOW + TIMEOUT_MS));

    let mut want = whole_order.to_vec();
    want.extend([
        ("type", "reserved"),
        ("order_id", order.as_str()),
        ("at_ms", now.as_str()),
        ("idem_key", ""),
        ("price_cents", "99900"),
        ("refund_of", ""),
    ]);
    let events = sale.events().await;
    assert_eq!(events.len(), 1);
    assert_fields(&events[0], &want);

    // No idempotency key was given: no idem key exists.
    let idem_keys: Vec<String> = sale.cmd(&["KEYS", "sk:*:idem:*"]).await;
    assert!(idem_keys.is_empty(), "{idem_keys:?}");
    sale.assert_invariants().await;
}

#[tokio::test]
async fn reserve_with_idempotency_key_sets_it_with_ttl() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.new_order_id();
    let reply = sale.reserve_with("alice", "1", &order, "k-1", &NOW.to_string()).await;
    assert_eq!(reply[0], R::from("ok"));

    let idem = sale.idem_key("alice", "k-1");
    let value: String = sale.cmd(&["GET", &idem]).await;
    assert_eq!(value, order);
    let ttl = sale.ttl(&idem).await;
    assert!(ttl > 0 && ttl <= IDEM_TTL_S, "idem TTL {ttl}");

    let order_key = sale.order_key(&order);
    let stored: String = sale.cmd(&["HGET", &order_key, "idem_key"]).await;
    assert_eq!(stored, "k-1");
    assert_eq!(sale.events().await[0]["idem_key"], "k-1");
}

#[tokio::test]
async fn duplicate_idempotency_key_returns_the_same_order_and_decrements_once() {
    let mut sale = Sale::with_item(5, 3).await;
    let first = sale.new_order_id();
    let now = NOW.to_string();
    sale.reserve_with("alice", "2", &first, "k-1", &now).await;
    let before = sale.snapshot().await;

    // The retry carries a new order id (the gateway mints one per request) and
    // a later clock: it still gets the first order, and nothing moves.
    let retry = sale.new_order_id();
    let later = (NOW + 5).to_string();
    let reply = sale.reserve_with("alice", "2", &retry, "k-1", &later).await;
    let dup = reply!["duplicate", &first, 2, "reserved", NOW, NOW + TIMEOUT_MS];
    assert_eq!(reply, dup);
    assert_eq!(sale.snapshot().await, before);
    assert_eq!(sale.counters().await, [3, 2, 0, 0, 0]);
    assert_eq!(sale.held("alice").await, Some(2));
    assert_eq!(sale.events().await.len(), 1);

    // The duplicate check comes first: it answers even once the sale has ended.
    let after_end = ENDS.to_string();
    let reply = sale.reserve_with("alice", "2", &retry, "k-1", &after_end).await;
    assert_eq!(reply, dup);

    // And it reports the order as it is now.
    sale.pay(&first, "alice", NOW + 10).await;
    let reply = sale.reserve_with("alice", "2", &retry, "k-1", &later).await;
    assert_eq!(reply, reply!["duplicate", &first, 2, "paid", NOW, NOW + TIMEOUT_MS]);

    // Another key of the same user is a new reservation.
    let other = sale.new_order_id();
    let reply = sale.reserve_with("alice", "1", &other, "k-2", &now).await;
    assert_eq!(reply[0], R::from("ok"));
    sale.assert_invariants().await;
}

#[tokio::test]
async fn retried_call_with_the_same_order_id_is_a_duplicate() {
    // Not in internals.md's list: reserve.lua refuses to overwrite an existing
    // order, so a call the gateway retries after a lost reply cannot take
    // stock twice.
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.new_order_id();
    let now = NOW.to_string();
    sale.reserve_with("alice", "1", &order, "", &now).await;
    let before = sale.snapshot().await;
    let reply = sale.reserve_with("alice", "1", &order, "", &now).await;
    assert_eq!(reply, reply!["duplicate", &order, 1, "reserved", NOW, NOW + TIMEOUT_MS]);
    assert_eq!(sale.snapshot().await, before);
}

#[tokio::test]
async fn idempotency_key_outliving_its_order_answers_duplicate_without_details() {
    let mut sale = Sale::with_item(5, 3).await;
    let first = sale.new_order_id();
    let now = NOW.to_string();
    sale.reserve_with("alice", "1", &first, "k-1", &now).await;
    let order_key = sale.order_key(&first);
    let _: i64 = sale.cmd(&["DEL", &order_key]).await;
    let before = sale.snapshot().await;
    let retry = sale.new_order_id();
    let reply = sale.reserve_with("alice", "1", &retry, "k-1", &now).await;
    assert_eq!(reply, reply!["duplicate", &first, 0, "", 0, 0]);
    assert_eq!(sale.snapshot().await, before);
}

#[tokio::test]
async fn unknown_item_changes_nothing() {
    let mut sale = Sale::new().await;
    let order = sale.new_order_id();
    let reply = sale.reserve_with("alice", "1", &order, "k-1", &NOW.to_string()).await;
    assert_eq!(reply, reply!["unknown_item"]);
    assert!(sale.snapshot().await.is_empty(), "no key was created");
}

/// pause.lua on the sale's item: "1" pauses, "0" resumes.
async fn pause(sale: &mut Sale, flag: &str) -> Vec<R> {
    let res = PAUSE
        .key(sale.item_key())
        .arg(&sale.item)
        .arg(flag)
        .invoke_async(&mut sale.con)
        .await;
    decode(res.expect("pause.lua"))
}

#[tokio::test]
async fn a_paused_item_sells_nothing_and_changes_nothing_until_resumed() {
    let mut sale = Sale::with_item(5, 3).await;
    let keyed = sale.new_order_id();
    let now = NOW.to_string();
    sale.reserve_with("alice", "1", &keyed, "k-1", &now).await;
    assert_eq!(pause(&mut sale, "1").await, reply!["ok"]);
    assert_eq!(sale.hash(&sale.item_key()).await["paused"], "1");

    let before = sale.snapshot().await;
    assert_eq!(sale.reserve("bob", 1).await, reply!["paused"]);
    assert_eq!(sale.snapshot().await, before, "a paused reserve changes nothing");
    // A retry of an order made before the pause still finds it (no unit moves).
    let retry = sale.new_order_id();
    let reply = sale.reserve_with("alice", "1", &retry, "k-1", &now).await;
    assert_eq!(reply, reply!["duplicate", &keyed, 1, "reserved", NOW, NOW + TIMEOUT_MS]);
    // In a batch, every request of the paused item is refused.
    let (o1, o2) = (sale.new_order_id(), sale.new_order_id());
    let replies = sale
        .reserve_batch(&[("carol", "1", &o1, ""), ("dave", "1", &o2, "")])
        .await;
    assert_eq!(replies, vec![reply!["paused"], reply!["paused"]]);
    assert_eq!(sale.snapshot().await, before);
    // Orders made before the pause are still paid.
    assert_eq!(sale.pay(&keyed, "alice", NOW + 1).await[0], R::from("ok"));

    // A replacement of the item keeps the switch.
    assert_eq!(sale.put(5, 3, STARTS, ENDS).await[0], R::from("ok"));
    assert_eq!(sale.reserve("bob", 1).await, reply!["paused"]);

    assert_eq!(pause(&mut sale, "0").await, reply!["ok"]);
    assert!(!sale.hash(&sale.item_key()).await.contains_key("paused"));
    assert_eq!(sale.reserve("bob", 1).await[0], R::from("ok"));
    assert_eq!(sale.counters().await, [3, 1, 1, 0, 0]);
    sale.assert_invariants().await;
}

#[tokio::test]
async fn a_shard_paused_for_every_sale_refuses_every_reserve_on_it() {
    let mut sale = Sale::with_item(5, 3).await;
    let seq = sale.seq_key();
    let _: i64 = sale.cmd(&["HSET", &seq, "paused", "1"]).await;
    let before = sale.snapshot().await;
    assert_eq!(sale.reserve("bob", 1).await, reply!["paused"]);
    assert_eq!(sale.snapshot().await, before);
    // An unknown item is still unknown (the item check comes first).
    let mut other = Sale::new().await;
    let _: i64 = other.cmd(&["HSET", &other.seq_key(), "paused", "1"]).await;
    assert_eq!(other.reserve("bob", 1).await, reply!["unknown_item"]);
    let _: i64 = sale.cmd(&["HDEL", &seq, "paused"]).await;
    assert_eq!(sale.reserve("bob", 1).await[0], R::from("ok"));
}

#[tokio::test]
async fn pausing_an_unknown_item_creates_nothing() {
    let mut sale = Sale::new().await;
    assert_eq!(pause(&mut sale, "1").await, reply!["unknown_item"]);
    assert!(sale.snapshot().await.is_empty(), "no key was created");
}

#[tokio::test]
async fn not_started_and_ended_use_the_injected_clock() {
    let mut sale = Sale::with_item(5, 3).await;
    let before = sale.snapshot().await;
    for now in [i64::from(i32::MIN), STARTS - 1] {
        let order = sale.new_order_id();
        let reply = sale.reserve_with("alice", "1", &order, "k", &now.to_string()).await;
        assert_eq!(reply, reply!["not_started", STARTS]);
    }
    for now in [ENDS, ENDS + 1] {
        let order = sale.new_order_id();
        let reply = sale.reserve_with("alice", "1", &order, "k", &now.to_string()).await;
        assert_eq!(reply, reply!["ended", ENDS]);
    }
    assert_eq!(sale.snapshot().await, before);

    // The window is [starts, ends).
    for now in [STARTS, ENDS - 1] {
        let order = sale.new_order_id();
        let reply = sale.reserve_with("alice", "1", &order, "", &now.to_string()).await;
        assert_eq!(reply[0], R::from("ok"), "at {now}");
    }
}

#[tokio::test]
async fn empty_now_ms_means_redis_time() {
    let mut sale = Sale::new().await;
    let redis_now = sale.redis_now().await;
    let starts = redis_now + 3_600_000;
    sale.put(5, 3, starts, starts + 3_600_000).await;

    // The item starts in an hour by Redis's clock: nothing in ARGV says so.
    let before = sale.snapshot().await;
    let order = sale.new_order_id();
    let reply = sale.reserve_with("alice", "1", &order, "", "").await;
    assert_eq!(reply, reply!["not_started", starts]);
    assert_eq!(sale.snapshot().await, before);

    // An injected clock overrides Redis's.
    let reply = sale.reserve_with("alice", "1", &order, "", &starts.to_string()).await;
    assert_eq!(reply[0], R::from("ok"));

    // With Redis's clock: created_ms is Redis's now.
    sale.put(5, 3, 0, starts + 3_600_000).await;
    let t0 = sale.redis_now().await;
    let order = sale.new_order_id();
    let reply = sale.reserve_with("bob", "1", &order, "", "").await;
    let t1 = sale.redis_now().await;
    let R::I(created) = reply[2] else { panic!("{reply:?}") };
    assert!(t0 <= created && created <= t1, "{t0} <= {created} <= {t1}");
    assert_eq!(reply[3], R::I(created + TIMEOUT_MS));

    // pay, cancel and expire read Redis's clock too: an order created at the
    // injected NOW (2023) is long overdue by Redis's clock.
    let old = sale.reserve_with("carol", "1", "old-1", "", &NOW.to_string()).await;
    assert_eq!(old[0], R::from("ok"));
    assert_eq!(
        sale.close(&PAY, "old-1", "carol", "").await,
        reply!["closed", "expired"]
    );
    sale.reserve_with("dave", "1", "old-2", "", &NOW.to_string()).await;
    assert_eq!(
        sale.close(&CANCEL, "old-2", "dave", "").await,
        reply!["closed", "expired"]
    );
    sale.reserve_with("erin", "1", "old-3", "", &NOW.to_string()).await;
    assert_eq!(sale.expire_at("old-3", "").await, reply!["expired", 3]);
    // And a fresh order is not due by Redis's clock.
    assert_eq!(
        sale.expire_at(&order, "").await,
        reply!["not_due", created + TIMEOUT_MS]
    );
}

#[tokio::test]
async fn bad_qty_changes_nothing() {
    let mut sale = Sale::with_item(5, 3).await;
    let before = sale.snapshot().await;
    for qty in ["0", "-1", "4", "1.5", "abc", ""] {
        let order = sale.new_order_id();
        let reply = sale.reserve_with("alice", qty, &order, "k", &NOW.to_string()).await;
        assert_eq!(reply, reply!["bad_qty", 3], "qty {qty:?}");
    }
    assert_eq!(sale.snapshot().await, before);
}

#[tokio::test]
async fn limit_reached_counts_reserved_and_paid_units() {
    let mut sale = Sale::with_item(10, 3).await;
    let first = sale.reserved("alice", 1).await;
    sale.pay(&first, "alice", NOW).await;
    sale.reserved("alice", 1).await;
    let before = sale.snapshot().await;
    assert_eq!(sale.reserve("alice", 2).await, reply!["limit_reached", 2, 3]);
    assert_eq!(sale.snapshot().await, before);
    // Up to the limit is fine; other users are not affected.
    assert_eq!(sale.reserve("alice", 1).await[0], R::from("ok"));
    assert_eq!(sale.reserve("alice", 1).await, reply!["limit_reached", 3, 3]);
    assert_eq!(sale.reserve("bob", 3).await[0], R::from("ok"));
    sale.assert_invariants().await;
}

#[tokio::test]
async fn sold_out_changes_nothing() {
    let mut sale = Sale::with_item(3, 3).await;
    sale.reserved("alice", 2).await;
    let before = sale.snapshot().await;
    assert_eq!(sale.reserve("bob", 2).await, reply!["sold_out", 1]);
    assert_eq!(sale.snapshot().await, before);
    assert_eq!(sale.reserve("bob", 1).await[4], R::I(0));
    assert_eq!(sale.reserve("carol", 1).await, reply!["sold_out", 0]);
    sale.assert_invariants().await;
}

#[tokio::test]
async fn concurrent_reserves_sell_exactly_the_stock() {
    let mut sale = Sale::with_item(10, 1).await;
    let mut calls = Vec::new();
    for n in 0..40 {
        let (mut con, order) = (sale.con.clone(), sale.new_order_id());
        let keys = [
            sale.deadlines_key(),
            sale.events_key(),
            sale.seq_key(),
            sale.item_key(),
            sale.buyers_key(),
            sale.order_key(&order),
            sale.idem_key("-", "-"),
        ];
        let item = sale.item.clone();
        calls.push(tokio::spawn(async move {
            let mut inv = RESERVE.prepare_invoke();
            inv.key(&keys[..]);
            inv.arg(TIMEOUT_MS).arg(IDEM_TTL_S).arg(NOW).arg("");
            inv.arg(&item).arg(format!("u{n}")).arg(1).arg(&order).arg("");
            let Value::Array(mut replies) = inv.invoke_async(&mut con).await.expect("reserve.lua") else {
                panic!("an array of replies")
            };
            decode(replies.remove(0))
        }));
    }
    let mut ok = 0;
    for call in calls {
        let reply = call.await.expect("task");
        match &reply[0] {
            R::S(s) if s == "ok" => ok += 1,
            R::S(s) if s == "sold_out" => assert_eq!(reply[1], R::I(0)),
            _ => panic!("{reply:?}"),
        }
    }
    assert_eq!(ok, 10);
    assert_eq!(sale.counters().await, [0, 10, 0, 0, 0]);
    assert_eq!(sale.events().await.len(), 10);
    sale.assert_invariants().await;
}

/// A batch is decided request by request in its order: each sees the writes before it,
/// and one request's failed check changes nothing for the others.
#[tokio::test]
async fn a_batch_decides_each_request_in_order_and_failed_checks_change_nothing() {
    let mut sale = Sale::with_item(3, 1).await;
    let ids: Vec<String> = (0..7).map(|_| sale.new_order_id()).collect();
    let o = |i: usize| ids[i].as_str();
    let batch = [
        ("alice", "1", o(0), ""), // ok: stock 2
        ("alice", "1", o(1), ""), // limit_reached: alice holds 1 of 1
        ("bob", "1", o(2), "k"),  // ok: stock 1
        ("bob", "1", o(3), "k"),  // duplicate: the key names bob's first order
        ("carol", "2", o(4), ""), // bad_qty: 2 > the limit of 1
        ("dave", "1", o(5), ""),  // ok: the last unit
        ("erin", "1", o(6), ""),  // sold_out
    ];
    let replies = sale.reserve_batch(&batch).await;
    let pay_before = NOW + TIMEOUT_MS;
    assert_eq!(
        replies,
        vec![
            reply!["ok", o(0), NOW, pay_before, 2],
            reply!["limit_reached", 1, 1],
            reply!["ok", o(2), NOW, pay_before, 1],
            reply!["duplicate", o(2), 1, "reserved", NOW, pay_before],
            reply!["bad_qty", 1],
            reply!["ok", o(5), NOW, pay_before, 0],
            reply!["sold_out", 0],
        ]
    );

    assert_eq!(sale.counters().await, [0, 3, 0, 0, 0]);
    for (user, held) in [
        ("alice", Some(1)),
        ("bob", Some(1)),
        ("dave", Some(1)),
        ("carol", None),
        ("erin", None),
    ] {
        assert_eq!(sale.held(user).await, held, "{user}");
    }
    for (i, made) in [
        (0, true),
        (1, false),
        (2, true),
        (3, false),
        (4, false),
        (5, true),
        (6, false),
    ] {
        let key = sale.order_key(o(i));
        let exists: bool = sale.cmd(&["EXISTS", &key]).await;
        assert_eq!(exists, made, "order hash of request {i}");
        let deadline = sale.deadline(o(i)).await;
        assert_eq!(deadline.is_some(), made, "deadline of request {i}");
    }
    let idem = sale.idem_key("bob", "k");
    let named: Option<String> = sale.cmd(&["GET", &idem]).await;
    assert_eq!(named.as_deref(), Some(o(2)));
    let events: Vec<(String, String)> = sale
        .events()
        .await
        .into_iter()
        .map(|e| (e["type"].clone(), e["order_id"].clone()))
        .collect();
    let want: Vec<(String, String)> = [0, 2, 5]
        .iter()
        .map(|&i| ("reserved".to_owned(), o(i).to_owned()))
        .collect();
    assert_eq!(events, want, "one event per order made, in batch order");
    sale.assert_invariants().await;
}

/// A buyer who already holds units (the slower path after the first purchase's one-call
/// check-and-write) is counted against the limit in a batch, on units bought before it and
/// within it.
#[tokio::test]
async fn a_batch_counts_units_a_buyer_holds_from_before_and_within_it() {
    let mut sale = Sale::with_item(10, 3).await;
    sale.reserved("alice", 1).await;
    let ids: Vec<String> = (0..3).map(|_| sale.new_order_id()).collect();
    let o = |i: usize| ids[i].as_str();
    let batch = [
        ("alice", "1", o(0), ""), // ok: alice holds 2 of 3
        ("alice", "2", o(1), ""), // limit_reached: 2 + 2 > 3
        ("alice", "1", o(2), ""), // ok: alice holds 3 of 3
    ];
    let replies = sale.reserve_batch(&batch).await;
    let pay_before = NOW + TIMEOUT_MS;
    assert_eq!(
        replies,
        vec![
            reply!["ok", o(0), NOW, pay_before, 8],
            reply!["limit_reached", 2, 3],
            reply!["ok", o(2), NOW, pay_before, 7],
        ]
    );
    assert_eq!(sale.held("alice").await, Some(3));
    assert_eq!(sale.counters().await, [7, 3, 0, 0, 0]);
    sale.assert_invariants().await;
}

/// The batch writes the items' counters, the deadlines and the events once, at its end.
/// A request that raises an error (an idempotency key naming another user's order: a
/// bug, never a shopper's doing) fails the call, but what the requests before it made is
/// whole: stock taken, deadline set, event written.
#[tokio::test]
async fn an_error_in_a_batch_leaves_the_requests_before_it_whole() {
    let mut sale = Sale::with_item(10, 1).await;
    let first = sale.new_order_id();
    let stolen = sale.reserved("mallory", 1).await;
    // A corrupted idempotency key of bob's that names mallory's order.
    let idem = sale.idem_key("bob", "k");
    let _: String = sale.cmd(&["SET", &idem, &stolen]).await;
    let bob = sale.new_order_id();
    let err = sale
        .try_reserve_batch(&[("alice", "1", &first, ""), ("bob", "1", &bob, "k")], &NOW.to_string())
        .await
        .expect_err("the second request raises");
    assert!(err.to_string().contains("belongs to another user"), "{err}");
    assert_eq!(sale.counters().await, [8, 2, 0, 0, 0], "alice's unit is taken");
    assert_eq!(sale.held("alice").await, Some(1));
    assert!(sale.deadline(&first).await.is_some(), "alice's deadline is set");
    let orders: Vec<String> = sale.events().await.into_iter().map(|e| e["order_id"].clone()).collect();
    assert_eq!(orders, vec![stolen, first], "alice's event is written");
    sale.assert_invariants().await;
}

// ---------------------------------------------------------------------------
// pay.lua

#[tokio::test]
async fn pay_moves_units_to_paid_and_closes_the_order() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 2).await;
    let at = NOW + 1_000;
    assert_eq!(sale.pay(&order, "alice", at).await, reply!["ok", "paid", 3]);

    assert_eq!(sale.counters().await, [3, 0, 2, 0, 0]);
    assert_eq!(sale.held("alice").await, Some(2), "paid units stay held");
    let order_key = sale.order_key(&order);
    let o = sale.hash(&order_key).await;
    assert_eq!(o["status"], "paid");
    assert_eq!(o["updated_ms"], at.to_string());
    assert_eq!(o["created_ms"], NOW.to_string());
    let ttl = sale.ttl(&order_key).await;
    assert!(ttl > 0 && ttl <= CLOSED_TTL_S, "closed order TTL {ttl}");
    assert_eq!(sale.deadline(&order).await, None);

    let events = sale.events().await;
    assert_eq!(events.len(), 2);
    let (item, now, at, pay_before) = (
        sale.item.clone(),
        NOW.to_string(),
        at.to_string(),
        (NOW + TIMEOUT_MS).to_string(),
    );
    assert_fields(
        &events[1],
        &[
            ("type", "paid"),
            ("order_id", &order),
            ("item_id", &item),
            ("user_id", "alice"),
            ("qty", "2"),
            ("at_ms", &at),
            ("created_ms", &now),
            ("pay_before_ms", &pay_before),
            ("idem_key", ""),
            ("price_cents", "99900"),
            ("refund_of", ""),
        ],
    );
    sale.assert_invariants().await;
}

#[tokio::test]
async fn pay_twice_is_already_and_changes_nothing() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 1).await;
    sale.pay(&order, "alice", NOW).await;
    let before = sale.snapshot().await;
    // Even after the deadline: a paid order never expires.
    let late = NOW + TIMEOUT_MS + 1;
    assert_eq!(sale.pay(&order, "alice", late).await, reply!["already", "paid"]);
    assert_eq!(sale.snapshot().await, before);
}

#[tokio::test]
async fn pay_refusals_change_nothing() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 1).await;
    let before = sale.snapshot().await;
    assert_eq!(sale.pay("nope", "alice", NOW).await, reply!["unknown_order"]);
    assert_eq!(sale.pay(&order, "mallory", NOW).await, reply!["forbidden"]);
    // Someone else's overdue order is not expired by their call either.
    let late = NOW + TIMEOUT_MS;
    assert_eq!(sale.pay(&order, "mallory", late).await, reply!["forbidden"]);
    assert_eq!(sale.snapshot().await, before);

    let cancelled = sale.reserved("bob", 1).await;
    sale.cancel(&cancelled, "bob", NOW).await;
    let before = sale.snapshot().await;
    assert_eq!(sale.pay(&cancelled, "bob", NOW).await, reply!["closed", "cancelled"]);
    assert_eq!(sale.snapshot().await, before);
}

#[tokio::test]
async fn pay_after_the_deadline_expires_the_order_once() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 2).await;
    // pay_before_ms itself is too late.
    let deadline = NOW + TIMEOUT_MS;
    assert_eq!(sale.pay(&order, "alice", deadline).await, reply!["closed", "expired"]);
    assert_eq!(sale.counters().await, [5, 0, 0, 0, 2], "stock returned");
    assert_eq!(sale.held("alice").await, None, "quota returned");
    assert_eq!(sale.deadline(&order).await, None);
    let order_key = sale.order_key(&order);
    let ttl = sale.ttl(&order_key).await;
    assert!(ttl > 0 && ttl <= CLOSED_TTL_S, "closed order TTL {ttl}");
    let events = sale.events().await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["type"], "expired");
    assert_eq!(events[1]["at_ms"], deadline.to_string());

    // Nothing comes back a second time: not by paying again, nor by the sweeper.
    let before = sale.snapshot().await;
    assert_eq!(sale.pay(&order, "alice", deadline).await, reply!["closed", "expired"]);
    assert_eq!(sale.snapshot().await, before);
    let (key, member) = (sale.deadlines_key(), sale.member(&order));
    let _: i64 = sale.cmd(&["ZADD", &key, "0", &member]).await;
    assert_eq!(sale.expire(&order, deadline).await, reply!["not_reserved", "expired"]);
    assert_eq!(sale.snapshot().await, before);
    sale.assert_invariants().await;
}

// ---------------------------------------------------------------------------
// cancel.lua

#[tokio::test]
async fn cancel_returns_stock_and_quota_exactly_once() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 2).await;
    let at = NOW + 5;
    assert_eq!(sale.cancel(&order, "alice", at).await, reply!["ok", "cancelled", 5]);
    assert_eq!(sale.counters().await, [5, 0, 0, 2, 0]);
    assert_eq!(sale.held("alice").await, None, "buyer field deleted at 0");
    assert_eq!(sale.deadline(&order).await, None);
    let order_key = sale.order_key(&order);
    let o = sale.hash(&order_key).await;
    assert_eq!(o["status"], "cancelled");
    assert_eq!(o["updated_ms"], at.to_string());
    let ttl = sale.ttl(&order_key).await;
    assert!(ttl > 0 && ttl <= CLOSED_TTL_S, "closed order TTL {ttl}");
    let events = sale.events().await;
    assert_eq!(events.len(), 2);
    assert_eq!(events[1]["type"], "cancelled");
    assert_eq!(events[1]["qty"], "2");
    assert_eq!(events[1]["user_id"], "alice");
    assert_eq!(events[1]["at_ms"], at.to_string());
    sale.assert_invariants().await;

    let before = sale.snapshot().await;
    assert_eq!(sale.cancel(&order, "alice", at).await, reply!["already", "cancelled"]);
    assert_eq!(sale.snapshot().await, before);

    // The quota is really back: alice can take the limit again.
    assert_eq!(sale.reserve("alice", 3).await[0], R::from("ok"));
}

#[tokio::test]
async fn cancel_one_of_two_orders_keeps_the_other_held() {
    let mut sale = Sale::with_item(5, 3).await;
    let first = sale.reserved("alice", 1).await;
    sale.reserved("alice", 2).await;
    assert_eq!(sale.cancel(&first, "alice", NOW).await, reply!["ok", "cancelled", 3]);
    assert_eq!(sale.held("alice").await, Some(2));
    sale.assert_invariants().await;
}

#[tokio::test]
async fn cancel_refusals_change_nothing() {
    let mut sale = Sale::with_item(5, 3).await;
    let paid = sale.reserved("alice", 1).await;
    sale.pay(&paid, "alice", NOW).await;
    let reserved = sale.reserved("bob", 1).await;
    let before = sale.snapshot().await;
    assert_eq!(sale.cancel("nope", "alice", NOW).await, reply!["unknown_order"]);
    assert_eq!(sale.cancel(&reserved, "alice", NOW).await, reply!["forbidden"]);
    assert_eq!(sale.cancel(&paid, "alice", NOW).await, reply!["closed", "paid"]);
    assert_eq!(sale.snapshot().await, before);
}

#[tokio::test]
async fn cancel_after_the_deadline_expires_the_order() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 1).await;
    let late = NOW + TIMEOUT_MS + 1;
    assert_eq!(sale.cancel(&order, "alice", late).await, reply!["closed", "expired"]);
    assert_eq!(sale.counters().await, [5, 0, 0, 0, 1]);
    assert_eq!(sale.held("alice").await, None);
    assert_eq!(sale.events().await[1]["type"], "expired");
    let before = sale.snapshot().await;
    assert_eq!(sale.cancel(&order, "alice", late).await, reply!["closed", "expired"]);
    assert_eq!(sale.snapshot().await, before);
    sale.assert_invariants().await;
}

// ---------------------------------------------------------------------------
// expire.lua

#[tokio::test]
async fn expire_before_the_deadline_is_not_due_and_changes_nothing() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 1).await;
    let before = sale.snapshot().await;
    let deadline = NOW + TIMEOUT_MS;
    assert_eq!(sale.expire(&order, deadline - 1).await, reply!["not_due", deadline]);
    assert_eq!(sale.snapshot().await, before);
}

#[tokio::test]
async fn expire_at_the_deadline_returns_stock_and_quota() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 2).await;
    sale.reserved("alice", 1).await;
    let deadline = NOW + TIMEOUT_MS;
    assert_eq!(sale.expire(&order, deadline).await, reply!["expired", 4]);
    assert_eq!(sale.counters().await, [4, 1, 0, 0, 2]);
    assert_eq!(sale.held("alice").await, Some(1));
    assert_eq!(sale.deadline(&order).await, None);
    let order_key = sale.order_key(&order);
    let o = sale.hash(&order_key).await;
    assert_eq!(o["status"], "expired");
    assert_eq!(o["updated_ms"], deadline.to_string());
    let ttl = sale.ttl(&order_key).await;
    assert!(ttl > 0 && ttl <= CLOSED_TTL_S, "closed order TTL {ttl}");
    let events = sale.events().await;
    assert_eq!(events.len(), 3);
    let (item, now, at) = (sale.item.clone(), NOW.to_string(), deadline.to_string());
    assert_fields(
        &events[2],
        &[
            ("type", "expired"),
            ("order_id", &order),
            ("item_id", &item),
            ("user_id", "alice"),
            ("qty", "2"),
            ("at_ms", &at),
            ("created_ms", &now),
            ("pay_before_ms", &at),
            ("idem_key", ""),
            ("price_cents", "99900"),
            ("refund_of", ""),
        ],
    );
    sale.assert_invariants().await;

    // Once only.
    let before = sale.snapshot().await;
    assert_eq!(sale.expire(&order, deadline).await, reply!["not_reserved", "expired"]);
    assert_eq!(sale.snapshot().await, before);
}

#[tokio::test]
async fn expire_after_pay_is_not_reserved_and_keeps_the_stock_sold() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 1).await;
    sale.pay(&order, "alice", NOW + TIMEOUT_MS - 1).await;
    // The sweeper read the member before pay removed it.
    let (key, member) = (sale.deadlines_key(), sale.member(&order));
    let _: i64 = sale.cmd(&["ZADD", &key, "0", &member]).await;
    let before = sale.counters().await;
    assert_eq!(
        sale.expire(&order, NOW + TIMEOUT_MS).await,
        reply!["not_reserved", "paid"]
    );
    assert_eq!(sale.counters().await, before);
    assert_eq!(sale.counters().await, [4, 0, 1, 0, 0]);
    assert_eq!(sale.deadline(&order).await, None, "member removed");
    assert_eq!(sale.events().await.len(), 2, "no expired event");
    sale.assert_invariants().await;
}

#[tokio::test]
async fn expire_unknown_order_removes_the_deadline_member_only() {
    let mut sale = Sale::with_item(5, 3).await;
    sale.reserved("alice", 1).await;
    let before = sale.snapshot().await;
    let (key, member) = (sale.deadlines_key(), sale.member("gone"));
    let _: i64 = sale.cmd(&["ZADD", &key, "0", &member]).await;
    assert_eq!(sale.expire("gone", NOW).await, reply!["unknown_order"]);
    assert_eq!(sale.deadline("gone").await, None);
    assert_eq!(sale.snapshot().await, before);
}

// ---------------------------------------------------------------------------
// The shard's write sequence (lua/lib/seq.lua)

#[tokio::test]
async fn every_call_that_writes_events_takes_one_sequence_number() {
    let mut sale = Sale::with_item(5, 1).await;
    let a = sale.new_order_id();
    let b = sale.new_order_id();
    let c = sale.new_order_id();
    // A batch of three, one refused (bob's second): one entry, one number.
    let replies = sale
        .reserve_batch(&[("alice", "1", &a, ""), ("bob", "1", &b, ""), ("bob", "1", &c, "")])
        .await;
    assert_eq!(replies[2][0], R::from("limit_reached"), "{replies:?}");
    assert_eq!(sale.pay(&a, "alice", NOW).await[0], R::from("ok"));
    // Refusals write no event and take no number.
    assert_eq!(sale.pay(&a, "alice", NOW).await, reply!["already", "paid"]);
    assert_eq!(sale.cancel(&b, "bob", NOW).await[0], R::from("ok"));
    assert_eq!(sale.marks().await, ["0:1", "0:2", "0:3"]);
    let key = sale.seq_key();
    let s: String = sale.cmd(&["HGET", &key, "s"]).await;
    assert_eq!(s, "3");
}

#[tokio::test]
async fn a_shard_behind_the_floor_refuses_and_stays_fenced_for_every_caller() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 1).await;
    // The database holds writes up to 0:4; this Redis is at 0:1: it lost three.
    sale.floor = "0:4".into();
    let before = sale.snapshot().await;
    let id = sale.new_order_id();
    let err = sale.try_reserve("bob", "1", &id, "", &NOW.to_string()).await;
    let err = err.expect_err("a shard behind its floor refuses");
    assert_eq!(err.code(), Some("FENCED"), "{err}");
    assert!(err.to_string().contains("behind 0:4"), "{err}");
    // Nothing changed but the fence.
    let key = sale.seq_key();
    let fence: Option<String> = sale.cmd(&["HGET", &key, "fence"]).await;
    assert!(fence.is_some_and(|f| f.contains("behind 0:4")));
    let _: i64 = sale.cmd(&["HDEL", &key, "fence"]).await;
    assert_eq!(sale.snapshot().await, before);
    let _: i64 = sale.cmd(&["HSET", &key, "fence", "being rebuilt"]).await;
    // A caller that knows no floor is refused all the same while the fence stands, by
    // every script that writes.
    sale.floor = String::new();
    let id = sale.new_order_id();
    let err = sale.try_reserve("bob", "1", &id, "", &NOW.to_string()).await;
    assert_eq!(err.expect_err("fenced").code(), Some("FENCED"));
    for script in [&*PAY, &*CANCEL] {
        let res = sale.try_close(script, &order, "alice", &NOW.to_string()).await;
        assert_eq!(res.expect_err("fenced").code(), Some("FENCED"));
    }
    let res = sale.try_expire_at(&order, &(NOW + TIMEOUT_MS).to_string()).await;
    assert_eq!(res.expect_err("fenced").code(), Some("FENCED"));
    // The repair raises the epoch and lifts the fence: the old floor is below the new
    // epoch, and selling resumes.
    let _: i64 = sale.cmd(&["HSET", &key, "e", "1", "s", "0"]).await;
    let _: i64 = sale.cmd(&["HDEL", &key, "fence"]).await;
    sale.floor = "0:4".into();
    sale.reserved("bob", 1).await;
    assert_eq!(sale.marks().await.pop().as_deref(), Some("1:1"));
}

// ---------------------------------------------------------------------------
// All scripts

#[tokio::test]
async fn wrong_argument_counts_are_errors_and_change_nothing() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 1).await;
    let before = sale.snapshot().await;
    let item_key = sale.item_key();
    // (script, KEYS, fewest ARGV, most ARGV)
    let calls: [(&Script, usize, usize, usize); 10] = [
        (&SETTLE, 6, 6, 6),
        (&REFUND, 6, 7, 7),
        (&RESERVE, 7, 9, 9),
        (&PAY, 6, 6, 6),
        (&CANCEL, 6, 6, 6),
        (&EXPIRE, 6, 5, 5),
        (&PUT_ITEM, 1, 7, 8),
        (&TRANSFER_OUT, 4, 5, 5),
        (&TRANSFER_IN, 4, 6, 6),
        (&TRANSFER_FORGET, 1, 1, 1),
    ];
    for (script, keys, fewest, most) in calls {
        for (k, a) in [(keys - 1, fewest), (keys, fewest - 1), (keys, most + 1)] {
            let mut inv = script.prepare_invoke();
            for _ in 0..k {
                inv.key(&item_key);
            }
            for _ in 0..a {
                inv.arg(&order);
            }
            let res: redis::RedisResult<Value> = inv.invoke_async(&mut sale.con).await;
            let err = res.expect_err("wrong counts must be refused");
            assert!(err.to_string().contains("expected"), "{err}");
        }
    }
    assert_eq!(sale.snapshot().await, before);
}

#[tokio::test]
async fn order_of_another_item_is_an_error() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 1).await;
    let before = sale.snapshot().await;
    let res: redis::RedisResult<Value> = PAY
        .key(sale.order_key(&order))
        .key(sale.item_key())
        .key(sale.buyers_key())
        .key(sale.deadlines_key())
        .key(sale.events_key())
        .key(sale.seq_key())
        .arg(&order)
        .arg("alice")
        .arg("other-item")
        .arg(CLOSED_TTL_S)
        .arg(NOW)
        .arg("")
        .invoke_async(&mut sale.con)
        .await;
    assert!(res.expect_err("item mismatch").to_string().contains("is not of item"));
    assert_eq!(sale.snapshot().await, before);
}

#[tokio::test]
async fn scripts_reload_after_script_flush() {
    // After a restart or failover Redis has no scripts: EVALSHA answers
    // NOSCRIPT and Script::invoke_async loads the script and retries.
    let mut sale = Sale::with_item(5, 3).await;
    sale.reserved("alice", 1).await;
    let exists = |s: &Script| redis::cmd("SCRIPT").arg("EXISTS").arg(s.get_hash()).clone();
    let loaded: Vec<bool> = exists(&RESERVE).query_async(&mut sale.con).await.unwrap();
    assert_eq!(loaded, [true]);

    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut sale.con)
        .await
        .unwrap();
    let loaded: Vec<bool> = exists(&RESERVE).query_async(&mut sale.con).await.unwrap();
    assert_eq!(loaded, [false]);

    assert_eq!(sale.reserve("bob", 1).await[0], R::from("ok"));
    let loaded: Vec<bool> = exists(&RESERVE).query_async(&mut sale.con).await.unwrap();
    assert_eq!(loaded, [true]);
    assert_eq!(sale.counters().await, [3, 2, 0, 0, 0]);
}

// ---------------------------------------------------------------------------
// transfer_out.lua / transfer_in.lua / transfer_forget.lua (stock buckets)

#[tokio::test]
async fn transfer_out_takes_what_the_bucket_has_once_per_transfer_id() {
    let mut home = Sale::with_item(5, 3).await;
    let mut other = home.bucket(1, 2, 3).await;
    assert_ne!(home.shard, other.shard, "buckets lie on different shards");
    let to = other.item.clone();

    assert_eq!(home.transfer_out("t1", 3, &to).await, reply!["taken", 3, 2, "0:1"]);
    assert_eq!(home.item_field("stock").await, 2);
    assert_eq!(
        home.item_field("stock_total").await,
        2,
        "the bucket's share went with the units"
    );
    let xout = home.xout_key();
    assert_fields(&home.hash(&xout).await, &[("t1", &format!("3|{to}|{NOW}|0:1"))]);
    let events = home.transfer_events().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, format!("out|t1|{}|{to}|3|{NOW}", home.item));
    assert_eq!(events[0].1, "0:1", "a transfer takes a write mark");
    home.assert_invariants().await;

    // A replay (the caller did not see the answer) changes nothing and says the same,
    // the step's mark included.
    let before = home.snapshot().await;
    assert_eq!(home.transfer_out("t1", 3, &to).await, reply!["taken", 3, 2, "0:1"]);
    assert_eq!(home.snapshot().await, before);

    // Less than wanted: what there is.
    assert_eq!(home.transfer_out("t2", 5, &to).await, reply!["taken", 2, 0, "0:2"]);
    // A record written before marks were carried replays without one.
    let _: i64 = home.cmd(&["HSET", &xout, "t0", &format!("1|{to}|{NOW}")]).await;
    assert_eq!(home.transfer_out("t0", 1, &to).await, reply!["taken", 1, 0, ""]);
    let _: i64 = home.cmd(&["HDEL", &xout, "t0"]).await;
    // Nothing left: refused, and the units still in transit out of here are counted.
    let before = home.snapshot().await;
    assert_eq!(home.transfer_out("t3", 1, &to).await, reply!["empty", 2]);
    assert_eq!(home.snapshot().await, before);

    // A bucket that does not exist.
    let mut ghost = Sale {
        con: home.con.clone(),
        item: seckill_gateway::ids::bucket_id(&home.item, 9),
        tag: seckill_gateway::engine::keys::tag(seckill_gateway::ids::shard_of(&seckill_gateway::ids::bucket_id(
            &home.item, 9,
        )))
        .to_string(),
        shard: 0,
        orders: 0,
        floor: String::new(),
        _server: None,
    };
    let before = home.snapshot().await;
    assert_eq!(ghost.transfer_out("t4", 1, &to).await, reply!["unknown_item"]);
    assert_eq!(home.snapshot().await, before);
    for bad in ["0", "-1", "1.5", "x"] {
        let res = TRANSFER_OUT
            .key(home.item_key())
            .key(home.xout_key())
            .key(home.events_key())
            .key(home.seq_key())
            .arg("t5")
            .arg(bad)
            .arg(&to)
            .arg(NOW)
            .arg("")
            .invoke_async::<Value>(&mut home.con)
            .await;
        assert!(res.is_err(), "want {bad} is refused");
    }
    assert_eq!(home.snapshot().await, before);
    other.assert_invariants().await;
}

#[tokio::test]
async fn a_transfer_credits_its_destination_once_and_no_unit_is_made_or_lost() {
    let mut home = Sale::with_item(4, 3).await;
    let mut other = home.bucket(1, 0, 3).await;
    let (from, to) = (home.item.clone(), other.item.clone());
    assert_eq!(other.reserve("alice", 1).await, reply!["sold_out", 0]);

    assert_eq!(home.transfer_out("t1", 3, &to).await, reply!["taken", 3, 1, "0:1"]);
    // In transit: out of the donor's share, not yet in the destination's.
    assert_eq!(
        home.item_field("stock_total").await + other.item_field("stock_total").await,
        1
    );
    assert_eq!(other.transfer_in("t1", 3, &from, "0:1").await, reply!["credited", 3]);
    assert_eq!(other.item_field("stock_total").await, 3);
    let xin = other.xin_key();
    assert_fields(&other.hash(&xin).await, &[("t1", &format!("3|{from}|{NOW}"))]);
    let events = other.transfer_events().await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, format!("in|t1|{to}|{from}|3|{NOW}"));
    assert_eq!(
        events[0].2.as_deref(),
        Some("0:1"),
        "the credit carries its donor step's mark to the database"
    );

    // The replay of a recovery that found the donor's record still there: nothing.
    let before = other.snapshot().await;
    assert_eq!(other.transfer_in("t1", 3, &from, "0:1").await, reply!["already", 3]);
    assert_eq!(other.snapshot().await, before);

    // Forgotten in order: the donor's record first, then the destination's.
    let xout = home.xout_key();
    assert_eq!(home.forget(&xout, "t1").await, reply!["forgotten", 1]);
    assert_eq!(other.forget(&xin, "t1").await, reply!["forgotten", 1]);
    assert_eq!(other.forget(&xin, "t1").await, reply!["forgotten", 0]);
    assert_eq!(
        home.item_field("stock_total").await + other.item_field("stock_total").await,
        4
    );

    // The destination sells what it was given, and a cancel gives it back to it.
    let order = other.reserved("alice", 2).await;
    other.reserved("bob", 1).await;
    assert_eq!(other.reserve("carol", 1).await, reply!["sold_out", 0]);
    assert_eq!(other.cancel(&order, "alice", NOW + 1).await[0], R::from("ok"));
    assert_eq!(other.item_field("stock").await, 2);
    home.assert_invariants().await;
    other.assert_invariants().await;

    // A destination that does not exist: nothing credited (the units stay recorded at the donor).
    let mut ghost = home.bucket(2, 0, 3).await;
    let key = ghost.item_key();
    let _: i64 = ghost.cmd(&["DEL", &key]).await;
    let before = ghost.snapshot().await;
    assert_eq!(ghost.transfer_in("t2", 1, &from, "").await, reply!["unknown_item"]);
    assert_eq!(ghost.snapshot().await, before);
    // A donor mark that is not E:S is refused, changing nothing.
    let before = other.snapshot().await;
    assert!(other.try_transfer_in("t3", 1, &from, "7").await.is_err());
    assert_eq!(other.snapshot().await, before);
}

#[tokio::test]
async fn transfers_are_refused_on_a_fenced_shard() {
    let mut home = Sale::with_item(4, 3).await;
    let mut other = home.bucket(1, 0, 3).await;
    let (from, to) = (home.item.clone(), other.item.clone());
    for sale in [&mut home, &mut other] {
        let key = sale.seq_key();
        let _: i64 = sale.cmd(&["HSET", &key, "fence", "being rebuilt"]).await;
    }
    let before = home.snapshot().await;
    let err = home.try_transfer_out("t1", 1, &to).await.expect_err("fenced");
    assert_eq!(err.code(), Some("FENCED"), "{err}");
    let err = other.try_transfer_in("t1", 1, &from, "").await.expect_err("fenced");
    assert_eq!(err.code(), Some("FENCED"), "{err}");
    assert_eq!(home.snapshot().await, before);
}

// ---------------------------------------------------------------------------
// settle.lua / refund.lua (the engines' contract covers their semantics:
// tests/engine_contract.rs; here what only the scripts can get wrong)

/// A closed order whose hash is gone comes back from the database's record, once, and the
/// refund runs on it; a record of an open order, of another order, or malformed, is an
/// error that changes nothing; a record is ignored while the hash exists.
#[tokio::test]
async fn a_forgotten_order_is_taken_back_from_its_record_only_when_closed() {
    let mut sale = Sale::with_item(5, 3).await;
    let order = sale.reserved("alice", 2).await;
    assert_eq!(sale.pay(&order, "alice", NOW).await[0], R::from("ok"));
    let key = sale.order_key(&order);
    let hash = sale.hash(&key).await;
    let _: i64 = sale.cmd(&["DEL", &key]).await;
    let record = |status: &str, id: &str, item: &str| {
        format!(
            "{status}|{id}|{item}|alice|2|{NOW}|{}|{}||99900|",
            hash["created_ms"], hash["pay_before_ms"]
        )
    };
    let item = sale.item.clone();
    let before = sale.snapshot().await;
    for bad in [
        record("reserved", &order, &item),
        record("paid", "0190c1f2-0000-7000-8000-000000000000", &item),
        record("paid", &order, "another"),
        "paid|too|few".to_owned(),
    ] {
        assert!(sale.try_settle(&order, Some(true), &bad).await.is_err(), "{bad}");
        assert_eq!(sale.snapshot().await, before, "{bad}");
    }
    assert_eq!(
        decode(sale.try_settle(&order, Some(true), "").await.unwrap()),
        reply!["unknown_order"]
    );
    let paid = record("paid", &order, &item);
    assert_eq!(
        decode(sale.try_settle(&order, Some(true), &paid).await.unwrap()),
        reply!["ok", "refunded", 5]
    );
    let back = sale.hash(&key).await;
    assert_eq!(back["status"], "refunded");
    assert_eq!(back["refund_of"], "paid+restock");
    assert_eq!(back["price_cents"], "99900");
    assert!(sale.ttl(&key).await > 0, "a closed order's TTL");
    // Again, record or not: already.
    for r in [paid.as_str(), ""] {
        assert_eq!(
            decode(sale.try_settle(&order, Some(true), r).await.unwrap()),
            reply!["already", "refunded"]
        );
    }
    assert_eq!(sale.counters().await, [5, 0, 0, 0, 0]);
    sale.assert_invariants().await;
    // A late payment of an overdue order expires it first, and says so.
    let late = sale.reserved("bob", 1).await;
    let _: i64 = sale
        .cmd(&["HSET", &sale.order_key(&late), "pay_before_ms", &NOW.to_string()])
        .await;
    assert_eq!(
        decode(sale.try_settle(&late, None, "").await.unwrap()),
        reply!["ok", "refund_due", 5, 1]
    );
    let c = sale.reserved("carol", 1).await;
    assert_eq!(sale.cancel(&c, "carol", NOW).await[0], R::from("ok"));
    assert_eq!(
        decode(sale.try_settle(&c, None, "").await.unwrap()),
        reply!["ok", "refund_due", 5, 0],
        "cancelled before: nothing expired now"
    );
    // A late payment of the refunded order is left as it is.
    assert_eq!(
        decode(sale.try_settle(&order, None, "").await.unwrap()),
        reply!["already", "refunded"]
    );
}
