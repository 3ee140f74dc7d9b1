//! Traces and the access log. A request that carries a sampled W3C `traceparent`, an
//! operator's request (admin routes, the payment webhook) and a sampled share of the rest
//! (`SECKILL_ACCESS_LOG_SAMPLE`, for sale traffic) are *traced*: they get a span id, a
//! `request` span whose `trace_id` and `span_id` every log line of the request carries, an
//! access log line at info, a `traceparent` response header naming the gateway's span, and,
//! with `OTEL_EXPORTER_OTLP_ENDPOINT` set, a server span exported over OTLP/HTTP. Every other
//! request costs a header lookup and a random number; one answered 5xx still gets its access
//! line.
//!
//! The parsing, ids and export are the OpenTelemetry crates' (the W3C propagator, the SDK's
//! tracer with its batch processor, the OTLP exporter); this module only decides which
//! requests are traced.

use std::borrow::Cow;
use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracer, SdkTracerProvider, Span as SdkSpan};

/// The W3C trace context header.
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// How long one OTLP export may take (the collector being down costs a thread this long).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The exporter, when `OTEL_EXPORTER_OTLP_ENDPOINT` is set, and the access-log sampling.
pub struct Telemetry {
    /// The share of untraced sale traffic logged, as a threshold on a random `u32`.
    sample_below: u64,
    export: Option<(SdkTracerProvider, SdkTracer)>,
    propagator: TraceContextPropagator,
}

/// Why a request is traced, or that it is not.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Sale traffic and the plain routes: traced when sampled.
    Shopper,
    /// Admin routes and the payment webhook: always traced.
    Operator,
}

