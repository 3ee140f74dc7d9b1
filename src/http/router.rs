//! The router: the route table, the per-request context, and the one place that turns a
//! refusal into the contract's JSON, tags the response with a request id, counts it and
//! times it (pingora's final logging phase). Handlers live one module per resource:
//! [`super::items`], [`super::orders`], [`super::admin`], [`super::reports`], [`super::health`].

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderName, HeaderValue, Method, Request, Response};
use hyper::body::Incoming;
use tracing::Instrument;

use super::reply::{self, Body};
use super::reports::ReportFormat;
use super::watchdog::{HeadClock, Tracked};
use super::{admin, health, items, orders, reports, webhook};
use crate::app::App;
use crate::clock::Millis;
use crate::domain::ItemSpec;
use crate::engine::{Engine, ItemState, Transition};
use crate::error::{Error, Reject};
use crate::ids::valid_id;
use crate::metrics;
use crate::telemetry::{Audience, TRACEPARENT};

/// The response header of every answer. A constant: a name given as a string is parsed
/// and copied into an allocation of its own on every insert.
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What a handler answers: a response, or a refusal the router renders.
pub type Answer = Result<Response<Body>, Reject>;

/// Route templates: the `route` label, never a raw path.
#[derive(Clone, Copy)]
enum Route {
    ItemGet,
    Reserve,
    Pay,
    Cancel,
    OrderGet,
    OrdersList,
    AdminItemPut,
    AdminStats,
    AdminOrdersCsv,
    AdminItemPause,
    AdminItemResume,
    AdminPauseAll,
    AdminResumeAll,
    AdminLimits,
    AdminRefund,
    PaymentWebhook,
    AdminSalesCsv,
    AdminSalesXlsx,
    OpenApi,
    Metrics,
    Healthz,
    Readyz,
    NotFound,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::ItemGet => "item_get",
            Route::Reserve => "reserve",
            Route::Pay => "pay",
            Route::Cancel => "cancel",
            Route::OrderGet => "order_get",
            Route::OrdersList => "orders_list",
            Route::AdminItemPut => "admin_item_put",
            Route::AdminStats => "admin_stats",
            Route::AdminOrdersCsv => "admin_orders_csv",
            Route::AdminItemPause => "admin_item_pause",
            Route::AdminItemResume => "admin_item_resume",
            Route::AdminPauseAll => "admin_pause_all",
            Route::AdminResumeAll => "admin_resume_all",
            Route::AdminLimits => "admin_limits",
            Route::AdminRefund => "admin_refund",
            Route::PaymentWebhook => "payment_webhook",
            Route::AdminSalesCsv => "admin_sales_csv",
            Route::AdminSalesXlsx => "admin_sales_xlsx",
            Route::OpenApi => "openapi",
            Route::Metrics => "metrics",
            Route::Healthz => "healthz",
            Route::Readyz => "readyz",
            Route::NotFound => "not_found",
        }
    }
}

impl Route {
    /// The span name of a traced request: `METHOD /path/{template}` (as in [`TEMPLATES`]).
    fn span_name(self) -> &'static str {
        match self {
            Route::ItemGet => "GET /api/v1/items/{item_id}",
            Route::Reserve => "POST /api/v1/items/{item_id}/reserve",
            Route::Pay => "POST /api/v1/orders/{order_id}/pay",
            Route::Cancel => "POST /api/v1/orders/{order_id}/cancel",
            Route::OrderGet => "GET /api/v1/orders/{order_id}",
            Route::OrdersList => "GET /api/v1/orders",
            Route::AdminItemPut => "PUT /admin/v1/items/{item_id}",
            Route::AdminStats => "GET /admin/v1/items/{item_id}/stats",
            Route::AdminOrdersCsv => "GET /admin/v1/items/{item_id}/orders.csv",
            Route::AdminItemPause => "POST /admin/v1/items/{item_id}/pause",
            Route::AdminItemResume => "POST /admin/v1/items/{item_id}/resume",
            Route::AdminPauseAll => "POST /admin/v1/pause",
            Route::AdminResumeAll => "POST /admin/v1/resume",
            Route::AdminLimits => "PUT /admin/v1/limits",
            Route::AdminRefund => "POST /admin/v1/orders/{order_id}/refund",
            Route::PaymentWebhook => "POST /webhooks/payments",
            Route::AdminSalesCsv => "GET /admin/v1/reports/sales.csv",
            Route::AdminSalesXlsx => "GET /admin/v1/reports/sales.xlsx",
            Route::OpenApi => "GET /openapi.json",
            Route::Metrics => "GET /metrics",
            Route::Healthz => "GET /healthz",
            Route::Readyz => "GET /readyz",
            Route::NotFound => "not found",
        }
    }

    /// Operators' requests are always traced; sale traffic and the plain routes are sampled.
    fn audience(self) -> Audience {
        match self {
            Route::AdminItemPut
            | Route::AdminStats
            | Route::AdminOrdersCsv
            | Route::AdminItemPause
            | Route::AdminItemResume
            | Route::AdminPauseAll
            | Route::AdminResumeAll
            | Route::AdminLimits
            | Route::AdminRefund
            | Route::PaymentWebhook
            | Route::AdminSalesCsv
            | Route::AdminSalesXlsx => Audience::Operator,
            _ => Audience::Shopper,
        }
    }
}

