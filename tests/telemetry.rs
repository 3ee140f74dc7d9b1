//! Traces and the access log (issue 15): a W3C `traceparent` sent in comes back in the
//! request's access log line and in the span exported over OTLP/HTTP to a collector the test
//! runs; sampling of sale traffic; operators' requests and 5xx answers always logged.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::binary::Binary;
use common::free_port;
use common::http::{ADMIN_TOKEN, RequestExt, metric_value, send};
use common::poll::poll;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::Value;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN: &str = "00f067aa0ba902b7";

/// An OTLP/HTTP collector stand-in: takes `POST /v1/traces` (protobuf), keeps every span.
struct Collector {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    async fn start() -> Collector {
        use http_body_util::{BodyExt, Full};
        use hyper::service::service_fn;
        use hyper_util::rt::TokioIo;

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<Span>>> = Arc::default();
        let kept = spans.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                        let kept = kept.clone();
                        async move {
                            let path = req.uri().path().to_owned();
                            let body = match req.into_body().collect().await {
                                Ok(b) => b.to_bytes(),
                                Err(_) => bytes::Bytes::new(),
                            };
                            let status = if path == "/v1/traces" {
                                match ExportTraceServiceRequest::decode(body) {
                                    Ok(export) => {
                                        let spans = export
                                            .resource_spans
                                            .into_iter()
                                            .flat_map(|r| r.scope_spans)
                                            .flat_map(|s| s.spans);
                                        kept.lock().unwrap().extend(spans);
                                        200
                                    }
                                    Err(_) => 400,
                                }
                            } else {
                                404
                            };
                            let response = hyper::Response::builder()
                                .status(status)
                                .header("content-type", "application/x-protobuf")
                                .body(Full::new(bytes::Bytes::new()))
                                .expect("a static response");
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Collector { addr, spans, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An embedded gateway logging JSON, with the demo item.
fn gateway(sample: &str, otel: Option<&str>) -> Binary {
    let mut b = Binary::builder()
        .flag("--admin-token", ADMIN_TOKEN)
        .flag("--log-format", "json")
        .flag("--access-log-sample", sample)
        .flag("--rate-per-user", "0")
        .flag("--demo", "true")
        .captured();
    if let Some(url) = otel {
        b = b.flag("--otel-endpoint", url);
    }
    b.spawn()
}

/// The access log lines printed so far, as JSON.
fn access_lines(gw: &Binary) -> Vec<Value> {
    gw.stderr_text()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["target"] == "access")
        .collect()
}

fn access_line_of(gw: &Binary, request_id: &str) -> Option<Value> {
    access_lines(gw)
        .into_iter()
        .find(|v| v["fields"]["request_id"] == request_id)
}

/// A sampled `traceparent` joins the request to the caller's trace: the response names the
/// gateway's span in its own `traceparent`, the access line carries the trace id, the
/// gateway's span id and the caller's, and the span exported to the collector has the same
/// three, with the route and status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_sent_in_comes_back_in_the_log_line_and_the_exported_span() {
    let collector = Collector::start().await;
    let mut gw = gateway("0", Some(&collector.url()));
    gw.ready().await;
    let r = send(
        gw.get("/api/v1/items/demo")
            .header("traceparent", format!("00-{TRACE_ID}-{PARENT_SPAN}-01")),
    )
    .await;
    assert_eq!(r.status.as_u16(), 200, "{}", r.text);
    let back = r.header("traceparent").expect("a traceparent in the response");
    let parts: Vec<&str> = back.split('-').collect();
    assert_eq!(parts.len(), 4, "{back}");
    assert_eq!((parts[0], parts[1], parts[3]), ("00", TRACE_ID, "01"), "{back}");
    let span_id = parts[2].to_owned();
    assert_ne!(span_id, PARENT_SPAN, "the gateway's span is its own");
    let request_id = r.header("x-request-id").expect("a request id").to_owned();

    let line = common::poll(Duration::from_secs(10), async || access_line_of(&gw, &request_id))
        .await
        .unwrap_or_else(|| panic!("no access line for {request_id}:\n{}", gw.stderr_text()));
    let f = &line["fields"];
    assert_eq!(f["trace_id"], TRACE_ID, "{line}");
    assert_eq!(f["span_id"], span_id.as_str(), "{line}");
    assert_eq!(f["parent_span_id"], PARENT_SPAN, "{line}");
    assert_eq!(f["route"], "item_get", "{line}");
    assert_eq!(f["status"], 200, "{line}");
    assert_eq!(line["level"], "INFO", "{line}");
    // The request span carries the ids into every line of the request.
    assert_eq!(line["span"]["trace_id"], TRACE_ID, "{line}");

    // A request without a traceparent, sampling 0: no line.
    let quiet = send(gw.get("/api/v1/items/demo")).await;
    let quiet_id = quiet.header("x-request-id").unwrap().to_owned();
    assert!(quiet.header("traceparent").is_none());

    // SIGTERM flushes the spans queued for export.
    gw.terminate();
    assert!(gw.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()));
    assert!(
        access_line_of(&gw, &quiet_id).is_none(),
        "an unsampled request was logged"
    );
    let spans = collector.spans();
    let span = spans
        .iter()
        .find(|s| hex(&s.span_id) == span_id)
        .unwrap_or_else(|| panic!("span {span_id} not exported; got {spans:?}"));
    assert_eq!(hex(&span.trace_id), TRACE_ID);
    assert_eq!(hex(&span.parent_span_id), PARENT_SPAN);
    assert_eq!(span.name, "GET /api/v1/items/{item_id}");
    let status = span
        .attributes
        .iter()
        .find(|a| a.key == "http.response.status_code")
        .and_then(|a| a.value.as_ref())
        .map(|v| format!("{v:?}"));
    assert!(status.is_some_and(|v| v.contains("200")), "{span:?}");
    assert!(
        spans.iter().all(|s| s.span_id.len() == 8 && s.trace_id.len() == 16),
        "{spans:?}"
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sale traffic is logged at the sampling share (all of it at 1, none at 0, ~half at 0.5),
/// an unsampled `traceparent` does not force a line, and operators' requests always get one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sale_traffic_is_sampled_and_operators_are_always_logged() {
    for (sample, low, high) in [("1", 200, 200), ("0", 0, 0), ("0.5", 60, 140)] {
        let mut gw = gateway(sample, None);
        gw.ready().await;
        let mut ids = Vec::new();
        for i in 0..200 {
            let mut req = gw.get("/api/v1/items/demo");
            if i % 2 == 0 {
                req = req.header("traceparent", format!("00-{TRACE_ID}-{PARENT_SPAN}-00"));
            }
            ids.push(send(req).await.header("x-request-id").unwrap().to_owned());
        }
        let admin = send(gw.admin(gw.post("/admin/v1/pause"))).await;
        assert_eq!(admin.status.as_u16(), 200, "{}", admin.text);
        let admin_id = admin.header("x-request-id").unwrap().to_owned();
        let line = common::poll(Duration::from_secs(10), async || access_line_of(&gw, &admin_id)).await;
        let line = line.unwrap_or_else(|| panic!("no access line for the admin request:\n{}", gw.stderr_text()));
        assert_eq!(line["fields"]["route"], "admin_pause_all", "{line}");
        // An operator's request is a trace of its own: a fresh trace id.
        assert!(
            line["fields"]["trace_id"]
                .as_str()
                .is_some_and(|t| t.len() == 32 && t != TRACE_ID),
            "{line}"
        );
        gw.terminate();
        gw.wait_exit(Duration::from_secs(30));
        let logged: std::collections::HashSet<String> = access_lines(&gw)
            .iter()
            .filter_map(|v| v["fields"]["request_id"].as_str().map(str::to_owned))
            .collect();
        let n = ids.iter().filter(|id| logged.contains(*id)).count();
        assert!(
            (low..=high).contains(&n),
            "sample {sample}: {n} of 200 sale requests logged, expected {low}..={high}"
        );
    }
}

/// A 5xx is logged even when the request was not sampled: a gateway whose Redis never
/// answers refuses reservations with 503, each with its access line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_of_5xx_is_always_logged() {
    let dead_redis = format!("redis://127.0.0.1:{}", free_port());
    let dir = tempfile::tempdir().unwrap();
    let mut gw = Binary::builder()
        .flag("--redis-url", &dead_redis)
        .flag("--redis-timeout", "200ms")
        .flag(
            "--database-url",
            &format!("sqlite://{}/orders.db", dir.path().display()),
        )
        .flag("--admin-token", ADMIN_TOKEN)
        .flag("--log-format", "json")
        .flag("--access-log-sample", "0")
        .flag("--rate-per-user", "0")
        .captured()
        .spawn();
    let up = common::poll(Duration::from_secs(30), async || {
        common::http::try_send(gw.get("/healthz"))
            .await
            .ok()
            .filter(|r| r.status.as_u16() == 200)
    })
    .await;
    assert!(up.is_some(), "not up:\n{}", gw.output_text());
    // Paying needs the engine (Redis), whatever the filters know.
    let order = "0190d0e2-8b5a-7c3e-8f4a-123456789abc";
    let r = send(gw.post(&format!("/api/v1/orders/{order}/pay")).user("u1")).await;
    assert_eq!(r.status.as_u16(), 503, "{}", r.text);
    let id = r.header("x-request-id").unwrap().to_owned();
    let line = common::poll(Duration::from_secs(10), async || access_line_of(&gw, &id)).await;
    let line = line.unwrap_or_else(|| panic!("no access line for a 503:\n{}", gw.stderr_text()));
    assert_eq!(line["fields"]["status"], 503, "{line}");
    assert_eq!(line["fields"]["outcome"], "unavailable", "{line}");
    gw.kill();
}

/// `/metrics` carries the process metrics: CPU seconds, resident memory, open descriptors.
/// The CPU seconds are the kernel's, in whole clock ticks (10 ms): a gateway that is ready
/// may not have used one yet (seen on a fast host), so it is scraped until it has, and the
/// figure is held to `/proc`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_the_process_metrics() {
    let mut gw = gateway("0", None);
    gw.ready().await;
    let text = poll(Duration::from_secs(20), async || {
        let text = send(gw.get("/metrics")).await.text;
        (metric_value(&text, "process_cpu_seconds_total") > 0.0).then_some(text)
    })
    .await
    .expect("process_cpu_seconds_total rises above 0 within 20 s");
    let from_proc = std::fs::read_to_string(format!("/proc/{}/stat", gw.pid())).unwrap();
    let fields: Vec<&str> = from_proc[from_proc.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    let cpu = metric_value(&text, "process_cpu_seconds_total");
    // read before /proc, so at most /proc's (ticks of 10 ms: CLK_TCK is 100 on Linux)
    assert!(
        cpu <= ticks / 100.0 + 0.01,
        "process_cpu_seconds_total {cpu} against /proc's {} s",
        ticks / 100.0
    );
    for (name, kind) in [
        ("process_cpu_seconds_total", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
    ] {
        assert!(text.contains(&format!("# TYPE {name} {kind}")), "{name}:\n{text}");
        let value = metric_value(&text, name);
        assert!(value > 0.0, "{name} = {value}");
    }
    let rss = metric_value(&text, "process_resident_memory_bytes");
    let from_proc = std::fs::read_to_string(format!("/proc/{}/statm", gw.pid())).unwrap();
    let pages: f64 = from_proc.split_whitespace().nth(1).unwrap().parse().unwrap();
    let page = 4096.0;
    assert!(
        (rss / (pages * page)) > 0.5 && (rss / (pages * page)) < 2.0,
        "process_resident_memory_bytes {rss} against /proc's {}",
        pages * page
    );
}