impl Telemetry {
    /// `endpoint`: the OTLP/HTTP base URL (`/v1/traces` is appended unless it is there, as
    /// the OpenTelemetry specification says of `OTEL_EXPORTER_OTLP_ENDPOINT`); `sample`: the
    /// share of sale traffic that gets an access log line (0–1).
    pub fn new(endpoint: Option<&str>, sample: f64) -> anyhow::Result<Self> {
        let export = match endpoint {
            None => None,
            Some(base) => {
                use opentelemetry_otlp::{WithExportConfig, WithHttpConfig as _};
                let base = base.trim_end_matches('/');
                let url = if base.ends_with("/v1/traces") {
                    base.to_owned()
                } else {
                    format!("{base}/v1/traces")
                };
                let exporter = opentelemetry_otlp::SpanExporter::builder()
                    .with_http()
                    .with_endpoint(url)
                    .with_timeout(EXPORT_TIMEOUT)
                    .with_headers(Default::default())
                    .build()?;
                let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| "seckill-gateway".into());
                let provider = SdkTracerProvider::builder()
                    // A root span is only started for a request already chosen; a remote
                    // parent's sampled flag decides for its child.
                    .with_sampler(Sampler::ParentBased(Box::new(Sampler::AlwaysOn)))
                    .with_resource(
                        opentelemetry_sdk::Resource::builder()
                            .with_service_name(service)
                            .build(),
                    )
                    .with_batch_exporter(exporter)
                    .build();
                let tracer = provider.tracer("seckill-gateway");
                Some((provider, tracer))
            }
        };
        Ok(Telemetry {
            sample_below: (sample.clamp(0.0, 1.0) * (u32::MAX as f64 + 1.0)) as u64,
            export,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// At the start of a request: its trace when it is traced, else `None` (see the module
    /// docs). `has_parent`: the headers hold a `traceparent`; `name` is the span's name
    /// (`METHOD /route/template`).
    pub fn start(
        &self,
        headers: &HeaderMap,
        has_parent: bool,
        audience: Audience,
        name: &'static str,
    ) -> Option<Trace> {
        let parent = has_parent.then(|| self.propagator.extract(&HeaderExtractor(headers)));
        let parent_sampled = parent.as_ref().map(|cx| cx.span().span_context().is_sampled());
        let chosen = match parent_sampled {
            Some(true) => true,
            _ => audience == Audience::Operator || self.sampled(),
        };
        if !chosen {
            return None;
        }
        Some(self.begin(parent.unwrap_or_default(), name, SystemTime::now(), true))
    }

    /// A trace for a request that was not chosen at its start but turned out to need an
    /// access line (a 5xx): its ids, not exported.
    pub fn late(&self, headers: &HeaderMap, name: &'static str) -> Trace {
        let parent = headers
            .get(TRACEPARENT)
            .map(|_| self.propagator.extract(&HeaderExtractor(headers)))
            .unwrap_or_default();
        self.begin(parent, name, SystemTime::now(), false)
    }

    fn sampled(&self) -> bool {
        self.sample_below > 0 && u64::from(rand::random::<u32>()) < self.sample_below
    }

    /// The request's span: started by the SDK's tracer when it is exported (its ids are the
    /// SDK's), else only ids.
    fn begin(&self, parent: Context, name: &'static str, started: SystemTime, export: bool) -> Trace {
        let parent_span = parent.span().span_context().clone();
        match &self.export {
            Some((_, tracer)) if export => {
                let span = tracer
                    .span_builder(name)
                    .with_kind(SpanKind::Server)
                    .with_start_time(started)
                    .start_with_context(tracer, &parent);
                let context = span.span_context().clone();
                Trace {
                    context,
                    parent: parent_span,
                    exported: Some(span),
                }
            }
            _ => {
                use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};
                let trace_id = if parent_span.is_valid() {
                    parent_span.trace_id()
                } else {
                    TraceId::from_bytes(rand::random::<u128>().max(1).to_be_bytes())
                };
                let flags = if parent_span.is_valid() {
                    parent_span.trace_flags()
                } else {
                    TraceFlags::SAMPLED
                };
                let span_id = SpanId::from_bytes(rand::random::<u64>().max(1).to_be_bytes());
                let state = parent_span.trace_state().clone();
                let context = SpanContext::new(
                    trace_id,
                    span_id,
                    flags,
                    false,
                    if parent_span.is_valid() {
                        state
                    } else {
                        TraceState::default()
                    },
                );
                Trace {
                    context,
                    parent: parent_span,
                    exported: None,
                }
            }
        }
    }

    /// Name the gateway's span in the response (`traceparent`, and `tracestate` when the
    /// caller sent one), so the caller can join its trace to the gateway's.
    pub fn inject(&self, trace: &Trace, headers: &mut HeaderMap) {
        let cx = Context::new().with_remote_span_context(trace.context.clone());
        self.propagator.inject_context(&cx, &mut HeaderInjector(headers));
    }

    /// Flush what is queued for export (at shutdown). Blocks: call off the async workers.
    pub fn shutdown(&self) {
        if let Some((provider, _)) = &self.export
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(cause = %e, "trace export did not flush");
        }
    }
}

/// A traced request's ids, and its exported span.
pub struct Trace {
    pub context: SpanContext,
    /// The caller's span (invalid when the request carried none).
    pub parent: SpanContext,
    exported: Option<SdkSpan>,
}

impl Trace {
    pub fn trace_id(&self) -> String {
        self.context.trace_id().to_string()
    }

    pub fn span_id(&self) -> String {
        self.context.span_id().to_string()
    }

    /// The caller's span id, or `""`.
    pub fn parent_span_id(&self) -> Cow<'static, str> {
        if self.parent.is_valid() {
            Cow::Owned(self.parent.span_id().to_string())
        } else {
            Cow::Borrowed("")
        }
    }

    /// End the exported span with the request's outcome.
    pub fn end(self, status: u16, outcome: &'static str, route: &'static str, request_id: &str) {
        let Some(mut span) = self.exported else {
            return;
        };
        span.set_attributes([
            KeyValue::new("http.response.status_code", i64::from(status)),
            KeyValue::new("http.route", route),
            KeyValue::new("seckill.outcome", outcome),
            KeyValue::new("seckill.request_id", request_id.to_owned()),
        ]);
        if status >= 500 {
            span.set_status(Status::error(outcome));
        }
        span.end();
    }
}