/// The route table: a path's route, its method, and its id segment. (No route has more than
/// five segments: a longer path is not found, without collecting it.)
fn route(path: &str) -> (Route, Method, Option<&str>) {
    let Some((segs, n)) = segments(path) else {
        return (Route::NotFound, Method::GET, None);
    };
    match &segs[..n] {
        ["api", "v1", "items", id] => (Route::ItemGet, Method::GET, Some(id)),
        ["api", "v1", "items", id, "reserve"] => (Route::Reserve, Method::POST, Some(id)),
        ["api", "v1", "orders"] => (Route::OrdersList, Method::GET, None),
        ["api", "v1", "orders", id] => (Route::OrderGet, Method::GET, Some(id)),
        ["api", "v1", "orders", id, "pay"] => (Route::Pay, Method::POST, Some(id)),
        ["api", "v1", "orders", id, "cancel"] => (Route::Cancel, Method::POST, Some(id)),
        ["admin", "v1", "items", id] => (Route::AdminItemPut, Method::PUT, Some(id)),
        ["admin", "v1", "items", id, "stats"] => (Route::AdminStats, Method::GET, Some(id)),
        ["admin", "v1", "items", id, "orders.csv"] => (Route::AdminOrdersCsv, Method::GET, Some(id)),
        ["admin", "v1", "items", id, "pause"] => (Route::AdminItemPause, Method::POST, Some(id)),
        ["admin", "v1", "items", id, "resume"] => (Route::AdminItemResume, Method::POST, Some(id)),
        ["admin", "v1", "pause"] => (Route::AdminPauseAll, Method::POST, None),
        ["admin", "v1", "resume"] => (Route::AdminResumeAll, Method::POST, None),
        ["admin", "v1", "limits"] => (Route::AdminLimits, Method::PUT, None),
        ["admin", "v1", "orders", id, "refund"] => (Route::AdminRefund, Method::POST, Some(id)),
        ["webhooks", "payments"] => (Route::PaymentWebhook, Method::POST, None),
        ["admin", "v1", "reports", "sales.csv"] => (Route::AdminSalesCsv, Method::GET, None),
        ["admin", "v1", "reports", "sales.xlsx"] => (Route::AdminSalesXlsx, Method::GET, None),
        ["openapi.json"] => (Route::OpenApi, Method::GET, None),
        ["metrics"] => (Route::Metrics, Method::GET, None),
        ["healthz"] => (Route::Healthz, Method::GET, None),
        ["readyz"] => (Route::Readyz, Method::GET, None),
        _ => (Route::NotFound, Method::GET, None),
    }
}

/// [`route`] for the fuzz target `route` (`fuzz/`): the route's label, method and id segment.
#[doc(hidden)]
pub fn route_of(path: &str) -> (&'static str, Method, Option<&str>) {
    let (route, method, id) = route(path);
    (route.label(), method, id)
}

/// Every route as `(method, path template)`, as `docs/openapi.json` describes them (a test
/// holds the two, and this and [`route`], to each other).
pub const TEMPLATES: &[(&str, &str)] = &[
    ("GET", "/api/v1/items/{item_id}"),
    ("POST", "/api/v1/items/{item_id}/reserve"),
    ("GET", "/api/v1/orders"),
    ("GET", "/api/v1/orders/{order_id}"),
    ("POST", "/api/v1/orders/{order_id}/pay"),
    ("POST", "/api/v1/orders/{order_id}/cancel"),
    ("POST", "/webhooks/payments"),
    ("PUT", "/admin/v1/items/{item_id}"),
    ("GET", "/admin/v1/items/{item_id}/stats"),
    ("GET", "/admin/v1/items/{item_id}/orders.csv"),
    ("POST", "/admin/v1/items/{item_id}/pause"),
    ("POST", "/admin/v1/items/{item_id}/resume"),
    ("POST", "/admin/v1/pause"),
    ("POST", "/admin/v1/resume"),
    ("PUT", "/admin/v1/limits"),
    ("POST", "/admin/v1/orders/{order_id}/refund"),
    ("GET", "/admin/v1/reports/sales.csv"),
    ("GET", "/admin/v1/reports/sales.xlsx"),
    ("GET", "/openapi.json"),
    ("GET", "/metrics"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
];

/// The segments of a path after its leading slashes (as `split('/')` cuts them), and how
/// many there are; `None` beyond five. Split by bytes: `str::split('/')` calls memcmp per
/// match, ~600 instructions a request (callgrind). An ASCII '/' never sits inside a
/// multi-byte character, so every slice starts and ends on a character boundary. Public
/// for the fuzz target `route`, which holds it to `split('/')`.
#[doc(hidden)]
pub fn segments(path: &str) -> Option<([&str; 5], usize)> {
    let mut segs = [""; 5];
    let mut n = 0;
    let path = path.trim_start_matches('/');
    let mut start = 0;
    let cuts = path.bytes().enumerate().filter(|(_, b)| *b == b'/').map(|(i, _)| i);
    for end in cuts.chain([path.len()]) {
        *segs.get_mut(n)? = &path[start..end];
        n += 1;
        start = end + 1;
    }
    Some((segs, n))
}

/// An id segment as the client meant it, percent-decoded: a client that builds the path from
/// the OpenAPI document sends the id `sale:1` as `sale%3A1` (path parameters are
/// percent-encoded), and both name the same id. A segment whose escapes do not decode to
/// UTF-8 stays as it came, and so fails [`valid_id`] on its `%`.
fn path_id(segment: &str) -> Cow<'_, str> {
    if !segment.contains('%') {
        return Cow::Borrowed(segment);
    }
    percent_encoding::percent_decode_str(segment)
        .decode_utf8()
        .unwrap_or(Cow::Borrowed(segment))
}

/// Everything a handler needs besides the request, and the stages every handler shares.
pub struct Ctx<'a> {
    pub app: &'a Arc<App>,
    peer: SocketAddr,
    /// The id segment of the path (item or order), already validated.
    pub id: &'a str,
    request_id: &'a str,
}

/// An item the filter and cache stages let through: its definition, and its counters when
/// they were just read from the engine (a cache miss), so a caller needing them does not
/// read the item twice.
pub struct Item {
    pub spec: Arc<ItemSpec>,
    pub fresh: Option<ItemState>,
}

impl Ctx<'_> {
    pub fn engine(&self) -> &Engine {
        &self.app.engine
    }

    pub fn now(&self) -> Millis {
        self.app.clock.now_ms()
    }

    /// A failure, told to the client as 503 (or 500); logged with its cause at most once a
    /// second per kind, the line counting those left out since ([`crate::lograte`]).
    pub fn failed(&self, what: &'static str, e: Error) -> Reject {
        if let Some(suppressed) = self.app.failure_log.admit(what) {
            tracing::warn!(request_id = self.request_id, item_or_order = self.id, cause = %e, side = ?e.side(), suppressed, "{what} failed");
        }
        e.to_reject()
    }

    /// The client's IP: the socket peer, or the last `X-Forwarded-For` hop when a trusted
    /// proxy sets it (the last hop is the one the proxy saw; earlier ones are
    /// client-supplied).
    pub fn client_ip(&self, req: &Request<Incoming>) -> IpAddr {
        if self.app.config.trust_forwarded
            && let Some(ip) = req
                .headers()
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.rsplit(',').next())
                .and_then(|v| v.trim().parse().ok())
        {
            return ip;
        }
        self.peer.ip()
    }

    /// Stages 1–2 of shopper routes: the IP and instance buckets, identity, the user's
    /// bucket.
    pub fn shopper(&self, req: &Request<Incoming>) -> Result<String, Reject> {
        self.app.limiter.check_ip(self.client_ip(req))?;
        let user = self.app.identity.user(req.headers())?;
        self.app.limiter.check_user(&user)?;
        Ok(user)
    }

    /// Stages 3–4 before the engine: is the item known (Bloom filter, not-found cache), and
    /// its definition (local cache, else the engine). No Redis command for an id the filter
    /// rules out.
    pub async fn item(&self, item_id: &str) -> Result<Item, Reject> {
        self.app.filter.check(item_id)?;
        if let Some(spec) = self.app.cache.item(item_id) {
            return Ok(Item { spec, fresh: None });
        }
        // Boxed: only a cache miss needs the engine's future; every request would carry its size.
        match Box::pin(self.engine().item(item_id)).await {
            Ok(Some(state)) => {
                let spec = Arc::new(state.spec.clone());
                self.app.cache.put_item(spec.clone());
                Ok(Item {
                    spec,
                    fresh: Some(state),
                })
            }
            Ok(None) => {
                self.app.filter.remember_missing(item_id);
                Err(Reject::UnknownItem)
            }
            Err(e) => Err(self.failed("item lookup", e)),
        }
    }
}

/// The one entry point, hyper's service itself: route, run the handler, turn a refusal into
/// the contract's JSON, count and time it, and tag it with a request id. Its future is the
/// one hyper keeps for the request: a wrapping future would move it whole (kilobytes) on
/// its first poll.
pub async fn handle(
    app: Arc<App>,
    req: Request<Incoming>,
    peer: SocketAddr,
    clock: Arc<HeadClock>,
) -> Result<Response<Tracked>, Infallible> {
    let app = &app;
    let started = Instant::now();
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| valid_id(v))
        .map(str::to_owned)
        .unwrap_or_else(|| app.next_request_id());
    // The id borrows from a clone of the URI (a reference count), so the request can move
    // into its handler.
    let uri = req.uri().clone();
    let (route, method, id) = route(uri.path());
    let id = id.map(path_id);
    let ctx = Ctx {
        app,
        peer,
        id: id.as_deref().unwrap_or(""),
        request_id: &request_id,
    };
    let asked = req.method().clone();
    // Traced: a sampled `traceparent`, an operator, or the sampled share of the rest
    // ([`crate::telemetry`]); every log line of a traced request carries its trace and span
    // ids. Otherwise a debug span: at debug level every line carries the request id and
    // route; the warnings and errors a request logs at the default level name its id
    // themselves. (An info span is formatted by the log layer: measurable on every request.)
    let traceparent = req.headers().get(TRACEPARENT).cloned();
    // Boxed: a trace is a few hundred bytes that every request's future would carry.
    let trace = app
        .telemetry
        .start(
            req.headers(),
            traceparent.is_some(),
            route.audience(),
            route.span_name(),
        )
        .map(Box::new);
    let span = match &trace {
        Some(t) => {
            tracing::info_span!("request", request_id = %request_id, route = route.label(), trace_id = %t.trace_id(), span_id = %t.span_id())
        }
        None => tracing::debug_span!("request", request_id = %request_id, route = route.label()),
    };
    // Built where it is awaited: a future made first and awaited later is moved (its whole
    // size) into the awaiting one. Instrumenting wraps it, so only when the span records.
    let answer = if span.is_disabled() {
        dispatch(&ctx, req, route, method, id.as_deref()).await
    } else {
        dispatch(&ctx, req, route, method, id.as_deref())
            .instrument(span.clone())
            .await
    };
    let (mut response, outcome) = match answer {
        Ok(r) => (r, "ok"),
        Err(reject) => {
            if matches!(reject, Reject::Internal) {
                tracing::error!(request_id = %request_id, route = route.label(), "internal error");
            }
            (reply::reject(&reject), reject.code())
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        response.headers_mut().insert(X_REQUEST_ID, v);
    }
    let took = started.elapsed();
    metrics::request(route.label(), outcome, took.as_secs_f64());
    let status = response.status().as_u16();
    // A 5xx is logged even when the request was not traced (its ids made now, not
    // exported), at most once a second per route, the line counting those left out: an
    // outage must not turn every refusal into a log line.
    let mut suppressed = 0;
    let trace = trace.or_else(|| {
        if status < 500 {
            return None;
        }
        suppressed = app.failure_log.admit(route.span_name())?;
        let mut headers = http::HeaderMap::new();
        if let Some(v) = traceparent {
            headers.insert(TRACEPARENT, v);
        }
        Some(Box::new(app.telemetry.late(&headers, route.span_name())))
    });
    match trace {
        Some(trace) => {
            app.telemetry.inject(&trace, response.headers_mut());
            span.in_scope(|| {
                tracing::info!(
                    target: "access",
                    request_id = %request_id,
                    trace_id = %trace.trace_id(),
                    span_id = %trace.span_id(),
                    parent_span_id = %trace.parent_span_id(),
                    method = asked.as_str(),
                    route = route.label(),
                    id = ctx.id,
                    peer = %ctx.peer.ip(),
                    status,
                    outcome,
                    duration_us = took.as_micros() as u64,
                    suppressed,
                    "request"
                )
            });
            trace.end(status, outcome, route.span_name(), &request_id);
        }
        // The event's level and target are the span's: a span that does not record means
        // an event that would not either (and asking costs a filter lookup per request).
        None if span.is_disabled() => {}
        None => span.in_scope(|| tracing::debug!(outcome, status, "request")),
    }
    // Once hyper is done with the body, the connection waits for its next head.
    Ok(response.map(|body| Tracked::new(body, clock)))
}

/// The route's handler, after the checks every route shares (known route, its method, a
/// valid id).
async fn dispatch(ctx: &Ctx<'_>, req: Request<Incoming>, route: Route, method: Method, id: Option<&str>) -> Answer {
    if matches!(route, Route::NotFound) {
        Err(Reject::NotFound)
    } else if req.method() != method {
        Err(Reject::MethodNotAllowed)
    } else if id.is_some_and(|id| !valid_id(id)) {
        Err(Reject::BadRequest("ids are 1-64 characters of [A-Za-z0-9_.:-]".into()))
    } else {
        match route {
            Route::ItemGet => items::get(ctx, req).await,
            Route::Reserve => items::reserve(ctx, req).await,
            Route::Pay => Box::pin(orders::transition(ctx, req, Transition::Pay)).await,
            Route::Cancel => Box::pin(orders::transition(ctx, req, Transition::Cancel)).await,
            Route::OrderGet => Box::pin(orders::get(ctx, req)).await,
            Route::OrdersList => Box::pin(orders::list(ctx, req)).await,
            Route::AdminItemPut => Box::pin(admin::put_item(ctx, req)).await,
            Route::AdminStats => Box::pin(admin::stats(ctx, req)).await,
            Route::AdminOrdersCsv => Box::pin(admin::orders_csv(ctx, req)).await,
            Route::AdminItemPause => Box::pin(admin::pause(ctx, req, Some(ctx.id), true)).await,
            Route::AdminItemResume => Box::pin(admin::pause(ctx, req, Some(ctx.id), false)).await,
            Route::AdminPauseAll => Box::pin(admin::pause(ctx, req, None, true)).await,
            Route::AdminResumeAll => Box::pin(admin::pause(ctx, req, None, false)).await,
            Route::AdminLimits => Box::pin(admin::put_limits(ctx, req)).await,
            Route::AdminRefund => Box::pin(admin::refund(ctx, req)).await,
            Route::PaymentWebhook => Box::pin(webhook::payment(ctx, req)).await,
            Route::AdminSalesCsv => Box::pin(reports::sales(ctx, req, ReportFormat::Csv)).await,
            Route::AdminSalesXlsx => Box::pin(reports::sales(ctx, req, ReportFormat::Xlsx)).await,
            Route::OpenApi => health::openapi(),
            Route::Metrics => health::metrics(ctx),
            Route::Healthz => health::healthz(),
            Route::Readyz => health::readyz(ctx).await,
            Route::NotFound => Err(Reject::NotFound),
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn routes_and_their_ids() {
        assert!(matches!(
            route("/api/v1/items/x1/reserve"),
            (Route::Reserve, Method::POST, Some("x1"))
        ));
        assert!(matches!(
            route("/api/v1/orders"),
            (Route::OrdersList, Method::GET, None)
        ));
        assert!(matches!(route("//metrics"), (Route::Metrics, _, None)));
        assert!(matches!(
            route("/admin/v1/items/x1/pause"),
            (Route::AdminItemPause, Method::POST, Some("x1"))
        ));
        assert!(matches!(
            route("/admin/v1/resume"),
            (Route::AdminResumeAll, Method::POST, None)
        ));
        assert!(matches!(
            route("/admin/v1/limits"),
            (Route::AdminLimits, Method::PUT, None)
        ));
        assert!(matches!(
            route("/admin/v1/orders/o1/refund"),
            (Route::AdminRefund, Method::POST, Some("o1"))
        ));
        assert!(matches!(
            route("/admin/v1/reports/sales.xlsx"),
            (Route::AdminSalesXlsx, Method::GET, None)
        ));
        assert!(matches!(
            route("/admin/v1/reports/sales.csv"),
            (Route::AdminSalesCsv, Method::GET, None)
        ));
        assert!(matches!(route("/api/v1/items/x1/"), (Route::NotFound, _, None)));
        assert!(matches!(route("/a/b/c/d/e/f"), (Route::NotFound, _, None)));
        assert!(matches!(route("/"), (Route::NotFound, _, None)));
        assert!(matches!(
            route("/api/v1/items/é/reserve"),
            (Route::Reserve, _, Some("é"))
        ));
    }

    /// Every template routes to a route of its method, every route but `not_found` has one
    /// template, and every `route` label is one of the metrics' labels.
    #[test]
    fn every_route_has_its_template() {
        let mut labels = std::collections::BTreeSet::new();
        for (method, template) in TEMPLATES {
            let path = template.replace("{item_id}", "x1").replace("{order_id}", "o1");
            let (r, m, _) = route(&path);
            assert!(!matches!(r, Route::NotFound), "{template}");
            assert_eq!(m.as_str(), *method, "{template}");
            assert!(
                labels.insert(r.label()),
                "{template}: a second template of {}",
                r.label()
            );
        }
        let all: std::collections::BTreeSet<&str> = crate::metrics::ROUTES
            .iter()
            .copied()
            .filter(|l| *l != "not_found")
            .collect();
        assert_eq!(labels, all, "the templates cover every route");
    }

    #[test]
    fn path_ids_are_percent_decoded() {
        assert_eq!(path_id("sale:1"), "sale:1");
        assert!(matches!(path_id("sale:1"), Cow::Borrowed(_)));
        assert_eq!(path_id("sale%3A1"), "sale:1");
        assert_eq!(path_id("sale%3a1"), "sale:1");
        assert_eq!(path_id("%2E%2E"), "..");
        // Decoded, and then not an id: refused by `valid_id` as before.
        assert_eq!(path_id("a%2Fb"), "a/b");
        assert!(!valid_id(&path_id("a%2Fb")));
        assert!(!valid_id(&path_id("a%20b")));
        // Escapes that are not UTF-8, or not escapes: the segment as it came.
        assert_eq!(path_id("a%FFb"), "a%FFb");
        assert_eq!(path_id("a%zzb"), "a%zzb");
        assert!(!valid_id(&path_id("a%FFb")));
    }

    proptest! {
        /// The byte split cuts exactly where `split('/')` does.
        #[test]
        fn segments_are_those_of_split(path in "[/aé€b/]{0,24}") {
            let expected: Vec<&str> = path.trim_start_matches('/').split('/').collect();
            match segments(&path) {
                Some((segs, n)) => prop_assert_eq!(&segs[..n], &expected[..]),
                None => prop_assert!(expected.len() > 5),
            }
        }
    }
}
